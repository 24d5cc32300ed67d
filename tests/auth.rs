//! Behaviour under etcd's authentication and authorization, against real etcd.

mod common;

use std::time::Duration;

use common::*;
use etcd_coord::{
    Barrier, DoubleBarrier, Election, Error, LeaderSelector, LeasedSession, Mutex, RwLock,
    SessionOptions,
};
use etcd_coord_testkit::{EtcdCluster, FaultProxy};
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
    let reader = user_with(
        &mut root,
        &cluster,
        "reader",
        etcd_client::Permission::read("app/svc/").with_prefix(),
    )
    .await;
    let app = user_client(&cluster, "app", "app-pw").await;
    let options = SessionOptions::new().with_ttl(Duration::from_secs(10));

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
    refused_at_once("lock", Mutex::new(&s, "other/m").lock()).await;
    refused_at_once("election", Election::new(&s, "other/e").campaign("v")).await;
    refused_at_once(
        "semaphore",
        etcd_coord::Semaphore::new(&s, "other/s", 2).acquire(),
    )
    .await;
    refused_at_once("read lock", RwLock::new(&s, "other/rw").read()).await;
    refused_at_once("write lock", RwLock::new(&s, "other/rw").write()).await;
    refused_at_once("barrier hold", Barrier::new(&s, "other/b").hold()).await;
    refused_at_once("barrier wait", Barrier::new(&s, "other/b").wait()).await;
    refused_at_once(
        "double barrier",
        DoubleBarrier::new(&s, "other/d", 1).enter(),
    )
    .await;
    // Read permission alone is not enough to take a lock.
    let reading = LeasedSession::new(reader.clone(), options.clone())
        .await
        .unwrap();
    refused_at_once(
        "a lock with read alone",
        Mutex::new(&reading, "app/svc/m").lock(),
    )
    .await;
    reading.close().await.unwrap();
    refused_at_once(
        "register",
        Registration::register(
            app.clone(),
            "other/svc",
            Endpoint::new("h:1"),
            options.clone(),
        ),
    )
    .await;
    refused_at_once("view", Discovery::new(app.clone(), "other/svc").view()).await;
    // The reader cannot register where it can read.
    refused_at_once(
        "register with read alone",
        Registration::register(
            reader.clone(),
            "app/svc",
            Endpoint::new("h:2"),
            options.clone(),
        ),
    )
    .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_limited_to_its_prefix_has_what_nobody_took_back_on_its_resumed_lease_deleted() {
    // The resumed session lists its lease's keys, reads them and deletes the ones nobody took
    // back: readwrite on app/ is enough.
    init_tracing();
    let cluster = EtcdCluster::start(1).await.unwrap();
    let root = enable_auth(&cluster, "app", "app/").await;
    let app = user_client(&cluster, "app", "app-pw").await;
    let options = SessionOptions::new().with_ttl(Duration::from_secs(3));
    let first = LeasedSession::new(app.clone(), options.clone())
        .await
        .unwrap();
    let lease_id = first.orphan();
    // A put of the earlier process that landed with nobody to answer.
    let leftover = format!("app/m/#{lease_id:016x}-9");
    app.clone()
        .put(
            leftover.as_str(),
            "",
            Some(etcd_client::PutOptions::new().with_lease(lease_id)),
        )
        .await
        .unwrap();
    let resumed = LeasedSession::resume(app.clone(), lease_id, options)
        .await
        .unwrap();
    assert!(
        eventually(resumed.ttl() + Duration::from_secs(3), || async {
            keys_under(&root, "app/m/").await.is_empty()
        })
        .await,
        "the leftover outlived the adoption window"
    );
    assert_eq!(resumed.state(), etcd_coord::SessionState::Alive);
    resumed.close().await.unwrap();
}

/// A client of a user whose one role has `permission` and nothing else.
async fn user_with(
    root: &mut etcd_client::Client,
    cluster: &EtcdCluster,
    user: &str,
    permission: etcd_client::Permission,
) -> etcd_client::Client {
    root.role_add(user).await.unwrap();
    root.role_grant_permission(user, permission).await.unwrap();
    root.user_add(user, format!("{user}-pw"), None)
        .await
        .unwrap();
    root.user_grant_role(user, user).await.unwrap();
    user_client(cluster, user, &format!("{user}-pw")).await
}

