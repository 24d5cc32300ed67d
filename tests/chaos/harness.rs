//! The chaos harness: cluster, proxies, contending clients, fault schedule, checker.
#![allow(dead_code)] // shared by two test binaries, each using part of it

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, Once};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, TxnOp};
use etcd_coord::testkit::checker::{
    check_double_barrier, Event, FencedRegister, History, Mode, Rules, Step, Violation,
};
use etcd_coord::testkit::{EtcdCluster, FaultProxy};
use etcd_coord::{
    BackgroundTasks, Barrier, DoubleBarrier, Election, Error, LeasedSession, Mutex, RwLock,
    Semaphore, SessionOptions,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// Contending clients (each through the proxy of member `i % members`).
pub const CLIENTS: usize = 4;
/// Session TTL: faults "longer than the TTL" last TTL + 2 s.
const TTL: Duration = Duration::from_secs(5);

/// Permits of the semaphore under test (fewer than CLIENTS, so clients contend).
const PERMITS: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Primitive {
    Mutex,
    Election,
    /// A semaphore of PERMITS permits.
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
}

/// Panics anywhere in this process (a session's background task included), counted by a
/// panic hook: a chaos run must log none.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
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
    /// Abort client `i`'s task mid-whatever (a crashed process); it restarts.
    KillClient(usize),
    /// Drop every response on client `i`'s path for 1 s (lost responses), then reset.
    DropResponses(usize),
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
        client.prop_map(Fault::LoseRelease),
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

/// What the clients share.
struct Shared {
    primitive: Primitive,
    name: String,
    history: History,
    register: FencedRegister,
    stop: AtomicBool,
    stopped: tokio_util::sync::CancellationToken,
    /// What each client is doing (printed if one does not stop).
    phase: StdMutex<Vec<&'static str>>,
    /// What each client holds now (to end its interval if its task is killed).
    holding: StdMutex<Vec<Option<i64>>>,
    /// Every lease ever used and every session's task monitor, for the leak checks.
    leases: StdMutex<Vec<i64>>,
    tasks: StdMutex<Vec<BackgroundTasks>>,
    /// The proxy of each member; client `i` goes through `proxies[i % len]`.
    proxies: Vec<Arc<FaultProxy>>,
    /// Clients whose next release is to lose its response (Fault::LoseRelease).
    lose_release: StdMutex<Vec<bool>>,
}

impl Shared {
    /// If a lost release response is armed for `client`, drops the responses on its path
    /// now and restores them (with a reset) half a second later.
    fn maybe_lose_release(&self, client: usize) {
        if !std::mem::take(&mut self.lose_release.lock().unwrap()[client]) {
            return;
        }
        tracing::debug!(client, "the response of this release will be lost");
        let proxy = Arc::clone(&self.proxies[client % self.proxies.len()]);
        proxy.drop_responses();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut faults = proxy.faults();
            faults.drop_responses = false;
            proxy.set_faults(faults);
            proxy.reset_peer();
        });
    }
}

