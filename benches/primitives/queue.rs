//! `queue`: a `WorkQueue` beside the peer's `queue` mode (etcd's Go `recipe.Queue`).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::Client;
use etcd_coord::{LeasedSession, SessionOptions, WorkQueue};

use crate::report::*;
use crate::Args;

/// As the peer's `queue`: M jobs are enqueued first by N producers (`enqueue_per_s`), then N
/// workers (a session each, on the shared connections: one per connection, the rest its
/// siblings, as a process with many sessions should hold them) claim and acknowledge until all
/// M are done. `ops_per_s` = jobs claimed *and acknowledged* per second (the peer's are dequeued:
/// deleted as they are handed out, so a crashed worker loses its job); latency = one
/// `claim()`. Also `enqueue_per_s`, `txns_per_job` (Txns the workers sent per job, claim
/// and ack together) and `reads_per_job` (range reads per job: the claims' scans). With
/// `--work-ms W` each worker sleeps W ms between claim and ack (ours only: the peer's dequeue
/// has no ack).
pub(crate) async fn queue(
    a: &Args,
    prefix: &str,
    clients: &[Client],
) -> Result<Run, Box<dyn std::error::Error>> {
    let n = a.clients;
    let opts = SessionOptions::new().with_ttl(Duration::from_secs(a.ttl));
    let mut sessions = Vec::with_capacity(n);
    for i in 0..n {
        let session = match i.checked_sub(clients.len()) {
            None => LeasedSession::new(clients[i].clone(), opts.clone()).await?,
            Some(_) => {
                let first: &LeasedSession = &sessions[i % clients.len()];
                first.sibling(opts.clone()).await?
            }
        };
        sessions.push(session);
    }
    let name = format!("{prefix}/jobs");
    let next = Arc::new(AtomicI64::new(0));
    let t0 = Instant::now();
    let mut producers = Vec::new();
    for s in &sessions {
        let (q, next, m) = (WorkQueue::new(s, &name), Arc::clone(&next), a.ops as i64);
        producers.push(tokio::spawn(async move {
            loop {
                let j = next.fetch_add(1, Ordering::SeqCst);
                if j >= m {
                    return Ok::<_, etcd_coord::Error>(());
                }
                q.enqueue(format!("job-{j}")).await?;
            }
        }));
    }
    for p in producers {
        p.await?.map_err(boxed)?;
    }
    let enqueue = t0.elapsed();
    let sent_before: u64 = sessions.iter().map(|s| s.metrics().txns).sum();
    let reads_before: u64 = sessions.iter().map(|s| s.metrics().reads).sum();

    let remaining = Arc::new(AtomicI64::new(a.ops as i64));
    let t1 = Instant::now();
    let mut workers = Vec::new();
    for s in &sessions {
        let (q, remaining) = (WorkQueue::new(s, &name), Arc::clone(&remaining));
        let work = Duration::from_millis(a.work_ms);
        workers.push(tokio::spawn(async move {
            let mut lats = Vec::new();
            while remaining.fetch_sub(1, Ordering::SeqCst) > 0 {
                let t = Instant::now();
                let job = q.claim().await?;
                lats.push(t.elapsed());
                if !work.is_zero() {
                    tokio::time::sleep(work).await;
                }
                job.ack().await?;
            }
            Ok::<_, etcd_coord::Error>(lats)
        }));
    }
    let mut lats = Vec::with_capacity(a.ops);
    for w in workers {
        lats.extend(w.await?.map_err(boxed)?);
    }
    let total = t1.elapsed();
    let sent_after: u64 = sessions.iter().map(|s| s.metrics().txns).sum();
    let reads_after: u64 = sessions.iter().map(|s| s.metrics().reads).sum();
    let left = WorkQueue::new(&sessions[0], &name)
        .len()
        .await
        .map_err(boxed)?;
    if left != 0 {
        return Err(format!("{left} jobs left in the queue").into());
    }
    for s in &sessions {
        s.close().await.map_err(boxed)?;
    }
    let mut extra = vec![
        (
            "enqueue_per_s",
            Value::Num(round3(a.ops as f64 / enqueue.as_secs_f64())),
        ),
        (
            "txns_per_job",
            Value::Num(round3((sent_after - sent_before) as f64 / a.ops as f64)),
        ),
        (
            "reads_per_job",
            Value::Num(round3((reads_after - reads_before) as f64 / a.ops as f64)),
        ),
    ];
    if a.work_ms > 0 {
        extra.push(("work_ms", Value::Int(a.work_ms)));
    }
    Ok(Run {
        lats,
        hands: Vec::new(),
        total,
        extra,
    })
}
