//! [`Election`]: campaign, proclaim, resign and observe — leader election on the mutex's queue.

mod observe;

use std::sync::Arc;

use etcd_client::{KeyValue, PutOptions, TxnOp};
use futures::Stream;

use crate::engine::{holding_guard, measure, Line};
use crate::keys::{Layout, Named};
use crate::metrics::AcquisitionKind;
#[cfg(doc)]
use crate::Fence;
use crate::{Error, LeasedSession};

pub(crate) use observe::observe_with;
use observe::read_leader;

/// Leader election on etcd: candidates queue in FIFO order, the oldest key leads, and the
/// leader's key carries its value (its address, its identity, …).
///
/// The queue and the wait are the [`Mutex`](crate::Mutex)'s: an uncontended
/// [`campaign()`](Self::campaign) is one round trip, a waiting candidate counts the deletions of
/// a short queue ahead or watches only the candidate just ahead of it, and the leader key's
/// create revision is a strictly increasing
/// [fencing token](Fence::fencing_token). Names follow the mutex's rules, and like the mutex's
/// the queue is shared with etcd's own clients: a leader elected by Go's
/// `concurrency.Election` or `etcdctl elect` is this election's leader, and ours is theirs
/// (`docs/interop.md`).
///
/// # Example
/// ```no_run
/// # async fn demo() -> Result<(), etcd_coord::Error> {
/// use etcd_coord::{Election, LeasedSession, SessionOptions};
///
/// let client = etcd_client::Client::connect(["127.0.0.1:2379"], None).await?;
/// let session = LeasedSession::new(client, SessionOptions::new()).await?;
/// let election = Election::new(&session, "services/scheduler");
/// let mut leadership = election.campaign("worker-7").await?;
/// println!("leading with fencing token {}", leadership.fencing_token());
/// leadership.proclaim("worker-7 (busy)").await?;
/// leadership.resign().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Election {
    session: LeasedSession,
    /// Shared by its clones and by the guards it hands out (each keeps its handle, to
    /// `requeue()`).
    named: Arc<Named>,
}

/// The leader of an election as etcd sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderInfo {
    key: String,
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
}

impl LeaderInfo {
    pub(crate) fn from_kv(kv: &KeyValue) -> LeaderInfo {
        LeaderInfo {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
        }
    }

    /// The leader's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The leader's value (what it campaigned with or last proclaimed).
    pub fn value(&self) -> &[u8] {
        &self.value
    }

    /// The value as UTF-8, if it is.
    pub fn value_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.value).ok()
    }

    /// The leader key's create revision: the term's fencing token.
    pub fn fencing_token(&self) -> i64 {
        self.create_revision
    }

    /// The revision of the leader key's last change (its campaign or last proclaim).
    pub fn mod_revision(&self) -> i64 {
        self.mod_revision
    }
}

/// A change of leadership reported by [`Election::observe`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaderEvent {
    /// A new leader, or the same leader proclaiming a new value.
    Leader(LeaderInfo),
    /// Nobody leads (no candidate is queued).
    NoLeader,
}

impl Election {
    /// A handle on the election `name`, campaigned through `session`. Does no I/O; an invalid
    /// name is reported by the operations.
    pub fn new(session: &LeasedSession, name: impl Into<String>) -> Election {
        Election {
            session: session.clone(),
            named: Arc::new(Named::new(name, Layout::Shared)),
        }
    }

    /// The election's name.
    pub fn name(&self) -> &str {
        self.named.name()
    }

