//! Figures: percentiles, rounding, memory, the hand-off clock, the one line of output.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

/// Milliseconds of `d`, rounded to 3 decimals.
pub(crate) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Nearest-rank percentile, as the peer computes it.
pub(crate) fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((p / 100.0 * sorted.len() as f64) + 0.999_999_999) as usize;
    ms(sorted[idx.saturating_sub(1).min(sorted.len() - 1)])
}

pub(crate) fn round3(f: f64) -> f64 {
    (f * 1000.0).round() / 1000.0
}

/// The resident set size of this process, in bytes.
pub(crate) fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

pub(crate) struct Run {
    pub(crate) lats: Vec<Duration>,
    pub(crate) hands: Vec<Duration>,
    pub(crate) total: Duration,
    pub(crate) extra: Vec<(&'static str, serde_like::Value)>,
}

/// Just enough JSON for one flat line.
pub(crate) mod serde_like {
    #[derive(Debug, Clone)]
    pub(crate) enum Value {
        Num(f64),
        Int(u64),
        Bool(bool),
    }
    impl std::fmt::Display for Value {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Value::Num(x) => write!(f, "{x}"),
                Value::Int(x) => write!(f, "{x}"),
                Value::Bool(x) => write!(f, "{x}"),
            }
        }
    }
}
pub(crate) use serde_like::Value;

pub(crate) fn split(m: usize, n: usize, i: usize) -> usize {
    m / n + usize::from(i < m % n)
}

/// A shared "previous release started at" clock for hand-off times (nanoseconds since start).
pub(crate) struct HandoffClock {
    start: Instant,
    last_release: AtomicI64,
}

impl HandoffClock {
    pub(crate) fn new() -> HandoffClock {
        HandoffClock {
            start: Instant::now(),
            last_release: AtomicI64::new(-1),
        }
    }
    pub(crate) fn acquired(&self, at: Instant) -> Option<Duration> {
        let lr = self.last_release.load(Ordering::SeqCst);
        (lr >= 0).then(|| (at - self.start).saturating_sub(Duration::from_nanos(lr as u64)))
    }
    pub(crate) fn releasing(&self) {
        self.last_release
            .store(self.start.elapsed().as_nanos() as i64, Ordering::SeqCst);
    }
}

pub(crate) fn boxed(e: etcd_coord::Error) -> etcd_client::Error {
    etcd_client::Error::InvalidArgs(e.to_string())
}
