//! What a guard holds: its fence and its release.

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use etcd_client::proto::PbTxnOpRequest;
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnResponse};
use tokio::time::sleep;

use crate::backoff::Backoff;
use crate::keys;
use crate::session::{Afterwards, Cleanup, Shared};
use crate::{Error, LeasedSession};

use super::queue::Acquired;
use super::request::send_until_answered;
use super::request::{send_txn, Kind};
use super::watch::{wait_for_change, Watched, Woken};

/// Defines a guard over a [`Holding`]: the struct (with the caller's docs and attributes),
/// `Deref<Target = Fence>`, `fence()` and a consuming, fenced `release()`. Every guard that
/// releases by consuming itself is made this way.
macro_rules! holding_guard {
    ($(#[$attr:meta])* pub struct $name:ident;) => {
        $(#[$attr])*
        #[derive(Debug)]
        pub struct $name {
            holding: $crate::engine::Holding,
        }

        impl ::std::ops::Deref for $name {
            type Target = $crate::Fence;

            /// The guard's [`Fence`](crate::Fence): `key()`, `fencing_token()`,
            /// `owner_compares()`, `txn_if_owner(ops)`, `lost()`, `session()`.
            fn deref(&self) -> &$crate::Fence {
                self.holding.fence()
            }
        }

        impl $name {
            #[allow(dead_code)]
            pub(crate) fn from_holding(holding: $crate::engine::Holding) -> $name {
                $name { holding }
            }

            /// A cloneable copy of the guard's [`Fence`](crate::Fence), for fenced writes from
            /// other tasks (it holds nothing itself).
            pub fn fence(&self) -> $crate::Fence {
                self.holding.fence().clone()
            }

            /// Releases deterministically, with a Txn fenced on the key's create revision and
            /// lease ([`Fence::owner_compares`](crate::Fence::owner_compares)).
            ///
            /// # Errors
            /// [`Error::LockLost`](crate::Error::LockLost) if the key was already gone or
            /// taken over by another client's put (it had been lost before the release; a
            /// key taken over is left as it is); request errors after retries, in which case the
            /// session's task keeps retrying the same fenced release in the background (a
            /// fenced retry can never touch a later holder's key).
            ///
            /// # Cancel safety
            /// Dropping the future hands the release to the session's background task.
            pub async fn release(mut self) -> Result<(), $crate::Error> {
                self.holding.release().await.map(|_| ())
            }
        }
    };
}
pub(crate) use holding_guard;

/// The capability to act only while an acquisition still holds: the owner key, its create
/// revision (the fencing token), the session and its lease. Cheap to clone, so fenced writes
/// can be made from other tasks than the guard's owner; it does not keep the lock (dropping it
/// releases nothing), but it keeps the session alive.
///
/// The acquisition holds while the owner key is the incarnation it created *and* is still
/// attached to the session's lease ([`owner_compares`](Self::owner_compares)). A plain put of
/// the key by another client — Go's `endpoints.Manager.AddEndpoint`, `etcdctl put`, a put under
/// another lease or none — keeps the key's create revision, but it is a takeover: the key is no
/// longer ours, [`lost`](Self::lost) fires, and fenced writes and the release fail with
/// [`Error::LockLost`] and leave the key as the other client put it. (A put that keeps our
/// lease — `--ignore-lease`, or one naming our lease id — cannot be told from our own writes.)
///
/// Every guard can hand one out ([`MutexGuard::fence`](crate::MutexGuard::fence),
/// [`Leadership::fence`](crate::Leadership::fence)).
#[derive(Debug, Clone)]
pub struct Fence {
    session: LeasedSession,
    key: String,
    create_revision: i64,
    /// The lease the key was put under: the session's.
    lease_id: i64,
    /// The revision at which the key was known to exist.
    revision: i64,
    /// The owner key's mod revision as of the last write through this fence or its clones:
    /// every fenced write is conditional on it and moves it on, so that a write whose caller
    /// gave up can never land after a later one.
    mod_revision: Arc<AtomicI64>,
}

/// How many times a fenced write is re-sequenced after other writes through the same fence
/// landed first, before it gives up (each time, another write made progress).
const RESEQUENCE_LIMIT: u32 = 64;

impl Fence {
    /// The owner key in etcd.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The owner key's create revision: strictly increasing across successive holders.
    pub fn fencing_token(&self) -> i64 {
        self.create_revision
    }

    /// The session the acquisition was made through.
    pub fn session(&self) -> &LeasedSession {
        &self.session
    }

    /// The compare `CreateRevision(key) == fencing_token`: it holds while the owner key has
    /// not been deleted (or expired) since the acquisition created it. It does **not** see a
    /// plain put of the key by another client, which keeps the create revision (see the
    /// type's documentation); for a Txn that must apply only while the acquisition holds, use
    /// [`owner_compares`](Self::owner_compares) (or [`txn_if_owner`](Self::txn_if_owner)).
    pub fn owner_compare(&self) -> Compare {
        keys::owner_compare(&self.key, self.create_revision)
    }

    /// The compares that hold exactly while the acquisition holds — `CreateRevision(key) ==
    /// fencing_token` and `Lease(key) == the session's lease` — to add to your own Txns
    /// (`Txn::new().when(fence.owner_compares())`). Every fenced write and release of this
    /// crate is conditional on them.
    pub fn owner_compares(&self) -> Vec<Compare> {
        keys::owner_compares(&self.key, self.create_revision, self.lease_id)
    }

    fn lock_lost(&self) -> Error {
        Error::LockLost {
            key: self.key.clone(),
            create_revision: self.create_revision,
        }
    }

    /// Runs `ops` in one Txn only while the acquisition still holds
    /// ([`owner_compares`](Self::owner_compares)).
    ///
    /// Ops that only read are sent as `If(owner) Then(ops)` and never cancelled in flight (etcd
    /// #14110). Ops that write are also conditional on the owner key's mod revision as of the
    /// previous write through this fence (or its clones), and move it on (the owner key is
    /// re-put with its value and lease unchanged, unless `ops` write the owner key themselves).
    /// So writes through one fence apply in the order they were made: a write whose caller saw
    /// an error or gave up (its outcome unknown) can never land after a later write that
    /// succeeded — it fails its compare instead. A write that finds another write of this
    /// holder landed first is sent again after it (at most 64 times).
    ///
    /// A put of the owner key in `ops` must keep it on the session's lease (put it with that
    /// lease, or `with_ignore_lease`): a put that moves it off the lease ends the acquisition.
    ///
    /// # Errors
    /// [`Error::LockLost`] if it no longer holds — the key is gone, or another client's put
    /// took it over (nothing was applied);
    /// [`Error::SessionLost`] / [`Error::SessionClosed`] if the session is Lost (nothing was
    /// sent); request errors as [`Error::Etcd`] / [`Error::Timeout`] (the outcome is then
    /// unknown, but a later write through the fence is never overtaken by it).
    ///
    /// # Cancel safety
    /// Dropping the future of a write cancels the request; if it already reached etcd it
    /// applies, or fails its compare if a later write through the fence landed first.
    pub async fn txn_if_owner(&self, ops: impl Into<Vec<TxnOp>>) -> Result<TxnResponse, Error> {
        let ops = ops.into();
        let shared = self.session.shared();
        shared.check()?;
        let effect = Effect::of(&ops, self.key.as_bytes());
        if !effect.writes {
            let txn = Txn::new().when(self.owner_compares()).and_then(ops);
            let resp = send_txn(shared, txn, Kind::MaybeReadOnly).await?;
            return if resp.succeeded() {
                Ok(resp)
            } else {
                Err(self.lock_lost())
            };
        }
        let mut then = ops;
        if !effect.owner_key {
            then.push(TxnOp::put(
                self.key.as_str(),
                Vec::new(),
                Some(PutOptions::new().with_ignore_value().with_ignore_lease()),
            ));
        }
        for _ in 0..RESEQUENCE_LIMIT {
            let expected = self.mod_revision.load(Ordering::Acquire);
            let mut compares = self.owner_compares();
            compares.push(Compare::mod_revision(
                self.key.as_str(),
                CompareOp::Equal,
                expected,
            ));
            let txn = Txn::new()
                .when(compares)
                .and_then(then.clone())
                .or_else([TxnOp::get(self.key.as_str(), None)]);
            let resp = send_txn(shared, txn, Kind::Write).await?;
            if resp.succeeded() {
                self.mod_revision
                    .fetch_max(keys::header_revision(&resp)?, Ordering::AcqRel);
                return Ok(resp);
            }
            let current = keys::txn_gets(&resp)
                .first()
                .and_then(|g| g.kvs().first())
                .filter(|kv| {
                    kv.create_revision() == self.create_revision && kv.lease() == self.lease_id
                })
                .map(|kv| kv.mod_revision());
            match current {
                // Still ours, changed since: another write of this holder (or one whose caller
                // gave up) landed first. Go after it.
                Some(m) => {
                    self.mod_revision.fetch_max(m, Ordering::AcqRel);
                }
                None => return Err(self.lock_lost()),
            }
        }
        Err(Error::Protocol(format!(
            "a fenced write on {} was overtaken {RESEQUENCE_LIMIT} times in a row",
            self.key
        )))
    }

    /// Completes when the acquisition may no longer hold: the session is Lost, or the owner
    /// key is gone or was taken over by another client's put (under another lease or none).
    /// Returns the error that describes it ([`Error::LockLost`] for the key). `'static`: usable
    /// in `select!` or a task; it does not keep the session alive.
    pub fn lost(&self) -> impl Future<Output = Error> + Send + 'static {
        let shared = Arc::clone(self.session.shared());
        let (key, create_revision, lease_id, seen_at) = (
            self.key.clone(),
            self.create_revision,
            self.lease_id,
            self.revision,
        );
        async move {
            match wait_not_ours(&shared, &key, create_revision, lease_id, seen_at).await {
                Ok(()) => Error::LockLost {
                    key,
                    create_revision,
                },
                Err(e) => e,
            }
        }
    }
}

/// Completes with `Ok` once `key` is no longer ours — not the incarnation `create_revision` on
/// `lease_id`: deleted, expired with its lease, put by someone else under another lease or
/// none, or never there (known ours at revision `seen_at`). `Err` if the session is Lost
/// first, or on a failure retrying cannot fix.
///
/// Every put and delete of the key wakes it; a read then says whether the key is still ours
/// (our own fenced writes re-put it). Survives stream failures and compaction by re-reading,
/// with one backoff for the whole wait.
async fn wait_not_ours(
    shared: &Arc<Shared>,
    key: &str,
    create_revision: i64,
    lease_id: i64,
    mut seen_at: i64,
) -> Result<(), Error> {
    let check = Txn::new().when(keys::owner_compares(key, create_revision, lease_id));
    // Whether the key is ours now, and the revision of the answer.
    let ours_now = || async {
        let answer = send_until_answered(
            shared,
            || check.clone(),
            Kind::MaybeReadOnly,
            &mut Backoff::for_requests(),
        )
        .await?;
        Ok::<_, Error>((
            answer.resp.succeeded(),
            keys::header_revision(&answer.resp)?,
        ))
    };
    let mut backoff = Backoff::for_requests();
    loop {
        let targets = [Watched::changed(key)];
        let still = || async { ours_now().await.map(|(ours, _)| ours) };
        match wait_for_change(shared, &targets, None, seen_at, still, &mut backoff).await? {
            // A put or a delete of the key (or a re-read that found it not ours): whose is it?
            Woken::Changed => match ours_now().await? {
                (false, _) => return Ok(()),
                (true, revision) => seen_at = revision,
            },
            // Uncertain: the next round confirms once its watch is in place. (`Decided` and
            // `Compacted` come only from targets watched `since` a past revision.)
            Woken::Recheck | Woken::Decided(_) | Woken::Compacted(_) => seen_at = 0,
        }
    }
}

/// What a list of Txn ops does: whether any writes, and whether any writes the owner key.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Effect {
    writes: bool,
    owner_key: bool,
}

