//! Acquiring a place in a queue: acquire (wait for it), try (only if through at once), join
//! (wait for a condition), adopt (take back a key of a resumed lease). What primitives call.

use std::sync::Arc;

use etcd_client::{Compare, CompareOp, GetOptions, GetResponse, KeyValue, Txn, TxnOp};

use crate::backoff::Backoff;
use crate::keys::{self, Queue};
use crate::session::Session;
use crate::{Error, LeasedSession};

use super::cleanup::{Afterwards, Cleanup, Sweep};
use super::decision::{Blocker, Decision, Snapshot, SHARED_PAGE_SLACK};
use super::enqueue::{create_detached, enqueue, enqueue_releasing, numbered_key, Attempt, Outcome};
use super::holding::Holding;
use super::lines::Lines;
use super::mirror;
use super::ticket::{Acquired, Ticket};
use super::wait::{read_fenced, wait_loop, Reads};
use super::{until_answered, SessionKeys};

/// Enqueues a new member of kind `kind` in `queue` and waits until `blocker` lets it through.
/// Cancel-safe: dropping the future at any await leaves no key behind.
pub(crate) async fn acquire(
    leased: &LeasedSession,
    queue: &Queue,
    kind: &str,
    blocker: Blocker,
    value: Vec<u8>,
) -> Result<Acquired, Error> {
    enqueue_and_wait(leased, queue, kind, blocker, value, None).await
}

/// Releases `holding` (this session's member of `queue`, holding) and enqueues a new member
/// of kind `kind` in one Txn ([`keys::requeue_parts`]), then waits like [`acquire`] — the
/// release and the next acquisition of a lock taken in a loop, in one raft entry instead of
/// two. The waiters already in line are ahead of the new member, so the first of them is
/// through at the Txn's revision, as after a release.
///
/// Cancel-safe like [`acquire`]: dropped before the Txn is sent, the holding is released by
/// the session's task (it is dropped unreleased); after, the detached Txn keeps it until the
/// answer (finished by the session's task if the caller is gone) and releases it so if
/// the Txn did not.
///
/// # Errors
/// [`Error::LockLost`] for `holding`'s key if it was no longer ours (nothing is put); as
/// [`acquire`] otherwise — and in every case the holding is released.
pub(crate) async fn requeue(
    leased: &LeasedSession,
    queue: &Queue,
    kind: &str,
    blocker: Blocker,
    value: Vec<u8>,
    mut holding: Holding,
) -> Result<Acquired, Error> {
    // A release that went unanswered (a resign that timed out) may have deleted the key:
    // finish it first, so that a key gone by our own hand is not taken for a lost one. The
    // requeue is then a plain enqueue.
    if holding.release_unconfirmed() {
        holding.release().await?;
    }
    enqueue_and_wait(leased, queue, kind, blocker, value, Some(holding)).await
}

/// [`acquire`], or [`requeue`] with `releasing`.
async fn enqueue_and_wait(
    leased: &LeasedSession,
    queue: &Queue,
    kind: &str,
    blocker: Blocker,
    value: Vec<u8>,
    releasing: Option<Holding>,
) -> Result<Acquired, Error> {
    let session = leased.inner();
    session.check()?;
    let (ticket, first, long) =
        enqueue_member(session, queue, kind, &blocker, value, true, releasing).await?;
    let mut reads = blocker.reads_after(ticket.create_revision);
    if long {
        reads = reads.mirrored(&blocker);
    }
    wait_loop(session, ticket, first, reads, |s| blocker.decide(s)).await
}

