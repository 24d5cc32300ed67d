//! `relay-floor`: the Go peer's `handoff-floor` rebuilt on etcd-client, and with
//! `--extra-write` the floor of a hand-off that also writes once more, as a lock's loop does.
//!
//! A ring of N watchers, watcher i's watch on connection i % K (`--conns K`), the watches of a
//! connection on one watch stream (as the peer's watches share their client's stream), each
//! opened and confirmed before the clock starts. Watcher i, woken by the put of key i, puts
//! key (i+1)%N: M hops in all, each one write commit plus one watch notification. With
//! `--extra-write`, watcher i then also puts a key of its own once that put returned: a
//! second write per hop, through the same raft log, as the next enqueue of a client that has
//! just released a lock is. It stays off the relay's path while the token takes longer to
//! come round the ring than the write takes (N = 8 in bench-compare; with 2 or 3 watchers it
//! delays the relay). A lock taken and released in a loop writes twice per acquisition (its
//! enqueue and its release), so this is the most such a loop can reach on the etcd measured.
//! With `--txn`, each hop's put goes in a Txn under one compare on the watcher's own key, one
//! that always holds (its version is at least 0): what etcd's Txn path (compares evaluated,
//! then the write) adds to a hop, as every hand-off of ours writes in a Txn under compares.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, EventType, Txn, TxnOp, WatchOptions};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::report::*;
use crate::Args;

/// The whole run, set-up included, as the peer's `-timeout`.
const TIMEOUT: Duration = Duration::from_secs(120);
/// How long the watchers may take to stop, and the clean-up to be answered.
const STOPPING: Duration = Duration::from_secs(10);

type Failure = Box<dyn std::error::Error + Send + Sync>;

pub(crate) async fn relay_floor(
    a: &Args,
    prefix: &str,
    clients: &[Client],
) -> Result<Run, Box<dyn std::error::Error>> {
    if a.clients < 2 {
        return Err("relay-floor: --clients must be >= 2".into());
    }
    // The relay stops its watchers (their puts answered) before it returns, also when it
    // fails; only a set-up that hangs is cut short here.
    let run = tokio::time::timeout(TIMEOUT + STOPPING, relay(a, prefix, clients)).await;
    let mut client = clients[0].clone();
    let clean_up = client.delete(
        format!("{prefix}/"),
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    );
    let cleaned = tokio::time::timeout(STOPPING, clean_up).await;
    let run = run.map_err(|_| format!("relay-floor: no end within {TIMEOUT:?}"))?;
    let run = run.map_err(|e| e.to_string())?;
    cleaned.map_err(|_| "relay-floor: the clean-up got no answer")??;
    Ok(run)
}

