//! [`WorkQueue`]: jobs claimed under a lease, acknowledged under a fence, never lost. Its
//! rooms: [`layout`] (keys and values, no I/O), [`options`] (what can be asked, and the
//! checks), [`enqueue`] (one Txn per job, deduplicated), [`scan`] (finding claimable jobs),
//! [`claim`] (claiming them in one detached Txn), [`share`] (what the claims of one process
//! share), [`idle`] (the line of idle claimers, so a new job wakes one), [`claimed`] (the
//! guard: ack, nack, dead letters), [`inspect`]. See `docs/queue.md`.

mod claim;
mod claimed;
mod enqueue;
mod idle;
mod inspect;
mod layout;
mod options;
mod scan;
mod share;

use std::borrow::Borrow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::Stream;

pub use claimed::Claimed;
pub use inspect::{ClaimInfo, DeadLetter, JobInfo};
pub use layout::{JobId, MAX_IDEMPOTENCY_KEY_LEN, MAX_PAYLOAD_LEN, MAX_PRIORITY};
pub use options::{EnqueueOptions, QueueOptions};

use crate::keys::Named;
use crate::rpc::batch::TXN_OPS;
use crate::{Error, LeasedSession};
use layout::Keys;
use scan::{scan_with, Candidate, Scan};
use share::{Claims, Member};

/// The most jobs one [`claim_many`](WorkQueue::claim_many) takes: each is a Txn nested in the
/// claim's, and etcd allows a Txn and everything nested in it 128 operations
/// (`--max-txn-ops`' default), taking each level's own from what its nested Txns may use.
pub const MAX_BATCH: usize = 100;

/// What one candidate of a chain uses of that: its claim Txn (two compares, three
/// operations) and, in a retry, the check for an earlier attempt's claim (two operations).
const OPS_PER_CANDIDATE: usize = 5;

/// How many candidates one job's claim tries in one round trip at most (see `claim`), and
/// fewer in a batch so that the whole claim fits in [`TXN_OPS`]. Eight: with chains that go
/// on at random places ([`MAX_SPREAD`]) a burst of claimers rarely needs more, and every
/// candidate makes the Txn that etcd checks, logs and applies bigger (chains of 16 served a
/// burst of 100 claimers slower: `docs/performance.md`, fourth session of 2026-12-06).
const CHAIN: usize = 8;

/// The most ready jobs after its first candidate among which a claim's chain goes on, at a
/// random place: a chain tries the first ready job, then the `spread` after it (see
/// `WorkQueue::spread`). 128 serves a burst of 100 claimers in one round trip each, all but
/// about five in a hundred (the unit test
/// `a_burst_of_100_new_claimers_mostly_claims_in_one_round` plays such bursts through
/// `rotate` and `chains`); each scan reads that many keys more.
const MAX_SPREAD: usize = 128;

