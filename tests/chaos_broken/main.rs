//! Every property the chaos suite checks can fail: the same harness, with one client process
//! told (by an environment variable) to misbehave in one way, must report the property that
//! behaviour breaks. The library has no switch for it: the broken behaviours are the
//! harness's own (tests/chaos/harness/client.rs, `Broken`). They run on the full run
//! (scripts/test's etcd 3.5), not on the small one (`CHAOS_SMALL=1`, its etcd 3.4).

#[path = "../common/mod.rs"]
mod common;
#[allow(dead_code)] // the run with views that drop changes only
#[path = "../chaos/discovery.rs"]
mod discovery;
#[path = "../chaos/harness/mod.rs"]
mod harness;

use std::time::Duration;

use etcd_coord_testkit::checker::Property;
use harness::{run_broken, Broken, Fault, Primitive, BROKEN_CLIENT};

/// Runs `primitive` with client 1 misbehaving as `broken` under `plan`, keeping the clients
/// `window` after it, and asserts that the checker reports `property`.
async fn caught(
    primitive: Primitive,
    broken: Broken,
    plan: &[(u64, Fault)],
    window: Duration,
    property: Property,
) {
    eprintln!("broken {primitive:?}, client {BROKEN_CLIENT} {broken:?}: {plan:?}");
    let violations = run_broken(primitive, plan, broken, window).await;
    let found = violations.iter().filter(|v| v.property == property).count();
    eprintln!(
        "broken {primitive:?}, {broken:?}: {found} violation(s) of ({}); first: {:?}",
        property.letter(),
        violations.iter().find(|v| v.property == property)
    );
    assert!(
        found > 0,
        "{primitive:?} with {broken:?}: no ({}) among {violations:#?}",
        property.letter()
    );
}

/// Whether this is the small run (`CHAOS_SMALL=1`: scripts/test's run on etcd 3.4, which
/// keeps the first seed of some chaos tests): the broken clients prove the checker and the
/// harness, whatever etcd's version, so they run once — on 3.5 — and say so here.
fn on_the_small_run() -> bool {
    let small = std::env::var("CHAOS_SMALL").as_deref() == Ok("1");
    if small {
        eprintln!("chaos_broken: not on the small run (CHAOS_SMALL=1): the checker's proofs run on the full run");
    }
    small
}