/// Asserts that `attempt` is refused with `PermissionDenied` within 2 s. (Boxed at once: the
/// test that awaits many different attempts would otherwise hold the largest of them inline
/// and overflow a test thread's stack in a debug build.)
fn refused_at_once<'a, T: 'a>(
    what: &'a str,
    attempt: impl std::future::Future<Output = Result<T, Error>> + 'a,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>> {
    Box::pin(async move {
        let answer = tokio::time::timeout(Duration::from_secs(2), attempt)
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer within 2 s"))
            .map(|_| ());
        assert!(
            matches!(answer, Err(Error::PermissionDenied(_))),
            "{what}: {answer:?}"
        );
    })
}

/// Exactly what docs/production.md says a role needs, each primitive on its own: `readwrite`
/// on `NAME/` (prefix) alone is enough for everything a primitive named NAME does; `read`
/// alone lets a user look (`holder()`, `leader()`, `observe()`, a barrier's `wait()`, a
/// view) and refuses every acquisition at once with `PermissionDenied`, leaving nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readwrite_on_the_names_prefix_alone_is_enough_and_read_alone_only_looks() {
    use etcd_client::Permission;
    use etcd_coord::discovery::{Discovery, Endpoint, Registration};
    use etcd_coord::Semaphore;
    use etcd_coord::{Stm, StmTxn};
    init_tracing();
    let cluster = EtcdCluster::start(1).await.unwrap();
    let mut root = enable_auth(&cluster, "app", "app/").await;
    let options = SessionOptions::new().with_ttl(Duration::from_secs(10));
    // For each name: a session of a user with readwrite on NAME/ only, and one with read only.
    let mut sessions = Vec::new();
    let pair = |name: &'static str| {
        let (mut root, cluster, options) = (root.clone(), &cluster, options.clone());
        async move {
            let tag = name.replace('/', "-");
            let rw = user_with(
                &mut root,
                cluster,
                &format!("rw{tag}"),
                Permission::read_write(format!("{name}/")).with_prefix(),
            )
            .await;
            let ro = user_with(
                &mut root,
                cluster,
                &format!("ro{tag}"),
                Permission::read(format!("{name}/")).with_prefix(),
            )
            .await;
            (
                LeasedSession::new(rw, options.clone()).await.unwrap(),
                LeasedSession::new(ro, options).await.unwrap(),
            )
        }
    };

    let (rw, ro) = pair("lp/m").await;
    let held = Mutex::new(&rw, "lp/m").lock().await.unwrap();
    assert!(Mutex::new(&rw, "lp/m").try_lock().await.unwrap().is_none());
    let seen = Mutex::new(&ro, "lp/m").holder().await.unwrap();
    assert_eq!(seen.map(|h| h.fencing_token()), Some(held.fencing_token()));
    refused_at_once("lock", Mutex::new(&ro, "lp/m").lock()).await;
    held.release().await.unwrap();
    sessions.push((rw, ro));

    let (rw, ro) = pair("lp/e").await;
    let mut events = Box::pin(Election::new(&ro, "lp/e").observe());
    let mut leadership = Election::new(&rw, "lp/e").campaign("a").await.unwrap();
    leadership.proclaim("b").await.unwrap();
    let leader = Election::new(&ro, "lp/e").leader().await.unwrap();
    assert_eq!(leader.map(|l| l.value().to_vec()), Some(b"b".to_vec()));
    let first = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("the observer sees the leader");
    assert!(matches!(first, Some(Ok(_))), "{first:?}");
    refused_at_once("campaign", Election::new(&ro, "lp/e").campaign("c")).await;
    leadership.resign().await.unwrap();
    sessions.push((rw, ro));

    let (rw, ro) = pair("lp/s").await;
    let permit = Semaphore::new(&rw, "lp/s", 2).acquire().await.unwrap();
    let holders = Semaphore::new(&ro, "lp/s", 2).holders().await.unwrap();
    assert_eq!(holders.len(), 1);
    refused_at_once("acquire", Semaphore::new(&ro, "lp/s", 2).acquire()).await;
    permit.release().await.unwrap();
    sessions.push((rw, ro));

    let (rw, ro) = pair("lp/rw").await;
    let lock = RwLock::new(&rw, "lp/rw");
    lock.read().await.unwrap().release().await.unwrap();
    let writing = lock.write().await.unwrap();
    assert_eq!(RwLock::new(&ro, "lp/rw").holders().await.unwrap().len(), 1);
    writing.release().await.unwrap();
    refused_at_once("read lock", RwLock::new(&ro, "lp/rw").read()).await;
    refused_at_once("write lock", RwLock::new(&ro, "lp/rw").write()).await;
    sessions.push((rw, ro));

    let (rw, ro) = pair("lp/b").await;
    let hold = Barrier::new(&rw, "lp/b").hold().await.unwrap();
    let waiting = {
        let barrier = Barrier::new(&ro, "lp/b");
        tokio::spawn(async move { barrier.wait().await })
    };
    refused_at_once("barrier hold", Barrier::new(&ro, "lp/b").hold()).await;
    hold.release().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("a reader's wait passes once the barrier is down")
        .unwrap()
        .unwrap();
    sessions.push((rw, ro));

    let (rw, ro) = pair("lp/d").await;
    let entered = DoubleBarrier::new(&rw, "lp/d", 1).enter().await.unwrap();
    entered.leave().await.unwrap();
    refused_at_once(
        "double barrier enter",
        DoubleBarrier::new(&ro, "lp/d", 1).enter(),
    )
    .await;
    sessions.push((rw, ro));

    // Discovery: readwrite on TARGET/ registers, read on TARGET/ follows.
    let (rw, ro) = pair("lp/svc").await;
    let registration = Registration::register(
        rw.client().clone(),
        "lp/svc",
        Endpoint::new("h:1"),
        options.clone(),
    )
    .await
    .unwrap();
    let view = Discovery::new(ro.client().clone(), "lp/svc")
        .view()
        .await
        .unwrap();
    assert_eq!(view.endpoints().len(), 1);
    refused_at_once(
        "register",
        Registration::register(
            ro.client().clone(),
            "lp/svc",
            Endpoint::new("h:2"),
            options.clone(),
        ),
    )
    .await;
    registration.deregister().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), view.changed())
        .await
        .expect("the view sees the deregistration")
        .unwrap();
    assert!(view.endpoints().is_empty());
    sessions.push((rw, ro));

    // An STM transaction needs read on what it reads and write on what it writes; a refusal
    // ends `run` at once, after one attempt, with nothing written.
    let (rw, ro) = pair("lp/stm").await;
    let calls = std::sync::atomic::AtomicU32::new(0);
    let copy_a_to = |stm: Stm, to: &'static str| {
        let calls = &calls;
        async move {
            stm.run(|tx: StmTxn| async move {
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let a = tx.get("lp/stm/a").await?;
                tx.put(to, a.unwrap_or_default());
                Ok::<_, Error>(())
            })
            .await
        }
    };
    let done = copy_a_to(Stm::new(rw.client().clone()), "lp/stm/b").await;
    assert!(done.is_ok(), "{done:?}");
    refused_at_once(
        "an STM writing outside its prefix",
        copy_a_to(Stm::new(rw.client().clone()), "lp/other"),
    )
    .await;
    refused_at_once(
        "an STM commit with read alone",
        copy_a_to(Stm::new(ro.client().clone()), "lp/stm/c"),
    )
    .await;
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "a refused commit was tried again"
    );
    refused_at_once(
        "an STM reading outside its prefix",
        Stm::new(rw.client().clone())
            .run(|tx: StmTxn| async move { tx.get("lp/other").await.map(|_| ()) }),
    )
    .await;
    let written = root.get("lp/stm/c", None).await.unwrap();
    assert!(written.kvs().is_empty(), "a refused commit wrote");
    root.delete("lp/stm/b", None).await.unwrap();
    sessions.push((rw, ro));

    // Nothing was left behind: every session closes (its revoke is allowed: no key of
    // another prefix is on its lease), and no key remains under lp/.
    for (rw, ro) in sessions {
        rw.close().await.unwrap();
        ro.close().await.unwrap();
    }
    let left = root
        .get("lp/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(left.kvs().is_empty(), "{:?}", left.kvs());
}

