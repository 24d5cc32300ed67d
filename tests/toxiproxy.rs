//! The testkit's fault server speaks toxiproxy's HTTP API: real toxiproxy clients nobody here
//! wrote (`toxiproxy_rust`, PyPI's `toxiproxy-python`, npm's `toxiproxy-node-client`) drive it,
//! and its toxics do to TCP and etcd traffic what toxiproxy's do — as toxiproxy's sources
//! (`toxics/*.go`, `link.go`, `toxic_collection.go`, `proxy_collection.go`) define them.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use etcd_coord_testkit::faults::{FaultClient, FaultServer, Method, Stream, Toxic, ToxicKind};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// A fault server with one proxy, `etcd`, in front of `etcd`'s first member.
async fn server_with_proxy(etcd: &etcd_coord_testkit::TestEtcd) -> (FaultServer, String) {
    let server = FaultServer::start("127.0.0.1:0").await.unwrap();
    let listen = server
        .create_proxy("etcd", "127.0.0.1:0", &etcd.endpoints()[0])
        .await
        .unwrap()
        .listen;
    (server, listen)
}

/// How long a linearizable read through `client` takes.
async fn read_time(client: &etcd_client::Client) -> Result<Duration, etcd_client::Error> {
    let t = Instant::now();
    client.clone().get("toxiproxy-probe", None).await?;
    Ok(t.elapsed())
}

/// Whether `e` is the client's own deadline (etcd-client's request timeout).
fn is_deadline(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() == tonic::Code::Cancelled && s.message() == "Timeout expired")
}

/// Whether `e` is a request that failed because its connection ended under it.
fn is_connection_lost(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() == tonic::Code::Unknown && s.message() == "transport error")
}

/// How one end of a TCP connection saw it end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// A FIN: reads return 0.
    Eof,
    /// A RST: reads fail with `ConnectionReset`.
    Reset,
    /// Not ended within the wait.
    Open,
}

/// An upstream that echoes every byte back (and closes its side after echoing a chunk that
/// ends in `BYE`), and reports how each of its connections ended.
struct Echo {
    addr: String,
    ended: mpsc::UnboundedReceiver<Ending>,
}

impl Echo {
    async fn start() -> Echo {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, ended) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let how = loop {
                        match s.read(&mut buf).await {
                            Ok(0) => break Ending::Eof,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    break Ending::Reset;
                                }
                                if buf[..n].ends_with(b"BYE") {
                                    let _ = s.shutdown().await;
                                }
                            }
                            Err(_) => break Ending::Reset,
                        }
                    };
                    let _ = tx.send(how);
                });
            }
        });
        Echo { addr, ended }
    }

    /// How the next of its connections to end ended (`Open`: none within `within`).
    async fn ending(&mut self, within: Duration) -> Ending {
        tokio::time::timeout(within, self.ended.recv())
            .await
            .ok()
            .flatten()
            .unwrap_or(Ending::Open)
    }
}

/// A client connection to `addr` (no Nagle: each write is one chunk).
async fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).await.unwrap();
    let _ = s.set_nodelay(true); // fails if the proxy reset the connection already
    s
}

/// What `s` reads until it ends or `within` passes, and how it ended.
async fn read_until_end(s: &mut TcpStream, within: Duration) -> (Vec<u8>, Ending) {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (got, Ending::Open),
            Ok(Ok(0)) => return (got, Ending::Eof),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (got, Ending::Reset)
            }
            Ok(Err(e)) => panic!("a read failed otherwise than by a reset: {e}"),
        }
    }
}

/// Sends `msg` through `s` and reads it back (within 2 s), or says what came instead.
async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Result<(), String> {
    s.write_all(msg).await.map_err(|e| e.to_string())?;
    let mut got = vec![0u8; msg.len()];
    match tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut got)).await {
        Ok(Ok(_)) if got == msg => Ok(()),
        Ok(Ok(_)) => Err(format!("other bytes came back: {got:?}")),
        Ok(Err(e)) => Err(format!("the connection ended: {e}")),
        Err(_) => Err("nothing came back within 2 s".into()),
    }
}

/// A script of npm's `toxiproxy-node-client` against a fault server's API, run with node. In
/// the script `t` is the client, `step(msg)` prints `msg` and waits until the test says go,
/// and `refused(promise, status)` asserts that the API refused with that status.
struct NodeScript {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl NodeScript {
    /// Runs `body` (with each `(placeholder, value)` of `vars` put in) against `api`.
    fn start(api: SocketAddr, body: &str, vars: &[(&str, &str)]) -> NodeScript {
        // npm's toxiproxy-node-client, installed by scripts/test (`ensure_toxiproxy_node`).
        let node_path = std::env::var("ETCD_COORD_NODE_PATH").expect(
            "ETCD_COORD_NODE_PATH: where toxiproxy-node-client is installed (scripts/test sets it)",
        );
        let mut body = body.to_owned();
        for (name, value) in vars {
            body = body.replace(name, value);
        }
        let script = r#"
const assert = require("assert");
const readline = require("readline");
const { Toxiproxy } = require("toxiproxy-node-client");
const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const step = async (msg) => { console.log(msg); await lines.next(); };
const refused = async (promise, status) => {
  try { await promise; } catch (e) {
    assert.match(e.message, new RegExp(`status code ${status}$`));
    return;
  }
  assert.fail(`accepted; expected status ${status}`);
};
(async () => {
  const t = new Toxiproxy("http://__API__");
  __BODY__
  console.log("DONE");
  process.exit(0);
})().catch((e) => { console.error(e); process.exit(1); });
"#
        .replace("__API__", &api.to_string())
        .replace("__BODY__", &body);
        let mut child = tokio::process::Command::new("node")
            .arg("-e")
            .arg(script)
            .env("NODE_PATH", node_path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        NodeScript { child, lines }
    }

    /// The script's next line, which must start with `prefix`; the rest of it.
    async fn expect(&mut self, prefix: &str) -> String {
        let line = tokio::time::timeout(Duration::from_secs(30), self.lines.next_line())
            .await
            .expect("the script answers")
            .unwrap()
            .unwrap_or_else(|| panic!("the script ended before {prefix:?} (its error is above)"));
        line.strip_prefix(prefix)
            .unwrap_or_else(|| panic!("expected {prefix:?}, the script said {line:?}"))
            .to_owned()
    }

    /// Lets the script go on past its `step`.
    async fn go(&mut self) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").await.unwrap();
        stdin.flush().await.unwrap();
    }

