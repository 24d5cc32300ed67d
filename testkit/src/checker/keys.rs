//! Property (i): no key stays in etcd without a holder (a waiter's pointer to the key ahead
//! of it counts as its member key's companion).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::{sorted, Event, Property, Step, Violation};

/// A key of the primitives under test, as a read of etcd returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenKey {
    /// The key.
    pub key: String,
    /// Its create revision (the fencing token of the acquisition that created it).
    pub create_revision: i64,
    /// Its lease (0: none).
    pub lease: i64,
}

/// Property (i), judged on samples of the keys under test: a key is *held* while an
/// acquisition with its create revision as token is open (acquired, not ended), and *waited
/// on* while it is among the `per_waiter` newest keys not held on the lease of a client that
/// still wants or takes part (its session is the client's latest — [`Event::Session`] —, it
/// wants — [`check_liveness`](super::check_liveness)'s sense — or is between a double
/// barrier's `Entering` and `Left`, and it has not exited). Any other key is *unheld*: its
/// holder let it go (released, lost, crashed, gave up), or nobody ever acquired it. A key
/// first seen unheld at `s` must be gone by `max(s, healed) + bound`: a live session releases
/// what its guards let go, a dead session's lease expires within its TTL — so `bound` is the
/// TTL plus slack. Keys of an unreported lease (a session nobody reported) are judged alike.
#[derive(Debug, Clone)]
pub struct KeyAudit {
    bound: Duration,
    per_waiter: usize,
    healed: Option<Instant>,
    unheld_since: HashMap<(String, i64), Instant>,
    reported: HashSet<(String, i64)>,
}

impl KeyAudit {
    /// An audit that lets a key stay unheld for `bound` (after the heal), and a client that
    /// waits have `per_waiter` keys it does not hold (1 for a lock's waiter; 2 for a double
    /// barrier's participant: its key and the latch it may have put).
    pub fn new(bound: Duration, per_waiter: usize) -> KeyAudit {
        KeyAudit {
            bound,
            per_waiter,
            healed: None,
            unheld_since: HashMap::new(),
            reported: HashSet::new(),
        }
    }

    /// The last fault healed at `at`: from now on, unheld keys are due.
    pub fn healed(&mut self, at: Instant) {
        self.healed = Some(at);
    }

    /// Judges a read of the keys under test made at `now`, against the history so far. Returns
    /// the keys that became overdue (each reported once).
    pub fn observe(&mut self, now: Instant, keys: &[SeenKey], events: &[Event]) -> Vec<Violation> {
        let used = in_use(keys, events, self.per_waiter);
        let present: HashSet<(String, i64)> = keys
            .iter()
            .map(|k| (k.key.clone(), k.create_revision))
            .collect();
        self.unheld_since.retain(|k, _| present.contains(k));
        let mut violations = Vec::new();
        for k in keys {
            let id = (k.key.clone(), k.create_revision);
            if used.contains(&id) {
                self.unheld_since.remove(&id);
                continue;
            }
            let since = *self.unheld_since.entry(id.clone()).or_insert(now);
            let Some(healed) = self.healed else { continue };
            let due = since.max(healed) + self.bound;
            if now > due && self.reported.insert(id) {
                violations.push(Violation::new(
                    Property::OrphanKey,
                    format!(
                        "key {} (token {}, lease {:x}) held by nobody since {:?} before this read, {:?} after the heal",
                        k.key,
                        k.create_revision,
                        k.lease,
                        now.saturating_duration_since(since),
                        now.saturating_duration_since(healed)
                    ),
                ));
            }
        }
        violations
    }
}

