//! The one wait loop (read while our key exists → decide (through / act / wait) → wait for
//! the changes the decision names, with a watch registered from now together with our own key
//! and the session's loss → read again), and waiting for a key to be gone.

use std::sync::Arc;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};

use crate::backoff::Backoff;
use crate::keys::{self};
use crate::session::Session;
use crate::watch::{wait_for_change, Watched, Woken};
use crate::Error;

use super::cleanup::Cleanup;
use super::decision::{Blocker, Decision, Snapshot, DRAIN_MAX};
use super::mirror::{line_from_mirror, mirrors};
use super::ticket::{Acquired, Ticket};
use super::{until_answered, SessionKeys};

/// Runs `reads` while our key is still ours. [`Error::LockLost`] once it is gone (or taken
/// over by another client's put).
#[tracing::instrument(name = "etcd_coord.reread", level = "debug", skip_all, fields(key = %ticket.key))]
pub(super) async fn read_fenced(
    session: &Arc<Session>,
    ticket: &Ticket,
    reads: &[TxnOp],
    backoff: &mut Backoff,
) -> Result<Snapshot, Error> {
    let resp = until_answered(
        session,
        || {
            keys::fenced_reads(
                &ticket.key,
                ticket.create_revision,
                session.lease_id,
                reads.to_vec(),
            )
        },
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
    Ok(Snapshot::read(
        keys::header_revision(&resp)?,
        keys::txn_gets(&resp),
    ))
}

/// The one wait loop: read (only while our key exists) → decide → through, act, or wait for a
/// change → read again. Every wake-up re-decides from a fresh read, so a waiter never infers
/// ownership from a notification (etcd #16221). The one exception is a change the decision
/// itself marks [`Watched::deciding`] (a double barrier's latch, which may be gone again by
/// the time anyone re-reads): it is through if our key still exists after it — which a fenced
/// read confirms. `first` is a snapshot the enqueue already took, if any. One backoff serves
/// every retry of the wait; it is reset when a watched change happens.
pub(super) async fn wait_loop<D>(
    session: &Arc<Session>,
    mut ticket: Ticket,
    mut first: Option<Snapshot>,
    reads: Reads,
    mut decide: D,
) -> Result<Acquired, Error>
where
    D: FnMut(&Snapshot) -> Decision,
{
    let mut backoff = Backoff::for_requests();
    let mut widen = false;
    // Whether a waiter of a semaphore behind us may be waiting for our key to change (it saw
    // more than DRAIN_MAX keys ahead, so it does not count them): we then touch our key when
    // we go through by counting. Not if the enqueue's own read (before any waiter behind us
    // could read) held fewer than DRAIN_MAX keys ahead of us: every waiter just behind us
    // then sees at most DRAIN_MAX ahead of it, and counts them too.
    let mut followed = first.is_none();
    // History before this revision was compacted away: targets watched `since` an earlier
    // revision are watched from here.
    let mut floor = 0;
    // The revision of the change that woke us: a decision from the session's mirror waits
    // until the mirror has applied it (it may have reached us through another scope of the
    // stream). And whether the next decision reads etcd instead (an announcement was
    // refused: the mirror may not show yet what the refusal saw).
    let mut woke_at = 0;
    let mut read_etcd = false;
    loop {
        let snapshot = match first.take() {
            Some(s) => s,
            None => {
                // Behind a long line, or once the session mirrors the queue anyway (a line
                // that grew long behind us): from the mirror.
                let from_etcd = std::mem::take(&mut read_etcd);
                let mirrored = match &reads.line {
                    Some(blocker)
                        if !widen
                            && !from_etcd
                            && (reads.build || mirrors(session, blocker, &ticket.key)) =>
                    {
                        let woke = std::mem::take(&mut woke_at);
                        line_from_mirror(session, &ticket, blocker, woke).await?
                    }
                    _ => None,
                };
                if let Some(s) = mirrored {
                    tracing::trace!(target: "etcd_coord::handoff", key = %ticket.key, revision = s.revision, "mirrored");
                    s
                } else {
                    let reads = if std::mem::take(&mut widen) {
                        &reads.wide
                    } else {
                        &reads.narrow
                    };
                    let s = read_fenced(session, &ticket, reads, &mut backoff).await?;
                    tracing::trace!(target: "etcd_coord::handoff", key = %ticket.key, revision = s.revision, "re-read");
                    s
                }
            }
        };
        let decision = decide(&snapshot);
        if !matches!(&decision, Decision::Drain { keys, .. } if keys.len() < DRAIN_MAX) {
            followed = true;
        }
        match decision {
            Decision::Widen => widen = true,
            Decision::Through { touch } => {
                tracing::trace!(target: "etcd_coord::handoff", key = %ticket.key, touch, "through");
                return through(session, ticket, snapshot.revision, touch);
            }
            Decision::Act { txn, creates } => {
                let claim = creates.as_deref().map(|key| session.intend(key));
                let started = session.rpc.seen_revision();
                let answered = until_answered(session, || txn.clone(), &mut backoff).await?;
                if let Some(claim) = claim {
                    let created = if answered.resp.succeeded() {
                        Some(keys::header_revision(&answered.resp)?)
                    } else if answered.uncertain {
                        keys::txn_gets(&answered.resp)
                            .first()
                            .and_then(|g| g.kvs().first())
                            .filter(|kv| {
                                kv.lease() == session.lease_id && kv.create_revision() > started
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
            Decision::Follow {
                key: ahead,
                create_revision: ahead_revision,
            } => {
                // Only our own releases announce: behind anyone else's key, wait as for any
                // change. An announcement that lands shows the state at its revision: the key
                // ahead still there, ours still ours — the wait reads from there.
                let mut read_at = snapshot.revision;
                // Only in a line whose holders announce (not a WorkQueue's idle line, whose
                // keys look like a writer's).
                let pointer = (ticket.expects_announcements && keys::announces_release(&ahead))
                    .then(|| keys::successor_pointer(&ahead, ticket.create_revision))
                    .flatten();
                if let Some(pointer) = pointer.clone() {
                    if ticket.pointer.as_ref() != Some(&pointer) {
                        match announce(session, &mut ticket, &ahead, ahead_revision, pointer)
                            .await?
                        {
                            Announced::At(revision) => read_at = revision,
                            Announced::Uncertain => {}
                            Announced::Refused => {
                                // The key ahead (or ours) went: read etcd.
                                read_etcd = true;
                                continue;
                            }
                        }
                    }
                }
                let own = Some((ticket.key.as_str(), ticket.create_revision));
                let mut targets = vec![Watched::deleted(ahead.clone())];
                targets.extend(pointer.clone().map(Watched::deleted));
                let woken = wait_for_change(
                    session.waits(),
                    &targets,
                    own,
                    read_at,
                    || async {
                        // Still the same key ahead? Nothing can be created between it and us
                        // (create revisions only grow), so it is while it exists as the same
                        // incarnation.
                        still_there(session, &ticket, &[(ahead.clone(), ahead_revision)]).await
                    },
                    &mut backoff,
                )
                .await?;
                match woken {
                    // The key ahead went with our pointer to it, in one Txn: its holder
                    // released it (a waiter that gives up, an expiry or anyone else's delete
                    // leaves the pointer). It held as the oldest member, so nothing is ahead
                    // of us any more: we hold at that revision if our key was still ours
                    // then. A change delivered in order with our own key's events says so
                    // by itself; else one read of our key does.
                    Woken::Changed(change)
                        if change.keys.contains(&ahead)
                            && pointer.is_some()
                            && ticket.pointer == pointer
                            && pointer.as_ref().is_some_and(|p| change.keys.contains(p)) =>
                    {
                        // Deleted by that release.
                        let gone = ticket.pointer.take();
                        ticket.pointers.retain(|p| Some(p) != gone.as_ref());
                        let at = if change.ordered {
                            change.revision
                        } else {
                            let at = confirm_own(session, &ticket, change.revision, &mut backoff)
                                .await?;
                            tracing::trace!(target: "etcd_coord::handoff", key = %ticket.key, revision = at, "re-read");
                            at
                        };
                        tracing::trace!(target: "etcd_coord::handoff", key = %ticket.key, announced = true, "through");
                        return ticket.into_acquired(at);
                    }
                    Woken::Changed(change) => {
                        woke_at = change.revision;
                        first = None;
                    }
                    Woken::Recheck | Woken::Decided(_) => first = None,
                    Woken::Compacted(revision) => {
                        floor = floor.max(revision);
                        first = None;
                    }
                }
            }
            Decision::Drain {
                keys: mut left,
                permits,
            } => {
                let touch = permits > 1 && followed;
                // Wait for the deletions of the keys ahead, one revision at a time: delivered
                // in order with our own key's events (the hub), they say by themselves when the
                // last is gone — at that revision, with our key still ours. Anything else (a
                // wait on a watch of its own, a stream that failed, a compaction) reads again.
                let own = Some((ticket.key.as_str(), ticket.create_revision));
                let mut after = snapshot.revision;
                first = loop {
                    let targets: Vec<Watched> = left
                        .iter()
                        .map(|(k, _)| Watched::deleted(k.clone()))
                        .collect();
                    let woken = wait_for_change(
                        session.waits(),
                        &targets,
                        own,
                        after,
                        // Writes landed between the read and the watch: is every key still
                        // ahead?
                        || still_there(session, &ticket, &left),
                        &mut backoff,
                    )
                    .await?;
                    match woken {
                        Woken::Changed(change) if change.ordered => {
                            left.retain(|(k, _)| !change.keys.contains(k));
                            after = change.revision;
                            if left.len() < permits {
                                tracing::trace!(target: "etcd_coord::handoff", key = %ticket.key, drained = true, touch, "through");
                                return through(session, ticket, change.revision, touch);
                            }
                        }
                        Woken::Changed(change) => {
                            woke_at = change.revision;
                            break None;
                        }
                        Woken::Recheck | Woken::Decided(_) => break None,
                        Woken::Compacted(revision) => {
                            floor = floor.max(revision);
                            break None;
                        }
                    }
                };
            }
            Decision::Wait(targets) => {
                let own = Some((ticket.key.as_str(), ticket.create_revision));
                let mut fresh = None;
                let decide = &mut decide;
                let watched: Vec<Watched> = targets.iter().map(|t| t.not_before(floor)).collect();
                let woken = wait_for_change(
                    session.waits(),
                    &watched,
                    own,
                    snapshot.revision,
                    || async {
                        // Writes landed between the read and the watch: still waiting for the
                        // same changes?
                        let mut backoff = Backoff::for_requests();
                        let now =
                            read_fenced(session, &ticket, &reads.narrow, &mut backoff).await?;
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
                    Woken::Changed(change) => {
                        woke_at = change.revision;
                        first = fresh;
                    }
                    Woken::Recheck => first = fresh,
                    Woken::Compacted(revision) => {
                        floor = floor.max(revision);
                        first = fresh;
                    }
                    Woken::Decided(revision) => {
                        // Our key existed when the deciding change happened if it exists now:
                        // keys are never re-created with the same create revision.
                        let now =
                            read_fenced(session, &ticket, &reads.narrow, &mut backoff).await?;
                        tracing::trace!(key = %ticket.key, revision, "through on a deciding change");
                        return ticket.into_acquired(now.revision);
                    }
                }
            }
        }
    }
}

/// Through at `revision`. With `touch`, a waiter behind us may be watching our key for the
/// moment we stop waiting: the session's task touches it (in the background), so that it
/// re-reads.
fn through(
    session: &Arc<Session>,
    ticket: Ticket,
    revision: i64,
    touch: bool,
) -> Result<Acquired, Error> {
    if touch {
        session.clean_up(Cleanup::Touch {
            key: ticket.key.clone(),
            create_revision: ticket.create_revision,
        });
    }
    ticket.into_acquired(revision)
}

/// Whether each of `keys` still exists as the incarnation created at its revision, read while
/// our key is still ours ([`Error::LockLost`] if not): one point read per key in one Txn, not
/// the queue's sorted range (which etcd answers by reading the whole queue).
async fn still_there(
    session: &Arc<Session>,
    ticket: &Ticket,
    keys: &[(Vec<u8>, i64)],
) -> Result<bool, Error> {
    let mut backoff = Backoff::for_requests();
    let reads: Vec<TxnOp> = keys
        .iter()
        .map(|(k, _)| TxnOp::get(k.clone(), Some(GetOptions::new().with_keys_only())))
        .collect();
    let now = read_fenced(session, ticket, &reads, &mut backoff).await?;
    Ok(now.gets.len() == keys.len()
        && keys.iter().zip(&now.gets).all(|((_, revision), got)| {
            got.kvs()
                .first()
                .is_some_and(|kv| kv.create_revision() == *revision)
        }))
}

/// How an announcement went.
enum Announced {
    /// The pointer is in place, at this revision, with the key ahead and ours still there.
    At(i64),
    /// Not known (an attempt went unanswered): the pointer may be in place.
    Uncertain,
    /// The key ahead is gone, or ours is no longer ours: no pointer was put.
    Refused,
}

/// Puts our pointer to the key `ahead` (the incarnation `ahead_revision`) beside the queue, on
/// our lease, so that its holder's release tells us (`keys::release_announcing`); deletes our
/// earlier pointers in the same Txn, whichever branch runs. The put happens only while `ahead`
/// is still that incarnation and our key still ours (a pointer never outlives its key's
/// release, and never points to a key that is gone). Every pointer that may exist stays in the
/// ticket (which deletes them all if dropped) until the Txn is answered.
#[tracing::instrument(name = "etcd_coord.announce", level = "debug", skip_all, fields(key = %ticket.key))]
async fn announce(
    session: &Arc<Session>,
    ticket: &mut Ticket,
    ahead: &[u8],
    ahead_revision: i64,
    pointer: Vec<u8>,
) -> Result<Announced, Error> {
    let lease = session.lease_id;
    // Every pointer of ours that may exist goes in the same Txn, whichever branch runs.
    let earlier: Vec<TxnOp> = ticket
        .pointers
        .iter()
        .map(|p| TxnOp::delete(p.clone(), None))
        .collect();
    let mut then = vec![TxnOp::put(
        pointer.clone(),
        "",
        Some(PutOptions::new().with_lease(lease)),
    )];
    then.extend(earlier.iter().cloned());
    let mut when = vec![Compare::create_revision(
        ahead.to_vec(),
        CompareOp::Equal,
        ahead_revision,
    )];
    when.extend(keys::owner_compares(
        &ticket.key,
        ticket.create_revision,
        lease,
    ));
    let txn = Txn::new().when(when).and_then(then).or_else(earlier);
    // Before the put is sent: a resumed session's look at its lease spares it.
    let intent = session.intend(&String::from_utf8_lossy(&pointer));
    // From here the new pointer may exist, and the earlier ones may not be gone until the Txn
    // is answered: the ticket deletes them all if it is dropped.
    ticket.pointer = Some(pointer.clone());
    ticket.pointers.push(pointer.clone());
    let answered = until_answered(session, || txn.clone(), &mut Backoff::for_requests()).await?;
    if answered.resp.succeeded() {
        ticket.pointers = vec![pointer]; // the earlier ones went
        let revision = keys::header_revision(&answered.resp)?;
        intent.confirm(revision);
        Ok(Announced::At(revision))
    } else if answered.uncertain {
        Ok(Announced::Uncertain) // any of them may exist
    } else {
        // No pointer was put, and the earlier ones went.
        ticket.pointer = None;
        ticket.pointers.clear();
        Ok(Announced::Refused)
    }
}

/// Confirms that our key is still ours at a revision at or after `at`, and returns that
/// revision. One read of our own key: answered by the member itself (serializable) when its
/// state already includes `at` — a state at a later revision is as good, since a key can only
/// stop being ours, never start again — else linearizable.
async fn confirm_own(
    session: &Arc<Session>,
    ticket: &Ticket,
    at: i64,
    backoff: &mut Backoff,
) -> Result<i64, Error> {
    let lost = || Error::LockLost {
        key: ticket.key.clone(),
        create_revision: ticket.create_revision,
    };
    for serializable in [true, false] {
        let mut options = GetOptions::new().with_keys_only();
        if serializable {
            options = options.with_serializable();
        }
        let resp = session
            .rpc
            .until_answered(
                || session.rpc.get(ticket.key.as_str(), options.clone()),
                backoff,
                &**session,
            )
            .await?
            .resp;
        let revision = resp.header().map_or(0, |h| h.revision());
        if serializable && revision < at {
            continue; // this member has not applied the release yet: ask the cluster
        }
        let ours = resp.kvs().first().is_some_and(|kv| {
            kv.create_revision() == ticket.create_revision && kv.lease() == session.lease_id
        });
        return if ours { Ok(revision) } else { Err(lost()) };
    }
    Err(lost())
}

/// The reads of a wait: as usual, and without a limit (after [`Decision::Widen`]); and, for
/// a place in a line of this crate's queue primitives, the blocker that can decide from the
/// session's mirror of the queue instead (see [`super::mirror`]) — whenever the session has
/// one, and, with `build`, building it if it has not.
pub(crate) struct Reads {
    pub(super) narrow: Vec<TxnOp>,
    pub(super) wide: Vec<TxnOp>,
    pub(super) line: Option<Blocker>,
    pub(super) build: bool,
}

impl Reads {
    /// These reads, but a decision from the session's mirror of the queue first, built if
    /// need be (a long line of `blocker`'s members: see [`super::mirror`]).
    pub(crate) fn mirrored(self, blocker: &Blocker) -> Reads {
        Reads {
            line: Some(blocker.clone()),
            build: true,
            ..self
        }
    }

    /// The same reads either way (a condition primitive never widens).
    pub(crate) fn fixed(reads: Vec<TxnOp>) -> Reads {
        Reads {
            wide: reads.clone(),
            narrow: reads,
            line: None,
            build: false,
        }
    }
}

/// Completes with `Ok` once `key` is no longer the incarnation `create_revision` (known to
/// exist at revision `seen_at`): deleted, expired with its lease, or never there. `Err` if the
/// session is Lost first, or on a failure retrying cannot fix. Survives stream failures and
/// compaction by re-reading, with one backoff for the whole wait.
pub(crate) async fn wait_gone(
    session: &Arc<Session>,
    key: &str,
    create_revision: i64,
    mut seen_at: i64,
) -> Result<(), Error> {
    let check = Txn::new().when([keys::owner_compare(key, create_revision)]);
    let mut backoff = Backoff::for_requests();
    loop {
        let still_there = || async {
            let answer =
                until_answered(session, || check.clone(), &mut Backoff::for_requests()).await?;
            Ok(answer.resp.succeeded())
        };
        let targets = [Watched::deleted(key)];
        match wait_for_change(
            session.waits(),
            &targets,
            None,
            seen_at,
            still_there,
            &mut backoff,
        )
        .await?
        {
            // A delete event of the key (or a re-read that found it gone): that incarnation
            // has ended — keys are never re-created with the same create revision.
            Woken::Changed(_) => return Ok(()),
            // Uncertain: the next round confirms once its watch is in place. (`Decided` and
            // `Compacted` come only from targets watched `since` a past revision.)
            Woken::Recheck | Woken::Decided(_) | Woken::Compacted(_) => seen_at = 0,
        }
    }
}

/// Completes with `Ok` once `key` is no longer ours — not the incarnation `create_revision` on
/// `lease_id`: deleted, expired with its lease, put by someone else under another lease or
/// none, or never there (known ours at revision `seen_at`). `Err` if the session is Lost
/// first, or on a failure retrying cannot fix.
///
/// Every put and delete of the key wakes it; a read then says whether the key is still ours
/// (our own fenced writes re-put it). Survives stream failures and compaction by re-reading,
/// with one backoff for the whole wait.
pub(super) async fn wait_not_ours(
    session: &Arc<Session>,
    key: &str,
    create_revision: i64,
    lease_id: i64,
    mut seen_at: i64,
) -> Result<(), Error> {
    let check = Txn::new().when(keys::owner_compares(key, create_revision, lease_id));
    // Whether the key is ours now, and the revision of the answer.
    let ours_now = || async {
        let answer =
            until_answered(session, || check.clone(), &mut Backoff::for_requests()).await?;
        Ok::<_, Error>((
            answer.resp.succeeded(),
            keys::header_revision(&answer.resp)?,
        ))
    };
    let mut backoff = Backoff::for_requests();
    loop {
        let targets = [Watched::changed(key)];
        let still = || async { ours_now().await.map(|(ours, _)| ours) };
        match wait_for_change(
            session.waits(),
            &targets,
            None,
            seen_at,
            still,
            &mut backoff,
        )
        .await?
        {
            // A put or a delete of the key (or a re-read that found it not ours): whose is it?
            Woken::Changed(_) => match ours_now().await? {
                (false, _) => return Ok(()),
                (true, revision) => seen_at = revision,
            },
            // Uncertain: the next round confirms once its watch is in place. (`Decided` and
            // `Compacted` come only from targets watched `since` a past revision.)
            Woken::Recheck | Woken::Decided(_) | Woken::Compacted(_) => seen_at = 0,
        }
    }
}
