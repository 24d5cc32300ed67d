//! Service registration and discovery on real etcd: registrations appear in views and vanish
//! with their registrants; views converge to the true set across resets, compaction and
//! malformed values; a tonic channel follows a view.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use etcd_client::{Client, GetOptions, PutOptions};
use etcd_coord::discovery::{
    Discovery, Endpoint, Registration, RegistrationState, ServiceView, SessionRegistration,
    ViewChange, ViewChanges,
};
use etcd_coord::{Error, LeasedSession, SessionOptions};
use etcd_coord_testkit::EtcdCluster;
use futures::StreamExt;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

fn ttl(secs: u64) -> SessionOptions {
    SessionOptions::new().with_ttl(Duration::from_secs(secs))
}

/// The next change of `changes` within `limit`.
async fn next_change(changes: &mut ViewChanges, limit: Duration) -> Option<ViewChange> {
    match tokio::time::timeout(limit, changes.next()).await {
        Ok(Some(Ok(change))) => Some(change),
        Ok(Some(Err(e))) => panic!("the view ended: {e}"),
        Ok(None) => panic!("the view's stream ended"),
        Err(_) => None,
    }
}

/// A registration of `addr` under `target` whose process handed its lease (of `ttl_secs`)
/// off, as one killed would leave it: its lease id and the key's create revision.
async fn handed_off(c: &Client, target: &str, addr: &str, ttl_secs: u64) -> (i64, i64) {
    let old = LeasedSession::new(c.clone(), ttl(ttl_secs)).await.unwrap();
    let held = SessionRegistration::register(&old, target, Endpoint::new(addr))
        .await
        .unwrap();
    let create_revision = held.fence().fencing_token();
    (old.orphan(), create_revision)
}

/// The true set under `<target>/`, read directly.
async fn truth(client: &Client, target: &str) -> BTreeMap<String, Endpoint> {
    Discovery::new(client.clone(), target)
        .list()
        .await
        .expect("a direct read")
}

/// Waits up to `limit` for `view` to equal the true set; returns whether it did.
async fn converges(view: &ServiceView, client: &Client, target: &str, limit: Duration) -> bool {
    eventually(limit, || async {
        view.endpoints() == truth(client, target).await
    })
    .await
}

async fn put(client: &Client, key: &str, value: &str) {
    client.clone().put(key, value, None).await.expect("put");
}

#[tokio::test]
async fn a_registration_is_seen_by_a_view_within_a_fraction_of_a_second() {
    let etcd = etcd().await;
    let target = unique("svc");
    let view = Discovery::new(client(&etcd).await, &target)
        .view()
        .await
        .unwrap();
    assert!(view.endpoints().is_empty());
    let mut changes = view.changes();
    let endpoint = Endpoint::new("10.0.0.1:50051").with_metadata(json!({"zone": "a"}));
    let sent = Instant::now();
    let registration =
        Registration::register(client(&etcd).await, &target, endpoint.clone(), ttl(5))
            .await
            .unwrap();
    let change = next_change(&mut changes, Duration::from_millis(500)).await;
    let key = format!("{target}/10.0.0.1:50051");
    assert_eq!(
        change,
        Some(ViewChange::Added {
            key: key.clone(),
            endpoint: endpoint.clone()
        }),
        "seen within 500 ms of the call"
    );
    eprintln!("registration seen after {:?}", sent.elapsed());
    assert_eq!(registration.key(), key);
    assert_eq!(view.endpoints(), BTreeMap::from([(key.clone(), endpoint)]));
    // What is stored is exactly Go's Update JSON, under the registration's lease.
    let stored = client(&etcd).await.get(key.as_str(), None).await.unwrap();
    let kv = &stored.kvs()[0];
    assert_eq!(
        kv.value_str().unwrap(),
        r#"{"Op":0,"Addr":"10.0.0.1:50051","Metadata":{"zone":"a"}}"#
    );
    let RegistrationState::Registered { lease_id, .. } = registration.state() else {
        panic!("not registered: {:?}", registration.state());
    };
    assert_eq!(kv.lease(), lease_id);
    registration.deregister().await.unwrap();
}

#[tokio::test]
async fn deregister_deletes_the_key_revokes_the_lease_and_the_view_sees_the_removal() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("svc");
    let view = Discovery::new(c.clone(), &target).view().await.unwrap();
    let registration = Registration::register(c.clone(), &target, Endpoint::new("h:1"), ttl(30))
        .await
        .unwrap();
    let RegistrationState::Registered { lease_id, .. } = registration.state() else {
        panic!("not registered");
    };
    assert!(view.changed().await.is_ok());
    assert_eq!(view.endpoints().len(), 1);
    let mut changes = view.changes();
    registration.deregister().await.unwrap();
    assert!(matches!(
        next_change(&mut changes, Duration::from_secs(1)).await,
        Some(ViewChange::Removed { .. })
    ));
    assert!(keys_under(&c, &format!("{target}/")).await.is_empty());
    assert!(!lease_exists(&c, lease_id).await, "the lease was revoked");
}

#[tokio::test]
async fn dropping_a_registration_deregisters_in_the_background() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("svc");
    let registration = Registration::register(c.clone(), &target, Endpoint::new("h:1"), ttl(30))
        .await
        .unwrap();
    let RegistrationState::Registered { lease_id, .. } = registration.state() else {
        panic!("not registered");
    };
    drop(registration);
    assert!(
        eventually(Duration::from_secs(2), || async {
            keys_under(&c, &format!("{target}/")).await.is_empty()
                && !lease_exists(&c, lease_id).await
        })
        .await,
        "key and lease gone long before the 30 s TTL"
    );
}

#[tokio::test]
async fn a_second_registration_of_a_key_is_refused_and_the_first_is_untouched() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("svc");
    let first = Registration::register(c.clone(), &target, Endpoint::new("h:1"), ttl(30))
        .await
        .unwrap();
    let before = c.clone().get(first.key(), None).await.unwrap().kvs()[0].clone();
    let second = Registration::register(
        c.clone(),
        &target,
        Endpoint::new("h:1").with_metadata(json!("other")),
        ttl(30),
    )
    .await;
    assert!(
        matches!(&second, Err(Error::AlreadyHeld { key }) if key == first.key()),
        "{second:?}"
    );
    // Also within one session: the same key twice is a conflict, not an alias.
    let session = session(&etcd, 30).await;
    let in_session = SessionRegistration::register(&session, &target, Endpoint::new("h:2"))
        .await
        .unwrap();
    let again = SessionRegistration::register(&session, &target, Endpoint::new("h:2")).await;
    assert!(matches!(again, Err(Error::AlreadyHeld { .. })), "{again:?}");
    let after = c.clone().get(first.key(), None).await.unwrap().kvs()[0].clone();
    assert_eq!(
        (after.value(), after.lease(), after.mod_revision()),
        (before.value(), before.lease(), before.mod_revision()),
        "the first registration's key is as it was"
    );
    assert_eq!(truth(&c, &target).await.len(), 2, "h:1 and h:2, each once");
    in_session.deregister().await.unwrap();
    first.deregister().await.unwrap();
    // Once `deregister` has returned, the key is free at once.
    let again = Registration::register(c.clone(), &target, Endpoint::new("h:1"), ttl(30))
        .await
        .expect("a deregistered key can be registered again at once");
    again.deregister().await.unwrap();
    session.close().await.unwrap();
}