    /// Waits for the script's end, which must be a success.
    async fn finish(mut self) {
        self.expect("DONE").await;
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the script ends")
            .unwrap();
        assert!(status.success(), "the script failed: {status}");
    }
}

/// A free loopback port (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_toxiproxy_rust_client_drives_the_fault_server() {
    let etcd = etcd().await;
    let server = FaultServer::start("127.0.0.1:0").await.unwrap();
    let api = server.api_addr();
    let upstream = etcd.endpoints()[0].clone();
    // toxiproxy_rust is a blocking client: its calls run on a blocking thread.
    let blocking = |f: Box<dyn FnOnce(&toxiproxy_rust::client::Client) + Send>| async move {
        tokio::task::spawn_blocking(move || f(&toxiproxy_rust::client::Client::new(api)))
            .await
            .unwrap()
    };
    blocking(Box::new(move |c| {
        assert!(c.is_running());
        assert!(c.version().unwrap().contains("version"));
        let proxies = c
            .populate(vec![toxiproxy_rust::proxy::ProxyPack::new(
                "etcd".into(),
                "127.0.0.1:0".into(),
                upstream,
            )])
            .unwrap();
        assert_eq!(proxies.len(), 1);
        assert!(c.all().unwrap().contains_key("etcd"));
    }))
    .await;
    let listen = server.proxy("etcd").unwrap().listen;
    let client = client_via_endpoint(&listen).await;
    assert!(read_time(&client).await.unwrap() < Duration::from_millis(200));

    // Latency added by the client slows every answer by at least that much.
    blocking(Box::new(|c| {
        c.find_proxy("etcd")
            .unwrap()
            .with_latency("downstream".into(), 300, 0, 1.0);
    }))
    .await;
    let toxics = server.proxy("etcd").unwrap().toxics;
    assert_eq!(toxics.len(), 1);
    assert_eq!(
        toxics[0].kind,
        ToxicKind::Latency {
            latency: 300,
            jitter: 0
        }
    );
    assert!(read_time(&client).await.unwrap() >= Duration::from_millis(300));

    // Reset by the client: no toxic, fast again.
    blocking(Box::new(|c| {
        let proxy = c.find_and_reset_proxy("etcd").unwrap();
        assert!(proxy.toxics().unwrap().is_empty());
    }))
    .await;
    assert!(server.proxy("etcd").unwrap().toxics.is_empty());
    assert!(read_time(&client).await.unwrap() < Duration::from_millis(200));

