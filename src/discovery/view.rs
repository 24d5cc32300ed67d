//! Discovery: one consistent read of a target's endpoints, or a live view kept current from
//! one read plus a watch from that read's revision + 1.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::task::{Context, Poll};
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, SortOrder, SortTarget};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tokio::time::sleep;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::endpoint::{decode, Endpoint, Stored};
use super::target_prefix;
use crate::backoff::Backoff;
use crate::engine::{Gap, PrefixEvents};
use crate::error::{renewing_auth, within};
use crate::keys::prefix_end;
use crate::Error;

/// Keys per page of a read: pages are read at one revision, so a read is one snapshot
/// however many endpoints a target has.
const PAGE: i64 = 1000;

/// How often a read restarts because its revision was compacted between pages, before it
/// reports the failure.
const READ_RESTARTS: u32 = 5;

/// Finds a target's endpoints: `<target>/…` keys whose values are Go `endpoints.Update` JSON.
///
/// ```no_run
/// use etcd_coord::discovery::Discovery;
/// use futures::StreamExt;
///
/// # async fn demo(client: etcd_client::Client) -> Result<(), etcd_coord::Error> {
/// let discovery = Discovery::new(client, "services/greeter");
/// let now = discovery.list().await?;
/// println!("{} endpoints", now.len());
///
/// let view = discovery.view().await?;
/// let mut changes = view.changes();
/// while let Some(change) = changes.next().await {
///     println!("{:?}", change?);
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Discovery {
    client: Client,
    target: String,
    request_timeout: Duration,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("target", &self.target)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// One consistent read: the endpoints, the keys whose values are not endpoints, the revision.
struct Snapshot {
    endpoints: BTreeMap<String, Endpoint>,
    malformed: BTreeMap<String, String>,
    revision: i64,
}

impl Discovery {
    /// Discovery of the endpoints registered under `<target>/`. Nothing is sent yet; a bad
    /// target is reported by [`list`](Self::list) and [`view`](Self::view).
    pub fn new(client: Client, target: impl Into<String>) -> Discovery {
        Discovery {
            client,
            target: target.into(),
            request_timeout: Duration::from_secs(5),
        }
    }

    /// How long one read request may take (default 5 s).
    #[must_use]
    pub fn with_request_timeout(mut self, timeout: Duration) -> Discovery {
        self.request_timeout = timeout;
        self
    }

    /// The target.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The endpoints registered now (key → endpoint), from one linearizable read (paged, at one
    /// revision). Values that are not endpoints are skipped, each with a `tracing` warning.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad target (nothing is sent); [`Error::Timeout`],
    /// [`Error::Etcd`], [`Error::PermissionDenied`] when the read fails. Nothing is retried.
    ///
    /// # Cancel safety
    /// Only reads: dropping the future leaves nothing behind.
    pub async fn list(&self) -> Result<BTreeMap<String, Endpoint>, Error> {
        let prefix = target_prefix(&self.target)?;
        let snapshot = read(&self.client, &prefix, self.request_timeout).await?;
        Ok(snapshot.endpoints)
    }

    /// A [`ServiceView`] kept current in the background: one read (as [`list`](Self::list)),
    /// then a watch from that read's revision + 1, so no change between the two is missed.
    /// It survives disconnects (the watch resumes after the last revision it delivered),
    /// compaction (a fresh read, then exactly the difference is applied) and member failures.
    /// It ends only when dropped, or — visibly, through [`ServiceView::changed`] and
    /// [`ServiceView::changes`] — when etcd refuses it in a way retrying cannot fix (its
    /// permission was revoked, say).
    ///
    /// # Errors
    /// As [`list`](Self::list), for the first read.
    ///
    /// # Cancel safety
    /// Dropping the future before it completes starts nothing.
    pub async fn view(&self) -> Result<ServiceView, Error> {
        let prefix = target_prefix(&self.target)?;
        let first = read(&self.client, &prefix, self.request_timeout).await?;
        let counters = Arc::new(Counters::default());
        counters.revision.store(first.revision, Ordering::Relaxed);
        for (key, why) in &first.malformed {
            report_malformed(&counters, key, why);
        }
        let malformed = Arc::new(StdMutex::new(first.malformed));
        let (tx, rx) = watch::channel(Published {
            endpoints: Arc::new(first.endpoints),
            ended: None,
        });
        let stop = CancellationToken::new();
        let task = Follower {
            client: self.client.clone(),
            prefix: prefix.clone(),
            request_timeout: self.request_timeout,
            events: PrefixEvents::new(self.client.clone(), &prefix, first.revision),
            tx,
            counters: Arc::clone(&counters),
            malformed: Arc::clone(&malformed),
        };
        tokio::spawn(task.run(stop.clone()));
        Ok(ServiceView {
            target: self.target.clone(),
            rx: StdMutex::new(rx),
            counters,
            malformed,
            _stop: stop.drop_guard(),
        })
    }
}

/// Reads every key under `prefix` at one revision, in pages.
async fn read(client: &Client, prefix: &str, timeout: Duration) -> Result<Snapshot, Error> {
    let end = prefix_end(prefix.as_bytes());
    let mut restarts = 0;
    'read: loop {
        let mut snapshot = Snapshot {
            endpoints: BTreeMap::new(),
            malformed: BTreeMap::new(),
            revision: 0,
        };
        let mut from = prefix.as_bytes().to_vec();
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(PAGE)
                .with_sort(SortTarget::Key, SortOrder::Ascend);
            if snapshot.revision > 0 {
                opts = opts.with_revision(snapshot.revision);
            }
            let got = renewing_auth(client, || {
                let (mut client, from, opts) = (client.clone(), from.clone(), opts.clone());
                async move { within(timeout, client.get(from, Some(opts))).await }
            });
            let resp = match got.await {
                Ok(resp) => resp,
                Err(e) if snapshot.revision > 0 && is_compacted(&e) && restarts < READ_RESTARTS => {
                    restarts += 1;
                    continue 'read;
                }
                Err(e) => return Err(e),
            };
            if snapshot.revision == 0 {
                snapshot.revision = resp
                    .header()
                    .map(|h| h.revision())
                    .ok_or_else(|| Error::Protocol("a read without a header".into()))?;
            }
            for kv in resp.kvs() {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                match decode(kv.value()) {
                    Ok(Stored::Add(e)) => {
                        snapshot.endpoints.insert(key, e);
                    }
                    Err(e) => {
                        snapshot.malformed.insert(key, e.to_string());
                    }
                }
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(snapshot),
            }
        }
    }
}

