//! The session itself, behind every [`LeasedSession`](super::LeasedSession) handle: its lease,
//! its deadline and state, its request handle, its background jobs and tasks.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::jobs::{Jobs, PendingWork};
use super::liveness::Liveness;
use super::SessionState;
use crate::metrics;
use crate::rpc::{Rpc, Stop};
use crate::watch::{Hub, Waits};
use crate::{Error, LossReason};

/// The deadline, readable by any thread: nanoseconds after `epoch`, only ever moved later by
/// the session's task.
struct Deadline {
    epoch: Instant,
    nanos: AtomicU64,
}

impl Deadline {
    fn new(epoch: Instant, at: Instant) -> Deadline {
        let d = Deadline {
            epoch,
            nanos: AtomicU64::new(0),
        };
        d.extend(at);
        d
    }

    fn get(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.nanos.load(Ordering::Acquire))
    }

    fn extend(&self, at: Instant) {
        let nanos =
            u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_max(nanos, Ordering::AcqRel);
    }
}

/// What the layers above keep per session, or per family of sibling sessions, by type, opaque
/// to the session (the engine's book of the keys a session made, a work queue's shared reads).
#[derive(Default)]
struct Extensions(StdMutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>);

impl Extensions {
    /// The value of type `T`, made by `init` on first use.
    fn get<T: Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> Arc<T> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let value = map
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Arc::new(init()));
        Arc::clone(value)
            .downcast::<T>()
            .unwrap_or_else(|_| unreachable!("extensions are stored under their own type"))
    }
}

/// What a session shares with its siblings ([`sibling`](super::LeasedSession::sibling)): the
/// one watch stream their waits use, and what the layers above keep for all of them.
pub(crate) struct Family {
    hub: Arc<Hub>,
    extensions: Extensions,
}

/// The session: what its handles, guards, jobs and background task share.
pub(crate) struct Session {
    /// This session itself, for futures that must own it.
    me: Weak<Session>,
    pub(crate) lease_id: i64,
    pub(crate) ttl: Duration,
    pub(crate) margin: Duration,
    pub(crate) keepalive_timeout: Duration,
    /// How long an enqueue may wait for a sibling's write ([`SessionOptions::with_linger`]).
    ///
    /// [`SessionOptions::with_linger`]: crate::SessionOptions::with_linger
    pub(crate) linger: Duration,
    pub(crate) rpc: Rpc,
    /// What it shares with its siblings: the one watch stream of their waits, and more.
    pub(super) family: Arc<Family>,
    state: watch::Sender<SessionState>,
    reason: OnceLock<LossReason>,
    deadline: Deadline,
    pub(super) jobs: Jobs,
    pub(super) stop: CancellationToken,
    pub(super) closing: AtomicBool,
    pub(super) tasks: TaskTracker,
    extensions: Extensions,
}

