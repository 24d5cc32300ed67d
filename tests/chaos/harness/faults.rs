//! Fault schedules — the faults, their seeded generator — and the proxies through which the
//! network faults act.

use std::sync::Arc;
use std::time::Duration;

use etcd_coord_testkit::faults::{FaultClient, FaultServer, Stream, Toxic, ToxicKind};
use etcd_coord_testkit::EtcdCluster;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

use super::{CLIENTS, TTL};

/// One fault of a schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Client `i`'s next acquisition is a *long hold* — it believes it holds until its
    /// guard's `lost()` fires — and, once it holds, its path is blackholed for longer than the
    /// TTL: the others take over when its lease expires, and its `lost()` must come first.
    CutOffHolder(usize),
    /// As [`CutOffHolder`](Self::CutOffHolder), but client `i`'s process (it runs in one) is
    /// stopped with SIGSTOP for longer than the TTL, then continued — the garbage-collection
    /// pause of the fencing literature: the others take over meanwhile, and the woken
    /// holder's writes must be rejected by etcd and its `lost()` fire at once.
    PauseHolder(usize),
    /// Asymmetric: client `i`'s next acquisition is a long hold; once it holds, its requests
    /// pass but the answers are held 700 ms (± 100 ms) — past the sessions' 500 ms refresh
    /// timeout, within the connection's 1 s HTTP/2 keep-alive timeout, so the connection lives
    /// and late answers arrive — for 2 s; then its requests are dropped too, the answers still
    /// held, for longer than the TTL. Late answers to refreshes sent before the drop arrive
    /// after refreshes that never reached etcd: credited to those, they would stretch the
    /// holder's belief past the server's expiry.
    HoldAnswers(usize),
    /// (Secure runs only, not drawn by the schedules.) The clients' role may only write, not
    /// read, for 3 s, and every client's connections are reset: waiters' watches are opened
    /// again — and refused —, and every acquisition fails (its reads are refused).
    RevokeRead,
    /// (Secure runs only, not drawn by the schedules.) The clients' role may only read, not
    /// write, for 3 s: no acquisition gets in, and a release can never succeed — the session
    /// whose release fails must end (Lost, `CleanupFailed`), as docs/safety.md promises.
    RevokeWrite,
    /// A real partition (nftables in the member's network namespace): cut member `m` from
    /// its peers for longer than the TTL; its clients still reach it.
    IsolateMember(usize),
    /// A real partition: cut member `m` from everyone for longer than the TTL.
    PartitionMember(usize),
}

impl Fault {
    /// Whether the fault needs members in network namespaces.
    pub fn needs_namespaces(&self) -> bool {
        matches!(self, Fault::IsolateMember(_) | Fault::PartitionMember(_))
    }

    /// The client whose own OS process the fault needs (killed, or paused), if any.
    pub fn process_of(&self) -> Option<usize> {
        match self {
            Fault::KillClient(i) | Fault::PauseHolder(i) => Some(*i),
            _ => None,
        }
    }

    /// The client whose next acquisition the fault makes a long hold, if any.
    pub fn long_hold_of(&self) -> Option<usize> {
        match self {
            Fault::CutOffHolder(i) | Fault::PauseHolder(i) | Fault::HoldAnswers(i) => Some(*i),
            _ => None,
        }
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
        client.clone().prop_map(Fault::RefuseClient),
        client.clone().prop_map(Fault::CutOffHolder),
        client.clone().prop_map(Fault::PauseHolder),
        client.prop_map(Fault::HoldAnswers),
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
            .add_both_ways(&self.name, "blackhole", ToxicKind::Blackhole)
            .await
            .expect("the fault server takes the toxic");
    }

    /// Drops every answer (`timeout` 0, downstream).
    pub async fn drop_responses(&self) {
        self.toxic(Toxic::new(
            "drop_responses",
            Stream::Downstream,
            ToxicKind::Timeout { timeout: 0 },
        ))
        .await;
    }

    /// Stops dropping answers (other toxics stay).
    pub async fn stop_dropping_responses(&self) {
        let _ = self.api.remove_toxic(&self.name, "drop_responses").await;
    }