/// One client: sessions come and go; each acquisition is recorded, writes through the fenced
/// etcd key and the in-memory register, and ends at release or at `lost()`.
async fn client_loop(id: usize, client: Client, sh: Arc<Shared>) {
    let phase = |p: &'static str| sh.phase.lock().unwrap()[id] = p;
    let options = SessionOptions::new()
        .with_ttl(TTL)
        .with_request_timeout(Duration::from_secs(2));
    while !sh.stop.load(Ordering::SeqCst) {
        phase("new session");
        let Ok(session) = LeasedSession::new(client.clone(), options.clone()).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        sh.leases.lock().unwrap().push(session.lease_id());
        sh.tasks.lock().unwrap().push(session.background_tasks());
        if sh.primitive == Primitive::DoubleBarrier {
            phase("rounds");
            double_barrier_rounds(id, &session, &sh).await;
            phase("close");
            let _ = session.close().await;
            continue;
        }
        let mutex = Mutex::new(&session, &sh.name);
        let election = Election::new(&session, &sh.name);
        let semaphore = Semaphore::new(&session, &sh.name, PERMITS);
        let rwlock = RwLock::new(&session, &sh.name);
        let barrier = Barrier::new(&session, &sh.name);
        let mut round = 0usize;
        while !sh.stop.load(Ordering::SeqCst) {
            phase("acquire");
            round += 1;
            // Ok(None): a barrier's wait() passed; nothing is held.
            let acquire = async {
                let held = match sh.primitive {
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
                            let called = Instant::now();
                            barrier.wait().await?;
                            sh.history.passed(id, called);
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
                _ = sh.stopped.cancelled() => break,
            };
            let held = match acquired {
                Ok(None) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                Ok(Some(h)) => h,
                Err(_) => break, // session lost or closed: start over with a new one
            };
            let fence = held.fence();
            let token = fence.fencing_token();
            let mode = held.mode();
            match mode {
                Mode::Exclusive => sh.history.acquired(id, token, session.lease_id()),
                Mode::Shared => sh.history.acquired_shared(id, token, session.lease_id()),
            }
            sh.holding.lock().unwrap()[id] = Some(token);
            let lost = fence.lost();
            tokio::pin!(lost);
            // Exclusive holders of a lock write; readers and semaphore permits (several at
            // once, in any order) only hold.
            let writes = mode == Mode::Exclusive && sh.primitive.rules().holders == 1;
            let work = async {
                if !writes {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    return;
                }
                // The protected resource: an etcd key written only while we own, and an
                // in-memory register that rejects tokens lower than the highest seen.
                let etcd_ok = fence
                    .txn_if_owner([TxnOp::put(
                        format!("{}-resource", sh.name),
                        token.to_string(),
                        None,
                    )])
                    .await
                    .is_ok();
                if etcd_ok {
                    let accepted = sh.register.write(token);
                    sh.history.write(id, token, accepted);
                }
                // A barrier stays up long enough for others to wait on it.
                let hold = if sh.primitive == Primitive::Barrier {
                    100
                } else {
                    30
                };
                tokio::time::sleep(Duration::from_millis(hold)).await;
            };
            phase("work");
            let lost_first = tokio::select! {
                _ = work => false,
                _ = &mut lost => true,
            };
            sh.history.ended(id, token);
            sh.holding.lock().unwrap()[id] = None;
            if lost_first {
                drop(held); // fenced release in the background, if anything is left
                break;
            }
            phase("release");
            sh.maybe_lose_release(id);
            let _ = held.release().await;
        }
        phase("close");
        let _ = session.close().await;
        phase("closed");
    }
}

/// Rounds of a double barrier for all CLIENTS clients, recorded for the checker, until the
/// session fails or the run stops.
async fn double_barrier_rounds(id: usize, session: &LeasedSession, sh: &Shared) {
    let barrier = DoubleBarrier::new(session, &sh.name, CLIENTS);
    let lease = session.lease_id();
    let mut round = 0u64;
    while !sh.stop.load(Ordering::SeqCst) {
        // Clients arrive at different times, so that an early one must wait for the rest.
        round += 1;
        let arrival = (id as u64 * 37 + round * 11) % 100;
        tokio::time::sleep(Duration::from_millis(arrival)).await;
        sh.history.entering(id, lease);
        let inside = tokio::select! {
            r = barrier.enter() => r,
            _ = sh.stopped.cancelled() => return,
        };
        let Ok(inside) = inside else { return };
        sh.history.entered(id, lease);
        tokio::time::sleep(Duration::from_millis(30)).await;
        sh.history.leaving(id, lease);
        sh.maybe_lose_release(id);
        let left = tokio::select! {
            r = inside.leave() => r,
            _ = sh.stopped.cancelled() => return,
        };
        if left.is_err() {
            return;
        }
        sh.history.left(id, lease);
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

/// Records leases the server no longer has (checker property d), every 200 ms.
async fn lease_observer(admin: Client, sh: Arc<Shared>) {
    let mut gone = std::collections::HashSet::new();
    while !sh.stop.load(Ordering::SeqCst) {
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

/// Runs `plan` against `primitive` with CLIENTS clients; asserts that nothing leaked (keys,
/// leases, tasks, panics) and returns what the safety checker found.
pub async fn run_schedule(
    primitive: Primitive,
    members: usize,
    seed: u64,
    plan: &[(u64, Fault)],
) -> Vec<Violation> {
    crate::common::init_tracing();
    count_panics();
    let mut cluster = if plan.iter().any(|(_, f)| f.needs_namespaces()) {
        EtcdCluster::start_partitionable(members).await
    } else {
        EtcdCluster::start(members).await
    }
    .expect("an etcd cluster");
    let mut proxies = Vec::new();
    for m in 0..members {
        proxies.push(Arc::new(
            FaultProxy::start(cluster.endpoint(m).unwrap())
                .await
                .unwrap(),
        ));
    }
    let admin = cluster.client().await.unwrap();
    let sh = Arc::new(Shared {
        primitive,
        name: crate::common::unique(&format!("chaos-{seed}")),
        history: History::new(),
        register: FencedRegister::new(),
        stop: AtomicBool::new(false),
        stopped: tokio_util::sync::CancellationToken::new(),
        holding: StdMutex::new(vec![None; CLIENTS]),
        phase: StdMutex::new(vec!["start"; CLIENTS]),
        leases: StdMutex::new(Vec::new()),
        tasks: StdMutex::new(Vec::new()),
        proxies: proxies.clone(),
        lose_release: StdMutex::new(vec![false; CLIENTS]),
    });
    let client_for = |i: usize| crate::common::client_via(&proxies[i % members]);
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let c = client_for(i).await;
        clients.push(tokio::spawn(client_loop(i, c, Arc::clone(&sh))));
    }
    let observer = tokio::spawn(lease_observer(admin.clone(), Arc::clone(&sh)));
    let beat = tokio::spawn(async {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            tracing::debug!("heartbeat");
        }
    });

    for (pause, f) in plan {
        tokio::time::sleep(Duration::from_millis(*pause)).await;
        tracing::debug!(fault = ?f, "fault starts");
        match f {
            Fault::BlackholeClient(i) => {
                proxies[i % members].blackhole();
                tokio::time::sleep(TTL + Duration::from_secs(2)).await;
                proxies[i % members].heal();
                proxies[i % members].reset_peer();
            }
            Fault::ResetClient(i) => proxies[i % members].reset_peer(),
            Fault::LatencySpike(i) => {
                proxies[i % members]
                    .set_latency(Duration::from_millis(300), Duration::from_millis(100));
                tokio::time::sleep(Duration::from_secs(2)).await;
                proxies[i % members].heal();
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
            Fault::KillClient(i) => {
                clients[*i].abort();
                let _ = (&mut clients[*i]).await;
                // A killed process stops believing it holds the moment it dies.
                if let Some(token) = sh.holding.lock().unwrap()[*i].take() {
                    sh.history.ended(*i, token);
                }
                let c = client_for(*i).await;
                clients[*i] = tokio::spawn(client_loop(*i, c, Arc::clone(&sh)));
            }
            Fault::DropResponses(i) => {
                proxies[i % members].drop_responses();
                tokio::time::sleep(Duration::from_secs(1)).await;
                proxies[i % members].heal();
                proxies[i % members].reset_peer();
            }
            Fault::LoseRelease(i) => sh.lose_release.lock().unwrap()[*i] = true,
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
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    tracing::debug!("stopping the clients");
    sh.stop.store(true, Ordering::SeqCst);
    sh.stopped.cancel();
    for p in &proxies {
        p.heal();
    }
    for c in clients {
        match tokio::time::timeout(TTL * 3, c).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.is_cancelled() => {}
            Ok(Err(e)) => panic!("seed {seed}: a client panicked: {e}"),
            Err(_) => panic!(
                "seed {seed}: a client did not stop; phases: {:?}",
                sh.phase.lock().unwrap()
            ),
        }
    }
    observer.await.unwrap();
    beat.abort();

    // Safety.
    let events = sh.history.events();
    let violations = if primitive == Primitive::DoubleBarrier {
        check_double_barrier(&events, CLIENTS)
    } else {
        sh.history.check_with(primitive.rules())
    };
    let acquisitions = events
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::Acquired { .. }
                    | Event::Participant {
                        step: Step::Entered,
                        ..
                    }
            )
        })
        .count();
    let passes = events
        .iter()
        .filter(|e| matches!(e, Event::Passed { .. }))
        .count();
    assert!(acquisitions > 0, "seed {seed}: nobody ever acquired");
    if primitive == Primitive::Barrier {
        assert!(passes > 0, "seed {seed}: no wait ever passed the barrier");
    }
    if primitive == Primitive::DoubleBarrier {
        let rounds = events
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    Event::Participant {
                        step: Step::Left,
                        ..
                    }
                )
            })
            .count();
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
    assert!(clean, "seed {seed}: keys or leases of the test remain");
    let monitors: Vec<BackgroundTasks> = sh.tasks.lock().unwrap().clone();
    for tasks in monitors {
        tokio::time::timeout(TTL * 3, tasks.finished())
            .await
            .unwrap_or_else(|_| panic!("seed {seed}: a session's task is still running"));
    }
    let panics = PANICS.load(Ordering::SeqCst);
    assert_eq!(panics, 0, "seed {seed}: {panics} panic(s) in this process");
    eprintln!(
        "chaos: seed {seed} ({primitive:?}): {acquisitions} acquisitions, {passes} passed waits, {} violation(s), nothing left",
        violations.len()
    );
    violations
}
