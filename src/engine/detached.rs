//! Requests that may create a key, detached from their caller: dropping the caller at any
//! point cannot strand the key.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::cleanup::Cleanup;
use super::SessionKeys;
use crate::rpc::{unless_stopped, Unanswered};
use crate::session::{PendingWork, Session};
use crate::Error;

/// The outcome of a detached request on its way to the caller. It owns the clean-up of
/// whatever the request created: if it is dropped unread — the task could not deliver it, or
/// the caller was cancelled after it was delivered but before it was read — the clean-up is
/// handed to the session's task. It also keeps the session's pending-work count up until
/// then, so `settled()` cannot miss it.
struct Delivery<T> {
    outcome: Option<Result<T, Error>>,
    cleanup: Option<Cleanup>,
    session: Arc<Session>,
    _pending: PendingWork,
}

impl<T> Drop for Delivery<T> {
    fn drop(&mut self) {
        if let Some(job) = self.cleanup.take() {
            self.session.clean_up(job);
        }
    }
}

/// Runs `work` — a request that may create `key` — in a detached task, so that dropping the
/// caller at any point cannot strand the key: unless the caller takes a successful outcome
/// over, the clean-up `cleanup` makes of the outcome (for a failure: of what may have landed)
/// is handed to the session's task. A caller that takes an `Ok` over must arm its own clean-up
/// before its next await.
pub(crate) async fn detached<T, W, C>(
    session: &Arc<Session>,
    work: W,
    cleanup: C,
) -> Result<T, Error>
where
    T: Send + 'static,
    W: Future<Output = Result<T, Unanswered>> + Send + 'static,
    C: FnOnce(&Result<T, Unanswered>) -> Option<Cleanup> + Send + 'static,
{
    let (tx, rx) = oneshot::channel::<Delivery<T>>();
    let task_session = Arc::clone(session);
    let pending = session.pending_work();
    session.spawn(async move {
        let outcome = work.await;
        let cleanup = cleanup(&outcome);
        let outcome = outcome.map_err(Error::from);
        // If the caller is gone, the returned delivery is dropped here and cleans up.
        let _ = tx.send(Delivery {
            outcome: Some(outcome),
            cleanup,
            session: task_session,
            _pending: pending,
        });
    });
    let mut delivery = unless_stopped(&**session, async {
        rx.await.map_err(|_| {
            Error::Internal("a detached request's task ended without an answer".into())
        })
    })
    .await?;
    let outcome = delivery.outcome.take().unwrap_or_else(|| {
        Err(Error::Internal(
            "a detached request delivered nothing".into(),
        ))
    });
    if outcome.is_ok() {
        delivery.cleanup = None; // the caller takes over
    }
    outcome
}
