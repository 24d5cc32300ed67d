//! [`Claimed`]: a job held under the claimer's lease, until it is acknowledged, given back,
//! or the claim ends. Every write it makes is a Txn fenced on its claim key — the create
//! revision (the fencing token) and the lease — so nothing a stale claimer sends can apply.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use etcd_client::{GetOptions, Txn, TxnOp, TxnOpResponse};

use super::layout::{encode, micros, now_ms, Header, JobId, Keys};
use super::share::GivesBack;
use crate::engine::holding_guard;
use crate::keys::txn_gets;
use crate::rpc::batch::Batcher;
use crate::rpc::Stop;
use crate::{Error, Fence};

/// The job a [`Claimed`] holds, as its claim read it.
pub(crate) struct Job {
    pub(super) keys: Keys,
    /// The job's key and its create revision (it keeps it across claims).
    pub(super) key: String,
    pub(super) create_revision: i64,
    /// The key's version after our claim bumped it.
    pub(super) version: i64,
    pub(super) id: JobId,
    pub(super) attempt: u32,
    pub(super) header: Header,
    pub(super) payload: Vec<u8>,
    /// Unless acknowledged, the job goes back: the family's claims must see it.
    pub(super) gives_back: GivesBack,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("attempt", &self.attempt)
            .field("key", &self.key)
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

holding_guard! {
    /// A job claimed from a [`WorkQueue`](crate::WorkQueue): held under the claimer's session
    /// lease — no other claimer can have it while the claim lives — until
    /// [`ack()`](Self::ack) removes it, [`nack()`](Self::nack) gives it back, or the claim
    /// ends. The session keeps the lease alive: there is nothing to extend.
    ///
    /// Dropping it gives the job back in the background (the session's task deletes the claim
    /// key, fenced): the job stays queued and is delivered again, with its attempt count
    /// raised; a drop never deletes a job. So does [`release()`](Self::release), awaited. If
    /// the claimer dies, its lease ends its claims the same way within the TTL.
    ///
    /// It dereferences to the claim's [`Fence`]: [`fencing_token()`](Fence::fencing_token)
    /// strictly increases across the claims of one job; [`lost()`](Fence::lost) completes
    /// when the claim may be gone (the session Lost, the claim key deleted);
    /// [`txn_if_owner()`](Fence::txn_if_owner) writes results only while the claim is ours.
    ///
    /// # Example
    /// ```no_run
    /// # async fn demo(queue: etcd_coord::WorkQueue) -> Result<(), etcd_coord::Error> {
    /// let job = queue.claim().await?;
    /// println!("job {} (delivery {}): {} bytes", job.id(), job.attempt(), job.payload().len());
    /// job.ack().await?; // fenced: an error if the claim was no longer ours
    /// # Ok(()) }
    /// ```
    #[must_use = "dropping a Claimed gives the job back to the queue at once"]
    pub struct Claimed { job: Job };
}

impl Claimed {
    /// The job's payload.
    pub fn payload(&self) -> &[u8] {
        &self.job.payload
    }

    /// The job's id (the same on every delivery).
    pub fn id(&self) -> &JobId {
        &self.job.id
    }

    /// Which delivery this is: 1 the first time; raised on every redelivery — after a nack, a
    /// dropped claim, or a claimer whose lease ended.
    pub fn attempt(&self) -> u32 {
        self.job.attempt
    }

    /// The job's priority.
    pub fn priority(&self) -> u8 {
        self.job.header.priority
    }

    /// The error reported by the previous delivery's [`nack_with_error`](Self::nack_with_error),
    /// if it reported one.
    pub fn last_error(&self) -> Option<&str> {
        let h = &self.job.header;
        h.last_error
            .as_deref()
            .filter(|_| h.last_error_attempt + 1 == self.job.attempt)
    }

    /// Acknowledges the job: deletes it and the claim in one Txn, only while the claim is
    /// ours (its create revision and lease). Transient failures are retried while the session
    /// lives.
    ///
    /// # Errors
    /// [`Error::LockLost`] (the claim key) if the claim was no longer ours — its lease ended,
    /// or it was given back: the job was not acknowledged by this call and is (or was)
    /// delivered again; [`Error::SessionLost`] / [`Error::SessionClosed`] if the session is
    /// Lost before an attempt landed; [`Error::CommitUncertain`] if an attempt went unanswered
    /// and whether it landed can no longer be told (the session was Lost first, or etcd's
    /// history of the two keys was compacted).
    ///
    /// # Cancel safety
    /// Dropping the future stops waiting for the request (one in flight merged with siblings'
    /// requests in one Txn is not cancelled and may still land; one not sent yet is not sent):
    /// if it lands first, the job is acknowledged; if the give-back of the dropped guard lands
    /// first, the job goes back.
    #[tracing::instrument(name = "etcd_coord.queue.ack", skip_all, fields(job = %self.id(), attempt = self.attempt()))]
    pub async fn ack(mut self) -> Result<(), Error> {
        let job = &self.job;
        let fence = self.holding.fence().clone();
        let ops = [
            TxnOp::delete(fence.key(), None),
            TxnOp::delete(job.key.as_str(), None),
        ];
        // On the heap: the look into etcd's history makes it 26 KiB in debug builds.
        let revision = Box::pin(remove(&fence, ops, &job.key, job.create_revision)).await?;
        self.holding.released_by_owner(revision);
        self.job.gives_back.acked();
        Ok(())
    }

