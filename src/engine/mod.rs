//! The engine: the queue algorithm every primitive is built on, the guards, and the fenced
//! clean-ups (the guaranteed delete lives here, below the primitives, as Curator keeps it in
//! its framework layer). Its rooms:
//!
//! * [`decision`] — what a queue acquisition waits for, without I/O ([`Blocker`]).
//! * [`ticket`] — a member key that has (or may have) been created, until it is held.
//! * [`enqueue`] — putting member keys and exclusive names, detached from their callers
//!   ([`detached`]) so that a cancelled caller never strands a key.
//! * [`mirror`] — deciding from the session's mirror of a long queue instead of a read.
//! * [`wait`] — the one wait loop (read while our key exists → decide → through / act / wait
//!   → read again), and waiting for a key to be gone.
//! * [`acquire`] — acquire, try, join, adopt: what primitives call.
//! * [`fence`] and [`holding`] — what a guard holds: the [`Fence`] (fenced compares, sequenced
//!   fenced writes, `lost()`) and the [`Holding`] (fenced, retry-safe release; release on drop
//!   through the session's jobs).
//! * [`cleanup`], [`names`], [`slots`] — background releases, sweeps of late copies, touches;
//!   the names a session creates exclusively; the numbers in member key names.
//! * [`lines`] — which queues a family of sibling sessions has members in (an enqueue lingers
//!   for a sibling's release only there).
//! * [`leftovers`] and [`resume`] — a resumed lease's keys: taken back or deleted.
//! * [`inspect`] — reading a queue from outside, without a lease ([`Holder`]).
//! * [`measure`] — an acquisition's and its guard's metrics, and its span's fencing token.
//!
//! The engine sends through the session's request handle (`crate::rpc`) and waits through the
//! watch layer (`crate::watch`); the session runs the engine's clean-ups as opaque jobs and
//! keeps the engine's [`Book`] of its keys as an opaque extension.

pub(crate) mod acquire;
pub(crate) mod book;
pub(crate) mod cleanup;
pub(crate) mod decision;
pub(crate) mod detached;
pub(crate) mod enqueue;
pub(crate) mod fence;
pub(crate) mod holding;
pub(crate) mod inspect;
pub(crate) mod leftovers;
pub(crate) mod lines;
pub(crate) mod measure;
pub(crate) mod mirror;
pub(crate) mod names;
pub(crate) mod resume;
pub(crate) mod slots;
pub(crate) mod ticket;
pub(crate) mod wait;

use std::sync::Arc;

use etcd_client::{Txn, TxnResponse};

pub use fence::Fence;
pub use inspect::Holder;

pub(crate) use acquire::{adopt_on_lease, join, read, read_all, Line};
pub(crate) use book::Book;
pub(crate) use cleanup::Cleanup;
pub(crate) use decision::{Blocker, Decision, Snapshot};
pub(crate) use enqueue::create_exclusive;
pub(crate) use holding::{holding_guard, Holding};
pub(crate) use leftovers::Intent;
pub(crate) use wait::wait_gone;

use crate::backoff::Backoff;
use crate::rpc::{Answered, Unanswered};
use crate::session::Session;

/// What the engine does with a session: the book of its keys, its clean-ups, the record of
/// its own puts that a resumed session's rule for leftovers spares.
pub(crate) trait SessionKeys {
    /// The engine's book of this session's keys.
    fn book(&self) -> Arc<Book>;

    /// Hands `cleanup` to the session's background jobs. Synchronous; never blocks. If the
    /// session's task has ended (session Lost), the lease's end removes the key.
    fn clean_up(&self, cleanup: Cleanup);

    /// Marks a put (or a taking-back) of `key` by this session as under way, so that a
    /// resumed session's rule for leftovers never deletes it; [`Intent::confirm`] records the
    /// key made. Call it before the request is sent. Costs nothing for a session that was not
    /// resumed.
    fn intend(&self, key: &str) -> Intent;

    /// A number for a member key's name that no key of this session that may exist carries;
    /// [`Afterwards::Reuse`] gives it back once the key is gone.
    fn take_slot(&self) -> u64;
}

impl SessionKeys for Session {
    fn book(&self) -> Arc<Book> {
        self.extension(|| Book::new(0, None))
    }

    fn clean_up(&self, cleanup: Cleanup) {
        cleanup::submit(self, cleanup);
    }

    fn intend(&self, key: &str) -> Intent {
        Intent::new(self.book().leftovers.as_ref(), key)
    }

    fn take_slot(&self) -> u64 {
        self.book().slots.take()
    }
}

/// Sends `txn()` through the session until it is answered, while the session lives (see
/// [`Rpc::until_answered`](crate::rpc::Rpc::until_answered)).
pub(crate) async fn until_answered(
    session: &Session,
    txn: impl Fn() -> Txn,
    backoff: &mut Backoff,
) -> Result<Answered<TxnResponse>, Unanswered> {
    session.rpc.txn_until_answered(txn, backoff, session).await
}