/// A work queue's claims and acks are Txns nested in one (a claim tries its candidates one
/// in the else-branch of the other), and etcd 3.4/3.5 before 2026 check no permission inside
/// a nested Txn: the crate has etcd check them (`rpc::witness`). A role that may only read
/// the queue sees its jobs and claims none — refused at once, typed, the job left as it was
/// for a role that may write it, which claims and acks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_may_only_read_a_work_queue_sees_its_jobs_and_claims_none() {
    use etcd_client::Permission;
    use etcd_coord::WorkQueue;
    init_tracing();
    let cluster = EtcdCluster::start(1).await.unwrap();
    let mut root = enable_auth(&cluster, "worker", "jq/").await;
    let reader = user_with(
        &mut root,
        &cluster,
        "looker",
        Permission::read("jq/").with_prefix(),
    )
    .await;
    let options = SessionOptions::new().with_ttl(Duration::from_secs(10));
    let worker = LeasedSession::new(
        user_client(&cluster, "worker", "worker-pw").await,
        options.clone(),
    )
    .await
    .unwrap();
    let looker = LeasedSession::new(reader, options).await.unwrap();
    let id = WorkQueue::new(&worker, "jq/q")
        .enqueue("job")
        .await
        .unwrap();

    let seen = WorkQueue::new(&looker, "jq/q").pending().await.unwrap();
    assert_eq!(seen.len(), 1, "a reader sees the job");
    assert_eq!(WorkQueue::new(&looker, "jq/q").len().await.unwrap(), 1);
    assert!(WorkQueue::new(&looker, "jq/q")
        .dead_letters()
        .await
        .unwrap()
        .is_empty());
    refused_at_once("try_claim", WorkQueue::new(&looker, "jq/q").try_claim()).await;
    refused_at_once("claim_many", WorkQueue::new(&looker, "jq/q").claim_many(3)).await;
    let claimed = WorkQueue::new(&looker, "jq/q").claimed().await.unwrap();
    assert!(
        claimed.is_empty(),
        "a refused claim left a claim: {claimed:?}"
    );

    let job = WorkQueue::new(&worker, "jq/q")
        .try_claim()
        .await
        .unwrap()
        .expect("the job is still there for a worker");
    assert_eq!((job.id(), job.payload()), (&id, &b"job"[..]));
    job.ack().await.unwrap();
    assert!(WorkQueue::new(&looker, "jq/q").is_empty().await.unwrap());
    looker.close().await.unwrap();
    worker.close().await.unwrap();
}

