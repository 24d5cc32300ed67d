//! The one wait engine every primitive is built on.
//!
//! * **Enqueue** — one Txn puts the member key (`CreateRevision == 0`, under the session's
//!   lease) and reads what blocks it. It runs in a short detached task, so a caller that drops
//!   its future mid-request can never strand a key: the task finishes the request and hands
//!   whatever landed to the session's clean-up. Transport failures are retried with the same
//!   key, so a lost response never creates a second waiter.
//! * **Wait** — one loop ([`wait_loop`]): read while our key exists → decide (through / act /
//!   wait) → wait for the changes the decision names (a queue: only the one key that blocks
//!   us, so no herd) with a watch registered from now ([`wait_for_change`]), together with our
//!   own key and the session's loss → read again. After every wake-up — change, compaction,
//!   stream failure — the decision is re-made from a fresh read.
//! * **Hold** — [`Holding`] is the state behind every guard: fenced compare, fenced Txn,
//!   `lost()`, fenced and retry-safe release, release on drop via the session's task.

use std::future::Future;
use std::sync::Arc;

use etcd_client::{
    Compare, EventType, GetResponse, Txn, TxnOp, TxnResponse, WatchFilterType, WatchOptions,
};
use tokio::sync::oneshot;
use tokio::time::{sleep, timeout};

use crate::backoff::Backoff;
use crate::keys::{self, Blocker, Queue};
use crate::session::{Cleanup, Shared};
use crate::{Error, LeasedSession};

/// Defines a guard over a [`Holding`]: the struct (with the caller's docs and attributes),
/// `Deref<Target = Fence>`, `fence()` and a consuming, fenced `release()`. Every guard that
/// releases by consuming itself is made this way.
macro_rules! holding_guard {
    ($(#[$attr:meta])* pub struct $name:ident;) => {
        $(#[$attr])*
        #[derive(Debug)]
        pub struct $name {
            holding: $crate::engine::Holding,
        }

        impl ::std::ops::Deref for $name {
            type Target = $crate::Fence;

            /// The guard's [`Fence`](crate::Fence): `key()`, `fencing_token()`,
            /// `owner_compare()`, `txn_if_owner(ops)`, `lost()`, `session()`.
            fn deref(&self) -> &$crate::Fence {
                self.holding.fence()
            }
        }

        impl $name {
            #[allow(dead_code)]
            pub(crate) fn from_holding(holding: $crate::engine::Holding) -> $name {
                $name { holding }
            }

            /// A cloneable copy of the guard's [`Fence`](crate::Fence), for fenced writes from
            /// other tasks (it holds nothing itself).
            pub fn fence(&self) -> $crate::Fence {
                self.holding.fence().clone()
            }

            /// Releases deterministically, with a Txn fenced on the key's create revision.
            ///
            /// # Errors
            /// [`Error::LockLost`](crate::Error::LockLost) if the key was already gone (it had
            /// been lost before the release); request errors after retries, in which case the
            /// session's task keeps retrying the same fenced release in the background (a
            /// fenced retry can never touch a later holder's key).
            ///
            /// # Cancel safety
            /// Dropping the future hands the release to the session's background task.
            pub async fn release(mut self) -> Result<(), $crate::Error> {
                self.holding.release().await.map(|_| ())
            }
        }
    };
}
pub(crate) use holding_guard;

/// Whether a Txn contains a write (a put or a delete, in either branch).
///
/// etcd sends a Txn with any write through raft and applies it with a context of its own, so
/// cancelling the request is harmless. A read-only Txn is applied with the request's context,
/// and etcd before 3.5.5 panics — the whole server — if that context is cancelled while the Txn
/// is applied (etcd #14110). Read-only Txns (and any whose content we do not control) are
/// therefore never cancelled in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Contains a put or a delete: may be cancelled.
    Write,
    /// May be read-only: must not be cancelled in flight.
    MaybeReadOnly,
}

/// Sends `txn` with the session's request timeout.
///
/// A [`Kind::MaybeReadOnly`] Txn is never cancelled mid-flight: it runs in a short task of the
/// session, and a caller that gives up (its future dropped, or the request timeout) only stops
/// waiting; the task gives up after [`ABANDON_AFTER`] request timeouts. A [`Kind::Write`] Txn
/// is sent directly.
pub(crate) async fn send_txn(shared: &Shared, txn: Txn, kind: Kind) -> Result<TxnResponse, Error> {
    crate::session::Counters::add(&shared.counters.txns, 1);
    let mut kv = shared.client.kv_client();
    if kind == Kind::Write {
        return match timeout(shared.request_timeout, kv.txn(txn)).await {
            Err(_) => Err(Error::Timeout(shared.request_timeout)),
            Ok(answer) => Ok(answer?),
        };
    }
    let (tx, rx) = oneshot::channel();
    let patience = shared.request_timeout * ABANDON_AFTER;
    shared.spawn(async move {
        if let Ok(answer) = timeout(patience, kv.txn(txn)).await {
            let _ = tx.send(answer);
        }
    });
    match timeout(shared.request_timeout, rx).await {
        Err(_) => Err(Error::Timeout(shared.request_timeout)),
        Ok(Err(_)) => Err(Error::Timeout(patience)),
        Ok(Ok(answer)) => Ok(answer?),
    }
}

/// How many request timeouts a request in flight is left to finish after its caller stopped
/// waiting, before it is cancelled after all (see [`send_txn`]).
const ABANDON_AFTER: u32 = 10;

/// Runs `fut` unless the session is (or becomes) Lost first.
pub(crate) async fn unless_lost<F: Future<Output = Result<T, Error>>, T>(
    shared: &Arc<Shared>,
    fut: F,
) -> Result<T, Error> {
    shared.check()?;
    tokio::select! {
        out = fut => out,
        reason = shared.lost() => Err(Error::lost(reason)),
    }
}

/// Sleeps for the next backoff delay, or fails if the session is Lost first.
async fn back_off(shared: &Arc<Shared>, backoff: &mut Backoff) -> Result<(), Error> {
    let delay = backoff.next_delay();
    unless_lost(shared, async {
        sleep(delay).await;
        Ok(())
    })
    .await
}

/// What a read (run while our key still exists) saw: its revision and its `Get` results.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub(crate) revision: i64,
    pub(crate) gets: Vec<GetResponse>,
}

