//! One contending client: its loop of sessions and acquisitions, its writes through the
//! protected resource, long holds, and the deliberately broken behaviours of
//! `tests/chaos_broken`.

use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use etcd_client::{Client, Txn, TxnOp};
use etcd_coord::{
    BackgroundTasks, Barrier, DoubleBarrier, Election, Error, Fence, LeaderSelector, LeasedSession,
    LossReason, Mutex, RwLock, Semaphore, SessionOptions,
};
use etcd_coord_testkit::checker::{Mode, Step};
use tokio_util::sync::CancellationToken;

use super::report::{mono_ns, Report, Sink};
use super::{Broken, Primitive, PERMITS, TTL};

/// Every contender's sessions: each refresh must be answered within half a second — less than
/// the HTTP/2 keep-alive timeout of the recommended connect options (1 s), so that answers
/// held between the two ([`Fault::HoldAnswers`](super::Fault::HoldAnswers)) arrive late on a
/// live connection.
pub fn session_options() -> SessionOptions {
    SessionOptions::new()
        .with_ttl(TTL)
        .with_keepalive_timeout(KEEPALIVE_TIMEOUT)
        .with_request_timeout(Duration::from_secs(2))
}

/// The end of a late write's key (see [`Writer::begin`]).
pub const LATE: &str = "-late";

/// How soon each lease refresh must be answered.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(500);

/// How long a request the harness sends itself, past the library (a late write, a plain
/// put, a late acknowledgement), may go unanswered: a member cut from its peers never
/// answers a write, and the etcd client has no timeout of its own.
pub const RAW_TIMEOUT: Duration = Duration::from_secs(2);

/// What the harness tells a client while it runs (directly, or through its process's stdin).
pub struct Control {
    pub id: usize,
    pub primitive: Primitive,
    pub name: String,
    /// How this client misbehaves, if it does.
    pub broken: Option<Broken>,
    /// Whether the next acquisition is a long hold, and what lets the current one go.
    long: StdMutex<(bool, CancellationToken)>,
    /// The last fault has healed.
    pub healed: CancellationToken,
    pub stopped: CancellationToken,
}

impl Control {
    pub fn new(id: usize, primitive: Primitive, name: String, broken: Option<Broken>) -> Control {
        Control {
            id,
            primitive,
            name,
            broken,
            long: StdMutex::new((false, CancellationToken::new())),
            healed: CancellationToken::new(),
            stopped: CancellationToken::new(),
        }
    }

    /// Makes the next acquisition a long hold.
    pub fn arm_long_hold(&self) {
        *self.long.lock().unwrap() = (true, CancellationToken::new());
    }

    /// Ends the long hold (or disarms it).
    pub fn let_go(&self) {
        let mut long = self.long.lock().unwrap();
        long.0 = false;
        long.1.cancel();
    }

    /// Whether this acquisition is a long hold: then what lets it go.
    pub(super) fn take_long_hold(&self) -> Option<CancellationToken> {
        let mut long = self.long.lock().unwrap();
        std::mem::take(&mut long.0).then(|| long.1.clone())
    }

    pub(super) fn is(&self, broken: Broken) -> bool {
        self.broken == Some(broken)
    }
}

/// Writes through the protected resource: every write puts a key of its own under
/// `<name>-resource/`, with the fencing token as its value, so that the harness can read
/// back from etcd every write it accepted and at which revision (compaction cannot hide a key
/// that exists).
pub struct Writer {
    ctl: Arc<Control>,
    client: Client,
    sink: Sink,
    /// Tells this process's keys from those of the process it restarted.
    tag: u32,
    n: std::sync::atomic::AtomicU64,
    /// The fence of this client's previous writing hold: its next hold writes through it once
    /// more — a late write, which etcd must refuse.
    previous: StdMutex<Option<Fence>>,
}

impl Writer {
    pub fn new(ctl: Arc<Control>, client: Client, sink: Sink) -> Writer {
        Writer {
            ctl,
            client,
            sink,
            tag: rand::random(),
            n: Default::default(),
            previous: StdMutex::new(None),
        }
    }

    fn key(&self) -> String {
        let n = self.n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!(
            "{}-resource/{}-{:08x}-{n}",
            self.ctl.name, self.ctl.id, self.tag
        )
    }

    /// The key of a late write: marked, so that the harness can judge it from etcd alone
    /// (etcd must refuse every one, whatever the writer saw).
    fn late_key(&self) -> String {
        format!("{}{LATE}", self.key())
    }

