//! The chaos harness: cluster, proxies, contending clients (some in their own OS processes, so
//! that a crash is a real SIGKILL), fault schedule, then the safety and liveness checks.
#![allow(dead_code)] // shared by two test binaries, each using part of it

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, Once};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, TxnOp};
use etcd_coord::{
    BackgroundTasks, Barrier, DoubleBarrier, Election, Error, LeasedSession, Mutex, RwLock,
    Semaphore, SessionOptions,
};
use etcd_coord_testkit::checker::{
    check_double_barrier, check_liveness, Event, FencedRegister, History, Mode, Property, Rules,
    Step, Violation,
};
use etcd_coord_testkit::faults::{FaultClient, FaultServer, Kind, Stream, Toxic};
use etcd_coord_testkit::EtcdCluster;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

/// Contending clients (each through the proxy of member `i % members`).
pub const CLIENTS: usize = 4;
/// Session TTL: faults "longer than the TTL" last TTL + 2 s.
const TTL: Duration = Duration::from_secs(5);
/// Permits of the semaphore under test (fewer than CLIENTS, so clients contend).
const PERMITS: usize = 2;
/// After the last fault healed, every wait is served within this bound (property h): the
/// TTL — a crashed holder's lease has to expire — plus 3 s for new sessions and hand-offs on 2
/// busy cores. No key of an ended acquisition outlives it by more than TTL + this (property i).
pub const LIVENESS_BOUND: Duration = Duration::from_secs(TTL.as_secs() + 3);
/// The environment variable that turns the chaos test binary into a client process.
const CLIENT_ENV: &str = "ETCD_COORD_CHAOS_CLIENT";
/// What a restarted client process takes back first: `<lease> <key> <token> <delay ms>` of the
/// lock its killed predecessor held, and how long it waits before it tries (unset: nothing).
const RESUME_ENV: &str = "ETCD_COORD_CHAOS_RESUME";
/// How a client process reaches a secured etcd: `<CA file> <user> <password>` (unset: plain).
const SECURE_ENV: &str = "ETCD_COORD_CHAOS_SECURE";

/// How clients reach an etcd that serves TLS and requires authentication: trusting `ca`,
/// as `user`, whose role may read and write the keys under the test's names only.
#[derive(Debug, Clone)]
pub struct Secure {
    ca: std::path::PathBuf,
    user: String,
    password: String,
}

impl Secure {
    fn from_env() -> Option<Secure> {
        let spec = std::env::var(SECURE_ENV).ok()?;
        let words: Vec<&str> = spec.split_whitespace().collect();
        let [ca, user, password] = words[..] else {
            panic!("bad {SECURE_ENV}: {spec}");
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
/// The prefix of the lines a client process reports on.
const REPORT: &str = "@chaos";

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
            other => panic!("unknown primitive {other}"),
        }
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

/// One fault of a schedule.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Blackhole client `i`'s connection for longer than the TTL.
    BlackholeClient(usize),
    /// Reset client `i`'s connections.
    ResetClient(usize),
    /// 300 ms (± 100 ms) latency on client `i`'s path, keepalives included, for 2 s.
    LatencySpike(usize),
    /// SIGKILL the etcd leader; restart it 2 s later.
    KillLeader,
    /// Restart member `m`.
    RestartMember(usize),
    /// Compact the history while clients wait.
    Compact,
    /// SIGKILL client `i`'s process (a client a schedule kills runs in its own OS process):
    /// nothing is released or revoked, so its keys stay until its lease expires and a waiter
    /// takes over. It restarts as a new process.
    KillClient(usize),
    /// Drop every response on client `i`'s path for 1 s (lost responses), then reset.
    DropResponses(usize),
    /// Refuse client `i`'s connections (and reset the open ones) for 3 s: every request fails,
    /// but its sessions outlive it (their deadline is TTL − margin = 4 s away), so whatever a
    /// guard dropped during it leaves must be cleaned up afterwards.
    RefuseClient(usize),
    /// Lose the response of client `i`'s next release (or leave): the request reaches etcd,
    /// its answer is thrown away, and 0.5 s later the connection is reset.
    LoseRelease(usize),
    /// A real partition (nftables in the member's network namespace): cut member `m` from
    /// its peers for longer than the TTL; its clients still reach it.
    IsolateMember(usize),
    /// A real partition: cut member `m` from everyone for longer than the TTL.
    PartitionMember(usize),
}

impl Fault {
    /// Whether the fault needs members in network namespaces.
    fn needs_namespaces(&self) -> bool {
        matches!(self, Fault::IsolateMember(_) | Fault::PartitionMember(_))
    }
}

fn fault() -> impl Strategy<Value = Fault> {
    let client = 0..CLIENTS;
    prop_oneof![
        client.clone().prop_map(Fault::BlackholeClient),
        client.clone().prop_map(Fault::ResetClient),
        client.clone().prop_map(Fault::LatencySpike),
        Just(Fault::KillLeader),
        (0..3usize).prop_map(Fault::RestartMember),
        Just(Fault::Compact),
        client.clone().prop_map(Fault::KillClient),
        client.clone().prop_map(Fault::DropResponses),
        client.clone().prop_map(Fault::LoseRelease),
        client.prop_map(Fault::RefuseClient),
    ]
}

/// The faults of a schedule with real partitions: those of [`fault`] and the two partitions,
/// which are drawn half the time.
fn fault_or_partition() -> impl Strategy<Value = Fault> {
    prop_oneof![
        fault(),
        (0..3usize).prop_map(Fault::IsolateMember),
        (0..3usize).prop_map(Fault::PartitionMember),
    ]
}

/// The schedule of `seed`: 3 to 5 faults, each after a pause of 0.3–1.5 s. Reproducible.
pub fn schedule(seed: u64) -> Vec<(u64, Fault)> {
    generate(seed, fault().boxed())
}

/// As [`schedule`], with real partitions too (the run needs network namespaces).
pub fn schedule_with_partitions(seed: u64) -> Vec<(u64, Fault)> {
    generate(seed, fault_or_partition().boxed())
}

fn generate(seed: u64, fault: BoxedStrategy<Fault>) -> Vec<(u64, Fault)> {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    proptest::collection::vec((300u64..1500, fault), 3..6)
        .new_tree(&mut runner)
        .expect("a schedule")
        .current()
}

/// One proxy of the run's fault server, driven through toxiproxy's HTTP API — every fault of
/// the chaos suite goes through that API, as a user's toxiproxy-based suite would.
pub struct ApiProxy {
    api: FaultClient,
    name: String,
    endpoint: String,
    /// Keeps the server (shared by the run's proxies) alive.
    _server: Arc<FaultServer>,
}

impl ApiProxy {
    /// Where clients connect, `127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    async fn toxic(&self, toxic: Toxic) {
        self.api
            .add_toxic(&self.name, &toxic)
            .await
            .expect("the fault server takes the toxic");
    }