/// A member key that has been (or may have been) created: cleaned up by the session's task if
/// dropped before it is turned into an [`Acquired`] (and then a [`Holding`]).
pub(crate) struct Ticket {
    shared: Arc<Shared>,
    key: String,
    create_revision: i64,
    armed: bool,
}

impl Ticket {
    /// A ticket for `key`, created at `create_revision`, armed.
    fn new(shared: &Arc<Shared>, key: String, create_revision: i64) -> Ticket {
        Ticket {
            shared: Arc::clone(shared),
            key,
            create_revision,
            armed: true,
        }
    }

    /// The acquisition is through, confirmed at `revision`: hands it out, unless the session
    /// is Lost by now — then the still-armed ticket cleans the key up as it is dropped.
    fn into_acquired(mut self, revision: i64) -> Result<Acquired, Error> {
        self.shared.check()?;
        self.armed = false;
        Ok(Acquired {
            key: std::mem::take(&mut self.key),
            create_revision: self.create_revision,
            revision,
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.armed {
            let key = std::mem::take(&mut self.key);
            self.shared
                .clean_up(Cleanup::release(key, self.create_revision));
        }
    }
}

/// The outcome of a detached request on its way to the caller. It owns the clean-up of
/// whatever the request created: if it is dropped unread — the task could not deliver it, or
/// the caller was cancelled after it was delivered but before it was read — the clean-up is
/// handed to the session's task. It also keeps the session's pending-work count up until
/// then, so `settled()` cannot miss it.
struct Delivery<T> {
    outcome: Option<Result<T, Error>>,
    cleanup: Option<Cleanup>,
    shared: Arc<Shared>,
    _pending: crate::session::PendingWork,
}

impl<T> Drop for Delivery<T> {
    fn drop(&mut self) {
        if let Some(job) = self.cleanup.take() {
            self.shared.clean_up(job);
        }
    }
}

/// Runs `work` — a request that may create `key` — in a detached task, so that dropping the
/// caller at any point cannot strand the key: unless the caller takes a successful outcome
/// over, whatever `created` says landed (or, on failure, whatever may have landed) is handed
/// to the session's clean-up. A caller that takes an `Ok` over must arm its own [`Ticket`]
/// before its next await.
async fn detached<T, W, C>(shared: &Arc<Shared>, key: &str, work: W, created: C) -> Result<T, Error>
where
    T: Send + 'static,
    W: Future<Output = Result<T, Error>> + Send + 'static,
    C: Fn(&T) -> Option<i64> + Send + 'static,
{
    let (tx, rx) = oneshot::channel::<Delivery<T>>();
    let task_shared = Arc::clone(shared);
    let task_key = key.to_owned();
    let pending = shared.pending_work();
    shared.spawn(async move {
        let outcome = work.await;
        let cleanup = match &outcome {
            Ok(value) => created(value).map(|rev| Cleanup::release(task_key, rev)),
            Err(_) => Some(Cleanup::Abandoned { key: task_key }),
        };
        // If the caller is gone, the returned delivery is dropped here and cleans up.
        let _ = tx.send(Delivery {
            outcome: Some(outcome),
            cleanup,
            shared: task_shared,
            _pending: pending,
        });
    });
    let mut delivery = unless_lost(shared, async {
        rx.await
            .map_err(|_| Error::Protocol("acquisition task ended without an answer".into()))
    })
    .await?;
    let outcome = delivery
        .outcome
        .take()
        .unwrap_or_else(|| Err(Error::Protocol("empty delivery".into())));
    if outcome.is_ok() {
        delivery.cleanup = None; // the caller's ticket takes over
    }
    outcome
}

/// Sends `txn()` until it is answered, retrying transport failures (with the same request, so
/// a retry is idempotent) with backoff while the session lives.
async fn send_until_answered(
    shared: &Arc<Shared>,
    txn: impl Fn() -> Txn,
    kind: Kind,
) -> Result<TxnResponse, Error> {
    let mut backoff = Backoff::for_requests();
    loop {
        match unless_lost(shared, send_txn(shared, txn(), kind)).await {
            Err(e) if e.is_retryable() => {
                tracing::debug!(error = %e, "request failed; retrying it unchanged");
                back_off(shared, &mut backoff).await?;
            }
            other => return other,
        }
    }
}

/// Puts `key` (under the session's lease) unless it exists, running `reads` just before the
/// put, in a detached task (see [`detached`]). Returns the armed ticket and, when this Txn
/// created the key, the snapshot of the reads (a retry that found the key already there must
/// read afresh).
async fn enqueue(
    shared: &Arc<Shared>,
    key: &str,
    value: Vec<u8>,
    reads: Vec<TxnOp>,
) -> Result<(Ticket, Option<Snapshot>), Error> {
    let work = {
        let shared = Arc::clone(shared);
        let key = key.to_owned();
        async move {
            let resp = send_until_answered(
                &shared,
                || keys::enqueue_txn(&key, value.clone(), shared.lease_id, reads.clone()),
                Kind::Write,
            )
            .await?;
            let revision = keys::header_revision(&resp)?;
            let gets = keys::txn_gets(&resp);
            if resp.succeeded() {
                return Ok((revision, Some(Snapshot { revision, gets })));
            }
            // A retry: the earlier, unanswered request created the key.
            let kv = gets
                .first()
                .and_then(|g| g.kvs().first())
                .ok_or_else(|| Error::Protocol("enqueue txn else-branch without the key".into()))?;
            if kv.lease() != shared.lease_id {
                return Err(Error::Protocol(format!(
                    "member key {key} belongs to lease {:x}, not ours",
                    kv.lease()
                )));
            }
            Ok((kv.create_revision(), None))
        }
    };
    let (create_revision, snapshot) = detached(shared, key, work, |(create_revision, _)| {
        Some(*create_revision)
    })
    .await?;
    Ok((
        Ticket::new(shared, key.to_owned(), create_revision),
        snapshot,
    ))
}

/// Runs `reads` while our key still exists. [`Error::LockLost`] once it is gone.
async fn read_fenced(
    shared: &Arc<Shared>,
    ticket: &Ticket,
    reads: &[TxnOp],
) -> Result<Snapshot, Error> {
    let resp = send_until_answered(
        shared,
        || keys::fenced_reads(&ticket.key, ticket.create_revision, reads.to_vec()),
        Kind::MaybeReadOnly,
    )
    .await?;
    if !resp.succeeded() {
        return Err(Error::LockLost {
            key: ticket.key.clone(),
            create_revision: ticket.create_revision,
        });
    }
    Ok(Snapshot {
        revision: keys::header_revision(&resp)?,
        gets: keys::txn_gets(&resp),
    })
}

/// What a wait for a change ended with.
pub(crate) enum Woken {
    /// One of the watched changes happened.
    Changed,
    /// A cancelled watch or a stream failure: re-read and decide again.
    Recheck,
}

/// A change to wait for: a put or a delete of `key`, or of any key under it with `prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Watched {
    key: Vec<u8>,
    prefix: bool,
    kind: EventType,
}

impl Watched {
    /// The deletion of exactly `key`.
    pub(crate) fn deleted(key: impl Into<Vec<u8>>) -> Watched {
        Watched {
            key: key.into(),
            prefix: false,
            kind: EventType::Delete,
        }
    }