/// A queue of jobs for a pool of workers: at-least-once delivery, one live claimer per job.
///
/// A job is a key under the queue's name with no lease: it outlives every producer and
/// worker. A worker claims it by putting a claim key under its session's lease; the claim
/// lasts until [`Claimed::ack`] deletes job and claim in one Txn fenced on the claim, until the
/// worker gives it back ([`Claimed::nack`], or dropping the guard), or until the worker's lease
/// ends — a worker SIGKILLed or cut off loses its claims within its TTL and the jobs are
/// claimed again, their attempt count raised. A job delivered
/// [`max_attempts`](QueueOptions::with_max_attempts) times without an ack moves to the dead
/// letters with its last error. A claim applies only if the job is unchanged since it was read
/// and unclaimed, so a job has at most one live claim; an ack applies only while the claim is
/// the acknowledging worker's own.
///
/// [`claim()`](Self::claim) takes the ready job of the highest priority that became ready
/// first (by the producers' clocks; one producer's jobs in the order it enqueued them). With
/// no job ready it waits in a FIFO line of idle claimers where only the first watches the
/// queue: a new job wakes one claimer, not all of them, and nothing polls.
///
/// The keys live under `<name>/#queue/`: this crate's own layout (etcd's Go `recipe.Queue`
/// uses another and deletes a job as it hands it out). Every handle on one name should use
/// the same [`QueueOptions`].
///
/// # Example
/// ```no_run
/// # async fn demo() -> Result<(), etcd_coord::Error> {
/// use etcd_coord::{LeasedSession, SessionOptions, WorkQueue};
///
/// let client = etcd_client::Client::connect(["127.0.0.1:2379"], None).await?;
/// let session = LeasedSession::new(client, SessionOptions::new()).await?;
/// let queue = WorkQueue::new(&session, "jobs/thumbnails");
/// queue.enqueue("photo-1.jpg").await?;
///
/// let job = queue.claim().await?; // waits for a job; cancel-safe
/// assert_eq!(job.payload(), b"photo-1.jpg");
/// assert_eq!(job.attempt(), 1);
/// job.ack().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct WorkQueue {
    session: LeasedSession,
    named: Named,
    options: QueueOptions,
    /// Among how many ready jobs after the first this handle's chains go on at random, once
    /// their first candidate — the first ready job — is taken: [`MAX_SPREAD`] at first, then
    /// as [`next_spread`] says after each claim (wide while claims collide, halved while they
    /// do not). A new handle cannot know whether it is alone: the workers of a pool start
    /// together, and chains that all went on at the first job's neighbours served a burst of
    /// 100 claimers a chain's length at a time, a round trip each (2026-12-06).
    spread: Arc<AtomicUsize>,
    /// What this handle's claims share with the others of this queue through the session or
    /// its siblings (see `share`).
    claims: Arc<Member>,
}

impl WorkQueue {
    /// A handle on the queue `name`, with the default [`QueueOptions`]. Does no I/O; an invalid
    /// name is reported by the operations.
    pub fn new(session: &LeasedSession, name: impl Into<String>) -> WorkQueue {
        let name = name.into();
        WorkQueue {
            session: session.clone(),
            claims: Arc::new(Claims::of(session.inner(), &name).join(session.lease_id())),
            named: Keys::named(name),
            options: QueueOptions::new(),
            spread: Arc::new(AtomicUsize::new(MAX_SPREAD)),
        }
    }

    /// The same handle with `options` (checked by the operations).
    pub fn with_options(mut self, options: QueueOptions) -> WorkQueue {
        self.options = options;
        self
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        self.named.name()
    }

    /// The options in force.
    pub fn options(&self) -> &QueueOptions {
        &self.options
    }

    fn keys(&self) -> Result<Keys, Error> {
        Keys::of(&self.named)
    }

    /// How many claims a read of the queue is sized to find ahead of the free jobs (see
    /// `Claims::claims_hint`).
    fn claims_hint(&self) -> usize {
        self.claims.claims_hint()
    }

    /// How many candidates a scan for `n` jobs collects.
    fn want(&self, n: usize) -> usize {
        n * chain_len(n) + self.spread.load(Ordering::Relaxed) - 1
    }

    fn saw_claims(&self, n: usize) {
        self.claims.seen.store(n, Ordering::Relaxed);
    }

    /// Enqueues a job with priority 0, ready at once; returns its id. One round trip (and,
    /// once per dedup window, a lease grant for the markers).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an invalid name or options, or a payload over
    /// [`MAX_PAYLOAD_LEN`] (nothing is sent); [`Error::SessionLost`] /
    /// [`Error::SessionClosed`]; request errors retrying cannot fix.
    ///
    /// # Cancel safety
    /// Dropping the future cancels the request in flight: the job was enqueued or it was not
    /// (job and marker are one Txn). Enqueue again with the same idempotency key
    /// ([`enqueue_with`](Self::enqueue_with)) to be sure it is there exactly once.
    #[tracing::instrument(name = "etcd_coord.queue.enqueue", skip_all, fields(name = %self.name(), lease = %format_args!("{:x}", self.session.lease_id())))]
    pub async fn enqueue(&self, payload: impl Into<Vec<u8>>) -> Result<JobId, Error> {
        Box::pin(self.enqueue_with(payload, EnqueueOptions::new())).await
    }