    /// Queues as a candidate with `value` and waits until this candidate leads.
    ///
    /// Leadership is returned only after a read that saw this candidate's own key as the
    /// oldest (etcd #11051: Go's `Campaign` can return success after the key was deleted).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an invalid name; [`Error::SessionLost`] /
    /// [`Error::SessionClosed`] if the session is or becomes Lost; [`Error::LockLost`] if the
    /// candidate's key is deleted while it waits.
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future at any point leaves no candidate key behind (the
    /// session's background task deletes it, fenced).
    #[tracing::instrument(name = "etcd_coord.election.campaign", skip_all, fields(name = %self.name(), lease = %format_args!("{:x}", self.session.lease_id()), fencing_token = tracing::field::Empty))]
    pub async fn campaign(&self, value: impl Into<Vec<u8>>) -> Result<Leadership, Error> {
        let value = value.into();
        let acquire = async { self.line()?.acquire(value).await };
        let holding = measure::measured!(AcquisitionKind::Election, self.name(), acquire)?;
        Ok(Leadership::from_holding(holding, self.clone()))
    }

    /// Takes back the leadership (or the candidacy) that an earlier process held under this
    /// session's lease — a session made with [`LeasedSession::resume`](crate::LeasedSession::resume)
    /// — given the [`Leadership`]'s key and fencing token that process saved (Go's
    /// `ResumeElection`, checked): only that very key, created at that revision and still on
    /// this lease, is taken back, with its value as it is. A candidacy still waiting waits on
    /// like [`campaign`](Self::campaign) from its place.
    ///
    /// # Errors
    /// [`Error::LockLost`] if the key is gone (also once deleted as a leftover after the
    /// session's adoption window: see
    /// [`LeasedSession::resume`](crate::LeasedSession::resume)) or is another incarnation;
    /// [`Error::InvalidArgument`] if `key` is not a key of this election made under this
    /// session's lease; as [`campaign`](Self::campaign) otherwise.
    ///
    /// # Cancel safety
    /// As [`campaign`](Self::campaign) once the key is confirmed ours: dropping the future
    /// while it waits withdraws the candidacy (a fenced delete). Dropped before its first read confirmed the key (still the
    /// incarnation of `fencing_token` on this lease), it leaves the key as it was: it is
    /// nobody's, and the resumed session's rule deletes it once the adoption window ends
    /// ([`LeasedSession::resume`](crate::LeasedSession::resume)) unless it is taken back by then.
    #[tracing::instrument(name = "etcd_coord.election.resume", skip_all, fields(name = %self.name(), lease = %format_args!("{:x}", self.session.lease_id()), fencing_token))]
    pub async fn resume(&self, key: &str, fencing_token: i64) -> Result<Leadership, Error> {
        let adopt = async { self.line()?.adopt(key, fencing_token).await };
        let holding = measure::measured!(AcquisitionKind::Election, self.name(), adopt)?;
        Ok(Leadership::from_holding(holding, self.clone()))
    }

    /// A candidate's place: the mutex's queue (one permit, every member directly under the
    /// name), shared with etcd's own clients.
    fn line(&self) -> Result<Line<'_>, Error> {
        Line::exclusive(&self.session, self.named.queue()?)
    }

    /// The current leader, if any: the oldest candidate (one round trip).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an invalid name; request errors.
    #[tracing::instrument(name = "etcd_coord.election.leader", skip_all, fields(name = %self.name()))]
    pub async fn leader(&self) -> Result<Option<LeaderInfo>, Error> {
        let queue = self.named.queue()?;
        let rpc = &self.session.inner().rpc;
        let (leader, at) = read_leader(rpc, queue, 0).await?;
        // An `observe()` called after this starts no earlier than what this answer showed.
        rpc.saw_revision(at);
        Ok(leader)
    }

    /// A stream of leadership changes **from the moment of this call**: first the state then,
    /// then every change in order — a new leader, the same leader proclaiming a new value, or
    /// nobody leading — even if the stream is first polled much later. (It starts from the
    /// newest revision the session has seen in any answer — its requests, [`leader()`](Self::leader)
    /// — which precedes this call: a change made after the call is never missed; one made
    /// shortly before may be reported too.)
    ///
    /// It only ever reports the oldest candidate (etcd #18163), resumes by itself after a
    /// disconnect (from the last revision it reported, so nothing is skipped) or after
    /// compaction (re-reading the current state: changes in the compacted history are then
    /// summed up by the current leader), and never ends silently: it ends only when dropped,
    /// or after an `Err` (a failure that retrying cannot fix, such as an invalid name or a
    /// watch etcd refuses for lack of permission). A put of the leader key that leaves its
    /// value unchanged (a fenced write through the leader's [`Fence`]) is not a change.
    ///
    /// The stream uses the session's client but does not depend on its lease.
    pub fn observe(&self) -> impl Stream<Item = Result<LeaderEvent, Error>> + Send + 'static {
        let rpc = &self.session.inner().rpc;
        observe_with(
            self.session.client().clone(),
            rpc.timeout(),
            self.named.name(),
            rpc.seen_revision(),
        )
    }
}

holding_guard! {
    /// Proof of leading an [`Election`]. Resigns when dropped (in the background, through the
    /// session's task) or deterministically with [`resign()`](Self::resign) (retry-safe, keeps
    /// the leadership on failure) or [`release()`](Self::release) (consumes it).
    ///
    /// Owned and `'static`: it can move into a task. It keeps its session (and so the lease)
    /// alive. It dereferences to its [`Fence`]: [`key()`](Fence::key),
    /// [`fencing_token()`](Fence::fencing_token) (strictly increasing across terms),
    /// [`owner_compares()`](Fence::owner_compares), [`txn_if_owner()`](Fence::txn_if_owner),
    /// [`lost()`](Fence::lost) (the session is Lost, or the leader key deleted, resigned or taken
    /// over by another client's put) and
    /// [`session()`](Fence::session). As with [`MutexGuard`](crate::MutexGuard), leading does not by
    /// itself make writes elsewhere safe: fence them, or pass the fencing token.
    #[must_use = "dropping a Leadership resigns at once"]
    pub struct Leadership {
        election: Election,
    };
}