#[tokio::test]
async fn update_changes_the_endpoint_and_is_fenced_on_the_key() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("svc");
    let view = Discovery::new(c.clone(), &target).view().await.unwrap();
    let registration = Registration::register(c.clone(), &target, Endpoint::new("h:1"), ttl(30))
        .await
        .unwrap();
    view.changed().await.unwrap();
    let mut changes = view.changes();
    let newer = Endpoint::new("h:1").with_metadata(json!({"weight": 2}));
    registration.update(newer.clone()).await.unwrap();
    assert_eq!(
        next_change(&mut changes, Duration::from_secs(1)).await,
        Some(ViewChange::Updated {
            key: registration.key().to_owned(),
            previous: Endpoint::new("h:1"),
            endpoint: newer.clone()
        })
    );
    // Bad input changes nothing.
    assert!(matches!(
        registration.update(Endpoint::new("")).await,
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(truth(&c, &target).await[registration.key()], newer);

    // A session registration whose key was deleted by someone else cannot write it back.
    let session = session(&etcd, 30).await;
    let in_session = SessionRegistration::register(&session, &target, Endpoint::new("h:2"))
        .await
        .unwrap();
    c.clone().delete(in_session.key(), None).await.unwrap();
    let res = in_session
        .update(Endpoint::new("h:2").with_metadata(json!(1)))
        .await;
    assert!(matches!(res, Err(Error::LockLost { .. })), "{res:?}");
    assert!(
        c.clone()
            .get(in_session.key(), None)
            .await
            .unwrap()
            .kvs()
            .is_empty(),
        "the fenced update did not re-create the key"
    );
    let lost = tokio::time::timeout(Duration::from_secs(2), in_session.lost()).await;
    assert!(matches!(lost, Ok(Error::LockLost { .. })), "{lost:?}");
    registration.deregister().await.unwrap();
    session.close().await.unwrap();
}

#[tokio::test]
async fn a_registration_whose_key_is_deleted_registers_again() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("svc");
    let registration = Registration::register(c.clone(), &target, Endpoint::new("h:1"), ttl(30))
        .await
        .unwrap();
    let mut states = registration.subscribe();
    c.clone().delete(registration.key(), None).await.unwrap();
    let again = tokio::time::timeout(
        Duration::from_secs(3),
        states.wait_for(|s| matches!(s, RegistrationState::Registered { generation: 2, .. })),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    assert!(again, "registered again: {:?}", registration.state());
    assert_eq!(registration.generation(), 2);
    assert_eq!(
        truth(&c, &target).await,
        BTreeMap::from([(registration.key().to_owned(), Endpoint::new("h:1"))])
    );
    registration.deregister().await.unwrap();
}

#[tokio::test]
async fn a_session_registration_ends_with_its_session_and_is_not_registered_again() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("svc");
    let session = session(&etcd, 30).await;
    let registration = SessionRegistration::register(&session, &target, Endpoint::new("h:1"))
        .await
        .unwrap();
    let lost = registration.lost();
    session.close().await.unwrap();
    let why = tokio::time::timeout(Duration::from_secs(2), lost).await;
    assert!(matches!(why, Ok(Error::SessionClosed)), "{why:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(truth(&c, &target).await.is_empty());
}

#[tokio::test]
async fn bad_input_is_refused_with_a_typed_error_and_nothing_is_stored() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("svc");
    let huge = Endpoint::new("h:1").with_metadata(json!("x".repeat(2 << 20)));
    for (t, e) in [
        ("", Endpoint::new("h:1")),
        ("svc/", Endpoint::new("h:1")),
        (target.as_str(), Endpoint::new("")),
        (target.as_str(), huge),
    ] {
        let res = Registration::register(c.clone(), t, e, ttl(5)).await;
        assert!(matches!(res, Err(Error::InvalidArgument(_))), "{res:?}");
    }
    let res = Registration::register(
        c.clone(),
        &target,
        Endpoint::new("h:1"),
        SessionOptions::new().with_ttl(Duration::ZERO),
    )
    .await;
    assert!(matches!(res, Err(Error::InvalidArgument(_))), "{res:?}");
    let res =
        Registration::register_with_suffix(c.clone(), &target, "", Endpoint::new("h:1"), ttl(5))
            .await;
    assert!(matches!(res, Err(Error::InvalidArgument(_))), "{res:?}");
    for bad in ["", "svc/"] {
        assert!(matches!(
            Discovery::new(c.clone(), bad).list().await,
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Discovery::new(c.clone(), bad).view().await,
            Err(Error::InvalidArgument(_))
        ));
    }
    assert!(keys_under(&c, &target).await.is_empty());
}

