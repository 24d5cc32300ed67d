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
mod tests {
    use super::super::test_support::*;
    use super::*;

    const BOUND: Duration = Duration::from_secs(8);

    fn enqueuing(client: usize, job: &str, at: Instant) -> Event {
        Event::JobEnqueuing {
            client,
            job: job.into(),
            at,
        }
    }

    fn enqueued(client: usize, job: &str, id: &str, at: Instant) -> Event {
        Event::JobEnqueued {
            client,
            job: job.into(),
            id: id.into(),
            at,
        }
    }

    fn claimed(client: usize, job: &str, id: &str, token: i64, at: Instant) -> Event {
        Event::JobClaimed {
            client,
            job: job.into(),
            id: id.into(),
            token,
            lease: client as i64,
            attempt: 1,
            at,
        }
    }

    fn acked(client: usize, token: i64, certain: bool, at: Instant) -> Event {
        Event::JobAcked {
            client,
            token,
            certain,
            at,
        }
    }

    /// One job, enqueued at 0, claimed by client 1 (token 10) at 10, acknowledged at 20.
    fn delivered(t: Instant) -> Vec<Event> {
        vec![
            enqueuing(0, "a", t),
            enqueued(0, "a", "A", ms(t, 1)),
            claimed(1, "a", "A", 10, ms(t, 10)),
            acked(1, 10, true, ms(t, 20)),
            end(1, 10, ms(t, 21)),
        ]
    }

    fn check(h: &[Event], end_state: &QueueEnd, t: Instant) -> Vec<Violation> {
        check_queue(h, end_state, t, BOUND, ms(t, 60_000))
    }

    fn caught(h: &[Event], end_state: &QueueEnd, t: Instant, p: Property) -> bool {
        check(h, end_state, t).iter().any(|v| v.property == p)
    }

    fn queued(id: &str, name: &str) -> QueueEnd {
        QueueEnd {
            queued: [(id.to_owned(), name.to_owned())].into(),
            dead: BTreeMap::new(),
        }
    }

    #[test]
    fn a_job_claimed_and_acknowledged_once_passes_every_check() {
        let t = t0();
        assert_eq!(check(&delivered(t), &QueueEnd::default(), t), vec![]);
    }

    #[test]
    fn a_job_redelivered_after_its_claim_was_lost_and_acknowledged_once_passes() {
        let t = t0();
        let h = vec![
            enqueuing(0, "a", t),
            enqueued(0, "a", "A", ms(t, 1)),
            claimed(1, "a", "A", 10, ms(t, 10)),
            end(1, 10, ms(t, 4_000)),
            claimed(2, "a", "A", 20, ms(t, 5_000)),
            acked(2, 20, true, ms(t, 5_010)),
            end(2, 20, ms(t, 5_011)),
        ];
        assert_eq!(check(&h, &QueueEnd::default(), t), vec![]);
    }

    #[test]
    fn an_enqueued_job_that_is_neither_acknowledged_nor_there_at_the_end_is_lost() {
        let t = t0();
        let h = vec![enqueuing(0, "a", t), enqueued(0, "a", "A", ms(t, 1))];
        assert!(caught(&h, &QueueEnd::default(), t, Property::JobLost));
        // Still queued at the end (and not due yet): not lost.
        let late = ms(t, 59_000);
        let h = vec![enqueuing(0, "a", late), enqueued(0, "a", "A", late)];
        assert_eq!(check(&h, &queued("A", "a"), t), vec![]);
        // A dead letter is not lost either.
        let dead = QueueEnd {
            queued: BTreeMap::new(),
            dead: [("A".to_owned(), "a".to_owned())].into(),
        };
        assert_eq!(check(&h, &dead, t), vec![]);
    }

    #[test]
    fn a_claimed_job_dropped_by_a_claimer_that_deleted_it_is_lost() {
        // As etcd's recipe.Queue dequeues: the job deleted at the claim, the claimer gone.
        let t = t0();
        let mut h = delivered(t);
        h.retain(|e| !matches!(e, Event::JobAcked { .. }));
        assert!(caught(&h, &QueueEnd::default(), t, Property::JobLost));
    }