    /// Gives the job back: it can be claimed again `delay` from now (at once, and in its old
    /// place, for a zero delay); the next delivery's [`attempt()`](Self::attempt) is one
    /// higher. Fenced and retried as [`ack()`](Self::ack).
    ///
    /// # Errors
    /// As [`ack()`](Self::ack). If an attempt went unanswered and the claim has ended since,
    /// the job is back in the queue either way and this returns `Ok` — with or without the
    /// delay.
    ///
    /// # Cancel safety
    /// As [`ack()`](Self::ack): the job goes back either way.
    ///
    /// # Example
    /// ```no_run
    /// # async fn demo(job: etcd_coord::Claimed) -> Result<(), etcd_coord::Error> {
    /// use std::time::Duration;
    /// // Not now: try again in a minute (another worker may take it then).
    /// job.nack(Duration::from_secs(60)).await?;
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(name = "etcd_coord.queue.nack", skip_all, fields(job = %self.id(), attempt = self.attempt()))]
    pub async fn nack(self, delay: Duration) -> Result<(), Error> {
        self.give_back(None, delay).await
    }

    /// As [`nack()`](Self::nack), recording `error` with the job: the next delivery's
    /// [`last_error()`](Self::last_error), and a dead letter's error if this was the last
    /// delivery.
    ///
    /// # Errors
    /// As [`nack()`](Self::nack).
    ///
    /// # Cancel safety
    /// As [`nack()`](Self::nack).
    #[tracing::instrument(name = "etcd_coord.queue.nack_with_error", skip_all, fields(job = %self.id(), attempt = self.attempt()))]
    pub async fn nack_with_error(
        self,
        error: impl Into<String>,
        delay: Duration,
    ) -> Result<(), Error> {
        self.give_back(Some(error.into()), delay).await
    }