    /// Holds every byte both ways, closing nothing (`blackhole`).
    pub async fn blackhole(&self) {
        self.api
            .add_both_ways(&self.name, "blackhole", Kind::Blackhole)
            .await
            .expect("the fault server takes the toxic");
    }

    /// Drops every answer (`timeout` 0, downstream).
    pub async fn drop_responses(&self) {
        self.toxic(Toxic::new(
            "drop_responses",
            Stream::Downstream,
            Kind::Timeout { timeout: 0 },
        ))
        .await;
    }

    /// Stops dropping answers (other toxics stay).
    pub async fn stop_dropping_responses(&self) {
        let _ = self.api.remove_toxic(&self.name, "drop_responses").await;
    }

    /// `latency` ± `jitter` both ways.
    pub async fn set_latency(&self, latency: Duration, jitter: Duration) {
        self.api
            .add_both_ways(
                &self.name,
                "latency",
                Kind::Latency {
                    latency: latency.as_millis() as u64,
                    jitter: jitter.as_millis() as u64,
                },
            )
            .await
            .expect("the fault server takes the toxic");
    }

    /// Resets every open connection.
    pub async fn reset_peer(&self) {
        self.api
            .reset_connections(&self.name)
            .await
            .expect("the fault server resets");
    }

    /// Refuses new connections (`refuse`) and resets the open ones.
    pub async fn down(&self) {
        self.toxic(Toxic::new("refuse", Stream::Upstream, Kind::Refuse))
            .await;
        self.reset_peer().await;
    }

    /// Removes every toxic.
    pub async fn heal(&self) {
        self.api
            .heal(&self.name)
            .await
            .expect("the fault server heals");
    }
}

/// A fault proxy in front of each member of `cluster`, on one fault server of this run whose
/// toxiproxy API drives them: client `i`'s path is proxy `i % members`.
pub async fn proxies_of(cluster: &EtcdCluster) -> Vec<Arc<ApiProxy>> {
    let server = Arc::new(
        FaultServer::start("127.0.0.1:0")
            .await
            .expect("a fault server"),
    );
    let api = FaultClient::new(server.url());
    let mut proxies = Vec::new();
    for m in 0..cluster.len() {
        let name = format!("member-{m}");
        // TCP proxies: a TLS cluster's connections pass through them encrypted.
        let upstream = cluster.endpoint(m).unwrap();
        let endpoint = api
            .create_proxy(
                &name,
                "127.0.0.1:0",
                upstream.trim_start_matches("https://"),
            )
            .await
            .expect("a proxy");
        proxies.push(Arc::new(ApiProxy {
            api: api.clone(),
            name,
            endpoint,
            _server: Arc::clone(&server),
        }));
    }
    proxies
}

