//! [`LeasedSession`]: a lease that keeps itself alive and knows, on its own clock, when it may
//! be gone. Its rooms: [`options`] (what a session asks for), [`liveness`] (the state machine,
//! no I/O), [`keepalive`] (the refresh loop), [`cleanup`] (background releases), [`slots`]
//! (the numbers in member key names, used again) and [`leftovers`] (what a resumed session
//! does with the keys on its lease that it does not hold).

mod cleanup;
mod keepalive;
mod leftovers;
mod liveness;
mod options;
mod slots;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use etcd_client::{Client, LeaseGrantOptions, LeaseTimeToLiveOptions};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::error::within;
use crate::{Error, LossReason};
use cleanup::{run_cleanups, Job};
pub(crate) use cleanup::{Afterwards, Claimed, Cleanup, PendingWork, Sweep};
use keepalive::{keep_alive, lease_not_found};
pub(crate) use leftovers::Claim;
use leftovers::Leftovers;
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
    /// Watches requested by the session's waits and background clean-ups (each wait step
    /// opens one stream with a watch per target).
    pub watches: u64,
    /// Watch events delivered to the session's waits (a hand-off that wakes one waiter
    /// delivers one).
    pub watch_events: u64,
    /// Progress requests sent to probe a wait's quiet watch stream.
    pub watch_probes: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) keepalive_requests: AtomicU64,
    pub(crate) txns: AtomicU64,
    pub(crate) watches: AtomicU64,
    pub(crate) watch_events: AtomicU64,
    pub(crate) watch_probes: AtomicU64,
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
    deadline: Deadline,
    /// The highest store revision seen in any answer to this session.
    revision: AtomicI64,
    cleanups: mpsc::UnboundedSender<Job>,
    pending: Arc<watch::Sender<usize>>,
    seq: AtomicU64,
    slots: slots::Slots,
    /// The names this session creates exclusively, and the sweeps of their late copies.
    pub(crate) names: cleanup::Names,
    stop: CancellationToken,
    closing: AtomicBool,
    tasks: TaskTracker,
    /// A resumed session's rule for the keys on its lease that it does not hold.
    leftovers: Option<Arc<Leftovers>>,
    pub(crate) counters: Counters,
    /// When a refused watch of this session may renew the client's auth token.
    auth_renewal: std::sync::Mutex<crate::error::RenewalGate>,
}

impl Shared {
    /// Spawns a background task of this session (tracked by [`BackgroundTasks`]).
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

    /// The state now (Lost once the deadline has passed, see [`loss`](Self::loss)).
    pub(crate) fn state(&self) -> SessionState {
        match self.loss() {
            Some(_) => SessionState::Lost,
            None => *self.state.borrow(),
        }
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
        let shared = Arc::clone(self);
        async move {
            loop {
                if let Some(reason) = shared.loss() {
                    return reason;
                }
                // The sender lives in `shared`, which this future holds: cannot fail.
                let _ = rx.changed().await;
            }
        }
    }

    /// Whether a refused watch may renew the auth token now (see `RenewalGate`).
    pub(crate) fn auth_renewal_due(&self) -> bool {
        self.auth_renewal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .due()
    }

    /// Records that an answer reported the store at `revision`.
    pub(crate) fn saw_revision(&self, revision: i64) {
        self.revision.fetch_max(revision, Ordering::Relaxed);
    }

    /// The highest store revision any answer to this session has reported: every change made
    /// after this call has a higher one.
    pub(crate) fn seen_revision(&self) -> i64 {
        self.revision.load(Ordering::Relaxed)
    }

    /// A number unique within this session, never used again (a barrier hold's token).
    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// A number for a member key's name that no key of this session that may exist carries;
    /// [`Afterwards::Reuse`] gives it back once the key is gone.
    pub(crate) fn take_slot(&self) -> u64 {
        self.slots.take()
    }

    /// Marks a put (or a taking-back) of `key` by this session as under way, so that a
    /// resumed session's rule for leftovers never deletes it; [`Claim::confirm`] records the
    /// key made. Call it before the request is sent. Costs nothing for a session that was not
    /// resumed.
    pub(crate) fn claim(&self, key: &str) -> Claim {
        Claim::new(self.leftovers.as_ref(), key)
    }

