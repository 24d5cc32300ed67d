//! The queue algorithm: enqueue, the one wait loop, the decisions.

use std::sync::Arc;

use etcd_client::{GetResponse, Txn, TxnOp};

use crate::keys::{self, Blocker, Queue};
use crate::session::{Cleanup, Shared};
use crate::{Error, LeasedSession};

use super::request::{detached, send_txn, send_until_answered, unless_lost, Kind};
use super::watch::{wait_for_change, Watched, Woken};

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