/// Applies a fault that acts on the cluster or on the proxies in front of it — everything but
/// [`Fault::KillClient`] and [`Fault::LoseRelease`], which act on clients — and waits it out
/// (faults "longer than the TTL" last TTL + 2 s; partitions are healed). Client `i`'s path is
/// the proxy of member `i % members`. Returns false for the client faults, doing nothing.
pub async fn apply_network_fault(
    f: &Fault,
    cluster: &mut EtcdCluster,
    proxies: &[Arc<ApiProxy>],
) -> bool {
    let members = proxies.len();
    match f {
        Fault::BlackholeClient(i) => {
            proxies[i % members].blackhole().await;
            tokio::time::sleep(TTL + Duration::from_secs(2)).await;
            proxies[i % members].heal().await;
            proxies[i % members].reset_peer().await;
        }
        Fault::ResetClient(i) => proxies[i % members].reset_peer().await,
        Fault::LatencySpike(i) => {
            proxies[i % members]
                .set_latency(Duration::from_millis(350), Duration::from_millis(50))
                .await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            proxies[i % members].heal().await;
        }
        Fault::KillLeader => {
            if let Some(leader) = cluster.leader().await {
                cluster.kill(leader).expect("a member");
                tokio::time::sleep(Duration::from_secs(2)).await;
                cluster.restart(leader).await.expect("member restarts");
            }
        }
        Fault::RestartMember(m) => cluster.restart(m % members).await.expect("member restarts"),
        Fault::Compact => {
            let _ = cluster.compact().await;
        }
        Fault::DropResponses(i) => {
            proxies[i % members].drop_responses().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            proxies[i % members].heal().await;
            proxies[i % members].reset_peer().await;
        }
        Fault::RefuseClient(i) => {
            proxies[i % members].down().await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            proxies[i % members].heal().await;
        }
        Fault::IsolateMember(m) | Fault::PartitionMember(m) => {
            let m = m % members;
            if matches!(f, Fault::IsolateMember(_)) {
                cluster.isolate_from_peers(m).expect("a partition");
            } else {
                cluster.partition(m).expect("a partition");
            }
            tokio::time::sleep(TTL + Duration::from_secs(2)).await;
            cluster.heal(m).expect("healed");
        }
        Fault::KillClient(_) | Fault::LoseRelease(_) => return false,
    }
    true
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `std::time::Instant` on Linux, read the same
/// way in the harness and in client processes, so their reports land on one timeline.
fn mono_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("a clock");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// What a client reports as it goes: applied to the shared history at once by a client in
/// this process, sent as a line (with its CLOCK_MONOTONIC time) by a client process.
#[derive(Debug, Clone, PartialEq)]
enum Report {
    /// A new session with this lease.
    Lease(i64),
    /// An acquisition (or a barrier's wait) starts.
    Waiting,
    /// It failed (the session was lost, or closed).
    GaveUp,
    Acquired {
        token: i64,
        lease: i64,
        mode: Mode,
    },
    /// It no longer believes it holds `token`.
    Ended {
        token: i64,
    },
    /// A write through the fenced etcd key succeeded with `token`; the register decides
    /// whether it is accepted.
    Wrote {
        token: i64,
    },
    /// A barrier's wait, called at the given time, passed.
    Passed {
        called_ns: u64,
    },
    Participant {
        lease: i64,
        step: Step,
    },
}

impl Report {
    fn encode(&self) -> String {
        match self {
            Report::Lease(l) => format!("lease {l}"),
            Report::Waiting => "waiting".into(),
            Report::GaveUp => "gave-up".into(),
            Report::Acquired { token, lease, mode } => {
                let mode = if *mode == Mode::Shared {
                    "shared"
                } else {
                    "exclusive"
                };
                format!("acquired {token} {lease} {mode}")
            }
            Report::Ended { token } => format!("ended {token}"),
            Report::Wrote { token } => format!("wrote {token}"),
            Report::Passed { called_ns } => format!("passed {called_ns}"),
            Report::Participant { lease, step } => format!("participant {lease} {step:?}"),
        }
    }

    fn decode(words: &[&str]) -> Option<Report> {
        let n = |i: usize| words.get(i).and_then(|w| w.parse::<i64>().ok());
        Some(match *words.first()? {
            "lease" => Report::Lease(n(1)?),
            "waiting" => Report::Waiting,
            "gave-up" => Report::GaveUp,
            "acquired" => Report::Acquired {
                token: n(1)?,
                lease: n(2)?,
                mode: if *words.get(3)? == "shared" {
                    Mode::Shared
                } else {
                    Mode::Exclusive
                },
            },
            "ended" => Report::Ended { token: n(1)? },
            "wrote" => Report::Wrote { token: n(1)? },
            "passed" => Report::Passed {
                called_ns: words.get(1)?.parse().ok()?,
            },
            "participant" => Report::Participant {
                lease: n(1)?,
                step: match *words.get(2)? {
                    "Entering" => Step::Entering,
                    "Entered" => Step::Entered,
                    "Leaving" => Step::Leaving,
                    _ => Step::Left,
                },
            },
            _ => return None,
        })
    }
}

/// What the clients of one run share (in this process).
struct Shared {
    primitive: Primitive,
    name: String,
    history: History,
    register: FencedRegister,
    stopped: CancellationToken,
    /// The harness's reading of CLOCK_MONOTONIC and `Instant` at one moment, to place client
    /// processes' reports.
    epoch: (Instant, u64),
    /// What each client holds now (to end its interval if its process is killed).
    holding: StdMutex<Vec<Option<i64>>>,
    /// Every lease ever used and every in-process session's task monitor, for the leak checks.
    leases: StdMutex<Vec<i64>>,
    tasks: StdMutex<Vec<BackgroundTasks>>,
    /// The proxy of each member; client `i` goes through `proxies[i % len]`.
    proxies: Vec<Arc<ApiProxy>>,
    /// Clients whose next release is to lose its response (Fault::LoseRelease).
    lose_release: StdMutex<Vec<bool>>,
    /// TLS and a user, if the cluster requires them.
    secure: Option<Secure>,
}

impl Shared {
    /// The `Instant` of a CLOCK_MONOTONIC reading.
    fn instant_of(&self, ns: u64) -> Instant {
        let (instant, base) = self.epoch;
        if ns >= base {
            instant + Duration::from_nanos(ns - base)
        } else {
            instant - Duration::from_nanos(base - ns)
        }
    }

    /// Applies client `client`'s report, made at `at`.
    fn apply(&self, client: usize, report: Report, at: Instant) {
        let h = &self.history;
        match report {
            Report::Lease(lease) => self.leases.lock().unwrap().push(lease),
            Report::Waiting => h.record(Event::Waiting { client, at }),
            Report::GaveUp => h.record(Event::GaveUp { client, at }),
            Report::Acquired { token, lease, mode } => {
                self.holding.lock().unwrap()[client] = Some(token);
                h.record(Event::Acquired {
                    client,
                    token,
                    lease,
                    mode,
                    at,
                });
            }
            Report::Ended { token } => {
                self.holding.lock().unwrap()[client] = None;
                h.record(Event::Ended { client, token, at });
            }
            Report::Wrote { token } => {
                let accepted = self.register.write(token);
                h.record(Event::Write {
                    client,
                    token,
                    accepted,
                    at,
                });
            }
            Report::Passed { called_ns } => h.record(Event::Passed {
                client,
                called: self.instant_of(called_ns),
                at,
            }),
            Report::Participant { lease, step } => h.record(Event::Participant {
                client,
                lease,
                step,
                at,
            }),
        }
    }

    /// If a lost release response is armed for `client`, drops the responses on its path
    /// now and restores them (with a reset) half a second later.
    async fn maybe_lose_release(&self, client: usize) {
        let armed = std::mem::take(&mut self.lose_release.lock().unwrap()[client]);
        if !armed {
            return;
        }
        tracing::debug!(client, "the response of this release will be lost");
        let proxy = Arc::clone(&self.proxies[client % self.proxies.len()]);
        proxy.drop_responses().await;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            proxy.stop_dropping_responses().await;
            proxy.reset_peer().await;
        });
    }
}

