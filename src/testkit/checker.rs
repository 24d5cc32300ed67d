//! A safety checker for lock-like primitives, after Jepsen's lock checker: record what every
//! client believed and did, then verify the history.
//!
//! Record, from one process (one monotonic clock):
//! - [`History::acquired`] when an acquisition returned, with its fencing token and lease;
//! - [`History::ended`] when the client stopped believing it holds (its `lost()` fired, or it
//!   released);
//! - [`History::write`] for every write through the protected resource, and whether the
//!   resource accepted it;
//! - [`History::lease_gone`] when the server side observed a lease end (e.g. an observer saw its
//!   keys deleted).
//!
//! [`History::check`] then verifies:
//! - (a) fencing tokens strictly increase across successive holders;
//! - (b) no two "believes it holds" intervals overlap;
//! - (c) every write with a stale token (lower than one the resource already accepted) was
//!   rejected;
//! - (d) no acquisition succeeded after its session's lease was already gone.
//!
//! [`FencedRegister`] is an in-memory protected resource that rejects tokens lower than the
//! highest it has seen.

use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One recorded event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An acquisition returned to `client`.
    Acquired {
        /// Who.
        client: usize,
        /// Its fencing token.
        token: i64,
        /// The session's lease.
        lease: i64,
        /// When (monotonic).
        at: Instant,
    },
    /// `client` stopped believing it holds `token`.
    Ended {
        /// Who.
        client: usize,
        /// The token it held.
        token: i64,
        /// When.
        at: Instant,
    },
    /// `client` wrote through the protected resource with `token`.
    Write {
        /// Who.
        client: usize,
        /// The token it wrote with.
        token: i64,
        /// Whether the resource accepted the write.
        accepted: bool,
        /// When the write was applied (or rejected).
        at: Instant,
    },
    /// The server side observed that `lease` had ended.
    LeaseGone {
        /// The lease.
        lease: i64,
        /// When it was observed.
        at: Instant,
    },
}

/// A violation found by [`History::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which property: `"a"`, `"b"`, `"c"` or `"d"` (see the module docs).
    pub property: &'static str,
    /// What happened.
    pub detail: String,
}

/// A thread-safe recorder of [`Event`]s (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct History {
    events: Arc<Mutex<Vec<Event>>>,
}

impl History {
    /// An empty history.
    pub fn new() -> History {
        History::default()
    }

    fn push(&self, e: Event) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(e);
    }

    /// Records an acquisition that returned now.
    pub fn acquired(&self, client: usize, token: i64, lease: i64) {
        self.push(Event::Acquired {
            client,
            token,
            lease,
            at: Instant::now(),
        });
    }

    /// Records that `client` stopped believing it holds `token`, now.
    pub fn ended(&self, client: usize, token: i64) {
        self.push(Event::Ended {
            client,
            token,
            at: Instant::now(),
        });
    }

    /// Records a write through the protected resource, now.
    pub fn write(&self, client: usize, token: i64, accepted: bool) {
        self.push(Event::Write {
            client,
            token,
            accepted,
            at: Instant::now(),
        });
    }

    /// Records that the server side observed `lease` ended, now.
    pub fn lease_gone(&self, lease: i64) {
        self.push(Event::LeaseGone {
            lease,
            at: Instant::now(),
        });
    }

    /// Records an arbitrary event (e.g. a hand-made history in a test).
    pub fn record(&self, e: Event) {
        self.push(e);
    }

    /// A copy of the events so far.
    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Checks properties (a)–(d); returns every violation found (empty: the history is safe).
    pub fn check(&self) -> Vec<Violation> {
        check(&self.events())
    }
}

fn at(e: &Event) -> Instant {
    match e {
        Event::Acquired { at, .. }
        | Event::Ended { at, .. }
        | Event::Write { at, .. }
        | Event::LeaseGone { at, .. } => *at,
    }
}

/// The "believes it holds" intervals: (client, token, lease, start, end or None if still held).
fn intervals(events: &[Event]) -> Vec<(usize, i64, i64, Instant, Option<Instant>)> {
    let mut out: Vec<(usize, i64, i64, Instant, Option<Instant>)> = Vec::new();
    for e in events {
        match e {
            Event::Acquired {
                client,
                token,
                lease,
                at,
            } => out.push((*client, *token, *lease, *at, None)),
            Event::Ended { client, token, at } => {
                if let Some(iv) = out
                    .iter_mut()
                    .rev()
                    .find(|iv| iv.0 == *client && iv.1 == *token && iv.4.is_none())
                {
                    iv.4 = Some(*at);
                }
            }
            _ => {}
        }
    }
    out
}

