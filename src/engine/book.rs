//! What the engine keeps per session, as the session's extension: the numbers of its member
//! keys, the names it creates exclusively, a counter for values unique to the session, and —
//! for a resumed session — its rule for the keys it found on its lease.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::leftovers::Leftovers;
use super::names::Names;
use super::slots::Slots;

/// The engine's book of one session's keys.
pub(crate) struct Book {
    pub(crate) slots: Slots,
    pub(crate) names: Names,
    seq: AtomicU64,
    pub(crate) leftovers: Option<Arc<Leftovers>>,
}

impl Book {
    /// The book of a session that numbers its keys from `first` (0 for a new lease; far from
    /// an earlier holder's numbers for a resumed one), with `leftovers` if it was resumed.
    pub(crate) fn new(first: u64, leftovers: Option<Leftovers>) -> Book {
        Book {
            slots: Slots::new(first),
            names: Names::default(),
            seq: AtomicU64::new(first),
            leftovers: leftovers.map(Arc::new),
        }
    }

    /// A number unique within this session, never used again (a barrier hold's token).
    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }
}
