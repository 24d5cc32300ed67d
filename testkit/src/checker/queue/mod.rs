//! Properties (k)–(o): a work queue's jobs, each acknowledged exactly once by a claimer that
//! held it, never held by two claimers at once, and claimed in time once the faults healed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::holders::{exclusion, intervals};
use super::{sorted, Event, Mode, Property, Rules, Violation};

/// What etcd held of a queue once its clients stopped: the jobs still queued or claimed
/// (by id, with the name each was enqueued under) and the dead letters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueEnd {
    /// Jobs still queued or claimed: id → job name.
    pub queued: BTreeMap<String, String>,
    /// Dead letters: id → job name.
    pub dead: BTreeMap<String, String>,
}

/// What the history says of one job (one id).
#[derive(Debug, Default)]
struct Job {
    name: Option<String>,
    /// Its claims: token, client, when.
    claims: Vec<(i64, usize, Instant)>,
    /// Acknowledgements etcd accepted for certain: token, client.
    acks: Vec<(i64, usize)>,
    /// Acknowledgements whose answer was lost (they may have applied).
    uncertain: usize,
}

/// Checks a work queue's history against what etcd held at the end (`end_state`; events in
/// any order, they are sorted by time). `healed` is when the last fault healed, `end` when
/// the clients stopped, `bound` the liveness bound:
/// - (k) [`Property::JobLost`]: every job an enqueue added (its [`Event::JobEnqueued`], or
///   any claim of it) was acknowledged, or is still queued, claimed or a dead letter at the
///   end;
/// - (l) [`Property::AckNotOnce`]: no job was acknowledged twice, acknowledged and still
///   there at the end, or acknowledged through a claim older than another claim of it (a
///   stale claimer's acknowledgement that etcd accepted);
/// - (m) [`Property::ClaimShared`]: no two claimers believed they held one job at once
///   (a claimer believes from its [`Event::JobClaimed`] until the [`Event::Ended`] of its
///   token; a paused process is excused as in property (b));
/// - (n) [`Property::JobStarved`]: a job ready at `s` — enqueued, or given back by a claim
///   that ended unacknowledged — is claimed by `max(s, healed) + bound` (not judged if that
///   is after `end`; dead letters are not judged);
/// - (o) [`Property::EnqueuedTwice`]: no job name was added as two jobs (an enqueue retried
///   with its idempotency key adds one).
pub fn check_queue(
    events: &[Event],
    end_state: &QueueEnd,
    healed: Instant,
    bound: Duration,
    end: Instant,
) -> Vec<Violation> {
    let events = sorted(events);
    let mut jobs: BTreeMap<String, Job> = BTreeMap::new();
    let mut id_of_token: HashMap<i64, String> = HashMap::new();
    let mut ids_of_name: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut named = |jobs: &mut BTreeMap<String, Job>, id: &str, name: &str| {
        jobs.entry(id.to_owned()).or_default().name = Some(name.to_owned());
        ids_of_name
            .entry(name.to_owned())
            .or_default()
            .insert(id.to_owned());
    };
    for e in &events {
        match e {
            Event::JobEnqueued { job, id, .. } => named(&mut jobs, id, job),
            Event::JobClaimed {
                client,
                job,
                id,
                token,
                at,
                ..
            } => {
                named(&mut jobs, id, job);
                jobs.get_mut(id)
                    .expect("named")
                    .claims
                    .push((*token, *client, *at));
                id_of_token.insert(*token, id.clone());
            }
            _ => {}
        }
    }
    for (id, name) in end_state.queued.iter().chain(&end_state.dead) {
        named(&mut jobs, id, name);
    }
    for e in &events {
        if let Event::JobAcked {
            client,
            token,
            certain,
            ..
        } = e
        {
            let Some(job) = id_of_token.get(token).and_then(|id| jobs.get_mut(id)) else {
                continue; // an acknowledgement of a claim never reported: not judged
            };
            if *certain {
                job.acks.push((*token, *client));
            } else {
                job.uncertain += 1;
            }
        }
    }

    let mut violations = Vec::new();
    for (id, job) in &jobs {
        let name = job.name.as_deref().unwrap_or("?");
        let queued = end_state.queued.contains_key(id);
        let there = queued || end_state.dead.contains_key(id);
        // (k)
        if job.acks.is_empty() && job.uncertain == 0 && !there {
            violations.push(Violation::new(
                Property::JobLost,
                format!(
                    "job {id} ({name}), claimed {} time(s), was never acknowledged and is gone",
                    job.claims.len()
                ),
            ));
        }
        // (l)
        if job.acks.len() > 1 || (!job.acks.is_empty() && queued) {
            violations.push(Violation::new(
                Property::AckNotOnce,
                format!(
                    "job {id} ({name}) acknowledged {} time(s) (tokens and clients {:?}){}",
                    job.acks.len(),
                    job.acks,
                    if queued {
                        ", and still queued at the end"
                    } else {
                        ""
                    }
                ),
            ));
        }
        for (token, client) in &job.acks {
            if let Some((newer, by, _)) = job.claims.iter().find(|(t, ..)| t > token) {
                violations.push(Violation::new(
                    Property::AckNotOnce,
                    format!(
                        "job {id} ({name}) acknowledged by client {client} through its claim {token}, older than client {by}'s claim {newer}: a stale claimer's acknowledgement was accepted"
                    ),
                ));
            }
        }
    }
    // (m): each job's claims as the holders of a lock.
    for (id, job) in &jobs {
        if job.claims.len() < 2 {
            continue;
        }
        let tokens: BTreeSet<i64> = job.claims.iter().map(|(t, ..)| *t).collect();
        let as_lock: Vec<Event> = events
            .iter()
            .filter_map(|e| match e {
                Event::JobClaimed {
                    client,
                    token,
                    lease,
                    at,
                    ..
                } if tokens.contains(token) => Some(Event::Acquired {
                    client: *client,
                    token: *token,
                    lease: *lease,
                    mode: Mode::Exclusive,
                    at: *at,
                }),
                Event::Ended { token, .. } if tokens.contains(token) => Some(e.clone()),
                Event::Paused { .. } => Some(e.clone()),
                _ => None,
            })
            .collect();
        for v in exclusion(&intervals(&as_lock), Rules::lock()) {
            violations.push(Violation::new(
                Property::ClaimShared,
                format!("job {id}: {}", v.detail),
            ));
        }
    }
    // (n)
    violations.extend(starved(
        &events,
        &jobs,
        &id_of_token,
        end_state,
        healed,
        bound,
        end,
    ));
    // (o)
    for (name, ids) in &ids_of_name {
        if ids.len() > 1 {
            violations.push(Violation::new(
                Property::EnqueuedTwice,
                format!("job {name} was added as {} jobs: {ids:?}", ids.len()),
            ));
        }
    }
    violations
}

