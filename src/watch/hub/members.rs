//! A scope's members as the hub's stream shows them (its *mirror*): built once from a read of
//! the scope, then kept exact by every revision the stream dispatches after that read.
//!
//! A waiter behind a long queue asks the mirror which keys are ahead of it instead of reading
//! them from etcd: etcd answers a read sorted (or filtered) by create revision by reading the
//! *whole* queue, so n waiters lining up that way cost it n²/2 key reads; the mirror costs one
//! read of the scope per stream, and a lookup per waiter.
//!
//! Why a lookup is as good as a read ([`Members::line`]): the mirror holds the state of the
//! scope at revision `at` exactly (the read's state, and every event after it, each revision
//! whole and in etcd's order). Once `at` reaches the waiter's own create revision — its own put
//! is in the same stream — and its key is there as its own, the keys created before it at `at`
//! are exactly those a fenced read at `at` would return; and since create revisions only grow,
//! no key can be created ahead of it later.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use etcd_client::EventType;
use tokio::sync::watch;

use super::{lock, Group};

/// What the mirror says is ahead of a waiter, at `revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Line {
    /// The state this line is exact at (at or after the waiter's create revision).
    pub(crate) revision: i64,
    /// The newest counted keys created before the waiter's, newest first, with their create
    /// revisions: at most the number asked for.
    pub(crate) ahead: Vec<(Vec<u8>, i64)>,
    /// More counted keys are ahead than `ahead` holds.
    pub(crate) more: bool,
    /// A counted key was created after the waiter's.
    pub(crate) behind: bool,
}

/// A scope's keys at revision `at`: by name (create revision, lease) and by create revision.
#[derive(Debug, Default)]
pub(crate) struct Members {
    at: i64,
    keys: HashMap<Vec<u8>, (i64, i64)>,
    order: BTreeSet<(i64, Vec<u8>)>,
}

impl Members {
    /// The keys a read at `revision` returned: (key, create revision, lease).
    pub(crate) fn read(revision: i64, kvs: impl IntoIterator<Item = (Vec<u8>, i64, i64)>) -> Self {
        let mut members = Members {
            at: revision,
            ..Members::default()
        };
        for (key, create_revision, lease) in kvs {
            members.put(key, create_revision, lease);
        }
        members
    }

    fn put(&mut self, key: Vec<u8>, create_revision: i64, lease: i64) {
        if let Some((old, _)) = self.keys.insert(key.clone(), (create_revision, lease)) {
            self.order.remove(&(old, key.clone()));
        }
        self.order.insert((create_revision, key));
    }

    fn delete(&mut self, key: &[u8]) {
        if let Some((old, _)) = self.keys.remove(key) {
            self.order.remove(&(old, key.to_vec()));
        }
    }

    /// Applies one revision's events, if it is newer than the state.
    pub(super) fn apply(&mut self, group: &Group) {
        if group.revision <= self.at {
            return;
        }
        for e in &group.events {
            match e.kind {
                EventType::Put => self.put(e.key.clone(), e.create_revision, e.lease),
                EventType::Delete => self.delete(&e.key),
            }
        }
        self.at = group.revision;
    }

    /// The revision the state is exact at.
    pub(crate) fn at(&self) -> i64 {
        self.at
    }

    /// The line ahead of `own` (created at `create_revision` on `lease`): the newest `take`
    /// keys that `counts`, created before our revision, newest first; whether one was created
    /// after it. `None` if the state is older than our key, or our key is not there as ours (a
    /// fenced read would have failed).
    pub(crate) fn line(
        &self,
        own: &[u8],
        create_revision: i64,
        lease: i64,
        counts: impl Fn(&[u8]) -> bool,
        take: usize,
    ) -> Option<Line> {
        if self.at < create_revision || self.keys.get(own) != Some(&(create_revision, lease)) {
            return None;
        }
        // As a fenced read's `max_create_revision(ours - 1)` and `min_create_revision(ours + 1)`:
        // a key created in our own revision (another key of the Txn that put ours) is neither.
        let mut older = self
            .order
            .range(..(create_revision, Vec::new()))
            .rev()
            .filter(|(_, k)| counts(k))
            .map(|(r, k)| (k.clone(), *r));
        let ahead: Vec<(Vec<u8>, i64)> = older.by_ref().take(take).collect();
        let more = older.next().is_some();
        let behind = self
            .order
            .range((create_revision + 1, Vec::new())..)
            .any(|(_, k)| counts(k));
        Some(Line {
            revision: self.at,
            ahead,
            more,
            behind,
        })
    }
}

/// A scope's mirror: `None` members while one waiter builds it; `seen` tells waiters the
/// revision the members are exact at (0 while building).
pub(super) struct Mirror {
    pub(super) members: Option<Members>,
    pub(super) seen: watch::Sender<i64>,
}

/// What a waiter does to get a scope's mirror.
pub(crate) enum Mirrored {
    /// Build it: read the scope, then [`Builder::finish`].
    Build(Builder),
    /// Wait until it is exact at the revision wanted (the sender goes if the build fails or
    /// the stream ends: then read etcd instead).
    Ready(watch::Receiver<i64>),
}

/// The right to build a scope's mirror. Dropped unfinished (the read failed, or the waiter
/// gave up): the mirror is forgotten, and the next waiter that wants it builds it.
pub(crate) struct Builder {
    pub(super) shared: Arc<Mutex<super::State>>,
    pub(super) scope: Vec<u8>,
    pub(super) generation: u64,
    pub(super) done: bool,
}

impl Builder {
    /// Installs the mirror built from a read of the whole scope at `revision`, and brings it
    /// up to date with the revisions the stream dispatched since. `false` if it cannot be
    /// exact: the stream was replaced, the scope's watch began after the read, or more
    /// revisions than the hub keeps went by during the read.
    pub(crate) fn finish(
        mut self,
        revision: i64,
        kvs: impl IntoIterator<Item = (Vec<u8>, i64, i64)>,
    ) -> bool {
        self.done = true;
        let mut state = lock(&self.shared);
        if state.generation != self.generation {
            return false;
        }
        let Some(scope) = state.scopes.get_mut(&self.scope) else {
            return false;
        };
        // Every event after `kept_from` is kept or still to come, and none before `created`
        // is delivered.
        let exact = scope.created.is_some_and(|c| c <= revision) && scope.kept_from <= revision;
        match scope.mirror.as_mut() {
            Some(mirror) if exact => {
                let mut members = Members::read(revision, kvs);
                for group in &scope.kept {
                    members.apply(group);
                }
                mirror.seen.send_replace(members.at);
                mirror.members = Some(members);
                true
            }
            _ => {
                scope.mirror = None;
                false
            }
        }
    }
}

impl Drop for Builder {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut state = lock(&self.shared);
        if state.generation != self.generation {
            return;
        }
        if let Some(scope) = state.scopes.get_mut(&self.scope) {
            scope.mirror = None;
        }
    }
}
