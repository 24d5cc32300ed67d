//! [`Barrier`] (a gate held up by one holder) and [`DoubleBarrier`] (enter together, leave
//! together).

use std::sync::Arc;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp};

use crate::engine::{self, holding_guard, Decision, Holding, SessionKeys};
use crate::keys::{self, Layout, Named, Queue};
use crate::watch::Watched;
use crate::{Error, Fence, LeasedSession};

/// The barrier key, under `<name>/#barrier/`.
const BARRIER: &str = "up";
/// Double-barrier participants form this member kind; the latch is `READY`.
const PARTICIPANT: &str = "p";
const READY: &str = "ready";

/// A gate: while someone holds it up, [`wait()`](Self::wait) blocks; when it comes down
/// (released, or its holder's lease ended) every waiter continues.
///
/// The barrier is one key under the holder's session lease, put with a `CreateRevision == 0`
/// compare; waiters watch it for deletion (registered from now, so they all continue within a
/// round trip of the release).
///
/// # Example
/// ```no_run
/// # async fn demo() -> Result<(), etcd_coord::Error> {
/// use etcd_coord::{Barrier, LeasedSession, SessionOptions};
///
/// let client = etcd_client::Client::connect(["127.0.0.1:2379"], None).await?;
/// let session = LeasedSession::new(client, SessionOptions::new()).await?;
/// let deploy = Barrier::new(&session, "gates/deploy");
/// let hold = deploy.hold().await?; // others' wait() now blocks
/// // ... migrate ...
/// hold.release().await?; // every waiter continues
/// deploy.wait().await?; // returns at once: the barrier is down
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Barrier {
    session: LeasedSession,
    named: Named,
}

impl Barrier {
    /// A handle on the barrier `name`. Does no I/O; an invalid name is reported by the
    /// operations.
    pub fn new(session: &LeasedSession, name: impl Into<String>) -> Barrier {
        Barrier {
            session: session.clone(),
            named: Named::new(name, Layout::Own("barrier")),
        }
    }

    /// The barrier's name.
    pub fn name(&self) -> &str {
        self.named.name()
    }

    fn key(&self) -> Result<String, Error> {
        Ok(self.named.queue()?.sub(BARRIER))
    }

    /// Puts the barrier up, under the session's lease.
    ///
    /// # Errors
    /// [`Error::AlreadyHeld`] if it is already up (held by anyone, including another
    /// [`BarrierHold`] of this session): nothing changes. [`Error::InvalidArgument`] for an
    /// invalid name; [`Error::SessionLost`] / [`Error::SessionClosed`] if the session is Lost.
    ///
    /// # Cancel safety
    /// Cancel-safe: if the future is dropped after the request was sent, the barrier it put up
    /// (if any) is taken down by the session's background task.
    pub async fn hold(&self) -> Result<BarrierHold, Error> {
        let key = self.key()?;
        let session = self.session.inner();
        // A value unique to this attempt lets a retry recognise its own earlier put.
        let token = format!("{:016x}-{:x}", session.lease_id, session.book().next_seq());
        match engine::create_exclusive(&self.session, &key, token).await? {
            Some(acquired) => Ok(BarrierHold::from_holding(Holding::new(
                self.session.clone(),
                acquired,
            ))),
            None => Err(Error::AlreadyHeld { key }),
        }
    }

    /// Returns at once when the barrier is down, else when it comes down (released, or its
    /// holder's lease expired).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an invalid name; [`Error::SessionLost`] /
    /// [`Error::SessionClosed`] if this session is Lost while waiting.
    ///
    /// # Cancel safety
    /// Cancel-safe: waiting creates nothing.
    pub async fn wait(&self) -> Result<(), Error> {
        let key = self.key()?;
        let session = self.session.inner();
        let now = engine::read(session, vec![TxnOp::get(key.as_str(), None)]).await?;
        match now.gets.first().and_then(|g| g.kvs().first()) {
            None => Ok(()),
            Some(kv) => engine::wait_gone(session, &key, kv.create_revision(), now.revision).await,
        }
    }
}

