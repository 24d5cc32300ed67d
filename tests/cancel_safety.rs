//! What each operation's `# Cancel safety` section promises, checked by dropping its future at
//! every await point it reaches (`common::drive`: after 0, 1, 2, … polls, each with what it
//! awaits in flight and once that has happened — no timers, so no await point is skipped),
//! and looking, while the sessions live, at what the drop left behind: keys, leases, tasks.

mod common;

use std::any::Any;
use std::time::Duration;

use common::*;
use etcd_client::Client;
use etcd_coord::{
    DoubleBarrier, Election, Error, LeasedSession, Mutex, RwLock, Semaphore, SessionOptions,
};
use futures::future::BoxFuture;

/// A primitive that queues: what is taken, and what is resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Mutex,
    Election,
    /// One permit.
    Semaphore,
    Read,
    Write,
}

impl Kind {
    /// What keeps an acquisition of this kind waiting.
    fn blocked_by(self) -> Kind {
        match self {
            Kind::Read => Kind::Write,
            Kind::Write => Kind::Read,
            other => other,
        }
    }
}

/// Any guard: dropped, it releases (through its session's task).
type Guard = Box<dyn Any + Send>;

/// Acquires `kind` on `name` through `s` (one await: the operation's own).
fn acquire<'a>(
    kind: Kind,
    s: &'a LeasedSession,
    name: &'a str,
) -> BoxFuture<'a, Result<Guard, Error>> {
    match kind {
        Kind::Mutex => {
            Box::pin(async move { Ok(Box::new(Mutex::new(s, name).lock().await?) as Guard) })
        }
        Kind::Election => {
            Box::pin(
                async move { Ok(Box::new(Election::new(s, name).campaign("v").await?) as Guard) },
            )
        }
        Kind::Semaphore => {
            Box::pin(
                async move { Ok(Box::new(Semaphore::new(s, name, 1).acquire().await?) as Guard) },
            )
        }
        Kind::Read => {
            Box::pin(async move { Ok(Box::new(RwLock::new(s, name).read().await?) as Guard) })
        }
        Kind::Write => {
            Box::pin(async move { Ok(Box::new(RwLock::new(s, name).write().await?) as Guard) })
        }
    }
}

/// Resumes `kind`'s key `key` (created at `token`) on `name` through `s`.
fn resume<'a>(
    kind: Kind,
    s: &'a LeasedSession,
    name: &'a str,
    key: &'a str,
    token: i64,
) -> BoxFuture<'a, Result<Guard, Error>> {
    match kind {
        Kind::Mutex => {
            Box::pin(
                async move { Ok(Box::new(Mutex::new(s, name).resume(key, token).await?) as Guard) },
            )
        }
        Kind::Election => Box::pin(async move {
            Ok(Box::new(Election::new(s, name).resume(key, token).await?) as Guard)
        }),
        Kind::Semaphore => Box::pin(async move {
            Ok(Box::new(Semaphore::new(s, name, 1).resume(key, token).await?) as Guard)
        }),
        Kind::Read => Box::pin(async move {
            Ok(Box::new(RwLock::new(s, name).resume_read(key, token).await?) as Guard)
        }),
        Kind::Write => Box::pin(async move {
            Ok(Box::new(RwLock::new(s, name).resume_write(key, token).await?) as Guard)
        }),
    }
}

fn ttl(secs: u64) -> SessionOptions {
    SessionOptions::new().with_ttl(Duration::from_secs(secs))
}

/// The create revision and lease of `key`, if it exists.
async fn incarnation(c: &Client, key: &str) -> Option<(i64, i64)> {
    let resp = c.clone().get(key, None).await.unwrap();
    resp.kvs()
        .first()
        .map(|kv| (kv.create_revision(), kv.lease()))
}

