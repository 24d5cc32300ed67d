//! Hand-made histories for `check_queue`, one per property and per excuse.

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
