//! One proxy: its listener, its connections, and the two links of each connection
//! (upstream: client → server; downstream: server → client) through which the toxics act.
//!
//! A link follows toxiproxy's model (its `link.go`, `toxic_collection.go`, `toxics/*.go`): the
//! toxics of its stream form a chain of stages in the order they were added. Each stage takes
//! the chunks that reach it one at a time and hands what it lets through to the next stage,
//! the last one to the destination socket. The end of the stream (the source closed, or a
//! toxic closed the link) goes down the chain after the data before it; a stage that passes
//! it on ends the stages before it. When one link of a connection ends, the other one's
//! source is closed too and its own end goes down its chain.
//!
//! A toxic *starts* on a link when the link starts or the toxic is added; starting draws
//! whether it acts on that link (`toxicity`; else the stage passes everything on). Updating
//! a toxic restarts it on every link — a new draw, its clocks from zero, what it was working
//! on handed on at once — and so does adding a toxic to the stage before it and removing one
//! to the stage before that (toxiproxy interrupts and re-runs that stage). Removing a toxic
//! hands whatever it holds to the next stage unchanged, except that removing a `timeout`
//! closes the link (toxiproxy's `Cleanup`) and that a `reset_peer` already triggered resets
//! the connection anyway.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use super::chain::{draw, Chain, Chunk, Stamp};
use super::toxic::{Stream, Toxic, ToxicKind};

/// The stamps of a proxy's toxics, by name.
pub(crate) type Stamps = Arc<StdMutex<HashMap<String, Stamp>>>;

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One proxy of a fault server.
pub(crate) struct Proxy {
    pub(crate) name: String,
    pub(crate) upstream: String,
    /// The address it listens on (the port chosen at creation, kept across disable/enable).
    pub(crate) listen: SocketAddr,
    pub(crate) toxics: watch::Sender<Vec<Toxic>>,
    /// The stamp of each toxic, by name: changed in the same `send_if_modified` as `toxics`
    /// by the API (toxics set with `send_replace` alone have the default stamp).
    pub(crate) stamps: Stamps,
    running: StdMutex<Option<Running>>,
    /// Cancelled to end every connection open at that moment; replaced afterwards.
    generation: StdMutex<Generation>,
}

#[derive(Default)]
struct Generation {
    /// Resets (RST) the connections.
    reset: CancellationToken,
    /// Closes the connections (as toxiproxy's `Close`: FIN, RST if `reset_peer` asked).
    close: CancellationToken,
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
            stamps: Stamps::default(),
            running: StdMutex::new(None),
            generation: StdMutex::new(Generation::default()),
        });
        if enabled {
            proxy.serve(listener);
        }
        Ok(proxy)
    }

    pub(crate) fn enabled(&self) -> bool {
        lock(&self.running).is_some()
    }

    fn serve(self: &Arc<Proxy>, listener: TcpListener) {
        let accept = tokio::spawn(accept_loop(listener, Arc::downgrade(self)));
        *lock(&self.running) = Some(Running { accept });
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

    fn stop_listening(&self) {
        if let Some(r) = lock(&self.running).take() {
            r.accept.abort();
        }
    }

    /// Stops listening and resets (TCP RST) every connection (a dropped proxy).
    pub(crate) fn stop(&self) {
        self.stop_listening();
        self.reset_connections();
    }

    /// Stops listening and closes every connection, as toxiproxy's `enabled: false`: both
    /// sockets closed at once (FIN; RST on connections where `reset_peer` asked for it), what
    /// the toxics held thrown away.
    pub(crate) fn disable(&self) {
        self.stop_listening();
        // A fresh generation: the connections closed now are not reset by a later reset
        // or drop of the proxy (which follows at once when a populate replaces it).
        let old = std::mem::take(&mut *lock(&self.generation));
        old.close.cancel();
    }

    /// Resets (TCP RST) every connection open now; new ones are served as before.
    pub(crate) fn reset_connections(&self) {
        let mut generation = lock(&self.generation);
        generation.reset.cancel();
        generation.reset = CancellationToken::new();
    }

    fn connection_ends(&self) -> (CancellationToken, CancellationToken) {
        let generation = lock(&self.generation);
        (
            generation.reset.child_token(),
            generation.close.child_token(),
        )
    }
}

