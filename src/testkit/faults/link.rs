//! One proxy: its listener, its connections, and the two links of each connection
//! (upstream: client → server; downstream: server → client) through which the toxics act.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use super::toxic::{Kind, Stream, Toxic};

/// One proxy of a fault server.
pub(crate) struct Proxy {
    pub(crate) name: String,
    pub(crate) upstream: String,
    /// The address it listens on (the port chosen at creation, kept across disable/enable).
    pub(crate) listen: SocketAddr,
    pub(crate) toxics: watch::Sender<Vec<Toxic>>,
    running: StdMutex<Option<Running>>,
    /// Cancelled to reset every connection open at that moment; replaced afterwards.
    generation: StdMutex<CancellationToken>,
}

struct Running {
    accept: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Proxy {
    /// Binds `listen` (`HOST:0` for a free port) and, if `enabled`, serves it.
    pub(crate) async fn start(
        name: String,
        listen: &str,
        upstream: String,
        enabled: bool,
    ) -> std::io::Result<Arc<Proxy>> {
        let listener = bind(listen).await?;
        let proxy = Arc::new(Proxy {
            name,
            upstream,
            listen: listener.local_addr()?,
            toxics: watch::channel(Vec::new()).0,
            running: StdMutex::new(None),
            generation: StdMutex::new(CancellationToken::new()),
        });
        if enabled {
            proxy.serve(listener);
        }
        Ok(proxy)
    }

    pub(crate) fn enabled(&self) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    fn serve(self: &Arc<Proxy>, listener: TcpListener) {
        let accept = tokio::spawn(accept_loop(listener, Arc::downgrade(self)));
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(Running { accept });
    }

    /// Listens again on the same address (toxiproxy: `enabled: true`).
    pub(crate) async fn enable(self: &Arc<Proxy>) -> std::io::Result<()> {
        if self.enabled() {
            return Ok(());
        }
        let listener = bind(&self.listen.to_string()).await?;
        self.serve(listener);
        Ok(())
    }

    /// Stops listening and closes every connection (toxiproxy: `enabled: false`).
    pub(crate) fn stop(&self) {
        if let Some(r) = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            r.accept.abort();
        }
        self.reset_connections();
    }

    /// Resets (TCP RST) every connection open now; new ones are served as before.
    pub(crate) fn reset_connections(&self) {
        let mut generation = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        generation.cancel();
        *generation = CancellationToken::new();
    }

    fn connection_token(&self) -> CancellationToken {
        self.generation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .child_token()
    }
}

