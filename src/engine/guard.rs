//! What a guard holds: its fence and its release.

use std::future::Future;
use std::sync::Arc;

use etcd_client::{Compare, Txn, TxnOp, TxnResponse};
use tokio::time::sleep;

use crate::backoff::Backoff;
use crate::keys;
use crate::session::Cleanup;
use crate::{Error, LeasedSession};

use super::queue::Acquired;
use super::request::{send_txn, Kind};
use super::watch::wait_gone;

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
            /// `owner_compare()`, `txn_if_owner(ops)`, `lost()`, `session()`.
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

            /// Releases deterministically, with a Txn fenced on the key's create revision.
            ///
            /// # Errors
            /// [`Error::LockLost`](crate::Error::LockLost) if the key was already gone (it had
            /// been lost before the release); request errors after retries, in which case the
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
/// revision (the fencing token) and the session. Cheap to clone, so fenced writes can be made
/// from other tasks than the guard's owner; it does not keep the lock (dropping it releases
/// nothing), but it keeps the session alive.
///
/// Every guard can hand one out ([`MutexGuard::fence`](crate::MutexGuard::fence),
/// [`Leadership::fence`](crate::Leadership::fence)).
#[derive(Debug, Clone)]
pub struct Fence {
    session: LeasedSession,
    key: String,
    create_revision: i64,
    /// The revision at which the key was known to exist.
    revision: i64,
}

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

    /// A compare that holds exactly while the acquisition holds; add it to your own Txns.
    pub fn owner_compare(&self) -> Compare {
        keys::owner_compare(&self.key, self.create_revision)
    }

    fn lock_lost(&self) -> Error {
        Error::LockLost {
            key: self.key.clone(),
            create_revision: self.create_revision,
        }
    }

    /// Runs `ops` in one Txn only while the acquisition still holds.
    ///
    /// # Errors
    /// [`Error::LockLost`] if it no longer holds (nothing was applied);
    /// [`Error::SessionLost`] / [`Error::SessionClosed`] if the session is Lost (nothing was
    /// sent); request errors as [`Error::Etcd`] / [`Error::Timeout`] (the outcome is then
    /// unknown).
    pub async fn txn_if_owner(&self, ops: impl Into<Vec<TxnOp>>) -> Result<TxnResponse, Error> {
        let shared = self.session.shared();
        shared.check()?;
        let txn = Txn::new().when([self.owner_compare()]).and_then(ops.into());
        let resp = send_txn(shared, txn, Kind::MaybeReadOnly).await?;
        if resp.succeeded() {
            Ok(resp)
        } else {
            Err(self.lock_lost())
        }
    }

    /// Completes when the acquisition may no longer hold: the session is Lost or the owner key
    /// is gone. Returns the error that describes it. `'static`: usable in `select!` or a task;
    /// it does not keep the session alive.
    pub fn lost(&self) -> impl Future<Output = Error> + Send + 'static {
        let shared = Arc::clone(self.session.shared());
        let (key, create_revision, seen_at) =
            (self.key.clone(), self.create_revision, self.revision);
        async move {
            match wait_gone(&shared, &key, create_revision, seen_at).await {
                Ok(()) => Error::LockLost {
                    key,
                    create_revision,
                },
                Err(e) => e,
            }
        }
    }
}

/// The state behind every guard: its [`Fence`] and whether it was released. Releases in the
/// background when dropped unreleased.
pub(crate) struct Holding {
    fence: Fence,
    /// The fenced Txn that releases (by default: delete the key if it is still ours).
    release_txn: Txn,
    /// The revision of the response that confirmed the release, once confirmed.
    released_at: Option<i64>,
    /// A release attempt went unanswered: it may have deleted the key. A later attempt that
    /// finds the key gone is then the same release, not a loss.
    release_maybe_landed: bool,
}

impl Holding {
    pub(crate) fn new(session: LeasedSession, acquired: Acquired) -> Holding {
        let release_txn = keys::fenced_delete(&acquired.key, acquired.create_revision);
        Holding::with_release(session, acquired, release_txn)
    }

    /// A holding released by `release_txn`, which must be fenced on the key's create revision
    /// (it is repeated on retries and may run from the session's task).
    pub(crate) fn with_release(
        session: LeasedSession,
        acquired: Acquired,
        release_txn: Txn,
    ) -> Holding {
        Holding {
            release_txn,
            fence: Fence {
                session,
                key: acquired.key,
                create_revision: acquired.create_revision,
                revision: acquired.revision,
            },
            released_at: None,
            release_maybe_landed: false,
        }
    }

    pub(crate) fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Deletes the owner key with a Txn fenced on its create revision. Retries transport
    /// failures (a retry that finds the key gone after an unanswered attempt counts as done);
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
                    return if resp.succeeded() || self.release_maybe_landed {
                        Ok(revision)
                    } else {
                        Err(fence.lock_lost())
                    };
                }
                Err(e) if e.is_retryable() => {
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
            self.fence.session.shared().clean_up(Cleanup::Txn {
                key: self.fence.key.clone(),
                txn: self.release_txn.clone(),
            });
        }
    }
}
