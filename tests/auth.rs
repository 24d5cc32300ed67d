//! Behaviour under etcd's authentication and authorization, against real etcd.

mod common;

use std::time::Duration;

use common::*;
use etcd_coord::testkit::{EtcdCluster, FaultProxy};
use etcd_coord::{
    Barrier, DoubleBarrier, Election, Error, LeaderSelector, LeasedSession, Mutex, RwLock,
    SessionOptions,
};
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

/// A client of `proxy` authenticated as `app`, with the recommended options.
async fn app_via(proxy: &FaultProxy) -> etcd_client::Client {
    etcd_client::Client::connect(
        [proxy.endpoint()],
        Some(etcd_coord::recommended_connect_options().with_user("app", "app-pw")),
    )
    .await
    .unwrap()
}

/// A key for etcd's JWT tokens (HS256), written to a file that lives as long as the value.
fn jwt_key() -> tempfile::NamedTempFile {
    use std::io::Write;
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let secret: [u8; 32] = rand::random();
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    f.write_all(hex.as_bytes()).unwrap();
    f
}

/// As `app` through a proxy: a holder of `app/m`, a waiter parked behind it, and a view of
/// `app/svc` — what the token tests then let tokens go stale under.
struct Parked {
    options: SessionOptions,
    holder: LeasedSession,
    waiter: LeasedSession,
    guard: etcd_coord::MutexGuard,
    waiting: tokio::task::JoinHandle<Result<etcd_coord::MutexGuard, Error>>,
    view: etcd_coord::discovery::ServiceView,
}

