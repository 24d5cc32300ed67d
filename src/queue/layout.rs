//! Where a work queue's keys go and what they hold, without I/O.
//!
//! Under the queue's prefix `N/#queue/`:
//!
//! * `jobs/<rank>/<ready µs, 17 digits>-<id>` — a job, no lease. `rank` is
//!   `MAX_PRIORITY − priority` (one digit), so a range read in key order — etcd's cheap order,
//!   which honours a limit — returns the highest priority first and, within it, the job that
//!   became ready first. Value: a JSON [`Header`], a newline, the payload.
//! * `claims/<id>` — the claim of a job, under the claimer's lease; its create revision is the
//!   fencing token. Value: a value unique to the claim attempt.
//! * `dead/<id>` — a dead letter: the job's header (with its last error) and payload.
//! * `ids/k/<idempotency key>` and `ids/j/<id>` — the marker an enqueue puts with its job, under
//!   a lease that outlives the deduplication window; its value is the job's id.
//! * `w<lease>-<n>` — the line of idle claimers (the engine's queue keys, one permit).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::keys::{Layout, Named, Queue};
use crate::Error;

/// The kind of the queue's keys under its name: `N/#queue/`.
pub(super) const KIND: &str = "queue";

/// The kind of the idle claimers' line keys (`N/#queue/w…`).
pub(super) const IDLE: &str = "w";

/// The highest priority a job may have; 0 is the lowest (and the default).
pub const MAX_PRIORITY: u8 = 9;

/// The largest payload accepted, in bytes: etcd's default request limit
/// (`--max-request-bytes`, 1.5 MiB) less room for the keys and header of the requests that
/// carry a job.
pub const MAX_PAYLOAD_LEN: usize = 1_572_864 - 16 * 1024;

/// The longest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 512;

/// A job's id: 16 hex digits, unique within its queue, kept across redeliveries.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub(super) String);

impl JobId {
    /// A new random id.
    pub(super) fn random() -> JobId {
        JobId(format!("{:016x}", rand::random::<u64>()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The keys of one queue.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    queue: Queue,
    prefix: String,
}

/// What a job key says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct JobKey {
    pub(super) rank: u8,
    pub(super) ready_us: u64,
    pub(super) id: String,
}

impl Keys {
    /// The keys of the queue named by `named`, or why its name is not acceptable.
    pub(super) fn of(named: &Named) -> Result<Keys, Error> {
        let queue = named.queue()?.clone();
        let prefix = queue.prefix().to_owned();
        Ok(Keys { queue, prefix })
    }

    /// A name's `Named` in this layout.
    pub(super) fn named(name: String) -> Named {
        Named::new(name, Layout::Own(KIND))
    }

    /// The engine's queue (for the idle claimers' line).
    pub(super) fn queue(&self) -> &Queue {
        &self.queue
    }

    pub(super) fn jobs(&self) -> String {
        format!("{}jobs/", self.prefix)
    }

    /// The start of the jobs of `rank` and below in priority (`rank` ≥ 10: past every job).
    pub(super) fn jobs_from_rank(&self, rank: u8) -> String {
        if rank > MAX_PRIORITY {
            String::from_utf8_lossy(&crate::keys::prefix_end(self.jobs().as_bytes())).into_owned()
        } else {
            format!("{}jobs/{rank}/", self.prefix)
        }
    }

    pub(super) fn job(&self, priority: u8, ready_us: u64, id: &JobId) -> String {
        format!(
            "{}jobs/{}/{ready_us:017}-{}",
            self.prefix,
            MAX_PRIORITY - priority,
            id.0
        )
    }

    pub(super) fn parse_job(&self, key: &[u8]) -> Option<JobKey> {
        let rest = std::str::from_utf8(key).ok()?.strip_prefix(&self.jobs())?;
        let (rank, rest) = rest.split_once('/')?;
        let (ready, id) = rest.split_once('-')?;
        let rank: u8 = rank.parse().ok().filter(|r| *r <= MAX_PRIORITY)?;
        Some(JobKey {
            rank,
            ready_us: ready.parse().ok()?,
            id: id.to_owned(),
        })
    }

    pub(super) fn claims(&self) -> String {
        format!("{}claims/", self.prefix)
    }

    pub(super) fn claim(&self, id: &str) -> String {
        format!("{}claims/{id}", self.prefix)
    }

    pub(super) fn dead(&self) -> String {
        format!("{}dead/", self.prefix)
    }

    pub(super) fn dead_letter(&self, id: &str) -> String {
        format!("{}dead/{id}", self.prefix)
    }

    /// The marker of an enqueue: by its idempotency key, else by its job's id.
    pub(super) fn marker(&self, idempotency_key: Option<&str>, id: &JobId) -> String {
        match idempotency_key {
            Some(k) => format!("{}ids/k/{k}", self.prefix),
            None => format!("{}ids/j/{}", self.prefix, id.0),
        }
    }

    /// The prefix of the idle claimers' line keys.
    pub(super) fn idle(&self) -> String {
        self.queue.sub(IDLE)
    }
}

/// What a job's value holds besides its payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Header {
    pub(super) id: String,
    pub(super) priority: u8,
    /// When it was enqueued (ms since the Unix epoch, the producer's clock).
    pub(super) enqueued_ms: u64,
    /// Deliveries counted before the job's key was last written…
    pub(super) attempts_base: u32,
    /// …at this version of the key: every claim bumps the version by one.
    pub(super) version_base: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) last_error: Option<String>,
    /// The delivery `last_error` was reported for.
    #[serde(default)]
    pub(super) last_error_attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) idempotency_key: Option<String>,
    /// When it became a dead letter (ms since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) dead_ms: Option<u64>,
}

