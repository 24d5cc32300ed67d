//! Discovery: one consistent read of a target's endpoints, or a live view kept current from
//! one read plus the watch layer's stream of the target's revisions.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use etcd_client::{Client, EventType};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

#[cfg(doc)]
use super::changes::ViewChange;
use super::changes::ViewChanges;
use super::endpoint::{decode, Endpoint, Stored};
use super::read::{read, Snapshot};
use super::target_prefix;
use crate::rpc::Rpc;
use crate::watch::revisions::Reread;
use crate::watch::{Revisions, Update};
use crate::Error;

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

    /// A request handle for one call.
    fn rpc(&self) -> Rpc {
        Rpc::detached(self.client.clone(), self.request_timeout)
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
    #[tracing::instrument(name = "etcd_coord.discovery.list", skip_all, fields(target = %self.target))]
    pub async fn list(&self) -> Result<BTreeMap<String, Endpoint>, Error> {
        let prefix = target_prefix(&self.target)?;
        let snapshot = read(&self.rpc(), &prefix).await?;
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
    #[tracing::instrument(name = "etcd_coord.discovery.view", skip_all, fields(target = %self.target))]
    pub async fn view(&self) -> Result<ServiceView, Error> {
        let prefix = target_prefix(&self.target)?;
        let rpc = self.rpc();
        let first = read(&rpc, &prefix).await?;
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
        let reread: Reread<Snapshot> = {
            let (rpc, prefix) = (rpc.clone(), prefix.clone());
            Box::new(move || {
                let (rpc, prefix) = (rpc.clone(), prefix.clone());
                Box::pin(async move {
                    let snapshot = read(&rpc, &prefix).await?;
                    let revision = snapshot.revision;
                    Ok((snapshot, revision))
                })
            })
        };
        let task = Follower {
            prefix: prefix.clone(),
            revisions: Revisions::after(rpc, &prefix, first.revision, reread),
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

fn report_malformed(counters: &Counters, key: &str, why: &str) {
    counters.malformed.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(key, reason = why, "skipped a value that is not an endpoint");
}

/// What the background task publishes: the current set (a new `Arc` whenever it changes) and,
/// once it has ended, why.
#[derive(Clone)]
pub(super) struct Published {
    pub(super) endpoints: Arc<BTreeMap<String, Endpoint>>,
    pub(super) ended: Option<Arc<Error>>,
}

#[derive(Default)]
struct Counters {
    revision: AtomicI64,
    events: AtomicU64,
    malformed: AtomicU64,
    resyncs: AtomicU64,
    lag: AtomicI64,
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
    /// How many revisions etcd was ahead of the view when it last reported its progress (0:
    /// caught up).
    pub lag: i64,
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
            lag: c.lag.load(Ordering::Relaxed),
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

/// The background task of a view: applies watch events, re-reads after compaction.
struct Follower {
    prefix: String,
    revisions: Revisions<Snapshot>,
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
    /// every revision etcd sent so far is applied; after compaction the watch layer re-reads
    /// the whole target and exactly the difference is published.
    async fn follow(&mut self) -> Error {
        let mut current = Arc::clone(&self.tx.borrow().endpoints);
        let mut dirty = false;
        loop {
            match self.revisions.next().await {
                Ok(Update::Revision(revision)) => {
                    self.counters
                        .revision
                        .fetch_max(revision.revision, Ordering::Relaxed);
                    for event in &revision.events {
                        dirty |= self.apply(Arc::make_mut(&mut current), event);
                    }
                }
                Ok(Update::Snapshot { state, revision }) => {
                    tracing::info!(prefix = %self.prefix, revision, "view re-read after compaction");
                    self.counters.resyncs.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .revision
                        .fetch_max(revision, Ordering::Relaxed);
                    for (key, why) in &state.malformed {
                        report_malformed(&self.counters, key, why);
                    }
                    *self.lock_malformed() = state.malformed;
                    if *current != state.endpoints {
                        current = Arc::new(state.endpoints);
                        dirty = true;
                    }
                }
                Err(e) => return e,
            }
            self.counters
                .lag
                .store(self.revisions.lag(), Ordering::Relaxed);
            if dirty && self.revisions.is_drained() {
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

    fn lock_malformed(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.malformed.lock().expect("no panics under this lock")
    }
}
