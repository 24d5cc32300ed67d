//! [`LeasedSession`]: a lease that keeps itself alive and knows, on its own clock, when it may
//! be gone.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use etcd_client::Client;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::liveness::Liveness;
use crate::{keys, Error, LossReason};

/// etcd's largest lease TTL (`MaxLeaseTTL`), in seconds.
pub const MAX_LEASE_TTL_SECS: u64 = 9_000_000_000;

/// Options for [`LeasedSession::new`], as `with_*` builders. `Default` equals [`new()`](Self::new).
///
/// ```
/// use std::time::Duration;
/// use etcd_coord::SessionOptions;
///
/// let options = SessionOptions::new()
///     .with_ttl(Duration::from_secs(5))
///     .with_safety_margin(Duration::from_secs(1));
/// assert_eq!(options.ttl(), Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionOptions {
    ttl: Duration,
    safety_margin: Option<Duration>,
    keepalive_timeout: Option<Duration>,
    request_timeout: Duration,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions::new()
    }
}

impl SessionOptions {
    /// TTL 10 s; safety margin and refresh timeout each a fifth of the granted TTL; request
    /// timeout 5 s.
    pub fn new() -> SessionOptions {
        SessionOptions {
            ttl: Duration::from_secs(10),
            safety_margin: None,
            keepalive_timeout: None,
            request_timeout: Duration::from_secs(5),
        }
    }

    /// The lease TTL to request (rounded up to whole seconds; etcd may grant more: its
    /// minimum is about 2 s, and [`LeasedSession::ttl`] reports what was granted). Must be
    /// more than zero and at most [`MAX_LEASE_TTL_SECS`].
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long before the server could possibly expire the lease the session declares
    /// itself [`Lost`](SessionState::Lost): the holder's time to stop acting on what it holds,
    /// plus any difference between the client's and the server's clock rates. Default: a
    /// fifth of the granted TTL. Must be less than half the TTL.
    pub fn with_safety_margin(mut self, margin: Duration) -> Self {
        self.safety_margin = Some(margin);
        self
    }

    /// How long one lease refresh may go unanswered before the session counts it as failed
    /// (and becomes [`Suspended`](SessionState::Suspended)). Default: a fifth of the granted
    /// TTL. Must be more than zero and at most a third of the TTL (the refresh interval).
    pub fn with_keepalive_timeout(mut self, timeout: Duration) -> Self {
        self.keepalive_timeout = Some(timeout);
        self
    }

    /// The deadline of each request the session and its primitives send (grant, revoke,
    /// acquire, release, …). Default 5 s. Must be more than zero.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The requested TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The request timeout.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// The TTL in whole seconds, or why it is not acceptable.
    fn ttl_secs(&self) -> Result<i64, Error> {
        if self.ttl.is_zero() {
            return Err(Error::InvalidArgument("TTL must be more than zero".into()));
        }
        let secs = self.ttl.as_secs() + u64::from(self.ttl.subsec_nanos() > 0);
        if secs > MAX_LEASE_TTL_SECS {
            return Err(Error::InvalidArgument(format!(
                "TTL of {secs} s exceeds etcd's maximum of {MAX_LEASE_TTL_SECS} s"
            )));
        }
        Ok(secs as i64)
    }

    /// Checks everything that can be checked before the grant.
    fn validate(&self) -> Result<i64, Error> {
        let secs = self.ttl_secs()?;
        let requested = Duration::from_secs(secs as u64);
        if let Some(margin) = self.safety_margin {
            if margin >= requested / 2 {
                return Err(Error::InvalidArgument(format!(
                    "safety margin {margin:?} must be less than half the TTL ({requested:?})"
                )));
            }
        }
        if let Some(t) = self.keepalive_timeout {
            if t.is_zero() || t > requested / 3 {
                return Err(Error::InvalidArgument(format!(
                    "keepalive timeout {t:?} must be more than zero and at most a third of the TTL ({requested:?})"
                )));
            }
        }
        if self.request_timeout.is_zero() {
            return Err(Error::InvalidArgument(
                "request timeout must be more than zero".into(),
            ));
        }
        Ok(secs)
    }
}

