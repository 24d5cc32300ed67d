//! Tracing spans on real etcd: a public operation's span carries the name, the lease and —
//! once acquired — the fencing token, and a contended acquisition's span holds the enqueue,
//! the announcement, the wait and (when the hand-off was not announced) the re-read that its
//! time went to.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use common::*;
use etcd_coord::Mutex;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// A closed span: its name, its fields, and its own and its parent's serial numbers (unique,
/// unlike span ids, which are reused).
#[derive(Debug, Clone)]
struct Closed {
    name: String,
    fields: BTreeMap<String, String>,
    serial: u64,
    parent_serial: Option<u64>,
}

struct Serial(u64);

static SERIALS: AtomicU64 = AtomicU64::new(0);

#[derive(Default)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

/// Records every span as it closes.
#[derive(Clone, Default)]
struct Capture(Arc<StdMutex<Vec<Closed>>>);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let span = ctx.span(id).unwrap();
        let mut extensions = span.extensions_mut();
        extensions.insert(fields);
        extensions.insert(Serial(SERIALS.fetch_add(1, Ordering::Relaxed)));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let span = ctx.span(id).unwrap();
        let mut extensions = span.extensions_mut();
        values.record(extensions.get_mut::<Fields>().unwrap());
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let span = ctx.span(&id).unwrap();
        let fields = span
            .extensions()
            .get::<Fields>()
            .map(|f| f.0.clone())
            .unwrap_or_default();
        let serial = |s: &tracing_subscriber::registry::SpanRef<'_, S>| {
            s.extensions().get::<Serial>().map(|n| n.0).unwrap()
        };
        self.0.lock().unwrap().push(Closed {
            name: span.name().to_owned(),
            fields,
            serial: serial(&span),
            parent_serial: span.parent().map(|p| serial(&p)),
        });
    }
}

#[test]
fn a_contended_locks_span_has_its_name_lease_token_and_where_its_time_went() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry()
        .with(capture.clone())
        .with(tracing_subscriber::filter::LevelFilter::DEBUG);
    let name = unique("spans");
    let ((lease, announced), (_, by_hand)) = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .stack_size(32 << 20)
            .spawn_scoped(scope, || {
                tracing::subscriber::with_default(subscriber, || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    runtime.block_on(Box::pin(async {
                        let etcd = etcd().await;
                        let observer = client(&etcd).await;
                        // A queue that looks long: waiters follow the key just ahead
                        // (announcing themselves, reading again) instead of counting.
                        pad_with_nested_keys(&observer, &name).await;
                        let (a, b) = (session(&etcd, 10).await, session(&etcd, 10).await);
                        // A hand-off announced: the holder releases, its waiter takes over.
                        let held = Mutex::new(&a, &name).lock().await.unwrap();
                        let waiter = tokio::spawn({
                            let mutex = Mutex::new(&b, &name);
                            async move { mutex.lock().await }
                        });
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        held.release().await.unwrap();
                        let got = waiter.await.unwrap().unwrap();
                        let first = (b.lease_id(), got.fencing_token());
                        // Not announced: the holder's key deleted by hand, the waiter reads again.
                        let waiter = tokio::spawn({
                            let mutex = Mutex::new(&a, &name);
                            async move { mutex.lock().await }
                        });
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        observer.clone().delete(got.key(), None).await.unwrap();
                        let then = waiter.await.unwrap().unwrap();
                        let second = (a.lease_id(), then.fencing_token());
                        then.release().await.unwrap();
                        let _ = got.release().await; // lost: its key was deleted
                        (first, second)
                    }))
                })
            })
            .unwrap()
            .join()
            .unwrap()
    });
    let spans = capture.0.lock().unwrap().clone();
    let locks: Vec<&Closed> = spans
        .iter()
        .filter(|s| s.name == "etcd_coord.mutex.lock")
        .collect();
    assert_eq!(locks.len(), 3, "{spans:#?}");
    let lock_with = |token: i64| {
        *locks
            .iter()
            .find(|s| s.fields.get("fencing_token") == Some(&token.to_string()))
            .unwrap_or_else(|| panic!("a lock span with fencing_token {token}: {locks:#?}"))
    };
    let inside = |lock: &Closed, child: &str| {
        spans
            .iter()
            .filter(|s| s.name == child && s.parent_serial == Some(lock.serial))
            .count()
    };
    let waited = lock_with(announced);
    assert_eq!(waited.fields.get("name"), Some(&name));
    assert_eq!(waited.fields.get("lease"), Some(&format!("{lease:x}")));
    assert_eq!(inside(waited, "etcd_coord.enqueue"), 1, "{spans:#?}");
    assert!(
        inside(waited, "etcd_coord.announce") >= 1,
        "it announced itself to the holder: {spans:#?}"
    );
    assert!(
        inside(waited, "etcd_coord.watch_wait") >= 1,
        "it waited: {spans:#?}"
    );
    let unannounced = lock_with(by_hand);
    assert_eq!(inside(unannounced, "etcd_coord.enqueue"), 1, "{spans:#?}");
    assert!(
        inside(unannounced, "etcd_coord.watch_wait") >= 1,
        "{spans:#?}"
    );
    assert!(
        inside(unannounced, "etcd_coord.reread") >= 1,
        "it read the queue again after the key ahead went without a release: {spans:#?}"
    );
    let releases = spans
        .iter()
        .filter(|s| s.name == "etcd_coord.release")
        .count();
    assert_eq!(releases, 3);
}