impl Effect {
    fn of(ops: &[TxnOp], owner: &[u8]) -> Effect {
        let requests: Vec<PbTxnOpRequest> = ops.iter().cloned().map(Into::into).collect();
        Effect::of_requests(&requests.iter().collect::<Vec<_>>(), owner)
    }

    fn of_requests(ops: &[&PbTxnOpRequest], owner: &[u8]) -> Effect {
        let mut effect = Effect::default();
        for op in ops {
            let one = match *op {
                PbTxnOpRequest::RequestRange(_) => Effect::default(),
                PbTxnOpRequest::RequestPut(put) => Effect {
                    writes: true,
                    owner_key: put.key == owner,
                },
                PbTxnOpRequest::RequestDeleteRange(del) => Effect {
                    writes: true,
                    owner_key: in_range(owner, &del.key, &del.range_end),
                },
                PbTxnOpRequest::RequestTxn(txn) => {
                    let nested: Vec<&PbTxnOpRequest> = txn
                        .success
                        .iter()
                        .chain(&txn.failure)
                        .filter_map(|op| op.request.as_ref())
                        .collect();
                    Effect::of_requests(&nested, owner)
                }
            };
            effect.writes |= one.writes;
            effect.owner_key |= one.owner_key;
        }
        effect
    }
}