/// `read()` and `write()` dropped at every await point they reach leave no key and no task
/// behind, seen while the session lives: queued behind the other kind, and on a free lock
/// (where the drop may come after the lock was taken).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_read_or_write_leaves_no_key_behind() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let holder = session(&etcd, 30).await;
    let s = session(&etcd, 30).await;
    for kind in [Kind::Read, Kind::Write] {
        let name = unique("rw-cancel");
        let held = acquire(kind.blocked_by(), &holder, &name).await.unwrap();
        let held_keys = keys_under(&observer, &name).await;
        let left_nothing = async |what: String, keys: &[String]| {
            s.settled().await;
            assert_eq!(keys_under(&observer, &name).await, keys, "{what}");
            assert!(
                keys_on_lease(&observer, s.lease_id()).await.is_empty(),
                "{what}: a key left on the lease"
            );
            only_its_own_task_runs(&s).await;
        };
        let ended = drop_at_every_await(
            || acquire(kind, &s, &name),
            async |driven, step| {
                assert!(
                    !matches!(driven, Driven::Completed(_)),
                    "{kind:?} went past a {:?}",
                    kind.blocked_by()
                );
                left_nothing(format!("{kind:?} dropped at {step:?}"), &held_keys).await;
            },
        )
        .await;
        // At least the enqueue in flight, then the wait (on the session's watch of this
        // lock, in place since the first attempt: no watch to register any more).
        assert!(
            matches!(ended, Ended::Waiting { polls } if polls >= 2),
            "{kind:?}: {ended:?}"
        );
        drop(held);
        holder.settled().await;
        let ended = drop_at_every_await(
            || acquire(kind, &s, &name),
            async |driven, step| {
                drop(driven); // a guard it took releases
                left_nothing(format!("{kind:?} dropped at {step:?} (free)"), &[]).await;
            },
        )
        .await;
        assert!(
            matches!(ended, Ended::Completed { polls } if polls >= 2),
            "{kind:?}: {ended:?}"
        );
    }
}

