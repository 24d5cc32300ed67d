//! The one wait engine every primitive is built on.
//!
//! * **Enqueue** — one Txn puts the member key (`CreateRevision == 0`, under the session's
//!   lease) and reads what blocks it. It runs in a short detached task, so a caller that drops
//!   its future mid-request can never strand a key: the task finishes the request and hands
//!   whatever landed to the session's clean-up. Transport failures are retried with the same
//!   key, so a lost response never creates a second waiter.
//! * **Wait** — watch only the one key that blocks us (no herd), starting at the read's
//!   revision + 1 (never at the current revision: etcd serves such a watch from its "unsynced"
//!   group on a 100 ms tick), together with our own key and the session's loss. After every
//!   wake-up — deletion, compaction, stream failure — re-read our position from scratch.
//! * **Hold** — [`Holding`] is the state behind every guard: fenced compare, fenced Txn,
//!   `lost()`, fenced and retry-safe release, release on drop via the session's task.

use std::future::Future;
use std::sync::Arc;

use etcd_client::{
    Compare, EventType, KeyValue, Txn, TxnOp, TxnResponse, WatchFilterType, WatchOptions,
};
use tokio::sync::oneshot;
use tokio::time::{sleep, timeout};

use crate::backoff::Backoff;
use crate::keys::{self, Blocker, Queue};
use crate::session::{Cleanup, Shared};
use crate::{Error, LeasedSession};

/// Sends `txn` with the session's request timeout.
pub(crate) async fn send_txn(shared: &Shared, txn: Txn) -> Result<TxnResponse, Error> {
    let mut kv = shared.client.kv_client();
    match timeout(shared.request_timeout, kv.txn(txn)).await {
        Err(_) => Err(Error::Timeout(shared.request_timeout)),
        Ok(r) => Ok(r?),
    }
}

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

/// Where an acquisition stands after a read at `revision`.
#[derive(Debug, Clone)]
pub(crate) struct Position {
    /// The revision the read saw.
    pub(crate) revision: i64,
    /// The key that must go before we are through; `None`: through.
    pub(crate) blocker: Option<KeyValue>,
}

/// A member key that has been (or may have been) created: cleaned up by the session's task if
/// dropped before it is disarmed into a [`Holding`].
pub(crate) struct Ticket {
    shared: Arc<Shared>,
    key: String,
    create_revision: i64,
    armed: bool,
}

impl Ticket {
    fn disarm(mut self) -> (String, i64) {
        self.armed = false;
        (std::mem::take(&mut self.key), self.create_revision)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.armed {
            self.shared.clean_up(Cleanup::Release {
                key: std::mem::take(&mut self.key),
                create_revision: self.create_revision,
            });
        }
    }
}

/// Runs `work` — a request that may create `key` — in a detached task, so that dropping the
/// caller cannot strand the key: if the caller is gone when `work` ends, whatever `created`
/// says landed (or, on failure, whatever may have landed) is handed to the session's clean-up.
/// On failure the caller's side hands the key to clean-up as well.
async fn detached<T, W, C>(shared: &Arc<Shared>, key: &str, work: W, created: C) -> Result<T, Error>
where
    T: Send + 'static,
    W: Future<Output = Result<T, Error>> + Send + 'static,
    C: Fn(&T) -> Option<i64> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let task_shared = Arc::clone(shared);
    let task_key = key.to_owned();
    let pending = shared.pending_work();
    shared.spawn(async move {
        let _pending = pending;
        let outcome = work.await;
        if let Err(outcome) = tx.send(outcome) {
            let job = match outcome.as_ref().map(&created) {
                Ok(Some(create_revision)) => Cleanup::Release {
                    key: task_key,
                    create_revision,
                },
                Ok(None) => return,
                Err(_) => Cleanup::Abandoned { key: task_key },
            };
            task_shared.clean_up(job);
        }
    });
    let outcome = unless_lost(shared, async {
        rx.await
            .map_err(|_| Error::Protocol("acquisition task ended without an answer".into()))?
    })
    .await;
    if outcome.is_err() {
        shared.clean_up(Cleanup::Abandoned {
            key: key.to_owned(),
        });
    }
    outcome
}

