//! What a test does to a running cluster: look at its members, stop, pause, restart, partition
//! them, compact its history.

use std::process::Command;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tokio::time::{sleep, Instant};

use crate::netns::Network;
use crate::TestkitError;

use super::{compact, EtcdCluster};

impl EtcdCluster {
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

    pub(super) fn kill_member(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to member `i`'s process.
    pub(super) fn signal(&mut self, i: usize, signal: &str) -> Result<(), TestkitError> {
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

    pub(super) fn network(&self) -> Result<&Network, TestkitError> {
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