    /// A put of exactly `key`.
    pub(crate) fn put(key: impl Into<Vec<u8>>) -> Watched {
        Watched {
            key: key.into(),
            prefix: false,
            kind: EventType::Put,
        }
    }

    /// A put of any key under `prefix`.
    pub(crate) fn put_under(prefix: impl Into<Vec<u8>>) -> Watched {
        Watched {
            key: prefix.into(),
            prefix: true,
            kind: EventType::Put,
        }
    }

    fn matches(&self, kind: EventType, key: &[u8]) -> bool {
        kind == self.kind
            && if self.prefix {
                key.starts_with(&self.key)
            } else {
                key == self.key
            }
    }

    fn options(&self) -> WatchOptions {
        let opts = WatchOptions::new().with_filters([match self.kind {
            EventType::Delete => WatchFilterType::NoPut,
            EventType::Put => WatchFilterType::NoDelete,
        }]);
        if self.prefix {
            opts.with_prefix()
        } else {
            opts
        }
    }
}

/// A watch for changes to a few keys or ranges (and, optionally, the deletion of our own key),
/// registered *from now*.
///
/// etcd puts a watch whose start revision is at or below its current revision into the
/// "unsynced" group, served on a 100 ms tick. A watch from `read revision + 1` lands there
/// whenever anything was written between the read and the watch's creation — constantly under
/// contention. A watch without a start revision is always registered in the synced group, at
/// the revision its `created` response reports; if that is newer than the read that decided to
/// wait, the caller confirms with a fresh read while the watch is already in place: anything
/// after the watch's revision is delivered, anything up to the fresh read's is seen by it.
struct ChangeWatch {
    shared: Arc<Shared>,
    stream: etcd_client::WatchStream,
    targets: Vec<Watched>,
    own: Option<(String, i64)>,
    /// A change that arrived while the watch was still being created.
    early: Option<Result<Woken, Error>>,
}

impl ChangeWatch {
    /// Opens the watch and waits until etcd confirmed it. Returns it with the revision after
    /// which every change is delivered, or `None` after a transient failure (the caller
    /// re-reads; a backoff delay has been served).
    async fn open(
        shared: &Arc<Shared>,
        targets: &[Watched],
        own: Option<(&str, i64)>,
    ) -> Result<Option<(ChangeWatch, i64)>, Error> {
        let mut watches = shared.client.watch_client();
        let opened = unless_lost(shared, async {
            let created = async {
                let (first, rest) = targets
                    .split_first()
                    .ok_or_else(|| Error::Protocol("a watch without targets".into()))?;
                let mut stream = watches
                    .watch(first.key.clone(), Some(first.options()))
                    .await?;
                for t in rest {
                    stream.watch(t.key.clone(), Some(t.options())).await?;
                }
                if let Some((own_key, _)) = own {
                    stream
                        .watch(own_key, Some(Watched::deleted(own_key).options()))
                        .await?;
                }
                let mut watch = ChangeWatch {
                    shared: Arc::clone(shared),
                    stream,
                    targets: targets.to_vec(),
                    own: own.map(|(k, r)| (k.to_owned(), r)),
                    early: None,
                };
                let mut pending = targets.len() + usize::from(own.is_some());
                let mut revision = 0;
                while pending > 0 {
                    let resp = watch.stream.message().await?.ok_or_else(|| {
                        Error::Etcd(etcd_client::Error::WatchError("watch stream ended".into()))
                    })?;
                    if resp.created() {
                        if resp.canceled() {
                            return Err(Error::Protocol(format!(
                                "etcd refused a watch: {}",
                                resp.cancel_reason()
                            )));
                        }
                        pending -= 1;
                        revision = revision.max(resp.header().map_or(0, |h| h.revision()));
                    }
                    if watch.early.is_none() {
                        watch.early = watch.classify(&resp);
                    }
                }
                Ok((watch, revision))
            };
            match timeout(shared.request_timeout, created).await {
                Err(_) => Err(Error::Timeout(shared.request_timeout)),
                Ok(r) => r,
            }
        })
        .await;
        match opened {
            Ok(opened) => Ok(Some(opened)),
            Err(e @ (Error::Timeout(_) | Error::Etcd(_))) => {
                tracing::debug!(error = %e, "opening a watch failed; re-reading");
                back_off(shared, &mut Backoff::for_requests()).await?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// What a watch response means for this wait, if anything.
    fn classify(&self, resp: &etcd_client::WatchResponse) -> Option<Result<Woken, Error>> {
        crate::session::Counters::add(
            &self.shared.counters.watch_events,
            resp.events().len() as u64,
        );
        if resp.canceled() && !resp.created() {
            tracing::debug!(
                compact_revision = resp.compact_revision(),
                reason = resp.cancel_reason(),
                "watch cancelled; re-reading"
            );
            return Some(Ok(Woken::Recheck));
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let kind = event.event_type();
            if let Some((own_key, create_revision)) = &self.own {
                if kind == EventType::Delete && kv.key() == own_key.as_bytes() {
                    return Some(Err(Error::LockLost {
                        key: own_key.clone(),
                        create_revision: *create_revision,
                    }));
                }
            }
            if self.targets.iter().any(|t| t.matches(kind, kv.key())) {
                return Some(Ok(Woken::Changed));
            }
        }
        None
    }

    /// Waits for a change. Our own key's deletion is [`Error::LockLost`], the session's loss
    /// [`Error::SessionLost`] / [`Error::SessionClosed`].
    async fn wait(mut self, shared: &Arc<Shared>) -> Result<Woken, Error> {
        if let Some(outcome) = self.early.take() {
            return outcome;
        }
        loop {
            let msg = unless_lost(shared, async { Ok(self.stream.message().await) }).await?;
            match msg {
                Ok(Some(resp)) => {
                    if let Some(outcome) = self.classify(&resp) {
                        tracing::trace!(
                            revision = resp.header().map_or(0, |h| h.revision()),
                            "woken"
                        );
                        return outcome;
                    }
                }
                Ok(None) | Err(_) => {
                    tracing::debug!("watch stream ended; re-reading");
                    back_off(shared, &mut Backoff::for_requests()).await?;
                    return Ok(Woken::Recheck);
                }
            }
        }
    }
}

/// The wait step every primitive goes through: with a watch registered from now on `targets`
/// (and our own key's deletion, and the session's loss), waits for a change. `read_at` is the
/// revision of the read that decided to wait; if writes landed since, `reread` runs once the
/// watch is in place and says whether to still wait.
pub(crate) async fn wait_for_change<R, Fut>(
    shared: &Arc<Shared>,
    targets: &[Watched],
    own: Option<(&str, i64)>,
    read_at: i64,
    reread: R,
) -> Result<Woken, Error>
where
    R: FnOnce() -> Fut,
    Fut: Future<Output = Result<bool, Error>>,
{
    let Some((watch, from)) = ChangeWatch::open(shared, targets, own).await? else {
        return Ok(Woken::Recheck);
    };
    if from > read_at && !reread().await? {
        return Ok(Woken::Changed);
    }
    watch.wait(shared).await
}

/// What a primitive makes of a [`Snapshot`] taken while its key exists.
pub(crate) enum Decision {
    /// Done: the acquisition is through.
    Through,
    /// Send this Txn (e.g. put a "ready" key), then read again.
    Act(Txn),
    /// Wait for one of these changes, then read again.
    Wait(Vec<Watched>),
}

/// The one wait loop: read (only while our key exists) → decide → through, act, or wait for a
/// change → read again. Every wake-up re-decides from a fresh read, so a waiter never trusts
/// a notification (etcd #16221). `first` is a snapshot the enqueue already took, if any.
async fn wait_loop<D>(
    shared: &Arc<Shared>,
    ticket: Ticket,
    mut first: Option<Snapshot>,
    reads: Vec<TxnOp>,
    mut decide: D,
) -> Result<Acquired, Error>
where
    D: FnMut(&Snapshot) -> Decision,
{
    loop {
        let snapshot = match first.take() {
            Some(s) => s,
            None => {
                let s = read_fenced(shared, &ticket, &reads).await?;
                tracing::trace!(key = %ticket.key, revision = s.revision, "re-read");
                s
            }
        };
        match decide(&snapshot) {
            Decision::Through => {
                tracing::trace!(key = %ticket.key, "through");
                return ticket.into_acquired(snapshot.revision);
            }
            Decision::Act(txn) => {
                unless_lost(shared, send_txn(shared, txn, Kind::Write)).await?;
            }
            Decision::Wait(targets) => {
                let own = Some((ticket.key.as_str(), ticket.create_revision));
                let mut fresh = None;
                let decide = &mut decide;
                let woken = wait_for_change(shared, &targets, own, snapshot.revision, || async {
                    // Writes landed between the read and the watch: still waiting for the
                    // same changes?
                    let now = read_fenced(shared, &ticket, &reads).await?;
                    let still = matches!(decide(&now), Decision::Wait(t) if t == targets);
                    if !still {
                        fresh = Some(now); // current: no need to read again
                    }
                    Ok(still)
                })
                .await?;
                match woken {
                    // After a wake-up, decide from a fresh read (unless the re-read made one).
                    Woken::Changed | Woken::Recheck => first = fresh,
                }
            }
        }
    }
}

/// An acquisition that is through: the key, its create revision (the fencing token) and the
/// revision at which that was confirmed.
pub(crate) struct Acquired {
    pub(crate) key: String,
    pub(crate) create_revision: i64,
    pub(crate) revision: i64,
}

/// The queue decision: through when `blocker` finds fewer than `nth` keys created before ours;
/// else wait for the deletion of the one that blocks.
fn queue_decision(blocker: &Blocker) -> impl FnMut(&Snapshot) -> Decision + '_ {
    move |snapshot| {
        #[cfg(feature = "testkit")]
        if crate::testkit::broken_lock_enabled() {
            return Decision::Through; // deliberately unsafe: see testkit::set_broken_lock
        }
        let blocking = snapshot
            .gets
            .first()
            .and_then(|g| keys::nth_blocker(g, blocker.nth));
        match blocking {
            None => Decision::Through,
            Some(kv) => Decision::Wait(vec![Watched::deleted(kv.key())]),
        }
    }
}

/// Enqueues a new member of kind `kind` in `queue` and waits until `blocker` finds fewer
/// than `nth` keys created before it. Cancel-safe: dropping the future at any await leaves no
/// key behind.
pub(crate) async fn acquire(
    session: &LeasedSession,
    queue: &Queue,
    kind: &str,
    blocker: Blocker,
    value: Vec<u8>,
) -> Result<Acquired, Error> {
    let shared = session.shared();
    shared.check()?;
    let key = queue.member_key(kind, shared.lease_id, shared.next_seq());
    let (ticket, first) = enqueue(shared, &key, value, vec![blocker.get(0)]).await?;
    let reads = vec![blocker.get(ticket.create_revision - 1)];
    wait_loop(shared, ticket, first, reads, queue_decision(&blocker)).await
}

/// Joins `queue` with a member key of kind `kind` and waits, through the one wait loop, until
/// `decide` says it is through — for primitives that wait for a condition rather than for
/// their place in line (a double barrier's "enough participants"). `reads` run after the
/// key exists, so they see it. Cancel-safe like [`acquire`].
pub(crate) async fn join<D>(
    session: &LeasedSession,
    queue: &Queue,
    kind: &str,
    value: Vec<u8>,
    reads: Vec<TxnOp>,
    decide: D,
) -> Result<Acquired, Error>
where
    D: FnMut(&Snapshot) -> Decision,
{
    let shared = session.shared();
    shared.check()?;
    let key = queue.member_key(kind, shared.lease_id, shared.next_seq());
    let (ticket, _) = enqueue(shared, &key, value, Vec::new()).await?;
    wait_loop(shared, ticket, None, reads, decide).await
}

/// Sends `txn()` — a put of `key` conditional on something — in a detached task (see
/// [`detached`]) and turns the answer into an acquisition. When the put did not happen,
/// `on_else` reads the else-branch `Get`s (at `revision`) and returns the `(create revision,
/// revision)` of an earlier, unanswered attempt of ours that counts, or `None`.
async fn create_detached<T, E>(
    shared: &Arc<Shared>,
    key: &str,
    txn: T,
    on_else: E,
) -> Result<Option<Acquired>, Error>
where
    T: Fn() -> Txn + Send + 'static,
    E: FnOnce(&Shared, &[GetResponse], i64) -> Result<Option<(i64, i64)>, Error> + Send + 'static,
{
    let work = {
        let shared = Arc::clone(shared);
        async move {
            let resp = send_until_answered(&shared, txn, Kind::Write).await?;
            let revision = keys::header_revision(&resp)?;
            if resp.succeeded() {
                return Ok(Some((revision, revision)));
            }
            on_else(&shared, &keys::txn_gets(&resp), revision)
        }
    };
    let got = detached(shared, key, work, |got| got.map(|(create, _)| create)).await?;
    got.map(|(create_revision, revision)| {
        Ticket::new(shared, key.to_owned(), create_revision).into_acquired(revision)
    })
    .transpose()
}

/// Puts `key` with `value` under the session's lease if nobody holds it; `None` if it exists
/// and is not ours. A retry after an unanswered attempt recognises its own put by `value`,
/// which must be unique to this attempt. Cancel-safe: detached like [`acquire`]'s enqueue.
pub(crate) async fn create_exclusive(
    session: &LeasedSession,
    key: &str,
    value: String,
) -> Result<Option<Acquired>, Error> {
    let shared = session.shared();
    shared.check()?;
    let (put_key, put_value, lease) = (key.to_owned(), value.clone().into_bytes(), shared.lease_id);
    let txn = move || keys::enqueue_txn(&put_key, put_value.clone(), lease, Vec::new());
    create_detached(shared, key, txn, move |_, gets, revision| {
        let existing = gets.first().and_then(|g| g.kvs().first());
        Ok(existing
            .filter(|kv| kv.lease() == lease && kv.value() == value.as_bytes())
            .map(|kv| (kv.create_revision(), revision)))
    })
    .await
}

/// Takes a place in `queue` only if it is through at once; else leaves no key behind and
/// returns `None`. With `nth == 1` it is one round trip that never creates a key when busy
/// (the put is conditional on the blocker's range being empty); otherwise it enqueues and, if
/// blocked, deletes its key again before returning. Cancel-safe like [`acquire`].
pub(crate) async fn try_acquire(
    session: &LeasedSession,
    queue: &Queue,
    kind: &str,
    blocker: Blocker,
    value: Vec<u8>,
) -> Result<Option<Acquired>, Error> {
    let shared = session.shared();
    shared.check()?;
    let key = queue.member_key(kind, shared.lease_id, shared.next_seq());
    if blocker.nth != 1 {
        let (mut ticket, first) = enqueue(shared, &key, value, vec![blocker.get(0)]).await?;
        let snapshot = match first {
            Some(s) => s,
            None => {
                let reads = [blocker.get(ticket.create_revision - 1)];
                read_fenced(shared, &ticket, &reads).await?
            }
        };
        if let Decision::Wait(_) = queue_decision(&blocker)(&snapshot) {
            // Busy: take the key back before answering, so none is left behind.
            if send_txn(
                shared,
                keys::fenced_delete(&ticket.key, ticket.create_revision),
                Kind::Write,
            )
            .await
            .is_ok()
            {
                ticket.armed = false;
            }
            return Ok(None);
        }
        return ticket.into_acquired(snapshot.revision).map(Some);
    }
    let (put_key, lease) = (key.clone(), shared.lease_id);
    let txn = move || keys::try_enqueue_txn(&blocker, &put_key, value.clone(), lease);
    let own_key = key.clone();
    create_detached(shared, &key, txn, move |shared, gets, revision| {
        let (Some(own), Some(oldest)) = (gets.first(), gets.get(1)) else {
            return Err(Error::Protocol("try-enqueue txn without its gets".into()));
        };
        let Some(kv) = own.kvs().first() else {
            return Ok(None); // busy, and no earlier attempt of ours landed
        };
        // An earlier, unanswered attempt landed: it is through if nothing in the blocker's
        // range is older; else it is taken back.
        let mine = kv.create_revision();
        let oldest = oldest.kvs().first().map(|o| o.create_revision());
        if oldest.is_none_or(|o| o >= mine) {
            Ok(Some((mine, revision)))
        } else {
            shared.clean_up(Cleanup::release(own_key, mine));
            Ok(None)
        }
    })
    .await
}

/// Runs `reads` (one round trip, retried on transport errors while the session lives).
pub(crate) async fn read(shared: &Arc<Shared>, reads: Vec<TxnOp>) -> Result<Snapshot, Error> {
    let resp = send_until_answered(
        shared,
        || Txn::new().and_then(reads.clone()),
        Kind::MaybeReadOnly,
    )
    .await?;
    Ok(Snapshot {
        revision: keys::header_revision(&resp)?,
        gets: keys::txn_gets(&resp),
    })
}

/// Completes with `Ok` once `key` is no longer the incarnation `create_revision` (known to
/// exist at revision `seen_at`): deleted, expired with its lease, or never there. `Err` if the
/// session is Lost first. Survives stream failures and compaction by re-reading.
pub(crate) async fn wait_gone(
    shared: &Arc<Shared>,
    key: &str,
    create_revision: i64,
    mut seen_at: i64,
) -> Result<(), Error> {
    let check = Txn::new().when([keys::owner_compare(key, create_revision)]);
    loop {
        let still_there = || async {
            let resp = send_until_answered(shared, || check.clone(), Kind::MaybeReadOnly).await?;
            Ok(resp.succeeded())
        };
        match wait_for_change(shared, &[Watched::deleted(key)], None, seen_at, still_there).await? {
            // A delete event of the key (or a re-read that found it gone): that incarnation
            // has ended — keys are never re-created with the same create revision.
            Woken::Changed => return Ok(()),
            // Uncertain: the next round confirms once its watch is in place.
            Woken::Recheck => seen_at = 0,
        }
    }
}

/// The capability to act only while an acquisition still holds: the owner key, its create
/// revision (the fencing token) and the session. Cheap to clone, so fenced writes can be made
/// from other tasks than the guard's owner; it does not keep the lock (dropping it releases
/// nothing), but it keeps the session alive.
///
/// Every guard can hand one out ([`MutexGuard::fence`](crate::MutexGuard::fence),
/// [`Leadership::fence`](crate::Leadership::fence)).
#[derive(Debug, Clone)]
pub struct Fence {
    session: LeasedSession,
    key: String,
    create_revision: i64,
    /// The revision at which the key was known to exist.
    revision: i64,
}

impl Fence {
    /// The owner key in etcd.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The owner key's create revision: strictly increasing across successive holders.
    pub fn fencing_token(&self) -> i64 {
        self.create_revision
    }

    /// The session the acquisition was made through.
    pub fn session(&self) -> &LeasedSession {
        &self.session
    }

    /// A compare that holds exactly while the acquisition holds; add it to your own Txns.
    pub fn owner_compare(&self) -> Compare {
        keys::owner_compare(&self.key, self.create_revision)
    }

    fn lock_lost(&self) -> Error {
        Error::LockLost {
            key: self.key.clone(),
            create_revision: self.create_revision,
        }
    }

    /// Runs `ops` in one Txn only while the acquisition still holds.
    ///
    /// # Errors
    /// [`Error::LockLost`] if it no longer holds (nothing was applied);
    /// [`Error::SessionLost`] / [`Error::SessionClosed`] if the session is Lost (nothing was
    /// sent); request errors as [`Error::Etcd`] / [`Error::Timeout`] (the outcome is then
    /// unknown).
    pub async fn txn_if_owner(&self, ops: impl Into<Vec<TxnOp>>) -> Result<TxnResponse, Error> {
        let shared = self.session.shared();
        shared.check()?;
        let txn = Txn::new().when([self.owner_compare()]).and_then(ops.into());
        let resp = send_txn(shared, txn, Kind::MaybeReadOnly).await?;
        if resp.succeeded() {
            Ok(resp)
        } else {
            Err(self.lock_lost())
        }
    }

    /// Completes when the acquisition may no longer hold: the session is Lost or the owner key
    /// is gone. Returns the error that describes it. `'static`: usable in `select!` or a task;
    /// it does not keep the session alive.
    pub fn lost(&self) -> impl Future<Output = Error> + Send + 'static {
        let shared = Arc::clone(self.session.shared());
        let (key, create_revision, seen_at) =
            (self.key.clone(), self.create_revision, self.revision);
        async move {
            match wait_gone(&shared, &key, create_revision, seen_at).await {
                Ok(()) => Error::LockLost {
                    key,
                    create_revision,
                },
                Err(e) => e,
            }
        }
    }
}

/// The state behind every guard: its [`Fence`] and whether it was released. Releases in the
/// background when dropped unreleased.
pub(crate) struct Holding {
    fence: Fence,
    /// The fenced Txn that releases (by default: delete the key if it is still ours).
    release_txn: Txn,
    /// The revision of the response that confirmed the release, once confirmed.
    released_at: Option<i64>,
    /// A release attempt went unanswered: it may have deleted the key. A later attempt that
    /// finds the key gone is then the same release, not a loss.
    release_maybe_landed: bool,
}

impl Holding {
    pub(crate) fn new(session: LeasedSession, acquired: Acquired) -> Holding {
        let release_txn = keys::fenced_delete(&acquired.key, acquired.create_revision);
        Holding::with_release(session, acquired, release_txn)
    }

