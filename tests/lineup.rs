//! Waiters behind a long line (more members than the enqueue's one page holds) decide from the
//! mirror of the queue that their session's watch stream keeps, not from a read of the whole
//! queue (docs/design.md, "The line-up from the session's mirror"): safety, liveness, cancel
//! safety, against real etcd.

mod common;

use std::future::Future;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use common::*;
use etcd_client::Client;
use etcd_coord::{LeasedSession, Mutex, Semaphore, SessionOptions};
use etcd_coord_testkit::{FaultProxy, TestEtcd};
use tokio::sync::oneshot;

/// More members than the enqueue's page (64 keys) holds.
const LONG: usize = 80;

/// Puts `n` member keys directly under `queue` (a mutex's is its name) that this crate did not
/// put (as etcdctl's or another client's holders): they announce nothing, so a waiter behind
/// them waits for their deletions. Returns them, oldest first.
async fn foreign_members(observer: &Client, queue: &str, n: usize) -> Vec<String> {
    foreign_members_named(observer, queue, "f", n).await
}

/// As [`foreign_members`], their names starting with `stem` (`<queue>/<stem>NNN`).
async fn foreign_members_named(
    observer: &Client,
    queue: &str,
    stem: &str,
    n: usize,
) -> Vec<String> {
    let mut keys = Vec::new();
    for i in 0..n {
        let key = format!("{queue}/{stem}{i:03}");
        observer.clone().put(key.as_str(), "", None).await.unwrap();
        keys.push(key);
    }
    keys
}

/// Deletes `keys` in a scrambled order (not oldest or newest first), so that a waiter is woken
/// by some of them and re-decides each time.
async fn delete_scrambled(observer: &Client, keys: &[String]) {
    let n = keys.len();
    for i in 0..n {
        let key = &keys[(i * 37 + 11) % n];
        observer.clone().delete(key.as_str(), None).await.unwrap();
    }
}

fn ttl() -> SessionOptions {
    SessionOptions::new().with_ttl(Duration::from_secs(30))
}

/// Who holds, in the order they got through.
type Order = Arc<StdMutex<Vec<&'static str>>>;

/// A waiter in the background: through `acquire`, it records `who` in `order`, holds until
/// told, then releases through `release`. Its sender, and its task (to abort it: it gives up).
fn hold_until_told<G, A, R, RF>(
    who: &'static str,
    order: &Order,
    acquire: A,
    release: R,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>)
where
    G: Send + 'static,
    A: Future<Output = Result<G, etcd_coord::Error>> + Send + 'static,
    R: FnOnce(G) -> RF + Send + 'static,
    RF: Future<Output = Result<(), etcd_coord::Error>> + Send,
{
    let (tx, rx) = oneshot::channel::<()>();
    let order = Arc::clone(order);
    let task = tokio::spawn(async move {
        let guard = acquire.await.unwrap();
        order.lock().unwrap().push(who);
        let _ = rx.await;
        release(guard).await.unwrap();
    });
    (tx, task)
}

/// Locks `name` through `s` in the background (see [`hold_until_told`]).
fn lock_until_told(
    s: &LeasedSession,
    name: &str,
    who: &'static str,
    order: &Order,
) -> oneshot::Sender<()> {
    let mutex = Mutex::new(s, name);
    let acquire = async move { mutex.lock().await };
    hold_until_told(who, order, acquire, |g| g.release()).0
}

/// A session and two siblings of it (one watch stream, one mirror), reaching etcd through
/// `proxy` if given.
async fn three_siblings(etcd: &TestEtcd, proxy: Option<&FaultProxy>) -> [LeasedSession; 3] {
    let a = match proxy {
        Some(proxy) => session_via(proxy, ttl()).await,
        None => session(etcd, 30).await,
    };
    let b = a.sibling(ttl()).await.unwrap();
    let c = a.sibling(ttl()).await.unwrap();
    [a, b, c]
}

/// Waits until `s` (`who`) has decided from its session's mirror.
async fn decided_from_the_mirror(s: &LeasedSession, who: &str) {
    assert!(
        eventually(Duration::from_secs(5), || async {
            s.metrics().mirrored_decisions >= 1
        })
        .await,
        "{who} did not decide from the mirror: {:?}",
        s.metrics()
    );
}

/// The waiters hold one at a time, in `expected`'s order, each after the one before released
/// (`release`, in the same order).
async fn one_at_a_time_in_order(
    order: &Order,
    mut release: Vec<oneshot::Sender<()>>,
    expected: &[&str],
) {
    for n in 1..=expected.len() {
        assert!(
            eventually(Duration::from_secs(10), || async {
                holders(order).len() == n
            })
            .await,
            "{:?} should hold by now: {:?}",
            &expected[..n],
            holders(order)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(holders(order), expected[..n], "one at a time, in order");
        let _ = release.remove(0).send(());
    }
}

/// No waiter holds while `last` — a member ahead of all of them — exists; then it goes.
async fn nobody_holds_until_it_goes(observer: &Client, order: &Order, last: &str) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(holders(order), Vec::<&str>::new(), "through past a member");
    observer.clone().delete(last, None).await.unwrap();
}

