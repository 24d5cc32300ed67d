//! Hand-offs without a read, and the shared watch stream (docs/design.md, "Announced
//! hand-offs" and "Counted hand-offs"), against real etcd. A waiter that saw the whole short
//! queue ahead of it counts the deletions of those keys and holds at the one that deletes the
//! last; behind a longer queue it puts a pointer beside the queue that our holder's release
//! deletes in the same Txn as its key, and takes exactly that — both deletions at one
//! revision, while its own key is still its own — as the hand-off. Either way nothing else lets
//! it through early: a waiter ahead that gives up, an expiry, a delete by hand (even with
//! `--prefix`) leave a key ahead to wait for, or make it read again. Every test runs both ways.

mod common;

use std::time::Duration;

use common::*;
use etcd_client::{DeleteOptions, Txn, TxnOp};
use etcd_coord::{Error, LeasedSession, Mutex, MutexGuard};
use etcd_coord_testkit::TestEtcd;
use tokio::task::JoinHandle;

/// Which way a waiter learns of its hand-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// The queue is short and the waiter saw it whole: it counts the deletions ahead.
    Counted,
    /// The queue looks long (`pad_with_nested_keys`): the waiter follows the key just ahead and
    /// announces itself to it.
    Announced,
}

const BOTH: [Path; 2] = [Path::Counted, Path::Announced];

/// A holder, then a first and a second waiter behind it, each on its own session; the queue's
/// member keys in order. On the announced path the second waiter announced itself to the
/// first, the first to the holder; on the counted path nobody put a pointer.
struct Line {
    holder: MutexGuard,
    first: JoinHandle<Result<MutexGuard, Error>>,
    second: JoinHandle<Result<MutexGuard, Error>>,
    first_session: LeasedSession,
    _second_session: LeasedSession,
    members: Vec<String>,
}

async fn line(etcd: &TestEtcd, observer: &etcd_client::Client, name: &str, path: Path) -> Line {
    if path == Path::Announced {
        pad_with_nested_keys(observer, name).await;
    }
    let (h, a, b) = (
        session(etcd, 30).await,
        session(etcd, 30).await,
        session(etcd, 30).await,
    );
    let holder = Mutex::new(&h, name).lock().await.unwrap();
    std::mem::forget(h); // the guard keeps what it needs; the session lives on with it
    let m = Mutex::new(&a, name);
    let first = tokio::spawn(async move { m.lock().await });
    assert!(members_are(observer, name, 2).await);
    let m = Mutex::new(&b, name);
    let second = tokio::spawn(async move { m.lock().await });
    assert!(members_are(observer, name, 3).await);
    pointers_settle(observer, name, path, 2).await;
    Line {
        holder,
        first,
        second,
        first_session: a,
        _second_session: b,
        members: members(observer, name).await,
    }
}

/// A holder and one waiter behind it, each on its own session (the waiter's is returned), the
/// waiter's pointer in place on the announced path.
async fn holder_and_waiter(
    etcd: &TestEtcd,
    observer: &etcd_client::Client,
    name: &str,
    path: Path,
) -> (
    LeasedSession,
    MutexGuard,
    JoinHandle<Result<MutexGuard, Error>>,
) {
    if path == Path::Announced {
        pad_with_nested_keys(observer, name).await;
    }
    let (h, w) = (session(etcd, 30).await, session(etcd, 30).await);
    let held = Mutex::new(&h, name).lock().await.unwrap();
    let m = Mutex::new(&w, name);
    let waiting = tokio::spawn(async move { m.lock().await });
    assert!(members_are(observer, name, 2).await);
    pointers_settle(observer, name, path, 1).await;
    (w, held, waiting)
}

/// Once the waiter of session `w` settled, runs `hand_off` (a release of the lock it waits
/// for, or the like) and returns the guard `waiting` got — it must have taken over with no
/// request of its own — with what `hand_off` returned.
async fn taken_over_without_a_read<T>(
    w: &LeasedSession,
    waiting: JoinHandle<Result<MutexGuard, Error>>,
    path: Path,
    hand_off: impl std::future::Future<Output = T>,
) -> (MutexGuard, T) {
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = w.metrics();
    let handed = hand_off.await;
    let guard = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("handed over")
        .unwrap()
        .unwrap();
    let after = w.metrics();
    assert_eq!(
        after.txns - before.txns,
        0,
        "{path:?}: the waiter read again to take over: {before:?} → {after:?}"
    );
    (guard, handed)
}