/// The address `addr` (`HOST:PORT`) names, as Go's `net.ResolveTCPAddr` picks it: the first
/// IPv4 address of the host if it has one, else its first address.
pub(crate) async fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    let all: Vec<SocketAddr> = tokio::net::lookup_host(addr).await?.collect();
    all.iter()
        .find(|a| a.is_ipv4())
        .or(all.first())
        .copied()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no address for {addr}"),
            )
        })
}

/// Binds `addr` (resolved as [`resolve`]), waiting a little for a listener on it that is
/// being closed (a proxy disabled or replaced a moment ago) to let go.
async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let addr = resolve(addr).await?;
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
            .any(|t| t.kind == ToxicKind::Refuse && draw(t.toxicity));
        if refused {
            reset(&client);
            continue;
        }
        let ends = proxy.connection_ends();
        tokio::spawn(connection(client, proxy, ends));
    }
}

/// What ends a connection, shared by its two links.
struct Conn {
    /// Cancelled: reset both sockets now.
    reset: CancellationToken,
    /// Cancelled: close both sockets now.
    close: CancellationToken,
    /// Closes of this connection are resets: toxiproxy sets `SO_LINGER` 0 on both sockets of
    /// a connection that starts while a `reset_peer` toxic exists, and we also do when a
    /// `reset_peer` fires.
    rst: AtomicBool,
}

