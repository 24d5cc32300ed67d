//! The chaos harness: cluster, proxies, contending clients (some in their own OS processes, so
//! that a crash is a real SIGKILL and a pause a real SIGSTOP), fault schedule, then the
//! safety, liveness and leak checks.
//!
//! - `faults`: the faults, their seeded schedules, the proxies they act through;
//! - `client`: what one client does (and how a deliberately broken one misbehaves);
//! - `process`: clients in processes of their own;
//! - `queue`: work-queue producers and workers, and the queue's drain at the end;
//! - `report`: what clients report, and the run's shared history;
//! - `audit`: what the harness watches and reads back from etcd.
#![allow(dead_code, unused_imports)] // shared by two test binaries, each using part of it

mod audit;
mod client;
mod faults;
mod process;
mod queue;
mod report;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, Once, OnceLock};
use std::time::{Duration, Instant};

use etcd_client::Client;
use etcd_coord::BackgroundTasks;
use etcd_coord_testkit::checker::{
    check_double_barrier, check_liveness, check_observers, check_queue, Event, History, Rules,
    Step, Violation,
};
use etcd_coord_testkit::EtcdCluster;
use tokio_util::sync::CancellationToken;

pub use faults::{
    apply_network_fault, proxies_of, schedule, schedule_with_partitions, Fault, PAUSE,
};
pub use process::client_process_main;

use client::{client_loop, Control, Resume};
use process::ProcessClient;
pub use report::{mirrored_after_the_heal, MIRRORED, REOPENED_MIRRORED, REOPENED_WAITS};
use report::{mono_ns, Shared, Sink};

/// Contending clients, client `i` through its own proxy in front of member `i % members`.
pub const CLIENTS: usize = 4;
/// Session TTL: faults "longer than the TTL" last TTL + 2 s.
pub const TTL: Duration = Duration::from_secs(5);
/// Permits of the semaphore under test (fewer than CLIENTS, so clients contend).
const PERMITS: usize = 2;
/// After the last fault healed, every want is served within this bound (property h): the
/// TTL — a crashed holder's lease has to expire — plus 3 s for new sessions and hand-offs on 2
/// busy cores.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(TTL.as_secs() + 3);
/// The client that misbehaves in a run with a deliberately broken client.
pub const BROKEN_CLIENT: usize = 1;
/// Observers of an election (`Election::observe`), observer `j` through client `j`'s path.
const OBSERVERS: usize = 3;
/// How long after the heal every observer has re-connected: an observer that resumes past a
/// compaction re-reads the state and rightly sums up the leaders it missed meanwhile; from
/// then on, with no compaction and no fault, it must report every leader.
const OBSERVERS_SETTLE: Duration = Duration::from_secs(2);
/// How long a long-hold fault waits for its client to hold.
const HOLD_WAIT: Duration = Duration::from_secs(5);

/// How clients reach an etcd that serves TLS and requires authentication: trusting `ca`,
/// as `user`, whose role may read and write the keys under the test's names only.
#[derive(Debug, Clone)]
pub struct Secure {
    ca: std::path::PathBuf,
    user: String,
    password: String,
}

impl Secure {
    fn from_env(spec: &str) -> Option<Secure> {
        let words: Vec<&str> = spec.split_whitespace().collect();
        let [ca, user, password] = words[..] else {
            panic!("bad secure spec: {spec}");
        };
        Some(Secure {
            ca: ca.into(),
            user: user.to_owned(),
            password: password.to_owned(),
        })
    }

    fn to_env(&self) -> String {
        format!("{} {} {}", self.ca.display(), self.user, self.password)
    }
}

/// A client of `endpoint` (a proxy's `HOST:PORT`), over TLS as the secure user if `secure`.
async fn connect(endpoint: String, secure: Option<&Secure>) -> Client {
    let options = etcd_coord::recommended_connect_options();
    let (endpoint, options) = match secure {
        None => (endpoint, options),
        Some(s) => (format!("https://{endpoint}"), secured(options, s)),
    };
    Client::connect([endpoint], Some(options))
        .await
        .expect("a client")
}

#[cfg(feature = "tls")]
fn secured(options: etcd_client::ConnectOptions, s: &Secure) -> etcd_client::ConnectOptions {
    let ca = std::fs::read(&s.ca).expect("the CA file");
    options
        .with_tls(
            etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca)),
        )
        .with_user(s.user.clone(), s.password.clone())
}

