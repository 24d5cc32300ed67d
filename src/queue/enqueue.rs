//! Enqueueing: one Txn puts the job and its marker, unless the marker exists — so an enqueue
//! retried (by the request layer after a lost answer, or by the producer with the same
//! idempotency key) adds one job. The markers live on a lease of the session's that nobody
//! refreshes ("the dedup lease"): granted for twice the dedup window and replaced once it is
//! a window old, so each marker lives at least a window and at most two, and then vanishes
//! with no clean-up to run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::layout::{encode, micros, ready_now, Header, JobId, Keys};
use super::options::EnqueueOptions;
use crate::backoff::Backoff;
use crate::keys::{header_revision, txn_gets};
use crate::session::Session;
use crate::Error;

/// Enqueues `payload` with `options` on the queue of `keys`; the job's id, or the id of the
/// job an earlier enqueue with the same marker added.
pub(super) async fn enqueue(
    session: &Arc<Session>,
    keys: &Keys,
    window_secs: i64,
    payload: Vec<u8>,
    options: &EnqueueOptions,
) -> Result<JobId, Error> {
    options.validate(payload.len())?;
    session.check()?;
    let id = JobId::random();
    let now = ready_now();
    let ready = options.not_before.map_or(now, |t| micros(t).max(now));
    let header = Header {
        id: id.0.clone(),
        priority: options.priority,
        enqueued_ms: now / 1000,
        attempts_base: 0,
        version_base: 1,
        last_error: None,
        last_error_attempt: 0,
        idempotency_key: options.idempotency_key.clone(),
        dead_ms: None,
    };
    let job = keys.job(options.priority, ready, &id);
    let value = encode(&header, &payload);
    let marker = keys.marker(options.idempotency_key.as_deref(), &id);
    let mut renewed = false;
    loop {
        let lease = dedup_lease(session, window_secs).await?;
        let txn = || {
            Txn::new()
                .when([Compare::create_revision(
                    marker.as_str(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([
                    TxnOp::put(
                        marker.as_str(),
                        id.0.as_str(),
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                    TxnOp::put(job.as_str(), value.clone(), None),
                ])
                .or_else([TxnOp::get(marker.as_str(), None)])
        };
        let sent = session
            .rpc
            .txn_until_answered(txn, &mut Backoff::for_requests(), &**session)
            .await;
        let resp = match sent {
            Ok(answered) => answered.resp,
            // The dedup lease ended early (revoked by someone): take a new one, once.
            Err(u) if u.error.is_lease_not_found() && !renewed => {
                forget_dedup_lease(session, window_secs, lease);
                renewed = true;
                continue;
            }
            Err(u) => return Err(u.error),
        };
        if resp.succeeded() {
            header_revision(&resp)?;
            return Ok(id);
        }
        // The marker exists: this enqueue (an earlier, unanswered attempt) or an earlier one
        // with the same idempotency key added the job.
        let gets = txn_gets(&resp);
        let kv = gets.first().and_then(|g| g.kvs().first()).ok_or_else(|| {
            Error::Protocol(format!("enqueue: marker {marker} neither absent nor read"))
        })?;
        let first = std::str::from_utf8(kv.value())
            .map_err(|_| Error::Protocol(format!("enqueue: marker {marker} is not a job id")))?;
        return Ok(JobId(first.to_owned()));
    }
}

/// The session's dedup leases, by window: the lease and when it was granted.
#[derive(Default)]
struct DedupLeases {
    current: StdMutex<HashMap<i64, (i64, Instant)>>,
    /// One grant at a time.
    granting: tokio::sync::Mutex<()>,
}

impl DedupLeases {
    fn fresh(&self, window_secs: i64) -> Option<i64> {
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let window = Duration::from_secs(window_secs.unsigned_abs());
        current
            .get(&window_secs)
            .filter(|(_, granted)| granted.elapsed() < window)
            .map(|(id, _)| *id)
    }
}

/// A lease of at least `window_secs` left to live, for markers: the session's current one, or
/// a new one. The grant runs in a task of the session, so a caller that gives up does not
/// strand it: it is recorded for the next enqueue.
async fn dedup_lease(session: &Arc<Session>, window_secs: i64) -> Result<i64, Error> {
    let leases = session.extension(DedupLeases::default);
    if let Some(id) = leases.fresh(window_secs) {
        return Ok(id);
    }
    let _turn = leases.granting.lock().await;
    if let Some(id) = leases.fresh(window_secs) {
        return Ok(id);
    }
    let (tx, rx) = oneshot::channel();
    let (owned, for_task) = (Arc::clone(session), Arc::clone(&leases));
    session.spawn(async move {
        let session = &owned;
        let sent = Instant::now();
        // An id of our choosing, so that a retry after an unanswered attempt cannot grant a
        // second lease: it finds the first one (etcd's lease ids are positive; another lease
        // with this random id has odds of 2^-63).
        let id = (rand::random::<i64>() & i64::MAX).max(1);
        let grant = || session.rpc.lease_grant(window_secs.saturating_mul(2), id);
        let granted = match session
            .rpc
            .until_answered(grant, &mut Backoff::for_requests(), &**session)
            .await
        {
            Ok(answered) => Ok(answered.resp.id()),
            Err(u) if u.uncertain && u.error.is_lease_taken() => Ok(id),
            Err(u) => {
                if u.uncertain {
                    // An attempt may have granted it, and nobody will use it: revoke it
                    // (once; else it ends with its TTL).
                    let _ = session.rpc.lease_revoke(id).await;
                }
                Err(Error::from(u))
            }
        };
        if let Ok(id) = granted {
            let mut current = for_task.current.lock().unwrap_or_else(|e| e.into_inner());
            current.insert(window_secs, (id, sent));
        }
        let _ = tx.send(granted);
    });
    rx.await
        .map_err(|_| Error::Internal("the dedup lease's grant ended without an answer".into()))?
}

/// Forgets `lease` as the session's dedup lease for `window_secs` (etcd no longer has it).
fn forget_dedup_lease(session: &Session, window_secs: i64, lease: i64) {
    let leases = session.extension(DedupLeases::default);
    let mut current = leases.current.lock().unwrap_or_else(|e| e.into_inner());
    if current
        .get(&window_secs)
        .is_some_and(|(id, _)| *id == lease)
    {
        current.remove(&window_secs);
    }
}
