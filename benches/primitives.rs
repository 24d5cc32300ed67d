//! Benchmark of etcd-coord's primitives, comparable line by line with
//! `shared/peers/go-concurrency/peer` (etcd's own Go concurrency package).
//!
//! ```text
//! cargo bench --bench primitives -- [--endpoints HOST:PORT] --mode MODE --clients N --ops M
//!     [--ttl SECS] [--conns K] [--fresh]
//! ```
//!
//! Prints one JSON line with the peer's fields (`mode`, `clients`, `ops`, `total_s`,
//! `ops_per_s`, `p50_ms`, `p99_ms`, `mean_ms`, `max_ms`, `handoff_p50_ms`, `handoff_p99_ms`,
//! `conns`, `ttl`) and, for the scale modes, their own. Without `--endpoints` it starts its own
//! etcd (as the tests do). Sessions and connections are set up before the clock starts, as in
//! the peer; by default all clients share one connection (`--conns 1`), as in the peer.
//!
//! Modes (N = `--clients`, M = `--ops`), with the peer's meanings:
//! - `txn-floor`: one-round-trip floor: `If(CreateRevision(k) == 0) Then(Put k) Else(Get k)`,
//!   one key per client (`--fresh`: a new key each time).
//! - `mutex-uncontended`: each client its own session and mutex; M lock+release cycles;
//!   latency = lock + release.
//! - `mutex-contended`: N clients on one mutex, M acquisitions; latency = lock() wait;
//!   hand-off = previous holder's release start → next lock() return.
//! - `election-handoff`: N candidates, the winner resigns at once; M wins; latency =
//!   campaign() wait; hand-off = resign start → next campaign() return.
//! - `session-create`: M session create + close cycles over N clients.
//! - `waiters-scale`: one holder, N waiters queued on one mutex; then min(M, N) hand-offs down
//!   the queue. Latency = hand-off; also `watch_events_per_handoff` (events delivered to all
//!   waiters, divided by hand-offs: 1 means no herd). With `--permits P` (P > 1) it is a
//!   semaphore of P permits, all held before the waiters queue; each hand-off releases the
//!   *newest* holder (so releases come out of FIFO order) and the next waiter goes through;
//!   also `permits`.
//! - `guards-scale`: one session acquires M guards on distinct mutexes (N at a time); latency =
//!   per acquisition; also `keepalives_per_s` while holding them, `rss_bytes_per_guard` and the
//!   session's `tasks` while idle.
//! - `discovery-propagation`: N primed views (each a `ServiceView` and its change stream, on
//!   `--conns` shared connections; the writer has its own connection and session); M updates
//!   one after another, alternately registering `10.0.<i/250>.<i%250>:80` and deregistering
//!   it; each waits until all N views have it. Latency = just before the call → the LAST
//!   view's receipt; also `median_watcher_p50_ms` / `_p99_ms` (the median view's receipt)
//!   and `watchers`. As the peer's mode of the same name.
//! - `stm-transfer`: `--accounts A` (default 16) accounts of 1000; N clients run `Stm`
//!   transfers (SerializableSnapshot, two reads then two writes) between random accounts, M
//!   commits in total; latency = one committed transaction with its retries; also
//!   `accounts`, `attempts`, `retries_per_commit`, `skipped`, `conserved`, `history_ok`. As
//!   the peer's mode of the same name.
//! - `discovery-sync`: M endpoints stored under one target (Txns of 128 puts, not timed:
//!   `setup_s`), then N times a fresh `view()` timed until it holds all M. Also `endpoints`
//!   and `bytes_per_endpoint`: heap bytes a view holds per endpoint (a counting allocator
//!   measures this process's live heap before and after building one view).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp};
use etcd_coord::{
    Election, LeasedSession, Mutex, MutexGuard, Semaphore, SemaphorePermit, SessionOptions,
};
use etcd_coord_testkit::EtcdCluster;