/// Where a client's reports go.
#[derive(Clone)]
enum Sink {
    /// A client in this process.
    Local(Arc<Shared>),
    /// A client process: lines on stdout; `go` lines on stdin arrive through `go`.
    Pipe(Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<()>>>),
}

impl Sink {
    fn report(&self, client: usize, report: Report) {
        match self {
            Sink::Local(sh) => sh.apply(client, report, Instant::now()),
            Sink::Pipe(_) => {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{REPORT} {} {}", mono_ns(), report.encode());
                let _ = out.flush();
            }
        }
    }

    /// Called just before a release: lets the harness arm a lost release response first.
    async fn releasing(&self, client: usize) {
        match self {
            Sink::Local(sh) => sh.maybe_lose_release(client).await,
            Sink::Pipe(go) => {
                {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{REPORT} {} releasing", mono_ns());
                    let _ = out.flush();
                }
                let _ = go.lock().await.recv().await;
            }
        }
    }

    fn watch_tasks(&self, tasks: BackgroundTasks, own: &StdMutex<Vec<BackgroundTasks>>) {
        match self {
            Sink::Local(sh) => sh.tasks.lock().unwrap().push(tasks),
            Sink::Pipe(_) => own.lock().unwrap().push(tasks),
        }
    }
}

/// One client: sessions come and go; each acquisition is reported, writes through the fenced
/// etcd key, and ends at release or at `lost()`. Runs until `stopped`.
/// The lock a killed client process held — its lease, key and fencing token — and how long
/// its restart waits before taking it back (past the TTL: too late, by design).
#[derive(Debug, Clone)]
struct Resume {
    lease: i64,
    key: String,
    token: i64,
    delay: Duration,
}

impl Resume {
    fn to_env(&self) -> String {
        let ms = self.delay.as_millis();
        format!("{} {} {} {ms}", self.lease, self.key, self.token)
    }

    fn from_env() -> Option<Resume> {
        let spec = std::env::var(RESUME_ENV).ok().filter(|s| !s.is_empty())?;
        let words: Vec<&str> = spec.split_whitespace().collect();
        let [lease, key, token, delay] = words[..] else {
            panic!("bad {RESUME_ENV}: {spec}");
        };
        Some(Resume {
            lease: lease.parse().expect("a lease"),
            key: key.to_owned(),
            token: token.parse().expect("a token"),
            delay: Duration::from_millis(delay.parse().expect("a delay")),
        })
    }
}

/// Every contender's sessions.
fn session_options() -> SessionOptions {
    SessionOptions::new()
        .with_ttl(TTL)
        .with_request_timeout(Duration::from_secs(2))
}

/// A restarted client process takes back what its killed predecessor held — the same lease,
/// key and token, through `LeasedSession::resume` and the primitive's `resume` — writes
/// through it (an exclusive lock) and releases it, like any holder; or takes nothing if the
/// lease or the key is gone.
async fn resume_and_release(
    id: usize,
    primitive: Primitive,
    name: &str,
    client: &Client,
    resume: &Resume,
    sink: &Sink,
    own_tasks: &Arc<StdMutex<Vec<BackgroundTasks>>>,
) {
    tokio::time::sleep(resume.delay).await;
    sink.report(id, Report::Waiting);
    let Ok(session) = LeasedSession::resume(client.clone(), resume.lease, session_options()).await
    else {
        sink.report(id, Report::GaveUp);
        return;
    };
    sink.watch_tasks(session.background_tasks(), own_tasks);
    let (key, token) = (resume.key.as_str(), resume.token);
    let taken = match primitive {
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
        sink.report(id, Report::GaveUp);
        let _ = session.close().await;
        return;
    };
    hold_and_release(id, primitive, name, held, resume.lease, sink, None).await;
    let _ = session.close().await;
}

/// Reports `held` (acquired under `lease`) as acquired and holds it as every contender does —
/// an exclusive lock writes through the protected resource, then holds briefly; others only
/// hold; with `until`, it holds until that is cancelled — then reports its end and releases
/// it. Returns whether it was lost first (then it is released in the background).
async fn hold_and_release(
    id: usize,
    primitive: Primitive,
    name: &str,
    held: Held,
    lease: i64,
    sink: &Sink,
    until: Option<&CancellationToken>,
) -> bool {
    let fence = held.fence();
    let token = fence.fencing_token();
    let mode = held.mode();
    sink.report(id, Report::Acquired { token, lease, mode });
    // Exclusive holders of a lock write; readers and semaphore permits (several at once, in
    // any order) only hold.
    let writes = mode == Mode::Exclusive && primitive.rules().holders == 1;
    let work = async {
        if let Some(until) = until {
            until.cancelled().await;
            return;
        }
        if !writes {
            let hold = if primitive == Primitive::Semaphore {
                rand::random_range(10..100)
            } else {
                30
            };
            tokio::time::sleep(Duration::from_millis(hold)).await;
            return;
        }
        // The protected resource: an etcd key written only while we own, and an in-memory
        // register that rejects tokens lower than the highest seen.
        let put = TxnOp::put(format!("{name}-resource"), token.to_string(), None);
        if fence.txn_if_owner([put]).await.is_ok() {
            sink.report(id, Report::Wrote { token });
        }
        // A barrier stays up long enough for others to wait on it.
        let hold = if primitive == Primitive::Barrier {
            100
        } else {
            30
        };
        tokio::time::sleep(Duration::from_millis(hold)).await;
    };
    let lost_first = tokio::select! {
        _ = work => false,
        _ = fence.lost() => true,
    };
    sink.report(id, Report::Ended { token });
    if lost_first {
        drop(held); // fenced release in the background, if anything is left
    } else {
        sink.releasing(id).await;
        let _ = held.release().await;
    }
    lost_first
}

