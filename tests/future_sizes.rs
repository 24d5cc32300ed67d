//! The futures of the public API stay small: a caller's task (or a `#[tokio::test]`, or a
//! `block_on` on a thread with the default 2 MiB stack) holds them, in debug builds too, where
//! every await point keeps its locals. Large inner futures are boxed inside the library.

mod common;

use std::mem::size_of_val;

use common::*;
use etcd_coord::discovery::{Endpoint, Registration, SessionRegistration};
use etcd_coord::{
    Barrier, DoubleBarrier, Election, Error, LeasedSession, Mutex, RwLock, Semaphore,
    SessionOptions, Stm, WorkQueue,
};

/// No public future is larger than this (bytes); a session's starts with its `Client` (~7 KiB).
const LIMIT: usize = 8 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_public_future_is_smaller_than_8_kib() {
    let etcd = etcd().await;
    let s = session(&etcd, 30).await;
    let (m, sem, rw) = (
        Mutex::new(&s, "sizes/m"),
        Semaphore::new(&s, "sizes/s", 2),
        RwLock::new(&s, "sizes/rw"),
    );
    let e = Election::new(&s, "sizes/e");
    let (b, db) = (
        Barrier::new(&s, "sizes/b"),
        DoubleBarrier::new(&s, "sizes/db", 2),
    );
    let q = WorkQueue::new(&s, "sizes/q");
    // A guard's futures too: the longest, a double barrier's leave (it waits for its round).
    let inside = DoubleBarrier::new(&s, "sizes/db1", 1)
        .enter()
        .await
        .unwrap();
    let leave = inside.leave();
    let leave_size = size_of_val(&leave);
    leave.await.unwrap();
    let guard = Mutex::new(&s, "sizes/m1").lock().await.unwrap();
    let release = guard.release();
    let release_size = size_of_val(&release);
    release.await.unwrap();
    let mut leader = Election::new(&s, "sizes/e1").campaign("v").await.unwrap();
    let resign_size = size_of_val(&leader.resign());
    leader.resign().await.unwrap();
    let q1 = WorkQueue::new(&s, "sizes/q1");
    q1.enqueue("x").await.unwrap();
    let job = q1.claim().await.unwrap();
    let ack = job.ack();
    let ack_size = size_of_val(&ack);
    ack.await.unwrap();
    q1.enqueue("y").await.unwrap();
    let job = q1.claim().await.unwrap();
    let nack = job.nack(std::time::Duration::ZERO);
    let nack_size = size_of_val(&nack);
    nack.await.unwrap();
    q1.claim().await.unwrap().ack().await.unwrap();
    let c = client(&etcd).await;
    let stm = Stm::new(c.clone());
    let sizes = [
        ("Mutex::lock", size_of_val(&m.lock())),
        ("Mutex::try_lock", size_of_val(&m.try_lock())),
        ("Mutex::resume", size_of_val(&m.resume("k", 1))),
        ("Semaphore::acquire", size_of_val(&sem.acquire())),
        ("RwLock::read", size_of_val(&rw.read())),
        ("RwLock::write", size_of_val(&rw.write())),
        ("Election::campaign", size_of_val(&e.campaign("v"))),
        ("Barrier::wait", size_of_val(&b.wait())),
        ("DoubleBarrier::enter", size_of_val(&db.enter())),
        ("DoubleBarrierGuard::leave", leave_size),
        ("MutexGuard::release", release_size),
        ("Leadership::resign", resign_size),
        ("Claimed::ack", ack_size),
        ("Claimed::nack", nack_size),
        ("WorkQueue::claim", size_of_val(&q.claim())),
        ("WorkQueue::enqueue", size_of_val(&q.enqueue("x"))),
        ("Semaphore::try_acquire", size_of_val(&sem.try_acquire())),
        ("RwLock::try_read", size_of_val(&rw.try_read())),
        ("Election::resume", size_of_val(&e.resume("k", 1))),
        ("WorkQueue::claim_many", size_of_val(&q.claim_many(2))),
        (
            "LeasedSession::new",
            size_of_val(&LeasedSession::new(c.clone(), SessionOptions::new())),
        ),
        (
            "LeasedSession::sibling",
            size_of_val(&s.sibling(SessionOptions::new())),
        ),
        (
            "LeasedSession::resume",
            size_of_val(&LeasedSession::resume(c.clone(), 1, SessionOptions::new())),
        ),
        (
            "Registration::register",
            size_of_val(&Registration::register(
                c.clone(),
                "sizes/t",
                Endpoint::new("10.0.0.1:1"),
                SessionOptions::new(),
            )),
        ),
        (
            "SessionRegistration::register",
            size_of_val(&SessionRegistration::register(
                &s,
                "sizes/t",
                Endpoint::new("10.0.0.1:1"),
            )),
        ),
        (
            "Stm::run",
            size_of_val(&stm.run(|_tx| async { Ok::<_, Error>(()) })),
        ),
    ];
    for (what, size) in sizes {
        println!("{what}: {size} bytes");
    }
    let big: Vec<_> = sizes.iter().filter(|(_, n)| *n > LIMIT).collect();
    assert!(big.is_empty(), "futures over {LIMIT} bytes: {big:?}");
}