/// The keys (key, create revision) of `keys` that are held or waited on.
fn in_use(keys: &[SeenKey], events: &[Event], per_waiter: usize) -> HashSet<(String, i64)> {
    let events = sorted(events);
    let mut held: HashMap<(usize, i64), usize> = HashMap::new();
    let mut lease_of: HashMap<usize, i64> = HashMap::new();
    let mut wants: HashSet<usize> = HashSet::new();
    let mut inside: HashSet<usize> = HashSet::new();
    for e in &events {
        match e {
            Event::Session { client, lease, .. } => {
                lease_of.insert(*client, *lease);
            }
            // A work queue's claim: its claim key is held like a lock's.
            Event::Acquired {
                client,
                token,
                lease,
                ..
            }
            | Event::JobClaimed {
                client,
                token,
                lease,
                ..
            } => {
                *held.entry((*client, *token)).or_default() += 1;
                lease_of.insert(*client, *lease);
                wants.remove(client);
            }
            Event::Ended { client, token, .. } => {
                if let Some(n) = held.get_mut(&(*client, *token)) {
                    *n = n.saturating_sub(1);
                }
            }
            Event::Waiting { client, .. } => {
                wants.insert(*client);
            }
            Event::Passed { client, .. } => {
                wants.remove(client);
            }
            Event::Participant {
                client,
                lease,
                step,
                ..
            } => {
                lease_of.insert(*client, *lease);
                match step {
                    Step::Entering => {
                        inside.insert(*client);
                    }
                    Step::Left => {
                        inside.remove(client);
                    }
                    Step::Entered | Step::Leaving => {}
                }
            }
            Event::Exited { client, .. } => {
                wants.remove(client);
                inside.remove(client);
                lease_of.remove(client);
                held.retain(|(c, _), _| c != client);
            }
            _ => {}
        }
    }
    let held_tokens: HashSet<i64> = held
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|((_, token), _)| *token)
        .collect();
    let waiting_leases: HashSet<i64> = lease_of
        .iter()
        .filter(|(client, _)| wants.contains(client) || inside.contains(client))
        .map(|(_, lease)| *lease)
        .collect();
    let mut used = HashSet::new();
    let mut unheld_on: HashMap<i64, Vec<&SeenKey>> = HashMap::new();
    let (pointers, members): (Vec<&SeenKey>, Vec<&SeenKey>) =
        keys.iter().partition(|k| pointer_owner(&k.key).is_some());
    for k in members {
        if held_tokens.contains(&k.create_revision) {
            used.insert((k.key.clone(), k.create_revision));
        } else if waiting_leases.contains(&k.lease) {
            unheld_on.entry(k.lease).or_default().push(k);
        }
    }
    for (_, mut ks) in unheld_on {
        ks.sort_by_key(|k| std::cmp::Reverse(k.create_revision));
        for k in ks.into_iter().take(per_waiter) {
            used.insert((k.key.clone(), k.create_revision));
        }
    }
    // A waiter's pointer (`…#next/<id of the key ahead>/<the waiter's create revision>`, on
    // the waiter's lease) is its member key's companion: in use while that key is, on the
    // same lease.
    let in_use_members: HashSet<(i64, i64)> = keys
        .iter()
        .filter(|k| used.contains(&(k.key.clone(), k.create_revision)))
        .map(|k| (k.create_revision, k.lease))
        .collect();
    for k in pointers {
        if pointer_owner(&k.key).is_some_and(|owner| in_use_members.contains(&(owner, k.lease))) {
            used.insert((k.key.clone(), k.create_revision));
        }
    }
    used
}

