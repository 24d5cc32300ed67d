//! Tracing spans on real etcd: a public operation's span carries the name, the lease and —
//! once acquired — the fencing token, and a contended acquisition's span holds the enqueue,
//! the wait and the re-read that its time went to.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use common::*;
use etcd_coord::Mutex;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// A closed span: its name, its fields, and its parent's name.
#[derive(Debug, Clone)]
struct Closed {
    name: String,
    fields: BTreeMap<String, String>,
    parent: Option<String>,
}

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
        ctx.span(id).unwrap().extensions_mut().insert(fields);
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
        self.0.lock().unwrap().push(Closed {
            name: span.name().to_owned(),
            fields,
            parent: span.parent().map(|p| p.name().to_owned()),
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
    let (lease, token) = std::thread::scope(|scope| {
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
                        let (a, b) = (session(&etcd, 10).await, session(&etcd, 10).await);
                        let held = Mutex::new(&a, &name).lock().await.unwrap();
                        let waiter = tokio::spawn({
                            let mutex = Mutex::new(&b, &name);
                            async move { mutex.lock().await }
                        });
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        held.release().await.unwrap();
                        let got = waiter.await.unwrap().unwrap();
                        let token = got.fencing_token();
                        got.release().await.unwrap();
                        (b.lease_id(), token)
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
    assert_eq!(locks.len(), 2, "{spans:#?}");
    let waited = locks
        .iter()
        .find(|s| s.fields.get("fencing_token") == Some(&token.to_string()))
        .unwrap_or_else(|| panic!("a lock span with fencing_token {token}: {locks:#?}"));
    assert_eq!(waited.fields.get("name"), Some(&name));
    assert_eq!(waited.fields.get("lease"), Some(&format!("{lease:x}")));
    let inside = |child: &str| {
        spans
            .iter()
            .filter(|s| s.name == child && s.parent.as_deref() == Some("etcd_coord.mutex.lock"))
            .count()
    };
    assert!(
        inside("etcd_coord.enqueue") >= 2,
        "each lock enqueued: {spans:#?}"
    );
    assert!(
        inside("etcd_coord.watch_wait") >= 1,
        "the waiter waited: {spans:#?}"
    );
    assert!(
        inside("etcd_coord.reread") >= 1,
        "and read again after the hand-off: {spans:#?}"
    );
    let releases = spans
        .iter()
        .filter(|s| s.name == "etcd_coord.release")
        .count();
    assert_eq!(releases, 2);
}