    /// A holding released by `release_txn`, which must be fenced on the key's create revision
    /// (it is repeated on retries and may run from the session's task).
    pub(crate) fn with_release(
        session: LeasedSession,
        acquired: Acquired,
        release_txn: Txn,
    ) -> Holding {
        Holding {
            release_txn,
            fence: Fence {
                session,
                key: acquired.key,
                create_revision: acquired.create_revision,
                revision: acquired.revision,
            },
            released_at: None,
            release_maybe_landed: false,
        }
    }

    pub(crate) fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Deletes the owner key with a Txn fenced on its create revision. Retries transport
    /// failures (a retry that finds the key gone after an unanswered attempt counts as done);
    /// marks the holding released only once etcd confirmed, and succeeds at once if it was.
    /// A holding dropped unreleased — also after this fails — is released by the session's
    /// task.
    ///
    /// Returns the revision of the confirming response: the key was gone at that revision
    /// (deleted at it, or earlier when a retry follows an unanswered attempt).
    pub(crate) async fn release(&mut self) -> Result<i64, Error> {
        const ATTEMPTS: u32 = 3;
        if let Some(revision) = self.released_at {
            return Ok(revision);
        }
        let fence = &self.fence;
        let shared = Arc::clone(fence.session.shared());
        let mut backoff = Backoff::for_requests();
        let mut last = None;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                sleep(backoff.next_delay()).await;
            }
            tracing::trace!(key = %fence.key, "release sent");
            match send_txn(&shared, self.release_txn.clone(), Kind::Write).await {
                Ok(resp) => {
                    tracing::trace!(key = %fence.key, "release answered");
                    let revision = resp.header().map_or(0, |h| h.revision());
                    self.released_at = Some(revision);
                    return if resp.succeeded() || self.release_maybe_landed {
                        Ok(revision)
                    } else {
                        Err(fence.lock_lost())
                    };
                }
                Err(e) if e.is_retryable() => {
                    self.release_maybe_landed = true;
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(Error::Timeout(shared.request_timeout)))
    }
}

impl std::fmt::Debug for Holding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holding")
            .field("key", &self.fence.key)
            .field("fencing_token", &self.fence.create_revision)
            .field("released", &self.released_at.is_some())
            .finish()
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        if self.released_at.is_none() {
            self.fence.session.shared().clean_up(Cleanup::Txn {
                key: self.fence.key.clone(),
                txn: self.release_txn.clone(),
            });
        }
    }
}