impl Parked {
    async fn through(proxy: &FaultProxy) -> Parked {
        let options = SessionOptions::new().with_ttl(Duration::from_secs(10));
        let holder = LeasedSession::new(app_via(proxy).await, options.clone())
            .await
            .unwrap();
        let waiter = LeasedSession::new(app_via(proxy).await, options.clone())
            .await
            .unwrap();
        let guard = Mutex::new(&holder, "app/m").lock().await.unwrap();
        let waiting = {
            let waiter = waiter.clone();
            tokio::spawn(async move { Mutex::new(&waiter, "app/m").lock().await })
        };
        let view = etcd_coord::discovery::Discovery::new(app_via(proxy).await, "app/svc")
            .view()
            .await
            .unwrap();
        Parked {
            options,
            holder,
            waiter,
            guard,
            waiting,
            view,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_simple_tokens_are_renewed_for_sessions_waits_observers_and_views() {
    // Simple tokens expire after --auth-token-ttl seconds without use; lease keep-alives do
    // not use them.
    tokens_expire_and_everything_goes_on(&["--auth-token-ttl", "2"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_jwt_tokens_are_renewed_for_sessions_waits_observers_and_views() {
    // JWTs expire after their ttl, used or not.
    let key = jwt_key();
    let spec = format!(
        "jwt,priv-key={},sign-method=HS256,ttl=2s",
        key.path().display()
    );
    tokens_expire_and_everything_goes_on(&["--auth-token", &spec]).await;
}

/// Everything must go on after the tokens expired, also across re-opened streams (a watch
/// created with an expired token is refused as "permission denied").
async fn tokens_expire_and_everything_goes_on(etcd_args: &[&str]) {
    use etcd_coord::discovery::{Endpoint, SessionRegistration};
    init_tracing();
    let cluster = EtcdCluster::start_with_args(1, etcd_args).await.unwrap();
    let _root = enable_auth(&cluster, "app", "app/").await;
    let proxy = FaultProxy::start(cluster.endpoint(0).unwrap())
        .await
        .unwrap();
    let Parked {
        options,
        holder,
        waiter,
        guard,
        waiting,
        view,
    } = Parked::through(&proxy).await;
    let mut observed = Box::pin(Election::new(&waiter, "app/e").observe());
    // Idle past the token TTL (twice), streams re-opened in between.
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.reset_peer();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(holder.state(), etcd_coord::SessionState::Alive);
    assert_eq!(waiter.state(), etcd_coord::SessionState::Alive);
    // The holder releases with an expired token; the parked waiter gets the lock.
    guard.release().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiter gets the lock")
        .unwrap()
        .unwrap();
    // The view and the observer see what happens after the expiry.
    let registrant = LeasedSession::new(app_via(&proxy).await, options)
        .await
        .unwrap();
    let registration =
        SessionRegistration::register(&registrant, "app/svc", Endpoint::new("1.2.3.4:5"))
            .await
            .unwrap();
    tokio::time::timeout(Duration::from_secs(5), view.changed())
        .await
        .expect("the view sees the registration")
        .unwrap();
    assert_eq!(view.endpoints().len(), 1);
    let mut leadership = Election::new(&registrant, "app/e")
        .campaign("after-expiry")
        .await
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match observed.next().await {
                Some(Ok(etcd_coord::LeaderEvent::Leader(info)))
                    if info.value() == b"after-expiry" =>
                {
                    return Ok(());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Err(Error::Protocol("observe ended".into())),
            }
        }
    })
    .await
    .expect("the observer sees the new leader");
    assert!(seen.is_ok(), "{seen:?}");
    leadership.resign().await.unwrap();
    registration.deregister().await.unwrap();
    got.release().await.unwrap();
    for s in [holder, waiter, registrant] {
        s.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_of_etcds_users_or_roles_does_not_break_sessions_waits_or_views() {
    // Any change of users or roles bumps the auth store's revision; JWTs issued before are
    // refused ("revision of auth store is old") until re-authenticated. (Simple tokens take
    // the store's current revision and are not affected.)
    use etcd_coord::discovery::{Endpoint, SessionRegistration};
    init_tracing();
    let key = jwt_key();
    let spec = format!(
        "jwt,priv-key={},sign-method=HS256,ttl=60s",
        key.path().display()
    );
    let cluster = EtcdCluster::start_with_args(1, &["--auth-token", &spec])
        .await
        .unwrap();
    let mut root = enable_auth(&cluster, "app", "app/").await;
    let proxy = FaultProxy::start(cluster.endpoint(0).unwrap())
        .await
        .unwrap();
    let Parked {
        holder,
        waiter,
        guard,
        waiting,
        view,
        ..
    } = Parked::through(&proxy).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The auth store changes twice; streams are re-opened in between.
    root.user_add("someone", "pw", None).await.unwrap();
    proxy.reset_peer();
    root.role_add("another").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    guard.release().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiter gets the lock")
        .unwrap()
        .unwrap();
    let registration =
        SessionRegistration::register(&waiter, "app/svc", Endpoint::new("1.2.3.4:5"))
            .await
            .unwrap();
    tokio::time::timeout(Duration::from_secs(5), view.changed())
        .await
        .expect("the view sees the registration")
        .unwrap();
    assert_eq!(holder.state(), etcd_coord::SessionState::Alive);
    registration.deregister().await.unwrap();
    got.release().await.unwrap();
    holder.close().await.unwrap();
    waiter.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_an_authentication_error_at_connect() {
    init_tracing();
    let cluster = EtcdCluster::start(1).await.unwrap();
    let _root = enable_auth(&cluster, "app", "app/").await;
    let connected = tokio::time::timeout(
        Duration::from_secs(5),
        etcd_client::Client::connect(
            cluster.endpoints(),
            Some(etcd_coord::recommended_connect_options().with_user("app", "wrong")),
        ),
    )
    .await
    .expect("answers at once");
    let Err(err) = connected else {
        panic!("a wrong password was accepted");
    };
    let err = Error::from(err);
    assert!(
        matches!(&err, Error::AuthenticationFailed(m) if m.contains("authentication failed")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_limited_to_its_prefix_can_do_everything_there_and_nothing_elsewhere() {
    // readwrite on app/ is all a service needs for every primitive and discovery under app/;
    // read on a target is all a view needs; anything more is PermissionDenied, at once.
    use etcd_coord::discovery::{Discovery, Endpoint, Registration};
    init_tracing();
    let cluster = EtcdCluster::start(1).await.unwrap();
    let mut root = enable_auth(&cluster, "app", "app/").await;
    root.role_add("reader").await.unwrap();
    root.role_grant_permission(
        "reader",
        etcd_client::Permission::read("app/svc/").with_prefix(),
    )
    .await
    .unwrap();
    root.user_add("reader", "reader-pw", None).await.unwrap();
    root.user_grant_role("reader", "reader").await.unwrap();
    let app = user_client(&cluster, "app", "app-pw").await;
    let reader = user_client(&cluster, "reader", "reader-pw").await;
    let options = SessionOptions::new().with_ttl(Duration::from_secs(10));
    let at_once = Duration::from_secs(2);

    // Everything under app/ works with readwrite on app/.
    let s = LeasedSession::new(app.clone(), options.clone())
        .await
        .unwrap();
    Mutex::new(&s, "app/m")
        .lock()
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    Election::new(&s, "app/e")
        .campaign("v")
        .await
        .unwrap()
        .resign()
        .await
        .unwrap();
    etcd_coord::Semaphore::new(&s, "app/s", 2)
        .acquire()
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let rw = RwLock::new(&s, "app/rw");
    rw.read().await.unwrap().release().await.unwrap();
    rw.write().await.unwrap().release().await.unwrap();
    Barrier::new(&s, "app/b")
        .hold()
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    Barrier::new(&s, "app/b").wait().await.unwrap();
    DoubleBarrier::new(&s, "app/d", 1)
        .enter()
        .await
        .unwrap()
        .leave()
        .await
        .unwrap();
    let registration = Registration::register(
        app.clone(),
        "app/svc",
        Endpoint::new("h:1"),
        options.clone(),
    )
    .await
    .unwrap();
    // A role with read on the target alone can follow it.
    let view = Discovery::new(reader.clone(), "app/svc")
        .view()
        .await
        .unwrap();
    assert_eq!(view.endpoints().len(), 1);

    // Anything else is refused at once, typed.
    let denied = |r: &Result<(), Error>| matches!(r, Err(Error::PermissionDenied(_)));
    let lock = tokio::time::timeout(at_once, async {
        Mutex::new(&s, "other/m").lock().await.map(|_| ())
    })
    .await
    .expect("at once");
    assert!(denied(&lock), "{lock:?}");
    let outside: Vec<(&str, Result<(), Error>)> = vec![
        (
            "election",
            Election::new(&s, "other/e").campaign("v").await.map(|_| ()),
        ),
        (
            "semaphore",
            etcd_coord::Semaphore::new(&s, "other/s", 2)
                .acquire()
                .await
                .map(|_| ()),
        ),
        (
            "read lock",
            RwLock::new(&s, "other/rw").read().await.map(|_| ()),
        ),
        (
            "write lock",
            RwLock::new(&s, "other/rw").write().await.map(|_| ()),
        ),
        (
            "barrier hold",
            Barrier::new(&s, "other/b").hold().await.map(|_| ()),
        ),
        ("barrier wait", Barrier::new(&s, "other/b").wait().await),
        (
            "double barrier",
            DoubleBarrier::new(&s, "other/d", 1)
                .enter()
                .await
                .map(|_| ()),
        ),
    ];
    for (what, result) in &outside {
        assert!(denied(result), "{what}: {result:?}");
    }
    // Read permission alone is not enough to take a lock.
    let reading = LeasedSession::new(reader.clone(), options.clone())
        .await
        .unwrap();
    let read_only_lock = tokio::time::timeout(at_once, async {
        Mutex::new(&reading, "app/svc/m").lock().await.map(|_| ())
    })
    .await
    .expect("at once");
    assert!(denied(&read_only_lock), "{read_only_lock:?}");
    reading.close().await.unwrap();
    let register = tokio::time::timeout(at_once, async {
        Registration::register(
            app.clone(),
            "other/svc",
            Endpoint::new("h:1"),
            options.clone(),
        )
        .await
        .map(|_| ())
    })
    .await
    .expect("at once");
    assert!(denied(&register), "{register:?}");
    let view_other = tokio::time::timeout(at_once, async {
        Discovery::new(app.clone(), "other/svc")
            .view()
            .await
            .map(|_| ())
    })
    .await
    .expect("at once");
    assert!(denied(&view_other), "{view_other:?}");
    // The reader cannot register where it can read.
    let reader_registers = tokio::time::timeout(at_once, async {
        Registration::register(
            reader.clone(),
            "app/svc",
            Endpoint::new("h:2"),
            options.clone(),
        )
        .await
        .map(|_| ())
    })
    .await
    .expect("at once");
    assert!(denied(&reader_registers), "{reader_registers:?}");
    registration.deregister().await.unwrap();
    s.close().await.unwrap();
}

/// etcd revokes a lease only for a user who may write every key attached to it. A session
/// whose lease carries a key outside its role (put there by another user) cannot close: the
/// revocation is `PermissionDenied` at once, not retried, and the lease ends by its TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_carrying_a_key_outside_the_role_is_not_revoked_and_ends_by_its_ttl() {
    init_tracing();
    let cluster = EtcdCluster::start(1).await.unwrap();
    let mut root = enable_auth(&cluster, "app", "app/").await;
    let app = user_client(&cluster, "app", "app-pw").await;
    let ttl = Duration::from_secs(3);
    let s = LeasedSession::new(app, SessionOptions::new().with_ttl(ttl))
        .await
        .unwrap();
    let _held = Mutex::new(&s, "app/m").lock().await.unwrap();
    root.put(
        "other/x",
        "v",
        Some(etcd_client::PutOptions::new().with_lease(s.lease_id())),
    )
    .await
    .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(2), s.close())
        .await
        .expect("at once");
    assert!(
        matches!(closed, Err(Error::PermissionDenied(_))),
        "{closed:?}"
    );
    assert!(lease_exists(&root, s.lease_id()).await, "revoked anyway");
    assert!(
        eventually(ttl + Duration::from_secs(3), || async {
            !lease_exists(&root, s.lease_id()).await
        })
        .await,
        "the lease outlived its TTL"
    );
    assert!(keys_under(&root, "app/m").await.is_empty());
    assert!(keys_under(&root, "other/x").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_limited_to_its_prefix_can_resume_its_lease_its_lock_and_its_registration() {
    // What a restarted service with readwrite on app/ only needs to take back what it held.
    use etcd_coord::discovery::{Endpoint, Registration, RegistrationState, SessionRegistration};
    init_tracing();
    let cluster = EtcdCluster::start(1).await.unwrap();
    let _root = enable_auth(&cluster, "app", "app/").await;
    let app = user_client(&cluster, "app", "app-pw").await;
    let options = SessionOptions::new().with_ttl(Duration::from_secs(10));

    let first = LeasedSession::new(app.clone(), options.clone())
        .await
        .unwrap();
    let guard = Mutex::new(&first, "app/m").lock().await.unwrap();
    let (key, token) = (guard.key().to_owned(), guard.fencing_token());
    let lease_id = first.orphan();
    drop(guard);
    let resumed = LeasedSession::resume(app.clone(), lease_id, options.clone())
        .await
        .unwrap();
    let guard = Mutex::new(&resumed, "app/m")
        .resume(&key, token)
        .await
        .unwrap();
    assert_eq!(guard.fencing_token(), token);
    guard.release().await.unwrap();
    resumed.close().await.unwrap();

    // A registrant that hands its lease off (as one killed would leave it).
    let old = LeasedSession::new(app.clone(), options.clone())
        .await
        .unwrap();
    let held = SessionRegistration::register(&old, "app/svc", Endpoint::new("h:1"))
        .await
        .unwrap();
    let create_revision = held.fence().fencing_token();
    let lease_id = old.orphan();
    drop(held);
    let again = Registration::resume(
        app.clone(),
        "app/svc",
        Endpoint::new("h:1"),
        lease_id,
        options,
    )
    .await
    .unwrap();
    assert!(
        matches!(again.state(), RegistrationState::Registered { lease_id: l, create_revision: c, .. }
            if l == lease_id && c == create_revision),
        "{:?}",
        again.state()
    );
    again.deregister().await.unwrap();
}