async fn client_loop(
    id: usize,
    primitive: Primitive,
    name: String,
    client: Client,
    sink: Sink,
    stopped: CancellationToken,
    own_tasks: Arc<StdMutex<Vec<BackgroundTasks>>>,
) {
    let options = session_options();
    let long_holder = primitive == Primitive::Semaphore && id == CLIENTS - 1;
    while !stopped.is_cancelled() {
        let session = tokio::select! {
            s = LeasedSession::new(client.clone(), options.clone()) => s,
            _ = stopped.cancelled() => break,
        };
        let Ok(session) = session else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        sink.report(id, Report::Lease(session.lease_id()));
        sink.watch_tasks(session.background_tasks(), &own_tasks);
        if primitive == Primitive::DoubleBarrier {
            double_barrier_rounds(id, &name, &session, &sink, &stopped).await;
            let _ = session.close().await;
            continue;
        }
        let mutex = Mutex::new(&session, &name);
        let election = Election::new(&session, &name);
        let semaphore = Semaphore::new(&session, &name, PERMITS);
        let rwlock = RwLock::new(&session, &name);
        let barrier = Barrier::new(&session, &name);
        let mut round = 0usize;
        while !stopped.is_cancelled() {
            round += 1;
            sink.report(id, Report::Waiting);
            // Ok(None): a barrier's wait() passed; nothing is held.
            let acquire = async {
                let held = match primitive {
                    Primitive::Mutex => Held::Mutex(mutex.lock().await?),
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
                            barrier.wait().await?;
                            sink.report(id, Report::Passed { called_ns });
                            return Ok(None);
                        }
                        held => Held::Hold(held?),
                    },
                    Primitive::DoubleBarrier => unreachable!("run by double_barrier_rounds"),
                };
                Ok::<_, Error>(Some(held))
            };
            // Stopping drops a waiting acquisition: cancel-safe, it leaves no key.
            let acquired = tokio::select! {
                r = acquire => r,
                _ = stopped.cancelled() => break,
            };
            let held = match acquired {
                Ok(None) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                Ok(Some(h)) => h,
                Err(_) => {
                    // Session lost or closed: start over with a new one.
                    sink.report(id, Report::GaveUp);
                    break;
                }
            };
            let until = long_holder.then_some(&stopped);
            if hold_and_release(id, primitive, &name, held, session.lease_id(), &sink, until).await
            {
                break; // lost: start over with a new session
            }
        }
        let _ = session.close().await;
    }
}

/// Rounds of a double barrier for all CLIENTS clients, reported for the checker, until the
/// session fails or the run stops.
async fn double_barrier_rounds(
    id: usize,
    name: &str,
    session: &LeasedSession,
    sink: &Sink,
    stopped: &CancellationToken,
) {
    let barrier = DoubleBarrier::new(session, name, CLIENTS);
    let lease = session.lease_id();
    let step = |step| sink.report(id, Report::Participant { lease, step });
    let mut round = 0u64;
    while !stopped.is_cancelled() {
        // Clients arrive at different times, so that an early one must wait for the rest.
        round += 1;
        let arrival = (id as u64 * 37 + round * 11) % 100;
        tokio::time::sleep(Duration::from_millis(arrival)).await;
        step(Step::Entering);
        let inside = tokio::select! {
            r = barrier.enter() => r,
            _ = stopped.cancelled() => return,
        };
        let Ok(inside) = inside else {
            sink.report(id, Report::GaveUp);
            return;
        };
        step(Step::Entered);
        tokio::time::sleep(Duration::from_millis(30)).await;
        step(Step::Leaving);
        sink.releasing(id).await;
        let left = tokio::select! {
            r = inside.leave() => r,
            _ = stopped.cancelled() => return,
        };
        if left.is_err() {
            sink.report(id, Report::GaveUp);
            return;
        }
        step(Step::Left);
    }
}

enum Held {
    Mutex(etcd_coord::MutexGuard),
    Leader(etcd_coord::Leadership),
    Permit(etcd_coord::SemaphorePermit),
    Read(etcd_coord::RwLockReadGuard),
    Write(etcd_coord::RwLockWriteGuard),
    Hold(etcd_coord::BarrierHold),
}

impl Held {
    fn fence(&self) -> etcd_coord::Fence {
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

/// The entry point of a client process (see `chaos_client_process`): runs one client whose
/// configuration is in [`CLIENT_ENV`] — `<id> <primitive> <name> <endpoint>` — reporting on
/// stdout, until `stop` arrives on stdin (or stdin closes). Then it checks that every session
/// task it started has ended and that nothing panicked, and reports `done`.
pub fn client_process_main() {
    let Ok(config) = std::env::var(CLIENT_ENV) else {
        return; // not started by the harness: nothing to do
    };
    let words: Vec<&str> = config.split_whitespace().collect();
    let [id, primitive, name, endpoint] = words[..] else {
        panic!("bad {CLIENT_ENV}: {config}");
    };
    let (id, primitive) = (
        id.parse::<usize>().expect("an id"),
        Primitive::parse(primitive),
    );
    crate::common::init_tracing();
    count_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let stopped = CancellationToken::new();
        let (go_tx, go_rx) = tokio::sync::mpsc::unbounded_channel();
        let stdin_stop = stopped.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match line.trim() {
                    "go" => {
                        let _ = go_tx.send(());
                    }
                    "stop" => break,
                    _ => {}
                }
            }
            stdin_stop.cancel();
        });
        let secure = std::env::var(SECURE_ENV)
            .is_ok_and(|s| !s.is_empty())
            .then(Secure::from_env)
            .flatten();
        let client = connect(endpoint.to_owned(), secure.as_ref()).await;
        let tasks = Arc::new(StdMutex::new(Vec::new()));
        let sink = Sink::Pipe(Arc::new(tokio::sync::Mutex::new(go_rx)));
        if let Some(resume) = Resume::from_env() {
            tokio::select! {
                _ = resume_and_release(id, primitive, name, &client, &resume, &sink, &tasks) => {}
                _ = stopped.cancelled() => {}
            }
        }
        client_loop(
            id,
            primitive,
            name.to_owned(),
            client,
            sink,
            stopped,
            Arc::clone(&tasks),
        )
        .await;
        let monitors: Vec<BackgroundTasks> = tasks.lock().unwrap().clone();
        for t in monitors {
            tokio::time::timeout(TTL * 3, t.finished())
                .await
                .expect("a session's task outlived its session");
        }
    });
    let panics = PANICS.load(Ordering::SeqCst);
    assert_eq!(panics, 0, "{panics} panic(s) in client process {id}");
    println!("{REPORT} {} done", mono_ns());
}

