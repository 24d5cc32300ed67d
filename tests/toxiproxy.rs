//! The testkit's fault server speaks toxiproxy's HTTP API: real toxiproxy clients nobody here
//! wrote (`toxiproxy_rust`, PyPI's `toxiproxy-python`, npm's `toxiproxy-node-client`) drive it, and its toxics do to etcd
//! traffic what toxiproxy's do.

mod common;

use std::time::{Duration, Instant};

use common::*;
use etcd_coord::testkit::faults::{FaultClient, FaultServer, Kind, Stream, Toxic};

/// A fault server with one proxy, `etcd`, in front of `etcd`'s first member.
async fn server_with_proxy(etcd: &etcd_coord::testkit::TestEtcd) -> (FaultServer, String) {
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
        Kind::Latency {
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
    let toxics = server.proxy("etcd").unwrap().toxics;
    assert_eq!(
        toxics
            .iter()
            .map(|t| (t.name.as_str(), t.stream, &t.kind))
            .collect::<Vec<_>>(),
        vec![
            (
                "latency_downstream",
                Stream::Downstream,
                &Kind::Latency {
                    latency: 250,
                    jitter: 10
                }
            ),
            (
                "slicer_upstream",
                Stream::Upstream,
                &Kind::Slicer {
                    average_size: 10,
                    size_variation: 5,
                    delay: 0
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
    // npm's toxiproxy-node-client, installed by scripts/test (`ensure_toxiproxy_node`).
    let node_path = std::env::var("ETCD_COORD_NODE_PATH").expect(
        "ETCD_COORD_NODE_PATH: where toxiproxy-node-client is installed (scripts/test sets it)",
    );
    let etcd = etcd().await;
    let server = FaultServer::start("127.0.0.1:0").await.unwrap();
    let script = format!(
        r#"
const assert = require("assert");
const readline = require("readline");
const {{ Toxiproxy }} = require("toxiproxy-node-client");
const refused = async (promise, status) => {{
  try {{ await promise; }} catch (e) {{
    assert.match(e.message, new RegExp(`status code ${{status}}`));
    return;
  }}
  assert.fail(`accepted; expected status ${{status}}`);
}};
(async () => {{
  const t = new Toxiproxy("http://{api}");
  assert.match(await t.getVersion(), /version/);
  const populated = await t.populate([{{ name: "spare", listen: "127.0.0.1:0", upstream: "127.0.0.1:1" }}]);
  assert.deepStrictEqual(Object.keys(populated), ["spare"]);
  const p = await t.createProxy({{ name: "etcd", listen: "127.0.0.1:0", upstream: "{upstream}" }});
  assert.strictEqual(p.enabled, true);
  await refused(t.createProxy({{ name: "etcd", listen: "127.0.0.1:0", upstream: "{upstream}" }}), 409);
  await refused(t.get("nothing"), 404);
  const latency = await p.addToxic({{ type: "latency", name: "lag", stream: "downstream", toxicity: 1,
    attributes: {{ latency: 250, jitter: 10 }} }});
  assert.deepStrictEqual(latency.attributes, {{ latency: 250, jitter: 10 }});
  await p.addToxic({{ type: "limit_data", stream: "upstream", attributes: {{ bytes: 1000000 }} }});
  await refused(p.addToxic({{ type: "no_such_toxic", attributes: {{}} }}), 400);
  await refused(p.addToxic({{ type: "latency", name: "lag", attributes: {{ latency: 1 }} }}), 409);
  const limit = await p.getToxic("limit_data_upstream");
  assert.strictEqual(limit.type, "limit_data");
  assert.deepStrictEqual(Object.keys(await t.getAll()).sort(), ["etcd", "spare"]);
  console.log("LISTEN", p.listen);
  const lines = readline.createInterface({{ input: process.stdin }})[Symbol.asyncIterator]();
  await lines.next(); // the test checks the toxics' effect meanwhile
  const updated = await latency.update({{ attributes: {{ latency: 50, jitter: 0 }} }});
  assert.deepStrictEqual(updated.attributes, {{ latency: 50, jitter: 0 }});
  await limit.remove();
  await refused(limit.remove(), 404);
  const disabled = await p.update({{ enabled: false }});
  assert.strictEqual(disabled.enabled, false);
  console.log("UPDATED");
  await lines.next();
  await t.reset();
  const after = await t.get("etcd");
  assert.strictEqual(after.enabled, true);
  await (await t.get("spare")).remove();
  await refused(t.get("spare"), 404);
  console.log("DONE");
  process.exit(0);
}})().catch((e) => {{ console.error(e); process.exit(1); }});
"#,
        api = server.api_addr(),
        upstream = etcd.endpoints()[0],
    );
    let mut node = tokio::process::Command::new("node")
        .arg("-e")
        .arg(script)
        .env("NODE_PATH", node_path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node");
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let mut next_line = async || {
        tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the script answers")
            .unwrap()
            .expect("the script's next line (did it fail? its error is above)")
    };
    let listen = next_line()
        .await
        .strip_prefix("LISTEN ")
        .expect("where the proxy listens")
        .to_owned();
    let toxics = server.proxy("etcd").unwrap().toxics;
    assert_eq!(
        toxics
            .iter()
            .map(|t| (t.name.as_str(), t.stream, &t.kind))
            .collect::<Vec<_>>(),
        vec![
            (
                "lag",
                Stream::Downstream,
                &Kind::Latency {
                    latency: 250,
                    jitter: 10
                }
            ),
            (
                "limit_data_upstream",
                Stream::Upstream,
                &Kind::LimitData { bytes: 1_000_000 }
            ),
        ]
    );
    let client = client_via_endpoint(&listen).await;
    let took = read_time(&client).await.unwrap();
    assert!(took >= Duration::from_millis(240), "{took:?}");
    node.stdin
        .as_mut()
        .unwrap()
        .write_all(b"go\n")
        .await
        .unwrap();
    assert_eq!(next_line().await, "UPDATED");
    let proxy = server.proxy("etcd").unwrap();
    assert!(!proxy.enabled);
    assert_eq!(proxy.toxics.len(), 1);
    assert_eq!(
        proxy.toxics[0].kind,
        Kind::Latency {
            latency: 50,
            jitter: 0
        }
    );
    node.stdin
        .as_mut()
        .unwrap()
        .write_all(b"go\n")
        .await
        .unwrap();
    assert_eq!(next_line().await, "DONE");
    let status = tokio::time::timeout(Duration::from_secs(30), node.wait())
        .await
        .expect("the script ends")
        .unwrap();
    assert!(status.success(), "the script failed: {status}");
    let proxy = server.proxy("etcd").unwrap();
    assert!(proxy.enabled && proxy.toxics.is_empty());
    assert!(server.proxy("spare").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_with_toxiproxys_status_codes_and_json() {
    use etcd_coord::testkit::faults::Method;
    let etcd = etcd().await;
    let (server, _) = server_with_proxy(&etcd).await;
    let api = FaultClient::new(server.url());
    let status =
        |r: Result<(u16, serde_json::Value), etcd_coord::testkit::faults::ApiError>| match r {
            Ok((s, _)) => s,
            Err(e) => e.status,
        };
    let (s, v) = api.request(Method::GET, "/version", None).await.unwrap();
    assert_eq!((s, v["version"].is_string()), (200, true));
    let same = serde_json::json!({"name": "etcd", "upstream": "127.0.0.1:1"});
    assert_eq!(
        status(api.request(Method::POST, "/proxies", Some(same)).await),
        409
    );
    let nameless = serde_json::json!({"upstream": "127.0.0.1:1"});
    assert_eq!(
        status(api.request(Method::POST, "/proxies", Some(nameless)).await),
        400
    );
    assert_eq!(
        status(api.request(Method::GET, "/proxies/none", None).await),
        404
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
        status(
            api.request(Method::POST, "/proxies/other/toxics", Some(toxic))
                .await
        ),
        409
    );
    let bad_stream = serde_json::json!({"type": "latency", "stream": "sideways"});
    assert_eq!(
        status(
            api.request(Method::POST, "/proxies/other/toxics", Some(bad_stream))
                .await
        ),
        400
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
        status(
            api.request(Method::GET, "/proxies/other/toxics/none", None)
                .await
        ),
        404
    );
    let (s, all) = api.request(Method::GET, "/proxies", None).await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(all.as_object().unwrap().len(), 2);
    assert_eq!(
        status(
            api.request(
                Method::DELETE,
                "/proxies/other/toxics/bandwidth_upstream",
                None
            )
            .await
        ),
        204
    );
    assert_eq!(
        status(api.request(Method::DELETE, "/proxies/other", None).await),
        204
    );
    assert_eq!(status(api.request(Method::POST, "/reset", None).await), 204);
    assert_eq!(server.proxies().len(), 1);
}

/// What a toxic on the answers of a client's link to etcd does to a read, with toxiproxy's
/// semantics: `Ok(duration)` or the error the read ends with (2 s request timeout).
async fn read_through(toxic: Option<Toxic>) -> (Result<Duration, String>, FaultServer) {
    let etcd = etcd().await;
    let (server, listen) = server_with_proxy(&etcd).await;
    let client = etcd_client::Client::connect(
        [listen.as_str()],
        Some(etcd_coord::recommended_connect_options().with_timeout(Duration::from_secs(2))),
    )
    .await
    .unwrap();
    read_time(&client).await.unwrap(); // connected before the toxic
    if let Some(t) = toxic {
        server.add_toxic("etcd", t).unwrap();
    }
    let r = read_time(&client).await.map_err(|e| e.to_string());
    (r, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_toxic_does_to_etcd_traffic_what_toxiproxys_does() {
    let down = |name: &str, kind| Some(Toxic::new(name, Stream::Downstream, kind));
    // latency: each answer ≥ the latency later.
    let (r, _) = read_through(down(
        "l",
        Kind::Latency {
            latency: 300,
            jitter: 0,
        },
    ))
    .await;
    assert!(r.unwrap() >= Duration::from_millis(300));
    // bandwidth 1 KB/s: an answer of a few hundred bytes takes a few hundred ms more.
    let (r, _) = read_through(down("b", Kind::Bandwidth { rate: 1 })).await;
    assert!(r.unwrap() >= Duration::from_millis(50));
    // slicer: the answer arrives in 10-byte pieces and still parses.
    let (r, _) = read_through(down(
        "s",
        Kind::Slicer {
            average_size: 10,
            size_variation: 5,
            delay: 100,
        },
    ))
    .await;
    assert!(r.is_ok(), "{r:?}");
    // timeout 0: answers are dropped, the connection stays: the read times out.
    let (r, _) = read_through(down("t", Kind::Timeout { timeout: 0 })).await;
    assert!(r.is_err(), "{r:?}");
    // timeout 300: the connection is closed after 300 ms: the read fails, sooner than 2 s.
    let t = Instant::now();
    let (r, _) = read_through(down("t", Kind::Timeout { timeout: 300 })).await;
    assert!(r.is_err(), "{r:?}");
    assert!(
        t.elapsed() < Duration::from_millis(1900),
        "{:?}",
        t.elapsed()
    );
    // reset_peer: the next answer resets the connection.
    let (r, _) = read_through(down("r", Kind::ResetPeer { timeout: 0 })).await;
    assert!(r.is_err(), "{r:?}");
    // limit_data: after that many bytes the connection closes.
    let (r, _) = read_through(down("d", Kind::LimitData { bytes: 10 })).await;
    assert!(r.is_err(), "{r:?}");
    // slow_close only delays a close: reads are unaffected.
    let (r, _) = read_through(down("c", Kind::SlowClose { delay: 1000 })).await;
    assert!(r.unwrap() < Duration::from_millis(500));
    // toxicity 0: the toxic acts on no connection.
    let (r, _) = read_through(Some(Toxic {
        toxicity: 0.0,
        ..Toxic::new("t", Stream::Downstream, Kind::Timeout { timeout: 0 })
    }))
    .await;
    assert!(r.is_ok(), "{r:?}");
    // Upstream toxics act on requests: timeout 0 upstream drops the request.
    let (r, _) = read_through(Some(Toxic::new(
        "u",
        Stream::Upstream,
        Kind::Timeout { timeout: 0 },
    )))
    .await;
    assert!(r.is_err(), "{r:?}");
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
            Toxic::new("hole", Stream::Downstream, Kind::Blackhole),
        )
        .unwrap();
    let pending = {
        let client = client.clone();
        tokio::spawn(async move { read_time(&client).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!pending.is_finished(), "an answer got through a blackhole");
    server.remove_toxic("etcd", "hole").unwrap();
    let took = tokio::time::timeout(Duration::from_secs(2), pending)
        .await
        .expect("the held answer is delivered")
        .unwrap()
        .unwrap();
    assert!(took >= Duration::from_millis(500));

    server
        .add_toxic("etcd", Toxic::new("refuse", Stream::Upstream, Kind::Refuse))
        .unwrap();
    assert!(
        read_time(&client).await.is_ok(),
        "an open connection was refused"
    );
    let fresh = etcd_client::Client::connect(
        [listen.as_str()],
        Some(etcd_client::ConnectOptions::new().with_timeout(Duration::from_millis(500))),
    )
    .await
    .unwrap();
    assert!(
        read_time(&fresh).await.is_err(),
        "a new connection was served"
    );
}

/// A TCP server that sends every byte it receives back, and the bytes a client reads from it
/// through `toxic` (downstream) after sending `payload`, read by read, until EOF or 2 s.
async fn echo_through(toxic: Toxic, payload: &[u8]) -> (Vec<Vec<u8>>, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = echo.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let server = FaultServer::start("127.0.0.1:0").await.unwrap();
    let listen = server
        .create_proxy("echo", "127.0.0.1:0", &upstream)
        .await
        .unwrap()
        .listen;
    server.add_toxic("echo", toxic).unwrap();
    let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(payload).await.unwrap();
    let (mut reads, mut eof) = (Vec::new(), false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                eof = true;
                break;
            }
            Ok(Ok(n)) => reads.push(buf[..n].to_vec()),
            Err(_) => break,
        }
    }
    (reads, eof)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slicer_cuts_chunks_and_limit_data_passes_exactly_its_bytes_then_closes() {
    let payload: Vec<u8> = (0..200u8).collect();
    let (reads, _) = echo_through(
        Toxic::new(
            "s",
            Stream::Downstream,
            Kind::Slicer {
                average_size: 10,
                size_variation: 0,
                delay: 2000,
            },
        ),
        &payload,
    )
    .await;
    assert_eq!(reads.concat(), payload, "sliced, but whole and in order");
    assert!(reads.len() >= 10, "{} reads", reads.len());
    assert!(reads.iter().all(|r| r.len() <= 20), "{reads:?}");

    let (reads, eof) = echo_through(
        Toxic::new("d", Stream::Downstream, Kind::LimitData { bytes: 25 }),
        &payload,
    )
    .await;
    assert_eq!(reads.concat(), payload[..25].to_vec());
    assert!(eof, "the connection stays open after its limit");
}
