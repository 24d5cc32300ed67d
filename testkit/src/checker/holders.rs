//! Properties (a), (b), (d) and (e): who believed it held, with which token, and when.

use std::time::Instant;

use super::{sorted, writes, Event, Mode, Property, Rules, Violation, PAUSE_GRACE};

/// One "believes it holds" interval.
#[derive(Debug, Clone, Copy)]
pub(super) struct Interval {
    pub client: usize,
    pub token: i64,
    pub lease: i64,
    pub mode: Mode,
    pub start: Instant,
    /// `None` while still held at the end of the history. A holder whose process was paused
    /// while it held, and that stopped believing within [`PAUSE_GRACE`] of being continued,
    /// ends when it was paused: what a frozen process believes it cannot act on, and its
    /// belief after waking is only as long as its threads take to see the clock.
    pub end: Option<Instant>,
    /// Whether `end` was moved to the start of a pause.
    pub paused: bool,
}

impl Interval {
    pub fn ended_before(&self, t: Instant) -> bool {
        self.end.is_some_and(|end| end <= t)
    }

    pub fn describe(&self) -> String {
        let mode = match self.mode {
            Mode::Exclusive => "",
            Mode::Shared => ", shared",
        };
        let paused = if self.paused { ", paused" } else { "" };
        format!(
            "client {} (token {}{mode}{paused})",
            self.client, self.token
        )
    }
}

/// The intervals of a history sorted by time, in acquisition order.
pub(super) fn intervals(events: &[Event]) -> Vec<Interval> {
    let mut out: Vec<Interval> = Vec::new();
    let mut pauses: Vec<(usize, Instant, Instant)> = Vec::new();
    for e in events {
        match e {
            Event::Acquired {
                client,
                token,
                lease,
                mode,
                at,
            } => out.push(Interval {
                client: *client,
                token: *token,
                lease: *lease,
                mode: *mode,
                start: *at,
                end: None,
                paused: false,
            }),
            Event::Ended { client, token, at } => {
                if let Some(iv) = out
                    .iter_mut()
                    .rev()
                    .find(|iv| iv.client == *client && iv.token == *token && iv.end.is_none())
                {
                    iv.end = Some(*at);
                }
            }
            Event::Paused { client, from, at } => pauses.push((*client, *from, *at)),
            _ => {}
        }
    }
    for iv in &mut out {
        let Some(end) = iv.end else { continue };
        let pause = pauses.iter().find(|(client, from, to)| {
            *client == iv.client && iv.start <= *from && *from <= end && end <= *to + PAUSE_GRACE
        });
        if let Some((_, from, _)) = pause {
            iv.end = Some(*from);
            iv.paused = true;
        }
    }
    out
}

/// Checks a lock's history (events in any order; they are sorted by time).
pub fn check(events: &[Event]) -> Vec<Violation> {
    check_with(events, Rules::lock())
}

/// Checks a history under `rules` (events in any order; they are sorted by time): properties
/// (a)–(e) of the module docs.
pub fn check_with(events: &[Event], rules: Rules) -> Vec<Violation> {
    let events = sorted(events);
    let ivs = intervals(&events);
    let mut violations = token_order(&ivs, rules);
    violations.extend(exclusion(&ivs, rules));
    violations.extend(writes::check_reported_writes(&events));
    violations.extend(after_lease_gone(&events, &ivs));
    violations.extend(passed_while_held(&events, &ivs));
    violations
}

