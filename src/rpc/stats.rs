//! Counters of what a handle sent and received.

use std::sync::atomic::{AtomicU64, Ordering};

/// What was sent and received through one [`Rpc`](super::Rpc) (a session's, for
/// [`SessionMetrics`](crate::SessionMetrics)).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) keepalive_requests: AtomicU64,
    pub(crate) txns: AtomicU64,
    pub(crate) ranges: AtomicU64,
    pub(crate) watches: AtomicU64,
    pub(crate) watch_streams: AtomicU64,
    pub(crate) watch_events: AtomicU64,
    pub(crate) watch_probes: AtomicU64,
    pub(crate) mirrored: AtomicU64,
}

impl Stats {
    /// Adds `n` to `counter`.
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The value of `counter` now.
    pub(crate) fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
