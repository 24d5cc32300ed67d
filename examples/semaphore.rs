//! Six workers share three permits: never more than three run at once.
//!
//! `cargo run --example semaphore`

#[path = "support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_coord::Semaphore;

#[tokio::main]
async fn main() -> Result<(), etcd_coord::Error> {
    let etcd = support::etcd().await;
    let running = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 1..=6 {
        let session = support::session(&etcd).await;
        let running = Arc::clone(&running);
        workers.push(tokio::spawn(async move {
            let permits = Semaphore::new(&session, "examples/downloads", 3);
            let permit = permits.acquire().await?;
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            println!(
                "worker {w} got a permit (token {}), {now} running",
                permit.fencing_token()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
            running.fetch_sub(1, Ordering::SeqCst);
            permit.release().await?;
            session.close().await
        }));
    }
    for w in workers {
        w.await.expect("worker")?;
    }
    Ok(())
}
