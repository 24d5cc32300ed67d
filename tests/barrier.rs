//! `Barrier` and `DoubleBarrier` against real etcd.

mod common;

use std::time::{Duration, Instant};

use common::*;
use etcd_coord::{Barrier, DoubleBarrier, Error, SessionOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_block_while_the_barrier_is_up_and_all_return_promptly_when_it_comes_down() {
    let etcd = etcd().await;
    let name = unique("gate");
    let holder = session(&etcd, 30).await;
    let hold = Barrier::new(&holder, &name).hold().await.unwrap();
    let mut waiters = Vec::new();
    for _ in 0..5 {
        let s = session(&etcd, 30).await;
        let b = Barrier::new(&s, &name);
        waiters.push(tokio::spawn(async move {
            b.wait().await.unwrap();
            drop(s);
            Instant::now()
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        waiters.iter().all(|w| !w.is_finished()),
        "a waiter passed a raised barrier"
    );
    let released = Instant::now();
    hold.release().await.unwrap();
    for w in waiters {
        let passed = tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .unwrap()
            .unwrap();
        assert!(
            passed - released < Duration::from_secs(2),
            "a waiter took {:?}",
            passed - released
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_returns_at_once_when_the_barrier_is_down() {
    let etcd = etcd().await;
    let s = session(&etcd, 10).await;
    tokio::time::timeout(
        Duration::from_secs(2),
        Barrier::new(&s, unique("down")).wait(),
    )
    .await
    .expect("no barrier: no wait")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_lease_is_lost_releases_the_barrier() {
    let etcd = etcd().await;
    let mut admin = client(&etcd).await;
    let name = unique("gate-lost");
    let holder = session(&etcd, 30).await;
    let _hold = Barrier::new(&holder, &name).hold().await.unwrap();
    let s = session(&etcd, 30).await;
    let b = Barrier::new(&s, &name);
    let waiter = tokio::spawn(async move { b.wait().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished());
    admin.lease_revoke(holder.lease_id()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the barrier came down with its holder's lease")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holding_a_barrier_that_is_up_is_a_typed_error() {
    let etcd = etcd().await;
    let name = unique("gate-twice");
    let a = session(&etcd, 10).await;
    let b = session(&etcd, 10).await;
    let hold = Barrier::new(&a, &name).hold().await.unwrap();
    assert!(matches!(
        Barrier::new(&b, &name).hold().await,
        Err(Error::AlreadyHeld { .. })
    ));
    assert!(matches!(
        Barrier::new(&a, &name).hold().await,
        Err(Error::AlreadyHeld { .. })
    ));
    // The failed attempts changed nothing: the first holder still holds.
    hold.txn_if_owner([]).await.expect("still up, still ours");
    hold.release().await.unwrap();
    let _held = Barrier::new(&b, &name).hold().await.expect("free again");
}

/// `hold()` dropped at every await point it reaches (its put in flight, or answered but
/// unread) leaves no barrier up and no task behind, seen while the session lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_hold_leaves_no_barrier_up() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("gate-cancel");
    let s = session(&etcd, 30).await;
    let b = Barrier::new(&s, &name);
    let ended = drop_at_every_await(
        || b.hold(),
        async |driven, step| {
            if let Driven::Completed(got) = driven {
                got.unwrap().release().await.unwrap();
            }
            s.settled().await;
            assert!(
                keys_under(&observer, &name).await.is_empty(),
                "dropped at {step:?}: the barrier is up"
            );
            assert!(keys_on_lease(&observer, s.lease_id()).await.is_empty());
            only_its_own_task_runs(&s).await;
        },
    )
    .await;
    assert!(
        matches!(ended, Ended::Completed { polls } if polls >= 2),
        "{ended:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_passes_enter_before_count_have_entered() {
    let etcd = etcd().await;
    let name = unique("double-enter");
    let mut entering = Vec::new();
    for _ in 0..2 {
        let s = session(&etcd, 30).await;
        let db = DoubleBarrier::new(&s, &name, 3);
        entering.push(tokio::spawn(async move { db.enter().await.unwrap() }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        entering.iter().all(|e| !e.is_finished()),
        "passed with 2 of 3"
    );
    let third = session(&etcd, 30).await;
    let third_inside = tokio::time::timeout(
        Duration::from_secs(5),
        DoubleBarrier::new(&third, &name, 3).enter(),
    )
    .await
    .unwrap()
    .unwrap();
    // Every guard is kept: a participant that left would be a different test.
    let mut inside = vec![third_inside];
    for e in entering {
        inside.push(
            tokio::time::timeout(Duration::from_secs(5), e)
                .await
                .expect("entered with 3 of 3")
                .unwrap(),
        );
    }
}

/// The last to enter puts the latch under its own lease and may leave at once, its session
/// ending with it, before the others look again: they then find neither the latch nor enough
/// participants — yet the barrier opened for their round, and they pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_others_pass_enter_even_if_the_last_to_enter_is_gone_before_they_look() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("double-gone");
    let link = proxy(&etcd).await;
    let mut entering = Vec::new();
    for _ in 0..2 {
        let s = session_via(
            &link,
            SessionOptions::new().with_ttl(Duration::from_secs(30)),
        )
        .await;
        let db = DoubleBarrier::new(&s, &name, 3);
        entering.push(tokio::spawn(async move { db.enter().await }));
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            keys_under(&observer, &name).await.len() == 2
        })
        .await
    );
    // The two waiters see nothing of what follows until it is all over.
    link.blackhole();
    let last = session(&etcd, 30).await;
    let guard = DoubleBarrier::new(&last, &name, 3).enter().await.unwrap();
    drop(guard);
    last.close().await.unwrap();
    assert_eq!(
        keys_under(&observer, &name).await.len(),
        2,
        "the latch and the last participant's key went with its lease"
    );
    link.heal();
    for e in entering {
        let entered = tokio::time::timeout(Duration::from_secs(10), e)
            .await
            .expect("a participant of an opened round stayed blocked")
            .unwrap();
        assert!(entered.is_ok(), "{entered:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_passes_leave_before_all_have_left_and_the_barrier_is_reusable() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("double-leave");
    let sessions = [
        session(&etcd, 30).await,
        session(&etcd, 30).await,
        session(&etcd, 30).await,
    ];
    let mut inside = Vec::new();
    for s in &sessions {
        let db = DoubleBarrier::new(s, &name, 3);
        inside.push(tokio::spawn(async move { db.enter().await.unwrap() }));
    }
    let mut guards = Vec::new();
    for i in inside {
        guards.push(
            tokio::time::timeout(Duration::from_secs(5), i)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let last = guards.pop().unwrap();
    let leaving: Vec<_> = guards
        .into_iter()
        .map(|g| tokio::spawn(g.leave()))
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        leaving.iter().all(|l| !l.is_finished()),
        "left while one was still inside"
    );
    last.leave().await.unwrap();
    for l in leaving {
        tokio::time::timeout(Duration::from_secs(5), l)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    assert!(
        keys_under(&observer, &name).await.is_empty(),
        "participants or the latch remain"
    );
    // A second round waits for its own three again.
    let db = DoubleBarrier::new(&sessions[0], &name, 3);
    assert!(tokio::time::timeout(Duration::from_millis(400), db.enter())
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_whose_lease_ends_counts_as_having_left() {
    let etcd = etcd().await;
    let mut admin = client(&etcd).await;
    let name = unique("double-lost");
    let sessions = [
        session(&etcd, 30).await,
        session(&etcd, 30).await,
        session(&etcd, 30).await,
    ];
    let mut entering = Vec::new();
    for s in &sessions {
        let db = DoubleBarrier::new(s, &name, 3);
        entering.push(tokio::spawn(async move { db.enter().await.unwrap() }));
    }
    let mut guards = Vec::new();
    for e in entering {
        guards.push(
            tokio::time::timeout(Duration::from_secs(5), e)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let lost = guards.pop().unwrap();
    let leaving: Vec<_> = guards
        .into_iter()
        .map(|g| tokio::spawn(g.leave()))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(leaving.iter().all(|l| !l.is_finished()));
    admin.lease_revoke(sessions[2].lease_id()).await.unwrap();
    for l in leaving {
        tokio::time::timeout(Duration::from_secs(5), l)
            .await
            .expect("the others left once the lost participant's key was gone")
            .unwrap()
            .unwrap();
    }
    assert!(matches!(
        lost.leave().await,
        Err(Error::LockLost { .. }) | Err(Error::SessionLost(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_double_barrier_for_zero_participants_is_a_typed_error() {
    let etcd = etcd().await;
    let s = session(&etcd, 10).await;
    assert!(matches!(
        DoubleBarrier::new(&s, unique("zero"), 0).enter().await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        DoubleBarrier::new(&s, "", 2).enter().await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        Barrier::new(&s, "a#b").hold().await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        Barrier::new(&s, "").wait().await,
        Err(Error::InvalidArgument(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_participant_to_drop_its_guard_takes_the_latch_down() {
    // Dropping a guard runs only the leave Txn (no waiting, no final clear): the latch must go
    // with the last participant's key, in that one Txn (a nested Txn whose compare sees the
    // state before the delete).
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("double-drop");
    let a = session(&etcd, 30).await;
    let b = session(&etcd, 30).await;
    let da = DoubleBarrier::new(&a, &name, 2);
    let db = DoubleBarrier::new(&b, &name, 2);
    let (ga, gb) = tokio::join!(da.enter(), db.enter());
    let (ga, gb) = (ga.unwrap(), gb.unwrap());
    assert_eq!(
        keys_under(&observer, &name).await.len(),
        3,
        "two participants and the latch"
    );
    drop(ga);
    a.settled().await;
    assert_eq!(
        keys_under(&observer, &name).await.len(),
        2,
        "not the last: the latch stays"
    );
    drop(gb);
    b.settled().await;
    assert!(
        keys_under(&observer, &name).await.is_empty(),
        "the last one out took the latch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_double_barrier_runs_round_after_round_when_leavers_re_enter_at_once() {
    // A participant that has left enters the next round at once; a slower one still leaving
    // must not wait for that next round's key (it would wait for a round it is needed in).
    let etcd = etcd().await;
    let name = unique("double-rounds");
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let s = session(&etcd, 30).await;
        let db = DoubleBarrier::new(&s, &name, 3);
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                db.enter().await.unwrap().leave().await.unwrap();
            }
            s.close().await.unwrap();
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("20 rounds of 3 participants complete")
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_double_barrier_for_more_participants_than_etcd_can_count_is_a_typed_error() {
    let etcd = etcd().await;
    let s = session(&etcd, 10).await;
    let barrier = DoubleBarrier::new(&s, unique("huge"), usize::MAX);
    let entered = tokio::time::timeout(Duration::from_secs(5), barrier.enter())
        .await
        .expect("answers at once");
    assert!(
        matches!(entered, Err(Error::InvalidArgument(_))),
        "entered alone: {entered:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_double_barrier_whose_latch_write_loses_its_answer_still_enters() {
    // The one participant of a barrier for one puts the latch; the answer to that write is
    // lost. The write is retried like every other transient failure, so enter() succeeds.
    let etcd = etcd().await;
    let proxy = proxy(&etcd).await;
    let admin = client(&etcd).await;
    let name = unique("latch-lost");
    let s = session_via(
        &proxy,
        etcd_coord::SessionOptions::new()
            .with_ttl(Duration::from_secs(30))
            .with_request_timeout(Duration::from_millis(800)),
    )
    .await;
    // Every chunk waits 150 ms in the proxy, so the latch's answer is still in the proxy when
    // the test sees the latch appear and starts dropping answers.
    let mut watch = admin
        .watch_client()
        .watch(format!("{name}/#double/ready"), None)
        .await
        .unwrap();
    proxy.set_latency(Duration::from_millis(150), Duration::ZERO);
    let barrier = DoubleBarrier::new(&s, &name, 1);
    let entering = tokio::spawn(async move { barrier.enter().await });
    loop {
        let resp = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("the latch is put")
            .unwrap()
            .unwrap();
        if !resp.events().is_empty() {
            break;
        }
    }
    proxy.drop_responses();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.heal();
    proxy.reset_peer();
    let inside = tokio::time::timeout(Duration::from_secs(10), entering)
        .await
        .expect("enter() returns")
        .unwrap();
    assert!(inside.is_ok(), "enter() failed: {inside:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_whose_answer_is_lost_does_not_wait_for_the_next_round() {
    lost_leave(false).await;
}

/// As above, with etcd's history of A's delete compacted away before A's retry: A learns when
/// its delete was from the marker its leave put with the delete (its create revision), not
/// from etcd's history. Without it A waits for B's next-round key, and B for A (the chaos
/// soak's seed 15 found that deadlock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_whose_answer_is_lost_and_whose_history_is_compacted_does_not_wait_for_the_next_round(
) {
    lost_leave(true).await;
}

/// A barrier for two. A's leave deletes A's key, but the answer is lost; meanwhile B, whose
/// leave that delete released, enters the next round at once. A's retry finds its key gone
/// later than the delete: A must still end its leave, not wait for B's next-round key (which
/// waits in enter() for A). With `compact`, the history of A's delete is compacted away first.
async fn lost_leave(compact: bool) {
    let etcd = etcd().await;
    let proxy = proxy(&etcd).await;
    let observer = client(&etcd).await;
    let name = unique("lost-leave");
    let a = session_via(
        &proxy,
        etcd_coord::SessionOptions::new()
            .with_ttl(Duration::from_secs(30))
            .with_request_timeout(Duration::from_millis(800)),
    )
    .await;
    let b = session(&etcd, 30).await;
    let (ba, bb) = (
        DoubleBarrier::new(&a, &name, 2),
        DoubleBarrier::new(&b, &name, 2),
    );
    let entering = tokio::spawn(async move { ba.enter().await });
    let b_inside = bb.enter().await.unwrap();
    let a_inside = entering.await.unwrap().unwrap();
    let b_round = tokio::spawn(async move {
        b_inside.leave().await.unwrap();
        bb.enter().await // the next round: waits for A to enter again
    });
    tokio::time::sleep(Duration::from_millis(200)).await; // B waits in leave() for A
    proxy.drop_responses();
    let a_leaving = tokio::spawn(async move { a_inside.leave().await });
    // B's leave returns (A's key is gone) and B enters the next round.
    let prefix = format!("{name}/#double/p");
    let (obs, p) = (observer.clone(), prefix.clone());
    assert!(
        eventually(Duration::from_secs(5), || async {
            let keys = keys_under(&obs, &p).await;
            keys.len() == 1 && keys[0].contains(&format!("{:016x}", b.lease_id()))
        })
        .await,
        "B did not enter the next round"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    if compact {
        // The history of A's delete is compacted away before A's retry can ask for it.
        etcd.compact().await.unwrap();
    }
    proxy.heal();
    proxy.reset_peer();
    let left = tokio::time::timeout(Duration::from_secs(5), a_leaving)
        .await
        .expect("A's leave waited for the next round")
        .unwrap();
    assert!(left.is_ok(), "{left:?}");
    // And the next round goes on with A.
    let a_again = DoubleBarrier::new(&a, &name, 2).enter().await.unwrap();
    let b_again = tokio::time::timeout(Duration::from_secs(5), b_round)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    drop((a_again, b_again));
}

/// A waiting participant watches for the latch in etcd's history from its own key on. When
/// that history is compacted away and its watch must be opened again, it watches from the
/// compaction on — it neither spins on a refused watch nor stops waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_waiting_across_a_compaction_keeps_one_quiet_watch_and_still_enters() {
    let etcd = etcd().await;
    let mut observer = client(&etcd).await;
    let name = unique("double-compacted");
    let link = proxy(&etcd).await;
    let waiting = session_via(
        &link,
        SessionOptions::new().with_ttl(Duration::from_secs(30)),
    )
    .await;
    let db = DoubleBarrier::new(&waiting, &name, 2);
    let entering = tokio::spawn(async move { db.enter().await });
    assert!(
        eventually(Duration::from_secs(5), || async {
            keys_under(&observer, &name).await.len() == 1
        })
        .await
    );
    for i in 0..5 {
        observer
            .put(format!("{name}-elsewhere-{i}"), "x", None)
            .await
            .unwrap();
    }
    etcd.compact().await.unwrap();
    // The waiter's watch stream breaks: it must open its watches again, past the compaction.
    link.reset_peer();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let settled = waiting.metrics().watches;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        waiting.metrics().watches,
        settled,
        "the waiter keeps opening watches"
    );
    assert!(!entering.is_finished(), "passed with 1 of 2");
    let other = session(&etcd, 30).await;
    let _other_inside = DoubleBarrier::new(&other, &name, 2).enter().await.unwrap();
    let entered = tokio::time::timeout(Duration::from_secs(5), entering)
        .await
        .expect("the waiter did not enter")
        .unwrap();
    assert!(entered.is_ok(), "{entered:?}");
}

/// A latch that outlived its round — up, with no participant that entered before it left
/// (here put by hand, as a client that never took it down would leave it) — lets nobody
/// through: the next round's first participant takes it down and waits for the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latch_that_outlived_its_round_lets_nobody_through() {
    let etcd = etcd().await;
    let name = unique("stale-latch");
    let raw = client(&etcd).await;
    let lease = raw.clone().lease_grant(30, None).await.unwrap().id();
    let latch = format!("{name}/#double/ready");
    raw.clone()
        .put(
            latch.as_str(),
            "",
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    let first = session(&etcd, 10).await;
    let entering = tokio::spawn({
        let db = DoubleBarrier::new(&first, &name, 2);
        async move { db.enter().await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !entering.is_finished(),
        "the first participant passed alone on a stale latch"
    );
    let second = session(&etcd, 10).await;
    let ours = DoubleBarrier::new(&second, &name, 2).enter().await.unwrap();
    let theirs = tokio::time::timeout(Duration::from_secs(5), entering)
        .await
        .expect("both pass together")
        .unwrap()
        .unwrap();
    let (a, b) = tokio::join!(ours.leave(), theirs.leave());
    a.unwrap();
    b.unwrap();
    assert!(keys_under(&raw, &format!("{name}/")).await.is_empty());
}

/// A participant's guard dropped while another participant is stalled inside, which then dies
/// without leaving: the latch the dropped participant put goes once its round is over (its
/// session looks after it), so the next round's first participant waits for a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latch_goes_with_its_round_when_its_putters_guard_is_dropped() {
    let etcd = etcd().await;
    let name = unique("dropped-latch");
    let observer = client(&etcd).await;
    let stalled = session(&etcd, 30).await;
    let entering = tokio::spawn({
        let db = DoubleBarrier::new(&stalled, &name, 2);
        async move { db.enter().await }
    });
    assert!(
        eventually(Duration::from_secs(5), || async {
            keys_under(&observer, &format!("{name}/")).await.len() == 1
        })
        .await
    );
    let putter = session(&etcd, 30).await;
    let guard = DoubleBarrier::new(&putter, &name, 2).enter().await.unwrap();
    let _stalled_guard = entering.await.unwrap().unwrap();
    drop(guard); // leaves in the background, without waiting for the stalled participant
    putter.settled().await;
    stalled.close().await.unwrap(); // its process dies: its key goes with its lease
    assert!(
        eventually(Duration::from_secs(5), || async {
            keys_under(&observer, &format!("{name}/")).await.is_empty()
        })
        .await,
        "the latch outlived its round: {:?}",
        keys_under(&observer, &format!("{name}/")).await
    );
    let next = session(&etcd, 30).await;
    assert!(
        tokio::time::timeout(
            Duration::from_millis(500),
            DoubleBarrier::new(&next, &name, 2).enter()
        )
        .await
        .is_err(),
        "the next round's first participant passed alone"
    );
    assert_eq!(putter.state(), etcd_coord::SessionState::Alive);
}