fn is_compacted(e: &Error) -> bool {
    matches!(e, Error::Etcd(etcd_client::Error::GRpcStatus(s)) if s.message().contains("compacted"))
}

fn report_malformed(counters: &Counters, key: &str, why: &str) {
    counters.malformed.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(key, reason = why, "skipped a value that is not an endpoint");
}

/// What the background task publishes: the current set (a new `Arc` whenever it changes) and,
/// once it has ended, why.
#[derive(Clone)]
struct Published {
    endpoints: Arc<BTreeMap<String, Endpoint>>,
    ended: Option<Arc<Error>>,
}

#[derive(Default)]
struct Counters {
    revision: AtomicI64,
    events: AtomicU64,
    malformed: AtomicU64,
    resyncs: AtomicU64,
}

/// Counters of a [`ServiceView`], from [`ServiceView::metrics`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ViewMetrics {
    /// The store revision the view reflects (its first read's, or its latest event's).
    pub revision: i64,
    /// Watch events applied.
    pub events: u64,
    /// Values skipped because they are not endpoints (each also logged with `tracing`).
    pub malformed: u64,
    /// Full re-reads after the watch's history was compacted away.
    pub resyncs: u64,
}

/// A change of a [`ServiceView`]'s set of endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewChange {
    /// A key now holds an endpoint.
    Added {
        /// The key.
        key: String,
        /// Its endpoint.
        endpoint: Endpoint,
    },
    /// A key's endpoint changed (its address or metadata).
    Updated {
        /// The key.
        key: String,
        /// The endpoint before.
        previous: Endpoint,
        /// The endpoint now.
        endpoint: Endpoint,
    },
    /// A key no longer holds an endpoint (deleted, its lease ended, or overwritten with a value
    /// that is not one).
    Removed {
        /// The key.
        key: String,
        /// The endpoint it held.
        endpoint: Endpoint,
    },
}

