//! The one wait engine every primitive is built on, in rooms of one concern each:
//!
//! * [`request`] — how requests travel: the session's request timeout, retries of transient
//!   failures with one backoff per operation, detached requests a cancelled caller cannot
//!   strand, read-only Txns that are never cancelled in flight.
//! * [`watch`] — waiting for changes: watches registered from now (plus one confirming read),
//!   `wait_gone`, and prefix event streams that survive disconnects and compaction.
//! * [`queue`] — the queue algorithm: enqueue, the one wait loop (read while our key exists →
//!   decide → through / act / wait → read again), and the queue decision.
//! * [`inspect`] — reading a queue from outside, without a lease: its oldest members, who
//!   holds it ([`Holder`]).
//! * [`guard`] — what a guard holds: [`Fence`] (fenced compare, sequenced fenced writes,
//!   `lost()`) and [`Holding`] (fenced, retry-safe release; release on drop through the
//!   session's task).
//!
//! The session's background work (`crate::session::cleanup`) uses the same request and watch
//! rooms.

pub(crate) mod guard;
pub(crate) mod inspect;
pub(crate) mod queue;
pub(crate) mod request;
pub(crate) mod watch;

pub use guard::Fence;
pub(crate) use guard::{holding_guard, Holding};
pub use inspect::Holder;
pub(crate) use queue::{
    acquire, adopt, adopt_on_lease, create_exclusive, join, read, try_acquire, Blocker, Decision,
    Snapshot,
};
pub(crate) use request::{send_txn, Kind};
pub(crate) use watch::{deleted_at, wait_gone, Gap, PrefixEvents, Revision, Watched};