/// Checks a history (events in any order; they are sorted by time).
pub fn check(events: &[Event]) -> Vec<Violation> {
    let mut events = events.to_vec();
    events.sort_by_key(at);
    let mut violations = Vec::new();
    let mut v = |property, detail: String| violations.push(Violation { property, detail });
    let ivs = intervals(&events);

    // (a) tokens strictly increase across successive holders.
    for w in ivs.windows(2) {
        if w[1].1 <= w[0].1 {
            v(
                "a",
                format!(
                    "client {} acquired token {} after client {} had acquired token {}",
                    w[1].0, w[1].1, w[0].0, w[0].1
                ),
            );
        }
    }
    // (b) no two intervals overlap (an interval still open runs to the end of the history).
    for (i, a) in ivs.iter().enumerate() {
        for b in &ivs[i + 1..] {
            let a_end = a.4;
            let overlaps = match a_end {
                None => true,
                Some(end) => b.3 < end,
            };
            if overlaps {
                v("b", format!(
                    "client {} (token {}) acquired while client {} (token {}) still believed it held",
                    b.0, b.1, a.0, a.1
                ));
            }
        }
    }
    // (c) stale writes rejected; accepted writes within their holder's interval.
    let mut highest: Option<i64> = None;
    for e in &events {
        if let Event::Write {
            client,
            token,
            accepted,
            ..
        } = e
        {
            if *accepted {
                if highest.is_some_and(|h| *token < h) {
                    v("c", format!("client {client}'s write with stale token {token} was accepted (highest accepted: {})", highest.unwrap_or(0)));
                }
                highest = Some(highest.map_or(*token, |h| h.max(*token)));
            }
        }
    }
    // (d) no acquisition after the session's lease was observed gone.
    for e in &events {
        if let Event::LeaseGone { lease, at: gone } = e {
            for iv in ivs.iter().filter(|iv| iv.2 == *lease && iv.3 > *gone) {
                v(
                    "d",
                    format!(
                        "client {} acquired token {} after its lease {lease:x} was gone",
                        iv.0, iv.1
                    ),
                );
            }
        }
    }
    violations
}

/// An in-memory protected resource: accepts a write only if its token is at least the highest
/// it has accepted. Pair it with [`History::write`].
#[derive(Debug, Clone, Default)]
pub struct FencedRegister {
    highest: Arc<Mutex<i64>>,
}

impl FencedRegister {
    /// An empty register.
    pub fn new() -> FencedRegister {
        FencedRegister::default()
    }

    /// Writes with `token`; `true` if accepted.
    pub fn write(&self, token: i64) -> bool {
        let mut h = self.highest.lock().unwrap_or_else(|e| e.into_inner());
        if token >= *h {
            *h = token;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn t0() -> Instant {
        Instant::now()
    }

    fn ms(base: Instant, n: u64) -> Instant {
        base + Duration::from_millis(n)
    }

    #[test]
    fn a_safe_history_passes() {
        let b = t0();
        let h = [
            Event::Acquired {
                client: 1,
                token: 10,
                lease: 1,
                at: ms(b, 0),
            },
            Event::Write {
                client: 1,
                token: 10,
                accepted: true,
                at: ms(b, 1),
            },
            Event::Ended {
                client: 1,
                token: 10,
                at: ms(b, 2),
            },
            Event::Acquired {
                client: 2,
                token: 12,
                lease: 2,
                at: ms(b, 3),
            },
            Event::Write {
                client: 1,
                token: 10,
                accepted: false,
                at: ms(b, 4),
            },
            Event::Write {
                client: 2,
                token: 12,
                accepted: true,
                at: ms(b, 5),
            },
            Event::Ended {
                client: 2,
                token: 12,
                at: ms(b, 6),
            },
        ];
        assert_eq!(check(&h), vec![]);
    }

    #[test]
    fn overlapping_holders_are_caught() {
        let b = t0();
        let h = [
            Event::Acquired {
                client: 1,
                token: 10,
                lease: 1,
                at: ms(b, 0),
            },
            Event::Acquired {
                client: 2,
                token: 12,
                lease: 2,
                at: ms(b, 1),
            },
            Event::Ended {
                client: 1,
                token: 10,
                at: ms(b, 2),
            },
        ];
        let found = check(&h);
        assert!(found.iter().any(|v| v.property == "b"), "{found:?}");
    }

    #[test]
    fn a_token_that_does_not_increase_is_caught() {
        let b = t0();
        let h = [
            Event::Acquired {
                client: 1,
                token: 12,
                lease: 1,
                at: ms(b, 0),
            },
            Event::Ended {
                client: 1,
                token: 12,
                at: ms(b, 1),
            },
            Event::Acquired {
                client: 2,
                token: 10,
                lease: 2,
                at: ms(b, 2),
            },
        ];
        assert!(check(&h).iter().any(|v| v.property == "a"));
    }

    #[test]
    fn an_accepted_stale_write_is_caught() {
        let b = t0();
        let h = [
            Event::Acquired {
                client: 1,
                token: 10,
                lease: 1,
                at: ms(b, 0),
            },
            Event::Ended {
                client: 1,
                token: 10,
                at: ms(b, 1),
            },
            Event::Acquired {
                client: 2,
                token: 12,
                lease: 2,
                at: ms(b, 2),
            },
            Event::Write {
                client: 2,
                token: 12,
                accepted: true,
                at: ms(b, 3),
            },
            Event::Write {
                client: 1,
                token: 10,
                accepted: true,
                at: ms(b, 4),
            },
        ];
        let found = check(&h);
        assert!(found.iter().any(|v| v.property == "c"), "{found:?}");
    }

    #[test]
    fn an_acquisition_after_the_lease_was_gone_is_caught() {
        let b = t0();
        let h = [
            Event::LeaseGone {
                lease: 7,
                at: ms(b, 0),
            },
            Event::Acquired {
                client: 1,
                token: 10,
                lease: 7,
                at: ms(b, 1),
            },
        ];
        assert!(check(&h).iter().any(|v| v.property == "d"));
    }

    #[test]
    fn the_register_rejects_lower_tokens() {
        let r = FencedRegister::new();
        assert!(r.write(5));
        assert!(r.write(5));
        assert!(!r.write(4));
        assert!(r.write(9));
        assert!(!r.write(5));
    }
}
