//! [`DoubleBarrier`]: `count` participants enter together and leave together.

use std::sync::Arc;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp};

use crate::backoff::Backoff;
use crate::engine::{self, holding_guard, measure, Cleanup, Decision, Holding, SessionKeys};
use crate::keys::{self, Layout, Named, Queue};
use crate::metrics::AcquisitionKind;
use crate::session::Session;
use crate::watch::Watched;
use crate::{Error, LeasedSession};

const PARTICIPANT: &str = "p";
const READY: &str = "ready";
/// Leave markers: `N/#double/left/<participant's id>@<its fencing token>`, put by `leave()`
/// with its delete.
const LEFT: &str = "left/";

/// A double barrier: `count` participants [`enter()`](Self::enter) together — nobody passes
/// until `count` have entered — and [`leave()`](DoubleBarrierGuard::leave) together — nobody
/// passes until all have left. A participant whose lease ends counts as having left.
///
/// Participants are member keys under their sessions' leases. The first to see `count` of
/// them puts a `ready` latch (so late readers do not miss the moment when some have already
/// moved on); everyone waiting watches for the latch or a new participant. The last one out
/// removes the latch in the same Txn that removes its own key, so the barrier can be used
/// again.
///
/// # Example
/// ```no_run
/// # async fn demo() -> Result<(), etcd_coord::Error> {
/// use etcd_coord::{DoubleBarrier, LeasedSession, SessionOptions};
///
/// let client = etcd_client::Client::connect(["127.0.0.1:2379"], None).await?;
/// let session = LeasedSession::new(client, SessionOptions::new()).await?;
/// let round = DoubleBarrier::new(&session, "jobs/round", 3);
/// let inside = round.enter().await?; // returns when 3 have entered
/// // ... work in parallel with the others ...
/// inside.leave().await?; // returns when all 3 have left
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct DoubleBarrier {
    session: LeasedSession,
    named: Named,
    count: usize,
}

impl DoubleBarrier {
    /// A handle on the double barrier `name` for `count` participants. Does no I/O; an invalid
    /// name or a count of zero is reported by the operations.
    pub fn new(session: &LeasedSession, name: impl Into<String>, count: usize) -> DoubleBarrier {
        DoubleBarrier {
            session: session.clone(),
            named: Named::new(name, Layout::Own("double")),
            count,
        }
    }

    /// The barrier's name.
    pub fn name(&self) -> &str {
        self.named.name()
    }

    /// The number of participants.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The queue and the count as etcd counts, or why the name or count is not acceptable.
    fn queue(&self) -> Result<(&Queue, i64), Error> {
        if self.count == 0 {
            return Err(Error::InvalidArgument(
                "a double barrier needs at least one participant".into(),
            ));
        }
        let count = i64::try_from(self.count).map_err(|_| {
            Error::InvalidArgument(format!(
                "a double barrier for {} participants is more than etcd can count (at most {})",
                self.count,
                i64::MAX
            ))
        })?;
        Ok((self.named.queue()?, count))
    }