#[tokio::test]
async fn malformed_values_are_skipped_and_reported_and_never_end_the_view() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("svc");
    // Before the view: one bad value (seen by the first read) and one in etcd's docs' style.
    put(&c, &format!("{target}/bad-1"), "not json").await;
    put(&c, &format!("{target}/docs"), r#"{"Addr":"1.2.3.4"}"#).await;
    let view = Discovery::new(c.clone(), &target).view().await.unwrap();
    assert_eq!(
        view.endpoints(),
        BTreeMap::from([(format!("{target}/docs"), Endpoint::new("1.2.3.4"))])
    );
    assert_eq!(view.metrics().malformed, 1);
    assert!(view.malformed().contains_key(&format!("{target}/bad-1")));
    let mut changes = view.changes();
    // After it: bad values, then a good one; and the good one turned bad is removed.
    // An Op Go cannot decode into its uint8 (Go skips such a value too).
    put(&c, &format!("{target}/bad-2"), r#"{"Op":300,"Addr":"x"}"#).await;
    put(&c, &format!("{target}/bad-3"), "[]").await;
    put(
        &c,
        &format!("{target}/good"),
        r#"{"Op":0,"Addr":"5.6.7.8","Metadata":null}"#,
    )
    .await;
    assert_eq!(
        next_change(&mut changes, Duration::from_secs(1)).await,
        Some(ViewChange::Added {
            key: format!("{target}/good"),
            endpoint: Endpoint::new("5.6.7.8")
        })
    );
    put(&c, &format!("{target}/docs"), "{").await;
    assert_eq!(
        next_change(&mut changes, Duration::from_secs(1)).await,
        Some(ViewChange::Removed {
            key: format!("{target}/docs"),
            endpoint: Endpoint::new("1.2.3.4")
        })
    );
    assert_eq!(view.metrics().malformed, 4);
    assert_eq!(view.malformed().len(), 4);
    // A bad value fixed is an endpoint again, and no longer reported.
    put(&c, &format!("{target}/bad-1"), r#"{"Addr":"9.9.9.9"}"#).await;
    assert!(matches!(
        next_change(&mut changes, Duration::from_secs(1)).await,
        Some(ViewChange::Added { .. })
    ));
    assert!(!view.malformed().contains_key(&format!("{target}/bad-1")));
    assert_eq!(view.endpoints(), truth(&c, &target).await);
}

#[tokio::test]
async fn a_view_of_a_target_does_not_show_targets_that_merely_start_with_it() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("svc");
    put(&c, &format!("{target}2/x"), r#"{"Addr":"1.1.1.1"}"#).await;
    put(&c, &target, r#"{"Addr":"2.2.2.2"}"#).await;
    let view = Discovery::new(c.clone(), &target).view().await.unwrap();
    let mut changes = view.changes();
    put(&c, &format!("{target}2/y"), r#"{"Addr":"3.3.3.3"}"#).await;
    put(&c, &format!("{target}/z"), r#"{"Addr":"4.4.4.4"}"#).await;
    assert_eq!(
        next_change(&mut changes, Duration::from_secs(1)).await,
        Some(ViewChange::Added {
            key: format!("{target}/z"),
            endpoint: Endpoint::new("4.4.4.4")
        })
    );
    assert_eq!(view.endpoints().len(), 1);
    assert_eq!(truth(&c, &target).await.len(), 1);
}

#[tokio::test]
async fn a_view_through_a_proxy_that_keeps_resetting_converges_to_the_true_set() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let proxy = proxy(&etcd).await;
    let target = unique("svc");
    let view = Discovery::new(client_via(&proxy).await, &target)
        .view()
        .await
        .unwrap();
    let mut registrations = Vec::new();
    for round in 0..6 {
        proxy.reset_peer();
        for i in 0..5 {
            let addr = format!("10.0.{round}.{i}:80");
            registrations.push(
                Registration::register(c.clone(), &target, Endpoint::new(addr), ttl(30))
                    .await
                    .unwrap(),
            );
        }
        // Deregister every third, so the set both grows and shrinks between resets.
        let gone = registrations.remove(round % registrations.len());
        gone.deregister().await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(
        converges(&view, &c, &target, Duration::from_secs(5)).await,
        "view {} endpoints vs {} true",
        view.endpoints().len(),
        truth(&c, &target).await.len()
    );
    assert_eq!(view.endpoints().len(), 24);
}

#[tokio::test]
async fn a_view_cut_off_across_compaction_reads_again_and_reports_exactly_the_difference() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let proxy = proxy(&etcd).await;
    let target = unique("svc");
    let key = |s: &str| format!("{target}/{s}");
    for (k, a) in [
        ("keep", "1.0.0.1"),
        ("change", "1.0.0.2"),
        ("drop", "1.0.0.3"),
    ] {
        put(&c, &key(k), &Endpoint::new(a).to_json()).await;
    }
    let view = Discovery::new(client_via(&proxy).await, &target)
        .view()
        .await
        .unwrap();
    let mut changes = view.changes();
    proxy.down();
    put(&c, &key("change"), &Endpoint::new("2.0.0.2").to_json()).await;
    c.clone().delete(key("drop"), None).await.unwrap();
    put(&c, &key("new"), &Endpoint::new("2.0.0.4").to_json()).await;
    put(&c, &key("flash"), &Endpoint::new("2.0.0.5").to_json()).await;
    c.clone().delete(key("flash"), None).await.unwrap();
    etcd.compact().await.unwrap();
    proxy.heal();
    let mut seen = Vec::new();
    while let Some(change) = next_change(&mut changes, Duration::from_secs(5)).await {
        seen.push(change);
        if seen.len() == 3 {
            break;
        }
    }
    assert_eq!(
        seen,
        vec![
            ViewChange::Updated {
                key: key("change"),
                previous: Endpoint::new("1.0.0.2"),
                endpoint: Endpoint::new("2.0.0.2")
            },
            ViewChange::Removed {
                key: key("drop"),
                endpoint: Endpoint::new("1.0.0.3")
            },
            ViewChange::Added {
                key: key("new"),
                endpoint: Endpoint::new("2.0.0.4")
            },
        ],
        "exactly the difference: nothing for `keep`, nothing for `flash`"
    );
    assert!(view.metrics().resyncs >= 1, "{:?}", view.metrics());
    assert_eq!(
        next_change(&mut changes, Duration::from_millis(300)).await,
        None
    );
    assert_eq!(view.endpoints(), truth(&c, &target).await);
}

#[tokio::test]
async fn a_view_survives_the_loss_of_the_member_it_watches_through() {
    let mut cluster = EtcdCluster::start(3).await.expect("a 3-member cluster");
    let c = cluster.client().await.unwrap();
    let target = unique("svc");
    let view_client = Client::connect(
        cluster.endpoints(),
        Some(etcd_coord::recommended_connect_options()),
    )
    .await
    .unwrap();
    let view = Discovery::new(view_client, &target).view().await.unwrap();
    let mut registrations = Vec::new();
    for victim in 0..3 {
        cluster.kill(victim).unwrap();
        // The registrants (and the reads of the true set) talk to the members that are up.
        let up: Vec<String> = (0..3)
            .filter(|m| *m != victim)
            .map(|m| cluster.endpoint(m).unwrap())
            .collect();
        let c = Client::connect(up, Some(etcd_coord::recommended_connect_options()))
            .await
            .unwrap();
        for i in 0..3 {
            let addr = format!("10.{victim}.0.{i}:80");
            // A cluster that just lost a member may take a moment to answer: retry as a
            // service would.
            let mut attempts = 0;
            let registration = loop {
                attempts += 1;
                match Registration::register(c.clone(), &target, Endpoint::new(&addr), ttl(30))
                    .await
                {
                    Ok(r) => break r,
                    Err(e) if attempts < 20 => eprintln!("register {addr}: {e}; retrying"),
                    Err(e) => panic!("register {addr}: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            };
            registrations.push(registration);
        }
        // While the member is down the view follows through another one: it shows these
        // registrations before the member is back. (Over the three rounds, one of the
        // members killed is the one it watches through.) By now the cluster has answered the
        // registrations, so a view that moved has its watch again within one longest backoff
        // (1 s); the bound leaves room for that, and not for waiting out the outage.
        let started = Instant::now();
        assert!(
            converges(&view, &c, &target, Duration::from_secs(3)).await,
            "member {victim} down: the view shows {:?}",
            view.endpoints().keys().collect::<Vec<_>>()
        );
        assert_eq!(view.endpoints().len(), 3 * (victim + 1));
        eprintln!(
            "member {victim} down: the view caught up within {:?}",
            started.elapsed()
        );
        cluster.restart(victim).await.unwrap();
    }
    let reader = Client::connect(
        cluster.endpoints(),
        Some(etcd_coord::recommended_connect_options()),
    )
    .await
    .unwrap();
    drop(c);
    assert!(
        converges(&view, &reader, &target, Duration::from_secs(10)).await,
        "view {:?}",
        view.endpoints().keys().collect::<Vec<_>>()
    );
    assert_eq!(view.endpoints().len(), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_whose_watch_falls_silent_probes_it_and_re_opens_it() {
    // A watch stream that goes silent on a connection nothing closes (no HTTP/2 keep-alive
    // here, so nothing but the view's probe can notice): after 10 s of quiet the view asks for
    // a progress notification, and when none comes within 5 s it re-opens the watch — here
    // through the client's other endpoint — and catches up on what it missed. Opening a watch
    // is itself bounded (5 s), so an open sent down the frozen connection is tried again.
    init_tracing();
    let mut cluster = EtcdCluster::start(1).await.expect("etcd");
    let c = cluster.client().await.unwrap();
    let (a, b) = (
        etcd_coord_testkit::FaultProxy::start(cluster.endpoint(0).unwrap())
            .await
            .unwrap(),
        etcd_coord_testkit::FaultProxy::start(cluster.endpoint(0).unwrap())
            .await
            .unwrap(),
    );
    let (via_a, via_b) = (
        format!("http://{}", a.endpoint()),
        format!("http://{}", b.endpoint()),
    );
    let plain = etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
    let viewer = Client::connect([via_a.as_str()], Some(plain))
        .await
        .unwrap();
    let target = unique("svc");
    let registration = Registration::register(c.clone(), &target, Endpoint::new("h:1"), ttl(30))
        .await
        .unwrap();
    let view = Discovery::new(viewer.clone(), &target)
        .view()
        .await
        .unwrap();
    assert!(converges(&view, &c, &target, Duration::from_secs(5)).await);
    // The view's stream now runs through A. Freeze A (nothing closed) and offer B beside it
    // for new streams. (A stays in the client: removing it may close its connection, which
    // the view would notice at once, and the probe would go untested.)
    viewer.add_endpoint(via_b.as_str()).await.unwrap();
    a.blackhole();
    let silent_since = Instant::now();
    registration.deregister().await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        view.endpoints().len(),
        1,
        "the frozen stream delivered (the test would not test the probe)"
    );
    assert!(
        // ~15 s, plus 5 s per re-open that the client's balancer sends to A again (each
        // time with even odds against B).
        converges(&view, &c, &target, Duration::from_secs(75)).await,
        "the silent watch was never re-opened: {:?}",
        view.endpoints()
    );
    let took = silent_since.elapsed();
    assert!(view.endpoints().is_empty());
    eprintln!("a silent view caught up after {took:?}");
    a.heal();
    cluster.kill(0).unwrap();
}

#[tokio::test]
async fn dropping_register_at_any_point_leaves_no_key_and_no_lease() {
    let mut cluster = EtcdCluster::start(1).await.expect("etcd");
    let c = cluster.client().await.unwrap();
    let proxy = etcd_coord_testkit::FaultProxy::start(cluster.endpoint(0).unwrap())
        .await
        .unwrap();
    let via = client_via(&proxy).await;
    let target = unique("svc");
    // Dropped at every await point it reaches (`drive`: after 0, 1, 2, … polls, with what it
    // awaits in flight and once that has happened): before, during and after the grant and
    // the put. Each attempt has a key of its own: a dropped attempt's key goes in the
    // background, and until it has gone, registering that key again is (rightly)
    // `AlreadyHeld`. Nothing may be left once the background work is done: no key, no lease.
    let mut attempt = 0;
    let ended = drop_at_every_await(
        || {
            attempt += 1;
            let endpoint = Endpoint::new(format!("h:{attempt}"));
            Registration::register(via.clone(), &target, endpoint, ttl(30))
        },
        async |driven, step| {
            if let Driven::Completed(got) = driven {
                drop(got.unwrap()); // deregisters in the background
            }
            assert!(
                eventually(Duration::from_secs(5), || async {
                    keys_under(&c, &format!("{target}/")).await.is_empty()
                        && matches!(c.clone().leases().await, Ok(l) if l.leases().is_empty())
                })
                .await,
                "dropped at {step:?}: keys {:?}, leases {:?}",
                keys_under(&c, &format!("{target}/")).await,
                c.clone().leases().await.map(|l| l.leases().len()),
            );
        },
    )
    .await;
    assert!(
        matches!(ended, Ended::Completed { polls } if polls >= 2),
        "{ended:?}"
    );
    // And while etcd is unreachable: the requests never arrive.
    proxy.blackhole();
    let register =
        Registration::register(via.clone(), &target, Endpoint::new("h:blackholed"), ttl(30));
    assert!(tokio::time::timeout(Duration::from_millis(300), register)
        .await
        .is_err());
    proxy.heal();
    proxy.reset_peer();
    assert!(
        eventually(Duration::from_secs(5), || async {
            keys_under(&c, &format!("{target}/")).await.is_empty()
                && matches!(c.clone().leases().await, Ok(l) if l.leases().is_empty())
        })
        .await,
        "keys {:?}, leases {:?}",
        keys_under(&c, &format!("{target}/")).await,
        c.clone().leases().await.map(|l| l.leases().len())
    );
    cluster.kill(0).unwrap();
}

/// The registrant of the SIGKILL test, run as a process of this test binary.
const REGISTRANT_ENV: &str = "ETCD_COORD_TEST_REGISTRANT";

#[test]
#[ignore = "the entry point of a registrant process, started by a test"]
fn registrant_process() {
    let Ok(spec) = std::env::var(REGISTRANT_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split(' ').collect();
    let (endpoint, target, addr, ttl_secs) = (parts[0], parts[1], parts[2], parts[3]);
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let c = Client::connect([endpoint], Some(etcd_coord::recommended_connect_options()))
            .await
            .unwrap();
        let registration = Registration::register(
            c,
            target,
            Endpoint::new(addr),
            ttl(ttl_secs.parse().unwrap()),
        )
        .await
        .unwrap();
        let RegistrationState::Registered { lease_id, .. } = registration.state() else {
            panic!("registered but {:?}", registration.state());
        };
        println!("registered {} {lease_id}", registration.key());
        std::future::pending::<()>().await;
    });
}

/// A registrant process of `addr` under `target` with a TTL of `ttl_secs`, once it has
/// registered, and the lease id it reported.
async fn registrant(
    etcd: &etcd_coord_testkit::TestEtcd,
    target: &str,
    addr: &str,
    ttl_secs: u64,
) -> (tokio::process::Child, i64) {
    let mut child = tokio::process::Command::new("/proc/self/exe")
        .args(["registrant_process", "--exact", "--ignored", "--nocapture"])
        .env(
            REGISTRANT_ENV,
            format!("{} {target} {addr} {ttl_secs}", etcd.endpoints()[0]),
        )
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("a registrant process");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("the registrant registers")
            .unwrap()
            .expect("the registrant's output");
        if let Some(reported) = line.strip_prefix("registered ") {
            let lease_id = reported.split(' ').nth(1).expect("a lease id");
            return (child, lease_id.parse().unwrap());
        }
    }
}

#[tokio::test]
async fn a_registrant_killed_with_sigkill_disappears_after_its_ttl() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("svc");
    let view = Discovery::new(c.clone(), &target).view().await.unwrap();
    let ttl_secs = 3;
    let (mut child, _) = registrant(&etcd, &target, "10.9.9.9:80", ttl_secs).await;
    assert!(
        eventually(Duration::from_secs(1), || async {
            view.endpoints().len() == 1
        })
        .await
    );
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let killed = Instant::now();
    let mut changes = view.changes();
    let removed = next_change(&mut changes, Duration::from_secs(ttl_secs + 2)).await;
    assert!(
        matches!(removed, Some(ViewChange::Removed { .. })),
        "gone within TTL + 2 s: {removed:?}"
    );
    let after = killed.elapsed();
    eprintln!("the killed registrant's endpoint vanished after {after:?}");
    assert!(
        after >= Duration::from_secs(ttl_secs) / 2,
        "gone by its lease's expiry, not by anything else ({after:?})"
    );
    assert!(truth(&c, &target).await.is_empty());
}

#[tokio::test]
async fn a_blackholed_registrant_disappears_after_its_ttl_and_registers_again_after_the_heal() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let proxy = proxy(&etcd).await;
    let target = unique("svc");
    let view = Discovery::new(c.clone(), &target).view().await.unwrap();
    let registration = Registration::register(
        client_via(&proxy).await,
        &target,
        Endpoint::new("10.1.1.1:80"),
        ttl(2),
    )
    .await
    .unwrap();
    assert!(
        eventually(Duration::from_secs(1), || async {
            view.endpoints().len() == 1
        })
        .await
    );
    let mut changes = view.changes();
    let mut states = registration.subscribe();
    proxy.blackhole();
    assert!(matches!(
        next_change(&mut changes, Duration::from_secs(5)).await,
        Some(ViewChange::Removed { .. })
    ));
    assert!(
        tokio::time::timeout(
            Duration::from_secs(5),
            states.wait_for(|s| matches!(s, RegistrationState::Reregistering { .. }))
        )
        .await
        .is_ok(),
        "the registration says it is registering again: {:?}",
        registration.state()
    );
    proxy.heal();
    proxy.reset_peer();
    assert!(
        matches!(
            next_change(&mut changes, Duration::from_secs(10)).await,
            Some(ViewChange::Added { .. })
        ),
        "registered again after the heal: {:?}",
        registration.state()
    );
    // The key can be seen before the registration's own answer arrives.
    tokio::time::timeout(Duration::from_secs(2), registration.registered())
        .await
        .expect("registered");
    assert!(matches!(
        registration.state(),
        RegistrationState::Registered { generation: 2, .. }
    ));
    assert_eq!(truth(&c, &target).await.len(), 1, "exactly one key");
    registration.deregister().await.unwrap();
}

#[tokio::test]
async fn keys_registered_by_go_style_puts_with_leases_are_endpoints_too() {
    // A value written by hand under a lease (as Go's Manager does) is read like ours.
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("svc");
    let lease = c.clone().lease_grant(30, None).await.unwrap().id();
    c.clone()
        .put(
            format!("{target}/g"),
            r#"{"Op":0,"Addr":"7.7.7.7:1","Metadata":{"a":[1,2]}}"#,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    let listed = Discovery::new(c.clone(), &target).list().await.unwrap();
    assert_eq!(
        listed[&format!("{target}/g")],
        Endpoint::new("7.7.7.7:1").with_metadata(json!({"a": [1, 2]}))
    );
    c.clone().lease_revoke(lease).await.unwrap();
    let after = c
        .clone()
        .get(format!("{target}/"), Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(after.kvs().is_empty());
}

#[tokio::test]
async fn list_reads_many_endpoints_in_pages_at_one_revision() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("svc");
    let mut txn_ops = Vec::new();
    for i in 0..2500 {
        txn_ops.push(etcd_client::TxnOp::put(
            format!("{target}/{i:05}"),
            Endpoint::new(format!("10.0.{}.{}:80", i / 256, i % 256)).to_json(),
            None,
        ));
        if txn_ops.len() == 100 {
            c.clone()
                .txn(etcd_client::Txn::new().and_then(std::mem::take(&mut txn_ops)))
                .await
                .unwrap();
        }
    }
    let listed = Discovery::new(c.clone(), &target).list().await.unwrap();
    assert_eq!(listed.len(), 2500);
    let view = Discovery::new(c.clone(), &target).view().await.unwrap();
    assert_eq!(view.endpoints(), listed);
}

#[cfg(feature = "tonic")]
/// gRPC servers (tonic-health) that tag every response with their index in an `x-server`
/// header, so a client can tell which one answered.
mod grpc {
    use std::net::SocketAddr;

    use tonic::codegen::http;
    use tonic::transport::server::TcpIncoming;
    use tonic::transport::Server;

    pub async fn serve(index: usize) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = incoming.local_addr().unwrap();
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let tag = move |mut resp: http::Response<tonic::body::Body>| {
            resp.headers_mut().insert(
                "x-server",
                http::HeaderValue::from_str(&index.to_string()).unwrap(),
            );
            resp
        };
        let task = tokio::spawn(async move {
            let _keep = reporter;
            Server::builder()
                .layer(tower::util::MapResponseLayer::new(tag))
                .add_service(health)
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
        (addr, task)
    }

    /// One health check through `channel`: the index of the server that answered.
    pub async fn call(channel: &tonic::transport::Channel) -> Option<usize> {
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let resp = client
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()?;
        resp.metadata().get("x-server")?.to_str().ok()?.parse().ok()
    }
}

#[cfg(feature = "tonic")]
#[tokio::test]
async fn a_balanced_channel_spreads_calls_and_stops_reaching_a_deregistered_server_within_a_second()
{
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("grpc");
    let mut servers = Vec::new();
    let mut registrations = Vec::new();
    for i in 0..3 {
        let (addr, task) = grpc::serve(i).await;
        servers.push(task);
        registrations.push(
            Registration::register(c.clone(), &target, Endpoint::new(addr.to_string()), ttl(10))
                .await
                .unwrap(),
        );
    }
    let view = Discovery::new(c.clone(), &target).view().await.unwrap();
    let channel = etcd_coord::discovery::balanced_channel(view, |e| {
        Ok(etcd_coord::discovery::default_tonic_endpoint(e)?
            .connect_timeout(Duration::from_secs(1)))
    });
    let mut hits = [0usize; 3];
    let deadline = Instant::now() + Duration::from_secs(10);
    while hits.iter().any(|&h| h < 5) && Instant::now() < deadline {
        if let Some(i) = grpc::call(&channel).await {
            hits[i] += 1;
        }
    }
    assert!(
        hits.iter().all(|&h| h >= 5),
        "calls spread over all three: {hits:?}"
    );
    // Server 1 leaves (it keeps running: only its registration goes).
    let leaving = registrations.remove(1);
    leaving.deregister().await.unwrap();
    let deregistered = Instant::now();
    let mut since_last_hit = 0;
    let mut last_hit = None;
    while since_last_hit < 50 {
        match grpc::call(&channel).await {
            Some(1) => {
                last_hit = Some(deregistered.elapsed());
                since_last_hit = 0;
            }
            Some(_) => since_last_hit += 1,
            None => {}
        }
        assert!(deregistered.elapsed() < Duration::from_secs(5));
    }
    eprintln!("server 1 last reached {last_hit:?} after its deregistration");
    assert!(
        last_hit.unwrap_or_default() < Duration::from_secs(1),
        "no call reached server 1 later than a second after it deregistered ({last_hit:?})"
    );
    for s in servers {
        s.abort();
    }
}

#[tokio::test]
async fn a_registrant_restarted_within_its_ttl_resumes_its_registration_and_views_see_no_change() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("svc");
    let addr = "10.9.9.10:80";
    let view = Discovery::new(c.clone(), &target).view().await.unwrap();
    let ttl_secs = 3;
    let (mut child, lease_id) = registrant(&etcd, &target, addr, ttl_secs).await;
    assert!(
        eventually(Duration::from_secs(1), || async {
            view.endpoints().len() == 1
        })
        .await
    );
    let key = format!("{target}/{addr}");
    let created = c.clone().get(key.as_str(), None).await.unwrap().kvs()[0].create_revision();
    let mut changes = view.changes();
    child.start_kill().unwrap();
    child.wait().await.unwrap();

    // The restarted process without its lease id: the dead one's key is in the way.
    let fresh =
        Registration::register(c.clone(), &target, Endpoint::new(addr), ttl(ttl_secs)).await;
    assert!(matches!(fresh, Err(Error::AlreadyHeld { .. })), "{fresh:?}");
    // With it: the same key, the same lease, the same create revision.
    let resumed = Registration::resume(
        c.clone(),
        &target,
        Endpoint::new(addr),
        lease_id,
        ttl(ttl_secs),
    )
    .await
    .unwrap();
    assert_eq!(resumed.key(), key);
    assert!(
        matches!(resumed.state(), RegistrationState::Registered { lease_id: l, create_revision, generation: 1 }
            if l == lease_id && create_revision == created),
        "{:?}",
        resumed.state()
    );
    // Kept alive past the dead process's TTL, and the view saw nothing at all happen.
    let change = next_change(&mut changes, Duration::from_secs(ttl_secs + 2)).await;
    assert!(change.is_none(), "the view saw {change:?}");
    assert_eq!(truth(&c, &target).await.len(), 1);
    assert_eq!(
        c.clone().get(key.as_str(), None).await.unwrap().kvs()[0].create_revision(),
        created
    );
    resumed.deregister().await.unwrap();
    let removed = next_change(&mut changes, Duration::from_secs(5)).await;
    assert!(
        matches!(removed, Some(ViewChange::Removed { .. })),
        "{removed:?}"
    );
    assert!(!lease_exists(&c, lease_id).await);
}

#[tokio::test]
async fn resuming_a_registration_checks_the_lease_and_the_key_and_writes_a_changed_endpoint() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("svc");
    let view = Discovery::new(c.clone(), &target).view().await.unwrap();
    let (lease_id, _) = handed_off(&c, &target, "h:1", 10).await;
    assert!(
        eventually(Duration::from_secs(1), || async {
            view.endpoints().len() == 1
        })
        .await
    );
    let mut changes = view.changes();

    // A live lease that does not carry the key: refused, and that lease is left alone.
    let other = LeasedSession::new(c.clone(), ttl(10)).await.unwrap();
    let wrong = Registration::resume(
        c.clone(),
        &target,
        Endpoint::new("h:1"),
        other.lease_id(),
        ttl(10),
    )
    .await;
    assert!(
        matches!(&wrong, Err(Error::NotOnLease { lease_id, .. }) if *lease_id == other.lease_id()),
        "{wrong:?}"
    );
    assert!(lease_exists(&c, other.lease_id()).await);
    assert_eq!(other.state(), etcd_coord::SessionState::Alive);
    // Another key on the right lease: refused, and the lease (with its key) is left alone.
    let other_key =
        Registration::resume(c.clone(), &target, Endpoint::new("h:2"), lease_id, ttl(10)).await;
    assert!(
        matches!(&other_key, Err(Error::NotOnLease { .. })),
        "{other_key:?}"
    );
    assert!(lease_exists(&c, lease_id).await);

    // The right one, with new metadata: written in place, a single Updated.
    let endpoint = Endpoint::new("h:1").with_metadata(json!({"weight": 2}));
    let resumed = Registration::resume(c.clone(), &target, endpoint.clone(), lease_id, ttl(10))
        .await
        .unwrap();
    let updated = next_change(&mut changes, Duration::from_secs(5)).await;
    assert!(
        matches!(&updated, Some(ViewChange::Updated { endpoint: e, .. }) if *e == endpoint),
        "{updated:?}"
    );
    assert!(next_change(&mut changes, Duration::from_millis(500))
        .await
        .is_none());

    // Dropped: deregistered in the background like any registration; the lease is gone.
    drop(resumed);
    assert!(
        eventually(Duration::from_secs(5), || async {
            !lease_exists(&c, lease_id).await && truth(&c, &target).await.is_empty()
        })
        .await
    );
    let gone =
        Registration::resume(c.clone(), &target, Endpoint::new("h:1"), lease_id, ttl(10)).await;
    assert!(
        matches!(gone, Err(Error::LeaseNotFound(id)) if id == lease_id),
        "{gone:?}"
    );
    assert!(truth(&c, &target).await.is_empty());
    other.close().await.unwrap();
}

#[tokio::test]
async fn dropping_resume_ends_what_it_adopted_and_leaves_alone_what_it_did_not() {
    let mut cluster = EtcdCluster::start(1).await.expect("etcd");
    let c = cluster.client().await.unwrap();
    let proxy = etcd_coord_testkit::FaultProxy::start(cluster.endpoint(0).unwrap())
        .await
        .unwrap();
    let via = client_via(&proxy).await;
    let target = unique("svc");
    // Dropped at every await point it reaches (`drive`): never polled, during the adoption of
    // the lease, the read of the key and after. Each attempt has a key (and a lease) of its
    // own. Never polled, it leaves them as they were; polled once, the adoption runs in a task
    // of its own, and what it adopted ends like a dropped registration.
    let mut ended = None;
    for step in drop_points() {
        let addr = format!("h:{}-{:?}", step.polls, step.at);
        let key = format!("{target}/{addr}");
        let (lease_id, token) = handed_off(&c, &target, &addr, 30).await;
        let resume = Registration::resume(
            via.clone(),
            &target,
            Endpoint::new(&addr),
            lease_id,
            ttl(30),
        );
        let driven = drive(resume, step.polls, step.at).await;
        let what = format!("dropped at {step:?}: {driven:?}");
        ended = driven.ended(step);
        if let Driven::Completed(got) = driven {
            drop(got.unwrap()); // deregisters in the background
        }
        if step.polls == 0 {
            let left = c.clone().get(key.as_str(), None).await.unwrap();
            assert_eq!(left.kvs().len(), 1, "{what}: the untouched key");
            assert_eq!(left.kvs()[0].create_revision(), token, "{what}");
            assert_eq!(left.kvs()[0].lease(), lease_id, "{what}");
            c.clone().lease_revoke(lease_id).await.unwrap();
        }
        assert!(
            eventually(Duration::from_secs(5), || async {
                keys_under(&c, &format!("{target}/")).await.is_empty()
                    && !lease_exists(&c, lease_id).await
            })
            .await,
            "{what}: keys {:?}, lease alive: {}",
            keys_under(&c, &format!("{target}/")).await,
            lease_exists(&c, lease_id).await
        );
        if ended.is_some() {
            break;
        }
    }
    assert!(
        matches!(ended, Some(Ended::Completed { polls }) if polls >= 1),
        "{ended:?}"
    );
    // And while etcd is unreachable: the adoption never completes (its request times out
    // after 1 s), so the registration is left exactly as it was, for its TTL.
    let (lease_id, _) = handed_off(&c, &target, "h:blackholed", 30).await;
    proxy.blackhole();
    let resume = Registration::resume(
        via.clone(),
        &target,
        Endpoint::new("h:blackholed"),
        lease_id,
        ttl(30).with_request_timeout(Duration::from_secs(1)),
    );
    assert!(tokio::time::timeout(Duration::from_millis(300), resume)
        .await
        .is_err());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.heal();
    proxy.reset_peer();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left = c
        .clone()
        .get(format!("{target}/h:blackholed"), None)
        .await
        .unwrap();
    assert_eq!(left.kvs().len(), 1, "the untouched registration's key");
    assert_eq!(left.kvs()[0].lease(), lease_id);
    c.clone().lease_revoke(lease_id).await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            keys_under(&c, &format!("{target}/")).await.is_empty()
                && matches!(c.clone().leases().await, Ok(l) if l.leases().is_empty())
        })
        .await,
        "keys {:?}, leases {:?}",
        keys_under(&c, &format!("{target}/")).await,
        c.clone().leases().await.map(|l| l.leases().len())
    );
    cluster.kill(0).unwrap();
}

#[tokio::test]
async fn a_session_registration_is_resumed_on_a_resumed_session_with_its_create_revision() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("svc");
    let view = Discovery::new(c.clone(), &target).view().await.unwrap();
    let (lease_id, token) = handed_off(&c, &target, "h:1", 10).await;
    assert!(
        eventually(Duration::from_secs(1), || async {
            view.endpoints().len() == 1
        })
        .await
    );
    let mut changes = view.changes();

    let session = LeasedSession::resume(c.clone(), lease_id, ttl(10))
        .await
        .unwrap();
    let other = SessionRegistration::resume(&session, &target, Endpoint::new("h:2")).await;
    assert!(
        matches!(&other, Err(Error::NotOnLease { lease_id: l, .. }) if *l == lease_id),
        "{other:?}"
    );
    let registered = SessionRegistration::resume(&session, &target, Endpoint::new("h:1"))
        .await
        .unwrap();
    assert_eq!(registered.fence().fencing_token(), token);
    assert!(next_change(&mut changes, Duration::from_millis(500))
        .await
        .is_none());
    // It is the session's now: dropping it deletes the key, the session lives on.
    drop(registered);
    let removed = next_change(&mut changes, Duration::from_secs(5)).await;
    assert!(
        matches!(removed, Some(ViewChange::Removed { .. })),
        "{removed:?}"
    );
    assert_eq!(session.state(), etcd_coord::SessionState::Alive);
    session.close().await.unwrap();
}

