//! Property (j): observers of an election report leaders in order, and every one after the
//! heal.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use super::{sorted, Event, Property, Violation};

/// Checks property (j) of the module docs on the [`Event::Observed`] reports of every
/// observer: a leader's fencing token never goes down (leaders of an election follow one
/// another in the order of their keys), and every leader acquired at or after `from` (an
/// [`Event::Acquired`]) is among what each observer reported — unless its stream (re)started
/// after that acquisition (a stream starts from the state then). Give as `from` a moment by
/// which the faults have healed, every observer is connected again and no compaction can
/// come: an observer that resumes past a compaction re-reads the state, and rightly sums up
/// the leaders it missed. Events in any order; they are sorted by time.
pub fn check_observers(events: &[Event], from: Instant) -> Vec<Violation> {
    let events = sorted(events);
    let mut violations = Vec::new();
    // Per observer: the last leader it reported, its latest fresh start, and what it saw.
    let mut last: HashMap<usize, i64> = HashMap::new();
    let mut started: HashMap<usize, Instant> = HashMap::new();
    let mut seen: HashMap<usize, HashSet<i64>> = HashMap::new();
    for e in &events {
        let Event::Observed {
            observer,
            leader,
            fresh,
            at,
        } = e
        else {
            continue;
        };
        if *fresh {
            started.insert(*observer, *at);
        }
        let Some(token) = leader else { continue };
        seen.entry(*observer).or_default().insert(*token);
        if let Some(previous) = last.insert(*observer, *token) {
            if *token < previous {
                violations.push(Violation::new(
                    Property::Observed,
                    format!(
                        "observer {observer} reported the leader with token {token} after the one with token {previous}"
                    ),
                ));
            }
        }
    }
    for e in &events {
        let Event::Acquired {
            client, token, at, ..
        } = e
        else {
            continue;
        };
        if *at < from {
            continue;
        }
        for (observer, start) in &started {
            let missed = seen.get(observer).is_none_or(|s| !s.contains(token));
            if *start <= *at && missed {
                violations.push(Violation::new(
                    Property::Observed,
                    format!(
                        "observer {observer} never reported client {client}'s leadership (token {token}), acquired {:?} after observers were due to report every leader",
                        at.saturating_duration_since(from)
                    ),
                ));
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
    fn observers_must_report_leaders_in_order_and_every_one_after_the_heal() {
        let b = t0();
        let observed = |observer, leader, fresh, at| Event::Observed {
            observer,
            leader,
            fresh,
            at: ms(b, at),
        };
        let healed = ms(b, 100);
        let ok = [
            observed(0, None, true, 0),
            observed(1, None, true, 0),
            acq(1, 10, Mode::Exclusive, ms(b, 200)),
            observed(0, Some(10), false, 199),
            observed(1, Some(10), false, 201),
            observed(1, Some(10), false, 250), // a proclaim
            acq(2, 12, Mode::Exclusive, ms(b, 300)),
            observed(0, Some(12), false, 301),
            observed(1, Some(12), false, 302),
            observed(0, None, false, 400),
            // Observer 2 started after token 10: not asked for it.
            observed(2, Some(12), true, 250),
        ];
        assert_eq!(check_observers(&ok, healed), vec![]);
        let mut backwards = ok.to_vec();
        backwards.push(observed(1, Some(10), false, 500));
        assert!(check_observers(&backwards, healed)
            .iter()
            .any(|v| v.detail.contains("after the one")));
        // Observer 0 missed token 14.
        let mut missed = ok.to_vec();
        missed.push(acq(3, 14, Mode::Exclusive, ms(b, 450)));
        missed.push(observed(1, Some(14), false, 451));
        missed.push(observed(2, Some(14), false, 451));
        let found = check_observers(&missed, healed);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(found[0].detail.contains("observer 0 never reported"));
    }
}
