//! Launching real etcd members on loopback.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};
use tempfile::TempDir;
use tokio::time::{sleep, timeout, Instant};

use super::netns::Network;
use super::tls::TlsFiles;
use super::TestkitError;

mod binary;
mod members;
mod test_etcd;

use binary::{etcd_version, free_port};
pub use binary::{find_etcd_binary, find_etcdctl_binary};
pub use test_etcd::TestEtcd;

struct Member {
    name: String,
    /// The address it listens on: 127.0.0.1, or its own in a network namespace.
    host: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn peer_url(&self) -> String {
        format!("http://{}:{}", self.host, self.peer_port)
    }
}

/// Real etcd members on loopback with temporary data directories (one member, or a cluster).
/// Every process is killed with SIGKILL when this is dropped.
///
/// Members run with `--unsafe-no-fsync` (etcd ≥ 3.5), `--heartbeat-interval 10
/// --election-timeout 100` and `--grpc-keepalive-min-time 500ms`, so they are healthy in a
/// fraction of a second and accept the one-second HTTP/2 keep-alive of
/// [`recommended_connect_options`](etcd_coord::recommended_connect_options).
pub struct EtcdCluster {
    bin: PathBuf,
    version: (u32, u32, u32),
    token: String,
    members: Vec<Member>,
    /// Flags added to every member's command line.
    extra_args: Vec<String>,
    /// Certificates, when clients reach the members over TLS.
    tls: Option<TlsFiles>,
    /// The members' network namespaces, if they run in their own (dropped after the members).
    net: Option<Network>,
    _dir: TempDir,
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("bin", &self.bin)
            .field("version", &self.version)
            .field("endpoints", &self.endpoints())
            .finish()
    }
}

impl EtcdCluster {
    /// Starts a cluster of `members` members (1 or 3, usually) and waits until it has a
    /// leader and serves requests on every member. Retries on fresh ports if a port was taken
    /// meanwhile.
    ///
    /// # Errors
    /// [`TestkitError::NoEtcd`] without a binary; [`TestkitError::Start`] if it did not become
    /// healthy (the message carries the end of the member's log).
    pub async fn start(members: usize) -> Result<EtcdCluster, TestkitError> {
        let bin = find_etcd_binary()?;
        EtcdCluster::start_with(&bin, members).await
    }

    /// As [`start`](Self::start), with the given binary.
    pub async fn start_with(bin: &Path, members: usize) -> Result<EtcdCluster, TestkitError> {
        EtcdCluster::launch(bin, members, false, &[], None).await
    }

    /// As [`start`](Self::start), with `args` added to every member's command line (they
    /// stay in force across [`restart`](Self::restart)): `["--auth-token-ttl", "2"]`, say.
    ///
    /// # Errors
    /// As [`start`](Self::start); a flag etcd rejects makes it fail to start.
    pub async fn start_with_args(
        members: usize,
        args: &[&str],
    ) -> Result<EtcdCluster, TestkitError> {
        let bin = find_etcd_binary()?;
        EtcdCluster::launch(&bin, members, false, args, None).await
    }

    /// As [`start`](Self::start), with clients served over TLS only (`https://` endpoints):
    /// a CA, a server certificate for `127.0.0.1` and a client certificate are made at start
    /// with the `openssl` command, in the cluster's temporary directory. With
    /// `client_cert_auth`, etcd also requires clients to present a certificate of that CA
    /// (`--client-cert-auth`). [`client`](Self::client) and
    /// [`connect_options`](Self::connect_options) carry the CA and the client certificate.
    /// Peers talk plain HTTP (they are on loopback).
    ///
    /// # Errors
    /// As [`start`](Self::start); [`TestkitError::Start`] if `openssl` is missing or fails.
    #[cfg(feature = "tls")]
    pub async fn start_tls(
        members: usize,
        client_cert_auth: bool,
    ) -> Result<EtcdCluster, TestkitError> {
        EtcdCluster::start_tls_with_args(members, client_cert_auth, &[]).await
    }

    /// As [`start_tls`](Self::start_tls), with extra etcd flags for every member (as in
    /// [`start_with_args`](Self::start_with_args)), e.g. `["--auth-token-ttl", "2"]`.
    ///
    /// # Errors
    /// As [`start_tls`](Self::start_tls).
    #[cfg(feature = "tls")]
    pub async fn start_tls_with_args(
        members: usize,
        client_cert_auth: bool,
        args: &[&str],
    ) -> Result<EtcdCluster, TestkitError> {
        let bin = find_etcd_binary()?;
        EtcdCluster::launch(&bin, members, false, args, Some(client_cert_auth)).await
    }