#[tokio::test]
async fn dropping_a_session_registration_resume_leaves_the_key_as_it_was_or_deletes_it() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("svc");
    // Dropped at every await point it reaches (`drive`): before, during and after the read and
    // the write.
    let mut ended = None;
    for step in drop_points() {
        let addr = format!("h:{}-{:?}", step.polls, step.at);
        let (lease_id, token) = handed_off(&c, &target, &addr, 30).await;
        let key = format!("{target}/{addr}");
        let before = c.clone().get(key.as_str(), None).await.unwrap().kvs()[0]
            .value()
            .to_vec();
        let session = LeasedSession::resume(c.clone(), lease_id, ttl(30))
            .await
            .unwrap();
        // A changed endpoint, so that the resumption also writes.
        let endpoint = Endpoint::new(&addr).with_metadata(json!({"v": 2}));
        let resume = SessionRegistration::resume(&session, &target, endpoint);
        let driven = drive(resume, step.polls, step.at).await;
        let what = format!("dropped at {step:?}: {driven:?}");
        ended = driven.ended(step);
        drop(driven); // a registration it took deletes its key
                      // Once the session's clean-ups are done, and a while later (no write of the dropped
                      // resumption may land late): either untouched (the same key, value and create
                      // revision, on the lease) or deleted by the dropped registration's fenced release;
                      // never written and left behind.
        session.settled().await;
        only_its_own_task_runs(&session).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let kvs = c.clone().get(key.as_str(), None).await.unwrap();
        let as_it_was_or_gone = match kvs.kvs() {
            [] => true,
            [kv] => {
                kv.create_revision() == token
                    && kv.lease() == lease_id
                    && kv.value() == before.as_slice()
            }
            _ => false,
        };
        assert!(as_it_was_or_gone, "{what}: {:?}", kvs.kvs());
        if ended.is_some() {
            assert!(kvs.kvs().is_empty(), "{what}: its registration was dropped");
        }
        assert_eq!(session.state(), etcd_coord::SessionState::Alive);
        session.close().await.unwrap();
        if ended.is_some() {
            break;
        }
    }
    assert!(
        matches!(ended, Some(Ended::Completed { polls }) if polls >= 2),
        "{ended:?}"
    );
    assert!(truth(&c, &target).await.is_empty());
}