/// Counters of what a session has sent and received, for diagnostics and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionMetrics {
    /// Lease refresh requests sent (including the one that opens each keep-alive stream).
    pub keepalive_requests: u64,
    /// Txns sent by the session's primitives and background clean-ups.
    pub txns: u64,
    /// Watch events delivered to the session's waits (a hand-off that wakes one waiter
    /// delivers one).
    pub watch_events: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) keepalive_requests: AtomicU64,
    pub(crate) txns: AtomicU64,
    pub(crate) watch_events: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
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

/// A background clean-up the session's task carries out for a guard or an abandoned
/// acquisition.
#[derive(Debug)]
pub(crate) enum Cleanup {
    /// Delete `key` if it is attached to this session's lease: the outcome of the request
    /// that may have created it is unknown.
    Abandoned { key: String },
    /// Send `txn`, a release fenced on `key`'s create revision (safe to repeat).
    Txn { key: String, txn: etcd_client::Txn },
}

impl Cleanup {
    /// Delete `key` if it is still the incarnation created at `create_revision`.
    pub(crate) fn release(key: String, create_revision: i64) -> Cleanup {
        let txn = keys::fenced_delete(&key, create_revision);
        Cleanup::Txn { key, txn }
    }
}

/// Counts one piece of background work (a queued clean-up, a detached request) while it lives.
pub(crate) struct PendingWork(Arc<watch::Sender<usize>>);

impl PendingWork {
    fn new(counter: &Arc<watch::Sender<usize>>) -> PendingWork {
        counter.send_modify(|n| *n += 1);
        PendingWork(Arc::clone(counter))
    }
}

impl Drop for PendingWork {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// A clean-up in the queue, counted until it is done or dropped.
struct Job {
    cleanup: Cleanup,
    _pending: PendingWork,
}

/// What the session's handles, guards and background task share.
pub(crate) struct Shared {
    pub(crate) client: Client,
    pub(crate) lease_id: i64,
    pub(crate) ttl: Duration,
    pub(crate) margin: Duration,
    pub(crate) keepalive_timeout: Duration,
    pub(crate) request_timeout: Duration,
    state: watch::Sender<SessionState>,
    reason: OnceLock<LossReason>,
    cleanups: mpsc::UnboundedSender<Job>,
    pending: Arc<watch::Sender<usize>>,
    seq: AtomicU64,
    stop: CancellationToken,
    closing: AtomicBool,
    tasks: TaskTracker,
    pub(crate) counters: Counters,
}

impl Shared {
    /// Spawns a background task of this session (tracked by [`BackgroundTasks`]).
    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    /// The reason the session is Lost, if it is.
    pub(crate) fn loss(&self) -> Option<LossReason> {
        if *self.state.borrow() == SessionState::Lost {
            Some(self.reason.get().copied().unwrap_or(LossReason::Closed))
        } else {
            None
        }
    }

    /// `Ok` unless the session is Lost.
    pub(crate) fn check(&self) -> Result<(), Error> {
        match self.loss() {
            Some(reason) => Err(Error::lost(reason)),
            None => Ok(()),
        }
    }

    /// Completes when the session is Lost, with the reason. Does not keep the lease alive.
    pub(crate) fn lost(self: &Arc<Self>) -> impl Future<Output = LossReason> + Send + 'static {
        let mut rx = self.state.subscribe();
        let shared = Arc::clone(self);
        async move {
            // The sender lives in `shared`, which this future holds: wait_for cannot fail.
            let _ = rx.wait_for(|s| *s == SessionState::Lost).await;
            shared.reason.get().copied().unwrap_or(LossReason::Closed)
        }
    }

    /// A sequence number unique within this session, for member keys.
    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Hands a clean-up to the session's background task. Synchronous; never blocks. If the
    /// task has ended (session Lost), the lease's revocation or expiry removes the key.
    pub(crate) fn clean_up(&self, cleanup: Cleanup) {
        let job = Job {
            cleanup,
            _pending: self.pending_work(),
        };
        if self.cleanups.send(job).is_err() {
            tracing::debug!(
                lease = self.lease_id,
                "session task ended; the lease's end removes the key"
            );
        }
    }

    /// Marks background work as under way until the returned value is dropped.
    pub(crate) fn pending_work(&self) -> PendingWork {
        PendingWork::new(&self.pending)
    }

