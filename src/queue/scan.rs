//! Finding claimable jobs: a page of job keys in key order (the highest priority first, then
//! the job that became ready first), skipping the claimed ones and, within a priority, the
//! ones not ready yet — which, keyed by ready time, all come after the ready ones, so the walk
//! jumps to the next priority instead of reading them. Keys only: a claim reads the payload
//! in its own Txn.

use std::collections::HashSet;
use std::sync::Arc;

use etcd_client::{GetOptions, GetResponse};

use super::layout::Keys;
use crate::backoff::Backoff;
use crate::keys::prefix_end;
use crate::session::Session;
use crate::Error;

/// A job that was ready and unclaimed when read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Candidate {
    pub(super) key: String,
    pub(super) id: String,
    /// Its priority's rank (0: the highest priority).
    pub(super) rank: u8,
    /// Its key's mod revision when read: a claim applies only if the job is unchanged since.
    pub(super) mod_revision: i64,
}

/// What a scan found.
#[derive(Debug, Default)]
pub(super) struct Scan {
    /// Ready, unclaimed jobs, in claim order.
    pub(super) candidates: Vec<Candidate>,
    /// The earliest ready time (µs since the Unix epoch) of a job seen not ready yet.
    pub(super) next_ready_us: Option<u64>,
    /// The revision the scan shows the queue at (the older of its reads', if etcd could not
    /// answer one at the other's).
    pub(super) revision: i64,
    /// How many claims exist.
    pub(super) claims: usize,
    /// The leases the claims are under.
    pub(super) claimers: HashSet<i64>,
}

/// The walk over pages of job keys.
pub(super) struct Walk<'a> {
    keys: &'a Keys,
    claimed: HashSet<String>,
    now_us: u64,
    want: usize,
    /// The priority whose ready jobs are all seen (a job of it was not ready).
    skip_rank: Option<u8>,
    pub(super) scan: Scan,
}

impl<'a> Walk<'a> {
    /// A walk that collects up to `want` candidates ready at `now_us`, given the claimed ids.
    pub(super) fn new(
        keys: &'a Keys,
        claimed: HashSet<String>,
        now_us: u64,
        want: usize,
    ) -> Walk<'a> {
        let claims = claimed.len();
        Walk {
            keys,
            claimed,
            now_us,
            want,
            skip_rank: None,
            scan: Scan {
                claims,
                ..Scan::default()
            },
        }
    }

    /// Visits one job key; true once enough candidates are found.
    pub(super) fn visit(&mut self, key: &[u8], mod_revision: i64) -> bool {
        let Some(job) = self.keys.parse_job(key) else {
            return false; // not a job key of ours: ignored
        };
        if self.skip_rank == Some(job.rank) || self.claimed.contains(&job.id) {
            return false;
        }
        if job.ready_us > self.now_us {
            let next = self.scan.next_ready_us.get_or_insert(job.ready_us);
            *next = (*next).min(job.ready_us);
            self.skip_rank = Some(job.rank);
            return false;
        }
        self.scan.candidates.push(Candidate {
            key: String::from_utf8_lossy(key).into_owned(),
            id: job.id,
            rank: job.rank,
            mod_revision,
        });
        self.scan.candidates.len() >= self.want
    }

    /// Where the page after one ending with `last` starts: past the rest of a priority whose
    /// ready jobs are all seen, else just after `last`.
    pub(super) fn next_start(&self, last: &[u8]) -> Vec<u8> {
        match (self.keys.parse_job(last), self.skip_rank) {
            (Some(job), Some(rank)) if job.rank == rank => {
                self.keys.jobs_from_rank(rank + 1).into_bytes()
            }
            _ => {
                let mut next = last.to_vec();
                next.push(0);
                next
            }
        }
    }
}

/// The job keys from `start` to the end of the jobs, a page of `limit`.
fn page(keys: &Keys, limit: usize) -> GetOptions {
    let end = prefix_end(keys.jobs().as_bytes());
    GetOptions::new()
        .with_range(end)
        .with_keys_only()
        .with_limit(i64::try_from(limit).unwrap_or(i64::MAX))
}

/// The claimed job ids in a read of the claims.
fn claimed_ids(keys: &Keys, read: &GetResponse) -> HashSet<String> {
    let prefix = keys.claims();
    read.kvs()
        .iter()
        .filter_map(|kv| std::str::from_utf8(kv.key()).ok()?.strip_prefix(&prefix))
        .map(str::to_owned)
        .collect()
}

/// A plain range read of `key` with `opts`, retried while the session lives. Not a Txn: etcd
/// 3.5.0–3.5.4 crashes when a read-only Txn's request is cancelled while it is applied
/// (etcd #14110), and a worker killed mid-read cancels its requests; a range read is not
/// applied that way.
async fn get(session: &Arc<Session>, key: Vec<u8>, opts: GetOptions) -> Result<GetResponse, Error> {
    let read = || session.rpc.get(key.clone(), opts.clone());
    let mut backoff = Backoff::for_requests();
    Ok(session
        .rpc
        .until_answered(read, &mut backoff, &**session)
        .await?
        .resp)
}

/// [`get`] at `revision`: `None` if etcd cannot answer at that revision (compacted since, or
/// not yet applied by the member that answers) — the caller does without.
async fn at(
    session: &Arc<Session>,
    key: Vec<u8>,
    opts: GetOptions,
    revision: i64,
) -> Result<Option<GetResponse>, Error> {
    match get(session, key, opts.with_revision(revision)).await {
        Ok(read) => Ok(Some(read)),
        Err(e) => {
            session.check()?;
            tracing::debug!(error = %e, revision, "scan: no read at that revision");
            Ok(None)
        }
    }
}