    fn wrote(&self, token: i64, key: String) {
        self.sink.report(self.ctl.id, Report::Wrote { token, key });
    }

    /// A write as a holder: through `fence.txn_if_owner`. If the library refuses it without
    /// asking etcd (the session is Lost: a holder that acts past its deadline, as a woken
    /// process does), the same write is sent as a Txn on the fence's compares, as a resource
    /// in etcd would check it — and etcd must refuse it.
    async fn write(&self, fence: &Fence) {
        let (key, token) = (self.key(), fence.fencing_token());
        if self.ctl.is(Broken::Unfenced) {
            return self.unfenced(key, token).await;
        }
        let put = TxnOp::put(key.as_str(), token.to_string(), None);
        match fence.txn_if_owner([put]).await {
            Ok(_) => self.wrote(token, key),
            Err(Error::SessionLost(_) | Error::SessionClosed) => self.raw(fence, key, false).await,
            Err(_) => {}
        }
    }

    /// A plain put, no fence: the deliberately broken lock.
    async fn unfenced(&self, key: String, token: i64) {
        let mut client = self.client.clone();
        let put = client.put(key.as_str(), token.to_string(), None);
        if let Ok(Ok(_)) = tokio::time::timeout(RAW_TIMEOUT, put).await {
            self.wrote(token, key);
        }
    }

    /// A write conditional on `fence`'s compares, sent as it is (`late`: at the next hold).
    async fn raw(&self, fence: &Fence, key: String, late: bool) {
        let token = fence.fencing_token();
        let txn = Txn::new()
            .when(fence.owner_compares())
            .and_then([TxnOp::put(key.as_str(), token.to_string(), None)]);
        match tokio::time::timeout(RAW_TIMEOUT, self.client.clone().txn(txn)).await {
            Ok(Ok(r)) if r.succeeded() => self.wrote(token, key),
            Ok(Ok(_)) => self
                .sink
                .report(self.ctl.id, Report::Refused { token, late }),
            _ => {}
        }
    }

    /// A new writing hold with `fence` begins: first a late write through the previous one
    /// (its hold is over), then remember this one.
    async fn begin(&self, fence: &Fence) {
        let previous = self.previous.lock().unwrap().replace(fence.clone());
        if let Some(p) = previous.filter(|p| p.fencing_token() != fence.fencing_token()) {
            if self.ctl.is(Broken::Unfenced) {
                self.unfenced(self.late_key(), p.fencing_token()).await;
            } else {
                self.raw(&p, self.late_key(), true).await;
            }
        }
    }
}

/// What a client holds.
pub enum Held {
    Mutex(etcd_coord::MutexGuard),
    Leader(etcd_coord::Leadership),
    Permit(etcd_coord::SemaphorePermit),
    Read(etcd_coord::RwLockReadGuard),
    Write(etcd_coord::RwLockWriteGuard),
    Hold(etcd_coord::BarrierHold),
}

impl Held {
    fn fence(&self) -> Fence {
        match self {
            Held::Mutex(g) => g.fence(),
            Held::Leader(l) => l.fence(),
            Held::Permit(g) => g.fence(),
            Held::Read(g) => g.fence(),
            Held::Write(g) => g.fence(),
            Held::Hold(g) => g.fence(),
        }
    }
    fn mode(&self) -> Mode {
        match self {
            Held::Read(_) => Mode::Shared,
            _ => Mode::Exclusive,
        }
    }
    async fn release(self) -> Result<(), Error> {
        match self {
            Held::Mutex(g) => g.release().await,
            Held::Leader(mut l) => l.resign().await,
            Held::Permit(g) => g.release().await,
            Held::Read(g) => g.release().await,
            Held::Write(g) => g.release().await,
            Held::Hold(g) => g.release().await,
        }
    }
}

/// One word for why an attempt failed.
pub(super) fn why(e: &Error) -> String {
    match e {
        Error::PermissionDenied(_) => "permission".into(),
        Error::SessionLost(r) => format!("lost-{}", reason(*r)),
        Error::SessionClosed => "closed".into(),
        Error::LockLost { .. } => "key-lost".into(),
        Error::Timeout(_) => "timeout".into(),
        _ => "other".into(),
    }
}

fn reason(r: LossReason) -> &'static str {
    match r {
        LossReason::DeadlineExceeded => "deadline",
        LossReason::LeaseGone => "lease-gone",
        LossReason::CleanupFailed => "cleanup-failed",
        LossReason::KeepAliveStopped => "task-stopped",
        LossReason::Orphaned => "orphaned",
        _ => "other",
    }
}

