//! One worker (or the producer) of a pool that shares a `WorkQueue`; `scripts/demo pool` runs
//! several workers and kills one with SIGKILL mid-job.
//!
//! ```text
//! cargo run --example worker_pool -- --endpoints 127.0.0.1:2379 --enqueue 16   # the producer
//! cargo run --example worker_pool -- --endpoints 127.0.0.1:2379 --worker 1 [--ttl 5]
//! ```
//!
//! The producer enqueues jobs `job-01`… with idempotency keys, so running it twice adds
//! nothing. Each worker claims jobs from `pool/queue` under its session's lease, "works" on
//! each for 250 ms, records the result under `pool/results/` in a Txn fenced on its claim —
//! so a worker whose claim has ended cannot write — and acknowledges the job. A worker that
//! dies loses its claim with its lease: the job is delivered again (its delivery number
//! raised) once the TTL has passed. Each worker exits once the queue is empty.

use std::time::{Duration, Instant};

use etcd_client::{Client, TxnOp};
use etcd_coord::{EnqueueOptions, LeasedSession, SessionOptions, WorkQueue};

const QUEUE: &str = "pool/queue";
const RESULTS: &str = "pool/results/";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut endpoints = vec!["127.0.0.1:2379".to_owned()];
    let (mut worker, mut ttl, mut enqueue) = (0u32, 5u64, None::<u32>);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--endpoints" => endpoints = value.split(',').map(String::from).collect(),
            "--worker" => worker = value.parse()?,
            "--ttl" => ttl = value.parse()?,
            "--enqueue" => enqueue = Some(value.parse()?),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let start = Instant::now();
    let me = match enqueue {
        Some(_) => "producer".to_owned(),
        None => format!("worker {worker}"),
    };
    let say = |msg: String| println!("[{:>6.2}s] {me}: {msg}", start.elapsed().as_secs_f64());

    let client =
        Client::connect(&endpoints, Some(etcd_coord::recommended_connect_options())).await?;
    let options = SessionOptions::new().with_ttl(Duration::from_secs(ttl));
    let session = LeasedSession::new(client, options).await?;
    let queue = WorkQueue::new(&session, QUEUE);

    if let Some(jobs) = enqueue {
        for j in 1..=jobs {
            let name = format!("job-{j:02}");
            let once = EnqueueOptions::new().with_idempotency_key(name.as_str());
            queue.enqueue_with(name.as_str(), once).await?;
        }
        say(format!(
            "enqueued {jobs} jobs; {} in the queue",
            queue.len().await?
        ));
        session.close().await?;
        return Ok(());
    }

    say(format!(
        "pid {} lease {:x}",
        std::process::id(),
        session.lease_id()
    ));
    loop {
        // claim() waits for a job (cancel-safe: a timeout leaves nothing behind).
        let job = match tokio::time::timeout(Duration::from_secs(1), queue.claim()).await {
            Ok(job) => job?,
            // Nothing for a second: done once no job is left, claimed or not.
            Err(_) if queue.is_empty().await? => break,
            Err(_) => continue,
        };
        let name = String::from_utf8_lossy(job.payload()).into_owned();
        say(format!(
            "claimed {name} (delivery {}, token {})",
            job.attempt(),
            job.fencing_token()
        ));
        tokio::time::sleep(Duration::from_millis(250)).await; // the work
        let result = format!(
            "{name} done by worker {worker} (delivery {}, token {})",
            job.attempt(),
            job.fencing_token()
        );
        // Fenced on the claim: applies only while the job is still ours.
        job.txn_if_owner([TxnOp::put(format!("{RESULTS}{name}"), result, None)])
            .await?;
        job.ack().await?;
        say(format!("finished {name}"));
    }
    say("no jobs left; exiting".into());
    session.close().await?;
    Ok(())
}
