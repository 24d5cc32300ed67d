//! Property (c): writes through the protected resource — as reported with
//! [`History::write`](super::History::write) by a resource of your own, or as etcd holds them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Event, Property, Violation};

/// A write that etcd holds: read back from the resource after the run (e.g. every write put
/// its own key, so that compaction cannot hide any, and a prefix read returns them all with
/// their revisions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedWrite {
    /// The key it wrote.
    pub key: String,
    /// The revision at which etcd applied it (its place in etcd's order of writes).
    pub revision: i64,
    /// The fencing token it was made with.
    pub token: i64,
    /// Who made it.
    pub client: usize,
}

/// Property (c) on what etcd accepted: in etcd's order of revisions, no write carries a token
/// lower than an earlier write's — a holder whose lock was gone (released, expired, taken
/// over) never wrote after a later holder. And every write a client saw succeed
/// (`reported`: key and token) is there, with that token (a write reported applied but not
/// applied would make the check above vacuous).
pub fn check_accepted_writes(
    accepted: &[AcceptedWrite],
    reported: &[(String, i64)],
) -> Vec<Violation> {
    let mut writes: Vec<&AcceptedWrite> = accepted.iter().collect();
    writes.sort_by_key(|w| w.revision);
    let mut violations = Vec::new();
    let mut highest: Option<&AcceptedWrite> = None;
    for w in writes {
        match highest {
            Some(h) if w.token < h.token => violations.push(Violation::new(
                Property::StaleWrite,
                format!(
                    "etcd accepted client {}'s write with stale token {} at revision {}, after client {}'s with token {} at revision {}",
                    w.client, w.token, w.revision, h.client, h.token, h.revision
                ),
            )),
            Some(h) if w.token == h.token => {}
            _ => highest = Some(w),
        }
    }
    let held: HashMap<&str, i64> = accepted.iter().map(|w| (w.key.as_str(), w.token)).collect();
    for (key, token) in reported {
        if held.get(key.as_str()) != Some(token) {
            violations.push(Violation::new(
                Property::StaleWrite,
                format!("a write reported applied (key {key}, token {token}) is not in etcd"),
            ));
        }
    }
    violations
}

/// Property (c) on [`Event::Write`]s: no write with a token lower than one the resource had
/// already accepted was accepted.
pub(super) fn check_reported_writes(events: &[Event]) -> Vec<Violation> {
    let mut violations = Vec::new();
    let mut highest: Option<i64> = None;
    for e in events {
        if let Event::Write {
            client,
            token,
            accepted: true,
            ..
        } = e
        {
            if let Some(h) = highest.filter(|h| token < h) {
                violations.push(Violation::new(
                    Property::StaleWrite,
                    format!("client {client}'s write with stale token {token} was accepted (highest accepted: {h})"),
                ));
            }
            highest = Some(highest.map_or(*token, |h| h.max(*token)));
        }
    }
    violations
}

/// An in-memory protected resource: accepts a write only if its token is at least the highest
/// it has accepted. Pair it with [`History::write`](super::History::write).
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
    use super::super::test_support::*;
    use super::super::*;

    #[test]
    fn an_accepted_stale_write_is_caught() {
        let b = t0();
        let h = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            end(1, 10, ms(b, 1)),
            acq(2, 12, Mode::Exclusive, ms(b, 2)),
            write(2, 12, true, ms(b, 3)),
            write(1, 10, true, ms(b, 4)),
        ];
        assert!(caught(&h, Property::StaleWrite), "{:?}", check(&h));
    }

    fn accepted(key: &str, revision: i64, token: i64, client: usize) -> AcceptedWrite {
        AcceptedWrite {
            key: key.into(),
            revision,
            token,
            client,
        }
    }

    #[test]
    fn etcds_writes_must_follow_the_tokens_and_hold_every_write_reported_applied() {
        let log = [
            accepted("w/1", 11, 10, 1),
            accepted("w/2", 13, 10, 1),
            accepted("w/3", 15, 12, 2),
            accepted("w/4", 16, 12, 2),
        ];
        let reported = [("w/1".to_owned(), 10), ("w/4".to_owned(), 12)];
        assert_eq!(check_accepted_writes(&log, &reported), vec![]);
        // In any order of reading: etcd's revisions decide.
        let mut shuffled = log.to_vec();
        shuffled.reverse();
        assert_eq!(check_accepted_writes(&shuffled, &reported), vec![]);
        // Client 1 wrote again after client 2 had taken over.
        let mut stale = log.to_vec();
        stale.push(accepted("w/5", 17, 10, 1));
        let found = check_accepted_writes(&stale, &[]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].property, Property::StaleWrite);
        // A write reported applied that etcd does not hold (or holds with another token).
        let missing = [("w/9".to_owned(), 12), ("w/1".to_owned(), 12)];
        assert_eq!(check_accepted_writes(&log, &missing).len(), 2);
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
