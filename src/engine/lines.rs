//! Which queues the sessions of one connection have members in (waiting or holding): an
//! enqueue lingers for a sibling's write to share a raft entry with (`rpc::batch`'s
//! `How::linger`) only while a sibling has a member in its queue — one whose release is the
//! write it is likely to join. Alone in its queue, an enqueue goes at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};

use crate::session::Session;

/// Per family of sibling sessions: how many members each queue holds.
#[derive(Default)]
pub(crate) struct Lines {
    members: StdMutex<HashMap<String, usize>>,
}

/// A member key of the family in its queue, counted until dropped.
pub(crate) struct Member {
    lines: Arc<Lines>,
    queue: String,
}

/// The queue of member key `key`: its name up to its last `#` (a read/write lock's readers and
/// writers share one).
fn queue_of(key: &str) -> &str {
    key.rfind('#').map_or(key, |hash| &key[..hash])
}

impl Lines {
    fn of(session: &Session) -> Arc<Lines> {
        session.family_extension(Lines::default)
    }

    /// Whether a session of `session`'s family has a member in the queue of `key`.
    pub(crate) fn occupied(session: &Session, key: &str) -> bool {
        let lines = Lines::of(session);
        let members = lines.members.lock().unwrap_or_else(|e| e.into_inner());
        members.contains_key(queue_of(key))
    }

    /// Counts member key `key` of `session` in its queue until the returned [`Member`] is
    /// dropped.
    pub(crate) fn enter(session: &Session, key: &str) -> Member {
        let lines = Lines::of(session);
        let queue = queue_of(key).to_owned();
        *lines
            .members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(queue.clone())
            .or_default() += 1;
        Member { lines, queue }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut members = self.lines.members.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = members.get_mut(&self.queue) {
            *count -= 1;
            if *count == 0 {
                members.remove(&self.queue);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_key_belongs_to_the_queue_before_its_last_hash() {
        assert_eq!(queue_of("locks/a#lock/00000000000000ff-1"), "locks/a");
        assert_eq!(queue_of("rw/b#rw/w00000000000000ff-2"), "rw/b");
        assert_eq!(queue_of("rw/b#rw/r00000000000000ff-3"), "rw/b");
    }
}
