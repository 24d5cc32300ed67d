//! The safety checker catches deliberately broken primitives (in their own test binary: the
//! switch is process-wide).

#[path = "../common/mod.rs"]
mod common;
#[path = "../chaos/harness.rs"]
mod harness;

use etcd_coord_testkit::checker::Property;
use harness::{run_schedule_in_process, Fault, Primitive};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_deliberately_broken_primitives() {
    etcd_coord::sabotage::set_broken(true);
    // No faults needed: the broken primitives let every contender in at once.
    let mut missed = Vec::new();
    for (primitive, property) in [
        (Primitive::Mutex, Property::Exclusion),
        (Primitive::Semaphore, Property::Exclusion),
        (Primitive::RwLock, Property::Exclusion),
        (Primitive::Barrier, Property::PassedWhileHeld),
        (Primitive::DoubleBarrier, Property::EarlyEnter),
    ] {
        let violations = run_schedule_in_process(primitive, 1, 0, &[(1_500, Fault::Compact)]).await;
        let found = violations.iter().filter(|v| v.property == property).count();
        eprintln!(
            "broken {primitive:?}: {found} violation(s) of ({})",
            property.letter()
        );
        if found == 0 {
            missed.push(format!(
                "{primitive:?}: no ({}) in {violations:?}",
                property.letter()
            ));
        }
    }
    etcd_coord::sabotage::set_broken(false);
    assert!(missed.is_empty(), "the checker missed: {missed:#?}");
}