    /// Hands a clean-up to the session's background task. Synchronous; never blocks. If the
    /// task has ended (session Lost), the lease's revocation or expiry removes the key.
    pub(crate) fn clean_up(&self, cleanup: Cleanup) {
        let job = Job {
            cleanup,
            pending: Some(self.pending_work()),
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
        self.deadline.extend(live.deadline());
        let new = live.state();
        self.state.send_if_modified(|s| {
            let changed = *s != SessionState::Lost && *s != new;
            if changed {
                *s = new;
            }
            changed
        });
    }

    /// Revokes the lease, retrying transient failures with backoff for up to two TTLs: a
    /// session that went Lost in a partition revokes as soon as etcd answers again, rather
    /// than leave its lease — and every key on it — to expire on the server, which a leader
    /// change can postpone by a whole TTL each time (lease checkpointing off).
    async fn revoke_persistently(&self) -> Result<(), Error> {
        let until = Instant::now() + self.ttl.saturating_mul(2);
        let mut backoff = crate::backoff::Backoff::for_requests();
        loop {
            match self.revoke().await {
                Err(e) if e.is_transient() && Instant::now() < until => {
                    tokio::time::sleep(backoff.next_delay()).await
                }
                other => return other,
            }
        }
    }

    /// Revokes the lease; a lease that is already gone counts as revoked. A revocation
    /// refused for a stale auth token is sent once more with a fresh one.
    async fn revoke(&self) -> Result<(), Error> {
        crate::error::renewing_auth(&self.client, || self.revoke_once()).await
    }

    async fn revoke_once(&self) -> Result<(), Error> {
        let mut lease = self.client.lease_client();
        match tokio::time::timeout(self.request_timeout, lease.revoke(self.lease_id)).await {
            Err(_) => Err(Error::Timeout(self.request_timeout)),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if lease_not_found(&e) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
        }
    }
}

fn lease_exists(e: &Error) -> bool {
    matches!(e, Error::Etcd(etcd_client::Error::GRpcStatus(s)) if s.message().contains("lease already exists"))
}

/// A lease grant that may have landed without anyone knowing: unless disarmed, dropping it
/// revokes its lease id in a background task (retrying while etcd is unreachable, for up to
/// twice the TTL — after that the lease has expired anyway).
struct OrphanedGrant {
    client: Client,
    id: i64,
    ttl: Duration,
    armed: bool,
}

impl OrphanedGrant {
    fn new(client: &Client, ttl_secs: i64) -> OrphanedGrant {
        // etcd's lease ids are positive; 0 asks etcd to choose.
        let id = loop {
            let id = rand::random::<i64>() & i64::MAX;
            if id != 0 {
                break id;
            }
        };
        OrphanedGrant {
            client: client.clone(),
            id,
            ttl: Duration::from_secs(ttl_secs.max(1) as u64),
            armed: true,
        }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for OrphanedGrant {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // no runtime to revoke from: the lease expires by its TTL
        };
        let (client, id, ttl) = (self.client.clone(), self.id, self.ttl);
        runtime.spawn(async move {
            let until = Instant::now() + ttl.saturating_mul(2);
            let mut backoff = crate::backoff::Backoff::for_requests();
            loop {
                let mut lease = client.lease_client();
                match tokio::time::timeout(Duration::from_secs(5), lease.revoke(id)).await {
                    Ok(Ok(_)) => return,
                    Ok(Err(e)) if lease_not_found(&e) => return,
                    _ if Instant::now() >= until => return,
                    _ => tokio::time::sleep(backoff.next_delay()).await,
                }
            }
        });
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
    ///
    /// # Cancel safety
    /// The lease's id is chosen here, before the grant is sent. If the grant's answer is lost,
    /// or the future is dropped before it arrives, a background task revokes that id (retrying
    /// while etcd is unreachable, for up to twice the TTL), so a grant that landed unseen does
    /// not live on for its TTL.
    pub async fn new(client: Client, options: SessionOptions) -> Result<LeasedSession, Error> {
        let ttl_secs = options.validate()?;
        let sent = Instant::now();
        let (granted, orphan) = loop {
            // We choose the lease's id, so that a grant whose answer is lost, or whose caller
            // gives up, can still be revoked (by `orphan`, unless disarmed).
            let orphan = OrphanedGrant::new(&client, ttl_secs);
            let grant = crate::error::renewing_auth(&client, || {
                let mut lease = client.lease_client();
                let with_id = LeaseGrantOptions::new().with_id(orphan.id);
                async move {
                    within(
                        options.request_timeout,
                        lease.grant(ttl_secs, Some(with_id)),
                    )
                    .await
                }
            })
            .await;
            match grant {
                // Another lease has this id (odds 2^-63): not ours to revoke; choose again.
                Err(e) if lease_exists(&e) => orphan.disarm(),
                Err(e) => return Err(e),
                Ok(granted) => break (granted, orphan),
            }
        };
        orphan.disarm();
        if granted.ttl() <= 0 {
            return Err(Error::Protocol(format!(
                "lease granted with TTL {}",
                granted.ttl()
            )));
        }
        let ttl = Duration::from_secs(granted.ttl() as u64);
        let revision = granted.header().map_or(0, |h| h.revision());
        Ok(LeasedSession::start(
            client,
            granted.id(),
            ttl,
            sent,
            revision,
            &options,
            0,
            None,
        ))
    }

    /// Adopts lease `lease_id`, which still exists — granted by an earlier process, say, that
    /// restarted within the TTL or [`orphan`](Self::orphan)ed its session — and keeps it alive
    /// from now on (Go's `concurrency.WithLease`). Keys on the lease (a lock, a leadership)
    /// can then be taken back with [`Mutex::resume`](crate::Mutex::resume) and
    /// [`Election::resume`](crate::Election::resume).
    ///
    /// The lease keeps the TTL it was granted with (`options`' TTL is not used; its margin and
    /// timeouts are checked against the lease's TTL). The session's deadline starts from this
    /// call's first refresh of the lease, once etcd acknowledged it — never from a guess about
    /// the earlier process's refreshes. Member keys this session creates never collide with
    /// an earlier holder's of the same lease.
    ///
    /// Resume only a lease whose earlier owner is gone or has [`orphan`](Self::orphan)ed it:
    /// a key taken back keeps its fencing token, so fencing cannot tell the two processes
    /// apart, and this call cannot know whether the earlier one still runs (`docs/safety.md`).
    ///
    /// # Keys nobody takes back
    /// The resumed session keeps the lease alive for as long as it runs, so it also answers
    /// for every key on it: each one ends up either held by one of its guards or deleted. The
    /// earlier process may have left keys nobody can take back — a `lock()` whose enqueue
    /// reached etcd but whose answer died with it (or landed after
    /// [`orphan`](Self::orphan)), so its token was never known — and such a key, once at the
    /// head of its queue, would block everyone behind it.
    ///
    /// The rule. This call lists the keys on the lease (its `LeaseTimeToLive` asks for them:
    /// the *earlier keys*; etcd's leader lists a lease's keys only once it has applied all
    /// it committed, so every key an answered put of the earlier process made is among them).
    /// The *adoption window* is [`SessionOptions::with_adoption_window`] (default: the
    /// lease's TTL), counted from this call's return. The session looks at its lease —
    /// `LeaseTimeToLive` with its keys, then one read per 64 of them for their create
    /// revisions — once when the window ends and once per TTL, for as long as it lives, and
    /// deletes, each with one Txn fenced on the key's create revision and on its being
    /// attached to this lease, every key that
    ///
    /// * was not put by this session's own primitives (a put counts from before it is first
    ///   sent and, once answered, until its key is gone; a put given up on before any answer
    ///   came does not count: the key, if it landed, is a leftover like any other), and
    /// * was not taken back by this session (`Mutex::resume`,
    ///   [`Election::resume`](crate::Election::resume), `Semaphore::resume`,
    ///   `RwLock::resume_read`/`resume_write`,
    ///   [`SessionRegistration::resume`](crate::discovery::SessionRegistration::resume)), a
    ///   taking-back counting from before its first request, and
    /// * is not one of the earlier keys — a put the earlier process sent that landed after
    ///   this call listed the lease: nobody can hold its token — or, being one, is found
    ///   once the adoption window is over. (An earlier key a look no longer finds is gone;
    ///   a key of that name found later landed later.)
    ///
    /// So a key of the earlier process that is not taken back within the window is gone at
    /// most one look after the window ends (at most the request time after it, while etcd
    /// answers), and a key landing later within one TTL of landing, plus that time: no later
    /// than the lease itself would have removed them had nobody resumed it. A key the rule
    /// has decided to delete can no longer be taken back ([`Error::LockLost`]; `None` for a
    /// registration); to take keys back later, ask for a longer window. Keys attached to the
    /// lease other than through this crate's primitives (a put of your own with
    /// [`lease_id()`](Self::lease_id)) are not this session's: the rule deletes them like the
    /// earlier process's — attach keys of your own to a session of their own.
    /// If etcd refuses a look or a deletion for good (permissions: the role needs `read` and
    /// `write` on every key of the lease), the session ends
    /// ([`LossReason::CleanupFailed`]), as for a failed background release. A session made
    /// with [`new`](Self::new) never looks: its lease starts empty.
    ///
    /// # Errors
    /// [`Error::LeaseNotFound`] if the lease has expired or was revoked; [`Error::InvalidArgument`]
    /// for a margin or timeout out of range for the lease's TTL (the lease was refreshed once);
    /// request errors ([`Error::Etcd`], [`Error::Timeout`], [`Error::PermissionDenied`]).
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future before it returns starts nothing; the lease, refreshed
    /// or not, ends by its TTL unless someone resumes it.
    ///
    /// # Example
    /// ```no_run
    /// # async fn demo(client: etcd_client::Client, lease_id: i64, key: String, token: i64)
    /// # -> Result<(), etcd_coord::Error> {
    /// use etcd_coord::{LeasedSession, Mutex, SessionOptions};
    ///
    /// // After a restart: the lease id, the lock's key and fencing token were saved before.
    /// let session = LeasedSession::resume(client, lease_id, SessionOptions::new()).await?;
    /// let guard = Mutex::new(&session, "jobs/nightly").resume(&key, token).await?;
    /// assert_eq!(guard.fencing_token(), token);
    /// # Ok(()) }
    /// ```
    pub async fn resume(
        client: Client,
        lease_id: i64,
        options: SessionOptions,
    ) -> Result<LeasedSession, Error> {
        if lease_id <= 0 {
            return Err(Error::InvalidArgument(format!(
                "lease id {lease_id} is not one etcd grants (they are positive)"
            )));
        }
        // The TTL is the lease's, known only once read: check the rest now, the margins below.
        options.validate_for(Duration::MAX)?;
        let gone = |e: &Error| match e {
            Error::Etcd(e) => lease_not_found(e),
            _ => false,
        };
        let sent = Instant::now();
        let refreshed = crate::error::renewing_auth(&client, || {
            let mut lease = client.lease_client();
            async move { within(options.request_timeout, lease.keep_alive(lease_id)).await }
        })
        .await;
        match refreshed {
            Err(e) if gone(&e) => return Err(Error::LeaseNotFound(lease_id)),
            Err(e) => return Err(e),
            Ok(_) => {} // the keeper and its stream close here: the session opens its own
        }
        // With its keys: those on the lease now are the earlier process's (see `leftovers`).
        let alive = crate::error::renewing_auth(&client, || {
            let mut lease = client.lease_client();
            let with_keys = LeaseTimeToLiveOptions::new().with_keys();
            async move {
                within(
                    options.request_timeout,
                    lease.time_to_live(lease_id, Some(with_keys)),
                )
                .await
            }
        })
        .await;
        let alive = match alive {
            Err(e) if gone(&e) => return Err(Error::LeaseNotFound(lease_id)),
            other => other?,
        };
        if alive.ttl() <= 0 || alive.granted_ttl() <= 0 {
            return Err(Error::LeaseNotFound(lease_id));
        }
        let ttl = Duration::from_secs(alive.granted_ttl() as u64);
        options.validate_for(ttl)?;
        let revision = alive.header().map_or(0, |h| h.revision());
        // An earlier holder of this lease numbered its keys from 0: start far from there.
        let first_seq = u64::from(rand::random::<u32>() | 1) << 32;
        let window = options.adoption_window.unwrap_or(ttl);
        let leftovers = Leftovers::new(alive.keys(), leftovers::window_end(window));
        Ok(LeasedSession::start(
            client,
            lease_id,
            ttl,
            sent,
            revision,
            &options,
            first_seq,
            Some(leftovers),
        ))
    }

    /// Starts the session of lease `lease_id` (of TTL `ttl`), whose last acknowledged refresh
    /// (or grant) was sent at `sent`; a resumed one with its rule for `leftovers`.
    #[allow(clippy::too_many_arguments)]
    fn start(
        client: Client,
        lease_id: i64,
        ttl: Duration,
        sent: Instant,
        revision: i64,
        options: &SessionOptions,
        first_seq: u64,
        leftovers: Option<Leftovers>,
    ) -> LeasedSession {
        let margin = options.safety_margin.unwrap_or(ttl / 5);
        let keepalive_timeout = options.keepalive_timeout.unwrap_or(ttl / 5);
        let live = Liveness::new(sent, ttl, margin);
        let (state, _) = watch::channel(SessionState::Alive);
        let (cleanups, jobs) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            client,
            lease_id,
            ttl,
            margin,
            keepalive_timeout,
            request_timeout: options.request_timeout,
            state,
            reason: OnceLock::new(),
            deadline: Deadline::new(sent, live.deadline()),
            revision: AtomicI64::new(revision),
            cleanups,
            pending: Arc::new(watch::channel(0).0),
            seq: AtomicU64::new(first_seq),
            slots: slots::Slots::new(first_seq),
            names: Default::default(),
            stop: stop.clone(),
            closing: AtomicBool::new(false),
            tasks: TaskTracker::new(),
            leftovers: leftovers.map(Arc::new),
            counters: Counters::default(),
            auth_renewal: Default::default(),
        });
        // Closed at once: `wait()` completes whenever no task runs (spawning stays possible).
        shared.tasks.close();
        let watchdog = Watchdog {
            shared: Arc::clone(&shared),
            armed: true,
        };
        shared.spawn(drive(watchdog, live, jobs));
        LeasedSession {
            handle: Arc::new(Handle {
                shared,
                _stop: stop.drop_guard(),
            }),
        }
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