    #[test]
    fn an_acknowledgement_whose_answer_was_lost_accounts_for_a_job_that_is_gone() {
        let t = t0();
        let mut h = delivered(t);
        for e in &mut h {
            if let Event::JobAcked { certain, .. } = e {
                *certain = false;
            }
        }
        assert_eq!(check(&h, &QueueEnd::default(), t), vec![]);
    }

    #[test]
    fn a_job_acknowledged_twice_is_caught() {
        let t = t0();
        let mut h = delivered(t);
        h.extend([
            claimed(2, "a", "A", 9, ms(t, 2)),
            end(2, 9, ms(t, 5)),
            acked(2, 9, true, ms(t, 4)),
        ]);
        let v = check(&h, &QueueEnd::default(), t);
        assert!(
            v.iter()
                .any(|v| v.property == Property::AckNotOnce && v.detail.contains("2 time(s)")),
            "{v:?}"
        );
    }

    #[test]
    fn an_acknowledgement_through_a_claim_older_than_another_is_caught_as_stale() {
        let t = t0();
        // Client 1's claim (10) ends in its belief at 4 s; client 2 claims at 5 s (20); client
        // 1's late acknowledgement through claim 10 is accepted at 6 s, client 2's then fails.
        let h = vec![
            enqueuing(0, "a", t),
            enqueued(0, "a", "A", ms(t, 1)),
            claimed(1, "a", "A", 10, ms(t, 10)),
            end(1, 10, ms(t, 4_000)),
            claimed(2, "a", "A", 20, ms(t, 5_000)),
            acked(1, 10, true, ms(t, 6_000)),
            end(2, 20, ms(t, 6_100)),
        ];
        let v = check(&h, &QueueEnd::default(), t);
        assert!(
            v.iter()
                .any(|v| v.property == Property::AckNotOnce && v.detail.contains("stale")),
            "{v:?}"
        );
    }

    #[test]
    fn a_job_acknowledged_yet_still_queued_at_the_end_is_caught() {
        let t = t0();
        assert!(caught(
            &delivered(t),
            &queued("A", "a"),
            t,
            Property::AckNotOnce
        ));
    }

    #[test]
    fn two_claimers_believing_they_hold_one_job_at_once_are_caught() {
        let t = t0();
        let h = vec![
            enqueuing(0, "a", t),
            enqueued(0, "a", "A", ms(t, 1)),
            claimed(1, "a", "A", 10, ms(t, 10)),
            claimed(2, "a", "A", 20, ms(t, 5_000)),
            end(2, 20, ms(t, 5_100)),
            end(1, 10, ms(t, 7_000)),
            acked(2, 20, true, ms(t, 5_050)),
        ];
        assert!(caught(&h, &QueueEnd::default(), t, Property::ClaimShared));
        // Claims of different jobs may overlap.
        let h = vec![
            claimed(1, "a", "A", 10, ms(t, 10)),
            claimed(2, "b", "B", 20, ms(t, 20)),
            acked(1, 10, true, ms(t, 30)),
            acked(2, 20, true, ms(t, 30)),
            end(1, 10, ms(t, 40)),
            end(2, 20, ms(t, 40)),
        ];
        assert_eq!(check(&h, &QueueEnd::default(), t), vec![]);
    }

    #[test]
    fn a_paused_claimer_that_stops_believing_as_it_wakes_is_excused() {
        let t = t0();
        let h = vec![
            claimed(1, "a", "A", 10, ms(t, 10)),
            Event::Paused {
                client: 1,
                from: ms(t, 100),
                at: ms(t, 7_000),
            },
            claimed(2, "a", "A", 20, ms(t, 5_500)),
            end(1, 10, ms(t, 7_100)),
            acked(2, 20, true, ms(t, 5_600)),
            end(2, 20, ms(t, 5_601)),
        ];
        assert!(!caught(&h, &QueueEnd::default(), t, Property::ClaimShared));
    }

