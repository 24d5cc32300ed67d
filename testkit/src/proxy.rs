//! A fault-injecting TCP proxy, in toxiproxy's vocabulary, whose faults apply to live
//! connections and can be removed again.

use std::sync::Arc;
use std::time::Duration;

use super::faults::link::Proxy;
use super::faults::{Stream, Toxic, ToxicKind};
use super::TestkitError;

/// The faults in force on a [`FaultProxy`]. `Default` is a clean pass-through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// Stop forwarding in both directions without closing anything (this crate's `blackhole`
    /// toxic): bytes wait in the proxy until the fault is removed.
    pub blackhole: bool,
    /// Forward requests to etcd but throw its answers away: "lost responses". The HTTP/2
    /// stream is corrupt afterwards, so follow with [`FaultProxy::reset_peer`] once done.
    pub drop_responses: bool,
    /// Accept new connections only to reset them at once (existing ones live on).
    pub refuse_new: bool,
    /// Delay added to every chunk, in each direction (toxiproxy `latency`).
    pub latency: Duration,
    /// Up to this much more delay, drawn uniformly per chunk (toxiproxy `jitter`).
    pub jitter: Duration,
    /// Bytes per second in each direction per connection (toxiproxy `bandwidth`); `None`:
    /// unlimited.
    pub bandwidth: Option<u64>,
}

/// A TCP proxy in front of one upstream (an etcd member), with faults that can be switched on
/// and off while connections are open. Point a client at [`endpoint()`](Self::endpoint).
/// Dropping it stops accepting and resets every connection.
///
/// Its faults are toxics of the toxiproxy-compatible engine of [`faults`](super::faults) (the
/// same code as [`FaultServer`](super::faults::FaultServer)'s proxies), named after the
/// fields of [`Faults`]: `blackhole_upstream`/`_downstream` (this crate's `blackhole`),
/// `drop_responses` (toxiproxy `timeout` 0, downstream), `refuse`, `latency_upstream`/
/// `_downstream`, `bandwidth_upstream`/`_downstream`.
pub struct FaultProxy {
    proxy: Arc<Proxy>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.proxy.listen)
            .field("faults", &self.faults())
            .finish()
    }
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream` (`HOST:PORT`).
    ///
    /// # Errors
    /// If no port can be bound.
    pub async fn start(upstream: impl Into<String>) -> Result<FaultProxy, TestkitError> {
        let proxy =
            Proxy::start("fault-proxy".into(), "127.0.0.1:0", upstream.into(), true).await?;
        Ok(FaultProxy { proxy })
    }

    /// The address clients should connect to, as `127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        self.proxy.listen.to_string()
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        let mut f = Faults::default();
        for t in self.proxy.toxics.borrow().iter() {
            match t.kind {
                ToxicKind::Blackhole => f.blackhole = true,
                ToxicKind::Timeout { .. } if t.stream == Stream::Downstream => {
                    f.drop_responses = true
                }
                ToxicKind::Refuse => f.refuse_new = true,
                ToxicKind::Latency { latency, jitter } => {
                    f.latency = Duration::from_millis(latency);
                    f.jitter = Duration::from_millis(jitter);
                }
                ToxicKind::Bandwidth { rate } => f.bandwidth = Some(rate * 1000),
                _ => {}
            }
        }
        f
    }

    /// Replaces the faults in force; applies to live connections at once.
    pub fn set_faults(&self, faults: Faults) {
        let mut toxics = Vec::new();
        if faults.blackhole {
            toxics.extend(Toxic::both_ways("blackhole", ToxicKind::Blackhole));
        }
        if faults.drop_responses {
            toxics.push(Toxic::new(
                "drop_responses",
                Stream::Downstream,
                ToxicKind::Timeout { timeout: 0 },
            ));
        }
        if faults.refuse_new {
            toxics.push(Toxic::new("refuse", Stream::Upstream, ToxicKind::Refuse));
        }
        if !faults.latency.is_zero() || !faults.jitter.is_zero() {
            // This proxy's jitter was "up to this much more"; toxiproxy's is ±: centre it.
            let jitter = faults.jitter.as_millis() as u64 / 2;
            let latency = faults.latency.as_millis() as u64 + jitter;
            toxics.extend(Toxic::both_ways(
                "latency",
                ToxicKind::Latency { latency, jitter },
            ));
        }
        if let Some(bps) = faults.bandwidth.filter(|b| *b > 0) {
            toxics.extend(Toxic::both_ways(
                "bandwidth",
                ToxicKind::Bandwidth {
                    rate: bps.div_ceil(1000),
                },
            ));
        }
        self.proxy.toxics.send_replace(toxics);
    }

    fn update(&self, f: impl FnOnce(&mut Faults)) {
        let mut faults = self.faults();
        f(&mut faults);
        self.set_faults(faults);
    }

    /// Stops forwarding both ways without closing connections: bytes wait in the proxy until
    /// the fault is removed (this crate's `blackhole` toxic).
    pub fn blackhole(&self) {
        self.update(|f| f.blackhole = true);
    }

    /// Forwards requests but discards responses (toxiproxy `timeout` 0, downstream). Follow
    /// with [`reset_peer`](Self::reset_peer) after [`heal`](Self::heal): the connections' byte
    /// streams have gaps.
    pub fn drop_responses(&self) {
        self.update(|f| f.drop_responses = true);
    }

    /// Adds `latency` plus up to `jitter` to every chunk in each direction (toxiproxy
    /// `latency` of `latency + jitter/2` ± `jitter/2`).
    pub fn set_latency(&self, latency: Duration, jitter: Duration) {
        self.update(|f| {
            f.latency = latency;
            f.jitter = jitter;
        });
    }

    /// Limits each direction of each connection to `bytes_per_second`, rounded up to whole
    /// KB/s (toxiproxy `bandwidth`; `None`: unlimited).
    pub fn set_bandwidth(&self, bytes_per_second: Option<u64>) {
        self.update(|f| f.bandwidth = bytes_per_second);
    }

    /// Accept new connections only to reset them (`true`), or serve them again (`false`).
    pub fn refuse_new(&self, refuse: bool) {
        self.update(|f| f.refuse_new = refuse);
    }

    /// Resets (TCP RST) every connection open now. New connections are served as before.
    pub fn reset_peer(&self) {
        self.proxy.reset_connections();
    }

    /// Refuses new connections and resets the existing ones.
    pub fn down(&self) {
        self.refuse_new(true);
        self.reset_peer();
    }

    /// Removes every fault (connections that were reset stay closed).
    pub fn heal(&self) {
        self.set_faults(Faults::default());
    }
}