/// A client running in its own OS process.
struct ProcessClient {
    child: tokio::process::Child,
    stdin: Arc<tokio::sync::Mutex<tokio::process::ChildStdin>>,
    /// Completes with whether the process reported `done`.
    reader: tokio::task::JoinHandle<bool>,
}

impl ProcessClient {
    /// Starts client `id` as a process of this test binary, reaching etcd at `endpoint`.
    fn spawn(
        id: usize,
        sh: &Arc<Shared>,
        endpoint: String,
        resume: Option<&Resume>,
    ) -> ProcessClient {
        // This very binary, even if a rebuild has replaced the file at its path since.
        let exe = if cfg!(target_os = "linux") {
            std::path::PathBuf::from("/proc/self/exe")
        } else {
            std::env::current_exe().expect("the test binary")
        };
        let mut child = tokio::process::Command::new(exe)
            .args([
                "harness::chaos_client_process",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(
                CLIENT_ENV,
                format!("{id} {:?} {} {endpoint}", sh.primitive, sh.name),
            )
            .env(
                SECURE_ENV,
                sh.secure.as_ref().map(Secure::to_env).unwrap_or_default(),
            )
            .env(RESUME_ENV, resume.map(Resume::to_env).unwrap_or_default())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("a client process");
        let stdin = Arc::new(tokio::sync::Mutex::new(child.stdin.take().expect("stdin")));
        let stdout = child.stdout.take().expect("stdout");
        let (sh, to_child) = (Arc::clone(sh), Arc::clone(&stdin));
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut done = false;
            // Read to the end: the test harness in the process still writes after `done`.
            while let Ok(Some(line)) = lines.next_line().await {
                // libtest writes "test … ... " without a newline before the first report.
                let Some(rest) = line.find(REPORT).map(|i| &line[i + REPORT.len()..]) else {
                    continue; // the test harness's own output
                };
                let words: Vec<&str> = rest.split_whitespace().collect();
                let Some(at) = words.first().and_then(|w| w.parse::<u64>().ok()) else {
                    continue;
                };
                let at = sh.instant_of(at);
                match words.get(1).copied() {
                    Some("done") => done = true,
                    Some("releasing") => {
                        sh.maybe_lose_release(id).await;
                        let _ = to_child.lock().await.write_all(b"go\n").await;
                    }
                    _ => match Report::decode(&words[1..]) {
                        Some(report) => sh.apply(id, report, at),
                        None => panic!("client {id}: unreadable report {line:?}"),
                    },
                }
            }
            done
        });
        ProcessClient {
            child,
            stdin,
            reader,
        }
    }

    /// SIGKILL: a crash. Nothing is released or revoked. What the process reported before it
    /// died is still in the pipe: read it to the end.
    async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let _ = self.reader.await;
    }

    /// Asks it to stop and waits until it exited, having reported `done`.
    async fn stop(mut self, id: usize, seed: u64) {
        let _ = self.stdin.lock().await.write_all(b"stop\n").await;
        let status = tokio::time::timeout(TTL * 3, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("seed {seed}: client process {id} did not stop"))
            .expect("an exit status");
        let done = self.reader.await.unwrap_or(false);
        assert!(
            status.success() && done,
            "seed {seed}: client process {id} failed ({status}; reported done: {done})"
        );
    }
}

/// A client of the run: a task of this process, or a process of its own.
enum Contender {
    Task(tokio::task::JoinHandle<()>),
    Process(ProcessClient),
}