/// (a) With one holder at a time, tokens strictly increase across successive exclusive
/// holders, and whoever starts after another ended (either exclusive) has the greater token.
/// With several permits, holders may return in any order: tokens are unique.
fn token_order(ivs: &[Interval], rules: Rules) -> Vec<Violation> {
    let mut v = Vec::new();
    if rules.holders > 1 {
        for (i, a) in ivs.iter().enumerate() {
            // A permit taken back by its own lease after it was let go is the same permit.
            let again = |b: &&Interval| b.lease == a.lease && a.ended_before(b.start);
            if let Some(b) = ivs[i + 1..]
                .iter()
                .find(|b| b.token == a.token && !again(b))
            {
                v.push(Violation::new(
                    Property::TokenOrder,
                    format!("{} and {} share a token", a.describe(), b.describe()),
                ));
            }
        }
        return v;
    }
    let exclusive: Vec<&Interval> = ivs.iter().filter(|i| i.mode == Mode::Exclusive).collect();
    for w in exclusive.windows(2) {
        // The same key taken back under its own lease, nobody in between: a resumed lock.
        let resumed = w[1].token == w[0].token && w[1].lease == w[0].lease;
        if w[1].token <= w[0].token && !resumed {
            v.push(Violation::new(
                Property::TokenOrder,
                format!(
                    "{} acquired after {} had acquired",
                    w[1].describe(),
                    w[0].describe()
                ),
            ));
        }
    }
    for (i, later) in ivs.iter().enumerate() {
        for earlier in &ivs[..i] {
            let mixed = earlier.mode != later.mode;
            if mixed && earlier.ended_before(later.start) && later.token <= earlier.token {
                v.push(Violation::new(
                    Property::TokenOrder,
                    format!(
                        "{} acquired after {} had ended",
                        later.describe(),
                        earlier.describe()
                    ),
                ));
            }
        }
    }
    v
}

/// (b) At no instant more than `holders` exclusive holders, nor an exclusive and a shared one
/// (an interval still open runs to the end of the history).
pub(super) fn exclusion(ivs: &[Interval], rules: Rules) -> Vec<Violation> {
    let mut v = Vec::new();
    for (i, b) in ivs.iter().enumerate() {
        let open: Vec<&Interval> = ivs[..i]
            .iter()
            .filter(|a| !a.ended_before(b.start) && a.start <= b.start)
            .collect();
        let exclusive = open.iter().filter(|a| a.mode == Mode::Exclusive).count();
        let clash = match b.mode {
            Mode::Exclusive => exclusive >= rules.holders || exclusive < open.len(),
            Mode::Shared => exclusive > 0,
        };
        if clash {
            let others: Vec<String> = open
                .iter()
                .filter(|a| a.mode == Mode::Exclusive || b.mode == Mode::Exclusive)
                .map(|a| a.describe())
                .collect();
            v.push(Violation::new(
                Property::Exclusion,
                format!(
                    "{} acquired while {} still believed they held",
                    b.describe(),
                    others.join(", ")
                ),
            ));
        }
    }
    v
}

/// (d) No acquisition after the session's lease was observed gone.
fn after_lease_gone(events: &[Event], ivs: &[Interval]) -> Vec<Violation> {
    let mut v = Vec::new();
    for e in events {
        if let Event::LeaseGone { lease, at: gone } = e {
            for iv in ivs
                .iter()
                .filter(|iv| iv.lease == *lease && iv.start > *gone)
            {
                v.push(Violation::new(
                    Property::AfterLeaseGone,
                    format!(
                        "{} acquired after its lease {lease:x} was gone",
                        iv.describe()
                    ),
                ));
            }
        }
    }
    v
}