/// For a waiter's pointer to the key ahead of it (`…#next/<id>/<create revision>`, the
/// library's announced hand-offs), the create revision of the waiter's member key.
pub(crate) fn pointer_owner(key: &str) -> Option<i64> {
    const NEXT: &str = "#next/";
    let next = key.rfind(NEXT)?;
    let slash = key.rfind('/')?;
    let revision = &key[slash + 1..];
    if slash <= next + NEXT.len() || revision.is_empty() {
        return None;
    }
    if !revision.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    revision.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;
    use std::time::Duration;

    fn key(name: &str, create_revision: i64, lease: i64) -> SeenKey {
        SeenKey {
            key: name.into(),
            create_revision,
            lease,
        }
    }

    #[test]
    fn keys_nobody_holds_or_waits_on_are_caught_once_overdue() {
        let b = t0();
        let session = |client, lease, at| Event::Session {
            client,
            lease,
            at: ms(b, at),
        };
        let waiting = |client, at| Event::Waiting {
            client,
            at: ms(b, at),
        };
        // acq() gives client n the lease n.
        let events = [
            session(1, 1, 0),
            waiting(1, 0),
            acq(1, 10, Mode::Exclusive, ms(b, 10)),
            session(2, 2, 0),
            waiting(2, 0),
            // Client 3 let its token 12 go, and waits again with key 14.
            session(3, 3, 0),
            acq(3, 12, Mode::Exclusive, ms(b, 5)),
            end(3, 12, ms(b, 8)),
            waiting(3, 9),
            // Client 4 is gone.
            session(4, 4, 0),
            Event::Exited {
                client: 4,
                at: ms(b, 20),
            },
        ];
        let keys = [
            key("l/1", 10, 1),  // held
            key("l/2", 11, 2),  // client 2 waits on it
            key("l/3a", 12, 3), // let go, while client 3 waits with 14: a leak
            key("l/3b", 14, 3), // client 3's wait
            key("l/4", 13, 4),  // a dead client's
            key("l/x", 15, 9),  // a lease nobody reported
        ];
        let mut audit = KeyAudit::new(Duration::from_secs(5), 1);
        // Not judged before the heal.
        assert_eq!(audit.observe(ms(b, 100), &keys, &events), vec![]);
        audit.healed(ms(b, 1_000));
        assert_eq!(audit.observe(ms(b, 5_900), &keys, &events), vec![]);
        let found = audit.observe(ms(b, 6_100), &keys, &events);
        let mut named: Vec<&str> = found
            .iter()
            .map(|v| v.detail.split_whitespace().nth(1).unwrap())
            .collect();
        named.sort();
        assert_eq!(named, ["l/3a", "l/4", "l/x"], "{found:#?}");
        assert!(found.iter().all(|v| v.property == Property::OrphanKey));
        // Reported once; a key that is gone, or held again, is forgotten.
        assert_eq!(audit.observe(ms(b, 7_000), &keys, &events), vec![]);
    }

    #[test]
    fn a_pointer_is_in_use_while_its_waiters_key_is_on_the_same_lease() {
        let b = t0();
        let session = |client, lease| Event::Session {
            client,
            lease,
            at: ms(b, 0),
        };
        let waiting = |client| Event::Waiting {
            client,
            at: ms(b, 0),
        };
        let events = [
            session(1, 1),
            acq(1, 10, Mode::Exclusive, ms(b, 10)),
            session(2, 2),
            waiting(2),
            session(3, 3),
            // Client 3 gave up: its key went, its pointer stayed.
            Event::Exited {
                client: 3,
                at: ms(b, 20),
            },
        ];
        let keys = [
            key("l/0000000000000001-1", 10, 1),
            key("l/0000000000000002-1", 11, 2),
            // Client 2's pointer to client 1's key: its companion.
            key("l/#next/0000000000000001-1/11", 12, 2),
            // A pointer on a lease other than its owner's, and one whose owner is gone.
            key("l/#next/0000000000000001-1/11", 13, 9),
            key("l/#next/0000000000000002-1/14", 15, 3),
        ];
        let mut audit = KeyAudit::new(Duration::from_secs(1), 1);
        audit.healed(ms(b, 0));
        audit.observe(ms(b, 100), &keys, &events);
        let found = audit.observe(ms(b, 1_200), &keys, &events);
        let mut tokens: Vec<&str> = found
            .iter()
            .map(|v| {
                v.detail
                    .split("token ")
                    .nth(1)
                    .unwrap()
                    .split(',')
                    .next()
                    .unwrap()
            })
            .collect();
        tokens.sort();
        assert_eq!(tokens, ["13", "15"], "{found:#?}");
        assert_eq!(
            super::super::keys::pointer_owner("l/#next/ab-1/57"),
            Some(57)
        );
        assert_eq!(
            super::super::keys::pointer_owner("l/0000000000000001-1"),
            None
        );
        assert_eq!(super::super::keys::pointer_owner("l/#next/x/"), None);
    }

    #[test]
    fn a_double_barrier_participant_may_keep_its_key_and_the_latch() {
        let b = t0();
        let events = [
            db(Step::Entering, 1, ms(b, 0)),
            db(Step::Entered, 1, ms(b, 10)),
            db(Step::Entering, 2, ms(b, 0)),
            db(Step::Entered, 2, ms(b, 10)),
            db(Step::Leaving, 2, ms(b, 20)),
            db(Step::Left, 2, ms(b, 30)),
        ];
        let keys = [
            key("d/p/1", 5, 1),
            key("d/ready", 7, 1),
            key("d/p/2", 6, 2), // client 2 left: its key is a leak
        ];
        let mut audit = KeyAudit::new(Duration::from_secs(1), 2);
        audit.healed(ms(b, 0));
        audit.observe(ms(b, 100), &keys, &events);
        let found = audit.observe(ms(b, 1_200), &keys, &events);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(found[0].detail.contains("d/p/2"));
    }
}
