//! The safety checker catches a deliberately broken lock (in its own test binary: the switch
//! is process-wide).

#[path = "../common/mod.rs"]
mod common;
#[path = "../chaos/harness.rs"]
mod harness;

use harness::{run_schedule, Primitive};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_a_deliberately_broken_lock() {
    etcd_coord::testkit::set_broken_lock(true);
    // No faults needed: the broken lock lets every contender in at once.
    let violations =
        run_schedule(Primitive::Mutex, 1, 0, &[(1_500, harness::Fault::Compact)]).await;
    etcd_coord::testkit::set_broken_lock(false);
    assert!(
        violations.iter().any(|v| v.property == "b"),
        "overlapping holders were not reported: {violations:?}"
    );
}
