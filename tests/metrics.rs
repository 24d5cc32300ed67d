//! Metrics, recorded through metrics-util's debugging recorder on real etcd: every series
//! under its documented name and labels (`etcd_coord::metrics`, docs/operations.md), label
//! values bounded, the primitive's name only when opted in.

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use common::*;
use etcd_coord::discovery::{Discovery, Endpoint, SessionRegistration};
use etcd_coord::metrics::{self as m, NAMES};
use etcd_coord::SessionOptions;
use etcd_coord::{Barrier, DoubleBarrier, Election, Error, Mutex, RwLock, Semaphore};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::CompositeKey;

/// What a test recorded: each series' key and value.
struct Recorded(Vec<(CompositeKey, DebugValue)>);

impl Recorded {
    /// Runs `test` on a runtime of this thread with a recorder of its own (other tests'
    /// metrics never mix in), and returns what it recorded. Recording tests run one at a time:
    /// the `name` label opt-in (`set_name_labels`) is process-wide, and one test turning it on
    /// must not label another's acquisitions.
    fn during<F: Future<Output = ()>>(test: impl FnOnce() -> F + Send) -> Recorded {
        static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _alone = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        // A thread with room for the test's futures (debug builds keep them on the stack).
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .stack_size(32 << 20)
                .spawn_scoped(scope, || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    metrics::with_local_recorder(&recorder, || runtime.block_on(test()));
                })
                .unwrap()
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        });
        let series = snapshotter.snapshot().into_vec();
        Recorded(series.into_iter().map(|(k, _, _, v)| (k, v)).collect())
    }

    /// The series of `name` whose labels include `labels`.
    fn series<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a DebugValue> {
        self.0.iter().filter_map(move |(k, v)| {
            let key = k.key();
            let has = |(l, want): &(&str, &str)| {
                key.labels().any(|x| x.key() == *l && x.value() == *want)
            };
            (key.name() == name && labels.iter().all(has)).then_some(v)
        })
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.series(name, labels)
            .map(|v| match v {
                DebugValue::Counter(n) => *n,
                other => panic!("{name} is a counter, not {other:?}"),
            })
            .sum()
    }

    fn samples(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        self.series(name, labels)
            .flat_map(|v| match v {
                DebugValue::Histogram(values) => {
                    values.iter().map(|x| x.into_inner()).collect::<Vec<_>>()
                }
                other => panic!("{name} is a histogram, not {other:?}"),
            })
            .collect()
    }

    fn names(&self) -> BTreeSet<&str> {
        self.0.iter().map(|(k, _)| k.key().name()).collect()
    }

    fn label_keys(&self) -> BTreeSet<&str> {
        self.0
            .iter()
            .flat_map(|(k, _)| k.key().labels().map(|l| l.key()))
            .collect()
    }
}