impl Header {
    /// The deliveries so far, for a job key at `version`.
    pub(super) fn attempts(&self, version: i64) -> u32 {
        let since = u32::try_from(version.saturating_sub(self.version_base)).unwrap_or(0);
        self.attempts_base.saturating_add(since)
    }

    /// The error that ended delivery `attempt`: the one reported, or why there is none.
    pub(super) fn error_of(&self, attempt: u32) -> String {
        match &self.last_error {
            Some(e) if self.last_error_attempt == attempt => e.clone(),
            _ => format!(
                "delivery {attempt} ended without an ack or a nack \
                 (the claim was dropped, or the claimer's lease ended)"
            ),
        }
    }
}

/// A job's value: the header as JSON, a newline, the payload.
pub(super) fn encode(header: &Header, payload: &[u8]) -> Vec<u8> {
    // Serializing a struct of strings and numbers cannot fail.
    let mut value = serde_json::to_vec(header).unwrap_or_default();
    value.push(b'\n');
    value.extend_from_slice(payload);
    value
}

/// The header and payload of a job's value.
pub(super) fn decode(key: &[u8], value: &[u8]) -> Result<(Header, Vec<u8>), Error> {
    let bad = |why: String| {
        Error::Protocol(format!(
            "work queue key {} does not hold a job: {why}",
            String::from_utf8_lossy(key)
        ))
    };
    let split = value
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| bad("no header".into()))?;
    let header: Header =
        serde_json::from_slice(&value[..split]).map_err(|e| bad(format!("its header: {e}")))?;
    Ok((header, value[split + 1..].to_vec()))
}

/// Microseconds since the Unix epoch of `t` (0 before it).
pub(super) fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The time `us` microseconds after the Unix epoch.
pub(super) fn from_micros(us: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(us)
}

/// Milliseconds since the Unix epoch, now.
pub(super) fn now_ms() -> u64 {
    micros(SystemTime::now()) / 1000
}

