//! What a queue and an enqueue can be asked for, and the checks that turn bad input into
//! [`Error::InvalidArgument`] before anything is sent.

use std::time::{Duration, SystemTime};

use super::layout::{MAX_IDEMPOTENCY_KEY_LEN, MAX_PAYLOAD_LEN, MAX_PRIORITY};
use crate::{Error, MAX_LEASE_TTL_SECS};

/// How a [`WorkQueue`](super::WorkQueue) handle delivers and deduplicates. Every handle on one
/// queue should use the same options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueOptions {
    pub(super) max_attempts: u32,
    pub(super) dedup_window: Duration,
}

impl Default for QueueOptions {
    fn default() -> QueueOptions {
        QueueOptions::new()
    }
}

impl QueueOptions {
    /// The defaults: at most 5 deliveries of a job, idempotency keys remembered for at least
    /// 5 minutes.
    pub fn new() -> QueueOptions {
        QueueOptions {
            max_attempts: 5,
            dedup_window: Duration::from_secs(300),
        }
    }

    /// A job is delivered at most `n` times; a claim that would be delivery `n + 1` moves it
    /// to the dead letters instead (with the error that ended delivery `n`). At least 1.
    pub fn with_max_attempts(mut self, n: u32) -> QueueOptions {
        self.max_attempts = n;
        self
    }

    /// How long an enqueue's marker (its idempotency key, or its job's id) is kept at least —
    /// an enqueue repeated within it adds nothing — and at most twice as long. Whole seconds,
    /// at least 1 s; twice the window may not exceed etcd's longest lease TTL.
    pub fn with_dedup_window(mut self, window: Duration) -> QueueOptions {
        self.dedup_window = window;
        self
    }

    /// The most deliveries of one job.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The deduplication window.
    pub fn dedup_window(&self) -> Duration {
        self.dedup_window
    }

    /// The window in whole seconds, or why the options are not acceptable.
    pub(super) fn validate(&self) -> Result<i64, Error> {
        if self.max_attempts == 0 {
            return Err(Error::InvalidArgument(
                "work queue: max_attempts must be at least 1".into(),
            ));
        }
        let secs = self.dedup_window.as_secs();
        if secs == 0 || self.dedup_window.subsec_nanos() != 0 {
            return Err(Error::InvalidArgument(format!(
                "work queue: the dedup window must be whole seconds, at least 1 (got {:?})",
                self.dedup_window
            )));
        }
        match i64::try_from(secs) {
            Ok(window) if secs.saturating_mul(2) <= MAX_LEASE_TTL_SECS => Ok(window),
            _ => Err(Error::InvalidArgument(format!(
                "work queue: twice the dedup window ({secs} s) exceeds etcd's longest lease \
                 ({MAX_LEASE_TTL_SECS} s)"
            ))),
        }
    }
}

/// How one job is enqueued: its priority, when it may be claimed first, and an idempotency
/// key. See [`WorkQueue::enqueue_with`](super::WorkQueue::enqueue_with).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnqueueOptions {
    pub(super) priority: u8,
    pub(super) not_before: Option<SystemTime>,
    pub(super) idempotency_key: Option<String>,
}

impl EnqueueOptions {
    /// Priority 0, ready at once, no idempotency key.
    pub fn new() -> EnqueueOptions {
        EnqueueOptions::default()
    }

    /// Jobs of a higher priority are claimed first: 0 (the default, lowest) to
    /// [`MAX_PRIORITY`](super::MAX_PRIORITY).
    pub fn with_priority(mut self, priority: u8) -> EnqueueOptions {
        self.priority = priority;
        self
    }

    /// Not claimed before `t` (on the claimers' clocks). Among ready jobs of one priority, the
    /// one that became ready first is claimed first.
    pub fn with_not_before(mut self, t: SystemTime) -> EnqueueOptions {
        self.not_before = Some(t);
        self
    }

    /// Not claimed before `delay` from now.
    pub fn with_delay(self, delay: Duration) -> EnqueueOptions {
        let t = SystemTime::now()
            .checked_add(delay)
            .unwrap_or(SystemTime::UNIX_EPOCH + Duration::from_secs(u32::MAX.into()));
        self.with_not_before(t)
    }

    /// An enqueue with the key of an enqueue made within the queue's dedup window adds
    /// nothing and returns the first one's job id — whether that job is still queued, claimed,
    /// acknowledged or a dead letter. 1 to 512 bytes, no control characters.
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> EnqueueOptions {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Why these options or `payload_len` are not acceptable, if they are not.
    pub(super) fn validate(&self, payload_len: usize) -> Result<(), Error> {
        let bad = |why: String| Err(Error::InvalidArgument(format!("work queue: {why}")));
        if payload_len > MAX_PAYLOAD_LEN {
            return bad(format!(
                "a payload of {payload_len} bytes exceeds the limit of {MAX_PAYLOAD_LEN} \
                 (etcd's default request limit, less room for keys and header)"
            ));
        }
        if self.priority > MAX_PRIORITY {
            return bad(format!(
                "priority {} is out of range (0 to {MAX_PRIORITY})",
                self.priority
            ));
        }
        if let Some(key) = &self.idempotency_key {
            if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN {
                return bad(format!(
                    "an idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} bytes (got {})",
                    key.len()
                ));
            }
            if key.chars().any(char::is_control) {
                return bad(format!(
                    "idempotency key {key:?} contains a control character"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_options_are_invalid_arguments() {
        let invalid = |r: Result<(), Error>| matches!(r, Err(Error::InvalidArgument(_)));
        assert!(invalid(EnqueueOptions::new().validate(MAX_PAYLOAD_LEN + 1)));
        assert!(EnqueueOptions::new().validate(MAX_PAYLOAD_LEN).is_ok());
        assert!(invalid(
            EnqueueOptions::new()
                .with_priority(MAX_PRIORITY + 1)
                .validate(0)
        ));
        assert!(EnqueueOptions::new()
            .with_priority(MAX_PRIORITY)
            .validate(0)
            .is_ok());
        for key in [
            String::new(),
            "x".repeat(MAX_IDEMPOTENCY_KEY_LEN + 1),
            "a\nb".into(),
        ] {
            assert!(invalid(
                EnqueueOptions::new().with_idempotency_key(key).validate(0)
            ));
        }
        let q = |o: QueueOptions| matches!(o.validate(), Err(Error::InvalidArgument(_)));
        assert!(q(QueueOptions::new().with_max_attempts(0)));
        assert!(q(QueueOptions::new().with_dedup_window(Duration::ZERO)));
        assert!(q(
            QueueOptions::new().with_dedup_window(Duration::from_millis(1500))
        ));
        assert!(q(
            QueueOptions::new().with_dedup_window(Duration::from_secs(MAX_LEASE_TTL_SECS))
        ));
        assert_eq!(QueueOptions::new().validate().unwrap(), 300);
    }

    #[test]
    fn a_delay_too_large_for_the_clock_saturates() {
        let o = EnqueueOptions::new().with_delay(Duration::MAX);
        assert!(o.not_before.is_some());
    }
}
