//! The session's background work for guards and acquisitions: fenced releases of dropped
//! guards, sweeps of late duplicates, and touches that wake the waiter behind a new holder.
//!
//! Every job retries transient failures with capped, jittered backoff (20 ms doubling to 1 s)
//! for as long as the session lives: a guard dropped during an outage is released once etcd
//! answers again. A failure retrying cannot fix (etcd's auth refusing the delete, say) ends the
//! session ([`LossReason::CleanupFailed`]): its task revokes the lease, so no live lease keeps a
//! key that nobody holds.

use std::sync::Arc;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, watch};

use super::Shared;
use crate::backoff::Backoff;
use crate::engine::request::{send_until_answered, Kind};
use crate::engine::watch::{wait_for_change, Watched};
use crate::{keys, Error, LossReason};

/// A piece of background work the session's task carries out for a guard or an acquisition.
#[derive(Debug)]
pub(crate) enum Cleanup {
    /// Send `txn`, a release fenced on `key`'s create revision (safe to repeat); then do what
    /// `after` says (sweep the late duplicates of a put sent more than once, or give the key's
    /// number back).
    Release {
        key: String,
        txn: Txn,
        after: Afterwards,
    },
    /// Delete any late duplicate of an acquisition's put, now and whenever one lands, for as
    /// long as the session lives (the outcome of a request that may create the key is unknown).
    Sweep(Sweep),
    /// Bump `key`'s mod revision while it is the incarnation `create_revision`, so that the
    /// waiter watching it re-reads (a semaphore waiter that moved up behind a new holder).
    Touch { key: String, create_revision: i64 },
}

impl Cleanup {
    /// Delete `key` if it is still the incarnation created at `create_revision`.
    pub(crate) fn release(key: String, create_revision: i64, after: Afterwards) -> Cleanup {
        let txn = keys::fenced_delete(&key, create_revision);
        Cleanup::Release { key, txn, after }
    }
}

/// What becomes of a member key's name once its deletion was answered.
#[derive(Debug, Clone)]
pub(crate) enum Afterwards {
    /// Its put was sent more than once: late copies are swept for as long as the lease lives,
    /// and its name is never used again.
    Sweep(Sweep),
    /// Its number goes back to the session's pool, for a later key (see `slots`).
    Reuse(u64),
    /// Nothing: a key this session did not number (a fixed name, or one taken back after a
    /// restart).
    Nothing,
}

impl Afterwards {
    /// `Sweep(sweep)` for a put sent more than once (a copy may still land), else `certain`.
    pub(crate) fn of_put(uncertain: bool, sweep: Sweep, certain: Afterwards) -> Afterwards {
        if uncertain {
            Afterwards::Sweep(sweep)
        } else {
            certain
        }
    }

    /// The key's deletion was answered: hands the sweep to the session's task, or gives the
    /// number back.
    pub(crate) fn key_deleted(self, shared: &Shared) {
        match self {
            Afterwards::Sweep(sweep) => shared.clean_up(Cleanup::Sweep(sweep)),
            Afterwards::Reuse(n) => shared.slots.give_back(n),
            Afterwards::Nothing => {}
        }
    }
}

/// How to recognise — and delete — a late copy of one acquisition's put.
///
/// A put whose answer was lost is retried, and the acquisition carries on with whichever copy
/// landed first. An earlier copy can still be in flight (held in a network buffer, a proxy, a
/// member's queue) and land after the acquisition was released, re-creating the key under our
/// live lease, where it would block everyone behind it. A sweep deletes such a copy as soon as
/// it lands, for as long as the lease lives; once the lease is gone, a copy cannot land (a put
/// with a dead lease fails).
#[derive(Debug, Clone)]
pub(crate) struct Sweep {
    key: String,
    compares: Vec<Compare>,
}

impl Sweep {
    /// Any incarnation of `key` attached to `lease_id`: for member keys, whose name is retired
    /// once a sweep exists ([`Afterwards::Sweep`] never gives its number back), so once the
    /// acquisition is over any such key is a late copy.
    pub(crate) fn on_lease(key: &str, lease_id: i64) -> Sweep {
        Sweep {
            key: key.to_owned(),
            compares: vec![Compare::lease(key, CompareOp::Equal, lease_id)],
        }
    }

    /// `key` holding `value` on `lease_id`: for a key whose name is shared (a barrier), whose
    /// value is unique to the attempt.
    pub(crate) fn with_value(key: &str, value: &[u8], lease_id: i64) -> Sweep {
        Sweep {
            key: key.to_owned(),
            compares: vec![
                Compare::value(key, CompareOp::Equal, value.to_vec()),
                Compare::lease(key, CompareOp::Equal, lease_id),
            ],
        }
    }

    fn delete(&self) -> Txn {
        Txn::new()
            .when(self.compares.clone())
            .and_then([TxnOp::delete(self.key.as_str(), None)])
    }