    /// The current state. Past the deadline it is [`Lost`](SessionState::Lost), decided on
    /// the clock at this call, whether or not the session's task has run since.
    pub fn state(&self) -> SessionState {
        self.handle.shared.state()
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
            watches: c.watches.load(Ordering::Relaxed),
            watch_events: c.watch_events.load(Ordering::Relaxed),
            watch_probes: c.watch_probes.load(Ordering::Relaxed),
        }
    }

    /// Completes when every background clean-up handed to the session so far (by dropped
    /// guards, cancelled acquisitions, releases that failed) has finished. Clean-ups retry
    /// transient failures for as long as the session lives, so during an outage this waits
    /// until etcd answers again or the session is Lost (which drops them: the lease's end
    /// removes their keys). Useful before shutting down and in tests.
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
        if shared.reason.get() == Some(&LossReason::Orphaned) {
            return Ok(()); // handed off: not ours to revoke
        }
        shared.closing.store(true, Ordering::SeqCst);
        shared.mark_lost(LossReason::Closed);
        shared.stop.cancel();
        shared.revoke().await
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
        let shared = &self.handle.shared;
        shared.mark_lost(LossReason::Orphaned);
        shared.stop.cancel();
        shared.lease_id
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

/// Marks the session Lost if the session's task ends without saying why: its future was
/// dropped (the runtime shut down, even before the task first ran) or unwound (a panic).
/// Owned by the task's future from its creation; disarmed on every orderly exit.
struct Watchdog {
    shared: Arc<Shared>,
    armed: bool,
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if self.armed {
            tracing::warn!(
                lease = self.shared.lease_id,
                "the session's task stopped (runtime shut down or panic): session lost"
            );
            self.shared.mark_lost(LossReason::KeepAliveStopped);
        }
    }
}

