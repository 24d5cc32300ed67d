//! What a guard holds to act only while its acquisition holds: the [`Fence`].

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use etcd_client::proto::PbTxnOpRequest;
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnResponse};

use crate::keys;
use crate::metrics::Held;
use crate::{Error, LeasedSession};

use super::wait::wait_not_ours;

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
    pub(super) session: LeasedSession,
    pub(super) key: String,
    pub(super) create_revision: i64,
    /// The lease the key was put under: the session's.
    pub(super) lease_id: i64,
    /// The revision at which the key was known to exist.
    pub(super) revision: i64,
    /// What the clones share: the owner key's mod revision and the guard's metrics.
    pub(super) shared: Arc<FenceState>,
}

/// What a fence's clones share (one allocation per acquisition).
#[derive(Debug, Default)]
pub(super) struct FenceState {
    /// The owner key's mod revision as of the last write through this fence or its clones:
    /// every fenced write is conditional on it and moves it on, so that a write whose caller
    /// gave up can never land after a later one.
    pub(super) mod_revision: AtomicI64,
    /// The guard's metrics (hold time, loss).
    pub(super) held: Held,
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

    /// The guard's metrics (hold time, loss), shared by the clones.
    pub(crate) fn held(&self) -> &Held {
        &self.shared.held
    }

    /// The error for an acquisition found no longer holding (counted in the metrics once).
    pub(super) fn lock_lost(&self) -> Error {
        let error = Error::LockLost {
            key: self.key.clone(),
            create_revision: self.create_revision,
        };
        self.shared.held.lost(&error);
        error
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
    /// A Txn nested in `ops` goes as it is: etcd 3.4 and 3.5 releases before 2026 check no
    /// permission of an operation inside a nested Txn (etcd PRs #21689, #22134), so keep to
    /// plain operations where a role should limit what `ops` may do.
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
    #[tracing::instrument(name = "etcd_coord.fence.txn_if_owner", skip_all, fields(key = %self.key, lease = %format_args!("{:x}", self.lease_id), fencing_token = self.create_revision))]
    pub async fn txn_if_owner(&self, ops: impl Into<Vec<TxnOp>>) -> Result<TxnResponse, Error> {
        let ops = ops.into();
        let session = self.session.inner();
        session.check().inspect_err(|e| self.shared.held.lost(e))?;
        let effect = Effect::of(&ops, self.key.as_bytes());
        if !effect.writes {
            let txn = Txn::new().when(self.owner_compares()).and_then(ops);
            let resp = session.rpc.txn(txn).await?;
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
            let expected = self.shared.mod_revision.load(Ordering::Acquire);
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
            let resp = session.rpc.txn(txn).await?;
            if resp.succeeded() {
                self.shared
                    .mod_revision
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
                    self.shared.mod_revision.fetch_max(m, Ordering::AcqRel);
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
        let session = Arc::clone(self.session.inner());
        let (key, create_revision, lease_id, seen_at) = (
            self.key.clone(),
            self.create_revision,
            self.lease_id,
            self.revision,
        );
        let shared = Arc::clone(&self.shared);
        async move {
            let error =
                match wait_not_ours(&session, &key, create_revision, lease_id, seen_at).await {
                    Ok(()) => Error::LockLost {
                        key,
                        create_revision,
                    },
                    Err(e) => e,
                };
            shared.held.lost(&error);
            error
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
