//! `etcd_coord::inspect` on real etcd, with waiters' announced hand-offs beside the queue: the
//! pointers (`<name>/#next/<member id>/<waiter's revision>`, docs/design.md "Announced
//! hand-offs") are never members — neither ours nor foreign — and each shows up only as the
//! announcement of the waiter that put it. (A waiter with at most [`COUNTED_UP_TO`] keys ahead
//! that saw them all counts their deletions and announces nothing: the lines here are made to
//! look long, or are long.)

mod common;

use std::time::Duration;

use common::*;
use etcd_coord::inspect::{Inspector, MemberClient, QueueKind, QueueState, Role};
use etcd_coord::{Error, LeasedSession, Mutex, RwLock, Semaphore};
use etcd_coord_testkit::TestEtcd;

/// The most keys ahead of a waiter that counts their deletions (behind more, a one-permit
/// waiter announces itself instead: the engine's `DRAIN_MAX`, docs/design.md "Counted
/// hand-offs").
const COUNTED_UP_TO: usize = 8;

/// The keys under `name/`, a nested name's padding (`pad_with_nested_keys`) left out.
async fn keys_of(observer: &etcd_client::Client, name: &str) -> Vec<String> {
    keys_under(observer, &format!("{name}/"))
        .await
        .into_iter()
        .filter(|k| !is_pad(k))
        .collect()
}

/// Waits until the keys under `name/` hold `members` members and `pointers` pointers.
async fn settled(observer: &etcd_client::Client, name: &str, members: usize, pointers: usize) {
    let ok = eventually(Duration::from_secs(10), || async {
        let keys = keys_of(observer, name).await;
        let p = keys.iter().filter(|k| is_pointer(k)).count();
        keys.len() - p == members && p == pointers
    })
    .await;
    assert!(ok, "{:?}", keys_of(observer, name).await);
}

async fn sessions(etcd: &TestEtcd, n: usize) -> Vec<LeasedSession> {
    let mut all = Vec::new();
    for _ in 0..n {
        all.push(session(etcd, 30).await);
    }
    all
}