impl Session {
    /// The session of lease `lease_id` (of TTL `ttl`), whose deadline `live` keeps (counted
    /// from `epoch`); its jobs go to `jobs`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        me: Weak<Session>,
        lease_id: i64,
        ttl: Duration,
        margin: Duration,
        keepalive_timeout: Duration,
        linger: Duration,
        rpc: Rpc,
        tasks: TaskTracker,
        live: &Liveness,
        epoch: Instant,
        jobs: Jobs,
        family: Option<Arc<Family>>,
    ) -> Session {
        Session {
            me,
            lease_id,
            ttl,
            margin,
            keepalive_timeout,
            linger,
            family: family.unwrap_or_else(|| {
                Arc::new(Family {
                    hub: Arc::new(Hub::new(rpc.clone(), ttl / 3, ttl)),
                    extensions: Extensions::default(),
                })
            }),
            rpc,
            state: watch::channel(SessionState::Alive).0,
            reason: OnceLock::new(),
            deadline: Deadline::new(epoch, live.deadline()),
            jobs,
            stop: CancellationToken::new(),
            closing: AtomicBool::new(false),
            tasks,
            extensions: Extensions::default(),
        }
    }

    /// This session as an `Arc`, for a job that must own it (`None` only while it is being
    /// dropped).
    pub(crate) fn arc(&self) -> Option<Arc<Session>> {
        self.me.upgrade()
    }

    /// Spawns a background task of this session (tracked by its `BackgroundTasks`).
    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    /// The reason the session is Lost, if it is. Decided on the clock too: past the deadline
    /// the session is Lost whether or not its task has run since (a starved or dead task
    /// cannot keep a session alive).
    pub(crate) fn loss(&self) -> Option<LossReason> {
        if *self.state.borrow() != SessionState::Lost && Instant::now() >= self.deadline.get() {
            self.mark_lost(LossReason::DeadlineExceeded);
        }
        if *self.state.borrow() == SessionState::Lost {
            Some(self.reason.get().copied().unwrap_or(LossReason::Closed))
        } else {
            None
        }
    }

    /// The first reason recorded, if any (also before the state says Lost).
    pub(super) fn recorded_reason(&self) -> Option<LossReason> {
        self.reason.get().copied()
    }

    /// The state now (Lost once the deadline has passed, see [`loss`](Self::loss)).
    pub(crate) fn state(&self) -> SessionState {
        match self.loss() {
            Some(_) => SessionState::Lost,
            None => *self.state.borrow(),
        }
    }

    /// A receiver of every state change.
    pub(super) fn subscribe(&self) -> watch::Receiver<SessionState> {
        self.state.subscribe()
    }

    /// `Ok` unless the session is Lost.
    pub(crate) fn check(&self) -> Result<(), Error> {
        match self.loss() {
            Some(reason) => Err(Error::lost(reason)),
            None => Ok(()),
        }
    }

    /// Completes when the session is Lost, with the reason. Checks the clock whenever it is
    /// polled; the session's task marks the session Lost at the deadline (or, if the task
    /// dies, as it dies). Does not keep the lease alive.
    pub(crate) fn lost(self: &Arc<Self>) -> impl Future<Output = LossReason> + Send + 'static {
        let mut rx = self.state.subscribe();
        let session = Arc::clone(self);
        async move {
            loop {
                if let Some(reason) = session.loss() {
                    return reason;
                }
                // The sender lives in `session`, which this future holds: cannot fail.
                let _ = rx.changed().await;
            }
        }
    }

    /// How the session's waits go: through its request handle, until it is Lost, probing a
    /// watch quiet for a third of the TTL.
    pub(crate) fn waits(&self) -> Waits<'_> {
        Waits {
            rpc: &self.rpc,
            stop: self,
            quiet: self.ttl / 3,
            hub: Some(&self.family.hub),
            lease: self.lease_id,
        }
    }

    /// Hands `job` to the session's background task, which runs it concurrently with the
    /// others until it ends or the session is Lost (then it is dropped: the lease's end
    /// removes whatever it was to clean up). Synchronous; never blocks. `make` gets the job's
    /// [`PendingWork`]: `settled()` waits until the job drops it. A job that fails with
    /// anything but the session's loss ends the session ([`LossReason::CleanupFailed`]).
    pub(crate) fn submit<F, Fut>(&self, make: F)
    where
        F: FnOnce(PendingWork) -> Fut,
        Fut: Future<Output = Result<(), Error>> + Send + 'static,
    {
        let job: Pin<Box<dyn Future<Output = Result<(), Error>> + Send>> =
            Box::pin(make(self.jobs.pending_work()));
        if !self.jobs.submit(job) {
            tracing::debug!(
                lease = self.lease_id,
                "session task ended; the lease's end removes what the job was for"
            );
        }
    }

    /// Marks background work as under way until the returned value is dropped.
    pub(crate) fn pending_work(&self) -> PendingWork {
        self.jobs.pending_work()
    }

    /// The value of type `T` the layers above keep for this session, made by `init` on first
    /// use.
    pub(crate) fn extension<T: Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> Arc<T> {
        self.extensions.get(init)
    }

    /// The value of type `T` the layers above keep for this session and its siblings, made by
    /// `init` on first use.
    pub(crate) fn family_extension<T: Any + Send + Sync>(
        &self,
        init: impl FnOnce() -> T,
    ) -> Arc<T> {
        self.family.extensions.get(init)
    }

    pub(super) fn mark_lost(&self, reason: LossReason) {
        let _ = self.reason.set(reason);
        let changed = self.state.send_if_modified(|s| {
            let changed = *s != SessionState::Lost;
            *s = SessionState::Lost;
            changed
        });
        if changed {
            metrics::session_state("lost");
            metrics::session_lost(self.reason.get().copied().unwrap_or(reason));
        }
    }

    pub(super) fn publish(&self, live: &Liveness) {
        if let Some(reason) = live.reason() {
            self.mark_lost(reason);
            return;
        }
        self.deadline.extend(live.deadline());
        let new = live.state();
        let changed = self.state.send_if_modified(|s| {
            let changed = *s != SessionState::Lost && *s != new;
            if changed {
                *s = new;
            }
            changed
        });
        if changed {
            metrics::session_state(match new {
                SessionState::Alive => "alive",
                SessionState::Suspended => "suspended",
                SessionState::Lost => "lost",
            });
        }
    }

    /// Revokes the lease, retrying what may succeed again with backoff for up to two TTLs: a
    /// session that went Lost in a partition revokes as soon as etcd answers again, rather
    /// than leave its lease — and every key on it — to expire on the server, which a leader
    /// change can postpone by a whole TTL each time (lease checkpointing off).
    pub(super) async fn revoke_persistently(&self) -> Result<(), Error> {
        let until = Instant::now() + self.ttl.saturating_mul(2);
        let mut backoff = crate::backoff::Backoff::for_requests();
        loop {
            match self.rpc.lease_revoke(self.lease_id).await {
                Err(e) if e.is_retryable() && Instant::now() < until => {
                    tokio::time::sleep(backoff.next_delay()).await
                }
                other => return other,
            }
        }
    }
}

impl Stop for Session {
    fn check(&self) -> Result<(), Error> {
        Session::check(self)
    }

    fn stopped(&self) -> Pin<Box<dyn Future<Output = Error> + Send + 'static>> {
        match self.me.upgrade() {
            Some(session) => {
                let lost = session.lost();
                Box::pin(async move { Error::lost(lost.await) })
            }
            None => Box::pin(std::future::ready(Error::SessionClosed)),
        }
    }
}
