//! [`LeasedSession`]: a lease that keeps itself alive and knows, on its own clock, when it may
//! be gone — and a queue of opaque background jobs it runs for as long as it lives. It knows
//! nothing of keys or primitives. Its rooms: [`options`] (what a session asks for),
//! [`grant`] (getting a lease: granting or adopting one), [`liveness`] (the state machine, no
//! I/O), [`keepalive`] (the refresh loop), [`jobs`] (the background jobs), [`core`] (the
//! session behind every handle) and [`driver`] (its one background task).
//!
//! [`LeasedSession::resume`] is defined by the engine (`engine/resume.rs`): a resumed lease
//! comes with keys, and the engine answers for them.

mod core;
mod driver;
mod grant;
pub(crate) mod jobs;
mod keepalive;
mod liveness;
mod options;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use tokio::sync::watch;
use tokio_util::sync::DropGuard;
use tokio_util::task::TaskTracker;

pub(crate) use self::core::{Family, Session};
use crate::rpc::{Rpc, Stats};
use crate::{Error, LossReason};
pub(crate) use grant::Adopted;
pub(crate) use jobs::PendingWork;
use liveness::Liveness;
pub use options::{SessionOptions, MAX_LEASE_TTL_SECS};

/// Counters of what a session has sent and received, for diagnostics and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionMetrics {
    /// Lease refresh requests sent (including the one that opens each keep-alive stream).
    pub keepalive_requests: u64,
    /// Txns sent by the session's primitives and background clean-ups.
    pub txns: u64,
    /// Plain range reads sent (a work queue's scans and inspections, for instance; a scan
    /// that sibling sessions' claims share counts for the session whose claim sent it).
    pub reads: u64,
    /// Watches requested by the session's waits and background clean-ups: one per prefix the
    /// session's shared stream watches (registered once, then shared by every wait under
    /// it; etcd is sent two creations of it, twins, one cancelled once the other delivers:
    /// docs/design.md, "Twins"), and one per target of a wait on a stream of its own.
    pub watches: u64,
    /// Watch streams opened (gRPC streams): the session's shared stream each time it is
    /// (re)opened, and one per wait that watches etcd's history or keys outside one prefix.
    pub watch_streams: u64,
    /// Watch events that woke the session's waits (a hand-off behind a long queue delivers
    /// the release's events to the one waiter it lets in; in a short queue whose waiters
    /// count its deletions, to each of them).
    pub watch_events: u64,
    /// Progress requests sent to probe a wait's quiet watch stream.
    pub watch_probes: u64,
    /// Decisions of a waiter behind a long queue (longer than its enqueue's one page) taken
    /// from the mirror of the queue that the session's watch stream keeps, instead of a read
    /// of the queue (which etcd answers by reading all of it). The mirror is built by one
    /// paged read (counted in `reads`) per stream, shared by sibling sessions.
    pub mirrored_decisions: u64,
    /// Background jobs queued or running now (a gauge, unlike the counters above): clean-ups
    /// under way, touches, sweeps that watch for late copies of a put whose answer was lost,
    /// and requests finished for callers that dropped them mid-request.
    pub background_jobs: u64,
}

/// Where a session stands. See [`LeasedSession`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionState {
    /// The last refresh was acknowledged and the local deadline lies ahead.
    Alive,
    /// Refreshes are failing but the local deadline has not passed: the lease still exists,
    /// but the holder cannot be sure it will be kept.
    Suspended,
    /// The lease is gone or may be gone (deadline passed, TTL ≤ 0 reply, revoked, closed).
    /// Final.
    Lost,
}