/// Reports `held` (acquired under `lease`) as acquired and holds it as every contender does —
/// an exclusive lock writes through the protected resource (after a late write through its
/// previous hold's fence), then holds briefly; others only hold; with `until`, it holds until
/// that is cancelled; a long hold writes every 250 ms until its `lost()` fires or the harness
/// lets it go — then reports its end and releases it. Returns whether it was lost first
/// (then it is released in the background) and, with `keep`, the held guard of a hold that ended
/// unlost: not released but returned, its release about to begin (`Sink::releasing` called),
/// for the caller to requeue.
pub async fn hold(
    ctl: &Control,
    held: Held,
    lease: i64,
    sink: &Sink,
    writer: &Writer,
    until: Option<&CancellationToken>,
    keep: bool,
) -> (bool, Option<Held>) {
    let id = ctl.id;
    let fence = held.fence();
    let token = fence.fencing_token();
    let mode = held.mode();
    let long = ctl.take_long_hold();
    sink.report(id, Report::Acquired { token, lease, mode });
    if long.is_some() {
        sink.report(id, Report::LongHold { token });
    }
    // Exclusive holders of a lock write; readers and semaphore permits (several at once, in
    // any order) only hold. The late write through the previous hold goes first, as part of
    // the work: raced with `lost()` like the rest of it, so that a write stalled by a fault
    // does not stretch the holder's belief.
    // (The contenders of a long line beyond the clients only hold, briefly, so that the line
    // moves: their exclusion is judged from their reports.)
    let writes =
        mode == Mode::Exclusive && ctl.primitive.rules().holders == 1 && id < super::CLIENTS;
    let work = async {
        if writes {
            writer.begin(&fence).await;
        }
        if let Some(until) = until {
            until.cancelled().await;
            return;
        }
        if let Some(long) = &long {
            loop {
                if writes {
                    writer.write(&fence).await;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = long.cancelled() => return,
                }
            }
        }
        if !writes {
            let hold = if ctl.primitive == Primitive::Semaphore {
                rand::random_range(10..100)
            } else if id >= super::CLIENTS {
                2
            } else {
                30
            };
            tokio::time::sleep(Duration::from_millis(hold)).await;
            return;
        }
        writer.write(&fence).await;
        // A barrier stays up long enough for others to wait on it.
        let hold = if ctl.primitive == Primitive::Barrier {
            100
        } else {
            30
        };
        tokio::time::sleep(Duration::from_millis(hold)).await;
    };
    let lost_first = if long.is_some() && ctl.is(Broken::IgnoresLoss) {
        // Deliberately broken: believes until let go, whatever `lost()` says.
        work.await;
        fence.session().state() == etcd_coord::SessionState::Lost
    } else {
        tokio::select! {
            _ = work => false,
            _ = fence.lost() => true,
        }
    };
    sink.report(id, Report::Ended { token });
    if lost_first {
        if writes && long.is_some() {
            // A write already under way as the holder learns of its loss: refused.
            writer.write(&fence).await;
        }
        drop(held); // fenced release in the background, if anything is left
    } else if ctl.is(Broken::Leaks) {
        // Deliberately broken: the guard is neither released nor dropped.
        std::mem::forget(held);
    } else {
        sink.releasing(id).await;
        if keep {
            return (false, Some(held));
        }
        let _ = held.release().await;
    }
    (lost_first, None)
}

