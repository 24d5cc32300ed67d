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

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// Which addition of a toxic (by name) is in force and how often it was updated since: a link
/// tells a toxic removed and added again, or updated to the same values, from one left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Stamp {
    added: u64,
    updates: u64,
}

impl Stamp {
    /// The stamp of a toxic added now.
    pub(crate) fn fresh() -> Stamp {
        static ADDITIONS: AtomicU64 = AtomicU64::new(1);
        Stamp {
            added: ADDITIONS.fetch_add(1, Ordering::Relaxed),
            updates: 0,
        }
    }

    /// This stamp after one more update.
    pub(crate) fn updated(self) -> Stamp {
        Stamp {
            updates: self.updates + 1,
            ..self
        }
    }
}

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
            .any(|t| t.kind == Kind::Refuse && draw(t.toxicity));
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
        .any(|t| matches!(t.kind, Kind::ResetPeer { .. }));
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

/// Whether a toxic of `toxicity` acts (toxiproxy's draw: a uniform number in [0, 1) below it).
fn draw(toxicity: f32) -> bool {
    rand::rng().random::<f32>() < toxicity
}

/// A piece of a stream inside a link.
#[derive(Debug)]
enum Chunk {
    /// Bytes, stamped with when they were read (toxiproxy's `Timestamp`, moved on by latency).
    Data { at: Instant, bytes: Vec<u8> },
    /// The end of the stream: the link closes when it reaches the destination.
    End,
}

impl Chunk {
    fn len(&self) -> usize {
        match self {
            Chunk::Data { bytes, .. } => bytes.len(),
            Chunk::End => 0,
        }
    }
}

/// The toxics of one link: a chain of stages, then what waits for the destination.
#[derive(Default)]
struct Chain {
    stages: Vec<Stage>,
    /// What the last stage let through, for the destination.
    out: VecDeque<Chunk>,
    /// Stages ended by a close further down: never started again on this link.
    dead: HashSet<(String, u64)>,
    /// A stage closed the link: nothing read any more can get through.
    cut: bool,
}

impl Chain {
    /// Takes a chunk read from the source.
    fn push(&mut self, chunk: Chunk) {
        if self.cut {
            return;
        }
        match self.stages.first_mut() {
            Some(s) => s.queue.push_back(chunk),
            None => self.out.push_back(chunk),
        }
    }

    /// Moves everything along that is due at `now`. True if a `reset_peer` fired.
    fn pump(&mut self, now: Instant) -> bool {
        let mut fired = false;
        let mut i = 0;
        while i < self.stages.len() {
            let step = self.stages[i].step(now);
            fired |= step.fired;
            let closed = matches!(step.out.last(), Some(Chunk::End));
            match self.stages.get_mut(i + 1) {
                Some(next) => next.queue.extend(step.out),
                None => self.out.extend(step.out),
            }
            if closed {
                // The stage passed the end on: the stages before it can deliver nothing more.
                for s in self.stages.drain(..=i) {
                    self.dead.insert(s.key());
                }
                self.cut = true;
                i = 0;
                continue;
            }
            i += 1;
        }
        fired
    }

    /// Whether the end of the stream is all that is left for the destination.
    fn finished(&self) -> bool {
        matches!(self.out.front(), Some(Chunk::End))
    }

    fn has_output(&self) -> bool {
        matches!(self.out.front(), Some(Chunk::Data { .. }))
    }

    fn pop_output(&mut self) -> Vec<u8> {
        match self.out.pop_front() {
            Some(Chunk::Data { bytes, .. }) => bytes,
            other => {
                // Only called when has_output(); put anything else back.
                if let Some(c) = other {
                    self.out.push_front(c);
                }
                Vec::new()
            }
        }
    }

    /// Bytes waiting in the stages and for the destination.
    fn buffered(&self) -> usize {
        let stages: usize = self
            .stages
            .iter()
            .map(|s| {
                s.queue.iter().map(Chunk::len).sum::<usize>()
                    + s.leaving.iter().map(|(_, c)| c.len()).sum::<usize>()
                    + s.slices.iter().map(Chunk::len).sum::<usize>()
            })
            .sum();
        stages + self.out.iter().map(Chunk::len).sum::<usize>()
    }

    /// The next moment a stage has something to do on its own.
    fn next_wake(&self) -> Option<Instant> {
        self.stages.iter().filter_map(Stage::next_wake).min()
    }

