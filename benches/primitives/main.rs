//! Benchmark of etcd-coord's primitives, comparable line by line with
//! `shared/peers/go-concurrency/peer` (etcd's own Go concurrency package).
//!
//! ```text
//! cargo bench --bench primitives -- [--endpoints HOST:PORT] --mode MODE --clients N --ops M
//!     [--ttl SECS] [--conns K] [--fresh] [--extra-write] [--txn] [--requeue]
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
//!   hand-off = previous holder's release start → next lock() return. `--requeue` (ours
//!   only; also for `election-handoff`, `rwlock-contended` and `semaphore-contended`): each
//!   client acquires once, then takes every next turn with its guard's `requeue()` (the
//!   release and the next enqueue in one Txn); latency = requeue() call → return (its
//!   release included), hand-off = previous holder's requeue start → next return.
//! - `election-handoff`: N candidates, the winner resigns at once; M wins; latency =
//!   campaign() wait; hand-off = resign start → next campaign() return.
//! - `session-create`: M session create + close cycles over N clients.
//! - `waiters-scale`: one holder, N waiters queued on one mutex; then min(M, N) hand-offs down
//!   the queue; with M > N the holder takes the lock back and the N waiters line up again,
//!   until M hand-offs were measured (so that 8 waiters' percentiles come from as many
//!   hand-offs as 1,000 waiters'). Latency = hand-off; also `watch_events_per_handoff` (events delivered to all
//!   waiters, divided by hand-offs: 1 means no herd). With `--permits P` (P > 1) it is a
//!   semaphore of P permits, all held before the waiters queue; each hand-off releases the
//!   *newest* holder (so releases come out of FIFO order) and the next waiter goes through;
//!   also `permits`, `bytes_per_waiter` (resident memory the queued waits added, per wait)
//!   and `heap_bytes_per_waiter` (heap bytes they hold live, per wait).
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
//! - `queue`: a `WorkQueue`: M jobs enqueued by N producers (`enqueue_per_s`), then N workers
//!   (a session each) claim and acknowledge them all; `ops_per_s` = jobs claimed and
//!   acknowledged per second, latency = one `claim()`; also `txns_per_job` and
//!   `reads_per_job`. Beside the peer's `queue` (etcd's Go `recipe.Queue`, whose dequeue
//!   deletes the job: at-most-once). With
//!   `--work-ms W` (ours only) each worker works W ms on a job before its ack, so the claims
//!   no longer saturate etcd; also `work_ms`.
//! - `relay-floor`: the peer's `handoff-floor` on etcd-client: a relay around a ring of N
//!   watchers, M hops, each one put commit plus one watch notification (latency = put sent →
//!   event at its watcher; ops_per_s = hops/s). `--extra-write`: each watcher, once its put
//!   returned, writes one more key, as a client that released a lock then enqueues again:
//!   the floor of a lock taken and released in a loop, two writes per acquisition. `--txn`:
//!   each hop's put goes in a Txn, under one compare that always holds, as a hand-off of ours
//!   writes under compares: the floor of a hand-off built on Txns. Also `writes_per_hop` and
//!   `txn`.
//! - `discovery-sync`: M endpoints stored under one target (Txns of 128 puts, not timed:
//!   `setup_s`), then N times a fresh `view()` timed until it holds all M. Also `endpoints`
//!   and `bytes_per_endpoint`: heap bytes a view holds per endpoint (a counting allocator
//!   measures this process's live heap before and after building one view).

mod discovery;
mod floor;
mod mutex;
mod profile;
mod queue;
mod report;
mod scale;
mod stm;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use etcd_coord_testkit::EtcdCluster;

use mutex::run;
use report::*;

/// The system allocator, counting the bytes live on the heap (for `bytes_per_endpoint` and
/// `heap_bytes_per_waiter`).
struct Counting;

pub(crate) static LIVE_HEAP: AtomicI64 = AtomicI64::new(0);

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

pub(crate) struct Args {
    endpoints: Option<Vec<String>>,
    mode: String,
    clients: usize,
    ops: usize,
    ttl: u64,
    conns: usize,
    fresh: bool,
    /// `relay-floor`: a second write per hop.
    pub(crate) extra_write: bool,
    /// `relay-floor`: each hop's put in a Txn with a compare.
    pub(crate) txn: bool,
    /// `mutex-contended`, `election-handoff`, `rwlock-contended`, `semaphore-contended`: each
    /// client takes its next turn with its guard's (or permit's) `requeue()`.
    pub(crate) requeue: bool,
    permits: usize,
    accounts: usize,
    /// `queue`: milliseconds each worker works on a job between its claim and its ack.
    pub(crate) work_ms: u64,
    pub(crate) profile: bool,
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
        extra_write: false,
        txn: false,
        requeue: false,
        permits: 1,
        accounts: 16,
        work_ms: 0,
        profile: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let flag = flag.trim_start_matches('-').to_owned();
        let mut value = || it.next().ok_or_else(|| format!("--{flag} needs a value"));
        match flag.as_str() {
            "bench" => {} // cargo bench passes --bench
            "fresh" => a.fresh = true,
            "extra-write" => a.extra_write = true,
            "txn" => a.txn = true,
            "requeue" => a.requeue = true,
            "profile" => a.profile = true,
            "endpoints" => a.endpoints = Some(value()?.split(',').map(String::from).collect()),
            "mode" => a.mode = value()?,
            "clients" => a.clients = value()?.parse().map_err(|e| format!("--clients: {e}"))?,
            "ops" => a.ops = value()?.parse().map_err(|e| format!("--ops: {e}"))?,
            "ttl" => a.ttl = value()?.parse().map_err(|e| format!("--ttl: {e}"))?,
            "conns" => a.conns = value()?.parse().map_err(|e| format!("--conns: {e}"))?,
            "permits" => a.permits = value()?.parse().map_err(|e| format!("--permits: {e}"))?,
            "accounts" => a.accounts = value()?.parse().map_err(|e| format!("--accounts: {e}"))?,
            "work-ms" => a.work_ms = value()?.parse().map_err(|e| format!("--work-ms: {e}"))?,
            other => return Err(format!("unknown argument --{other}")),
        }
    }
    if a.clients == 0 || a.ops == 0 {
        return Err("--clients and --ops must be >= 1".into());
    }
    let requeues = [
        "mutex-contended",
        "election-handoff",
        "rwlock-contended",
        "semaphore-contended",
    ];
    if a.requeue && !requeues.contains(&a.mode.as_str()) {
        return Err(format!("--requeue is for {}", requeues.join(", ")));
    }
    if a.conns == 0 || a.conns > a.clients {
        a.conns = a.clients;
    }
    Ok(a)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = parse_args()?;
    // RUST_LOG=etcd_coord=trace prints the hand-off steps with timestamps; --profile records
    // them and reports where a hand-off's time goes.
    {
        use tracing_subscriber::layer::{Layer, SubscriberExt};
        use tracing_subscriber::util::SubscriberInitExt;
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(tracing_subscriber::EnvFilter::from_default_env());
        let profile = a.profile.then_some(
            profile::Recorder.with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("etcd_coord::handoff", tracing::Level::TRACE),
            ),
        );
        let _ = tracing_subscriber::registry()
            .with(fmt)
            .with(profile)
            .try_init();
    }
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
