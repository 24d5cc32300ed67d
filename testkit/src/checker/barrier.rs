//! Properties (f) and (g): a double barrier's rounds.

use std::time::Instant;

use super::{sorted, Event, Property, Step, Violation};

/// One `enter()` … `leave()` of a double-barrier participant.
#[derive(Debug, Clone, Copy)]
struct Participation {
    client: usize,
    lease: i64,
    entering: Instant,
    entered: Option<Instant>,
    leaving: Option<Instant>,
    left: Option<Instant>,
}

/// How late the lease observer may see a lease gone (it polls).
const OBSERVER_LAG: std::time::Duration = std::time::Duration::from_millis(500);

/// Checks a double barrier's history for `count` participants: properties (f) and (g) of the
/// module docs (events in any order; they are sorted by time).
pub fn check_double_barrier(events: &[Event], count: usize) -> Vec<Violation> {
    let events = sorted(events);
    let mut ps: Vec<Participation> = Vec::new();
    let mut gone: std::collections::HashMap<i64, Instant> = std::collections::HashMap::new();
    for e in &events {
        let (client, lease, step, t) = match e {
            Event::LeaseGone { lease, at } => {
                gone.entry(*lease).or_insert(*at);
                continue;
            }
            Event::Participant {
                client,
                lease,
                step,
                at,
            } => (*client, *lease, *step, *at),
            _ => continue,
        };
        if step == Step::Entering {
            ps.push(Participation {
                client,
                lease,
                entering: t,
                entered: None,
                leaving: None,
                left: None,
            });
            continue;
        }
        if let Some(p) = ps
            .iter_mut()
            .rev()
            .find(|p| p.client == client && p.lease == lease)
        {
            match step {
                Step::Entering => {}
                Step::Entered => p.entered = Some(t),
                Step::Leaving => p.leaving = Some(t),
                Step::Left => p.left = Some(t),
            }
        }
    }
    // A participant's key exists at most from its enter() call until its leave() returned or
    // its lease was seen gone.
    let span = |p: &Participation| {
        let end = [p.left, gone.get(&p.lease).copied()]
            .into_iter()
            .flatten()
            .min();
        (p.entering, end)
    };
    let mut violations = Vec::new();
    for (i, p) in ps.iter().enumerate() {
        // (f)
        if let Some(entered) = p.entered {
            let inside_at = |t: Instant| {
                ps.iter()
                    .filter(|q| {
                        let (start, end) = span(q);
                        start <= t && end.is_none_or(|end| end > t)
                    })
                    .count()
            };
            let met = std::iter::once(p.entering)
                .chain(
                    ps.iter()
                        .map(|q| q.entering)
                        .filter(|&t| t >= p.entering && t <= entered),
                )
                .any(|t| inside_at(t) >= count);
            if !met {
                violations.push(Violation {
                    property: Property::EarlyEnter,
                    detail: format!(
                        "client {} (lease {:x}) passed enter() while fewer than {count} were in",
                        p.client, p.lease
                    ),
                });
            }
        }
        // (g)
        if let (Some(leaving), Some(left)) = (p.leaving, p.left) {
            for (j, q) in ps.iter().enumerate() {
                if i == j || q.entered.is_none_or(|e| e >= leaving) {
                    continue;
                }
                let q_left = q.leaving.is_some_and(|l| l <= left);
                let q_gone = gone
                    .get(&q.lease)
                    .is_some_and(|g| *g <= left + OBSERVER_LAG);
                if !q_left && !q_gone {
                    violations.push(Violation {
                        property: Property::EarlyLeave,
                        detail: format!(
                            "client {}'s leave() returned while client {} (lease {:x}) was still in",
                            p.client, q.client, q.lease
                        ),
                    });
                }
            }
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;

    #[test]
    fn a_double_barrier_round_passes_and_early_passes_are_caught() {
        let b = t0();
        let round = [
            db(Step::Entering, 1, ms(b, 0)),
            db(Step::Entering, 2, ms(b, 1)),
            db(Step::Entered, 1, ms(b, 2)),
            db(Step::Entered, 2, ms(b, 2)),
            db(Step::Leaving, 1, ms(b, 3)),
            db(Step::Leaving, 2, ms(b, 4)),
            db(Step::Left, 2, ms(b, 5)),
            db(Step::Left, 1, ms(b, 5)),
        ];
        assert_eq!(check_double_barrier(&round, 2), vec![]);
        // Client 1 passes enter alone …
        let early_enter = [
            db(Step::Entering, 1, ms(b, 0)),
            db(Step::Entered, 1, ms(b, 1)),
            db(Step::Entering, 2, ms(b, 2)),
            db(Step::Entered, 2, ms(b, 3)),
        ];
        let found = check_double_barrier(&early_enter, 2);
        assert!(
            found.iter().any(|v| v.property == Property::EarlyEnter),
            "{found:?}"
        );
        // … or leaves while client 2 has not called leave().
        let early_leave = [
            db(Step::Entering, 1, ms(b, 0)),
            db(Step::Entering, 2, ms(b, 1)),
            db(Step::Entered, 1, ms(b, 2)),
            db(Step::Entered, 2, ms(b, 2)),
            db(Step::Leaving, 1, ms(b, 3)),
            db(Step::Left, 1, ms(b, 4)),
            db(Step::Leaving, 2, ms(b, 5)),
        ];
        let found = check_double_barrier(&early_leave, 2);
        assert!(
            found.iter().any(|v| v.property == Property::EarlyLeave),
            "{found:?}"
        );
        // A participant whose lease is gone counts as having left.
        let mut lost = early_leave.to_vec();
        lost.push(Event::LeaseGone {
            lease: 2,
            at: ms(b, 4),
        });
        assert_eq!(check_double_barrier(&lost, 2), vec![]);
    }
}
