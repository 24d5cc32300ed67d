//! Putting member keys and exclusive names. Each put is detached
//! ([`detached`](super::detached::detached)), so a caller that drops its future mid-request can
//! never strand a key: the session's task then finishes the request and hands whatever landed
//! to the session's clean-up. Failures that may succeed again are retried with the same key,
//! so a lost response never creates a second waiter; an acquisition whose put was sent more
//! than once has its late copies swept after it ends.

use std::sync::Arc;

use etcd_client::{GetResponse, Txn, TxnOp};

use crate::keys::{self, Queue};
use crate::rpc::batch::{Conditional, How};
use crate::rpc::Unanswered;
use crate::session::Session;
use crate::{Error, LeasedSession};

use super::cleanup::{Afterwards, Cleanup, Sweep};
use super::decision::{Blocker, Snapshot};
use super::detached::detached;
use super::holding::Holding;
use super::lines::Lines;
use super::names::Claimed;
use super::ticket::{Acquired, Put, Ticket};
use super::SessionKeys;

/// What a detached put of a member key produced.
struct Enqueued {
    create_revision: i64,
    /// The reads that ran with the put, if this Txn created the key.
    snapshot: Option<Snapshot>,
    /// The put was sent more than once: a copy may still land.
    sent_more_than_once: bool,
}

/// Puts `key` (under the session's lease) unless it exists, running `reads` just before the
/// put, detached (see [`detached`]). Returns the armed ticket and, when this Txn
/// created the key, the snapshot of the reads (a retry that found the key already there must
/// read afresh).
pub(super) async fn enqueue(
    session: &Arc<Session>,
    key: &str,
    slot: u64,
    value: Vec<u8>,
    reads: Vec<TxnOp>,
) -> Result<(Ticket, Option<Snapshot>), Error> {
    enqueue_releasing(session, key, slot, value, reads, None, None).await
}

