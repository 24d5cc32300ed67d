//! Real network partitions: each etcd member in its own network namespace, joined to the test
//! process by a veth pair on a bridge, cut with nftables drop rules (Linux, root, `ip` and
//! `nft`).
//!
//! ```text
//!   test process (host namespace)  10.A.B.1 on bridge ecb<id>
//!        │
//!   ┌────┴──────────── bridge ───────────────┐
//!   veth                 veth                veth
//!   ecoord-<id>-m0       ecoord-<id>-m1      ecoord-<id>-m2     (namespaces)
//!   10.A.B.10            10.A.B.11           10.A.B.12          (eth0)
//! ```
//!
//! A drop rule drops packets silently, as a pulled cable does: no reset, no refusal — the
//! fault that only timeouts and HTTP/2 keep-alive reveal.

use std::process::{Command, Stdio};

use super::TestkitError;

/// Runs `program args…`; an error carries its stderr.
fn run(program: &str, args: &[&str]) -> Result<(), TestkitError> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| TestkitError::Unsupported(format!("cannot run `{program}`: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TestkitError::Unsupported(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Why real partitions cannot be made here, if they cannot: not Linux, not root, `ip` or `nft`
/// missing (Debian: `apt-get install iproute2 nftables`), or no network namespace can be made
/// (tried).
pub fn partitions_unsupported() -> Option<String> {
    if !cfg!(target_os = "linux") {
        return Some("network namespaces need Linux".into());
    }
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if uid.as_deref() != Some("0") {
        return Some("network namespaces and nftables need root".into());
    }
    for (tool, package) in [("ip", "iproute2"), ("nft", "nftables")] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!(
                "`{tool}` is not installed (Debian: apt-get install {package})"
            ));
        }
    }
    // Root in a container may still lack CAP_NET_ADMIN: try.
    let probe = format!(
        "ecoord-probe-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    );
    if let Err(e) = run("ip", &["netns", "add", &probe]) {
        return Some(format!("cannot make a network namespace: {e}"));
    }
    let _ = run("ip", &["netns", "del", &probe]);
    None
}

/// The namespaces, veths and bridge of one cluster; removed on drop.
#[derive(Debug)]
pub(crate) struct Network {
    id: String,
    /// `10.A.B`
    subnet: String,
    members: usize,
    bridge: String,
    /// Namespaces made so far (removed on drop).
    namespaces: Vec<String>,
    bridge_made: bool,
}

/// The nftables table our drop rules live in (one per member namespace).
const TABLE: &str = "etcdcoord";

impl Network {
    /// Makes a bridge and one namespace per member. Everything made is removed again if a
    /// step fails.
    pub(crate) fn new(members: usize) -> Result<Network, TestkitError> {
        if let Some(why) = partitions_unsupported() {
            return Err(TestkitError::Unsupported(why));
        }
        let id = format!("{:04x}", rand::random::<u16>());
        let subnet = format!(
            "10.{}.{}",
            rand::random_range(100..200u8),
            rand::random::<u8>()
        );
        let mut net = Network {
            bridge: format!("ecb{id}"),
            id,
            subnet,
            members,
            namespaces: Vec::new(),
            bridge_made: false,
        };
        net.build()?;
        Ok(net)
    }

    fn build(&mut self) -> Result<(), TestkitError> {
        let bridge = self.bridge.clone();
        run("ip", &["link", "add", &bridge, "type", "bridge"])?;
        self.bridge_made = true;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}.1/24", self.subnet),
                "dev",
                &bridge,
            ],
        )?;
        run("ip", &["link", "set", &bridge, "up"])?;
        for i in 0..self.members {
            let ns = self.namespace(i);
            run("ip", &["netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            let host_end = format!("ecv{}m{i}", self.id);
            run(
                "ip",
                &[
                    "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            )?;
            run("ip", &["link", "set", &host_end, "master", &bridge])?;
            run("ip", &["link", "set", &host_end, "up"])?;
            let addr = format!("{}/24", self.address(i));
            for args in [
                vec!["addr", "add", addr.as_str(), "dev", "eth0"],
                vec!["link", "set", "eth0", "up"],
                vec!["link", "set", "lo", "up"],
            ] {
                let mut full = vec!["netns", "exec", ns.as_str(), "ip"];
                full.extend(args);
                run("ip", &full)?;
            }
        }
        Ok(())
    }

    /// The namespace of member `i`.
    pub(crate) fn namespace(&self, i: usize) -> String {
        format!("ecoord-{}-m{i}", self.id)
    }

    /// Member `i`'s address.
    pub(crate) fn address(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, 10 + i)
    }

    /// Runs `nft` inside member `i`'s namespace.
    fn nft(&self, i: usize, args: &[&str]) -> Result<(), TestkitError> {
        let ns = self.namespace(i);
        let mut full = vec!["netns", "exec", ns.as_str(), "nft"];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Drops, in member `i`'s namespace, every packet from and to `peers` (addresses), or from
    /// and to everyone but itself when `peers` is `None`. Replaces earlier rules of `i`.
    pub(crate) fn cut(&self, i: usize, peers: Option<&[String]>) -> Result<(), TestkitError> {
        self.heal(i)?;
        let (from, to) = match peers {
            None => (
                "iifname \"eth0\" drop".to_owned(),
                "oifname \"eth0\" drop".to_owned(),
            ),
            Some(peers) => {
                let set = format!("{{ {} }}", peers.join(", "));
                (
                    format!("ip saddr {set} drop"),
                    format!("ip daddr {set} drop"),
                )
            }
        };
        let script = format!(
            "table inet {TABLE} {{\n\
             chain input {{ type filter hook input priority 0; policy accept; {from}; }}\n\
             chain output {{ type filter hook output priority 0; policy accept; {to}; }}\n\
             }}\n"
        );
        let path = std::env::temp_dir().join(format!("{}-m{i}.nft", self.id));
        std::fs::write(&path, script)?;
        let result = self.nft(i, &["-f", &path.to_string_lossy()]);
        let _ = std::fs::remove_file(&path);
        result
    }

    /// Removes member `i`'s drop rules (if any).
    pub(crate) fn heal(&self, i: usize) -> Result<(), TestkitError> {
        // Deleting a table that does not exist fails; that is fine.
        let _ = self.nft(i, &["delete", "table", "inet", TABLE]);
        Ok(())
    }

    /// `ip netns exec <namespace of i>`: the prefix of member `i`'s command.
    pub(crate) fn exec_prefix(&self, i: usize) -> Vec<String> {
        vec!["netns".into(), "exec".into(), self.namespace(i)]
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth pair.
        for ns in &self.namespaces {
            let _ = run("ip", &["netns", "del", ns]);
        }
        if self.bridge_made {
            let _ = run("ip", &["link", "del", &self.bridge]);
        }
    }
}