    #[test]
    fn a_ready_job_unclaimed_past_the_bound_after_the_heal_is_starved() {
        let t = t0();
        let healed = ms(t, 1_000);
        let h = vec![
            enqueuing(0, "a", t),
            enqueued(0, "a", "A", ms(t, 1)),
            claimed(1, "a", "A", 10, ms(t, 10_000)),
            acked(1, 10, true, ms(t, 10_010)),
            end(1, 10, ms(t, 10_011)),
        ];
        let starved = |h: &[Event], end_state: &QueueEnd| {
            check_queue(h, end_state, healed, BOUND, ms(t, 60_000))
                .iter()
                .any(|v| v.property == Property::JobStarved)
        };
        assert!(
            starved(&h, &QueueEnd::default()),
            "claimed 9 s after the heal"
        );
        let mut in_time = h.clone();
        in_time[2] = claimed(1, "a", "A", 10, ms(t, 8_900));
        assert!(!starved(&in_time, &QueueEnd::default()));
        // Given back (a claim that ended unacknowledged): ready again from its end.
        let given_back = vec![
            claimed(1, "a", "A", 10, ms(t, 10)),
            end(1, 10, ms(t, 2_000)),
            claimed(2, "a", "A", 20, ms(t, 11_000)),
            acked(2, 20, true, ms(t, 11_010)),
            end(2, 20, ms(t, 11_011)),
        ];
        assert!(starved(&given_back, &QueueEnd::default()));
        // A stale claimer that stops believing after the job was claimed again and
        // acknowledged gives nothing back.
        let stale_end = vec![
            claimed(1, "a", "A", 10, ms(t, 10)),
            claimed(2, "a", "A", 20, ms(t, 5_000)),
            acked(2, 20, true, ms(t, 5_010)),
            end(2, 20, ms(t, 5_011)),
            end(1, 10, ms(t, 7_000)),
        ];
        assert!(!starved(&stale_end, &QueueEnd::default()));
        // A late acknowledgement etcd accepted (the claim was still alive) after its claimer
        // stopped believing: the job is done, not ready.
        let late_ack = vec![
            claimed(1, "a", "A", 10, ms(t, 10)),
            end(1, 10, ms(t, 4_000)),
            acked(1, 10, true, ms(t, 5_000)),
        ];
        assert!(!starved(&late_ack, &QueueEnd::default()));
        // Ready from the last enqueue attempt before its claim (the first one may not have
        // applied).
        let retried = vec![
            enqueuing(0, "a", t),
            enqueuing(0, "a", ms(t, 5_000)),
            enqueued(0, "a", "A", ms(t, 5_001)),
            claimed(1, "a", "A", 10, ms(t, 12_000)),
            acked(1, 10, true, ms(t, 12_010)),
            end(1, 10, ms(t, 12_011)),
        ];
        assert!(!starved(&retried, &QueueEnd::default()));
        // A claim after the end is not judged: the job was not due before it.
        assert!(check_queue(
            &given_back,
            &QueueEnd::default(),
            healed,
            BOUND,
            ms(t, 9_500)
        )
        .iter()
        .all(|v| v.property != Property::JobStarved));
        // Never claimed again, still queued at the end.
        let never = vec![
            claimed(1, "a", "A", 10, ms(t, 10)),
            end(1, 10, ms(t, 2_000)),
        ];
        assert!(starved(&never, &queued("A", "a")));
        // Not judged when its due time is after the end.
        assert!(check_queue(&never, &queued("A", "a"), healed, BOUND, ms(t, 9_000)).is_empty());
    }

    #[test]
    fn one_job_name_added_as_two_jobs_is_caught() {
        let t = t0();
        let mut h = delivered(t);
        h.extend([
            enqueuing(0, "a", ms(t, 30)),
            enqueued(0, "a", "A2", ms(t, 31)),
            claimed(1, "a", "A2", 30, ms(t, 40)),
            acked(1, 30, true, ms(t, 50)),
            end(1, 30, ms(t, 51)),
        ]);
        assert!(caught(&h, &QueueEnd::default(), t, Property::EnqueuedTwice));
    }
}
