//! How requests travel: timeouts, retries, detached requests.

use std::future::Future;
use std::sync::Arc;

use etcd_client::{Txn, TxnResponse};
use tokio::sync::oneshot;
use tokio::time::{sleep, timeout};

use crate::backoff::Backoff;
use crate::session::{Cleanup, Shared};
use crate::Error;

/// Whether a Txn contains a write (a put or a delete, in either branch).
///
/// etcd sends a Txn with any write through raft and applies it with a context of its own, so
/// cancelling the request is harmless. A read-only Txn is applied with the request's context,
/// and etcd before 3.5.5 panics — the whole server — if that context is cancelled while the Txn
/// is applied (etcd #14110). Read-only Txns (and any whose content we do not control) are
/// therefore never cancelled in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Contains a put or a delete: may be cancelled.
    Write,
    /// May be read-only: must not be cancelled in flight.
    MaybeReadOnly,
}

/// Sends `txn` with the session's request timeout.
///
/// A [`Kind::MaybeReadOnly`] Txn is never cancelled mid-flight: it runs in a short task of the
/// session, and a caller that gives up (its future dropped, or the request timeout) only stops
/// waiting; the task gives up after [`ABANDON_AFTER`] request timeouts. A [`Kind::Write`] Txn
/// is sent directly.
pub(crate) async fn send_txn(shared: &Shared, txn: Txn, kind: Kind) -> Result<TxnResponse, Error> {
    crate::session::Counters::add(&shared.counters.txns, 1);
    let mut kv = shared.client.kv_client();
    if kind == Kind::Write {
        return match timeout(shared.request_timeout, kv.txn(txn)).await {
            Err(_) => Err(Error::Timeout(shared.request_timeout)),
            Ok(answer) => Ok(answer?),
        };
    }
    let (tx, rx) = oneshot::channel();
    let patience = shared.request_timeout * ABANDON_AFTER;
    shared.spawn(async move {
        if let Ok(answer) = timeout(patience, kv.txn(txn)).await {
            let _ = tx.send(answer);
        }
    });
    match timeout(shared.request_timeout, rx).await {
        Err(_) => Err(Error::Timeout(shared.request_timeout)),
        Ok(Err(_)) => Err(Error::Timeout(patience)),
        Ok(Ok(answer)) => Ok(answer?),
    }
}

/// How many request timeouts a request in flight is left to finish after its caller stopped
/// waiting, before it is cancelled after all (see [`send_txn`]).
const ABANDON_AFTER: u32 = 10;

/// Runs `fut` unless the session is (or becomes) Lost first.
pub(crate) async fn unless_lost<F: Future<Output = Result<T, Error>>, T>(
    shared: &Arc<Shared>,
    fut: F,
) -> Result<T, Error> {
    shared.check()?;
    tokio::select! {
        out = fut => out,
        reason = shared.lost() => Err(Error::lost(reason)),
    }
}

/// Sleeps for the next backoff delay, or fails if the session is Lost first.
pub(crate) async fn back_off(shared: &Arc<Shared>, backoff: &mut Backoff) -> Result<(), Error> {
    let delay = backoff.next_delay();
    unless_lost(shared, async {
        sleep(delay).await;
        Ok(())
    })
    .await
}

/// The outcome of a detached request on its way to the caller. It owns the clean-up of
/// whatever the request created: if it is dropped unread — the task could not deliver it, or
/// the caller was cancelled after it was delivered but before it was read — the clean-up is
/// handed to the session's task. It also keeps the session's pending-work count up until
/// then, so `settled()` cannot miss it.
struct Delivery<T> {
    outcome: Option<Result<T, Error>>,
    cleanup: Option<Cleanup>,
    shared: Arc<Shared>,
    _pending: crate::session::PendingWork,
}

impl<T> Drop for Delivery<T> {
    fn drop(&mut self) {
        if let Some(job) = self.cleanup.take() {
            self.shared.clean_up(job);
        }
    }
}

/// Runs `work` — a request that may create `key` — in a detached task, so that dropping the
/// caller at any point cannot strand the key: unless the caller takes a successful outcome
/// over, whatever `created` says landed (or, on failure, whatever may have landed) is handed
/// to the session's clean-up. A caller that takes an `Ok` over must arm its own [`Ticket`]
/// before its next await.
pub(crate) async fn detached<T, W, C>(
    shared: &Arc<Shared>,
    key: &str,
    work: W,
    created: C,
) -> Result<T, Error>
where
    T: Send + 'static,
    W: Future<Output = Result<T, Error>> + Send + 'static,
    C: Fn(&T) -> Option<i64> + Send + 'static,
{
    let (tx, rx) = oneshot::channel::<Delivery<T>>();
    let task_shared = Arc::clone(shared);
    let task_key = key.to_owned();
    let pending = shared.pending_work();
    shared.spawn(async move {
        let outcome = work.await;
        let cleanup = match &outcome {
            Ok(value) => created(value).map(|rev| Cleanup::release(task_key, rev)),
            Err(_) => Some(Cleanup::Abandoned { key: task_key }),
        };
        // If the caller is gone, the returned delivery is dropped here and cleans up.
        let _ = tx.send(Delivery {
            outcome: Some(outcome),
            cleanup,
            shared: task_shared,
            _pending: pending,
        });
    });
    let mut delivery = unless_lost(shared, async {
        rx.await
            .map_err(|_| Error::Protocol("acquisition task ended without an answer".into()))
    })
    .await?;
    let outcome = delivery
        .outcome
        .take()
        .unwrap_or_else(|| Err(Error::Protocol("empty delivery".into())));
    if outcome.is_ok() {
        delivery.cleanup = None; // the caller's ticket takes over
    }
    outcome
}

/// Sends `txn()` until it is answered, retrying transport failures (with the same request, so
/// a retry is idempotent) with backoff while the session lives.
pub(crate) async fn send_until_answered(
    shared: &Arc<Shared>,
    txn: impl Fn() -> Txn,
    kind: Kind,
) -> Result<TxnResponse, Error> {
    let mut backoff = Backoff::for_requests();
    loop {
        match unless_lost(shared, send_txn(shared, txn(), kind)).await {
            Err(e) if e.is_retryable() => {
                tracing::debug!(error = %e, "request failed; retrying it unchanged");
                back_off(shared, &mut backoff).await?;
            }
            other => return other,
        }
    }
}