    /// [`recommended_connect_options`](etcd_coord::recommended_connect_options), with this
    /// cluster's CA and client certificate when it serves TLS.
    pub fn connect_options(&self) -> ConnectOptions {
        self.with_tls(etcd_coord::recommended_connect_options())
    }

    /// The PEM files of this cluster's TLS setup: (CA, client certificate, client key), if it
    /// serves TLS.
    pub fn tls_files(&self) -> Option<(PathBuf, PathBuf, PathBuf)> {
        self.tls
            .as_ref()
            .map(|t| (t.ca.clone(), t.client_cert.clone(), t.client_key.clone()))
    }

    #[cfg(feature = "tls")]
    fn with_tls(&self, options: ConnectOptions) -> ConnectOptions {
        let Some(t) = &self.tls else {
            return options;
        };
        let read = |p: &Path| std::fs::read(p).unwrap_or_default();
        options.with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&t.ca)))
                .identity(etcd_client::Identity::from_pem(
                    read(&t.client_cert),
                    read(&t.client_key),
                )),
        )
    }

    #[cfg(not(feature = "tls"))]
    fn with_tls(&self, options: ConnectOptions) -> ConnectOptions {
        options
    }

    /// As [`start`](Self::start), with every member in its own network namespace, so that
    /// [`partition`](Self::partition) and [`isolate_from_peers`](Self::isolate_from_peers) can
    /// cut it off for real (nftables drop rules: packets vanish, nothing is reset). Clients
    /// reach member `i` at [`endpoint(i)`](Self::endpoint) (a `10.x.y.z` address on a bridge
    /// in this process's namespace). Needs Linux, root, `ip` (iproute2) and `nft` (nftables):
    /// [`partitions_unsupported`](super::partitions_unsupported) says why not, if not. The
    /// namespaces and the bridge are removed on drop.
    ///
    /// # Errors
    /// [`TestkitError::Unsupported`] where namespaces cannot be made (the message says why);
    /// otherwise as [`start`](Self::start).
    pub async fn start_partitionable(members: usize) -> Result<EtcdCluster, TestkitError> {
        let bin = find_etcd_binary()?;
        EtcdCluster::launch(&bin, members, true, &[], None).await
    }

    async fn launch(
        bin: &Path,
        members: usize,
        namespaces: bool,
        extra_args: &[&str],
        tls: Option<bool>,
    ) -> Result<EtcdCluster, TestkitError> {
        if members == 0 {
            return Err(TestkitError::Start(
                "a cluster needs at least one member".into(),
            ));
        }
        let version = etcd_version(bin)?;
        let mut last = None;
        // On loopback another test may take a port first: retry on fresh ones. In namespaces
        // the ports are the member's own.
        let attempts = if namespaces { 1 } else { 5 };
        for _ in 0..attempts {
            let dir = tempfile::Builder::new()
                .prefix("etcd-coord-test-")
                .tempdir()?;
            let net = if namespaces {
                Some(Network::new(members)?)
            } else {
                None
            };
            let tls = match tls {
                Some(client_cert_auth) => Some(super::tls::make(dir.path(), client_cert_auth)?),
                None => None,
            };
            let mut cluster = EtcdCluster {
                bin: bin.to_owned(),
                version,
                token: format!("t{:x}", rand::random::<u64>()),
                members: Vec::new(),
                extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
                tls,
                net,
                _dir: dir,
            };
            for i in 0..members {
                let name = format!("m{i}");
                let data_dir = cluster._dir.path().join(&name);
                let log = cluster._dir.path().join(format!("{name}.log"));
                // A member alone in its namespace has the ports to itself.
                let (host, client_port, peer_port) = match &cluster.net {
                    Some(net) => (net.address(i), 2379, 2380),
                    None => ("127.0.0.1".to_owned(), free_port()?, free_port()?),
                };
                cluster.members.push(Member {
                    name,
                    host,
                    client_port,
                    peer_port,
                    data_dir,
                    log,
                    child: None,
                });
            }
            for i in 0..members {
                cluster.spawn(i)?;
            }
            match cluster.wait_healthy(Duration::from_secs(20)).await {
                Ok(()) => return Ok(cluster),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| TestkitError::Start("unknown".into())))
    }

    fn spawn(&mut self, i: usize) -> Result<(), TestkitError> {
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let m = &self.members[i];
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://{}:{}", m.host, m.client_port);
        let peer_url = m.peer_url();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)?;
        let mut cmd = match &self.net {
            Some(net) => {
                // `ip netns exec` execs etcd: the child's PID is etcd's.
                let mut cmd = Command::new("ip");
                cmd.args(net.exec_prefix(i)).arg(&self.bin);
                cmd
            }
            None => Command::new(&self.bin),
        };
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
            .args(["--grpc-keepalive-min-time", "500ms"])
            .args(["--logger", "zap", "--log-level", "warn"]);
        if self.version >= (3, 5, 0) {
            cmd.arg("--unsafe-no-fsync");
        }
        cmd.args(&self.extra_args);
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key);
            if t.client_cert_auth {
                cmd.arg("--client-cert-auth")
                    .arg("--trusted-ca-file")
                    .arg(&t.ca);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.members[i].child = Some(cmd.spawn()?);
        Ok(())
    }

    async fn wait_healthy(&mut self, limit: Duration) -> Result<(), TestkitError> {
        let start = Instant::now();
        for i in 0..self.members.len() {
            loop {
                if let Some(status) = self.members[i]
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    return Err(TestkitError::Start(format!(
                        "member {} exited with {status}: {}",
                        self.members[i].name,
                        self.log_tail(i)
                    )));
                }
                if self.member_serves(i).await {
                    break;
                }
                if !self.is_running(i) {
                    continue; // reported with its log at the top of the loop
                }
                if start.elapsed() > limit {
                    return Err(TestkitError::Start(format!(
                        "member {} not healthy after {limit:?}: {}",
                        self.members[i].name,
                        self.log_tail(i)
                    )));
                }
                sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// True if member `i` answers a linearizable read (so it has a leader) and is really ours:
    /// its process runs and the server on its client port lists our peer URL (another test's
    /// etcd may have taken the port first).
    async fn member_serves(&mut self, i: usize) -> bool {
        let opts = self.with_tls(
            ConnectOptions::new()
                .with_connect_timeout(Duration::from_millis(500))
                .with_timeout(Duration::from_millis(500))
                .with_require_leader(true),
        );
        let Ok(Ok(mut client)) = timeout(
            Duration::from_secs(1),
            Client::connect([self.endpoint_of(i)], Some(opts)),
        )
        .await
        else {
            return false;
        };
        // With authentication on, the read is refused for want of a user — but only after
        // the member agreed with its leader on the read (etcd checks permissions after the
        // linearizable-read barrier), so the refusal says as much as an answer.
        let serves = match timeout(
            Duration::from_secs(1),
            client.get(
                "etcd-coord-testkit-health",
                Some(GetOptions::new().with_count_only()),
            ),
        )
        .await
        {
            Ok(Ok(_)) => true,
            Ok(Err(etcd_client::Error::GRpcStatus(status))) => {
                status.code() == tonic::Code::PermissionDenied
                    || status.message().contains("user name is empty")
            }
            _ => false,
        };
        if !serves {
            return false;
        }
        let ours = self.members[i].peer_url();
        let listed = match timeout(Duration::from_secs(1), client.member_list()).await {
            Ok(Ok(list)) => list.members().iter().any(|m| m.peer_urls().contains(&ours)),
            _ => false,
        };
        listed && self.is_running(i)
    }

    fn log_tail(&self, i: usize) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.members[i].log) {
            let _ = f.read_to_string(&mut text);
        }
        let start = text.len().saturating_sub(12_000);
        let start = (start..text.len())
            .find(|&s| text.is_char_boundary(s))
            .unwrap_or(text.len());
        text[start..].to_owned()
    }

    /// `i`, if member `i` exists.
    fn member(&self, i: usize) -> Result<usize, TestkitError> {
        if i < self.members.len() {
            Ok(i)
        } else {
            Err(TestkitError::NoSuchMember {
                index: i,
                members: self.members.len(),
            })
        }
    }

    /// The endpoint of member `i`, which exists.
    fn endpoint_of(&self, i: usize) -> String {
        let scheme = if self.tls.is_some() { "https://" } else { "" };
        format!(
            "{scheme}{}:{}",
            self.members[i].host, self.members[i].client_port
        )
    }
}

/// Compacts (physically) the history up to the current revision; returns that revision.
pub(super) async fn compact(mut client: Client) -> Result<i64, TestkitError> {
    let rev = client
        .get("etcd-coord-testkit-compact", None)
        .await?
        .header()
        .map(|h| h.revision())
        .unwrap_or(0);
    client
        .compact(
            rev,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await?;
    Ok(rev)
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            // A member that exited on its own (not through kill()) is worth a word: tests
            // failing with "connection refused" are otherwise a mystery.
            if let Some(Ok(Some(status))) = self.members[i].child.as_mut().map(|c| c.try_wait()) {
                eprintln!(
                    "etcd-coord testkit: etcd member {} exited on its own ({status}); end of its log:\n{}",
                    self.members[i].name,
                    self.log_tail(i)
                );
            }
            self.kill_member(i);
        }
    }
}