    /// Enters, and returns once `count` participants have entered.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an invalid name or a count of zero;
    /// [`Error::SessionLost`] / [`Error::SessionClosed`] if the session is or becomes Lost;
    /// [`Error::LockLost`] if this participant's key is deleted while it waits.
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future at any point leaves no participant key behind.
    #[tracing::instrument(name = "etcd_coord.double_barrier.enter", skip_all, fields(name = %self.name(), count = self.count, lease = %format_args!("{:x}", self.session.lease_id()), fencing_token = tracing::field::Empty))]
    pub async fn enter(&self) -> Result<DoubleBarrierGuard, Error> {
        let (queue, count) = self.queue()?;
        let participants = queue.sub(PARTICIPANT);
        let ready = queue.sub(READY);
        let lease = self.session.lease_id();
        let oldest = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1)
            .with_keys_only();
        let reads = vec![
            TxnOp::get(
                participants.as_str(),
                Some(GetOptions::new().with_prefix().with_count_only()),
            ),
            TxnOp::get(ready.as_str(), Some(GetOptions::new().with_keys_only())),
            TxnOp::get(participants.as_str(), Some(oldest)),
        ];
        // The latch is put only while our own key exists: a copy of the put that lands late
        // (after we left, when the round is over) fails its compare instead of letting the next
        // round through early. It is retried like any request of the wait.
        let decider = |own_key: &str, own_revision: i64| {
            let mut compares = keys::owner_compares(own_key, own_revision, lease);
            compares.push(Compare::create_revision(
                ready.as_str(),
                CompareOp::Equal,
                0,
            ));
            let latch = Txn::new()
                .when(compares)
                .and_then([TxnOp::put(
                    ready.as_str(),
                    "",
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(ready.as_str(), None)]);
            let (ready, participants) = (ready.clone(), participants.clone());
            let (session, own_key) = (Arc::clone(self.session.inner()), own_key.to_owned());
            let mut looked_after = false;
            move |snapshot: &engine::Snapshot| {
                let present = snapshot.gets.first().map_or(0, |g| g.count());
                let up = snapshot.gets.get(1).and_then(|g| g.kvs().first());
                let oldest = snapshot.gets.get(2).and_then(|g| g.kvs().first());
                match up {
                    // The latch of a round that is still on (a participant that entered
                    // before it is still inside): through, as any participant that enters
                    // while its round's latch is up.
                    Some(l)
                        if oldest.is_some_and(|o| o.create_revision() < l.create_revision()) =>
                    {
                        return Decision::Through { touch: false }
                    }
                    // A latch that outlived its round: every participant that entered before
                    // it has gone (some by losing their leases, or by a dropped enter or
                    // guard, so that nobody's leave took it down). It lets nobody through:
                    // take it down (that very latch), then decide again.
                    Some(l) => {
                        let stale = Txn::new()
                            .when([Compare::create_revision(
                                ready.as_str(),
                                CompareOp::Equal,
                                l.create_revision(),
                            )])
                            .and_then([TxnOp::delete(ready.as_str(), None)]);
                        return Decision::Act {
                            txn: stale,
                            creates: None,
                        };
                    }
                    None => {}
                }
                if present >= count {
                    if !std::mem::replace(&mut looked_after, true) {
                        // Before the latch can be put: the session looks after it from now on,
                        // whatever becomes of this enter and its guard.
                        let job = look_after_latch(
                            Arc::clone(&session),
                            own_key.clone(),
                            own_revision,
                            ready.clone(),
                            participants.clone(),
                        );
                        session.submit(move |pending| {
                            drop(pending); // it lasts as long as the round: not for `settled()`
                            job
                        });
                    }
                    Decision::Act {
                        txn: latch.clone(),
                        creates: Some(ready.clone()),
                    }
                } else {
                    // A latch put after our key, while it exists, lets us through even if it is
                    // gone again before we re-read: whoever put it may leave at once and take
                    // it down with its lease. So its put is watched in etcd's history from our
                    // key on, and the put itself decides.
                    Decision::Wait(vec![
                        Watched::put(ready.as_str())
                            .since(own_revision + 1)
                            .deciding(),
                        Watched::put_under(participants.as_str()),
                    ])
                }
            }
        };
        // The participant's leave marker, named once its key is known.
        let mut marker = String::new();
        let enter = async {
            let acquired = engine::join(
                &self.session,
                queue,
                PARTICIPANT,
                Vec::new(),
                |_, _| reads,
                decider,
            )
            .await?;
            marker = marker_of(
                &queue.sub(LEFT),
                &participants,
                &acquired.key,
                acquired.create_revision,
            );
            let leave = leave_txn(
                &acquired.key,
                acquired.create_revision,
                lease,
                &participants,
                &ready,
                Marker::Deleted(&marker),
            );
            Ok(Holding::with_release(self.session.clone(), acquired, leave))
        };
        let holding = measure::measured!(AcquisitionKind::DoubleBarrier, self.name(), enter)?;
        Ok(DoubleBarrierGuard::from_holding(
            holding,
            participants,
            ready,
            marker,
        ))
    }
}

/// The leave marker of the participant `key` created at `create_revision`: a name of its own
/// for each incarnation (member keys' numbers are used again).
fn marker_of(markers: &str, participants: &str, key: &str, create_revision: i64) -> String {
    let id = key.strip_prefix(participants).unwrap_or(key);
    format!("{markers}{id}@{create_revision:x}")
}