/// Enqueues a new member of kind `kind` in `queue`: its ticket, marked as `blocker` says, the
/// enqueue's snapshot if that decides (its page held the whole queue), and whether the line is
/// long enough to decide from the session's mirror of the queue ([`mirror`]). With `waits`
/// (an acquisition that waits, not a try): when the session already mirrors the queue, the
/// enqueue reads nothing and the wait decides from the mirror (etcd answers even a page of a
/// range by visiting every key of it, to count them, which a long queue makes costly); and the
/// enqueue may linger for a sibling's write to share its Txn (`engine::lines`).
async fn enqueue_member(
    session: &Arc<Session>,
    queue: &Queue,
    kind: &str,
    blocker: &Blocker,
    value: Vec<u8>,
    waits: bool,
    releasing: Option<Holding>,
) -> Result<(Ticket, Option<Snapshot>, bool), Error> {
    let (key, slot) = numbered_key(session, queue, kind);
    let skip_page = waits && mirror::mirrors(session, blocker, &key);
    let reads = if skip_page {
        Vec::new()
    } else {
        blocker.reads_at_enqueue()
    };
    let (mut ticket, first) = enqueue_releasing(
        session,
        &key,
        slot,
        value,
        reads,
        releasing,
        waits.then_some(blocker),
    )
    .await?;
    ticket.announces = blocker.heads(queue);
    ticket.expects_announcements = blocker.announced();
    let long = skip_page || first.as_ref().is_some_and(|s| blocker.long_at_enqueue(s));
    Ok((
        ticket,
        first.filter(|s| blocker.decides_at_enqueue(s)),
        long,
    ))
}

