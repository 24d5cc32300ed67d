//! Resuming a lease and what it holds after a restart (`LeasedSession::resume`,
//! `Mutex::resume`, `Election::resume`, `Semaphore::resume`, `RwLock::resume_read`/`resume_write`), and handing a lease off (`orphan`), against real etcd.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use etcd_coord::{
    Election, Error, LeasedSession, LossReason, Mutex, RwLock, Semaphore, SessionOptions,
    SessionState,
};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Where the holder process finds its etcd and lock: `<endpoint> <name> <ttl secs>`.
const HOLDER_ENV: &str = "ETCD_COORD_RESUME_HOLDER";
const REPORT: &str = "@holder";

/// The holder process (run by the tests below, not on its own): takes the lock, reports its
/// lease id, key and fencing token, and keeps the lease alive until it is killed.
#[test]
#[ignore = "a helper process of the tests in this file"]
fn holder_process() {
    let Ok(spec) = std::env::var(HOLDER_ENV) else {
        return;
    };
    let words: Vec<&str> = spec.split_whitespace().collect();
    let [endpoint, name, ttl] = words[..] else {
        panic!("bad {HOLDER_ENV}: {spec}");
    };
    let ttl = Duration::from_secs(ttl.parse().expect("a TTL"));
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let client = etcd_client::Client::connect(
            [endpoint],
            Some(etcd_coord::recommended_connect_options()),
        )
        .await
        .unwrap();
        let session = LeasedSession::new(client, SessionOptions::new().with_ttl(ttl))
            .await
            .unwrap();
        let guard = Mutex::new(&session, name).lock().await.unwrap();
        println!(
            "{REPORT} {} {} {}",
            session.lease_id(),
            guard.key(),
            guard.fencing_token()
        );
        std::future::pending::<()>().await;
    });
}

/// A holder in its own process: its child handle (SIGKILL on `kill`) and what it reported.
struct Holder {
    process: tokio::process::Child,
    lease_id: i64,
    key: String,
    token: i64,
}

