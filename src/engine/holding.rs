//! The state behind every guard — its [`Fence`] and its fenced, retry-safe release — and the
//! macro that makes a guard of it.

use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use etcd_client::Txn;
use tokio::time::sleep;

use crate::backoff::Backoff;
use crate::keys;
use crate::rpc::batch::{Conditional, How, Slice};
use crate::rpc::Unanswered;
use crate::session::Session;
use crate::{Error, LeasedSession};

use super::cleanup::{Afterwards, Cleanup};
use super::fence::{Fence, FenceState};
use super::lines::Member;
use super::ticket::{merged, slice, Acquired};
use super::SessionKeys;

/// Defines a guard over a [`Holding`]: the struct (with the caller's docs and attributes, and
/// any fields of its own), `Deref<Target = Fence>`, `fence()` and a consuming, fenced
/// `release()`. Every guard of this crate is made this way, with this one release signature.
macro_rules! holding_guard {
    ($(#[$attr:meta])* pub struct $name:ident $({ $($field:ident: $ty:ty),* $(,)? })? ;) => {
        $(#[$attr])*
        #[derive(Debug)]
        pub struct $name {
            holding: $crate::engine::Holding,
            $($($field: $ty,)*)?
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
            pub(crate) fn from_holding(
                holding: $crate::engine::Holding
                $($(, $field: $ty)*)?
            ) -> $name {
                $name { holding $($(, $field)*)? }
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
            #[tracing::instrument(name = "etcd_coord.release", skip_all, fields(key = %self.key(), lease = %format_args!("{:x}", self.session().lease_id()), fencing_token = self.fencing_token()))]
            pub async fn release(mut self) -> Result<(), $crate::Error> {
                self.holding.release().await.map(|_| ())
            }
        }
    };
}
pub(crate) use holding_guard;

/// How a release goes: merged with its siblings' parts, ordered (it reads nothing, so it goes
/// before an enqueue that reads its queue), sent once per attempt of [`Holding::release`]'s
/// own.
const RELEASE: How = How {
    ordered: true,
    linger: None,
    once: true,
};

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
    /// A release attempt was sent and its answer not yet read: if the future that sent it was
    /// dropped meanwhile, it may have landed all the same (the next attempt counts it as
    /// unanswered).
    release_in_flight: bool,
    /// What to do once the release is answered: sweep the late copies of a put sent more
    /// than once, or give the key's number back.
    after: Afterwards,
    /// Whether the release announces the key to its successor (`Some`), for a holding released
    /// by the default Txn; `None` for one released by a Txn of its own ([`Self::with_release`]),
    /// which cannot be merged into another ([`Self::requeueable`]).
    announces: Option<bool>,
    /// Counts the key in its queue's members of the session's family until the holding is
    /// released or dropped (`engine::lines`).
    member: Option<Member>,
}

impl Holding {
    pub(crate) fn new(session: LeasedSession, acquired: Acquired) -> Holding {
        let (key, token, lease) = (&acquired.key, acquired.create_revision, session.lease_id());
        let release_txn = if acquired.announces {
            keys::release_announcing(key, token, lease)
        } else {
            keys::fenced_delete(key, token, lease)
        };
        let announces = acquired.announces;
        let mut holding = Holding::with_release(session, acquired, release_txn);
        holding.announces = Some(announces);
        holding
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
                shared: Arc::new(FenceState {
                    mod_revision: AtomicI64::new(acquired.create_revision),
                    held: Default::default(),
                }),
            },
            released_at: None,
            release_maybe_landed: false,
            release_in_flight: false,
            after: acquired.after,
            announces: None,
            member: acquired.member,
        }
    }

    /// What a release merged with a new enqueue needs ([`keys::requeue_parts`]): the key, its
    /// create revision and whether its release announces it — `None` if the holding has a
    /// release Txn of its own.
    pub(crate) fn requeueable(&self) -> Option<((&str, i64), bool)> {
        let announces = self.announces?;
        Some(((&self.fence.key, self.fence.create_revision), announces))
    }

    /// Whether etcd confirmed the release (nothing is left to release).
    pub(crate) fn is_released(&self) -> bool {
        self.released_at.is_some()
    }

    /// Whether a release attempt went unanswered and none was confirmed since: the key may
    /// be gone by our own hand.
    pub(crate) fn release_unconfirmed(&self) -> bool {
        (self.release_maybe_landed || self.release_in_flight) && self.released_at.is_none()
    }

    pub(crate) fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Whether the release was confirmed by a retry after an unanswered attempt: the key was
    /// deleted by that attempt, at a revision earlier than the one `release()` returned.
    pub(crate) fn release_was_uncertain(&self) -> bool {
        self.released_at.is_some() && self.release_maybe_landed
    }

    /// Records that the owner key was deleted at `revision` by a fenced Txn the guard's owner
    /// sent itself (a work queue's ack, which deletes its claim key together with the job):
    /// nothing is left to release, and dropping the holding sends nothing.
    pub(crate) fn released_by_owner(&mut self, revision: i64) {
        if self.released_at.is_none() {
            self.released_at = Some(revision);
            self.member = None;
            let session = Arc::clone(self.fence.session.inner());
            std::mem::replace(&mut self.after, Afterwards::Nothing).key_deleted(&session);
        }
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
    ///
    /// The default release goes merged with what the session's siblings send at that moment
    /// (`rpc::batch`): a sibling's lingering enqueue shares its raft entry, after it.
    pub(crate) async fn release(&mut self) -> Result<i64, Error> {
        let via =
            match self.requeueable() {
                Some(((key, token), announces)) => Via::Merged(Conditional::from(
                    keys::release_parts(key, token, self.fence.lease_id, announces),
                )),
                None => Via::Alone(self.release_txn.clone()),
            };
        self.release_via(via).await
    }

    /// [`release`](Self::release) by `txn` instead of the holding's own release Txn: one that
    /// deletes the key as that does (fenced the same way) and writes more beside it — a
    /// double barrier's leave marker. Dropping the holding unreleased still sends its own.
    pub(crate) async fn release_by(&mut self, release_txn: Txn) -> Result<i64, Error> {
        self.release_via(Via::Alone(release_txn)).await
    }

    async fn release_via(&mut self, via: Via) -> Result<i64, Error> {
        const ATTEMPTS: u32 = 3;
        if let Some(revision) = self.released_at {
            return Ok(revision);
        }
        // An attempt whose caller was dropped before its answer may have landed.
        if self.release_in_flight {
            self.release_maybe_landed = true;
        }
        let fence = &self.fence;
        let session = Arc::clone(fence.session.inner());
        let mut backoff = Backoff::for_requests();
        let mut last = None;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                sleep(backoff.next_delay()).await;
            }
            tracing::trace!(target: "etcd_coord::handoff", key = %fence.key, "release sent");
            self.release_in_flight = true;
            // A session Lost on its clock (etcd may not have expired the lease yet) merges
            // nothing: its release goes alone, as it always did — also one that the merged
            // path stopped for that.
            let answer = match &via {
                Via::Merged(txn) if session.check().is_ok() => {
                    match merged(&session, txn.clone(), RELEASE).await {
                        Ok(answered) => {
                            // An attempt carrying it went unanswered (a merged Txn sent alone
                            // again): it may have deleted the key.
                            self.release_maybe_landed |= answered.uncertain;
                            Ok(answered.resp)
                        }
                        Err(u) if !u.error.is_retryable() && session.check().is_err() => {
                            self.release_maybe_landed |= u.uncertain;
                            alone(&session, txn.txn()).await
                        }
                        Err(u) => Err(u),
                    }
                }
                Via::Merged(txn) => alone(&session, txn.txn()).await,
                Via::Alone(txn) => alone(&session, txn.clone()).await,
            };
            self.release_in_flight = false;
            match answer {
                Ok(resp) => {
                    let revision = resp.revision;
                    tracing::trace!(target: "etcd_coord::handoff", key = %fence.key, "release answered");
                    self.released_at = Some(revision);
                    self.member = None;
                    std::mem::replace(&mut self.after, Afterwards::Nothing).key_deleted(&session);
                    // The else-branch shows the key still there, with our create revision: not
                    // deleted by an earlier attempt of ours but taken over by another client.
                    let taken_over = keys::op_gets(&resp.ops).iter().any(|g| {
                        g.kvs()
                            .iter()
                            .any(|kv| kv.create_revision() == fence.create_revision)
                    });
                    return if resp.succeeded || (self.release_maybe_landed && !taken_over) {
                        Ok(revision)
                    } else {
                        Err(fence.lock_lost())
                    };
                }
                Err(u) if u.error.is_retryable() => {
                    self.release_maybe_landed = true;
                    last = Some(u.error);
                }
                Err(u) => {
                    self.release_maybe_landed |= u.uncertain;
                    return Err(u.error);
                }
            }
        }
        Err(last.unwrap_or(Error::Timeout(session.rpc.timeout())))
    }
}

/// Sends a release Txn alone (not merged): its answer, as a merged part's.
async fn alone(session: &Session, txn: Txn) -> Result<Slice, Unanswered> {
    match session.rpc.txn(txn).await {
        Ok(resp) => slice(&resp).map_err(|error| Unanswered {
            error,
            uncertain: true,
        }),
        Err(error) => Err(Unanswered {
            uncertain: error.is_retryable(),
            error,
        }),
    }
}

/// How a release goes: merged flat with siblings' parts (the default release), or alone (a
/// Txn of its own).
enum Via {
    Merged(Conditional),
    Alone(Txn),
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
        self.fence.shared.held.ended();
        if self.released_at.is_none() {
            self.fence.session.inner().clean_up(Cleanup::Release {
                key: self.fence.key.clone(),
                txn: self.release_txn.clone(),
                after: std::mem::replace(&mut self.after, Afterwards::Nothing),
            });
        }
    }
}
