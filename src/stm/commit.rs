//! Committing an attempt: one Txn whose compares are the isolation level's checks, whose
//! else-branch reads anew what the attempt read (the next attempt's prefetch).

use std::collections::BTreeMap;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::attempt::{header_revision, reads_of, Attempt, Read, State};
use super::Isolation;
use crate::Error;

impl Attempt {
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
    pub(super) async fn commit(&self) -> Result<Result<i64, Prefetch>, Error> {
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
        // Only checks (RepeatableReads) make a read-only Txn, which the request layer never
        // cancels in flight.
        let sent = match self.rpc.txn(txn).await {
            // The answer of a write is lost, not the request: it may have been applied.
            Err(e) if !read_only && e.is_retryable() => {
                return Err(Error::CommitUncertain(Box::new(e)))
            }
            other => other,
        };
        let resp = match sent {
            Err(e) if e.is_too_many_ops() => {
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
pub(super) struct Prefetch {
    pub(super) at: i64,
    pub(super) reads: BTreeMap<Vec<u8>, Read>,
}