async fn connection(
    client: TcpStream,
    proxy: Arc<Proxy>,
    (reset, close): (CancellationToken, CancellationToken),
) {
    let Ok(server) = TcpStream::connect(&proxy.upstream).await else {
        return; // dropping `client` closes it, as toxiproxy does
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let toxics = proxy.toxics.subscribe();
    let stamps = Arc::clone(&proxy.stamps);
    let rst = proxy
        .toxics
        .borrow()
        .iter()
        .any(|t| matches!(t.kind, ToxicKind::ResetPeer { .. }));
    drop(proxy); // a connection does not keep its proxy alive
    let conn = Arc::new(Conn {
        reset,
        close,
        rst: AtomicBool::new(rst),
    });
    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();
    let (up_done, down_done) = (CancellationToken::new(), CancellationToken::new());
    let up = link(
        Stream::Upstream,
        client_r,
        server_w,
        Watched {
            toxics: toxics.clone(),
            stamps: Arc::clone(&stamps),
        },
        Arc::clone(&conn),
        (up_done.clone(), down_done.clone()),
    );
    let down = link(
        Stream::Downstream,
        server_r,
        client_w,
        Watched { toxics, stamps },
        conn,
        (down_done, up_done),
    );
    tokio::join!(up, down);
}

/// A proxy's toxics as a link watches them.
struct Watched {
    toxics: watch::Receiver<Vec<Toxic>>,
    stamps: Stamps,
}

impl Watched {
    /// The toxics of `stream` now, with their stamps, in order.
    fn now(&mut self, stream: Stream) -> Vec<(Toxic, Stamp)> {
        let list = self.toxics.borrow_and_update();
        let stamps = lock(&self.stamps);
        list.iter()
            .filter(|t| t.stream == stream)
            .map(|t| (t.clone(), stamps.get(&t.name).copied().unwrap_or_default()))
            .collect()
    }
}

/// At most this many bytes wait in a link's stages before it stops reading its source.
const MAX_BUFFERED: usize = 1 << 20;

/// Copies `from` into `to` through the toxics of `stream`, until the end of the stream
/// reaches `to` or the connection is reset or closed; `done` says so to the other link of the
/// connection, whose end (`other_done`) ends this link's source.
async fn link(
    stream: Stream,
    from: OwnedReadHalf,
    to: OwnedWriteHalf,
    mut watched: Watched,
    conn: Arc<Conn>,
    (done, other_done): (CancellationToken, CancellationToken),
) {
    let (tx, mut input) = mpsc::channel::<Vec<u8>>(4);
    let reader = tokio::spawn(read_chunks(from, tx));
    let (out_tx, out_rx) = mpsc::channel::<Vec<u8>>(4);
    let writer = tokio::spawn(write_chunks(to, out_rx, Arc::clone(&conn)));
    let mut chain = Chain::default();
    chain.apply(watched.now(stream), Instant::now());
    let mut reading = true;
    loop {
        let now = Instant::now();
        if chain.pump(now) {
            conn.rst.store(true, Ordering::SeqCst);
        }
        if chain.cut && reading {
            reading = false;
            reader.abort();
        }
        if chain.finished() {
            break;
        }
        let wake = chain
            .next_wake()
            .map(|w| w.max(now + Duration::from_millis(1)));
        let output = chain.has_output();
        let room = chain.buffered() < MAX_BUFFERED;
        tokio::select! {
            biased;
            _ = conn.reset.cancelled() => break,
            _ = conn.close.cancelled() => break,
            changed = watched.toxics.changed() => match changed {
                Ok(()) => chain.apply(watched.now(stream), Instant::now()),
                Err(_) => {
                    conn.reset.cancel(); // the proxy is gone
                    break;
                }
            },
            _ = other_done.cancelled(), if reading => {
                // The other link closed this link's source: what was read goes on, then the end.
                reading = false;
                reader.abort();
                while let Ok(data) = input.try_recv() {
                    chain.push(Chunk::Data { at: now, bytes: data });
                }
                chain.push(Chunk::End);
            }
            permit = out_tx.reserve(), if output => match permit {
                Ok(permit) => permit.send(chain.pop_output()),
                Err(_) => break, // the writer failed: the destination is gone
            },
            _ = sleep_until(wake.unwrap_or_else(far)), if wake.is_some() => {}
            chunk = input.recv(), if reading && room => match chunk {
                Some(data) => chain.push(Chunk::Data { at: Instant::now(), bytes: data }),
                None => {
                    reading = false;
                    chain.push(Chunk::End);
                }
            },
        }
    }
    reader.abort();
    drop(out_tx); // the writer writes what it has, then closes (or resets, or closes at once)
    let _ = writer.await;
    done.cancel();
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

async fn read_chunks(mut from: OwnedReadHalf, tx: mpsc::Sender<Vec<u8>>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return, // dropping tx tells the link
            Ok(n) => {
                if tx.send(buf[..n].to_vec()).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Writes what the link lets through to `to`; when the link is done, closes `to` (FIN, or
/// RST if the connection's closes are resets). A reset or close of the connection acts at
/// once, dropping what is not written yet.
async fn write_chunks(mut to: OwnedWriteHalf, mut rx: mpsc::Receiver<Vec<u8>>, conn: Arc<Conn>) {
    loop {
        let next = tokio::select! {
            biased;
            _ = conn.reset.cancelled() => return abort(to),
            _ = conn.close.cancelled() => return close(to, &conn).await,
            next = rx.recv() => next,
        };
        let Some(data) = next else {
            return close(to, &conn).await;
        };
        tokio::select! {
            biased;
            _ = conn.reset.cancelled() => return abort(to),
            _ = conn.close.cancelled() => return close(to, &conn).await,
            written = to.write_all(&data) => if written.is_err() {
                return; // the destination is gone
            },
        }
    }
}

/// Resets `to`'s socket: no FIN now, a RST when its read half (the other link's source) is
/// dropped too.
fn abort(to: OwnedWriteHalf) {
    reset(to.as_ref());
    to.forget();
}

async fn close(mut to: OwnedWriteHalf, conn: &Conn) {
    if conn.rst.load(Ordering::SeqCst) {
        abort(to);
    } else {
        let _ = to.shutdown().await;
    }
}

/// Closes `stream` with a TCP RST rather than a FIN.
pub(crate) fn reset(stream: &TcpStream) {
    // SO_LINGER 0 makes close() send RST and return at once (no blocking on drop).
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
}