/// What a leave Txn does with the participant's leave marker.
#[derive(Clone, Copy)]
enum Marker<'a> {
    /// Puts it with the delete (`leave()`).
    Put(&'a str),
    /// Deletes it, whichever branch runs (the holding's own release: a dropped guard, or a
    /// `leave()` dropped or failed while a copy of its Txn may still land — this Txn either
    /// deletes the key first, so that no such copy can put the marker any more, or finds the
    /// key gone and takes away the marker a copy may have put).
    Deleted(&'a str),
}

/// Leaving removes our key (`key`, created at `create_revision` on `lease`) and, if we are
/// the last participant, the latch, in one Txn (the nested compare sees the state before the
/// delete: "only our key is left"), and puts or deletes our leave `marker`. A put marker is on
/// our lease and its create revision is the revision of our delete, which etcd keeps for as
/// long as the marker lives — also when the history of the delete is compacted away. The
/// else-branch reads our key (a key taken over by another client's put is no release).
fn leave_txn(
    key: &str,
    create_revision: i64,
    lease: i64,
    participants: &str,
    ready: &str,
    marker: Marker<'_>,
) -> Txn {
    let mut ops = vec![
        TxnOp::delete(key, None),
        TxnOp::txn(
            Txn::new()
                .when([
                    Compare::create_revision(participants, CompareOp::Equal, create_revision)
                        .with_prefix(),
                ])
                .and_then([TxnOp::delete(ready, None)]),
        ),
    ];
    let mut otherwise = vec![TxnOp::get(key, None)];
    match marker {
        Marker::Put(marker) => ops.push(TxnOp::put(
            marker,
            "",
            Some(PutOptions::new().with_lease(lease)),
        )),
        Marker::Deleted(marker) => {
            ops.push(TxnOp::delete(marker, None));
            otherwise.push(TxnOp::delete(marker, None));
        }
    }
    Txn::new()
        .when(keys::owner_compares(key, create_revision, lease))
        .and_then(ops)
        .or_else(otherwise)
}

holding_guard! {
    /// Inside a [`DoubleBarrier`]. [`leave()`](Self::leave) and wait for the others;
    /// [`release()`](Self::release) leaves without waiting, and so does dropping it (in the
    /// background). Dereferences to its [`Fence`](crate::Fence).
    #[must_use = "dropping a DoubleBarrierGuard leaves the barrier at once"]
    pub struct DoubleBarrierGuard {
        participants: String,
        ready: String,
        marker: String,
    };
}

impl DoubleBarrierGuard {
    /// Leaves, and returns once every participant has left (or its lease ended).
    ///
    /// # Errors
    /// [`Error::LockLost`] if this participant's key was already gone (its lease ended: it
    /// had been counted as having left); [`Error::SessionLost`] / [`Error::SessionClosed`] if
    /// the session is Lost while waiting for the others; request errors.
    ///
    /// # Cancel safety
    /// Dropping the future before our key is removed leaves in the background; after that,
    /// it only stops waiting for the others.
    #[tracing::instrument(name = "etcd_coord.double_barrier.leave", skip_all, fields(key = %self.key(), lease = %format_args!("{:x}", self.session().lease_id()), fencing_token = self.fencing_token()))]
    pub async fn leave(self) -> Result<(), Error> {
        // On the heap: unboxed, the waits for the round make this future 28 KiB in debug builds.
        Box::pin(self.leave_and_wait()).await
    }

    async fn leave_and_wait(mut self) -> Result<(), Error> {
        // The participants of our round are the keys created before our own was deleted. Keys
        // created after belong to the next round — a participant that already left may enter
        // it at once — and waiting for them would wait for a round that waits for us.
        let session = Arc::clone(self.holding.fence().session().inner());
        let fence = self.holding.fence();
        let (key, token) = (fence.key().to_owned(), fence.fencing_token());
        let leave = leave_txn(
            &key,
            token,
            session.lease_id,
            &self.participants,
            &self.ready,
            Marker::Put(&self.marker),
        );
        // From before the marker's put until this leave is over, however it ends: the marker
        // is ours to delete, and spared by a resumed session's look at its lease. (If this
        // leave is dropped or fails before its Txn is answered, the holding's own release
        // runs in the background and deletes the marker too, after any late copy.)
        let marked = MarkerGuard::new(&session, self.marker.clone());
        let intent = session.intend(&marked.key);
        let mut left_at = self.holding.release_by(leave).await?;
        if !self.holding.release_was_uncertain() {
            intent.confirm(left_at);
        } else {
            // The delete went unanswered and a retry found the key gone: our round ended at
            // the delete itself, which may be well before the retry's revision — and a
            // participant that left meanwhile may already wait in the next round's enter()
            // for us. The marker, put with the delete, carries its revision as its create
            // revision. No marker: the key was deleted by someone else (by hand, or with our
            // lease); etcd's history says when, and if that was compacted away the retry's
            // revision is kept (it errs late, never early).
            let read = engine::read(&session, vec![TxnOp::get(marked.key.as_str(), None)]).await?;
            let put_with_our_delete = read
                .gets
                .first()
                .and_then(|g| g.kvs().first())
                .filter(|kv| kv.lease() == session.lease_id && kv.create_revision() > token)
                .map(|kv| kv.create_revision());
            if let Some(at) = put_with_our_delete {
                intent.confirm(at);
                left_at = at;
            } else if let Some(at) = crate::watch::deleted_at(session.waits(), &key, token).await? {
                left_at = at;
            }
        }
        // Wait for the participants of our round one by one, oldest first, until none is left.
        wait_for_round(&session, &self.participants, left_at).await?;
        // Everyone of our round is out. If the last ones left by losing their leases, or while
        // the next round's first participants were already entering, our round's latch is
        // still up: take it down. A latch created after we left is the next round's: leave it.
        // The marker goes in the same Txn.
        let clear = Txn::new()
            .when([Compare::create_revision(
                self.ready.as_str(),
                CompareOp::Less,
                left_at + 1,
            )])
            .and_then([
                TxnOp::delete(self.ready.as_str(), None),
                TxnOp::delete(marked.key.as_str(), None),
            ])
            .or_else([TxnOp::delete(marked.key.as_str(), None)]);
        session.rpc.txn(clear).await?;
        marked.deleted();
        Ok(())
    }
}

/// A leave marker that may exist on the session's lease: deleted by the session's task if it
/// is dropped before [`deleted`](Self::deleted) says the leave's last Txn took it away.
struct MarkerGuard {
    session: Arc<Session>,
    key: String,
    armed: bool,
}

impl MarkerGuard {
    fn new(session: &Arc<Session>, key: String) -> MarkerGuard {
        MarkerGuard {
            session: Arc::clone(session),
            key,
            armed: true,
        }
    }

    fn deleted(mut self) {
        self.armed = false;
    }
}

impl Drop for MarkerGuard {
    fn drop(&mut self) {
        if self.armed {
            self.session.clean_up(Cleanup::DeleteOnLease(
                std::mem::take(&mut self.key).into_bytes(),
            ));
        }
    }
}

/// Waits until no participant under `participants` created at or before `last` is left (each
/// one deleted, or gone with its lease), oldest first.
async fn wait_for_round(
    session: &Arc<Session>,
    participants: &str,
    last: i64,
) -> Result<(), Error> {
    let oldest = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend)
        .with_limit(1)
        .with_keys_only();
    loop {
        let now = engine::read(
            session,
            vec![TxnOp::get(participants, Some(oldest.clone()))],
        )
        .await?;
        let Some(kv) = now
            .gets
            .first()
            .and_then(|g| g.kvs().first())
            .filter(|kv| kv.create_revision() <= last)
        else {
            return Ok(());
        };
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        engine::wait_gone(session, &key, kv.create_revision(), now.revision).await?;
    }
}

