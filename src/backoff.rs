//! Jittered exponential backoff for retries (stream re-opens, clean-ups, re-reads).

use std::time::Duration;

use rand::Rng;

/// Delays that double from `min` up to `max`, each drawn uniformly from `[d/2, d]` ("equal
/// jitter") so that many clients recovering from one fault do not retry in lock-step.
/// Arithmetic saturates (any `Duration` is accepted), and `min` is at least 1 ms, so a
/// backoff can never spin.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        let min = min.max(Backoff::FLOOR);
        let max = max.max(min);
        Backoff {
            min,
            max,
            current: min,
        }
    }

    /// The shortest delay any backoff waits.
    pub(crate) const FLOOR: Duration = Duration::from_millis(1);

    /// The default for retrying requests: 20 ms doubling to 1 s.
    pub(crate) fn for_requests() -> Backoff {
        Backoff::new(Duration::from_millis(20), Duration::from_secs(1))
    }

    /// The next delay.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        let half = d / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    /// Back to the shortest delay, after a success.
    pub(crate) fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn delays_stay_within_half_and_full_of_a_doubling_capped_step(min_ms in 1u64..200, factor in 1u64..50, n in 1usize..30) {
            let min = Duration::from_millis(min_ms);
            let max = min * factor as u32;
            let mut b = Backoff::new(min, max);
            let mut step = min;
            for _ in 0..n {
                let d = b.next_delay();
                prop_assert!(d >= step / 2 && d <= step, "{d:?} outside [{:?}, {step:?}]", step / 2);
                step = (step * 2).min(max);
            }
            b.reset();
            prop_assert!(b.next_delay() <= min);
        }

        #[test]
        fn extreme_bounds_saturate_and_never_spin(min_s in prop_oneof![Just(0u64), Just(u64::MAX)], max_s in prop_oneof![Just(0u64), Just(u64::MAX)], n in 1usize..70) {
            let mut b = Backoff::new(Duration::from_secs(min_s), Duration::from_secs(max_s));
            for _ in 0..n {
                let d = b.next_delay();
                prop_assert!(d >= Backoff::FLOOR / 2, "{d:?} is a spin");
            }
        }
    }
}
