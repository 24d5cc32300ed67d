//! Claiming: one Txn, and in it one *chain* per job wanted. A chain tries its candidates in
//! order, each in a Txn nested in the else-branch of the one before, and claims the first
//! that is still free when etcd applies it:
//!
//! ```text
//! If(ModRevision(job₁) == read₁, CreateRevision(claims/<id₁>) == 0)
//! Then(Put(job₁, ignore_value), Put(claims/<id₁>, unique value, our lease), Get(job₁))
//! Else(Txn(the same for job₂, …))
//! ```
//!
//! etcd applies Txns one after another, so claimers that read the queue at the same moment
//! and whose chains share candidates take different ones in one round trip each: a claim is
//! lost (and read again) only when every candidate of its chain was taken since its read. A
//! chain tries the first ready job first and then goes on at a random place (see
//! `WorkQueue::spread`), so that a burst of claimers spreads over the queue.
//!
//! The put with `ignore_value` bumps the job key's version without sending its payload again:
//! the version counts the deliveries (see `layout::Header::attempts`), also those whose
//! claimer died with its lease. The claim key is under the claimer's lease, so a dead
//! claimer's claims vanish with its lease and the jobs are claimable again.
//!
//! The claim's chains go to etcd merged with the other Txns that the session and its siblings
//! send at that moment (`rpc::batch`: each chain stays a Txn nested on its own; claims whose
//! chains share a job go in different Txns). They are sent detached
//! (`engine::detached`): a caller that drops its future mid-request never strands a claim —
//! the session's task finishes the request, and whatever was won is released by the
//! session's task. A
//! retry after an unanswered attempt must find what that attempt may have claimed: its
//! chains check each candidate's claim key for the attempt's unique value before going on
//!
//! ```text
//! … Else(Txn(If(Value(claims/<id₁>) == that unique value)        — an earlier attempt's claim
//!            Then(Get(claims/<id₁>), Get(job₁))
//!            Else(Txn(the same for job₂, …))))
//! ```
//!
//! and stop there. The first attempt has no earlier one to find and leaves the check out:
//! three operations per candidate instead of five, and half the nesting, for etcd to check,
//! log and apply. A copy of an attempt that lands later than every answer can only apply
//! where its job is still unchanged since the read; whenever an attempt went unanswered, the
//! session sweeps the attempt's values off the claim keys it did not win, until each one's
//! job has changed since the read and no copy is left (no copy can apply after that; a copy
//! that lands changes its job itself), or the lease ends.

use std::sync::Arc;

use etcd_client::{Compare, CompareOp, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse};

use super::claimed::{Claimed, Job};
use super::layout::{decode, JobId, Keys};
use super::scan::Candidate;
use super::share::{Claims, GivesBack};
use crate::engine::cleanup::{Afterwards, Cleanup, Sweep};
use crate::engine::detached::detached;
use crate::engine::ticket::Acquired;
use crate::engine::{Holding, SessionKeys};
use crate::keys::txn_gets;
use crate::rpc::batch::{Batcher, Slice};
use crate::rpc::{Stop, Unanswered};
use crate::session::Session;
use crate::{Error, LeasedSession};

/// One candidate of a chain: the job, its claim key and the value unique to this attempt.
#[derive(Clone)]
struct Slot {
    job: Candidate,
    claim: String,
    value: Vec<u8>,
}

impl Slot {
    /// The sweep of late copies of this slot's claim: until its job has changed since the
    /// read (a copy's compare needs it unchanged) and no copy is left, or the lease ends.
    fn sweep(&self, lease: i64) -> Sweep {
        Sweep::of_value_while_unchanged(
            &self.claim,
            lease,
            self.value.clone(),
            &self.job.key,
            self.job.mod_revision,
        )
    }
}

/// Hands `session` a sweep of each slot of `chains` but those of the jobs `won`: the claims a
/// copy of an unanswered attempt may still make.
fn sweep_all_but(session: &Session, chains: &[Vec<Slot>], lease: i64, won: &[&str]) {
    for slot in chains.iter().flatten() {
        if !won.contains(&slot.job.key.as_str()) {
            session.clean_up(Cleanup::Sweep(slot.sweep(lease)));
        }
    }
}

/// A claim won: its holding (released if dropped) and the job as the claim read it.
pub(super) struct Won {
    holding: Holding,
    job_key: String,
    job: KeyValue,
}

/// What a claim round trip came to.
pub(super) struct Round {
    /// The claims won, as guards (jobs past their last attempt already moved to the dead
    /// letters).
    pub(super) claimed: Vec<Claimed>,
    /// Some chain found its first candidate taken since the read: other claimers are about.
    pub(super) contended: bool,
    /// The revision the claim was answered at.
    pub(super) revision: i64,
}