impl ViewChange {
    /// The key the change is about.
    pub fn key(&self) -> &str {
        match self {
            ViewChange::Added { key, .. }
            | ViewChange::Updated { key, .. }
            | ViewChange::Removed { key, .. } => key,
        }
    }
}

/// The live set of a target's endpoints, from [`Discovery::view`]. Kept current by a
/// background task that ends when the view is dropped.
///
/// # Cancel safety
/// Dropping the view stops its task (and its watch); nothing is left behind.
pub struct ServiceView {
    target: String,
    rx: StdMutex<watch::Receiver<Published>>,
    counters: Arc<Counters>,
    malformed: Arc<StdMutex<BTreeMap<String, String>>>,
    _stop: DropGuard,
}

impl std::fmt::Debug for ServiceView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceView")
            .field("target", &self.target)
            .field("metrics", &self.metrics())
            .finish()
    }
}

impl ServiceView {
    /// The current set: key → endpoint. Marks the set as seen by [`changed`](Self::changed).
    pub fn endpoints(&self) -> BTreeMap<String, Endpoint> {
        self.lock_rx()
            .borrow_and_update()
            .endpoints
            .as_ref()
            .clone()
    }

    /// Completes at the next change of the set after the last [`endpoints`](Self::endpoints)
    /// or `changed` call (at once if there was one since).
    ///
    /// # Errors
    /// [`Error::ViewEnded`] (with the cause) once the view has ended.
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future loses no change (the next call sees it).
    pub async fn changed(&self) -> Result<(), Error> {
        // A clone has seen what this receiver has seen; it replaces it once it has seen more.
        let mut rx = self.lock_rx().clone();
        let alive = rx.changed().await.is_ok();
        let ended = rx.borrow_and_update().ended.clone();
        *self.lock_rx() = rx;
        match (ended, alive) {
            (Some(e), _) => Err(Error::ViewEnded(e)),
            (None, true) => Ok(()),
            (None, false) => Err(Error::ViewEnded(Arc::new(Error::Protocol(
                "the view's task stopped".into(),
            )))),
        }
    }

    /// The changes after now, as a stream: each [`Added`](ViewChange::Added),
    /// [`Updated`](ViewChange::Updated) or [`Removed`](ViewChange::Removed) once, in key order
    /// within a batch. A consumer that falls behind never loses a change: it gets the
    /// difference between what it saw last and the current set (intermediate states may be
    /// merged). The stream yields `Err(`[`Error::ViewEnded`]`)` and ends if the view ends; it
    /// ends without error when the view is dropped.
    pub fn changes(&self) -> ViewChanges {
        let rx = self.lock_rx().clone();
        let seen = Arc::clone(&rx.borrow().endpoints);
        ViewChanges::new(rx, seen)
    }

    /// Like [`changes`](Self::changes), but starting from the empty set: first an
    /// [`Added`](ViewChange::Added) for every current endpoint, then the changes.
    pub fn changes_from_empty(&self) -> ViewChanges {
        ViewChanges::new(self.lock_rx().clone(), Arc::new(BTreeMap::new()))
    }

    /// Keys under the target whose values are not endpoints right now, with the reason.
    pub fn malformed(&self) -> BTreeMap<String, String> {
        self.malformed
            .lock()
            .expect("no panics under this lock")
            .clone()
    }

    /// The view's counters.
    pub fn metrics(&self) -> ViewMetrics {
        let c = &self.counters;
        ViewMetrics {
            revision: c.revision.load(Ordering::Relaxed),
            events: c.events.load(Ordering::Relaxed),
            malformed: c.malformed.load(Ordering::Relaxed),
            resyncs: c.resyncs.load(Ordering::Relaxed),
        }
    }

    /// The target this view follows.
    pub fn target(&self) -> &str {
        &self.target
    }