/// One client: sessions come and go; each acquisition is reported, writes through the
/// protected resource, and ends at release or at `lost()`. Runs until `stopped`.
pub async fn client_loop(
    ctl: Arc<Control>,
    client: Client,
    sink: Sink,
    own_tasks: Arc<StdMutex<Vec<BackgroundTasks>>>,
) {
    let id = ctl.id;
    let writer = Writer::new(Arc::clone(&ctl), client.clone(), sink.clone());
    if ctl.primitive == Primitive::Selector {
        return selector_terms(&ctl, client, &sink, &writer).await;
    }
    let stopped = ctl.stopped.clone();
    let long_holder = ctl.primitive == Primitive::Semaphore && id == super::CLIENTS - 1;
    let mut producer = super::queue::Producer::new();
    'sessions: while !stopped.is_cancelled() {
        // It wants from before it has a session: a session that never starts is a wait too.
        sink.report(id, Report::Waiting);
        let session = tokio::select! {
            s = LeasedSession::new(client.clone(), session_options()) => s,
            _ = stopped.cancelled() => break,
        };
        let session = match session {
            Ok(s) => s,
            Err(e) => {
                sink.report(id, Report::GaveUp(format!("session-{}", why(&e))));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        sink.report(id, Report::Lease(session.lease_id()));
        sink.watch_tasks(session.background_tasks(), &own_tasks);
        if ctl.primitive == Primitive::DoubleBarrier {
            double_barrier_rounds(&ctl, &session, &sink).await;
        } else if ctl.primitive == Primitive::Queue {
            Box::pin(super::queue::rounds(&ctl, &session, &sink, &mut producer)).await;
        } else {
            let (name, primitive) = (ctl.name.as_str(), ctl.primitive);
            let mutex = Mutex::new(&session, name);
            let election = Election::new(&session, name);
            let semaphore = Semaphore::new(&session, name, PERMITS);
            let rwlock = RwLock::new(&session, name);
            let barrier = Barrier::new(&session, name);
            let mut round = 0usize;
            // A mutex held at the end of every other hold, for its next turn by requeue (its
            // release and the next enqueue in one Txn) instead of a release and a lock().
            let mut requeue: Option<etcd_coord::MutexGuard> = None;
            while !stopped.is_cancelled() {
                round += 1;
                sink.report(id, Report::Waiting);
                let metrics = session.metrics();
                let (mirrored, after_heal, reopened) = (
                    metrics.mirrored_decisions,
                    ctl.healed.is_cancelled(),
                    metrics.watch_streams > 1,
                );
                // Ok(None): a barrier's wait() passed; nothing is held.
                let mut again = requeue.take();
                let acquire = async {
                    let held = match primitive {
                        Primitive::Mutex => Held::Mutex(match again.take() {
                            Some(guard) => guard.requeue().await?,
                            None => mutex.lock().await?,
                        }),
                        Primitive::Election => {
                            Held::Leader(election.campaign(format!("client-{id}")).await?)
                        }
                        Primitive::Semaphore => Held::Permit(semaphore.acquire().await?),
                        Primitive::RwLock if (id + round).is_multiple_of(3) => {
                            Held::Write(rwlock.write().await?)
                        }
                        Primitive::RwLock => Held::Read(rwlock.read().await?),
                        Primitive::Barrier => match barrier.hold().await {
                            Err(Error::AlreadyHeld { .. }) => {
                                let called_ns = mono_ns();
                                if !ctl.is(Broken::OpensEarly) {
                                    barrier.wait().await?;
                                } // else deliberately broken: passes without waiting
                                sink.report(id, Report::Passed { called_ns });
                                return Ok(None);
                            }
                            held => Held::Hold(held?),
                        },
                        Primitive::DoubleBarrier | Primitive::Selector | Primitive::Queue => {
                            unreachable!("run by their own loops")
                        }
                    };
                    Ok::<_, Error>(Some(held))
                };
                let gives_up = ctl.is(Broken::GivesUp);
                // Stopping drops a waiting acquisition: cancel-safe, it leaves no key.
                let acquired = tokio::select! {
                    r = acquire => r,
                    _ = stopped.cancelled() => break,
                    // Deliberately broken: a waiter that gives up once the faults are over.
                    _ = ctl.healed.cancelled(), if gives_up => {
                        sink.report(id, Report::GaveUp("gives-up".into()));
                        stopped.cancelled().await;
                        break 'sessions;
                    }
                };
                let held = match acquired {
                    Ok(None) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    Ok(Some(h)) => h,
                    Err(e) => {
                        // Lost, closed, refused: start over with a new session, after a
                        // pause (a refusal would otherwise be asked again at once).
                        sink.report(id, Report::GaveUp(why(&e)));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        break;
                    }
                };
                let decisions = session.metrics().mirrored_decisions - mirrored;
                if decisions > 0 || after_heal && reopened {
                    let report = Report::Mirrored {
                        decisions,
                        after_heal,
                        reopened,
                    };
                    sink.report(id, report);
                }
                let until = long_holder.then_some(&stopped);
                let lease = session.lease_id();
                let keep = primitive == Primitive::Mutex && round.is_multiple_of(2);
                match hold(&ctl, held, lease, &sink, &writer, until, keep).await {
                    (true, _) => break, // lost: start over with a new session
                    (false, Some(Held::Mutex(guard))) => requeue = Some(guard),
                    (false, _) => {}
                }
                if primitive == Primitive::Barrier {
                    // Let the waiters it just released try to hold it up too.
                    let pause = rand::random_range(20..80);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            }
        }
        if let Some(r) = session.loss_reason() {
            sink.report(id, Report::SessionLost(reason(r).into()));
        }
        let _ = session.close().await;
    }
}

/// Rounds of a double barrier for all CLIENTS clients, reported for the checker, until the
/// session fails or the run stops. A long hold stays inside (between `enter()` and
/// `leave()`) until its `lost()` fires or the harness lets it go.
async fn double_barrier_rounds(ctl: &Control, session: &LeasedSession, sink: &Sink) {
    let (id, stopped) = (ctl.id, &ctl.stopped);
    let barrier = DoubleBarrier::new(session, ctl.name.as_str(), super::CLIENTS);
    let lease = session.lease_id();
    let step = |step| sink.report(id, Report::Participant { lease, step });
    let mut round = 0u64;
    while !stopped.is_cancelled() {
        // Clients arrive at different times, so that an early one must wait for the rest.
        round += 1;
        let arrival = (id as u64 * 37 + round * 11) % 100;
        tokio::time::sleep(Duration::from_millis(arrival)).await;
        step(Step::Entering);
        if ctl.is(Broken::OpensEarly) {
            step(Step::Entered); // deliberately broken: believes it passed before it did
        }
        let inside = tokio::select! {
            r = barrier.enter() => r,
            _ = stopped.cancelled() => return,
        };
        let inside = match inside {
            Ok(inside) => inside,
            Err(e) => {
                sink.report(id, Report::GaveUp(why(&e)));
                return;
            }
        };
        if !ctl.is(Broken::OpensEarly) {
            step(Step::Entered);
        }
        if let Some(long) = ctl.take_long_hold() {
            sink.report(
                id,
                Report::LongHold {
                    token: inside.fencing_token(),
                },
            );
            let lost = tokio::select! {
                _ = long.cancelled() => false,
                _ = inside.lost(), if !ctl.is(Broken::IgnoresLoss) => true,
            };
            if lost {
                sink.report(id, Report::GaveUp("lost-inside".into()));
                return; // dropping the guard leaves in the background
            }
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        step(Step::Leaving);
        sink.releasing(id).await;
        if ctl.is(Broken::LeavesEarly) {
            step(Step::Left); // deliberately broken: believes it left before the others
        }
        let left = tokio::select! {
            r = inside.leave() => r,
            _ = stopped.cancelled() => return,
        };
        if let Err(e) = left {
            sink.report(id, Report::GaveUp(why(&e)));
            return;
        }
        if !ctl.is(Broken::LeavesEarly) {
            step(Step::Left);
        }
    }
}

/// A leader selector's terms until the run stops: each term writes through its fence (after a
/// late write through the previous term's) and lasts 30 ms — or, as a long hold, until the
/// term is cancelled (its leadership may be lost) or the harness lets it go. Its
/// `leaders()` is reported as it changes.
async fn selector_terms(ctl: &Arc<Control>, client: Client, sink: &Sink, writer: &Writer) {
    let id = ctl.id;
    let selector = LeaderSelector::new(client, ctl.name.as_str(), format!("client-{id}"))
        .with_session_options(session_options())
        .with_retry_backoff(Duration::from_millis(100), Duration::from_secs(1));
    let mut leaders = selector.leaders();
    let reporter = {
        let sink = sink.clone();
        tokio::spawn(async move {
            while leaders.changed().await.is_ok() {
                let token = leaders
                    .borrow_and_update()
                    .as_ref()
                    .map(|l| l.fencing_token());
                sink.report(id, Report::Leader(token));
            }
        })
    };
    let leases = StdMutex::new(std::collections::HashSet::new());
    sink.report(id, Report::Waiting);
    let lead = |term: etcd_coord::LeaderTerm| {
        let leases = &leases;
        async move {
            let fence: Fence = (*term).clone();
            let (token, lease) = (fence.fencing_token(), fence.session().lease_id());
            if leases.lock().unwrap().insert(lease) {
                sink.report(id, Report::Lease(lease));
            }
            let long = ctl.take_long_hold();
            sink.report(
                id,
                Report::Acquired {
                    token,
                    lease,
                    mode: Mode::Exclusive,
                },
            );
            if long.is_some() {
                sink.report(id, Report::LongHold { token });
            }
            // The late write through the previous term first, raced with the term's end.
            let work = async {
                writer.begin(&fence).await;
                if let Some(long) = &long {
                    loop {
                        writer.write(&fence).await;
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                            _ = long.cancelled() => return,
                        }
                    }
                }
                writer.write(&fence).await;
                tokio::time::sleep(Duration::from_millis(30)).await;
            };
            let ignores = long.is_some() && ctl.is(Broken::IgnoresLoss);
            let cancelled = tokio::select! {
                _ = work => false,
                _ = term.cancelled(), if !ignores => true,
            };
            sink.report(id, Report::Ended { token });
            if cancelled && long.is_some() {
                writer.write(&fence).await;
            }
            if !ctl.stopped.is_cancelled() {
                sink.report(id, Report::Waiting);
            }
        }
    };
    let _ = Box::pin(selector.run(ctl.stopped.cancelled(), lead)).await;
    reporter.abort();
}

/// The lock a killed client process held — its lease, key and fencing token — and how long
/// its restart waits before taking it back (past the TTL: too late, by design).
#[derive(Debug, Clone)]
pub struct Resume {
    pub lease: i64,
    pub key: String,
    pub token: i64,
    pub delay: Duration,
}

impl Resume {
    pub fn to_env(&self) -> String {
        let ms = self.delay.as_millis();
        format!("{} {} {} {ms}", self.lease, self.key, self.token)
    }

    pub fn from_env(spec: &str) -> Option<Resume> {
        let words: Vec<&str> = spec.split_whitespace().collect();
        let [lease, key, token, delay] = words[..] else {
            return None;
        };
        Some(Resume {
            lease: lease.parse().ok()?,
            key: key.to_owned(),
            token: token.parse().ok()?,
            delay: Duration::from_millis(delay.parse().ok()?),
        })
    }
}

/// A restarted client process takes back what its killed predecessor held — the same lease,
/// key and token, through `LeasedSession::resume` and the primitive's `resume` — writes
/// through it (an exclusive lock) and releases it, like any holder; or takes nothing if the
/// lease or the key is gone. (Deliberately broken, [`Broken::TrustingResume`]: it believes it
/// holds again without asking etcd.)
pub async fn resume_and_release(
    ctl: &Arc<Control>,
    client: &Client,
    resume: &Resume,
    sink: &Sink,
    own_tasks: &Arc<StdMutex<Vec<BackgroundTasks>>>,
) {
    let id = ctl.id;
    tokio::time::sleep(resume.delay).await;
    sink.report(id, Report::Waiting);
    if ctl.is(Broken::TrustingResume) {
        let (token, lease) = (resume.token, resume.lease);
        sink.report(id, Report::Lease(lease));
        let mode = Mode::Exclusive;
        sink.report(id, Report::Acquired { token, lease, mode });
        tokio::time::sleep(Duration::from_millis(30)).await;
        sink.report(id, Report::Ended { token });
        return;
    }
    let Ok(session) = LeasedSession::resume(client.clone(), resume.lease, session_options()).await
    else {
        sink.report(id, Report::GaveUp("resume-lease".into()));
        return;
    };
    sink.report(id, Report::Lease(resume.lease));
    sink.watch_tasks(session.background_tasks(), own_tasks);
    let (name, key, token) = (ctl.name.as_str(), resume.key.as_str(), resume.token);
    let taken = match ctl.primitive {
        Primitive::Mutex => Mutex::new(&session, name)
            .resume(key, token)
            .await
            .map(Held::Mutex),
        Primitive::Election => Election::new(&session, name)
            .resume(key, token)
            .await
            .map(Held::Leader),
        Primitive::Semaphore => Semaphore::new(&session, name, PERMITS)
            .resume(key, token)
            .await
            .map(Held::Permit),
        Primitive::RwLock => match RwLock::new(&session, name).resume_write(key, token).await {
            // Not a writer's key: a reader's.
            Err(Error::InvalidArgument(_)) => RwLock::new(&session, name)
                .resume_read(key, token)
                .await
                .map(Held::Read),
            other => other.map(Held::Write),
        },
        other => unreachable!("{other:?} has nothing to resume"),
    };
    let Ok(held) = taken else {
        sink.report(id, Report::GaveUp("resume-key".into()));
        let _ = session.close().await;
        return;
    };
    let writer = Writer::new(Arc::clone(ctl), client.clone(), sink.clone());
    hold(ctl, held, resume.lease, sink, &writer, None, false).await;
    let _ = session.close().await;
}