/// Whether `key` falls in etcd's range `[start, end)` (`end` empty: `start` alone; `end` = `\0`:
/// everything from `start`).
fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    match end {
        [] => key == start,
        [0] => key >= start,
        _ => key >= start && key < end,
    }
}

/// The state behind every guard: its [`Fence`] and whether it was released. Releases in the
/// background when dropped unreleased.
pub(crate) struct Holding {
    fence: Fence,
    /// The fenced Txn that releases (by default: delete the key if it is still ours, else get
    /// it).
    release_txn: Txn,
    /// The revision of the response that confirmed the release, once confirmed.
    released_at: Option<i64>,
    /// A release attempt went unanswered: it may have deleted the key. A later attempt that
    /// finds the key gone is then the same release, not a loss.
    release_maybe_landed: bool,
    /// What to do once the release is answered: sweep the late copies of a put sent more
    /// than once, or give the key's number back.
    after: Afterwards,
}

impl Holding {
    pub(crate) fn new(session: LeasedSession, acquired: Acquired) -> Holding {
        let release_txn =
            keys::fenced_delete(&acquired.key, acquired.create_revision, session.lease_id());
        Holding::with_release(session, acquired, release_txn)
    }

    /// A holding released by `release_txn`, which must be fenced on the key's create revision
    /// and lease ([`keys::owner_compares`]; it is repeated on retries and may run from the
    /// session's task).
    pub(crate) fn with_release(
        session: LeasedSession,
        acquired: Acquired,
        release_txn: Txn,
    ) -> Holding {
        Holding {
            release_txn,
            fence: Fence {
                lease_id: session.lease_id(),
                session,
                key: acquired.key,
                create_revision: acquired.create_revision,
                revision: acquired.revision,
                mod_revision: Arc::new(AtomicI64::new(acquired.create_revision)),
            },
            released_at: None,
            release_maybe_landed: false,
            after: acquired.after,
        }
    }