/// The session's job for a latch a participant (`own_key`, created at `own_revision`) is
/// about to put: once that participant is out — it left, its enter or its guard was dropped —
/// it waits until every participant of the latch's round (created before the latch) is gone,
/// then takes the latch down if it is still up on this session's lease. So a latch never
/// outlives its round for as long as the session that put it lives (and its lease's end takes
/// it down after that), whatever becomes of the round's participants: a dropped enter or
/// guard leaves nothing behind.
async fn look_after_latch(
    session: Arc<Session>,
    own_key: String,
    own_revision: i64,
    ready: String,
    participants: String,
) -> Result<(), Error> {
    engine::wait_gone(&session, &own_key, own_revision, 0).await?;
    let now = engine::read(&session, vec![TxnOp::get(ready.as_str(), None)]).await?;
    let Some(latched_at) = now
        .gets
        .first()
        .and_then(|g| g.kvs().first())
        .filter(|kv| kv.lease() == session.lease_id)
        .map(|kv| kv.create_revision())
    else {
        return Ok(()); // never put, or not ours
    };
    wait_for_round(&session, &participants, latched_at - 1).await?;
    let clear = Txn::new()
        .when([
            Compare::create_revision(ready.as_str(), CompareOp::Equal, latched_at),
            Compare::lease(ready.as_str(), CompareOp::Equal, session.lease_id),
        ])
        .and_then([TxnOp::delete(ready.as_str(), None)]);
    engine::until_answered(&session, || clear.clone(), &mut Backoff::for_requests()).await?;
    Ok(())
}