    /// Drops every request (`timeout` 0, upstream).
    pub async fn drop_requests(&self) {
        self.toxic(Toxic::new(
            "drop_requests",
            Stream::Upstream,
            ToxicKind::Timeout { timeout: 0 },
        ))
        .await;
    }

    /// Holds every answer `latency` ± `jitter` (downstream only: requests pass at once).
    pub async fn hold_answers(&self, latency: Duration, jitter: Duration) {
        self.toxic(Toxic::new(
            "hold_answers",
            Stream::Downstream,
            ToxicKind::Latency {
                latency: latency.as_millis() as u64,
                jitter: jitter.as_millis() as u64,
            },
        ))
        .await;
    }

    /// `latency` ± `jitter` both ways.
    pub async fn set_latency(&self, latency: Duration, jitter: Duration) {
        self.api
            .add_both_ways(
                &self.name,
                "latency",
                ToxicKind::Latency {
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
        self.toxic(Toxic::new("refuse", Stream::Upstream, ToxicKind::Refuse))
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

/// `paths` fault proxies, path `k` in front of member `k % members` of `cluster`, on one
/// fault server of this run whose toxiproxy API drives them. Each client has a path of its
/// own, so that a fault on one client's path touches no other client (also on one member).
pub async fn proxies_of(cluster: &EtcdCluster, paths: usize) -> Vec<Arc<ApiProxy>> {
    let server = Arc::new(
        FaultServer::start("127.0.0.1:0")
            .await
            .expect("a fault server"),
    );
    let api = FaultClient::new(server.url());
    let mut proxies = Vec::new();
    for k in 0..paths {
        let name = format!("path-{k}");
        // TCP proxies: a TLS cluster's connections pass through them encrypted.
        let upstream = cluster.endpoint(k % cluster.len()).unwrap();
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

/// Applies a fault that acts on the cluster or on the proxies in front of it and waits it out
/// (faults "longer than the TTL" last TTL + 2 s; partitions are healed). Client `i`'s path is
/// `proxies[i]`. For [`Fault::CutOffHolder`] and [`Fault::HoldAnswers`] only the network part:
/// making the client hold first is the caller's. Returns false, doing nothing, for the
/// faults that act on clients themselves ([`Fault::KillClient`], [`Fault::LoseRelease`],
/// [`Fault::PauseHolder`]) or on their permissions ([`Fault::RevokeRead`],
/// [`Fault::RevokeWrite`]).
pub async fn apply_network_fault(
    f: &Fault,
    cluster: &mut EtcdCluster,
    proxies: &[Arc<ApiProxy>],
) -> bool {
    let members = cluster.len();
    match f {
        Fault::BlackholeClient(i) | Fault::CutOffHolder(i) => {
            proxies[*i].blackhole().await;
            tokio::time::sleep(TTL + Duration::from_secs(2)).await;
            proxies[*i].heal().await;
            proxies[*i].reset_peer().await;
        }
        Fault::HoldAnswers(i) => {
            let p = &proxies[*i];
            p.hold_answers(Duration::from_millis(700), Duration::from_millis(100))
                .await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            p.drop_requests().await;
            tokio::time::sleep(TTL + Duration::from_secs(2)).await;
            p.heal().await;
            p.reset_peer().await;
        }
        Fault::ResetClient(i) => proxies[*i].reset_peer().await,
        Fault::LatencySpike(i) => {
            proxies[*i]
                .set_latency(Duration::from_millis(350), Duration::from_millis(50))
                .await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            proxies[*i].heal().await;
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
            proxies[*i].drop_responses().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            proxies[*i].heal().await;
            proxies[*i].reset_peer().await;
        }
        Fault::RefuseClient(i) => {
            proxies[*i].down().await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            proxies[*i].heal().await;
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
        Fault::KillClient(_)
        | Fault::LoseRelease(_)
        | Fault::PauseHolder(_)
        | Fault::RevokeRead
        | Fault::RevokeWrite => return false,
    }
    true
}

/// How long a [`Fault::PauseHolder`] keeps the process stopped.
pub const PAUSE: Duration = Duration::from_secs(TTL.as_secs() + 2);
