//! Which queues the sessions of one connection have members in (waiting or holding), and
//! whose: an enqueue lingers for a sibling's write to share a raft entry with (`rpc::batch`'s
//! `How::linger`) only while *another* session of its family has a member in its queue — one
//! whose release is the write it is likely to join. A session alone in its queue (or with only
//! its own other members there) enqueues at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};

use crate::keys::queue_of;
use crate::session::Session;

/// Per family of sibling sessions: how many members each session (by lease) has in each
/// queue.
#[derive(Default)]
pub(crate) struct Lines {
    members: StdMutex<HashMap<String, HashMap<i64, usize>>>,
}

/// A member key of a session of the family in its queue, counted until dropped.
pub(crate) struct Member {
    lines: Arc<Lines>,
    queue: String,
    lease: i64,
}

impl Lines {
    fn of(session: &Session) -> Arc<Lines> {
        session.family_extension(Lines::default)
    }

    /// Whether another session of `session`'s family has a member in the queue of `key`.
    pub(crate) fn sibling_in(session: &Session, key: &str) -> bool {
        let lines = Lines::of(session);
        let members = lines.members.lock().unwrap_or_else(|e| e.into_inner());
        members
            .get(queue_of(key))
            .is_some_and(|leases| leases.keys().any(|&lease| lease != session.lease_id))
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
            .or_default()
            .entry(session.lease_id)
            .or_default() += 1;
        Member {
            lines,
            queue,
            lease: session.lease_id,
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut members = self.lines.members.lock().unwrap_or_else(|e| e.into_inner());
        let Some(leases) = members.get_mut(&self.queue) else {
            return;
        };
        if let Some(count) = leases.get_mut(&self.lease) {
            *count -= 1;
            if *count == 0 {
                leases.remove(&self.lease);
            }
        }
        if leases.is_empty() {
            members.remove(&self.queue);
        }
    }
}
