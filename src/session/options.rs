//! [`SessionOptions`]: what a session asks for, checked before anything is sent.

use std::time::Duration;

use crate::Error;
#[cfg(doc)]
use crate::{LeasedSession, SessionState};

/// etcd's largest lease TTL (`MaxLeaseTTL`), in seconds.
pub const MAX_LEASE_TTL_SECS: u64 = 9_000_000_000;

/// Options for [`LeasedSession::new`], as `with_*` builders. `Default` equals [`new()`](Self::new).
///
/// ```
/// use std::time::Duration;
/// use etcd_coord::SessionOptions;
///
/// let options = SessionOptions::new()
///     .with_ttl(Duration::from_secs(5))
///     .with_safety_margin(Duration::from_secs(1));
/// assert_eq!(options.ttl(), Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionOptions {
    ttl: Duration,
    pub(super) safety_margin: Option<Duration>,
    pub(super) keepalive_timeout: Option<Duration>,
    pub(super) request_timeout: Duration,
    pub(super) adoption_window: Option<Duration>,
    pub(super) linger: Duration,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions::new()
    }
}

impl SessionOptions {
    /// TTL 10 s; safety margin and refresh timeout each a fifth of the granted TTL; request
    /// timeout 5 s.
    pub fn new() -> SessionOptions {
        SessionOptions {
            ttl: Duration::from_secs(10),
            safety_margin: None,
            keepalive_timeout: None,
            request_timeout: Duration::from_secs(5),
            adoption_window: None,
            linger: Duration::from_millis(2),
        }
    }

    /// The lease TTL to request (rounded up to whole seconds; etcd may grant more: its
    /// minimum is about 2 s, and [`LeasedSession::ttl`] reports what was granted). Must be
    /// more than zero and at most [`MAX_LEASE_TTL_SECS`].
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long before the server could possibly expire the lease the session declares
    /// itself [`Lost`](SessionState::Lost): the holder's time to stop acting on what it holds,
    /// plus any difference between the client's and the server's clock rates. Default: a
    /// fifth of the granted TTL. Must be less than half the TTL.
    pub fn with_safety_margin(mut self, margin: Duration) -> Self {
        self.safety_margin = Some(margin);
        self
    }

    /// How long one lease refresh may go unanswered before the session counts it as failed
    /// (and becomes [`Suspended`](SessionState::Suspended)). Default: a fifth of the granted
    /// TTL. Must be more than zero and at most a third of the TTL (the refresh interval).
    pub fn with_keepalive_timeout(mut self, timeout: Duration) -> Self {
        self.keepalive_timeout = Some(timeout);
        self
    }

    /// The deadline of each request the session and its primitives send (grant, revoke,
    /// acquire, release, …). Default 5 s. Must be more than zero; any larger value is accepted
    /// (arithmetic on it saturates).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// For [`LeasedSession::resume`] only: how long after it returns the keys already on the
    /// lease — the earlier process's — may still be taken back by a guard's `resume`. Once it
    /// is over, the session deletes every one of them that no guard of it took back (see
    /// [`LeasedSession::resume`]). Default: the lease's TTL — as long as the key would have
    /// lived had nobody resumed the lease. Any value is accepted; `Duration::MAX` keeps them
    /// until they are taken back (keys that land on the lease later without this session
    /// having put them are deleted all the same).
    pub fn with_adoption_window(mut self, window: Duration) -> Self {
        self.adoption_window = Some(window);
        self
    }

    /// How long an acquisition's enqueue (a `lock()`, `acquire()`, `campaign()`, …) may wait,
    /// while sibling sessions ([`LeasedSession::sibling`]) have members in the same queue —
    /// waiting or holding — that block it, as many as it has permits (so that it will wait
    /// anyway), for a write of a sibling (a release, most likely) to go in the same Txn, one
    /// raft entry for both. It goes at once when such a write is sent, or when this is up; an
    /// enqueue that siblings do not block (no sibling in its queue, a free permit, a read lock
    /// among readers) never waits. Default 2 ms; zero never waits. See `docs/design.md`,
    /// "Siblings' writes in one Txn".
    pub fn with_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// How long an enqueue may wait for a sibling's write ([`with_linger`](Self::with_linger)).
    pub fn linger(&self) -> Duration {
        self.linger
    }

    /// The adoption window asked for, if any (`None`: the lease's TTL).
    pub fn adoption_window(&self) -> Option<Duration> {
        self.adoption_window
    }

    /// The requested TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The request timeout.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// The TTL in whole seconds, or why it is not acceptable.
    fn ttl_secs(&self) -> Result<i64, Error> {
        if self.ttl.is_zero() {
            return Err(Error::InvalidArgument("TTL must be more than zero".into()));
        }
        let secs = self
            .ttl
            .as_secs()
            .saturating_add(u64::from(self.ttl.subsec_nanos() > 0));
        if secs > MAX_LEASE_TTL_SECS {
            return Err(Error::InvalidArgument(format!(
                "TTL of {secs} s exceeds etcd's maximum of {MAX_LEASE_TTL_SECS} s"
            )));
        }
        Ok(secs as i64)
    }

    /// Checks everything that can be checked before the grant.
    pub(crate) fn validate(&self) -> Result<i64, Error> {
        let secs = self.ttl_secs()?;
        self.validate_for(Duration::from_secs(secs as u64))?;
        Ok(secs)
    }

    /// Checks the margin and timeouts against a lease of TTL `requested` (for a resumed
    /// lease: the TTL it was granted with).
    pub(crate) fn validate_for(&self, requested: Duration) -> Result<(), Error> {
        if let Some(margin) = self.safety_margin {
            if margin >= requested / 2 {
                return Err(Error::InvalidArgument(format!(
                    "safety margin {margin:?} must be less than half the TTL ({requested:?})"
                )));
            }
        }
        if let Some(t) = self.keepalive_timeout {
            if t.is_zero() || t > requested / 3 {
                return Err(Error::InvalidArgument(format!(
                    "keepalive timeout {t:?} must be more than zero and at most a third of the TTL ({requested:?})"
                )));
            }
        }
        if self.request_timeout.is_zero() {
            return Err(Error::InvalidArgument(
                "request timeout must be more than zero".into(),
            ));
        }
        Ok(())
    }
}