    pub(crate) fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Whether the release was confirmed by a retry after an unanswered attempt: the key was
    /// deleted by that attempt, at a revision earlier than the one `release()` returned.
    pub(crate) fn release_was_uncertain(&self) -> bool {
        self.released_at.is_some() && self.release_maybe_landed
    }

    /// Deletes the owner key with a Txn fenced on its create revision and lease. Retries
    /// transport failures (a retry that finds the key gone after an unanswered attempt counts
    /// as done; one that finds it taken over by another client's put does not);
    /// marks the holding released only once etcd confirmed, and succeeds at once if it was.
    /// A holding dropped unreleased — also after this fails — is released by the session's
    /// task.
    ///
    /// Returns the revision of the confirming response: the key was gone at that revision
    /// (deleted at it, or earlier when a retry follows an unanswered attempt).
    pub(crate) async fn release(&mut self) -> Result<i64, Error> {
        const ATTEMPTS: u32 = 3;
        if let Some(revision) = self.released_at {
            return Ok(revision);
        }
        let fence = &self.fence;
        let shared = Arc::clone(fence.session.shared());
        let mut backoff = Backoff::for_requests();
        let mut last = None;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                sleep(backoff.next_delay()).await;
            }
            tracing::trace!(key = %fence.key, "release sent");
            match send_txn(&shared, self.release_txn.clone(), Kind::Write).await {
                Ok(resp) => {
                    tracing::trace!(key = %fence.key, "release answered");
                    let revision = resp.header().map_or(0, |h| h.revision());
                    self.released_at = Some(revision);
                    std::mem::replace(&mut self.after, Afterwards::Nothing).key_deleted(&shared);
                    // The else-branch shows the key still there, with our create revision: not
                    // deleted by an earlier attempt of ours but taken over by another client.
                    let taken_over = keys::txn_gets(&resp).iter().any(|g| {
                        g.kvs()
                            .iter()
                            .any(|kv| kv.create_revision() == fence.create_revision)
                    });
                    return if resp.succeeded() || (self.release_maybe_landed && !taken_over) {
                        Ok(revision)
                    } else {
                        Err(fence.lock_lost())
                    };
                }
                Err(e) if e.is_transient() => {
                    self.release_maybe_landed = true;
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(Error::Timeout(shared.request_timeout)))
    }
}