/// Binds `addr`, waiting a little for a listener on it that is being closed (a proxy
/// disabled or replaced a moment ago) to let go.
async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let mut tries = 0;
    loop {
        match TcpListener::bind(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 50 => {
                tries += 1;
                sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

async fn accept_loop(listener: TcpListener, proxy: std::sync::Weak<Proxy>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Some(proxy) = proxy.upgrade() else { return };
        let refused = proxy
            .toxics
            .borrow()
            .iter()
            .any(|t| t.kind == Kind::Refuse && rand::rng().random::<f32>() < t.toxicity);
        if refused {
            reset(&client);
            continue;
        }
        let token = proxy.connection_token();
        tokio::spawn(connection(client, proxy, token));
    }
}

async fn connection(client: TcpStream, proxy: Arc<Proxy>, token: CancellationToken) {
    let Ok(server) = TcpStream::connect(&proxy.upstream).await else {
        reset(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let toxics = proxy.toxics.subscribe();
    drop(proxy); // a connection does not keep its proxy alive
    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();
    // Each toxic acts on this connection or not, drawn once (toxiproxy's toxicity).
    let draws = Arc::new(StdMutex::new(HashMap::new()));
    let ends = Ends {
        reset: token,
        closed: CancellationToken::new(),
    };
    let up = link(
        Stream::Upstream,
        client_r,
        server_w,
        toxics.clone(),
        Arc::clone(&draws),
        ends.clone(),
    );
    let down = link(Stream::Downstream, server_r, client_w, toxics, draws, ends);
    tokio::join!(up, down);
}

/// How the two links of a connection tell each other that it ended.
#[derive(Clone)]
struct Ends {
    /// Reset: the connection (or every connection of the proxy) is reset.
    reset: CancellationToken,
    /// One direction closed: close the other too.
    closed: CancellationToken,
}

/// How a link ended.
#[derive(Clone, Copy)]
enum End {
    /// The source closed: pass the close on (FIN).
    Close,
    /// Close at once with a RST, both sockets.
    Reset,
}

/// Copies `from` into `to` through the toxics of `stream`, until either side closes or a
/// toxic closes the connection; then closes this connection's other link too.
async fn link(
    stream: Stream,
    from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut toxics: watch::Receiver<Vec<Toxic>>,
    draws: Arc<StdMutex<HashMap<(Stream, String), bool>>>,
    ends: Ends,
) {
    let token = &ends.reset;
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(1024);
    let reader = tokio::spawn(read_chunks(from, tx));
    let mut state = LinkState::default();
    let end = loop {
        let chain: Vec<Toxic> = {
            let all = toxics.borrow_and_update();
            all.iter()
                .filter(|t| t.stream == stream)
                .filter(|t| {
                    *draws
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry((stream, t.name.clone()))
                        .or_insert_with(|| rand::rng().random::<f32>() < t.toxicity)
                })
                .cloned()
                .collect()
        };
        state.arm(&chain);
        let holding = chain.iter().any(|t| t.kind == Kind::Blackhole);
        let deadline = state.deadline();
        tokio::select! {
            biased;
            _ = token.cancelled() => break End::Reset,
            _ = ends.closed.cancelled() => break End::Close,
            _ = async { sleep_until(deadline.map_or_else(far, |(at, _)| at)).await }, if deadline.is_some() => {
                break deadline.map_or(End::Close, |(_, end)| end);
            }
            changed = toxics.changed() => {
                if changed.is_err() {
                    break End::Reset; // the proxy is gone
                }
            }
            chunk = rx.recv(), if !holding => match chunk {
                None => {
                    // The source closed: slow_close holds the close back.
                    let delay = chain.iter().find_map(|t| match t.kind {
                        Kind::SlowClose { delay } => Some(Duration::from_millis(delay)),
                        _ => None,
                    });
                    if let Some(delay) = delay {
                        tokio::select! {
                            _ = sleep(delay) => {}
                            _ = token.cancelled() => break End::Reset,
                        }
                    }
                    break End::Close;
                }
                Some((read_at, data)) => {
                    match pass(&chain, &mut state, read_at, data, &mut to, token).await {
                        Ok(None) => {}
                        Ok(Some(end)) => break end,
                        Err(()) => break End::Reset,
                    }
                }
            },
        }
    };
    reader.abort();
    // One direction's end is the connection's end.
    match end {
        End::Close => {
            let _ = to.shutdown().await;
            ends.closed.cancel();
        }
        End::Reset => {
            reset(to.as_ref());
            token.cancel();
        }
    }
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

async fn read_chunks(mut from: OwnedReadHalf, tx: mpsc::Sender<(Instant, Vec<u8>)>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return, // dropping tx tells the link
            Ok(n) => {
                if tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// What a link remembers of its toxics across chunks.
#[derive(Default)]
struct LinkState {
    /// When each `timeout` toxic (by name) closes the connection.
    timeouts: HashMap<String, Option<Instant>>,
    /// When a `reset_peer` toxic resets the connection, once data came.
    reset_at: Option<Instant>,
    /// Bytes each `limit_data` toxic (by name) let through.
    sent: HashMap<String, u64>,
}

impl LinkState {
    /// Starts the clocks of `timeout` toxics new to this link; forgets removed ones.
    fn arm(&mut self, chain: &[Toxic]) {
        let now = Instant::now();
        self.timeouts
            .retain(|name, _| chain.iter().any(|t| &t.name == name));
        for t in chain {
            if let Kind::Timeout { timeout } = t.kind {
                self.timeouts
                    .entry(t.name.clone())
                    .or_insert((timeout > 0).then(|| now + Duration::from_millis(timeout)));
            }
        }
        if !chain
            .iter()
            .any(|t| matches!(t.kind, Kind::ResetPeer { .. }))
        {
            self.reset_at = None;
        }
    }

    /// The next moment a toxic ends the connection, and how.
    fn deadline(&self) -> Option<(Instant, End)> {
        let close = self.timeouts.values().flatten().min().copied();
        match (close, self.reset_at) {
            (Some(c), Some(r)) if c < r => Some((c, End::Close)),
            (_, Some(r)) => Some((r, End::Reset)),
            (Some(c), None) => Some((c, End::Close)),
            (None, None) => None,
        }
    }
}

/// Passes one chunk through `chain` (in order) and writes what comes out. `Some(end)` if a
/// toxic ends the connection; `Err` if writing failed or the connection was reset.
async fn pass(
    chain: &[Toxic],
    state: &mut LinkState,
    read_at: Instant,
    data: Vec<u8>,
    to: &mut OwnedWriteHalf,
    token: &CancellationToken,
) -> Result<Option<End>, ()> {
    let mut pieces = vec![data];
    let mut gap = Duration::ZERO;
    let mut pace: Option<u64> = None;
    let mut end = None;
    for t in chain {
        match t.kind {
            Kind::Latency { latency, jitter } => {
                let until = read_at + Kind::latency_delay(latency, jitter);
                tokio::select! {
                    _ = sleep_until(until) => {}
                    _ = token.cancelled() => return Err(()),
                }
            }
            Kind::Bandwidth { rate } if rate > 0 => pace = Some(rate),
            Kind::Bandwidth { .. } => {}
            Kind::Slicer {
                average_size,
                size_variation,
                delay,
            } => {
                let average = usize::try_from(average_size.max(1)).unwrap_or(usize::MAX);
                let variation = usize::try_from(size_variation)
                    .unwrap_or(0)
                    .min(average.saturating_sub(1));
                pieces = pieces
                    .into_iter()
                    .flat_map(|p| {
                        Kind::slices(p.len(), average, variation)
                            .into_iter()
                            .map(|(a, b)| p[a..b].to_vec())
                            .collect::<Vec<_>>()
                    })
                    .collect();
                gap = Duration::from_micros(delay);
            }
            Kind::Timeout { .. } => pieces.clear(),
            Kind::ResetPeer { timeout } => {
                pieces.clear();
                state
                    .reset_at
                    .get_or_insert_with(|| Instant::now() + Duration::from_millis(timeout));
            }
            Kind::LimitData { bytes } => {
                let sent = state.sent.entry(t.name.clone()).or_insert(0);
                let mut kept = Vec::new();
                for p in pieces {
                    let room = bytes.saturating_sub(*sent) as usize;
                    let take = p.len().min(room);
                    if take > 0 {
                        *sent += take as u64;
                        kept.push(p[..take].to_vec());
                    }
                }
                pieces = kept;
                if *sent >= bytes {
                    end = Some(End::Close);
                }
            }
            Kind::SlowClose { .. } | Kind::Blackhole | Kind::Refuse => {}
        }
    }
    let mut first = true;
    for piece in pieces {
        if !std::mem::take(&mut first) && !gap.is_zero() {
            tokio::select! {
                _ = sleep(gap) => {}
                _ = token.cancelled() => return Err(()),
            }
        }
        // bandwidth: KB/s, sent in slices of at most 100 ms' worth, each after its time.
        let step = pace.map_or(piece.len(), |rate| (rate as usize * 100).max(1));
        for part in piece.chunks(step.max(1)) {
            if let Some(rate) = pace {
                let wait = Duration::from_micros(part.len() as u64 * 1000 / rate);
                tokio::select! {
                    _ = sleep(wait) => {}
                    _ = token.cancelled() => return Err(()),
                }
            }
            tokio::select! {
                r = to.write_all(part) => r.map_err(|_| ())?,
                _ = token.cancelled() => return Err(()),
            }
        }
    }
    Ok(end)
}

/// Closes `stream` with a TCP RST rather than a FIN.
pub(crate) fn reset(stream: &TcpStream) {
    // SO_LINGER 0 makes close() send RST and return at once (no blocking on drop).
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
}