/// [`enqueue`], and with `releasing` (a holding of this session in the same queue, released by
/// the default Txn: [`Holding::requeueable`]) its release in the same Txn
/// ([`keys::requeue_parts`]): both happen or neither. The holding goes with the detached
/// request: it is marked released once etcd confirmed the Txn — or once a retry found `key`
/// created on our lease, which the same Txn did — and otherwise released by the session's task
/// as it is dropped, as any guard dropped unreleased. With `linger_behind` (the blocker of an
/// acquisition that waits), a plain enqueue lingers while siblings have as many members in
/// the queue that the blocker counts as it has permits ([`Lines::siblings_fill`]).
///
/// # Errors
/// As [`enqueue`]; and [`Error::LockLost`] (nothing was put) if the held key was no longer
/// ours: gone or taken over before the Txn.
#[tracing::instrument(name = "etcd_coord.enqueue", level = "debug", skip_all, fields(key = %key))]
pub(super) async fn enqueue_releasing(
    session: &Arc<Session>,
    key: &str,
    slot: u64,
    value: Vec<u8>,
    reads: Vec<TxnOp>,
    releasing: Option<Holding>,
    linger_behind: Option<&Blocker>,
) -> Result<(Ticket, Option<Snapshot>), Error> {
    // A holding released already (a resigned leadership) has nothing to merge.
    let releasing = releasing.filter(|holding| !holding.is_released());
    let merged = match &releasing {
        Some(holding) => match holding.requeueable() {
            Some(((held, create_revision), announces)) => {
                Some(((held.to_owned(), create_revision), announces))
            }
            None => {
                return Err(Error::Internal(
                    "a holding with a release of its own cannot be requeued".into(),
                ))
            }
        },
        None => None,
    };
    // Before anything is sent: a resumed session's look at its lease spares the key.
    let claim = session.intend(key);
    // A plain enqueue that siblings' members block: one of their releases is coming.
    let lingers = merged.is_none()
        && !session.linger.is_zero()
        && linger_behind.is_some_and(|blocker| Lines::siblings_fill(session, key, blocker));
    let work = {
        let session = Arc::clone(session);
        let key = key.to_owned();
        async move {
            let mut releasing = releasing;
            let lease = session.lease_id;
            let parts = match &merged {
                Some(((held, create_revision), announces)) => keys::requeue_parts(
                    (held, *create_revision),
                    *announces,
                    lease,
                    &key,
                    value,
                    reads,
                ),
                None => keys::enqueue_parts(&key, value, lease, reads),
            };
            // Whatever it reads, its outcome depends on the whole queue.
            let txn = Conditional::from(parts).depending_on(vec![keys::whole_queue(&key)]);
            let held = merged.as_ref().map(|((held, _), _)| held.as_str());
            if let Some(held) = held {
                tracing::trace!(target: "etcd_coord::handoff", key = %held, "release sent");
            }
            // Merged with what the session's siblings send (`rpc::batch`), in an order that
            // comes to one after the other; a plain enqueue lingers for a sibling's write.
            let how = How {
                ordered: true,
                linger: lingers.then_some(session.linger),
                once: false,
            };
            let put = Put::send_merged(&session, txn, how).await?;
            if let Some(held) = held {
                tracing::trace!(target: "etcd_coord::handoff", key = %held, "release answered");
            }
            let (revision, gets) = (put.revision, put.gets());
            if put.succeeded {
                if let Some(holding) = releasing.as_mut() {
                    holding.released_by_owner(revision);
                }
                claim.confirm(revision);
                return Ok(Enqueued {
                    create_revision: revision,
                    snapshot: Some(Snapshot::read(revision, gets)),
                    sent_more_than_once: put.uncertain,
                });
            }
            // The else-branch: `[Get(key)]`, or `[Get(held), Get(key)]` with a release.
            let existing = gets
                .get(usize::from(merged.is_some()))
                .and_then(|g| g.kvs().first());
            if let (Some(holding), None) = (&releasing, existing) {
                // `key` is not there, so the held key's compares failed: it was gone or taken
                // over before this Txn (after an unanswered attempt that did both, `key`
                // would be there unless deleted since: lost either way). Nothing was put.
                return Err(put.fail(holding.fence().lock_lost()));
            }
            if !put.uncertain {
                // Sent once, and the key was there: a name still in use, not ours to take.
                return Err(put.fail(Error::Protocol(format!("member key {key} exists already"))));
            }
            // A retry: the earlier, unanswered request created the key.
            let kv = existing.ok_or_else(|| {
                put.fail(Error::Protocol(
                    "enqueue txn else-branch without the key".into(),
                ))
            })?;
            if kv.lease() != session.lease_id {
                return Err(put.fail(Error::Protocol(format!(
                    "member key {key} belongs to lease {:x}, not ours",
                    kv.lease()
                ))));
            }
            // That request released the held key too, at the revision it created `key`.
            if let Some(holding) = releasing.as_mut() {
                holding.released_by_owner(kv.create_revision());
            }
            claim.confirm(kv.create_revision());
            Ok(Enqueued {
                create_revision: kv.create_revision(),
                snapshot: None,
                sent_more_than_once: true,
            })
        }
    };
    let (lease_id, sweep) = (session.lease_id, Sweep::on_lease(key, session.lease_id));
    let for_cleanup = (key.to_owned(), sweep.clone());
    let enqueued: Enqueued = detached(
        session,
        work,
        move |outcome: &Result<Enqueued, Unanswered>| {
            let (key, sweep) = for_cleanup;
            match outcome {
                Ok(enqueued) => Some(Cleanup::release(
                    key,
                    enqueued.create_revision,
                    lease_id,
                    Afterwards::of_put(
                        enqueued.sent_more_than_once,
                        sweep,
                        Afterwards::Reuse(slot),
                    ),
                )),
                Err(u) if u.uncertain => Some(Cleanup::Sweep(sweep)),
                Err(_) => None, // etcd refused the only attempt: nothing landed
            }
        },
    )
    .await?;
    let after = Afterwards::of_put(enqueued.sent_more_than_once, sweep, Afterwards::Reuse(slot));
    Ok((
        Ticket::new(session, key.to_owned(), enqueued.create_revision, after),
        enqueued.snapshot,
    ))
}

/// A member key of kind `kind` in `queue` for this session, and the number in its name: taken
/// from the session's pool, given back through [`Afterwards::Reuse`] once the key is gone.
pub(super) fn numbered_key(session: &Session, queue: &Queue, kind: &str) -> (String, u64) {
    let slot = session.take_slot();
    (queue.member_key(kind, session.lease_id, slot), slot)
}

/// Who holds the name a conditional put was for: this put or an earlier, unanswered attempt
/// of ours (read from the else-branch when the put did not happen), somebody else, or unknown.
pub(crate) enum Outcome {
    /// Ours: the key's create revision, and the revision at which that was confirmed.
    Ours { create_revision: i64, revision: i64 },
    /// Somebody else holds: nothing to hand out.
    Busy,
    /// The else-branch cannot tell (a shared queue whose range held only nested names' keys,
    /// or too many to read at once): find out the slow way.
    Unsure,
}

/// What a detached conditional put produced.
struct Created {
    outcome: Outcome,
    /// The put was sent more than once: a copy may still land.
    sent_more_than_once: bool,
}

/// What a conditional acquisition came to.
pub(super) enum Attempt {
    Acquired(Acquired),
    Busy,
    Unsure,
}

