//! `discovery-propagation` and `discovery-sync`.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, Txn, TxnOp};
use etcd_coord::{LeasedSession, SessionOptions};

use crate::report::*;
use crate::{Args, LIVE_HEAP};

/// The address of endpoint `i`, as the peer's.
pub(crate) fn disc_addr(i: usize) -> String {
    format!("10.0.{}.{}:80", i / 250, i % 250)
}

pub(crate) async fn discovery_propagation(
    a: &Args,
    prefix: &str,
    clients: &[Client],
) -> Result<Run, Box<dyn std::error::Error>> {
    use etcd_coord::discovery::{Discovery, Endpoint, SessionRegistration, ViewChange};
    use futures::StreamExt;

    let target = format!("{prefix}/svc");
    let w = a.clients;
    let endpoints = clients[0].clone().member_list().await?;
    let urls: Vec<String> = endpoints
        .members()
        .iter()
        .flat_map(|m| m.client_urls().to_vec())
        .collect();
    let writer_client = Client::connect(&urls, Some(ConnectOptions::new())).await?;
    let writer = LeasedSession::new(
        writer_client,
        SessionOptions::new().with_ttl(Duration::from_secs(a.ttl)),
    )
    .await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, String, bool, Instant)>();
    let mut views = Vec::new();
    for i in 0..w {
        let view = Discovery::new(clients[i % clients.len()].clone(), &target)
            .view()
            .await?;
        let mut changes = view.changes();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(Ok(change)) = changes.next().await {
                let now = Instant::now();
                let added = !matches!(change, ViewChange::Removed { .. });
                if tx.send((i, change.key().to_owned(), added, now)).is_err() {
                    return;
                }
            }
        });
        views.push(view);
    }
    // Prime: every view's watch is established once it has seen these.
    let prime = SessionRegistration::register_with_suffix(
        &writer,
        &target,
        "prime",
        Endpoint::new("prime:0"),
    )
    .await?;
    wait_all(&mut rx, w, format!("{target}/prime"), true, Instant::now()).await;
    prime.deregister().await?;
    wait_all(&mut rx, w, format!("{target}/prime"), false, Instant::now()).await;

    let (mut lasts, mut meds) = (Vec::new(), Vec::new());
    let med = ((0.5 * w as f64) + 0.999_999_999) as usize - 1;
    let mut held = None;
    let t_start = Instant::now();
    for i in 0..a.ops {
        let (key, added, t0) = if i % 2 == 0 {
            let t0 = Instant::now();
            let r = SessionRegistration::register(&writer, &target, Endpoint::new(disc_addr(i)))
                .await?;
            let key = r.key().to_owned();
            held = Some(r);
            (key, true, t0)
        } else {
            let r = held.take().expect("registered by the previous update");
            let key = r.key().to_owned();
            let t0 = Instant::now();
            r.deregister().await?;
            (key, false, t0)
        };
        let ds = wait_all(&mut rx, w, key, added, t0).await;
        lasts.push(*ds.last().expect("w >= 1"));
        meds.push(ds[med]);
    }
    let total = t_start.elapsed();
    drop(held);
    drop(views);
    let _ = writer.close().await;
    meds.sort();
    Ok(Run {
        lats: lasts,
        hands: Vec::new(),
        total,
        extra: vec![
            ("median_watcher_p50_ms", Value::Num(pct(&meds, 50.0))),
            ("median_watcher_p99_ms", Value::Num(pct(&meds, 99.0))),
            ("watchers", Value::Int(w as u64)),
        ],
    })
}

/// Waits until each of the `w` views has seen (`key`, `added`); every view's receipt after
/// `t0`, sorted.
pub(crate) async fn wait_all(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(usize, String, bool, Instant)>,
    w: usize,
    key: String,
    added: bool,
    t0: Instant,
) -> Vec<Duration> {
    let mut got = vec![false; w];
    let mut ds = Vec::with_capacity(w);
    while ds.len() < w {
        let (i, k, a, at) = rx.recv().await.expect("views run");
        assert!(
            k == key && a == added && !got[i],
            "view {i} got {k} {a}, waiting for {key} {added}"
        );
        got[i] = true;
        ds.push(at - t0);
    }
    ds.sort();
    ds
}

pub(crate) async fn discovery_sync(
    a: &Args,
    prefix: &str,
    client: Client,
) -> Result<Run, Box<dyn std::error::Error>> {
    use etcd_coord::discovery::{Discovery, Endpoint};

    let target = format!("{prefix}/svc");
    let n = a.ops;
    let setup = Instant::now();
    for start in (0..n).step_by(128) {
        let ops: Vec<TxnOp> = (start..n.min(start + 128))
            .map(|j| {
                let addr = disc_addr(j);
                TxnOp::put(
                    format!("{target}/{addr}"),
                    Endpoint::new(addr).to_json(),
                    None,
                )
            })
            .collect();
        client.clone().txn(Txn::new().and_then(ops)).await?;
    }
    let setup_s = setup.elapsed().as_secs_f64();
    let mut lats = Vec::new();
    let mut bytes_per_endpoint = 0.0;
    let t_start = Instant::now();
    for r in 0..a.clients {
        let before = LIVE_HEAP.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let view = Discovery::new(client.clone(), &target).view().await?;
        lats.push(t0.elapsed());
        let got = view.endpoints().len();
        assert_eq!(got, n, "the view holds every endpoint");
        if r == 0 {
            // Let the view's task settle, then count what the view holds.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let held = LIVE_HEAP.load(Ordering::Relaxed) - before;
            bytes_per_endpoint = held as f64 / n as f64;
        }
        drop(view);
    }
    let total = t_start.elapsed();
    let _ = client
        .clone()
        .delete(
            format!("{target}/"),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await;
    Ok(Run {
        lats,
        hands: Vec::new(),
        total,
        extra: vec![
            ("endpoints", Value::Int(n as u64)),
            ("setup_s", Value::Num(round3(setup_s))),
            ("bytes_per_endpoint", Value::Num(round3(bytes_per_endpoint))),
        ],
    })
}
