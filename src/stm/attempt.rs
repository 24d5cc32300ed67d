//! One attempt of an STM transaction: its reads (at one revision for the snapshot levels),
//! cached for the attempt, and its buffered writes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex as StdMutex};

use etcd_client::{GetOptions, GetResponse, KeyValue, Txn, TxnOp, TxnOpResponse};

use super::Isolation;
#[cfg(doc)]
use super::Stm;
use crate::rpc::Rpc;
use crate::Error;

/// What made an attempt void, whatever the closure returned.
#[derive(Debug, Clone, Copy)]
pub(super) enum Void {
    /// Its snapshot can no longer be read (compacted away): start over.
    Conflict,
    /// A read failed in a way worth another attempt.
    Transient,
    /// A read failed in a way retrying cannot fix.
    Failed,
}

/// A key as one attempt read it.
#[derive(Debug, Clone)]
pub(super) struct Read {
    pub(super) value: Option<Vec<u8>>,
    /// 0 for a key that did not exist.
    pub(super) mod_revision: i64,
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
    pub(super) inner: Arc<Attempt>,
}

/// The state of one attempt, behind its handles.
pub(super) struct Attempt {
    pub(super) rpc: Rpc,
    pub(super) isolation: Isolation,
    pub(super) state: StdMutex<State>,
    /// Held across a read's request: one read at a time (the first fixes the snapshot).
    pub(super) reading: tokio::sync::Mutex<()>,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) reads: BTreeMap<Vec<u8>, Read>,
    /// `None`: deleted.
    pub(super) writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// The revision every read of this attempt is at (snapshot levels), once read.
    pub(super) snapshot: Option<i64>,
    /// Keys read by the last failed commit (or the prefetch), at `prefetched_at`.
    pub(super) prefetched: BTreeMap<Vec<u8>, Read>,
    pub(super) prefetched_at: i64,
    /// A member could not serve a read at the snapshot revision: read linearizably at it.
    pub(super) linearizable: bool,
    /// Ranges read, each with the revision it was read at; every key found is in `reads`.
    pub(super) ranges: Vec<RangeRead>,
    pub(super) void: Option<Void>,
}

/// A range `[start, end)` an attempt read, at `revision`.
#[derive(Debug, Clone)]
pub(super) struct RangeRead {
    pub(super) start: Vec<u8>,
    pub(super) end: Vec<u8>,
    pub(super) revision: i64,
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
            Some(_) => Err(Error::Misuse(
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
                    e if e.is_retryable() => Void::Transient,
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
    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, State> {
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
                Err(e) if at.is_some() && !linearizable && e.is_future_revision() => {
                    // This member lags behind the revision (etcd #11963): read this page
                    // again at it, linearizably — the member first catches up.
                    linearizable = true;
                    continue;
                }
                Err(e) if e.is_compacted() => return Err(Error::Conflict),
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
        self.rpc.get(key, options).await
    }

    /// Reads `keys` in one request (a read-only Txn, detached), for the first attempt.
    pub(super) async fn prefetch(&self, keys: &[Vec<u8>]) -> Result<(), Error> {
        let gets: Vec<TxnOp> = keys.iter().map(|k| TxnOp::get(k.clone(), None)).collect();
        // A read-only Txn: the request layer never cancels it in flight (etcd #14110).
        let resp = self.rpc.txn(Txn::new().and_then(gets)).await?;
        let mut state = self.state();
        state.prefetched_at = header_revision(resp.header())?;
        state.prefetched = keys
            .iter()
            .cloned()
            .zip(reads_of(resp.op_responses()))
            .collect();
        Ok(())
    }
}

pub(super) fn reads_of(responses: Vec<TxnOpResponse>) -> Vec<Read> {
    responses
        .into_iter()
        .map(|r| match r {
            TxnOpResponse::Get(g) => Read::of(g.kvs().first()),
            _ => Read::of(None),
        })
        .collect()
}

pub(super) fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<i64, Error> {
    header
        .map(|h| h.revision())
        .ok_or_else(|| Error::Protocol("a response without a header".into()))
}
