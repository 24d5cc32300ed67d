//! The queue algorithm: enqueue, the one wait loop, and the queue decision.
//!
//! * **Enqueue** — one Txn puts the member key (`CreateRevision == 0`, under the session's
//!   lease) and reads what blocks it. It runs in a short detached task, so a caller that drops
//!   its future mid-request can never strand a key: the task finishes the request and hands
//!   whatever landed to the session's clean-up. Transport failures are retried with the same
//!   key, so a lost response never creates a second waiter; an acquisition whose put was sent
//!   more than once has its late copies swept after it ends.
//! * **Wait** — one loop ([`wait_loop`]): read while our key exists → decide (through / act /
//!   wait) → wait for the changes the decision names with a watch registered from now,
//!   together with our own key and the session's loss → read again. After every wake-up the
//!   decision is re-made from a fresh read. One backoff serves the whole wait.
//! * **Decide** — [`Blocker`] says what a queue acquisition waits for: nothing once fewer than
//!   `permits` keys are ahead of it; else the deletion of the key just ahead (one permit), of
//!   any key ahead (the first waiter of a semaphore), or any change of the waiter just ahead
//!   (a semaphore waiter behind another waiter).

use std::sync::Arc;

use etcd_client::{Compare, CompareOp, GetOptions, GetResponse, SortOrder, SortTarget, Txn, TxnOp};

use crate::backoff::Backoff;
use crate::keys::{self, Queue};
use crate::session::{Afterwards, Claimed, Cleanup, Shared, Sweep};
use crate::{Error, LeasedSession};

use super::request::{detached, send_txn, send_until_answered, Kind, Unanswered};
use super::watch::{wait_for_change, Watched, Woken};

/// What a read (run while our key still exists) saw: its revision and its `Get` results.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub(crate) revision: i64,
    pub(crate) gets: Vec<GetResponse>,
}

/// A member key that has been (or may have been) created: cleaned up by the session's task if
/// dropped before it is turned into an [`Acquired`] (and then a guard).
pub(crate) struct Ticket {
    shared: Arc<Shared>,
    key: String,
    create_revision: i64,
    /// What follows the key's deletion: a sweep of late copies if the put was sent more than
    /// once, else the key's number goes back to the session's pool.
    after: Afterwards,
    armed: bool,
}

impl Ticket {
    /// A ticket for `key`, created at `create_revision`, armed.
    fn new(shared: &Arc<Shared>, key: String, create_revision: i64, after: Afterwards) -> Ticket {
        Ticket {
            shared: Arc::clone(shared),
            key,
            create_revision,
            after,
            armed: true,
        }
    }

    /// The acquisition is through, confirmed at `revision`: hands it out, unless the session
    /// is Lost by now (decided on the clock) — then the still-armed ticket cleans the key up
    /// as it is dropped.
    fn into_acquired(mut self, revision: i64) -> Result<Acquired, Error> {
        self.shared.check()?;
        self.armed = false;
        Ok(Acquired {
            key: std::mem::take(&mut self.key),
            create_revision: self.create_revision,
            revision,
            after: std::mem::replace(&mut self.after, Afterwards::Nothing),
        })
    }

    /// Deletes the key now (fenced), e.g. a try-acquire that found itself blocked. If that
    /// fails, the ticket stays armed and its drop hands the release to the session's task.
    async fn release_now(mut self) {
        let txn = keys::fenced_delete(&self.key, self.create_revision, self.shared.lease_id);
        if send_txn(&self.shared, txn, Kind::Write).await.is_ok() {
            self.armed = false;
            std::mem::replace(&mut self.after, Afterwards::Nothing).key_deleted(&self.shared);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.armed {
            let key = std::mem::take(&mut self.key);
            self.shared.clean_up(Cleanup::release(
                key,
                self.create_revision,
                self.shared.lease_id,
                std::mem::replace(&mut self.after, Afterwards::Nothing),
            ));
        }
    }
}

/// An acquisition that is through: the key, its create revision (the fencing token), the
/// revision at which that was confirmed, and whether its put's late copies must be swept once
/// it ends.
pub(crate) struct Acquired {
    pub(crate) key: String,
    pub(crate) create_revision: i64,
    pub(crate) revision: i64,
    pub(crate) after: Afterwards,
}

/// A conditional put sent until it was answered (with one backoff): the answer, its
/// revision, and whether an earlier copy of it may still land.
struct Put {
    resp: etcd_client::TxnResponse,
    revision: i64,
    uncertain: bool,
}

impl Put {
    async fn send(shared: &Arc<Shared>, txn: impl Fn() -> Txn) -> Result<Put, Unanswered> {
        let answered =
            send_until_answered(shared, txn, Kind::Write, &mut Backoff::for_requests()).await?;
        let uncertain = answered.uncertain;
        let revision = keys::header_revision(&answered.resp)
            .map_err(|error| Unanswered { error, uncertain })?;
        Ok(Put {
            resp: answered.resp,
            revision,
            uncertain,
        })
    }