/// `queue` lists exactly the non-pointer keys under its name (in order), all ours, the first
/// holding, and each waiter announced behind the member just ahead of it.
async fn members_announced_in_a_line(observer: &etcd_client::Client, queue: &QueueState) {
    let members = queue.members();
    let keys: Vec<String> = members.iter().map(|m| m.key().to_owned()).collect();
    assert!(
        keys.iter().all(|k| !k.contains("#next/")),
        "a pointer listed as a member: {keys:?}"
    );
    for m in members {
        assert_eq!(m.client(), MemberClient::Ours, "{}", m.key());
    }
    assert_eq!(members[0].holds(), Some(true));
    assert_eq!(
        members[0].announced_behind(),
        None,
        "the holder waits for nobody"
    );
    for pair in members.windows(2) {
        assert_eq!(pair[1].holds(), Some(false));
        assert_eq!(pair[1].announced_behind(), Some(pair[0].key()));
    }
    // Every key under the name is accounted for: members, and one pointer per waiter.
    let all = keys_of(observer, queue.name()).await;
    let pointers = all.iter().filter(|k| is_pointer(k)).count();
    assert_eq!(pointers, members.len() - 1, "{all:?}");
    assert_eq!(all.len(), members.len() + pointers, "{all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contended_locks_pointers_are_its_waiters_announcements_not_members() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("inspect/contended");
    // A nested name's keys fill the enqueue's first page: the waiters announce themselves.
    pad_with_nested_keys(&observer, &name).await;
    let s = sessions(&etcd, 3).await;
    let holder = Mutex::new(&s[0], &name).lock().await.unwrap();
    let mut waiters = Vec::new();
    for (i, session) in s[1..].iter().enumerate() {
        let mutex = Mutex::new(session, &name);
        waiters.push(tokio::spawn(async move { mutex.lock().await }));
        settled(&observer, &name, i + 2, i + 1).await;
    }

    let queues = Inspector::new(observer.clone())
        .read_all(&name, None)
        .await
        .unwrap();
    assert_eq!(queues.len(), 1, "only the lock's queue: {queues:?}");
    assert_eq!(queues[0].kind(), QueueKind::Mutex);
    assert_eq!(queues[0].members().len(), 3, "{queues:?}");
    assert_eq!(queues[0].members()[0].key(), holder.key());
    members_announced_in_a_line(&observer, &queues[0]).await;

    // The hand-off goes on as announced: the first waiter holds, the second is behind it.
    holder.release().await.unwrap();
    let first = waiters.remove(0).await.unwrap().unwrap();
    settled(&observer, &name, 2, 1).await;
    let queues = Inspector::new(observer.clone())
        .read_all(&name, None)
        .await
        .unwrap();
    assert_eq!(queues[0].members()[0].key(), first.key());
    members_announced_in_a_line(&observer, &queues[0]).await;
    first.release().await.unwrap();
    waiters
        .remove(0)
        .await
        .unwrap()
        .unwrap()
        .release()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_permit_semaphores_and_a_write_locks_pointers_are_not_members() {
    // Lines longer than COUNTED_UP_TO: the waiters further back announce themselves.
    const WAITERS: usize = COUNTED_UP_TO + 2;
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("inspect/own-queues");
    let s = sessions(&etcd, 1 + WAITERS).await;
    // The i-th waiter (from 0) has i + 1 keys ahead of it.
    let announcing = |waiters: usize| waiters.saturating_sub(COUNTED_UP_TO);

    let permit = Semaphore::new(&s[0], &name, 1).acquire().await.unwrap();
    let mut waiting = Vec::new();
    for (i, session) in s[1..].iter().enumerate() {
        let semaphore = Semaphore::new(session, &name, 1);
        waiting.push(tokio::spawn(
            async move { semaphore.acquire().await.map(drop) },
        ));
        settled(&observer, &name, i + 2, announcing(i + 1)).await;
    }
    let on_semaphore = announcing(WAITERS);
    let writer = RwLock::new(&s[0], &name).write().await.unwrap();
    let mut writers: Vec<tokio::task::JoinHandle<Result<(), Error>>> = Vec::new();
    for (i, session) in s[1..].iter().enumerate() {
        let lock = RwLock::new(session, &name);
        writers.push(tokio::spawn(async move { lock.write().await.map(drop) }));
        settled(
            &observer,
            &name,
            1 + WAITERS + i + 2,
            on_semaphore + announcing(i + 1),
        )
        .await;
    }

    let queues = Inspector::new(observer.clone())
        .read_all(&name, Some(1))
        .await
        .unwrap();
    let kinds: Vec<QueueKind> = queues.iter().map(QueueState::kind).collect();
    assert_eq!(
        kinds,
        [QueueKind::Mutex, QueueKind::Semaphore, QueueKind::RwLock],
        "{queues:?}"
    );
    assert!(
        queues[0].members().is_empty(),
        "no pointer in the lock's queue: {queues:?}"
    );
    assert_eq!(queues[1].members().len(), 1 + WAITERS, "{queues:?}");
    assert_eq!(queues[2].members().len(), 1 + WAITERS, "{queues:?}");
    assert!(queues[2].members().iter().all(|m| m.role() == Role::Writer));
    for queue in &queues[1..] {
        let members = queue.members();
        assert!(members.iter().all(|m| m.client() == MemberClient::Ours));
        assert!(members.iter().all(|m| !m.key().contains("#next/")));
        assert_eq!(members[0].holds(), Some(true));
        assert_eq!(members[0].announced_behind(), None);
        for (ahead, pair) in members.windows(2).enumerate() {
            // pair[1] has ahead + 1 keys ahead of it.
            let expected = (ahead + 1 > COUNTED_UP_TO).then(|| pair[0].key());
            assert_eq!(pair[1].announced_behind(), expected, "{}", pair[1].key());
        }
    }
    drop((permit, writer));
    for w in waiting.into_iter().chain(writers) {
        w.await.unwrap().unwrap();
    }
}