async fn relay(a: &Args, prefix: &str, clients: &[Client]) -> Result<Run, Failure> {
    let (n, conns) = (a.clients, clients.len());
    let key = |i: usize| format!("{prefix}/ring/{i}");
    let start = Instant::now();
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::<Result<(), Failure>>::new();
    // Watcher i's inbox: the send times (ns since `start`) of the puts of key i.
    let mut inboxes: Vec<Option<mpsc::UnboundedReceiver<u64>>> = (0..n).map(|_| None).collect();
    for (c, client) in clients.iter().enumerate() {
        let mut client = client.clone();
        let mut stream: Option<etcd_client::WatchStream> = None;
        let mut watchers = HashMap::new();
        for i in (c..n).step_by(conns) {
            let opts = Some(WatchOptions::new());
            let s = match &mut stream {
                Some(s) => {
                    s.watch(key(i), opts).await?;
                    s
                }
                None => stream.insert(client.watch(key(i), opts).await?),
            };
            let id = loop {
                match s.message().await? {
                    Some(m) if m.canceled() => {
                        return Err(format!("watch {i} refused: {}", m.cancel_reason()).into())
                    }
                    Some(m) if m.created() => break m.watch_id(),
                    Some(_) => {}
                    None => return Err(format!("watch {i} ended before it was created").into()),
                }
            };
            let (tx, rx) = mpsc::unbounded_channel();
            watchers.insert(id, (tx, key(i)));
            inboxes[i] = Some(rx);
        }
        let Some(mut stream) = stream else { continue };
        let stop = stop.clone();
        tasks.spawn(async move {
            loop {
                let m = tokio::select! {
                    biased;
                    _ = stop.cancelled() => return Ok(()),
                    m = stream.message() => m?.ok_or("a watch stream ended")?,
                };
                if m.canceled() {
                    return Err(format!("a watch was cancelled: {}", m.cancel_reason()).into());
                }
                let Some((tx, own)) = watchers.get(&m.watch_id()) else {
                    continue;
                };
                for ev in m.events() {
                    let Some(kv) = ev.kv() else { continue };
                    if ev.event_type() == EventType::Put && kv.key() == own.as_bytes() {
                        let _ = tx.send(kv.value_str()?.parse().unwrap_or(0));
                    }
                }
            }
        });
    }
    let remaining = Arc::new(AtomicI64::new(a.ops as i64));
    let done = Arc::new(Notify::new());
    let hops = Arc::new(Mutex::new(Vec::with_capacity(a.ops)));
    // Watcher `i` passes to `i + 1`: false once M hops were passed.
    let pass = {
        let (remaining, done, extra) = (Arc::clone(&remaining), Arc::clone(&done), a.extra_write);
        let txn = a.txn;
        let prefix = prefix.to_owned();
        move |mut client: Client, i: usize| {
            let (remaining, done) = (Arc::clone(&remaining), Arc::clone(&done));
            let (held, next, own) = (
                format!("{prefix}/ring/{i}"),
                format!("{prefix}/ring/{}", (i + 1) % n),
                format!("{prefix}/extra/{i}"),
            );
            async move {
                if remaining.fetch_sub(1, Ordering::SeqCst) <= 0 {
                    done.notify_one();
                    return Ok(false);
                }
                let sent = start.elapsed().as_nanos().to_string();
                if txn {
                    let pass = Txn::new()
                        .when(vec![Compare::version(held, CompareOp::Greater, -1)])
                        .and_then(vec![TxnOp::put(next, sent.clone(), None)]);
                    if !client.txn(pass).await?.succeeded() {
                        return Err("relay-floor --txn: a compare that holds failed".into());
                    }
                } else {
                    client.put(next, sent.clone(), None).await?;
                }
                if extra {
                    client.put(own, sent, None).await?;
                }
                Ok::<_, Failure>(true)
            }
        }
    };
    for (i, inbox) in inboxes.into_iter().enumerate() {
        let mut inbox = inbox.ok_or("a watcher without a watch")?;
        let (client, pass, stop) = (clients[i % conns].clone(), pass.clone(), stop.clone());
        let hops = Arc::clone(&hops);
        tasks.spawn(async move {
            loop {
                let sent = tokio::select! {
                    biased;
                    _ = stop.cancelled() => return Ok(()),
                    sent = inbox.recv() => match sent {
                        Some(sent) => sent,
                        None if stop.is_cancelled() => return Ok(()),
                        None => return Err("a watch stream ended".into()),
                    },
                };
                let hop = start.elapsed().saturating_sub(Duration::from_nanos(sent));
                hops.lock().unwrap().push(hop);
                // A pass under way (the last hop's puts) ends before the watcher stops.
                if !pass(client.clone(), i).await? {
                    return Ok(());
                }
            }
        });
    }
    let t0 = Instant::now();
    // The first hop: watcher n-1 hands to watcher 0.
    pass(clients[(n - 1) % conns].clone(), n - 1).await?;
    let failed = tokio::select! {
        biased; // the watcher that ends the relay notifies `done` before it returns
        _ = done.notified() => None,
        ended = tasks.join_next() => Some(why(ended)),
        _ = tokio::time::sleep(TIMEOUT) => Some(format!("no end within {TIMEOUT:?}")),
    };
    let total = t0.elapsed();
    // Every watcher stops once its pass under way is answered; what failed, if anything,
    // most specifically first (a dispatcher's error before its watchers' ended inboxes).
    stop.cancel();
    let mut errors: Vec<String> = failed.into_iter().collect();
    let stopped = tokio::time::timeout(STOPPING, async {
        while let Some(ended) = tasks.join_next().await {
            if !matches!(ended, Ok(Ok(()))) {
                errors.push(why(Some(ended)));
            }
        }
    })
    .await;
    if stopped.is_err() {
        errors.push("the watchers did not stop".into());
    }
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.contains("a watch stream ended") || e.contains("stopped early"));
        return Err(format!("relay-floor: {}", errors.join("; ")).into());
    }
    let lats = std::mem::take(&mut *hops.lock().unwrap());
    Ok(Run {
        lats,
        hands: Vec::new(),
        total,
        extra: vec![
            ("writes_per_hop", Value::Int(1 + u64::from(a.extra_write))),
            ("txn", Value::Bool(a.txn)),
        ],
    })
}

/// What a task's end says went wrong.
fn why(ended: Option<Result<Result<(), Failure>, tokio::task::JoinError>>) -> String {
    match ended {
        Some(Ok(Err(e))) => e.to_string(),
        Some(Err(e)) => e.to_string(),
        Some(Ok(Ok(()))) | None => "a watcher stopped early".into(),
    }
}