    /// Enqueues a job with `options` (priority, not-before time, idempotency key); returns its
    /// id — or, if an enqueue with the same idempotency key was made within the dedup window,
    /// that one's id, adding nothing. Transient failures are retried with the same request, so
    /// a lost answer never adds a second job.
    ///
    /// # Errors
    /// As [`enqueue`](Self::enqueue); also [`Error::InvalidArgument`] for a priority above
    /// [`MAX_PRIORITY`] or an idempotency key that is empty, longer than
    /// [`MAX_IDEMPOTENCY_KEY_LEN`] or holds control characters.
    ///
    /// # Cancel safety
    /// As [`enqueue`](Self::enqueue).
    ///
    /// # Example
    /// ```no_run
    /// # async fn demo(queue: etcd_coord::WorkQueue) -> Result<(), etcd_coord::Error> {
    /// use std::time::Duration;
    /// use etcd_coord::EnqueueOptions;
    ///
    /// let options = EnqueueOptions::new()
    ///     .with_priority(7)
    ///     .with_delay(Duration::from_secs(30))
    ///     .with_idempotency_key("invoice-2024-0042");
    /// let first = queue.enqueue_with("invoice 42", options.clone()).await?;
    /// let again = queue.enqueue_with("invoice 42", options).await?; // a producer's retry
    /// assert_eq!(first, again); // one job
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(name = "etcd_coord.queue.enqueue_with", skip_all, fields(name = %self.name(), lease = %format_args!("{:x}", self.session.lease_id())))]
    pub async fn enqueue_with(
        &self,
        payload: impl Into<Vec<u8>>,
        options: EnqueueOptions,
    ) -> Result<JobId, Error> {
        let keys = self.keys()?;
        let window = self.options.validate()?;
        let session = self.session.inner();
        let enqueued = enqueue::enqueue(session, &keys, window, payload.into(), &options).await;
        // The family's next claim sees this job: it takes no read sent before it.
        self.claims.wrote();
        enqueued
    }

    /// Claims the ready job of the highest priority that became ready first and that nobody
    /// holds, waiting for one if there is none. Two round trips when a job is ready (a read,
    /// the claim); a job at its last delivery is moved to the dead letters instead and the next
    /// one taken.
    ///
    /// "First" is as the claim's read sees the queue. That read is serializable, and may be
    /// one a sibling's claim sent a moment before (see [`LeasedSession::sibling`]): through a
    /// member that has not applied the latest writes, or sharing such a read, a claim may
    /// miss a job enqueued just before it was called and take the best one it sees. It never
    /// misses a job for want of reading: a claim that sees none reads again linearizably
    /// before it waits (or, in [`try_claim`](Self::try_claim), answers `None`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an invalid name or options; [`Error::SessionLost`] /
    /// [`Error::SessionClosed`] if the session is or becomes Lost; [`Error::Protocol`] for a
    /// key under the queue that does not hold a job; request errors retrying cannot fix.
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future at any point leaves no claim and no place in the line
    /// of idle claimers behind (a claim that landed is given back by the session's task), and
    /// never loses a job.
    #[tracing::instrument(name = "etcd_coord.queue.claim", skip_all, fields(name = %self.name(), lease = %format_args!("{:x}", self.session.lease_id())))]
    pub async fn claim(&self) -> Result<Claimed, Error> {
        let mut got = Box::pin(self.claim_up_to(1, true)).await?;
        got.pop()
            .ok_or_else(|| Error::Internal("a claim that waited returned nothing".into()))
    }

    /// Claims a job as [`claim()`](Self::claim) does if one is ready now; else `None`, without
    /// waiting.
    ///
    /// # Errors
    /// As [`claim()`](Self::claim).
    ///
    /// # Cancel safety
    /// As [`claim()`](Self::claim).
    ///
    /// # Example
    /// ```no_run
    /// # async fn demo(queue: etcd_coord::WorkQueue) -> Result<(), etcd_coord::Error> {
    /// while let Some(job) = queue.try_claim().await? {
    ///     job.ack().await?; // drains what is ready now, then stops
    /// }
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(name = "etcd_coord.queue.try_claim", skip_all, fields(name = %self.name(), lease = %format_args!("{:x}", self.session.lease_id())))]
    pub async fn try_claim(&self) -> Result<Option<Claimed>, Error> {
        Ok(Box::pin(self.claim_up_to(1, false)).await?.pop())
    }

    /// Claims up to `n` ready jobs in one round trip (after the read), in claim order; waits
    /// until at least one is ready.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for `n` of 0 or above [`MAX_BATCH`]; as
    /// [`claim()`](Self::claim) otherwise.
    ///
    /// # Cancel safety
    /// As [`claim()`](Self::claim): every claim that landed for a dropped future is given back.
    ///
    /// # Example
    /// ```no_run
    /// # async fn demo(queue: etcd_coord::WorkQueue) -> Result<(), etcd_coord::Error> {
    /// for job in queue.claim_many(16).await? {
    ///     // ... up to 16 jobs, each its own claim, acknowledged one by one
    ///     job.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(name = "etcd_coord.queue.claim_many", skip_all, fields(name = %self.name(), lease = %format_args!("{:x}", self.session.lease_id())))]
    pub async fn claim_many(&self, n: usize) -> Result<Vec<Claimed>, Error> {
        if n == 0 || n > MAX_BATCH {
            return Err(Error::InvalidArgument(format!(
                "work queue: claim_many takes 1 to {MAX_BATCH} jobs (got {n})"
            )));
        }
        Box::pin(self.claim_up_to(n, true)).await
    }

    /// A stream of [`claim()`](Self::claim)s: each item is the next claimed job. It ends after
    /// the first error (which it yields): a session Lost, say. `'static`, holding a handle.
    ///
    /// # Example
    /// ```no_run
    /// # async fn demo(queue: etcd_coord::WorkQueue) -> Result<(), etcd_coord::Error> {
    /// use futures::StreamExt;
    ///
    /// let mut claims = std::pin::pin!(queue.claims());
    /// while let Some(job) = claims.next().await {
    ///     let job = job?;
    ///     job.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn claims(&self) -> impl Stream<Item = Result<Claimed, Error>> + Send + 'static {
        futures::stream::unfold(Some(self.clone()), |queue| async move {
            let queue = queue?;
            let next = queue.claim().await;
            let more = next.is_ok().then_some(queue);
            Some((next, more))
        })
    }

    async fn claim_up_to(&self, n: usize, wait: bool) -> Result<Vec<Claimed>, Error> {
        let keys = self.keys()?;
        self.options.validate()?;
        let session = self.session.inner();
        session.check()?;
        let _active = self.claims.active();
        // The first read may be another claim's of this process, answered a moment ago or
        // in flight (see `share`); a claim that finds nothing left for itself in one
        // answered before it started reads again (shared), and a claim that won nothing
        // from a read in flight reads on its own. A claim's first read is serializable (see
        // `scan_with`); it reads linearizably before it gives up or waits for a job, and
        // after a round that won nothing (a member behind would show it the same again) —
        // a round that then chains its candidates, whatever the family's siblings do.
        let (mut shared, mut serializable, mut won_nothing) = (true, true, false);
        let mut recent = true;
        loop {
            let (want, hint) = (self.want(n), self.claims_hint());
            let need = n * chain_len(n);
            let (found, answered) = match std::mem::take(&mut shared) {
                true => {
                    let recent = std::mem::take(&mut recent);
                    let sizes = (want, need, n);
                    self.claims
                        .scan(session, &keys, sizes, hint, recent)
                        .await?
                }
                false => (None, false),
            };
            let from_shared = found.is_some();
            let found = match found {
                Some(found) => found,
                // Sized for the family's claims under way too: their first candidates, not
                // yet claimed in etcd, are no candidates of ours (see `share`).
                None => {
                    let want = want + self.claims.first_candidates_under_way(n);
                    Arc::new(scan_with(session, &keys, want, hint, serializable).await?)
                }
            };
            self.saw_claims(found.claims);
            if found.candidates.is_empty() && serializable {
                serializable = false; // says nothing: read the present
                continue;
            }
            if found.candidates.is_empty() {
                if !wait {
                    return Ok(Vec::new());
                }
                match idle::wait_in_line(self, n).await {
                    // Our place in the line was deleted by someone else: line up again.
                    Err(Error::LockLost { key, .. }) if key.starts_with(&keys.idle()) => continue,
                    other => return other,
                }
            }
            let claimed = self
                .claim_round(&keys, &found, n, from_shared, !won_nothing)
                .await?;
            let Some(claimed) = claimed else {
                // Nothing was left for this claim in a shared read. Answered before the claim
                // started: a fresh one, shared; else one of its own.
                match answered {
                    true => shared = true,
                    false => (serializable, won_nothing) = (false, true),
                }
                continue;
            };
            if !claimed.is_empty() {
                return Ok(claimed);
            }
            // Every candidate was taken (or dead-lettered) since the read, or — in a shared
            // read — is another claim's to try: read again.
            (serializable, won_nothing) = (false, true);
        }
    }

    /// Claims up to `n` of `found`'s candidates in one round trip (see [`chains`]): each
    /// chain tries one of the first `n` ready jobs that no other claim of this process is
    /// trying first (see `share`), then — unless it `may_go_alone` and the family is alone
    /// ([`Claims::alone`]) — goes on at a random place among the next `spread` of the highest
    /// priority; adapts the spread. Claims nothing, and sends nothing (`None`), if all of
    /// them are other claims' to try and it should `rather_read` again.
    async fn claim_round(
        &self,
        keys: &Keys,
        found: &Scan,
        n: usize,
        rather_read: bool,
        may_go_alone: bool,
    ) -> Result<Option<Vec<Claimed>>, Error> {
        let read_at = found.revision;
        let spread = self.spread.load(Ordering::Relaxed);
        let offset = match spread {
            1 => 0,
            s => rand::random_range(0..s),
        };
        let Some((candidates, trying)) =
            self.claims.pick(&found.candidates, read_at, n, rather_read)
        else {
            return Ok(None);
        };
        let alone = may_go_alone && self.claims.alone(found);
        let len = if alone { 1 } else { chain_len(n) };
        let chains = chains(rotate(candidates, n, offset), n, len)
            .into_iter()
            .map(|chain| chain.into_iter().cloned().collect())
            .collect();
        let (leased, max_attempts) = (&self.session, self.options.max_attempts);
        let round = claim::claim(leased, keys, max_attempts, chains, &self.claims).await?;
        trying.won(
            round.claimed.iter().map(|c| c.id().as_str()),
            round.revision,
        );
        if round.contended {
            self.claims.collided();
        }
        let writes_between = usize::try_from(round.revision - read_at - 1).unwrap_or(0);
        let next = next_spread(spread, round.contended, writes_between);
        self.spread.store(next, Ordering::Relaxed);
        Ok(Some(round.claimed))
    }

    /// How many jobs the queue holds, claimed or not (dead letters aside). One read.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an invalid name; [`Error::SessionLost`] /
    /// [`Error::SessionClosed`]; request errors retrying cannot fix.
    ///
    /// # Cancel safety
    /// Only reads: dropping the future changes nothing.
    #[tracing::instrument(name = "etcd_coord.queue.len", skip_all, fields(name = %self.name(), lease = %format_args!("{:x}", self.session.lease_id())))]
    pub async fn len(&self) -> Result<usize, Error> {
        inspect::len(self.session.inner(), &self.keys()?).await
    }

    /// Whether the queue holds no job (dead letters aside). As [`len()`](Self::len).
    ///
    /// # Errors
    /// As [`len()`](Self::len).
    ///
    /// # Cancel safety
    /// Only reads.
    #[tracing::instrument(name = "etcd_coord.queue.is_empty", skip_all, fields(name = %self.name(), lease = %format_args!("{:x}", self.session.lease_id())))]
    pub async fn is_empty(&self) -> Result<bool, Error> {
        Ok(self.len().await? == 0)
    }

    /// The jobs nobody holds, in claim order (those not ready yet included), with their
    /// payloads. Reads the whole queue (in pages, at one revision).
    ///
    /// # Errors
    /// As [`len()`](Self::len); [`Error::Protocol`] for a key that does not hold a job.
    ///
    /// # Cancel safety
    /// Only reads.
    #[tracing::instrument(name = "etcd_coord.queue.pending", skip_all, fields(name = %self.name(), lease = %format_args!("{:x}", self.session.lease_id())))]
    pub async fn pending(&self) -> Result<Vec<JobInfo>, Error> {
        inspect::pending(self.session.inner(), &self.keys()?).await
    }

    /// Who holds what: every claim, with the claimer's lease, the fencing token and the
    /// delivery. Reads the whole queue (in pages, at one revision).
    ///
    /// # Errors
    /// As [`pending()`](Self::pending).
    ///
    /// # Cancel safety
    /// Only reads.
    #[tracing::instrument(name = "etcd_coord.queue.claimed", skip_all, fields(name = %self.name(), lease = %format_args!("{:x}", self.session.lease_id())))]
    pub async fn claimed(&self) -> Result<Vec<ClaimInfo>, Error> {
        inspect::claimed(self.session.inner(), &self.keys()?).await
    }

    /// The jobs moved aside after [`max_attempts`](QueueOptions::with_max_attempts)
    /// deliveries, with their last errors and payloads.
    ///
    /// # Errors
    /// As [`pending()`](Self::pending).
    ///
    /// # Cancel safety
    /// Only reads.
    ///
    /// # Example
    /// ```no_run
    /// # async fn demo(queue: etcd_coord::WorkQueue) -> Result<(), etcd_coord::Error> {
    /// for dead in queue.dead_letters().await? {
    ///     eprintln!("job {} failed {} times: {}", dead.id, dead.attempts, dead.last_error);
    /// }
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(name = "etcd_coord.queue.dead_letters", skip_all, fields(name = %self.name(), lease = %format_args!("{:x}", self.session.lease_id())))]
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, Error> {
        inspect::dead_letters(self.session.inner(), &self.keys()?).await
    }
}