fn holders(order: &Order) -> Vec<&'static str> {
    order.lock().unwrap().clone()
}

/// Three waiters of sibling sessions (one watch stream) behind 80 members: the first builds
/// the mirror with one read, the next two decide from it with no read at all; none goes
/// through while a single member is ahead of it, however the members ahead go; then they go
/// through one at a time, in their order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_behind_a_long_line_decide_from_the_mirror_and_go_through_one_at_a_time_in_order() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("long-line");
    let ahead = foreign_members(&observer, &name, LONG).await;
    let [a, b, c] = three_siblings(&etcd, None).await;
    let order: Order = Arc::default();
    let mut release = Vec::new();
    for (s, who) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        release.push(lock_until_told(s, &name, who, &order));
        decided_from_the_mirror(s, who).await;
    }
    assert_eq!(a.metrics().reads, 1, "the mirror is built by one read");
    for s in [&b, &c] {
        assert_eq!(s.metrics().reads, 0, "a sibling reads nothing");
    }
    // Every member ahead but one goes; the waiters re-decide as they are woken.
    delete_scrambled(&observer, &ahead[1..]).await;
    nobody_holds_until_it_goes(&observer, &order, &ahead[0]).await;
    one_at_a_time_in_order(&order, release, &["a", "b", "c"]).await;
}

/// A waiter whose lookup in the mirror finds a waiter of its own session's family just ahead
/// (a key put after the mirror was built) waits for it, not past it: the mirror holds every
/// put since its read. A semaphore of 3 permits: behind 80 members, no one holds until fewer
/// than 3 keys are ahead of it; then exactly the permits' worth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphore_waiters_behind_a_long_line_hold_exactly_the_free_permits() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("long-sem");
    // A semaphore's members live under `<name>/#semaphore/`.
    let ahead = foreign_members(&observer, &format!("{name}/#semaphore"), LONG).await;
    let [a, b, c] = three_siblings(&etcd, None).await;
    let order: Order = Arc::default();
    let mut release = Vec::new();
    for (s, who) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        let semaphore = Semaphore::new(s, &name, 3);
        let acquire = async move { semaphore.acquire().await };
        release.push(hold_until_told(who, &order, acquire, |p| p.release()).0);
        decided_from_the_mirror(s, who).await;
    }
    // One member left ahead of all three: a (1 ahead) and b (2 ahead) hold, c (3 ahead) waits.
    delete_scrambled(&observer, &ahead[1..]).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            holders(&order).len() == 2
        })
        .await,
        "a and b should hold: {:?}",
        holders(&order)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        holders(&order),
        ["a", "b"],
        "more holders than free permits"
    );
    let _ = release.remove(0).send(()); // a releases: c holds
    assert!(
        eventually(Duration::from_secs(5), || async {
            holders(&order).len() == 3
        })
        .await,
        "c should hold: {:?}",
        holders(&order)
    );
    assert_eq!(holders(&order), ["a", "b", "c"]);
}

/// A lock behind a long line, dropped at every await point it reaches — while its session's
/// mirror is being opened, built (its read in flight), or waited for — leaves no key behind,
/// no task running, and no mirror half-built: the next lock of the session still decides from
/// a whole one, and waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_dropped_anywhere_in_its_line_up_leaves_nothing_behind() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("long-cancel");
    let ahead = foreign_members(&observer, &name, LONG).await;
    let s = session(&etcd, 30).await;
    let lease = s.lease_id();
    let ended = drop_at_every_await(
        || {
            let mutex = Mutex::new(&s, &name);
            async move { mutex.lock().await }
        },
        async |driven, step| {
            let what = format!("dropped at {step:?}: {driven:?}");
            drop(driven);
            s.settled().await;
            assert!(
                eventually(Duration::from_secs(5), || async {
                    keys_on_lease(&observer, lease).await.is_empty()
                })
                .await,
                "{what}: left {:?}",
                keys_on_lease(&observer, lease).await
            );
            assert_eq!(keys_under(&observer, &name).await, ahead, "{what}");
            only_its_own_task_runs(&s).await;
        },
    )
    .await;
    assert!(
        matches!(ended, Ended::Waiting { polls } if polls >= 3),
        "{ended:?}"
    );
    // Whatever the drops left, the session's next lock decides from a whole mirror: it waits
    // behind the 80 members.
    let before = s.metrics().mirrored_decisions;
    let next = tokio::spawn({
        let mutex = Mutex::new(&s, &name);
        async move { mutex.lock().await }
    });
    assert!(
        eventually(Duration::from_secs(5), || async {
            s.metrics().mirrored_decisions > before
        })
        .await,
        "{:?}",
        s.metrics()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!next.is_finished(), "through past 80 members");
    next.abort();
}