#[cfg(not(feature = "tls"))]
fn secured(_: etcd_client::ConnectOptions, _: &Secure) -> etcd_client::ConnectOptions {
    unreachable!("secure chaos runs need the tls feature")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Primitive {
    Mutex,
    Election,
    /// A semaphore of PERMITS permits. The last client holds each permit it gets until the
    /// run stops or its session is lost; the others hold for 10–100 ms, so releases come in
    /// any order.
    Semaphore,
    /// Every third acquisition writes, the others read.
    RwLock,
    /// Clients try to hold the barrier up; those that find it up wait for it to come down.
    Barrier,
    /// All CLIENTS clients enter and leave a double barrier for CLIENTS, round after round.
    DoubleBarrier,
    /// Every client runs a `LeaderSelector`; each term writes and lasts 30 ms (a long hold:
    /// until the term is cancelled).
    Selector,
    /// Every client produces and works on one `WorkQueue`: it enqueues a job every 40–80 ms,
    /// and claims one, works 5–20 ms (a long hold: until its `lost()`) and acknowledges it.
    Queue,
}

impl Primitive {
    fn rules(self) -> Rules {
        match self {
            Primitive::Semaphore => Rules::semaphore(PERMITS),
            _ => Rules::lock(),
        }
    }

    fn parse(s: &str) -> Primitive {
        match s {
            "Mutex" => Primitive::Mutex,
            "Election" => Primitive::Election,
            "Semaphore" => Primitive::Semaphore,
            "RwLock" => Primitive::RwLock,
            "Barrier" => Primitive::Barrier,
            "DoubleBarrier" => Primitive::DoubleBarrier,
            "Selector" => Primitive::Selector,
            "Queue" => Primitive::Queue,
            other => panic!("unknown primitive {other}"),
        }
    }

    /// Whether the run observes the primitive's election (`Election::observe`).
    fn observed(self) -> bool {
        matches!(self, Primitive::Election | Primitive::Selector)
    }
}

/// How a deliberately broken client ([`BROKEN_CLIENT`], in its own process) misbehaves — in
/// the test harness only: the library has no switch for it. Each breaks one property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// (c) Writes with plain puts, not through its fence: its late writes land. (l) A work
    /// queue's worker acknowledges with plain deletes, also past its claim's loss.
    Unfenced,
    /// (b), (m) A long hold (or claim) believes until the harness lets it go, ignoring
    /// `lost()`.
    IgnoresLoss,
    /// (a), (d) A restarted process believes it holds its predecessor's lock again, without
    /// asking etcd (a Go-style resumption that trusts what it was given).
    TrustingResume,
    /// (h) Once the faults are over, its waiter gives up for good.
    GivesUp,
    /// (e), (f) A barrier's wait, or a double barrier's `enter()`, passes at once.
    OpensEarly,
    /// (g) A double barrier's `leave()` returns at once.
    LeavesEarly,
    /// (i), (n) Its guards are never released (nor dropped): the keys stay on its live lease
    /// (a work queue's claimed job with them).
    Leaks,
    /// (j) and discovery: observers and views drop every third event.
    DropsEvents,
    /// (k) A work queue's worker deletes the job when it claims it, as etcd's `recipe.Queue`
    /// dequeues: a worker that loses its claim loses the job.
    DequeuesByDelete,
    /// (o) A producer sends every enqueue twice, without its idempotency key (as a producer
    /// that retries on its own, after an answer it did not wait for).
    ForgetsIdempotency,
}

impl Broken {
    pub fn name(self) -> String {
        format!("{self:?}")
    }

    fn parse(s: &str) -> Broken {
        [
            Broken::Unfenced,
            Broken::IgnoresLoss,
            Broken::TrustingResume,
            Broken::GivesUp,
            Broken::OpensEarly,
            Broken::LeavesEarly,
            Broken::Leaks,
            Broken::DropsEvents,
            Broken::DequeuesByDelete,
            Broken::ForgetsIdempotency,
        ]
        .into_iter()
        .find(|b| b.name() == s)
        .unwrap_or_else(|| panic!("unknown broken behaviour {s}"))
    }
}

