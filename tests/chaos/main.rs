//! Chaos suite: N clients in contention on a three-member etcd cluster while a seeded,
//! proptest-generated fault schedule runs; then the safety checker and leak checks.
//!
//! `CHAOS_SEED=N` re-runs one seed; `CHAOS_SEEDS=K` runs seeds 1..=K (a soak). By default the
//! fixed CI seeds run. A failing run prints its seed and schedule.

#[path = "../common/mod.rs"]
mod common;
mod harness;

use harness::{run_schedule, schedule, Primitive};

fn seeds(default: &[u64]) -> Vec<u64> {
    if let Ok(s) = std::env::var("CHAOS_SEED") {
        return vec![s.parse().expect("CHAOS_SEED is a number")];
    }
    if let Ok(k) = std::env::var("CHAOS_SEEDS") {
        return (1..=k.parse::<u64>().expect("CHAOS_SEEDS is a number")).collect();
    }
    default.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutex_stays_safe_under_fault_schedules() {
    for seed in seeds(&[1, 2, 7]) {
        let plan = schedule(seed);
        eprintln!("chaos: mutex, seed {seed}: {plan:?}");
        let violations = run_schedule(Primitive::Mutex, 3, seed, &plan).await;
        assert!(
            violations.is_empty(),
            "seed {seed}: {violations:#?}\nschedule: {plan:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutex_on_a_single_member_stays_safe_under_fault_schedules() {
    for seed in seeds(&[4, 5]) {
        let plan = schedule(seed);
        eprintln!("chaos: mutex, one member, seed {seed}: {plan:?}");
        let violations = run_schedule(Primitive::Mutex, 1, seed, &plan).await;
        assert!(
            violations.is_empty(),
            "seed {seed}: {violations:#?}\nschedule: {plan:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_stays_safe_under_fault_schedules() {
    for seed in seeds(&[3]) {
        let plan = schedule(seed);
        eprintln!("chaos: election, seed {seed}: {plan:?}");
        let violations = run_schedule(Primitive::Election, 3, seed, &plan).await;
        assert!(
            violations.is_empty(),
            "seed {seed}: {violations:#?}\nschedule: {plan:?}"
        );
    }
}
