//! Three workers start a round together and finish it together, even though they arrive and
//! work at different speeds.
//!
//! `cargo run --example double_barrier`

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use etcd_coord::DoubleBarrier;

#[tokio::main]
async fn main() -> Result<(), etcd_coord::Error> {
    let etcd = support::etcd().await;
    let start = Instant::now();
    let mut workers = Vec::new();
    for w in 1..=3u64 {
        let session = support::session(&etcd).await;
        workers.push(tokio::spawn(async move {
            let t = |s: &str| println!("[{:>4} ms] worker {w} {s}", start.elapsed().as_millis());
            tokio::time::sleep(Duration::from_millis(200 * w)).await;
            t("arrives");
            let inside = DoubleBarrier::new(&session, "examples/round", 3)
                .enter()
                .await?;
            t("starts (all 3 are in)");
            tokio::time::sleep(Duration::from_millis(150 * w)).await;
            t("done, leaving");
            inside.leave().await?;
            t("leaves (all 3 are out)");
            session.close().await
        }));
    }
    for w in workers {
        w.await.expect("worker")?;
    }
    Ok(())
}
