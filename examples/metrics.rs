//! Metrics after a contended run, in Prometheus' text format: four workers take one lock five
//! times each, a fifth only tries, a sixth gives up after 50 ms. Any `metrics` exporter works
//! the same way; this one only renders (no HTTP listener).
//!
//! `cargo run --example metrics`

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use etcd_coord::Mutex;
use metrics_exporter_prometheus::PrometheusBuilder;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    etcd_coord::metrics::describe();
    let etcd = support::etcd().await;
    let name = format!("examples/metrics-{}", std::process::id());
    let mut workers = Vec::new();
    for _ in 0..4 {
        let session = support::session(&etcd).await;
        let mutex = Mutex::new(&session, name.clone());
        workers.push(tokio::spawn(async move {
            for _ in 0..5 {
                let guard = mutex.lock().await?;
                tokio::time::sleep(Duration::from_millis(20)).await;
                guard.release().await?;
            }
            session.close().await
        }));
    }
    let session = support::session(&etcd).await;
    let mutex = Mutex::new(&session, name.clone());
    if let Some(guard) = mutex.try_lock().await? {
        guard.release().await?; // (it was free for a moment)
    }
    if let Some(guard) = etcd_coord::timeout(Duration::from_millis(50), mutex.lock()).await {
        guard?.release().await?;
    }
    for worker in workers {
        worker.await??;
    }
    session.close().await?;
    for line in prometheus.render().lines() {
        if line.contains("etcd_coord_") {
            println!("{line}");
        }
    }
    Ok(())
}
