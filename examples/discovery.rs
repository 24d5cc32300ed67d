//! Service registration and discovery with a load-balanced tonic channel (`scripts/demo
//! discovery` runs it: three servers, one client, one server killed with SIGKILL).
//!
//! ```text
//! cargo run --example discovery --features tonic -- serve --endpoints 127.0.0.1:2379 --target demo/greeter --index 1
//! cargo run --example discovery --features tonic -- call  --endpoints 127.0.0.1:2379 --target demo/greeter --calls 60
//! ```
//!
//! `serve` runs a gRPC server (the standard health service; every response carries an
//! `x-server` header with the server's index) on a free port and registers it under
//! `<target>/<addr>` with a 5 s TTL for as long as it runs. `call` follows the target with a
//! [`ServiceView`](etcd_coord::discovery::ServiceView) and calls through
//! [`balanced_channel`](etcd_coord::discovery::balanced_channel), printing which server
//! answered each call and when the set of endpoints changes.

use std::time::{Duration, Instant};

use etcd_coord::discovery::{
    balanced_channel, default_tonic_endpoint, Discovery, Endpoint, Registration,
};
use etcd_coord::SessionOptions;
use futures::StreamExt;
use tonic::codegen::http;
use tonic::transport::server::TcpIncoming;

struct Args {
    command: String,
    endpoints: Vec<String>,
    target: String,
    index: usize,
    calls: usize,
    interval: Duration,
}

fn args() -> Args {
    let mut a = Args {
        command: String::new(),
        endpoints: vec!["127.0.0.1:2379".into()],
        target: "demo/greeter".into(),
        index: 1,
        calls: 60,
        interval: Duration::from_millis(100),
    };
    let mut it = std::env::args().skip(1);
    a.command = it.next().unwrap_or_default();
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--endpoints" => a.endpoints = value.split(',').map(String::from).collect(),
            "--target" => a.target = value,
            "--index" => a.index = value.parse().expect("--index N"),
            "--calls" => a.calls = value.parse().expect("--calls N"),
            "--interval-ms" => a.interval = Duration::from_millis(value.parse().expect("ms")),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = args();
    let client = etcd_client::Client::connect(
        &a.endpoints,
        Some(etcd_coord::recommended_connect_options()),
    )
    .await?;
    match a.command.as_str() {
        "serve" => serve(client, &a).await,
        "call" => call(client, &a).await,
        other => Err(format!("unknown command {other:?}: serve or call").into()),
    }
}

async fn serve(client: etcd_client::Client, a: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse()?)?;
    let addr = incoming.local_addr()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let index = a.index;
    let tag = move |mut resp: http::Response<tonic::body::Body>| {
        resp.headers_mut()
            .insert("x-server", http::HeaderValue::from(index));
        resp
    };
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(tower::util::MapResponseLayer::new(tag))
            .add_service(health)
            .serve_with_incoming(incoming),
    );
    let registration = Registration::register(
        client,
        &a.target,
        Endpoint::new(addr.to_string()).with_metadata(serde_json::json!({ "index": index })),
        SessionOptions::new().with_ttl(Duration::from_secs(5)),
    )
    .await?;
    println!(
        "server {index}: serving on {addr}, registered as {} (pid {})",
        registration.key(),
        std::process::id()
    );
    tokio::select! {
        r = server => r??,
        _ = tokio::signal::ctrl_c() => {}
    }
    registration.deregister().await?;
    println!("server {index}: deregistered");
    Ok(())
}

async fn call(client: etcd_client::Client, a: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let view = Discovery::new(client, &a.target).view().await?;
    println!(
        "client: {} endpoint(s) under {}/",
        view.endpoints().len(),
        a.target
    );
    let mut changes = view.changes();
    tokio::spawn(async move {
        while let Some(Ok(change)) = changes.next().await {
            println!("client: view changed: {change:?}");
        }
    });
    let channel = balanced_channel(view, |e| {
        Ok(default_tonic_endpoint(e)?
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(1)))
    });
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let start = Instant::now();
    let mut answered_by = std::collections::BTreeMap::<String, usize>::new();
    for n in 1..=a.calls {
        // A server that crashed stays in the channel until its lease ends (tonic's balancer
        // keeps picking it); calls that reach it fail with Unavailable and are retried, as
        // gRPC clients do, and land on another server.
        let mut retries = 0;
        let who = loop {
            let request = tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            };
            match health.check(request).await {
                Ok(resp) => {
                    break resp
                        .metadata()
                        .get("x-server")
                        .and_then(|v| v.to_str().ok())
                        .map_or("?".to_owned(), |s| format!("server {s}"))
                }
                Err(status) if status.code() == tonic::Code::Unavailable && retries < 3 => {
                    retries += 1
                }
                Err(status) => break format!("error ({})", status.code()),
            }
        };
        println!(
            "client: call {n:3} at {:5.1} s answered by {who}{}",
            start.elapsed().as_secs_f64(),
            if retries > 0 {
                format!(" after {retries} failed attempt(s)")
            } else {
                String::new()
            }
        );
        *answered_by.entry(who).or_default() += 1;
        tokio::time::sleep(a.interval).await;
    }
    println!("client: answers: {answered_by:?}");
    Ok(())
}