impl std::fmt::Debug for Holding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holding")
            .field("key", &self.fence.key)
            .field("fencing_token", &self.fence.create_revision)
            .field("released", &self.released_at.is_some())
            .finish()
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        if self.released_at.is_none() {
            self.fence.session.shared().clean_up(Cleanup::Release {
                key: self.fence.key.clone(),
                txn: self.release_txn.clone(),
                after: std::mem::replace(&mut self.after, Afterwards::Nothing),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_client::{DeleteOptions, GetOptions};

    #[test]
    fn reads_are_told_from_writes_and_writes_of_the_owner_key() {
        let owner = b"n/#owner";
        let of = |ops: Vec<TxnOp>| Effect::of(&ops, owner);
        assert_eq!(of(vec![]), Effect::default());
        assert_eq!(
            of(vec![TxnOp::get("x", Some(GetOptions::new().with_prefix()))]),
            Effect::default()
        );
        assert_eq!(
            of(vec![TxnOp::put("x", "v", None)]),
            Effect {
                writes: true,
                owner_key: false
            }
        );
        assert_eq!(
            of(vec![TxnOp::put("n/#owner", "v", None)]),
            Effect {
                writes: true,
                owner_key: true
            }
        );
        assert_eq!(
            of(vec![TxnOp::delete(
                "n/",
                Some(DeleteOptions::new().with_prefix())
            )]),
            Effect {
                writes: true,
                owner_key: true
            }
        );
        let nested = Txn::new()
            .and_then([TxnOp::get("x", None)])
            .or_else([TxnOp::delete("y", None)]);
        assert_eq!(
            of(vec![TxnOp::txn(nested)]),
            Effect {
                writes: true,
                owner_key: false
            }
        );
    }

    #[test]
    fn ranges_follow_etcds_rules() {
        assert!(in_range(b"a", b"a", b""));
        assert!(!in_range(b"ab", b"a", b""));
        assert!(in_range(b"zz", b"a", b"\0"));
        assert!(in_range(b"ab", b"a", b"b"));
        assert!(!in_range(b"b", b"a", b"b"));
    }
}