/// One Txn registering three endpoints (as Go's `endpoints.Manager.Update` with several
/// additions does) is one revision of three events: a view shows all three at once, with no
/// later write needed to bring them.
#[tokio::test]
async fn a_view_shows_every_endpoint_one_txn_registers_at_once() {
    use etcd_client::{Txn, TxnOp};
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("one-txn");
    let view = Discovery::new(c.clone(), &target).view().await.unwrap();
    let puts: Vec<TxnOp> = (1..=3)
        .map(|i| {
            let addr = format!("10.0.0.{i}:80");
            TxnOp::put(
                format!("{target}/{addr}"),
                Endpoint::new(addr).to_json(),
                None,
            )
        })
        .collect();
    c.clone().txn(Txn::new().and_then(puts)).await.unwrap();
    assert!(
        converges(&view, &c, &target, Duration::from_secs(2)).await,
        "the view shows {:?}",
        view.endpoints().keys().collect::<Vec<_>>()
    );
    assert_eq!(view.endpoints().len(), 3);
}

/// Three endpoints on one lease vanish together when the lease is revoked (or expires): one
/// revision of three deletions. A view drops all three at once.
#[tokio::test]
async fn a_view_drops_every_endpoint_of_a_lease_that_ends() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("one-lease");
    let lease = c.clone().lease_grant(30, None).await.unwrap().id();
    for i in 1..=3 {
        let addr = format!("10.0.0.{i}:80");
        c.clone()
            .put(
                format!("{target}/{addr}"),
                Endpoint::new(addr).to_json(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .unwrap();
    }
    let view = Discovery::new(c.clone(), &target).view().await.unwrap();
    assert_eq!(view.endpoints().len(), 3);
    c.clone().lease_revoke(lease).await.unwrap();
    assert!(
        converges(&view, &c, &target, Duration::from_secs(2)).await,
        "after the lease ended the view still shows {:?}",
        view.endpoints().keys().collect::<Vec<_>>()
    );
    assert!(view.endpoints().is_empty());
}

/// A session registration of `addr` on `session` (through `proxy`) whose put's answer was
/// lost, so that it was sent more than once: the put lands, the answers are dropped for
/// 700 ms, then the link heals and the retry confirms it.
async fn registered_with_a_retried_put(
    session: &LeasedSession,
    proxy: &etcd_coord_testkit::FaultProxy,
    observer: &Client,
    target: &str,
    endpoint: Endpoint,
) -> SessionRegistration {
    proxy.drop_responses();
    let registering = {
        let (session, target, endpoint) = (session.clone(), target.to_owned(), endpoint.clone());
        tokio::spawn(
            async move { SessionRegistration::register(&session, &target, endpoint).await },
        )
    };
    let prefix = format!("{target}/");
    assert!(
        eventually(Duration::from_secs(5), || async {
            keys_under(observer, &prefix).await.len() == 1
        })
        .await,
        "the first put never landed"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    proxy.heal();
    proxy.reset_peer();
    tokio::time::timeout(Duration::from_secs(10), registering)
        .await
        .expect("the retried registration completes")
        .unwrap()
        .expect("the retry recognises its own put")
}

/// The key's (value, lease), or `None` if it is absent.
async fn stored(c: &Client, key: &str) -> Option<(String, i64)> {
    let resp = c.clone().get(key, None).await.unwrap();
    resp.kvs()
        .first()
        .map(|kv| (kv.value_str().unwrap().to_owned(), kv.lease()))
}

/// A put sent more than once leaves a sweep of its late copies behind; the same endpoint
/// registered again on that session must not be taken for one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_registered_again_on_a_session_whose_earlier_put_was_retried_stays() {
    let etcd = etcd().await;
    let proxy = proxy(&etcd).await;
    let mut admin = client(&etcd).await;
    let target = unique("svc");
    let session =
        session_via_timing_out(&proxy, Duration::from_secs(30), Duration::from_millis(500)).await;
    let endpoint = Endpoint::new("10.3.0.1:80");
    let first =
        registered_with_a_retried_put(&session, &proxy, &admin, &target, endpoint.clone()).await;
    let key = first.key().to_owned();
    first.deregister().await.unwrap();
    session.settled().await;

    let again = SessionRegistration::register(&session, &target, endpoint.clone())
        .await
        .expect("registered again");
    session.settled().await;
    let lost = again.lost();
    tokio::pin!(lost);
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut lost)
            .await
            .is_err(),
        "the new registration was lost: {:?}",
        stored(&admin, &key).await
    );
    assert_eq!(
        stored(&admin, &key).await,
        Some((endpoint.to_json(), session.lease_id())),
        "the new registration's key is there, on the session's lease"
    );
    again.deregister().await.unwrap();

    // Late copies of the first put are still swept once the name is free again.
    let duplicate = etcd_client::Txn::new()
        .when([etcd_client::Compare::create_revision(
            key.as_str(),
            etcd_client::CompareOp::Equal,
            0,
        )])
        .and_then([etcd_client::TxnOp::put(
            key.as_str(),
            endpoint.to_json(),
            Some(PutOptions::new().with_lease(session.lease_id())),
        )]);
    assert!(admin.txn(duplicate).await.unwrap().succeeded());
    assert!(
        eventually(Duration::from_secs(5), || async {
            stored(&admin, &key).await.is_none()
        })
        .await,
        "a late copy of the retried put stays under the live lease"
    );
    session.close().await.unwrap();
}

