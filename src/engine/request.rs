//! How requests travel: the session's request timeout, retries of transient failures with
//! one backoff per operation, detached requests that a cancelled caller cannot strand, and
//! read-only Txns that are never cancelled in flight.

use std::future::Future;
use std::sync::Arc;

use etcd_client::{Txn, TxnResponse};
use tokio::sync::oneshot;
use tokio::time::sleep;

use crate::backoff::Backoff;
use crate::error::{renewing_auth, within};
use crate::session::{Cleanup, Counters, Shared};
use crate::Error;

/// Whether a Txn may be cancelled in flight.
///
/// etcd sends a Txn with any write through raft and applies it with a context of its own, so
/// cancelling the request is harmless to the server. A read-only Txn is applied with the
/// request's context, and etcd before 3.5.5 panics — the whole server — if that context is
/// cancelled while the Txn is applied (etcd #14110). Read-only Txns (and any whose content we
/// do not know) are therefore never cancelled in flight; writes are, when their caller gives up
/// (and every write we send is fenced or idempotent, so a copy that lands late is harmless).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Contains a put or a delete: sent directly, cancelled with its caller.
    Write,
    /// May be read-only: must not be cancelled in flight.
    MaybeReadOnly,
}

/// Sends `txn` with the session's request timeout, and records the revision of its answer.
///
/// A [`Kind::Write`] Txn is sent directly: a caller that gives up (its future dropped, or the
/// timeout) cancels it. A [`Kind::MaybeReadOnly`] Txn runs in a short task of the session, and
/// a caller that gives up only stops waiting; the task gives up after [`ABANDON_AFTER`]
/// request timeouts.
///
/// A Txn refused because the client's auth token is stale ([`Error::is_stale_auth`]) is sent
/// once more after the token was renewed.
pub(crate) async fn send_txn(shared: &Shared, txn: Txn, kind: Kind) -> Result<TxnResponse, Error> {
    renewing_auth(&shared.client, || send_txn_once(shared, txn.clone(), kind)).await
}

async fn send_txn_once(shared: &Shared, txn: Txn, kind: Kind) -> Result<TxnResponse, Error> {
    Counters::add(&shared.counters.txns, 1);
    let mut kv = shared.client.kv_client();
    let resp = if kind == Kind::Write {
        within(shared.request_timeout, kv.txn(txn)).await?
    } else {
        let (tx, rx) = oneshot::channel();
        let patience = shared.request_timeout.saturating_mul(ABANDON_AFTER);
        shared.spawn(async move {
            if let Ok(answer) = tokio::time::timeout(patience, kv.txn(txn)).await {
                let _ = tx.send(answer);
            }
        });
        match tokio::time::timeout(shared.request_timeout, rx).await {
            Err(_) => return Err(Error::Timeout(shared.request_timeout)),
            Ok(Err(_)) => return Err(Error::Timeout(patience)),
            Ok(Ok(answer)) => answer?,
        }
    };
    if let Some(header) = resp.header() {
        shared.saw_revision(header.revision());
    }
    Ok(resp)
}

/// How many request timeouts a read-only request in flight is left to finish after its
/// caller stopped waiting, before it is cancelled after all (see [`send_txn`]).
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

/// Sleeps for the next delay of `backoff`, or fails if the session is Lost first.
pub(crate) async fn pause(shared: &Arc<Shared>, backoff: &mut Backoff) -> Result<(), Error> {
    let delay = backoff.next_delay();
    unless_lost(shared, async {
        sleep(delay).await;
        Ok(())
    })
    .await
}

/// An answer to a request sent until it was answered.
pub(crate) struct Answered {
    pub(crate) resp: TxnResponse,
    /// An earlier attempt went unanswered: it may still land later.
    pub(crate) uncertain: bool,
}

/// A request that got no usable answer: why, and whether an attempt may still land.
#[derive(Debug)]
pub(crate) struct Unanswered {
    pub(crate) error: Error,
    /// Some attempt was sent and not answered (it timed out, its connection failed, or the
    /// session was lost while it was in flight): it may land later.
    pub(crate) uncertain: bool,
}

impl From<Unanswered> for Error {
    fn from(u: Unanswered) -> Error {
        u.error
    }
}

/// Sends `txn()` until it is answered: transient failures ([`Error::is_transient`]) are
/// retried with the same request (so a retry is idempotent), pausing on `backoff` — the
/// caller's one backoff for the whole operation, so that an operation that keeps failing slows
/// down instead of starting over at the shortest delay. Fails at once on a permanent error or
/// when the session is Lost, saying whether an attempt may still land.
pub(crate) async fn send_until_answered(
    shared: &Arc<Shared>,
    txn: impl Fn() -> Txn,
    kind: Kind,
    backoff: &mut Backoff,
) -> Result<Answered, Unanswered> {
    let mut uncertain = false;
    let fail = |error, uncertain| Unanswered { error, uncertain };
    loop {
        shared.check().map_err(|e| fail(e, uncertain))?;
        let answer = tokio::select! {
            answer = send_txn(shared, txn(), kind) => answer,
            reason = shared.lost() => return Err(fail(Error::lost(reason), true)),
        };
        match answer {
            Ok(resp) => return Ok(Answered { resp, uncertain }),
            Err(e) if e.is_transient() => {
                tracing::debug!(error = %e, "request failed; retrying it unchanged");
                uncertain = true;
                pause(shared, backoff).await.map_err(|e| fail(e, true))?;
            }
            // etcd refused it: this attempt did not land.
            Err(e) => return Err(fail(e, uncertain)),
        }
    }
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
/// over, the clean-up `cleanup` makes of the outcome (for a failure: of what may have landed)
/// is handed to the session's task. A caller that takes an `Ok` over must arm its own clean-up
/// before its next await.
pub(crate) async fn detached<T, W, C>(shared: &Arc<Shared>, work: W, cleanup: C) -> Result<T, Error>
where
    T: Send + 'static,
    W: Future<Output = Result<T, Unanswered>> + Send + 'static,
    C: FnOnce(&Result<T, Unanswered>) -> Option<Cleanup> + Send + 'static,
{
    let (tx, rx) = oneshot::channel::<Delivery<T>>();
    let task_shared = Arc::clone(shared);
    let pending = shared.pending_work();
    shared.spawn(async move {
        let outcome = work.await;
        let cleanup = cleanup(&outcome);
        let outcome = outcome.map_err(Error::from);
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
        delivery.cleanup = None; // the caller takes over
    }
    outcome
}