/// A lease that refreshes itself in the background and knows, on its own clock, when it may
/// be gone.
///
/// Every primitive of this crate hangs its keys on a session's lease. The session is a cheap
/// [`Clone`] handle: every guard holds one, so the lease lives while any guard lives. When the
/// last handle is dropped the lease is revoked in the background; [`close()`](Self::close)
/// revokes it and reports the outcome.
///
/// # States
/// [`Alive`](SessionState::Alive) while refreshes are acknowledged;
/// [`Suspended`](SessionState::Suspended) while they fail and the local deadline has not
/// passed; [`Lost`](SessionState::Lost) (final) once the deadline passes, etcd answers that the
/// lease is gone, or the session is closed. The deadline is the monotonic time at which the last
/// *acknowledged* refresh was *sent*, plus the granted TTL, minus the safety margin: it always
/// falls before the server can expire the lease.
///
/// # Background work
/// One task per session refreshes the lease every third of the TTL (each refresh with its own
/// response deadline; a failed stream is re-opened with jittered backoff) and carries out the
/// fenced clean-ups that dropped guards and cancelled acquisitions hand to it — retried until
/// they succeed or the session is Lost. It ends when the session is Lost or its last handle is
/// dropped, revoking the lease on the way out if the lease may still exist (retried until etcd
/// answers, for up to two TTLs). If the task stops any other way — its runtime shut down, a
/// panic — the session is Lost at once ([`LossReason::KeepAliveStopped`]); and past the
/// deadline the session is Lost whether or not its task has run since: every check compares
/// the deadline with the clock itself.
///
/// # Client settings
/// A blackholed connection is noticed only through HTTP/2 keep-alive; connect with
/// [`recommended_connect_options`](crate::recommended_connect_options) (or similar settings) and run etcd with
/// `--grpc-keepalive-min-time` at or below the keep-alive interval, or etcd closes connections
/// that ping too often.
///
/// # Example
/// ```no_run
/// # async fn demo() -> Result<(), etcd_coord::Error> {
/// use std::time::Duration;
/// use etcd_coord::{LeasedSession, SessionOptions, SessionState};
///
/// let client = etcd_client::Client::connect(["127.0.0.1:2379"], None).await?;
/// let session = LeasedSession::new(client, SessionOptions::new().with_ttl(Duration::from_secs(5))).await?;
/// assert_eq!(session.state(), SessionState::Alive);
/// tokio::select! {
///     reason = session.lost() => eprintln!("lease lost: {reason}"),
///     _ = tokio::time::sleep(Duration::from_secs(1)) => {}
/// }
/// session.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct LeasedSession {
    handle: Arc<Handle>,
}

/// One per session; dropping the last `LeasedSession` drops it and stops the task.
struct Handle {
    session: Arc<Session>,
    _stop: DropGuard,
}

impl std::fmt::Debug for LeasedSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeasedSession")
            .field("lease_id", &self.lease_id())
            .field("ttl", &self.ttl())
            .field("state", &self.state())
            .finish()
    }
}

impl LeasedSession {
    /// Grants a lease and starts keeping it alive.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a TTL of zero or beyond etcd's maximum, or a margin or
    /// timeout out of range (nothing is sent); [`Error::Etcd`] or [`Error::Timeout`] when the
    /// grant fails.
    ///
    /// # Cancel safety
    /// The lease's id is chosen here, before the grant is sent. If the grant's answer is lost,
    /// or the future is dropped before it arrives, a background task revokes that id (retrying
    /// while etcd is unreachable, for up to twice the TTL), so a grant that landed unseen does
    /// not live on for its TTL.
    #[tracing::instrument(name = "etcd_coord.session.new", skip_all, fields(ttl = ?options.ttl(), lease = tracing::field::Empty))]
    pub async fn new(client: Client, options: SessionOptions) -> Result<LeasedSession, Error> {
        let ttl_secs = options.validate()?;
        let (rpc, tasks) = LeasedSession::rpc(client, &options);
        let lease = Box::pin(grant::grant(&rpc, ttl_secs)).await?;
        tracing::Span::current().record(
            "lease",
            tracing::field::display(format_args!("{:x}", lease.id)),
        );
        Ok(LeasedSession::start(rpc, tasks, lease, &options, None))
    }