    /// Brings the chain to `wanted` (this link's toxics, in order), as toxiproxy's links
    /// follow each addition, update and removal.
    fn apply(&mut self, wanted: Vec<(Toxic, Stamp)>, now: Instant) {
        let wanted: Vec<(Toxic, Stamp)> = wanted
            .into_iter()
            .filter(|(t, s)| !self.dead.contains(&(t.name.clone(), s.added)))
            .collect();
        let keys: HashMap<(String, u64), usize> = wanted
            .iter()
            .enumerate()
            .map(|(i, (t, s))| ((t.name.clone(), s.added), i))
            .collect();
        // Removals, in chain order: what a removed stage held goes to the next stage.
        let mut kept: Vec<Stage> = Vec::new();
        let mut carry: Vec<Chunk> = Vec::new();
        let mut restart: HashSet<(String, u64)> = HashSet::new();
        for mut stage in std::mem::take(&mut self.stages) {
            stage.queue.extend(carry.drain(..));
            if stage.orphan || keys.contains_key(&stage.key()) {
                kept.push(stage);
                continue;
            }
            let key = stage.key();
            match stage.remove(now) {
                Removal::Carry(held) => {
                    carry = held;
                    if let Some(before) = kept.last() {
                        restart.insert(before.key());
                    }
                }
                Removal::Close => {
                    self.dead.insert(key);
                    for s in kept.drain(..) {
                        self.dead.insert(s.key());
                    }
                    restart.clear();
                    carry = vec![Chunk::End];
                    self.cut = true;
                }
                Removal::Orphan(stage) => kept.push(*stage),
            }
        }
        self.out.extend(carry);
        // Updates: a toxic whose values or stamp changed starts again.
        for stage in &mut kept {
            if let Some(&i) = keys.get(&stage.key()) {
                let (toxic, stamp) = &wanted[i];
                if stage.toxic != *toxic || stage.stamp != *stamp {
                    stage.restart(toxic.clone(), *stamp, now);
                    restart.remove(&stage.key());
                }
            }
        }
        // Additions go to the end of the chain and restart the stage before them.
        let present: HashSet<(String, u64)> = kept.iter().map(Stage::key).collect();
        let old = kept.len();
        for (toxic, stamp) in wanted {
            if !present.contains(&(toxic.name.clone(), stamp.added)) {
                if kept.len() == old {
                    if let Some(before) = kept.last() {
                        restart.insert(before.key());
                    }
                }
                kept.push(Stage::new(toxic, stamp, now));
            }
        }
        for stage in &mut kept[..old] {
            if restart.contains(&stage.key()) {
                stage.restart(stage.toxic.clone(), stage.stamp, now);
            }
        }
        self.stages = kept;
    }
}

/// One toxic on one link.
struct Stage {
    toxic: Toxic,
    stamp: Stamp,
    /// Drawn at each start: whether the toxic acts (else the stage passes everything on).
    acts: bool,
    /// When it (re)started: `timeout`'s clock.
    started: Instant,
    /// The chunks that reached it and wait for it.
    queue: VecDeque<Chunk>,
    /// What it is working on: what leaves it, and when, in order.
    leaving: VecDeque<(Instant, Chunk)>,
    /// `slicer`: the pieces of its chunk still to go, one each `gap` after the one before.
    slices: VecDeque<Chunk>,
    gap: Duration,
    /// It does nothing before then (`slicer`'s pause after each piece).
    busy_until: Option<Instant>,
    /// `bandwidth`: nanoseconds it is behind (+) or ahead (−) of its rate.
    debt: i128,
    /// `reset_peer`: when it resets the connection, once a chunk set it off.
    fires_at: Option<Instant>,
    /// `limit_data`: bytes it let through on this link (kept when it restarts, dropped with it).
    passed: u64,
    /// Removed from the proxy, but a `reset_peer` set off before fires anyway.
    orphan: bool,
}

/// What a stage did in one step: what it let through, and whether a `reset_peer` fired.
#[derive(Default)]
struct Step {
    out: Vec<Chunk>,
    fired: bool,
}

/// What happens to a removed stage.
enum Removal {
    /// What it held goes on to the next stage.
    Carry(Vec<Chunk>),
    /// It closes the link (`timeout`).
    Close,
    /// It stays until it fires (a `reset_peer` set off).
    Orphan(Box<Stage>),
}

fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// `at` moved by `nanos` (either way).
fn shifted(at: Instant, nanos: i128) -> Instant {
    let d = Duration::from_nanos(nanos.unsigned_abs().min(u64::MAX as u128) as u64);
    if nanos >= 0 {
        at + d
    } else {
        at.checked_sub(d).unwrap_or(at)
    }
}