/// Sends `txn()` — a put of `key` conditional on something — detached (see
/// [`detached`]), after `before` (in that task), and turns the answer into an acquisition.
/// When the put did not happen, `on_else` reads the else-branch `Get`s (at `revision`; the
/// last argument says whether the put was sent more than once). `after(uncertain)` says what
/// follows once nothing of the acquisition exists — its key deleted, or its put not made —
/// given whether the put was sent more than once (a copy may still land).
pub(super) async fn create_detached<B, T, E, A>(
    session: &Arc<Session>,
    key: &str,
    before: B,
    txn: T,
    on_else: E,
    after: A,
) -> Result<Attempt, Error>
where
    B: std::future::Future<Output = ()> + Send + 'static,
    T: Fn() -> Txn + Send + 'static,
    E: FnOnce(&Session, &[GetResponse], i64, bool) -> Result<Outcome, Error> + Send + 'static,
    A: Fn(bool) -> Afterwards + Clone + Send + 'static,
{
    // Before anything is sent: a resumed session's look at its lease spares the key.
    let claim = session.intend(key);
    let work = {
        let session = Arc::clone(session);
        async move {
            before.await;
            let put = Put::send(&session, txn).await?;
            if put.succeeded {
                claim.confirm(put.revision);
                return Ok(Created {
                    outcome: Outcome::Ours {
                        create_revision: put.revision,
                        revision: put.revision,
                    },
                    sent_more_than_once: put.uncertain,
                });
            }
            let outcome = on_else(&session, &put.gets(), put.revision, put.uncertain)
                .map_err(|e| put.fail(e))?;
            if let Outcome::Ours {
                create_revision, ..
            } = outcome
            {
                claim.confirm(create_revision);
            }
            Ok(Created {
                outcome,
                sent_more_than_once: put.uncertain,
            })
        }
    };
    let for_cleanup = (key.to_owned(), session.lease_id, after.clone());
    let created: Created = detached(
        session,
        work,
        move |outcome: &Result<Created, Unanswered>| {
            let (key, lease_id, after) = for_cleanup;
            Some(match outcome {
                Ok(Created {
                    outcome:
                        Outcome::Ours {
                            create_revision, ..
                        },
                    sent_more_than_once,
                }) => {
                    Cleanup::release(key, *create_revision, lease_id, after(*sent_more_than_once))
                }
                Ok(created) => Cleanup::Forget(after(created.sent_more_than_once)),
                Err(u) => Cleanup::Forget(after(u.uncertain)),
            })
        },
    )
    .await?;
    let after = after(created.sent_more_than_once);
    match created.outcome {
        Outcome::Ours {
            create_revision,
            revision,
        } => Ticket::new(session, key.to_owned(), create_revision, after)
            .into_acquired(revision)
            .map(Attempt::Acquired),
        other => {
            // Nothing of it exists (a copy of a put sent more than once may still land).
            after.key_deleted(session);
            Ok(match other {
                Outcome::Unsure => Attempt::Unsure,
                _ => Attempt::Busy,
            })
        }
    }
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
    leased: &LeasedSession,
    key: &str,
    value: String,
) -> Result<Option<Acquired>, Error> {
    let session = leased.inner();
    session.check()?;
    let Some(claimed) = Claim::take(session, key) else {
        return Ok(None);
    };
    let (put_key, put_value, lease) =
        (key.to_owned(), value.clone().into_bytes(), session.lease_id);
    let (name, sent) = (key.to_owned(), put_value.clone());
    // A copy of an earlier put of this session with this value may be there: it is ours.
    let earlier_copy = claimed.uncertain().contains(&put_value);
    // Our put lands after every revision seen so far: a key created at or before it is not
    // this call's.
    let started = session.rpc.seen_revision();
    let txn = move || keys::enqueue_txn(&put_key, put_value.clone(), lease, Vec::new());
    let on_else = move |_: &Session, gets: &[GetResponse], revision, uncertain: bool| {
        let existing = gets.first().and_then(|g| g.kvs().first());
        Ok(existing
            .filter(|kv| {
                kv.lease() == lease
                    && kv.value() == value.as_bytes()
                    && ((uncertain && kv.create_revision() > started) || earlier_copy)
            })
            .map_or(Outcome::Busy, |kv| Outcome::Ours {
                create_revision: kv.create_revision(),
                revision,
            }))
    };
    let after = move |uncertain: bool| Afterwards::Unclaim {
        key: name.clone(),
        value: uncertain.then(|| sent.clone()),
    };
    // Before anything is put: the name's sweep stops, and the claim passes to `after`.
    let before = claimed.hand_over();
    Ok(
        match create_detached(session, key, before, txn, on_else, after).await? {
            Attempt::Acquired(acquired) => Some(acquired),
            Attempt::Busy | Attempt::Unsure => None,
        },
    )
}

/// This session's claim on a name for a `create_exclusive`, until it is handed over to what
/// follows the put ([`Afterwards::Unclaim`]); ended as it is dropped before that.
struct Claim {
    session: Arc<Session>,
    key: String,
    claimed: Option<Claimed>,
}

impl Claim {
    /// The claim on `key`, or `None` if this session holds it already.
    fn take(session: &Arc<Session>, key: &str) -> Option<Claim> {
        let claimed = session.book().names.claim(key)?;
        Some(Claim {
            session: Arc::clone(session),
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
            if let Some(sweep) =
                self.session
                    .book()
                    .names
                    .unclaim(&self.key, self.session.lease_id, None)
            {
                self.session.clean_up(Cleanup::Sweep(sweep));
            }
        }
    }
}
