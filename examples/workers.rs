//! One worker process contending for a shared lock; `scripts/demo` runs several of them.
//!
//! ```text
//! cargo run --example workers -- --endpoints 127.0.0.1:2379 --worker 1 [--rounds 3] [--name demo/lock] [--crash-on-round N]
//! ```
//!
//! Each round the worker takes the lock, prints its fencing token, appends a line to a shared
//! log key with a Txn fenced on the lock (so a worker that lost the lock could not write), works
//! a little and releases. With `--crash-on-round N` it exits abruptly while holding the lock in
//! round N, without releasing: the others get the lock when its lease expires (the TTL is the
//! backstop).

use std::time::{Duration, Instant};

use etcd_client::{Client, TxnOp};
use etcd_coord::{LeasedSession, Mutex, SessionOptions};

struct Args {
    endpoints: Vec<String>,
    worker: u32,
    rounds: u32,
    name: String,
    crash_on_round: Option<u32>,
    ttl: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        endpoints: vec!["127.0.0.1:2379".into()],
        worker: 0,
        rounds: 3,
        name: "demo/lock".into(),
        crash_on_round: None,
        ttl: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--endpoints" => args.endpoints = value()?.split(',').map(String::from).collect(),
            "--worker" => args.worker = value()?.parse().map_err(|e| format!("--worker: {e}"))?,
            "--rounds" => args.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--name" => args.name = value()?,
            "--ttl" => args.ttl = value()?.parse().map_err(|e| format!("--ttl: {e}"))?,
            "--crash-on-round" => {
                args.crash_on_round = Some(
                    value()?
                        .parse()
                        .map_err(|e| format!("--crash-on-round: {e}"))?,
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let start = Instant::now();
    let me = format!("worker {}", args.worker);
    let say = |msg: String| println!("[{:>6.2}s] {me}: {msg}", start.elapsed().as_secs_f64());

    let client = Client::connect(
        &args.endpoints,
        Some(etcd_coord::recommended_connect_options()),
    )
    .await?;
    let session = LeasedSession::new(
        client.clone(),
        SessionOptions::new().with_ttl(Duration::from_secs(args.ttl)),
    )
    .await?;
    say(format!(
        "session with lease {:x} (TTL {:?})",
        session.lease_id(),
        session.ttl()
    ));
    let mutex = Mutex::new(&session, &args.name);
    let log_key = format!("{}-log", args.name);
    let last_token_key = format!("{}-last-token", args.name);

    for round in 1..=args.rounds {
        let asked = Instant::now();
        let guard = mutex.lock().await?;
        let token = guard.fencing_token();
        say(format!(
            "holds {} after {:.0} ms, fencing token {token}",
            args.name,
            asked.elapsed().as_secs_f64() * 1e3
        ));
        // A fenced write to the "protected resource": applies only while we still own the
        // lock. Tokens only grow, so a reader can reject anything older than what it has seen.
        let mut kv = client.clone();
        let last: i64 = kv
            .get(last_token_key.as_str(), None)
            .await?
            .kvs()
            .first()
            .and_then(|kv| kv.value_str().ok()?.parse().ok())
            .unwrap_or(0);
        assert!(
            token > last,
            "fencing token {token} not above the last one {last}"
        );
        guard
            .txn_if_owner([
                TxnOp::put(last_token_key.as_str(), token.to_string(), None),
                TxnOp::put(
                    format!("{log_key}/{token:020}"),
                    format!("{me} round {round}"),
                    None,
                ),
            ])
            .await?;

        if args.crash_on_round == Some(round) {
            say("crashes while holding the lock; its lease frees the lock within the TTL".into());
            std::process::exit(3);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        guard.release().await?;
        say("released".into());
    }
    session.close().await?;
    say("done".into());
    Ok(())
}