/// Sends `txn()` until it is answered, retrying transport failures (with the same request, so
/// a retry is idempotent) with backoff while the session lives.
async fn send_until_answered(
    shared: &Arc<Shared>,
    txn: impl Fn() -> Txn,
) -> Result<TxnResponse, Error> {
    let mut backoff = Backoff::for_requests();
    loop {
        match unless_lost(shared, send_txn(shared, txn())).await {
            Err(e) if e.is_retryable() => {
                tracing::debug!(error = %e, "request failed; retrying it unchanged");
                back_off(shared, &mut backoff).await?;
            }
            other => return other,
        }
    }
}

/// Puts `key` at the end of its queue and reads what blocks it. Returns the key's create
/// revision, and its position when the Txn created it (a retry that found the key already
/// there reads the position afresh).
async fn enqueue(
    shared: &Arc<Shared>,
    key: &str,
    value: Vec<u8>,
    blocker: &Blocker,
) -> Result<(Ticket, Option<Position>), Error> {
    let work = {
        let shared = Arc::clone(shared);
        let key = key.to_owned();
        let blocker = blocker.clone();
        async move {
            let resp = send_until_answered(&shared, || {
                keys::enqueue_txn(&key, value.clone(), shared.lease_id, &blocker)
            })
            .await?;
            let revision = keys::header_revision(&resp)?;
            let gets = keys::txn_gets(&resp);
            let first = gets
                .first()
                .ok_or_else(|| Error::Protocol("enqueue txn without a get".into()))?;
            if resp.succeeded() {
                let position = Position {
                    revision,
                    blocker: keys::nth_blocker(first, blocker.nth),
                };
                Ok((revision, Some(position)))
            } else {
                // A retry: the earlier, unanswered request created the key.
                let kv = first.kvs().first().ok_or_else(|| {
                    Error::Protocol("enqueue txn else-branch without the key".into())
                })?;
                if kv.lease() != shared.lease_id {
                    return Err(Error::Protocol(format!(
                        "member key {key} belongs to lease {:x}, not ours",
                        kv.lease()
                    )));
                }
                Ok((kv.create_revision(), None))
            }
        }
    };
    let (create_revision, position) = detached(shared, key, work, |(create_revision, _)| {
        Some(*create_revision)
    })
    .await?;
    let ticket = Ticket {
        shared: Arc::clone(shared),
        key: key.to_owned(),
        create_revision,
        armed: true,
    };
    Ok((ticket, position))
}

/// Reads our position afresh. [`Error::LockLost`] if our key is gone.
async fn read_position(
    shared: &Arc<Shared>,
    ticket: &Ticket,
    blocker: &Blocker,
) -> Result<Position, Error> {
    let resp = send_until_answered(shared, || {
        keys::position_txn(&ticket.key, ticket.create_revision, blocker)
    })
    .await?;
    if !resp.succeeded() {
        return Err(Error::LockLost {
            key: ticket.key.clone(),
            create_revision: ticket.create_revision,
        });
    }
    let revision = keys::header_revision(&resp)?;
    let gets = keys::txn_gets(&resp);
    let get = gets
        .first()
        .ok_or_else(|| Error::Protocol("position txn without a get".into()))?;
    Ok(Position {
        revision,
        blocker: keys::nth_blocker(get, blocker.nth),
    })
}

/// What a wait for a change ended with.
pub(crate) enum Woken {
    /// One of the watched changes happened.
    Changed,
    /// A cancelled watch or a stream failure: re-read and decide again.
    Recheck,
}

/// A change to wait for: a put or a delete of `key` (or of any key under it, with `prefix`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target<'a> {
    pub(crate) key: &'a [u8],
    pub(crate) prefix: bool,
    pub(crate) kind: EventType,
}

impl Target<'_> {
    /// The deletion of exactly `key`.
    pub(crate) fn deleted(key: &[u8]) -> Target<'_> {
        Target {
            key,
            prefix: false,
            kind: EventType::Delete,
        }
    }

    fn matches(&self, kind: EventType, key: &[u8]) -> bool {
        kind == self.kind
            && if self.prefix {
                key.starts_with(self.key)
            } else {
                key == self.key
            }
    }
}