    fn mark_lost(&self, reason: LossReason) {
        let _ = self.reason.set(reason);
        self.state.send_if_modified(|s| {
            let changed = *s != SessionState::Lost;
            *s = SessionState::Lost;
            changed
        });
    }

    fn publish(&self, live: &Liveness) {
        if let Some(reason) = live.reason() {
            self.mark_lost(reason);
            return;
        }
        let new = live.state();
        self.state.send_if_modified(|s| {
            let changed = *s != SessionState::Lost && *s != new;
            if changed {
                *s = new;
            }
            changed
        });
    }

    /// Revokes the lease; a lease that is already gone counts as revoked.
    async fn revoke(&self) -> Result<(), Error> {
        let mut lease = self.client.lease_client();
        match timeout(self.request_timeout, lease.revoke(self.lease_id)).await {
            Err(_) => Err(Error::Timeout(self.request_timeout)),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if lease_not_found(&e) => Ok(()),
            Ok(Err(e)) => Err(Error::Etcd(e)),
        }
    }
}

fn lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::NotFound || s.message().contains("lease not found")
        }
        _ => false,
    }
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
/// fenced clean-ups that dropped guards and cancelled acquisitions hand to it. It ends when the
/// session is Lost (revoking the lease on the way out if the lease may still exist) or its last
/// handle is dropped.
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
    shared: Arc<Shared>,
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
    pub async fn new(client: Client, options: SessionOptions) -> Result<LeasedSession, Error> {
        let ttl_secs = options.validate()?;
        let mut lease = client.lease_client();
        let sent = Instant::now();
        let granted = match timeout(options.request_timeout, lease.grant(ttl_secs, None)).await {
            Err(_) => return Err(Error::Timeout(options.request_timeout)),
            Ok(r) => r?,
        };
        if granted.ttl() <= 0 {
            return Err(Error::Protocol(format!(
                "lease granted with TTL {}",
                granted.ttl()
            )));
        }
        let ttl = Duration::from_secs(granted.ttl() as u64);
        let margin = options.safety_margin.unwrap_or(ttl / 5);
        let keepalive_timeout = options.keepalive_timeout.unwrap_or(ttl / 5);
        let (state, _) = watch::channel(SessionState::Alive);
        let (cleanups, jobs) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            client,
            lease_id: granted.id(),
            ttl,
            margin,
            keepalive_timeout,
            request_timeout: options.request_timeout,
            state,
            reason: OnceLock::new(),
            cleanups,
            pending: Arc::new(watch::channel(0).0),
            seq: AtomicU64::new(0),
            stop: stop.clone(),
            closing: AtomicBool::new(false),
            tasks: TaskTracker::new(),
            counters: Counters::default(),
        });
        // Closed at once: `wait()` completes whenever no task runs (spawning stays possible).
        shared.tasks.close();
        let live = Liveness::new(sent, ttl, margin);
        shared.spawn(drive(Arc::clone(&shared), live, jobs));
        Ok(LeasedSession {
            handle: Arc::new(Handle {
                shared,
                _stop: stop.drop_guard(),
            }),
        })
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// The lease's ID.
    pub fn lease_id(&self) -> i64 {
        self.handle.shared.lease_id
    }

    /// The TTL etcd granted (may exceed the requested one).
    pub fn ttl(&self) -> Duration {
        self.handle.shared.ttl
    }

    /// The safety margin in force: the session declares itself Lost this long before the
    /// server could expire the lease.
    pub fn safety_margin(&self) -> Duration {
        self.handle.shared.margin
    }

    /// The client the session talks through.
    pub fn client(&self) -> &Client {
        &self.handle.shared.client
    }

    /// The current state.
    pub fn state(&self) -> SessionState {
        *self.handle.shared.state.borrow()
    }

    /// Why the session is Lost, once it is.
    pub fn loss_reason(&self) -> Option<LossReason> {
        self.handle.shared.loss()
    }

    /// A receiver of every state change; the state at subscription counts as already seen,
    /// so `changed()` waits for the next transition.
    pub fn subscribe(&self) -> watch::Receiver<SessionState> {
        self.handle.shared.state.subscribe()
    }

    /// Completes when the session becomes [`Lost`](SessionState::Lost) (at once if it is),
    /// with the reason. Owns what it needs (`'static`), does not keep the lease alive, and can
    /// be used in `select!`.
    pub fn lost(&self) -> impl Future<Output = LossReason> + Send + 'static {
        self.handle.shared.lost()
    }

    /// A monitor of the session's background tasks (its keepalive/clean-up task and any
    /// acquisition request still finishing after its caller went away). It does not keep the
    /// session alive; use it to check that nothing outlives a session.
    pub fn background_tasks(&self) -> BackgroundTasks {
        BackgroundTasks {
            tracker: self.handle.shared.tasks.clone(),
        }
    }

    /// What the session has sent and received so far.
    pub fn metrics(&self) -> SessionMetrics {
        let c = &self.handle.shared.counters;
        SessionMetrics {
            keepalive_requests: c.keepalive_requests.load(Ordering::Relaxed),
            txns: c.txns.load(Ordering::Relaxed),
            watch_events: c.watch_events.load(Ordering::Relaxed),
        }
    }

    /// Completes when every background clean-up handed to the session so far (by dropped
    /// guards, cancelled acquisitions, releases that failed) has finished, or has been given
    /// up after its retries (the lease's end is then the backstop). Useful before shutting down
    /// and in tests.
    pub async fn settled(&self) {
        let mut rx = self.handle.shared.pending.subscribe();
        // The sender lives in `shared`, which this handle keeps: wait_for cannot fail.
        let _ = rx.wait_for(|n| *n == 0).await;
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
    pub async fn close(&self) -> Result<(), Error> {
        let shared = &self.handle.shared;
        shared.closing.store(true, Ordering::SeqCst);
        shared.mark_lost(LossReason::Closed);
        shared.stop.cancel();
        shared.revoke().await
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

    /// True when none is running: the session has ended (closed, dropped or Lost) and every
    /// request it left behind has finished.
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Completes when no task of the session runs any more.
    pub async fn finished(&self) {
        self.tracker.wait().await;
    }
}

/// Waits for `fut` until `deadline`; `None` if the deadline came first.
async fn before<F: Future>(deadline: Instant, fut: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        out = fut => Some(out),
        _ = sleep_until(deadline) => None,
    }
}