    /// Grants another lease on this session's client, whose waits share this session's watch
    /// stream: a process that holds many sessions on one connection (many leases, say, one
    /// per job) then keeps one watch stream — and one watch per lock it waits on — instead of
    /// one per session. Siblings' [`WorkQueue`](crate::WorkQueue) claims of one queue also
    /// share their reads and try different jobs first (a burst of claims reads the queue
    /// once; `docs/queue.md`). Siblings are independent otherwise: each has its own lease,
    /// state, keep-alive and clean-ups, and closing one does not close the others.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    ///
    /// # Cancel safety
    /// As [`new`](Self::new).
    ///
    /// # Example
    /// ```no_run
    /// # async fn demo(session: etcd_coord::LeasedSession) -> Result<(), etcd_coord::Error> {
    /// use etcd_coord::{Mutex, SessionOptions};
    ///
    /// let other = session.sibling(SessionOptions::new()).await?;
    /// let _held = Mutex::new(&session, "jobs/a").lock().await?;
    /// let _other = Mutex::new(&other, "jobs/b").lock().await?;
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(name = "etcd_coord.session.sibling", skip_all, fields(ttl = ?options.ttl(), lease = tracing::field::Empty))]
    pub async fn sibling(&self, options: SessionOptions) -> Result<LeasedSession, Error> {
        let ttl_secs = options.validate()?;
        let (rpc, tasks) = LeasedSession::rpc(self.client().clone(), &options);
        let lease = Box::pin(grant::grant(&rpc, ttl_secs)).await?;
        tracing::Span::current().record(
            "lease",
            tracing::field::display(format_args!("{:x}", lease.id)),
        );
        let family = Arc::clone(&self.handle.session.family);
        Ok(LeasedSession::start(
            rpc,
            tasks,
            lease,
            &options,
            Some(family),
        ))
    }

    /// Adopts lease `lease_id`, which still exists, and keeps it alive from now on: the
    /// session of [`resume`](Self::resume), with the keys the lease held. The lease keeps the
    /// TTL it was granted with (`options`' TTL is not used; its margin and timeouts are
    /// checked against the lease's TTL).
    pub(crate) async fn adopt(
        client: Client,
        lease_id: i64,
        options: &SessionOptions,
    ) -> Result<(LeasedSession, Vec<Vec<u8>>), Error> {
        if lease_id <= 0 {
            return Err(Error::InvalidArgument(format!(
                "lease id {lease_id} is not one etcd grants (they are positive)"
            )));
        }
        // The TTL is the lease's, known only once read: check the rest now, the margins below.
        options.validate_for(Duration::MAX)?;
        let (rpc, tasks) = LeasedSession::rpc(client, options);
        let Adopted { lease, keys } = Box::pin(grant::adopt(&rpc, lease_id)).await?;
        options.validate_for(lease.ttl)?;
        Ok((LeasedSession::start(rpc, tasks, lease, options, None), keys))
    }

    /// The request handle and the tasks of a session about to be made.
    fn rpc(client: Client, options: &SessionOptions) -> (Rpc, TaskTracker) {
        let tasks = TaskTracker::new();
        // Closed at once: `wait()` completes whenever no task runs (spawning stays possible).
        tasks.close();
        (
            Rpc::new(client, options.request_timeout, tasks.clone()),
            tasks,
        )
    }

    /// Starts the session of `lease`.
    fn start(
        rpc: Rpc,
        tasks: TaskTracker,
        lease: grant::Lease,
        options: &SessionOptions,
        family: Option<Arc<Family>>,
    ) -> LeasedSession {
        let ttl = lease.ttl;
        let margin = options.safety_margin.unwrap_or(ttl / 5);
        let keepalive_timeout = options.keepalive_timeout.unwrap_or(ttl / 5);
        let live = Liveness::new(lease.sent, ttl, margin);
        rpc.saw_revision(lease.revision);
        let (jobs, queue) = jobs::Jobs::new();
        let session = Arc::new_cyclic(|me| {
            Session::new(
                me.clone(),
                lease.id,
                ttl,
                margin,
                keepalive_timeout,
                options.linger,
                rpc,
                tasks,
                &live,
                lease.sent,
                jobs,
                family,
            )
        });
        let watchdog = driver::Watchdog {
            session: Arc::clone(&session),
            armed: true,
        };
        session.spawn(driver::drive(watchdog, live, queue));
        let stop = session.stop.clone();
        LeasedSession {
            handle: Arc::new(Handle {
                session,
                _stop: stop.drop_guard(),
            }),
        }
    }

    /// The session behind this handle.
    pub(crate) fn inner(&self) -> &Arc<Session> {
        &self.handle.session
    }

    /// The lease's ID.
    pub fn lease_id(&self) -> i64 {
        self.handle.session.lease_id
    }

    /// The TTL etcd granted (may exceed the requested one).
    pub fn ttl(&self) -> Duration {
        self.handle.session.ttl
    }

    /// The safety margin in force: the session declares itself Lost this long before the
    /// server could expire the lease.
    pub fn safety_margin(&self) -> Duration {
        self.handle.session.margin
    }

    /// The client the session talks through.
    pub fn client(&self) -> &Client {
        self.handle.session.rpc.client()
    }

    /// The current state. Past the deadline it is [`Lost`](SessionState::Lost), decided on
    /// the clock at this call, whether or not the session's task has run since.
    pub fn state(&self) -> SessionState {
        self.handle.session.state()
    }

    /// Why the session is Lost, once it is.
    pub fn loss_reason(&self) -> Option<LossReason> {
        self.handle.session.loss()
    }

    /// A receiver of every state change; the state at subscription counts as already seen,
    /// so `changed()` waits for the next transition.
    pub fn subscribe(&self) -> watch::Receiver<SessionState> {
        self.handle.session.subscribe()
    }

    /// Completes when the session becomes [`Lost`](SessionState::Lost) (at once if it is),
    /// with the reason. Owns what it needs (`'static`), does not keep the lease alive, and can
    /// be used in `select!`.
    pub fn lost(&self) -> impl Future<Output = LossReason> + Send + 'static {
        self.handle.session.lost()
    }

    /// A monitor of the session's background tasks (its keepalive/clean-up task and any
    /// acquisition request still finishing after its caller went away). It does not keep the
    /// session alive; use it to check that nothing outlives a session.
    pub fn background_tasks(&self) -> BackgroundTasks {
        BackgroundTasks {
            tracker: self.handle.session.tasks.clone(),
        }
    }

    /// What the session has sent and received so far.
    pub fn metrics(&self) -> SessionMetrics {
        let stats = self.handle.session.rpc.stats();
        SessionMetrics {
            keepalive_requests: Stats::get(&stats.keepalive_requests),
            txns: Stats::get(&stats.txns),
            reads: Stats::get(&stats.ranges),
            watches: Stats::get(&stats.watches),
            watch_streams: Stats::get(&stats.watch_streams),
            watch_events: Stats::get(&stats.watch_events),
            watch_probes: Stats::get(&stats.watch_probes),
            mirrored_decisions: Stats::get(&stats.mirrored),
            background_jobs: self.handle.session.jobs.running() as u64,
        }
    }

    /// Completes when every background clean-up handed to the session so far (by dropped
    /// guards, cancelled acquisitions, releases that failed) has finished. Clean-ups retry
    /// transient failures for as long as the session lives, so during an outage this waits
    /// until etcd answers again or the session is Lost (which drops them: the lease's end
    /// removes their keys). Useful before shutting down and in tests.
    pub async fn settled(&self) {
        self.handle.session.jobs.settled().await;
    }

    /// Makes the session Lost for every handle and guard, stops its background task and
    /// revokes the lease, so every key attached to it vanishes. Calling it again retries the
    /// revocation.
    ///
    /// # Errors
    /// [`Error::Etcd`] or [`Error::Timeout`] when the revocation fails; the lease then ends by
    /// its TTL, as nothing refreshes it any more.
    ///
    /// # Cancel safety
    /// The session is Lost and its task stopped before the first await; dropping the future
    /// only abandons the revocation (the lease then ends by its TTL).
    #[tracing::instrument(name = "etcd_coord.session.close", skip_all, fields(lease = %format_args!("{:x}", self.lease_id())))]
    pub async fn close(&self) -> Result<(), Error> {
        let session = &self.handle.session;
        if session.recorded_reason() == Some(LossReason::Orphaned) {
            return Ok(()); // handed off: not ours to revoke
        }
        session.closing.store(true, Ordering::SeqCst);
        session.mark_lost(LossReason::Closed);
        session.stop.cancel();
        session.rpc.lease_revoke(session.lease_id).await
    }

    /// Stops refreshing the lease **without revoking it** and returns its id, so that another
    /// process can [`resume`](Self::resume) it before its TTL runs out (Go's `Orphan`). The
    /// session is Lost at once ([`LossReason::Orphaned`]) for every handle and guard: guards
    /// stop claiming anything (their [`Fence::lost`](crate::Fence::lost) completes, fenced
    /// writes fail with [`Error::SessionLost`]), and neither dropping them nor the session
    /// deletes a key or revokes the lease any more — the keys stay for whoever resumes the
    /// lease, or end with it on its TTL. [`close()`](Self::close) afterwards does nothing.
    ///
    /// A session that is already Lost for another reason keeps that reason (its lease may be
    /// gone or being revoked); the id is returned all the same.
    ///
    /// A clean-up that the session's task was sending at this moment (a release of a guard
    /// dropped just before) may still land.
    ///
    /// # Example
    /// ```no_run
    /// # async fn demo(session: etcd_coord::LeasedSession) {
    /// let lease_id = session.orphan();
    /// // Hand `lease_id` (and any lock's key and fencing token) to the next process.
    /// # let _ = lease_id; }
    /// ```
    pub fn orphan(&self) -> i64 {
        let session = &self.handle.session;
        session.mark_lost(LossReason::Orphaned);
        session.stop.cancel();
        session.lease_id
    }
}

/// The background tasks of one [`LeasedSession`], from
/// [`background_tasks()`](LeasedSession::background_tasks). Holding it does not keep the session
/// alive.
#[derive(Debug, Clone)]
pub struct BackgroundTasks {
    tracker: TaskTracker,
}

impl BackgroundTasks {
    /// How many of the session's tasks are running now.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// True when none is running: the session has ended (closed, dropped or Lost), and with
    /// it its background task, which finishes the requests that callers dropped mid-request
    /// (or, once the session has ended, drops them: the lease's end removes what they were for).
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Completes when no task of the session runs any more.
    pub async fn finished(&self) {
        self.tracker.wait().await;
    }
}