/// One public path of the crate, run on a client whose token has expired.
type Path<'a> = (
    &'static str,
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Error>> + Send + 'a>>,
);

/// With etcd's simple tokens (`--auth-token-ttl 2`) and a role limited to the app's prefix,
/// every public path of the crate works after its client idled past the token's TTL: reads
/// (`holder()`, `leader()`, `holders()`, `list()`, `view()`, `observe()`, a barrier's
/// `wait()`), acquisitions, fenced writes, releases, STM, sessions and registrations. Each
/// path has its own client, so one path's renewal cannot hide another's failure. The clients
/// are connected without etcd-client's own token refresh (`with_auto_token_refresh`, off by
/// default there): the crate renews tokens itself, whatever options its user connected with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_public_path_renews_an_expired_token_after_an_idle_period() {
    use etcd_coord::discovery::{Discovery, Endpoint, Registration, SessionRegistration};
    use etcd_coord::{Semaphore, Stm};
    init_tracing();
    let cluster = EtcdCluster::start_with_args(1, &["--auth-token-ttl", "2"])
        .await
        .unwrap();
    let _root = enable_auth(&cluster, "app", "app/").await;
    let options = SessionOptions::new().with_ttl(Duration::from_secs(10));
    let app = || {
        etcd_client::Client::connect(
            cluster.endpoints(),
            Some(etcd_client::ConnectOptions::new().with_user("app", "app-pw")),
        )
    };
    let app = || async { app().await.unwrap() };
    let session = |client: etcd_client::Client| {
        let options = options.clone();
        async move { LeasedSession::new(client, options).await.unwrap() }
    };
    // Something to find on each read path.
    let owner = session(app().await).await;
    let held = Mutex::new(&owner, "app/m").lock().await.unwrap();
    let leading = Election::new(&owner, "app/e").campaign("v").await.unwrap();
    let permit = Semaphore::new(&owner, "app/s", 2).acquire().await.unwrap();
    let reading = RwLock::new(&owner, "app/rw").read().await.unwrap();
    let registered = SessionRegistration::register(&owner, "app/svc", Endpoint::new("1.2.3.4:5"))
        .await
        .unwrap();
    let guard_session = session(app().await).await;
    let guard = Mutex::new(&guard_session, "app/g").lock().await.unwrap();
    let leader_session = session(app().await).await;
    let leadership = Election::new(&leader_session, "app/l")
        .campaign("v")
        .await
        .unwrap();
    // A session per path that needs one, a bare client for the others.
    let mut sessions = Vec::new();
    for _ in 0..9 {
        sessions.push(session(app().await).await);
    }
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(app().await);
    }
    let resumable = session(app().await).await;
    let lease = resumable.orphan();
    // Idle past the token's TTL.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let [s0, s1, s2, s3, s4, s5, s6, s7, s8] = &sessions[..] else {
        unreachable!()
    };
    let Ok([c0, c1, c2, c3, c4, c5]) = <[etcd_client::Client; 6]>::try_from(clients) else {
        unreachable!()
    };
    let paths: Vec<Path<'_>> = vec![
        (
            "Mutex::holder",
            Box::pin(async {
                assert!(Mutex::new(s0, "app/m").holder().await?.is_some());
                Ok(())
            }),
        ),
        (
            "Election::leader",
            Box::pin(async {
                assert!(Election::new(s1, "app/e").leader().await?.is_some());
                Ok(())
            }),
        ),
        (
            "Semaphore::holders",
            Box::pin(async {
                assert_eq!(Semaphore::new(s2, "app/s", 2).holders().await?.len(), 1);
                Ok(())
            }),
        ),
        (
            "RwLock::holders",
            Box::pin(async {
                assert_eq!(RwLock::new(s3, "app/rw").holders().await?.len(), 1);
                Ok(())
            }),
        ),
        (
            "Election::observe",
            Box::pin(async {
                let mut events = Box::pin(Election::new(s4, "app/e").observe());
                events.next().await.expect("an event")?;
                Ok(())
            }),
        ),
        (
            "Mutex::lock and release",
            Box::pin(async { Mutex::new(s5, "app/x").lock().await?.release().await }),
        ),
        (
            "Barrier::wait",
            Box::pin(async { Barrier::new(s6, "app/b").wait().await }),
        ),
        (
            "RwLock::write",
            Box::pin(async { RwLock::new(s7, "app/w").write().await?.release().await }),
        ),
        (
            "DoubleBarrier::enter",
            Box::pin(async {
                DoubleBarrier::new(s8, "app/d", 1)
                    .enter()
                    .await?
                    .leave()
                    .await
            }),
        ),
        (
            "Discovery::list",
            Box::pin(async move {
                assert_eq!(Discovery::new(c0, "app/svc").list().await?.len(), 1);
                Ok(())
            }),
        ),
        (
            "Discovery::view",
            Box::pin(async move {
                assert_eq!(
                    Discovery::new(c1, "app/svc")
                        .view()
                        .await?
                        .endpoints()
                        .len(),
                    1
                );
                Ok(())
            }),
        ),
        (
            "Stm::run",
            Box::pin(async move {
                Stm::new(c2)
                    .run(|tx| async move {
                        let _ = tx.get("app/stm").await?;
                        tx.put("app/stm", "1");
                        Ok::<_, Error>(())
                    })
                    .await
                    .map(|_| ())
            }),
        ),
        (
            "LeasedSession::new",
            Box::pin(async { LeasedSession::new(c3, options.clone()).await?.close().await }),
        ),
        (
            "LeasedSession::resume",
            Box::pin(async {
                LeasedSession::resume(c4, lease, options.clone())
                    .await?
                    .close()
                    .await
            }),
        ),
        (
            "Registration::register",
            Box::pin(async {
                Registration::register(c5, "app/svc2", Endpoint::new("1.2.3.4:6"), options.clone())
                    .await?
                    .deregister()
                    .await
            }),
        ),
        (
            "Fence::txn_if_owner and release",
            Box::pin(async move {
                guard
                    .txn_if_owner([etcd_client::TxnOp::put("app/g-state", "x", None)])
                    .await?;
                guard.release().await
            }),
        ),
        (
            "Leadership::proclaim",
            Box::pin(async { leadership.proclaim("w").await }),
        ),
    ];
    let mut failures = Vec::new();
    for (what, path) in paths {
        match tokio::time::timeout(Duration::from_secs(10), path).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("{what}: {e}")),
            Err(_) => failures.push(format!("{what}: no answer within 10 s")),
        }
    }
    assert!(
        failures.is_empty(),
        "after the token expired: {failures:#?}"
    );
    drop((held, leading, permit, reading, registered));
    owner.close().await.unwrap();
}

