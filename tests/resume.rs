//! Resuming a lease and what it holds after a restart (`LeasedSession::resume`,
//! `Mutex::resume`, `Election::resume`, `Semaphore::resume`, `RwLock::resume_read`/`resume_write`), and handing a lease off (`orphan`), against real etcd.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use etcd_coord::discovery::{Endpoint, SessionRegistration};
use etcd_coord::{
    Barrier, DoubleBarrier, Election, Error, Fence, LeasedSession, LossReason, Mutex, RwLock,
    Semaphore, SessionOptions, SessionState,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Where the holder process finds its etcd and lock: `<endpoint> <name> <ttl secs> [<mode>]`.
const HOLDER_ENV: &str = "ETCD_COORD_RESUME_HOLDER";
const REPORT: &str = "@holder";
/// The holder's mode in which it reports its lease first, then locks once told to on stdin.
const ENQUEUER: &str = "enqueuer";

/// The holder process (run by the tests below, not on its own): takes the lock, reports its
/// lease id, key and fencing token, and keeps the lease alive until it is killed. As an
/// `enqueuer` it reports its lease id alone (key `-`, token 0), then calls `lock()` once a
/// line arrives on its stdin, and reports nothing more.
#[test]
#[ignore = "a helper process of the tests in this file"]
fn holder_process() {
    let Ok(spec) = std::env::var(HOLDER_ENV) else {
        return;
    };
    let words: Vec<&str> = spec.split_whitespace().collect();
    let (endpoint, name, ttl, mode) = match words[..] {
        [endpoint, name, ttl] => (endpoint, name, ttl, "holder"),
        [endpoint, name, ttl, mode] => (endpoint, name, ttl, mode),
        _ => panic!("bad {HOLDER_ENV}: {spec}"),
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
        if mode == ENQUEUER {
            println!("{REPORT} {} - 0", session.lease_id());
            let mut go = String::new();
            std::io::stdin().read_line(&mut go).unwrap();
            let guard = Mutex::new(&session, name).lock().await;
            panic!("the enqueuer's lock() was answered: {guard:?}");
        }
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

async fn holder(etcd: &etcd_coord_testkit::TestEtcd, name: &str, ttl_secs: u64) -> Holder {
    holder_process_at(&etcd.endpoints()[0], name, ttl_secs, "holder").await
}

/// A holder process reaching etcd at `endpoint`, in `mode` (see [`holder_process`]).
async fn holder_process_at(endpoint: &str, name: &str, ttl_secs: u64, mode: &str) -> Holder {
    let mut process = tokio::process::Command::new("/proc/self/exe")
        .args(["holder_process", "--exact", "--ignored", "--nocapture"])
        .env(HOLDER_ENV, format!("{endpoint} {name} {ttl_secs} {mode}"))
        .stdin(Stdio::piped())
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

/// The name this crate gives a member key of the mutex `name` on lease `lease_id`.
fn member_key(name: &str, lease_id: i64, number: u64) -> String {
    format!("{name}/#{lease_id:016x}-{number:x}")
}

/// Puts `key` under lease `lease_id`, the way a put of the earlier process lands that was
/// still on its way when it went away (its answer, and so the key's token, lost with it).
async fn put_on_lease(client: &etcd_client::Client, key: &str, lease_id: i64) {
    client
        .clone()
        .put(
            key,
            "",
            Some(etcd_client::PutOptions::new().with_lease(lease_id)),
        )
        .await
        .unwrap();
}

/// The key (and its create revision) under `prefix` attached to `lease_id`, once there is one.
async fn key_on_lease(client: &etcd_client::Client, prefix: &str, lease_id: i64) -> (String, i64) {
    let started = Instant::now();
    loop {
        let resp = client
            .clone()
            .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .unwrap();
        if let Some(kv) = resp.kvs().iter().find(|kv| kv.lease() == lease_id) {
            return (
                String::from_utf8(kv.key().to_vec()).unwrap(),
                kv.create_revision(),
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no key of lease {lease_id:x} under {prefix}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `fence` still holds: a read-only Txn conditional on its key.
async fn holds(fence: &Fence) -> bool {
    match fence.txn_if_owner(Vec::new()).await {
        Ok(_) => true,
        Err(Error::LockLost { .. }) => false,
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_enqueued_by_a_process_killed_before_the_answer_is_deleted_after_the_adoption_window_and_the_next_waiter_gets_it(
) {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("resume-in-flight");
    let ttl = 3;
    let proxy = proxy(&etcd).await;
    let mut enqueuer = holder_process_at(&proxy.endpoint(), &name, ttl, ENQUEUER).await;
    // Its lock() reaches etcd; etcd's answer never reaches it.
    proxy.drop_responses();
    let stdin = enqueuer.process.stdin.as_mut().unwrap();
    stdin.write_all(b"go\n").await.unwrap();
    stdin.flush().await.unwrap();
    let (key, token) = key_on_lease(&observer, &format!("{name}/"), enqueuer.lease_id).await;
    // SIGKILL between its enqueue being sent and answered: nobody knows the key's token.
    enqueuer.process.kill().await.unwrap();
    let waiting = session(&etcd, 30).await;
    let waiter = {
        let m = Mutex::new(&waiting, &name);
        tokio::spawn(async move { m.lock().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "the waiter got in past the dead process's key"
    );

    let resumed = LeasedSession::resume(
        client(&etcd).await,
        enqueuer.lease_id,
        SessionOptions::new(),
    )
    .await
    .unwrap();
    // Nothing is taken back: the key is deleted once the adoption window (by default the
    // lease's TTL) is over, at the session's next look at its lease.
    let next = tokio::time::timeout(resumed.ttl() + Duration::from_secs(3), waiter)
        .await
        .expect("the next waiter gets the lock within the adoption window of the resume")
        .unwrap()
        .unwrap();
    assert!(next.fencing_token() > token);
    // By the rule, not by the lease's end: the resumed session still keeps the lease alive.
    assert_eq!(resumed.state(), SessionState::Alive);
    assert!(lease_exists(&observer, enqueuer.lease_id).await);
    // Deleted: too late to take it back.
    let late = Mutex::new(&resumed, &name).resume(&key, token).await;
    assert!(matches!(late, Err(Error::LockLost { .. })), "{late:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_taken_back_is_never_deleted_while_a_leftover_nobody_took_back_is() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("resume-kept");
    let other = format!("{name}-other");
    let first = LeasedSession::new(
        client(&etcd).await,
        SessionOptions::new().with_ttl(Duration::from_secs(3)),
    )
    .await
    .unwrap();
    let guard = Mutex::new(&first, &name).lock().await.unwrap();
    let (key, token) = (guard.key().to_owned(), guard.fencing_token());
    let target = format!("{name}-svc");
    let registered = SessionRegistration::register(&first, &target, Endpoint::new("h:1"))
        .await
        .unwrap();
    let lease_id = first.orphan();
    drop(guard);
    drop(registered);
    drop(first);
    // A key of the earlier process nobody will take back.
    let leftover = member_key(&other, lease_id, 9);
    put_on_lease(&observer, &leftover, lease_id).await;

    let resumed = LeasedSession::resume(client(&etcd).await, lease_id, SessionOptions::new())
        .await
        .unwrap();
    let guard = Mutex::new(&resumed, &name)
        .resume(&key, token)
        .await
        .unwrap();
    let registered = SessionRegistration::resume(&resumed, &target, Endpoint::new("h:1"))
        .await
        .unwrap();
    let waiting = session(&etcd, 30).await;
    let (a_waiter, b_waiter) = {
        let (a, b) = (Mutex::new(&waiting, &name), Mutex::new(&waiting, &other));
        (
            tokio::spawn(async move { a.lock().await }),
            tokio::spawn(async move { b.lock().await }),
        )
    };
    // The leftover goes once the window is over …
    let b = tokio::time::timeout(resumed.ttl() + Duration::from_secs(3), b_waiter)
        .await
        .expect("the leftover nobody took back is deleted after the adoption window")
        .unwrap()
        .unwrap();
    b.release().await.unwrap();
    // … the key taken back stays, look after look.
    tokio::time::sleep(resumed.ttl() + Duration::from_secs(1)).await;
    assert!(holds(&guard).await, "a lock taken back was deleted");
    assert!(
        holds(&registered.fence()).await,
        "a registration taken back was deleted"
    );
    assert_eq!(keys_under(&observer, &format!("{name}/")).await[0], key);
    assert!(!a_waiter.is_finished(), "a waiter got a lock taken back");
    guard.release().await.unwrap();
    let a = tokio::time::timeout(Duration::from_secs(5), a_waiter)
        .await
        .expect("the waiter gets the lock once it is released")
        .unwrap()
        .unwrap();
    assert!(a.fencing_token() > token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_the_resumed_session_puts_itself_are_never_deleted_while_a_leftover_is() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("resume-own");
    let n = |what: &str| format!("{name}-{what}");
    let first = LeasedSession::new(
        client(&etcd).await,
        SessionOptions::new().with_ttl(Duration::from_secs(3)),
    )
    .await
    .unwrap();
    let lease_id = first.orphan();
    drop(first);
    let leftover = member_key(&n("leftover"), lease_id, 9);
    put_on_lease(&observer, &leftover, lease_id).await;

    let resumed = LeasedSession::resume(client(&etcd).await, lease_id, SessionOptions::new())
        .await
        .unwrap();
    // Its own keys, one through each way this crate puts a key: an enqueue, a conditional
    // put of a try-acquire, an exclusive put, a latch, a registration.
    let lock = Mutex::new(&resumed, n("lock")).lock().await.unwrap();
    let tried = Mutex::new(&resumed, n("try"))
        .try_lock()
        .await
        .unwrap()
        .unwrap();
    let permit = Semaphore::new(&resumed, n("permits"), 2)
        .acquire()
        .await
        .unwrap();
    let reading = RwLock::new(&resumed, n("rw")).read().await.unwrap();
    let hold = Barrier::new(&resumed, n("barrier")).hold().await.unwrap();
    let inside = DoubleBarrier::new(&resumed, n("double"), 1)
        .enter()
        .await
        .unwrap();
    let registered = SessionRegistration::register(&resumed, n("svc"), Endpoint::new("10.0.0.1:1"))
        .await
        .unwrap();
    // And a waiter of its own, in line behind another session's holder (behind a long
    // queue, as far as its enqueue's read can tell: it announces itself).
    pad_with_nested_keys(&observer, &n("line")).await;
    let other = session(&etcd, 30).await;
    let ahead = Mutex::new(&other, n("line")).lock().await.unwrap();
    let queued = {
        let m = Mutex::new(&resumed, n("line"));
        tokio::spawn(async move { m.lock().await })
    };
    key_on_lease(&observer, &format!("{}/", n("line")), lease_id).await;
    // … with its hand-off pointer to the holder ahead in place (a key of its own too).
    assert!(
        eventually(Duration::from_secs(5), || async {
            keys_under(&observer, &n("line"))
                .await
                .iter()
                .any(|k| is_pointer(k))
        })
        .await,
        "the waiter announced itself"
    );
    let own = |keys: Vec<String>| -> Vec<String> {
        keys.into_iter()
            .filter(|k| !k.starts_with(&n("leftover")) && !k.starts_with(&n("later")))
            .collect()
    };
    let own_before = own(keys_under(&observer, &name).await);

    // The leftover goes once the window is over …
    let leftover_waiter = {
        let m = Mutex::new(&other, n("leftover"));
        tokio::spawn(async move { m.lock().await })
    };
    tokio::time::timeout(resumed.ttl() + Duration::from_secs(3), leftover_waiter)
        .await
        .expect("the leftover nobody took back is deleted after the adoption window")
        .unwrap()
        .unwrap()
        .release()
        .await
        .unwrap();
    // … a key put after that is as much its own …
    let later = Mutex::new(&resumed, n("later")).lock().await.unwrap();
    // … and every one of them stays, look after look.
    tokio::time::sleep(resumed.ttl() + Duration::from_secs(1)).await;
    for (what, fence) in [
        ("lock", lock.fence()),
        ("try_lock", tried.fence()),
        ("permit", permit.fence()),
        ("read lock", reading.fence()),
        ("barrier", hold.fence()),
        ("double barrier", (*inside).clone()),
        ("registration", registered.fence()),
        ("later lock", later.fence()),
    ] {
        assert!(holds(&fence).await, "its own {what} was deleted");
    }
    let own_after = own(keys_under(&observer, &name).await);
    assert_eq!(
        own_after, own_before,
        "a key of its own was deleted: {own_before:#?} then {own_after:#?}"
    );
    assert!(!queued.is_finished());
    ahead.release().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), queued)
        .await
        .expect("its waiter, kept in line, gets the lock")
        .unwrap()
        .unwrap();
    got.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leftover_put_landing_after_the_resume_is_deleted_within_a_ttl_and_the_next_waiter_gets_the_lock(
) {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("resume-late-put");
    let first = LeasedSession::new(
        client(&etcd).await,
        SessionOptions::new().with_ttl(Duration::from_secs(3)),
    )
    .await
    .unwrap();
    let lease_id = first.orphan();
    drop(first);
    let resumed = LeasedSession::resume(client(&etcd).await, lease_id, SessionOptions::new())
        .await
        .unwrap();
    // Past the adoption window and the session's first look at its lease, a put the earlier
    // process sent before it went away lands: a waiter's key nobody can know the token of.
    tokio::time::sleep(resumed.ttl() + Duration::from_millis(500)).await;
    let late = member_key(&name, lease_id, 7);
    put_on_lease(&observer, &late, lease_id).await;
    let waiting = session(&etcd, 30).await;
    let waiter = {
        let m = Mutex::new(&waiting, &name);
        tokio::spawn(async move { m.lock().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "the waiter got in past the late key");
    // The session looks at its lease once per TTL: the late key is deleted at the next look.
    let next = tokio::time::timeout(resumed.ttl() + Duration::from_secs(2), waiter)
        .await
        .expect("the late key is deleted within a TTL and the next waiter gets the lock")
        .unwrap()
        .unwrap();
    next.release().await.unwrap();
    assert!(keys_under(&observer, &late).await.is_empty());
    assert_eq!(resumed.state(), SessionState::Alive);
    assert!(lease_exists(&observer, lease_id).await);
    // Its looking ends with it: no task outlives the session.
    let tasks = resumed.background_tasks();
    resumed.close().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), tasks.finished())
        .await
        .expect("the resumed session's tasks end with it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_longer_adoption_window_lets_a_key_be_taken_back_late_but_spares_no_late_put() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let name = unique("resume-window");
    let other = format!("{name}-other");
    let ttl = Duration::from_secs(3);
    let first = LeasedSession::new(client(&etcd).await, SessionOptions::new().with_ttl(ttl))
        .await
        .unwrap();
    let guard = Mutex::new(&first, &name).lock().await.unwrap();
    let (key, token) = (guard.key().to_owned(), guard.fencing_token());
    let lease_id = first.orphan();
    drop(guard);
    drop(first);

    let resumed = LeasedSession::resume(
        client(&etcd).await,
        lease_id,
        SessionOptions::new().with_adoption_window(ttl * 2),
    )
    .await
    .unwrap();
    let resumed_at = Instant::now();
    // A put that lands after the resume is deleted within a TTL, window or not …
    let late = member_key(&other, lease_id, 7);
    put_on_lease(&observer, &late, lease_id).await;
    let waiting = session(&etcd, 30).await;
    let waiter = {
        let m = Mutex::new(&waiting, &other);
        tokio::spawn(async move { m.lock().await })
    };
    tokio::time::timeout(ttl + Duration::from_secs(2), waiter)
        .await
        .expect("a late put is deleted within a TTL whatever the window")
        .unwrap()
        .unwrap()
        .release()
        .await
        .unwrap();
    // … while the earlier process's key can still be taken back after a TTL (the default
    // window), within the longer one.
    tokio::time::sleep_until((resumed_at + ttl + Duration::from_millis(500)).into()).await;
    let guard = Mutex::new(&resumed, &name)
        .resume(&key, token)
        .await
        .expect("taken back within the adoption window asked for");
    assert!(resumed_at.elapsed() < ttl * 2, "the test ran late");
    assert_eq!(guard.fencing_token(), token);
    guard.release().await.unwrap();
}
