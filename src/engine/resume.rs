//! [`LeasedSession::resume`]: a session of a lease that still exists, which answers for the
//! keys it finds on it — each ends up taken back by a guard or deleted ([`leftovers`]).

use etcd_client::{Client, Txn, TxnOp};

use super::book::Book;
use super::leftovers::{self, Leftovers};
use super::until_answered;
use crate::backoff::Backoff;
use crate::keys;
#[cfg(doc)]
use crate::LossReason;
use crate::{Error, LeasedSession, SessionOptions};

impl LeasedSession {
    /// Adopts lease `lease_id`, which still exists — granted by an earlier process, say, that
    /// restarted within the TTL or [`orphan`](Self::orphan)ed its session — and keeps it alive
    /// from now on (Go's `concurrency.WithLease`). Keys on the lease (a lock, a leadership)
    /// can then be taken back with [`Mutex::resume`](crate::Mutex::resume) and
    /// [`Election::resume`](crate::Election::resume).
    ///
    /// The lease keeps the TTL it was granted with (`options`' TTL is not used; its margin and
    /// timeouts are checked against the lease's TTL). The session's deadline starts from this
    /// call's first refresh of the lease, once etcd acknowledged it — never from a guess about
    /// the earlier process's refreshes. Member keys this session creates never collide with
    /// an earlier holder's of the same lease.
    ///
    /// Resume only a lease whose earlier owner is gone or has [`orphan`](Self::orphan)ed it:
    /// a key taken back keeps its fencing token, so fencing cannot tell the two processes
    /// apart, and this call cannot know whether the earlier one still runs (`docs/safety.md`).
    ///
    /// # Keys nobody takes back
    /// The resumed session keeps the lease alive for as long as it runs, so it also answers
    /// for every key on it: each one ends up either held by one of its guards or deleted. The
    /// earlier process may have left keys nobody can take back — a `lock()` whose enqueue
    /// reached etcd but whose answer died with it (or landed after
    /// [`orphan`](Self::orphan)), so its token was never known — and such a key, once at the
    /// head of its queue, would block everyone behind it.
    ///
    /// The rule. This call lists the keys on the lease (its `LeaseTimeToLive` asks for them:
    /// the *earlier keys*; etcd's leader lists a lease's keys only once it has applied all
    /// it committed, so every key an answered put of the earlier process made is among them).
    /// The *adoption window* is [`SessionOptions::with_adoption_window`] (default: the
    /// lease's TTL), counted from this call's return. The session looks at its lease —
    /// `LeaseTimeToLive` with its keys, then one read per 64 of them for their create
    /// revisions — once when the window ends and once per TTL, for as long as it lives, and
    /// deletes, each with one Txn fenced on the key's create revision and on its being
    /// attached to this lease, every key that
    ///
    /// * was not put by this session's own primitives (a put counts from before it is first
    ///   sent and, once answered, until its key is gone; a put given up on before any answer
    ///   came does not count: the key, if it landed, is a leftover like any other), and
    /// * was not taken back by this session (`Mutex::resume`,
    ///   [`Election::resume`](crate::Election::resume), `Semaphore::resume`,
    ///   `RwLock::resume_read`/`resume_write`,
    ///   [`SessionRegistration::resume`](crate::discovery::SessionRegistration::resume)), a
    ///   taking-back counting from before its first request, and
    /// * is not one of the earlier keys — a put the earlier process sent that landed after
    ///   this call listed the lease: nobody can hold its token — or, being one, is found
    ///   once the adoption window is over. (An earlier key a look no longer finds is gone;
    ///   a key of that name found later landed later.)
    ///
    /// So a key of the earlier process that is not taken back within the window is gone at
    /// most one look after the window ends (at most the request time after it, while etcd
    /// answers), and a key landing later within one TTL of landing, plus that time: no later
    /// than the lease itself would have removed them had nobody resumed it. A key the rule
    /// has decided to delete can no longer be taken back ([`Error::LockLost`]; `None` for a
    /// registration); to take keys back later, ask for a longer window. Keys attached to the
    /// lease other than through this crate's primitives (a put of your own with
    /// [`lease_id()`](Self::lease_id)) are not this session's: the rule deletes them like the
    /// earlier process's — attach keys of your own to a session of their own.
    /// If etcd refuses a look or a deletion for good (permissions: the role needs `read` and
    /// `write` on every key of the lease), the session ends
    /// ([`LossReason::CleanupFailed`]), as for a failed background release. A session made
    /// with [`new`](Self::new) never looks: its lease starts empty.
    ///
    /// The pointers the earlier process's waits nested under the keys ahead of theirs
    /// (`docs/design.md`, "Announced hand-offs") are not taken back: this call deletes them
    /// before it returns (a resumed wait puts its own).
    ///
    /// # Errors
    /// [`Error::LeaseNotFound`] if the lease has expired or was revoked; [`Error::InvalidArgument`]
    /// for a margin or timeout out of range for the lease's TTL (the lease was refreshed once);
    /// request errors ([`Error::Etcd`], [`Error::Timeout`], [`Error::PermissionDenied`]).
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future before it returns starts nothing; the lease, refreshed
    /// or not, ends by its TTL unless someone resumes it.
    ///
    /// # Example
    /// ```no_run
    /// # async fn demo(client: etcd_client::Client, lease_id: i64, key: String, token: i64)
    /// # -> Result<(), etcd_coord::Error> {
    /// use etcd_coord::{LeasedSession, Mutex, SessionOptions};
    ///
    /// // After a restart: the lease id, the lock's key and fencing token were saved before.
    /// let session = LeasedSession::resume(client, lease_id, SessionOptions::new()).await?;
    /// let guard = Mutex::new(&session, "jobs/nightly").resume(&key, token).await?;
    /// assert_eq!(guard.fencing_token(), token);
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(name = "etcd_coord.session.resume", skip_all, fields(lease = %format_args!("{lease_id:x}")))]
    pub async fn resume(
        client: Client,
        lease_id: i64,
        options: SessionOptions,
    ) -> Result<LeasedSession, Error> {
        let (resumed, mut keys) =
            Box::pin(LeasedSession::adopt(client, lease_id, &options)).await?;
        let session = resumed.inner();
        // The earlier process's waits' pointers (docs/design.md, "Announced hand-offs") go
        // at once: a resumed wait announces itself again, and nobody else needs them.
        let (pointers, others): (Vec<_>, Vec<_>) =
            keys.into_iter().partition(|k| keys::is_pointer(k));
        keys = others;
        for chunk in pointers.chunks(64) {
            let txn = Txn::new().and_then(
                chunk
                    .iter()
                    .map(|k| TxnOp::delete(k.clone(), None))
                    .collect::<Vec<_>>(),
            );
            Box::pin(until_answered(
                session,
                || txn.clone(),
                &mut Backoff::for_requests(),
            ))
            .await?;
        }
        let window = options.adoption_window().unwrap_or(session.ttl);
        let rule = Leftovers::new(&keys, leftovers::window_end(window));
        // An earlier holder of this lease numbered its keys from 0: start far from there.
        let first = u64::from(rand::random::<u32>() | 1) << 32;
        let book = session.extension(|| Book::new(first, Some(rule)));
        if let (Some(rule), Some(owned)) = (book.leftovers.clone(), session.arc()) {
            // Counted by `settled()` only until it starts: it runs for the session's life.
            session.submit(move |pending| {
                drop(pending);
                leftovers::watch_over(owned, rule)
            });
        }
        Ok(resumed)
    }
}
