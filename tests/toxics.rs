//! What each toxiproxy toxic on a client's link to etcd does to every role — a lock holder, a
//! waiter, an election leader, an observer and a discovery view — and what stays guaranteed.
//! Each test prints its row of the table in docs/chaos.md ("Behaviour under each toxic");
//! `-- --nocapture` shows them.
//!
//! Every role whose link is faulted reaches etcd through one proxy of the testkit's
//! toxiproxy-compatible fault server; its peers (a waiter for the holder's lock, a candidate
//! behind the leader, a registrant for the view, the holder the waiter waits for) talk to etcd
//! directly. The toxic acts on both streams from t = 0 for 8 s (two session TTLs of 4 s); at
//! t = 1 s the waiter's lock is released and an endpoint is registered; then the toxic is
//! removed and every role must recover.

mod common;

use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use common::*;
use etcd_coord::discovery::{Discovery, Endpoint, Registration};
use etcd_coord::{Election, LeaderEvent, LeasedSession, Mutex, SessionOptions, SessionState};
use etcd_coord_testkit::faults::{FaultServer, Stream, Toxic, ToxicKind};
use futures::StreamExt;
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(4);
const WINDOW: Duration = Duration::from_secs(8);

/// When things happened, in seconds from the toxic's start (`None`: not within the run).
#[derive(Debug, Default, Clone)]
struct Row {
    holder_lost: Option<f64>,
    holder_takeover: Option<f64>,
    /// When the waiter got the lock, or when its `lock()` failed and how.
    waiter: Option<(f64, String)>,
    leader_lost: Option<f64>,
    leader_takeover: Option<f64>,
    observer_saw_takeover: Option<f64>,
    view_saw_endpoint: Option<f64>,
    /// After the heal: how long until a fresh session through the link got a lock and the
    /// observer and the view were current.
    recovered_after_heal: Option<f64>,
}

fn secs(at: Option<Instant>, t0: Instant) -> Option<f64> {
    at.map(|a| ((a.saturating_duration_since(t0)).as_secs_f64() * 100.0).round() / 100.0)
}

fn fmt(x: Option<f64>) -> String {
    x.map_or("—".into(), |s| format!("{s:.2} s"))
}

type Stamp = Arc<StdMutex<Option<Instant>>>;

fn stamp() -> Stamp {
    Arc::new(StdMutex::new(None))
}

fn mark(s: &Stamp) {
    s.lock().unwrap().get_or_insert_with(Instant::now);
}

fn read(s: &Stamp) -> Option<Instant> {
    *s.lock().unwrap()
}