/// Two `register` calls for one endpoint on one session, at the same time: one registers,
/// the other is `AlreadyHeld` — never two registrations sharing one key.
#[tokio::test]
async fn concurrent_registrations_of_one_endpoint_on_one_session_are_one_registration() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("svc");
    let session = session(&etcd, 30).await;
    for round in 0..5 {
        let endpoint = Endpoint::new(format!("10.4.0.{round}:80"));
        let (a, b) = tokio::join!(
            SessionRegistration::register(&session, &target, endpoint.clone()),
            SessionRegistration::register(&session, &target, endpoint.clone()),
        );
        let (held, refused) = match (a, b) {
            (Ok(held), Err(refused)) | (Err(refused), Ok(held)) => (held, refused),
            (a, b) => panic!("round {round}: {a:?} and {b:?}"),
        };
        assert!(
            matches!(&refused, Error::AlreadyHeld { key } if key == held.key()),
            "round {round}: {refused:?}"
        );
        held.deregister().await.unwrap();
        assert!(truth(&c, &target).await.is_empty());
    }
    session.close().await.unwrap();
}

/// Another client's plain put of our key (Go's `AddEndpoint`, `etcdctl put`) keeps its create
/// revision but takes it over: the registration sees the loss, and neither its `update` nor
/// its `deregister` touches the other's key.
#[tokio::test]
async fn a_registration_whose_key_another_client_put_sees_the_loss_and_leaves_that_key_alone() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let target = unique("svc");

    // Within a session: the other client puts under a lease of its own.
    let session = session(&etcd, 30).await;
    let in_session = SessionRegistration::register(&session, &target, Endpoint::new("h:1"))
        .await
        .unwrap();
    let token = in_session.fence().fencing_token();
    let lost = in_session.lost();
    let theirs = c.clone().lease_grant(30, None).await.unwrap().id();
    let their_value = Endpoint::new("h:1")
        .with_metadata(json!("theirs"))
        .to_json();
    c.clone()
        .put(
            in_session.key(),
            their_value.as_str(),
            Some(PutOptions::new().with_lease(theirs)),
        )
        .await
        .unwrap();
    let why = tokio::time::timeout(Duration::from_secs(2), lost).await;
    assert!(
        matches!(why, Ok(Error::LockLost { create_revision, .. }) if create_revision == token),
        "{why:?}"
    );
    let update = in_session
        .update(Endpoint::new("h:1").with_metadata(json!("ours")))
        .await;
    assert!(matches!(update, Err(Error::LockLost { .. })), "{update:?}");
    let key = in_session.key().to_owned();
    let deregistered = in_session.deregister().await;
    assert!(
        matches!(deregistered, Err(Error::LockLost { .. })),
        "{deregistered:?}"
    );
    assert_eq!(
        stored(&c, &key).await,
        Some((their_value.clone(), theirs)),
        "their key is as they put it"
    );
    session.close().await.unwrap();
    assert_eq!(stored(&c, &key).await, Some((their_value, theirs)));

    // A registration of its own: the other client puts without a lease (`etcdctl put`).
    let registration = Registration::register(c.clone(), &target, Endpoint::new("h:2"), ttl(30))
        .await
        .unwrap();
    let RegistrationState::Registered { lease_id, .. } = registration.state() else {
        panic!("not registered");
    };
    let mut states = registration.subscribe();
    let plain = r#"{"Addr":"h:2","Metadata":"etcdctl"}"#;
    put(&c, registration.key(), plain).await;
    let noticed = tokio::time::timeout(
        Duration::from_secs(2),
        states.wait_for(|s| matches!(s, RegistrationState::Reregistering { .. })),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    assert!(noticed, "still {:?}", registration.state());
    // It waits for the other key to go, and never writes over it meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        matches!(
            registration.state(),
            RegistrationState::Reregistering { .. }
        ),
        "{:?}",
        registration.state()
    );
    assert_eq!(
        stored(&c, registration.key()).await,
        Some((plain.into(), 0))
    );
    let update = registration
        .update(Endpoint::new("h:2").with_metadata(json!(1)))
        .await;
    assert!(
        matches!(update, Err(Error::NotRegistered { .. })),
        "{update:?}"
    );
    let key = registration.key().to_owned();
    registration.deregister().await.unwrap();
    assert_eq!(stored(&c, &key).await, Some((plain.into(), 0)));
    assert!(!lease_exists(&c, lease_id).await, "our lease was revoked");
}