    // Disabled, nothing gets through; enabled again, it does.
    blocking(Box::new(|c| {
        c.find_proxy("etcd").unwrap().disable().unwrap()
    }))
    .await;
    assert!(!server.proxy("etcd").unwrap().enabled);
    let fresh = etcd_client::Client::connect(
        [listen.as_str()],
        Some(etcd_client::ConnectOptions::new().with_timeout(Duration::from_millis(500))),
    )
    .await
    .unwrap();
    assert!(read_time(&fresh).await.is_err());
    blocking(Box::new(|c| {
        c.find_proxy("etcd").unwrap().enable().unwrap()
    }))
    .await;
    assert!(server.proxy("etcd").unwrap().enabled);
    assert!(
        eventually(Duration::from_secs(5), || async {
            read_time(&fresh).await.is_ok()
        })
        .await
    );
    blocking(Box::new(|c| c.reset().unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_toxiproxy_client_drives_the_fault_server() {
    let etcd = etcd().await;
    let server = FaultServer::start("127.0.0.1:0").await.unwrap();
    let api = server.api_addr();
    let script = format!(
        r#"
import sys
from toxiproxy.api import APIConsumer
from toxiproxy.server import Toxiproxy
from toxiproxy.exceptions import ProxyExists, NotFound, InvalidToxic
APIConsumer.host = "{host}"
APIConsumer.port = {port}
t = Toxiproxy()
assert t.running()
assert b"version" in t.version()
p = t.create(upstream="{upstream}", name="etcd")
try:
    t.create(upstream="{upstream}", name="etcd")
    sys.exit("a second proxy of the same name was accepted")
except ProxyExists:
    pass
p.add_toxic(type="latency", attributes={{"latency": 250, "jitter": 10}})
p.add_toxic(type="slicer", stream="upstream", attributes={{"average_size": 10, "size_variation": 5, "delay": 0}})
try:
    p.add_toxic(type="no_such_toxic")
    sys.exit("an unknown toxic type was accepted")
except InvalidToxic:
    pass
names = sorted(t.get_proxy("etcd").toxics().keys())
assert names == ["latency_downstream", "slicer_upstream"], names
print("LISTEN", p.listen)
sys.stdout.flush()
sys.stdin.readline()  # the test checks the toxics' effect meanwhile
p.destroy_toxic("slicer_upstream")
try:
    p.destroy_toxic("slicer_upstream")
    sys.exit("a second removal of the same toxic was accepted")
except NotFound:
    pass
p.disable()
assert t.get_proxy("etcd").enabled is False
p.enable()
t.reset()
assert t.get_proxy("etcd").toxics() == {{}}
print("DONE")
"#,
        host = api.ip(),
        port = api.port(),
        upstream = etcd.endpoints()[0],
    );
    let mut py = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3");
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut lines = BufReader::new(py.stdout.take().unwrap()).lines();
    let listen = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the script answers")
            .unwrap()
            .expect("the script says where the proxy listens (is toxiproxy-python installed?)");
        if let Some(l) = line.strip_prefix("LISTEN ") {
            break l.to_owned();
        }
    };
    // toxiproxy lists a proxy's upstream toxics before its downstream ones.
    let toxics = server.proxy("etcd").unwrap().toxics;
    assert_eq!(
        toxics
            .iter()
            .map(|t| (t.name.as_str(), t.stream, &t.kind))
            .collect::<Vec<_>>(),
        vec![
            (
                "slicer_upstream",
                Stream::Upstream,
                &ToxicKind::Slicer {
                    average_size: 10,
                    size_variation: 5,
                    delay: 0
                }
            ),
            (
                "latency_downstream",
                Stream::Downstream,
                &ToxicKind::Latency {
                    latency: 250,
                    jitter: 10
                }
            ),
        ]
    );
    // Through both toxics etcd still answers — sliced requests, delayed answers.
    let client = client_via_endpoint(&listen).await;
    let mut c = client.clone();
    c.put("python-toxiproxy", "sliced", None).await.unwrap();
    let took = read_time(&client).await.unwrap();
    assert!(took >= Duration::from_millis(240), "{took:?}");
    py.stdin.as_mut().unwrap().write_all(b"go\n").await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), py.wait())
        .await
        .expect("the script ends")
        .unwrap();
    assert!(status.success(), "the script failed: {status}");
    assert!(server.proxy("etcd").unwrap().toxics.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_toxiproxy_client_drives_the_fault_server() {
    let etcd = etcd().await;
    let server = FaultServer::start("127.0.0.1:0").await.unwrap();
    let mut node = NodeScript::start(
        server.api_addr(),
        r#"
  assert.match(await t.getVersion(), /version/);
  const populated = await t.populate([{ name: "spare", listen: "127.0.0.1:0", upstream: "127.0.0.1:1" }]);
  assert.deepStrictEqual(Object.keys(populated), ["spare"]);
  const p = await t.createProxy({ name: "etcd", listen: "127.0.0.1:0", upstream: "UPSTREAM" });
  assert.strictEqual(p.enabled, true);
  await refused(t.createProxy({ name: "etcd", listen: "127.0.0.1:0", upstream: "UPSTREAM" }), 409);
  await refused(t.get("nothing"), 404);
  const latency = await p.addToxic({ type: "latency", name: "lag", stream: "downstream", toxicity: 1,
    attributes: { latency: 250, jitter: 10 } });
  assert.deepStrictEqual(latency.attributes, { latency: 250, jitter: 10 });
  await p.addToxic({ type: "limit_data", stream: "upstream", attributes: { bytes: 1000000 } });
  await refused(p.addToxic({ type: "no_such_toxic", attributes: {} }), 400);
  await refused(p.addToxic({ type: "latency", name: "lag", attributes: { latency: 1 } }), 409);
  const limit = await p.getToxic("limit_data_upstream");
  assert.strictEqual(limit.type, "limit_data");
  assert.deepStrictEqual(Object.keys(await t.getAll()).sort(), ["etcd", "spare"]);
  await step("LISTEN " + p.listen); // the test checks the toxics' effect meanwhile
  const updated = await latency.update({ attributes: { latency: 50, jitter: 0 } });
  assert.deepStrictEqual(updated.attributes, { latency: 50, jitter: 0 });
  await limit.remove();
  await refused(limit.remove(), 404);
  const disabled = await p.update({ enabled: false });
  assert.strictEqual(disabled.enabled, false);
  await step("UPDATED");
  await t.reset();
  const after = await t.get("etcd");
  assert.strictEqual(after.enabled, true);
  await (await t.get("spare")).remove();
  await refused(t.get("spare"), 404);
"#,
        &[("UPSTREAM", &etcd.endpoints()[0])],
    );
    let listen = node.expect("LISTEN ").await;
    // toxiproxy lists a proxy's upstream toxics before its downstream ones.
    let toxics = server.proxy("etcd").unwrap().toxics;
    assert_eq!(
        toxics
            .iter()
            .map(|t| (t.name.as_str(), t.stream, &t.kind))
            .collect::<Vec<_>>(),
        vec![
            (
                "limit_data_upstream",
                Stream::Upstream,
                &ToxicKind::LimitData { bytes: 1_000_000 }
            ),
            (
                "lag",
                Stream::Downstream,
                &ToxicKind::Latency {
                    latency: 250,
                    jitter: 10
                }
            ),
        ]
    );
    let client = client_via_endpoint(&listen).await;
    let took = read_time(&client).await.unwrap();
    assert!(took >= Duration::from_millis(240), "{took:?}");
    node.go().await;
    node.expect("UPDATED").await;
    let proxy = server.proxy("etcd").unwrap();
    assert!(!proxy.enabled);
    assert_eq!(proxy.toxics.len(), 1);
    assert_eq!(
        proxy.toxics[0].kind,
        ToxicKind::Latency {
            latency: 50,
            jitter: 0
        }
    );
    node.go().await;
    node.finish().await;
    let proxy = server.proxy("etcd").unwrap();
    assert!(proxy.enabled && proxy.toxics.is_empty());
    assert!(server.proxy("spare").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_0_drops_what_it_stops_and_removing_it_closes_the_connection() {
    // toxiproxy's timeout.go drops every chunk ("Drop the data on the ground"); its Cleanup
    // closes each link when the toxic is removed (toxiproxy's own test:
    // TestTimeoutToxicClosesConnectionOnRemove). Nothing it stopped is ever delivered.
    let mut echo = Echo::start().await;
    let server = FaultServer::start("127.0.0.1:0").await.unwrap();
    let mut node = NodeScript::start(
        server.api_addr(),
        r#"
  const p = await t.createProxy({ name: "echo", listen: "127.0.0.1:0", upstream: "UPSTREAM" });
  const stop = await p.addToxic({ type: "timeout", name: "stop", attributes: { timeout: 0 } });
  await step("LISTEN " + p.listen);
  await stop.remove();
  await refused(stop.remove(), 404);
  await step("REMOVED");
"#,
        &[("UPSTREAM", &echo.addr)],
    );
    let listen = node.expect("LISTEN ").await;
    let mut s = connect(&listen).await;
    s.write_all(b"into the void").await.unwrap();
    let (got, how) = read_until_end(&mut s, Duration::from_millis(500)).await;
    assert_eq!(
        (got.as_slice(), how),
        (&b""[..], Ending::Open),
        "timeout 0 passes nothing and closes nothing"
    );
    node.go().await;
    node.expect("REMOVED").await;
    let (got, how) = read_until_end(&mut s, Duration::from_secs(3)).await;
    assert_eq!(
        how,
        Ending::Eof,
        "removing a timeout toxic closes its connections"
    );
    assert!(got.is_empty(), "bytes it dropped came after all: {got:?}");
    assert_eq!(
        echo.ending(Duration::from_secs(3)).await,
        Ending::Eof,
        "the upstream's side is closed too"
    );
    // The proxy itself serves new connections as before.
    round_trip(&mut connect(&listen).await, b"afterwards")
        .await
        .unwrap();
    node.go().await;
    node.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_read_stopped_by_timeout_0_fails_when_the_toxic_is_removed_and_the_next_succeeds() {
    let etcd = etcd().await;
    let (server, listen) = server_with_proxy(&etcd).await;
    let client = etcd_client::Client::connect(
        [listen.as_str()],
        Some(etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(10))),
    )
    .await
    .unwrap();
    read_time(&client).await.unwrap(); // connected before the toxic
    server
        .add_toxic(
            "etcd",
            Toxic::new(
                "stop",
                Stream::Downstream,
                ToxicKind::Timeout { timeout: 0 },
            ),
        )
        .unwrap();
    let pending = {
        let client = client.clone();
        tokio::spawn(async move { read_time(&client).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!pending.is_finished(), "an answer got through timeout 0");
    server.remove_toxic("etcd", "stop").unwrap();
    let read = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("the read ends when the toxic's removal closes its connection, not at its deadline")
        .unwrap();
    let e = read.expect_err("its answer was dropped: the read cannot succeed");
    assert!(is_connection_lost(&e), "{e:?}");
    assert!(
        eventually(Duration::from_secs(5), || async {
            read_time(&client).await.is_ok()
        })
        .await,
        "the client re-connects and reads"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updating_a_timeout_applies_to_open_connections() {
    // toxiproxy restarts a toxic on every link when it is updated (link.go UpdateToxic): a
    // timeout 0 → 100 closes an open connection 100 ms after the update.
    let mut echo = Echo::start().await;
    let server = FaultServer::start("127.0.0.1:0").await.unwrap();
    let mut node = NodeScript::start(
        server.api_addr(),
        r#"
  const p = await t.createProxy({ name: "echo", listen: "127.0.0.1:0", upstream: "UPSTREAM" });
  const stop = await p.addToxic({ type: "timeout", name: "stop", attributes: { timeout: 0 } });
  await step("LISTEN " + p.listen);
  const updated = await stop.update({ attributes: { timeout: 100 } });
  assert.deepStrictEqual(updated.attributes, { timeout: 100 });
  await step("UPDATED");
"#,
        &[("UPSTREAM", &echo.addr)],
    );
    let listen = node.expect("LISTEN ").await;
    let mut s = connect(&listen).await;
    s.write_all(b"held?").await.unwrap();
    let (got, how) = read_until_end(&mut s, Duration::from_millis(500)).await;
    assert_eq!((got.as_slice(), how), (&b""[..], Ending::Open));
    let asked = Instant::now();
    node.go().await;
    let (got, how) = read_until_end(&mut s, Duration::from_secs(3)).await;
    assert_eq!(
        (got.as_slice(), how),
        (&b""[..], Ending::Eof),
        "the updated timeout closes the open connection"
    );
    assert!(
        asked.elapsed() >= Duration::from_millis(100),
        "closed {:?} after the update was asked for: sooner than its timeout",
        asked.elapsed()
    );
    assert_eq!(echo.ending(Duration::from_secs(3)).await, Ending::Eof);
    node.expect("UPDATED").await;
    node.go().await;
    node.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toxicity_is_drawn_again_when_a_toxic_is_updated_or_added_anew() {
    // toxiproxy draws toxicity each time a toxic starts on a link (toxic.go Run): at its
    // add, at every update, at a remove-and-add.
    let echo = Echo::start().await;
    let server = FaultServer::start("127.0.0.1:0").await.unwrap();
    let mut node = NodeScript::start(
        server.api_addr(),
        r#"
  const p = await t.createProxy({ name: "echo", listen: "127.0.0.1:0", upstream: "UPSTREAM" });
  const stop = await p.addToxic({ type: "timeout", name: "stop", toxicity: 0, attributes: { timeout: 0 } });
  await step("LISTEN " + p.listen);
  const updated = await stop.update({ toxicity: 1 });
  assert.strictEqual(updated.toxicity, 1);
  await step("UPDATED");
  await stop.remove();
  const cap = await p.addToxic({ type: "limit_data", name: "cap", toxicity: 0, attributes: { bytes: 0 } });
  await step("CAPPED");
  await cap.remove();
  await p.addToxic({ type: "limit_data", name: "cap", toxicity: 1, attributes: { bytes: 0 } });
  await step("ADDED AGAIN");
"#,
        &[("UPSTREAM", &echo.addr)],
    );
    let listen = node.expect("LISTEN ").await;
    let mut s = connect(&listen).await;
    round_trip(&mut s, b"toxicity 0: untouched").await.unwrap();
    node.go().await;
    node.expect("UPDATED").await;
    s.write_all(b"toxicity 1").await.unwrap();
    let (got, how) = read_until_end(&mut s, Duration::from_millis(500)).await;
    assert_eq!(
        (got.as_slice(), how),
        (&b""[..], Ending::Open),
        "after the update to toxicity 1 the timeout acts on the open connection"
    );
    node.go().await;
    node.expect("CAPPED").await;
    let mut s = connect(&listen).await;
    round_trip(&mut s, b"limit_data at toxicity 0: untouched")
        .await
        .unwrap();
    node.go().await;
    node.expect("ADDED AGAIN").await;
    s.write_all(b"limit 0 bytes").await.unwrap();
    let (got, how) = read_until_end(&mut s, Duration::from_secs(2)).await;
    assert_eq!(
        (got.as_slice(), how),
        (&b""[..], Ending::Eof),
        "added anew at toxicity 1, limit_data 0 closes the open connection at its next chunk"
    );
    node.go().await;
    node.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn populate_with_one_bad_entry_creates_nothing() {
    // proxy_collection.go PopulateJson: every entry is checked before any proxy is made.
    let echo = Echo::start().await;
    let server = FaultServer::start("127.0.0.1:0").await.unwrap();
    let node = NodeScript::start(
        server.api_addr(),
        r#"
  await refused(t.populate([
    { name: "good", listen: "127.0.0.1:0", upstream: "UPSTREAM" },
    { name: "bad", listen: "127.0.0.1:0" },
  ]), 400);
  assert.deepStrictEqual(await t.getAll(), {});
"#,
        &[("UPSTREAM", &echo.addr)],
    );
    node.finish().await;
    assert!(server.proxies().is_empty());
    let api = FaultClient::new(server.url());
    let populate = |body: serde_json::Value| {
        let api = api.clone();
        async move { api.request(Method::POST, "/populate", Some(body)).await }
    };
    let e = populate(serde_json::json!([
        {"name": "good", "upstream": echo.addr},
        {"upstream": echo.addr},
    ]))
    .await
    .unwrap_err();
    assert_eq!(
        (e.status, e.message.as_str()),
        (400, "missing required field: name at proxy 2")
    );
    let e = populate(serde_json::json!([{"name": "good"}]))
        .await
        .unwrap_err();
    assert_eq!(
        (e.status, e.message.as_str()),
        (400, "missing required field: upstream at proxy 1")
    );
    assert!(server.proxies().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn populate_leaves_an_unchanged_proxy_and_its_connections_alone() {
    // toxiproxy 2.12: a populated proxy whose listen address (resolved: `localhost` is
    // 127.0.0.1) and upstream match an existing one is left as it is — connections, toxics,
    // enabled state; one that differs is stopped and replaced by a new one.
    let mut echo = Echo::start().await;
    let other = Echo::start().await;
    let server = FaultServer::start("127.0.0.1:0").await.unwrap();
    let api = server.api_addr();
    let blocking = |f: Box<dyn FnOnce(&toxiproxy_rust::client::Client) + Send>| async move {
        tokio::task::spawn_blocking(move || f(&toxiproxy_rust::client::Client::new(api)))
            .await
            .unwrap()
    };
    let port = free_port();
    let pack = move |upstream: &str, enabled: bool| {
        let mut p = toxiproxy_rust::proxy::ProxyPack::new(
            "echo".into(),
            format!("localhost:{port}"),
            upstream.to_owned(),
        );
        p.enabled = enabled;
        p
    };
    let (first, again, disabled, moved) = (
        pack(&echo.addr, true),
        pack(&echo.addr, true),
        pack(&echo.addr, false),
        pack(&other.addr, true),
    );
    blocking(Box::new(move |c| {
        assert_eq!(c.populate(vec![first]).unwrap().len(), 1);
        c.find_proxy("echo")
            .unwrap()
            .with_latency("downstream".into(), 1, 0, 1.0);
    }))
    .await;
    let listen = server.proxy("echo").unwrap().listen;
    assert_eq!(listen, format!("127.0.0.1:{port}"));
    let mut s = connect(&listen).await;
    round_trip(&mut s, b"before").await.unwrap();
    blocking(Box::new(move |c| {
        assert_eq!(c.populate(vec![again]).unwrap().len(), 1);
        assert_eq!(c.populate(vec![disabled]).unwrap().len(), 1);
    }))
    .await;
    round_trip(&mut s, b"after: the same connection")
        .await
        .unwrap();
    let proxy = server.proxy("echo").unwrap();
    assert!(proxy.enabled, "an unchanged proxy keeps its enabled state");
    assert_eq!(proxy.toxics.len(), 1, "and its toxics");
    assert_eq!(echo.ending(Duration::from_millis(200)).await, Ending::Open);

    // Another upstream: the proxy is replaced — its connections closed, its toxics gone.
    blocking(Box::new(move |c| {
        assert_eq!(c.populate(vec![moved]).unwrap().len(), 1);
    }))
    .await;
    let (_, how) = read_until_end(&mut s, Duration::from_secs(3)).await;
    assert_eq!(
        how,
        Ending::Eof,
        "a replaced proxy's connections are closed"
    );
    assert_eq!(echo.ending(Duration::from_secs(3)).await, Ending::Eof);
    let proxy = server.proxy("echo").unwrap();
    assert_eq!(
        (proxy.upstream.as_str(), proxy.toxics.len()),
        (other.addr.as_str(), 0)
    );
    round_trip(&mut connect(&listen).await, b"to the other upstream")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_with_toxiproxys_status_codes_and_json() {
    let etcd = etcd().await;
    let (server, _) = server_with_proxy(&etcd).await;
    let api = FaultClient::new(server.url());
    // The status and, for an error, toxiproxy's message (api.go's Err… values).
    let outcome =
        |r: Result<(u16, serde_json::Value), etcd_coord_testkit::faults::ApiError>| match r {
            Ok((s, _)) => (s, String::new()),
            Err(e) => (e.status, e.message),
        };
    let (s, v) = api.request(Method::GET, "/version", None).await.unwrap();
    assert_eq!((s, v["version"].is_string()), (200, true));
    let same = serde_json::json!({"name": "etcd", "upstream": "127.0.0.1:1"});
    assert_eq!(
        outcome(api.request(Method::POST, "/proxies", Some(same)).await),
        (409, "proxy already exists".into())
    );
    let nameless = serde_json::json!({"upstream": "127.0.0.1:1"});
    assert_eq!(
        outcome(api.request(Method::POST, "/proxies", Some(nameless)).await),
        (400, "missing required field: name".into())
    );
    assert_eq!(
        outcome(api.request(Method::GET, "/proxies/none", None).await),
        (404, "proxy not found".into())
    );
    let (s, created) = api
        .request(
            Method::POST,
            "/proxies",
            Some(serde_json::json!({"name": "other", "upstream": "127.0.0.1:1", "listen": "127.0.0.1:0"})),
        )
        .await
        .unwrap();
    assert_eq!(s, 201);
    assert_eq!(created["enabled"], true);
    assert_eq!(created["toxics"], serde_json::json!([]));
    let toxic =
        serde_json::json!({"type": "bandwidth", "stream": "upstream", "attributes": {"rate": 5}});
    let (s, t) = api
        .request(Method::POST, "/proxies/other/toxics", Some(toxic.clone()))
        .await
        .unwrap();
    assert_eq!(s, 200);
    assert_eq!(
        t,
        serde_json::json!({"name": "bandwidth_upstream", "type": "bandwidth", "stream": "upstream",
            "toxicity": 1.0, "attributes": {"rate": 5}})
    );
    assert_eq!(
        outcome(
            api.request(Method::POST, "/proxies/other/toxics", Some(toxic))
                .await
        ),
        (409, "toxic already exists".into())
    );
    let bad_stream = serde_json::json!({"type": "latency", "stream": "sideways"});
    assert_eq!(
        outcome(
            api.request(Method::POST, "/proxies/other/toxics", Some(bad_stream))
                .await
        ),
        (
            400,
            "stream was invalid, can be either upstream or downstream".into()
        )
    );
    let bad_type = serde_json::json!({"type": "nonsense"});
    assert_eq!(
        outcome(
            api.request(Method::POST, "/proxies/other/toxics", Some(bad_type))
                .await
        ),
        (400, "invalid toxic type".into())
    );
    let (s, t) = api
        .request(
            Method::PATCH,
            "/proxies/other/toxics/bandwidth_upstream",
            Some(serde_json::json!({"attributes": {"rate": 7}, "toxicity": 0.5})),
        )
        .await
        .unwrap();
    assert_eq!(
        (s, &t["attributes"]["rate"], &t["toxicity"]),
        (200, &serde_json::json!(7), &serde_json::json!(0.5))
    );
    assert_eq!(
        outcome(
            api.request(Method::GET, "/proxies/other/toxics/none", None)
                .await
        ),
        (404, "toxic not found".into())
    );
    assert_eq!(
        outcome(
            api.request(Method::DELETE, "/proxies/none/toxics/none", None)
                .await
        ),
        (404, "proxy not found".into())
    );
    let (s, all) = api.request(Method::GET, "/proxies", None).await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(all.as_object().unwrap().len(), 2);
    assert_eq!(
        outcome(
            api.request(
                Method::DELETE,
                "/proxies/other/toxics/bandwidth_upstream",
                None
            )
            .await
        ),
        (204, String::new())
    );
    assert_eq!(
        outcome(
            api.request(
                Method::DELETE,
                "/proxies/other/toxics/bandwidth_upstream",
                None
            )
            .await
        ),
        (404, "toxic not found".into())
    );
    assert_eq!(
        outcome(api.request(Method::DELETE, "/proxies/other", None).await),
        (204, String::new())
    );
    assert_eq!(
        outcome(api.request(Method::DELETE, "/proxies/other", None).await),
        (404, "proxy not found".into())
    );
    assert_eq!(
        outcome(api.request(Method::POST, "/reset", None).await),
        (204, String::new())
    );
    assert_eq!(server.proxies().len(), 1);
}

/// A read through a proxy in front of `etcd`, on a connection opened before `toxic` (if any)
/// was added: how it ended (request timeout 1.5 s, no keep-alive) and how long after the
/// toxic's start.
async fn read_through(
    etcd: &etcd_coord_testkit::TestEtcd,
    toxic: Option<Toxic>,
) -> (Result<(), etcd_client::Error>, Duration) {
    let (server, listen) = server_with_proxy(etcd).await;
    let client = etcd_client::Client::connect(
        [listen.as_str()],
        Some(etcd_client::ConnectOptions::new().with_timeout(Duration::from_millis(1500))),
    )
    .await
    .unwrap();
    read_time(&client).await.unwrap(); // connected before the toxic
    let started = Instant::now();
    if let Some(t) = toxic {
        server.add_toxic("etcd", t).unwrap();
    }
    let r = read_time(&client).await.map(|_| ());
    (r, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_toxic_does_to_etcd_traffic_what_toxiproxys_does() {
    let etcd = etcd().await;
    let down = |name: &str, kind| Some(Toxic::new(name, Stream::Downstream, kind));
    // latency: each answer ≥ the latency later.
    let latency = ToxicKind::Latency {
        latency: 300,
        jitter: 0,
    };
    let (r, took) = read_through(&etcd, down("l", latency)).await;
    r.unwrap();
    assert!(took >= Duration::from_millis(300), "{took:?}");
    // bandwidth 1 KB/s: an answer of a few hundred bytes takes a few hundred ms more.
    let (r, took) = read_through(&etcd, down("b", ToxicKind::Bandwidth { rate: 1 })).await;
    r.unwrap();
    assert!(took >= Duration::from_millis(50), "{took:?}");
    // slicer: the answer arrives in 10-byte pieces and still parses.
    let slicer = ToxicKind::Slicer {
        average_size: 10,
        size_variation: 5,
        delay: 100,
    };
    let (r, _) = read_through(&etcd, down("s", slicer)).await;
    r.unwrap();
    // timeout 0: the answer is dropped and the connection stays: the read ends at its own
    // deadline.
    let (r, _) = read_through(&etcd, down("t", ToxicKind::Timeout { timeout: 0 })).await;
    let e = r.unwrap_err();
    assert!(is_deadline(&e), "{e:?}");
    // timeout 300: the connection is closed 300 ms after the toxic's start: the read fails
    // then, with its connection — not at its deadline.
    let (r, took) = read_through(&etcd, down("t", ToxicKind::Timeout { timeout: 300 })).await;
    let e = r.unwrap_err();
    assert!(is_connection_lost(&e), "{e:?}");
    assert!(took >= Duration::from_millis(300), "{took:?}");
    // reset_peer 0: the answer resets the connection: the read fails with it.
    let (r, _) = read_through(&etcd, down("r", ToxicKind::ResetPeer { timeout: 0 })).await;
    let e = r.unwrap_err();
    assert!(is_connection_lost(&e), "{e:?}");
    // limit_data 10: the connection closes after 10 bytes of the answer: the read fails with
    // it.
    let (r, _) = read_through(&etcd, down("d", ToxicKind::LimitData { bytes: 10 })).await;
    let e = r.unwrap_err();
    assert!(is_connection_lost(&e), "{e:?}");
    // slow_close only delays a close: reads are not held for its delay.
    let (r, took) = read_through(&etcd, down("c", ToxicKind::SlowClose { delay: 1000 })).await;
    r.unwrap();
    assert!(took < Duration::from_millis(1000), "{took:?}");
    // toxicity 0: the toxic acts on no connection.
    let spared = Toxic {
        toxicity: 0.0,
        ..Toxic::new("t", Stream::Downstream, ToxicKind::Timeout { timeout: 0 })
    };
    let (r, _) = read_through(&etcd, Some(spared)).await;
    r.unwrap();
    // Upstream toxics act on requests: timeout 0 upstream drops the request.
    let up = Toxic::new("u", Stream::Upstream, ToxicKind::Timeout { timeout: 0 });
    let (r, _) = read_through(&etcd, Some(up)).await;
    let e = r.unwrap_err();
    assert!(is_deadline(&e), "{e:?}");
}

/// A fault server with one proxy, `echo`, in front of an [`Echo`], with `toxics`.
async fn proxy_to_echo(toxics: Vec<Toxic>) -> (FaultServer, String, Echo) {
    let echo = Echo::start().await;
    let server = FaultServer::start("127.0.0.1:0").await.unwrap();
    let listen = server
        .create_proxy("echo", "127.0.0.1:0", &echo.addr)
        .await
        .unwrap()
        .listen;
    for t in toxics {
        server.add_toxic("echo", t).unwrap();
    }
    (server, listen, echo)
}

/// What a client of an echo upstream sees through `toxics` after it sends `payload`: the
/// bytes until the connection ends (or `within` passes), how its end and the upstream's end
/// saw it end, and when (from the send).
struct Seen {
    got: Vec<u8>,
    client: Ending,
    upstream: Ending,
    after: Duration,
}

async fn through(toxics: Vec<Toxic>, payload: &[u8], within: Duration) -> Seen {
    let (_server, listen, mut echo) = proxy_to_echo(toxics).await;
    let mut s = connect(&listen).await;
    let sent = Instant::now();
    s.write_all(payload).await.unwrap();
    let (got, client) = read_until_end(&mut s, within).await;
    let after = sent.elapsed();
    let upstream = echo.ending(Duration::from_secs(2)).await;
    Seen {
        got,
        client,
        upstream,
        after,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_toxic_ends_tcp_connections_as_toxiproxys_does() {
    let down = |kind| vec![Toxic::new("t", Stream::Downstream, kind)];
    let within = Duration::from_secs(3);
    // reset_peer: the next chunk (the echo) is dropped and both sides are reset (RST), after
    // its timeout.
    for timeout in [0, 300] {
        let seen = through(down(ToxicKind::ResetPeer { timeout }), b"ping", within).await;
        assert_eq!(
            (seen.got.as_slice(), seen.client, seen.upstream),
            (&b""[..], Ending::Reset, Ending::Reset),
            "reset_peer {timeout}"
        );
        assert!(
            seen.after >= Duration::from_millis(timeout),
            "{:?}",
            seen.after
        );
    }
    // timeout 300: nothing passes; both sides are closed (FIN) after 300 ms.
    let seen = through(down(ToxicKind::Timeout { timeout: 300 }), b"ping", within).await;
    assert_eq!(
        (seen.got.as_slice(), seen.client, seen.upstream),
        (&b""[..], Ending::Eof, Ending::Eof)
    );
    assert!(seen.after >= Duration::from_millis(300), "{:?}", seen.after);
    // limit_data 25: exactly 25 bytes, then both sides are closed (FIN).
    let payload: Vec<u8> = (0..200u8).collect();
    let seen = through(down(ToxicKind::LimitData { bytes: 25 }), &payload, within).await;
    assert_eq!(
        (seen.got.as_slice(), seen.client, seen.upstream),
        (&payload[..25], Ending::Eof, Ending::Eof)
    );
    // slow_close 500: the upstream's close reaches the client 500 ms late, after its bytes.
    let seen = through(down(ToxicKind::SlowClose { delay: 500 }), b"BYE", within).await;
    assert_eq!(
        (seen.got.as_slice(), seen.client, seen.upstream),
        (&b"BYE"[..], Ending::Eof, Ending::Eof)
    );
    assert!(seen.after >= Duration::from_millis(500), "{:?}", seen.after);
    // Two latency toxics in one stream add up: each delays a chunk from when it reaches it.
    let lag = |name: &str| {
        Toxic::new(
            name,
            Stream::Downstream,
            ToxicKind::Latency {
                latency: 300,
                jitter: 0,
            },
        )
    };
    let (_server, listen, _echo) = proxy_to_echo(vec![lag("a"), lag("b")]).await;
    let mut s = connect(&listen).await;
    let sent = Instant::now();
    round_trip(&mut s, b"ping").await.unwrap();
    assert!(
        sent.elapsed() >= Duration::from_millis(600),
        "{:?}",
        sent.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackhole_holds_data_and_delivers_it_once_removed_and_refuse_spares_open_connections() {
    let etcd = etcd().await;
    let (server, listen) = server_with_proxy(&etcd).await;
    let client = client_via_endpoint(&listen).await;
    read_time(&client).await.unwrap();
    server
        .add_toxic(
            "etcd",
            Toxic::new("hole", Stream::Downstream, ToxicKind::Blackhole),
        )
        .unwrap();
    let pending = {
        let client = client.clone();
        tokio::spawn(async move { read_time(&client).await.map(|_| Instant::now()) })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!pending.is_finished(), "an answer got through a blackhole");
    let removed = Instant::now();
    server.remove_toxic("etcd", "hole").unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(2), pending)
        .await
        .expect("the held answer is delivered")
        .unwrap()
        .unwrap();
    assert!(answered >= removed, "the answer came before the removal");

    server
        .add_toxic(
            "etcd",
            Toxic::new("refuse", Stream::Upstream, ToxicKind::Refuse),
        )
        .unwrap();
    assert!(
        read_time(&client).await.is_ok(),
        "an open connection was refused"
    );
    let reset = match TcpStream::connect(&listen).await {
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(mut s) => read_until_end(&mut s, Duration::from_secs(2)).await.1 == Ending::Reset,
    };
    assert!(reset, "a new connection is reset at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slicer_cuts_chunks_into_pieces_whole_and_in_order() {
    let slicer = ToxicKind::Slicer {
        average_size: 10,
        size_variation: 0,
        delay: 10_000,
    };
    let (_server, listen, _echo) =
        proxy_to_echo(vec![Toxic::new("s", Stream::Downstream, slicer)]).await;
    let mut s = connect(&listen).await;
    let payload: Vec<u8> = (0..200u8).collect();
    s.write_all(&payload).await.unwrap();
    let mut reads: Vec<Vec<u8>> = Vec::new();
    let mut buf = [0u8; 4096];
    while reads.concat().len() < payload.len() {
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .expect("the pieces come")
            .unwrap();
        assert!(n > 0, "the connection closed");
        reads.push(buf[..n].to_vec());
    }
    assert_eq!(reads.concat(), payload, "sliced, but whole and in order");
    // Ten or more pieces of about 10 bytes arrive one by one (a reader late by more than
    // the pause finds a few of them together).
    let pieces = reads.iter().filter(|r| r.len() <= 20).count();
    assert!(pieces >= 10, "{reads:?}");
}
