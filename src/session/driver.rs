//! The session's one background task: keeps the lease alive and runs the jobs handed to the
//! session until it is Lost or its last handle is dropped; then ends the lease.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::core::Session;
use super::jobs::{self, Queue};
use super::keepalive::keep_alive;
use super::liveness::Liveness;
use crate::LossReason;

/// Marks the session Lost if the session's task ends without saying why: its future was
/// dropped (the runtime shut down, even before the task first ran) or unwound (a panic).
/// Owned by the task's future from its creation; disarmed on every orderly exit.
pub(super) struct Watchdog {
    pub(super) session: Arc<Session>,
    pub(super) armed: bool,
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if self.armed {
            tracing::warn!(
                lease = self.session.lease_id,
                "the session's task stopped (runtime shut down or panic): session lost"
            );
            self.session.mark_lost(LossReason::KeepAliveStopped);
        }
    }
}

/// The session's one background task.
pub(super) async fn drive(mut watchdog: Watchdog, mut live: Liveness, mut queue: Queue) {
    let session = Arc::clone(&watchdog.session);
    let reason = tokio::select! {
        reason = keep_alive(&session, &mut live) => reason,
        reason = jobs::run(session.lease_id, &mut queue) => reason,
        // Lost decided elsewhere: on the clock by a caller, or by close().
        reason = session.lost() => reason,
        _ = session.stop.cancelled() => LossReason::Closed,
    };
    // Jobs still queued or running are moot once the lease ends; drop them (and their pending
    // counts) now.
    drop(queue);
    session.mark_lost(reason);
    watchdog.armed = false;
    // The first reason recorded is the one: an orphaned session stops with `stop`, too.
    let reason = session.recorded_reason().unwrap_or(reason);
    let lease = session.lease_id;
    match reason {
        LossReason::Orphaned => {
            tracing::debug!(lease, "session orphaned; the lease is left as it is")
        }
        LossReason::Closed if session.closing.load(Ordering::SeqCst) => {} // close() revokes
        LossReason::Closed => {
            if let Err(e) = session.revoke_persistently().await {
                tracing::warn!(lease, error = %e, "revoking the lease of a dropped session failed; it ends by its TTL");
            }
        }
        LossReason::LeaseGone => tracing::warn!(lease, %reason, "session lost"),
        _ => {
            // The lease may still exist on the server: end it as soon as etcd answers, rather
            // than at its TTL, so others need not wait (and no key it holds outlives what we
            // know of it).
            tracing::warn!(lease, %reason, "session lost");
            if let Err(e) = session.revoke_persistently().await {
                tracing::warn!(lease, error = %e, "revoking the lease of a lost session failed; it ends by its TTL");
            }
        }
    }
}