/// A watch for changes to a few keys or ranges (and, optionally, the deletion of our own key),
/// registered *from now*: the one kind of wait every primitive uses.
///
/// etcd puts a watch whose start revision is at or below its current revision into the
/// "unsynced" group, served on a 100 ms tick. A watch from `read revision + 1` lands there
/// whenever anything was written between the read and the watch's creation — constantly under
/// contention. A watch without a start revision is always registered in the synced group, at
/// the revision its `created` response reports; if that is newer than the read that decided to
/// wait, the caller confirms with a fresh read while the watch is already in place: anything
/// after the watch's revision is delivered, anything up to the fresh read's is seen by it.
struct ChangeWatch {
    stream: etcd_client::WatchStream,
    targets: Vec<(Vec<u8>, bool, EventType)>,
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
        targets: &[Target<'_>],
        own: Option<(&str, i64)>,
    ) -> Result<Option<(ChangeWatch, i64)>, Error> {
        let options = |t: &Target| {
            let opts = WatchOptions::new().with_filters([match t.kind {
                EventType::Delete => WatchFilterType::NoPut,
                EventType::Put => WatchFilterType::NoDelete,
            }]);
            if t.prefix {
                opts.with_prefix()
            } else {
                opts
            }
        };
        let mut watches = shared.client.watch_client();
        let opened = unless_lost(shared, async {
            let created = async {
                let (first, rest) = targets
                    .split_first()
                    .ok_or_else(|| Error::Protocol("a watch without targets".into()))?;
                let mut stream = watches
                    .watch(first.key.to_vec(), Some(options(first)))
                    .await?;
                for t in rest {
                    stream.watch(t.key.to_vec(), Some(options(t))).await?;
                }
                if let Some((own_key, _)) = own {
                    let own_opts = WatchOptions::new().with_filters([WatchFilterType::NoPut]);
                    stream.watch(own_key, Some(own_opts)).await?;
                }
                let mut watch = ChangeWatch {
                    stream,
                    targets: targets
                        .iter()
                        .map(|t| (t.key.to_vec(), t.prefix, t.kind))
                        .collect(),
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
            let hit = self.targets.iter().any(|(key, prefix, k)| {
                Target {
                    key,
                    prefix: *prefix,
                    kind: *k,
                }
                .matches(kind, kv.key())
            });
            if hit {
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

/// Waits, with the watch from now, until one of `targets` changes (or our own key is deleted,
/// or the session is Lost). `read_at` is the revision of the read that decided to wait;
/// `reread` re-reads when writes landed since then and says whether to still wait.
///
/// This is the only wait loop step in the crate; every primitive goes through it.
pub(crate) async fn wait_for_change<R, Fut>(
    shared: &Arc<Shared>,
    targets: &[Target<'_>],
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

/// True if both name the same incarnation of the same key.
fn same_incarnation(a: Option<&KeyValue>, b: &KeyValue) -> bool {
    a.is_some_and(|a| a.key() == b.key() && a.create_revision() == b.create_revision())
}

/// An acquisition that is through: the key, its create revision (the fencing token) and the
/// revision at which ownership was confirmed.
pub(crate) struct Acquired {
    pub(crate) key: String,
    pub(crate) create_revision: i64,
    pub(crate) revision: i64,
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
    let (ticket, mut position) = enqueue(shared, &key, value, &blocker).await?;
    loop {
        let pos = match position.take() {
            Some(p) => p,
            None => read_position(shared, &ticket, &blocker).await?,
        };
        let Some(blocking) = pos.blocker else {
            shared.check()?;
            let (key, create_revision) = ticket.disarm();
            return Ok(Acquired {
                key,
                create_revision,
                revision: pos.revision,
            });
        };
        let own = Some((ticket.key.as_str(), ticket.create_revision));
        let mut fresh = None;
        let woken = wait_for_change(
            shared,
            &[Target::deleted(blocking.key())],
            own,
            pos.revision,
            || async {
                // Writes landed between the read and the watch: wait only if the same key
                // still blocks us.
                let now = read_position(shared, &ticket, &blocker).await?;
                let still = same_incarnation(now.blocker.as_ref(), &blocking);
                if !still {
                    fresh = Some(now); // current: no need to read again
                }
                Ok(still)
            },
        )
        .await?;
        match woken {
            // After a wake-up, decide from a fresh read (unless the re-read just made one).
            Woken::Changed | Woken::Recheck => position = fresh,
        }
    }
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
        let (mut ticket, position) = enqueue(shared, &key, value, &blocker).await?;
        let pos = match position {
            Some(p) => p,
            None => read_position(shared, &ticket, &blocker).await?,
        };
        if pos.blocker.is_some() {
            // Busy: take the key back before answering, so none is left behind.
            if send_txn(
                shared,
                keys::fenced_delete(&ticket.key, ticket.create_revision),
            )
            .await
            .is_ok()
            {
                ticket.armed = false;
            }
            return Ok(None);
        }
        shared.check()?;
        let (key, create_revision) = ticket.disarm();
        return Ok(Some(Acquired {
            key,
            create_revision,
            revision: pos.revision,
        }));
    }
    let work = {
        let shared = Arc::clone(shared);
        let key = key.clone();
        async move {
            let resp = send_until_answered(&shared, || {
                keys::try_enqueue_txn(&blocker, &key, value.clone(), shared.lease_id)
            })
            .await?;
            let revision = keys::header_revision(&resp)?;
            if resp.succeeded() {
                return Ok(Some((revision, revision)));
            }
            let gets = keys::txn_gets(&resp);
            let (Some(own), Some(oldest)) = (gets.first(), gets.get(1)) else {
                return Err(Error::Protocol("try-enqueue txn without its gets".into()));
            };
            match own.kvs().first() {
                // Busy, and no earlier attempt of ours landed.
                None => Ok(None),
                // An earlier, unanswered attempt landed: it is through if nothing in the
                // blocker's range is older.
                Some(kv) => {
                    let mine = kv.create_revision();
                    let oldest = oldest.kvs().first().map(|o| o.create_revision());
                    if oldest.is_none_or(|o| o >= mine) {
                        Ok(Some((mine, revision)))
                    } else {
                        shared.clean_up(Cleanup::Release {
                            key: key.clone(),
                            create_revision: mine,
                        });
                        Ok(None)
                    }
                }
            }
        }
    };
    let got = detached(shared, &key, work, |got| got.map(|(create, _)| create)).await?;
    let Some((create_revision, revision)) = got else {
        return Ok(None);
    };
    let ticket = Ticket {
        shared: Arc::clone(shared),
        key,
        create_revision,
        armed: true,
    };
    shared.check()?;
    let (key, create_revision) = ticket.disarm();
    Ok(Some(Acquired {
        key,
        create_revision,
        revision,
    }))
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
            let resp = send_until_answered(shared, || check.clone()).await?;
            Ok(resp.succeeded())
        };
        match wait_for_change(
            shared,
            &[Target::deleted(key.as_bytes())],
            None,
            seen_at,
            still_there,
        )
        .await?
        {
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
        let resp = send_txn(shared, txn).await?;
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
    released: bool,
    /// A release attempt went unanswered: it may have deleted the key. A later attempt that
    /// finds the key gone is then the same release, not a loss.
    release_maybe_landed: bool,
}

impl Holding {
    pub(crate) fn new(session: LeasedSession, acquired: Acquired) -> Holding {
        Holding {
            fence: Fence {
                session,
                key: acquired.key,
                create_revision: acquired.create_revision,
                revision: acquired.revision,
            },
            released: false,
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
    pub(crate) async fn release(&mut self) -> Result<(), Error> {
        const ATTEMPTS: u32 = 3;
        if self.released {
            return Ok(());
        }
        let fence = &self.fence;
        let shared = Arc::clone(fence.session.shared());
        let mut backoff = Backoff::for_requests();
        let mut last = None;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                sleep(backoff.next_delay()).await;
            }
            match send_txn(
                &shared,
                keys::fenced_delete(&fence.key, fence.create_revision),
            )
            .await
            {
                Ok(resp) => {
                    self.released = true;
                    return if resp.succeeded() || self.release_maybe_landed {
                        Ok(())
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
            .field("released", &self.released)
            .finish()
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        if !self.released {
            self.fence.session.shared().clean_up(Cleanup::Release {
                key: self.fence.key.clone(),
                create_revision: self.fence.create_revision,
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