    async fn give_back(mut self, error: Option<String>, delay: Duration) -> Result<(), Error> {
        let job = &self.job;
        let fence = self.holding.fence().clone();
        let mut ops = vec![TxnOp::delete(fence.key(), None)];
        if error.is_some() || !delay.is_zero() {
            let mut header = job.header.clone();
            header.attempts_base = job.attempt;
            if let Some(e) = error {
                header.last_error = Some(e);
                header.last_error_attempt = job.attempt;
            }
            if delay.is_zero() {
                header.version_base = job.version + 1; // rewritten in place
                ops.push(TxnOp::put(
                    job.key.as_str(),
                    encode(&header, &job.payload),
                    None,
                ));
            } else {
                header.version_base = 1; // a new key
                let ready = SystemTime::now()
                    .checked_add(delay)
                    .map_or(u64::MAX, micros);
                let moved = job
                    .keys
                    .job(header.priority, ready.min(10u64.pow(17) - 1), &job.id);
                ops.push(TxnOp::delete(job.key.as_str(), None));
                ops.push(TxnOp::put(moved, encode(&header, &job.payload), None));
            }
        }
        match Box::pin(send(&fence, ops, &job.key)).await {
            Ok(sent) if sent.applied => {
                self.holding.released_by_owner(sent.revision);
                Ok(())
            }
            // The claim ended after an attempt of ours went unanswered: the job is back,
            // whether or not that attempt applied.
            Ok(sent) if sent.uncertain && !sent.claim_exists => Ok(()),
            Ok(_) => Err(lost(&fence)),
            Err(Error::CommitUncertain(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Moves the job to the dead letters: its delivery would exceed the queue's
    /// `max_attempts`. Fenced on this claim, which it ends; if the claim is lost instead, the
    /// next claimer does it.
    pub(super) async fn dead_letter(mut self) -> Result<(), Error> {
        let job = &self.job;
        let fence = self.holding.fence().clone();
        let last = job.attempt - 1;
        let mut header = job.header.clone();
        header.last_error = Some(header.error_of(last));
        header.last_error_attempt = last;
        header.attempts_base = last;
        header.dead_ms = Some(now_ms());
        let ops = [
            TxnOp::delete(fence.key(), None),
            TxnOp::delete(job.key.as_str(), None),
            TxnOp::put(
                job.keys.dead_letter(&job.id.0),
                encode(&header, &job.payload),
                None,
            ),
        ];
        tracing::info!(job = %job.id, attempts = last, "moving a job to the dead letters");
        match Box::pin(send(&fence, ops, &job.key)).await {
            Ok(sent) if sent.applied => {
                self.holding.released_by_owner(sent.revision);
                Ok(())
            }
            // Lost (or unknown): the next claimer moves it.
            Ok(_) | Err(Error::CommitUncertain(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// What a fenced Txn of a claim came to.
struct Sent {
    revision: i64,
    applied: bool,
    /// An earlier attempt went unanswered: it may have applied.
    uncertain: bool,
    /// Not applied: whether the claim key and the job key still exist.
    claim_exists: bool,
    job_exists: bool,
}

/// Runs `ops` — which delete the claim key — while the claim is ours, retrying transient
/// failures while the session lives; merged with the other Txns the session's family sends
/// meanwhile (`rpc::batch`). An error that leaves an attempt unanswered is
/// [`Error::CommitUncertain`].
async fn send(fence: &Fence, ops: impl Into<Vec<TxnOp>>, job: &str) -> Result<Sent, Error> {
    let session = fence.session().inner();
    let keys_only = || Some(GetOptions::new().with_keys_only());
    let txn = Txn::new()
        .when(fence.owner_compares())
        .and_then(ops)
        .or_else([
            TxnOp::get(fence.key(), keys_only()),
            TxnOp::get(job, keys_only()),
        ]);
    // Merged with the acks (and claims) of the session's siblings sent meanwhile.
    let batcher = session.family_extension(Batcher::default);
    let stop: Arc<dyn Stop> = Arc::clone(session) as Arc<dyn Stop>;
    let ops = vec![TxnOp::txn(txn)];
    let answered = batcher
        .txn(&session.rpc, ops.clone(), ops, stop)
        .await
        .map_err(|u| match u.uncertain {
            true => Error::CommitUncertain(Box::new(u.error)),
            false => u.error,
        })?;
    let revision = answered.resp.revision;
    let resp = match answered.resp.ops.into_iter().next() {
        Some(TxnOpResponse::Txn(resp)) => resp,
        _ => {
            return Err(Error::Protocol(format!(
                "a fenced Txn on {job} answered for no Txn"
            )))
        }
    };
    let gets = txn_gets(&resp);
    let exists = |i: usize| gets.get(i).is_some_and(|g| !g.kvs().is_empty());
    Ok(Sent {
        revision,
        applied: resp.succeeded(),
        uncertain: answered.uncertain,
        claim_exists: exists(0),
        job_exists: exists(1),
    })
}

/// The claim's loss.
fn lost(fence: &Fence) -> Error {
    Error::LockLost {
        key: fence.key().to_owned(),
        create_revision: fence.fencing_token(),
    }
}

/// Runs `ops` — which delete the claim key and the job (`job`, created at `job_created`) —
/// while the claim is ours; the revision they applied at.
///
/// After an unanswered attempt, a retry that finds both gone asks etcd's history whether that
/// attempt deleted them: it did if the claim and the job were deleted at one revision —
/// nothing else deletes both at once (another claimer's ack deletes its own claim, created
/// after ours was gone).
async fn remove(
    fence: &Fence,
    ops: impl Into<Vec<TxnOp>>,
    job: &str,
    job_created: i64,
) -> Result<i64, Error> {
    let sent = send(fence, ops, job).await?;
    if sent.applied {
        return Ok(sent.revision);
    }
    if !sent.uncertain || sent.claim_exists || sent.job_exists {
        return Err(lost(fence)); // not deleted by us: the claim or the job is still there
    }
    // Whatever keeps us from asking (the session Lost meanwhile, a refusal) leaves the
    // unanswered attempt's outcome unknown.
    let waits = fence.session().inner().waits();
    let unknown = |e: Error| Error::CommitUncertain(Box::new(e));
    let claim_gone = crate::watch::deleted_at(waits, fence.key(), fence.fencing_token())
        .await
        .map_err(unknown)?;
    let job_gone = crate::watch::deleted_at(waits, job, job_created)
        .await
        .map_err(unknown)?;
    match (claim_gone, job_gone) {
        (Some(c), Some(j)) if c == j => Ok(c),
        (Some(_), Some(_)) => Err(lost(fence)),
        _ => Err(Error::CommitUncertain(Box::new(lost(fence)))),
    }
}
