//! Keeping the lease alive: the refresh loop and its deadline.

use std::future::Future;
use std::time::Duration;

use tokio::time::{sleep, sleep_until, timeout, Instant};

use super::liveness::Liveness;
use super::{Counters, Shared};
use crate::backoff::Backoff;
use crate::LossReason;

/// Waits for `fut` until `deadline`; `None` if the deadline came first.
async fn before<F: Future>(deadline: Instant, fut: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        out = fut => Some(out),
        _ = sleep_until(deadline) => None,
    }
}

/// Refreshes the lease until the session is Lost; returns why.
pub(super) async fn keep_alive(shared: &Shared, live: &mut Liveness) -> LossReason {
    let interval = shared.ttl / 3;
    let mut backoff = Backoff::new(
        Duration::from_millis(50),
        (interval / 2).min(Duration::from_secs(1)),
    );
    let mut leases = shared.client.lease_client();
    loop {
        // Opening the stream sends the first refresh and waits for its answer.
        let sent = Instant::now();
        Counters::add(&shared.counters.keepalive_requests, 1);
        let opened = before(
            live.deadline(),
            timeout(shared.keepalive_timeout, leases.keep_alive(shared.lease_id)),
        )
        .await;
        match opened {
            None => live.on_tick(Instant::now()),
            Some(Ok(Ok((mut keeper, mut stream)))) => {
                live.on_ack(sent, shared.ttl, Instant::now());
                shared.publish(live);
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
                    Counters::add(&shared.counters.keepalive_requests, 1);
                    if keeper.keep_alive().await.is_err() {
                        live.on_failure(Instant::now());
                        break;
                    }
                    let answer = before(
                        live.deadline(),
                        timeout(shared.keepalive_timeout, stream.message()),
                    )
                    .await;
                    match answer {
                        None => live.on_tick(Instant::now()),
                        Some(Ok(Ok(Some(resp)))) => {
                            let ttl = Duration::from_secs(resp.ttl().max(0) as u64);
                            live.on_ack(sent, ttl, Instant::now());
                            last_sent = sent;
                        }
                        Some(Ok(Ok(None))) | Some(Ok(Err(_))) | Some(Err(_)) => {
                            tracing::debug!(
                                lease = shared.lease_id,
                                "lease refresh failed; re-opening the stream"
                            );
                            live.on_failure(Instant::now());
                            shared.publish(live);
                            break;
                        }
                    }
                    shared.publish(live);
                }
            }
            Some(Ok(Err(e))) if lease_not_found(&e) => live.on_lease_gone(),
            Some(Ok(Err(e))) => {
                tracing::debug!(lease = shared.lease_id, error = %e, "opening the keep-alive stream failed");
                if crate::Error::from(e).is_stale_auth() {
                    let _ = crate::error::renew_auth(&shared.client).await;
                }
                live.on_failure(Instant::now());
            }
            Some(Err(_)) => live.on_failure(Instant::now()),
        }
        shared.publish(live);
        if let Some(reason) = live.reason() {
            return reason;
        }
        if before(live.deadline(), sleep(backoff.next_delay()))
            .await
            .is_none()
        {
            live.on_tick(Instant::now());
            shared.publish(live);
        }
        if let Some(reason) = live.reason() {
            return reason;
        }
    }
}

pub(super) fn lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::NotFound || s.message().contains("lease not found")
        }
        _ => false,
    }
}