/// The session's one background task: keeps the lease alive and runs clean-ups until the
/// session is Lost or its last handle is dropped.
async fn drive(shared: Arc<Shared>, mut live: Liveness, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let outcome = tokio::select! {
        reason = keep_alive(&shared, &mut live) => Some(reason),
        _ = run_cleanups(&shared, &mut jobs) => None,
        _ = shared.stop.cancelled() => None,
    };
    // Clean-ups still queued or running are moot once the lease ends; drop them (and their
    // pending counts) now.
    drop(jobs);
    match outcome {
        Some(reason) => {
            tracing::warn!(lease = shared.lease_id, %reason, "session lost");
            shared.mark_lost(reason);
            if reason == LossReason::DeadlineExceeded {
                // The lease may still exist on the server: end it now rather than at its TTL,
                // so others need not wait.
                let _ = shared.revoke().await;
            }
        }
        None => {
            shared.mark_lost(LossReason::Closed);
            if !shared.closing.load(Ordering::SeqCst) {
                if let Err(e) = shared.revoke().await {
                    tracing::warn!(lease = shared.lease_id, error = %e, "revoking the lease of a dropped session failed; it ends by its TTL");
                }
            }
        }
    }
}

/// Refreshes the lease until the session is Lost; returns why.
async fn keep_alive(shared: &Shared, live: &mut Liveness) -> LossReason {
    let interval = shared.ttl / 3;
    let mut backoff = Backoff::new(
        Duration::from_millis(50),
        (interval / 2).min(Duration::from_secs(1)),
    );
    let mut leases = shared.client.lease_client();
    loop {
        // Opening the stream sends the first refresh and waits for its answer.
        let sent = Instant::now();
        Counters::add(&shared.counters.keepalive_requests, 1);
        let opened = before(
            live.deadline(),
            timeout(shared.keepalive_timeout, leases.keep_alive(shared.lease_id)),
        )
        .await;
        match opened {
            None => live.on_tick(Instant::now()),
            Some(Ok(Ok((mut keeper, mut stream)))) => {
                live.on_ack(sent, shared.ttl, Instant::now());
                shared.publish(live);
                backoff.reset();
                let mut last_sent = sent;
                // Refresh on this stream until it fails or the session is Lost.
                while live.reason().is_none() {
                    if before(live.deadline(), sleep_until(last_sent + interval))
                        .await
                        .is_none()
                    {
                        live.on_tick(Instant::now());
                        break;
                    }
                    let sent = Instant::now();
                    Counters::add(&shared.counters.keepalive_requests, 1);
                    if keeper.keep_alive().await.is_err() {
                        live.on_failure(Instant::now());
                        break;
                    }
                    let answer = before(
                        live.deadline(),
                        timeout(shared.keepalive_timeout, stream.message()),
                    )
                    .await;
                    match answer {
                        None => live.on_tick(Instant::now()),
                        Some(Ok(Ok(Some(resp)))) => {
                            let ttl = Duration::from_secs(resp.ttl().max(0) as u64);
                            live.on_ack(sent, ttl, Instant::now());
                            last_sent = sent;
                        }
                        Some(Ok(Ok(None))) | Some(Ok(Err(_))) | Some(Err(_)) => {
                            tracing::debug!(
                                lease = shared.lease_id,
                                "lease refresh failed; re-opening the stream"
                            );
                            live.on_failure(Instant::now());
                            shared.publish(live);
                            break;
                        }
                    }
                    shared.publish(live);
                }
            }
            Some(Ok(Err(e))) if lease_not_found(&e) => live.on_lease_gone(),
            Some(Ok(Err(e))) => {
                tracing::debug!(lease = shared.lease_id, error = %e, "opening the keep-alive stream failed");
                live.on_failure(Instant::now());
            }
            Some(Err(_)) => live.on_failure(Instant::now()),
        }
        shared.publish(live);
        if let Some(reason) = live.reason() {
            return reason;
        }
        if before(live.deadline(), sleep(backoff.next_delay()))
            .await
            .is_none()
        {
            live.on_tick(Instant::now());
            shared.publish(live);
        }
        if let Some(reason) = live.reason() {
            return reason;
        }
    }
}