holding_guard! {
    /// A [`Barrier`] held up. Taken down when dropped (in the background, through the
    /// session's task) or with [`release()`](Self::release); dereferences to its [`Fence`].
    #[must_use = "dropping a BarrierHold takes the barrier down at once"]
    pub struct BarrierHold;
}

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
    pub async fn enter(&self) -> Result<DoubleBarrierGuard, Error> {
        let (queue, count) = self.queue()?;
        let participants = queue.sub(PARTICIPANT);
        let ready = queue.sub(READY);
        let lease = self.session.lease_id();
        let reads = vec![
            TxnOp::get(
                participants.as_str(),
                Some(GetOptions::new().with_prefix().with_count_only()),
            ),
            TxnOp::get(ready.as_str(), Some(GetOptions::new().with_keys_only())),
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
            move |snapshot: &engine::Snapshot| {
                let present = snapshot.gets.first().map_or(0, |g| g.count());
                let latched = snapshot.gets.get(1).is_some_and(|g| !g.kvs().is_empty());
                if latched {
                    Decision::Through { touch: false }
                } else if present >= count {
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
        let acquired = engine::join(
            &self.session,
            queue,
            PARTICIPANT,
            Vec::new(),
            |_, _| reads,
            decider,
        )
        .await?;
        // Leaving removes our key and, if we are the last participant, the latch, in one Txn
        // (the nested compare sees the state before the delete: "only our key is left").
        let leave = Txn::new()
            .when(keys::owner_compares(
                &acquired.key,
                acquired.create_revision,
                lease,
            ))
            .and_then([
                TxnOp::delete(acquired.key.as_str(), None),
                TxnOp::txn(
                    Txn::new()
                        .when([Compare::create_revision(
                            participants.as_str(),
                            CompareOp::Equal,
                            acquired.create_revision,
                        )
                        .with_prefix()])
                        .and_then([TxnOp::delete(ready.as_str(), None)]),
                ),
            ]);
        Ok(DoubleBarrierGuard {
            holding: Holding::with_release(self.session.clone(), acquired, leave),
            participants,
            ready,
        })
    }
}

/// Inside a [`DoubleBarrier`]. [`leave()`](Self::leave) and wait for the others; dropping it
/// leaves in the background without waiting. Dereferences to its [`Fence`].
#[must_use = "dropping a DoubleBarrierGuard leaves the barrier at once"]
#[derive(Debug)]
pub struct DoubleBarrierGuard {
    holding: Holding,
    participants: String,
    ready: String,
}

impl std::ops::Deref for DoubleBarrierGuard {
    type Target = Fence;

    /// The participant key's [`Fence`].
    fn deref(&self) -> &Fence {
        self.holding.fence()
    }
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
    pub async fn leave(mut self) -> Result<(), Error> {
        // The participants of our round are the keys created before our own was deleted. Keys
        // created after belong to the next round — a participant that already left may enter
        // it at once — and waiting for them would wait for a round that waits for us.
        let mut left_at = self.holding.release().await?;
        let session = Arc::clone(self.holding.fence().session().inner());
        if self.holding.release_was_uncertain() {
            // The delete went unanswered and a retry found the key gone: our round ended at
            // the delete itself, which may be well before the retry's revision — and a
            // participant that left meanwhile may already wait in the next round's enter()
            // for us. etcd's history says when the delete was. (If that history was compacted
            // away, the retry's revision is kept: it errs late, never early.)
            let fence = self.holding.fence();
            if let Some(at) =
                crate::watch::deleted_at(session.waits(), fence.key(), fence.fencing_token())
                    .await?
            {
                left_at = at;
            }
        }
        let oldest = || {
            TxnOp::get(
                self.participants.as_str(),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Create, SortOrder::Ascend)
                        .with_limit(1)
                        .with_keys_only(),
                ),
            )
        };
        // Wait for the participants of our round one by one, oldest first, until none is left.
        loop {
            let now = engine::read(&session, vec![oldest()]).await?;
            let Some(kv) = now
                .gets
                .first()
                .and_then(|g| g.kvs().first())
                .filter(|kv| kv.create_revision() <= left_at)
            else {
                break;
            };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            engine::wait_gone(&session, &key, kv.create_revision(), now.revision).await?;
        }
        // Everyone of our round is out. If the last ones left by losing their leases, or while
        // the next round's first participants were already entering, our round's latch is
        // still up: take it down. A latch created after we left is the next round's: leave it.
        let clear = Txn::new()
            .when([Compare::create_revision(
                self.ready.as_str(),
                CompareOp::Less,
                left_at + 1,
            )])
            .and_then([TxnOp::delete(self.ready.as_str(), None)]);
        session.rpc.txn(clear).await?;
        Ok(())
    }
}