/// (n) Every job ready from `s` is claimed by `max(s, healed) + bound`.
fn starved(
    events: &[Event],
    jobs: &BTreeMap<String, Job>,
    id_of_token: &HashMap<i64, String>,
    end_state: &QueueEnd,
    healed: Instant,
    bound: Duration,
    end: Instant,
) -> Vec<Violation> {
    // Each job's readiness: since when it has waited for a claim.
    let mut ready: HashMap<&str, Instant> = HashMap::new();
    let mut claimed_once: BTreeSet<&str> = BTreeSet::new();
    // Each job's newest claim so far, and the jobs acknowledged so far.
    let mut newest: HashMap<&str, i64> = HashMap::new();
    let mut done: BTreeSet<&str> = BTreeSet::new();
    // Claims whose acknowledgement etcd accepted, or may have (its answer was lost).
    let mut acked: BTreeSet<i64> = BTreeSet::new();
    let mut violations = Vec::new();
    let mut judge = |id: &str, since: Instant, claimed: Option<Instant>| {
        let due = since.max(healed) + bound;
        // Not judged if it was not due before the end (claims after it are the stopping
        // clients').
        let late = due <= end
            && match claimed {
                Some(at) => at > due,
                None => true,
            };
        if late {
            let job = jobs.get(id);
            let name = job.and_then(|j| j.name.as_deref()).unwrap_or("?");
            let claims: Vec<String> = job
                .map(|j| &j.claims[..])
                .unwrap_or_default()
                .iter()
                .map(|(token, client, at)| {
                    let after = if *at >= healed { "+" } else { "-" };
                    let d = if *at >= healed {
                        at.duration_since(healed)
                    } else {
                        healed.duration_since(*at)
                    };
                    format!("{token} by client {client} at {after}{d:?}")
                })
                .collect();
            let until = match claimed {
                Some(at) => format!(
                    "claimed {:?} after the heal",
                    at.saturating_duration_since(healed)
                ),
                None => "unclaimed at the end".to_owned(),
            };
            violations.push(Violation::new(
                Property::JobStarved,
                format!(
                    "job {id} ({name}) ready from {:?} after the heal, {until}: longer than {bound:?} (its claims, from the heal: {claims:?})",
                    since.saturating_duration_since(healed),
                ),
            ));
        }
    };
    let id_of_name: HashMap<&str, &str> = jobs
        .iter()
        .filter_map(|(id, j)| j.name.as_deref().map(|n| (n, id.as_str())))
        .collect();
    for e in events {
        match e {
            // Ready from the last attempt before its first claim (an earlier attempt of a
            // retried enqueue may not have applied).
            Event::JobEnqueuing { job, at, .. } => {
                if let Some(id) = id_of_name.get(job.as_str()) {
                    if !claimed_once.contains(id) {
                        ready.insert(id, *at);
                    }
                }
            }
            Event::JobClaimed { id, token, at, .. } => {
                claimed_once.insert(id.as_str());
                let n = newest.entry(id.as_str()).or_insert(*token);
                *n = (*n).max(*token);
                if let Some((key, since)) = ready.remove_entry(id.as_str()) {
                    judge(key, since, Some(*at));
                }
            }
            // Acknowledged (or maybe, its answer lost) through its newest claim: not ready,
            // also when the acknowledgement came after the claimer stopped believing (a late
            // acknowledgement that etcd accepted: the claim was still alive).
            Event::JobAcked { token, certain, .. } => {
                acked.insert(*token);
                if let Some(id) = id_of_token.get(token).map(String::as_str) {
                    if *certain {
                        done.insert(id);
                    }
                    if newest.get(id) == Some(token) {
                        ready.remove(id);
                    }
                }
            }
            // The job's newest claim ended unacknowledged: it gave the job back. (The end of
            // an older claim — a stale claimer that learns of its loss late — gives nothing
            // back: the job was claimed again meanwhile.)
            Event::Ended { token, at, .. } if !acked.contains(token) => {
                if let Some(id) = id_of_token.get(token) {
                    let id = id.as_str();
                    if newest.get(id) == Some(token) && !done.contains(id) {
                        ready.insert(id, *at);
                    }
                }
            }
            _ => {}
        }
    }
    for (id, since) in ready {
        if !end_state.dead.contains_key(id) && !done.contains(id) {
            judge(id, since, None);
        }
    }
    violations
}

#[cfg(test)]
mod tests;