/// What interrupts a [`PrefixEvents`] stream.
pub(crate) enum Gap {
    /// The history after the last revision was compacted away: re-read the state, then
    /// [`PrefixEvents::resume_after`] the read's revision.
    Compacted,
    /// A failure retrying cannot fix (etcd refused the watch).
    Fatal(Error),
}

/// Every event under a prefix, in revision order, across disconnects: after a stream failure
/// it re-opens the watch from the last delivered revision + 1 (with backoff), so nothing is
/// skipped. Independent of any session's lease.
pub(crate) struct PrefixEvents {
    client: etcd_client::Client,
    prefix: String,
    /// Every event at or below this revision has been delivered (or was covered by a read).
    after: i64,
    stream: Option<etcd_client::WatchStream>,
    pending: std::collections::VecDeque<etcd_client::Event>,
    backoff: Backoff,
}

impl PrefixEvents {
    /// Events under `prefix` with revisions after `after`.
    pub(crate) fn new(client: etcd_client::Client, prefix: &str, after: i64) -> PrefixEvents {
        PrefixEvents {
            client,
            prefix: prefix.to_owned(),
            after,
            stream: None,
            pending: Default::default(),
            backoff: Backoff::for_requests(),
        }
    }

    /// Continues after `revision` (a fresh read's), dropping anything buffered.
    pub(crate) fn resume_after(&mut self, revision: i64) {
        self.after = revision;
        self.stream = None;
        self.pending.clear();
    }

