//! `Mutex` against real etcd.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use etcd_client::{EventType, TxnOp, WatchOptions};
use etcd_coord::{Error, Mutex, SessionOptions};

/// Adds one to the counter at `counter_key` as the holder of `guard`: a read-modify-write
/// (the write fenced) that loses updates if two holders interleave; `inside` counts the holders
/// in it and must be 0 on the way in.
async fn add_one_alone(
    guard: &etcd_coord::MutexGuard,
    kv: &mut etcd_client::Client,
    counter_key: &str,
    inside: &AtomicUsize,
) {
    assert_eq!(
        inside.fetch_add(1, Ordering::SeqCst),
        0,
        "two holders at once"
    );
    let current: u64 = kv
        .get(counter_key, None)
        .await
        .unwrap()
        .kvs()
        .first()
        .map(|kv| kv.value_str().unwrap().parse().unwrap())
        .unwrap_or(0);
    tokio::task::yield_now().await;
    guard
        .txn_if_owner([TxnOp::put(counter_key, (current + 1).to_string(), None)])
        .await
        .unwrap();
    inside.fetch_sub(1, Ordering::SeqCst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_counter_under_the_lock_never_interleaves() {
    const SESSIONS: usize = 5;
    const ROUNDS: usize = 15;
    let etcd = etcd().await;
    let name = unique("counter");
    let counter_key = format!("{name}-counter");
    let inside = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..SESSIONS {
        let s = session(&etcd, 10).await;
        let (name, counter_key, inside) = (name.clone(), counter_key.clone(), Arc::clone(&inside));
        tasks.push(tokio::spawn(async move {
            let m = Mutex::new(&s, &name);
            let mut kv = s.client().clone();
            for _ in 0..ROUNDS {
                let guard = m.lock().await.unwrap();
                add_one_alone(&guard, &mut kv, &counter_key, &inside).await;
                guard.release().await.unwrap();
            }
            s.close().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut kv = client(&etcd).await;
    let total = kv.get(counter_key.as_str(), None).await.unwrap();
    assert_eq!(
        total.kvs()[0].value_str().unwrap(),
        (SESSIONS * ROUNDS).to_string(),
        "lost updates: holders interleaved"
    );
    assert!(keys_under(&kv, &format!("{name}/")).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_strictly_increase_across_holders() {
    let etcd = etcd().await;
    let name = unique("tokens");
    let tokens = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let s = session(&etcd, 10).await;
        let (name, tokens) = (name.clone(), Arc::clone(&tokens));
        tasks.push(tokio::spawn(async move {
            let m = Mutex::new(&s, &name);
            for _ in 0..10 {
                let g = m.lock().await.unwrap();
                tokens.lock().unwrap().push(g.fencing_token());
                g.release().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let tokens = tokens.lock().unwrap();
    assert_eq!(tokens.len(), 40);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens in acquisition order are not strictly increasing: {tokens:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_lock_returns_none_while_held_and_leaves_no_key() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("try");
    let a = session(&etcd, 10).await;
    let b = session(&etcd, 10).await;
    let held = Mutex::new(&a, &name)
        .try_lock()
        .await
        .unwrap()
        .expect("free mutex");
    let mb = Mutex::new(&b, &name);
    for _ in 0..3 {
        assert!(mb.try_lock().await.unwrap().is_none());
    }
    b.settled().await;
    assert_eq!(
        keys_under(&observer, &name).await,
        vec![held.key().to_owned()]
    );
    held.release().await.unwrap();
    let got = mb.try_lock().await.unwrap().expect("free again");
    assert!(got.key().contains(&format!("{:016x}", b.lease_id())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_acquisitions_through_one_session_do_not_alias() {
    // etcd #11777: Go's Mutex keys are prefix/lease, so a second Mutex on the same session
    // "acquires" the first one's key.
    let etcd = etcd().await;
    let s = session(&etcd, 10).await;
    let name = unique("alias");
    let first = Mutex::new(&s, &name).lock().await.unwrap();
    let second = Mutex::new(&s, &name);
    assert!(
        second.try_lock().await.unwrap().is_none(),
        "aliased the held key"
    );
    let waiter = tokio::spawn(async move { second.lock().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "second acquisition got in while the first holds"
    );
    let first_key = first.key().to_owned();
    let first_token = first.fencing_token();
    first.release().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(got.key(), first_key);
    assert!(got.fencing_token() > first_token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_guard_lets_the_next_waiter_in_long_before_the_ttl() {
    let etcd = etcd().await;
    let name = unique("handover");
    let a = session(&etcd, 30).await;
    let b = session(&etcd, 30).await;
    let guard = Mutex::new(&a, &name).lock().await.unwrap();
    let mb = Mutex::new(&b, &name);
    let waiter = tokio::spawn(async move {
        let g = mb.lock().await.unwrap();
        (Instant::now(), g)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished());
    let dropped = Instant::now();
    drop(guard);
    let (acquired, _g) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("waiter acquired")
        .unwrap();
    let waited = acquired - dropped;
    // A release by TTL would take 30 s; the background release takes one round trip or two.
    assert!(waited < Duration::from_secs(3), "hand-off took {waited:?}");
}

/// `lock()` dropped at every await point it reaches — with its request in flight, and once
/// the answer is in but unread — leaves no key behind and no task running, seen while the
/// session lives (its lease's end would take any leaked key with it): first queued behind a
/// holder, then on a free mutex (where the drop may come after the lock was taken).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_lock_leaves_no_key_behind() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("cancel");
    let holder = session(&etcd, 30).await;
    let waiter = session(&etcd, 30).await;
    let held = Mutex::new(&holder, &name).lock().await.unwrap();
    let m = Mutex::new(&waiter, &name);
    let left_nothing = async |what: &str, holders: Vec<String>| {
        waiter.settled().await;
        assert_eq!(keys_under(&observer, &name).await, holders, "{what}");
        assert_eq!(
            keys_on_lease(&observer, waiter.lease_id()).await,
            Vec::<String>::new(),
            "{what}: a key left on the waiter's lease"
        );
        only_its_own_task_runs(&waiter).await;
    };
    let ended = drop_at_every_await(
        || m.lock(),
        async |driven, step| {
            assert!(
                !matches!(driven, Driven::Completed(_)),
                "locked a held mutex: {driven:?}"
            );
            left_nothing(&format!("dropped at {step:?}"), vec![held.key().to_owned()]).await;
        },
    )
    .await;
    // At least the enqueue in flight, then the wait: behind the holder alone the waiter counts
    // its deletion, on the session's watch of this lock, in place since the first attempt (no
    // watch to register, no pointer to put: the wait may begin at the second poll).
    assert!(
        matches!(ended, Ended::Waiting { polls } if polls >= 2),
        "{ended:?}: never reached its wait in the queue"
    );
    held.release().await.unwrap();
    let ended = drop_at_every_await(
        || m.lock(),
        async |driven, step| {
            if let Driven::Completed(got) = driven {
                got.unwrap().release().await.unwrap();
            }
            left_nothing(&format!("dropped at {step:?} (free)"), Vec::new()).await;
        },
    )
    .await;
    assert!(
        matches!(ended, Ended::Completed { polls } if polls >= 2),
        "{ended:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_key_is_deleted_stops_with_lock_lost() {
    let etcd = etcd().await;
    let mut admin = client(&etcd).await;
    let name = unique("waiter-deleted");
    let a = session(&etcd, 30).await;
    let b = session(&etcd, 30).await;
    let _held = Mutex::new(&a, &name).lock().await.unwrap();
    let mb = Mutex::new(&b, &name);
    let waiter = tokio::spawn(async move { mb.lock().await });
    let observer = admin.clone();
    assert!(
        eventually(Duration::from_secs(5), || async {
            members_under(&observer, &name).await.len() == 2
        })
        .await
    );
    let waiter_key = members_under(&admin, &name).await[1].clone();
    admin.delete(waiter_key.as_str(), None).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("stopped")
        .unwrap();
    assert!(
        matches!(got, Err(Error::LockLost { ref key, .. }) if *key == waiter_key),
        "{got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_stops_when_its_session_is_closed() {
    let etcd = etcd().await;
    let name = unique("waiter-closed");
    let a = session(&etcd, 30).await;
    let b = session(&etcd, 30).await;
    let _held = Mutex::new(&a, &name).lock().await.unwrap();
    let mb = Mutex::new(&b, &name);
    let waiter = tokio::spawn(async move { mb.lock().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.close().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("stopped")
        .unwrap();
    assert!(matches!(got, Err(Error::SessionClosed)), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_names_are_typed_errors() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let s = session(&etcd, 10).await;
    for bad in ["", "has#hash", "nul\0byte", "new\nline"] {
        let m = Mutex::new(&s, bad);
        assert!(
            matches!(m.lock().await, Err(Error::InvalidArgument(_))),
            "{bad:?}"
        );
        assert!(
            matches!(m.try_lock().await, Err(Error::InvalidArgument(_))),
            "{bad:?}"
        );
    }
    let long = "x".repeat(etcd_coord::MAX_NAME_LEN + 1);
    assert!(matches!(
        Mutex::new(&s, long).lock().await,
        Err(Error::InvalidArgument(_))
    ));
    // Nothing was written under the session's lease.
    let leases = observer
        .clone()
        .lease_time_to_live(
            s.lease_id(),
            Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
        )
        .await
        .unwrap();
    assert!(leases.keys().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_names_are_independent_mutexes() {
    let etcd = etcd().await;
    let s = session(&etcd, 10).await;
    let name = unique("nest");
    let _outer = Mutex::new(&s, &name).lock().await.unwrap();
    let inner = Mutex::new(&s, format!("{name}/inner"))
        .try_lock()
        .await
        .unwrap();
    assert!(
        inner.is_some(),
        "a lock on a nested name was blocked by its parent's key"
    );
    let sibling = Mutex::new(&s, format!("{name}x")).try_lock().await.unwrap();
    assert!(sibling.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_holder_knows_it_lost_the_lock_before_the_server_frees_it() {
    let etcd = etcd().await;
    let proxy = proxy(&etcd).await;
    let name = unique("blackhole");
    let ttl = Duration::from_secs(5);
    let a = session_via(&proxy, SessionOptions::new().with_ttl(ttl)).await;
    let b = session(&etcd, 5).await;
    let held = Mutex::new(&a, &name).lock().await.unwrap();
    let held_key = held.key().to_owned();

    // The server's view: when is A's key deleted?
    let mut observer = client(&etcd).await;
    let mut deletions = observer
        .watch(held_key.as_str(), Some(WatchOptions::new()))
        .await
        .unwrap();
    let deleted_at = tokio::spawn(async move {
        while let Some(resp) = deletions.message().await.unwrap() {
            if resp
                .events()
                .iter()
                .any(|e| e.event_type() == EventType::Delete)
            {
                return Instant::now();
            }
        }
        panic!("watch ended");
    });
    let mb = Mutex::new(&b, &name);
    let b_acquired = tokio::spawn(async move {
        let g = mb.lock().await.unwrap();
        (Instant::now(), g)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let fault = Instant::now();
    proxy.blackhole();
    let why = tokio::time::timeout(Duration::from_secs(15), held.lost())
        .await
        .expect("lost() completed");
    let lost_at = Instant::now();
    assert!(matches!(why, Error::SessionLost(_)), "{why:?}");
    let deleted_at = tokio::time::timeout(Duration::from_secs(15), deleted_at)
        .await
        .unwrap()
        .unwrap();
    let (b_at, b_guard) = tokio::time::timeout(Duration::from_secs(15), b_acquired)
        .await
        .unwrap()
        .unwrap();

    assert!(
        lost_at - fault <= ttl,
        "lost() took {:?}, more than the TTL",
        lost_at - fault
    );
    assert!(
        lost_at < deleted_at,
        "the server deleted the key {:?} before lost() completed",
        lost_at - deleted_at
    );
    assert!(
        b_at > lost_at,
        "B acquired while A still believed it held the lock"
    );
    assert!(b_guard.fencing_token() > held.fencing_token());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_whose_response_is_lost_reports_an_error_yet_frees_the_lock() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let proxy = proxy(&etcd).await;
    let name = unique("lost-release");
    let a =
        session_via_timing_out(&proxy, Duration::from_secs(30), Duration::from_millis(500)).await;
    let b = session(&etcd, 30).await;
    let ma = Mutex::new(&a, &name);
    let first = ma.lock().await.unwrap();
    let mb = Mutex::new(&b, &name);
    let b_waits = tokio::spawn(async move { mb.lock().await.unwrap() });

    proxy.drop_responses();
    let released = first.release().await;
    assert!(
        released.is_err(),
        "reported success without an answer: {released:?}"
    );
    // The delete did land: B gets the lock.
    let b_guard = tokio::time::timeout(Duration::from_secs(5), b_waits)
        .await
        .unwrap()
        .unwrap();
    proxy.heal();
    proxy.reset_peer();
    b_guard.release().await.unwrap();

    // The same session takes the lock again while its background clean-up of the first
    // release is still retrying; none of those retries may touch the new key.
    let second = tokio::time::timeout(Duration::from_secs(10), ma.lock())
        .await
        .unwrap()
        .unwrap();
    a.settled().await;
    assert_eq!(
        keys_under(&observer, &name).await,
        vec![second.key().to_owned()]
    );
    second
        .txn_if_owner([TxnOp::put(format!("{name}-still-owner"), "yes", None)])
        .await
        .expect("the re-acquired lock survived the stale releases");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_whose_response_is_lost_is_retried_without_a_second_waiter() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let proxy = proxy(&etcd).await;
    let name = unique("lost-acquire");
    let holder = session(&etcd, 30).await;
    let held = Mutex::new(&holder, &name).lock().await.unwrap();
    let a =
        session_via_timing_out(&proxy, Duration::from_secs(30), Duration::from_millis(500)).await;
    let ma = Mutex::new(&a, &name);
    proxy.drop_responses();
    let waiter = tokio::spawn(async move { ma.lock().await });
    // The enqueue lands; its answer does not.
    let obs = observer.clone();
    let n = name.clone();
    assert!(
        eventually(Duration::from_secs(5), || async {
            members_under(&obs, &n).await.len() == 2
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    proxy.heal();
    proxy.reset_peer();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let ours: Vec<String> = keys_under(&observer, &name)
        .await
        .into_iter()
        .filter(|k| k.contains(&format!("{:016x}", a.lease_id())))
        .collect();
    assert_eq!(
        ours.len(),
        1,
        "retries created more than one waiter: {ours:?}"
    );
    held.release().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.key(), ours[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_lost_survives_compaction_and_fires_when_the_owner_key_is_deleted() {
    let etcd = etcd().await;
    let mut admin = client(&etcd).await;
    let s = session(&etcd, 30).await;
    let name = unique("compact");
    let held = Mutex::new(&s, &name).lock().await.unwrap();
    // lost() is already waiting (its watch in place) when the history is compacted under it.
    let lost = tokio::spawn(held.lost());
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..5 {
        admin
            .put(format!("{name}-filler"), i.to_string(), None)
            .await
            .unwrap();
    }
    let compacted = etcd.compact().await.unwrap();
    assert!(
        compacted > held.fencing_token(),
        "the guard's revision was compacted away"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !lost.is_finished(),
        "lost() fired after a compaction although the lock is held"
    );
    admin.delete(held.key(), None).await.unwrap();
    let why = tokio::time::timeout(Duration::from_secs(5), lost)
        .await
        .expect("lost() fires when the key is deleted")
        .unwrap();
    assert!(matches!(why, Error::LockLost { .. }), "{why:?}");
    assert!(matches!(
        held.txn_if_owner([]).await,
        Err(Error::LockLost { .. })
    ));
    assert!(matches!(held.release().await, Err(Error::LockLost { .. })));
}

/// A queue of 10,000 keys (with values) under `prefix`, on a lease of its own: each read of it
/// sorted by create revision takes ~10 ms, a window that cancellations hit.
async fn fill_queue(admin: &mut etcd_client::Client, prefix: &str) -> i64 {
    let lease = admin.lease_grant(120, None).await.unwrap().id();
    for chunk in 0..100 {
        let ops: Vec<TxnOp> = (0..100)
            .map(|i| {
                let key = format!("{prefix}0000000000000000-{:x}", chunk * 100 + i);
                TxnOp::put(
                    key,
                    vec![b'x'; 200],
                    Some(etcd_client::PutOptions::new().with_lease(lease)),
                )
            })
            .collect();
        admin
            .txn(etcd_client::Txn::new().and_then(ops))
            .await
            .unwrap();
    }
    lease
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_acquisitions_never_cancel_a_read_in_flight_so_etcd_stays_up() {
    // etcd 3.5.0-3.5.4 panics — the whole server — when a read-only Txn is cancelled while
    // it is applied (etcd #14110). First a control: the very read a waiter makes, sent by a
    // plain client and cancelled at random moments, must crash an affected server (so this
    // test can see the bug). Then the same cancellations of lock() calls through the crate.
    init_tracing();
    let name = unique("no-crash");
    let queue_prefix = format!("{name}/#");
    let scan = || {
        vec![TxnOp::get(
            queue_prefix.as_str(),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_sort(
                        etcd_client::SortTarget::Create,
                        etcd_client::SortOrder::Descend,
                    )
                    .with_limit(1)
                    .with_keys_only(),
            ),
        )]
    };
    let read = || etcd_client::Txn::new().and_then(scan());

    let mut control = etcd_coord_testkit::EtcdCluster::start(1).await.unwrap();
    let version = control.full_version();
    let affected = ((3, 5, 0)..(3, 5, 5)).contains(&version);
    let mut admin = control.client().await.unwrap();
    fill_queue(&mut admin, &queue_prefix).await;
    let mut crashed = false;
    for i in 0..400u64 {
        let micros = 200 + (i * 7919) % 20_000;
        let _ =
            tokio::time::timeout(Duration::from_micros(micros), admin.clone().txn(read())).await;
        if i % 10 == 9 && !control.is_running(0) {
            crashed = true;
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    crashed |= !control.is_running(0);
    eprintln!("etcd {version:?}: cancelled raw reads crashed it: {crashed}");
    assert_eq!(
        crashed, affected,
        "etcd {version:?}: the control did not behave as etcd #14110 says"
    );
    drop(control);

    let mut cluster = etcd_coord_testkit::EtcdCluster::start(1).await.unwrap();
    let mut admin = cluster.client().await.unwrap();
    let lease = fill_queue(&mut admin, &queue_prefix).await;
    // Waiters (whose re-reads scan the queue) and a holder's fenced reads of the queue.
    let holder = etcd_coord::LeasedSession::new(
        cluster.client().await.unwrap(),
        SessionOptions::new().with_ttl(Duration::from_secs(30)),
    )
    .await
    .unwrap();
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let s = etcd_coord::LeasedSession::new(
            cluster.client().await.unwrap(),
            SessionOptions::new().with_ttl(Duration::from_secs(30)),
        )
        .await
        .unwrap();
        let name = name.clone();
        tasks.push(tokio::spawn(async move {
            let m = Mutex::new(&s, &name);
            for i in 0..100u64 {
                let micros = 200 + (i * 7919 + t * 131) % 20_000;
                let _ = tokio::time::timeout(Duration::from_micros(micros), m.lock()).await;
            }
            // Seen while the session lives: its lease's end would take a leaked key along.
            s.settled().await;
            assert_eq!(
                keys_on_lease(s.client(), s.lease_id()).await,
                Vec::<String>::new(),
                "a cancelled lock() left its key"
            );
        }));
    }
    let guard = Mutex::new(&holder, format!("{name}-fence"))
        .lock()
        .await
        .unwrap();
    for i in 0..400u64 {
        let micros = 200 + (i * 7919) % 20_000;
        let _ =
            tokio::time::timeout(Duration::from_micros(micros), guard.txn_if_owner(scan())).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(cluster.is_running(0), "the etcd server died");
    admin.lease_revoke(lease).await.unwrap();
    assert!(
        keys_under(&admin, &queue_prefix).await.is_empty(),
        "a cancelled lock() left its key"
    );
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_dropped_while_etcd_is_unreachable_is_released_once_it_is_back() {
    // The session outlives an 8 s outage (TTL 30 s), so the guard's background release must
    // keep trying for as long as the session lives, not give up after a few attempts.
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let proxy = proxy(&etcd).await;
    let name = unique("drop-outage");
    let a = session_via_timing_out(&proxy, Duration::from_secs(30), Duration::from_secs(1)).await;
    let guard = Mutex::new(&a, &name).lock().await.unwrap();
    let key = guard.key().to_owned();
    proxy.down(); // connections refused and reset
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(guard);
    tokio::time::sleep(Duration::from_secs(7)).await;
    proxy.heal();
    let (obs, k) = (observer.clone(), key.clone());
    assert!(
        eventually(Duration::from_secs(5), || async {
            !keys_under(&obs, &k).await.contains(&k)
        })
        .await,
        "the dropped guard's key is still there after the outage"
    );
    assert_ne!(a.state(), etcd_coord::SessionState::Lost);
    let b = session(&etcd, 30).await;
    let _next = tokio::time::timeout(Duration::from_secs(5), Mutex::new(&b, &name).lock())
        .await
        .expect("the lock is free again")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_duplicate_of_a_retried_enqueue_is_deleted_and_never_blocks_the_queue() {
    // The first enqueue's answer is lost, so the acquisition is retried (and goes through on
    // the retry). A copy of that first request may still reach etcd after the release and
    // re-create the key under the live lease. Here the test sends that duplicate itself.
    let etcd = etcd().await;
    let mut admin = client(&etcd).await;
    let proxy = proxy(&etcd).await;
    let name = unique("late-duplicate");
    let a =
        session_via_timing_out(&proxy, Duration::from_secs(30), Duration::from_millis(500)).await;
    let ma = Mutex::new(&a, &name);
    proxy.drop_responses();
    let acquiring = tokio::spawn(async move { ma.lock().await });
    let (obs, n) = (admin.clone(), name.clone());
    assert!(
        eventually(Duration::from_secs(5), || async {
            keys_under(&obs, &n).await.len() == 1
        })
        .await,
        "the first enqueue never landed"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    proxy.heal();
    proxy.reset_peer();
    let guard = tokio::time::timeout(Duration::from_secs(10), acquiring)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let key = guard.key().to_owned();
    guard.release().await.unwrap();

    let duplicate = etcd_client::Txn::new()
        .when([etcd_client::Compare::create_revision(
            key.as_str(),
            etcd_client::CompareOp::Equal,
            0,
        )])
        .and_then([TxnOp::put(
            key.as_str(),
            "",
            Some(etcd_client::PutOptions::new().with_lease(a.lease_id())),
        )]);
    assert!(
        admin.txn(duplicate).await.unwrap().succeeded(),
        "the duplicate re-created the key"
    );
    let (obs, k) = (admin.clone(), key.clone());
    assert!(
        eventually(Duration::from_secs(5), || async {
            !keys_under(&obs, &k).await.contains(&k)
        })
        .await,
        "the resurrected key stays under the live lease"
    );
    let b = session(&etcd, 30).await;
    let _next = tokio::time::timeout(Duration::from_secs(5), Mutex::new(&b, &name).lock())
        .await
        .expect("the queue is blocked by the resurrected key")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_on_a_flapping_connection_slows_its_retries_to_one_backoff() {
    // Every reset ends the waiter's watch; each time it re-reads and watches again. With one
    // backoff for the whole wait, the retries slow down (20 ms doubling to 1 s) instead of
    // following every reset (before: a fresh, shortest delay after each, 40 re-reads here).
    // Once the flapping stops the waiter is quiet again (a watch in place, nothing re-sent),
    // and it still gets the lock as soon as the holder lets go.
    let etcd = etcd().await;
    let proxy = proxy(&etcd).await;
    let name = unique("flapping");
    let holder = session(&etcd, 30).await;
    let held = Mutex::new(&holder, &name).lock().await.unwrap();
    let w = session_via_timing_out(&proxy, Duration::from_secs(30), Duration::from_secs(1)).await;
    let m = Mutex::new(&w, &name);
    let waiting = tokio::spawn(async move { m.lock().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = w.metrics();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        proxy.reset_peer();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = w.metrics();
    let (reads, watches) = (after.txns - before.txns, after.watches - before.watches);
    eprintln!("40 resets in 4 s: {reads} re-reads, {watches} watch requests");
    // The backoff allows about 9 attempts in 4 s; each wait step watches 2 keys (the key
    // ahead and our own).
    assert!(
        reads <= 15 && watches <= 30,
        "{reads} re-reads and {watches} watch requests in 4 s: the waiter follows every reset"
    );
    assert!(!waiting.is_finished(), "the waiter gave up");
    // Within one longest backoff (1 s) of the last reset it has its watch again; from then on
    // it sends nothing while it waits.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let settled = w.metrics();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let quiet = w.metrics();
    assert_eq!(
        (quiet.txns - settled.txns, quiet.watches - settled.watches),
        (0, 0),
        "the waiter keeps re-reading or re-watching after the flapping stopped"
    );
    held.release().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .expect("the waiter gets the lock once the holder let go")
        .unwrap()
        .unwrap();
    assert!(got.fencing_token() > 0);
    let end = w.metrics();
    assert!(
        end.txns - quiet.txns <= 3,
        "{} requests to take a free lock",
        end.txns - quiet.txns
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_wait_probes_its_watch_without_re_reading() {
    // A waiter's watch stream is probed after a third of the TTL of silence (a progress
    // request). etcd answers on a live stream, so a long, quiet wait sends no re-read and
    // opens no new watch.
    let etcd = etcd().await;
    let name = unique("quiet-wait");
    let holder = session(&etcd, 30).await;
    let held = Mutex::new(&holder, &name).lock().await.unwrap();
    let w = session(&etcd, 3).await; // probed after 1 s of silence
    let m = Mutex::new(&w, &name);
    let waiting = tokio::spawn(async move { m.lock().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = w.metrics();
    tokio::time::sleep(Duration::from_secs(5)).await; // about four probes
    let after = w.metrics();
    assert!(
        after.watch_probes - before.watch_probes >= 3,
        "{} probes in 5 s",
        after.watch_probes - before.watch_probes
    );
    assert_eq!(after.txns - before.txns, 0, "the quiet wait re-read");
    assert_eq!(
        after.watches - before.watches,
        0,
        "the quiet wait re-watched"
    );
    held.release().await.unwrap();
    let _got = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiter gets the lock")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_behind_a_page_of_nested_names_keys_still_holds() {
    // The queue of N is every key directly under N/; keys of nested names N/x… are in the
    // same range but are not members. A read of the queue fetches a page: when the page holds
    // only nested keys, the holder behind them must still be found (read again, unlimited).
    let etcd = etcd().await;
    let name = unique("paged");
    let a = session(&etcd, 30).await;
    let b = session(&etcd, 30).await;
    let holder = Mutex::new(&a, &name).lock().await.unwrap();
    let mut nested = Vec::new();
    for i in 0..12 {
        nested.push(Mutex::new(&a, format!("{name}/x{i}")).lock().await.unwrap());
    }
    let mb = Mutex::new(&b, &name);
    assert!(
        mb.try_lock().await.unwrap().is_none(),
        "try_lock got N while its holder held"
    );
    let m = mb.clone();
    let waiting = tokio::spawn(async move { m.lock().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "lock() got N past its holder hidden behind nested keys"
    );
    holder.release().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiter gets N once its holder let go")
        .unwrap()
        .unwrap();
    got.release().await.unwrap();
    // Only nested keys under N/: N is free, for try_lock too.
    assert!(
        mb.try_lock().await.unwrap().is_some(),
        "nested names' keys made N look busy"
    );
    drop(nested);
}

/// What `holder()` says, as (key, lease, token).
async fn holder_of(mutex: &Mutex) -> Option<(String, i64, i64)> {
    mutex
        .holder()
        .await
        .unwrap()
        .map(|h| (h.key().to_owned(), h.lease_id(), h.fencing_token()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_names_the_oldest_key_and_never_a_waiter_nor_a_nested_name() {
    let etcd = etcd().await;
    let name = unique("holder");
    let (a, b) = (session(&etcd, 30).await, session(&etcd, 30).await);
    let mutex = Mutex::new(&a, &name);
    assert_eq!(holder_of(&mutex).await, None);
    // Locks on nested names sort first by create revision and crowd the first page of the
    // read: none of them is this lock's holder.
    let mut nested = Vec::new();
    for i in 0..10 {
        nested.push(
            Mutex::new(&a, format!("{name}/sub{i}"))
                .lock()
                .await
                .unwrap(),
        );
    }
    assert_eq!(holder_of(&mutex).await, None);
    let held = mutex.lock().await.unwrap();
    let expected = Some((held.key().to_owned(), a.lease_id(), held.fencing_token()));
    assert_eq!(holder_of(&mutex).await, expected);
    let waiting = {
        let m = Mutex::new(&b, &name);
        tokio::spawn(async move { m.lock().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        holder_of(&mutex).await,
        expected,
        "a waiter is not the holder"
    );
    held.release().await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiter gets the lock")
        .unwrap()
        .unwrap();
    assert_eq!(
        holder_of(&mutex).await,
        Some((next.key().to_owned(), b.lease_id(), next.fencing_token()))
    );
    next.release().await.unwrap();
    assert_eq!(holder_of(&mutex).await, None);
    let bad = Mutex::new(&a, "").holder().await;
    assert!(matches!(bad, Err(Error::InvalidArgument(_))), "{bad:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_fails_after_one_request_timeout_when_etcd_does_not_answer() {
    // holder() is one read, not retried: through a link that swallows everything it ends with
    // Timeout after one request timeout (a retry would take at least two). The timeout is
    // short of the HTTP/2 keep-alive's detection of the dead link (a ping every 1 s, answered
    // within 1 s), which would otherwise end the read first with a transport error.
    let etcd = etcd().await;
    let proxy = proxy(&etcd).await;
    let request_timeout = Duration::from_millis(500);
    let s = session_via_timing_out(&proxy, Duration::from_secs(30), request_timeout).await;
    let mutex = Mutex::new(&s, unique("holder-timeout"));
    assert_eq!(holder_of(&mutex).await, None);
    proxy.blackhole();
    let started = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(30), mutex.holder())
        .await
        .expect("holder() returns, it does not retry forever");
    let took = started.elapsed();
    assert!(
        matches!(answer, Err(Error::Timeout(t)) if t == request_timeout),
        "{answer:?}"
    );
    assert!(
        took >= request_timeout && took < request_timeout * 2 - Duration::from_millis(100),
        "holder() took {took:?}: not one request timeout of {request_timeout:?}"
    );
    proxy.heal();
}

/// etcd keeps a deleted key in its index until the next compaction, and every range read over
/// a prefix walks all of them: a session that named a fresh key for each acquisition would make
/// every lock slower than the one before. A session uses a name again once its key is gone —
/// one name for a mutex locked and released in turn (by `release()`, by a drop, by
/// `try_lock`) — and never while it may exist: permits held at once by one session have names
/// of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_uses_a_key_name_again_once_its_key_is_gone_and_never_before() {
    let etcd = etcd().await;
    let s = session(&etcd, 30).await;
    let mutex = Mutex::new(&s, unique("names"));
    let mut names = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let guard = mutex.lock().await.unwrap();
        names.insert(guard.key().to_owned());
        guard.release().await.unwrap();
    }
    for _ in 0..5 {
        let guard = mutex.try_lock().await.unwrap().expect("free");
        names.insert(guard.key().to_owned());
        drop(guard); // released by the session's task
        s.settled().await;
    }
    assert_eq!(names.len(), 1, "{names:?}");

    let semaphore = etcd_coord::Semaphore::new(&s, unique("names-sem"), 3);
    let mut names = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(semaphore.acquire().await.unwrap());
        }
        let at_once: std::collections::BTreeSet<_> =
            held.iter().map(|p| p.key().to_owned()).collect();
        assert_eq!(at_once.len(), 3, "permits held at once share a name");
        names.extend(at_once);
        for permit in held {
            permit.release().await.unwrap();
        }
    }
    assert_eq!(names.len(), 3, "{names:?}");
}

/// A plain put of the holder's key by another client (`etcdctl put`, no lease; or under a
/// lease of its own) keeps the key's create revision, but the key is no longer the holder's:
/// `lost()` fires, fenced writes fail, and the release leaves the other's key alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_put_of_the_holders_key_is_a_loss_and_nothing_of_ours_touches_it_after() {
    let etcd = etcd().await;
    let mut admin = client(&etcd).await;
    let s = session(&etcd, 30).await;
    let name = unique("foreign-put");
    let theirs = admin.lease_grant(30, None).await.unwrap().id();
    for lease in [None, Some(theirs)] {
        let guard = Mutex::new(&s, &name).lock().await.unwrap();
        let key = guard.key().to_owned();
        let lost = guard.lost();
        let opts = lease.map(|l| etcd_client::PutOptions::new().with_lease(l));
        admin.put(key.as_str(), "not yours", opts).await.unwrap();
        let why = tokio::time::timeout(Duration::from_secs(2), lost).await;
        assert!(
            matches!(why, Ok(Error::LockLost { .. })),
            "lease {lease:?}: {why:?}"
        );
        let flag = format!("{name}-written");
        let written = guard
            .txn_if_owner([TxnOp::put(flag.as_str(), "yes", None)])
            .await;
        assert!(
            matches!(written, Err(Error::LockLost { .. })),
            "lease {lease:?}: {written:?}"
        );
        assert!(admin
            .get(flag.as_str(), None)
            .await
            .unwrap()
            .kvs()
            .is_empty());
        let released = guard.release().await;
        assert!(
            matches!(released, Err(Error::LockLost { .. })),
            "lease {lease:?}: {released:?}"
        );
        let kv = admin.get(key.as_str(), None).await.unwrap().kvs()[0].clone();
        assert_eq!(
            (kv.value(), kv.lease()),
            (&b"not yours"[..], lease.unwrap_or(0)),
            "the other's key is as they put it"
        );
        admin.delete(key.as_str(), None).await.unwrap();
    }
    s.close().await.unwrap();
}

/// `owner_compares()` holds exactly while the guard holds: it fails once another client's put
/// took the key over, which `owner_compare()` (the create revision alone, as documented) does
/// not see; both fail once the key is deleted.
#[tokio::test]
async fn owner_compares_fail_after_a_takeover_that_owner_compare_alone_does_not_see() {
    let etcd = etcd().await;
    let mut admin = client(&etcd).await;
    let s = session(&etcd, 30).await;
    let name = unique("owner-compares");
    let guard = Mutex::new(&s, &name).lock().await.unwrap();
    let observer = admin.clone();
    let holds = |compares: Vec<etcd_client::Compare>| {
        let mut kv = observer.clone();
        async move {
            kv.txn(etcd_client::Txn::new().when(compares))
                .await
                .unwrap()
                .succeeded()
        }
    };
    assert!(holds(guard.owner_compares()).await);
    assert!(holds(vec![guard.owner_compare()]).await);
    admin.put(guard.key(), "taken over", None).await.unwrap();
    assert!(!holds(guard.owner_compares()).await, "a takeover ends it");
    assert!(
        holds(vec![guard.owner_compare()]).await,
        "the create revision alone does not change with a put"
    );
    admin.delete(guard.key(), None).await.unwrap();
    assert!(!holds(vec![guard.owner_compare()]).await);
    drop(guard);
    s.close().await.unwrap();
}

/// What a holder sees when its whole host slept (docs/safety.md, "A host that sleeps"): its
/// `Instant` (CLOCK_MONOTONIC) stood still, so by its own clock its session is as alive as
/// before, while etcd, on a host that did not sleep, ended the lease and let another client
/// in. Modeled without sleeping a host: for under a second the holder hears nothing and is
/// heard by nobody (its connection blackholed: held, not closed — a frozen network), a fenced
/// write of its under way, while its lease ends at the server (revoked, as its expiry would
/// end it) and a waiter takes the lock. When it "wakes", etcd refuses the write — its own
/// clock would not have — and its `lost()` fires as soon as it hears from etcd, seconds before
/// the deadline its clock still counts towards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_clock_missed_its_lease_ending_is_refused_by_etcd_and_told_at_once() {
    let etcd = etcd().await;
    let mut admin = client(&etcd).await;
    let proxy = proxy(&etcd).await;
    let name = unique("slept");
    let resource = format!("{name}-resource");
    let options = SessionOptions::new().with_ttl(Duration::from_secs(10));
    let holder = session_via(&proxy, options).await;
    let guard = Mutex::new(&holder, &name).lock().await.unwrap();
    let waiter = {
        let (s, name) = (session(&etcd, 10).await, name.clone());
        tokio::spawn(async move {
            let next = Mutex::new(&s, &name).lock().await.unwrap();
            (next, s)
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The host sleeps: a write under way is held with everything else.
    proxy.blackhole();
    let fence = guard.fence();
    let put = TxnOp::put(resource.as_str(), "written after the lease ended", None);
    let write = tokio::spawn(async move { fence.txn_if_owner([put]).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Meanwhile, on etcd's host, the lease ends and the waiter takes over.
    admin.lease_revoke(holder.lease_id()).await.unwrap();
    let (next, _waiter_session) = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter takes over")
        .unwrap();
    assert!(next.fencing_token() > guard.fencing_token());
    // By its own clock, the holder's session lives: its deadline is seconds away.
    assert_ne!(holder.state(), etcd_coord::SessionState::Lost);
    // The host wakes.
    proxy.heal();
    let woke = Instant::now();
    let written = tokio::time::timeout(Duration::from_secs(5), write)
        .await
        .expect("the held write is answered")
        .unwrap();
    assert!(
        matches!(written, Err(Error::LockLost { .. })),
        "etcd must refuse the write of a holder whose lease ended: {written:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), guard.lost())
        .await
        .expect("lost() fires once etcd is heard again");
    eprintln!("lost() {:?} after waking", woke.elapsed());
    let r = admin.get(resource.as_str(), None).await.unwrap();
    assert!(r.kvs().is_empty(), "the late write landed");
    next.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_lets_every_waiter_in_line_through_before_holding_again() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("requeue-order");
    let a = session(&etcd, 30).await;
    let held = Mutex::new(&a, &name).lock().await.unwrap();
    let first_token = held.fencing_token();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let inside = Arc::new(AtomicUsize::new(0));
    let mut waiters = Vec::new();
    for who in ["b", "c"] {
        let s = session(&etcd, 30).await;
        let (mutex, order, inside) = (
            Mutex::new(&s, &name),
            Arc::clone(&order),
            Arc::clone(&inside),
        );
        waiters.push(tokio::spawn(async move {
            let g = mutex.lock().await.unwrap();
            assert_eq!(
                inside.fetch_add(1, Ordering::SeqCst),
                0,
                "two holders at once"
            );
            order.lock().unwrap().push((who, g.fencing_token()));
            tokio::time::sleep(Duration::from_millis(50)).await;
            inside.fetch_sub(1, Ordering::SeqCst);
            g.release().await.unwrap();
        }));
        // In line in this order: each waiter's key exists before the next one's lock().
        let members = waiters.len() + 1;
        assert!(
            eventually(Duration::from_secs(5), || async {
                members_under(&observer, &name).await.len() == members
            })
            .await
        );
    }
    let again = held.requeue().await.unwrap();
    assert_eq!(
        inside.fetch_add(1, Ordering::SeqCst),
        0,
        "held again while a waiter held"
    );
    order.lock().unwrap().push(("a", again.fencing_token()));
    for w in waiters {
        w.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(
        order.iter().map(|(who, _)| *who).collect::<Vec<_>>(),
        ["b", "c", "a"],
        "{order:?}"
    );
    let tokens: Vec<i64> = std::iter::once(first_token)
        .chain(order.iter().map(|(_, t)| *t))
        .collect();
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
    assert_eq!(
        members_under(&observer, &name).await,
        vec![again.key().to_owned()]
    );
    again.release().await.unwrap();
    assert!(members_under(&observer, &name).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_releases_and_enqueues_in_one_write() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("requeue-one-write");
    let a = session(&etcd, 30).await;
    let held = Mutex::new(&a, &name).lock().await.unwrap();
    let (old_key, old_token) = (held.key().to_owned(), held.fencing_token());
    let again = held.requeue().await.unwrap();
    assert_eq!(
        members_under(&observer, &name).await,
        vec![again.key().to_owned()]
    );
    // The old key's deletion and the new key's creation share one revision: one Txn.
    let deleted_at = deletion_revision(&observer, &old_key, old_token).await;
    assert_eq!(
        deleted_at,
        again.fencing_token(),
        "the release and the new enqueue were separate writes"
    );
    again.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_of_a_lost_lock_reports_lock_lost_and_queues_nothing() {
    let etcd = etcd().await;
    let mut admin = client(&etcd).await;
    let name = unique("requeue-lost");
    let a = session(&etcd, 30).await;
    let held = Mutex::new(&a, &name).lock().await.unwrap();
    let old_key = held.key().to_owned();
    admin.delete(old_key.as_str(), None).await.unwrap();
    let got = held.requeue().await;
    assert!(
        matches!(got, Err(Error::LockLost { ref key, .. }) if *key == old_key),
        "{got:?}"
    );
    a.settled().await;
    assert!(members_under(&admin, &name).await.is_empty());
    assert_eq!(
        keys_on_lease(&admin, a.lease_id()).await,
        Vec::<String>::new()
    );
    // The mutex is free for the next comer.
    let b = session(&etcd, 30).await;
    let got = Mutex::new(&b, &name).try_lock().await.unwrap();
    assert!(got.is_some(), "the mutex stayed blocked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeue_dropped_at_any_await_leaves_no_key_behind_and_lets_the_waiter_in() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("requeue-cancel");
    let a = session(&etcd, 30).await;
    let b = session(&etcd, 30).await;
    let (ma, mb) = (Mutex::new(&a, &name), Mutex::new(&b, &name));
    // A holds and B waits behind it: a requeue lets B in and waits behind B.
    let line_up = async || {
        let held = ma.lock().await.unwrap();
        let mb = mb.clone();
        let waiter = tokio::spawn(async move { mb.lock().await.unwrap() });
        assert!(
            eventually(Duration::from_secs(5), || async {
                members_under(&observer, &name).await.len() == 2
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
        async |b_holds| b_holds.release().await.unwrap(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_taken_by_requeue_never_interleave_and_tokens_increase() {
    const SESSIONS: usize = 4;
    const TURNS: usize = 12;
    let etcd = etcd().await;
    let name = unique("requeue-counter");
    let counter_key = format!("{name}-counter");
    let inside = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..SESSIONS {
        let s = session(&etcd, 10).await;
        let (name, counter_key) = (name.clone(), counter_key.clone());
        let (inside, tokens) = (Arc::clone(&inside), Arc::clone(&tokens));
        tasks.push(tokio::spawn(async move {
            let mut kv = s.client().clone();
            let mut guard = Mutex::new(&s, &name).lock().await.unwrap();
            for turn in 0..TURNS {
                tokens.lock().unwrap().push(guard.fencing_token());
                add_one_alone(&guard, &mut kv, &counter_key, &inside).await;
                if turn + 1 == TURNS {
                    guard.release().await.unwrap();
                    break;
                }
                guard = guard.requeue().await.unwrap();
            }
            s.close().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut kv = client(&etcd).await;
    let total = kv.get(counter_key.as_str(), None).await.unwrap();
    assert_eq!(
        total.kvs()[0].value_str().unwrap(),
        (SESSIONS * TURNS).to_string(),
        "lost updates: holders interleaved"
    );
    let tokens = tokens.lock().unwrap().clone();
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens in turn order are not strictly increasing: {tokens:?}"
    );
    assert!(keys_under(&kv, &format!("{name}/")).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeue_whose_response_is_lost_is_retried_as_one_release_and_one_waiter() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let proxy = proxy(&etcd).await;
    let name = unique("lost-requeue");
    let a =
        session_via_timing_out(&proxy, Duration::from_secs(30), Duration::from_millis(500)).await;
    let held = Mutex::new(&a, &name).lock().await.unwrap();
    let old_key = held.key().to_owned();
    proxy.drop_responses();
    let requeue = tokio::spawn(held.requeue());
    // The Txn lands — the old key deleted, the new one put — and its answer does not.
    let (obs, n, old) = (observer.clone(), name.clone(), old_key.clone());
    assert!(
        eventually(Duration::from_secs(5), || async {
            let members = members_under(&obs, &n).await;
            members.len() == 1 && members[0] != old
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    proxy.heal();
    proxy.reset_peer();
    let again = tokio::time::timeout(Duration::from_secs(10), requeue)
        .await
        .expect("the retried requeue returned")
        .unwrap()
        .unwrap();
    assert_eq!(
        members_under(&observer, &name).await,
        vec![again.key().to_owned()]
    );
    assert_eq!(
        keys_on_lease(&observer, a.lease_id()).await,
        vec![again.key().to_owned()],
        "retries left more than the one new waiter on the lease"
    );
    let fenced = again
        .txn_if_owner([TxnOp::put(format!("resource/{name}"), "x", None)])
        .await
        .unwrap();
    assert!(
        fenced.succeeded(),
        "the retried requeue's guard does not hold"
    );
    again.release().await.unwrap();
    assert!(members_under(&observer, &name).await.is_empty());
}
