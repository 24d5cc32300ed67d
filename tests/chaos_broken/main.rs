//! The safety checker catches deliberately broken primitives (in their own test binary: the
//! switch is process-wide).

#[path = "../common/mod.rs"]
mod common;
#[path = "../chaos/harness.rs"]
mod harness;

use harness::{run_schedule, Fault, Primitive};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_deliberately_broken_primitives() {
    etcd_coord::sabotage::set_broken(true);
    // No faults needed: the broken primitives let every contender in at once.
    let mut missed = Vec::new();
    for (primitive, property) in [
        (Primitive::Mutex, "b"),
        (Primitive::Semaphore, "b"),
        (Primitive::RwLock, "b"),
        (Primitive::Barrier, "e"),
        (Primitive::DoubleBarrier, "f"),
    ] {
        let violations = run_schedule(primitive, 1, 0, &[(1_500, Fault::Compact)]).await;
        let found = violations.iter().filter(|v| v.property == property).count();
        eprintln!("broken {primitive:?}: {found} violation(s) of ({property})");
        if found == 0 {
            missed.push(format!("{primitive:?}: no ({property}) in {violations:?}"));
        }
    }
    etcd_coord::sabotage::set_broken(false);
    assert!(missed.is_empty(), "the checker missed: {missed:#?}");
}
