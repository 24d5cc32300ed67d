//! The watch layer: the only code that opens watches.
//!
//! * [`change`] — waiting for a change of a few keys or ranges, with watches registered from
//!   *now* (plus one confirming read when anything was written since the read that decided to
//!   wait), so a waiter stays out of etcd's 100 ms "unsynced" path; engine waits use it.
//! * [`hub`] — a session's one shared watch stream, and its mirrors of long queues.
//! * [`revisions`] — a stream of every event under a prefix, a whole revision at a time, that
//!   resumes from its last position after a broken stream, survives compaction by re-reading
//!   the state, and knows when it is caught up with etcd; views and `observe()` use it.
//! * [`history`] — a look back into etcd's history (when a key was deleted).
//!
//! Every watch is opened through the request layer's [`Rpc`](crate::rpc::Rpc) (its client,
//! timeout, counters and auth renewal). A refused watch that may be a stale token renews the
//! token and is tried again; refused again, the denial is believed. Failures that may succeed
//! again pause on the caller's one backoff, so a wait that keeps failing slows down to one
//! attempt a second instead of spinning.

pub(crate) mod change;
pub(crate) mod history;
pub(crate) mod hub;
pub(crate) mod revisions;

use etcd_client::{EventType, WatchFilterType, WatchOptions};

pub(crate) use change::{wait_for_change, Waits};
pub(crate) use history::deleted_at;
pub(crate) use hub::Hub;
pub(crate) use revisions::{Revision, Revisions, Update};

/// What a wait for a change ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Woken {
    /// One of the watched changes happened (or a confirming read saw that one had).
    Changed(Change),
    /// A cancelled watch or a stream failure: re-read and decide again.
    Recheck,
    /// A change of a [`Watched::deciding`] target happened, at this revision: the event
    /// itself is the answer, whatever a later read shows.
    Decided(i64),
    /// A watch's history was compacted away up to this revision: watch again from there (a
    /// change before it can no longer be seen), re-read and decide again.
    Compacted(i64),
}

/// The change that woke a wait: the revision of the events that matched, and their keys — all
/// of them, from the one response that carried them (a revision is never split). Empty (and
/// revision 0) when a confirming read, not an event, saw that something changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Change {
    pub(crate) revision: i64,
    pub(crate) keys: Vec<Vec<u8>>,
    /// Delivered in order with every event of the waiter's own key since the wait's read: the
    /// key was still the waiter's at `revision` (else the wait would have ended with its
    /// loss first).
    pub(crate) ordered: bool,
}

/// Which events of a watched key count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Events {
    Put,
    Delete,
    Any,
}

/// A change to wait for: a put and/or a delete of `key`, or of any key under it with
/// `prefix` — optionally only of the keys in `among`. From now on, unless it is watched
/// [`since`](Self::since) a revision of the past.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Watched {
    key: Vec<u8>,
    prefix: bool,
    events: Events,
    among: Option<Vec<Vec<u8>>>,
    since: Option<i64>,
    deciding: bool,
}

impl Watched {
    fn new(key: impl Into<Vec<u8>>, prefix: bool, events: Events) -> Watched {
        Watched {
            key: key.into(),
            prefix,
            events,
            among: None,
            since: None,
            deciding: false,
        }
    }

    /// The same change, also when it happened at or after `revision` (etcd's history: such a
    /// watch may take etcd's 100 ms "unsynced" path, so only waits that must not miss a change
    /// that came and went use it).
    pub(crate) fn since(self, revision: i64) -> Watched {
        Watched {
            since: Some(revision),
            ..self
        }
    }

    /// The change itself decides the wait ([`Woken::Decided`]) instead of asking for a re-read:
    /// for a change whose effect may be undone before a re-read sees it (a barrier's latch
    /// that goes away with the lease of whoever put it).
    pub(crate) fn deciding(self) -> Watched {
        Watched {
            deciding: true,
            ..self
        }
    }

    /// The same target, watched from `floor` on if its history before that is gone.
    pub(crate) fn not_before(&self, floor: i64) -> Watched {
        Watched {
            since: self.since.map(|since| since.max(floor)),
            ..self.clone()
        }
    }

    /// The deletion of exactly `key`.
    pub(crate) fn deleted(key: impl Into<Vec<u8>>) -> Watched {
        Watched::new(key, false, Events::Delete)
    }

    /// A put of exactly `key`.
    pub(crate) fn put(key: impl Into<Vec<u8>>) -> Watched {
        Watched::new(key, false, Events::Put)
    }

    /// A put or a delete of exactly `key`.
    pub(crate) fn changed(key: impl Into<Vec<u8>>) -> Watched {
        Watched::new(key, false, Events::Any)
    }

    /// A put of any key under `prefix`.
    pub(crate) fn put_under(prefix: impl Into<Vec<u8>>) -> Watched {
        Watched::new(prefix, true, Events::Put)
    }

    /// The deletion of any key under `prefix`.
    pub(crate) fn deleted_under(prefix: impl Into<Vec<u8>>) -> Watched {
        Watched::new(prefix, true, Events::Delete)
    }

    /// The deletion of any of `keys`, all under `prefix`: one watch of the prefix's
    /// deletions, filtered here.
    pub(crate) fn deleted_any(prefix: impl Into<Vec<u8>>, mut keys: Vec<Vec<u8>>) -> Watched {
        keys.sort();
        Watched {
            among: Some(keys),
            ..Watched::new(prefix, true, Events::Delete)
        }
    }

    pub(crate) fn matches(&self, kind: EventType, key: &[u8]) -> bool {
        let kind_ok = match self.events {
            Events::Put => kind == EventType::Put,
            Events::Delete => kind == EventType::Delete,
            Events::Any => true,
        };
        let key_ok = if self.prefix {
            key.starts_with(&self.key)
        } else {
            key == self.key
        };
        let among_ok = self
            .among
            .as_ref()
            .is_none_or(|keys| keys.binary_search_by(|k| k.as_slice().cmp(key)).is_ok());
        kind_ok && key_ok && among_ok
    }

    fn options(&self) -> WatchOptions {
        let opts = match self.events {
            Events::Delete => WatchOptions::new().with_filters([WatchFilterType::NoPut]),
            Events::Put => WatchOptions::new().with_filters([WatchFilterType::NoDelete]),
            Events::Any => WatchOptions::new(),
        };
        let opts = match self.since {
            Some(revision) => opts.with_start_revision(revision),
            None => opts,
        };
        if self.prefix {
            opts.with_prefix()
        } else {
            opts
        }
    }
}