/// Runs the scenario with `kind` on both streams of the faulted roles' link; prints and
/// returns the row, after checking what must hold whatever the toxic.
async fn under(label: &str, kind: ToxicKind) -> Row {
    let etcd = etcd().await;
    let observer_client = client(&etcd).await;
    let faults = FaultServer::start("127.0.0.1:0").await.unwrap();
    let link = faults
        .create_proxy("link", "127.0.0.1:0", &etcd.endpoints()[0])
        .await
        .unwrap()
        .listen;
    let options = SessionOptions::new().with_ttl(TTL);
    let via = || async {
        LeasedSession::new(client_via_endpoint(&link).await, options.clone())
            .await
            .unwrap()
    };
    let direct = || async {
        LeasedSession::new(client(&etcd).await, options.clone())
            .await
            .unwrap()
    };
    let (lock, other_lock, election, target) = (
        unique("toxic-lock"),
        unique("toxic-lock2"),
        unique("toxic-election"),
        unique("toxic-svc"),
    );

    // Before the toxic: everyone in place.
    let holder_session = via().await;
    let holder = Mutex::new(&holder_session, &lock).lock().await.unwrap();
    let holder_token = holder.fencing_token();
    let direct_holder_session = direct().await;
    let direct_holder = Mutex::new(&direct_holder_session, &other_lock)
        .lock()
        .await
        .unwrap();
    let leader_session = via().await;
    let leadership = Election::new(&leader_session, &election)
        .campaign("faulted")
        .await
        .unwrap();
    let leader_token = leadership.fencing_token();
    let observer_session = via().await;
    let mut observed = Box::pin(Election::new(&observer_session, &election).observe());
    match observed.next().await {
        Some(Ok(LeaderEvent::Leader(l))) => assert_eq!(l.value(), b"faulted"),
        other => panic!("the observer starts with the leader: {other:?}"),
    }
    let view = Arc::new(
        Discovery::new(client_via_endpoint(&link).await, &target)
            .view()
            .await
            .unwrap(),
    );

    let (holder_lost, holder_takeover) = (stamp(), stamp());
    let waiter_outcome: Arc<StdMutex<Option<(Instant, String)>>> = Arc::new(StdMutex::new(None));
    let (leader_lost, leader_takeover, observer_saw) = (stamp(), stamp(), stamp());
    let view_saw = stamp();
    let takeover_token = Arc::new(StdMutex::new(0));
    let mut tasks = Vec::new();
    {
        let (lost, s) = (holder_lost.clone(), holder.fence());
        tasks.push(tokio::spawn(async move {
            let _ = s.lost().await;
            mark(&lost);
        }));
    }
    {
        let (at, token, s) = (
            holder_takeover.clone(),
            Arc::clone(&takeover_token),
            direct().await,
        );
        let m = Mutex::new(&s, &lock);
        tasks.push(tokio::spawn(async move {
            let g = m.lock().await.unwrap();
            mark(&at);
            *token.lock().unwrap() = g.fencing_token();
            let _ = g.release().await;
            drop(s);
        }));
    }
    let waiter_session = via().await;
    {
        let outcome = Arc::clone(&waiter_outcome);
        let m = Mutex::new(&waiter_session, &other_lock);
        tasks.push(tokio::spawn(async move {
            let got = m.lock().await;
            let what = match &got {
                Ok(_) => "got the lock".to_owned(),
                Err(e) => format!("lock() failed: {e}"),
            };
            *outcome.lock().unwrap() = Some((Instant::now(), what));
            if let Ok(g) = got {
                let _ = g.release().await;
            }
        }));
    }
    {
        let lost = leader_lost.clone();
        let f = leadership.fence();
        tasks.push(tokio::spawn(async move {
            let _ = f.lost().await;
            mark(&lost);
        }));
    }
    {
        let (at, s) = (leader_takeover.clone(), direct().await);
        let e = Election::new(&s, &election);
        tasks.push(tokio::spawn(async move {
            let mut l = e.campaign("peer").await.unwrap();
            mark(&at);
            let _ = l.resign().await;
            drop(s);
        }));
    }
    {
        let at = observer_saw.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(event) = observed.next().await {
                if matches!(&event, Ok(LeaderEvent::Leader(l)) if l.value() == b"peer") {
                    mark(&at);
                    return;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // the peers are queued

    // The toxic, both ways.
    let t0 = Instant::now();
    for stream in [Stream::Upstream, Stream::Downstream] {
        faults
            .add_toxic(
                "link",
                Toxic::new(format!("{label}-{stream:?}"), stream, kind.clone()),
            )
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    direct_holder.release().await.unwrap();
    let registrant = Registration::register(
        client(&etcd).await,
        &target,
        Endpoint::new("10.9.9.9:1"),
        options.clone(),
    )
    .await
    .unwrap();
    let key = registrant.key().to_owned();
    let watch_view = {
        let at = view_saw.clone();
        let key = key.clone();
        let view = Arc::clone(&view);
        tokio::spawn(async move {
            loop {
                if view.endpoints().contains_key(&key) {
                    mark(&at);
                    return;
                }
                if view.changed().await.is_err() {
                    return;
                }
            }
        })
    };
    tokio::time::sleep(WINDOW - Duration::from_secs(1)).await;
    let holder_state_at_end = holder_session.state();
    for stream in [Stream::Upstream, Stream::Downstream] {
        faults
            .remove_toxic("link", &format!("{label}-{stream:?}"))
            .unwrap();
    }
    let healed = Instant::now();
    // Recovery: a fresh session through the link takes a lock; the observer has seen the
    // peer if the peer leads; the view holds the endpoint.
    let fresh = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let attempt = async {
                let s =
                    LeasedSession::new(client_via_endpoint(&link).await, options.clone()).await?;
                Mutex::new(&s, unique("toxic-after"))
                    .lock()
                    .await?
                    .release()
                    .await?;
                s.close().await
            };
            if tokio::time::timeout(Duration::from_secs(5), attempt)
                .await
                .is_ok_and(|r| r.is_ok())
            {
                return;
            }
        }
    })
    .await
    .is_ok();
    let current = eventually(Duration::from_secs(20), || async {
        read(&view_saw).is_some()
            && (read(&leader_takeover).is_none() || read(&observer_saw).is_some())
    })
    .await;
    let recovered = fresh && current;
    let recovered_at = recovered.then(Instant::now);
    let waiter = waiter_outcome
        .lock()
        .unwrap()
        .clone()
        .map(|(at, what)| (secs(Some(at), t0).unwrap_or_default(), what));
    let row = Row {
        holder_lost: secs(read(&holder_lost), t0),
        holder_takeover: secs(read(&holder_takeover), t0),
        waiter,
        leader_lost: secs(read(&leader_lost), t0),
        leader_takeover: secs(read(&leader_takeover), t0),
        observer_saw_takeover: secs(read(&observer_saw), t0),
        view_saw_endpoint: secs(read(&view_saw), t0),
        recovered_after_heal: secs(recovered_at, healed),
    };
    println!(
        "| {label} | lost() {}, state at 8 s {holder_state_at_end:?}; peer took over {} | {} | lost() {}; peer leads {} | saw the peer {} | saw the endpoint {} | {} |",
        fmt(row.holder_lost),
        fmt(row.holder_takeover),
        row.waiter
            .as_ref()
            .map_or("—".into(), |(t, what)| format!("{what} at {t:.2} s")),
        fmt(row.leader_lost),
        fmt(row.leader_takeover),
        fmt(row.observer_saw_takeover),
        fmt(row.view_saw_endpoint),
        fmt(row.recovered_after_heal),
    );

    // Whatever the toxic: no overlap — a holder or leader knows it lost before a peer takes
    // over — tokens go up, every role recovers after the heal, and nothing is left.
    if let Some(t) = row.holder_takeover {
        let lost = row
            .holder_lost
            .expect("a peer took over from a holder that never knew");
        assert!(
            lost <= t,
            "{label}: the holder learnt of its loss at {lost} s, after the takeover at {t} s"
        );
        assert!(*takeover_token.lock().unwrap() > holder_token);
    }
    if let Some(t) = row.leader_takeover {
        let lost = row
            .leader_lost
            .expect("a peer leads while the leader never knew");
        assert!(
            lost <= t,
            "{label}: the leader learnt of its loss at {lost} s, after the takeover at {t} s"
        );
    }
    if holder_state_at_end != SessionState::Lost && row.holder_lost.is_none() {
        assert!(row.holder_takeover.is_none());
    }
    assert!(
        recovered,
        "{label}: a role did not recover within 20 s of the heal: {row:?}"
    );
    let _ = leader_token;
    drop((holder, leadership, registrant));
    for s in [
        holder_session,
        leader_session,
        observer_session,
        waiter_session,
        direct_holder_session,
    ] {
        let _ = s.close().await;
    }
    watch_view.abort();
    for t in tasks {
        t.abort();
    }
    drop(view);
    let name_keys = |n: String| {
        let c = observer_client.clone();
        async move { keys_under(&c, &n).await.is_empty() }
    };
    assert!(
        eventually(TTL * 3, || async {
            name_keys(lock.clone()).await
                && name_keys(other_lock.clone()).await
                && name_keys(election.clone()).await
                && name_keys(target.clone()).await
        })
        .await,
        "{label}: keys were left behind"
    );
    row
}

/// Nothing is lost: no role of the link gives anything up, the waiter gets the lock and the
/// view the endpoint within `within` seconds of the 1 s mark.
fn nothing_lost(row: &Row, within: f64) {
    assert_eq!(row.holder_lost, None, "{row:?}");
    assert_eq!(row.holder_takeover, None, "{row:?}");
    assert_eq!(row.leader_lost, None, "{row:?}");
    assert_eq!(row.leader_takeover, None, "{row:?}");
    assert!(
        matches!(&row.waiter, Some((t, what)) if what == "got the lock" && *t < 1.0 + within),
        "{row:?}"
    );
    assert!(
        row.view_saw_endpoint.is_some_and(|t| t < 1.0 + within),
        "{row:?}"
    );
}

/// The link is as good as cut: the holder's and the leader's sessions end on their own clock
/// (the last acknowledged refresh + TTL − margin: under 3.2 s here), the peers take over only
/// after that — once the server expired or the client revoked the lease — and the waiter's
/// `lock()` ends with the session's loss rather than hanging.
fn cut_off(row: &Row) {
    let lost = row.holder_lost.expect("the holder learns of its loss");
    assert!(lost < TTL.as_secs_f64(), "{row:?}");
    assert!(row.holder_takeover.is_some_and(|t| t >= lost), "{row:?}");
    let led = row.leader_lost.expect("the leader learns of its loss");
    assert!(led < TTL.as_secs_f64(), "{row:?}");
    assert!(row.leader_takeover.is_some_and(|t| t >= led), "{row:?}");
    assert!(
        matches!(&row.waiter, Some((_, what)) if what.contains("session lost")),
        "{row:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_100ms_slows_every_role_and_costs_nobody_anything() {
    let row = under(
        "latency 100 ms",
        ToxicKind::Latency {
            latency: 100,
            jitter: 0,
        },
    )
    .await;
    nothing_lost(&row, 1.5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_2s_makes_holders_and_leaders_give_up_before_peers_take_over() {
    let row = under(
        "latency 2 s",
        ToxicKind::Latency {
            latency: 2000,
            jitter: 0,
        },
    )
    .await;
    cut_off(&row);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_1kbps_slows_but_loses_nothing() {
    let row = under("bandwidth 1 KB/s", ToxicKind::Bandwidth { rate: 1 }).await;
    nothing_lost(&row, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_0_is_a_silent_partition_and_peers_take_over_after_the_loss() {
    let row = under("timeout 0", ToxicKind::Timeout { timeout: 0 }).await;
    cut_off(&row);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_peer_on_every_connection_is_a_partition_too() {
    let row = under("reset_peer 0", ToxicKind::ResetPeer { timeout: 0 }).await;
    cut_off(&row);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slicer_10_bytes_changes_nothing_anyone_sees() {
    let row = under(
        "slicer 10 B",
        ToxicKind::Slicer {
            average_size: 10,
            size_variation: 5,
            delay: 0,
        },
    )
    .await;
    nothing_lost(&row, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_data_closes_connections_and_everyone_reconnects_without_loss() {
    let row = under("limit_data 1 KB", ToxicKind::LimitData { bytes: 1000 }).await;
    nothing_lost(&row, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_close_changes_nothing_while_connections_stay_open() {
    let row = under("slow_close 2 s", ToxicKind::SlowClose { delay: 2000 }).await;
    nothing_lost(&row, 1.0);
}