/// Takes back member `key` of kind `kind` in `queue`, made under this session's (resumed)
/// lease by an earlier process and created at `create_revision`, and waits like [`acquire`]
/// until `blocker` lets it through — at once if it held. The key must still be that
/// incarnation on this lease, not condemned by the session's rule for leftovers
/// ([`Error::LockLost`] otherwise). Cancel-safe like [`acquire`]: dropping the future after
/// the key was confirmed deletes it (fenced), as for any waiter that gives up.
pub(crate) async fn adopt(
    leased: &LeasedSession,
    queue: &Queue,
    kind: &str,
    blocker: Blocker,
    key: &str,
    create_revision: i64,
) -> Result<Acquired, Error> {
    let session = leased.inner();
    session.check()?;
    if !queue.is_member_of_lease(kind, session.lease_id, key) {
        return Err(Error::InvalidArgument(format!(
            "{key} is not a key of this name that lease {:x} holds",
            session.lease_id
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
        Compare::lease(key, CompareOp::Equal, session.lease_id),
    ]);
    // Before the check: a key whose taking-back began is never deleted as a leftover.
    let claim = session.intend(key);
    let confirmed = until_answered(session, || ours.clone(), &mut Backoff::for_requests()).await?;
    // Not there, or already condemned as a leftover (taken back too late).
    if !confirmed.resp.succeeded() || !claim.confirm(create_revision) {
        return Err(lost());
    }
    let mut ticket = Ticket::new(
        session,
        key.to_owned(),
        create_revision,
        Afterwards::Nothing,
    );
    let reads = blocker.reads_after(create_revision);
    ticket.announces = blocker.heads(queue);
    ticket.expects_announcements = blocker.announced();
    wait_loop(session, ticket, None, reads, |s| blocker.decide(s)).await
}

/// Joins `queue` with a member key of kind `kind` and waits, through the one wait loop, until
/// `decide` says it is through — for primitives that wait for a condition rather than for
/// their place in line (a double barrier's "enough participants"). `reads` run after the
/// key exists, so they see it. Cancel-safe like [`acquire`].
pub(crate) async fn join<D>(
    leased: &LeasedSession,
    queue: &Queue,
    kind: &str,
    value: Vec<u8>,
    reads: impl FnOnce(&str, i64) -> Vec<TxnOp>,
    decide: impl FnOnce(&str, i64) -> D,
) -> Result<Acquired, Error>
where
    D: FnMut(&Snapshot) -> Decision,
{
    let session = leased.inner();
    session.check()?;
    let (key, slot) = numbered_key(session, queue, kind);
    let (ticket, _) = enqueue(session, &key, slot, value, Vec::new()).await?;
    let reads = Reads::fixed(reads(&ticket.key, ticket.create_revision));
    let decide = decide(&ticket.key, ticket.create_revision);
    wait_loop(session, ticket, None, reads, decide).await
}

/// Takes back `key` if it exists on this session's lease (any create revision: a key made by
/// an earlier process under the lease a resumed session adopted), with its value; `None` if
/// it is absent, on another lease, or already condemned by the session's rule for leftovers
/// (see `session::leftovers`: taken back after the adoption window). One read-only Txn (a
/// compare on the key's lease and a get), never cancelled once sent (etcd #14110).
pub(crate) async fn adopt_on_lease(
    leased: &LeasedSession,
    key: &str,
) -> Result<Option<(Acquired, Vec<u8>)>, Error> {
    let session = leased.inner();
    session.check()?;
    let ours = Txn::new()
        .when([Compare::lease(key, CompareOp::Equal, session.lease_id)])
        .and_then([TxnOp::get(key, None)]);
    // Before the check: a key whose taking-back began is never deleted as a leftover.
    let claim = session.intend(key);
    let answered = until_answered(session, || ours.clone(), &mut Backoff::for_requests()).await?;
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
        announces: false,
        member: Some(Lines::enter(session, key)),
    };
    Ok(Some((acquired, kv.value().to_vec())))
}

/// Takes a place in `queue` only if it is through at once; else leaves no key behind and
/// returns `None`. With one permit it is one round trip that never creates a key when busy
/// (the put is conditional on the blocker's range being empty); otherwise — or when that
/// range holds only nested names' keys — it enqueues and, if blocked, deletes its key again
/// before returning. Cancel-safe like [`acquire`].
pub(crate) async fn try_acquire(
    leased: &LeasedSession,
    queue: &Queue,
    kind: &str,
    blocker: Blocker,
    value: Vec<u8>,
) -> Result<Option<Acquired>, Error> {
    let session = leased.inner();
    session.check()?;
    if !blocker.is_exclusive() {
        return try_by_enqueue(session, queue, kind, &blocker, value).await;
    }
    let (key, slot) = numbered_key(session, queue, kind);
    let (put_key, lease, prefix) = (key.clone(), session.lease_id, blocker.prefix().to_owned());
    // Our put lands after every revision seen so far: a key of this name created earlier is
    // not this call's.
    let started = session.rpc.seen_revision();
    let put_value = value.clone();
    let txn =
        move || keys::try_enqueue_txn(&prefix, &put_key, put_value.clone(), lease, blocker_page());
    let own_key = key.clone();
    let counter = blocker.clone();
    let on_else = move |session: &Session, gets: &[GetResponse], revision, _uncertain: bool| {
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
                Outcome::Unsure
            } else {
                Outcome::Busy
            });
        };
        // An earlier, unanswered attempt landed: it is through if no member is older; else it
        // is taken back (and its late copies swept).
        let mine = kv.create_revision();
        match members.first() {
            None if oldest.more() => {}
            Some(&o) if o < mine => {}
            _ => {
                return Ok(Outcome::Ours {
                    create_revision: mine,
                    revision,
                })
            }
        }
        session.clean_up(Cleanup::release(
            own_key.clone(),
            mine,
            session.lease_id,
            Afterwards::Sweep(Sweep::on_lease(&own_key, session.lease_id)),
        ));
        Ok(if members.is_empty() {
            Outcome::Unsure
        } else {
            Outcome::Busy
        })
    };
    let sweep = Sweep::on_lease(&key, lease);
    let after =
        move |uncertain| Afterwards::of_put(uncertain, sweep.clone(), Afterwards::Reuse(slot));
    match create_detached(session, &key, async {}, txn, on_else, after).await? {
        Attempt::Acquired(mut acquired) => {
            acquired.announces = blocker.heads(queue);
            Ok(Some(acquired))
        }
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
    session: &Arc<Session>,
    queue: &Queue,
    kind: &str,
    blocker: &Blocker,
    value: Vec<u8>,
) -> Result<Option<Acquired>, Error> {
    let (ticket, first, _) =
        enqueue_member(session, queue, kind, blocker, value, false, None).await?;
    let reads = blocker.reads_after(ticket.create_revision);
    let mut backoff = Backoff::for_requests();
    let mut snapshot = match first {
        Some(s) => s,
        None => read_fenced(session, &ticket, &reads.narrow, &mut backoff).await?,
    };
    let mut decision = blocker.decide(&snapshot);
    if let Decision::Widen = decision {
        snapshot = read_fenced(session, &ticket, &reads.wide, &mut backoff).await?;
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
pub(crate) async fn read(session: &Arc<Session>, reads: Vec<TxnOp>) -> Result<Snapshot, Error> {
    let resp = until_answered(
        session,
        || Txn::new().and_then(reads.clone()),
        &mut Backoff::for_requests(),
    )
    .await?
    .resp;
    Ok(Snapshot::read(
        keys::header_revision(&resp)?,
        keys::txn_gets(&resp),
    ))
}

/// Every key under `prefix` (values too, unless `keys_only`), in key order, read in pages of
/// `page` keys at one revision (`at`, or the first page's if 0): the keys and that revision.
/// A page in key order is read from etcd's index, however long the range. Transient failures
/// are retried while the session lives.
pub(crate) async fn read_all(
    session: &Arc<Session>,
    prefix: &[u8],
    at: i64,
    page: i64,
    keys_only: bool,
) -> Result<(Vec<KeyValue>, i64), Error> {
    let end = keys::prefix_end(prefix);
    let (mut start, mut revision, mut all) = (prefix.to_vec(), at, Vec::new());
    let mut backoff = Backoff::for_requests();
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(page);
        if keys_only {
            opts = opts.with_keys_only();
        }
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let get = || session.rpc.get(start.clone(), opts.clone());
        let resp = session
            .rpc
            .until_answered(get, &mut backoff, &**session)
            .await?
            .resp;
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        all.extend(resp.kvs().iter().cloned());
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                start = last.key().to_vec();
                start.push(0);
            }
            _ => return Ok((all, revision)),
        }
    }
}

