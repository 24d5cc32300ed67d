//! Behaviour under etcd's authentication and authorization, against real etcd.

mod common;

use std::time::Duration;

use common::*;
use etcd_coord::testkit::{EtcdCluster, FaultProxy};
use etcd_coord::{Election, Error, LeaderSelector, LeasedSession, Mutex, SessionOptions};
use futures::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_by_etcds_auth_is_a_typed_error_at_once_never_retried() {
    init_tracing();
    let cluster = EtcdCluster::start(1).await.unwrap();
    let _root = enable_auth(&cluster, "app", "app/").await;
    let app = user_client(&cluster, "app", "app-pw").await;
    let s = LeasedSession::new(app, SessionOptions::new())
        .await
        .unwrap();
    let allowed = Mutex::new(&s, "app/x").lock().await.unwrap();
    let before = s.metrics().txns;
    let denied = tokio::time::timeout(Duration::from_secs(2), Mutex::new(&s, "other/x").lock())
        .await
        .expect("answers at once");
    assert!(
        matches!(&denied, Err(Error::PermissionDenied(m)) if m.contains("permission denied")),
        "{denied:?}"
    );
    assert_eq!(
        s.metrics().txns - before,
        1,
        "the refused request was retried"
    );
    let observed = tokio::time::timeout(
        Duration::from_secs(2),
        Box::pin(Election::new(&s, "other/e").observe()).next(),
    )
    .await
    .expect("answers at once");
    assert!(
        matches!(observed, Some(Err(Error::PermissionDenied(_)))),
        "{observed:?}"
    );
    // Nothing was left behind, and what is allowed still works.
    allowed.release().await.unwrap();
    s.settled().await;
    assert_eq!(s.state(), etcd_coord::SessionState::Alive);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selector_leaders_recover_after_observing_fails() {
    // A follower's view of who leads breaks when etcd refuses its watch (its role lost read
    // permission); once the permission is back, the view catches up with the current leader
    // instead of staying stale.
    init_tracing();
    let cluster = EtcdCluster::start(1).await.unwrap();
    let mut root = enable_auth(&cluster, "app", "app/").await;
    let proxy = FaultProxy::start(cluster.endpoint(0).unwrap())
        .await
        .unwrap();
    let follower_client = etcd_client::Client::connect(
        [proxy.endpoint()],
        Some(etcd_coord::recommended_connect_options().with_user("app", "app-pw")),
    )
    .await
    .unwrap();
    let name = "app/pool";
    let leader_session = LeasedSession::new(root.clone(), SessionOptions::new())
        .await
        .unwrap();
    let mut first = Election::new(&leader_session, name)
        .campaign("first")
        .await
        .unwrap();
    let follower = LeaderSelector::new(follower_client, name, "follower")
        .with_retry_backoff(Duration::from_millis(100), Duration::from_millis(500));
    let mut leaders = follower.leaders();
    let run = tokio::spawn(
        follower.run(std::future::pending::<()>(), |term| async move {
            term.cancelled().await
        }),
    );
    tokio::time::timeout(
        Duration::from_secs(10),
        leaders.wait_for(|l| l.as_ref().is_some_and(|l| l.key() == first.key())),
    )
    .await
    .expect("the follower sees the first leader")
    .unwrap();

    root.role_revoke_permission(
        "app",
        "app/",
        Some(etcd_client::RoleRevokePermissionOptions::new().with_prefix()),
    )
    .await
    .unwrap();
    proxy.reset_peer(); // its watch is re-opened, and refused
    tokio::time::sleep(Duration::from_secs(1)).await;
    first.resign().await.unwrap();
    let second = Election::new(&leader_session, name)
        .campaign("second")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    root.role_grant_permission(
        "app",
        etcd_client::Permission::read_write("app/").with_prefix(),
    )
    .await
    .unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        leaders.wait_for(|l| l.as_ref().is_some_and(|l| l.key() == second.key())),
    )
    .await
    .expect("the follower's view caught up with the second leader")
    .unwrap();
    run.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_view_whose_permission_is_revoked_ends_visibly() {
    // A view's watch that etcd refuses for good (its role lost read permission) ends the view
    // with ViewEnded through changed() and the change stream — it never spins or goes quiet.
    use etcd_coord::discovery::{Discovery, Endpoint};
    init_tracing();
    let cluster = EtcdCluster::start(1).await.unwrap();
    let mut root = enable_auth(&cluster, "app", "app/").await;
    let proxy = FaultProxy::start(cluster.endpoint(0).unwrap())
        .await
        .unwrap();
    let app = etcd_client::Client::connect(
        [proxy.endpoint()],
        Some(etcd_coord::recommended_connect_options().with_user("app", "app-pw")),
    )
    .await
    .unwrap();
    root.put("app/svc/a", Endpoint::new("1.1.1.1:1").to_json(), None)
        .await
        .unwrap();
    let view = Discovery::new(app, "app/svc").view().await.unwrap();
    assert_eq!(view.endpoints().len(), 1);
    let mut changes = view.changes();
    root.role_revoke_permission(
        "app",
        "app/",
        Some(etcd_client::RoleRevokePermissionOptions::new().with_prefix()),
    )
    .await
    .unwrap();
    proxy.reset_peer(); // its watch is re-opened, and refused
    let ended = tokio::time::timeout(Duration::from_secs(10), view.changed())
        .await
        .expect("the view ends within 10 s");
    assert!(matches!(ended, Err(Error::ViewEnded(_))), "{ended:?}");
    let last = tokio::time::timeout(Duration::from_secs(1), changes.next())
        .await
        .expect("the stream reports the end");
    assert!(matches!(last, Some(Err(Error::ViewEnded(_)))), "{last:?}");
    assert!(changes.next().await.is_none(), "and then ends");
    // The last known set is still there to look at.
    assert_eq!(view.endpoints().len(), 1);
}
