//! `Election` and `LeaderSelector` against real etcd.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use common::*;
use etcd_coord::{Election, Error, LeaderEvent, LeaderSelector, SessionOptions};
use futures::{Stream, StreamExt};

/// The next event of `events`, within 10 s.
async fn next_event<S: Stream<Item = Result<LeaderEvent, Error>> + Unpin>(
    events: &mut S,
) -> LeaderEvent {
    tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("an event within 10 s")
        .expect("the stream does not end")
        .expect("no error")
}

fn leader_key(event: &LeaderEvent) -> Option<&str> {
    match event {
        LeaderEvent::Leader(info) => Some(info.key()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_with_increasing_tokens() {
    let etcd = etcd().await;
    let name = unique("one-leader");
    let leading = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(StdMutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..4 {
        let s = session(&etcd, 10).await;
        let (name, leading, tokens) = (name.clone(), Arc::clone(&leading), Arc::clone(&tokens));
        tasks.push(tokio::spawn(async move {
            let e = Election::new(&s, &name);
            for _ in 0..8 {
                let mut l = e.campaign(format!("candidate-{i}")).await.unwrap();
                assert_eq!(
                    leading.fetch_add(1, Ordering::SeqCst),
                    0,
                    "two leaders at once"
                );
                tokens.lock().unwrap().push(l.fencing_token());
                let current = e.leader().await.unwrap().expect("a leader");
                assert_eq!(current.key(), l.key());
                assert_eq!(current.value_str(), Some(format!("candidate-{i}").as_str()));
                leading.fetch_sub(1, Ordering::SeqCst);
                l.resign().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let tokens = tokens.lock().unwrap();
    assert_eq!(tokens.len(), 32);
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resign_hands_over_to_the_next_candidate_in_fifo_order() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("fifo");
    let sessions = [
        session(&etcd, 10).await,
        session(&etcd, 10).await,
        session(&etcd, 10).await,
    ];
    let mut first = Election::new(&sessions[0], &name)
        .campaign("a")
        .await
        .unwrap();
    let mut waiting = Vec::new();
    for (i, s) in sessions.iter().enumerate().skip(1) {
        let e = Election::new(s, &name);
        waiting.push(tokio::spawn(async move {
            e.campaign(format!("{i}")).await.unwrap()
        }));
        let n = name.clone();
        let obs = observer.clone();
        assert!(
            eventually(Duration::from_secs(5), || async {
                members_under(&obs, &n).await.len() == i + 1
            })
            .await
        );
    }
    let (second, third) = (waiting.remove(0), waiting.remove(0));
    first.resign().await.unwrap();
    let mut second = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .unwrap()
        .unwrap();
    assert!(second
        .key()
        .contains(&format!("{:016x}", sessions[1].lease_id())));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !third.is_finished(),
        "the third candidate led while the second did"
    );
    second.resign().await.unwrap();
    let third = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .unwrap()
        .unwrap();
    assert!(third
        .key()
        .contains(&format!("{:016x}", sessions[2].lease_id())));
    assert!(third.fencing_token() > second.fencing_token());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proclaim_by_a_deposed_leader_fails_and_changes_nothing() {
    let etcd = etcd().await;
    let mut admin = client(&etcd).await;
    let name = unique("deposed");
    let a = session(&etcd, 10).await;
    let b = session(&etcd, 10).await;
    let ea = Election::new(&a, &name);
    let leader = ea.campaign("a").await.unwrap();
    leader.proclaim("a2").await.unwrap();
    assert_eq!(ea.leader().await.unwrap().unwrap().value_str(), Some("a2"));
    // Depose it behind its back; b takes over.
    admin.delete(leader.key(), None).await.unwrap();
    let b_leads = Election::new(&b, &name).campaign("b").await.unwrap();
    assert!(matches!(
        leader.proclaim("a3").await,
        Err(Error::LockLost { .. })
    ));
    let now = ea.leader().await.unwrap().unwrap();
    assert_eq!(now.key(), b_leads.key());
    assert_eq!(now.value_str(), Some("b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_leadership_lets_the_next_candidate_lead_long_before_the_ttl() {
    let etcd = etcd().await;
    let name = unique("drop-leadership");
    let a = session(&etcd, 30).await;
    let b = session(&etcd, 30).await;
    let leadership = Election::new(&a, &name).campaign("a").await.unwrap();
    let eb = Election::new(&b, &name);
    let candidate = tokio::spawn(async move {
        let l = eb.campaign("b").await.unwrap();
        (Instant::now(), l)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!candidate.is_finished(), "led while another leads");
    let dropped = Instant::now();
    drop(leadership);
    let (elected, _l) = tokio::time::timeout(Duration::from_secs(10), candidate)
        .await
        .expect("the candidate leads")
        .unwrap();
    let waited = elected - dropped;
    // The lease's end would take 30 s; the background resignation takes a round trip or two.
    assert!(waited < Duration::from_secs(3), "hand-off took {waited:?}");
    assert_eq!(
        Election::new(&a, &name)
            .leader()
            .await
            .unwrap()
            .unwrap()
            .value_str(),
        Some("b")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resigned_leadership_is_inert_and_resigning_again_succeeds() {
    let etcd = etcd().await;
    let s = session(&etcd, 10).await;
    let e = Election::new(&s, unique("inert"));
    let mut l = e.campaign("x").await.unwrap();
    l.resign().await.unwrap();
    l.resign().await.unwrap();
    assert!(matches!(l.proclaim("y").await, Err(Error::LockLost { .. })));
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(5), l.lost())
            .await
            .unwrap(),
        Error::LockLost { .. }
    ));
    assert!(e.leader().await.unwrap().is_none());
}

/// `campaign()` dropped at every await point it reaches (request in flight, or answered but
/// unread) leaves no candidate key and no task behind, seen while the session lives: first
/// behind a leader, then in a free election (the drop may come after it was elected).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_campaign_leaves_no_key() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("cancel-campaign");
    let a = session(&etcd, 30).await;
    let b = session(&etcd, 30).await;
    let mut leader = Election::new(&a, &name).campaign("a").await.unwrap();
    let e = Election::new(&b, &name);
    let left_nothing = async |what: &str, keys: Vec<String>| {
        b.settled().await;
        assert_eq!(keys_under(&observer, &name).await, keys, "{what}");
        assert!(
            keys_on_lease(&observer, b.lease_id()).await.is_empty(),
            "{what}: a key left on the candidate's lease"
        );
        only_its_own_task_runs(&b).await;
    };
    // Behind the leader alone a candidate counts the deletions ahead (at least the enqueue
    // in flight and the wait); behind what looks like a long queue it also announces itself
    // (one more await point).
    for (announced, least_polls) in [(false, 2), (true, 3)] {
        if announced {
            pad_with_nested_keys(&observer, &name).await;
        }
        let there = keys_under(&observer, &name).await;
        let ended = drop_at_every_await(
            || e.campaign("b"),
            async |driven, step| {
                assert!(
                    !matches!(driven, Driven::Completed(_)),
                    "elected while another leads: {driven:?}"
                );
                left_nothing(&format!("dropped at {step:?}"), there.clone()).await;
            },
        )
        .await;
        assert!(
            matches!(ended, Ended::Waiting { polls } if polls >= least_polls),
            "announced: {announced}: {ended:?}"
        );
    }
    leader.resign().await.unwrap();
    let pads = keys_under(&observer, &name).await;
    let ended = drop_at_every_await(
        || e.campaign("b"),
        async |driven, step| {
            if let Driven::Completed(got) = driven {
                got.unwrap().resign().await.unwrap();
            }
            left_nothing(&format!("dropped at {step:?} (free)"), pads.clone()).await;
        },
    )
    .await;
    assert!(
        matches!(ended, Ended::Completed { polls } if polls >= 2),
        "{ended:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_resign_does_not_delete_the_next_leaders_key() {
    let etcd = etcd().await;
    let proxy = proxy(&etcd).await;
    let name = unique("stale-resign");
    let a =
        session_via_timing_out(&proxy, Duration::from_secs(30), Duration::from_millis(500)).await;
    let b = session(&etcd, 30).await;
    let mut first = Election::new(&a, &name).campaign("a").await.unwrap();
    let eb = Election::new(&b, &name);
    let next = tokio::spawn(async move { eb.campaign("b").await.unwrap() });
    tokio::time::sleep(Duration::from_millis(200)).await;

    proxy.drop_responses();
    assert!(
        first.resign().await.is_err(),
        "reported a resign nobody confirmed"
    );
    let next = tokio::time::timeout(Duration::from_secs(5), next)
        .await
        .unwrap()
        .unwrap();
    proxy.heal();
    proxy.reset_peer();
    // The caller retries the resign (etcd #22123: the state was kept). It lands after the next
    // leader took over, and must neither fail nor delete the new leader's key.
    tokio::time::timeout(Duration::from_secs(10), first.resign())
        .await
        .unwrap()
        .expect("the retried resign completes the first one");
    next.proclaim("b still leads")
        .await
        .expect("the next leader's key survived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_reports_every_transition_in_order() {
    let etcd = etcd().await;
    let name = unique("observe");
    let watcher = session(&etcd, 10).await;
    let mut events = Box::pin(Election::new(&watcher, &name).observe());
    assert_eq!(next_event(&mut events).await, LeaderEvent::NoLeader);

    let a = session(&etcd, 10).await;
    let b = session(&etcd, 10).await;
    let mut la = Election::new(&a, &name).campaign("a").await.unwrap();
    let eb = Election::new(&b, &name);
    let b_campaign = tokio::spawn(async move { eb.campaign("b").await.unwrap() });
    let ev = next_event(&mut events).await;
    assert_eq!(leader_key(&ev), Some(la.key()));
    la.proclaim("a-busy").await.unwrap();
    match next_event(&mut events).await {
        LeaderEvent::Leader(info) => {
            assert_eq!(info.key(), la.key());
            assert_eq!(info.value_str(), Some("a-busy"));
        }
        other => panic!("expected the proclaimed value, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // b is queued behind a
    la.resign().await.unwrap();
    let mut lb = b_campaign.await.unwrap();
    // b was queued: the next leader is b at once, never a gap and never a younger key.
    let ev = next_event(&mut events).await;
    assert_eq!(leader_key(&ev), Some(lb.key()));
    lb.resign().await.unwrap();
    assert_eq!(next_event(&mut events).await, LeaderEvent::NoLeader);
    let lc = Election::new(&a, &name).campaign("c").await.unwrap();
    assert_eq!(leader_key(&next_event(&mut events).await), Some(lc.key()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_resumes_across_a_connection_reset_without_missing_a_change() {
    let etcd = etcd().await;
    let proxy = proxy(&etcd).await;
    let name = unique("observe-reset");
    let watcher = session_via(&proxy, SessionOptions::new()).await;
    let mut events = Box::pin(Election::new(&watcher, &name).observe());
    assert_eq!(next_event(&mut events).await, LeaderEvent::NoLeader);

    let a = session(&etcd, 10).await;
    proxy.blackhole();
    let mut la = Election::new(&a, &name).campaign("a").await.unwrap();
    let a_key = la.key().to_owned();
    la.resign().await.unwrap();
    let lb = Election::new(&a, &name).campaign("b").await.unwrap();
    proxy.heal();
    proxy.reset_peer();
    // Every change made while the observer was cut off arrives, in order.
    assert_eq!(
        leader_key(&next_event(&mut events).await),
        Some(a_key.as_str())
    );
    assert_eq!(next_event(&mut events).await, LeaderEvent::NoLeader);
    assert_eq!(leader_key(&next_event(&mut events).await), Some(lb.key()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_recovers_from_compaction_with_the_current_leader() {
    let etcd = etcd().await;
    let proxy = proxy(&etcd).await;
    let name = unique("observe-compact");
    let watcher = session_via(&proxy, SessionOptions::new()).await;
    let mut events = Box::pin(Election::new(&watcher, &name).observe());
    assert_eq!(next_event(&mut events).await, LeaderEvent::NoLeader);

    let a = session(&etcd, 10).await;
    proxy.blackhole();
    let mut la = Election::new(&a, &name).campaign("a").await.unwrap();
    la.resign().await.unwrap();
    let lb = Election::new(&a, &name).campaign("b").await.unwrap();
    // The history the observer missed is compacted away.
    etcd.compact().await.unwrap();
    proxy.heal();
    proxy.reset_peer();
    // It cannot replay what is gone, but it reports the current leader and carries on.
    assert_eq!(leader_key(&next_event(&mut events).await), Some(lb.key()));
    lb.proclaim("b2").await.unwrap();
    match next_event(&mut events).await {
        LeaderEvent::Leader(info) => assert_eq!(info.value_str(), Some("b2")),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_election_names_are_typed_errors() {
    let etcd = etcd().await;
    let s = session(&etcd, 10).await;
    let e = Election::new(&s, "bad#name");
    assert!(matches!(
        e.campaign("x").await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(e.leader().await, Err(Error::InvalidArgument(_))));
    let mut events = Box::pin(e.observe());
    assert!(matches!(
        events.next().await,
        Some(Err(Error::InvalidArgument(_)))
    ));
    assert!(
        events.next().await.is_none(),
        "the stream ends after its error"
    );
}

/// What a selector's leader function saw.
#[derive(Debug, Clone, Copy)]
struct Term {
    token: i64,
    started: Instant,
    stopped: Instant,
}

fn recording_selector(
    selector: LeaderSelector,
    log: Arc<StdMutex<Vec<Term>>>,
    linger: Duration,
) -> impl std::future::Future<Output = Result<(), Error>> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::mem::forget(stop_tx); // runs until the test drops the future
    selector.run(
        async move {
            let _ = stop_rx.await;
        },
        move |term| {
            let log = Arc::clone(&log);
            async move {
                let started = Instant::now();
                term.cancelled().await;
                tokio::time::sleep(linger).await; // the leader's work takes a while to wind down
                log.lock().unwrap().push(Term {
                    token: term.fencing_token(),
                    started,
                    stopped: Instant::now(),
                });
            }
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_leaders_work_is_cancelled_and_finished_before_the_next_leader_starts() {
    let etcd = etcd().await;
    let proxy = proxy(&etcd).await;
    let name = unique("selector-blackhole");
    let options = SessionOptions::new().with_ttl(Duration::from_secs(5));
    let a_log = Arc::new(StdMutex::new(Vec::new()));
    let a = LeaderSelector::new(client_via(&proxy).await, &name, "a")
        .with_session_options(options.clone());
    let a_leaders = a.leaders();
    let a_run = tokio::spawn(recording_selector(
        a,
        Arc::clone(&a_log),
        Duration::from_millis(300),
    ));
    let mut a_leaders_seen = a_leaders.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        a_leaders_seen.wait_for(|l| l.is_some()),
    )
    .await
    .unwrap()
    .unwrap();

    let b_started = Arc::new(StdMutex::new(None));
    let b = LeaderSelector::new(client(&etcd).await, &name, "b").with_session_options(options);
    let mut b_leaders = b.leaders();
    let b_started2 = Arc::clone(&b_started);
    let b_run = tokio::spawn(b.run(std::future::pending::<()>(), move |term| {
        let b_started = Arc::clone(&b_started2);
        async move {
            *b_started.lock().unwrap() = Some((term.fencing_token(), Instant::now()));
            term.cancelled().await;
        }
    }));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b_started.lock().unwrap().is_none(), "b leads while a does");
    assert_eq!(
        b_leaders
            .borrow_and_update()
            .as_ref()
            .map(|l| l.value().to_vec()),
        Some(b"a".to_vec()),
        "followers see who leads"
    );

    proxy.blackhole();
    assert!(
        eventually(Duration::from_secs(20), || async {
            b_started.lock().unwrap().is_some()
        })
        .await,
        "b never took over"
    );
    let (b_token, b_at) = b_started.lock().unwrap().unwrap();
    let a_term = *a_log
        .lock()
        .unwrap()
        .first()
        .expect("a's leader work finished");
    assert!(
        a_term.stopped < b_at,
        "a's work ran until {:?} after b started",
        a_term.stopped - b_at
    );
    assert!(b_token > a_term.token);
    assert!(a_term.started < a_term.stopped);
    a_run.abort();
    b_run.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_the_leader_work_before_resigning() {
    let etcd = etcd().await;
    let name = unique("selector-shutdown");
    let a_log = Arc::new(StdMutex::new(Vec::new()));
    let (stop_a, stopped_a) = tokio::sync::oneshot::channel::<()>();
    let a = LeaderSelector::new(client(&etcd).await, &name, "a");
    let mut a_leaders = a.leaders();
    let log = Arc::clone(&a_log);
    let a_run = tokio::spawn(a.run(
        async move {
            let _ = stopped_a.await;
        },
        move |term| {
            let log = Arc::clone(&log);
            async move {
                let started = Instant::now();
                term.cancelled().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                log.lock().unwrap().push(Term {
                    token: term.fencing_token(),
                    started,
                    stopped: Instant::now(),
                });
            }
        },
    ));
    tokio::time::timeout(Duration::from_secs(10), a_leaders.wait_for(|l| l.is_some()))
        .await
        .unwrap()
        .unwrap();
    let b_started = Arc::new(StdMutex::new(None));
    let b_started2 = Arc::clone(&b_started);
    let b = LeaderSelector::new(client(&etcd).await, &name, "b");
    let b_run = tokio::spawn(b.run(std::future::pending::<()>(), move |term| {
        let b_started = Arc::clone(&b_started2);
        async move {
            *b_started.lock().unwrap() = Some((term.fencing_token(), Instant::now()));
            term.cancelled().await;
        }
    }));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_a.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), a_run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            b_started.lock().unwrap().is_some()
        })
        .await
    );
    let (b_token, b_at) = b_started.lock().unwrap().unwrap();
    let a_term = a_log.lock().unwrap()[0];
    assert!(a_term.stopped < b_at, "b started before a's work finished");
    assert!(b_token > a_term.token);
    b_run.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selector_campaigns_again_with_a_new_session_after_losing_one() {
    let etcd = etcd().await;
    let mut admin = client(&etcd).await;
    let name = unique("selector-again");
    let terms = Arc::new(StdMutex::new(Vec::new()));
    let a = LeaderSelector::new(client(&etcd).await, &name, "a")
        .with_session_options(SessionOptions::new().with_ttl(Duration::from_secs(5)))
        .with_retry_backoff(Duration::from_millis(50), Duration::from_millis(200));
    let mut leaders = a.leaders();
    let run = tokio::spawn(recording_selector(a, Arc::clone(&terms), Duration::ZERO));
    tokio::time::timeout(Duration::from_secs(10), leaders.wait_for(|l| l.is_some()))
        .await
        .unwrap()
        .unwrap();
    let first = leaders.borrow().clone().unwrap();
    // Revoke its lease behind its back: the session is Lost, the term ends.
    admin.lease_revoke(lease_of(first.key())).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(15),
        leaders.wait_for(|l| l.as_ref().is_some_and(|l| l.key() != first.key())),
    )
    .await
    .expect("leads again with a new session")
    .unwrap();
    let second = leaders.borrow().clone().unwrap();
    assert!(second.fencing_token() > first.fencing_token());
    assert_ne!(
        lease_of(second.key()),
        lease_of(first.key()),
        "a new session"
    );
    assert_eq!(
        terms.lock().unwrap().len(),
        1,
        "the first term's work ended"
    );
    run.abort();
}

/// The lease ID in a member key `<name>/#<lease, 16 hex>-<seq>`.
fn lease_of(key: &str) -> i64 {
    let hex = &key.rsplit_once("/#").expect("a member key").1[..16];
    u64::from_str_radix(hex, 16).unwrap() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_reports_changes_from_the_moment_it_is_called_even_if_polled_later() {
    let etcd = etcd().await;
    let name = unique("observe-from-call");
    let s = session(&etcd, 10).await;
    let election = Election::new(&s, &name);
    let mut events = Box::pin(election.observe());
    // Nothing polls the stream while a whole term comes and goes.
    let mut term = election.campaign("a").await.unwrap();
    let key = term.key().to_owned();
    term.resign().await.unwrap();
    assert_eq!(next_event(&mut events).await, LeaderEvent::NoLeader);
    assert_eq!(
        leader_key(&next_event(&mut events).await),
        Some(key.as_str())
    );
    assert_eq!(next_event(&mut events).await, LeaderEvent::NoLeader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_function_that_returns_at_once_does_not_make_the_selector_spin() {
    let etcd = etcd().await;
    let name = unique("selector-spin");
    let terms = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&terms);
    let selector = LeaderSelector::new(client(&etcd).await, &name, "a");
    let run = tokio::spawn(selector.run(
        tokio::time::sleep(Duration::from_secs(3)),
        move |_term| {
            counted.fetch_add(1, Ordering::SeqCst);
            async {}
        },
    ));
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let n = terms.load(Ordering::SeqCst);
    // With the default backoff (100 ms doubling to 5 s) a few terms fit in 3 s; a busy loop
    // campaigns and resigns hundreds of times.
    assert!((1..=8).contains(&n), "{n} terms in 3 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selector_backoffs_are_validated_and_huge_ones_saturate() {
    let etcd = etcd().await;
    let name = unique("selector-backoff");
    let zero = LeaderSelector::new(client(&etcd).await, &name, "a")
        .with_retry_backoff(Duration::ZERO, Duration::ZERO);
    let run = tokio::time::timeout(
        Duration::from_secs(5),
        zero.run(std::future::pending::<()>(), |_term| async {}),
    )
    .await
    .expect("a zero backoff is refused at once, not spun on");
    assert!(matches!(run, Err(Error::InvalidArgument(_))), "{run:?}");

    let huge = LeaderSelector::new(client(&etcd).await, &name, "a")
        .with_retry_backoff(Duration::MAX, Duration::MAX);
    let mut leaders = huge.leaders();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(huge.run(
        async move {
            let _ = stopped.await;
        },
        |term| async move { term.cancelled().await },
    ));
    tokio::time::timeout(Duration::from_secs(10), leaders.wait_for(|l| l.is_some()))
        .await
        .unwrap()
        .unwrap();
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("shuts down")
        .expect("without a panic")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proclaim_whose_caller_timed_out_never_overwrites_a_later_one() {
    // The leader's client reaches etcd two ways: directly, and through a proxy that delays
    // every chunk by 2 s. A proclaim that takes the proxy's path times out (250 ms) but
    // reaches etcd 2 s after it was sent — after a later proclaim, sent the direct way, has
    // succeeded. First a positive control: the same put without the fence, sent down the same
    // path the same way, does land late and overwrites the later value; so what keeps the
    // stale proclaim out is the fence, not the path.
    const DELAY: Duration = Duration::from_secs(2);
    let etcd = etcd().await;
    let admin = client(&etcd).await;
    let proxy = proxy(&etcd).await;
    let name = unique("stale-proclaim");
    // No HTTP/2 keep-alive: its pings would wait in the delayed path too.
    let plain = etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
    let both_ways = etcd_client::Client::connect(
        [proxy.endpoint(), etcd.endpoints()[0].clone()],
        Some(plain.clone()),
    )
    .await
    .unwrap();
    let delayed = etcd_client::Client::connect([proxy.endpoint()], Some(plain))
        .await
        .unwrap();
    let s = etcd_coord::LeasedSession::new(
        both_ways,
        SessionOptions::new()
            .with_ttl(Duration::from_secs(30))
            .with_request_timeout(Duration::from_millis(250)),
    )
    .await
    .unwrap();
    let leadership = Election::new(&s, &name).campaign("initial").await.unwrap();
    let value = || async {
        let resp = admin.clone().get(leadership.key(), None).await.unwrap();
        resp.kvs()
            .first()
            .map(|kv| kv.value_str().unwrap().to_owned())
    };
    proxy.set_latency(DELAY, Duration::ZERO);

    // The control: an unfenced put of the leader key down the delayed path, given up on…
    let sent = Instant::now();
    let unfenced = etcd_client::Txn::new().and_then([etcd_client::TxnOp::put(
        leadership.key(),
        "control-stale",
        Some(etcd_client::PutOptions::new().with_lease(s.lease_id())),
    )]);
    assert!(
        tokio::time::timeout(Duration::from_millis(250), delayed.clone().txn(unfenced))
            .await
            .is_err(),
        "the delayed path answered at once"
    );
    // … then a later write, sent the direct way …
    admin
        .clone()
        .put(
            leadership.key(),
            "control-later",
            Some(etcd_client::PutOptions::new().with_lease(s.lease_id())),
        )
        .await
        .unwrap();
    assert!(
        sent.elapsed() < DELAY,
        "too slow to test: {:?}",
        sent.elapsed()
    );
    // … and the given-up put lands after it, and overwrites it.
    tokio::time::sleep(DELAY + Duration::from_millis(1500)).await;
    assert_eq!(
        value().await.as_deref(),
        Some("control-stale"),
        "the unfenced put never landed late: this test cannot see a stale proclaim land"
    );

    // Now through the fence: a proclaim that takes the delayed path and times out …
    let mut stale = None;
    for k in 0..30 {
        let attempt = format!("stale-{k}");
        let sent = Instant::now();
        match leadership.proclaim(attempt.clone()).await {
            Err(Error::Timeout(_)) => {
                stale = Some((attempt, sent));
                break;
            }
            Ok(()) => {}
            Err(e) => panic!("{e}"),
        }
    }
    let (stale, sent) = stale.expect("a proclaim took the delayed path");
    // … later ones until one goes the direct way and lands first (those that time out too are
    // given up on, and reach etcd later as well) …
    let mut later = None;
    for k in 0..30 {
        let attempt = format!("later-{k}");
        match leadership.proclaim(attempt.clone()).await {
            Ok(()) => {
                later = Some(attempt);
                break;
            }
            Err(Error::Timeout(_)) => {}
            Err(e) => panic!("{e}"),
        }
    }
    let later = later.expect("a later proclaim went the direct way");
    assert!(
        sent.elapsed() < DELAY,
        "too slow to test: {:?}",
        sent.elapsed()
    );
    assert_eq!(value().await.as_deref(), Some(later.as_str()));
    // … and once every delayed request has reached etcd, the one that succeeded stands.
    tokio::time::sleep(DELAY + Duration::from_millis(1500)).await;
    assert_eq!(
        value().await,
        Some(later),
        "a proclaim whose caller had timed out (first {stale}) overwrote a later one"
    );
    proxy.heal();
}

/// A leader and a candidate deleted by one Txn (the candidate first, as `etcdctl del --prefix`
/// or a lease revoke may order them) share one revision: `observe()` still reports that
/// nobody leads, at once, with no later write needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_reports_no_leader_when_the_leader_and_a_candidate_go_in_one_revision() {
    use etcd_client::{Txn, TxnOp};
    let etcd = etcd().await;
    let name = unique("observe-one-revision");
    let watcher = session(&etcd, 10).await;
    let mut events = Box::pin(Election::new(&watcher, &name).observe());
    assert_eq!(next_event(&mut events).await, LeaderEvent::NoLeader);
    let (a, b) = (session(&etcd, 10).await, session(&etcd, 10).await);
    let leader = Election::new(&a, &name).campaign("a").await.unwrap();
    assert_eq!(
        leader_key(&next_event(&mut events).await),
        Some(leader.key())
    );
    let eb = Election::new(&b, &name);
    let candidate = tokio::spawn(async move { eb.campaign("b").await });
    let observer = client(&etcd).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            members_under(&observer, &format!("{name}/")).await.len() == 2
        })
        .await
    );
    let keys = members_under(&observer, &format!("{name}/")).await;
    // The candidate's delete first, then the leader's: one revision, two events.
    let both = Txn::new().and_then([
        TxnOp::delete(keys[1].as_str(), None),
        TxnOp::delete(keys[0].as_str(), None),
    ]);
    observer.clone().txn(both).await.unwrap();
    let after = tokio::time::timeout(Duration::from_secs(2), events.next()).await;
    assert!(
        matches!(after, Ok(Some(Ok(LeaderEvent::NoLeader)))),
        "observe after the leader and the candidate went in one revision: {after:?}"
    );
    assert!(matches!(
        candidate.await.unwrap(),
        Err(Error::LockLost { .. })
    ));
    drop(leader);
}

/// The same through a `LeaderSelector`'s view of who leads: a follower queued behind the
/// leader and an outside candidate (a Go-style key) sees itself lead once the leader and the
/// candidate are deleted in one revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selectors_view_of_the_leader_follows_a_revision_that_deletes_several_keys() {
    use etcd_client::{PutOptions, Txn, TxnOp};
    let etcd = etcd().await;
    let name = unique("selector-one-revision");
    let observer = client(&etcd).await;
    // An outside leader and an outside candidate, each on a lease of its own.
    let mut raw = observer.clone();
    let mut keys = Vec::new();
    for k in ["1", "2"] {
        let lease = raw.lease_grant(30, None).await.unwrap().id();
        let key = format!("{name}/{k}");
        raw.put(
            key.as_str(),
            "outside",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
        keys.push(key);
    }
    let follower = LeaderSelector::new(client(&etcd).await, &name, "follower");
    let mut leaders = follower.leaders();
    let run = tokio::spawn(
        follower.run(std::future::pending::<()>(), |term| async move {
            term.cancelled().await;
        }),
    );
    let saw = |value: &'static [u8]| {
        let mut leaders = leaders.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(3),
                leaders.wait_for(|l| l.as_ref().is_some_and(|l| l.value() == value)),
            )
            .await
            .is_ok()
        }
    };
    assert!(
        saw(b"outside").await,
        "the follower sees the outside leader"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            members_under(&observer, &format!("{name}/")).await.len() == 3
        })
        .await,
        "the follower is queued"
    );
    let both = Txn::new().and_then([
        TxnOp::delete(keys[1].as_str(), None),
        TxnOp::delete(keys[0].as_str(), None),
    ]);
    observer.clone().txn(both).await.unwrap();
    assert!(
        saw(b"follower").await,
        "after one revision deleted the leader and the candidate: {:?}",
        *leaders.borrow_and_update()
    );
    run.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeued_leadership_lets_the_next_candidate_lead_then_leads_again_with_its_value() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("requeue-leader");
    let a = session(&etcd, 30).await;
    let b = session(&etcd, 30).await;
    let election = Election::new(&a, &name);
    let term = election.campaign("a-1").await.unwrap();
    let (old_key, old_token) = (term.key().to_owned(), term.fencing_token());
    let other = Election::new(&b, &name);
    let next = tokio::spawn(async move { other.campaign("b").await.unwrap() });
    assert!(
        eventually(Duration::from_secs(5), || async {
            members_under(&observer, &name).await.len() == 2
        })
        .await
    );
    let requeue = tokio::spawn(term.requeue("a-2"));
    let b_term = tokio::time::timeout(Duration::from_secs(5), next)
        .await
        .expect("the next candidate leads")
        .unwrap();
    assert_eq!(
        election.leader().await.unwrap().unwrap().value_str(),
        Some("b")
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !requeue.is_finished(),
        "led again while the next candidate led"
    );
    let b_token = b_term.fencing_token();
    b_term.release().await.unwrap();
    let again = tokio::time::timeout(Duration::from_secs(5), requeue)
        .await
        .expect("leads again once the next candidate resigned")
        .unwrap()
        .unwrap();
    assert!(old_token < b_token && b_token < again.fencing_token());
    assert_eq!(
        election.leader().await.unwrap().unwrap().value_str(),
        Some("a-2")
    );
    assert_eq!(
        deletion_revision(&observer, &old_key, old_token).await,
        again.fencing_token(),
        "the resignation and the new candidacy were separate writes"
    );
    // After a resign there is nothing to release: a requeue is a campaign.
    let mut resigned = again;
    resigned.resign().await.unwrap();
    let fresh = resigned.requeue("a-3").await.unwrap();
    assert_eq!(
        members_under(&observer, &name).await,
        vec![fresh.key().to_owned()]
    );
    fresh.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeue_after_a_resign_without_an_answer_finishes_it_and_campaigns() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let proxy = proxy(&etcd).await;
    let name = unique("requeue-after-lost-resign");
    let a =
        session_via_timing_out(&proxy, Duration::from_secs(30), Duration::from_millis(500)).await;
    let election = Election::new(&a, &name);
    let mut term = election.campaign("first").await.unwrap();
    proxy.drop_responses();
    let resigned = term.resign().await;
    assert!(
        resigned.is_err(),
        "resigned without an answer: {resigned:?}"
    );
    // The resignation landed: the key is gone by our own hand, not lost.
    assert!(members_under(&observer, &name).await.is_empty());
    proxy.heal();
    proxy.reset_peer();
    let again = tokio::time::timeout(Duration::from_secs(10), term.requeue("second"))
        .await
        .expect("the requeue returned")
        .expect("a resignation of our own is no loss");
    assert_eq!(
        members_under(&observer, &name).await,
        vec![again.key().to_owned()]
    );
    assert_eq!(
        election.leader().await.unwrap().unwrap().value_str(),
        Some("second")
    );
    again.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resign_dropped_after_it_was_sent_is_no_loss_for_the_next_resign_or_requeue() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let proxy = proxy(&etcd).await;
    let a =
        session_via_timing_out(&proxy, Duration::from_secs(30), Duration::from_millis(2000)).await;
    for requeue in [false, true] {
        let name = unique("dropped-resign");
        let election = Election::new(&a, &name);
        let mut term = election.campaign("first").await.unwrap();
        proxy.drop_responses();
        // The resignation is sent and lands; its caller gives up before the answer.
        let dropped = tokio::time::timeout(Duration::from_millis(300), term.resign()).await;
        assert!(
            dropped.is_err(),
            "resign answered through a proxy that drops answers"
        );
        assert!(
            eventually(Duration::from_secs(5), || async {
                members_under(&observer, &name).await.is_empty()
            })
            .await,
            "the dropped resignation did not land"
        );
        proxy.heal();
        proxy.reset_peer();
        // The connection is back before the next attempt: a transport error on it would count
        // as an unanswered attempt and hide what this test is about.
        let kv = a.client().clone();
        assert!(
            eventually(Duration::from_secs(5), || {
                let mut kv = kv.clone();
                async move { kv.get("probe", None).await.is_ok() }
            })
            .await
        );
        if requeue {
            let again = tokio::time::timeout(Duration::from_secs(10), term.requeue("second"))
                .await
                .expect("the requeue returned")
                .expect("a resignation of our own is no loss");
            assert_eq!(
                election.leader().await.unwrap().unwrap().value_str(),
                Some("second")
            );
            again.release().await.unwrap();
        } else {
            tokio::time::timeout(Duration::from_secs(10), term.resign())
                .await
                .expect("the resign returned")
                .expect("a resignation of our own is no loss");
        }
    }
}