/// The revision a read answered at.
fn revision_of(read: &GetResponse) -> i64 {
    read.header().map_or(0, |h| h.revision())
}

/// Scans the queue for up to `want` claimable jobs, reading pages sized for `claims_hint`
/// claims ahead of them: the first page and the claims at once (two range reads, side by
/// side), more pages only when one held nothing claimable (all claimed, or not ready).
pub(super) async fn scan(
    session: &Arc<Session>,
    keys: &Keys,
    want: usize,
    claims_hint: usize,
) -> Result<Scan, Error> {
    scan_with(session, keys, want, claims_hint, false).await
}

/// [`scan`], and if `serializable`, with serializable reads: as the member that answers has
/// the queue, without waiting for etcd's read index — which, under a burst of claims, waits
/// until every claim committed before the read is applied. A claim applies only to a job
/// unchanged since the read and unclaimed, so an old read costs a failed claim at worst;
/// but it may miss jobs, so a serializable read that finds none says nothing.
pub(super) async fn scan_with(
    session: &Arc<Session>,
    keys: &Keys,
    want: usize,
    claims_hint: usize,
    serializable: bool,
) -> Result<Scan, Error> {
    let limit = claims_hint + want + 8;
    let consistency = |opts: GetOptions| match serializable {
        true => opts.with_serializable(),
        false => opts,
    };
    let page = |limit| consistency(page(keys, limit));
    let claims_opts = consistency(GetOptions::new().with_prefix().with_keys_only());
    let (jobs_key, claims_key) = (keys.jobs().into_bytes(), keys.claims().into_bytes());
    let (mut jobs, mut claims) = tokio::try_join!(
        get(session, jobs_key.clone(), page(limit)),
        get(session, claims_key.clone(), claims_opts.clone()),
    )?;
    // Side by side, the two reads may answer at different revisions; a claim made or ended
    // between them shows its job free when it is not (a failed claim round). The older is
    // read again at the newer's revision: then both show the queue at one revision.
    let (at_jobs, at_claims) = (revision_of(&jobs), revision_of(&claims));
    if at_jobs < at_claims {
        jobs = at(session, jobs_key, page(limit), at_claims)
            .await?
            .unwrap_or(jobs);
    } else if at_claims < at_jobs {
        claims = at(session, claims_key, claims_opts, at_jobs)
            .await?
            .unwrap_or(claims);
    }
    let now_us = super::layout::micros(std::time::SystemTime::now());
    let mut walk = Walk::new(keys, claimed_ids(keys, &claims), now_us, want);
    walk.scan.claimers = claims.kvs().iter().map(|kv| kv.lease()).collect();
    // Whatever either read saw is seen at the older of the two revisions.
    walk.scan.revision = revision_of(&jobs).min(revision_of(&claims));
    loop {
        let mut enough = false;
        for kv in jobs.kvs() {
            if walk.visit(kv.key(), kv.mod_revision()) {
                enough = true;
                break;
            }
        }
        if enough || !jobs.more() || !walk.scan.candidates.is_empty() {
            break;
        }
        let Some(last) = jobs.kvs().last() else { break };
        let start = walk.next_start(last.key());
        tracing::debug!(limit, "scan: reading another page");
        let (rest, revision) = (page(limit), walk.scan.revision);
        jobs = match at(session, start.clone(), rest.clone(), revision).await? {
            Some(jobs) => jobs,
            None => get(session, start, rest).await?,
        };
    }
    tracing::debug!(
        candidates = walk.scan.candidates.len(),
        claims = walk.scan.claims,
        "scan"
    );
    Ok(walk.scan)
}

#[cfg(test)]
mod tests {
    use super::super::layout::{JobId, MAX_PRIORITY};
    use super::*;

    fn keys() -> Keys {
        Keys::of(&Keys::named("q".into())).unwrap()
    }

    #[test]
    fn the_walk_takes_ready_unclaimed_jobs_in_order_and_jumps_past_waiting_ones() {
        let k = keys();
        let ids: Vec<JobId> = (0..5).map(|_| JobId::random()).collect();
        // Priority 9: one ready, one claimed, one not ready; priority 3: two ready.
        let jobs = [
            k.job(MAX_PRIORITY, 10, &ids[0]),
            k.job(MAX_PRIORITY, 20, &ids[1]),
            k.job(MAX_PRIORITY, 500, &ids[2]),
            k.job(3, 30, &ids[3]),
            k.job(3, 40, &ids[4]),
        ];
        let claimed: HashSet<String> = [ids[1].0.clone()].into();
        let mut walk = Walk::new(&k, claimed, 100, 10);
        for (i, j) in jobs.iter().enumerate() {
            assert!(!walk.visit(j.as_bytes(), i as i64 + 1));
        }
        let got: Vec<&str> = walk.scan.candidates.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(got, [ids[0].as_str(), ids[3].as_str(), ids[4].as_str()]);
        assert_eq!(walk.scan.next_ready_us, Some(500));
        // A page ending among priority 9's waiting jobs continues at priority 8.
        assert_eq!(
            walk.next_start(jobs[2].as_bytes()),
            k.jobs_from_rank(1).into_bytes()
        );
        // Elsewhere, just after the last key.
        let mut after = jobs[4].clone().into_bytes();
        after.push(0);
        assert_eq!(walk.next_start(jobs[4].as_bytes()), after);
    }

    #[test]
    fn the_walk_stops_once_it_has_enough() {
        let k = keys();
        let mut walk = Walk::new(&k, HashSet::new(), 100, 2);
        assert!(!walk.visit(k.job(0, 1, &JobId::random()).as_bytes(), 1));
        assert!(walk.visit(k.job(0, 2, &JobId::random()).as_bytes(), 2));
        assert!(!walk.visit(b"q/#queue/jobs/not-a-job", 3));
    }
}