/// Claims up to `chains.len()` jobs through `leased` in one round trip, each chain its
/// candidates in order; each job won is tied to its `family` ([`GivesBack`]). Cancel-safe
/// (see the module's docs).
pub(super) async fn claim(
    leased: &LeasedSession,
    keys: &Keys,
    max_attempts: u32,
    chains: Vec<Vec<Candidate>>,
    family: &Arc<Claims>,
) -> Result<Round, Error> {
    let session = leased.inner();
    session.check()?;
    let lease = session.lease_id;
    let wanted = chains.len();
    let chains: Vec<Vec<Slot>> = chains
        .into_iter()
        .map(|chain| {
            chain
                .into_iter()
                .map(|job| Slot {
                    claim: keys.claim(&job.id),
                    value: format!("{:016x}", rand::random::<u64>()).into_bytes(),
                    job,
                })
                .collect()
        })
        .collect();
    let ops = |checked| {
        chains
            .iter()
            .map(|c| chain_txn(c, lease, checked))
            .collect::<Vec<_>>()
    };
    let (first, retry) = (ops(false), ops(true));
    let work = {
        let (leased, chains) = (leased.clone(), chains.clone());
        async move {
            let session = leased.inner();
            // Merged with the claims (and acks) of the session's siblings sent meanwhile.
            let batcher = session.family_extension(Batcher::default);
            let stop: Arc<dyn Stop> = Arc::clone(session) as Arc<dyn Stop>;
            let answered = batcher.txn(&session.rpc, first, retry, stop).await?;
            // An answer after an unanswered attempt is a retry's: checked.
            let uncertain = answered.uncertain;
            let revision = answered.resp.revision;
            let mut contended = false;
            let won = read_answer(&leased, &answered.resp, &chains, uncertain, &mut contended)
                .map_err(|error| Unanswered { error, uncertain })?;
            if uncertain {
                // An earlier attempt may still land and claim a candidate this answer did not.
                let won: Vec<&str> = won.iter().map(|w| w.job_key.as_str()).collect();
                sweep_all_but(session, &chains, lease, &won);
            }
            Ok((won, contended, revision))
        }
    };
    let owner = Arc::clone(session);
    let (outcome, contended, revision) = detached(session, work, move |outcome| {
        // Stopped without a definite answer: a copy may still land. (An `Ok` carries its own
        // guards, which release what was won if nobody takes them.)
        if matches!(outcome, Err(u) if u.uncertain) {
            sweep_all_but(&owner, &chains, lease, &[]);
        }
        None
    })
    .await?;
    tracing::debug!(wanted, won = outcome.len(), "claim");
    let mut claimed = Vec::with_capacity(outcome.len());
    for won in outcome {
        let kv = won.job;
        let (header, payload) = decode(kv.key(), kv.value())?;
        let attempt = header.attempts(kv.version());
        let job = Job {
            keys: keys.clone(),
            key: won.job_key,
            create_revision: kv.create_revision(),
            version: kv.version(),
            id: JobId(header.id.clone()),
            attempt,
            header,
            payload,
            gives_back: GivesBack::new(family),
        };
        let guard = Claimed::from_holding(won.holding, job);
        if attempt > max_attempts {
            guard.dead_letter().await?;
        } else {
            claimed.push(guard);
        }
    }
    Ok(Round {
        claimed,
        contended,
        revision,
    })
}