    /// `error`, for a request that may have landed if this one was sent more than once.
    fn fail(&self, error: Error) -> Unanswered {
        Unanswered {
            error,
            uncertain: self.uncertain,
        }
    }
}

/// What a detached put of a member key produced: its create revision, the snapshot of the
/// reads that ran with it (if this Txn created it), and whether it was sent more than once.
type Enqueued = (i64, Option<Snapshot>, bool);

/// Puts `key` (under the session's lease) unless it exists, running `reads` just before the
/// put, in a detached task (see [`detached`]). Returns the armed ticket and, when this Txn
/// created the key, the snapshot of the reads (a retry that found the key already there must
/// read afresh).
async fn enqueue(
    shared: &Arc<Shared>,
    key: &str,
    slot: u64,
    value: Vec<u8>,
    reads: Vec<TxnOp>,
) -> Result<(Ticket, Option<Snapshot>), Error> {
    // Before anything is sent: a resumed session's look at its lease spares the key.
    let claim = shared.claim(key);
    let work = {
        let shared = Arc::clone(shared);
        let key = key.to_owned();
        async move {
            let txn = || keys::enqueue_txn(&key, value.clone(), shared.lease_id, reads.clone());
            let put = Put::send(&shared, txn).await?;
            let (revision, gets) = (put.revision, keys::txn_gets(&put.resp));
            if put.resp.succeeded() {
                claim.confirm(revision);
                return Ok((revision, Some(Snapshot { revision, gets }), put.uncertain));
            }
            if !put.uncertain {
                // Sent once, and the key was there: a name still in use, not ours to take.
                return Err(put.fail(Error::Protocol(format!("member key {key} exists already"))));
            }
            // A retry: the earlier, unanswered request created the key.
            let kv = gets.first().and_then(|g| g.kvs().first()).ok_or_else(|| {
                put.fail(Error::Protocol(
                    "enqueue txn else-branch without the key".into(),
                ))
            })?;
            if kv.lease() != shared.lease_id {
                return Err(put.fail(Error::Protocol(format!(
                    "member key {key} belongs to lease {:x}, not ours",
                    kv.lease()
                ))));
            }
            claim.confirm(kv.create_revision());
            Ok((kv.create_revision(), None, true))
        }
    };
    let (lease_id, sweep) = (shared.lease_id, Sweep::on_lease(key, shared.lease_id));
    let for_cleanup = (key.to_owned(), sweep.clone());
    let (create_revision, snapshot, uncertain): Enqueued = detached(
        shared,
        work,
        move |outcome: &Result<Enqueued, Unanswered>| {
            let (key, sweep) = for_cleanup;
            match outcome {
                Ok((create_revision, _, uncertain)) => Some(Cleanup::release(
                    key,
                    *create_revision,
                    lease_id,
                    Afterwards::of_put(*uncertain, sweep, Afterwards::Reuse(slot)),
                )),
                Err(u) if u.uncertain => Some(Cleanup::Sweep(sweep)),
                Err(_) => None, // etcd refused the only attempt: nothing landed
            }
        },
    )
    .await?;
    Ok((
        Ticket::new(
            shared,
            key.to_owned(),
            create_revision,
            Afterwards::of_put(uncertain, sweep, Afterwards::Reuse(slot)),
        ),
        snapshot,
    ))
}

/// A member key of kind `kind` in `queue` for this session, and the number in its name: taken
/// from the session's pool, given back through [`Afterwards::Reuse`] once the key is gone.
fn numbered_key(shared: &Shared, queue: &Queue, kind: &str) -> (String, u64) {
    let slot = shared.take_slot();
    (queue.member_key(kind, shared.lease_id, slot), slot)
}

/// Runs `reads` while our key is still ours. [`Error::LockLost`] once it is gone (or taken
/// over by another client's put).
async fn read_fenced(
    shared: &Arc<Shared>,
    ticket: &Ticket,
    reads: &[TxnOp],
    backoff: &mut Backoff,
) -> Result<Snapshot, Error> {
    let resp = send_until_answered(
        shared,
        || {
            keys::fenced_reads(
                &ticket.key,
                ticket.create_revision,
                shared.lease_id,
                reads.to_vec(),
            )
        },
        Kind::MaybeReadOnly,
        backoff,
    )
    .await?
    .resp;
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

/// What a primitive makes of a [`Snapshot`] taken while its key exists.
#[derive(Debug)]
pub(crate) enum Decision {
    /// Done: the acquisition is through. With `touch`, a waiter may be watching our key for
    /// the moment we stop waiting: touch it (in the background) so that it re-reads.
    Through { touch: bool },
    /// Send `txn` (it must be safe to repeat), then read again. If it may create a key under
    /// the session's lease (a double barrier's latch), `creates` names it, and `txn`'s
    /// else-branch gets it first: the key is then the session's, spared by a resumed
    /// session's look at its lease, when `txn` created it — or, after an unanswered attempt,
    /// when the else-branch finds it on our lease, created since the act began.
    Act { txn: Txn, creates: Option<String> },
    /// Wait for one of these changes, then read again — or, for a change watched as
    /// [`Watched::deciding`], be through once it happened while our key exists.
    Wait(Vec<Watched>),
    /// The read was cut short before it found what decides (a page of a shared queue holding
    /// only nested names' keys): read again without a limit.
    Widen,
}

/// The one wait loop: read (only while our key exists) → decide → through, act, or wait for a
/// change → read again. Every wake-up re-decides from a fresh read, so a waiter never infers
/// ownership from a notification (etcd #16221). The one exception is a change the decision
/// itself marks [`Watched::deciding`] (a double barrier's latch, which may be gone again by
/// the time anyone re-reads): it is through if our key still exists after it — which a fenced
/// read confirms. `first` is a snapshot the enqueue already took, if any. One backoff serves
/// every retry of the wait; it is reset when a watched change happens.
async fn wait_loop<D>(
    shared: &Arc<Shared>,
    ticket: Ticket,
    mut first: Option<Snapshot>,
    reads: Reads,
    mut decide: D,
) -> Result<Acquired, Error>
where
    D: FnMut(&Snapshot) -> Decision,
{
    let mut backoff = Backoff::for_requests();
    let mut widen = false;
    // History before this revision was compacted away: targets watched `since` an earlier
    // revision are watched from here.
    let mut floor = 0;
    loop {
        let snapshot = match first.take() {
            Some(s) => s,
            None => {
                let reads = if std::mem::take(&mut widen) {
                    &reads.wide
                } else {
                    &reads.narrow
                };
                let s = read_fenced(shared, &ticket, reads, &mut backoff).await?;
                tracing::trace!(key = %ticket.key, revision = s.revision, "re-read");
                s
            }
        };
        match decide(&snapshot) {
            Decision::Widen => widen = true,
            Decision::Through { touch } => {
                tracing::trace!(key = %ticket.key, touch, "through");
                if touch {
                    shared.clean_up(Cleanup::Touch {
                        key: ticket.key.clone(),
                        create_revision: ticket.create_revision,
                    });
                }
                return ticket.into_acquired(snapshot.revision);
            }
            Decision::Act { txn, creates } => {
                let claim = creates.as_deref().map(|key| shared.claim(key));
                let started = shared.seen_revision();
                let answered =
                    send_until_answered(shared, || txn.clone(), Kind::Write, &mut backoff).await?;
                if let Some(claim) = claim {
                    let created = if answered.resp.succeeded() {
                        Some(keys::header_revision(&answered.resp)?)
                    } else if answered.uncertain {
                        keys::txn_gets(&answered.resp)
                            .first()
                            .and_then(|g| g.kvs().first())
                            .filter(|kv| {
                                kv.lease() == shared.lease_id && kv.create_revision() > started
                            })
                            .map(|kv| kv.create_revision())
                    } else {
                        None
                    };
                    if let Some(create_revision) = created {
                        claim.confirm(create_revision);
                    }
                }
            }
            Decision::Wait(targets) => {
                let own = Some((ticket.key.as_str(), ticket.create_revision));
                let mut fresh = None;
                let decide = &mut decide;
                let watched: Vec<Watched> = targets.iter().map(|t| t.not_before(floor)).collect();
                let woken = wait_for_change(
                    shared,
                    &watched,
                    own,
                    snapshot.revision,
                    || async {
                        // Writes landed between the read and the watch: still waiting for the
                        // same changes?
                        let mut backoff = Backoff::for_requests();
                        let now = read_fenced(shared, &ticket, &reads.narrow, &mut backoff).await?;
                        let still = matches!(decide(&now), Decision::Wait(t) if t == targets);
                        if !still {
                            fresh = Some(now); // current: no need to read again
                        }
                        Ok(still)
                    },
                    &mut backoff,
                )
                .await?;
                match woken {
                    // After a wake-up, decide from a fresh read (unless the re-read made one).
                    Woken::Changed | Woken::Recheck => first = fresh,
                    Woken::Compacted(revision) => {
                        floor = floor.max(revision);
                        first = fresh;
                    }
                    Woken::Decided(revision) => {
                        // Our key existed when the deciding change happened if it exists now:
                        // keys are never re-created with the same create revision.
                        let now = read_fenced(shared, &ticket, &reads.narrow, &mut backoff).await?;
                        tracing::trace!(key = %ticket.key, revision, "through on a deciding change");
                        return ticket.into_acquired(now.revision);
                    }
                }
            }
        }
    }
}

/// The reads of a wait: as usual, and without a limit (after [`Decision::Widen`]).
pub(crate) struct Reads {
    narrow: Vec<TxnOp>,
    wide: Vec<TxnOp>,
}

impl Reads {
    /// The same reads either way (a condition primitive never widens).
    pub(crate) fn fixed(reads: Vec<TxnOp>) -> Reads {
        Reads {
            wide: reads.clone(),
            narrow: reads,
        }
    }
}

/// What blocks a queue acquisition: among the members under `prefix` created before ours, it
/// is through once fewer than `permits` remain (1: a mutex, an election, a reader over the
/// writers' sub-range, a writer over everything; N: a semaphore of N permits). Over a shared
/// queue (`direct`) only the keys directly under `prefix` are members.
#[derive(Debug, Clone)]
pub(crate) struct Blocker {
    prefix: String,
    permits: usize,
    direct: bool,
}

/// How many more keys than it needs a read of a shared queue fetches, so that a few nested
/// names' keys among them do not make it read again.
const SHARED_PAGE_SLACK: i64 = 7;

impl Blocker {
    /// The blocker over the keys under `prefix` for `permits` permits.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for zero permits, or more than etcd can count in a read.
    pub(crate) fn new(prefix: String, permits: usize) -> Result<Blocker, Error> {
        if permits == 0 {
            return Err(Error::InvalidArgument(
                "at least one permit is needed".into(),
            ));
        }
        if i64::try_from(permits).map_or(true, |p| p == i64::MAX) {
            return Err(Error::InvalidArgument(format!(
                "{permits} permits are more than etcd can count (at most {})",
                i64::MAX - 1
            )));
        }
        Ok(Blocker {
            prefix,
            permits,
            direct: false,
        })
    }

    /// The blocker over every member of `queue` (a shared queue: only the keys directly under
    /// its prefix) for `permits` permits.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub(crate) fn over(queue: &Queue, permits: usize) -> Result<Blocker, Error> {
        Ok(Blocker {
            direct: queue.direct(),
            ..Blocker::new(queue.prefix().to_owned(), permits)?
        })
    }

    /// Whether `key` counts: under the prefix and, over a shared queue, directly under it.
    fn counts(&self, key: &[u8]) -> bool {
        key.strip_prefix(self.prefix.as_bytes())
            .is_some_and(|rest| !self.direct || (!rest.is_empty() && !rest.contains(&b'/')))
    }

    /// The prefix of the keys that can block.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether an acquisition with this many permits can go through in one conditional put.
    pub(crate) fn is_exclusive(&self) -> bool {
        self.permits == 1
    }

    /// How many of the newest keys ahead a decision needs: with one permit the key just ahead;
    /// with more, enough to tell the first waiter (exactly `permits` ahead) from the others.
    fn depth(&self) -> i64 {
        if self.permits == 1 {
            1
        } else {
            self.permits as i64 + 1
        }
    }

    /// How many keys a read fetches (over a shared queue a few more, as some may be nested).
    fn page(&self) -> i64 {
        if self.direct {
            self.depth() + SHARED_PAGE_SLACK
        } else {
            self.depth()
        }
    }

    /// The `Get` of the newest keys created at or before `max_create_revision` (0: any),
    /// newest first, keys only; a page of them, or (`wide`) all.
    fn ahead(&self, max_create_revision: i64, wide: bool) -> TxnOp {
        let mut opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_keys_only();
        if !wide {
            opts = opts.with_limit(self.page());
        }
        if max_create_revision > 0 {
            opts = opts.with_max_create_revision(max_create_revision);
        }
        TxnOp::get(self.prefix.as_str(), Some(opts))
    }

    /// The reads of the enqueue Txn (they run just before our put: every key is ahead).
    pub(crate) fn reads_at_enqueue(&self) -> Vec<TxnOp> {
        vec![self.ahead(0, false)]
    }

    /// The reads of a re-read of the acquisition created at `create_revision`: the keys
    /// ahead and, with several permits, whether any key was created after ours (a waiter
    /// behind us that may be watching our key).
    pub(crate) fn reads_after(&self, create_revision: i64) -> Reads {
        Reads {
            narrow: self.reads_after_with(create_revision, false),
            wide: self.reads_after_with(create_revision, true),
        }
    }

    fn reads_after_with(&self, create_revision: i64, wide: bool) -> Vec<TxnOp> {
        let mut reads = vec![self.ahead(create_revision - 1, wide)];
        if self.permits > 1 {
            let behind = GetOptions::new()
                .with_prefix()
                .with_min_create_revision(create_revision + 1)
                .with_limit(1)
                .with_keys_only();
            reads.push(TxnOp::get(self.prefix.as_str(), Some(behind)));
        }
        reads
    }

    /// The decision for a snapshot of [`reads_at_enqueue`](Self::reads_at_enqueue) or
    /// [`reads_after`](Self::reads_after).
    pub(crate) fn decide(&self, snapshot: &Snapshot) -> Decision {
        #[cfg(feature = "sabotage")]
        if crate::sabotage::broken() {
            return Decision::Through { touch: false }; // deliberately unsafe: see sabotage
        }
        let Some(read) = snapshot.gets.first() else {
            return Decision::Widen; // cannot happen: every read of a blocker has its Get
        };
        let ahead: Vec<&[u8]> = read
            .kvs()
            .iter()
            .map(|kv| kv.key())
            .filter(|k| self.counts(k))
            .take(self.depth() as usize)
            .collect();
        if ahead.len() < self.depth() as usize && read.more() {
            return Decision::Widen; // the page ended among nested names' keys
        }
        let behind = snapshot.gets.get(1).is_some_and(|g| !g.kvs().is_empty());
        queue_decision(&self.prefix, self.permits, &ahead, behind)
    }
}

/// The queue decision, without I/O. `ahead` holds the newest keys created before ours, newest
/// first (at most `permits + 1`, or 1 for one permit); `behind` says whether a key was created
/// after ours.
///
/// * Fewer than `permits` keys ahead: through. With several permits, a waiter behind us may be
///   watching our key for the moment we stop waiting: touch it (see below).
/// * One permit: wait for the deletion of the key just ahead — only it can let us in, and a
///   release wakes exactly the one waiter behind it.
/// * Exactly `permits` keys ahead (the first waiter of a semaphore): every one of them holds,
///   and the deletion of *any* lets us in — whichever holder leaves first. One watch of the
///   queue's deletions, filtered to those keys.
/// * More than `permits` ahead: no single deletion can let us in; wait for any change of the
///   key just ahead (a waiter): its deletion, or its touch when it goes through — either way we
///   may now be the first waiter, and re-read.
///
/// So a release wakes the first waiter (which goes through), and its touch wakes the one
/// waiter behind it (which becomes the first waiter): two watch events, never a herd.
pub(crate) fn queue_decision(
    prefix: &str,
    permits: usize,
    ahead: &[&[u8]],
    behind: bool,
) -> Decision {
    if ahead.len() < permits {
        return Decision::Through {
            touch: permits > 1 && behind,
        };
    }
    let Some(next) = ahead.first() else {
        return Decision::Through { touch: false }; // unreachable: permits >= 1
    };
    if permits == 1 {
        return Decision::Wait(vec![Watched::deleted(next.to_vec())]);
    }
    if ahead.len() == permits {
        let holders = ahead.iter().map(|k| k.to_vec()).collect();
        return Decision::Wait(vec![Watched::deleted_any(prefix, holders)]);
    }
    Decision::Wait(vec![Watched::changed(next.to_vec())])
}

/// Enqueues a new member of kind `kind` in `queue` and waits until `blocker` lets it through.
/// Cancel-safe: dropping the future at any await leaves no key behind.
pub(crate) async fn acquire(
    session: &LeasedSession,
    queue: &Queue,
    kind: &str,
    blocker: Blocker,
    value: Vec<u8>,
) -> Result<Acquired, Error> {
    let shared = session.shared();
    shared.check()?;
    let (key, slot) = numbered_key(shared, queue, kind);
    let (ticket, first) = enqueue(shared, &key, slot, value, blocker.reads_at_enqueue()).await?;
    let reads = blocker.reads_after(ticket.create_revision);
    wait_loop(shared, ticket, first, reads, |s| blocker.decide(s)).await
}

/// Takes back member `key` of kind `kind` in `queue`, made under this session's (resumed)
/// lease by an earlier process and created at `create_revision`, and waits like [`acquire`]
/// until `blocker` lets it through — at once if it held. The key must still be that
/// incarnation on this lease, not condemned by the session's rule for leftovers
/// ([`Error::LockLost`] otherwise). Cancel-safe like [`acquire`]: dropping the future after
/// the key was confirmed deletes it (fenced), as for any waiter that gives up.
pub(crate) async fn adopt(
    session: &LeasedSession,
    queue: &Queue,
    kind: &str,
    blocker: Blocker,
    key: &str,
    create_revision: i64,
) -> Result<Acquired, Error> {
    let shared = session.shared();
    shared.check()?;
    if !queue.is_member_of_lease(kind, shared.lease_id, key) {
        return Err(Error::InvalidArgument(format!(
            "{key} is not a key of this name that lease {:x} holds",
            shared.lease_id
        )));
    }
    let lost = || Error::LockLost {
        key: key.to_owned(),
        create_revision,
    };
    if create_revision <= 0 {
        return Err(lost());
    }
    let ours = Txn::new().when([
        keys::owner_compare(key, create_revision),
        Compare::lease(key, CompareOp::Equal, shared.lease_id),
    ]);
    // Before the check: a key whose taking-back began is never deleted as a leftover.
    let claim = shared.claim(key);
    let confirmed = send_until_answered(
        shared,
        || ours.clone(),
        Kind::MaybeReadOnly,
        &mut Backoff::for_requests(),
    )
    .await?;
    // Not there, or already condemned as a leftover (taken back too late).
    if !confirmed.resp.succeeded() || !claim.confirm(create_revision) {
        return Err(lost());
    }
    let ticket = Ticket::new(shared, key.to_owned(), create_revision, Afterwards::Nothing);
    let reads = blocker.reads_after(create_revision);
    wait_loop(shared, ticket, None, reads, |s| blocker.decide(s)).await
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
    reads: impl FnOnce(&str, i64) -> Vec<TxnOp>,
    decide: impl FnOnce(&str, i64) -> D,
) -> Result<Acquired, Error>
where
    D: FnMut(&Snapshot) -> Decision,
{
    let shared = session.shared();
    shared.check()?;
    let (key, slot) = numbered_key(shared, queue, kind);
    let (ticket, _) = enqueue(shared, &key, slot, value, Vec::new()).await?;
    let reads = Reads::fixed(reads(&ticket.key, ticket.create_revision));
    let decide = decide(&ticket.key, ticket.create_revision);
    wait_loop(shared, ticket, None, reads, decide).await
}

/// What the else-branch of a conditional put says (when the put did not happen).
pub(crate) enum Else {
    /// An earlier, unanswered attempt of ours landed and counts: its `(create revision,
    /// revision)`.
    Ours(i64, i64),
    /// Somebody else holds: nothing to hand out.
    Busy,
    /// The else-branch cannot tell (a shared queue whose range held only nested names' keys,
    /// or too many to read at once): find out the slow way.
    Unsure,
}

/// What a detached conditional put produced, and whether it was sent more than once.
type Created = (Else, bool);

/// What a conditional acquisition came to.
enum Attempt {
    Acquired(Acquired),
    Busy,
    Unsure,
}

/// Sends `txn()` — a put of `key` conditional on something — in a detached task (see
/// [`detached`]), after `before` (in that task), and turns the answer into an acquisition.
/// When the put did not happen, `on_else` reads the else-branch `Get`s (at `revision`; the
/// last argument says whether the put was sent more than once). `after(uncertain)` says what
/// follows once nothing of the acquisition exists — its key deleted, or its put not made —
/// given whether the put was sent more than once (a copy may still land).
async fn create_detached<B, T, E, A>(
    shared: &Arc<Shared>,
    key: &str,
    before: B,
    txn: T,
    on_else: E,
    after: A,
) -> Result<Attempt, Error>
where
    B: std::future::Future<Output = ()> + Send + 'static,
    T: Fn() -> Txn + Send + 'static,
    E: FnOnce(&Shared, &[GetResponse], i64, bool) -> Result<Else, Error> + Send + 'static,
    A: Fn(bool) -> Afterwards + Clone + Send + 'static,
{
    // Before anything is sent: a resumed session's look at its lease spares the key.
    let claim = shared.claim(key);
    let work = {
        let shared = Arc::clone(shared);
        async move {
            before.await;
            let put = Put::send(&shared, txn).await?;
            if put.resp.succeeded() {
                claim.confirm(put.revision);
                return Ok((Else::Ours(put.revision, put.revision), put.uncertain));
            }
            let got = on_else(
                &shared,
                &keys::txn_gets(&put.resp),
                put.revision,
                put.uncertain,
            )
            .map_err(|e| put.fail(e))?;
            if let Else::Ours(create_revision, _) = got {
                claim.confirm(create_revision);
            }
            Ok((got, put.uncertain))
        }
    };
    let for_cleanup = (key.to_owned(), shared.lease_id, after.clone());
    let (got, uncertain): Created = detached(
        shared,
        work,
        move |outcome: &Result<Created, Unanswered>| {
            let (key, lease_id, after) = for_cleanup;
            Some(match outcome {
                Ok((Else::Ours(create_revision, _), uncertain)) => {
                    Cleanup::release(key, *create_revision, lease_id, after(*uncertain))
                }
                Ok((_, uncertain)) => Cleanup::Forget(after(*uncertain)),
                Err(u) => Cleanup::Forget(after(u.uncertain)),
            })
        },
    )
    .await?;
    if let Else::Ours(create_revision, revision) = got {
        return Ticket::new(shared, key.to_owned(), create_revision, after(uncertain))
            .into_acquired(revision)
            .map(Attempt::Acquired);
    }
    // Nothing of it exists (a copy of a put sent more than once may still land).
    after(uncertain).key_deleted(shared);
    Ok(match got {
        Else::Unsure => Attempt::Unsure,
        _ => Attempt::Busy,
    })
}

/// Puts `key` with `value` under the session's lease if nobody holds it; `None` if it exists
/// and is not ours, or if this session holds it already (another `create_exclusive` of `key`
/// is under way, or what one created is not released yet: nothing is sent).
///
/// The session claims the name for the call and for as long as what it created lives (the
/// session's `Names`): so two calls of one session never both succeed. An
/// existing key counts as this call's own only if it is on our lease with `value` and it can
/// be a copy of a put of ours: this call's put sent more than once (and the key created after
/// the call began), or an earlier put of the name by this session that was sent more than once
/// (whose late copies are swept only while the name is not claimed). Cancel-safe: detached
/// like [`acquire`]'s enqueue.
pub(crate) async fn create_exclusive(
    session: &LeasedSession,
    key: &str,
    value: String,
) -> Result<Option<Acquired>, Error> {
    let shared = session.shared();
    shared.check()?;
    let Some(claimed) = Claim::take(shared, key) else {
        return Ok(None);
    };
    let (put_key, put_value, lease) = (key.to_owned(), value.clone().into_bytes(), shared.lease_id);
    let (name, sent) = (key.to_owned(), put_value.clone());
    // A copy of an earlier put of this session with this value may be there: it is ours.
    let earlier_copy = claimed.uncertain().contains(&put_value);
    // Our put lands after every revision seen so far: a key created at or before it is not
    // this call's.
    let started = shared.seen_revision();
    let txn = move || keys::enqueue_txn(&put_key, put_value.clone(), lease, Vec::new());
    let on_else = move |_: &Shared, gets: &[GetResponse], revision, uncertain: bool| {
        let existing = gets.first().and_then(|g| g.kvs().first());
        Ok(existing
            .filter(|kv| {
                kv.lease() == lease
                    && kv.value() == value.as_bytes()
                    && ((uncertain && kv.create_revision() > started) || earlier_copy)
            })
            .map_or(Else::Busy, |kv| Else::Ours(kv.create_revision(), revision)))
    };
    let after = move |uncertain: bool| Afterwards::Unclaim {
        key: name.clone(),
        value: uncertain.then(|| sent.clone()),
    };
    // Before anything is put: the name's sweep stops, and the claim passes to `after`.
    let before = claimed.hand_over();
    Ok(
        match create_detached(shared, key, before, txn, on_else, after).await? {
            Attempt::Acquired(acquired) => Some(acquired),
            Attempt::Busy | Attempt::Unsure => None,
        },
    )
}

/// This session's claim on a name for a `create_exclusive`, until it is handed over to what
/// follows the put ([`Afterwards::Unclaim`]); ended as it is dropped before that.
struct Claim {
    shared: Arc<Shared>,
    key: String,
    claimed: Option<Claimed>,
}

impl Claim {
    /// The claim on `key`, or `None` if this session holds it already.
    fn take(shared: &Arc<Shared>, key: &str) -> Option<Claim> {
        let claimed = shared.names.claim(key)?;
        Some(Claim {
            shared: Arc::clone(shared),
            key: key.to_owned(),
            claimed: Some(claimed),
        })
    }