impl Stage {
    fn new(toxic: Toxic, stamp: Stamp, now: Instant) -> Stage {
        Stage {
            acts: draw(toxic.toxicity),
            toxic,
            stamp,
            started: now,
            queue: VecDeque::new(),
            leaving: VecDeque::new(),
            slices: VecDeque::new(),
            gap: Duration::ZERO,
            busy_until: None,
            debt: 0,
            fires_at: None,
            passed: 0,
            orphan: false,
        }
    }

    fn key(&self) -> (String, u64) {
        (self.toxic.name.clone(), self.stamp.added)
    }

    /// Starts again as `toxic` (toxiproxy's interrupt and re-run): what it was working on
    /// leaves at once (a held end of stream goes back to its queue, to be taken again), its
    /// clocks start from now, whether it acts is drawn again. A `reset_peer` set off cannot
    /// be interrupted and keeps its course.
    fn restart(&mut self, toxic: Toxic, stamp: Stamp, now: Instant) {
        self.toxic = toxic;
        self.stamp = stamp;
        if self.fires_at.is_some() {
            return;
        }
        let (held, end) = self.held(now);
        self.leaving.extend(held.map(|c| (now, c)));
        if end {
            self.queue.push_front(Chunk::End);
        }
        self.busy_until = None;
        self.started = now;
        self.debt = 0;
        self.acts = draw(self.toxic.toxicity);
    }

    /// Empties `leaving` and `slices`: their bytes as one chunk (if any) and whether they held
    /// the end.
    fn held(&mut self, now: Instant) -> (Option<Chunk>, bool) {
        let (mut bytes, mut at, mut end) = (Vec::new(), None, false);
        let slices = self.slices.drain(..).map(|c| (now, c));
        for (_, c) in self.leaving.drain(..).chain(slices) {
            match c {
                Chunk::Data { at: a, bytes: b } => {
                    at.get_or_insert(a);
                    bytes.extend(b);
                }
                Chunk::End => end = true,
            }
        }
        let data = (!bytes.is_empty()).then(|| Chunk::Data {
            at: at.unwrap_or(now),
            bytes,
        });
        (data, end)
    }

    fn remove(mut self, now: Instant) -> Removal {
        if matches!(self.toxic.kind, Kind::Timeout { .. }) {
            return Removal::Close;
        }
        if self.fires_at.is_some() {
            self.orphan = true;
            return Removal::Orphan(Box::new(self));
        }
        let (held, end) = self.held(now);
        let mut carry: Vec<Chunk> = held.into_iter().collect();
        if end {
            carry.push(Chunk::End);
        } else {
            carry.extend(self.queue.drain(..));
        }
        Removal::Carry(carry)
    }

