//! The request layer: the only code that sends requests to etcd. Every feature — the engine,
//! the session, the STM, discovery, inspections — sends through an [`Rpc`], so every request
//! follows the same policies:
//!
//! * **one timeout**: each attempt is given up after the request timeout ([`Error::Timeout`]);
//! * **one auth-token renewal**: a request etcd refuses for a stale token (expired, or issued
//!   before a change of users or roles) is sent once more with a fresh token ([`auth`]);
//! * **one rule for cancelling in flight** ([`send`]): a Txn that only reads is never
//!   cancelled once sent — etcd before 3.5.5 crashes when one is cancelled while it is applied
//!   (etcd #14110) — so it runs in a task of its own and a caller that gives up only stops
//!   waiting; everything else (writes, plain range reads, lease calls) is cancelled with its
//!   caller;
//! * **one retry policy** ([`retry`]): what [`Error::is_retryable`] says may succeed again is
//!   sent again unchanged, pausing on the caller's one [`Backoff`](crate::backoff::Backoff) for
//!   the whole operation, until it is answered or the caller's [`Stop`] says to stop;
//! * **counters** ([`Stats`]) of what was sent and received.
//!
//! The Txns that the sessions of one connection send at one moment may go out merged in one
//! ([`batch`]): each stays a Txn of its own nested in the merged one, and the merged Txn
//! carries what etcd needs to check their permissions ([`witness`]).

pub(crate) mod auth;
pub(crate) mod batch;
pub(crate) mod retry;
pub(crate) mod send;
pub(crate) mod stats;
pub(crate) mod witness;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use tokio_util::task::TaskTracker;

pub(crate) use retry::{pause, unless_stopped, Answered, Stop, Unanswered};
pub(crate) use stats::Stats;

use crate::Error;

/// A handle to send requests through: a client, the request timeout, counters, the tasks
/// that carry requests a caller may not cancel, and the newest store revision any answer
/// reported. Cheap to clone; clones share everything.
#[derive(Clone)]
pub(crate) struct Rpc {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    timeout: Duration,
    stats: Stats,
    tasks: TaskTracker,
    auth: auth::Renewal,
    /// The highest store revision any answer reported.
    revision: AtomicI64,
}

impl Rpc {
    /// Requests through `client`, each attempt given up after `timeout`; requests that must
    /// not be cancelled run as tasks of `tasks`.
    pub(crate) fn new(client: Client, timeout: Duration, tasks: TaskTracker) -> Rpc {
        Rpc {
            inner: Arc::new(Inner {
                client,
                timeout,
                stats: Stats::default(),
                tasks,
                auth: auth::Renewal::default(),
                revision: AtomicI64::new(0),
            }),
        }
    }

    /// Requests through `client` with `timeout`, for callers without a session.
    pub(crate) fn detached(client: Client, timeout: Duration) -> Rpc {
        let tasks = TaskTracker::new();
        tasks.close();
        Rpc::new(client, timeout, tasks)
    }

    /// The client.
    pub(crate) fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The request timeout.
    pub(crate) fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// The counters.
    pub(crate) fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// Spawns `task` among the tasks of this handle (a request that must finish).
    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.inner.tasks.spawn(task);
    }

    /// Records that an answer reported the store at `revision`.
    pub(crate) fn saw_revision(&self, revision: i64) {
        self.inner.revision.fetch_max(revision, Ordering::Relaxed);
    }

    /// The highest store revision any answer through this handle reported: every change made
    /// after this call has a higher one.
    pub(crate) fn seen_revision(&self) -> i64 {
        self.inner.revision.load(Ordering::Relaxed)
    }

    /// Fetches a fresh auth token for the client (a no-op for a client without credentials).
    pub(crate) async fn renew_auth(&self) -> Result<(), Error> {
        auth::renew(&self.inner.client).await
    }

    /// Whether a refused watch should renew the token and try again: the refusal may be a
    /// stale token ([`Error::may_be_stale_watch_auth`]) and no renewal happened within the
    /// last [`auth::Renewal::INTERVAL`] (so a real denial is believed once it comes again).
    pub(crate) fn watch_refusal_renews(&self, e: &Error) -> bool {
        e.may_be_stale_watch_auth() && self.inner.auth.due()
    }
}

impl std::fmt::Debug for Rpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rpc")
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}