/// Runs the clean-ups handed to the session, concurrently. Never returns.
async fn run_cleanups(shared: &Shared, jobs: &mut mpsc::UnboundedReceiver<Job>) {
    let mut running = FuturesUnordered::new();
    loop {
        tokio::select! {
            job = jobs.recv() => match job {
                Some(job) => running.push(clean_up(shared, job)),
                // The sender lives in `shared`: cannot happen, but never spin.
                None => std::future::pending::<()>().await,
            },
            Some(()) = running.next(), if !running.is_empty() => {}
        }
    }
}

/// How many times a background clean-up is tried before the lease's end is left to do it.
const CLEANUP_ATTEMPTS: u32 = 8;

/// Carries out one clean-up, retrying on transport errors. An abandoned acquisition is
/// cleaned twice, the second time after a request timeout, in case the request that created
/// the key was still in flight the first time.
async fn clean_up(shared: &Shared, job: Job) {
    let job = &job.cleanup;
    let (key, passes) = match job {
        Cleanup::Txn { key, .. } => (key.as_str(), 1),
        Cleanup::Abandoned { key } => (key.as_str(), 2),
    };
    for pass in 0..passes {
        if pass > 0 {
            sleep(shared.request_timeout).await;
        }
        let mut backoff = Backoff::for_requests();
        for _ in 0..CLEANUP_ATTEMPTS {
            let txn = match job {
                Cleanup::Abandoned { key } => keys::lease_fenced_delete(key, shared.lease_id),
                Cleanup::Txn { txn, .. } => txn.clone(),
            };
            let mut kv = shared.client.kv_client();
            Counters::add(&shared.counters.txns, 1);
            match timeout(shared.request_timeout, kv.txn(txn)).await {
                Ok(Ok(resp)) => {
                    tracing::debug!(key, deleted = resp.succeeded(), "background clean-up done");
                    break;
                }
                Ok(Err(e)) => {
                    tracing::debug!(key, error = %e, "background clean-up failed; retrying")
                }
                Err(_) => tracing::debug!(key, "background clean-up timed out; retrying"),
            }
            sleep(backoff.next_delay()).await;
        }
    }
}