/// The system allocator, counting the bytes live on the heap (for `bytes_per_endpoint`).
struct Counting;

static LIVE_HEAP: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_HEAP.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_HEAP.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_HEAP.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

struct Args {
    endpoints: Option<Vec<String>>,
    mode: String,
    clients: usize,
    ops: usize,
    ttl: u64,
    conns: usize,
    fresh: bool,
    permits: usize,
    accounts: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        endpoints: None,
        mode: "mutex-uncontended".into(),
        clients: 1,
        ops: 1000,
        ttl: 60,
        conns: 1,
        fresh: false,
        permits: 1,
        accounts: 16,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let flag = flag.trim_start_matches('-').to_owned();
        let mut value = || it.next().ok_or_else(|| format!("--{flag} needs a value"));
        match flag.as_str() {
            "bench" => {} // cargo bench passes --bench
            "fresh" => a.fresh = true,
            "endpoints" => a.endpoints = Some(value()?.split(',').map(String::from).collect()),
            "mode" => a.mode = value()?,
            "clients" => a.clients = value()?.parse().map_err(|e| format!("--clients: {e}"))?,
            "ops" => a.ops = value()?.parse().map_err(|e| format!("--ops: {e}"))?,
            "ttl" => a.ttl = value()?.parse().map_err(|e| format!("--ttl: {e}"))?,
            "conns" => a.conns = value()?.parse().map_err(|e| format!("--conns: {e}"))?,
            "permits" => a.permits = value()?.parse().map_err(|e| format!("--permits: {e}"))?,
            "accounts" => a.accounts = value()?.parse().map_err(|e| format!("--accounts: {e}"))?,
            other => return Err(format!("unknown argument --{other}")),
        }
    }
    if a.clients == 0 || a.ops == 0 {
        return Err("--clients and --ops must be >= 1".into());
    }
    if a.conns == 0 || a.conns > a.clients {
        a.conns = a.clients;
    }
    Ok(a)
}

/// Milliseconds of `d`, rounded to 3 decimals.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Nearest-rank percentile, as the peer computes it.
fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((p / 100.0 * sorted.len() as f64) + 0.999_999_999) as usize;
    ms(sorted[idx.saturating_sub(1).min(sorted.len() - 1)])
}

fn round3(f: f64) -> f64 {
    (f * 1000.0).round() / 1000.0
}

/// The resident set size of this process, in bytes.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

struct Run {
    lats: Vec<Duration>,
    hands: Vec<Duration>,
    total: Duration,
    extra: Vec<(&'static str, serde_like::Value)>,
}

/// Just enough JSON for one flat line.
mod serde_like {
    #[derive(Debug, Clone)]
    pub enum Value {
        Num(f64),
        Int(u64),
        Bool(bool),
    }
    impl std::fmt::Display for Value {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Value::Num(x) => write!(f, "{x}"),
                Value::Int(x) => write!(f, "{x}"),
                Value::Bool(x) => write!(f, "{x}"),
            }
        }
    }
}
use serde_like::Value;

fn split(m: usize, n: usize, i: usize) -> usize {
    m / n + usize::from(i < m % n)
}

/// A shared "previous release started at" clock for hand-off times (nanoseconds since start).
struct HandoffClock {
    start: Instant,
    last_release: AtomicI64,
}

impl HandoffClock {
    fn new() -> HandoffClock {
        HandoffClock {
            start: Instant::now(),
            last_release: AtomicI64::new(-1),
        }
    }
    fn acquired(&self, at: Instant) -> Option<Duration> {
        let lr = self.last_release.load(Ordering::SeqCst);
        (lr >= 0).then(|| (at - self.start).saturating_sub(Duration::from_nanos(lr as u64)))
    }
    fn releasing(&self) {
        self.last_release
            .store(self.start.elapsed().as_nanos() as i64, Ordering::SeqCst);
    }
}