/// (e) No wait passed while an exclusive holder believed it held from before the call to
/// after the return (the holder's key existed throughout: there was no moment to pass).
fn passed_while_held(events: &[Event], ivs: &[Interval]) -> Vec<Violation> {
    let mut v = Vec::new();
    for e in events {
        if let Event::Passed { client, called, at } = e {
            for iv in ivs.iter().filter(|iv| {
                iv.mode == Mode::Exclusive
                    && iv.start < *called
                    && iv.end.is_none_or(|end| *at < end)
            }) {
                v.push(Violation::new(
                    Property::PassedWhileHeld,
                    format!(
                        "client {client}'s wait passed while {} held throughout",
                        iv.describe()
                    ),
                ));
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;

    #[test]
    fn a_safe_history_passes() {
        let b = t0();
        let h = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            write(1, 10, true, ms(b, 1)),
            end(1, 10, ms(b, 2)),
            acq(2, 12, Mode::Exclusive, ms(b, 3)),
            write(1, 10, false, ms(b, 4)),
            write(2, 12, true, ms(b, 5)),
            end(2, 12, ms(b, 6)),
        ];
        assert_eq!(check(&h), vec![]);
    }

    #[test]
    fn overlapping_holders_are_caught() {
        let b = t0();
        let h = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            acq(2, 12, Mode::Exclusive, ms(b, 1)),
            end(1, 10, ms(b, 2)),
        ];
        assert!(caught(&h, Property::Exclusion), "{:?}", check(&h));
    }

    #[test]
    fn a_paused_holder_that_stops_believing_as_it_wakes_is_excused_and_no_other() {
        let b = t0();
        let paused = |from, to| Event::Paused {
            client: 1,
            from: ms(b, from),
            at: ms(b, to),
        };
        // Client 1 holds, is stopped at 100 ms and continued at 7 s; client 2 takes over at
        // 5 s; client 1's lost() fires 200 ms after it wakes.
        let woke_and_let_go = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            paused(100, 7_000),
            acq(2, 12, Mode::Exclusive, ms(b, 5_000)),
            end(1, 10, ms(b, 7_200)),
        ];
        assert_eq!(check(&woke_and_let_go), vec![]);
        // It kept believing for seconds after it woke: caught.
        let kept_believing = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            paused(100, 7_000),
            acq(2, 12, Mode::Exclusive, ms(b, 5_000)),
            end(1, 10, ms(b, 9_000)),
        ];
        assert!(caught(&kept_believing, Property::Exclusion));
        // Another client's pause excuses nothing.
        let other = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            Event::Paused {
                client: 3,
                from: ms(b, 100),
                at: ms(b, 7_000),
            },
            acq(2, 12, Mode::Exclusive, ms(b, 5_000)),
            end(1, 10, ms(b, 7_200)),
        ];
        assert!(caught(&other, Property::Exclusion));
    }

    #[test]
    fn a_lock_resumed_by_its_own_lease_keeps_its_token_but_not_past_another_holder() {
        let b = t0();
        // Client 1's process dies holding 10; its restart (same lease) takes 10 back.
        let resumed = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            end(1, 10, ms(b, 1)),
            acq(1, 10, Mode::Exclusive, ms(b, 2)),
            end(1, 10, ms(b, 3)),
            acq(2, 12, Mode::Exclusive, ms(b, 4)),
        ];
        assert_eq!(check(&resumed), vec![]);
        // Another lease with the same token is no resumption.
        let stolen = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            end(1, 10, ms(b, 1)),
            acq(2, 10, Mode::Exclusive, ms(b, 2)),
        ];
        assert!(caught(&stolen, Property::TokenOrder));
        // Taken back after someone else held: caught.
        let late = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            end(1, 10, ms(b, 1)),
            acq(2, 12, Mode::Exclusive, ms(b, 2)),
            end(2, 12, ms(b, 3)),
            acq(1, 10, Mode::Exclusive, ms(b, 4)),
        ];
        assert!(caught(&late, Property::TokenOrder));
    }

    #[test]
    fn a_permit_resumed_by_its_own_lease_keeps_its_token_but_another_lease_may_not_share_it() {
        let b = t0();
        let rules = Rules::semaphore(2);
        let found = |h: &[Event]| check_with(h, rules);
        let resumed = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            acq(2, 12, Mode::Exclusive, ms(b, 1)),
            end(1, 10, ms(b, 2)),
            acq(1, 10, Mode::Exclusive, ms(b, 3)),
        ];
        assert_eq!(found(&resumed), vec![]);
        let shared = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            end(1, 10, ms(b, 1)),
            acq(2, 10, Mode::Exclusive, ms(b, 2)),
        ];
        assert!(found(&shared)
            .iter()
            .any(|v| v.property == Property::TokenOrder));
        // Held twice at once by the same lease: not a resumption.
        let twice = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            acq(1, 10, Mode::Exclusive, ms(b, 1)),
        ];
        assert!(found(&twice)
            .iter()
            .any(|v| v.property == Property::TokenOrder));
    }

    #[test]
    fn a_token_that_does_not_increase_is_caught() {
        let b = t0();
        let h = [
            acq(1, 12, Mode::Exclusive, ms(b, 0)),
            end(1, 12, ms(b, 1)),
            acq(2, 10, Mode::Exclusive, ms(b, 2)),
        ];
        assert!(caught(&h, Property::TokenOrder));
    }

    #[test]
    fn an_acquisition_after_the_lease_was_gone_is_caught() {
        let b = t0();
        // acq() gives client 7 the lease 7.
        let h = [
            Event::LeaseGone {
                lease: 7,
                at: ms(b, 0),
            },
            acq(7, 10, Mode::Exclusive, ms(b, 1)),
        ];
        assert!(caught(&h, Property::AfterLeaseGone));
    }

    #[test]
    fn a_semaphore_admits_up_to_its_permits_and_no_more() {
        let b = t0();
        let two = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            acq(2, 11, Mode::Exclusive, ms(b, 1)),
            end(1, 10, ms(b, 2)),
            acq(3, 12, Mode::Exclusive, ms(b, 3)),
        ];
        assert_eq!(check_with(&two, Rules::semaphore(2)), vec![]);
        // The same history breaks a lock.
        assert!(caught(&two, Property::Exclusion));
        let three = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            acq(2, 11, Mode::Exclusive, ms(b, 1)),
            acq(3, 12, Mode::Exclusive, ms(b, 2)),
        ];
        let found = check_with(&three, Rules::semaphore(2));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].property, Property::Exclusion);
    }

    #[test]
    fn semaphore_holders_may_return_out_of_token_order_but_not_share_a_token() {
        let b = t0();
        let late = [
            acq(2, 12, Mode::Exclusive, ms(b, 0)),
            end(2, 12, ms(b, 1)),
            acq(1, 11, Mode::Exclusive, ms(b, 2)),
        ];
        assert_eq!(check_with(&late, Rules::semaphore(2)), vec![]);
        let shared_token = [
            acq(1, 11, Mode::Exclusive, ms(b, 0)),
            acq(2, 11, Mode::Exclusive, ms(b, 1)),
        ];
        assert!(check_with(&shared_token, Rules::semaphore(2))
            .iter()
            .any(|v| v.property == Property::TokenOrder));
    }

    #[test]
    fn readers_share_but_never_with_a_writer() {
        let b = t0();
        let readers = [
            acq(1, 10, Mode::Shared, ms(b, 0)),
            acq(2, 11, Mode::Shared, ms(b, 1)),
            end(1, 10, ms(b, 2)),
            end(2, 11, ms(b, 3)),
            acq(3, 12, Mode::Exclusive, ms(b, 4)),
            end(3, 12, ms(b, 5)),
            acq(1, 13, Mode::Shared, ms(b, 6)),
        ];
        assert_eq!(check(&readers), vec![]);
        let writer_among_readers = [
            acq(1, 10, Mode::Shared, ms(b, 0)),
            acq(3, 12, Mode::Exclusive, ms(b, 1)),
        ];
        assert!(caught(&writer_among_readers, Property::Exclusion));
        let reader_during_writer = [
            acq(3, 12, Mode::Exclusive, ms(b, 0)),
            acq(1, 13, Mode::Shared, ms(b, 1)),
        ];
        assert!(caught(&reader_during_writer, Property::Exclusion));
    }

    #[test]
    fn a_reader_after_a_writer_with_a_lower_token_is_caught() {
        let b = t0();
        let h = [
            acq(3, 12, Mode::Exclusive, ms(b, 0)),
            end(3, 12, ms(b, 1)),
            acq(1, 9, Mode::Shared, ms(b, 2)),
        ];
        assert!(caught(&h, Property::TokenOrder));
    }

    #[test]
    fn a_wait_that_passed_while_the_barrier_was_up_throughout_is_caught() {
        let b = t0();
        let passed = |client, called, at| Event::Passed {
            client,
            called: ms(b, called),
            at: ms(b, at),
        };
        let ok = [
            // Called before the hold began: it may have seen the barrier down.
            acq(1, 10, Mode::Exclusive, ms(b, 5)),
            passed(2, 0, 6),
            // Returned after the hold ended.
            passed(3, 7, 9),
            end(1, 10, ms(b, 8)),
        ];
        assert_eq!(check(&ok), vec![]);
        let bad = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            passed(2, 1, 2),
            end(1, 10, ms(b, 3)),
        ];
        assert!(caught(&bad, Property::PassedWhileHeld));
    }
}