/// The session's one background task: keeps the lease alive and runs clean-ups until the
/// session is Lost or its last handle is dropped.
async fn drive(mut watchdog: Watchdog, mut live: Liveness, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let shared = Arc::clone(&watchdog.shared);
    let reason = tokio::select! {
        reason = keep_alive(&shared, &mut live) => reason,
        reason = run_cleanups(&shared, &mut jobs) => reason,
        reason = leftovers::sweep(&shared) => reason,
        // Lost decided elsewhere: on the clock by a caller, or by close().
        reason = shared.lost() => reason,
        _ = shared.stop.cancelled() => LossReason::Closed,
    };
    // Clean-ups still queued or running are moot once the lease ends; drop them (and their
    // pending counts) now.
    drop(jobs);
    shared.mark_lost(reason);
    watchdog.armed = false;
    // The first reason recorded is the one: an orphaned session stops with `stop`, too.
    let reason = shared.reason.get().copied().unwrap_or(reason);
    match reason {
        LossReason::Orphaned => {
            tracing::debug!(
                lease = shared.lease_id,
                "session orphaned; the lease is left as it is"
            )
        }
        LossReason::Closed if shared.closing.load(Ordering::SeqCst) => {} // close() revokes
        LossReason::Closed => {
            if let Err(e) = shared.revoke_persistently().await {
                tracing::warn!(lease = shared.lease_id, error = %e, "revoking the lease of a dropped session failed; it ends by its TTL");
            }
        }
        LossReason::LeaseGone => tracing::warn!(lease = shared.lease_id, %reason, "session lost"),
        _ => {
            // The lease may still exist on the server: end it as soon as etcd answers, rather
            // than at its TTL, so others need not wait (and no key it holds outlives what we
            // know of it).
            tracing::warn!(lease = shared.lease_id, %reason, "session lost");
            if let Err(e) = shared.revoke_persistently().await {
                tracing::warn!(lease = shared.lease_id, error = %e, "revoking the lease of a lost session failed; it ends by its TTL");
            }
        }
    }
}
