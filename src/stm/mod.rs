//! [`Stm`]: software transactional memory over etcd — an async closure that reads and writes
//! keys, committed atomically, run again on conflict (Go's `concurrency.NewSTM`).

mod attempt;
mod commit;

use std::future::Future;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use etcd_client::Client;

use crate::backoff::Backoff;
use crate::rpc::Rpc;
use crate::Error;

pub use attempt::StmTxn;
use attempt::{Attempt, State, Void};
use commit::Prefetch;

/// How much an [`Stm`] transaction is isolated from concurrent writers — Go's isolation
/// levels, with the same meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Isolation {
    /// The default. Every read of an attempt sees the store at one revision, its snapshot:
    /// that of its prefetched keys if it has any ([`Stm::with_prefetch`], or after a conflict
    /// the keys the failed commit fetched anew), else that of its first read (linearizable).
    /// Keys not prefetched are read at that revision too, so an attempt never mixes values
    /// of two revisions, even one that later conflicts. The commit succeeds only if no key
    /// read *or written* has changed since that revision. Serializable, and no write skew
    /// even through keys only written. A transaction that only reads commits nothing: its
    /// reads are already one state of the store, the current one at a moment during
    /// [`Stm::run`].
    #[default]
    SerializableSnapshot,
    /// Reads as [`SerializableSnapshot`](Self::SerializableSnapshot) (one revision per
    /// attempt; a transaction that only reads commits nothing); the commit checks only that
    /// no key read has changed since it was read.
    Serializable,
    /// Each key is read once per attempt (serializable reads, from whichever member answers)
    /// and cached; the commit checks that no key read has changed since it was read, also for
    /// a transaction that only reads (one read-only Txn). Reads of different keys may come
    /// from different revisions — prefetched keys from the prefetch's — so the closure may
    /// see values that were never the store's state together; such an attempt's commit fails
    /// its check and it runs again.
    RepeatableReads,
    /// Reads see any committed state; the commit checks nothing (last writer wins).
    ReadCommitted,
}

impl Isolation {
    pub(crate) fn reads_at_snapshot(self) -> bool {
        matches!(
            self,
            Isolation::SerializableSnapshot | Isolation::Serializable
        )
    }

    pub(crate) fn checks_reads(self) -> bool {
        self != Isolation::ReadCommitted
    }
}

/// A committed [`Stm::run`]: the closure's value, the revision the commit created (for a
/// transaction that wrote nothing: the revision its reads saw), and how many times the
/// closure ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed<T> {
    /// What the closure returned on the attempt that committed.
    pub value: T,
    /// The store revision of the commit; a transaction that wrote nothing commits nothing
    /// and reports the revision of its reads (0 if it read nothing either).
    pub revision: i64,
    /// Attempts made (1 + the conflicts and failed reads retried).
    pub attempts: u32,
}

/// Software transactional memory: runs a closure that makes an `async` block over a
/// [`StmTxn`] handle — reads, then buffered writes — and commits it in one etcd Txn that succeeds only if the isolation
/// level's checks hold; on a conflict it runs the closure again, with the keys it read
/// fetched anew by the failed commit itself (no extra round trip).
///
/// Better than Go's `NewSTM`: at most [`max_attempts`](Self::with_max_attempts) attempts,
/// then [`Error::TooManyConflicts`] (Go retries forever). The first 8 conflicts in a row are
/// retried at once with the prefetched reads, as Go does; later ones after a jittered,
/// growing pause of 1–20 ms, reading afresh, so that contenders that keep colliding spread
/// out instead of live-locking; errors are values, not panics; a commit whose answer was lost
/// is never sent again ([`Error::CommitUncertain`]: it may have landed, and a retry could
/// apply the closure's effect twice — etcd #18424); reads that a lagging member cannot serve
/// at the snapshot revision ("required revision is a future revision", etcd #11963) are read
/// again linearizably; a read-only transaction's check is never cancelled in flight (etcd
/// #14110). Range reads ([`StmTxn::get_prefix`], [`StmTxn::get_range`]) are checked too,
/// phantoms included: a range compare catches keys created or changed in the range since the
/// read, a compare per key found catches deletions.
///
/// # Example
/// ```no_run
/// # async fn demo(client: etcd_client::Client) -> Result<(), etcd_coord::Error> {
/// use etcd_coord::Stm;
///
/// let parse = |v: Option<Vec<u8>>| -> i64 {
///     v.and_then(|v| String::from_utf8(v).ok()?.parse().ok()).unwrap_or(0)
/// };
/// let done = Stm::new(client)
///     .run(|tx| async move {
///         let from = parse(tx.get("accounts/alice").await?);
///         let to = parse(tx.get("accounts/bob").await?);
///         if from < 10 {
///             return Ok::<_, etcd_coord::Error>(false); // commits nothing
///         }
///         tx.put("accounts/alice", (from - 10).to_string());
///         tx.put("accounts/bob", (to + 10).to_string());
///         Ok(true)
///     })
///     .await?;
/// println!("moved: {}, at revision {}", done.value, done.revision);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Stm {
    client: Client,
    isolation: Isolation,
    prefetch: Vec<Vec<u8>>,
    max_attempts: u32,
    request_timeout: Duration,
}

impl Stm {
    /// An STM over `client`: [`Isolation::SerializableSnapshot`], at most 32 attempts,
    /// requests timed out after 5 s.
    pub fn new(client: Client) -> Stm {
        Stm {
            client,
            isolation: Isolation::default(),
            prefetch: Vec::new(),
            max_attempts: 32,
            request_timeout: Duration::from_secs(5),
        }
    }

    /// The isolation level.
    pub fn with_isolation(mut self, isolation: Isolation) -> Stm {
        self.isolation = isolation;
        self
    }

