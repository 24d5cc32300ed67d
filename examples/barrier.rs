//! A deploy gate: workers wait while a coordinator holds the barrier up, and all continue the
//! moment it comes down.
//!
//! `cargo run --example barrier`

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use etcd_coord::Barrier;

#[tokio::main]
async fn main() -> Result<(), etcd_coord::Error> {
    let etcd = support::etcd().await;
    let start = Instant::now();
    let coordinator = support::session(&etcd).await;
    let hold = Barrier::new(&coordinator, "examples/deploy-gate")
        .hold()
        .await?;
    println!(
        "[{:>4} ms] coordinator: gate up",
        start.elapsed().as_millis()
    );
    let mut workers = Vec::new();
    for w in 1..=3 {
        let session = support::session(&etcd).await;
        workers.push(tokio::spawn(async move {
            Barrier::new(&session, "examples/deploy-gate")
                .wait()
                .await?;
            println!(
                "[{:>4} ms] worker {w}: through the gate",
                start.elapsed().as_millis()
            );
            session.close().await
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "[{:>4} ms] coordinator: gate down",
        start.elapsed().as_millis()
    );
    hold.release().await?;
    for w in workers {
        w.await.expect("worker")?;
    }
    coordinator.close().await
}
