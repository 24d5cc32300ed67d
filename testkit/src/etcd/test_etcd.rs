//! The etcd a test runs against.

use etcd_client::Client;

use crate::TestkitError;

use super::{compact, EtcdCluster};

/// The etcd a test runs against: the cluster named by `ETCD_ENDPOINTS` (comma-separated) if
/// that is set, else one started here (killed on drop).
#[derive(Debug)]
pub struct TestEtcd {
    endpoints: Vec<String>,
    /// The cluster this process started, if it started one.
    pub cluster: Option<EtcdCluster>,
}

impl TestEtcd {
    /// Uses `ETCD_ENDPOINTS`, or starts a cluster of `members` members.
    ///
    /// # Errors
    /// As [`EtcdCluster::start`].
    pub async fn from_env_or_start(members: usize) -> Result<TestEtcd, TestkitError> {
        if let Ok(list) = std::env::var("ETCD_ENDPOINTS") {
            let endpoints: Vec<String> = list
                .split(',')
                .map(|e| e.trim().trim_start_matches("http://").to_owned())
                .filter(|e| !e.is_empty())
                .collect();
            if !endpoints.is_empty() {
                return Ok(TestEtcd {
                    endpoints,
                    cluster: None,
                });
            }
        }
        let cluster = EtcdCluster::start(members).await?;
        Ok(TestEtcd {
            endpoints: cluster.endpoints(),
            cluster: Some(cluster),
        })
    }

    /// The client endpoints.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A client with [`recommended_connect_options`](etcd_coord::recommended_connect_options).
    ///
    /// # Errors
    /// If the endpoints cannot be parsed.
    pub async fn client(&self) -> Result<Client, TestkitError> {
        Ok(Client::connect(
            &self.endpoints,
            Some(etcd_coord::recommended_connect_options()),
        )
        .await?)
    }

    /// Compacts the key-value history up to the current revision; returns that revision.
    ///
    /// # Errors
    /// If a request fails.
    pub async fn compact(&self) -> Result<i64, TestkitError> {
        compact(self.client().await?).await
    }
}