/// A place in a queue to take: the session, the queue, the kind of member key and what blocks
/// it — with the acquire, try and take-back paths that every queue primitive (Mutex,
/// Semaphore, RwLock, Election) shares, each giving a [`Holding`] to make a guard of.
pub(crate) struct Line<'a> {
    leased: &'a LeasedSession,
    queue: &'a Queue,
    kind: &'static str,
    blocker: Blocker,
}

impl<'a> Line<'a> {
    /// A place of kind `kind` in `queue` through `leased`, blocked as `blocker` says.
    pub(crate) fn new(
        leased: &'a LeasedSession,
        queue: &'a Queue,
        kind: &'static str,
        blocker: Blocker,
    ) -> Line<'a> {
        Line {
            leased,
            queue,
            kind,
            blocker,
        }
    }

    /// The place of a queue that etcd's own clients share (a mutex's, an election's): one
    /// permit, every member directly under the name.
    pub(crate) fn exclusive(
        leased: &'a LeasedSession,
        queue: &'a Queue,
    ) -> Result<Line<'a>, Error> {
        Ok(Line::new(leased, queue, "", Blocker::over(queue, 1)?))
    }

    /// Enqueues (the key holding `value`) and waits until through (see [`acquire`]).
    pub(crate) async fn acquire(self, value: Vec<u8>) -> Result<Holding, Error> {
        let acquired = acquire(self.leased, self.queue, self.kind, self.blocker, value).await?;
        Ok(Holding::new(self.leased.clone(), acquired))
    }

    /// Releases `holding` — one of this place's, taken through the same session — and
    /// enqueues again in the same Txn, then waits until through (see [`requeue`]).
    pub(crate) async fn requeue(self, holding: Holding, value: Vec<u8>) -> Result<Holding, Error> {
        let acquired = requeue(
            self.leased,
            self.queue,
            self.kind,
            self.blocker,
            value,
            holding,
        )
        .await?;
        Ok(Holding::new(self.leased.clone(), acquired))
    }

    /// Through at once, or `None` and nothing left behind (see [`try_acquire`]).
    pub(crate) async fn try_acquire(self, value: Vec<u8>) -> Result<Option<Holding>, Error> {
        let got = try_acquire(self.leased, self.queue, self.kind, self.blocker, value).await?;
        Ok(got.map(|acquired| Holding::new(self.leased.clone(), acquired)))
    }

    /// Takes back `key`, created at `fencing_token` on this (resumed) session's lease, and
    /// waits from its place until through (see [`adopt`]).
    pub(crate) async fn adopt(self, key: &str, fencing_token: i64) -> Result<Holding, Error> {
        let acquired = adopt(
            self.leased,
            self.queue,
            self.kind,
            self.blocker,
            key,
            fencing_token,
        )
        .await?;
        Ok(Holding::new(self.leased.clone(), acquired))
    }
}