/// Panics in tasks of this process (a session's background task, a client task), counted by
/// a panic hook: a chaos run must log none. A failing test's own assertion (on its test
/// thread) is not counted, so that it cannot fail the chaos tests that run after it.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            if thread
                .name()
                .is_none_or(|n| n.starts_with("tokio-runtime-worker"))
            {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// How a run is made.
#[derive(Debug, Clone, Copy)]
struct Options {
    /// Client 0 and every client a fault needs in a process (killed, paused) run in their own
    /// processes; otherwise every client runs in this one.
    processes: bool,
    /// TLS and authentication.
    secured: bool,
    /// Killed clients are killed while they hold and restarted resuming what they held; every
    /// `delay_every`-th restart comes back too late.
    resuming: Option<usize>,
    /// A deliberately broken client ([`BROKEN_CLIENT`]).
    broken: Option<Broken>,
    /// How long the clients keep running after the last fault healed.
    window: Duration,
    /// Contenders beyond the CLIENTS clients, in this process, contender `i` through client
    /// `i % CLIENTS`'s proxy: a queue long enough that its waiters decide from a mirror of it.
    line: usize,
}

impl Options {
    fn new() -> Options {
        Options {
            processes: true,
            secured: false,
            resuming: None,
            broken: None,
            window: LIVENESS_BOUND + Duration::from_secs(1),
            line: 0,
        }
    }
}

/// Runs `plan` against `primitive` with CLIENTS clients — client 0 and every client the plan
/// kills or pauses in their own OS processes — then keeps them running for LIVENESS_BOUND +
/// 1 s after the last fault healed. Asserts that nothing leaked (keys, leases, tasks, panics)
/// and returns what the safety, liveness, key and observer checks found.
pub async fn run_schedule(
    primitive: Primitive,
    members: usize,
    seed: u64,
    plan: &[(u64, Fault)],
) -> Vec<Violation> {
    run(primitive, members, seed, plan, Options::new()).await
}

/// As [`run_schedule`] with `more` contenders beside the CLIENTS clients (in this process,
/// each through a client's proxy), so that the queue is long: a waiter whose enqueue finds its
/// page of the queue cut short decides from its session's mirror of it. Also returns the
/// run's tally (its [`report::MIRRORED`] count: decisions made from a mirror, and per proxy
/// those of waits that began after the heal). The contenders beyond the clients hold 2 ms and
/// do not write through the resource.
pub async fn run_schedule_in_a_long_line(
    primitive: Primitive,
    members: usize,
    seed: u64,
    plan: &[(u64, Fault)],
    more: usize,
) -> (Vec<Violation>, std::collections::BTreeMap<String, usize>) {
    // Other primitives' loops and checks are made for CLIENTS clients.
    assert_eq!(primitive, Primitive::Mutex, "a long line of a mutex only");
    let options = Options {
        line: more,
        ..Options::new()
    };
    run_counting(primitive, members, seed, plan, options).await
}

/// As [`run_schedule`] on an etcd that serves clients over TLS only, with authentication on
/// (simple tokens with a 3 s TTL): every client (in this process and in its own)
/// connects over TLS as a user whose role may read and write the test's keys only; the
/// checkers read as `root`. The plan must not partition members (namespaced etcd is plain).
#[cfg(feature = "tls")]
pub async fn run_schedule_secure(
    primitive: Primitive,
    members: usize,
    seed: u64,
    plan: &[(u64, Fault)],
) -> Vec<Violation> {
    assert!(
        !plan.iter().any(|(_, f)| f.needs_namespaces()),
        "a secure run cannot partition members"
    );
    let options = Options {
        secured: true,
        ..Options::new()
    };
    run(primitive, members, seed, plan, options).await
}

/// As [`run_schedule_secure`], returning also the counts of what the checker does not judge
/// (failed attempts and lost sessions by reason, refused writes), for a plan that revokes
/// permissions ([`Fault::RevokeRead`], [`Fault::RevokeWrite`]).
#[cfg(feature = "tls")]
pub async fn run_schedule_secure_counting(
    primitive: Primitive,
    members: usize,
    seed: u64,
    plan: &[(u64, Fault)],
) -> (Vec<Violation>, std::collections::BTreeMap<String, usize>) {
    let options = Options {
        secured: true,
        ..Options::new()
    };
    run_counting(primitive, members, seed, plan, options).await
}

/// As [`run_schedule`] for `primitive` (a mutex, an election, a semaphore or an RwLock),
/// where every killed client is killed *while it holds* (each kill waits up to 2 s for its
/// victim to hold) and restarted as a process that first resumes the dead one's lease and
/// what it held — same key, same fencing token — then writes through it (an exclusive lock)
/// and releases it. Every third restart waits TTL + 3 s first: by then the lease has expired
/// (also if a leader change restarted its TTL soon after the kill), so the resumption must
/// fail. The checker lets a token be acquired again only by its own lease, so a resumed lock
/// that another client held in between is a violation. Panics if no kill found its victim
/// holding, or no restarted process resumed: the run would have shown nothing.
pub async fn run_schedule_resuming(
    primitive: Primitive,
    members: usize,
    seed: u64,
    plan: &[(u64, Fault)],
) -> Vec<Violation> {
    let options = Options {
        resuming: Some(3),
        ..Options::new()
    };
    run(primitive, members, seed, plan, options).await
}

/// As [`run_schedule`] (on one member), with client [`BROKEN_CLIENT`] in its own process
/// misbehaving as `broken` says, and the clients kept running for `window` after the plan.
/// With `Broken::TrustingResume`, every killed client is killed while it holds and restarts
/// after the TTL, too late to take its lock back — and believes it did.
pub async fn run_broken(
    primitive: Primitive,
    plan: &[(u64, Fault)],
    broken: Broken,
    window: Duration,
) -> Vec<Violation> {
    let options = Options {
        broken: Some(broken),
        resuming: (broken == Broken::TrustingResume).then_some(1),
        window,
        ..Options::new()
    };
    run(primitive, 1, 0, plan, options).await
}

/// A cluster serving TLS with auth on and 3 s tokens, a `root` client of it, and how the
/// contenders connect: as user `chaos`, with readwrite on the test keys' prefix only.
#[cfg(feature = "tls")]
async fn start_secure(members: usize) -> (EtcdCluster, Client, Option<Secure>) {
    let cluster = EtcdCluster::start_tls_with_args(members, false, &["--auth-token-ttl", "3"])
        .await
        .expect("an etcd cluster serving TLS");
    // Every name of the run is a `common::unique` name, under this prefix.
    let admin = crate::common::enable_auth(&cluster, "chaos", "etcd-coord-test/").await;
    let (ca, _, _) = cluster.tls_files().expect("TLS files");
    let secure = Secure {
        ca,
        user: "chaos".into(),
        password: "chaos-pw".into(),
    };
    (cluster, admin, Some(secure))
}

#[cfg(not(feature = "tls"))]
async fn start_secure(_: usize) -> (EtcdCluster, Client, Option<Secure>) {
    unreachable!("secure chaos runs need the tls feature")
}

/// Gives the secure run's role `chaos` read and/or write permission on the test's prefix
/// (instead of readwrite).
async fn revoke(admin: &Client, read: bool, write: bool) {
    use etcd_client::{Permission, RoleRevokePermissionOptions};
    const PREFIX: &str = "etcd-coord-test/";
    let mut admin = admin.clone();
    let _ = admin
        .role_revoke_permission(
            "chaos",
            PREFIX,
            Some(RoleRevokePermissionOptions::new().with_prefix()),
        )
        .await;
    let permission = match (read, write) {
        (true, true) => Permission::read_write(PREFIX),
        (true, false) => Permission::read(PREFIX),
        (false, true) => Permission::write(PREFIX),
        (false, false) => return,
    };
    admin
        .role_grant_permission("chaos", permission.with_prefix())
        .await
        .expect("root grants the permission");
}

/// A client of the run: a task of this process, or a process of its own.
enum Contender {
    Task(tokio::task::JoinHandle<()>, Arc<Control>),
    Process(ProcessClient),
}

impl Contender {
    /// Tells the client `long`, `let-go` or `healed`.
    async fn tell(&self, command: &str) {
        match self {
            Contender::Task(_, ctl) => match command {
                "long" => ctl.arm_long_hold(),
                "let-go" => ctl.let_go(),
                "healed" => ctl.healed.cancel(),
                other => unreachable!("{other}"),
            },
            Contender::Process(p) => p.tell(command).await,
        }
    }
}

/// Starts client `i`: in this process, or in its own (resuming `resume` first).
async fn start_client(
    sh: &Arc<Shared>,
    i: usize,
    local: bool,
    resume: Option<&Resume>,
    broken: Option<Broken>,
) -> Contender {
    // It wants from the moment it starts (a restart that resumes late: once it is to try): a
    // client that never gets going is judged too.
    let delay = resume.map_or(Duration::ZERO, |r| r.delay);
    sh.history.record(Event::Waiting {
        client: i,
        at: Instant::now() + delay,
    });
    if local {
        let proxy = &sh.proxies[i % sh.proxies.len()];
        let client = connect(proxy.endpoint(), sh.secure.as_ref()).await;
        let mut ctl = Control::new(i, sh.primitive, sh.name.clone(), None);
        ctl.stopped = sh.stopped.clone();
        let ctl = Arc::new(ctl);
        let sink = Sink::Local(Arc::clone(sh));
        let own = Arc::new(StdMutex::new(Vec::new()));
        let task = tokio::spawn(client_loop(Arc::clone(&ctl), client, sink, own));
        Contender::Task(task, ctl)
    } else {
        let endpoint = sh.proxies[i].endpoint();
        Contender::Process(ProcessClient::spawn(i, sh, endpoint, resume, broken))
    }
}

/// Waits up to `limit` for client `i` to hold (a long hold, if `long`).
async fn holds(sh: &Shared, i: usize, long: bool, limit: Duration) -> bool {
    let holding = || sh.holding.lock().unwrap()[i].is_some_and(|(_, l)| l || !long);
    crate::common::eventually(limit, || async { holding() }).await
}

async fn run(
    primitive: Primitive,
    members: usize,
    seed: u64,
    plan: &[(u64, Fault)],
    options: Options,
) -> Vec<Violation> {
    run_counting(primitive, members, seed, plan, options)
        .await
        .0
}

/// [`run`], returning the run's tally too.
async fn run_counting(
    primitive: Primitive,
    members: usize,
    seed: u64,
    plan: &[(u64, Fault)],
    options: Options,
) -> (Vec<Violation>, std::collections::BTreeMap<String, usize>) {
    crate::common::init_tracing();
    count_panics();
    let (mut cluster, admin, secure) = if options.secured {
        start_secure(members).await
    } else {
        let cluster = if plan.iter().any(|(_, f)| f.needs_namespaces()) {
            EtcdCluster::start_partitionable(members).await
        } else {
            EtcdCluster::start(members).await
        }
        .expect("an etcd cluster");
        let admin = cluster.client().await.unwrap();
        (cluster, admin, None)
    };
    let proxies = proxies_of(&cluster, CLIENTS).await;
    let contenders = CLIENTS + options.line;
    let sh = Arc::new(Shared {
        primitive,
        name: crate::common::unique(&format!("chaos-{seed}")),
        history: History::new(),
        stopped: CancellationToken::new(),
        epoch: (Instant::now(), mono_ns()),
        holding: StdMutex::new(vec![None; contenders]),
        leases: StdMutex::new(Vec::new()),
        tasks: StdMutex::new(Vec::new()),
        proxies: proxies.clone(),
        lose_release: StdMutex::new(vec![false; contenders]),
        releasing: StdMutex::new(vec![false; contenders]),
        secure,
        written: StdMutex::new(Vec::new()),
        tally: StdMutex::new(Default::default()),
        healed: OnceLock::new(),
    });
    let broken_client = |i: usize| options.broken.filter(|_| i == BROKEN_CLIENT);
    let in_process: Vec<bool> = (0..CLIENTS)
        .map(|i| {
            !options.processes
                || i != 0
                    && broken_client(i).is_none()
                    && !plan.iter().any(|(_, f)| f.process_of() == Some(i))
        })
        .collect();
    let mut clients = Vec::new();
    for (i, local) in in_process.iter().enumerate() {
        clients.push(Some(
            start_client(&sh, i, *local, None, broken_client(i)).await,
        ));
    }
    for i in CLIENTS..contenders {
        clients.push(Some(start_client(&sh, i, true, None, None).await));
    }
    let observer = tokio::spawn(audit::lease_observer(admin.clone(), Arc::clone(&sh)));
    let auditor = tokio::spawn(audit::key_auditor(admin.clone(), Arc::clone(&sh)));
    let stop_observers = CancellationToken::new();
    let observers: Vec<_> = (0..OBSERVERS)
        .filter(|_| primitive.observed())
        .map(|j| {
            let (sh, stop) = (Arc::clone(&sh), stop_observers.clone());
            tokio::spawn(audit::observer(j, sh, options.broken, stop))
        })
        .collect();

    let mut kills_while_holding = 0;
    // Long-hold faults: the fault, its client, the token it held long (if it did in time),
    // and when the fault began and healed.
    let mut cut_offs: Vec<(Fault, usize, Option<i64>, Instant, Instant)> = Vec::new();
    for (pause, f) in plan {
        tokio::time::sleep(Duration::from_millis(*pause)).await;
        tracing::debug!(fault = ?f, "fault starts");
        let long = f.long_hold_of();
        let mut held_long = None;
        if let Some(i) = long {
            let c = clients[i].as_ref().expect("every client runs");
            c.tell("long").await;
            if holds(&sh, i, true, HOLD_WAIT).await {
                held_long = sh.holding.lock().unwrap()[i].map(|(token, _)| token);
            } else {
                tracing::debug!(client = i, "no long hold began in time; the fault goes on");
            }
        }
        let began = Instant::now();
        tracing::debug!(fault = ?f, held_long = ?held_long, "the fault acts");
        if apply_network_fault(f, &mut cluster, &proxies).await {
            if let Some(i) = long {
                cut_offs.push((f.clone(), i, held_long, began, Instant::now()));
                clients[i].as_ref().unwrap().tell("let-go").await;
            }
            continue;
        }
        match f {
            Fault::PauseHolder(i) => {
                let Some(Contender::Process(p)) = clients[*i].as_ref() else {
                    panic!("client {i} is paused but runs in this process");
                };
                p.signal(nix::sys::signal::Signal::SIGSTOP);
                let from = Instant::now();
                tokio::time::sleep(faults::PAUSE).await;
                p.signal(nix::sys::signal::Signal::SIGCONT);
                sh.history.paused(*i, from);
                cut_offs.push((f.clone(), *i, held_long, began, Instant::now()));
                tokio::time::sleep(Duration::from_secs(1)).await;
                p.tell("let-go").await;
            }
            Fault::KillClient(i) => {
                let Some(Contender::Process(victim)) = clients[*i].take() else {
                    panic!("client {i} is killed but runs in this process");
                };
                if options.resuming.is_some() {
                    let _ = holds(&sh, *i, false, Duration::from_secs(2)).await;
                }
                victim.kill().await;
                // A killed process stops believing it holds, and wanting, the moment it dies.
                let held = sh.holding.lock().unwrap()[*i].take();
                let releasing = std::mem::take(&mut sh.releasing.lock().unwrap()[*i]);
                if let Some((token, _)) = held {
                    if primitive == Primitive::Queue && releasing {
                        // Killed as it acknowledged: its acknowledgement may have applied.
                        sh.history.record(Event::JobAcked {
                            client: *i,
                            token,
                            certain: false,
                            at: Instant::now(),
                        });
                    }
                    sh.history.ended(*i, token);
                }
                sh.history.exited(*i);
                let resume = match (held, options.resuming) {
                    (Some((token, _)), Some(every)) => {
                        kills_while_holding += 1;
                        // Every `every`-th restart comes back too late to resume: after the
                        // TTL, also counted from a leader change soon after the kill (which
                        // restarts every lease's TTL).
                        let delay = if kills_while_holding % every == 0 {
                            TTL + Duration::from_secs(3)
                        } else {
                            Duration::ZERO
                        };
                        audit::held_lock(&admin, &sh.name, token, delay).await
                    }
                    _ => None,
                };
                let restarted =
                    start_client(&sh, *i, false, resume.as_ref(), broken_client(*i)).await;
                clients[*i] = Some(restarted);
            }
            Fault::LoseRelease(i) => sh.lose_release.lock().unwrap()[*i] = true,
            Fault::RevokeRead | Fault::RevokeWrite => {
                assert!(options.secured, "{f:?} needs a secure run");
                let read = *f == Fault::RevokeWrite;
                revoke(&admin, read, !read).await;
                if *f == Fault::RevokeRead {
                    for p in &proxies {
                        p.reset_peer().await;
                    }
                }
                tokio::time::sleep(Duration::from_secs(3)).await;
                revoke(&admin, true, true).await;
            }
            other => unreachable!("{other:?} is a network fault"),
        }
    }
    // A lost release armed last acts at its client's next release: wait for it (it loses the
    // answers for 0.5 s), so that no fault acts after the heal; one that never came is
    // disarmed.
    let armed = || sh.lose_release.lock().unwrap().iter().any(|a| *a);
    if armed() {
        if crate::common::eventually(Duration::from_secs(3), || async { !armed() }).await {
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        sh.lose_release.lock().unwrap().fill(false);
    }
    // Every fault has healed: from now on every want must be served within the bound.
    let healed = Instant::now();
    sh.healed.set(healed).expect("healed once");
    for c in clients.iter().flatten() {
        c.tell("healed").await;
    }
    tokio::time::sleep(options.window).await;
    let end = Instant::now();
    tracing::debug!("stopping the clients");
    sh.stopped.cancel();
    for p in &proxies {
        p.heal().await;
    }
    for (i, c) in clients.into_iter().enumerate() {
        match c.expect("every client runs") {
            Contender::Task(task, _) => match tokio::time::timeout(TTL * 3, task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("seed {seed}: client {i} panicked: {e}"),
                Err(_) => panic!("seed {seed}: client {i} did not stop"),
            },
            Contender::Process(p) => p.stop(i, seed).await,
        }
    }
    observer.await.unwrap();
    let mut violations = auditor.await.unwrap();
    // What a work queue left in etcd, drained so that nothing remains.
    let queue_end = match primitive {
        Primitive::Queue => {
            let (q, dedup_leases) = queue::drain(&admin, &sh.name).await;
            let mut tally = sh.tally.lock().unwrap();
            tally.insert("jobs left at the end".into(), q.queued.len());
            tally.insert("dead letters".into(), q.dead.len());
            tally.insert("dedup leases revoked".into(), dedup_leases);
            Some(q)
        }
        _ => None,
    };
    if primitive.observed() {
        violations.extend(audit::observers_see_nobody_lead(&sh, OBSERVERS).await);
    }
    stop_observers.cancel();
    for o in observers {
        o.await.expect("an observer");
    }

    // Safety.
    let events = sh.history.events();
    if options.resuming.is_some() {
        let resumed = resumed_holds(&events);
        eprintln!(
            "seed {seed}: {kills_while_holding} kill(s) of a holder, {resumed} lock(s) resumed"
        );
        assert!(
            kills_while_holding > 0 && resumed > 0,
            "seed {seed}: the run resumed nothing ({kills_while_holding} kill(s) of a holder)"
        );
    }
    violations.extend(if primitive == Primitive::DoubleBarrier {
        check_double_barrier(&events, CLIENTS)
    } else {
        sh.history.check_with(primitive.rules())
    });
    let (fenced, writes) = audit::check_resource(&admin, &sh).await;
    violations.extend(fenced);
    if primitive.observed() {
        violations.extend(check_observers(&events, healed + OBSERVERS_SETTLE));
    }
    if primitive == Primitive::Selector {
        violations.extend(audit::selectors_follow(&sh, end));
    }
    if let Some(queue_end) = &queue_end {
        violations.extend(check_queue(&events, queue_end, healed, LIVENESS_BOUND, end));
    }
    // Liveness. (A worker waits for a job only while there is none: the queue's liveness is
    // that of its jobs, judged by check_queue.)
    if primitive != Primitive::Queue {
        violations.extend(check_liveness(&events, healed, LIVENESS_BOUND, end));
    }
    let count = |f: &dyn Fn(&Event) -> bool| events.iter().filter(|e| f(e)).count();
    let acquisitions = count(&|e| {
        matches!(
            e,
            Event::Acquired { .. }
                | Event::JobClaimed { .. }
                | Event::Participant {
                    step: Step::Entered,
                    ..
                }
        )
    });
    let passes = count(&|e| matches!(e, Event::Passed { .. }));
    let per_client: Vec<usize> = (0..contenders)
        .map(|i| count(&|e| matches!(e, Event::Acquired { client, .. } | Event::JobClaimed { client, .. } | Event::Participant { client, step: Step::Entered, .. } if *client == i)))
        .collect();
    let after_heal = count(
        &|e| matches!(e, Event::Acquired { at, .. } | Event::JobClaimed { at, .. } | Event::Passed { at, .. } | Event::Participant { step: Step::Entered, at, .. } if *at > healed),
    );
    assert!(acquisitions > 0, "seed {seed}: nobody ever acquired");
    if primitive == Primitive::Barrier {
        assert!(passes > 0, "seed {seed}: no wait ever passed the barrier");
    }
    if primitive == Primitive::DoubleBarrier {
        let rounds = count(&|e| {
            matches!(
                e,
                Event::Participant {
                    step: Step::Left,
                    ..
                }
            )
        });
        assert!(
            rounds > 0,
            "seed {seed}: nobody ever left the double barrier"
        );
    }

    // Leaks: no key, no lease, no task of the test remains.
    audit::nothing_remains(&admin, &sh, seed).await;
    let monitors: Vec<BackgroundTasks> = sh.tasks.lock().unwrap().clone();
    for tasks in monitors {
        tokio::time::timeout(TTL * 3, tasks.finished())
            .await
            .unwrap_or_else(|_| panic!("seed {seed}: a session's task is still running"));
    }
    let panics = PANICS.load(Ordering::SeqCst);
    assert_eq!(panics, 0, "seed {seed}: {panics} panic(s) in this process");
    for line in cut_off_summary(&events, &cut_offs) {
        eprintln!("chaos: seed {seed} ({primitive:?}): {line}");
    }
    let processes = in_process.iter().filter(|p| !**p).count();
    let tally = sh.tally.lock().unwrap().clone();
    eprintln!(
        "chaos: seed {seed} ({primitive:?}): {acquisitions} acquisitions ({after_heal} after the heal; by client {per_client:?}), {passes} passed waits, {writes} writes in etcd, {processes} client process(es), {tally:?}, {} violation(s), nothing left",
        violations.len()
    );
    (violations, tally)
}

/// What each long-hold fault did: whether its client held, when it stopped believing (its
/// `lost()`) counted from the fault's start, and how many acquisitions others made before
/// the fault healed.
fn cut_off_summary(
    events: &[Event],
    cut_offs: &[(Fault, usize, Option<i64>, Instant, Instant)],
) -> Vec<String> {
    cut_offs
        .iter()
        .map(|(f, client, token, began, healed)| {
            let Some(token) = token else {
                return format!("{f:?}: its client held nothing long in time");
            };
            // A holder stops believing at its Ended; a double barrier's participant, at the
            // GaveUp of the loss that took it out of the barrier.
            let ended = events.iter().find_map(|e| match e {
                Event::Ended {
                    client: c,
                    token: t,
                    at,
                } if c == client && t == token && at >= began => Some(*at),
                Event::GaveUp { client: c, at } if c == client && at >= began => Some(*at),
                _ => None,
            });
            let takeovers = events
                .iter()
                .filter(|e| matches!(e, Event::Acquired { client: c, at, .. } | Event::JobClaimed { client: c, at, .. } if c != client && at > began && at <= healed))
                .count();
            format!(
                "{f:?}: held token {token}; stopped believing {:?} after the fault began ({:?} long); {takeovers} acquisition(s) by others meanwhile",
                ended.map(|e| e.saturating_duration_since(*began)),
                healed.saturating_duration_since(*began)
            )
        })
        .collect()
}

/// How many holds took a token back: acquisitions of a token acquired before.
fn resumed_holds(events: &[Event]) -> usize {
    let mut seen = std::collections::HashSet::new();
    events
        .iter()
        .filter(|e| matches!(e, Event::Acquired { token, .. } if !seen.insert(*token)))
        .count()
}

/// Not a test: the entry point of a chaos client's own process, which the harness starts —
/// and kills with SIGKILL for crash faults — by running this test binary with this name.
/// Without the harness's environment it does nothing.
#[test]
#[ignore = "the entry point of a chaos client process, started by the harness"]
fn chaos_client_process() {
    client_process_main();
}