/// An `update()` made while re-registering is written once the endpoint is registered again;
/// if that write fails, the registration says so in its state (and registers again with the
/// new endpoint), never `Registered` with the old endpoint and only a log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_registration_whose_deferred_update_fails_reports_it_in_its_state() {
    // etcd refuses requests over 64 KiB here: an endpoint whose JSON is larger can be recorded
    // by update() (it is within our 1 MiB limit) but never written.
    let etcd = EtcdCluster::start_with_args(1, &["--max-request-bytes", "65536"])
        .await
        .expect("etcd with --max-request-bytes");
    let c = etcd.client().await.unwrap();
    let proxy = etcd_coord_testkit::FaultProxy::start(etcd.endpoints()[0].clone())
        .await
        .unwrap();
    let target = unique("svc");
    let registration = Registration::register(
        client_via(&proxy).await,
        &target,
        Endpoint::new("h:1"),
        ttl(30),
    )
    .await
    .unwrap();
    let key = registration.key().to_owned();
    // Slow requests (250 ms each way), so that a re-registration takes a while; then the key
    // is deleted and the registration registers again.
    proxy.set_latency(Duration::from_millis(250), Duration::ZERO);
    let mut states = registration.subscribe();
    c.clone().delete(key.as_str(), None).await.unwrap();
    let reregistering = tokio::time::timeout(
        Duration::from_secs(5),
        states.wait_for(|s| matches!(s, RegistrationState::Reregistering { .. })),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    assert!(reregistering, "{:?}", registration.state());
    // While the attempt (with the old endpoint) is under way: an endpoint etcd will refuse.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let large = Endpoint::new("h:1").with_metadata(json!("x".repeat(100 << 10)));
    let update = registration.update(large).await;
    assert!(
        matches!(update, Err(Error::NotRegistered { .. })),
        "{update:?}"
    );
    let reported = tokio::time::timeout(
        Duration::from_secs(10),
        states.wait_for(|s| {
            matches!(s, RegistrationState::Reregistering { reason, .. } if reason.contains("too large"))
        }),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    assert!(
        reported,
        "the failed write is not in the state: {:?}, stored {:?}",
        registration.state(),
        stored(&c, &key).await
    );
    proxy.heal();
    assert!(
        eventually(Duration::from_secs(5), || async {
            stored(&c, &key).await.is_none()
        })
        .await,
        "the old endpoint stays registered: {:?}",
        stored(&c, &key).await
    );
    assert!(
        matches!(
            registration.state(),
            RegistrationState::Reregistering { .. }
        ),
        "registered with an endpoint other than the one asked for: {:?}",
        registration.state()
    );
    registration.deregister().await.unwrap();
}