#[test]
fn acquisitions_holds_and_lost_guards_are_counted_by_kind_and_outcome() {
    let name = unique("metrics");
    let recorded = Recorded::during(|| async {
        let etcd = etcd().await;
        let (a, b) = (session(&etcd, 10).await, session(&etcd, 3).await);
        let held = Mutex::new(&a, &name).lock().await.unwrap();
        assert!(
            Mutex::new(&b, &name).try_lock().await.unwrap().is_none(),
            "busy"
        );
        let waiting = Mutex::new(&b, &name);
        let late = etcd_coord::timeout(Duration::from_millis(300), waiting.lock());
        assert!(late.await.is_none(), "timeout");
        tokio::select! {
            _ = waiting.lock() => panic!("the lock is held"),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {} // cancelled
        }
        let waiter = tokio::spawn({
            let mutex = Mutex::new(&b, &name);
            async move { mutex.lock().await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        held.release().await.unwrap();
        let got = waiter.await.unwrap().unwrap();
        // The waiter's lease revoked by hand: its guard is lost (counted once).
        client(&etcd)
            .await
            .lease_revoke(b.lease_id())
            .await
            .unwrap();
        let error = got.lost().await;
        assert!(
            matches!(error, Error::LockLost { .. } | Error::SessionLost(_)),
            "{error}"
        );
        assert!(got.release().await.is_err(), "a lost guard's release fails");

        let other = unique("kinds");
        Semaphore::new(&a, &other, 2)
            .acquire()
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
        RwLock::new(&a, &other)
            .read()
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
        RwLock::new(&a, &other)
            .write()
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
        let mut leading = Election::new(&a, &other).campaign("v").await.unwrap();
        leading.resign().await.unwrap();
        let up = Barrier::new(&a, &other).hold().await.unwrap();
        assert!(matches!(
            Barrier::new(&a, &other).hold().await,
            Err(Error::AlreadyHeld { .. })
        ));
        up.release().await.unwrap();
        DoubleBarrier::new(&a, &other, 1)
            .enter()
            .await
            .unwrap()
            .leave()
            .await
            .unwrap();

        // Opted in, the primitive's name is a label too.
        {
            /// Turns the opt-in off again however the block ends, a panic included.
            struct NameLabels;
            impl Drop for NameLabels {
                fn drop(&mut self) {
                    m::set_name_labels(false);
                }
            }
            m::set_name_labels(true);
            let _off_after = NameLabels;
            Mutex::new(&a, format!("{name}-named"))
                .lock()
                .await
                .unwrap()
                .release()
                .await
                .unwrap();
        }
        a.close().await.unwrap();
    });
    let mutex =
        |outcome| recorded.counter(m::ACQUISITIONS, &[("kind", "mutex"), ("outcome", outcome)]);
    assert_eq!(mutex("acquired"), 3, "two here, one named");
    assert_eq!(
        (mutex("busy"), mutex("timeout"), mutex("cancelled")),
        (1, 1, 1)
    );
    let waits = recorded.samples(
        m::ACQUIRE_WAIT,
        &[("kind", "mutex"), ("outcome", "acquired")],
    );
    assert_eq!(waits.len(), 3);
    assert!(
        waits.iter().any(|w| *w >= 0.25),
        "the waiter's wait: {waits:?}"
    );
    let timed_out = recorded.samples(
        m::ACQUIRE_WAIT,
        &[("kind", "mutex"), ("outcome", "timeout")],
    );
    assert!(
        timed_out.len() == 1 && timed_out[0] >= 0.29,
        "{timed_out:?}"
    );
    assert_eq!(
        recorded.samples(m::HOLD, &[("kind", "mutex")]).len(),
        3,
        "each guard's hold, once"
    );
    assert_eq!(
        recorded.counter(m::GUARDS_LOST, &[("kind", "mutex")]),
        1,
        "lost once"
    );
    let causes = recorded.counter(m::GUARDS_LOST, &[("cause", "key_gone")])
        + recorded.counter(m::GUARDS_LOST, &[("cause", "session_lost")]);
    assert_eq!(causes, 1);
    for (kind, outcome, n) in [
        ("semaphore", "acquired", 1),
        ("rwlock_read", "acquired", 1),
        ("rwlock_write", "acquired", 1),
        ("election", "acquired", 1),
        ("barrier", "acquired", 1),
        ("barrier", "busy", 1),
        ("double_barrier", "acquired", 1),
    ] {
        let count = recorded.counter(m::ACQUISITIONS, &[("kind", kind), ("outcome", outcome)]);
        assert_eq!(count, n, "{kind} {outcome}");
        assert!(
            !recorded.samples(m::HOLD, &[("kind", kind)]).is_empty() || outcome == "busy",
            "{kind}"
        );
    }
    assert!(
        recorded.label_keys().contains("name"),
        "opted in: a name label"
    );
    let named: u64 = recorded
        .0
        .iter()
        .filter(|(k, _)| k.key().labels().any(|l| l.key() == "name"))
        .map(|(k, v)| match v {
            DebugValue::Counter(n) if k.key().name() == m::ACQUISITIONS => *n,
            _ => 0,
        })
        .sum();
    assert_eq!(
        named, 1,
        "only the acquisition made while opted in carries its name"
    );
    let labelled = [("name", format!("{name}-named"))];
    let labelled: Vec<(&str, &str)> = labelled.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(
        recorded.counter(m::ACQUISITIONS, &labelled),
        1,
        "its name is the label's value"
    );
    for name in recorded.names() {
        assert!(
            NAMES.contains(&name),
            "{name} is not documented in etcd_coord::metrics"
        );
    }
}

#[test]
fn sessions_retries_and_views_are_measured() {
    let target = unique("metrics-svc");
    let recorded = Recorded::during(|| async {
        let etcd = etcd().await;
        let proxy = proxy(&etcd).await;
        let options = SessionOptions::new()
            .with_ttl(Duration::from_secs(6))
            .with_request_timeout(Duration::from_millis(300));
        let s = session_via(&proxy, options).await;
        // A request that goes unanswered is sent again (cause: timeout).
        proxy.blackhole();
        let attempt = tokio::spawn({
            let mutex = Mutex::new(&s, unique("retry"));
            async move { mutex.try_lock().await }
        });
        tokio::time::sleep(Duration::from_millis(900)).await;
        proxy.heal();
        assert!(attempt.await.unwrap().unwrap().is_some());

        // A view applies events, and reads again after its history was compacted away.
        let c = client(&etcd).await;
        let view = Discovery::new(client_via(&proxy).await, &target)
            .view()
            .await
            .unwrap();
        let registered = SessionRegistration::register(&s, &target, Endpoint::new("10.0.0.1:80"))
            .await
            .unwrap();
        assert!(
            eventually(Duration::from_secs(5), || async {
                view.endpoints().len() == 1
            })
            .await
        );
        proxy.down();
        c.clone()
            .put(
                format!("{target}/10.0.0.2:80"),
                Endpoint::new("10.0.0.2:80").to_json(),
                None,
            )
            .await
            .unwrap();
        // A later revision too, so that the compaction removes the view's next one.
        c.clone().put(unique("elsewhere"), "", None).await.unwrap();
        etcd.compact().await.unwrap();
        proxy.heal();
        assert!(
            eventually(Duration::from_secs(10), || async {
                view.endpoints().len() == 2
            })
            .await
        );
        registered.deregister().await.unwrap();
        s.close().await.unwrap();
    });
    assert!(recorded.counter(m::REQUEST_RETRIES, &[("cause", "timeout")]) >= 1);
    let rtts = recorded.samples(m::KEEPALIVE_RTT, &[]);
    assert!(
        !rtts.is_empty() && rtts.iter().all(|r| *r < 6.0),
        "{rtts:?}"
    );
    let left = recorded.samples(m::DEADLINE_REMAINING, &[]);
    assert!(
        !left.is_empty() && left.iter().all(|l| *l <= 6.0),
        "{left:?}"
    );
    assert!(recorded.counter(m::SESSION_STATE_CHANGES, &[("state", "lost")]) >= 1);
    assert!(recorded.counter(m::SESSION_LOSSES, &[("reason", "closed")]) >= 1);
    assert!(recorded.counter(m::VIEW_EVENTS, &[("view", "discovery")]) >= 1);
    assert!(recorded.counter(m::VIEW_REREADS, &[("view", "discovery")]) >= 1);
    assert!(!recorded
        .samples(m::VIEW_LAG, &[("view", "discovery")])
        .is_empty());
    assert!(
        !recorded.label_keys().contains("name"),
        "no name labels unless opted in"
    );
    for name in recorded.names() {
        assert!(
            NAMES.contains(&name),
            "{name} is not documented in etcd_coord::metrics"
        );
    }
}

#[test]
fn every_metric_is_in_the_operations_table_and_the_table_names_no_other() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .unwrap();
    let rows: BTreeSet<String> = doc
        .lines()
        .filter(|l| l.starts_with("| `etcd_coord_"))
        .map(|l| l.split('`').nth(1).unwrap().to_owned())
        .collect();
    let names: BTreeSet<String> = NAMES.iter().map(|n| n.to_string()).collect();
    assert_eq!(rows, names);
}