    fn exists(&self) -> Txn {
        Txn::new().when(self.compares.clone())
    }
}

/// Counts one piece of background work (a queued clean-up, a detached request) while it lives.
pub(crate) struct PendingWork(Arc<watch::Sender<usize>>);

impl PendingWork {
    pub(super) fn new(counter: &Arc<watch::Sender<usize>>) -> PendingWork {
        counter.send_modify(|n| *n += 1);
        PendingWork(Arc::clone(counter))
    }
}

impl Drop for PendingWork {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// A clean-up in the queue, counted (for `settled()`) until its first pass is done.
pub(super) struct Job {
    pub(super) cleanup: Cleanup,
    pub(super) pending: Option<PendingWork>,
}

/// Runs the clean-ups handed to the session, concurrently. Returns only if one fails in a way
/// retrying cannot fix: the session must then end.
pub(super) async fn run_cleanups(
    shared: &Arc<Shared>,
    jobs: &mut mpsc::UnboundedReceiver<Job>,
) -> LossReason {
    let mut running = FuturesUnordered::new();
    loop {
        tokio::select! {
            job = jobs.recv() => match job {
                Some(job) => running.push(run_job(shared, job)),
                // The sender lives in `shared`: cannot happen, but never spin.
                None => std::future::pending::<()>().await,
            },
            Some(outcome) = running.next(), if !running.is_empty() => {
                match outcome {
                    Ok(()) | Err(Error::SessionLost(_) | Error::SessionClosed) => {}
                    Err(e) => {
                        tracing::error!(lease = shared.lease_id, error = %e, "a background release failed permanently; ending the session");
                        return LossReason::CleanupFailed;
                    }
                }
            }
        }
    }
}

/// Carries out one job until it is done, the session is Lost, or it fails permanently.
async fn run_job(shared: &Arc<Shared>, mut job: Job) -> Result<(), Error> {
    let mut backoff = Backoff::for_requests();
    match job.cleanup {
        Cleanup::Release { key, txn, after } => {
            let resp = send_until_answered(shared, || txn.clone(), Kind::Write, &mut backoff)
                .await?
                .resp;
            tracing::debug!(key, deleted = resp.succeeded(), "background release done");
            match after {
                // In this job, not a new one: it is already running in the session's task.
                Afterwards::Sweep(sweep) => {
                    job.pending = None;
                    run_sweep(shared, &sweep, &mut backoff).await
                }
                // The number is back before `settled()` says this release is done.
                other => {
                    other.key_deleted(shared);
                    job.pending = None;
                    Ok(())
                }
            }
        }
        Cleanup::Sweep(sweep) => {
            // Counted until its first delete is answered: after that it only watches.
            let first = delete_copy(shared, &sweep, &mut backoff).await?;
            job.pending = None;
            sweep_after(shared, &sweep, first, &mut backoff).await
        }
        Cleanup::Touch {
            key,
            create_revision,
        } => {
            let touch = keys::touch(&key, create_revision);
            send_until_answered(shared, || touch.clone(), Kind::Write, &mut backoff).await?;
            Ok(())
        }
    }
}

/// Deletes a copy of the sweep's key if one exists; returns the revision of the answer.
async fn delete_copy(
    shared: &Arc<Shared>,
    sweep: &Sweep,
    backoff: &mut Backoff,
) -> Result<i64, Error> {
    let resp = send_until_answered(shared, || sweep.delete(), Kind::Write, backoff)
        .await?
        .resp;
    if resp.succeeded() {
        tracing::warn!(
            key = sweep.key,
            "deleted a late copy of an acquisition's put"
        );
    }
    keys::header_revision(&resp)
}

async fn run_sweep(
    shared: &Arc<Shared>,
    sweep: &Sweep,
    backoff: &mut Backoff,
) -> Result<(), Error> {
    let first = delete_copy(shared, sweep, backoff).await?;
    sweep_after(shared, sweep, first, backoff).await
}

/// From `revision` on, deletes every copy of the sweep's key as it lands, until the session is
/// Lost (the error ends the sweep) or something fails permanently.
async fn sweep_after(
    shared: &Arc<Shared>,
    sweep: &Sweep,
    mut revision: i64,
    backoff: &mut Backoff,
) -> Result<(), Error> {
    let puts = [Watched::put(sweep.key.as_str())];
    loop {
        let absent = || async {
            let mut backoff = Backoff::for_requests();
            let resp =
                send_until_answered(shared, || sweep.exists(), Kind::MaybeReadOnly, &mut backoff)
                    .await?
                    .resp;
            Ok(!resp.succeeded())
        };
        wait_for_change(shared, &puts, None, revision, absent, backoff).await?;
        revision = delete_copy(shared, sweep, backoff).await?;
    }
}