/// How many candidates each chain of a claim of `n` jobs tries: at most [`CHAIN`], and no more
/// than leave the claim within etcd's operations for a Txn (the claim Txn itself has one
/// operation per chain).
fn chain_len(n: usize) -> usize {
    (TXN_OPS.saturating_sub(n) / OPS_PER_CANDIDATE).clamp(1, CHAIN)
}

/// The spread after a claim made with `spread`: halved if it was not `contended`; if it was,
/// twice the writes etcd applied between its read and its claim — every other claim that
/// landed in between is one, or several merged in one Txn (`rpc::batch`) are one; acks,
/// enqueues and writes of other names count too — within 2 and [`MAX_SPREAD`].
fn next_spread(spread: usize, contended: bool, writes_between: usize) -> usize {
    match contended {
        true => writes_between.saturating_mul(2).clamp(2, MAX_SPREAD),
        false => (spread / 2).max(1),
    }
}

/// `candidates` with the ready jobs of the highest priority after the first `keep` rotated
/// left by `offset` (modulo their number): the first `keep` — the chains' first candidates —
/// stay first, so a lone claimer takes the first ready jobs; after them a chain goes on at
/// the `offset`-th of the rest, to the end of the priority, wraps round to just after the
/// first `keep`, and only then reaches a lower priority.
fn rotate<C: Borrow<Candidate>>(mut candidates: Vec<C>, keep: usize, offset: usize) -> Vec<C> {
    let rank = |c: &C| c.borrow().rank;
    let top = candidates.first().map_or(0, rank);
    let count = candidates.iter().take_while(|c| rank(c) == top).count();
    if count > keep {
        candidates[keep..count].rotate_left(offset % (count - keep));
    }
    candidates
}

/// The chains of a claim of `n` jobs: up to `n` chains of up to `len` candidates each, dealt
/// out in claim order (chain `i` tries candidates `i`, `i + n`, `i + 2n`, …), so an
/// uncontended claim takes exactly the first `n`.
fn chains<C: Clone>(candidates: Vec<C>, n: usize, len: usize) -> Vec<Vec<C>> {
    let mut chains: Vec<Vec<C>> = vec![Vec::new(); n.min(candidates.len())];
    let count = chains.len();
    for (i, c) in candidates.into_iter().take(n * len).enumerate() {
        chains[i % count].push(c);
    }
    chains
}

#[cfg(test)]
mod tests;
