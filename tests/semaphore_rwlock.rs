//! `Semaphore` and `RwLock` against real etcd.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use common::*;
use etcd_coord::{Error, RwLock, Semaphore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_semaphore_never_has_more_than_its_permits_holders() {
    const PERMITS: usize = 3;
    let etcd = etcd().await;
    let name = unique("sem-limit");
    let holding = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let s = session(&etcd, 10).await;
        let (name, holding, most) = (name.clone(), Arc::clone(&holding), Arc::clone(&most));
        tasks.push(tokio::spawn(async move {
            let sem = Semaphore::new(&s, &name, PERMITS);
            for _ in 0..5 {
                let permit = sem.acquire().await.unwrap();
                let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                assert!(now <= PERMITS, "{now} holders of {PERMITS} permits");
                tokio::time::sleep(Duration::from_millis(30)).await;
                holding.fetch_sub(1, Ordering::SeqCst);
                permit.release().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        most.load(Ordering::SeqCst),
        PERMITS,
        "permits were never used in parallel"
    );
}

/// Waits until `n` keys are queued under `name`.
async fn queued(observer: &etcd_client::Client, name: &str, n: usize) {
    assert!(
        eventually(Duration::from_secs(5), || async {
            members_under(observer, name).await.len() == n
        })
        .await,
        "expected {n} queued keys, found {:?}",
        keys_under(observer, name).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphore_waiters_are_served_in_fifo_order_whichever_holder_releases() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("sem-fifo");
    let holder = session(&etcd, 30).await;
    let sem = Semaphore::new(&holder, &name, 2);
    let older = sem.acquire().await.unwrap();
    let younger = sem.acquire().await.unwrap();
    let order = Arc::new(StdMutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for i in 0..3 {
        let s = session(&etcd, 30).await;
        let (waiter_name, order) = (name.clone(), Arc::clone(&order));
        waiters.push(tokio::spawn(async move {
            let permit = Semaphore::new(&s, &waiter_name, 2).acquire().await.unwrap();
            order.lock().unwrap().push(i);
            (s, permit)
        }));
        queued(&observer, &name, 3 + i).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        order.lock().unwrap().is_empty(),
        "a waiter got a permit while both were held"
    );
    let served = |n: usize| {
        let order = Arc::clone(&order);
        async move {
            eventually(Duration::from_secs(5), || async {
                order.lock().unwrap().len() == n
            })
            .await
        }
    };
    // The younger holder leaves first: the first waiter goes through, the others wait.
    younger.release().await.unwrap();
    assert!(served(1).await, "nobody was let in after a release");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(*order.lock().unwrap(), vec![0]);
    // The newest holder (waiter 0) leaves while the oldest stays: waiter 1 next.
    let (_s0, p0) = waiters.remove(0).await.unwrap();
    p0.release().await.unwrap();
    assert!(
        served(2).await,
        "nobody was let in after the second release"
    );
    // Then the oldest holder: waiter 2.
    older.release().await.unwrap();
    assert!(served(3).await, "nobody was let in after the third release");
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
    for w in waiters {
        let _ = w.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_semaphore_waiter_goes_through_when_a_younger_holder_releases_first() {
    // Two permits held by A (older) and B; C waits. B leaves first: a permit is free, so C
    // must go through although A still holds (the n-th-key-ahead wait slept on A).
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("sem-younger");
    let (a, b, c) = (
        session(&etcd, 30).await,
        session(&etcd, 30).await,
        session(&etcd, 30).await,
    );
    let pa = Semaphore::new(&a, &name, 2).acquire().await.unwrap();
    let pb = Semaphore::new(&b, &name, 2).acquire().await.unwrap();
    let sem_c = Semaphore::new(&c, &name, 2);
    let waiter = tokio::spawn(async move { sem_c.acquire().await });
    queued(&observer, &name, 3).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "C got a permit while both were held");
    pb.release().await.unwrap();
    let pc = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("C still blocked although B released its permit")
        .unwrap()
        .unwrap();
    pa.txn_if_owner([]).await.expect("A still holds");
    pc.txn_if_owner([]).await.expect("C holds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_semaphore_waiter_is_not_stranded_when_the_waiter_ahead_of_it_is_cancelled() {
    // Two permits held by A and B; C and D wait. C gives up (its key is deleted); then A
    // leaves. D is now first in line with a free permit and must go through while B holds.
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("sem-cancelled");
    let (a, b, c, d) = (
        session(&etcd, 30).await,
        session(&etcd, 30).await,
        session(&etcd, 30).await,
        session(&etcd, 30).await,
    );
    let pa = Semaphore::new(&a, &name, 2).acquire().await.unwrap();
    let pb = Semaphore::new(&b, &name, 2).acquire().await.unwrap();
    let sem_c = Semaphore::new(&c, &name, 2);
    let waiter_c = tokio::spawn(async move { sem_c.acquire().await });
    queued(&observer, &name, 3).await;
    let sem_d = Semaphore::new(&d, &name, 2);
    let waiter_d = tokio::spawn(async move { sem_d.acquire().await });
    queued(&observer, &name, 4).await;
    waiter_c.abort();
    let _ = waiter_c.await;
    c.settled().await;
    queued(&observer, &name, 3).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiter_d.is_finished(),
        "D got a permit while both were held"
    );
    pa.release().await.unwrap();
    let pd = tokio::time::timeout(Duration::from_secs(5), waiter_d)
        .await
        .expect("D still blocked although a permit is free")
        .unwrap()
        .unwrap();
    pb.txn_if_owner([]).await.expect("B still holds");
    pd.txn_if_owner([]).await.expect("D holds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_acquire_returns_none_when_all_permits_are_taken_and_leaves_no_key() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("sem-try");
    let a = session(&etcd, 30).await;
    let b = session(&etcd, 30).await;
    let sem_a = Semaphore::new(&a, &name, 2);
    let p1 = sem_a.try_acquire().await.unwrap().expect("a free permit");
    let _p2 = sem_a
        .try_acquire()
        .await
        .unwrap()
        .expect("a second free permit");
    let sem_b = Semaphore::new(&b, &name, 2);
    assert!(sem_b.try_acquire().await.unwrap().is_none());
    b.settled().await;
    assert_eq!(keys_under(&observer, &name).await.len(), 2);
    p1.release().await.unwrap();
    assert!(sem_b.try_acquire().await.unwrap().is_some());
}

/// `acquire()` dropped at every await point it reaches (request in flight, or answered but
/// unread) leaves no key and no task behind, seen while the session lives: first with every
/// permit taken, then with one free (the drop may come after the permit was taken).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_acquire_leaves_no_key() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("sem-cancel");
    let holder = session(&etcd, 30).await;
    let held = Semaphore::new(&holder, &name, 2).acquire().await.unwrap();
    let _held_too = Semaphore::new(&holder, &name, 2).acquire().await.unwrap();
    let held_keys = keys_under(&observer, &name).await;
    let s = session(&etcd, 30).await;
    let sem = Semaphore::new(&s, &name, 2);
    let left_nothing = async |what: &str, keys: &[String]| {
        s.settled().await;
        assert_eq!(keys_under(&observer, &name).await, keys, "{what}");
        assert!(
            keys_on_lease(&observer, s.lease_id()).await.is_empty(),
            "{what}: a key left on the lease"
        );
        only_its_own_task_runs(&s).await;
    };
    let ended = drop_at_every_await(
        || sem.acquire(),
        async |driven, step| {
            assert!(
                !matches!(driven, Driven::Completed(_)),
                "a third permit of two: {driven:?}"
            );
            left_nothing(&format!("dropped at {step:?}"), &held_keys).await;
        },
    )
    .await;
    // At least the enqueue in flight, then the wait (on the session's watch of this
    // semaphore, in place since the first attempt: no watch to register any more).
    assert!(
        matches!(ended, Ended::Waiting { polls } if polls >= 2),
        "{ended:?}"
    );
    held.release().await.unwrap();
    let one_held = keys_under(&observer, &name).await;
    let ended = drop_at_every_await(
        || sem.acquire(),
        async |driven, step| {
            if let Driven::Completed(got) = driven {
                got.unwrap().release().await.unwrap();
            }
            left_nothing(&format!("dropped at {step:?} (free)"), &one_held).await;
        },
    )
    .await;
    assert!(
        matches!(ended, Ended::Completed { polls } if polls >= 2),
        "{ended:?}"
    );
}

/// Dropping a guard of `held` (taken through a session of TTL 30 s) lets `waiting`, queued
/// behind it, through within a round trip or two — not when the lease ends.
async fn dropping_it_lets_the_waiter_in_long_before_the_ttl<G, W>(
    held: impl std::future::Future<Output = G>,
    waiting: W,
) where
    G: Send + 'static,
    W: std::future::Future + Send + 'static,
    W::Output: Send + 'static,
{
    let guard = held.await;
    let waiter = tokio::spawn(async move {
        let got = waiting.await;
        (std::time::Instant::now(), got)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "went through while it was held");
    let dropped = std::time::Instant::now();
    drop(guard);
    let (through, _got) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter goes through")
        .unwrap();
    let waited = through - dropped;
    assert!(waited < Duration::from_secs(3), "hand-off took {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_permit_lets_the_next_waiter_in_long_before_the_ttl() {
    let etcd = etcd().await;
    let name = unique("drop-permit");
    let (a, b) = (session(&etcd, 30).await, session(&etcd, 30).await);
    let sem = Semaphore::new(&b, &name, 1);
    dropping_it_lets_the_waiter_in_long_before_the_ttl(
        async { Semaphore::new(&a, &name, 1).acquire().await.unwrap() },
        async move { sem.acquire().await.unwrap() },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_read_guard_lets_a_waiting_writer_in_long_before_the_ttl() {
    let etcd = etcd().await;
    let name = unique("drop-read");
    let (a, b) = (session(&etcd, 30).await, session(&etcd, 30).await);
    let lock = RwLock::new(&b, &name);
    dropping_it_lets_the_waiter_in_long_before_the_ttl(
        async { RwLock::new(&a, &name).read().await.unwrap() },
        async move { lock.write().await.unwrap() },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_write_guard_lets_a_waiting_reader_in_long_before_the_ttl() {
    let etcd = etcd().await;
    let name = unique("drop-write");
    let (a, b) = (session(&etcd, 30).await, session(&etcd, 30).await);
    let lock = RwLock::new(&b, &name);
    dropping_it_lets_the_waiter_in_long_before_the_ttl(
        async { RwLock::new(&a, &name).write().await.unwrap() },
        async move { lock.read().await.unwrap() },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_permits_and_bad_names_are_typed_errors() {
    let etcd = etcd().await;
    let s = session(&etcd, 10).await;
    assert!(matches!(
        Semaphore::new(&s, unique("zero"), 0).acquire().await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        Semaphore::new(&s, unique("zero"), 0).try_acquire().await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        RwLock::new(&s, "").read().await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        RwLock::new(&s, "x#y").write().await,
        Err(Error::InvalidArgument(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_overlap_and_writers_exclude_everyone() {
    let etcd = etcd().await;
    let name = unique("rw-basic");
    let a = session(&etcd, 30).await;
    let b = session(&etcd, 30).await;
    let la = RwLock::new(&a, &name);
    let lb = RwLock::new(&b, &name);
    let r1 = tokio::time::timeout(Duration::from_secs(2), la.read())
        .await
        .unwrap()
        .unwrap();
    let r2 = tokio::time::timeout(Duration::from_secs(2), lb.read())
        .await
        .expect("readers overlap")
        .unwrap();
    assert!(
        lb.try_write().await.unwrap().is_none(),
        "a writer got in beside readers"
    );
    r1.release().await.unwrap();
    r2.release().await.unwrap();
    let w = la.write().await.unwrap();
    assert!(
        lb.try_read().await.unwrap().is_none(),
        "a reader got in beside a writer"
    );
    assert!(lb.try_write().await.unwrap().is_none(), "two writers");
    let token = w.fencing_token();
    w.release().await.unwrap();
    let w2 = lb.try_write().await.unwrap().expect("free");
    assert!(w2.fencing_token() > token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_writer_is_not_starved_by_later_readers() {
    let etcd = etcd().await;
    let name = unique("rw-starve");
    let r = session(&etcd, 30).await;
    let w = session(&etcd, 30).await;
    let first_reader = RwLock::new(&r, &name).read().await.unwrap();
    let lw = RwLock::new(&w, &name);
    let writer = tokio::spawn(async move { lw.write().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A stream of readers arriving after the writer queue behind it.
    let mut later = Vec::new();
    for _ in 0..3 {
        let s = session(&etcd, 30).await;
        let l = RwLock::new(&s, &name);
        later.push(tokio::spawn(async move { (l.read().await.unwrap(), s) }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        later.iter().all(|h| !h.is_finished()),
        "a later reader overtook the waiting writer"
    );
    assert!(!writer.is_finished());
    first_reader.release().await.unwrap();
    let wg = tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        later.iter().all(|h| !h.is_finished()),
        "a reader got in beside the writer"
    );
    wg.release().await.unwrap();
    for h in later {
        let (_reading, _session) = tokio::time::timeout(Duration::from_secs(5), h)
            .await
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_waiting_readers_lease_never_lets_two_writers_in() {
    // etcd #16221: W1 writes; R waits on W1; W2 waits on R. R's lease is revoked mid-wait, so
    // W2's blocker vanishes while W1 still holds. W2 must re-check and keep waiting.
    let etcd = etcd().await;
    let mut admin = client(&etcd).await;
    let name = unique("rw-16221");
    let s1 = session(&etcd, 30).await;
    let sr = session(&etcd, 30).await;
    let s2 = session(&etcd, 30).await;
    let w1 = RwLock::new(&s1, &name).write().await.unwrap();
    let lr = RwLock::new(&sr, &name);
    let reader = tokio::spawn(async move { lr.read().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let l2 = RwLock::new(&s2, &name);
    let w2 = tokio::spawn(async move { l2.write().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    admin.lease_revoke(sr.lease_id()).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .unwrap()
        .unwrap()
        .is_err());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !w2.is_finished(),
        "a second writer got in while the first still holds"
    );
    w1.txn_if_owner([])
        .await
        .expect("the first writer still owns");
    w1.release().await.unwrap();
    let _second = tokio::time::timeout(Duration::from_secs(5), w2)
        .await
        .expect("second writer after the first")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_semaphore_with_more_permits_than_etcd_can_count_is_a_typed_error() {
    let etcd = etcd().await;
    let s = session(&etcd, 10).await;
    let sem = Semaphore::new(&s, unique("huge"), usize::MAX);
    assert!(matches!(
        sem.acquire().await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        sem.try_acquire().await,
        Err(Error::InvalidArgument(_))
    ));
}

/// `n` waiters on `name` (`permits` permits), each on its own session, queued one after the
/// other behind the `already` keys there: their sessions, and a channel on which each sends
/// its index and its permit once it holds.
async fn waiters_in_line(
    etcd: &etcd_coord_testkit::TestEtcd,
    observer: &etcd_client::Client,
    name: &str,
    permits: usize,
    already: usize,
    n: usize,
) -> (
    Vec<etcd_coord::LeasedSession>,
    tokio::sync::mpsc::UnboundedReceiver<(usize, etcd_coord::SemaphorePermit)>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut sessions = Vec::new();
    for i in 0..n {
        let w = session(etcd, 30).await;
        let (s, tx) = (Semaphore::new(&w, name, permits), tx.clone());
        tokio::spawn(async move {
            let permit = s.acquire().await.unwrap();
            let _ = tx.send((i, permit));
        });
        queued(observer, name, already + i + 1).await;
        sessions.push(w);
    }
    (sessions, rx)
}

/// The next waiter let in, within 5 s.
async fn admitted(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(usize, etcd_coord::SemaphorePermit)>,
    what: &str,
) -> (usize, etcd_coord::SemaphorePermit) {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("{what}: nobody was let in"))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_semaphore_release_wakes_only_the_waiters_counting_it_and_lets_the_first_in_without_a_request(
) {
    // Three permits held, nine waiters: waiter i saw 3 + i keys ahead when it enqueued. The
    // six that saw at most 8 (DRAIN_MAX) count the deletions ahead of them; the three further
    // back each wait for the waiter just ahead to change. A release wakes the counting waiters
    // only (one deletion event each, no request among them) and lets the first in; no waiter
    // further back hears anything.
    let etcd = etcd().await;
    let name = unique("sem-herd");
    let h = session(&etcd, 30).await;
    let mut holders = Vec::new();
    for _ in 0..3 {
        holders.push(Semaphore::new(&h, &name, 3).acquire().await.unwrap());
    }
    let observer = client(&etcd).await;
    let (waiters, mut rx) = waiters_in_line(&etcd, &observer, &name, 3, 3, 9).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // every wait in place
    let events = || -> Vec<u64> { waiters.iter().map(|w| w.metrics().watch_events).collect() };
    let txns = || -> Vec<u64> { waiters.iter().map(|w| w.metrics().txns).collect() };
    for round in 0..4 {
        let (events_before, txns_before) = (events(), txns());
        holders.remove(0).release().await.unwrap();
        let (first, permit) = admitted(&mut rx, &format!("round {round}")).await;
        assert_eq!(first, round, "served out of order");
        holders.push(permit);
        tokio::time::sleep(Duration::from_millis(300)).await; // anything else lands
        let woken: Vec<u64> = events()
            .iter()
            .zip(&events_before)
            .map(|(a, b)| a - b)
            .collect();
        let counting = round..6;
        assert!(
            woken.iter().enumerate().all(|(i, &n)| n == u64::from(counting.contains(&i))),
            "round {round}: not one event for each counting waiter and none for the others: {woken:?}"
        );
        let sent = txns()[round] - txns_before[round];
        assert_eq!(
            sent, 0,
            "round {round}: the waiter let in sent {sent} requests"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_semaphore_waiter_behind_a_long_line_moves_up_when_the_counting_waiter_ahead_goes_through(
) {
    // Two permits held, nine waiters: waiter i saw 2 + i keys ahead. Waiters 0-6 count (at
    // most 8 ahead); waiter 7 saw 9 and waits for waiter 6's key to change, waiter 8 for
    // waiter 7's. When waiter 6 goes through by counting it must touch its key (it saw 8
    // ahead, so the waiter behind it may not count): else waiter 7 sleeps on while a permit
    // is free, until waiter 6 leaves.
    let etcd = etcd().await;
    let name = unique("sem-moves-up");
    let h = session(&etcd, 30).await;
    let mut holding = std::collections::VecDeque::new();
    for _ in 0..2 {
        holding.push_back(Semaphore::new(&h, &name, 2).acquire().await.unwrap());
    }
    let observer = client(&etcd).await;
    let (_waiters, mut rx) = waiters_in_line(&etcd, &observer, &name, 2, 2, 9).await;
    // The oldest holder leaves each time: waiters 0..=6 are let in one by one.
    for expected in 0..=6 {
        holding.pop_front().unwrap().release().await.unwrap();
        let (i, permit) = admitted(&mut rx, &format!("waiter {expected}")).await;
        assert_eq!(i, expected, "served out of order");
        holding.push_back(permit);
    }
    // Waiters 5 and 6 hold. Waiter 5 leaves: waiter 7 must go through while 6 holds.
    holding.pop_front().unwrap().release().await.unwrap();
    let (i, permit) = admitted(&mut rx, "waiter 7, with waiter 6 holding").await;
    assert_eq!(i, 7);
    holding.push_back(permit);
    // Waiter 7 (which waited as a follower) touches too: waiter 8 moves up, and goes through
    // when waiter 6 leaves, while waiter 7 holds.
    holding.pop_front().unwrap().release().await.unwrap();
    let (i, _permit) = admitted(&mut rx, "waiter 8, with waiter 7 holding").await;
    assert_eq!(i, 8);
    holding[0]
        .txn_if_owner([])
        .await
        .expect("waiter 7 still holds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_semaphore_waiter_whose_read_is_cut_short_by_nested_keys_counts_the_short_queue_whole() {
    // 62 keys of a nested name (not members) come first, then two holders: 64 keys, exactly
    // the enqueue's first page (64 keys in key order), so waiter W saw its queue whole and
    // counts it, without touching its key when it goes through. Waiter V's first page is cut
    // short (65 keys), and its sorted page (newest first: W, both holders, then nested keys)
    // too. V must read the queue whole and count it, not wait for W's key to change: W will
    // not touch it.
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("sem-nested");
    for i in 0..62 {
        observer
            .clone()
            .put(format!("{name}/#semaphore/pad/{i:03}"), "", None)
            .await
            .unwrap();
    }
    let h = session(&etcd, 30).await;
    let first = Semaphore::new(&h, &name, 2).acquire().await.unwrap();
    let second = Semaphore::new(&h, &name, 2).acquire().await.unwrap();
    let (_waiters, mut rx) = waiters_in_line(&etcd, &observer, &name, 2, 64, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // every wait in place
    first.release().await.unwrap();
    let (w, _w_permit) = admitted(&mut rx, "W").await;
    assert_eq!(w, 0);
    second.release().await.unwrap();
    let (v, _v_permit) = admitted(&mut rx, "V, with W holding").await;
    assert_eq!(v, 1);
}

/// The holders' keys.
fn keys(holders: Vec<etcd_coord::Holder>) -> Vec<String> {
    holders.iter().map(|h| h.key().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphore_holders_are_the_oldest_permits_keys_whichever_left() {
    let etcd = etcd().await;
    let name = unique("sem-holders");
    let s = session(&etcd, 30).await;
    let sem = Semaphore::new(&s, &name, 2);
    assert!(sem.holders().await.unwrap().is_empty());
    let a = sem.acquire().await.unwrap();
    let b = sem.acquire().await.unwrap();
    let c = {
        let sem = sem.clone();
        tokio::spawn(async move { sem.acquire().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let holders = sem.holders().await.unwrap();
    assert_eq!(keys(holders.clone()), vec![a.key(), b.key()]);
    assert_eq!(holders[0].fencing_token(), a.fencing_token());
    assert_eq!(holders[0].lease_id(), s.lease_id());
    // The newer holder leaves: the waiter holds beside the older one.
    let b_key = b.key().to_owned();
    b.release().await.unwrap();
    let c = tokio::time::timeout(Duration::from_secs(5), c)
        .await
        .expect("the waiter gets the free permit")
        .unwrap()
        .unwrap();
    let now = keys(sem.holders().await.unwrap());
    assert_eq!(now, vec![a.key(), c.key()]);
    assert!(!now.contains(&b_key));
    let zero = Semaphore::new(&s, &name, 0).holders().await;
    assert!(matches!(zero, Err(Error::InvalidArgument(_))), "{zero:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rwlock_holders_are_the_readers_ahead_of_the_first_writer_or_one_writer() {
    let etcd = etcd().await;
    let name = unique("rw-holders");
    let s = session(&etcd, 30).await;
    let lock = RwLock::new(&s, &name);
    assert!(lock.holders().await.unwrap().is_empty());
    let r1 = lock.read().await.unwrap();
    let r2 = lock.read().await.unwrap();
    let w = {
        let lock = lock.clone();
        tokio::spawn(async move { lock.write().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r3 = {
        let lock = lock.clone();
        tokio::spawn(async move { lock.read().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        keys(lock.holders().await.unwrap()),
        vec![r1.key(), r2.key()],
        "the writer and the reader behind it wait"
    );
    r1.release().await.unwrap();
    r2.release().await.unwrap();
    let w = tokio::time::timeout(Duration::from_secs(5), w)
        .await
        .expect("the writer gets in")
        .unwrap()
        .unwrap();
    assert_eq!(keys(lock.holders().await.unwrap()), vec![w.key()]);
    w.release().await.unwrap();
    let r3 = tokio::time::timeout(Duration::from_secs(5), r3)
        .await
        .expect("the last reader gets in")
        .unwrap()
        .unwrap();
    assert_eq!(keys(lock.holders().await.unwrap()), vec![r3.key()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_requeue_lets_the_reader_and_writer_in_line_through_first_in_one_write() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("rw-requeue-write");
    let a = session(&etcd, 30).await;
    let writing = RwLock::new(&a, &name).write().await.unwrap();
    let (old_key, old_token) = (writing.key().to_owned(), writing.fencing_token());
    let order = Arc::new(StdMutex::new(Vec::new()));
    // Who holds now: a writer excludes everyone.
    let inside = Arc::new(AtomicUsize::new(1));
    let mut waiters = Vec::new();
    for (i, who) in ["reader", "writer"].into_iter().enumerate() {
        let s = session(&etcd, 30).await;
        let (rw, order) = (RwLock::new(&s, &name), Arc::clone(&order));
        let inside = Arc::clone(&inside);
        waiters.push(tokio::spawn(async move {
            // Each holds 50 ms, its acquisition recorded while it holds.
            let shared = |n| assert_eq!(n, 0, "{who} got in while someone held");
            if who == "reader" {
                let g = rw.read().await.unwrap();
                shared(inside.fetch_add(1, Ordering::SeqCst));
                order.lock().unwrap().push((who, g.fencing_token()));
                tokio::time::sleep(Duration::from_millis(50)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                g.release().await.unwrap();
            } else {
                let g = rw.write().await.unwrap();
                shared(inside.fetch_add(1, Ordering::SeqCst));
                order.lock().unwrap().push((who, g.fencing_token()));
                tokio::time::sleep(Duration::from_millis(50)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                g.release().await.unwrap();
            }
            let _ = s;
        }));
        assert!(
            eventually(Duration::from_secs(5), || async {
                members_under(&observer, &format!("{name}/#rwlock"))
                    .await
                    .len()
                    == i + 2
            })
            .await
        );
    }
    inside.fetch_sub(1, Ordering::SeqCst); // about to release
    let again = writing.requeue().await.unwrap();
    assert_eq!(
        inside.fetch_add(1, Ordering::SeqCst),
        0,
        "wrote again while someone held"
    );
    order
        .lock()
        .unwrap()
        .push(("requeued", again.fencing_token()));
    for w in waiters {
        w.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(
        order.iter().map(|(who, _)| *who).collect::<Vec<_>>(),
        ["reader", "writer", "requeued"],
        "{order:?}"
    );
    assert!(order.windows(2).all(|w| w[0].1 < w[1].1), "{order:?}");
    assert_eq!(
        deletion_revision(&observer, &old_key, old_token).await,
        again.fencing_token(),
        "the release and the new enqueue were separate writes"
    );
    // Still a writer: it excludes readers.
    let c = session(&etcd, 30).await;
    assert!(RwLock::new(&c, &name).try_read().await.unwrap().is_none());
    again.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_requeue_lets_the_waiting_writer_in_first() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("rw-requeue-read");
    let a = session(&etcd, 30).await;
    let b = session(&etcd, 30).await;
    let reading = RwLock::new(&a, &name).read().await.unwrap();
    let rw = RwLock::new(&b, &name);
    let writer = tokio::spawn(async move { rw.write().await.unwrap() });
    assert!(
        eventually(Duration::from_secs(5), || async {
            members_under(&observer, &format!("{name}/#rwlock"))
                .await
                .len()
                == 2
        })
        .await
    );
    let requeue = tokio::spawn(reading.requeue());
    let writing = tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .expect("the writer gets in")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!requeue.is_finished(), "read again while the writer held");
    let token = writing.fencing_token();
    writing.release().await.unwrap();
    let again = tokio::time::timeout(Duration::from_secs(5), requeue)
        .await
        .expect("reads again once the writer let go")
        .unwrap()
        .unwrap();
    assert!(
        again.fencing_token() > token,
        "the new reader key is not behind the writer's"
    );
    // Still a reader: another reader shares it.
    let other = RwLock::new(&b, &name).try_read().await.unwrap();
    assert!(other.is_some(), "the requeued reader excludes readers");
    again.release().await.unwrap();
}

/// Of a semaphore's two permits, A and B hold and C waits: A's requeue lets C in at once (one
/// write releases A's permit and puts A's new key), and A holds again only once one of B and C
/// lets go — never a third holder — with a larger token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permit_requeue_lets_the_waiter_in_line_through_first_in_one_write() {
    const PERMITS: usize = 2;
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("sem-requeue");
    let prefix = format!("{name}/#semaphore");
    let (a, b, c) = (
        session(&etcd, 30).await,
        session(&etcd, 30).await,
        session(&etcd, 30).await,
    );
    let held = Semaphore::new(&a, &name, PERMITS).acquire().await.unwrap();
    let (old_key, old_token) = (held.key().to_owned(), held.fencing_token());
    let other = Semaphore::new(&b, &name, PERMITS).acquire().await.unwrap();
    let inside = Arc::new(AtomicUsize::new(2));
    let order = Arc::new(StdMutex::new(Vec::new()));
    let waiter = tokio::spawn({
        let (sem, inside, order) = (
            Semaphore::new(&c, &name, PERMITS),
            Arc::clone(&inside),
            Arc::clone(&order),
        );
        async move {
            let permit = sem.acquire().await.unwrap();
            let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
            assert!(now <= PERMITS, "{now} holders of {PERMITS} permits");
            order.lock().unwrap().push(("c", permit.fencing_token()));
            tokio::time::sleep(Duration::from_millis(100)).await;
            inside.fetch_sub(1, Ordering::SeqCst);
            permit.release().await.unwrap();
        }
    });
    assert!(
        eventually(Duration::from_secs(5), || async {
            members_under(&observer, &prefix).await.len() == 3
        })
        .await
    );
    inside.fetch_sub(1, Ordering::SeqCst); // about to let go
    let again = tokio::time::timeout(Duration::from_secs(10), held.requeue())
        .await
        .expect("held again once the waiter let go")
        .unwrap();
    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
    assert!(now <= PERMITS, "{now} holders of {PERMITS} permits");
    order.lock().unwrap().push(("a", again.fencing_token()));
    waiter.await.unwrap();
    let order = order.lock().unwrap().clone();
    assert_eq!(
        order.iter().map(|(who, _)| *who).collect::<Vec<_>>(),
        ["c", "a"],
        "{order:?}"
    );
    assert!(
        old_token < order[0].1 && order[0].1 < order[1].1,
        "{order:?}"
    );
    assert_eq!(
        deletion_revision(&observer, &old_key, old_token).await,
        again.fencing_token(),
        "the release and the new enqueue were separate writes"
    );
    other.release().await.unwrap();
    again.release().await.unwrap();
    assert!(members_under(&observer, &prefix).await.is_empty());
}

/// Sessions taking a semaphore's permits in turns with `requeue()`, all started together:
/// never more holders than permits, every permit used, every turn taken, no key left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permits_taken_in_turns_by_requeue_never_exceed_the_permits() {
    const PERMITS: usize = 2;
    const SESSIONS: usize = 5;
    const TURNS: usize = 8;
    let etcd = etcd().await;
    let name = unique("sem-requeue-turns");
    let inside = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let turns = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(tokio::sync::Barrier::new(SESSIONS));
    let mut tasks = Vec::new();
    for _ in 0..SESSIONS {
        let s = session(&etcd, 10).await;
        let name = name.clone();
        let (inside, most, turns) = (Arc::clone(&inside), Arc::clone(&most), Arc::clone(&turns));
        let start = Arc::clone(&start);
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let mut permit = Semaphore::new(&s, &name, PERMITS).acquire().await.unwrap();
            for turn in 0..TURNS {
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                assert!(now <= PERMITS, "{now} holders of {PERMITS} permits");
                turns.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                if turn + 1 == TURNS {
                    permit.release().await.unwrap();
                    break;
                }
                permit = permit.requeue().await.unwrap();
            }
            s.close().await.unwrap();
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("every turn is taken")
            .unwrap();
    }
    assert_eq!(turns.load(Ordering::SeqCst), SESSIONS * TURNS);
    assert_eq!(
        most.load(Ordering::SeqCst),
        PERMITS,
        "the permits were never all used"
    );
    let observer = client(&etcd).await;
    assert!(keys_under(&observer, &format!("{name}/")).await.is_empty());
}

/// A permit lost before its requeue — its key deleted, or taken over by another client's put —
/// is `LockLost` for that key: nothing is queued, and a key taken over is left as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeue_of_a_lost_permit_reports_lock_lost_and_queues_nothing() {
    let etcd = etcd().await;
    let mut admin = client(&etcd).await;
    for taken_over in [false, true] {
        let name = unique("sem-requeue-lost");
        let a = session(&etcd, 30).await;
        let held = Semaphore::new(&a, &name, 2).acquire().await.unwrap();
        let old_key = held.key().to_owned();
        if taken_over {
            admin.put(old_key.as_str(), "theirs", None).await.unwrap();
        } else {
            admin.delete(old_key.as_str(), None).await.unwrap();
        }
        let got = held.requeue().await;
        assert!(
            matches!(got, Err(Error::LockLost { ref key, .. }) if *key == old_key),
            "taken over: {taken_over}: {got:?}"
        );
        a.settled().await;
        let left = if taken_over {
            vec![old_key]
        } else {
            Vec::new()
        };
        assert_eq!(keys_under(&admin, &format!("{name}/")).await, left);
        assert_eq!(
            keys_on_lease(&admin, a.lease_id()).await,
            Vec::<String>::new()
        );
    }
}

/// With one permit (a semaphore that is a mutex): the waiter gets in first, the requeuer holds
/// after it, in one write, and no key is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_permit_requeue_lets_the_waiter_in_first_and_leaves_nothing_behind() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("sem1-requeue");
    let (a, c) = (session(&etcd, 30).await, session(&etcd, 30).await);
    let held = Semaphore::new(&a, &name, 1).acquire().await.unwrap();
    let (old_key, old_token) = (held.key().to_owned(), held.fencing_token());
    let c_holds = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let waiter = tokio::spawn({
        let (sem, c_holds) = (Semaphore::new(&c, &name, 1), Arc::clone(&c_holds));
        async move {
            let permit = sem.acquire().await.unwrap();
            c_holds.store(true, Ordering::SeqCst);
            let token = permit.fencing_token();
            tokio::time::sleep(Duration::from_millis(100)).await;
            c_holds.store(false, Ordering::SeqCst);
            permit.release().await.unwrap();
            token
        }
    });
    assert!(
        eventually(Duration::from_secs(5), || async {
            members_under(&observer, &format!("{name}/#semaphore"))
                .await
                .len()
                == 2
        })
        .await
    );
    let again = tokio::time::timeout(Duration::from_secs(10), held.requeue())
        .await
        .expect("held again once the waiter let go")
        .unwrap();
    assert!(
        !c_holds.load(Ordering::SeqCst),
        "held again while the waiter held"
    );
    let waiter_token = waiter.await.unwrap();
    assert!(old_token < waiter_token && waiter_token < again.fencing_token());
    assert_eq!(
        deletion_revision(&observer, &old_key, old_token).await,
        again.fencing_token(),
        "the release and the new enqueue were separate writes"
    );
    again.release().await.unwrap();
    assert!(keys_under(&observer, &format!("{name}/")).await.is_empty());
}

/// A holds one of two permits, B the other, C waits: a requeue of A's permit dropped at any
/// await releases it (C gets in) and leaves no key on A's lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permit_requeue_dropped_at_any_await_leaves_no_key_behind_and_lets_the_waiter_in() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("sem-requeue-cancel");
    let prefix = format!("{name}/#semaphore");
    let (a, b, c) = (
        session(&etcd, 30).await,
        session(&etcd, 30).await,
        session(&etcd, 30).await,
    );
    let (sa, sc) = (Semaphore::new(&a, &name, 2), Semaphore::new(&c, &name, 2));
    let _other = Semaphore::new(&b, &name, 2).acquire().await.unwrap();
    let line_up = async || {
        let held = sa.acquire().await.unwrap();
        let sc = sc.clone();
        let waiter = tokio::spawn(async move { sc.acquire().await.unwrap() });
        assert!(
            eventually(Duration::from_secs(5), || async {
                members_under(&observer, &prefix).await.len() == 3
            })
            .await
        );
        (held, waiter)
    };
    a_requeue_dropped_at_every_await(
        &a,
        &observer,
        line_up,
        |held| held.requeue(),
        async |c_holds| c_holds.release().await.unwrap(),
    )
    .await;
}
