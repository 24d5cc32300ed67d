//! Keeping the lease alive: the refresh loop and its deadline.

use std::future::Future;
use std::time::Duration;

use tokio::time::{sleep, sleep_until, timeout, Instant};

use super::core::Session;
use super::liveness::Liveness;
use crate::backoff::Backoff;
use crate::metrics;
use crate::rpc::Stats;
use crate::LossReason;

/// Waits for `fut` until `deadline`; `None` if the deadline came first. `fut` is boxed first,
/// as in `rpc::send::within` (an `async fn` would hold it twice).
fn before<F: Future>(deadline: Instant, fut: F) -> impl Future<Output = Option<F::Output>> {
    let fut = Box::pin(fut);
    async move {
        tokio::select! {
            biased;
            out = fut => Some(out),
            _ = sleep_until(deadline) => None,
        }
    }
}

/// Refreshes the lease until the session is Lost; returns why.
pub(super) async fn keep_alive(session: &Session, live: &mut Liveness) -> LossReason {
    let interval = session.ttl / 3;
    let mut backoff = Backoff::new(
        Duration::from_millis(50),
        (interval / 2).min(Duration::from_secs(1)),
    );
    let rpc = &session.rpc;
    loop {
        // Opening the stream sends the first refresh and waits for its answer (once more with
        // a fresh token if etcd found the token stale).
        let sent = Instant::now();
        let opened = before(
            live.deadline(),
            rpc.lease_keep_alive(session.lease_id, session.keepalive_timeout),
        )
        .await;
        match opened {
            None => live.on_tick(Instant::now()),
            Some(Ok((mut keeper, mut stream))) => {
                metrics::refresh_acknowledged(sent, live.deadline());
                live.on_ack(sent, session.ttl, Instant::now());
                session.publish(live);
                backoff.reset();
                let mut last_sent = sent;
                // Refresh on this stream until it fails or the session is Lost.
                while live.reason().is_none() {
                    if before(live.deadline(), sleep_until(last_sent + interval))
                        .await
                        .is_none()
                    {
                        live.on_tick(Instant::now());
                        break;
                    }
                    let sent = Instant::now();
                    Stats::add(&rpc.stats().keepalive_requests, 1);
                    if keeper.keep_alive().await.is_err() {
                        live.on_failure(Instant::now());
                        break;
                    }
                    let answer = before(
                        live.deadline(),
                        timeout(session.keepalive_timeout, stream.message()),
                    )
                    .await;
                    match answer {
                        None => live.on_tick(Instant::now()),
                        Some(Ok(Ok(Some(resp)))) => {
                            let ttl = Duration::from_secs(resp.ttl().max(0) as u64);
                            metrics::refresh_acknowledged(sent, live.deadline());
                            live.on_ack(sent, ttl, Instant::now());
                            last_sent = sent;
                        }
                        Some(Ok(Ok(None))) | Some(Ok(Err(_))) | Some(Err(_)) => {
                            tracing::debug!(
                                lease = session.lease_id,
                                "lease refresh failed; re-opening the stream"
                            );
                            live.on_failure(Instant::now());
                            session.publish(live);
                            break;
                        }
                    }
                    session.publish(live);
                }
            }
            Some(Err(e)) if e.is_lease_not_found() => {
                // Gone — or, before any refresh was acknowledged, not applied yet (#13675).
                tracing::debug!(lease = session.lease_id, "the lease was not found");
                live.on_not_found(Instant::now());
            }
            Some(Err(e)) => {
                tracing::debug!(lease = session.lease_id, error = %e, "opening the keep-alive stream failed");
                live.on_failure(Instant::now());
            }
        }
        session.publish(live);
        if let Some(reason) = live.reason() {
            return reason;
        }
        if before(live.deadline(), sleep(backoff.next_delay()))
            .await
            .is_none()
        {
            live.on_tick(Instant::now());
            session.publish(live);
        }
        if let Some(reason) = live.reason() {
            return reason;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn before_holds_the_future_it_limits_boxed_not_inline() {
        let limited = before(
            Instant::now() + Duration::from_secs(10),
            crate::rpc::send::tests::large_request(),
        );
        let size = std::mem::size_of_val(&limited);
        assert!(
            size < 1024,
            "before's future holds the future inline: {size} bytes"
        );
        assert_eq!(limited.await.map(Result::unwrap), Some(7));
    }
}
