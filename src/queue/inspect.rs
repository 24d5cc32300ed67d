//! Looking at a queue from outside: how many jobs, which wait, who holds what, the dead
//! letters. Reads only; each answer may be stale by the time it is used.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{GetOptions, KeyValue};

use super::layout::{decode, from_micros, JobId, Keys};
use crate::backoff::Backoff;
use crate::session::Session;
use crate::Error;

/// A queued job nobody holds, from [`WorkQueue::pending`](super::WorkQueue::pending).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct JobInfo {
    /// The job's id.
    pub id: JobId,
    /// Its priority.
    pub priority: u8,
    /// When it may be claimed (its not-before time, or when it was enqueued or given back).
    pub ready_at: SystemTime,
    /// When it was enqueued (the producer's clock, milliseconds).
    pub enqueued_at: SystemTime,
    /// Deliveries so far.
    pub attempts: u32,
    /// The error its last delivery reported, if any.
    pub last_error: Option<String>,
    /// The payload.
    pub payload: Vec<u8>,
}

/// A job held by a claimer, from [`WorkQueue::claimed`](super::WorkQueue::claimed).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClaimInfo {
    /// The job's id.
    pub id: JobId,
    /// The lease of the claimer's session.
    pub lease_id: i64,
    /// The claim's fencing token (its key's create revision).
    pub fencing_token: i64,
    /// Which delivery the claim is.
    pub attempt: u32,
}

/// A job that was delivered as often as the queue allows, from
/// [`WorkQueue::dead_letters`](super::WorkQueue::dead_letters).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The job's id.
    pub id: JobId,
    /// Its priority.
    pub priority: u8,
    /// Deliveries made.
    pub attempts: u32,
    /// The error that ended the last delivery (reported with a nack, or why none was).
    pub last_error: String,
    /// When it was enqueued.
    pub enqueued_at: SystemTime,
    /// When it became a dead letter.
    pub dead_at: SystemTime,
    /// The payload.
    pub payload: Vec<u8>,
}

fn millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Keys per page of the reads of a queue's state.
const PAGE: i64 = 500;

/// Every key under `prefix` with its value, at one revision (`at`, or now if 0): see
/// [`crate::engine::read_all`].
async fn read_all(
    session: &Arc<Session>,
    prefix: &str,
    at: i64,
) -> Result<(Vec<KeyValue>, i64), Error> {
    crate::engine::read_all(session, prefix.as_bytes(), at, PAGE, false).await
}

/// How many jobs the queue holds, claimed or not (dead letters aside).
pub(super) async fn len(session: &Arc<Session>, keys: &Keys) -> Result<usize, Error> {
    let opts = GetOptions::new().with_prefix().with_count_only();
    let read = || session.rpc.get(keys.jobs(), opts.clone());
    let resp = session
        .rpc
        .until_answered(read, &mut Backoff::for_requests(), &**session)
        .await?
        .resp;
    Ok(usize::try_from(resp.count()).unwrap_or(usize::MAX))
}

/// The jobs and the claims, at one revision: `(job key, job)` and `(job id, claim)`.
async fn state(
    session: &Arc<Session>,
    keys: &Keys,
) -> Result<(Vec<KeyValue>, Vec<(String, KeyValue)>), Error> {
    let (claims, revision) = read_all(session, &keys.claims(), 0).await?;
    let (jobs, _) = read_all(session, &keys.jobs(), revision).await?;
    let prefix = keys.claims();
    let claims = claims
        .into_iter()
        .filter_map(|kv| {
            let id = std::str::from_utf8(kv.key()).ok()?.strip_prefix(&prefix)?;
            Some((id.to_owned(), kv))
        })
        .collect();
    Ok((jobs, claims))
}

/// The jobs nobody holds, in the order they would be claimed (not-ready ones included).
pub(super) async fn pending(session: &Arc<Session>, keys: &Keys) -> Result<Vec<JobInfo>, Error> {
    let (jobs, claims) = state(session, keys).await?;
    let mut out = Vec::new();
    for kv in jobs {
        let Some(job) = keys.parse_job(kv.key()) else {
            continue;
        };
        if claims.iter().any(|(id, _)| *id == job.id) {
            continue;
        }
        let (header, payload) = decode(kv.key(), kv.value())?;
        out.push(JobInfo {
            id: JobId(job.id),
            priority: header.priority,
            ready_at: from_micros(job.ready_us),
            enqueued_at: millis(header.enqueued_ms),
            attempts: header.attempts(kv.version()),
            last_error: header.last_error.clone(),
            payload,
        });
    }
    Ok(out)
}

/// Who holds which job.
pub(super) async fn claimed(session: &Arc<Session>, keys: &Keys) -> Result<Vec<ClaimInfo>, Error> {
    let (jobs, claims) = state(session, keys).await?;
    let mut out = Vec::new();
    for (id, claim) in claims {
        let job = jobs
            .iter()
            .find(|kv| keys.parse_job(kv.key()).is_some_and(|j| j.id == id));
        let attempt = match job {
            Some(kv) => decode(kv.key(), kv.value())?.0.attempts(kv.version()),
            None => 0, // acknowledged between the two reads' keys: cannot happen at one revision
        };
        out.push(ClaimInfo {
            id: JobId(id),
            lease_id: claim.lease(),
            fencing_token: claim.create_revision(),
            attempt,
        });
    }
    Ok(out)
}

/// The dead letters, by id.
pub(super) async fn dead_letters(
    session: &Arc<Session>,
    keys: &Keys,
) -> Result<Vec<DeadLetter>, Error> {
    let (dead, _) = read_all(session, &keys.dead(), 0).await?;
    dead.iter()
        .map(|kv| {
            let (h, payload) = decode(kv.key(), kv.value())?;
            Ok(DeadLetter {
                id: JobId(h.id.clone()),
                priority: h.priority,
                attempts: h.attempts_base,
                last_error: h.last_error.clone().unwrap_or_default(),
                enqueued_at: millis(h.enqueued_ms),
                dead_at: millis(h.dead_ms.unwrap_or_default()),
                payload,
            })
        })
        .collect()
}