/// The Txn of one chain: its first candidate, and the rest nested in the else-branch — after
/// the check that stops the chain at a claim an earlier attempt of this one made, if
/// `checked` (a retry; see the module's docs).
fn chain_txn(chain: &[Slot], lease: i64, checked: bool) -> TxnOp {
    let mut next: Option<TxnOp> = None;
    for slot in chain.iter().rev() {
        let (job, claim) = (slot.job.key.as_str(), slot.claim.as_str());
        let rest = next.take().into_iter().collect::<Vec<_>>();
        let otherwise = match checked {
            true => vec![TxnOp::txn(
                Txn::new()
                    .when([Compare::value(claim, CompareOp::Equal, slot.value.clone())])
                    .and_then([TxnOp::get(claim, None), TxnOp::get(job, None)])
                    .or_else(rest),
            )],
            false => rest,
        };
        next = Some(TxnOp::txn(
            Txn::new()
                .when([
                    Compare::mod_revision(job, CompareOp::Equal, slot.job.mod_revision),
                    Compare::create_revision(claim, CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(job, Vec::new(), Some(PutOptions::new().with_ignore_value())),
                    TxnOp::put(
                        claim,
                        slot.value.clone(),
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                    TxnOp::get(job, None),
                ])
                .or_else(otherwise),
        ));
    }
    next.unwrap_or_else(|| TxnOp::txn(Txn::new()))
}

/// The claims an answer shows won: applied now, or — in the answer to a `checked` attempt —
/// by an earlier, unanswered attempt (the claim key holds that attempt's value on our lease).
fn read_answer(
    leased: &LeasedSession,
    answer: &Slice,
    chains: &[Vec<Slot>],
    checked: bool,
    contended: &mut bool,
) -> Result<Vec<Won>, Error> {
    let revision = answer.revision;
    let subs = txns(answer.ops.iter().cloned());
    if subs.len() != chains.len() {
        return Err(Error::Protocol(format!(
            "a claim of {} jobs answered for {}",
            chains.len(),
            subs.len()
        )));
    }
    let mut won = Vec::new();
    for (sub, chain) in subs.iter().zip(chains) {
        let before = won.len();
        // The first candidate taken since the read (the chain went on, or won nothing).
        *contended |= !sub.succeeded() && !chain.is_empty();
        read_chain(leased, sub, chain, revision, checked, &mut won)?;
        *contended |= won.len() == before;
    }
    Ok(won)
}

/// The Txns among `ops`.
fn txns(ops: impl IntoIterator<Item = TxnOpResponse>) -> Vec<etcd_client::TxnResponse> {
    ops.into_iter()
        .filter_map(|op| match op {
            TxnOpResponse::Txn(sub) => Some(sub),
            _ => None,
        })
        .collect()
}

/// The Txns nested directly in `resp`'s branch.
fn nested(resp: &etcd_client::TxnResponse) -> Vec<etcd_client::TxnResponse> {
    txns(resp.op_responses())
}

/// What one chain's answer `resp` shows won, into `won`: the first free candidate, or (if
/// `checked`) the one an earlier attempt claimed.
fn read_chain(
    leased: &LeasedSession,
    resp: &etcd_client::TxnResponse,
    chain: &[Slot],
    revision: i64,
    checked: bool,
    won: &mut Vec<Won>,
) -> Result<(), Error> {
    let Some((slot, rest)) = chain.split_first() else {
        return Ok(());
    };
    let hold = |create_revision: i64| {
        let acquired = Acquired {
            key: slot.claim.clone(),
            create_revision,
            revision,
            after: Afterwards::Nothing,
            // A claim key is no member of a line: nobody waits for its successor's pointer.
            announces: false,
            member: None,
        };
        Holding::new(leased.clone(), acquired)
    };
    let missing = || Error::Protocol(format!("a claim of {} without its job", slot.job.key));
    let first = |r: &etcd_client::TxnResponse, i: usize| {
        txn_gets(r).get(i).and_then(|g| g.kvs().first()).cloned()
    };
    if resp.succeeded() {
        let job = first(resp, 0).ok_or_else(missing)?;
        won.push(Won {
            holding: hold(revision),
            job_key: slot.job.key.clone(),
            job,
        });
        return Ok(());
    }
    let Some(otherwise) = nested(resp).into_iter().next() else {
        return Ok(());
    };
    if !checked {
        return read_chain(leased, &otherwise, rest, revision, checked, won);
    }
    let ours = otherwise;
    if ours.succeeded() {
        // An earlier, unanswered attempt of this claim took this candidate: the chain ends.
        let claim = first(&ours, 0).ok_or_else(missing)?;
        won.push(Won {
            holding: hold(claim.create_revision()),
            job_key: slot.job.key.clone(),
            job: first(&ours, 1).ok_or_else(missing)?,
        });
        return Ok(());
    }
    match nested(&ours).first() {
        Some(next) => read_chain(leased, next, rest, revision, checked, won),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use etcd_client::proto::PbTxnRequest;

    use super::*;
    use crate::queue::{chain_len, MAX_BATCH, TXN_OPS};
    use crate::rpc::batch::fits;

    fn slot(i: usize) -> Slot {
        Slot {
            job: Candidate {
                // Of every rank: a witness per directory.
                key: format!("q/#queue/jobs/{}/{i:017}-{i:016x}", i % 10),
                id: format!("{i:016x}"),
                rank: 0,
                mod_revision: i as i64 + 1,
            },
            claim: format!("q/#queue/claims/{i:016x}"),
            value: b"0123456789abcdef".to_vec(),
        }
    }

    #[test]
    fn every_claim_fits_etcds_operations_for_a_txn_as_first_sent_and_as_retried() {
        for n in 1..=MAX_BATCH {
            let len = chain_len(n);
            let chains: Vec<Vec<Slot>> = (0..n)
                .map(|c| (0..len).map(|i| slot(c * len + i)).collect())
                .collect();
            for checked in [false, true] {
                // As sent: with the witnesses of its permissions (`rpc::witness`).
                let txn = crate::rpc::witness::compareless(
                    chains
                        .iter()
                        .map(|c| chain_txn(c, 7, checked))
                        .collect::<Vec<_>>(),
                );
                assert!(
                    fits(&PbTxnRequest::from(txn), TXN_OPS),
                    "{n} chains of {len}, checked: {checked}"
                );
            }
        }
    }
}
