//! A fault-injecting TCP proxy, in toxiproxy's vocabulary, whose faults apply to live
//! connections and can be removed again.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;

use super::TestkitError;

/// The faults in force on a [`FaultProxy`]. `Default` is a clean pass-through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// Stop forwarding in both directions without closing anything (toxiproxy `timeout`):
    /// bytes wait in the proxy until the fault is removed.
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

struct Control {
    faults: watch::Sender<Faults>,
    /// Cancelled to reset every connection open at that moment; replaced afterwards.
    generation: StdMutex<CancellationToken>,
}

/// A TCP proxy in front of one upstream (an etcd member), with faults that can be switched on
/// and off while connections are open. Point a client at [`endpoint()`](Self::endpoint).
/// Dropping it stops accepting and resets every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    control: Arc<Control>,
    accept: JoinHandle<()>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
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
        let upstream = upstream.into();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let control = Arc::new(Control {
            faults: watch::channel(Faults::default()).0,
            generation: StdMutex::new(CancellationToken::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, upstream, Arc::clone(&control)));
        Ok(FaultProxy {
            addr,
            control,
            accept,
        })
    }

    /// The address clients should connect to, as `127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        self.control.faults.borrow().clone()
    }

    /// Replaces the faults in force; applies to live connections at once.
    pub fn set_faults(&self, faults: Faults) {
        self.control.faults.send_replace(faults);
    }

    fn update(&self, f: impl FnOnce(&mut Faults)) {
        self.control.faults.send_modify(f);
    }

    /// Stops forwarding both ways without closing connections (toxiproxy `timeout` with 0).
    pub fn blackhole(&self) {
        self.update(|f| f.blackhole = true);
    }

    /// Forwards requests but discards responses. Follow with [`reset_peer`](Self::reset_peer)
    /// after [`heal`](Self::heal): the connections' byte streams have gaps.
    pub fn drop_responses(&self) {
        self.update(|f| f.drop_responses = true);
    }

    /// Adds `latency` plus up to `jitter` to every chunk in each direction.
    pub fn set_latency(&self, latency: Duration, jitter: Duration) {
        self.update(|f| {
            f.latency = latency;
            f.jitter = jitter;
        });
    }

    /// Limits each direction of each connection to `bytes_per_second` (`None`: unlimited).
    pub fn set_bandwidth(&self, bytes_per_second: Option<u64>) {
        self.update(|f| f.bandwidth = bytes_per_second);
    }

    /// Accept new connections only to reset them (`true`), or serve them again (`false`).
    pub fn refuse_new(&self, refuse: bool) {
        self.update(|f| f.refuse_new = refuse);
    }

    /// Resets (TCP RST) every connection open now (toxiproxy `reset_peer`). New connections are
    /// served as before.
    pub fn reset_peer(&self) {
        let mut generation = self
            .control
            .generation
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        generation.cancel();
        *generation = CancellationToken::new();
    }

    /// Refuses new connections and resets the existing ones (toxiproxy: proxy disabled).
    pub fn down(&self) {
        self.refuse_new(true);
        self.reset_peer();
    }

    /// Removes every fault (connections that were reset stay closed).
    pub fn heal(&self) {
        self.set_faults(Faults::default());
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.reset_peer();
    }
}

async fn accept_loop(listener: TcpListener, upstream: String, control: Arc<Control>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            sleep(Duration::from_millis(10)).await;
            continue;
        };
        if control.faults.borrow().refuse_new {
            reset(&client);
            continue;
        }
        let token = control
            .generation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .child_token();
        let upstream = upstream.clone();
        let control = Arc::clone(&control);
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(&upstream).await else {
                reset(&client);
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_r, client_w) = client.into_split();
            let (server_r, server_w) = server.into_split();
            let up = pump(
                client_r,
                server_w,
                false,
                Arc::clone(&control),
                token.clone(),
            );
            let down = pump(server_r, client_w, true, control, token);
            tokio::join!(up, down);
        });
    }
}

/// Closes `stream` with a TCP RST rather than a FIN.
fn reset(stream: &TcpStream) {
    // SO_LINGER 0 makes close() send RST and return at once (no blocking on drop).
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
}

/// Copies `from` into `to`, applying the faults in force to each chunk. On a reset, both
/// sockets are closed with RST.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    is_response: bool,
    control: Arc<Control>,
    token: CancellationToken,
) {
    let mut faults = control.faults.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    let outcome: Result<(), ()> = async {
        loop {
            let n = tokio::select! {
                r = from.read(&mut buf) => r.map_err(|_| ())?,
                _ = token.cancelled() => return Err(()),
            };
            if n == 0 {
                let _ = to.shutdown().await;
                return Ok(());
            }
            let current = faults.borrow_and_update().clone();
            let mut delay = current.latency;
            if !current.jitter.is_zero() {
                delay += rand::rng().random_range(Duration::ZERO..=current.jitter);
            }
            if let Some(bps) = current.bandwidth.filter(|b| *b > 0) {
                delay += Duration::from_secs_f64(n as f64 / bps as f64);
            }
            if !delay.is_zero() {
                tokio::select! {
                    _ = sleep(delay) => {}
                    _ = token.cancelled() => return Err(()),
                }
            }
            // Hold the bytes while blackholed.
            tokio::select! {
                r = faults.wait_for(|f| !f.blackhole) => { r.map_err(|_| ())?; }
                _ = token.cancelled() => return Err(()),
            }
            if is_response && faults.borrow().drop_responses {
                continue;
            }
            tokio::select! {
                r = to.write_all(&buf[..n]) => r.map_err(|_| ())?,
                _ = token.cancelled() => return Err(()),
            }
        }
    }
    .await;
    if outcome.is_err() {
        reset(from.as_ref());
        reset(to.as_ref());
    }
}
