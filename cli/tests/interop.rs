//! `etcd-coord` beside etcd's own clients on the same names, as processes against a real etcd:
//! `etcdctl lock` (etcd 3.5's etcdctl) and Go's `concurrency.Mutex` (the Go peer beside this
//! repository, etcd 3.4's Go client); `inspect` telling them apart; `services`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_coord_lock_and_etcdctl_lock_exclude_each_other_with_increasing_tokens() {
    let etcd = etcd().await;
    let name = unique("excl");
    // Ours holds: etcdctl's command does not run until ours lets go.
    let mut ours = coord(&etcd, &["lock", &name]);
    assert!(ours.line().await.starts_with(&format!("{name}/#")));
    let our_token: i64 = ours
        .line()
        .await
        .split_whitespace()
        .nth(2)
        .unwrap()
        .trim_end_matches(',')
        .parse()
        .unwrap();
    let mut theirs = etcdctl(
        &etcd,
        &["lock", &name, "--", "sh", "-c", "echo ran $ETCD_LOCK_REV"],
    );
    assert_eq!(
        theirs.line_within(Duration::from_secs(2)).await,
        None,
        "etcdctl waits for us"
    );
    ours.signal("TERM");
    assert_eq!(
        ours.exit_code(Duration::from_secs(10)).await,
        0,
        "interrupted while holding: released, 0"
    );
    let ran = theirs.line().await;
    let their_token: i64 = ran.trim_start_matches("ran ").parse().unwrap();
    assert!(their_token > our_token, "{their_token} after {our_token}");
    assert_eq!(theirs.exit_code(Duration::from_secs(10)).await, 0);

    // etcdctl holds: ours gives up at --timeout (124, leaving no key), or runs after it.
    let mut theirs = etcdctl(&etcd, &["lock", &name]);
    assert!(theirs.line().await.starts_with(&format!("{name}/")));
    let (code, _) = coord_output(&etcd, &["lock", &name, "--timeout", "1s", "--", "true"]).await;
    assert_eq!(code, 124, "not acquired within --timeout");
    let members = lock_members(&etcd, &name).await;
    assert_eq!(
        members.len(),
        1,
        "the timed-out waiter left nothing: {members:?}"
    );
    let holder_token = members[0]["fencing_token"].as_i64().unwrap();
    // Interrupted while waiting: 128 + SIGINT, and its waiting key deleted.
    let mut interrupted = coord(&etcd, &["lock", &name, "--", "true"]);
    assert!(
        eventually(Duration::from_secs(10), || async {
            lock_members(&etcd, &name).await.len() == 2
        })
        .await
    );
    interrupted.signal("INT");
    assert_eq!(interrupted.exit_code(Duration::from_secs(10)).await, 130);
    assert_eq!(
        lock_members(&etcd, &name).await.len(),
        1,
        "the interrupted waiter left nothing"
    );
    let mut ours = coord(
        &etcd,
        &[
            "lock",
            &name,
            "--",
            "sh",
            "-c",
            "echo ran $ETCD_COORD_FENCING_TOKEN",
        ],
    );
    assert_eq!(
        ours.line_within(Duration::from_secs(2)).await,
        None,
        "we wait for etcdctl"
    );
    theirs.signal("TERM");
    let token: i64 = ours
        .line()
        .await
        .trim_start_matches("ran ")
        .parse()
        .unwrap();
    assert!(
        token > holder_token,
        "{token} after etcdctl's {holder_token}"
    );
    assert_eq!(ours.exit_code(Duration::from_secs(10)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_shows_ours_gos_etcdctls_and_foreign_members_in_order_and_follows_them() {
    let etcd = etcd().await;
    let name = unique("mixed");
    let mut ours = coord(&etcd, &["lock", &name]);
    ours.line().await;
    ours.line().await;
    let Some(mut go) = go_peer(
        &etcd,
        &[
            "-mode",
            "lock-hold",
            "-name",
            &name,
            "-ttl",
            "30",
            "-hold",
            "0",
        ],
    ) else {
        return;
    };
    let count = |n: usize| {
        let (etcd, name) = (&etcd, &name);
        async move {
            eventually(Duration::from_secs(60), || async {
                lock_members(etcd, name).await.len() == n
            })
            .await
        }
    };
    assert!(count(2).await, "the Go peer queues behind us");
    let ctl = etcdctl(&etcd, &["lock", "--ttl", "10", &name]);
    assert!(count(3).await, "etcdctl queues behind the Go peer");
    etcdctl_output(&etcd, &["put", &format!("{name}/manual"), ""]).await;

    let state = inspect(&etcd, &name).await;
    let members = state["queues"][0]["members"].as_array().unwrap().clone();
    assert_eq!(state["queues"][0]["kind"], "mutex");
    let field = |i: usize, f: &str| members[i][f].clone();
    let clients: Vec<Value> = (0..4).map(|i| field(i, "client")).collect();
    assert_eq!(clients, ["ours", "go", "go", "foreign"], "{members:?}");
    let holds: Vec<Value> = (0..4).map(|i| field(i, "holds")).collect();
    assert_eq!(holds, [true, false, false, false]);
    // The Go peer's session has the TTL we gave it, etcdctl's its own: which is which.
    assert_eq!(field(1, "ttl_granted_s"), 30);
    assert_eq!(field(2, "ttl_granted_s"), 10);
    assert_eq!(field(3, "lease"), "0", "a key put by hand has no lease");
    assert_eq!(field(3, "ttl_granted_s"), Value::Null);
    let tokens: Vec<i64> = (0..4)
        .map(|i| field(i, "fencing_token").as_i64().unwrap())
        .collect();
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "in queue order: {tokens:?}"
    );
    for i in 0..3 {
        let key = field(i, "key");
        let lease = field(i, "lease");
        assert!(
            key.as_str().unwrap().contains(lease.as_str().unwrap()),
            "{key} is on lease {lease}"
        );
        let left = field(i, "ttl_remaining_s").as_u64().unwrap();
        assert!(left <= field(i, "ttl_granted_s").as_u64().unwrap());
    }
    let (code, simple) = coord_output(&etcd, &["inspect", &name]).await;
    assert_eq!(code, 0);
    assert_eq!(simple.matches("go/etcdctl").count(), 2, "{simple}");
    assert!(
        simple.lines().nth(1).unwrap().contains("holds  ours"),
        "{simple}"
    );

    // Following: when ours lets go, the Go peer holds.
    let mut follow = coord(&etcd, &["-w", "json", "inspect", &name, "--watch"]);
    let first: Value = serde_json::from_str(&follow.line().await).unwrap();
    assert_eq!(first["queues"][0]["members"].as_array().unwrap().len(), 4);
    ours.signal("TERM");
    let acquired = go.line().await;
    assert!(
        acquired.contains("\"acquired\""),
        "the Go peer acquires next: {acquired}"
    );
    let mut saw = false;
    while let Some(line) = follow.line_within(Duration::from_secs(10)).await {
        let state: Value = serde_json::from_str(&line).unwrap();
        let members = state["queues"][0]["members"].as_array().unwrap().clone();
        if members.len() == 3 && members[0]["client"] == "go" && members[0]["holds"] == true {
            saw = true;
            break;
        }
    }
    assert!(saw, "inspect --watch showed the hand-off to the Go peer");
    follow.signal("INT");
    assert_eq!(follow.exit_code(Duration::from_secs(10)).await, 0);
    go.signal("TERM");
    ctl.signal("TERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_lists_a_target_and_follows_its_changes() {
    let etcd = etcd().await;
    let target = unique("svc");
    let endpoint = |addr: &str| format!(r#"{{"Op":0,"Addr":"{addr}","Metadata":{{"zone":"a"}}}}"#);
    etcdctl_output(
        &etcd,
        &[
            "put",
            &format!("{target}/10.0.0.1:80"),
            &endpoint("10.0.0.1:80"),
        ],
    )
    .await;
    etcdctl_output(
        &etcd,
        &["put", &format!("{target}x/other"), &endpoint("10.9.9.9:80")],
    )
    .await;
    let (code, out) = coord_output(&etcd, &["services", &target]).await;
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        format!(r#"{target}/10.0.0.1:80 10.0.0.1:80 {{"zone":"a"}}"#)
    );

    let mut follow = coord(&etcd, &["-w", "json", "services", &target, "--watch"]);
    let line = |l: String| serde_json::from_str::<Value>(&l).unwrap();
    let first = line(follow.line().await);
    assert_eq!(
        (first["op"].as_str(), first["addr"].as_str()),
        (Some("add"), Some("10.0.0.1:80"))
    );
    etcdctl_output(
        &etcd,
        &[
            "put",
            &format!("{target}/10.0.0.2:80"),
            &endpoint("10.0.0.2:80"),
        ],
    )
    .await;
    let added = line(follow.line().await);
    assert_eq!(
        (added["op"].as_str(), added["addr"].as_str()),
        (Some("add"), Some("10.0.0.2:80"))
    );
    etcdctl_output(&etcd, &["del", &format!("{target}/10.0.0.1:80")]).await;
    let removed = line(follow.line().await);
    assert_eq!(removed["op"], "delete");
    assert_eq!(removed["key"], format!("{target}/10.0.0.1:80"));
    follow.signal("INT");
    assert_eq!(follow.exit_code(Duration::from_secs(10)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_shows_waiters_pointers_as_their_announcements_not_as_members() {
    let etcd = etcd().await;
    let name = unique("announced");
    // A nested name's keys fill the enqueue's first page (64 keys): the queue looks long, so
    // its waiters announce themselves instead of counting the short queue's deletions.
    let pad = etcd.client().await.unwrap();
    for i in 0..70 {
        pad.kv_client()
            .put(format!("{name}/pad/{i:03}"), "", None)
            .await
            .unwrap();
    }
    let mut holder = coord(&etcd, &["lock", &name]);
    holder.line().await;
    let mut waiters = Vec::new();
    for n in 2..=3 {
        waiters.push(coord(&etcd, &["lock", &name]));
        let pointers = n - 1;
        let settled = eventually(Duration::from_secs(30), || async {
            let keys = etcdctl_output(&etcd, &["get", "--prefix", "--keys-only", &name]).await;
            lock_members(&etcd, &name).await.len() == n
                && keys.matches("#next/").count() == pointers
        })
        .await;
        assert!(
            settled,
            "{n} members, {pointers} pointers: {}",
            etcdctl_output(&etcd, &["get", "--prefix", "--keys-only", &name]).await
        );
    }
    let keys = etcdctl_output(&etcd, &["get", "--prefix", "--keys-only", &name]).await;
    assert_eq!(
        keys.split_whitespace()
            .filter(|k| !k.contains("/pad/"))
            .count(),
        5,
        "3 members, 2 pointers: {keys}"
    );

    let state = inspect(&etcd, &name).await;
    assert_eq!(state["queues"].as_array().unwrap().len(), 1, "{state}");
    let members = state["queues"][0]["members"].as_array().unwrap().clone();
    assert_eq!(members.len(), 3, "{members:?}");
    for (i, m) in members.iter().enumerate() {
        assert_eq!(m["client"], "ours", "{m}");
        assert!(!m["key"].as_str().unwrap().contains("#next/"), "{m}");
        let behind = if i == 0 {
            Value::Null
        } else {
            members[i - 1]["key"].clone()
        };
        assert_eq!(m["announced_behind"], behind, "{m}");
    }
    let (code, simple) = coord_output(&etcd, &["inspect", &name]).await;
    assert_eq!(code, 0);
    assert!(!simple.contains("#next/"), "{simple}");
    assert!(!simple.contains("foreign"), "{simple}");
    assert_eq!(simple.matches("announced behind").count(), 2, "{simple}");
    assert_eq!(
        simple.lines().count(),
        4,
        "a header and 3 members: {simple}"
    );
    for mut p in waiters.into_iter().chain([holder]) {
        p.signal("TERM");
        p.exit_code(Duration::from_secs(10)).await;
    }
}