    /// The next event, with its revision (the event's mod revision).
    pub(crate) async fn next(&mut self) -> Result<etcd_client::Event, Gap> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                let rev = event.kv().map_or(0, |kv| kv.mod_revision());
                if rev <= self.after {
                    continue; // already covered by a read
                }
                self.after = rev;
                return Ok(event);
            }
            let stream = match self.stream.as_mut() {
                Some(s) => s,
                None => {
                    let opts = WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(self.after + 1);
                    match self.client.watch(self.prefix.as_str(), Some(opts)).await {
                        Ok(s) => self.stream.insert(s),
                        Err(e) => {
                            tracing::debug!(error = %e, "opening a prefix watch failed; retrying");
                            sleep(self.backoff.next_delay()).await;
                            continue;
                        }
                    }
                }
            };
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.canceled() {
                        self.stream = None;
                        if resp.compact_revision() > 0 {
                            return Err(Gap::Compacted);
                        }
                        if resp.created() {
                            return Err(Gap::Fatal(Error::Protocol(format!(
                                "etcd refused a watch: {}",
                                resp.cancel_reason()
                            ))));
                        }
                        sleep(self.backoff.next_delay()).await;
                        continue;
                    }
                    self.backoff.reset();
                    self.pending.extend(resp.events().iter().cloned());
                }
                Ok(None) | Err(_) => {
                    tracing::debug!(prefix = %self.prefix, "prefix watch ended; resuming");
                    self.stream = None;
                    sleep(self.backoff.next_delay()).await;
                }
            }
        }
    }
}
