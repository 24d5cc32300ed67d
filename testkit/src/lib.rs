//! Test support for integration tests against real etcd (cargo feature `testkit`): what
//! curator-test is to Curator.
//!
//! * [`EtcdCluster`] launches one etcd member or a cluster on free loopback ports with
//!   temporary data directories, can kill (SIGKILL) and restart members, and kills everything
//!   when dropped.
//! * [`faults::FaultServer`] is a toxiproxy-compatible fault server: toxiproxy's HTTP API and
//!   toxics (latency, bandwidth, slow_close, timeout, reset_peer, slicer, limit_data, plus
//!   blackhole and refuse), for any toxiproxy client; `etcd-coord-faults` runs it on its own.
//! * [`FaultProxy`] sits between a client and one etcd member and injects the same faults
//!   into live connections through one method each: blackhole, dropped responses, latency
//!   with jitter, reset, refusing new connections, a bandwidth limit.
//! * [`EtcdCluster::start_partitionable`] puts every member in its own network namespace
//!   (Linux, root, `ip`, `nft`) so that a test can partition it for real with nftables drop
//!   rules: from everyone, or from its peers only.
//! * [`checker`] records what clients believed and did and verifies the history, after
//!   Jepsen's lock checker (fencing tokens increase, no overlapping holders, stale writes
//!   rejected — also as etcd holds them —, no acquisition after the lease was gone, barriers'
//!   rounds), and liveness, keys nobody holds and election observers.
//! * [`TestEtcd`] is what a test usually wants: the cluster named by `ETCD_ENDPOINTS` if that
//!   is set, else a fresh one it starts itself.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use etcd_coord_testkit::{EtcdCluster, FaultProxy};
//!
//! let etcd = EtcdCluster::start(1).await?;
//! let proxy = FaultProxy::start(etcd.endpoint(0)?).await?;
//! let client = etcd_client::Client::connect(
//!     [proxy.endpoint()],
//!     Some(etcd_coord::recommended_connect_options()),
//! )
//! .await?;
//! proxy.blackhole(); // the client's requests now go unanswered, without a closed connection
//! proxy.heal();
//! # drop(client); Ok(()) }
//! ```

pub mod checker;
mod etcd;
pub mod faults;
mod netns;
mod proxy;
mod tls;

pub use etcd::{find_etcd_binary, find_etcdctl_binary, EtcdCluster, TestEtcd};
pub use netns::partitions_unsupported;
pub use proxy::{FaultProxy, Faults};

/// Errors of the test kit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestkitError {
    /// No etcd binary was found; the message says how to install one.
    #[error("{0}")]
    NoEtcd(String),
    /// etcd did not start or did not become healthy.
    #[error("etcd did not start: {0}")]
    Start(String),
    /// An I/O error (spawning a process, binding a socket, …).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// An etcd request failed.
    #[error("etcd request failed: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// There is no member with this index (the cluster has `members`).
    #[error("no member {index}: the cluster has {members}")]
    NoSuchMember {
        /// The index asked for.
        index: usize,
        /// How many members there are.
        members: usize,
    },
    /// What was asked cannot be done here (e.g. network namespaces without root); the message
    /// says why.
    #[error("not supported here: {0}")]
    Unsupported(String),
}