    fn lock_rx(&self) -> std::sync::MutexGuard<'_, watch::Receiver<Published>> {
        self.rx.lock().expect("no panics under this lock")
    }
}

/// The [`Stream`] of a [`ServiceView`]'s changes, from [`ServiceView::changes`].
pub struct ViewChanges {
    inner: BoxStream<'static, Result<ViewChange, Error>>,
}

impl std::fmt::Debug for ViewChanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewChanges").finish_non_exhaustive()
    }
}

struct ChangesState {
    rx: watch::Receiver<Published>,
    seen: Arc<BTreeMap<String, Endpoint>>,
    queue: VecDeque<ViewChange>,
    done: bool,
}

impl ViewChanges {
    fn new(rx: watch::Receiver<Published>, seen: Arc<BTreeMap<String, Endpoint>>) -> ViewChanges {
        let state = ChangesState {
            rx,
            seen,
            queue: VecDeque::new(),
            done: false,
        };
        let inner = futures::stream::unfold(state, |mut s| async move {
            loop {
                if let Some(change) = s.queue.pop_front() {
                    return Some((Ok(change), s));
                }
                if s.done {
                    return None;
                }
                let published = s.rx.borrow_and_update().clone();
                if !Arc::ptr_eq(&published.endpoints, &s.seen) {
                    s.queue = diff(&s.seen, &published.endpoints);
                    s.seen = published.endpoints;
                    continue;
                }
                if let Some(e) = published.ended {
                    s.done = true;
                    return Some((Err(Error::ViewEnded(e)), s));
                }
                if s.rx.changed().await.is_err() {
                    return None; // the view was dropped
                }
            }
        });
        ViewChanges {
            inner: inner.boxed(),
        }
    }
}

