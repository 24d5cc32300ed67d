//! Distributed coordination primitives on etcd: a [`LeasedSession`] that knows on its own clock
//! when its lease may be gone, and a FIFO, fenced, cancel-safe [`Mutex`] whose guard releases
//! on drop.
//!
//! ```no_run
//! use std::time::Duration;
//! use etcd_coord::{LeasedSession, Mutex, SessionOptions};
//!
//! # async fn demo() -> Result<(), etcd_coord::Error> {
//! let client = etcd_client::Client::connect(
//!     ["127.0.0.1:2379"],
//!     Some(etcd_coord::recommended_connect_options()),
//! )
//! .await?;
//! let session = LeasedSession::new(client, SessionOptions::new().with_ttl(Duration::from_secs(10))).await?;
//! let mutex = Mutex::new(&session, "locks/nightly-report");
//! let guard = mutex.lock().await?;
//! tokio::select! {
//!     err = guard.lost() => eprintln!("lost the lock: {err}"),
//!     _ = async {
//!         // Writes through the lock are fenced: they apply only while we still own it.
//!         guard.txn_if_owner([etcd_client::TxnOp::put("report/status", "running", None)]).await?;
//!         Ok::<_, etcd_coord::Error>(())
//!     } => {}
//! }
//! guard.release().await?;
//! session.close().await?;
//! # Ok(()) }
//! ```
//!
//! Service registration and discovery, in the layout of etcd's Go `naming/endpoints`, live in
//! [`discovery`]. A [`WorkQueue`] hands jobs to workers under their leases — acknowledged
//! under a fence, delivered again if a worker dies, never lost (`docs/queue.md`).
//!
//! See `docs/design.md` for the architecture, the session state machine and the wait
//! algorithm, and `docs/safety.md` for what fencing does and does not protect.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod backoff;
mod barrier;
pub mod discovery;
mod double_barrier;
mod election;
mod engine;
mod error;
pub mod inspect;
mod keys;
pub mod metrics;
mod mutex;
mod queue;
mod rpc;
mod rwlock;
mod selector;
mod semaphore;
mod session;
mod stm;
mod watch;

use std::time::Duration;

pub use barrier::{Barrier, BarrierHold};
pub use double_barrier::{DoubleBarrier, DoubleBarrierGuard};
pub use election::{Election, LeaderEvent, LeaderInfo, Leadership};
pub use engine::{Fence, Holder};
pub use error::{Error, LossReason};
pub use keys::MAX_NAME_LEN;
pub use metrics::timeout;
pub use mutex::{Mutex, MutexGuard};
pub use queue::{
    ClaimInfo, Claimed, DeadLetter, EnqueueOptions, JobId, JobInfo, QueueOptions, WorkQueue,
    MAX_BATCH, MAX_IDEMPOTENCY_KEY_LEN, MAX_PAYLOAD_LEN, MAX_PRIORITY,
};
pub use rwlock::{RwLock, RwLockReadGuard, RwLockWriteGuard};
pub use selector::{LeaderSelector, LeaderTerm};
pub use semaphore::{Semaphore, SemaphorePermit};
pub use session::{
    BackgroundTasks, LeasedSession, SessionMetrics, SessionOptions, SessionState,
    MAX_LEASE_TTL_SECS,
};
pub use stm::{Committed, Isolation, Stm, StmTxn};

/// Client settings under which a dead or blackholed connection is noticed within about two
/// seconds: HTTP/2 keep-alive every second with a one-second timeout (also while idle), a 5 s
/// connect timeout and `require_leader` (a member cut off from its cluster refuses requests
/// instead of serving stale reads). With credentials (`.with_user(…)`), an expired auth token
/// is renewed and the request sent again (etcd-client's `with_auto_token_refresh`, off by
/// default there); this crate also renews tokens etcd refuses as issued before a change of
/// users or roles, and before re-opening watches.
///
/// etcd closes connections that ping more often than its `--grpc-keepalive-min-time`
/// (default 5 s): run etcd with `--grpc-keepalive-min-time=500ms` or raise the interval here.
pub fn recommended_connect_options() -> etcd_client::ConnectOptions {
    etcd_client::ConnectOptions::new()
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1))
        .with_keep_alive_while_idle(true)
        .with_connect_timeout(Duration::from_secs(5))
        .with_require_leader(true)
        .with_auto_token_refresh(true)
}

/// The README's example, compiled as a doctest so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExample;