    /// Keys read in one request before the first attempt (Go's `WithPrefetch`), so the
    /// closure's reads of them cost no round trip. At the snapshot levels the prefetch's
    /// revision is the first attempt's snapshot: the keys not prefetched are read at that
    /// revision too (serializable reads), never at a later one.
    pub fn with_prefetch<I, K>(mut self, keys: I) -> Stm
    where
        I: IntoIterator<Item = K>,
        K: Into<Vec<u8>>,
    {
        self.prefetch = keys.into_iter().map(Into::into).collect();
        self
    }

    /// At most this many attempts (at least 1) before [`Error::TooManyConflicts`].
    pub fn with_max_attempts(mut self, attempts: u32) -> Stm {
        self.max_attempts = attempts;
        self
    }

    /// How long one read or commit may take before it counts as failed.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Stm {
        self.request_timeout = timeout;
        self
    }

    /// Runs `apply` until an attempt commits, and returns what that attempt returned.
    ///
    /// `apply` reads with [`StmTxn::get`] and writes with [`StmTxn::put`] /
    /// [`StmTxn::delete`]; the writes are applied only by the commit, all at once. Keep its
    /// effects inside the transaction: it may run several times. Returning `Err` aborts
    /// (nothing is written) and `run` returns that error. A read that fails with a transient
    /// error (or is cut off by compaction) voids the attempt, whatever `apply` makes of the
    /// error: it is retried as a conflict is.
    ///
    /// # Errors
    /// `apply`'s own error; [`Error::TooManyConflicts`] after the last attempt conflicted;
    /// [`Error::CommitUncertain`] if the commit's answer was lost (it may have landed);
    /// [`Error::InvalidArgument`] for zero attempts or a zero timeout (nothing sent);
    /// request errors that retrying cannot fix ([`Error::PermissionDenied`], …) — all
    /// converted into `E`.
    ///
    /// # Cancel safety
    /// Dropping the future before the commit is sent writes nothing. Dropping it while the
    /// commit is in flight leaves the commit's outcome unknown, as for any write. Reads are
    /// plain range requests, safe to cancel; the one read-only Txn (a read-only transaction's
    /// check at [`Isolation::RepeatableReads`]) runs to its end in a task of its own (etcd
    /// #14110).
    #[tracing::instrument(name = "etcd_coord.stm.run", skip_all, fields(isolation = ?self.isolation))]
    pub async fn run<T, E, F, Fut>(&self, mut apply: F) -> Result<Committed<T>, E>
    where
        F: FnMut(StmTxn) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<Error>,
    {
        if self.max_attempts == 0 {
            return Err(Error::InvalidArgument("an STM needs at least one attempt".into()).into());
        }
        if self.request_timeout.is_zero() {
            return Err(Error::InvalidArgument(
                "an STM's request timeout must be more than zero".into(),
            )
            .into());
        }
        let rpc = Rpc::detached(self.client.clone(), self.request_timeout);
        let mut prefetch = Prefetch::default();
        if !self.prefetch.is_empty() {
            let first = self.attempt(&rpc, Prefetch::default());
            first.prefetch(&self.prefetch).await.map_err(E::from)?;
            let mut state = first.state();
            prefetch = Prefetch {
                at: state.prefetched_at,
                reads: std::mem::take(&mut state.prefetched),
            };
        }
        // After a conflict the next attempt goes at once, with the keys read fetched anew by
        // the failed commit — for the first IMMEDIATE conflicts. After more it waits a
        // jittered, growing while first, so that contenders spread out, and then reads
        // afresh: values fetched before a wait are stale by its end and would only conflict
        // again (measured: waiting with them halved throughput at 8 clients).
        const IMMEDIATE: u32 = 8;
        let mut backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(20));
        for attempt in 1..=self.max_attempts {
            // A handle per attempt: one the closure kept from an earlier attempt cannot
            // touch this one.
            let tx = self.attempt(&rpc, std::mem::take(&mut prefetch));
            let outcome = apply(StmTxn {
                inner: Arc::clone(&tx),
            })
            .await;
            let void = tx.state().void;
            match void {
                None => {}
                Some(Void::Conflict) => {
                    if attempt > IMMEDIATE {
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                    continue;
                }
                Some(Void::Transient) => {
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
                // The closure was handed the error: its own outcome says what to return —
                // unless it went on as if the read had succeeded.
                Some(Void::Failed) => {
                    outcome?;
                    return Err(Error::Misuse(
                        "an STM read failed, and the closure returned Ok: nothing was committed"
                            .into(),
                    )
                    .into());
                }
            }
            let value = outcome?;
            match tx.commit().await.map_err(E::from)? {
                Ok(revision) => {
                    return Ok(Committed {
                        value,
                        revision,
                        attempts: attempt,
                    })
                }
                Err(next) if attempt <= IMMEDIATE => prefetch = next,
                Err(_) => tokio::time::sleep(backoff.next_delay()).await,
            }
        }
        Err(Error::TooManyConflicts {
            attempts: self.max_attempts,
        }
        .into())
    }

    /// A fresh attempt, starting with `prefetch`.
    fn attempt(&self, rpc: &Rpc, prefetch: Prefetch) -> Arc<Attempt> {
        Arc::new(Attempt {
            rpc: rpc.clone(),
            isolation: self.isolation,
            state: StdMutex::new(State {
                prefetched: prefetch.reads,
                prefetched_at: prefetch.at,
                ..State::default()
            }),
            reading: tokio::sync::Mutex::new(()),
        })
    }
}

impl std::fmt::Debug for Stm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stm")
            .field("isolation", &self.isolation)
            .field("prefetch", &self.prefetch.len())
            .field("max_attempts", &self.max_attempts)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}