const SHORT: Duration = Duration::from_secs(2);
/// Long enough for the liveness and key checks to judge (their bounds are 8 s), and for
/// observers to be judged (from 2 s after the heal).
const LONG: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_whose_writes_skip_the_fence_is_caught_by_etcds_order_of_writes() {
    if on_the_small_run() {
        return;
    }
    let plan = [(3_000, Fault::ResetClient(2))];
    caught(
        Primitive::Mutex,
        Broken::Unfenced,
        &plan,
        SHORT,
        Property::StaleWrite,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_ignores_its_loss_is_caught_overlapping_the_next() {
    if on_the_small_run() {
        return;
    }
    let plan = [(500, Fault::CutOffHolder(BROKEN_CLIENT))];
    caught(
        Primitive::Mutex,
        Broken::IgnoresLoss,
        &plan,
        SHORT,
        Property::Exclusion,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumption_that_trusts_its_lease_is_caught_acquiring_after_the_lease_was_gone() {
    if on_the_small_run() {
        return;
    }
    // Killed while it holds; its restart comes back after the TTL and believes it holds again.
    let plan = [(800, Fault::KillClient(BROKEN_CLIENT))];
    let violations = run_broken(Primitive::Mutex, &plan, Broken::TrustingResume, LONG).await;
    for property in [Property::AfterLeaseGone, Property::TokenOrder] {
        let found = violations.iter().filter(|v| v.property == property).count();
        eprintln!(
            "broken Mutex, TrustingResume: {found} violation(s) of ({}); first: {:?}",
            property.letter(),
            violations.iter().find(|v| v.property == property)
        );
        assert!(
            found > 0,
            "no ({}) among {violations:#?}",
            property.letter()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_gives_up_is_caught_starving() {
    if on_the_small_run() {
        return;
    }
    let plan = [(1_000, Fault::ResetClient(2))];
    caught(
        Primitive::Mutex,
        Broken::GivesUp,
        &plan,
        LONG,
        Property::Starved,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_never_released_is_caught_leaving_its_key() {
    if on_the_small_run() {
        return;
    }
    let plan = [(1_000, Fault::ResetClient(2))];
    caught(
        Primitive::Mutex,
        Broken::Leaks,
        &plan,
        LONG,
        Property::OrphanKey,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barriers_that_open_early_are_caught() {
    if on_the_small_run() {
        return;
    }
    let plan = [(1_500, Fault::ResetClient(2))];
    caught(
        Primitive::Barrier,
        Broken::OpensEarly,
        &plan,
        SHORT,
        Property::PassedWhileHeld,
    )
    .await;
    caught(
        Primitive::DoubleBarrier,
        Broken::OpensEarly,
        &plan,
        SHORT,
        Property::EarlyEnter,
    )
    .await;
    caught(
        Primitive::DoubleBarrier,
        Broken::LeavesEarly,
        &plan,
        SHORT,
        Property::EarlyLeave,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observers_and_views_that_drop_events_are_caught() {
    if on_the_small_run() {
        return;
    }
    let plan = [(1_500, Fault::ResetClient(2))];
    // Observers are judged from 2 s after the heal on: the longer window.
    caught(
        Primitive::Election,
        Broken::DropsEvents,
        &plan,
        LONG,
        Property::Observed,
    )
    .await;
    let violations = discovery::run_discovery_with(0, &plan, true).await;
    eprintln!("broken discovery views (drop every third change): {violations:?}");
    assert!(
        violations.iter().any(|v| v.contains("consumer")),
        "views that drop changes were not caught: {violations:?}"
    );
}

/// A work queue's worker that acknowledges with plain deletes: cut off while it holds a claim
/// past the TTL, it acknowledges after another worker claimed the job again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_ack_skips_its_claim_is_caught_acknowledging_a_job_it_no_longer_held() {
    if on_the_small_run() {
        return;
    }
    let plan = [(1_000, Fault::CutOffHolder(BROKEN_CLIENT))];
    caught(
        Primitive::Queue,
        Broken::Unfenced,
        &plan,
        SHORT,
        Property::AckNotOnce,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_ignores_its_lost_claim_is_caught_sharing_the_job() {
    if on_the_small_run() {
        return;
    }
    let plan = [(1_000, Fault::CutOffHolder(BROKEN_CLIENT))];
    caught(
        Primitive::Queue,
        Broken::IgnoresLoss,
        &plan,
        SHORT,
        Property::ClaimShared,
    )
    .await;
}

/// As etcd's `recipe.Queue` dequeues — the job deleted as it is taken —, a worker that loses its
/// claim loses the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dequeues_by_deleting_is_caught_losing_a_job() {
    if on_the_small_run() {
        return;
    }
    let plan = [(1_000, Fault::CutOffHolder(BROKEN_CLIENT))];
    caught(
        Primitive::Queue,
        Broken::DequeuesByDelete,
        &plan,
        SHORT,
        Property::JobLost,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_neither_acknowledged_nor_given_back_is_caught_starving_its_job() {
    if on_the_small_run() {
        return;
    }
    let plan = [(1_000, Fault::ResetClient(2))];
    caught(
        Primitive::Queue,
        Broken::Leaks,
        &plan,
        LONG,
        Property::JobStarved,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_that_enqueues_again_without_its_idempotency_key_is_caught_adding_a_job_twice() {
    if on_the_small_run() {
        return;
    }
    let plan = [(1_000, Fault::ResetClient(2))];
    caught(
        Primitive::Queue,
        Broken::ForgetsIdempotency,
        &plan,
        SHORT,
        Property::EnqueuedTwice,
    )
    .await;
}