/// A waiter that lined up while the line was short (its enqueue read the whole line) reads the
/// line again after a wake-up — from the mirror, once its session has one: when the line has
/// grown long behind it and a later waiter of the session built the mirror, no re-read costs
/// etcd the whole queue. And it still waits for every member ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_from_a_short_line_decides_from_the_mirror_once_its_session_has_one() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("grown-line");
    // 20 members ahead: the enqueue's page holds them all, too many to count.
    let ahead = foreign_members(&observer, &name, 20).await;
    let w = session(&etcd, 30).await;
    let order: Order = Arc::default();
    let _release_w = lock_until_told(&w, &name, "w", &order);
    assert!(
        eventually(Duration::from_secs(5), || async {
            keys_under(&observer, &name).await.len() == ahead.len() + 1
        })
        .await
    );
    // The line grows long behind it; a waiter of a sibling session builds the mirror.
    foreign_members_named(&observer, &name, "h", LONG).await;
    let x = w.sibling(ttl()).await.unwrap();
    let _release_x = lock_until_told(&x, &name, "x", &order);
    decided_from_the_mirror(&x, "x").await;
    assert_eq!(w.metrics().mirrored_decisions, 0);
    // The member just ahead of w goes: w re-decides, from the mirror, and waits on.
    observer
        .clone()
        .delete(ahead[19].as_str(), None)
        .await
        .unwrap();
    decided_from_the_mirror(&w, "w, woken,").await;
    delete_scrambled(&observer, &ahead[1..19]).await;
    nobody_holds_until_it_goes(&observer, &order, &ahead[0]).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            holders(&order) == ["w"]
        })
        .await,
        "{:?}",
        holders(&order)
    );
}

/// The stream that keeps the mirror is cut (every connection reset) while three waiters of
/// sibling sessions wait behind a long line: the mirror goes with it, the waiters decide again
/// (from a mirror built anew, or a read), and still none goes through past a member; then they
/// go through one at a time, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_whose_mirror_is_lost_with_its_stream_still_go_through_in_order() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let proxy = proxy(&etcd).await;
    let name = unique("long-reset");
    let ahead = foreign_members(&observer, &name, LONG).await;
    let [a, b, c] = three_siblings(&etcd, Some(&proxy)).await;
    let order: Order = Arc::default();
    let mut release = Vec::new();
    for (s, who) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        release.push(lock_until_told(s, &name, who, &order));
        decided_from_the_mirror(s, who).await;
    }
    let streams = a.metrics().watch_streams;
    proxy.reset_peer();
    // Half the members ahead go while the stream is being opened again.
    delete_scrambled(&observer, &ahead[LONG / 2..]).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            a.metrics().watch_streams > streams
        })
        .await,
        "the stream was not opened again: {:?}",
        a.metrics()
    );
    delete_scrambled(&observer, &ahead[1..LONG / 2]).await;
    nobody_holds_until_it_goes(&observer, &order, &ahead[0]).await;
    one_at_a_time_in_order(&order, release, &["a", "b", "c"]).await;
}

/// Writers of a read/write lock behind a long line: their waits (on the lock's whole
/// directory, beside their pointers) and the mirror (of the lock's members) are two scopes
/// of one stream. A writer ahead that gives up wakes the one behind it, which decides again
/// from the mirror — once the mirror has applied that change — and still waits for every
/// member ahead; then they go through one at a time, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rwlock_writers_behind_a_long_line_go_through_in_order_when_one_gives_up() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("long-rw");
    // A read/write lock's members live under `<name>/#rwlock/`.
    let ahead = foreign_members(&observer, &format!("{name}/#rwlock"), LONG).await;
    let [a, b, c] = three_siblings(&etcd, None).await;
    let order: Order = Arc::default();
    let mut waits = Vec::new();
    let mut release = Vec::new();
    for (s, who) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        let rw = etcd_coord::RwLock::new(s, &name);
        let acquire = async move { rw.write().await };
        let (tx, task) = hold_until_told(who, &order, acquire, |g| g.release());
        release.push(tx);
        waits.push(task);
        decided_from_the_mirror(s, who).await;
    }
    delete_scrambled(&observer, &ahead[1..]).await;
    // a gives up: its key goes without announcing anything to b.
    waits.remove(0).abort();
    a.settled().await;
    nobody_holds_until_it_goes(&observer, &order, &ahead[0]).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            holders(&order) == ["b"]
        })
        .await,
        "{:?}",
        holders(&order)
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(holders(&order), ["b"], "one at a time");
    let _ = release.remove(1).send(()); // b releases
    assert!(
        eventually(Duration::from_secs(5), || async {
            holders(&order) == ["b", "c"]
        })
        .await,
        "{:?}",
        holders(&order)
    );
}