    /// Values of earlier puts of the name whose copies may still land.
    fn uncertain(&self) -> &[Vec<u8>] {
        self.claimed
            .as_ref()
            .map_or(&[], |c| c.uncertain.as_slice())
    }

    /// Stops the name's sweep (waiting until it has), then hands the claim over: from then on
    /// it ends with what the put produced.
    async fn hand_over(mut self) {
        if let Some(claimed) = self.claimed.as_mut() {
            claimed.stop_sweep().await;
        }
        self.claimed = None;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.claimed.take().is_some() {
            if let Some(sweep) = self
                .shared
                .names
                .unclaim(&self.key, self.shared.lease_id, None)
            {
                self.shared.clean_up(Cleanup::Sweep(sweep));
            }
        }
    }
}

/// Takes back `key` if it exists on this session's lease (any create revision: a key made by
/// an earlier process under the lease a resumed session adopted), with its value; `None` if
/// it is absent, on another lease, or already condemned by the session's rule for leftovers
/// (see `session::leftovers`: taken back after the adoption window). One read-only Txn (a
/// compare on the key's lease and a get), never cancelled once sent (etcd #14110).
pub(crate) async fn adopt_on_lease(
    session: &LeasedSession,
    key: &str,
) -> Result<Option<(Acquired, Vec<u8>)>, Error> {
    let shared = session.shared();
    shared.check()?;
    let ours = Txn::new()
        .when([Compare::lease(key, CompareOp::Equal, shared.lease_id)])
        .and_then([TxnOp::get(key, None)]);
    // Before the check: a key whose taking-back began is never deleted as a leftover.
    let claim = shared.claim(key);
    let answered = send_until_answered(
        shared,
        || ours.clone(),
        Kind::MaybeReadOnly,
        &mut Backoff::for_requests(),
    )
    .await?;
    if !answered.resp.succeeded() {
        return Ok(None);
    }
    let revision = keys::header_revision(&answered.resp)?;
    let gets = keys::txn_gets(&answered.resp);
    let Some(kv) = gets.first().and_then(|g| g.kvs().first()) else {
        return Err(Error::Protocol(format!(
            "{key}: a lease compare held without the key"
        )));
    };
    if !claim.confirm(kv.create_revision()) {
        return Ok(None); // condemned as a leftover: taken back too late, about to be deleted
    }
    let acquired = Acquired {
        key: key.to_owned(),
        create_revision: kv.create_revision(),
        revision,
        after: Afterwards::Nothing,
    };
    Ok(Some((acquired, kv.value().to_vec())))
}

/// Takes a place in `queue` only if it is through at once; else leaves no key behind and
/// returns `None`. With one permit it is one round trip that never creates a key when busy
/// (the put is conditional on the blocker's range being empty); otherwise — or when that
/// range holds only nested names' keys — it enqueues and, if blocked, deletes its key again
/// before returning. Cancel-safe like [`acquire`].
pub(crate) async fn try_acquire(
    session: &LeasedSession,
    queue: &Queue,
    kind: &str,
    blocker: Blocker,
    value: Vec<u8>,
) -> Result<Option<Acquired>, Error> {
    let shared = session.shared();
    shared.check()?;
    if !blocker.is_exclusive() {
        return try_by_enqueue(session, queue, kind, &blocker, value).await;
    }
    let (key, slot) = numbered_key(shared, queue, kind);
    let (put_key, lease, prefix) = (key.clone(), shared.lease_id, blocker.prefix().to_owned());
    // Our put lands after every revision seen so far: a key of this name created earlier is
    // not this call's.
    let started = shared.seen_revision();
    let put_value = value.clone();
    let txn =
        move || keys::try_enqueue_txn(&prefix, &put_key, put_value.clone(), lease, blocker_page());
    let own_key = key.clone();
    let counter = blocker.clone();
    let on_else = move |shared: &Shared, gets: &[GetResponse], revision, _uncertain: bool| {
        let (Some(own), Some(oldest)) = (gets.first(), gets.get(1)) else {
            return Err(Error::Protocol("try-enqueue txn without its gets".into()));
        };
        // The oldest members in the range (a shared queue's range also holds nested names).
        let members: Vec<i64> = oldest
            .kvs()
            .iter()
            .filter(|kv| counter.counts(kv.key()) && kv.key() != own_key.as_bytes())
            .map(|kv| kv.create_revision())
            .collect();
        let Some(kv) = own
            .kvs()
            .first()
            .filter(|kv| kv.create_revision() > started)
        else {
            // No earlier attempt of ours landed: busy if a member holds, else unsure.
            return Ok(if members.is_empty() {
                Else::Unsure
            } else {
                Else::Busy
            });
        };
        // An earlier, unanswered attempt landed: it is through if no member is older; else it
        // is taken back (and its late copies swept).
        let mine = kv.create_revision();
        match members.first() {
            None if oldest.more() => {}
            Some(&o) if o < mine => {}
            _ => return Ok(Else::Ours(mine, revision)),
        }
        shared.clean_up(Cleanup::release(
            own_key.clone(),
            mine,
            shared.lease_id,
            Afterwards::Sweep(Sweep::on_lease(&own_key, shared.lease_id)),
        ));
        Ok(if members.is_empty() {
            Else::Unsure
        } else {
            Else::Busy
        })
    };
    let sweep = Sweep::on_lease(&key, lease);
    let after =
        move |uncertain| Afterwards::of_put(uncertain, sweep.clone(), Afterwards::Reuse(slot));
    match create_detached(shared, &key, async {}, txn, on_else, after).await? {
        Attempt::Acquired(acquired) => Ok(Some(acquired)),
        Attempt::Busy => Ok(None),
        Attempt::Unsure => try_by_enqueue(session, queue, kind, &blocker, value).await,
    }
}

/// How many of the oldest keys a try-acquire's else-branch reads.
fn blocker_page() -> i64 {
    1 + SHARED_PAGE_SLACK
}

/// Enqueues and decides at once: through, or (blocked) takes the key back before answering.
async fn try_by_enqueue(
    session: &LeasedSession,
    queue: &Queue,
    kind: &str,
    blocker: &Blocker,
    value: Vec<u8>,
) -> Result<Option<Acquired>, Error> {
    let shared = session.shared();
    let (key, slot) = numbered_key(shared, queue, kind);
    let (ticket, first) = enqueue(shared, &key, slot, value, blocker.reads_at_enqueue()).await?;
    let reads = blocker.reads_after(ticket.create_revision);
    let mut backoff = Backoff::for_requests();
    let mut snapshot = match first {
        Some(s) => s,
        None => read_fenced(shared, &ticket, &reads.narrow, &mut backoff).await?,
    };
    let mut decision = blocker.decide(&snapshot);
    if let Decision::Widen = decision {
        snapshot = read_fenced(shared, &ticket, &reads.wide, &mut backoff).await?;
        decision = blocker.decide(&snapshot);
    }
    match decision {
        Decision::Through { .. } => ticket.into_acquired(snapshot.revision).map(Some),
        _ => {
            // Busy: take the key back before answering, so none is left behind.
            ticket.release_now().await;
            Ok(None)
        }
    }
}

/// Runs `reads` (one round trip, retried on transient failures while the session lives).
pub(crate) async fn read(shared: &Arc<Shared>, reads: Vec<TxnOp>) -> Result<Snapshot, Error> {
    let resp = send_until_answered(
        shared,
        || Txn::new().and_then(reads.clone()),
        Kind::MaybeReadOnly,
        &mut Backoff::for_requests(),
    )
    .await?
    .resp;
    Ok(Snapshot {
        revision: keys::header_revision(&resp)?,
        gets: keys::txn_gets(&resp),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(i: usize) -> Vec<u8> {
        format!("q/#{i:04}").into_bytes()
    }

    /// The keys a decision waits on, and for which events.
    fn waits(d: &Decision) -> Option<&[Watched]> {
        match d {
            Decision::Wait(t) => Some(t),
            _ => None,
        }
    }

    proptest! {
        /// For any queue and any permits: through exactly when fewer than `permits` keys are
        /// ahead; a blocked acquisition always waits on something that is ahead of it; the
        /// first waiter of a semaphore wakes on the deletion of any key ahead of it; a waiter
        /// further back waits on the one key just ahead.
        #[test]
        fn the_queue_decision_lets_through_exactly_when_a_permit_is_free(
            permits in 1usize..6,
            queued_ahead in 0usize..12,
            behind in any::<bool>(),
        ) {
            // What the reads return: newest first, at most depth keys.
            let depth = if permits == 1 { 1 } else { permits + 1 };
            let all: Vec<Vec<u8>> = (0..queued_ahead).rev().map(key).collect();
            let ahead: Vec<&[u8]> = all.iter().take(depth).map(|k| k.as_slice()).collect();
            let d = queue_decision("q/#", permits, &ahead, behind);
            if queued_ahead < permits {
                prop_assert!(matches!(d, Decision::Through { touch } if touch == (permits > 1 && behind)), "{d:?}");
                return Ok(());
            }
            let targets = waits(&d).expect("blocked");
            prop_assert_eq!(targets.len(), 1);
            let t = &targets[0];
            if permits == 1 {
                prop_assert_eq!(t, &Watched::deleted(key(queued_ahead - 1)));
            } else if queued_ahead == permits {
                // Every key ahead holds a permit: any deletion frees one.
                for i in 0..queued_ahead {
                    prop_assert!(t.matches(etcd_client::EventType::Delete, &key(i)), "key {i} not watched");
                }
                prop_assert!(!t.matches(etcd_client::EventType::Put, &key(0)));
            } else {
                prop_assert_eq!(t, &Watched::changed(key(queued_ahead - 1)));
            }
        }
    }

    #[test]
    fn blockers_refuse_zero_permits_and_more_than_etcd_can_count() {
        assert!(matches!(
            Blocker::new("q/#".into(), 0),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Blocker::new("q/#".into(), usize::MAX),
            Err(Error::InvalidArgument(_))
        ));
        assert!(Blocker::new("q/#".into(), 1_000_000).is_ok());
    }
}
