//! The session's queue of background jobs: opaque futures (the engine's fenced releases,
//! sweeps, touches, its look at a resumed lease) that the session's task runs concurrently for
//! as long as the session lives. The session knows nothing of what they do, only that a job
//! failing with anything but the session's loss must end the session.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, watch};

use crate::{Error, LossReason};

/// A background job: done, or failed.
pub(crate) type Job = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

/// The sending side of the queue, the count of work under way, and of jobs alive.
pub(crate) struct Jobs {
    sender: mpsc::UnboundedSender<Job>,
    pending: Arc<watch::Sender<usize>>,
    running: Arc<AtomicUsize>,
}

/// Counts one job as alive until dropped (when the job ends, or is dropped unrun).
struct Alive(Arc<AtomicUsize>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The receiving side, for the session's task.
pub(super) type Queue = mpsc::UnboundedReceiver<Job>;

impl Jobs {
    /// A queue and its receiving side.
    pub(super) fn new() -> (Jobs, Queue) {
        let (sender, queue) = mpsc::unbounded_channel();
        let jobs = Jobs {
            sender,
            pending: Arc::new(watch::channel(0).0),
            running: Arc::new(AtomicUsize::new(0)),
        };
        (jobs, queue)
    }

    /// Queues `job`; false if the session's task has ended.
    pub(super) fn submit(&self, job: Job) -> bool {
        self.running.fetch_add(1, Ordering::Relaxed);
        let alive = Alive(Arc::clone(&self.running));
        let job: Job = Box::pin(async move {
            let _alive = alive;
            job.await
        });
        self.sender.send(job).is_ok()
    }

    /// How many submitted jobs have not ended yet.
    pub(super) fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Marks work as under way until the returned value is dropped.
    pub(super) fn pending_work(&self) -> PendingWork {
        self.pending.send_modify(|n| *n += 1);
        PendingWork(Arc::clone(&self.pending))
    }

    /// Completes once no work is under way.
    pub(super) async fn settled(&self) {
        let mut rx = self.pending.subscribe();
        // The sender lives in `self`: wait_for cannot fail.
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

/// Counts one piece of background work (a queued job, a detached request) while it lives.
pub(crate) struct PendingWork(Arc<watch::Sender<usize>>);

impl Drop for PendingWork {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// Runs the jobs of `queue`, concurrently. Returns only if one fails in a way retrying cannot
/// fix: the session must then end.
pub(super) async fn run(lease_id: i64, queue: &mut Queue) -> LossReason {
    let mut running = FuturesUnordered::new();
    loop {
        tokio::select! {
            job = queue.recv() => match job {
                Some(job) => running.push(job),
                // The sender lives in the session: cannot happen, but never spin.
                None => std::future::pending::<()>().await,
            },
            Some(outcome) = running.next(), if !running.is_empty() => {
                match outcome {
                    Ok(()) | Err(Error::SessionLost(_) | Error::SessionClosed) => {}
                    Err(e) => {
                        tracing::error!(lease = lease_id, error = %e, "a background job failed permanently; ending the session");
                        return LossReason::CleanupFailed;
                    }
                }
            }
        }
    }
}
