//! Retrying: the caller's one backoff for a whole operation, and what stops it.

use std::future::Future;
use std::pin::Pin;

use tokio::time::sleep;

use super::Rpc;
use crate::backoff::Backoff;
use crate::Error;

/// What ends a retrying operation before it is answered: a session that becomes Lost, say.
pub(crate) trait Stop: Send + Sync {
    /// `Err` (the error to report) if it has stopped already.
    fn check(&self) -> Result<(), Error>;

    /// Completes once it stops, with the error to report. Owns what it needs.
    fn stopped(&self) -> Pin<Box<dyn Future<Output = Error> + Send + 'static>>;
}

/// Runs `fut` unless `stop` stops first.
///
/// `fut` is boxed before anything else, as a request is in [`within`](super::send::within): an
/// `async fn` would hold it twice, as its argument and in its `select!`.
pub(crate) fn unless_stopped<'a, T: 'a>(
    stop: &'a dyn Stop,
    fut: impl Future<Output = Result<T, Error>> + 'a,
) -> impl Future<Output = Result<T, Error>> + 'a {
    let fut = Box::pin(fut);
    async move {
        stop.check()?;
        tokio::select! {
            out = fut => out,
            e = stop.stopped() => Err(e),
        }
    }
}

/// Sleeps for the next delay of `backoff`, or fails if `stop` stops first.
pub(crate) async fn pause(stop: &dyn Stop, backoff: &mut Backoff) -> Result<(), Error> {
    let delay = backoff.next_delay();
    unless_stopped(stop, async {
        sleep(delay).await;
        Ok(())
    })
    .await
}

/// An answer to a request sent until it was answered.
pub(crate) struct Answered<T> {
    pub(crate) resp: T,
    /// An earlier attempt went unanswered: it may still land later.
    pub(crate) uncertain: bool,
}

/// A request that got no usable answer: why, and whether an attempt may still land.
#[derive(Debug)]
pub(crate) struct Unanswered {
    pub(crate) error: Error,
    /// Some attempt was sent and not answered (it timed out, its connection failed, or the
    /// caller stopped while it was in flight): it may land later.
    pub(crate) uncertain: bool,
}

impl From<Unanswered> for Error {
    fn from(u: Unanswered) -> Error {
        u.error
    }
}

impl Rpc {
    /// Sends `request()` until it is answered: failures that may succeed again
    /// ([`Error::is_retryable`]) are retried with the same request (so a retry is idempotent),
    /// pausing on `backoff` — the caller's one backoff for the whole operation, so that an
    /// operation that keeps failing slows down instead of starting over at the shortest delay.
    /// Fails at once on any other error or when `stop` stops, saying whether an attempt may
    /// still land.
    pub(crate) async fn until_answered<T, F, Fut>(
        &self,
        mut request: F,
        backoff: &mut Backoff,
        stop: &dyn Stop,
    ) -> Result<Answered<T>, Unanswered>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let mut uncertain = false;
        let fail = |error, uncertain| Unanswered { error, uncertain };
        loop {
            stop.check().map_err(|e| fail(e, uncertain))?;
            let answer = tokio::select! {
                answer = request() => answer,
                e = stop.stopped() => return Err(fail(e, true)),
            };
            match answer {
                Ok(resp) => return Ok(Answered { resp, uncertain }),
                Err(e) if e.is_retryable() => {
                    tracing::debug!(error = %e, "request failed; retrying it unchanged");
                    crate::metrics::retried(&e);
                    uncertain = true;
                    pause(stop, backoff).await.map_err(|e| fail(e, true))?;
                }
                // etcd refused it: this attempt did not land.
                Err(e) => return Err(fail(e, uncertain)),
            }
        }
    }

    /// [`until_answered`](Self::until_answered) for a Txn.
    pub(crate) async fn txn_until_answered(
        &self,
        txn: impl Fn() -> etcd_client::Txn,
        backoff: &mut Backoff,
        stop: &dyn Stop,
    ) -> Result<Answered<etcd_client::TxnResponse>, Unanswered> {
        self.until_answered(move || self.txn(txn()), backoff, stop)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_under_a_stop_is_held_boxed_not_inline() {
        struct Never;
        impl Stop for Never {
            fn check(&self) -> Result<(), Error> {
                Ok(())
            }
            fn stopped(
                &self,
            ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Error> + Send + 'static>>
            {
                Box::pin(std::future::pending())
            }
        }
        let guarded = unless_stopped(&Never, crate::rpc::send::tests::large_request());
        let size = std::mem::size_of_val(&guarded);
        assert!(
            size < 1024,
            "unless_stopped's future holds the request inline: {size} bytes"
        );
        assert_eq!(guarded.await.unwrap(), 7);
    }
}