/// Records leases the server no longer has (checker property d), every 200 ms.
async fn lease_observer(admin: Client, sh: Arc<Shared>) {
    let mut gone = HashSet::new();
    while !sh.stopped.is_cancelled() {
        let leases: Vec<i64> = sh.leases.lock().unwrap().clone();
        for lease in leases {
            if gone.contains(&lease) {
                continue;
            }
            if let Ok(r) = admin.clone().lease_time_to_live(lease, None).await {
                if r.ttl() == -1 {
                    gone.insert(lease);
                    sh.history.lease_gone(lease);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Property (i): every 500 ms, reads the keys of the run; a key whose create revision is the
/// token of an acquisition that ended more than TTL + LIVENESS_BOUND ago was left behind.
async fn key_auditor(admin: Client, sh: Arc<Shared>) -> Vec<Violation> {
    let mut found = Vec::new();
    let mut reported = HashSet::new();
    let prefix = format!("{}/", sh.name);
    let limit = TTL + LIVENESS_BOUND;
    while !sh.stopped.is_cancelled() {
        let opts = GetOptions::new().with_prefix().with_keys_only();
        if let Ok(resp) = admin.clone().get(prefix.as_str(), Some(opts)).await {
            let now = Instant::now();
            // When each token was last let go (a token acquired again — a resumed lock — is
            // held again).
            let mut ended: HashMap<i64, Instant> = HashMap::new();
            for e in sh.history.events() {
                match e {
                    Event::Ended { token, at, .. } => {
                        ended.insert(token, at);
                    }
                    Event::Acquired { token, .. } => {
                        ended.remove(&token);
                    }
                    _ => {}
                }
            }
            for kv in resp.kvs() {
                let token = kv.create_revision();
                if let Some(end) = ended.get(&token) {
                    if now.duration_since(*end) > limit && reported.insert(token) {
                        found.push(Violation {
                            property: Property::OrphanKey,
                            detail: format!(
                                "key {} (token {token}) still there {:?} after its holder let go",
                                kv.key_str().unwrap_or("?"),
                                now.duration_since(*end)
                            ),
                        });
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    found
}

/// The lock a killed holder of `token` left under `name`, if its key is still there.
async fn held_lock(admin: &Client, name: &str, token: i64, delay: Duration) -> Option<Resume> {
    let resp = admin
        .clone()
        .get(format!("{name}/"), Some(GetOptions::new().with_prefix()))
        .await
        .ok()?;
    let kv = resp.kvs().iter().find(|kv| kv.create_revision() == token)?;
    Some(Resume {
        lease: kv.lease(),
        key: kv.key_str().ok()?.to_owned(),
        token,
        delay,
    })
}

/// How many holds took a token back: acquisitions of a token acquired before.
fn resumed_holds(events: &[Event]) -> usize {
    let mut seen = HashSet::new();
    events
        .iter()
        .filter(|e| matches!(e, Event::Acquired { token, .. } if !seen.insert(*token)))
        .count()
}

/// Runs `plan` against `primitive` with CLIENTS clients — client 0 and every client the plan
/// kills in their own OS processes — then keeps them running for LIVENESS_BOUND + 1 s after
/// the last fault healed. Asserts that nothing leaked (keys, leases, tasks, panics) and returns
/// what the safety, liveness and key checks found.
pub async fn run_schedule(
    primitive: Primitive,
    members: usize,
    seed: u64,
    plan: &[(u64, Fault)],
) -> Vec<Violation> {
    run(primitive, members, seed, plan, true, false, false).await
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
    run(primitive, members, seed, plan, true, true, false).await
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
    run(primitive, members, seed, plan, true, false, true).await
}

/// As [`run_schedule`] with every client in this process (a plan without kills) and no
/// liveness window (the clients stop 0.5 s after the plan): for the deliberately broken
/// primitives, whose switch is this process's, and whose safety is what is checked.
pub async fn run_schedule_in_process(
    primitive: Primitive,
    members: usize,
    seed: u64,
    plan: &[(u64, Fault)],
) -> Vec<Violation> {
    assert!(
        !plan.iter().any(|(_, f)| matches!(f, Fault::KillClient(_))),
        "killing a client needs client processes"
    );
    run(primitive, members, seed, plan, false, false, false).await
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

async fn run(
    primitive: Primitive,
    members: usize,
    seed: u64,
    plan: &[(u64, Fault)],
    processes: bool,
    secured: bool,
    resuming: bool,
) -> Vec<Violation> {
    crate::common::init_tracing();
    count_panics();
    let (mut cluster, admin, secure) = if secured {
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
    let proxies = proxies_of(&cluster).await;
    let sh = Arc::new(Shared {
        primitive,
        name: crate::common::unique(&format!("chaos-{seed}")),
        history: History::new(),
        register: FencedRegister::new(),
        stopped: CancellationToken::new(),
        epoch: (Instant::now(), mono_ns()),
        holding: StdMutex::new(vec![None; CLIENTS]),
        leases: StdMutex::new(Vec::new()),
        tasks: StdMutex::new(Vec::new()),
        proxies: proxies.clone(),
        lose_release: StdMutex::new(vec![false; CLIENTS]),
        secure,
    });
    let in_process: Vec<bool> = (0..CLIENTS)
        .map(|i| {
            !processes
                || i != 0
                    && !plan
                        .iter()
                        .any(|(_, f)| matches!(f, Fault::KillClient(k) if *k == i))
        })
        .collect();
    let endpoint = |i: usize| proxies[i % members].endpoint();
    let start = |i: usize, resume: Option<Resume>| {
        let sh = Arc::clone(&sh);
        let local = in_process[i];
        let endpoint = endpoint(i);
        async move {
            if local {
                let proxy = &sh.proxies[i % sh.proxies.len()];
                let client = connect(proxy.endpoint(), sh.secure.as_ref()).await;
                let (sink, stopped) = (Sink::Local(Arc::clone(&sh)), sh.stopped.clone());
                let (primitive, name) = (sh.primitive, sh.name.clone());
                let own = Arc::new(StdMutex::new(Vec::new()));
                Contender::Task(tokio::spawn(client_loop(
                    i, primitive, name, client, sink, stopped, own,
                )))
            } else {
                Contender::Process(ProcessClient::spawn(i, &sh, endpoint, resume.as_ref()))
            }
        }
    };
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(Some(start(i, None).await));
    }
    let observer = tokio::spawn(lease_observer(admin.clone(), Arc::clone(&sh)));
    let auditor = tokio::spawn(key_auditor(admin.clone(), Arc::clone(&sh)));

    let mut kills_while_holding = 0;
    for (pause, f) in plan {
        tokio::time::sleep(Duration::from_millis(*pause)).await;
        tracing::debug!(fault = ?f, "fault starts");
        if apply_network_fault(f, &mut cluster, &proxies).await {
            continue;
        }
        match f {
            Fault::KillClient(i) => {
                let Some(Contender::Process(victim)) = clients[*i].take() else {
                    panic!("client {i} is killed but runs in this process");
                };
                if resuming {
                    let holds = || sh.holding.lock().unwrap()[*i].is_some();
                    let _ = crate::common::eventually(Duration::from_secs(2), || async { holds() })
                        .await;
                }
                victim.kill().await;
                // A killed process stops believing it holds, and waiting, the moment it dies.
                let held = sh.holding.lock().unwrap()[*i].take();
                if let Some(token) = held {
                    sh.history.ended(*i, token);
                }
                sh.history.gave_up(*i);
                let resume = match held {
                    Some(token) if resuming => {
                        kills_while_holding += 1;
                        // Every third restart comes back too late to resume: after the TTL,
                        // also counted from a leader change soon after the kill (which
                        // restarts every lease's TTL).
                        let delay = if kills_while_holding % 3 == 0 {
                            TTL + Duration::from_secs(3)
                        } else {
                            Duration::ZERO
                        };
                        held_lock(&admin, &sh.name, token, delay).await
                    }
                    _ => None,
                };
                clients[*i] = Some(start(*i, resume).await);
            }
            Fault::LoseRelease(i) => sh.lose_release.lock().unwrap()[*i] = true,
            other => unreachable!("{other:?} is a network fault"),
        }
    }
    // Every fault has healed: from now on every wait must be served within the bound.
    let healed = Instant::now();
    let window = if processes {
        LIVENESS_BOUND + Duration::from_secs(1)
    } else {
        Duration::from_millis(500)
    };
    tokio::time::sleep(window).await;
    let end = Instant::now();
    tracing::debug!("stopping the clients");
    sh.stopped.cancel();
    for p in &proxies {
        p.heal().await;
    }
    for (i, c) in clients.into_iter().enumerate() {
        match c.expect("every client runs") {
            Contender::Task(task) => match tokio::time::timeout(TTL * 3, task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("seed {seed}: client {i} panicked: {e}"),
                Err(_) => panic!("seed {seed}: client {i} did not stop"),
            },
            Contender::Process(p) => p.stop(i, seed).await,
        }
    }
    observer.await.unwrap();
    let mut violations = auditor.await.unwrap();

    // Safety.
    let events = sh.history.events();
    if resuming {
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
    // Liveness.
    violations.extend(check_liveness(&events, healed, LIVENESS_BOUND, end));
    let count = |f: &dyn Fn(&Event) -> bool| events.iter().filter(|e| f(e)).count();
    let acquisitions = count(&|e| {
        matches!(
            e,
            Event::Acquired { .. }
                | Event::Participant {
                    step: Step::Entered,
                    ..
                }
        )
    });
    let passes = count(&|e| matches!(e, Event::Passed { .. }));
    let after_heal = count(
        &|e| matches!(e, Event::Acquired { at, .. } | Event::Passed { at, .. } | Event::Participant { step: Step::Entered, at, .. } if *at > healed),
    );
    assert!(acquisitions > 0, "seed {seed}: nobody ever acquired");
    if after_heal == 0 {
        violations.push(Violation {
            property: Property::Starved,
            detail: "nobody acquired after the faults healed".into(),
        });
    }
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

    // Leaks: no key, no lease, no task of the test remains (lost sessions' leases expire).
    let prefix = format!("{}/", sh.name);
    let leases: Vec<i64> = sh.leases.lock().unwrap().clone();
    let clean = crate::common::eventually(TTL * 3, || {
        let (admin, prefix, leases) = (admin.clone(), prefix.clone(), leases.clone());
        async move {
            let keys = admin
                .clone()
                .get(
                    prefix.as_str(),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await
                .map(|r| r.count())
                .unwrap_or(1);
            let mut alive = 0;
            for l in leases {
                if admin
                    .clone()
                    .lease_time_to_live(l, None)
                    .await
                    .map_or(1, |r| r.ttl())
                    >= 0
                {
                    alive += 1;
                }
            }
            keys == 0 && alive == 0
        }
    })
    .await;
    if !clean {
        // Say what remains, so that a rare leak can be told apart from a slow expiry.
        let keys: Vec<String> = admin
            .clone()
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map(|r| {
                r.kvs()
                    .iter()
                    .map(|kv| format!("{} (lease {:x})", kv.key_str().unwrap_or("?"), kv.lease()))
                    .collect()
            })
            .unwrap_or_default();
        let mut alive = Vec::new();
        for l in leases {
            if let Ok(r) = admin.clone().lease_time_to_live(l, None).await {
                if r.ttl() >= 0 {
                    alive.push(format!("{l:x} (ttl {} of {})", r.ttl(), r.granted_ttl()));
                }
            }
        }
        panic!("seed {seed}: keys or leases of the test remain: keys {keys:?}, leases {alive:?}");
    }
    let monitors: Vec<BackgroundTasks> = sh.tasks.lock().unwrap().clone();
    for tasks in monitors {
        tokio::time::timeout(TTL * 3, tasks.finished())
            .await
            .unwrap_or_else(|_| panic!("seed {seed}: a session's task is still running"));
    }
    let panics = PANICS.load(Ordering::SeqCst);
    assert_eq!(panics, 0, "seed {seed}: {panics} panic(s) in this process");
    let processes = in_process.iter().filter(|p| !**p).count();
    eprintln!(
        "chaos: seed {seed} ({primitive:?}): {acquisitions} acquisitions ({after_heal} after the heal), {passes} passed waits, {processes} client process(es), {} violation(s), nothing left",
        violations.len()
    );
    violations
}

/// Not a test: the entry point of a chaos client's own process, which the harness starts —
/// and kills with SIGKILL for crash faults — by running this test binary with this name.
/// Without the harness's environment it does nothing.
#[test]
#[ignore = "the entry point of a chaos client process, started by the harness"]
fn chaos_client_process() {
    client_process_main();
}
