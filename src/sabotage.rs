//! **Deliberately broken primitives**, compiled only with the cargo feature `sabotage`, which
//! exists for one test: `tests/chaos_broken` shows that the chaos suite's checker catches
//! violations. Never enable the feature outside that test.

use std::sync::atomic::{AtomicBool, Ordering};

static BROKEN: AtomicBool = AtomicBool::new(false);

/// While enabled, every queue acquisition in this process (Mutex, Election, Semaphore,
/// RwLock) stops waiting for its turn — several holders at once — and every
/// [`Barrier::wait`](crate::Barrier::wait) and
/// [`DoubleBarrier::enter`](crate::DoubleBarrier::enter) returns at once.
pub fn set_broken(enabled: bool) {
    BROKEN.store(enabled, Ordering::SeqCst);
}

pub(crate) fn broken() -> bool {
    BROKEN.load(Ordering::Relaxed)
}