/// A live view and an `observe()` stream whose connection breaks after their client's token
/// expired re-open their watches with a fresh token and go on: they see what happens after.
/// (Their clients connect without etcd-client's own token refresh.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_and_observers_reconnect_after_their_token_expired() {
    use etcd_coord::discovery::{Discovery, Endpoint, SessionRegistration};
    init_tracing();
    let cluster = EtcdCluster::start_with_args(1, &["--auth-token-ttl", "2"])
        .await
        .unwrap();
    let _root = enable_auth(&cluster, "app", "app/").await;
    let proxy = FaultProxy::start(cluster.endpoint(0).unwrap())
        .await
        .unwrap();
    let plain = || async {
        etcd_client::Client::connect(
            [proxy.endpoint()],
            Some(
                etcd_client::ConnectOptions::new()
                    .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1))
                    .with_user("app", "app-pw"),
            ),
        )
        .await
        .unwrap()
    };
    let view = Discovery::new(plain().await, "app/svc")
        .view()
        .await
        .unwrap();
    let observer = LeasedSession::new(plain().await, SessionOptions::new())
        .await
        .unwrap();
    let mut observed = Box::pin(Election::new(&observer, "app/e").observe());
    assert!(matches!(
        observed.next().await,
        Some(Ok(etcd_coord::LeaderEvent::NoLeader))
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.reset_peer();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let actor = LeasedSession::new(
        user_client(&cluster, "app", "app-pw").await,
        SessionOptions::new(),
    )
    .await
    .unwrap();
    let registration = SessionRegistration::register(&actor, "app/svc", Endpoint::new("1.2.3.4:5"))
        .await
        .unwrap();
    let mut leadership = Election::new(&actor, "app/e")
        .campaign("after")
        .await
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        while view.endpoints().is_empty() {
            view.changed().await?;
        }
        Ok::<_, Error>(())
    })
    .await;
    assert!(matches!(seen, Ok(Ok(()))), "the view: {seen:?}");
    let next = tokio::time::timeout(Duration::from_secs(5), observed.next()).await;
    assert!(
        matches!(&next, Ok(Some(Ok(etcd_coord::LeaderEvent::Leader(l)))) if l.value() == b"after"),
        "the observer: {next:?}"
    );
    leadership.resign().await.unwrap();
    registration.deregister().await.unwrap();
    actor.close().await.unwrap();
}
