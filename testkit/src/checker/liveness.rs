//! Property (h): every want is served within a bound once the faults healed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{sorted, Event, Property, Step, Violation};

/// Checks liveness, property (h) of the module docs: `healed` is when the last fault healed,
/// `end` when the history ends (its clients were still running until then).
///
/// A client wants from its [`Event::Waiting`] (or a double barrier's `Entering` / `Leaving`
/// step) until it is served: an [`Event::Acquired`], an [`Event::Passed`], or the double
/// barrier's `Entered` / `Left`. An [`Event::GaveUp`] — an error, a lost session — does not
/// serve it: the client still wants (it starts over), and the clock keeps running. An
/// [`Event::Exited`] ends the want: a client that is gone is not judged, unless it was already
/// overdue. A want that started at `s` must be served by `max(s, healed) + bound`; one that
/// cannot have reached that point by `end` is not judged. Events in any order; they are sorted
/// by time.
pub fn check_liveness(
    events: &[Event],
    healed: Instant,
    bound: Duration,
    end: Instant,
) -> Vec<Violation> {
    let events = sorted(events);
    // Each client's open want, by when it started.
    let mut open: HashMap<usize, Instant> = HashMap::new();
    let mut violations = Vec::new();
    // `stop`: when it was served, or (`served` false) when the client exited; `None`: the end.
    let mut judge = |client: usize, start: Instant, stop: Option<Instant>, served: bool| {
        let due = start.max(healed) + bound;
        let overdue = match stop {
            Some(stop) if served => stop > due,
            Some(exited) => exited > due,
            None => due <= end,
        };
        if !overdue {
            return;
        }
        let until = match stop {
            Some(stop) if served => format!(
                "it was served {:?} after the heal",
                stop.saturating_duration_since(healed)
            ),
            Some(exited) => format!(
                "it exited {:?} after the heal, unserved",
                exited.saturating_duration_since(healed)
            ),
            None => "the end, unserved".to_owned(),
        };
        violations.push(Violation::new(
            Property::Starved,
            format!(
                "client {client} wanted from {:?} after the heal until {until}: longer than {bound:?}",
                start.saturating_duration_since(healed)
            ),
        ));
    };
    for e in &events {
        let (client, t, what) = match e {
            Event::Waiting { client, at } => (*client, *at, Some(true)),
            Event::Participant {
                client, step, at, ..
            } => (
                *client,
                *at,
                Some(matches!(step, Step::Entering | Step::Leaving)),
            ),
            Event::Acquired { client, at, .. } | Event::Passed { client, at, .. } => {
                (*client, *at, Some(false))
            }
            Event::Exited { client, at } => (*client, *at, None),
            _ => continue,
        };
        match what {
            // Starts to want (if it does not already).
            Some(true) => {
                open.entry(client).or_insert(t);
            }
            // Served.
            Some(false) => {
                if let Some(start) = open.remove(&client) {
                    judge(client, start, Some(t), true);
                }
            }
            // Gone.
            None => {
                if let Some(start) = open.remove(&client) {
                    judge(client, start, Some(t), false);
                }
            }
        }
    }
    for (client, start) in open {
        judge(client, start, None, false);
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;
    use std::time::Duration;

    #[test]
    fn wants_that_outlast_the_bound_after_the_heal_are_caught() {
        let b = t0();
        let healed = ms(b, 1_000);
        let bound = Duration::from_millis(500);
        let end = ms(b, 3_000);
        let waiting = |client, at| Event::Waiting {
            client,
            at: ms(b, at),
        };
        let gave_up = |client, at| Event::GaveUp {
            client,
            at: ms(b, at),
        };
        let ok = [
            // Waited through the faults, served soon after the heal.
            waiting(1, 0),
            acq(1, 10, Mode::Exclusive, ms(b, 1_400)),
            // Started after the heal, served within the bound.
            waiting(2, 2_000),
            Event::Passed {
                client: 2,
                called: ms(b, 2_000),
                at: ms(b, 2_300),
            },
            // An attempt failed, the next one was served in time.
            waiting(3, 1_100),
            gave_up(3, 1_200),
            waiting(3, 1_300),
            acq(3, 11, Mode::Exclusive, ms(b, 1_550)),
            // Still waiting at the end, but not yet due.
            waiting(4, 2_800),
            db(Step::Entering, 5, ms(b, 1_000)),
            db(Step::Entered, 5, ms(b, 1_100)),
            db(Step::Leaving, 5, ms(b, 1_200)),
            db(Step::Left, 5, ms(b, 1_300)),
            // Killed while it waited, before it was due.
            waiting(6, 1_100),
            Event::Exited {
                client: 6,
                at: ms(b, 1_400),
            },
        ];
        assert_eq!(check_liveness(&ok, healed, bound, end), vec![]);
        let starved = [
            waiting(1, 0),
            acq(1, 10, Mode::Exclusive, ms(b, 1_600)),
            waiting(2, 2_000),
            db(Step::Entering, 3, ms(b, 1_000)),
            db(Step::Entered, 3, ms(b, 1_100)),
            db(Step::Leaving, 3, ms(b, 1_200)),
            // Failed attempts do not serve: the clock runs from the first.
            waiting(4, 1_100),
            gave_up(4, 1_200),
            waiting(4, 1_300),
            acq(4, 11, Mode::Exclusive, ms(b, 1_700)),
            // A waiter that gave up for good.
            waiting(5, 1_100),
            gave_up(5, 1_200),
            // Exited, but only after it was due.
            waiting(6, 1_100),
            Event::Exited {
                client: 6,
                at: ms(b, 1_700),
            },
        ];
        let found = check_liveness(&starved, healed, bound, end);
        assert_eq!(found.len(), 6, "{found:#?}");
        assert!(found.iter().all(|v| v.property == Property::Starved));
    }
}
