//! Compile-time properties of the public types.

use etcd_coord::{
    Barrier, BarrierHold, DoubleBarrier, DoubleBarrierGuard, Election, Error, Fence, LeaderEvent,
    LeaderInfo, LeaderSelector, LeaderTerm, Leadership, LeasedSession, Mutex, MutexGuard, RwLock,
    RwLockReadGuard, RwLockWriteGuard, Semaphore, SemaphorePermit, SessionOptions,
};
use etcd_coord::{
    ClaimInfo, Claimed, DeadLetter, EnqueueOptions, JobId, JobInfo, QueueOptions, WorkQueue,
};
use static_assertions::{assert_impl_all, assert_not_impl_any};

// Guards are owned and can move into tasks; they are not Clone (one release per acquisition).
assert_impl_all!(MutexGuard: Send, Sync, std::fmt::Debug);
assert_not_impl_any!(MutexGuard: Clone);
assert_impl_all!(Leadership: Send, Sync, std::fmt::Debug);
assert_impl_all!(SemaphorePermit: Send, Sync, std::fmt::Debug);
assert_impl_all!(RwLockReadGuard: Send, Sync, std::fmt::Debug);
assert_impl_all!(RwLockWriteGuard: Send, Sync, std::fmt::Debug);
assert_impl_all!(BarrierHold: Send, Sync, std::fmt::Debug);
assert_impl_all!(DoubleBarrierGuard: Send, Sync, std::fmt::Debug);
assert_not_impl_any!(SemaphorePermit: Clone);
assert_not_impl_any!(RwLockReadGuard: Clone);
assert_not_impl_any!(RwLockWriteGuard: Clone);
assert_not_impl_any!(BarrierHold: Clone);
assert_not_impl_any!(DoubleBarrierGuard: Clone);
assert_impl_all!(Semaphore: Clone, Send, Sync);
assert_impl_all!(RwLock: Clone, Send, Sync);
assert_impl_all!(Barrier: Clone, Send, Sync);
assert_impl_all!(DoubleBarrier: Clone, Send, Sync);
assert_not_impl_any!(Leadership: Clone);
// A claimed job is a guard like the others: owned, movable into tasks, one ack per claim.
assert_impl_all!(Claimed: Send, Sync, std::fmt::Debug);
assert_not_impl_any!(Claimed: Clone);
assert_impl_all!(WorkQueue: Clone, Send, Sync, std::fmt::Debug);
assert_impl_all!(QueueOptions: Clone, Default, Send, Sync);
assert_impl_all!(EnqueueOptions: Clone, Default, Send, Sync);
assert_impl_all!(JobId: Clone, Send, Sync, std::hash::Hash, Eq, std::fmt::Display);
assert_impl_all!(JobInfo: Clone, Send, Sync, PartialEq);
assert_impl_all!(ClaimInfo: Clone, Send, Sync, PartialEq);
assert_impl_all!(DeadLetter: Clone, Send, Sync, PartialEq);
// Fences and terms are capabilities to hand to other tasks; they release nothing on drop.
assert_impl_all!(Fence: Clone, Send, Sync);
assert_impl_all!(LeaderTerm: Clone, Send, Sync);
assert_impl_all!(Election: Clone, Send, Sync);
assert_impl_all!(LeaderInfo: Clone, Send, Sync, PartialEq);
assert_impl_all!(LeaderEvent: Clone, Send, Sync, PartialEq);
assert_impl_all!(LeaderSelector: Send, Sync);
// Handles are cheap clones, shareable across tasks.
assert_impl_all!(LeasedSession: Clone, Send, Sync, std::fmt::Debug);
assert_impl_all!(Mutex: Clone, Send, Sync);
assert_impl_all!(SessionOptions: Clone, Default, Send, Sync);
assert_impl_all!(Error: std::error::Error, Send, Sync);

fn is_static<T: 'static>(_: &T) {}
fn is_send<T: Send>(_: &T) {}

/// The futures of every async operation are Send (spawnable) and the `lost()` futures are
/// 'static (usable after the guard or session handle moved on).
#[allow(dead_code, unused_must_use)]
fn futures_are_send_and_lost_is_static(session: LeasedSession, mutex: Mutex, guard: MutexGuard) {
    is_send(&LeasedSession::new(
        session.client().clone(),
        SessionOptions::new(),
    ));
    is_send(&mutex.lock());
    is_send(&mutex.try_lock());
    is_send(&session.close());
    is_send(&session.settled());
    let lost = session.lost();
    is_static(&lost);
    is_send(&lost);
    let guard_lost = guard.lost();
    is_static(&guard_lost);
    is_send(&guard_lost);
    is_send(&guard.txn_if_owner([]));
    is_send(&guard.release());
}

#[allow(dead_code, unused_must_use)]
fn election_futures_are_send(election: Election, mut leadership: Leadership) {
    is_send(&election.campaign("v"));
    is_send(&election.leader());
    let events = election.observe();
    is_static(&events);
    is_send(&events);
    is_send(&leadership.proclaim("v"));
    let lost = leadership.lost();
    is_static(&lost);
    is_send(&leadership.resign());
}

#[allow(dead_code, unused_must_use)]
fn other_primitives_futures_are_send(
    sem: Semaphore,
    rw: RwLock,
    barrier: Barrier,
    double: DoubleBarrier,
    permit: SemaphorePermit,
    inside: DoubleBarrierGuard,
) {
    is_send(&sem.acquire());
    is_send(&sem.try_acquire());
    is_send(&rw.read());
    is_send(&rw.write());
    is_send(&rw.try_read());
    is_send(&rw.try_write());
    is_send(&barrier.hold());
    is_send(&barrier.wait());
    is_send(&double.enter());
    is_send(&permit.release());
    is_send(&inside.leave());
}

#[test]
fn error_sources_are_kept() {
    use std::error::Error as _;
    let inner = etcd_client::Error::InvalidArgs("x".into());
    let e = Error::from(inner);
    assert!(e.source().is_some(), "the etcd-client error is the source");
}

#[allow(dead_code, unused_must_use)]
fn queue_futures_are_send_and_the_claims_stream_is_static(queue: WorkQueue, job: Claimed) {
    is_send(&queue.enqueue("x"));
    is_send(&queue.enqueue_with("x", EnqueueOptions::new()));
    is_send(&queue.claim());
    is_send(&queue.try_claim());
    is_send(&queue.claim_many(2));
    is_send(&queue.len());
    is_send(&queue.pending());
    is_send(&queue.claimed());
    is_send(&queue.dead_letters());
    let claims = queue.claims();
    is_static(&claims);
    is_send(&claims);
    let lost = job.lost();
    is_static(&lost);
    is_send(&job.ack());
}
