//! `LeasedSession` against real etcd.

mod common;

use std::time::Duration;

use common::*;
use etcd_client::PutOptions;
use etcd_coord::{Error, LeasedSession, LossReason, Mutex, SessionOptions, SessionState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_keeps_its_lease_alive_well_past_the_ttl() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let s = session(&etcd, 2).await;
    assert_eq!(s.ttl(), Duration::from_secs(2));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(s.state(), SessionState::Alive);
    assert!(
        lease_exists(&observer, s.lease_id()).await,
        "lease expired despite refreshes"
    );
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_revokes_the_lease_and_its_keys_vanish() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let s = session(&etcd, 30).await;
    let name = unique("close");
    let guard = Mutex::new(&s, &name).lock().await.unwrap();
    let key = guard.key().to_owned();
    assert_eq!(keys_under(&observer, &name).await, vec![key]);

    s.close().await.unwrap();

    assert_eq!(s.state(), SessionState::Lost);
    assert_eq!(s.loss_reason(), Some(LossReason::Closed));
    assert!(!lease_exists(&observer, s.lease_id()).await);
    assert!(keys_under(&observer, &name).await.is_empty());
    assert!(matches!(guard.lost().await, Error::SessionClosed));
    // Closing again is harmless.
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_revokes_the_lease_in_the_background() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let s = session(&etcd, 60).await;
    let id = s.lease_id();
    let lost = s.lost();
    let clone = s.clone();
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        lease_exists(&observer, id).await,
        "a remaining handle keeps the lease"
    );
    drop(clone);
    assert_eq!(lost.await, LossReason::Closed);
    assert!(
        eventually(Duration::from_secs(5), || async {
            !lease_exists(&observer, id).await
        })
        .await,
        "lease not revoked after the last handle was dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_keeps_the_session_alive_after_the_handles_are_dropped() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let s = session(&etcd, 60).await;
    let id = s.lease_id();
    let guard = Mutex::new(&s, unique("guard-keeps")).lock().await.unwrap();
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(lease_exists(&observer, id).await);
    drop(guard);
    assert!(
        eventually(Duration::from_secs(5), || async {
            !lease_exists(&observer, id).await
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_options_are_typed_errors_and_send_nothing() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let cases = [
        SessionOptions::new().with_ttl(Duration::ZERO),
        SessionOptions::new().with_ttl(Duration::from_secs(etcd_coord::MAX_LEASE_TTL_SECS + 1)),
        SessionOptions::new()
            .with_ttl(Duration::from_secs(10))
            .with_safety_margin(Duration::from_secs(5)),
        SessionOptions::new().with_keepalive_timeout(Duration::ZERO),
        SessionOptions::new()
            .with_ttl(Duration::from_secs(9))
            .with_keepalive_timeout(Duration::from_secs(4)),
        SessionOptions::new().with_request_timeout(Duration::ZERO),
    ];
    let before = c.clone().leases().await.unwrap().leases().len();
    for options in cases {
        let got = LeasedSession::new(c.clone(), options.clone()).await;
        assert!(
            matches!(got, Err(Error::InvalidArgument(_))),
            "{options:?} gave {got:?}"
        );
    }
    assert_eq!(
        c.clone().leases().await.unwrap().leases().len(),
        before,
        "no lease granted"
    );
    assert_eq!(SessionOptions::default(), SessionOptions::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_on_a_closed_session_fail_with_session_closed() {
    let etcd = etcd().await;
    let s = session(&etcd, 10).await;
    let m = Mutex::new(&s, unique("closed"));
    s.close().await.unwrap();
    assert!(matches!(m.lock().await, Err(Error::SessionClosed)));
    assert!(matches!(m.try_lock().await, Err(Error::SessionClosed)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_revoked_by_someone_else_makes_the_session_lost() {
    let etcd = etcd().await;
    let mut admin = client(&etcd).await;
    let s = LeasedSession::new(
        client(&etcd).await,
        SessionOptions::new().with_ttl(Duration::from_secs(3)),
    )
    .await
    .unwrap();
    admin.lease_revoke(s.lease_id()).await.unwrap();
    let reason = tokio::time::timeout(s.ttl(), s.lost())
        .await
        .expect("loss noticed within the TTL");
    assert_eq!(reason, LossReason::LeaseGone);
    assert_eq!(s.state(), SessionState::Lost);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_blackhole_suspends_the_session_and_healing_makes_it_alive_again() {
    let etcd = etcd().await;
    let proxy = proxy(&etcd).await;
    let s = session_via(
        &proxy,
        SessionOptions::new().with_ttl(Duration::from_secs(10)),
    )
    .await;
    let mut states = s.subscribe();
    proxy.blackhole();
    tokio::time::timeout(
        Duration::from_secs(8),
        states.wait_for(|st| *st != SessionState::Alive),
    )
    .await
    .expect("suspended before the deadline")
    .unwrap();
    assert_eq!(s.state(), SessionState::Suspended);
    proxy.heal();
    tokio::time::timeout(
        Duration::from_secs(5),
        states.wait_for(|st| *st != SessionState::Suspended),
    )
    .await
    .expect("recovered")
    .unwrap();
    assert_eq!(s.state(), SessionState::Alive, "recovered, not lost");
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_connection_is_reopened_and_the_same_lease_kept() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let proxy = proxy(&etcd).await;
    let s = session_via(
        &proxy,
        SessionOptions::new().with_ttl(Duration::from_secs(3)),
    )
    .await;
    for _ in 0..3 {
        proxy.reset_peer();
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    assert_ne!(s.state(), SessionState::Lost);
    assert!(lease_exists(&observer, s.lease_id()).await);
    // Keys can still be written under the lease through the session's client.
    let mut c = s.client().clone();
    c.put(
        unique("after-reset"),
        "v",
        Some(PutOptions::new().with_lease(s.lease_id())),
    )
    .await
    .unwrap();
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_session_is_lost_before_the_server_expires_its_lease() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let proxy = proxy(&etcd).await;
    let s = session_via(
        &proxy,
        SessionOptions::new().with_ttl(Duration::from_secs(5)),
    )
    .await;
    let id = s.lease_id();
    let fault = std::time::Instant::now();
    proxy.blackhole();
    let reason = tokio::time::timeout(Duration::from_secs(10), s.lost())
        .await
        .expect("lost");
    let lost_at = fault.elapsed();
    assert_eq!(reason, LossReason::DeadlineExceeded);
    assert!(
        lost_at <= s.ttl(),
        "lost {lost_at:?} after the fault, more than the TTL"
    );
    assert!(
        lease_exists(&observer, id).await,
        "the server had already expired the lease when the client declared it lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_task_outlives_a_closed_or_dropped_session() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let closed = LeasedSession::new(c.clone(), SessionOptions::new())
        .await
        .unwrap();
    let dropped = LeasedSession::new(c.clone(), SessionOptions::new())
        .await
        .unwrap();
    let (closed_tasks, dropped_tasks) = (closed.background_tasks(), dropped.background_tasks());
    let name = unique("tasks");
    let guard = Mutex::new(&closed, &name).lock().await.unwrap();
    // Acquisitions dropped at every await point they reach, and a dropped guard, leave
    // clean-up work behind.
    let waiting = Mutex::new(&dropped, &name);
    let ended = drop_at_every_await(|| waiting.lock(), async |_, _| {}).await;
    assert!(matches!(ended, Ended::Waiting { .. }), "{ended:?}");
    drop(waiting); // it holds a handle of the session
    drop(guard);
    // Detached requests finish shortly after their callers went away; then only the
    // session's own task runs, for as long as the session lives.
    closed.settled().await;
    assert!(
        eventually(Duration::from_secs(5), || async { closed_tasks.len() == 1 }).await,
        "{} tasks while the session lives, expected its one task",
        closed_tasks.len()
    );
    assert!(!dropped_tasks.is_empty());

    closed.close().await.unwrap();
    drop(closed);
    drop(dropped);
    for tasks in [closed_tasks, dropped_tasks] {
        tokio::time::timeout(Duration::from_secs(10), tasks.finished())
            .await
            .unwrap_or_else(|_| panic!("{} task(s) outlived the session", tasks.len()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testkit_members_can_be_stopped_killed_and_restarted() {
    let mut cluster = etcd_coord_testkit::EtcdCluster::start(3).await.unwrap();
    let leader = cluster.leader().await.expect("a leader");
    let follower = (leader + 1) % 3;
    cluster.stop(follower).await.unwrap();
    assert!(!cluster.is_running(follower));
    cluster.restart(follower).await.unwrap();
    cluster.kill(leader).unwrap();
    assert!(!cluster.is_running(leader));
    cluster.restart(leader).await.unwrap();
    assert!(cluster.is_running(leader) && cluster.is_running(follower));
    let mut c = cluster.client().await.unwrap();
    c.put("testkit-after-restart", "v", None).await.unwrap();
    assert!(cluster.leader().await.is_some());
}

#[test]
fn a_session_on_a_starved_runtime_is_lost_at_its_deadline_and_hands_out_no_guard() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let etcd = etcd().await;
        let s = session(&etcd, 3).await;
        let mutex = Mutex::new(&s, unique("starved"));
        // Nothing on this runtime runs — not even the session's task — until past the
        // deadline (at most TTL − margin after the last acknowledged refresh, sent before now).
        std::thread::sleep(s.ttl() - s.safety_margin() + Duration::from_millis(300));
        assert_eq!(s.state(), SessionState::Lost, "Alive past the deadline");
        assert_eq!(s.loss_reason(), Some(LossReason::DeadlineExceeded));
        assert!(matches!(
            mutex.lock().await,
            Err(Error::SessionLost(LossReason::DeadlineExceeded))
        ));
        tokio::time::timeout(Duration::from_millis(100), s.lost())
            .await
            .expect("lost() completes at once past the deadline");
    });
}

#[test]
fn a_session_whose_runtime_shut_down_is_lost() {
    let main = tokio::runtime::Runtime::new().unwrap();
    let etcd = main.block_on(etcd());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(session(&etcd, 30));
    assert_eq!(s.state(), SessionState::Alive);
    drop(rt); // the session's task is gone: nothing refreshes the lease any more
    assert_eq!(s.state(), SessionState::Lost);
    assert!(matches!(
        s.loss_reason(),
        Some(reason) if reason != LossReason::Closed
    ));
    main.block_on(async {
        assert!(matches!(
            Mutex::new(&s, unique("no-task")).lock().await,
            Err(Error::SessionLost(_))
        ));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_durations_are_typed_errors_or_saturate_and_never_panic() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    for options in [
        SessionOptions::new().with_ttl(Duration::MAX),
        SessionOptions::new().with_safety_margin(Duration::MAX),
        SessionOptions::new().with_keepalive_timeout(Duration::MAX),
    ] {
        assert!(
            matches!(
                LeasedSession::new(c.clone(), options.clone()).await,
                Err(Error::InvalidArgument(_))
            ),
            "{options:?} was accepted"
        );
    }
    // A request timeout beyond any real need behaves like a very long one.
    let s = LeasedSession::new(
        c.clone(),
        SessionOptions::new()
            .with_ttl(Duration::from_secs(10))
            .with_request_timeout(Duration::MAX),
    )
    .await
    .unwrap();
    let name = unique("huge-timeout");
    let first = Mutex::new(&s, &name).lock().await.unwrap();
    let m = Mutex::new(&s, &name);
    let waiting = tokio::spawn(async move { m.lock().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.release().await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    second.release().await.unwrap();
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testkit_member_operations_report_a_missing_member_as_an_error() {
    use etcd_coord_testkit::{EtcdCluster, TestkitError};
    let mut cluster = EtcdCluster::start(1).await.unwrap();
    let missing = |r: Result<(), TestkitError>| {
        matches!(
            r,
            Err(TestkitError::NoSuchMember {
                index: 3,
                members: 1
            })
        )
    };
    assert!(matches!(
        cluster.endpoint(3),
        Err(TestkitError::NoSuchMember { .. })
    ));
    assert!(missing(cluster.kill(3)));
    assert!(missing(cluster.pause(3)));
    assert!(missing(cluster.resume(3)));
    assert!(missing(cluster.stop(3).await));
    assert!(missing(cluster.restart(3).await));
    assert!(missing(cluster.partition(3)));
    assert!(!cluster.is_running(3));
    assert!(cluster.is_running(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_member_answers_nothing_until_it_is_resumed() {
    let mut cluster = etcd_coord_testkit::EtcdCluster::start(1).await.unwrap();
    let mut c = cluster.client().await.unwrap();
    c.put("paused", "before", None).await.unwrap();
    cluster.pause(0).unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), c.get("paused", None))
            .await
            .is_err(),
        "a paused member answered"
    );
    cluster.resume(0).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), c.get("paused", None))
        .await
        .expect("answers once resumed")
        .unwrap();
    assert_eq!(got.kvs()[0].value_str().unwrap(), "before");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lost_in_an_outage_revokes_its_lease_as_soon_as_etcd_answers_again() {
    // Blackholed, the session is Lost at its deadline; its revoke cannot get through. A
    // leader change then resets the lease's TTL on the server (no lease checkpointing), so it
    // would live a whole TTL more. Once the path heals the revoke lands: the lease is gone
    // at once.
    init_tracing();
    let mut cluster = etcd_coord_testkit::EtcdCluster::start(3).await.unwrap();
    let leader = cluster.leader().await.expect("a leader");
    let follower = (leader + 1) % 3;
    let proxy = etcd_coord_testkit::FaultProxy::start(cluster.endpoint(follower).unwrap())
        .await
        .unwrap();
    let observer = client_via_endpoint(&cluster.endpoint(follower).unwrap()).await;
    let s = session_via_timing_out(&proxy, Duration::from_secs(6), Duration::from_secs(1)).await;
    let lease = s.lease_id();
    proxy.blackhole();
    tokio::time::timeout(Duration::from_secs(10), s.lost())
        .await
        .expect("lost at its deadline");
    cluster.kill(leader).unwrap(); // a new leader restores every lease with its full TTL
    assert!(
        eventually(Duration::from_secs(5), || async {
            cluster_has_leader(&observer).await
        })
        .await
    );
    assert!(
        lease_exists(&observer, lease).await,
        "the lease outlived the loss"
    );
    proxy.heal();
    proxy.reset_peer();
    let healed = std::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(3), || async {
            !lease_exists(&observer, lease).await
        })
        .await,
        "the lost session's lease still exists {:?} after the heal",
        healed.elapsed()
    );
}

#[tokio::test]
async fn a_grant_whose_answer_is_lost_or_whose_caller_gave_up_leaves_no_lease() {
    // The grant reaches etcd but its answer never comes back: new() fails (or its caller drops
    // it), and the lease it created must not live on for its TTL.
    init_tracing();
    let cluster = etcd_coord_testkit::EtcdCluster::start(1).await.unwrap();
    let admin = cluster.client().await.unwrap();
    let proxy = etcd_coord_testkit::FaultProxy::start(cluster.endpoint(0).unwrap())
        .await
        .unwrap();
    let via = client_via(&proxy).await;
    via.clone().get("warm-up", None).await.unwrap();
    let options = SessionOptions::new()
        .with_ttl(Duration::from_secs(60))
        .with_request_timeout(Duration::from_millis(500));
    proxy.drop_responses();
    let failed = LeasedSession::new(via.clone(), options.clone()).await;
    assert!(matches!(failed, Err(Error::Timeout(_))), "{failed:?}");
    // And a caller that gives up before the answer.
    let dropped =
        tokio::time::timeout(Duration::from_millis(200), LeasedSession::new(via, options)).await;
    assert!(dropped.is_err());
    proxy.heal();
    proxy.reset_peer();
    let leases = || async {
        admin
            .clone()
            .leases()
            .await
            .map(|l| l.leases().len())
            .unwrap_or(usize::MAX)
    };
    assert!(
        eventually(Duration::from_secs(5), || async { leases().await == 0 }).await,
        "{} lease(s) of lost grants remain (TTL 60 s)",
        leases().await
    );
}
