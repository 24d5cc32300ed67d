//! [`Stm`]: software transactional memory over etcd — an async closure that reads and writes
//! keys, committed atomically, run again on conflict (Go's `concurrency.NewSTM`).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, GetResponse, KeyValue, Txn, TxnOp, TxnOpResponse,
};

use crate::backoff::Backoff;
use crate::error::{renewing_auth, within};
use crate::Error;

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
    fn reads_at_snapshot(self) -> bool {
        matches!(
            self,
            Isolation::SerializableSnapshot | Isolation::Serializable
        )
    }

    fn checks_reads(self) -> bool {
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
        let mut prefetch = Prefetch::default();
        if !self.prefetch.is_empty() {
            let first = self.attempt(Prefetch::default());
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
            let tx = self.attempt(std::mem::take(&mut prefetch));
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
                    return Err(Error::Protocol(
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
    fn attempt(&self, prefetch: Prefetch) -> Arc<Attempt> {
        Arc::new(Attempt {
            client: self.client.clone(),
            isolation: self.isolation,
            timeout: self.request_timeout,
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

/// What made an attempt void, whatever the closure returned.
#[derive(Debug, Clone, Copy)]
enum Void {
    /// Its snapshot can no longer be read (compacted away): start over.
    Conflict,
    /// A read failed in a way worth another attempt.
    Transient,
    /// A read failed in a way retrying cannot fix.
    Failed,
}

/// A key as one attempt read it.
#[derive(Debug, Clone)]
struct Read {
    value: Option<Vec<u8>>,
    /// 0 for a key that did not exist.
    mod_revision: i64,
}

impl Read {
    fn of(kv: Option<&KeyValue>) -> Read {
        Read {
            value: kv.map(|kv| kv.value().to_vec()),
            mod_revision: kv.map_or(0, KeyValue::mod_revision),
        }
    }
}

/// One attempt of an [`Stm`] transaction: reads (cached for the attempt) and buffered
/// writes. A cheap [`Clone`] handle, so the closure can move it into its `async` block; reads
/// of one attempt are served one at a time, in the order they are made.
#[derive(Clone)]
pub struct StmTxn {
    inner: Arc<Attempt>,
}

/// The state of one attempt, behind its handles.
struct Attempt {
    client: Client,
    isolation: Isolation,
    timeout: Duration,
    state: StdMutex<State>,
    /// Held across a read's request: one read at a time (the first fixes the snapshot).
    reading: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    reads: BTreeMap<Vec<u8>, Read>,
    /// `None`: deleted.
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// The revision every read of this attempt is at (snapshot levels), once read.
    snapshot: Option<i64>,
    /// Keys read by the last failed commit (or the prefetch), at `prefetched_at`.
    prefetched: BTreeMap<Vec<u8>, Read>,
    prefetched_at: i64,
    /// A member could not serve a read at the snapshot revision: read linearizably at it.
    linearizable: bool,
    /// Ranges read, each with the revision it was read at; every key found is in `reads`.
    ranges: Vec<RangeRead>,
    void: Option<Void>,
}

/// A range `[start, end)` an attempt read, at `revision`.
#[derive(Debug, Clone)]
struct RangeRead {
    start: Vec<u8>,
    end: Vec<u8>,
    revision: i64,
}

/// Keys per page of a range read; the pages after the first are read at the first's revision.
const RANGE_PAGE: i64 = 500;

impl State {
    /// The revision a read from etcd is made at, at the snapshot levels: the snapshot, once
    /// fixed; before that, the prefetch's revision if keys were prefetched — they hold the
    /// store as it was then, so every other read must be at that revision too, or the
    /// attempt would see two revisions (a read-only one would commit that unchecked) — and
    /// else none: the read is linearizable and fixes the snapshot. Always `None` below the
    /// snapshot levels.
    fn read_at(&self, isolation: Isolation) -> Option<i64> {
        if !isolation.reads_at_snapshot() {
            return None;
        }
        self.snapshot
            .or_else(|| (!self.prefetched.is_empty()).then_some(self.prefetched_at))
    }

    /// An error once a read of this attempt has failed: the attempt is void.
    fn usable(&self) -> Result<(), Error> {
        match self.void {
            None => Ok(()),
            Some(_) => Err(Error::Protocol(
                "an earlier read of this attempt failed: the attempt is void".into(),
            )),
        }
    }

    /// Records a read's outcome: fixes the snapshot (snapshot levels) on success, voids the
    /// attempt on failure.
    fn settle(
        &mut self,
        isolation: Isolation,
        fetched: Result<(Vec<KeyValue>, i64, bool), Error>,
    ) -> Result<(Vec<KeyValue>, i64), Error> {
        match fetched {
            Ok((kvs, revision, linearizable)) => {
                self.linearizable |= linearizable;
                if isolation.reads_at_snapshot() && self.snapshot.is_none() {
                    self.snapshot = Some(revision);
                }
                Ok((kvs, revision))
            }
            Err(e) => {
                self.void = Some(match &e {
                    Error::Conflict => Void::Conflict,
                    e if e.is_transient() => Void::Transient,
                    _ => Void::Failed,
                });
                Err(e)
            }
        }
    }

    /// The keys in `[start, end)` as this attempt sees them: what it read, with its writes.
    fn seen_in(&self, start: &[u8], end: &[u8]) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let range = (
            std::ops::Bound::Included(start),
            std::ops::Bound::Excluded(end),
        );
        let mut seen: BTreeMap<Vec<u8>, Vec<u8>> = self
            .reads
            .range::<[u8], _>(range)
            .filter_map(|(k, r)| Some((k.clone(), r.value.clone()?)))
            .collect();
        for (key, written) in self.writes.range::<[u8], _>(range) {
            match written {
                Some(v) => seen.insert(key.clone(), v.clone()),
                None => seen.remove(key),
            };
        }
        seen
    }
}

impl std::fmt::Debug for StmTxn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.inner.state();
        f.debug_struct("StmTxn")
            .field("isolation", &self.inner.isolation)
            .field("snapshot", &state.snapshot)
            .field("reads", &state.reads.len())
            .field("writes", &state.writes.len())
            .finish()
    }
}

impl StmTxn {
    /// The value of `key` as this transaction sees it: its own write if it wrote the key,
    /// else the value at the transaction's snapshot (or, below the snapshot levels, as first
    /// read in this attempt). `None` if the key does not exist.
    ///
    /// # Errors
    /// Request errors; [`Error::Conflict`] if the snapshot was compacted away (the attempt is
    /// then run again). Propagate them with `?`: an attempt whose read failed never commits.
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<Option<Vec<u8>>, Error> {
        let key = key.into();
        let attempt = &self.inner;
        let _one_at_a_time = attempt.reading.lock().await;
        let (snapshot, linearizable) = {
            let mut state = attempt.state();
            if let Some(written) = state.writes.get(&key) {
                return Ok(written.clone());
            }
            if let Some(read) = state.reads.get(&key) {
                return Ok(read.value.clone());
            }
            if let Some(read) = state.prefetched.remove(&key) {
                if attempt.isolation.reads_at_snapshot() {
                    // Keys read from etcd before were read at the prefetch's revision too.
                    debug_assert!(state.snapshot.is_none_or(|s| s == state.prefetched_at));
                    state.snapshot = Some(state.prefetched_at);
                }
                let value = read.value.clone();
                state.reads.insert(key, read);
                return Ok(value);
            }
            state.usable()?;
            (state.read_at(attempt.isolation), state.linearizable)
        };
        let fetched = attempt.fetch(&key, None, snapshot, linearizable).await;
        let mut state = attempt.state();
        let (kvs, _) = state.settle(attempt.isolation, fetched)?;
        let read = Read::of(kvs.first());
        let value = read.value.clone();
        state.reads.insert(key, read);
        Ok(value)
    }

    /// Every key with prefix `prefix` and its value, as this transaction sees them: the values
    /// at its snapshot (or, below the snapshot levels, as first read in this attempt) with its
    /// own writes applied. At the levels that check reads, the commit then also fails if any
    /// key in the range was created, changed or deleted since (phantoms included): a range
    /// compare on the whole prefix plus a compare per key found. etcd allows `--max-txn-ops`
    /// (128 by default) compares per Txn: a transaction that writes after reading more keys
    /// than that at those levels cannot commit ([`Error::InvalidArgument`] from
    /// [`Stm::run`], nothing written, not retried); a transaction that only reads commits
    /// nothing and is not limited.
    ///
    /// # Errors
    /// As [`get`](Self::get); [`Error::InvalidArgument`] for an empty prefix or one of only
    /// `0xff` bytes (nothing sent, the attempt stays usable).
    pub async fn get_prefix(
        &self,
        prefix: impl Into<Vec<u8>>,
    ) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, Error> {
        let start = prefix.into();
        if start.is_empty() {
            return Err(Error::InvalidArgument(
                "an STM prefix read needs a non-empty prefix".into(),
            ));
        }
        // A prefix of only 0xff bytes has no end key (etcd would read to the end of the
        // keyspace): `get_range` refuses it.
        let end = crate::keys::prefix_end(&start);
        self.get_range(start, end).await
    }

    /// Every key in `[start, end)` and its value, as [`get_prefix`](Self::get_prefix) does for
    /// a prefix.
    ///
    /// # Errors
    /// As [`get`](Self::get); [`Error::InvalidArgument`] unless `start < end` (nothing sent,
    /// the attempt stays usable).
    pub async fn get_range(
        &self,
        start: impl Into<Vec<u8>>,
        end: impl Into<Vec<u8>>,
    ) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, Error> {
        let (start, end) = (start.into(), end.into());
        if start >= end {
            return Err(Error::InvalidArgument(
                "an STM range read needs start < end".into(),
            ));
        }
        let attempt = &self.inner;
        let _one_at_a_time = attempt.reading.lock().await;
        let (snapshot, linearizable) = {
            let state = attempt.state();
            if state
                .ranges
                .iter()
                .any(|r| r.start == start && r.end == end)
            {
                return Ok(state.seen_in(&start, &end));
            }
            state.usable()?;
            (state.read_at(attempt.isolation), state.linearizable)
        };
        let fetched = attempt
            .fetch(&start, Some(&end), snapshot, linearizable)
            .await;
        let mut state = attempt.state();
        let (kvs, revision) = state.settle(attempt.isolation, fetched)?;
        for kv in &kvs {
            // A key read before keeps its first reading (repeatable reads).
            state
                .reads
                .entry(kv.key().to_vec())
                .or_insert_with(|| Read::of(Some(kv)));
        }
        state.ranges.push(RangeRead {
            start: start.clone(),
            end: end.clone(),
            revision,
        });
        Ok(state.seen_in(&start, &end))
    }

    /// Writes `value` to `key` when the transaction commits.
    pub fn put(&self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.inner
            .state()
            .writes
            .insert(key.into(), Some(value.into()));
    }

    /// Deletes `key` when the transaction commits.
    pub fn delete(&self, key: impl Into<Vec<u8>>) {
        self.inner.state().writes.insert(key.into(), None);
    }

    /// The revision this attempt's reads see ([`Isolation::SerializableSnapshot`] and
    /// [`Isolation::Serializable`]), once it has read something: its prefetch's revision if
    /// it had keys prefetched, else its first read's.
    pub fn revision(&self) -> Option<i64> {
        self.inner.state().snapshot
    }

    /// The mod revision of `key` as this attempt read it (0 if it does not exist); reads it
    /// if it was not read yet (Go's `Rev`), also if this attempt wrote it.
    ///
    /// # Errors
    /// As [`get`](Self::get).
    pub async fn mod_revision(&self, key: impl Into<Vec<u8>>) -> Result<i64, Error> {
        let key = key.into();
        let unread = !self.inner.state().reads.contains_key(&key);
        if unread {
            let written = self.inner.state().writes.remove(&key);
            let read = self.get(key.clone()).await;
            if let Some(w) = written {
                self.inner.state().writes.insert(key.clone(), w);
            }
            read?;
        }
        Ok(self
            .inner
            .state()
            .reads
            .get(&key)
            .map_or(0, |r| r.mod_revision))
    }
}

impl Attempt {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads `key` (or the range `[key, end)`, in pages at one revision) at `snapshot` (if
    /// any): the keys found, the revision read at, and whether a read had to be linearizable
    /// because a member lagged behind the revision.
    async fn fetch(
        &self,
        key: &[u8],
        end: Option<&[u8]>,
        snapshot: Option<i64>,
        mut linearizable: bool,
    ) -> Result<(Vec<KeyValue>, i64, bool), Error> {
        let mut at = snapshot.filter(|_| self.isolation.reads_at_snapshot());
        let mut from = key.to_vec();
        let mut kvs = Vec::new();
        loop {
            let mut options = match at {
                Some(rev) if linearizable => GetOptions::new().with_revision(rev),
                Some(rev) => GetOptions::new().with_revision(rev).with_serializable(),
                // The snapshot levels' first read is linearizable: it fixes the snapshot.
                None if self.isolation.reads_at_snapshot() => GetOptions::new(),
                None => GetOptions::new().with_serializable(),
            };
            if let Some(end) = end {
                options = options.with_range(end).with_limit(RANGE_PAGE);
            }
            let mut resp = match self.range(&from, options).await {
                Err(e) if at.is_some() && !linearizable && future_revision(&e) => {
                    // This member lags behind the revision (etcd #11963): read this page
                    // again at it, linearizably — the member first catches up.
                    linearizable = true;
                    continue;
                }
                Err(e) if compacted(&e) => return Err(Error::Conflict),
                other => other?,
            };
            let revision = *at.get_or_insert(header_revision(resp.header())?);
            let more = resp.more();
            kvs.append(&mut resp.take_kvs());
            match kvs.last() {
                Some(last) if more && end.is_some() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok((kvs, revision, linearizable)),
            }
        }
    }

    async fn range(&self, key: &[u8], options: GetOptions) -> Result<GetResponse, Error> {
        let (client, timeout) = (&self.client, self.timeout);
        renewing_auth(client, || {
            let mut kv = client.kv_client();
            let options = options.clone();
            async move { within(timeout, kv.get(key, Some(options))).await }
        })
        .await
    }

    /// Sends a Txn that may be read-only in a task of its own, so that dropping the caller
    /// never cancels it in flight (etcd < 3.5.5 crashes on that: #14110).
    async fn detached_txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, Error> {
        let (client, timeout) = (self.client.clone(), self.timeout);
        let task = tokio::spawn(async move { send_txn(&client, timeout, txn).await });
        task.await
            .map_err(|e| Error::Protocol(format!("an STM read task failed: {e}")))?
    }

    /// Reads `keys` in one request (a read-only Txn, detached), for the first attempt.
    async fn prefetch(&self, keys: &[Vec<u8>]) -> Result<(), Error> {
        let gets: Vec<TxnOp> = keys.iter().map(|k| TxnOp::get(k.clone(), None)).collect();
        let resp = self.detached_txn(Txn::new().and_then(gets)).await?;
        let mut state = self.state();
        state.prefetched_at = header_revision(resp.header())?;
        state.prefetched = keys
            .iter()
            .cloned()
            .zip(reads_of(resp.op_responses()))
            .collect();
        Ok(())
    }

    /// What the commit checks, by isolation level.
    fn compares(&self, state: &State) -> Vec<Compare> {
        let mut compares = Vec::new();
        if self.isolation.checks_reads() {
            compares.extend(state.reads.iter().map(|(key, read)| {
                Compare::mod_revision(key.clone(), CompareOp::Equal, read.mod_revision)
            }));
            // No key in a range read was created or changed after it (deletions fail the
            // per-key compares above).
            compares.extend(state.ranges.iter().map(|r| {
                Compare::mod_revision(r.start.clone(), CompareOp::Less, r.revision + 1)
                    .with_range(r.end.clone())
            }));
        }
        if let (Isolation::SerializableSnapshot, Some(snapshot)) = (self.isolation, state.snapshot)
        {
            compares.extend(
                state
                    .writes
                    .keys()
                    .map(|key| Compare::mod_revision(key.clone(), CompareOp::Less, snapshot + 1)),
            );
        }
        compares
    }

    /// Commits: `Some(revision)` if it did; `None` on a conflict, with the keys read
    /// fetched anew by the commit's else-branch, returned as the next attempt's prefetch.
    async fn commit(&self) -> Result<Result<i64, Prefetch>, Error> {
        let (txn, read_keys, read_only, compares, writes) = {
            let state = self.state();
            let read_keys: Vec<Vec<u8>> = state.reads.keys().cloned().collect();
            let read_only = state.writes.is_empty();
            if read_only {
                match self.isolation {
                    // Every read was at the snapshot revision, prefetched keys included
                    // (`State::read_at`): the reads are the store at one revision, which
                    // was the current one during this run (the first linearizable read,
                    // the prefetch or the failed commit that fetched them). Nothing to
                    // check, no round trip.
                    Isolation::SerializableSnapshot | Isolation::Serializable => {
                        return Ok(Ok(state.snapshot.unwrap_or(0)))
                    }
                    Isolation::ReadCommitted => return Ok(Ok(0)),
                    Isolation::RepeatableReads
                        if read_keys.is_empty() && state.ranges.is_empty() =>
                    {
                        return Ok(Ok(0))
                    }
                    Isolation::RepeatableReads => {}
                }
            }
            let writes: Vec<TxnOp> = state
                .writes
                .iter()
                .map(|(key, value)| match value {
                    Some(v) => TxnOp::put(key.clone(), v.clone(), None),
                    None => TxnOp::delete(key.clone(), None),
                })
                .collect();
            let compares = self.compares(&state);
            // The else-branch (the next attempt's prefetch) only runs when a check failed.
            let gets: Vec<TxnOp> = if compares.is_empty() {
                Vec::new()
            } else {
                read_keys
                    .iter()
                    .map(|k| TxnOp::get(k.clone(), None))
                    .collect()
            };
            let counts = (compares.len(), writes.len());
            let txn = Txn::new().when(compares).and_then(writes).or_else(gets);
            (txn, read_keys, read_only, counts.0, counts.1)
        };
        let sent = if read_only {
            // Only checks (RepeatableReads): a read-only Txn, never cancelled in flight.
            self.detached_txn(txn).await
        } else {
            match send_txn(&self.client, self.timeout, txn).await {
                // The answer is lost, not the request: it may have been applied.
                Err(e) if e.is_transient() => return Err(Error::CommitUncertain(Box::new(e))),
                other => other,
            }
        };
        let resp = match sent {
            Err(e) if status_says(&e, "too many operations in txn request") => {
                return Err(Error::InvalidArgument(format!(
                    "the commit has {compares} compares, {writes} writes and {} reads, more \
                     than etcd's --max-txn-ops allows in one list (128 by default): at the \
                     levels that check reads every key read is compared, range reads \
                     included; nothing was written ({e})",
                    read_keys.len()
                )))
            }
            other => other?,
        };
        let revision = header_revision(resp.header())?;
        if resp.succeeded() {
            return Ok(Ok(revision));
        }
        Ok(Err(Prefetch {
            at: revision,
            reads: read_keys
                .into_iter()
                .zip(reads_of(resp.op_responses()))
                .collect(),
        }))
    }
}

/// Keys read ahead for the next attempt, at one revision.
#[derive(Default)]
struct Prefetch {
    at: i64,
    reads: BTreeMap<Vec<u8>, Read>,
}

/// Sends `txn` within `timeout`, once more with a fresh auth token if the first was stale.
async fn send_txn(
    client: &Client,
    timeout: Duration,
    txn: Txn,
) -> Result<etcd_client::TxnResponse, Error> {
    renewing_auth(client, || {
        let mut kv = client.kv_client();
        let txn = txn.clone();
        async move { within(timeout, kv.txn(txn)).await }
    })
    .await
}

fn reads_of(responses: Vec<TxnOpResponse>) -> Vec<Read> {
    responses
        .into_iter()
        .map(|r| match r {
            TxnOpResponse::Get(g) => Read::of(g.kvs().first()),
            _ => Read::of(None),
        })
        .collect()
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<i64, Error> {
    header
        .map(|h| h.revision())
        .ok_or_else(|| Error::Protocol("a response without a header".into()))
}

fn status_says(e: &Error, what: &str) -> bool {
    matches!(e, Error::Etcd(etcd_client::Error::GRpcStatus(s)) if s.message().contains(what))
}

/// A member behind the requested revision (etcd's `ErrFutureRev`).
fn future_revision(e: &Error) -> bool {
    status_says(e, "required revision is a future revision")
}

/// The requested revision was compacted away (etcd's `ErrCompacted`).
fn compacted(e: &Error) -> bool {
    status_says(e, "required revision has been compacted")
}
