//! Claiming: one Txn claims one or several jobs, each in a nested Txn of its own that applies
//! only if the job is unchanged since it was read and nobody claims it —
//!
//! ```text
//! If(ModRevision(job) == read, CreateRevision(claims/<id>) == 0)
//! Then(Put(job, ignore_value), Put(claims/<id>, unique value, our lease), Get(job))
//! Else(Get(claims/<id>), Get(job))
//! ```
//!
//! The put with `ignore_value` bumps the job key's version without sending its payload again:
//! the version counts the deliveries (see `layout::Header::attempts`), also those whose
//! claimer died with its lease. The claim key is under the claimer's lease, so a dead claimer's
//! claims vanish with its lease and the jobs are claimable again.
//!
//! The Txn is sent in a detached task (`engine::detached`): a caller that drops its future
//! mid-request never strands a claim — whatever was won is released by the session's task. A
//! retry after an unanswered attempt finds its own claim by the attempt's unique value; a copy
//! of an attempt that lands later than every answer can only apply if the job is still
//! unchanged, and if the caller stopped without a definite answer, the session sweeps that one
//! value off the claim key for as long as its lease lives.

use std::sync::Arc;

use etcd_client::{Compare, CompareOp, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse};

use super::claimed::{Claimed, Job};
use super::layout::{decode, JobId, Keys};
use super::scan::Candidate;
use crate::backoff::Backoff;
use crate::engine::cleanup::{Afterwards, Cleanup, Sweep};
use crate::engine::detached::detached;
use crate::engine::ticket::Acquired;
use crate::engine::{Holding, SessionKeys};
use crate::keys::{header_revision, txn_gets};
use crate::rpc::Unanswered;
use crate::{Error, LeasedSession};

/// A claim won: its holding (released if dropped) and the job as the claim read it.
pub(super) struct Won {
    holding: Holding,
    job: KeyValue,
}

/// What one claim round trip came to.
pub(super) struct Round {
    /// The claims won, as guards (jobs past their last attempt already moved to the dead
    /// letters).
    pub(super) claimed: Vec<Claimed>,
    /// How many candidates another claimer took first.
    pub(super) lost: usize,
}

/// Claims `chosen` through `leased` in one round trip. Cancel-safe (see the module's docs).
pub(super) async fn claim(
    leased: &LeasedSession,
    keys: &Keys,
    max_attempts: u32,
    chosen: Vec<Candidate>,
) -> Result<Round, Error> {
    let session = leased.inner();
    session.check()?;
    let lease = session.lease_id;
    let claims: Vec<(String, Vec<u8>)> = chosen
        .iter()
        .map(|c| {
            let value = format!("{:016x}\n{}", rand::random::<u64>(), c.key).into_bytes();
            (keys.claim(&c.id), value)
        })
        .collect();
    let txn = claim_txn(&chosen, &claims, lease);
    let work = {
        let (leased, claims) = (leased.clone(), claims.clone());
        async move {
            let session = leased.inner();
            let answered = session
                .rpc
                .txn_until_answered(|| txn.clone(), &mut Backoff::for_requests(), &**session)
                .await?;
            let uncertain = answered.uncertain;
            read_answer(&leased, &answered.resp, &claims)
                .map_err(|error| Unanswered { error, uncertain })
        }
    };
    let owner = Arc::clone(session);
    let outcome = detached(session, work, move |outcome| {
        // Stopped without a definite answer: a copy may still land. (An `Ok` carries its own
        // guards, which release what was won if nobody takes them.)
        if matches!(outcome, Err(u) if u.uncertain) {
            for (key, value) in claims {
                owner.clean_up(Cleanup::Sweep(Sweep::of_value(&key, lease, value)));
            }
        }
        None
    })
    .await?;
    let lost = chosen.len() - outcome.len();
    let mut claimed = Vec::with_capacity(outcome.len());
    for won in outcome {
        let (header, payload) = decode(won.job.key(), won.job.value())?;
        let attempt = header.attempts(won.job.version());
        let job = Job {
            keys: keys.clone(),
            key: String::from_utf8_lossy(won.job.key()).into_owned(),
            create_revision: won.job.create_revision(),
            version: won.job.version(),
            id: JobId(header.id.clone()),
            attempt,
            header,
            payload,
        };
        let guard = Claimed::from_holding(won.holding, job);
        if attempt > max_attempts {
            guard.dead_letter().await?;
        } else {
            claimed.push(guard);
        }
    }
    Ok(Round { claimed, lost })
}

/// The claim Txn: one nested Txn per candidate.
fn claim_txn(chosen: &[Candidate], claims: &[(String, Vec<u8>)], lease: i64) -> Txn {
    let subs: Vec<TxnOp> = chosen
        .iter()
        .zip(claims)
        .map(|(c, (claim, value))| {
            let job = c.key.as_str();
            TxnOp::txn(
                Txn::new()
                    .when([
                        Compare::mod_revision(job, CompareOp::Equal, c.mod_revision),
                        Compare::create_revision(claim.as_str(), CompareOp::Equal, 0),
                    ])
                    .and_then([
                        TxnOp::put(job, Vec::new(), Some(PutOptions::new().with_ignore_value())),
                        TxnOp::put(
                            claim.as_str(),
                            value.clone(),
                            Some(PutOptions::new().with_lease(lease)),
                        ),
                        TxnOp::get(job, None),
                    ])
                    .or_else([TxnOp::get(claim.as_str(), None), TxnOp::get(job, None)]),
            )
        })
        .collect();
    Txn::new().and_then(subs)
}

/// The claims an answer shows won: applied now, or by an earlier, unanswered attempt (the
/// claim key holds that attempt's value on our lease).
fn read_answer(
    leased: &LeasedSession,
    resp: &etcd_client::TxnResponse,
    claims: &[(String, Vec<u8>)],
) -> Result<Vec<Won>, Error> {
    let revision = header_revision(resp)?;
    let lease = leased.lease_id();
    let subs: Vec<_> = resp
        .op_responses()
        .into_iter()
        .filter_map(|op| match op {
            TxnOpResponse::Txn(sub) => Some(sub),
            _ => None,
        })
        .collect();
    if subs.len() != claims.len() {
        return Err(Error::Protocol(format!(
            "a claim of {} jobs answered for {}",
            claims.len(),
            subs.len()
        )));
    }
    let mut won = Vec::new();
    for (sub, (claim, value)) in subs.iter().zip(claims) {
        let gets = txn_gets(sub);
        let first = |i: usize| gets.get(i).and_then(|g| g.kvs().first()).cloned();
        let (create_revision, job) = if sub.succeeded() {
            (revision, first(0))
        } else {
            match first(0) {
                Some(c) if c.lease() == lease && c.value() == value.as_slice() => {
                    (c.create_revision(), first(1))
                }
                _ => continue, // another claimer's
            }
        };
        let acquired = Acquired {
            key: claim.clone(),
            create_revision,
            revision,
            after: Afterwards::Nothing,
        };
        let holding = Holding::new(leased.clone(), acquired);
        match job {
            Some(job) => won.push(Won { holding, job }),
            // Our claim without its job cannot happen; the holding releases the claim.
            None => tracing::warn!(claim, "a claim whose job is gone; released"),
        }
    }
    Ok(won)
}