async fn holder(etcd: &etcd_coord::testkit::TestEtcd, name: &str, ttl_secs: u64) -> Holder {
    let mut process = tokio::process::Command::new("/proc/self/exe")
        .args(["holder_process", "--exact", "--ignored", "--nocapture"])
        .env(
            HOLDER_ENV,
            format!("{} {name} {ttl_secs}", etcd.endpoints()[0]),
        )
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("a holder process");
    let mut lines = BufReader::new(process.stdout.take().unwrap()).lines();
    let report = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(at) = line.find(REPORT) {
                return line[at + REPORT.len()..].to_owned();
            }
        }
        panic!("the holder process ended without reporting");
    })
    .await
    .expect("the holder reports");
    let words: Vec<&str> = report.split_whitespace().collect();
    Holder {
        process,
        lease_id: words[0].parse().unwrap(),
        key: words[1].to_owned(),
        token: words[2].parse().unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_killed_and_restarted_within_the_ttl_resumes_its_lease_and_lock_while_the_waiter_stays_blocked(
) {
    let etcd = etcd().await;
    let name = unique("resume");
    let ttl = 4;
    let mut held = holder(&etcd, &name, ttl).await;
    let waiting = session(&etcd, 30).await;
    let waiter = {
        let m = Mutex::new(&waiting, &name);
        tokio::spawn(async move { m.lock().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "the waiter got a held lock");

    held.process.kill().await.unwrap(); // SIGKILL: no release, no revoke
    let restarted =
        LeasedSession::resume(client(&etcd).await, held.lease_id, SessionOptions::new())
            .await
            .unwrap();
    assert_eq!(restarted.lease_id(), held.lease_id);
    assert_eq!(restarted.ttl(), Duration::from_secs(ttl));
    // The old process's key still holds the lock, also against its own lease's new session:
    // a fresh acquisition never mistakes that key for one of its own.
    assert!(Mutex::new(&restarted, &name)
        .try_lock()
        .await
        .unwrap()
        .is_none());
    let guard = Mutex::new(&restarted, &name)
        .resume(&held.key, held.token)
        .await
        .unwrap();
    assert_eq!(guard.fencing_token(), held.token);
    assert_eq!(guard.key(), held.key);

    // The resumed session keeps the lease alive well past the TTL the dead process left.
    tokio::time::sleep(Duration::from_secs(ttl + 2)).await;
    assert!(!waiter.is_finished(), "the waiter got a resumed lock");
    guard.release().await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter gets the lock once it is released")
        .unwrap()
        .unwrap();
    assert!(next.fencing_token() > held.token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_restarted_after_its_ttl_cannot_resume_and_the_waiter_holds() {
    let etcd = etcd().await;
    let name = unique("resume-late");
    let ttl = 2;
    let mut held = holder(&etcd, &name, ttl).await;
    let waiting = session(&etcd, 30).await;
    let waiter = {
        let m = Mutex::new(&waiting, &name);
        tokio::spawn(async move { m.lock().await })
    };
    held.process.kill().await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(ttl + 3), waiter)
        .await
        .expect("the waiter gets the lock once the dead holder's lease expired")
        .unwrap()
        .unwrap();
    let resumed =
        LeasedSession::resume(client(&etcd).await, held.lease_id, SessionOptions::new()).await;
    assert!(
        matches!(resumed, Err(Error::LeaseNotFound(id)) if id == held.lease_id),
        "{resumed:?}"
    );
    assert!(next.fencing_token() > held.token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphaned_session_stops_claiming_leaves_its_keys_and_its_lease_ends_on_its_ttl() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("orphan");
    let ttl = Duration::from_secs(3);
    let s = LeasedSession::new(client(&etcd).await, SessionOptions::new().with_ttl(ttl))
        .await
        .unwrap();
    let guard = Mutex::new(&s, &name).lock().await.unwrap();
    let fence = guard.fence();
    let lease_id = s.orphan();
    assert_eq!(lease_id, s.lease_id());
    assert_eq!(s.loss_reason(), Some(LossReason::Orphaned));
    tokio::time::timeout(Duration::from_secs(1), guard.lost())
        .await
        .expect("a guard of an orphaned session reports the loss");
    let write = fence
        .txn_if_owner(vec![etcd_client::TxnOp::put(
            format!("{name}-data"),
            "x",
            None,
        )])
        .await;
    assert!(matches!(write, Err(Error::SessionLost(_))), "{write:?}");
    // Neither dropping the guard nor the session nor closing it touches the key or the lease.
    drop(guard);
    s.close().await.unwrap();
    drop(s);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(keys_under(&observer, &name).await.len(), 1);
    assert!(lease_exists(&observer, lease_id).await);
    // Nobody resumes it: the lease and the key end on the TTL.
    assert!(
        eventually(ttl + Duration::from_secs(2), || async {
            !lease_exists(&observer, lease_id).await
        })
        .await,
        "the orphaned lease outlived its TTL"
    );
    assert!(keys_under(&observer, &name).await.is_empty());
    assert!(keys_under(&observer, &format!("{name}-data"))
        .await
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphaned_leadership_is_resumed_with_its_value_and_token() {
    let etcd = etcd().await;
    let name = unique("orphan-election");
    let s = session(&etcd, 10).await;
    let leadership = Election::new(&s, &name).campaign("node-1").await.unwrap();
    let (key, token) = (leadership.key().to_owned(), leadership.fencing_token());
    let lease_id = s.orphan();
    drop(leadership);
    drop(s);
    let resumed = LeasedSession::resume(client(&etcd).await, lease_id, SessionOptions::new())
        .await
        .unwrap();
    let election = Election::new(&resumed, &name);
    let mut leadership = election.resume(&key, token).await.unwrap();
    assert_eq!(leadership.fencing_token(), token);
    let leader = election.leader().await.unwrap().expect("a leader");
    assert_eq!(leader.value(), b"node-1");
    assert_eq!(leader.fencing_token(), token);
    leadership.resign().await.unwrap();
    assert!(election.leader().await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_checks_what_it_is_given() {
    let etcd = etcd().await;
    let name = unique("resume-checks");
    // A lease id etcd never grants, and one that does not exist.
    let zero = LeasedSession::resume(client(&etcd).await, 0, SessionOptions::new()).await;
    assert!(matches!(zero, Err(Error::InvalidArgument(_))), "{zero:?}");
    let absent =
        LeasedSession::resume(client(&etcd).await, 0x1234_5678, SessionOptions::new()).await;
    assert!(
        matches!(absent, Err(Error::LeaseNotFound(0x1234_5678))),
        "{absent:?}"
    );

    let first = session(&etcd, 10).await;
    let guard = Mutex::new(&first, &name).lock().await.unwrap();
    let (key, token) = (guard.key().to_owned(), guard.fencing_token());
    let lease_id = first.orphan();
    drop(guard);
    let s = LeasedSession::resume(client(&etcd).await, lease_id, SessionOptions::new())
        .await
        .unwrap();
    // Another incarnation's token, another name's key, another lease's key.
    let wrong_token = Mutex::new(&s, &name).resume(&key, token + 1).await;
    assert!(
        matches!(wrong_token, Err(Error::LockLost { .. })),
        "{wrong_token:?}"
    );
    let other_name = Mutex::new(&s, format!("{name}-2"))
        .resume(&key, token)
        .await;
    assert!(
        matches!(other_name, Err(Error::InvalidArgument(_))),
        "{other_name:?}"
    );
    let stranger = session(&etcd, 10).await;
    let foreign = Mutex::new(&stranger, &name).resume(&key, token).await;
    assert!(
        matches!(foreign, Err(Error::InvalidArgument(_))),
        "{foreign:?}"
    );
    // The right one.
    let guard = Mutex::new(&s, &name).resume(&key, token).await.unwrap();
    guard.release().await.unwrap();
    // Released: gone for good.
    let again = Mutex::new(&s, &name).resume(&key, token).await;
    assert!(matches!(again, Err(Error::LockLost { .. })), "{again:?}");
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_semaphore_permit_keeps_counting_against_the_permits_until_it_is_released() {
    let etcd = etcd().await;
    let name = unique("resume-semaphore");
    let first = session(&etcd, 10).await;
    let other = session(&etcd, 30).await;
    let waiting = session(&etcd, 30).await;
    let held = Semaphore::new(&first, &name, 2).acquire().await.unwrap();
    let (key, token) = (held.key().to_owned(), held.fencing_token());
    let _second = Semaphore::new(&other, &name, 2).acquire().await.unwrap();
    let waiter = {
        let s = Semaphore::new(&waiting, &name, 2);
        tokio::spawn(async move { s.acquire().await })
    };
    let lease_id = first.orphan();
    drop(held);
    drop(first);
    let resumed = LeasedSession::resume(client(&etcd).await, lease_id, SessionOptions::new())
        .await
        .unwrap();
    let semaphore = Semaphore::new(&resumed, &name, 2);
    // A permit key is not a mutex key, nor the other way round.
    let as_mutex = Mutex::new(&resumed, &name).resume(&key, token).await;
    assert!(
        matches!(as_mutex, Err(Error::InvalidArgument(_))),
        "{as_mutex:?}"
    );
    let permit = semaphore.resume(&key, token).await.unwrap();
    assert_eq!(permit.key(), key);
    assert_eq!(permit.fencing_token(), token);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiter.is_finished(),
        "a third holder got in while the resumed permit and another were held"
    );
    permit.release().await.unwrap();
    let third = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter gets the permit the resumed holder released")
        .unwrap()
        .unwrap();
    assert!(third.fencing_token() > token);
    let again = semaphore.resume(&key, token).await;
    assert!(matches!(again, Err(Error::LockLost { .. })), "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_write_lock_keeps_readers_out_and_a_resumed_read_lock_keeps_writers_out() {
    let etcd = etcd().await;
    let name = unique("resume-rwlock");
    let observer = session(&etcd, 30).await;

    // A writer hands its lease off; a reader queues behind it.
    let first = session(&etcd, 10).await;
    let writing = RwLock::new(&first, &name).write().await.unwrap();
    let (wkey, wtoken) = (writing.key().to_owned(), writing.fencing_token());
    let reader = {
        let l = RwLock::new(&observer, &name);
        tokio::spawn(async move { l.read().await })
    };
    let lease_id = first.orphan();
    drop(writing);
    let resumed = LeasedSession::resume(client(&etcd).await, lease_id, SessionOptions::new())
        .await
        .unwrap();
    let lock = RwLock::new(&resumed, &name);
    // A writer's key is not a reader's.
    let as_reader = lock.resume_read(&wkey, wtoken).await;
    assert!(
        matches!(as_reader, Err(Error::InvalidArgument(_))),
        "{as_reader:?}"
    );
    let writing = lock.resume_write(&wkey, wtoken).await.unwrap();
    assert_eq!(writing.fencing_token(), wtoken);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !reader.is_finished(),
        "a reader got in past a resumed writer"
    );
    writing.release().await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("the reader gets in once the resumed writer releases")
        .unwrap()
        .unwrap();
    read.release().await.unwrap();

    // A reader hands its lease off; a writer queues behind it.
    let second = session(&etcd, 10).await;
    let reading = RwLock::new(&second, &name).read().await.unwrap();
    let (rkey, rtoken) = (reading.key().to_owned(), reading.fencing_token());
    let writer = {
        let l = RwLock::new(&observer, &name);
        tokio::spawn(async move { l.write().await })
    };
    let lease_id = second.orphan();
    drop(reading);
    let resumed = LeasedSession::resume(client(&etcd).await, lease_id, SessionOptions::new())
        .await
        .unwrap();
    let lock = RwLock::new(&resumed, &name);
    let as_writer = lock.resume_write(&rkey, rtoken).await;
    assert!(
        matches!(as_writer, Err(Error::InvalidArgument(_))),
        "{as_writer:?}"
    );
    let reading = lock.resume_read(&rkey, rtoken).await.unwrap();
    assert_eq!(reading.fencing_token(), rtoken);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !writer.is_finished(),
        "a writer got in past a resumed reader"
    );
    reading.release().await.unwrap();
    let wrote = tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .expect("the writer gets in once the resumed reader releases")
        .unwrap()
        .unwrap();
    assert!(wrote.fencing_token() > wtoken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_sessions_deadline_counts_from_its_refresh_being_sent_not_from_a_guess() {
    // A lease of 5 s (margin 1 s) last refreshed 2.5 s ago by a process that went away; its
    // resumption runs over a link that delays each direction by 500 ms, so the refresh is
    // answered 1 s after it was sent, and the TTL read after it another 1 s later.
    let etcd = etcd().await;
    let ttl = Duration::from_secs(5);
    let first = LeasedSession::new(client(&etcd).await, SessionOptions::new().with_ttl(ttl))
        .await
        .unwrap();
    let lease_id = first.orphan();
    drop(first);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let proxy = proxy(&etcd).await;
    // HTTP/2 pings answered 1 s late must not count as a dead connection.
    let via = etcd_client::Client::connect(
        [proxy.endpoint()],
        Some(
            etcd_coord::recommended_connect_options()
                .with_keep_alive(Duration::from_secs(1), Duration::from_secs(5)),
        ),
    )
    .await
    .unwrap();
    proxy.set_latency(Duration::from_millis(500), Duration::ZERO);
    let sent = Instant::now();
    let resumed = LeasedSession::resume(via, lease_id, SessionOptions::new())
        .await
        .unwrap();
    let took = sent.elapsed();
    // From here on no refresh is answered: the deadline stays where the resumption put it.
    proxy.down();
    assert!(took >= Duration::from_secs(2), "resumed in {took:?}");
    assert_eq!(resumed.ttl(), ttl);
    assert_eq!(resumed.safety_margin(), Duration::from_secs(1));
    // Not from the earlier process's last refresh (that would be Lost by now) …
    assert_ne!(resumed.state(), SessionState::Lost);
    // … but from the refresh's send: TTL − margin = 4 s after it, not after its answer (5 s).
    // (Suspended meanwhile: its refreshes fail.) Each check allows for this test being
    // scheduled late: what it asserts holds whenever it runs.
    tokio::time::sleep_until((sent + Duration::from_millis(3600)).into()).await;
    let early = sent.elapsed();
    let state = resumed.state();
    assert!(
        state != SessionState::Lost || early >= Duration::from_millis(3950),
        "Lost {early:?} after the refresh was sent"
    );
    tokio::time::sleep_until((sent + Duration::from_millis(4400)).into()).await;
    let state = resumed.state();
    let late = sent.elapsed();
    assert!(
        state == SessionState::Lost || late < Duration::from_millis(4300),
        "{state:?} {late:?} after the refresh was sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_resumed_while_still_in_line_waits_from_its_place() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("resume-waiting");
    let (a, b, c) = (
        session(&etcd, 30).await,
        session(&etcd, 10).await,
        session(&etcd, 30).await,
    );
    let held = Mutex::new(&a, &name).lock().await.unwrap();
    let b_waits = {
        let m = Mutex::new(&b, &name);
        tokio::spawn(async move { m.lock().await })
    };
    // B's place in line: the key on its lease (a process would have found it the same way).
    let started = Instant::now();
    let (key, token) = loop {
        let resp = observer
            .clone()
            .get(
                format!("{name}/"),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        if let Some(kv) = resp.kvs().iter().find(|kv| kv.lease() == b.lease_id()) {
            break (
                String::from_utf8(kv.key().to_vec()).unwrap(),
                kv.create_revision(),
            );
        }
        assert!(started.elapsed() < Duration::from_secs(5), "B never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // C queues behind B.
    let c_waits = {
        let m = Mutex::new(&c, &name);
        tokio::spawn(async move { m.lock().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // B's process hands its lease off mid-wait: its wait ends, its key stays in line.
    let lease_id = b.orphan();
    let ended = tokio::time::timeout(Duration::from_secs(5), b_waits)
        .await
        .expect("an orphaned session's wait ends")
        .unwrap();
    assert!(ended.is_err(), "{ended:?}");
    let resumed = LeasedSession::resume(client(&etcd).await, lease_id, SessionOptions::new())
        .await
        .unwrap();
    let b_again = {
        let m = Mutex::new(&resumed, &name);
        let key = key.clone();
        tokio::spawn(async move { m.resume(&key, token).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!b_again.is_finished(), "a resumed waiter got a held lock");
    held.release().await.unwrap();
    let guard = tokio::time::timeout(Duration::from_secs(5), b_again)
        .await
        .expect("the resumed waiter gets the lock from its place")
        .unwrap()
        .unwrap();
    assert_eq!((guard.key(), guard.fencing_token()), (key.as_str(), token));
    assert!(!c_waits.is_finished(), "C got ahead of the resumed B");
    guard.release().await.unwrap();
    let c_holds = tokio::time::timeout(Duration::from_secs(5), c_waits)
        .await
        .expect("C gets the lock after B")
        .unwrap()
        .unwrap();
    assert!(c_holds.fencing_token() > token);
}
