//! `waiters-scale` and `guards-scale`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::Client;
use etcd_coord::{LeasedSession, Mutex, MutexGuard, Semaphore, SemaphorePermit, SessionOptions};

use crate::report::*;
use crate::{Args, LIVE_HEAP};

/// A mutex guard or a semaphore permit.
pub(crate) enum Held {
    Lock(MutexGuard),
    Permit(SemaphorePermit),
}

impl Held {
    fn fencing_token(&self) -> i64 {
        match self {
            Held::Lock(g) => g.fence().fencing_token(),
            Held::Permit(p) => p.fence().fencing_token(),
        }
    }

    async fn release(self) -> Result<(), etcd_coord::Error> {
        match self {
            Held::Lock(g) => g.release().await,
            Held::Permit(p) => p.release().await,
        }
    }
}

/// How many waiters at the front of a mutex's queue count the keys ahead of them instead of
/// putting a pointer to the key just ahead (the crate's `DRAIN_MAX`).
const COUNTING: usize = 8;

/// How many waiters are queued at once.
const QUEUE_BATCH: usize = 500;

/// `permits` holders (one: a mutex), `clients` waiters queued behind them; then hand-offs
/// down the queue, each releasing the newest holder.
pub(crate) async fn waiters_scale(
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
    // Line-ups of all the waiters, each followed by its hand-offs, until `ops` hand-offs were
    // measured: a line of 8 waiters is lined up again and again, so that its percentiles come
    // from as many hand-offs as a long line's. Line-up time, memory and streams: the first's.
    let reps = a.ops.div_ceil(sessions.len()).max(1);
    let mut hands = Vec::with_capacity(a.ops);
    let (mut total, mut events) = (Duration::ZERO, 0);
    let (mut lineup, mut bytes_per_waiter, mut streams) = (Duration::ZERO, 0, 0);
    let mut heap_per_waiter = 0;
    for rep in 0..reps {
        let handoffs = (a.ops - hands.len()).min(sessions.len());
        let streams_before: u64 = sessions.iter().map(|s| s.metrics().watch_streams).sum();
        let rss_before = rss_bytes();
        let heap_before = LIVE_HEAP.load(Ordering::Relaxed);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Duration, Held)>();
        // Queue every waiter (in order), a batch at a time, each batch once the one before has
        // all its keys in place: ten thousand enqueues at once would only measure etcd's backlog
        // (and time requests out).
        let kv = observer.clone();
        let mut queued = 0;
        let lineup_started = Instant::now();
        // A waiter that fails ends the run (it would never line up).
        let failed = Arc::new(std::sync::Mutex::new(None::<String>));
        for batch in sessions.chunks(QUEUE_BATCH) {
            for s in batch {
                let (acquired, tx, clock) = (acquire(s), tx.clone(), Arc::clone(&clock));
                let failed = failed.clone();
                tokio::spawn(async move {
                    match acquired.await {
                        Ok(g) => {
                            let at = Instant::now();
                            let _ = tx.send((clock.acquired(at).unwrap_or_default(), g));
                        }
                        Err(e) => *failed.lock().unwrap() = Some(e.to_string()),
                    }
                });
            }
            queued += batch.len();
            loop {
                // Members, and the pointers a mutex's waiters put beside them (`…#next/…`) once
                // they know the key just ahead: every waiter has lined up once each has its
                // pointer — but the first `COUNTING`, which count the keys ahead instead.
                // Counts only: etcd answers them from its index, without reading the keys.
                let count = |prefix: String| {
                    let mut kv = kv.clone();
                    async move {
                        let opts = etcd_client::GetOptions::new()
                            .with_prefix()
                            .with_count_only();
                        Ok::<_, etcd_client::Error>(
                            kv.get(prefix, Some(opts)).await?.count() as usize
                        )
                    }
                };
                let all = count(format!("{name}/#")).await?;
                let pointers = count(format!("{name}/#next/")).await?;
                let members = all - pointers;
                if members == queued + permits && (permits > 1 || pointers + COUNTING >= queued) {
                    break;
                }
                if let Some(e) = failed.lock().unwrap().take() {
                    return Err(format!("a waiter failed to line up: {e}").into());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // Every key is in place; the line-up is over once no waiter sends or decides any more (a
        // semaphore's waiters put no pointer to tell).
        let activity = || {
            sessions
                .iter()
                .map(|s| {
                    let m = s.metrics();
                    m.txns + m.reads + m.mirrored_decisions + m.watches
                })
                .sum::<u64>()
        };
        let mut last = activity();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = activity();
            if now == last {
                break;
            }
            last = now;
        }
        if rep == 0 {
            lineup = lineup_started.elapsed();
            bytes_per_waiter =
                rss_bytes().saturating_sub(rss_before) / sessions.len().max(1) as u64;
            let heap = LIVE_HEAP.load(Ordering::Relaxed) - heap_before;
            heap_per_waiter = heap.max(0) as u64 / sessions.len().max(1) as u64;
            streams = sessions
                .iter()
                .map(|s| s.metrics().watch_streams)
                .sum::<u64>()
                - streams_before;
        }
        let events_before: u64 = sessions.iter().map(|s| s.metrics().watch_events).sum();
        let t0 = Instant::now();
        for _ in 0..handoffs {
            clock.releasing();
            holders.pop().ok_or("no holder")?.release().await?;
            let (hand, guard) = rx.recv().await.ok_or("a waiter failed")?;
            hands.push(hand);
            holders.push(guard);
        }
        total += t0.elapsed();
        events += sessions
            .iter()
            .map(|s| s.metrics().watch_events)
            .sum::<u64>()
            - events_before;
        if rep + 1 < reps {
            // Between line-ups (not measured): the holder takes the permits back.
            let taken: Vec<_> = (0..permits)
                .map(|_| tokio::spawn(acquire(&holder)))
                .collect();
            for h in holders.drain(..) {
                h.release().await?;
            }
            for t in taken {
                holders.push(t.await??);
            }
            // Newest last, as the first line-up's (each hand-off releases the newest holder).
            holders.sort_by_key(Held::fencing_token);
        }
    }
    let handoffs = hands.len();
    let extra = vec![
        (
            "watch_events_per_handoff",
            Value::Num(round3(events as f64 / handoffs as f64)),
        ),
        ("waiters", Value::Int(sessions.len() as u64)),
        // From the first enqueue to every waiter in line, and quiet.
        ("lineup_s", Value::Num(round3(lineup.as_secs_f64()))),
        // Resident memory the queued waits added (their sessions were made before), per wait.
        ("bytes_per_waiter", Value::Int(bytes_per_waiter)),
        // Heap bytes the queued waits hold, per wait (the counting allocator: what they keep
        // live, without what the allocator keeps resident after the line-up's requests).
        ("heap_bytes_per_waiter", Value::Int(heap_per_waiter)),
        // gRPC watch streams the waits opened, per client connection.
        (
            "watch_streams_per_conn",
            Value::Num(round3(streams as f64 / a.conns.max(1) as f64)),
        ),
        ("permits", Value::Int(permits as u64)),
    ];
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
pub(crate) async fn guards_scale(
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