/// `resume()` of a key an earlier process left (waiting in line behind a holder, or holding),
/// dropped at every await point it reaches: the key is left as it was or deleted (fenced),
/// never anything else; once the resumption waits, dropping it deletes the key, as for any
/// waiter that gives up; nothing else is left on the lease and no task runs on. The resumed
/// lease is then closed; the holder's key is untouched throughout.
async fn a_dropped_resume_leaves_the_key_as_it_was_or_deletes_it(kind: Kind) {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let holder = session(&etcd, 30).await;
    for waiting in [true, false] {
        let name = unique("resume-cancel");
        // A waiter of a mutex or an election behind a long queue follows the key just ahead
        // and announces itself with a pointer (a short queue's waiter counts its deletions and
        // puts nothing, as the one-permit semaphore's here does).
        let announces = waiting && matches!(kind, Kind::Mutex | Kind::Election);
        if announces {
            pad_with_nested_keys(&observer, &name).await;
        }
        let held = match waiting {
            true => Some(acquire(kind.blocked_by(), &holder, &name).await.unwrap()),
            false => None,
        };
        let held_keys = keys_under(&observer, &name).await;
        let mut ended = None;
        for step in drop_points() {
            // An earlier process's key, its lease handed off (a guard taken is dropped only
            // after the hand-off: it releases nothing then).
            let old = session(&etcd, 30).await;
            let taking = tokio::spawn({
                let (old, name) = (old.clone(), name.clone());
                async move { acquire(kind, &old, &name).await }
            });
            let lease = old.lease_id();
            // An announcing waiter also puts its pointer beside the key ahead: wait for it
            // too, so that no put is in flight when the lease is handed off.
            assert!(
                eventually(Duration::from_secs(5), || async {
                    let on = keys_on_lease(&observer, lease).await;
                    !on.is_empty() && (!announces || on.iter().any(|k| is_pointer(k)))
                })
                .await
            );
            // Its member key (a waiting one may also have put a pointer under the holder's).
            let key = keys_on_lease(&observer, lease)
                .await
                .into_iter()
                .find(|k| !is_pointer(k))
                .expect("the earlier process's member key");
            let (token, _) = incarnation(&observer, &key).await.unwrap();
            assert_eq!(old.orphan(), lease);
            drop(taking.await.unwrap());
            let s = LeasedSession::resume(client(&etcd).await, lease, ttl(30))
                .await
                .unwrap();

            let driven = drive(resume(kind, &s, &name, &key, token), step.polls, step.at).await;
            let what = format!("{kind:?} (waiting: {waiting}) dropped at {step:?}: {driven:?}");
            ended = driven.ended(step);
            if let Driven::Completed(got) = driven {
                assert!(!waiting, "{what}: resumed past the holder");
                got.unwrap_or_else(|e| panic!("{what}: {e}")); // dropped: released
            }
            s.settled().await;
            let now = incarnation(&observer, &key).await;
            assert!(
                now.is_none() || now == Some((token, lease)),
                "{what}: the key is {now:?}"
            );
            if matches!(ended, Some(Ended::Waiting { .. } | Ended::Completed { .. })) {
                assert_eq!(
                    now, None,
                    "{what}: the key outlived its dropped guard or wait"
                );
            }
            let on_lease = keys_on_lease(&observer, lease).await;
            assert!(
                on_lease.iter().all(|k| *k == key),
                "{what}: left on the lease: {on_lease:?}"
            );
            let mut expected = held_keys.clone();
            if now.is_some() {
                expected.push(key.clone());
            }
            assert_eq!(keys_under(&observer, &name).await, expected, "{what}");
            only_its_own_task_runs(&s).await;
            s.close().await.unwrap();
            if ended.is_some() {
                break;
            }
        }
        match waiting {
            true => assert!(
                matches!(ended, Some(Ended::Waiting { polls }) if polls >= 3),
                "{ended:?}"
            ),
            false => assert!(
                matches!(ended, Some(Ended::Completed { polls }) if polls >= 2),
                "{ended:?}"
            ),
        }
        drop(held);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_mutex_resume_leaves_the_key_as_it_was_or_deletes_it() {
    a_dropped_resume_leaves_the_key_as_it_was_or_deletes_it(Kind::Mutex).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_election_resume_leaves_the_key_as_it_was_or_deletes_it() {
    a_dropped_resume_leaves_the_key_as_it_was_or_deletes_it(Kind::Election).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_semaphore_resume_leaves_the_key_as_it_was_or_deletes_it() {
    a_dropped_resume_leaves_the_key_as_it_was_or_deletes_it(Kind::Semaphore).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_resume_read_leaves_the_key_as_it_was_or_deletes_it() {
    a_dropped_resume_leaves_the_key_as_it_was_or_deletes_it(Kind::Read).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_resume_write_leaves_the_key_as_it_was_or_deletes_it() {
    a_dropped_resume_leaves_the_key_as_it_was_or_deletes_it(Kind::Write).await;
}

/// `LeasedSession::resume` dropped at every await point it reaches starts nothing (no task
/// runs on) and leaves the lease to its TTL (not revoked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_session_resume_starts_nothing_and_leaves_the_lease() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let lease = c.clone().lease_grant(30, None).await.unwrap().id();
    // The tasks of this test's runtime: the client's (the first few of which end soon after it
    // connected) and any the resumption started.
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut before = tasks();
    let ended = drop_at_every_await(
        || LeasedSession::resume(c.clone(), lease, ttl(30)),
        async |driven, step| {
            if let Driven::Completed(resumed) = driven {
                resumed.unwrap().orphan(); // stops it without revoking the lease
            }
            assert!(
                lease_exists(&c, lease).await,
                "dropped at {step:?}: the lease is gone"
            );
            assert!(
                eventually(Duration::from_secs(5), || async { tasks() <= before }).await,
                "dropped at {step:?}: {} tasks run, {before} before",
                tasks()
            );
            before = tasks();
        },
    )
    .await;
    assert!(
        matches!(ended, Ended::Completed { polls } if polls >= 2),
        "{ended:?}"
    );
}

/// `DoubleBarrier::enter` dropped at every await point it reaches, while too few have entered
/// to pass, leaves no participant key and no task behind; the participant already inside
/// still waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_enter_leaves_no_participant_key() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("enter-cancel");
    let a = session(&etcd, 30).await;
    let first = tokio::spawn({
        let db = DoubleBarrier::new(&a, &name, 3);
        async move { db.enter().await }
    });
    assert!(
        eventually(Duration::from_secs(5), || async {
            keys_under(&observer, &name).await.len() == 1
        })
        .await
    );
    let inside = keys_under(&observer, &name).await;
    let s = session(&etcd, 30).await;
    let db = DoubleBarrier::new(&s, &name, 3);
    let ended = drop_at_every_await(
        || db.enter(),
        async |driven, step| {
            assert!(
                !matches!(driven, Driven::Completed(_)),
                "passed with 2 of 3"
            );
            s.settled().await;
            assert_eq!(
                keys_under(&observer, &name).await,
                inside,
                "dropped at {step:?}"
            );
            assert!(keys_on_lease(&observer, s.lease_id()).await.is_empty());
            only_its_own_task_runs(&s).await;
            assert!(
                !first.is_finished(),
                "dropped at {step:?}: the first one passed"
            );
        },
    )
    .await;
    assert!(
        matches!(ended, Ended::Waiting { polls } if polls >= 3),
        "{ended:?}"
    );
}

/// `DoubleBarrier::enter` dropped at every await point on its way through: the second of two
/// participants, so it puts the latch that lets both pass (the first one's process has
/// stalled once its key was in place). Then the first one's process ends without leaving — its
/// lease's end counts as having left. Once every participant of that round is gone, no key of
/// the barrier may be left, and a participant of the next round must wait for a second one,
/// not pass alone on a latch the dropped enter left up. (An enter that completes leaves with
/// `leave()`.)
///
/// (Found by this test, issue 22: an enter dropped after its latch put deleted only its
/// participant key, so the latch stayed up under its live lease after the other participant
/// died, and the next round's first participant passed alone. Fixed: the session that puts a
/// latch looks after it until its round is over.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_enter_leaves_no_latch_to_let_the_next_round_through_early() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let s = session(&etcd, 30).await;
    let mut ended = None;
    for step in drop_points() {
        let name = unique("latch-cancel");
        let a = session(&etcd, 30).await;
        let first = DoubleBarrier::new(&a, &name, 2);
        let mut stalled = Box::pin(first.enter());
        tokio::select! {
            got = &mut stalled => panic!("passed alone: {got:?}"),
            _ = eventually(Duration::from_secs(5), || async {
                keys_under(&observer, &name).await.len() == 1
            }) => {}
        }
        let driven = drive(
            DoubleBarrier::new(&s, &name, 2).enter(),
            step.polls,
            step.at,
        )
        .await;
        let what = format!("dropped at {step:?}: {driven:?}");
        ended = driven.ended(step);
        let leaving = match driven {
            Driven::Completed(got) => Some(tokio::spawn(got.unwrap().leave())),
            _ => None,
        };
        s.settled().await;
        // The stalled participant's process ends.
        a.close().await.unwrap();
        drop(stalled);
        if let Some(leaving) = leaving {
            leaving.await.unwrap().unwrap();
        }
        only_its_own_task_runs(&s).await;
        // The session that put the latch takes it down once its round is over (promptly, in
        // the background): within 2 s of the last participant's end.
        let gone = eventually(Duration::from_secs(2), || async {
            keys_under(&observer, &name).await.is_empty()
        })
        .await;
        assert!(
            gone,
            "{what}: left up after every participant has gone: {:?}",
            keys_under(&observer, &name).await
        );
        let next = session(&etcd, 30).await;
        assert!(
            tokio::time::timeout(
                Duration::from_millis(300),
                DoubleBarrier::new(&next, &name, 2).enter()
            )
            .await
            .is_err(),
            "{what}: the next round's first participant passed alone"
        );
        next.close().await.unwrap();
        if ended.is_some() {
            break;
        }
    }
    assert!(
        matches!(ended, Some(Ended::Completed { polls }) if polls >= 3),
        "{ended:?}"
    );
}

/// `DoubleBarrierGuard::leave` dropped at every await point it reaches: the participant has
/// left or leaves in the background — its key goes either way, no task runs on — and the other
/// participant, leaving after, is not kept waiting for it and takes the latch down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_leave_leaves_in_the_background() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let (a, s) = (session(&etcd, 30).await, session(&etcd, 30).await);
    let mut ended = None;
    for step in drop_points() {
        let name = unique("leave-cancel");
        let entering = tokio::spawn({
            let db = DoubleBarrier::new(&a, &name, 2);
            async move { db.enter().await.unwrap() }
        });
        let ours = DoubleBarrier::new(&s, &name, 2).enter().await.unwrap();
        let theirs = entering.await.unwrap();
        let driven = drive(ours.leave(), step.polls, step.at).await;
        let what = format!("dropped at {step:?}: {driven:?}");
        ended = driven.ended(step);
        assert!(
            !matches!(driven, Driven::Completed(_)),
            "{what}: left before the other one did"
        );
        s.settled().await;
        only_its_own_task_runs(&s).await;
        assert!(
            keys_on_lease(&observer, s.lease_id())
                .await
                .iter()
                .all(|k| !k.starts_with(&format!("{name}/#double/p"))),
            "{what}: our participant key is still there"
        );
        tokio::time::timeout(Duration::from_secs(5), theirs.leave())
            .await
            .unwrap_or_else(|_| panic!("{what}: the other one waits for us"))
            .unwrap();
        assert!(
            keys_under(&observer, &name).await.is_empty(),
            "{what}: {:?}",
            keys_under(&observer, &name).await
        );
        if ended.is_some() {
            break;
        }
    }
    assert!(
        matches!(ended, Some(Ended::Waiting { polls }) if polls >= 1),
        "{ended:?}"
    );
}
