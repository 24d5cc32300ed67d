//! Unit tests of `metrics`.

use std::alloc::{GlobalAlloc, Layout, System};

use super::*;

/// The system allocator, counting the allocations of each thread.
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

fn allocations_during(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

const KINDS: [AcquisitionKind; 7] = [
    AcquisitionKind::Mutex,
    AcquisitionKind::Semaphore,
    AcquisitionKind::RwLockRead,
    AcquisitionKind::RwLockWrite,
    AcquisitionKind::Election,
    AcquisitionKind::Barrier,
    AcquisitionKind::DoubleBarrier,
];
const OUTCOMES: [Outcome; 7] = [
    Outcome::Acquired,
    Outcome::Busy,
    Outcome::Timeout,
    Outcome::Cancelled,
    Outcome::Lost,
    Outcome::SessionLost,
    Outcome::Failed,
];

#[test]
fn the_counting_allocator_sees_an_allocation() {
    assert_eq!(
        allocations_during(|| drop(std::hint::black_box(vec![1u8]))),
        1
    );
}

/// Without a recorder (this test installs none), what an acquisition, its guard and a
/// view record on every call allocates nothing: no key, label or string is built on the
/// heap per call.
#[test]
fn recording_the_hot_paths_metrics_allocates_nothing() {
    let lock_lost = Error::LockLost {
        key: String::new(),
        create_revision: 1,
    };
    let closed = Error::SessionClosed;
    // Warm the thread-locals and lazily initialised statics up first.
    Acquisition::start(AcquisitionKind::Mutex, "jobs/a").finish(Outcome::Acquired);
    for kind in KINDS {
        for outcome in OUTCOMES {
            let n = allocations_during(|| {
                Acquisition::start(kind, "jobs/nightly").finish(outcome);
                drop(Acquisition::start(kind, "jobs/nightly"));
            });
            assert_eq!(n, 0, "{kind:?} {outcome:?}");
        }
        let held = Held::default();
        let n = allocations_during(|| {
            held.start(kind, "jobs/nightly");
            held.lost(&lock_lost);
            held.lost(&closed);
            held.ended();
        });
        assert_eq!(n, 0, "the guard of {kind:?}");
    }
    for view in [View::Discovery, View::Election, View::Inspection] {
        let n = allocations_during(|| {
            view_events(view, 3);
            view_lag(view, 2);
            view_reread(view);
        });
        assert_eq!(n, 0, "{view:?}");
    }
    let now = tokio::time::Instant::now();
    let n = allocations_during(|| {
        refresh_acknowledged(now, now);
        session_state("alive");
        session_state("suspended");
        session_lost(LossReason::DeadlineExceeded);
    });
    assert_eq!(n, 0, "sessions");
}

/// The static label tables agree with each other row by row: each row is one kind.
#[test]
fn every_label_table_row_is_one_kind() {
    for kind in KINDS {
        let k = kind as usize;
        let value = KIND_LABELS[k][0].value();
        for labels in &KIND_OUTCOME_LABELS[k] {
            assert_eq!(labels[0].value(), value);
        }
        for labels in &KIND_CAUSE_LABELS[k] {
            assert_eq!(labels[0].value(), value);
        }
    }
    assert_eq!(
        KIND_LABELS[AcquisitionKind::RwLockWrite as usize][0].value(),
        "rwlock_write"
    );
    let timeout =
        &KIND_OUTCOME_LABELS[AcquisitionKind::Semaphore as usize][Outcome::Timeout as usize];
    assert_eq!(
        (timeout[0].value(), timeout[1].value()),
        ("semaphore", "timeout")
    );
    let gone =
        &KIND_CAUSE_LABELS[AcquisitionKind::Barrier as usize][LossCause::SessionClosed as usize];
    assert_eq!(
        (gone[0].value(), gone[1].value()),
        ("barrier", "session_closed")
    );
    assert_eq!(
        VIEW_LABELS[View::Inspection as usize][0].value(),
        "inspection"
    );
}

#[tokio::test]
async fn timeout_holds_the_future_it_limits_boxed_not_inline() {
    // Its own 16 KiB future, as rpc::send::tests's: `metrics` lies below `rpc`.
    async fn large() -> Result<u8, Error> {
        let pad = [7u8; 16 * 1024];
        tokio::task::yield_now().await;
        Ok(pad[pad.len() - 1])
    }
    let limited = timeout(Duration::from_secs(10), large());
    let size = std::mem::size_of_val(&limited);
    assert!(
        size < 1024,
        "timeout's future holds the future inline: {size} bytes"
    );
    assert_eq!(limited.await.map(Result::unwrap), Some(7));
}