    fn next_wake(&self) -> Option<Instant> {
        let timeout = match self.toxic.kind {
            Kind::Timeout { timeout } if self.acts && timeout > 0 => {
                Some(self.started + millis(timeout))
            }
            _ => None,
        };
        [
            self.leaving.front().map(|(t, _)| *t),
            self.busy_until.filter(|_| self.leaving.is_empty()),
            timeout,
            self.fires_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Does what is due at `now`: lets through what is due, takes the next chunks.
    fn step(&mut self, now: Instant) -> Step {
        let mut step = Step::default();
        loop {
            while self.leaving.front().is_some_and(|(t, _)| *t <= now) {
                let (_, c) = self.leaving.pop_front().expect("a front");
                let end = matches!(c, Chunk::End);
                step.out.push(c);
                if end {
                    return step;
                }
            }
            if !self.leaving.is_empty() {
                return step;
            }
            match self.busy_until {
                Some(b) if b > now => return step,
                _ => self.busy_until = None,
            }
            if let Some(piece) = self.slices.pop_front() {
                step.out.push(piece);
                self.busy_until = Some(now + self.gap);
                continue;
            }
            if let Some(at) = self.fires_at {
                if at <= now {
                    step.fired = true;
                    step.out.push(Chunk::End);
                }
                return step; // set off: it takes nothing more
            }
            if self.acts {
                match self.toxic.kind {
                    Kind::Timeout { timeout }
                        if timeout > 0 && now >= self.started + millis(timeout) =>
                    {
                        step.out.push(Chunk::End);
                        return step;
                    }
                    Kind::Blackhole => return step,
                    _ => {}
                }
            }
            let Some(chunk) = self.queue.pop_front() else {
                return step;
            };
            self.take(chunk, now);
        }
    }

    /// Starts work on `chunk` (toxiproxy's `Pipe` of each toxic, one chunk at a time).
    fn take(&mut self, chunk: Chunk, now: Instant) {
        if !self.acts {
            self.leaving.push_back((now, chunk));
            return;
        }
        let (at, bytes) = match chunk {
            Chunk::End => {
                match self.toxic.kind {
                    Kind::SlowClose { delay } => {
                        self.leaving.push_back((now + millis(delay), Chunk::End))
                    }
                    Kind::ResetPeer { timeout } => self.fires_at = Some(now + millis(timeout)),
                    _ => self.leaving.push_back((now, Chunk::End)),
                }
                return;
            }
            Chunk::Data { at, bytes } => (at, bytes),
        };
        match self.toxic.kind {
            Kind::Latency { latency, jitter } => {
                // Delayed from when it was read (or when an earlier latency let it go).
                let delay = i128::from(Kind::latency_ms(latency, jitter)) * 1_000_000;
                let waited = now.saturating_duration_since(at).as_nanos() as i128;
                let sleep = delay - waited;
                let leaves = if sleep > 0 { shifted(now, sleep) } else { now };
                let at = shifted(at, sleep);
                self.leaving.push_back((leaves, Chunk::Data { at, bytes }));
            }
            Kind::Bandwidth { rate: 0 } => {
                self.debt = 0;
                self.leaving.push_back((now, Chunk::Data { at, bytes }));
            }
            Kind::Bandwidth { rate } => {
                // rate KB/s: each byte costs 1/rate ms; more than 100 ms' worth goes in
                // 100 ms slices.
                self.debt += bytes.len() as i128 * 1_000_000 / i128::from(rate);
                let slice = usize::try_from(rate.saturating_mul(100)).unwrap_or(usize::MAX);
                let mut leaves = now;
                let mut rest = &bytes[..];
                while rest.len() > slice {
                    leaves += millis(100);
                    self.leaving.push_back((
                        leaves,
                        Chunk::Data {
                            at,
                            bytes: rest[..slice].to_vec(),
                        },
                    ));
                    rest = &rest[slice..];
                    self.debt -= 100_000_000;
                }
                leaves = shifted(leaves, self.debt.max(0));
                self.debt = self.debt.min(0);
                self.leaving.push_back((
                    leaves,
                    Chunk::Data {
                        at,
                        bytes: rest.to_vec(),
                    },
                ));
            }
            Kind::Slicer {
                average_size,
                size_variation,
                delay,
            } => {
                let average = usize::try_from(average_size.max(1)).unwrap_or(usize::MAX);
                let variation = usize::try_from(size_variation)
                    .unwrap_or(0)
                    .min(average.saturating_sub(1));
                // Each piece leaves `delay` µs after the one before left.
                self.gap = Duration::from_micros(delay);
                self.slices = Kind::slices(bytes.len(), average, variation)
                    .into_iter()
                    .map(|(a, b)| Chunk::Data {
                        at,
                        bytes: bytes[a..b].to_vec(),
                    })
                    .collect();
            }
            Kind::Timeout { .. } => {} // dropped
            Kind::ResetPeer { timeout } => self.fires_at = Some(now + millis(timeout)),
            Kind::LimitData { bytes: limit } => {
                let room = usize::try_from(limit.saturating_sub(self.passed)).unwrap_or(usize::MAX);
                let take = bytes.len().min(room);
                if take > 0 {
                    self.passed += take as u64;
                    self.leaving.push_back((
                        now,
                        Chunk::Data {
                            at,
                            bytes: bytes[..take].to_vec(),
                        },
                    ));
                }
                if self.passed >= limit {
                    self.leaving.push_back((now, Chunk::End));
                }
            }
            Kind::SlowClose { .. } | Kind::Noop | Kind::Refuse | Kind::Blackhole => {
                self.leaving.push_back((now, Chunk::Data { at, bytes }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(kind: Kind) -> (Chain, Stamp, Toxic) {
        let toxic = Toxic::new("t", Stream::Downstream, kind);
        let stamp = Stamp::fresh();
        let mut chain = Chain::default();
        chain.apply(vec![(toxic.clone(), stamp)], Instant::now());
        (chain, stamp, toxic)
    }

    fn data(bytes: &[u8]) -> Chunk {
        Chunk::Data {
            at: Instant::now(),
            bytes: bytes.to_vec(),
        }
    }

    fn drain(chain: &mut Chain) -> Vec<u8> {
        let mut got = Vec::new();
        while chain.has_output() {
            got.extend(chain.pop_output());
        }
        got
    }

    #[test]
    fn a_removed_timeout_closes_the_link_and_what_it_dropped_stays_dropped() {
        let (mut chain, _, _) = stage(Kind::Timeout { timeout: 0 });
        chain.push(data(b"gone"));
        chain.pump(Instant::now());
        assert!(!chain.has_output() && !chain.finished());
        chain.apply(Vec::new(), Instant::now());
        chain.pump(Instant::now());
        assert!(chain.finished() && chain.cut);
    }

    #[test]
    fn a_removed_blackhole_hands_on_what_it_held_in_order() {
        let (mut chain, _, _) = stage(Kind::Blackhole);
        chain.push(data(b"one "));
        chain.push(data(b"two"));
        chain.pump(Instant::now());
        assert!(!chain.has_output());
        chain.apply(Vec::new(), Instant::now());
        chain.pump(Instant::now());
        assert_eq!(drain(&mut chain), b"one two");
        assert!(!chain.finished());
    }

    #[test]
    fn an_update_restarts_the_toxic_and_the_same_values_leave_it_alone() {
        let (mut chain, stamp, toxic) = stage(Kind::Timeout { timeout: 0 });
        let t0 = Instant::now();
        assert_eq!(chain.next_wake(), None);
        let updated = Toxic {
            kind: Kind::Timeout { timeout: 100 },
            ..toxic.clone()
        };
        let later = t0 + millis(50);
        chain.apply(vec![(updated.clone(), stamp.updated())], later);
        assert_eq!(chain.next_wake(), Some(later + millis(100)));
        // Unchanged: no restart.
        chain.apply(vec![(updated, stamp.updated())], later + millis(30));
        assert_eq!(chain.next_wake(), Some(later + millis(100)));
        chain.pump(later + millis(100));
        assert!(chain.finished());
    }

    #[test]
    fn limit_data_counts_across_restarts_but_not_across_a_remove_and_add() {
        let (mut chain, stamp, toxic) = stage(Kind::LimitData { bytes: 10 });
        chain.push(data(b"123456"));
        chain.pump(Instant::now());
        assert_eq!(drain(&mut chain), b"123456");
        chain.apply(vec![(toxic.clone(), stamp.updated())], Instant::now());
        chain.push(data(b"789abc"));
        chain.pump(Instant::now());
        assert_eq!(drain(&mut chain), b"789a");
        assert!(chain.finished());

        let (mut chain, _, toxic) = stage(Kind::LimitData { bytes: 4 });
        chain.push(data(b"12"));
        chain.pump(Instant::now());
        assert_eq!(drain(&mut chain), b"12");
        chain.apply(vec![(toxic, Stamp::fresh())], Instant::now());
        chain.push(data(b"3456"));
        chain.pump(Instant::now());
        assert_eq!(drain(&mut chain), b"3456");
        assert!(chain.finished());
    }

    #[test]
    fn latencies_in_a_chain_add_up() {
        let lag = |name: &str| {
            Toxic::new(
                name,
                Stream::Downstream,
                Kind::Latency {
                    latency: 100,
                    jitter: 0,
                },
            )
        };
        let mut chain = Chain::default();
        let t0 = Instant::now();
        chain.apply(
            vec![(lag("a"), Stamp::fresh()), (lag("b"), Stamp::fresh())],
            t0,
        );
        chain.push(Chunk::Data {
            at: t0,
            bytes: b"x".to_vec(),
        });
        chain.pump(t0);
        assert_eq!(chain.next_wake(), Some(t0 + millis(100)));
        chain.pump(t0 + millis(100));
        assert!(!chain.has_output());
        assert_eq!(chain.next_wake(), Some(t0 + millis(200)));
        chain.pump(t0 + millis(200));
        assert_eq!(drain(&mut chain), b"x");
    }

    #[test]
    fn slow_close_holds_the_end_and_an_update_starts_its_delay_again() {
        let (mut chain, stamp, toxic) = stage(Kind::SlowClose { delay: 100 });
        let t0 = Instant::now();
        chain.push(data(b"bye"));
        chain.push(Chunk::End);
        chain.pump(t0);
        assert_eq!(drain(&mut chain), b"bye");
        assert!(!chain.finished());
        let t1 = t0 + millis(50);
        let longer = Toxic {
            kind: Kind::SlowClose { delay: 200 },
            ..toxic
        };
        chain.apply(vec![(longer, stamp.updated())], t1);
        chain.pump(t1);
        assert_eq!(chain.next_wake(), Some(t1 + millis(200)));
        chain.pump(t1 + millis(200));
        assert!(chain.finished());
    }
}
