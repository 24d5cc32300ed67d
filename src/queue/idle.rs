//! Waiting for a job without a herd: idle claimers queue in a line — the engine's FIFO line
//! with one permit, the mutex's algorithm, under `N/#queue/w…` — and only its head watches
//! the queue. Each waiter behind it watches only the deletion of the waiter just ahead.
//!
//! The head reads the queue; if a job is claimable it claims it and leaves the line (its key
//! is deleted by the session's task), which wakes the one waiter behind it, the new head.
//! Otherwise it waits — with one watch registered from now on puts under `jobs/` (a job
//! enqueued or moved back) and deletions under `claims/` (a claim given back, or ended with
//! its claimer's lease), and a timer for the earliest job not ready yet — and reads again.
//! So a job enqueued while N claimers are idle wakes one of them, which claims it, and the
//! hand-off to the next wakes one more, which reads once and waits: a fixed number of
//! requests however many are idle.

use std::time::{Duration, SystemTime};

use tokio::time::sleep;

use super::claimed::Claimed;
use super::layout::{micros, IDLE};
use super::scan::{scan, Scan};
use super::WorkQueue;
use crate::backoff::Backoff;
use crate::engine::{Blocker, Line};
use crate::watch::{wait_for_change, Watched};
use crate::Error;

/// Waits in the line of idle claimers until, at its head, it claims up to `n` jobs (at least
/// one). Cancel-safe: the line's key is deleted, and any claim won released, if dropped.
pub(super) async fn wait_in_line(queue: &WorkQueue, n: usize) -> Result<Vec<Claimed>, Error> {
    let keys = queue.keys()?;
    tracing::debug!(queue = queue.name(), "no job ready: joining the idle line");
    // The head of the line does not hold as the oldest member of the queue's keys (jobs and
    // claims are older): its release announces nothing, so waiters put no pointers.
    let blocker = Blocker::new(keys.idle(), 1)?.behind_unannounced_releases();
    let turn = Line::new(&queue.session, keys.queue(), IDLE, blocker)
        .acquire(Vec::new())
        .await?;
    let session = queue.session.inner();
    let fence = turn.fence();
    let own = Some((fence.key(), fence.fencing_token()));
    let targets = [
        Watched::put_under(keys.jobs()),
        Watched::deleted_under(keys.claims()),
    ];
    let mut backoff = Backoff::for_requests();
    let mut fresh: Option<Scan> = None;
    loop {
        let found = match fresh.take() {
            Some(s) => s,
            None => scan(session, &keys, queue.want(n), queue.claims_hint()).await?,
        };
        queue.saw_claims(found.claims);
        if !found.candidates.is_empty() {
            let claimed = queue.claim_round(&keys, &found, n, false, false).await?;
            // (rather_read false: the round always goes.)
            let claimed = claimed.unwrap_or_default();
            if !claimed.is_empty() {
                drop(turn); // the next in line takes over (released in the background)
                return Ok(claimed);
            }
            continue;
        }
        let next_ready = found.next_ready_us;
        let fresh = &mut fresh;
        let keys = &keys;
        let woken = wait_for_change(
            session.waits(),
            &targets,
            own,
            found.revision,
            move || async move {
                // Writes landed between the read and the watch: still nothing to claim?
                let now = scan(session, keys, queue.want(n), queue.claims_hint()).await?;
                let still = now.candidates.is_empty() && now.next_ready_us == next_ready;
                if !still {
                    *fresh = Some(now);
                }
                Ok(still)
            },
            &mut backoff,
        );
        tokio::select! {
            woken = woken => { woken?; }
            () = until(next_ready) => {}
        }
    }
}

/// Sleeps until `ready_us` (µs since the Unix epoch, on this clock); forever for `None`.
async fn until(ready_us: Option<u64>) {
    match ready_us {
        Some(at) => {
            let now = micros(SystemTime::now());
            sleep(Duration::from_micros(at.saturating_sub(now)) + Duration::from_millis(1)).await;
        }
        None => std::future::pending().await,
    }
}
