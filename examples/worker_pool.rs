//! One worker of a pool; `scripts/demo pool` runs several and kills the leader mid-run.
//!
//! ```text
//! cargo run --example worker_pool -- --endpoints 127.0.0.1:2379 --worker 1 [--ttl 5]
//! ```
//!
//! Every worker runs a [`LeaderSelector`] on `pool/leader`. The leader takes jobs from
//! `pool/jobs/`, one at a time, and records each result under `pool/results/` *and* removes the
//! job in one Txn fenced on its term, so every result carries the fencing token of the term
//! that produced it and a deposed leader cannot write. Followers print who leads. Each worker
//! exits once no jobs remain.

use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, SortOrder, SortTarget, TxnOp};
use etcd_coord::{LeaderSelector, SessionOptions};

const JOBS: &str = "pool/jobs/";
const RESULTS: &str = "pool/results/";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut endpoints = vec!["127.0.0.1:2379".to_owned()];
    let mut worker = 0u32;
    let mut ttl = 5u64;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--endpoints" => endpoints = value.split(',').map(String::from).collect(),
            "--worker" => worker = value.parse()?,
            "--ttl" => ttl = value.parse()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let start = Instant::now();
    let me: &'static str = Box::leak(format!("worker {worker}").into_boxed_str());
    let say = move |msg: String| println!("[{:>6.2}s] {me}: {msg}", start.elapsed().as_secs_f64());

    let client =
        Client::connect(&endpoints, Some(etcd_coord::recommended_connect_options())).await?;
    let selector = LeaderSelector::new(
        client.clone(),
        "pool/leader",
        format!("worker {worker} pid {}", std::process::id()),
    )
    .with_session_options(SessionOptions::new().with_ttl(Duration::from_secs(ttl)));

    // Everyone, leader or follower, sees who leads.
    let mut leaders = selector.leaders();
    tokio::spawn(async move {
        while leaders.changed().await.is_ok() {
            let now = leaders.borrow_and_update().clone();
            match now {
                Some(l) => say(format!(
                    "sees leader \"{}\" (term token {})",
                    l.value_str().unwrap_or("?"),
                    l.fencing_token()
                )),
                None => say("sees no leader".into()),
            }
        }
    });

    // Shut down once every job is done.
    let mut kv = client.clone();
    let all_done = async move {
        loop {
            let left = kv
                .get(
                    JOBS,
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await
                .map(|r| r.count())
                .unwrap_or(1);
            if left == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };

    selector
        .run(all_done, |term| {
            let client = client.clone();
            async move {
                let token = term.fencing_token();
                say(format!("LEADS with fencing token {token}"));
                let mut kv = client;
                while !term.is_cancelled() {
                    let next = kv
                        .get(
                            JOBS,
                            Some(
                                GetOptions::new()
                                    .with_prefix()
                                    .with_sort(SortTarget::Key, SortOrder::Ascend)
                                    .with_limit(1),
                            ),
                        )
                        .await;
                    let Some(job) = next.ok().and_then(|r| r.kvs().first().cloned()) else {
                        term.cancelled().await;
                        break;
                    };
                    let job_key = job.key_str().unwrap_or_default().to_owned();
                    let name = job_key.trim_start_matches(JOBS).to_owned();
                    // "Work" on it, unless the term ends first.
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                        _ = term.cancelled() => { say(format!("term ended while on {name}")); break; }
                    }
                    let result = format!("{name} done by worker {worker} under token {token}");
                    match term
                        .txn_if_owner([
                            TxnOp::put(format!("{RESULTS}{name}"), result, None),
                            TxnOp::delete(job_key.as_str(), None),
                        ])
                        .await
                    {
                        Ok(_) => say(format!("finished {name} (token {token})")),
                        Err(e) => {
                            say(format!("could not record {name}: {e}"));
                            break;
                        }
                    }
                }
                say(format!("stops leading (token {token})"));
            }
        })
        .await?;
    say("no jobs left; exiting".into());
    Ok(())
}
