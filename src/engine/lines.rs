//! Which queues the sessions of one connection have members in (waiting or holding), of
//! which kind, and whose: an enqueue lingers for a sibling's write to share a raft entry with
//! (`rpc::batch`'s `How::linger`) only while *other* sessions of its family have members in
//! its queue that block it, as many as it has permits — so that it will wait whatever other
//! clients hold, and a sibling's release is the write it is likely to join. An enqueue that
//! may go through at once (a free permit for all its family knows, or a read lock among
//! readers) or is alone in its queue (or with only its own session's other members) goes at
//! once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};

use super::decision::Blocker;
use crate::keys::queue_of;
use crate::session::Session;

/// Per family of sibling sessions: per queue, per kind of member key (the key up to its
/// session's lease), how many members each session (by lease) has.
#[derive(Default)]
pub(crate) struct Lines {
    members: StdMutex<HashMap<String, HashMap<String, Count>>>,
}

/// The members of one kind in one queue.
#[derive(Default)]
struct Count {
    total: usize,
    by_lease: HashMap<i64, usize>,
}

/// A member key of a session of the family in its queue, counted until dropped.
pub(crate) struct Member {
    lines: Arc<Lines>,
    /// Its queue and kind (boxed: guards and tickets carry a `Member`).
    place: Box<(String, String)>,
    lease: i64,
}

/// The kind of member key `key` of the session of `lease`: the key up to the lease's 16 hex
/// digits (a member key is `<queue's own prefix><kind><lease>-<n>`), or the whole key if it
/// holds no such part.
fn kind_of(key: &str, lease: i64) -> &str {
    key.rfind(&format!("{lease:016x}-"))
        .map_or(key, |at| &key[..at])
}

impl Lines {
    fn of(session: &Session) -> Arc<Lines> {
        session.family_extension(Lines::default)
    }

    /// Whether other sessions of `session`'s family have at least as many members that
    /// `blocker` counts in the queue of `key` as it has permits: an acquisition of `key` will
    /// wait.
    pub(crate) fn siblings_fill(session: &Session, key: &str, blocker: &Blocker) -> bool {
        let lines = Lines::of(session);
        let members = lines.members.lock().unwrap_or_else(|e| e.into_inner());
        let Some(kinds) = members.get(queue_of(key)) else {
            return false;
        };
        let mut others = 0;
        for (kind, count) in kinds {
            // Every key of this kind is counted, or none: ask for one of them.
            let example = format!("{kind}{:016x}-0", 0);
            if blocker.counts(example.as_bytes()) {
                let own = count.by_lease.get(&session.lease_id).copied().unwrap_or(0);
                others += count.total - own;
                if others >= blocker.permits() {
                    return true;
                }
            }
        }
        false
    }

    /// Counts member key `key` of `session` in its queue until the returned [`Member`] is
    /// dropped.
    pub(crate) fn enter(session: &Session, key: &str) -> Member {
        let lines = Lines::of(session);
        let queue = queue_of(key).to_owned();
        let kind = kind_of(key, session.lease_id).to_owned();
        {
            let mut members = lines.members.lock().unwrap_or_else(|e| e.into_inner());
            let count = members
                .entry(queue.clone())
                .or_default()
                .entry(kind.clone())
                .or_default();
            count.total += 1;
            *count.by_lease.entry(session.lease_id).or_default() += 1;
        }
        Member {
            lines,
            place: Box::new((queue, kind)),
            lease: session.lease_id,
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let (queue, kind) = &*self.place;
        let mut members = self.lines.members.lock().unwrap_or_else(|e| e.into_inner());
        let Some(kinds) = members.get_mut(queue) else {
            return;
        };
        if let Some(count) = kinds.get_mut(kind) {
            count.total -= 1;
            if let Some(n) = count.by_lease.get_mut(&self.lease) {
                *n -= 1;
                if *n == 0 {
                    count.by_lease.remove(&self.lease);
                }
            }
            if count.total == 0 {
                kinds.remove(kind);
            }
        }
        if kinds.is_empty() {
            members.remove(queue);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::kind_of;

    #[test]
    fn a_member_keys_kind_is_the_key_up_to_its_sessions_lease() {
        let lease = 0x694d_7f00_1234;
        assert_eq!(
            kind_of("n/#rwlock/r0000694d7f001234-1a", lease),
            "n/#rwlock/r"
        );
        assert_eq!(kind_of("n/0000694d7f001234-0", lease), "n/");
        // Another lease's key, or no member key at all: the whole key.
        assert_eq!(
            kind_of("n/0000000000000007-0", lease),
            "n/0000000000000007-0"
        );
    }
}