/// On the announced path, waits until `announced` pointers are in place; on the counted path,
/// gives the waiters time to put any, and asserts that none did.
async fn pointers_settle(observer: &etcd_client::Client, name: &str, path: Path, announced: usize) {
    match path {
        Path::Announced => assert!(
            eventually(Duration::from_secs(5), || async {
                pointers(observer, name).await.len() == announced
            })
            .await,
            "{:?}",
            members(observer, name).await
        ),
        Path::Counted => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(pointers(observer, name).await, Vec::<String>::new());
        }
    }
}

/// The lock's member keys, in create order (a nested name's keys and pointers left out).
async fn members(observer: &etcd_client::Client, name: &str) -> Vec<String> {
    members_under(observer, name)
        .await
        .into_iter()
        .filter(|k| !is_pad(k))
        .collect()
}

async fn members_are(observer: &etcd_client::Client, name: &str, n: usize) -> bool {
    eventually(Duration::from_secs(5), || async {
        members(observer, name).await.len() == n
    })
    .await
}

async fn pointers(observer: &etcd_client::Client, name: &str) -> Vec<String> {
    keys_under(observer, name)
        .await
        .into_iter()
        .filter(|k| is_pointer(k))
        .collect()
}

/// The second waiter is still waiting a while after the first one's key went without a
/// release, and gets the lock once the holder lets go.
async fn second_waits_for_the_holder(line: Line) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !line.second.is_finished(),
        "the second waiter went through while the holder held: {:?}",
        line.second.await
    );
    line.holder.release().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), line.second)
        .await
        .expect("the second waiter gets the lock once the holder let go")
        .unwrap();
    assert!(got.is_ok(), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_predecessor_gives_up_waits_on_for_the_holder() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    for path in BOTH {
        let name = unique("gives-up");
        let line = line(&etcd, &observer, &name, path).await;
        line.first.abort(); // its key goes in the background, alone
        assert!(members_are(&observer, &name, 2).await, "{path:?}");
        second_waits_for_the_holder(line).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_predecessor_expires_waits_on_for_the_holder() {
    let etcd = etcd().await;
    let mut observer = client(&etcd).await;
    for path in BOTH {
        let name = unique("expires");
        let line = line(&etcd, &observer, &name, path).await;
        observer
            .lease_revoke(line.first_session.lease_id())
            .await
            .unwrap();
        assert!(members_are(&observer, &name, 2).await, "{path:?}");
        second_waits_for_the_holder(line).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_key_ahead_with_every_key_under_it_is_no_release() {
    let etcd = etcd().await;
    let mut observer = client(&etcd).await;
    for path in BOTH {
        let name = unique("del-prefix");
        let line = line(&etcd, &observer, &name, path).await;
        // `etcdctl del --prefix <first waiter's key>`: a cleanup by hand, not a hand-off.
        observer
            .delete(
                line.members[1].as_str(),
                Some(DeleteOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        assert!(members_are(&observer, &name, 2).await, "{path:?}");
        second_waits_for_the_holder(line).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_takes_the_waiters_own_key_with_it_is_a_loss_not_a_hand_off() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    for path in BOTH {
        let name = unique("release-and-loss");
        let line = line(&etcd, &observer, &name, path).await;
        // One Txn, one revision: the holder's key with the pointers to it (what a release
        // does) and the first waiter's own key.
        let mut ops = vec![
            TxnOp::delete(line.members[0].as_str(), None),
            TxnOp::delete(line.members[1].as_str(), None),
        ];
        if path == Path::Announced {
            let to_holder = pointers(&observer, &name)
                .await
                .into_iter()
                .find(|p| p.contains(line.members[0].rsplit('#').next().unwrap()))
                .expect("the first waiter's pointer to the holder");
            ops.push(TxnOp::delete(to_holder.as_str(), None));
        }
        observer
            .clone()
            .txn(Txn::new().and_then(ops))
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), line.first)
            .await
            .expect("the first waiter stops")
            .unwrap();
        assert!(
            matches!(got, Err(Error::LockLost { ref key, .. }) if *key == line.members[1]),
            "{path:?}: {got:?}"
        );
        drop(line.holder);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_off_between_our_holders_reads_nothing_and_leaves_no_pointer() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    for path in BOTH {
        let name = unique("no-read");
        let (w, held, waiting) = holder_and_waiter(&etcd, &observer, &name, path).await;
        let (guard, ()) = taken_over_without_a_read(&w, waiting, path, async {
            held.release().await.unwrap();
        })
        .await;
        assert_eq!(pointers(&observer, &name).await, Vec::<String>::new());
        assert_eq!(
            members(&observer, &name).await,
            vec![guard.key().to_owned()]
        );
        // Its token is its key's create revision, as for any holder.
        let kv = observer
            .clone()
            .get(guard.key(), None)
            .await
            .unwrap()
            .kvs()
            .first()
            .cloned()
            .expect("the holder's key");
        assert_eq!(guard.fencing_token(), kv.create_revision());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_of_sibling_sessions_share_one_watch_stream_and_one_watch_per_lock() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    for path in BOTH {
        let name = unique("siblings");
        if path == Path::Announced {
            pad_with_nested_keys(&observer, &name).await;
        }
        let first = session(&etcd, 30).await;
        let held = Mutex::new(&first, &name).lock().await.unwrap();
        let mut sessions = vec![first.clone()];
        for _ in 0..7 {
            sessions.push(first.sibling(Default::default()).await.unwrap());
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for s in &sessions[1..] {
            let (m, tx) = (Mutex::new(s, &name), tx.clone());
            tokio::spawn(async move {
                let _ = tx.send(m.lock().await);
            });
        }
        assert!(members_are(&observer, &name, 8).await);
        pointers_settle(&observer, &name, path, 7).await;
        let total = |f: fn(&etcd_coord::SessionMetrics) -> u64| -> u64 {
            sessions.iter().map(|s| f(&s.metrics())).sum()
        };
        assert_eq!(
            total(|m| m.watch_streams),
            1,
            "{path:?}: one stream for all seven waits"
        );
        assert_eq!(
            total(|m| m.watches),
            1,
            "{path:?}: one watch of the lock for all seven waits"
        );
        // Every one gets the lock in turn, through that stream.
        let mut guard = held;
        for _ in 0..7 {
            guard.release().await.unwrap();
            guard = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("the next waiter gets the lock")
                .unwrap()
                .unwrap();
        }
        guard.release().await.unwrap();
        assert_eq!(total(|m| m.watch_streams), 1, "{path:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_on_a_lock_the_session_already_watches_registers_no_watch() {
    let etcd = etcd().await;
    let name = unique("lingers");
    let (h, w) = (session(&etcd, 30).await, session(&etcd, 30).await);
    let m = Mutex::new(&w, &name);
    for round in 0..3 {
        let held = Mutex::new(&h, &name).lock().await.unwrap();
        let waiting = tokio::spawn({
            let m = m.clone();
            async move { m.lock().await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        held.release().await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        got.release().await.unwrap();
        assert_eq!(
            (w.metrics().watches, w.metrics().watch_streams),
            (1, 1),
            "round {round}: the lock's watch was registered again"
        );
    }
}

/// A queue longer than the enqueue's first page (64 keys, read in key order, which is not the
/// order of arrival) is read again, sorted, before a waiter decides: every waiter still gets
/// the lock in the order it queued, one at a time. (Deciding from the enqueue's partial page
/// would follow a key that is not the one just ahead, and two would hold at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_longer_than_the_enqueue_page_is_served_in_order_one_at_a_time() {
    const WAITERS: usize = 80;
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("long-queue");
    let first = session(&etcd, 30).await;
    let holder = Mutex::new(&first, &name).lock().await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let holding = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut sessions = Vec::new();
    for i in 0..WAITERS {
        let s = first
            .sibling(etcd_coord::SessionOptions::new().with_ttl(Duration::from_secs(30)))
            .await
            .unwrap();
        let (m, tx, holding) = (Mutex::new(&s, &name), tx.clone(), holding.clone());
        tokio::spawn(async move {
            let guard = m.lock().await.unwrap();
            let others = holding.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(2)).await;
            holding.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            let _ = tx.send((i, others));
            guard.release().await.unwrap();
        });
        sessions.push(s);
        // Queued in this order: wait until this waiter's key is in place.
        assert!(members_are(&observer, &name, i + 2).await, "waiter {i}");
    }
    holder.release().await.unwrap();
    let mut order = Vec::new();
    for _ in 0..WAITERS {
        let (i, others) = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("every waiter gets the lock")
            .unwrap();
        assert_eq!(others, 0, "waiter {i} held while another did");
        order.push(i);
    }
    assert_eq!(order, (0..WAITERS).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeue_hands_off_as_a_release_does_without_a_read_both_ways() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    for path in BOTH {
        let name = unique("requeue-handoff");
        let (w, held, waiting) = holder_and_waiter(&etcd, &observer, &name, path).await;
        let (held_key, held_token) = (held.key().to_owned(), held.fencing_token());
        // The waiter's pointer to the held key (announced path only).
        let announced = pointers(&observer, &name).await;
        // The hand-off starts the requeue, which only returns once the waiter let go.
        #[allow(clippy::async_yields_async)]
        let hand_off = async { tokio::spawn(held.requeue()) };
        let (guard, requeue) = taken_over_without_a_read(&w, waiting, path, hand_off).await;
        let released_at = deletion_revision(&observer, &held_key, held_token).await;
        for pointer in &announced {
            assert_eq!(
                deletion_revision(&observer, pointer, held_token).await,
                released_at,
                "{path:?}: the pointer to the held key went at another revision"
            );
        }
        guard.release().await.unwrap();
        let again = tokio::time::timeout(Duration::from_secs(5), requeue)
            .await
            .expect("holds again once the waiter let go")
            .unwrap()
            .unwrap();
        assert_eq!(again.fencing_token(), released_at, "{path:?}: two writes");
        assert_eq!(
            members(&observer, &name).await,
            vec![again.key().to_owned()]
        );
        again.release().await.unwrap();
        assert_eq!(pointers(&observer, &name).await, Vec::<String>::new());
    }
}

/// Sessions that wait for a sibling's write for as long as a test may take.
fn lingering() -> etcd_coord::SessionOptions {
    etcd_coord::SessionOptions::new()
        .with_ttl(Duration::from_secs(30))
        .with_linger(Duration::from_secs(60))
}

/// The lock's member keys at `revision`.
async fn members_at(observer: &etcd_client::Client, name: &str, revision: i64) -> Vec<String> {
    let options = etcd_client::GetOptions::new()
        .with_prefix()
        .with_keys_only()
        .with_revision(revision);
    observer
        .kv_client()
        .get(name, Some(options))
        .await
        .unwrap()
        .kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap().to_owned())
        .filter(|k| !is_pad(k) && !is_pointer(k))
        .collect()
}

/// A `lock()` while a sibling holds waits for the sibling's release and goes in its Txn,
/// after it: one revision deletes the holder's key and creates the new one, which is
/// through at once (its read ran after the release).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_while_a_sibling_holds_goes_in_the_siblings_release_and_holds_at_its_revision() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("merged");
    let holder = LeasedSession::new(client(&etcd).await, lingering())
        .await
        .unwrap();
    let sibling = holder.sibling(lingering()).await.unwrap();
    let held = Mutex::new(&holder, &name).lock().await.unwrap();
    let held_key = members(&observer, &name).await;
    let m = Mutex::new(&sibling, &name);
    let waiting = tokio::spawn(async move { m.lock().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        members(&observer, &name).await,
        held_key,
        "the enqueue waits for the sibling's write"
    );
    held.release().await.unwrap();
    let guard = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("through with the release")
        .unwrap()
        .unwrap();
    let revision = guard.fencing_token();
    assert_eq!(members_at(&observer, &name, revision - 1).await, held_key);
    let now = members_at(&observer, &name, revision).await;
    assert_eq!(
        now.len(),
        1,
        "one Txn deleted the held key and put the new one"
    );
    assert_ne!(now, held_key);
    guard.release().await.unwrap();
}

/// An enqueue with no sibling in its queue never waits: a lock held by another connection's
/// session is queued for at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_with_no_sibling_in_its_queue_is_queued_for_at_once() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("alone");
    let other = session(&etcd, 30).await;
    let held = Mutex::new(&other, &name).lock().await.unwrap();
    let lone = LeasedSession::new(client(&etcd).await, lingering())
        .await
        .unwrap();
    queued_at_once_then_through(&observer, &name, held, Mutex::new(&lone, &name)).await;
}

/// `m.lock()` (on a session that would linger a minute) is queued for at once behind `held`,
/// and through once `held` is released.
async fn queued_at_once_then_through(
    observer: &etcd_client::Client,
    name: &str,
    held: MutexGuard,
    m: Mutex,
) {
    let waiting = tokio::spawn(async move { m.lock().await });
    assert!(members_are(observer, name, 2).await, "queued for at once");
    held.release().await.unwrap();
    let guard = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("through")
        .unwrap()
        .unwrap();
    guard.release().await.unwrap();
}

/// A session's own other member in the queue is no sibling's: a second `lock()` of the session
/// that holds is queued for at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_whose_queue_holds_only_its_own_sessions_member_is_queued_for_at_once() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("own");
    let own = LeasedSession::new(client(&etcd).await, lingering())
        .await
        .unwrap();
    let _sibling = own.sibling(lingering()).await.unwrap(); // in no queue
    let m = Mutex::new(&own, &name);
    let held = m.lock().await.unwrap();
    queued_at_once_then_through(&observer, &name, held, m).await;
}

/// Siblings' enqueues waiting at one moment for a sibling's release never share a Txn (each
/// depends on the queue another puts a key in): one goes with the release, the others wait
/// for the next; every one holds in turn, alone, with a fencing token of its own — behind a
/// short line, where each reads the queue, and behind a long one, where each decides from
/// the session's mirror of it and reads nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn siblings_waiting_together_for_a_release_hold_one_at_a_time_with_tokens_of_their_own() {
    for line in [0, 72] {
        siblings_waiting_together(line).await;
    }
}

/// Spawns an acquisition through `acquire` that, once through, is counted in `holding` for
/// `hold` and then released with `release`: it returns how many were counted holding as it
/// got in (0: it held alone) and its fencing token.
fn held_in_turn<G, F, R>(
    acquire: F,
    holding: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
    hold: Duration,
    release: impl FnOnce(G) -> R + Send + 'static,
) -> JoinHandle<Result<(usize, i64), Error>>
where
    G: std::ops::Deref<Target = etcd_coord::Fence> + Send + 'static,
    F: std::future::Future<Output = Result<G, Error>> + Send + 'static,
    R: std::future::Future<Output = Result<(), Error>> + Send,
{
    let holding = std::sync::Arc::clone(holding);
    tokio::spawn(async move {
        let guard = acquire.await?;
        let before = holding.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if !hold.is_zero() {
            tokio::time::sleep(hold).await;
        }
        holding.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        let token = guard.fencing_token();
        release(guard).await?;
        Ok((before, token))
    })
}

/// [`siblings_waiting_together_for_a_release_hold_one_at_a_time_with_tokens_of_their_own`]
/// behind `line` sibling waiters lined up one by one first.
async fn siblings_waiting_together(line: usize) {
    const WAITERS: usize = 4;
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("merged-many");
    let holder = LeasedSession::new(client(&etcd).await, lingering())
        .await
        .unwrap();
    let held = Mutex::new(&holder, &name).lock().await.unwrap();
    let holding = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut waiters = Vec::new();
    let mut lined = Vec::new();
    for i in 0..line {
        // Lined up one by one: each lingers the default 2 ms, then goes alone.
        let options = etcd_coord::SessionOptions::new().with_ttl(Duration::from_secs(30));
        let m = Mutex::new(&holder.sibling(options).await.unwrap(), &name);
        lined.push(held_in_turn(
            async move { m.lock().await },
            &holding,
            Duration::ZERO,
            MutexGuard::release,
        ));
        assert!(members_are(&observer, &name, i + 2).await, "waiter {i}");
    }
    for _ in 0..WAITERS {
        let m = Mutex::new(&holder.sibling(lingering()).await.unwrap(), &name);
        waiters.push(held_in_turn(
            async move { m.lock().await },
            &holding,
            Duration::from_millis(50),
            MutexGuard::release,
        ));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        members(&observer, &name).await.len(),
        line + 1,
        "all wait to go with a write"
    );
    held.release().await.unwrap();
    let mut tokens = Vec::new();
    for waiter in lined.into_iter().chain(waiters) {
        let (at_once, token) = tokio::time::timeout(Duration::from_secs(20), waiter)
            .await
            .expect("every one holds in turn")
            .unwrap()
            .unwrap();
        assert_eq!(at_once, 0, "two held at once (behind {line})");
        tokens.push(token);
    }
    tokens.sort();
    tokens.dedup();
    assert_eq!(
        tokens.len(),
        line + WAITERS,
        "fencing tokens shared (behind {line})"
    );
}

/// A semaphore shares the engine's merged writes: while sibling sessions hold all its
/// permits (and not before), siblings' `acquire()`s wait to go with a release; each release
/// carries one of them, which holds at the release's revision; never more hold than there are
/// permits, and every permit has a fencing token of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn siblings_acquiring_a_full_semaphore_go_in_releases_and_never_exceed_its_permits() {
    use etcd_coord::Semaphore;
    const PERMITS: usize = 3;
    const WAITERS: usize = 4;
    init_tracing();
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("merged-semaphore");
    let queue = format!("{name}/#semaphore/");
    let first = LeasedSession::new(client(&etcd).await, lingering())
        .await
        .unwrap();
    let holding = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut held = Vec::new();
    for i in 0..PERMITS {
        // With a permit free for all the family knows, an acquisition lingers for nothing.
        let sibling = first.sibling(lingering()).await.unwrap();
        let acquired = tokio::time::timeout(
            Duration::from_secs(5),
            Semaphore::new(&sibling, &name, PERMITS).acquire(),
        )
        .await
        .unwrap_or_else(|_| panic!("permit {i} of {PERMITS} waited for a sibling's write"));
        held.push(acquired.unwrap());
        holding.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    let mut waiters = Vec::new();
    for _ in 0..WAITERS {
        let s = Semaphore::new(&first.sibling(lingering()).await.unwrap(), &name, PERMITS);
        waiters.push(held_in_turn(
            async move { s.acquire().await },
            &holding,
            Duration::from_millis(50),
            etcd_coord::SemaphorePermit::release,
        ));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let full = members(&observer, &queue).await;
    assert_eq!(
        full.len(),
        PERMITS,
        "the acquisitions wait to go with a write"
    );

    // One release carries one acquisition, which holds at its revision.
    let released = held.remove(0);
    let released_key = released.key().to_owned();
    holding.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    released.release().await.unwrap();
    let mut tokens: Vec<i64> = held.iter().map(|p| p.fencing_token()).collect();

    // The others go with the releases of those that got in, one permit among them.
    for waiter in waiters {
        let (before, token) = tokio::time::timeout(Duration::from_secs(20), waiter)
            .await
            .expect("every acquisition holds in turn")
            .unwrap()
            .unwrap();
        assert!(before < PERMITS, "{} held at once", before + 1);
        tokens.push(token);
    }
    for permit in held {
        permit.release().await.unwrap();
    }
    // The first to get in was created by the release's Txn.
    let first_in = tokens[PERMITS - 1..].iter().min().copied().unwrap();
    let before = members_at(&observer, &queue, first_in - 1).await;
    assert!(before.contains(&released_key), "{before:?}");
    let at = members_at(&observer, &queue, first_in).await;
    assert!(
        !at.contains(&released_key) && at.len() == PERMITS,
        "released in the Txn that let the next in: {at:?}"
    );
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), PERMITS - 1 + WAITERS, "fencing tokens shared");
}

/// A read lock among sibling readers goes through at once, as a lock of another name does:
/// readers do not block it, so it waits for no sibling's write; a write lock behind them
/// waits to go with a release, and so does a read lock behind a sibling's write lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_lock_among_sibling_readers_waits_for_no_write_and_one_behind_a_writer_does() {
    use etcd_coord::RwLock;
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("merged-rwlock");
    let first = LeasedSession::new(client(&etcd).await, lingering())
        .await
        .unwrap();
    let reading = RwLock::new(&first, &name).read().await.unwrap();
    let sibling = first.sibling(lingering()).await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(5), RwLock::new(&sibling, &name).read())
        .await
        .expect("a read lock among readers waits for no sibling's write")
        .unwrap();
    let queue = format!("{name}/#rwlock/");
    assert_eq!(members(&observer, &queue).await.len(), 2);
    let writer = RwLock::new(&first.sibling(lingering()).await.unwrap(), &name);
    let writing = tokio::spawn(async move { writer.write().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        members(&observer, &queue).await.len(),
        2,
        "a write lock behind sibling readers waits to go with a release"
    );
    read.release().await.unwrap();
    assert!(
        members_are(&observer, &queue, 2).await,
        "went with the release"
    );
    reading.release().await.unwrap();
    let written = tokio::time::timeout(Duration::from_secs(5), writing)
        .await
        .expect("through once the readers are gone")
        .unwrap()
        .unwrap();
    // A read lock behind a sibling's write lock waits to go with its release.
    let reader = RwLock::new(&first.sibling(lingering()).await.unwrap(), &name);
    let read_behind = tokio::spawn(async move { reader.read().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        members(&observer, &queue).await.len(),
        1,
        "a read lock behind a sibling's write lock waits to go with its release"
    );
    written.release().await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(5), read_behind)
        .await
        .expect("through with the release")
        .unwrap()
        .unwrap();
    let revision = read.fencing_token();
    assert_eq!(members_at(&observer, &queue, revision - 1).await.len(), 1);
    assert_eq!(
        members_at(&observer, &queue, revision).await.len(),
        1,
        "one Txn released the write lock and put the read lock"
    );
    read.release().await.unwrap();
}
