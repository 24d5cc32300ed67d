//! The session state machine, without I/O: when is a lease Alive, Suspended or Lost.
//!
//! The deadline is decided on our own monotonic clock: the time the last *acknowledged*
//! refresh was *sent*, plus the TTL it was granted, minus a safety margin. etcd expires a lease
//! TTL after the last refresh it *received*, which is never earlier than our send time, so the
//! deadline always falls before the server can expire the lease (by at least the margin, less
//! any difference in clock rates).

use std::time::Duration;

use tokio::time::Instant;

use crate::{LossReason, SessionState};

/// How many "lease not found" answers a lease that no refresh has acknowledged yet gets before
/// the session is Lost (etcd #13675: see [`Liveness::on_not_found`]).
pub(crate) const NOT_FOUND_BEFORE_FIRST_ACK: u32 = 5;

/// Alive / Suspended / Lost, and the deadline after which the lease may be gone.
#[derive(Debug, Clone)]
pub(crate) struct Liveness {
    margin: Duration,
    deadline: Instant,
    state: SessionState,
    reason: Option<LossReason>,
    /// A refresh was acknowledged with a TTL: etcd's leader has applied the grant.
    acked: bool,
    /// "Not found" answers before that.
    not_found: u32,
}

impl Liveness {
    /// A session whose grant request was sent at `grant_sent` and granted `ttl`.
    pub(crate) fn new(grant_sent: Instant, ttl: Duration, margin: Duration) -> Liveness {
        Liveness {
            margin,
            deadline: grant_sent + ttl.saturating_sub(margin),
            state: SessionState::Alive,
            reason: None,
            acked: false,
            not_found: 0,
        }
    }

    /// The current state.
    pub(crate) fn state(&self) -> SessionState {
        self.state
    }

    /// Why the session is Lost, once it is.
    pub(crate) fn reason(&self) -> Option<LossReason> {
        self.reason
    }

    /// The instant after which the lease may be gone on the server.
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    fn lose(&mut self, reason: LossReason) {
        if self.state != SessionState::Lost {
            self.state = SessionState::Lost;
            self.reason = Some(reason);
        }
    }

    /// Lost if `now` is at or past the deadline.
    pub(crate) fn on_tick(&mut self, now: Instant) {
        if now >= self.deadline {
            self.lose(LossReason::DeadlineExceeded);
        }
    }

    /// A refresh sent at `sent` was answered at `now` with `ttl` (zero: the lease is gone).
    pub(crate) fn on_ack(&mut self, sent: Instant, ttl: Duration, now: Instant) {
        self.on_tick(now);
        if self.state == SessionState::Lost {
            return;
        }
        if ttl.is_zero() {
            self.lose(LossReason::LeaseGone);
            return;
        }
        self.acked = true;
        self.deadline = self.deadline.max(sent + ttl.saturating_sub(self.margin));
        self.state = SessionState::Alive;
        self.on_tick(now);
    }

    /// A refresh failed or went unanswered at `now`.
    pub(crate) fn on_failure(&mut self, now: Instant) {
        self.on_tick(now);
        if self.state != SessionState::Lost {
            self.state = SessionState::Suspended;
        }
    }

    /// etcd said the lease does not exist.
    pub(crate) fn on_lease_gone(&mut self) {
        self.lose(LossReason::LeaseGone);
    }