/// The ready time of a job enqueued now with no later not-before time: strictly increasing
/// within this process, so one producer's jobs of one priority are claimed in the order it
/// enqueued them.
pub(super) fn ready_now() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = micros(SystemTime::now());
    let prev = LAST
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
            Some(now.max(last + 1))
        })
        .unwrap_or(0);
    now.max(prev + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys() -> Keys {
        Keys::of(&Keys::named("jobs/mail".into())).unwrap()
    }

    #[test]
    fn the_layout_nests_under_the_name_and_the_idle_line_is_its_own_range() {
        let k = keys();
        assert_eq!(k.jobs(), "jobs/mail/#queue/jobs/");
        assert_eq!(k.claim("ab"), "jobs/mail/#queue/claims/ab");
        assert_eq!(k.idle(), "jobs/mail/#queue/w");
        for other in [
            k.jobs(),
            k.claims(),
            k.dead(),
            k.marker(None, &JobId::random()),
        ] {
            assert!(!other.starts_with(&k.idle()), "{other}");
        }
    }

    proptest! {
        /// Key order is the claim order: higher priority first, then earlier ready time.
        #[test]
        fn key_order_is_priority_then_ready_time(
            p1 in 0..=MAX_PRIORITY, t1 in 0u64..10u64.pow(16),
            p2 in 0..=MAX_PRIORITY, t2 in 0u64..10u64.pow(16),
        ) {
            let k = keys();
            let (a, b) = (k.job(p1, t1, &JobId::random()), k.job(p2, t2, &JobId::random()));
            if (p1, t1) != (p2, t2) {
                let expected = (std::cmp::Reverse(p1), t1) < (std::cmp::Reverse(p2), t2);
                prop_assert_eq!(a < b, expected);
            }
            let parsed = k.parse_job(a.as_bytes()).unwrap();
            prop_assert_eq!((parsed.rank, parsed.ready_us), (MAX_PRIORITY - p1, t1));
            prop_assert!(a >= k.jobs_from_rank(parsed.rank));
            prop_assert!(a < k.jobs_from_rank(parsed.rank + 1));
        }

        #[test]
        fn a_value_decodes_to_what_was_encoded(payload in proptest::collection::vec(any::<u8>(), 0..64), err in proptest::option::of(".{0,20}")) {
            let h = Header {
                id: "0123456789abcdef".into(), priority: 3, enqueued_ms: 7, attempts_base: 2,
                version_base: 5, last_error: err, last_error_attempt: 2,
                idempotency_key: None, dead_ms: None,
            };
            let (back, p) = decode(b"k", &encode(&h, &payload)).unwrap();
            prop_assert_eq!(back, h);
            prop_assert_eq!(p, payload);
        }
    }

    #[test]
    fn attempts_count_the_claims_since_the_header_was_written() {
        let mut h = Header {
            id: "x".into(),
            priority: 0,
            enqueued_ms: 0,
            attempts_base: 0,
            version_base: 1,
            last_error: None,
            last_error_attempt: 0,
            idempotency_key: None,
            dead_ms: None,
        };
        assert_eq!(h.attempts(1), 0);
        assert_eq!(h.attempts(3), 2);
        h.attempts_base = 2;
        h.version_base = 4; // rewritten at version 4 after two claims
        assert_eq!(h.attempts(5), 3);
        assert!(h.error_of(3).contains("without an ack"));
        h.last_error = Some("boom".into());
        h.last_error_attempt = 3;
        assert_eq!(h.error_of(3), "boom");
    }

    #[test]
    fn ready_times_of_one_process_strictly_increase() {
        let (a, b, c) = (ready_now(), ready_now(), ready_now());
        assert!(a < b && b < c);
    }

    #[test]
    fn values_that_are_not_jobs_are_protocol_errors() {
        assert!(matches!(
            decode(b"k", b"no newline"),
            Err(Error::Protocol(_))
        ));
        assert!(matches!(
            decode(b"k", b"{bad}\npayload"),
            Err(Error::Protocol(_))
        ));
    }
}
