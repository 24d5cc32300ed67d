//! Readers share a read/write lock; a writer waits for them and excludes everyone; readers that
//! arrive after the writer queue behind it (no writer starvation).
//!
//! `cargo run --example rwlock`

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use etcd_coord::RwLock;

#[tokio::main]
async fn main() -> Result<(), etcd_coord::Error> {
    let etcd = support::etcd().await;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, role) in ["reader", "reader", "writer", "reader"]
        .into_iter()
        .enumerate()
    {
        let session = support::session(&etcd).await;
        tasks.push(tokio::spawn(async move {
            let lock = RwLock::new(&session, "examples/config");
            let t = |s: &str| println!("[{:>4} ms] {role} {i} {s}", start.elapsed().as_millis());
            if role == "reader" {
                let guard = lock.read().await?;
                t("reading");
                tokio::time::sleep(Duration::from_millis(300)).await;
                guard.release().await?;
            } else {
                let guard = lock.write().await?;
                t(&format!("writing (token {})", guard.fencing_token()));
                tokio::time::sleep(Duration::from_millis(300)).await;
                guard.release().await?;
            }
            t("done");
            session.close().await
        }));
        tokio::time::sleep(Duration::from_millis(50)).await; // arrive in this order
    }
    for t in tasks {
        t.await.expect("task")?;
    }
    Ok(())
}
