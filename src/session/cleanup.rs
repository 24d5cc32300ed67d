//! The session's background clean-ups: releases of dropped guards, abandoned acquisitions.

use std::sync::Arc;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, timeout};

use super::{Counters, Shared};
use crate::backoff::Backoff;
use crate::keys;

/// A background clean-up the session's task carries out for a guard or an abandoned
/// acquisition.
#[derive(Debug)]
pub(crate) enum Cleanup {
    /// Delete `key` if it is attached to this session's lease: the outcome of the request
    /// that may have created it is unknown.
    Abandoned { key: String },
    /// Send `txn`, a release fenced on `key`'s create revision (safe to repeat).
    Txn { key: String, txn: etcd_client::Txn },
}

impl Cleanup {
    /// Delete `key` if it is still the incarnation created at `create_revision`.
    pub(crate) fn release(key: String, create_revision: i64) -> Cleanup {
        let txn = keys::fenced_delete(&key, create_revision);
        Cleanup::Txn { key, txn }
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

/// A clean-up in the queue, counted until it is done or dropped.
pub(super) struct Job {
    pub(super) cleanup: Cleanup,
    pub(super) _pending: PendingWork,
}

/// Runs the clean-ups handed to the session, concurrently. Never returns.
pub(super) async fn run_cleanups(shared: &Shared, jobs: &mut mpsc::UnboundedReceiver<Job>) {
    let mut running = FuturesUnordered::new();
    loop {
        tokio::select! {
            job = jobs.recv() => match job {
                Some(job) => running.push(clean_up(shared, job)),
                // The sender lives in `shared`: cannot happen, but never spin.
                None => std::future::pending::<()>().await,
            },
            Some(()) = running.next(), if !running.is_empty() => {}
        }
    }
}

/// How many times a background clean-up is tried before the lease's end is left to do it.
const CLEANUP_ATTEMPTS: u32 = 8;

/// Carries out one clean-up, retrying on transport errors. An abandoned acquisition is
/// cleaned twice, the second time after a request timeout, in case the request that created
/// the key was still in flight the first time.
async fn clean_up(shared: &Shared, job: Job) {
    let job = &job.cleanup;
    let (key, passes) = match job {
        Cleanup::Txn { key, .. } => (key.as_str(), 1),
        Cleanup::Abandoned { key } => (key.as_str(), 2),
    };
    for pass in 0..passes {
        if pass > 0 {
            sleep(shared.request_timeout).await;
        }
        let mut backoff = Backoff::for_requests();
        for _ in 0..CLEANUP_ATTEMPTS {
            let txn = match job {
                Cleanup::Abandoned { key } => keys::lease_fenced_delete(key, shared.lease_id),
                Cleanup::Txn { txn, .. } => txn.clone(),
            };
            let mut kv = shared.client.kv_client();
            Counters::add(&shared.counters.txns, 1);
            match timeout(shared.request_timeout, kv.txn(txn)).await {
                Ok(Ok(resp)) => {
                    tracing::debug!(key, deleted = resp.succeeded(), "background clean-up done");
                    break;
                }
                Ok(Err(e)) => {
                    tracing::debug!(key, error = %e, "background clean-up failed; retrying")
                }
                Err(_) => tracing::debug!(key, "background clean-up timed out; retrying"),
            }
            sleep(backoff.next_delay()).await;
        }
    }
}