impl Stream for ViewChanges {
    type Item = Result<ViewChange, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// The changes that turn `old` into `new`, in key order.
fn diff(
    old: &BTreeMap<String, Endpoint>,
    new: &BTreeMap<String, Endpoint>,
) -> VecDeque<ViewChange> {
    let mut out = VecDeque::new();
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return out,
            (Some((k, e)), None) => {
                out.push_back(removed(k, e));
                a.next();
            }
            (None, Some((k, e))) => {
                out.push_back(added(k, e));
                b.next();
            }
            (Some((ka, ea)), Some((kb, eb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    out.push_back(removed(ka, ea));
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    out.push_back(added(kb, eb));
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if ea != eb {
                        out.push_back(ViewChange::Updated {
                            key: (*kb).clone(),
                            previous: (*ea).clone(),
                            endpoint: (*eb).clone(),
                        });
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
}

fn added(key: &str, endpoint: &Endpoint) -> ViewChange {
    ViewChange::Added {
        key: key.to_owned(),
        endpoint: endpoint.clone(),
    }
}

fn removed(key: &str, endpoint: &Endpoint) -> ViewChange {
    ViewChange::Removed {
        key: key.to_owned(),
        endpoint: endpoint.clone(),
    }
}

/// The background task of a view: applies watch events, re-reads after compaction.
struct Follower {
    client: Client,
    prefix: String,
    request_timeout: Duration,
    events: PrefixEvents,
    tx: watch::Sender<Published>,
    counters: Arc<Counters>,
    malformed: Arc<StdMutex<BTreeMap<String, String>>>,
}

impl Follower {
    async fn run(mut self, stop: CancellationToken) {
        let ended = tokio::select! {
            _ = stop.cancelled() => return,
            e = self.follow() => e,
        };
        tracing::warn!(prefix = %self.prefix, error = %ended, "service view ended");
        self.tx.send_modify(|p| p.ended = Some(Arc::new(ended)));
    }

    /// Follows the prefix until a failure retrying cannot fix, which it returns. Every event of
    /// a revision is applied before the set is published, and the set is published as soon as
    /// every revision etcd sent so far is applied.
    async fn follow(&mut self) -> Error {
        let mut current = Arc::clone(&self.tx.borrow().endpoints);
        let mut dirty = false;
        loop {
            match self.events.next().await {
                Ok(revision) => {
                    self.counters
                        .revision
                        .fetch_max(revision.revision, Ordering::Relaxed);
                    for event in &revision.events {
                        dirty |= self.apply(Arc::make_mut(&mut current), event);
                    }
                }
                Err(Gap::Compacted) => match self.resync().await {
                    Ok(fresh) => {
                        if *fresh != *current {
                            current = fresh;
                            dirty = true;
                        }
                    }
                    Err(e) => return e,
                },
                Err(Gap::Fatal(e)) => return e,
            }
            if dirty && self.events.is_drained() {
                let endpoints = Arc::clone(&current);
                self.tx.send_modify(|p| p.endpoints = endpoints);
                dirty = false;
            }
        }
    }

    /// Applies one watch event to `map`; returns whether the set changed.
    fn apply(&self, map: &mut BTreeMap<String, Endpoint>, event: &etcd_client::Event) -> bool {
        self.counters.events.fetch_add(1, Ordering::Relaxed);
        let Some(kv) = event.kv() else { return false };
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let endpoint = match event.event_type() {
            EventType::Delete => None,
            EventType::Put => match decode(kv.value()) {
                Ok(Stored::Add(e)) => Some(e),
                Err(e) => {
                    let why = e.to_string();
                    report_malformed(&self.counters, &key, &why);
                    self.lock_malformed().insert(key.clone(), why);
                    None
                }
            },
        };
        if endpoint.is_some() || event.event_type() == EventType::Delete {
            self.lock_malformed().remove(&key);
        }
        match endpoint {
            Some(e) if map.get(&key) != Some(&e) => {
                map.insert(key, e);
                true
            }
            Some(_) => false,
            None => map.remove(&key).is_some(),
        }
    }

    /// After compaction: reads the whole prefix again (retrying transient failures) and
    /// resumes the watch after that read.
    async fn resync(&mut self) -> Result<Arc<BTreeMap<String, Endpoint>>, Error> {
        self.counters.resyncs.fetch_add(1, Ordering::Relaxed);
        let mut backoff = Backoff::for_requests();
        loop {
            match read(&self.client, &self.prefix, self.request_timeout).await {
                Ok(snapshot) => {
                    tracing::info!(prefix = %self.prefix, revision = snapshot.revision, "view re-read after compaction");
                    self.counters
                        .revision
                        .fetch_max(snapshot.revision, Ordering::Relaxed);
                    for (key, why) in &snapshot.malformed {
                        report_malformed(&self.counters, key, why);
                    }
                    *self.lock_malformed() = snapshot.malformed;
                    self.events.resume_after(snapshot.revision);
                    return Ok(Arc::new(snapshot.endpoints));
                }
                Err(e) if e.is_transient() => sleep(backoff.next_delay()).await,
                Err(e) => return Err(e),
            }
        }
    }

    fn lock_malformed(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.malformed.lock().expect("no panics under this lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map() -> impl Strategy<Value = BTreeMap<String, Endpoint>> {
        prop::collection::btree_map("[a-e]", "[x-z]".prop_map(Endpoint::new), 0..5)
    }

    proptest! {
        #[test]
        fn applying_the_diff_turns_the_old_set_into_the_new(old in map(), new in map()) {
            let mut applied = old.clone();
            let changes = diff(&old, &new);
            let mut keys = Vec::new();
            for change in changes {
                keys.push(change.key().to_owned());
                match change {
                    ViewChange::Added { key, endpoint } => {
                        prop_assert!(applied.insert(key, endpoint).is_none());
                    }
                    ViewChange::Updated { key, previous, endpoint } => {
                        prop_assert_ne!(&previous, &endpoint);
                        prop_assert_eq!(applied.insert(key, endpoint), Some(previous));
                    }
                    ViewChange::Removed { key, endpoint } => {
                        prop_assert_eq!(applied.remove(&key), Some(endpoint));
                    }
                }
            }
            prop_assert_eq!(&applied, &new);
            let mut sorted = keys.clone();
            sorted.sort();
            sorted.dedup();
            prop_assert_eq!(keys, sorted, "one change per key, in key order");
        }
    }
}