impl Leadership {
    /// Replaces the leader's value, only while this term lasts (fenced on the leader key's
    /// create revision and lease; the key stays under the session's lease).
    ///
    /// # Errors
    /// [`Error::LockLost`] if this candidate no longer leads (nothing was written), e.g. a
    /// deposed leader; [`Error::SessionLost`] if the session is Lost.
    #[tracing::instrument(name = "etcd_coord.election.proclaim", skip_all, fields(key = %self.key(), lease = %format_args!("{:x}", self.session().lease_id()), fencing_token = self.fencing_token()))]
    pub async fn proclaim(&self, value: impl Into<Vec<u8>>) -> Result<(), Error> {
        let lease = self.session().lease_id();
        self.txn_if_owner(vec![TxnOp::put(
            self.key(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )])
        .await
        .map(|_| ())
    }

    /// Resigns: deletes the leader key with a Txn fenced on its create revision and lease, so
    /// the next candidate leads at once.
    ///
    /// Retry-safe (etcd #22123): if it fails, the leadership keeps its state and `resign()` can
    /// be called again (a retry that finds the key gone after an unanswered attempt succeeds);
    /// dropping it instead resigns in the background. A fenced resign can never delete a later
    /// leader's key. After a successful resign the leadership is inert: dropping it does
    /// nothing, `resign()` succeeds again, fenced operations report [`Error::LockLost`].
    ///
    /// # Errors
    /// [`Error::LockLost`] if the key was already gone before the first attempt (leadership had
    /// been lost); request errors after retries.
    ///
    /// # Cancel safety
    /// Dropping the future leaves the leadership as it was — but for the attempt it may have
    /// sent, which can still land: a later `resign()` (or [`requeue`](Self::requeue)) that
    /// finds the key gone then counts it as this resignation, not as a loss. Dropping the
    /// leadership then resigns in the background.
    #[tracing::instrument(name = "etcd_coord.election.resign", skip_all, fields(key = %self.key(), lease = %format_args!("{:x}", self.session().lease_id()), fencing_token = self.fencing_token()))]
    pub async fn resign(&mut self) -> Result<(), Error> {
        self.holding.release().await?;
        self.holding.fence().held().ended();
        Ok(())
    }

    /// Resigns and campaigns again with `value`, in one write — as
    /// [`MutexGuard::requeue`](crate::MutexGuard::requeue) does for a mutex: the resignation
    /// and the new candidacy go to etcd in one Txn, the candidates already queued lead first,
    /// in their order (the first of them from the Txn's revision on), and the returned
    /// leadership begins once they have resigned, with a larger
    /// [`fencing_token()`](Fence::fencing_token). With no other candidate it leads again at
    /// once. After a [`resign()`](Self::resign) that succeeded or reported
    /// [`Error::LockLost`] (nothing is left to resign) it is a plain
    /// [`campaign()`](Election::campaign); after one that failed without an answer, it first
    /// finishes that resignation (a retry that finds the key gone succeeds), then campaigns.
    ///
    /// # Errors
    /// [`Error::LockLost`] for this leadership's key if it was lost before the call (nothing is
    /// queued); afterwards as [`campaign()`](Election::campaign). Whatever the outcome, this
    /// leadership is resigned.
    ///
    /// # Cancel safety
    /// Cancel-safe, as [`MutexGuard::requeue`](crate::MutexGuard::requeue): dropped at any
    /// point, the leadership is resigned (in the background if need be) and no candidate key
    /// is left behind.
    ///
    /// # Example
    /// ```no_run
    /// # async fn demo(session: etcd_coord::LeasedSession) -> Result<(), etcd_coord::Error> {
    /// use etcd_coord::Election;
    ///
    /// // Candidates take turns leading for one shift each.
    /// let mut term = Election::new(&session, "shifts/on-call").campaign("host-a").await?;
    /// for shift in 0..3 {
    ///     println!("shift {shift} led under token {}", term.fencing_token());
    ///     term = term.requeue("host-a").await?; // the next candidate leads, then us again
    /// }
    /// term.release().await?;
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(name = "etcd_coord.election.requeue", skip_all, fields(name = %self.election.name(), lease = %format_args!("{:x}", self.session().lease_id()), released_token = self.fencing_token(), fencing_token = tracing::field::Empty))]
    pub async fn requeue(self, value: impl Into<Vec<u8>>) -> Result<Leadership, Error> {
        let (value, Leadership { holding, election }) = (value.into(), self);
        let requeue = async { election.line()?.requeue(holding, value).await };
        let holding = measure::measured!(AcquisitionKind::Election, election.name(), requeue)?;
        Ok(Leadership::from_holding(holding, election))
    }
}
