//! `relay-floor`: the Go peer's `handoff-floor` rebuilt on etcd-client, and with
//! `--extra-write` the floor of a hand-off that also writes once more, as a lock's loop does.
//!
//! A ring of N watchers, each on its own key (a watch stream each, opened and confirmed before
//! the clock starts). Watcher i, woken by the put of key i, puts key (i+1)%N: M hops in all,
//! each one write commit plus one watch notification. With `--extra-write`, watcher i then
//! also puts a key of its own once that put returned: a second write per hop, off the relay's
//! path but through the same raft log, as the next enqueue of a client that has just released
//! a lock is. A lock taken and released in a loop must write twice per acquisition (its
//! enqueue and its release), so this is the most such a loop can reach on the etcd measured.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, WatchOptions};
use tokio::sync::Notify;

use crate::report::*;
use crate::Args;

pub(crate) async fn relay_floor(
    a: &Args,
    prefix: &str,
    clients: &[Client],
) -> Result<Run, Box<dyn std::error::Error>> {
    let n = a.clients;
    if n < 2 {
        return Err("relay-floor: --clients must be >= 2".into());
    }
    let key = |i: usize| format!("{prefix}/ring/{i}");
    let mut streams = Vec::new();
    for i in 0..n {
        let mut client = clients[i % clients.len()].clone();
        let mut stream = client.watch(key(i), Some(WatchOptions::new())).await?;
        loop {
            match stream.message().await? {
                Some(m) if m.created() => break,
                Some(_) => {}
                None => return Err(format!("watch {i} ended before it was created").into()),
            }
        }
        streams.push(stream);
    }
    let start = Instant::now();
    let remaining = Arc::new(AtomicI64::new(a.ops as i64));
    let done = Arc::new(Notify::new());
    // Watcher `i` passes to `i + 1`: false once M hops were passed.
    let pass = {
        let (remaining, done, extra) = (Arc::clone(&remaining), Arc::clone(&done), a.extra_write);
        let prefix = prefix.to_owned();
        move |mut client: Client, i: usize| {
            let (remaining, done, prefix) =
                (Arc::clone(&remaining), Arc::clone(&done), prefix.clone());
            async move {
                if remaining.fetch_sub(1, Ordering::SeqCst) <= 0 {
                    done.notify_one();
                    return Ok(false);
                }
                let sent = start.elapsed().as_nanos().to_string();
                client
                    .put(format!("{prefix}/ring/{}", (i + 1) % n), sent.clone(), None)
                    .await?;
                if extra {
                    client
                        .put(format!("{prefix}/extra/{i}"), sent, None)
                        .await?;
                }
                Ok::<_, etcd_client::Error>(true)
            }
        }
    };
    let hops = Arc::new(std::sync::Mutex::new(Vec::with_capacity(a.ops)));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut stream) in streams.into_iter().enumerate() {
        let (client, pass, own) = (clients[i % clients.len()].clone(), pass.clone(), key(i));
        let hops = Arc::clone(&hops);
        tasks.spawn(async move {
            while let Some(m) = stream.message().await? {
                for ev in m.events() {
                    let Some(kv) = ev.kv() else { continue };
                    if ev.event_type() != EventType::Put || kv.key() != own.as_bytes() {
                        continue;
                    }
                    let sent: u64 = kv.value_str()?.parse().unwrap_or(0);
                    let hop = start.elapsed().saturating_sub(Duration::from_nanos(sent));
                    hops.lock().unwrap().push(hop);
                    if !pass(client.clone(), i).await? {
                        return Ok(());
                    }
                }
            }
            Ok::<_, etcd_client::Error>(())
        });
    }
    let t0 = Instant::now();
    pass(clients[0].clone(), n - 1).await?; // the first hop: watcher n-1 hands to watcher 0
    done.notified().await;
    let total = t0.elapsed();
    tasks.abort_all();
    while let Some(r) = tasks.join_next().await {
        if let Ok(ended) = r {
            ended?; // a watch or a put that failed
        }
    }
    let lats = std::mem::take(&mut *hops.lock().unwrap());
    let mut client = clients[0].clone();
    client
        .delete(
            format!("{prefix}/"),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await?;
    Ok(Run {
        lats,
        hands: Vec::new(),
        total,
        extra: vec![("writes_per_hop", Value::Int(1 + u64::from(a.extra_write)))],
    })
}