async fn run(a: &Args, clients: &[Client]) -> Result<Run, Box<dyn std::error::Error>> {
    let client_for = |i: usize| clients[i % clients.len()].clone();
    let prefix = format!("bench/{}/{:x}", a.mode, rand::random::<u32>());
    let opts = SessionOptions::new().with_ttl(Duration::from_secs(a.ttl));
    let n = a.clients;
    let needs_sessions = matches!(
        a.mode.as_str(),
        "mutex-uncontended" | "mutex-contended" | "election-handoff" | "waiters-scale"
    );
    let mut sessions = Vec::new();
    if needs_sessions {
        for i in 0..n {
            sessions.push(LeasedSession::new(client_for(i), opts.clone()).await?);
        }
    }
    let remaining = Arc::new(AtomicI64::new(a.ops as i64));
    let claim = {
        let remaining = Arc::clone(&remaining);
        move || remaining.fetch_sub(1, Ordering::SeqCst) > 0
    };
    let clock = Arc::new(HandoffClock::new());
    let mut extra = Vec::new();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    match a.mode.as_str() {
        "txn-floor" => {
            for i in 0..n {
                let mut c = client_for(i);
                let (k, prefix, fresh) = (split(a.ops, n, i), prefix.clone(), a.fresh);
                tasks.push(tokio::spawn(async move {
                    let mut lats = Vec::with_capacity(k);
                    for j in 0..k {
                        let key = if fresh {
                            format!("{prefix}/{i}/{j}")
                        } else {
                            format!("{prefix}/{i}")
                        };
                        let t = Instant::now();
                        c.txn(
                            Txn::new()
                                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                                .and_then([TxnOp::put(key.as_str(), "", None)])
                                .or_else([TxnOp::get(key.as_str(), None)]),
                        )
                        .await?;
                        lats.push(t.elapsed());
                    }
                    Ok::<_, etcd_client::Error>((lats, Vec::new()))
                }));
            }
        }
        "mutex-uncontended" => {
            for (i, s) in sessions.iter().enumerate() {
                let m = Mutex::new(s, format!("{prefix}/{i}"));
                let k = split(a.ops, n, i);
                tasks.push(tokio::spawn(async move {
                    let mut lats = Vec::with_capacity(k);
                    for _ in 0..k {
                        let t = Instant::now();
                        let g = m.lock().await.map_err(boxed)?;
                        g.release().await.map_err(boxed)?;
                        lats.push(t.elapsed());
                    }
                    Ok((lats, Vec::new()))
                }));
            }
        }
        "mutex-contended" | "election-handoff" => {
            let election = a.mode == "election-handoff";
            for (i, s) in sessions.iter().enumerate() {
                let m = Mutex::new(s, format!("{prefix}/lock"));
                let e = Election::new(s, format!("{prefix}/election"));
                let (claim, clock) = (claim.clone(), Arc::clone(&clock));
                tasks.push(tokio::spawn(async move {
                    let (mut lats, mut hands) = (Vec::new(), Vec::new());
                    while claim() {
                        let t = Instant::now();
                        if election {
                            let mut l =
                                e.campaign(format!("candidate-{i}")).await.map_err(boxed)?;
                            let at = Instant::now();
                            lats.push(at - t);
                            hands.extend(clock.acquired(at));
                            clock.releasing();
                            l.resign().await.map_err(boxed)?;
                        } else {
                            let g = m.lock().await.map_err(boxed)?;
                            let at = Instant::now();
                            lats.push(at - t);
                            hands.extend(clock.acquired(at));
                            clock.releasing();
                            g.release().await.map_err(boxed)?;
                        }
                    }
                    Ok((lats, hands))
                }));
            }
        }
        "session-create" => {
            for i in 0..n {
                let (c, claim, opts) = (client_for(i), claim.clone(), opts.clone());
                tasks.push(tokio::spawn(async move {
                    let mut lats = Vec::new();
                    while claim() {
                        let t = Instant::now();
                        let s = LeasedSession::new(c.clone(), opts.clone())
                            .await
                            .map_err(boxed)?;
                        s.close().await.map_err(boxed)?;
                        lats.push(t.elapsed());
                    }
                    Ok((lats, Vec::new()))
                }));
            }
        }
        "waiters-scale" => return waiters_scale(a, &prefix, sessions, client_for(0)).await,
        "guards-scale" => return guards_scale(a, &prefix, client_for(0), opts).await,
        "discovery-propagation" => return discovery_propagation(a, &prefix, clients).await,
        "discovery-sync" => return discovery_sync(a, &prefix, client_for(0)).await,
        "stm-transfer" => return stm_transfer(a, &prefix, clients).await,
        other => return Err(format!("unknown mode {other}").into()),
    }
    let (mut lats, mut hands) = (Vec::new(), Vec::new());
    for t in tasks {
        let (l, h) = t.await??;
        lats.extend(l);
        hands.extend(h);
    }
    let total = t0.elapsed();
    for s in sessions {
        let _ = s.close().await;
    }
    if a.mode == "txn-floor" {
        let _ = client_for(0)
            .delete(
                prefix.as_str(),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await;
    }
    extra.shrink_to_fit();
    Ok(Run {
        lats,
        hands,
        total,
        extra,
    })
}

/// As the peer's `stm-transfer`: `--accounts` accounts of 1000; N clients run transfers of
/// 1..10 units between two distinct random accounts (chosen once per transaction, kept across
/// its retries), two reads then two writes, SerializableSnapshot; a transfer from an account
/// holding too little is skipped but still commits; M commits in total. Latency = one
/// committed transaction with its retries.
async fn stm_transfer(
    a: &Args,
    prefix: &str,
    clients: &[Client],
) -> Result<Run, Box<dyn std::error::Error>> {
    use etcd_coord::{Stm, StmTxn};
    use rand::{Rng, SeedableRng};

    let accounts = a.accounts;
    if accounts < 2 {
        return Err("--accounts must be >= 2".into());
    }
    let acct = |i: usize| format!("{prefix}/acct/{i:03}");
    for start in (0..accounts).step_by(128) {
        let puts: Vec<TxnOp> = (start..accounts.min(start + 128))
            .map(|j| TxnOp::put(acct(j), "1000", None))
            .collect();
        clients[0].clone().txn(Txn::new().and_then(puts)).await?;
    }
    let remaining = Arc::new(AtomicI64::new(a.ops as i64));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for g in 0..a.clients {
        let stm = Stm::new(clients[g % clients.len()].clone()).with_max_attempts(u32::MAX);
        let (remaining, prefix) = (Arc::clone(&remaining), prefix.to_owned());
        tasks.push(tokio::spawn(async move {
            let acct = |i: usize| format!("{prefix}/acct/{i:03}");
            let mut rng = rand::rngs::StdRng::from_os_rng();
            let (mut lats, mut attempts, mut skipped) = (Vec::new(), 0u64, 0u64);
            let mut deltas = vec![0i64; accounts];
            while remaining.fetch_sub(1, Ordering::SeqCst) > 0 {
                let from = rng.random_range(0..accounts);
                let to = (from + rng.random_range(1..accounts)) % accounts;
                let amount: i64 = rng.random_range(1..=10);
                let (from_key, to_key) = (&acct(from), &acct(to));
                let t = Instant::now();
                let done = stm
                    .run(|tx: StmTxn| async move {
                        let number = |v: Option<Vec<u8>>| -> Result<i64, etcd_coord::Error> {
                            v.and_then(|v| String::from_utf8(v).ok()?.parse().ok())
                                .ok_or_else(|| {
                                    etcd_coord::Error::InvalidArgument("a bad balance".into())
                                })
                        };
                        let have = number(tx.get(from_key.as_str()).await?)?;
                        let other = number(tx.get(to_key.as_str()).await?)?;
                        if have < amount {
                            return Ok(false);
                        }
                        tx.put(from_key.as_str(), (have - amount).to_string());
                        tx.put(to_key.as_str(), (other + amount).to_string());
                        Ok::<_, etcd_coord::Error>(true)
                    })
                    .await
                    .map_err(boxed)?;
                lats.push(t.elapsed());
                attempts += u64::from(done.attempts);
                if done.value {
                    deltas[from] -= amount;
                    deltas[to] += amount;
                } else {
                    skipped += 1;
                }
            }
            Ok::<_, etcd_client::Error>((lats, attempts, skipped, deltas))
        }));
    }
    let (mut lats, mut attempts, mut skipped) = (Vec::new(), 0u64, 0u64);
    let mut expected = vec![1000i64; accounts];
    for t in tasks {
        let (l, at, sk, deltas) = t.await??;
        lats.extend(l);
        attempts += at;
        skipped += sk;
        for (e, d) in expected.iter_mut().zip(deltas) {
            *e += d;
        }
    }
    let total = t0.elapsed();
    let balances: Vec<i64> = clients[0]
        .clone()
        .get(
            format!("{prefix}/acct/"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await?
        .kvs()
        .iter()
        .map(|kv| {
            kv.value_str()
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(i64::MIN)
        })
        .collect();
    let conserved = balances.iter().sum::<i64>() == 1000 * accounts as i64;
    let history_ok = balances == expected;
    let _ = clients[0]
        .clone()
        .delete(
            format!("{prefix}/"),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await;
    let commits = lats.len() as u64;
    Ok(Run {
        lats,
        hands: Vec::new(),
        total,
        extra: vec![
            ("accounts", Value::Int(accounts as u64)),
            ("attempts", Value::Int(attempts)),
            (
                "retries_per_commit",
                Value::Num(round3((attempts - commits) as f64 / commits.max(1) as f64)),
            ),
            ("skipped", Value::Int(skipped)),
            ("conserved", Value::Bool(conserved)),
            ("history_ok", Value::Bool(history_ok)),
        ],
    })
}

/// The address of endpoint `i`, as the peer's.
fn disc_addr(i: usize) -> String {
    format!("10.0.{}.{}:80", i / 250, i % 250)
}

async fn discovery_propagation(
    a: &Args,
    prefix: &str,
    clients: &[Client],
) -> Result<Run, Box<dyn std::error::Error>> {
    use etcd_coord::discovery::{Discovery, Endpoint, SessionRegistration, ViewChange};
    use futures::StreamExt;

    let target = format!("{prefix}/svc");
    let w = a.clients;
    let endpoints = clients[0].clone().member_list().await?;
    let urls: Vec<String> = endpoints
        .members()
        .iter()
        .flat_map(|m| m.client_urls().to_vec())
        .collect();
    let writer_client = Client::connect(&urls, Some(ConnectOptions::new())).await?;
    let writer = LeasedSession::new(
        writer_client,
        SessionOptions::new().with_ttl(Duration::from_secs(a.ttl)),
    )
    .await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, String, bool, Instant)>();
    let mut views = Vec::new();
    for i in 0..w {
        let view = Discovery::new(clients[i % clients.len()].clone(), &target)
            .view()
            .await?;
        let mut changes = view.changes();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(Ok(change)) = changes.next().await {
                let now = Instant::now();
                let added = !matches!(change, ViewChange::Removed { .. });
                if tx.send((i, change.key().to_owned(), added, now)).is_err() {
                    return;
                }
            }
        });
        views.push(view);
    }
    // Prime: every view's watch is established once it has seen these.
    let prime = SessionRegistration::register_with_suffix(
        &writer,
        &target,
        "prime",
        Endpoint::new("prime:0"),
    )
    .await?;
    wait_all(&mut rx, w, format!("{target}/prime"), true, Instant::now()).await;
    prime.deregister().await?;
    wait_all(&mut rx, w, format!("{target}/prime"), false, Instant::now()).await;

    let (mut lasts, mut meds) = (Vec::new(), Vec::new());
    let med = ((0.5 * w as f64) + 0.999_999_999) as usize - 1;
    let mut held = None;
    let t_start = Instant::now();
    for i in 0..a.ops {
        let (key, added, t0) = if i % 2 == 0 {
            let t0 = Instant::now();
            let r = SessionRegistration::register(&writer, &target, Endpoint::new(disc_addr(i)))
                .await?;
            let key = r.key().to_owned();
            held = Some(r);
            (key, true, t0)
        } else {
            let r = held.take().expect("registered by the previous update");
            let key = r.key().to_owned();
            let t0 = Instant::now();
            r.deregister().await?;
            (key, false, t0)
        };
        let ds = wait_all(&mut rx, w, key, added, t0).await;
        lasts.push(*ds.last().expect("w >= 1"));
        meds.push(ds[med]);
    }
    let total = t_start.elapsed();
    drop(held);
    drop(views);
    let _ = writer.close().await;
    meds.sort();
    Ok(Run {
        lats: lasts,
        hands: Vec::new(),
        total,
        extra: vec![
            ("median_watcher_p50_ms", Value::Num(pct(&meds, 50.0))),
            ("median_watcher_p99_ms", Value::Num(pct(&meds, 99.0))),
            ("watchers", Value::Int(w as u64)),
        ],
    })
}

/// Waits until each of the `w` views has seen (`key`, `added`); every view's receipt after
/// `t0`, sorted.
async fn wait_all(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(usize, String, bool, Instant)>,
    w: usize,
    key: String,
    added: bool,
    t0: Instant,
) -> Vec<Duration> {
    let mut got = vec![false; w];
    let mut ds = Vec::with_capacity(w);
    while ds.len() < w {
        let (i, k, a, at) = rx.recv().await.expect("views run");
        assert!(
            k == key && a == added && !got[i],
            "view {i} got {k} {a}, waiting for {key} {added}"
        );
        got[i] = true;
        ds.push(at - t0);
    }
    ds.sort();
    ds
}

async fn discovery_sync(
    a: &Args,
    prefix: &str,
    client: Client,
) -> Result<Run, Box<dyn std::error::Error>> {
    use etcd_coord::discovery::{Discovery, Endpoint};

    let target = format!("{prefix}/svc");
    let n = a.ops;
    let setup = Instant::now();
    for start in (0..n).step_by(128) {
        let ops: Vec<TxnOp> = (start..n.min(start + 128))
            .map(|j| {
                let addr = disc_addr(j);
                TxnOp::put(
                    format!("{target}/{addr}"),
                    Endpoint::new(addr).to_json(),
                    None,
                )
            })
            .collect();
        client.clone().txn(Txn::new().and_then(ops)).await?;
    }
    let setup_s = setup.elapsed().as_secs_f64();
    let mut lats = Vec::new();
    let mut bytes_per_endpoint = 0.0;
    let t_start = Instant::now();
    for r in 0..a.clients {
        let before = LIVE_HEAP.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let view = Discovery::new(client.clone(), &target).view().await?;
        lats.push(t0.elapsed());
        let got = view.endpoints().len();
        assert_eq!(got, n, "the view holds every endpoint");
        if r == 0 {
            // Let the view's task settle, then count what the view holds.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let held = LIVE_HEAP.load(Ordering::Relaxed) - before;
            bytes_per_endpoint = held as f64 / n as f64;
        }
        drop(view);
    }
    let total = t_start.elapsed();
    let _ = client
        .clone()
        .delete(
            format!("{target}/"),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await;
    Ok(Run {
        lats,
        hands: Vec::new(),
        total,
        extra: vec![
            ("endpoints", Value::Int(n as u64)),
            ("setup_s", Value::Num(round3(setup_s))),
            ("bytes_per_endpoint", Value::Num(round3(bytes_per_endpoint))),
        ],
    })
}

fn boxed(e: etcd_coord::Error) -> etcd_client::Error {
    etcd_client::Error::InvalidArgs(e.to_string())
}

/// A mutex guard or a semaphore permit.
enum Held {
    Lock(MutexGuard),
    Permit(SemaphorePermit),
}

impl Held {
    async fn release(self) -> Result<(), etcd_coord::Error> {
        match self {
            Held::Lock(g) => g.release().await,
            Held::Permit(p) => p.release().await,
        }
    }
}

/// `permits` holders (one: a mutex), `clients` waiters queued behind them; then hand-offs
/// down the queue, each releasing the newest holder.
async fn waiters_scale(
    a: &Args,
    prefix: &str,
    mut sessions: Vec<LeasedSession>,
    observer: Client,
) -> Result<Run, Box<dyn std::error::Error>> {
    let name = format!("{prefix}/lock");
    let permits = a.permits.max(1);
    let holder = LeasedSession::new(
        observer.clone(),
        SessionOptions::new().with_ttl(Duration::from_secs(a.ttl)),
    )
    .await?;
    let acquire = |s: &LeasedSession| {
        let (mutex, semaphore) = (Mutex::new(s, &name), Semaphore::new(s, &name, permits));
        async move {
            if permits == 1 {
                mutex.lock().await.map(Held::Lock)
            } else {
                semaphore.acquire().await.map(Held::Permit)
            }
        }
    };
    // The holders, newest last.
    let mut holders = Vec::new();
    for _ in 0..permits {
        holders.push(acquire(&holder).await?);
    }
    let clock = Arc::new(HandoffClock::new());
    let handoffs = a.ops.min(sessions.len());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Duration, Held)>();
    // Queue every waiter (in order), then wait until all their keys are in place.
    for s in &sessions {
        let (acquired, tx, clock) = (acquire(s), tx.clone(), Arc::clone(&clock));
        tokio::spawn(async move {
            if let Ok(g) = acquired.await {
                let at = Instant::now();
                let _ = tx.send((clock.acquired(at).unwrap_or_default(), g));
            }
        });
    }
    let mut kv = observer.clone();
    loop {
        let n = kv
            .get(
                format!("{name}/#"),
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_count_only(),
                ),
            )
            .await?
            .count() as usize;
        if n == sessions.len() + permits {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // every waiter's watch is in place
    let events_before: u64 = sessions.iter().map(|s| s.metrics().watch_events).sum();
    let t0 = Instant::now();
    let mut hands = Vec::with_capacity(handoffs);
    for _ in 0..handoffs {
        clock.releasing();
        holders.pop().ok_or("no holder")?.release().await?;
        let (hand, guard) = rx.recv().await.ok_or("a waiter failed")?;
        hands.push(hand);
        holders.push(guard);
    }
    let total = t0.elapsed();
    let events: u64 = sessions
        .iter()
        .map(|s| s.metrics().watch_events)
        .sum::<u64>()
        - events_before;
    let extra = vec![
        (
            "watch_events_per_handoff",
            Value::Num(round3(events as f64 / handoffs as f64)),
        ),
        ("waiters", Value::Int(sessions.len() as u64)),
        ("permits", Value::Int(permits as u64)),
    ];
    drop(rx);
    for h in holders {
        let _ = h.release().await;
    }
    for s in sessions.drain(..) {
        let _ = s.close().await;
    }
    let _ = holder.close().await;
    Ok(Run {
        lats: hands.clone(),
        hands,
        total,
        extra,
    })
}

/// One session acquiring `ops` guards on distinct mutexes, `clients` at a time.
async fn guards_scale(
    a: &Args,
    prefix: &str,
    client: Client,
    opts: SessionOptions,
) -> Result<Run, Box<dyn std::error::Error>> {
    let session = LeasedSession::new(client, opts).await?;
    let rss_before = rss_bytes();
    let t0 = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..a.clients {
        let (s, next, prefix, ops) = (
            session.clone(),
            Arc::clone(&next),
            prefix.to_owned(),
            a.ops as u64,
        );
        tasks.push(tokio::spawn(async move {
            let (mut lats, mut guards) = (Vec::new(), Vec::new());
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= ops {
                    break;
                }
                let t = Instant::now();
                guards.push(Mutex::new(&s, format!("{prefix}/{i}")).lock().await?);
                lats.push(t.elapsed());
            }
            Ok::<_, etcd_coord::Error>((lats, guards))
        }));
    }
    let (mut lats, mut guards) = (Vec::new(), Vec::new());
    for t in tasks {
        let (l, g) = t.await??;
        lats.extend(l);
        guards.extend(g);
    }
    let total = t0.elapsed();
    let rss_after = rss_bytes();
    // Idle: let the last requests' tasks finish, then count what is left running.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let tasks_idle = session.background_tasks().len();
    // Keepalive traffic while holding everything, over three refresh intervals.
    let window = session.ttl(); // = 3 refresh intervals
    let k0 = session.metrics().keepalive_requests;
    tokio::time::sleep(window).await;
    let keepalives = session.metrics().keepalive_requests - k0;
    let extra = vec![
        ("guards", Value::Int(guards.len() as u64)),
        (
            "keepalives_per_s",
            Value::Num(round3(keepalives as f64 / window.as_secs_f64())),
        ),
        (
            "rss_bytes_per_guard",
            Value::Int(rss_after.saturating_sub(rss_before) / guards.len().max(1) as u64),
        ),
        ("tasks", Value::Int(tasks_idle as u64)),
    ];
    drop(guards);
    session.settled().await;
    let _ = session.close().await;
    Ok(Run {
        lats,
        hands: Vec::new(),
        total,
        extra,
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = parse_args()?;
    // RUST_LOG=etcd_coord=trace prints the hand-off steps with timestamps (a profile).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (_own_etcd, endpoints) = match &a.endpoints {
            Some(e) => (None, e.clone()),
            None => {
                let cluster = EtcdCluster::start(1).await?;
                let e = cluster.endpoints();
                (Some(cluster), e)
            }
        };
        let mut clients = Vec::new();
        for _ in 0..a.conns {
            let mut c = Client::connect(&endpoints, Some(ConnectOptions::new())).await?;
            c.get("bench/warmup", None).await?; // the connection is up before the clock starts
            clients.push(c);
        }
        let r = run(&a, &clients).await?;
        let (mut lats, mut hands) = (r.lats, r.hands);
        lats.sort();
        hands.sort();
        let mean = if lats.is_empty() { 0.0 } else { ms(lats.iter().sum::<Duration>() / lats.len() as u32) };
        let mut line = format!(
            "{{\"mode\":\"{}\",\"clients\":{},\"ops\":{},\"total_s\":{},\"ops_per_s\":{},\"p50_ms\":{},\"p99_ms\":{},\"mean_ms\":{},\"max_ms\":{}",
            a.mode,
            a.clients,
            lats.len(),
            round3(r.total.as_secs_f64()),
            round3(lats.len() as f64 / r.total.as_secs_f64()),
            pct(&lats, 50.0),
            pct(&lats, 99.0),
            mean,
            lats.last().map_or(0.0, |d| ms(*d)),
        );
        if !hands.is_empty() {
            line += &format!(",\"handoff_p50_ms\":{},\"handoff_p99_ms\":{}", pct(&hands, 50.0), pct(&hands, 99.0));
        }
        line += &format!(",\"conns\":{},\"ttl\":{}", clients.len(), a.ttl);
        if a.fresh {
            line += ",\"fresh\":true";
        }
        for (k, v) in r.extra {
            line += &format!(",\"{k}\":{v}");
        }
        line += "}";
        println!("{line}");
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
