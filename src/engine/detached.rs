//! Requests that may create a key, finished whatever becomes of their caller: dropping the
//! caller at any point cannot strand the key.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::cleanup::Cleanup;
use super::SessionKeys;
use crate::rpc::{unless_stopped, Unanswered};
use crate::session::{PendingWork, Session};
use crate::Error;

/// What a detached request comes to: its outcome, and the clean-up of whatever it created
/// unless the caller takes a successful outcome over.
type Finished<T> = (Result<T, Unanswered>, Option<Cleanup>);

/// A detached request, polled by its caller while the caller waits for it. If it is dropped
/// unfinished — the caller was cancelled mid-request, or the session stopped — the rest of it
/// is handed to the session's task, which finishes it and hands the clean-up of its outcome
/// over too: a request the caller began is not cancelled by the caller's drop (the session's
/// own end still stops it: the lease's end then removes what it was for). It keeps the
/// session's pending-work count up until its clean-up, if any, is queued, so `settled()`
/// cannot miss it.
struct Run<T: Send + 'static> {
    session: Arc<Session>,
    job: Option<Pin<Box<dyn Future<Output = Finished<T>> + Send>>>,
    pending: Option<PendingWork>,
}

impl<T: Send + 'static> Future for Run<T> {
    /// The outcome, and the pending work to drop once its clean-up is queued.
    type Output = (Finished<T>, Option<PendingWork>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Out of `self` while it is polled: a job that panics is not handed on by the drop.
        let Some(mut job) = self.job.take() else {
            unreachable!("a detached request is awaited once");
        };
        match job.as_mut().poll(cx) {
            Poll::Ready(finished) => Poll::Ready((finished, self.pending.take())),
            Poll::Pending => {
                self.job = Some(job);
                Poll::Pending
            }
        }
    }
}

impl<T: Send + 'static> Drop for Run<T> {
    fn drop(&mut self) {
        let Some(job) = self.job.take() else {
            return;
        };
        let (session, pending) = (Arc::clone(&self.session), self.pending.take());
        // Synchronous, and needs no runtime context: the session's task runs it.
        self.session.submit(move |_| async move {
            let (_, cleanup) = job.await;
            if let Some(job) = cleanup {
                session.clean_up(job);
            }
            drop(pending);
            Ok(())
        });
    }
}

/// Runs `work` — a request that may create `key` — so that dropping the caller at any point
/// cannot strand the key: the caller polls it (no task hop on the way of an acquisition) and,
/// if the caller is dropped first, the session's task finishes it. Unless the caller
/// takes a successful outcome over, the clean-up `cleanup` makes of the outcome (for a
/// failure: of what may have landed) is handed to the session's task. A caller that takes an
/// `Ok` over must arm its own clean-up before its next await.
///
/// `work` is boxed when this is called, not when it is first polled: an `async fn` would hold
/// it as its argument beside the box (see `rpc::send::within`). Nothing else happens before
/// the first poll — dropped unpolled, it drops `work` unstarted, as before.
pub(crate) fn detached<'a, T, W, C>(
    session: &'a Arc<Session>,
    work: W,
    cleanup: C,
) -> impl Future<Output = Result<T, Error>> + 'a
where
    T: Send + 'static,
    W: Future<Output = Result<T, Unanswered>> + Send + 'static,
    C: FnOnce(&Result<T, Unanswered>) -> Option<Cleanup> + Send + 'static,
{
    let job: Pin<Box<dyn Future<Output = Finished<T>> + Send>> = Box::pin(async move {
        let outcome = work.await;
        let cleanup = cleanup(&outcome);
        (outcome, cleanup)
    });
    async move {
        let run = Run {
            session: Arc::clone(session),
            job: Some(job),
            pending: Some(session.pending_work()),
        };
        let ((outcome, cleanup), pending) =
            unless_stopped(&**session, async { Ok(run.await) }).await?;
        let result = match outcome {
            Ok(value) => Ok(value), // the caller takes over
            Err(unanswered) => {
                if let Some(job) = cleanup {
                    session.clean_up(job);
                }
                Err(unanswered.into())
            }
        };
        drop(pending); // after the clean-up is queued
        result
    }
}