    /// etcd answered a refresh at `now` with "lease not found". Lost — unless no refresh has
    /// been acknowledged since the grant: etcd before 3.5.3 (#13675) answers a refresh that
    /// reaches its leader before the leader has applied the grant (which another member
    /// answered) with "not found". Such a lease is Suspended and refreshed again, up to
    /// [`NOT_FOUND_BEFORE_FIRST_ACK`] times, within its deadline.
    pub(crate) fn on_not_found(&mut self, now: Instant) {
        if !self.acked && self.not_found < NOT_FOUND_BEFORE_FIRST_ACK {
            self.not_found += 1;
            self.on_failure(now);
        } else {
            self.on_lease_gone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Event {
        /// A refresh sent `rtt_ms` before it is answered, with `ttl_s` (0 = gone).
        Ack {
            rtt_ms: u64,
            ttl_s: u64,
        },
        Failure,
        Tick,
        LeaseGone,
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            6 => (0u64..3_000, prop_oneof![9 => Just(5u64), 1 => Just(0u64)])
                .prop_map(|(rtt_ms, ttl_s)| Event::Ack { rtt_ms, ttl_s }),
            3 => Just(Event::Failure),
            3 => Just(Event::Tick),
            1 => Just(Event::LeaseGone),
        ]
    }

    proptest! {
        /// Whatever happens, the state machine never claims more than the server grants:
        /// Alive/Suspended only strictly before the deadline, the deadline never later than
        /// the last acknowledged send + TTL − margin, Lost final with its first reason.
        #[test]
        fn state_machine_invariants(steps in proptest::collection::vec((0u64..2_500, event()), 1..60)) {
            let ttl = Duration::from_secs(5);
            let margin = Duration::from_millis(1_000);
            let start = Instant::now();
            let mut now = start;
            let mut live = Liveness::new(start, ttl, margin);
            let mut latest_ack_sent = start;
            let mut first_reason: Option<LossReason> = None;
            for (advance_ms, ev) in steps {
                now += Duration::from_millis(advance_ms);
                let before = live.state();
                let deadline_before = live.deadline();
                match ev {
                    Event::Ack { rtt_ms, ttl_s } => {
                        let sent = now.checked_sub(Duration::from_millis(rtt_ms)).unwrap_or(start).max(start);
                        live.on_ack(sent, Duration::from_secs(ttl_s), now);
                        if ttl_s > 0 && before != SessionState::Lost {
                            latest_ack_sent = latest_ack_sent.max(sent);
                            if now < deadline_before && now < sent + ttl - margin {
                                prop_assert_eq!(live.state(), SessionState::Alive,
                                    "a fresh ack revives a Suspended session");
                            }
                        }
                    }
                    Event::Failure => {
                        live.on_failure(now);
                        prop_assert_ne!(live.state(), SessionState::Alive);
                    }
                    Event::Tick => live.on_tick(now),
                    Event::LeaseGone => live.on_lease_gone(),
                }
                if before == SessionState::Lost {
                    prop_assert_eq!(live.state(), SessionState::Lost, "Lost is final");
                }
                if live.state() == SessionState::Lost {
                    let reason = live.reason();
                    prop_assert!(reason.is_some());
                    if let Some(first) = first_reason {
                        prop_assert_eq!(reason, Some(first), "the first loss reason sticks");
                    }
                    first_reason = reason;
                } else {
                    prop_assert!(now < live.deadline(), "not Lost at or past the deadline");
                    prop_assert!(live.reason().is_none());
                }
                prop_assert!(live.deadline() <= latest_ack_sent + ttl - margin,
                    "the deadline never passes the last acknowledged send + TTL - margin");
            }
        }
    }

    #[test]
    fn an_ack_extends_the_deadline_from_its_send_time_not_its_arrival() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let margin = Duration::from_secs(2);
        let mut live = Liveness::new(t0, ttl, margin);
        let sent = t0 + Duration::from_secs(3);
        live.on_ack(sent, ttl, sent + Duration::from_secs(1));
        assert_eq!(live.deadline(), sent + ttl - margin);
    }

    #[test]
    fn failures_suspend_until_the_deadline_then_lose() {
        let t0 = Instant::now();
        let mut live = Liveness::new(t0, Duration::from_secs(10), Duration::from_secs(2));
        live.on_failure(t0 + Duration::from_secs(4));
        assert_eq!(live.state(), SessionState::Suspended);
        live.on_ack(
            t0 + Duration::from_secs(5),
            Duration::from_secs(10),
            t0 + Duration::from_secs(5),
        );
        assert_eq!(live.state(), SessionState::Alive);
        live.on_failure(t0 + Duration::from_secs(13));
        assert_eq!(live.state(), SessionState::Lost);
        assert_eq!(live.reason(), Some(LossReason::DeadlineExceeded));
    }

    #[test]
    fn a_late_ack_cannot_revive_a_session_past_its_deadline() {
        let t0 = Instant::now();
        let mut live = Liveness::new(t0, Duration::from_secs(10), Duration::from_secs(2));
        live.on_ack(
            t0 + Duration::from_secs(1),
            Duration::from_secs(10),
            t0 + Duration::from_secs(30),
        );
        assert_eq!(live.state(), SessionState::Lost);
    }

    /// etcd #13675: a lease whose first refreshes find it "not found" (a leader that has not
    /// applied the grant yet) is Suspended and refreshed again, a few times, not Lost; once a
    /// refresh was acknowledged, "not found" is believed at once.
    #[test]
    fn a_lease_not_found_before_its_first_refresh_is_retried_a_few_times_then_believed() {
        let t0 = Instant::now();
        let mut live = Liveness::new(t0, Duration::from_secs(10), Duration::from_secs(2));
        for i in 0..NOT_FOUND_BEFORE_FIRST_ACK {
            live.on_not_found(t0 + Duration::from_millis(u64::from(i)));
            assert_eq!(live.state(), SessionState::Suspended, "answer {i}");
        }
        live.on_not_found(t0 + Duration::from_millis(10));
        assert_eq!(live.reason(), Some(LossReason::LeaseGone));

        let mut live = Liveness::new(t0, Duration::from_secs(10), Duration::from_secs(2));
        live.on_not_found(t0);
        live.on_ack(t0, Duration::from_secs(10), t0 + Duration::from_millis(5));
        assert_eq!(
            live.state(),
            SessionState::Alive,
            "the grant was applied after all"
        );
        live.on_not_found(t0 + Duration::from_millis(10));
        assert_eq!(
            live.reason(),
            Some(LossReason::LeaseGone),
            "after an ack: gone"
        );
    }

    #[test]
    fn ttl_zero_reply_means_the_lease_is_gone() {
        let t0 = Instant::now();
        let mut live = Liveness::new(t0, Duration::from_secs(10), Duration::from_secs(2));
        live.on_ack(t0, Duration::ZERO, t0);
        assert_eq!(live.reason(), Some(LossReason::LeaseGone));
    }
}
