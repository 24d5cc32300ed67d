//! `WorkQueue` on real etcd: each test states one guarantee of docs/queue.md.

mod common;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use etcd_client::Client;
use etcd_coord::{
    Claimed, EnqueueOptions, Error, JobId, LeasedSession, QueueOptions, SessionOptions, WorkQueue,
    MAX_BATCH, MAX_PAYLOAD_LEN, MAX_PRIORITY,
};
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};

fn ttl(secs: u64) -> SessionOptions {
    SessionOptions::new().with_ttl(Duration::from_secs(secs))
}

/// Every key under the queue `name`'s `part/` (`jobs`, `claims`, `dead`, `ids`).
async fn under(c: &Client, name: &str, part: &str) -> Vec<String> {
    keys_under(c, &format!("{name}/#queue/{part}/")).await
}

/// The keys of the line of idle claimers of `name`.
async fn idle_line(c: &Client, name: &str) -> Vec<String> {
    members_under(c, &format!("{name}/#queue/w")).await
}

/// After a claimer's dropped future and its session's background work: no claim, no place in
/// the idle line, no key on its lease, and no task but the session's own.
async fn nothing_left_by(c: &Client, s: &LeasedSession, name: &str, what: &str) {
    s.settled().await;
    assert!(
        under(c, name, "claims").await.is_empty(),
        "{what}: a claim left"
    );
    assert!(
        idle_line(c, name).await.is_empty(),
        "{what}: a place in line left"
    );
    assert!(keys_on_lease(c, s.lease_id()).await.is_empty(), "{what}");
    only_its_own_task_runs(s).await;
}

/// Revokes `lease` as an operator (or etcd's expiry) would.
async fn revoke(c: &Client, lease: i64) {
    c.clone().lease_revoke(lease).await.unwrap();
}

#[tokio::test]
async fn a_job_is_delivered_with_its_payload_and_gone_once_acknowledged() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let s = session(&etcd, 10).await;
    let name = unique("queue-basic");
    let q = WorkQueue::new(&s, &name);
    let id = q.enqueue("hello").await.unwrap();
    assert_eq!(q.len().await.unwrap(), 1);
    let job = q.claim().await.unwrap();
    assert_eq!(job.payload(), b"hello");
    assert_eq!(job.id(), &id);
    assert_eq!(job.attempt(), 1);
    assert_eq!(under(&c, &name, "claims").await.len(), 1);
    job.ack().await.unwrap();
    assert_eq!(q.len().await.unwrap(), 0);
    assert!(under(&c, &name, "claims").await.is_empty());
    assert!(q.try_claim().await.unwrap().is_none());
}

/// A worker of the SIGKILL test, run as a process of this test binary.
const WORKER_ENV: &str = "ETCD_COORD_TEST_QUEUE_WORKER";

#[test]
#[ignore = "the entry point of a worker process, started by a test"]
fn queue_worker_process() {
    let Ok(spec) = std::env::var(WORKER_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split(' ').collect();
    let (endpoint, name, ttl_secs) = (parts[0], parts[1], parts[2].parse().unwrap());
    if parts.get(3) == Some(&"pool") {
        return tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(pool_worker(endpoint, name, ttl_secs));
    }
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let c = Client::connect([endpoint], Some(etcd_coord::recommended_connect_options()))
            .await
            .unwrap();
        let s = LeasedSession::new(c, ttl(ttl_secs)).await.unwrap();
        let job = WorkQueue::new(&s, name).claim().await.unwrap();
        println!("claimed {} {} {}", job.id(), job.attempt(), s.lease_id());
        std::future::pending::<()>().await;
    });
}

/// A worker of a pool, in its own process: claims jobs of `name` one after another, works on
/// each (30–120 ms), writes its result fenced on the claim (`<name>-results/<id>`: the token),
/// then acknowledges it. Reports `claimed <id> <attempt>`, `acked <id> <token>` (the ack
/// returned `Ok`) and `ack-failed <id> <token>` on stdout. A session that ends is replaced.
async fn pool_worker(endpoint: &str, name: &str, ttl_secs: u64) {
    let c = Client::connect([endpoint], Some(etcd_coord::recommended_connect_options()))
        .await
        .unwrap();
    loop {
        let Ok(s) = LeasedSession::new(c.clone(), ttl(ttl_secs)).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let q = WorkQueue::new(&s, name).with_options(QueueOptions::new().with_max_attempts(1000));
        while let Ok(job) = q.claim().await {
            let (id, token) = (job.id().clone(), job.fencing_token());
            println!("claimed {id} {}", job.attempt());
            let work = 30 + rand::random::<u64>() % 90;
            tokio::time::sleep(Duration::from_millis(work)).await;
            let result =
                etcd_client::TxnOp::put(format!("{name}-results/{id}"), token.to_string(), None);
            if job.txn_if_owner([result]).await.is_err() {
                continue; // the claim or the session ended: the job goes back
            }
            match job.ack().await {
                Ok(()) => println!("acked {id} {token}"),
                Err(e) => println!("ack-failed {id} {token} {e}"),
            }
        }
    }
}

/// A worker process of a pool ([`pool_worker`]) reaching etcd at `endpoint`; its lines go to
/// `lines`, each with the worker's number.
fn pool_process(
    endpoint: String,
    name: &str,
    ttl_secs: u64,
    worker: usize,
    lines: tokio::sync::mpsc::UnboundedSender<(usize, String)>,
) -> tokio::process::Child {
    let mut child = tokio::process::Command::new("/proc/self/exe")
        .args([
            "queue_worker_process",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(WORKER_ENV, format!("{endpoint} {name} {ttl_secs} pool"))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("a worker process");
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = out.next_line().await {
            let _ = lines.send((worker, line));
        }
    });
    child
}

/// A worker process that claims one job of `name`; its child handle and what it claimed.
async fn worker_process(
    etcd: &etcd_coord_testkit::TestEtcd,
    name: &str,
    ttl_secs: u64,
) -> (tokio::process::Child, String, u32) {
    let mut child = tokio::process::Command::new("/proc/self/exe")
        .args([
            "queue_worker_process",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(
            WORKER_ENV,
            format!("{} {name} {ttl_secs}", etcd.endpoints()[0]),
        )
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("a worker process");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("the worker claims")
            .unwrap()
            .expect("the worker's output");
        if let Some(reported) = line.strip_prefix("claimed ") {
            let parts: Vec<&str> = reported.split(' ').collect();
            return (child, parts[0].to_owned(), parts[1].parse().unwrap());
        }
    }
}

#[tokio::test]
async fn a_job_held_by_a_worker_killed_with_sigkill_is_delivered_again_with_its_attempt_raised() {
    let etcd = etcd().await;
    let s = session(&etcd, 10).await;
    let name = unique("queue-sigkill");
    let q = WorkQueue::new(&s, &name);
    let id = q.enqueue("survives").await.unwrap();
    let ttl_secs = 3;
    let (mut child, claimed, attempt) = worker_process(&etcd, &name, ttl_secs).await;
    assert_eq!((claimed.as_str(), attempt), (id.as_str(), 1));
    assert!(q.try_claim().await.unwrap().is_none(), "held by the worker");
    child.start_kill().unwrap(); // SIGKILL: nothing released, nothing revoked
    child.wait().await.unwrap();
    let killed = Instant::now();
    let again = tokio::time::timeout(Duration::from_secs(ttl_secs + 3), q.claim())
        .await
        .expect("delivered again within the TTL and a bit")
        .unwrap();
    eprintln!("delivered again {:?} after the SIGKILL", killed.elapsed());
    assert_eq!(again.id(), &id);
    assert_eq!(again.payload(), b"survives");
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
    assert_eq!(q.len().await.unwrap(), 0);
}

/// Workers in their own processes, each through a fault proxy, under a fixed schedule of
/// faults while a producer enqueues through a proxy of its own: workers killed with SIGKILL
/// (and started again), answers lost for 700 ms, a worker cut off past its TTL, the
/// producer's answers lost mid-enqueue (it retries with the same idempotency key). Then:
/// every job is acknowledged exactly once (no ack returned `Ok` twice for one job), none is
/// lost (each one gone from the queue has its result, written fenced on a live claim), none
/// was enqueued twice, nothing is left or dead — and liveness: once the last fault healed, the
/// queue is empty within the TTL plus a bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_pool_under_crashes_partitions_and_lost_answers_acks_every_job_exactly_once() {
    const WORKERS: usize = 4;
    const JOBS: usize = 120;
    let ttl_secs = 2;
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let name = unique("queue-pool-faults");
    let mut proxies = Vec::new();
    for _ in 0..WORKERS {
        proxies.push(Arc::new(proxy(&etcd).await));
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut workers: Vec<_> = (0..WORKERS)
        .map(|w| pool_process(proxies[w].endpoint(), &name, ttl_secs, w, tx.clone()))
        .collect();
    let producer_proxy = Arc::new(proxy(&etcd).await);
    let producer = session_via(&producer_proxy, ttl(10)).await;
    let q = WorkQueue::new(&producer, &name);
    let mut ids = HashMap::new();
    let mut faults = Vec::new();
    let (mut kills, mut cuts, mut losses) = (0, 0, 0);
    for j in 0..JOBS {
        if j % 12 == 6 {
            let w = (j / 12) % WORKERS;
            let p = Arc::clone(&proxies[w]);
            match (j / 12) % 3 {
                0 => {
                    workers[w].start_kill().unwrap(); // SIGKILL, then a new process
                    workers[w].wait().await.unwrap();
                    workers[w] = pool_process(p.endpoint(), &name, ttl_secs, w, tx.clone());
                    kills += 1;
                }
                1 => {
                    p.drop_responses();
                    faults.push(tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(700)).await;
                        p.heal();
                        p.reset_peer();
                    }));
                    losses += 1;
                }
                _ => {
                    p.blackhole(); // a partition past the TTL
                    faults.push(tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(ttl_secs + 1)).await;
                        p.heal();
                        p.reset_peer();
                    }));
                    cuts += 1;
                }
            }
        }
        if j % 40 == 20 {
            // The producer's answers are lost: its enqueue is sent again, with the same key.
            producer_proxy.drop_responses();
            let p = Arc::clone(&producer_proxy);
            faults.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                p.heal();
                p.reset_peer();
            }));
        }
        let key = format!("job-{j}");
        let options = EnqueueOptions::new().with_idempotency_key(key.clone());
        let id = loop {
            match q
                .enqueue_with(format!("payload {j}"), options.clone())
                .await
            {
                Ok(id) => break id,
                Err(e) => {
                    eprintln!("enqueue {key}: {e}; again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        ids.insert(key, id);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for f in faults {
        f.await.unwrap();
    }
    let healed = Instant::now();
    // Liveness: every job is done within the TTL and a bound once the faults healed.
    let bound = Duration::from_secs(ttl_secs + 10);
    let drained = eventually(bound, || async {
        under(&c, &name, "jobs").await.is_empty()
    })
    .await;
    let took = healed.elapsed();
    for w in &mut workers {
        w.start_kill().unwrap();
        w.wait().await.unwrap();
    }
    drop(tx);
    let mut acked: HashMap<String, Vec<(usize, i64)>> = HashMap::new();
    let (mut redelivered, mut ack_failed) = (0, 0);
    while let Some((w, line)) = rx.recv().await {
        let words: Vec<&str> = line.split(' ').collect();
        match words[..] {
            ["acked", id, token] => acked
                .entry(id.to_owned())
                .or_default()
                .push((w, token.parse().unwrap())),
            ["claimed", _, attempt] if attempt != "1" => redelivered += 1,
            ["ack-failed", ..] => ack_failed += 1,
            _ => {}
        }
    }
    eprintln!(
        "{JOBS} jobs, {WORKERS} workers: {kills} SIGKILLs, {cuts} partitions past the TTL, \
         {losses} answer losses; {redelivered} redeliveries, {} acks reported, {ack_failed} \
         failed acks; the queue emptied {took:?} after the heal",
        acked.values().map(Vec::len).sum::<usize>()
    );
    assert!(drained, "jobs left {bound:?} after the faults healed");
    assert!(
        redelivered > 0,
        "no fault caused a redelivery: the run proved nothing"
    );
    let distinct: HashSet<_> = ids.values().cloned().collect();
    assert_eq!(
        distinct.len(),
        JOBS,
        "an enqueue retried with its key added a second job"
    );
    for (id, acks) in &acked {
        assert!(
            distinct.iter().any(|d| d.as_str() == id),
            "acknowledged a job never enqueued: {id}"
        );
        assert_eq!(
            acks.len(),
            1,
            "job {id} acknowledged more than once: {acks:?}"
        );
    }
    let results = keys_under(&c, &format!("{name}-results/")).await;
    for id in &distinct {
        assert!(
            results.iter().any(|k| k.ends_with(&format!("/{id}"))),
            "job {id} is gone from the queue without its result: lost"
        );
    }
    assert!(under(&c, &name, "claims").await.is_empty());
    assert!(
        under(&c, &name, "dead").await.is_empty(),
        "nothing dead-lettered"
    );
}

#[tokio::test]
async fn a_claim_whose_lease_is_revoked_ends_and_the_job_is_delivered_again() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let (a, b) = (session(&etcd, 10).await, session(&etcd, 10).await);
    let name = unique("queue-revoked");
    let id = WorkQueue::new(&a, &name).enqueue("job").await.unwrap();
    let held = WorkQueue::new(&a, &name).claim().await.unwrap();
    let lost = held.lost();
    let waiting = {
        let q = WorkQueue::new(&b, &name);
        tokio::spawn(async move { q.claim().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the job is held");
    revoke(&c, a.lease_id()).await;
    let again = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting worker gets it")
        .unwrap()
        .unwrap();
    assert_eq!((again.id(), again.attempt()), (&id, 2));
    assert!(again.fencing_token() > held.fencing_token());
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(5), lost).await,
        Ok(Error::LockLost { .. } | Error::SessionLost(_))
    ));
    drop(held);
    again.ack().await.unwrap();
}

#[tokio::test]
async fn a_stale_workers_ack_after_its_lease_is_gone_is_rejected_and_the_job_stays() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let (a, b) = (session(&etcd, 10).await, session(&etcd, 10).await);
    let name = unique("queue-stale-ack");
    let id = WorkQueue::new(&a, &name).enqueue("job").await.unwrap();
    let stale = WorkQueue::new(&a, &name).claim().await.unwrap();
    // A's lease ends (a long GC pause, a partition past the TTL); B gets the job.
    revoke(&c, a.lease_id()).await;
    let current = tokio::time::timeout(Duration::from_secs(5), WorkQueue::new(&b, &name).claim())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(current.id(), &id);
    // A comes back and acknowledges: rejected, and the job is still there.
    let err = stale.ack().await.unwrap_err();
    assert!(
        matches!(err, Error::LockLost { .. } | Error::SessionLost(_)),
        "{err:?}"
    );
    assert_eq!(under(&c, &name, "jobs").await.len(), 1, "the job stays");
    current.ack().await.unwrap();
    assert!(under(&c, &name, "jobs").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_past_its_ttl_loses_its_job_to_another_and_its_late_ack_is_rejected() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let proxy = proxy(&etcd).await;
    let cut_off = session_via(&proxy, ttl(2)).await;
    let other = session(&etcd, 10).await;
    let name = unique("queue-partition");
    let id = WorkQueue::new(&other, &name).enqueue("job").await.unwrap();
    let held = WorkQueue::new(&cut_off, &name).claim().await.unwrap();
    let lost = held.lost();
    let waiting = {
        let q = WorkQueue::new(&other, &name);
        tokio::spawn(async move { q.claim().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the job is held");
    // A partition: nothing gets through, in either direction, past the TTL.
    let cut_at = Instant::now();
    proxy.blackhole();
    assert!(
        matches!(
            tokio::time::timeout(Duration::from_secs(5), lost).await,
            Ok(Error::LockLost { .. } | Error::SessionLost(_))
        ),
        "the cut-off worker learns on its own clock that its claim may be gone"
    );
    // Liveness: the other worker gets the job once etcd expires the lease (TTL 2 s; the
    // bound leaves room for a loaded machine).
    let again = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the job is delivered again within the TTL and a bound")
        .unwrap()
        .unwrap();
    eprintln!("delivered again {:?} after the cut", cut_at.elapsed());
    assert_eq!((again.id(), again.attempt()), (&id, 2));
    assert!(again.fencing_token() > held.fencing_token());
    // The partition heals; the cut-off worker's ack is rejected and the job stays.
    proxy.heal();
    proxy.reset_peer();
    let err = held.ack().await.unwrap_err();
    assert!(
        matches!(err, Error::LockLost { .. } | Error::SessionLost(_)),
        "{err:?}"
    );
    assert_eq!(under(&c, &name, "jobs").await.len(), 1, "the job stays");
    again.ack().await.unwrap();
    assert!(under(&c, &name, "jobs").await.is_empty());
}

#[tokio::test]
async fn a_stale_ack_on_a_live_session_is_rejected_by_the_fence() {
    // The same as above with the stale worker's session still alive (only its claim key was
    // deleted, as an operator would): the Txn's compares reject it, not a local check.
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let (a, b) = (session(&etcd, 10).await, session(&etcd, 10).await);
    let name = unique("queue-stale-fence");
    WorkQueue::new(&a, &name).enqueue("job").await.unwrap();
    let stale = WorkQueue::new(&a, &name).claim().await.unwrap();
    c.clone().delete(stale.key(), None).await.unwrap();
    let current = WorkQueue::new(&b, &name).claim().await.unwrap();
    assert_eq!(current.attempt(), 2);
    let err = stale.ack().await.unwrap_err();
    assert!(matches!(err, Error::LockLost { .. }), "{err:?}");
    assert_eq!(under(&c, &name, "jobs").await.len(), 1, "the job stays");
    assert_eq!(WorkQueue::new(&a, &name).len().await.unwrap(), 1);
    current.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claimers_never_hold_one_job_at_once_and_each_job_is_acked_once() {
    let etcd = etcd().await;
    let name = unique("queue-exclusive");
    let producer = session(&etcd, 10).await;
    let jobs = 60;
    let pq = WorkQueue::new(&producer, &name);
    for i in 0..jobs {
        pq.enqueue(format!("job {i}")).await.unwrap();
    }
    let held: Arc<StdMutex<HashSet<String>>> = Arc::default();
    let acked: Arc<StdMutex<HashMap<String, u32>>> = Arc::default();
    let violations: Arc<StdMutex<Vec<String>>> = Arc::default();
    let mut workers = Vec::new();
    for _ in 0..8 {
        let s = session(&etcd, 10).await;
        let q = WorkQueue::new(&s, &name);
        let (held, acked, violations) = (held.clone(), acked.clone(), violations.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let job = match q.try_claim().await {
                    Ok(Some(job)) => job,
                    Ok(None) => break,
                    Err(e) => {
                        violations.lock().unwrap().push(format!("claim: {e}"));
                        break;
                    }
                };
                let id = job.id().to_string();
                if !held.lock().unwrap().insert(id.clone()) {
                    violations
                        .lock()
                        .unwrap()
                        .push(format!("{id} claimed twice at once"));
                }
                tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 5)).await;
                held.lock().unwrap().remove(&id);
                // Some go back once; the others are acknowledged.
                let back = id.ends_with(['0', '1', '2']) && job.attempt() == 1;
                let done = match back {
                    true => job.nack(Duration::ZERO).await,
                    false => job.ack().await,
                };
                match done {
                    Ok(()) if !back => *acked.lock().unwrap().entry(id).or_default() += 1,
                    Ok(()) => {}
                    // Our claim was taken over while we held it.
                    Err(e) => violations.lock().unwrap().push(format!("{id}: {e}")),
                }
            }
            s.close().await.unwrap();
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    assert!(
        violations.lock().unwrap().is_empty(),
        "{:?}",
        violations.lock().unwrap()
    );
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), jobs, "every job acknowledged");
    assert!(acked.values().all(|n| *n == 1), "each once: {acked:?}");
    assert_eq!(pq.len().await.unwrap(), 0);
}

/// Workers that start together each claim in one round trip: a chain tries the first job, then
/// goes on at a random place among the next ones, so a burst is not served a chain's length
/// at a time (on chains that all went on at the first job's neighbours, 10–12 of a burst of
/// 20 needed a second claim Txn). A claimer alone afterwards — on a handle that has seen the
/// collisions — still takes the first job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_new_claimers_is_served_in_one_round_trip_each_and_a_lone_claimer_then_takes_the_first_job(
) {
    let etcd = etcd().await;
    let name = unique("queue-burst");
    let producer = session(&etcd, 10).await;
    let pq = WorkQueue::new(&producer, &name);
    let mut ids = Vec::new();
    for i in 0..200 {
        ids.push(pq.enqueue(format!("job {i}")).await.unwrap());
    }
    let n = 20;
    let start = Arc::new(tokio::sync::Barrier::new(n));
    let mut claimers = Vec::new();
    for _ in 0..n {
        let s = session(&etcd, 10).await;
        let (q, start) = (WorkQueue::new(&s, &name), start.clone());
        claimers.push(tokio::spawn(async move {
            start.wait().await;
            let before = s.metrics().txns;
            let job = q.claim().await.unwrap();
            (s.metrics().txns - before, q, job, s)
        }));
    }
    let mut round_trips = Vec::new();
    let mut held = Vec::new();
    let mut handles = Vec::new();
    for c in claimers {
        let (txns, q, job, s) = c.await.unwrap();
        round_trips.push(txns);
        held.push(job);
        handles.push((q, s));
    }
    assert!(
        round_trips.iter().all(|t| *t == 1),
        "claim Txns of each claimer: {round_trips:?}"
    );
    let got: HashSet<_> = held.iter().map(|j| j.id().clone()).collect();
    assert_eq!(got.len(), n, "one job each");
    assert!(got.contains(&ids[0]), "the first job went to one of them");
    // Alone now, on a handle of the burst other than the first job's: its chains go on at a
    // random place (every handle's spread is at least 2 after a claim on a new handle).
    let (q, _) = handles
        .iter()
        .zip(&held)
        .find(|(_, job)| *job.id() != ids[0])
        .map(|(h, _)| h)
        .unwrap();
    let first_free = ids.iter().find(|id| !got.contains(*id)).unwrap();
    let job = q.try_claim().await.unwrap().unwrap();
    assert_eq!(
        job.id(),
        first_free,
        "a lone claimer takes the first free job"
    );
    job.ack().await.unwrap();
    for job in held {
        job.ack().await.unwrap();
    }
}

/// Claims of one process through one session and its siblings share their first read, and
/// each tries first a job no other of them is trying: 20 sibling workers that claim at the
/// same moment read the queue once (one range read of the jobs and one of the claims, not
/// 20 of each), each takes a different one of the first 20 jobs, and their claims go to etcd
/// as one Txn (see `rpc::batch`).
#[tokio::test]
async fn sibling_claimers_starting_together_read_the_queue_once_and_take_the_first_jobs_in_one_txn()
{
    let etcd = etcd().await;
    let name = unique("queue-siblings");
    let producer = session(&etcd, 10).await;
    let pq = WorkQueue::new(&producer, &name);
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(pq.enqueue(format!("job {i}")).await.unwrap());
    }
    let first = session(&etcd, 10).await;
    let mut family = vec![first.clone()];
    for _ in 1..20 {
        family.push(first.sibling(ttl(10)).await.unwrap());
    }
    let queues: Vec<WorkQueue> = family.iter().map(|s| WorkQueue::new(s, &name)).collect();
    let before: Vec<_> = family.iter().map(|s| s.metrics()).collect();
    // Polled together from one task: every claim starts before any answer arrives.
    let claimed = futures::future::join_all(queues.iter().map(|q| q.claim())).await;
    let claimed: Vec<_> = claimed.into_iter().map(Result::unwrap).collect();
    let reads: u64 = family
        .iter()
        .zip(&before)
        .map(|(s, b)| s.metrics().reads - b.reads)
        .sum();
    assert_eq!(reads, 2, "range reads of the whole family");
    let txns: u64 = family
        .iter()
        .zip(&before)
        .map(|(s, b)| s.metrics().txns - b.txns)
        .sum();
    assert_eq!(
        txns, 1,
        "claim Txns of the whole family: the 20 claims merged in one"
    );
    let got: HashSet<JobId> = claimed.iter().map(|j| j.id().clone()).collect();
    let first_20: HashSet<JobId> = ids[..20].iter().cloned().collect();
    assert_eq!(got, first_20, "the first 20 jobs, one each");
    for job in claimed {
        job.ack().await.unwrap();
    }
}

/// A read of the queue is sized for the claims a pool's workers hold, which come before the
/// free jobs: 150 siblings that each hold one of the first 150 jobs and claim again together
/// share one read, which finds a free job for each of them. (Sized by the last read's count
/// of claims — none, when they first claimed — it found at most 143 free jobs, and the
/// claims left without one read again each on its own.)
#[tokio::test]
async fn a_pool_holding_jobs_claims_more_from_one_read_sized_for_what_it_holds() {
    const WORKERS: usize = 150;
    let etcd = etcd().await;
    let name = unique("queue-held-ahead");
    let producer = session(&etcd, 10).await;
    let pq = WorkQueue::new(&producer, &name);
    let mut ids = Vec::new();
    for i in 0..3 * WORKERS {
        ids.push(pq.enqueue(format!("job {i}")).await.unwrap());
    }
    let first = session(&etcd, 10).await;
    let mut family = vec![first.clone()];
    for _ in 1..WORKERS {
        family.push(first.sibling(ttl(10)).await.unwrap());
    }
    let queues: Vec<WorkQueue> = family.iter().map(|s| WorkQueue::new(s, &name)).collect();
    let held = futures::future::join_all(queues.iter().map(|q| q.claim())).await;
    let held: Vec<_> = held.into_iter().map(Result::unwrap).collect();
    // Past the time a read answered serves later claims (`share::READ_KEPT`, 10 ms).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let reads = |family: &[LeasedSession]| family.iter().map(|s| s.metrics().reads).sum::<u64>();
    let before = reads(&family);
    let more = futures::future::join_all(queues.iter().map(|q| q.claim())).await;
    let more: Vec<_> = more.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        reads(&family) - before,
        2,
        "one read of the jobs and one of the claims"
    );
    let got: HashSet<JobId> = more.iter().map(|j| j.id().clone()).collect();
    let next: HashSet<JobId> = ids[WORKERS..2 * WORKERS].iter().cloned().collect();
    assert_eq!(got, next, "the next jobs, one each");
    for job in held.into_iter().chain(more) {
        job.release().await.unwrap();
    }
}

/// A pool's worker's next claim takes its job from the read made a moment ago (within
/// `share::READ_KEPT`, 10 ms) instead of reading again, while the pool looks alone in
/// claiming: of five claims a worker makes each right after its last job's ack, beside a
/// sibling that holds a job, the later ones read nothing (the test asks for one: a claim that
/// came over 10 ms after the read reads again), and each still takes the first job nobody
/// holds.
#[tokio::test]
async fn a_pool_workers_next_claim_takes_its_job_from_the_read_made_a_moment_ago() {
    let etcd = etcd().await;
    let name = unique("queue-recent-read");
    let (ids, [(a, qa, ja), (b, _qb, jb)]) = pool_of_two(&etcd, &name).await;
    let held: HashSet<JobId> = [ja.id().clone(), jb.id().clone()].into();
    ja.ack().await.unwrap();
    let reads = || a.metrics().reads + b.metrics().reads;
    let mut read_nothing = 0;
    for id in ids.iter().filter(|id| !held.contains(*id)).take(5) {
        let before = reads();
        let job = qa.claim().await.unwrap();
        read_nothing += (reads() == before) as usize;
        assert_eq!(job.id(), id, "the first job nobody holds");
        job.ack().await.unwrap();
    }
    assert!(read_nothing >= 1, "every claim read the queue again");
    jb.ack().await.unwrap();
}

/// A read answered a moment ago never hides a job the pool itself enqueued since: after a
/// pool's claims, a higher-priority job enqueued through one of its handles is the next
/// claim's, though that claim comes within `share::READ_KEPT` of the last read (with the
/// reads kept regardless, it took the next job of priority 0).
#[tokio::test]
async fn a_claim_after_its_pools_own_enqueue_sees_that_job() {
    let etcd = etcd().await;
    let name = unique("queue-own-enqueue");
    let (_, [(_a, qa, ja), (_b, qb, jb)]) = pool_of_two(&etcd, &name).await;
    let urgent = qb
        .enqueue_with("urgent", EnqueueOptions::new().with_priority(MAX_PRIORITY))
        .await
        .unwrap();
    let next = qa.claim().await.unwrap();
    assert_eq!(next.id(), &urgent, "the job enqueued just before");
    for job in [ja, jb, next] {
        job.ack().await.unwrap();
    }
}

/// Two claims of a pool at once, `(a, b)`, over 20 jobs enqueued by a producer (so that the
/// pool's claims go without chains, and read answers a moment old may serve them).
async fn pool_of_two(
    etcd: &etcd_coord_testkit::TestEtcd,
    name: &str,
) -> (Vec<JobId>, [(LeasedSession, WorkQueue, Claimed); 2]) {
    let producer = session(etcd, 10).await;
    let pq = WorkQueue::new(&producer, name);
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(pq.enqueue(format!("job {i}")).await.unwrap());
    }
    let a = session(etcd, 10).await;
    let b = a.sibling(ttl(10)).await.unwrap();
    let (qa, qb) = (WorkQueue::new(&a, name), WorkQueue::new(&b, name));
    let (ja, jb) = futures::join!(qa.claim(), qb.claim());
    (ids, [(a, qa, ja.unwrap()), (b, qb, jb.unwrap())])
}

/// A claim of the pool (through a new sibling of `a`) whose read is sent and in flight, polled
/// no further; made once the pool's last read no longer serves claims (`share::READ_KEPT`).
async fn a_claim_with_its_read_in_flight(
    a: &LeasedSession,
    name: &str,
) -> Pin<Box<dyn Future<Output = Result<Claimed, Error>> + Send>> {
    let c = a.sibling(ttl(10)).await.unwrap();
    let qc = WorkQueue::new(&c, name);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut claim: Pin<Box<dyn Future<Output = _> + Send>> =
        Box::pin(async move { qc.claim().await });
    assert!(step(&mut claim).await.is_none());
    assert_eq!(c.metrics().reads, 2, "its read is sent");
    claim
}

/// A job the pool gives back is the pool's next claim's, at once and in its old place, though
/// a read of a moment ago shows it claimed (`share::GivesBack`): a nack with no delay, then a
/// claim. (Taking the read a moment old, the claim took the next job.)
#[tokio::test]
async fn a_job_the_pool_gives_back_is_its_next_claims_at_once() {
    let etcd = etcd().await;
    let name = unique("queue-gives-back");
    let (_, [(_a, qa, ja), (_b, _qb, jb)]) = pool_of_two(&etcd, &name).await;
    let given = ja.id().clone();
    ja.nack(Duration::ZERO).await.unwrap();
    let again = qa.claim().await.unwrap();
    assert_eq!(again.id(), &given, "the job given back, in its old place");
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
    jb.ack().await.unwrap();
}

/// A read in flight that was sent before the pool gave a job back serves no claim of the pool
/// that starts after it: the claim reads again and takes the job given back. (Joining that
/// read, which shows the job claimed, it took another.)
#[tokio::test]
async fn a_claim_after_the_pool_gives_a_job_back_joins_no_read_sent_before_it() {
    let etcd = etcd().await;
    let name = unique("queue-gives-back-in-flight");
    let (_, [(a, qa, ja), (_b, _qb, jb)]) = pool_of_two(&etcd, &name).await;
    let earlier = a_claim_with_its_read_in_flight(&a, &name).await;
    let given = ja.id().clone();
    ja.nack(Duration::ZERO).await.unwrap();
    let again = qa.claim().await.unwrap();
    assert_eq!(again.id(), &given, "the job given back, in its old place");
    let jc = earlier.await.unwrap();
    for job in [jb, jc, again] {
        job.ack().await.unwrap();
    }
}

/// A read in flight that was sent before the pool's own enqueue returned serves no claim of
/// the pool that starts after it: the claim reads again and takes the job enqueued. (Joining
/// that read, it took a job of priority 0.)
#[tokio::test]
async fn a_claim_after_its_pools_enqueue_joins_no_read_sent_before_it() {
    the_pools_next_claim_takes_its_enqueue_beside_a_read_sent_before("in-flight", false).await;
}

/// A read sent before the pool's own enqueue returned, and answered after it, is not kept for
/// the pool's next claims: a claim right after it takes the job enqueued. (Kept, it served
/// that claim, which took a job of priority 0.)
#[tokio::test]
async fn a_read_sent_before_the_pools_enqueue_is_not_kept_for_its_next_claims() {
    the_pools_next_claim_takes_its_enqueue_beside_a_read_sent_before("kept", true).await;
}

/// A claim of the pool has its read in flight; the pool enqueues a job of the highest
/// priority; then — once that read is `answered`, or while it is still in flight — the
/// pool's next claim takes the job enqueued.
async fn the_pools_next_claim_takes_its_enqueue_beside_a_read_sent_before(
    part: &str,
    answered: bool,
) {
    let etcd = etcd().await;
    let name = unique(&format!("queue-enqueue-{part}"));
    let (_, [(a, qa, ja), (_b, qb, jb)]) = pool_of_two(&etcd, &name).await;
    let mut earlier = a_claim_with_its_read_in_flight(&a, &name).await;
    let urgent = qb
        .enqueue_with("urgent", EnqueueOptions::new().with_priority(MAX_PRIORITY))
        .await
        .unwrap();
    let mut jc = None;
    if answered {
        jc = Some(earlier.as_mut().await.unwrap()); // its read answered after the enqueue
    }
    let next = qa.claim().await.unwrap();
    assert_eq!(next.id(), &urgent, "the job enqueued just before");
    let jc = match jc {
        Some(jc) => jc,
        None => earlier.await.unwrap(),
    };
    for job in [ja, jb, jc, next] {
        job.ack().await.unwrap();
    }
}

/// Claims merged in one Txn do not share a failure: a sibling whose lease is gone makes etcd
/// refuse the merged Txn, and the claims in it are sent again one by one — the sibling's
/// fails, the other's takes its job.
#[tokio::test]
async fn a_claim_merged_with_a_sibling_whose_lease_is_gone_still_claims() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let name = unique("queue-merged-lease-gone");
    let producer = session(&etcd, 10).await;
    let pq = WorkQueue::new(&producer, &name);
    for i in 0..2 {
        pq.enqueue(format!("job {i}")).await.unwrap();
    }
    let a = session(&etcd, 10).await;
    let b = a.sibling(ttl(10)).await.unwrap();
    let (qa, qb) = (WorkQueue::new(&a, &name), WorkQueue::new(&b, &name));
    revoke(&c, a.lease_id()).await; // behind a's back: its keepalive has not noticed yet
    let before = a.metrics().txns + b.metrics().txns;
    let (ra, rb) = futures::join!(qa.claim(), qb.claim());
    assert!(
        ra.is_err(),
        "a's lease is gone: {:?}",
        ra.map(|j| j.id().clone())
    );
    let job = rb.expect("b's claim, refused with a's, was sent again alone");
    let sent = a.metrics().txns + b.metrics().txns - before;
    assert_eq!(sent, 3, "the merged Txn, then each claim alone");
    job.ack().await.unwrap();
    assert_eq!(pq.len().await.unwrap(), 1, "a took nothing");
}

/// A claim that awaits a sibling's scan does not depend on that sibling: dropped after it
/// sent the shared read, the sibling's claim leaves nothing, and the one awaiting the read
/// still gets it and claims the first job.
#[tokio::test]
async fn a_claim_awaiting_a_siblings_read_claims_though_the_sibling_is_dropped() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let name = unique("queue-siblings-drop");
    let producer = session(&etcd, 10).await;
    let pq = WorkQueue::new(&producer, &name);
    let first_job = pq.enqueue("first").await.unwrap();
    pq.enqueue("second").await.unwrap();
    let a = session(&etcd, 10).await;
    let b = a.sibling(ttl(10)).await.unwrap();
    let (qa, qb) = (WorkQueue::new(&a, &name), WorkQueue::new(&b, &name));
    let mut sending = Box::pin(qa.claim());
    assert!(step(&mut sending).await.is_none(), "the scan is sent");
    let reads = a.metrics().reads;
    let mut awaiting = Box::pin(qb.claim());
    assert!(step(&mut awaiting).await.is_none());
    drop(sending);
    let job = tokio::time::timeout(Duration::from_secs(5), awaiting)
        .await
        .expect("the claim went on without the sibling that sent the read")
        .unwrap();
    assert_eq!(job.id(), &first_job);
    assert_eq!(b.metrics().reads, 0, "b read nothing of its own");
    assert_eq!(a.metrics().reads, reads, "a read nothing more");
    a.settled().await;
    assert_eq!(under(&c, &name, "claims").await.len(), 1, "only b's claim");
    job.ack().await.unwrap();
}

/// A claim awaiting a sibling's read still ends with its own session: with etcd unreachable,
/// a claim of a session of TTL 4 s that joined the read of a sibling of TTL 30 s fails with
/// `SessionLost` when its own lease is gone (it waited on for the sibling's 24 s when the
/// read's own retries were all that could end it).
#[tokio::test]
async fn a_claim_awaiting_a_siblings_read_fails_when_its_own_session_is_lost() {
    let etcd = etcd().await;
    let name = unique("queue-siblings-lost");
    let producer = session(&etcd, 10).await;
    WorkQueue::new(&producer, &name)
        .enqueue("unreachable")
        .await
        .unwrap();
    let proxy = proxy(&etcd).await;
    let long = session_via(&proxy, ttl(30)).await;
    let short = long.sibling(ttl(4)).await.unwrap();
    proxy.blackhole();
    let long_queue = WorkQueue::new(&long, &name);
    let mut sending = Box::pin(long_queue.claim());
    assert!(
        step(&mut sending).await.is_none(),
        "the long session's scan is sent"
    );
    let started = Instant::now();
    let failed = tokio::time::timeout(
        Duration::from_secs(5),
        WorkQueue::new(&short, &name).claim(),
    )
    .await
    .expect("the short session's claim ends with its lease");
    assert!(
        matches!(failed, Err(Error::SessionLost(_))),
        "{:?}",
        failed.map(|j| j.id().clone())
    );
    assert_eq!(
        short.metrics().reads,
        0,
        "it awaited the long session's read"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "it awaited the read until its session was lost, not failed at once: {:?}",
        started.elapsed()
    );
    drop(sending);
    proxy.heal();
}

/// `jobs` jobs enqueued on `name` by a producer (returned, to outlive the test), a handle of a
/// session `a` whose reads have narrowed to what one claim needs (alone and uncontended for 7
/// claims, each acknowledged), and a new sibling of `a`.
async fn narrowed_beside_a_sibling(
    etcd: &etcd_coord_testkit::TestEtcd,
    name: &str,
    jobs: usize,
) -> (LeasedSession, WorkQueue, LeasedSession) {
    let producer = session(etcd, 10).await;
    let pq = WorkQueue::new(&producer, name);
    for i in 0..jobs {
        pq.enqueue(format!("job {i}")).await.unwrap();
    }
    let a = session(etcd, 10).await;
    let b = a.sibling(ttl(10)).await.unwrap();
    let qa = WorkQueue::new(&a, name);
    for _ in 0..7 {
        qa.claim().await.unwrap().ack().await.unwrap();
    }
    // Past the time a read answered serves later claims (`share::READ_KEPT`, 10 ms): the
    // next claims read, or join a read in flight.
    tokio::time::sleep(Duration::from_millis(50)).await;
    (producer, qa, b)
}

/// A sibling joins a read that holds what its chains need, however wide its own spread: a new
/// handle (spread 128) claims from the read in flight of a sibling whose spread has narrowed
/// to 1, with no read of its own (it read on its own when joining asked for its whole want).
#[tokio::test]
async fn a_sibling_with_a_wider_spread_joins_a_read_that_holds_what_its_chains_need() {
    let etcd = etcd().await;
    let name = unique("queue-siblings-spread");
    let (_producer, qa, b) = narrowed_beside_a_sibling(&etcd, &name, 20).await;
    let mut narrow = Box::pin(qa.claim());
    assert!(step(&mut narrow).await.is_none(), "the narrow read is sent");
    let wide = WorkQueue::new(&b, &name).claim().await.unwrap();
    assert_eq!(
        b.metrics().reads,
        0,
        "the new handle joined the narrow read"
    );
    let job = narrow.await.unwrap();
    assert_ne!(job.id(), wide.id());
    job.ack().await.unwrap();
    wide.ack().await.unwrap();
}

/// A bigger batch does not make do with a sibling's smaller read: a `claim_many(50)` that
/// starts while a sibling's single claim has its read in flight reads on its own, and takes
/// 50 jobs (joining that read, it took the 9 jobs the read held).
#[tokio::test]
async fn a_batch_claimed_beside_a_siblings_single_claim_takes_all_it_asked_for() {
    let etcd = etcd().await;
    let name = unique("queue-siblings-batch");
    let (_producer, qa, b) = narrowed_beside_a_sibling(&etcd, &name, 60).await;
    let qb = WorkQueue::new(&b, &name);
    let mut single = Box::pin(qa.claim());
    assert!(
        step(&mut single).await.is_none(),
        "the single claim's read is sent"
    );
    let batch = qb.claim_many(50).await.unwrap();
    assert_eq!(batch.len(), 50);
    let job = single.await.unwrap();
    job.ack().await.unwrap();
    for job in batch {
        job.ack().await.unwrap();
    }
}

#[tokio::test]
async fn a_job_delivered_max_attempts_times_moves_to_the_dead_letters_with_its_last_error() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let s = session(&etcd, 10).await;
    let name = unique("queue-dead");
    let q = WorkQueue::new(&s, &name).with_options(QueueOptions::new().with_max_attempts(3));
    let id = q.enqueue("poison").await.unwrap();
    let keep = q.enqueue("fine").await.unwrap();
    for attempt in 1..=3 {
        let job = q.claim().await.unwrap();
        assert_eq!((job.id(), job.attempt()), (&id, attempt));
        if attempt > 1 {
            assert_eq!(
                job.last_error(),
                Some(format!("boom {}", attempt - 1).as_str())
            );
        }
        job.nack_with_error(format!("boom {attempt}"), Duration::ZERO)
            .await
            .unwrap();
    }
    // The fourth delivery would exceed the limit: the claim moves it aside and takes the next.
    let next = q.claim().await.unwrap();
    assert_eq!(next.id(), &keep);
    let dead = q.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((&dead[0].id, dead[0].attempts), (&id, 3));
    assert_eq!(dead[0].last_error, "boom 3");
    assert_eq!(dead[0].payload, b"poison");
    assert_eq!(
        under(&c, &name, "jobs").await.len(),
        1,
        "only the other job is left"
    );
    next.ack().await.unwrap();
    assert!(q.try_claim().await.unwrap().is_none());
}

#[tokio::test]
async fn deliveries_whose_claimer_died_count_and_the_dead_letter_says_so() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let name = unique("queue-dead-lease");
    let opts = QueueOptions::new().with_max_attempts(2);
    let producer = session(&etcd, 10).await;
    let id = WorkQueue::new(&producer, &name)
        .enqueue("crashes workers")
        .await
        .unwrap();
    for attempt in 1..=2 {
        let s = session(&etcd, 10).await;
        let job = WorkQueue::new(&s, &name)
            .with_options(opts.clone())
            .claim()
            .await
            .unwrap();
        assert_eq!((job.id(), job.attempt()), (&id, attempt));
        std::mem::forget(job); // the worker dies: no release...
        revoke(&c, s.lease_id()).await; // ...its lease ends
    }
    let s = session(&etcd, 10).await;
    let q = WorkQueue::new(&s, &name).with_options(opts);
    assert!(
        q.try_claim().await.unwrap().is_none(),
        "dead-lettered, not delivered"
    );
    let dead = q.dead_letters().await.unwrap();
    assert_eq!((dead.len(), dead[0].attempts), (1, 2));
    assert!(
        dead[0].last_error.contains("without an ack"),
        "{}",
        dead[0].last_error
    );
}

#[tokio::test]
async fn an_enqueue_repeated_with_its_idempotency_key_adds_one_job_even_after_the_ack() {
    let etcd = etcd().await;
    let s = session(&etcd, 10).await;
    let name = unique("queue-idempotent");
    let q = WorkQueue::new(&s, &name);
    let key = EnqueueOptions::new().with_idempotency_key("order-42");
    let first = q.enqueue_with("charge", key.clone()).await.unwrap();
    let again = q.enqueue_with("charge", key.clone()).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(q.len().await.unwrap(), 1);
    q.claim().await.unwrap().ack().await.unwrap();
    let late = q.enqueue_with("charge", key).await.unwrap();
    assert_eq!(late, first);
    assert_eq!(
        q.len().await.unwrap(),
        0,
        "acknowledged and not added again"
    );
    // Another key is another job.
    let other = q
        .enqueue_with(
            "charge",
            EnqueueOptions::new().with_idempotency_key("order-43"),
        )
        .await
        .unwrap();
    assert_ne!(other, first);
    assert_eq!(q.len().await.unwrap(), 1);
}

#[tokio::test]
async fn an_enqueue_whose_answer_is_lost_adds_one_job_even_if_it_is_acked_before_the_retry() {
    let etcd = etcd().await;
    let proxy = proxy(&etcd).await;
    let producer = session_via(&proxy, ttl(10)).await;
    let worker = session(&etcd, 10).await;
    let name = unique("queue-lost-answer");
    let pq = WorkQueue::new(&producer, &name);
    // The dedup lease exists before the fault (one grant per window).
    pq.enqueue("warm-up").await.unwrap();
    let wq = WorkQueue::new(&worker, &name);
    wq.claim().await.unwrap().ack().await.unwrap();

    proxy.drop_responses();
    let enqueuing = tokio::spawn(async move { pq.enqueue("once").await });
    // The job lands though its answer is lost; a worker takes it and acknowledges it.
    let job = tokio::time::timeout(Duration::from_secs(5), wq.claim())
        .await
        .expect("the enqueue landed")
        .unwrap();
    let id = job.id().clone();
    job.ack().await.unwrap();
    proxy.heal();
    proxy.reset_peer();
    let returned = tokio::time::timeout(Duration::from_secs(15), enqueuing)
        .await
        .expect("the enqueue is answered after the fault")
        .unwrap()
        .unwrap();
    assert_eq!(returned, id, "the retry found its own job");
    assert_eq!(wq.len().await.unwrap(), 0, "the retry added nothing");
}

/// A dedup lease grant whose answer is lost is sent again: the retry finds the lease its
/// first attempt granted instead of granting a second one that nobody would ever use.
#[tokio::test]
async fn a_dedup_lease_grant_whose_answer_is_lost_grants_one_lease() {
    let etcd = etcd().await;
    let proxy = proxy(&etcd).await;
    let c = client(&etcd).await;
    // A window of its own (61 s: leases of 122 s), so that only this test's grant has its TTL.
    let options = QueueOptions::new().with_dedup_window(Duration::from_secs(61));
    let producer = session_via(&proxy, ttl(30)).await;
    let pq = WorkQueue::new(&producer, unique("queue-dedup-grant")).with_options(options);
    let dedup_leases = || async {
        let mut n = 0;
        for lease in c.clone().leases().await.unwrap().leases() {
            let alive = c
                .clone()
                .lease_time_to_live(lease.id(), None)
                .await
                .unwrap();
            n += usize::from(alive.granted_ttl() == 122);
        }
        n
    };
    assert_eq!(dedup_leases().await, 0);
    // The first enqueue grants the dedup lease: its answer is lost, and so is the Txn's.
    proxy.drop_responses();
    let enqueuing = tokio::spawn(async move { pq.enqueue("first").await });
    assert!(
        eventually(Duration::from_secs(5), || async {
            dedup_leases().await == 1
        })
        .await,
        "the grant reached etcd"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.heal();
    proxy.reset_peer();
    tokio::time::timeout(Duration::from_secs(15), enqueuing)
        .await
        .expect("the enqueue is answered after the fault")
        .unwrap()
        .unwrap();
    assert_eq!(
        dedup_leases().await,
        1,
        "a retried grant granted a second lease"
    );
}

#[tokio::test]
async fn jobs_are_claimed_by_priority_then_ready_time_and_none_before_its_time() {
    let etcd = etcd().await;
    let s = session(&etcd, 10).await;
    let name = unique("queue-order");
    let q = WorkQueue::new(&s, &name);
    let with = |p: u8| EnqueueOptions::new().with_priority(p);
    let soon = SystemTime::now() + Duration::from_millis(1500);
    let later = q
        .enqueue_with("p9 later", with(9).with_not_before(soon))
        .await
        .unwrap();
    let low1 = q.enqueue_with("p0 first", with(0)).await.unwrap();
    let high1 = q.enqueue_with("p5 first", with(5)).await.unwrap();
    let low2 = q.enqueue_with("p0 second", with(0)).await.unwrap();
    let high2 = q.enqueue_with("p5 second", with(5)).await.unwrap();
    let top = q.enqueue_with("p9 now", with(MAX_PRIORITY)).await.unwrap();
    let mut order = Vec::new();
    while let Some(job) = q.try_claim().await.unwrap() {
        order.push(job.id().clone());
        job.ack().await.unwrap();
    }
    assert_eq!(order, vec![top, high1, high2, low1, low2]);
    assert!(SystemTime::now() < soon, "the test ran too slowly to tell");
    // The delayed job is claimed once its time has come, by a claim waiting for it.
    let job = tokio::time::timeout(Duration::from_secs(5), q.claim())
        .await
        .unwrap()
        .unwrap();
    assert!(
        SystemTime::now() >= soon,
        "claimed before its not-before time"
    );
    assert_eq!(job.id(), &later);
    job.ack().await.unwrap();
}

#[tokio::test]
async fn a_nack_with_a_delay_hides_the_job_until_then_and_raises_its_attempt() {
    let etcd = etcd().await;
    let s = session(&etcd, 10).await;
    let name = unique("queue-nack");
    let q = WorkQueue::new(&s, &name);
    let id = q.enqueue("retry me").await.unwrap();
    let job = q.claim().await.unwrap();
    let given_back = Instant::now();
    job.nack(Duration::from_millis(800)).await.unwrap();
    assert!(
        q.try_claim().await.unwrap().is_none(),
        "hidden until its delay passed"
    );
    let again = tokio::time::timeout(Duration::from_secs(5), q.claim())
        .await
        .unwrap()
        .unwrap();
    assert!(given_back.elapsed() >= Duration::from_millis(800));
    assert_eq!((again.id(), again.attempt()), (&id, 2));
    assert_eq!(again.payload(), b"retry me");
    again.ack().await.unwrap();
}

#[tokio::test]
async fn a_dropped_claim_gives_the_job_back_and_never_deletes_it() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let s = session(&etcd, 10).await;
    let name = unique("queue-drop-guard");
    let q = WorkQueue::new(&s, &name);
    let id = q.enqueue("keep me").await.unwrap();
    drop(q.claim().await.unwrap());
    s.settled().await;
    assert!(under(&c, &name, "claims").await.is_empty());
    let again = q.try_claim().await.unwrap().expect("back in the queue");
    assert_eq!((again.id(), again.attempt()), (&id, 2));
    again.release().await.unwrap(); // the same, awaited
    let third = q.try_claim().await.unwrap().expect("back in the queue");
    assert_eq!(third.attempt(), 3);
    third.ack().await.unwrap();
}

#[tokio::test]
async fn claim_many_takes_several_jobs_in_one_round_trip_in_claim_order() {
    let etcd = etcd().await;
    let s = session(&etcd, 10).await;
    let name = unique("queue-batch");
    let q = WorkQueue::new(&s, &name);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(q.enqueue(format!("{i}")).await.unwrap());
    }
    let (txns, reads) = (s.metrics().txns, s.metrics().reads);
    let batch = q.claim_many(3).await.unwrap();
    assert_eq!(s.metrics().txns - txns, 1, "one claim");
    assert_eq!(
        s.metrics().reads - reads,
        2,
        "one scan: the jobs and the claims"
    );
    let got: Vec<_> = batch.iter().map(|j| j.id().clone()).collect();
    assert_eq!(got, ids[..3]);
    let rest = q.claim_many(MAX_BATCH).await.unwrap();
    assert_eq!(rest.len(), 2);
    for j in batch.into_iter().chain(rest) {
        j.ack().await.unwrap();
    }
    // A full batch: every job a chain of candidates nested in one Txn, within what etcd
    // allows a Txn and its nested Txns.
    for i in 0..MAX_BATCH + 10 {
        q.enqueue(format!("{i}")).await.unwrap();
    }
    let full = q.claim_many(MAX_BATCH).await.unwrap();
    assert_eq!(full.len(), MAX_BATCH);
    let mut seen = HashSet::new();
    assert!(
        full.iter().all(|j| seen.insert(j.id().clone())),
        "each once"
    );
}

#[tokio::test]
async fn the_claims_stream_yields_each_job_as_it_comes() {
    let etcd = etcd().await;
    let (s, p) = (session(&etcd, 10).await, session(&etcd, 10).await);
    let name = unique("queue-stream");
    let q = WorkQueue::new(&s, &name);
    let pq = WorkQueue::new(&p, &name);
    let producer = tokio::spawn(async move {
        for i in 0..3 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            pq.enqueue(format!("{i}")).await.unwrap();
        }
    });
    let mut claims = std::pin::pin!(q.claims());
    for i in 0..3 {
        let job = tokio::time::timeout(Duration::from_secs(5), claims.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(job.payload(), format!("{i}").as_bytes());
        job.ack().await.unwrap();
    }
    producer.await.unwrap();
    s.close().await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), claims.next())
        .await
        .unwrap();
    assert!(
        matches!(ended, Some(Err(Error::SessionClosed))),
        "{ended:?}"
    );
    assert!(claims.next().await.is_none(), "ends after its error");
}

#[tokio::test]
async fn inspection_says_how_many_wait_who_holds_what_and_what_died() {
    let etcd = etcd().await;
    let s = session(&etcd, 10).await;
    let name = unique("queue-inspect");
    let q = WorkQueue::new(&s, &name).with_options(QueueOptions::new().with_max_attempts(1));
    let a = q.enqueue("a").await.unwrap();
    let b = q
        .enqueue_with(
            "b",
            EnqueueOptions::new().with_delay(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    let held = q.claim().await.unwrap();
    assert_eq!(q.len().await.unwrap(), 2);
    let pending = q.pending().await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!((&pending[0].id, pending[0].attempts), (&b, 0));
    assert!(pending[0].ready_at > SystemTime::now() + Duration::from_secs(50));
    let claimed = q.claimed().await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        (
            &claimed[0].id,
            claimed[0].lease_id,
            claimed[0].fencing_token,
            claimed[0].attempt
        ),
        (&a, s.lease_id(), held.fencing_token(), 1)
    );
    held.nack_with_error("no", Duration::ZERO).await.unwrap();
    assert!(
        q.try_claim().await.unwrap().is_none(),
        "a is dead, b not ready"
    );
    let dead = q.dead_letters().await.unwrap();
    assert_eq!(
        (dead.len(), &dead[0].id, dead[0].last_error.as_str()),
        (1, &a, "no")
    );
    assert_eq!(q.len().await.unwrap(), 1);
}

#[tokio::test]
async fn bad_input_is_an_invalid_argument_and_sends_nothing() {
    let etcd = etcd().await;
    let s = session(&etcd, 10).await;
    let name = unique("queue-bad");
    let invalid = |r: Result<_, Error>| matches!(r, Err(Error::InvalidArgument(_)));
    let before = s.metrics().txns;
    let q = WorkQueue::new(&s, &name);
    assert!(invalid(WorkQueue::new(&s, "").enqueue("x").await.map(drop)));
    assert!(invalid(WorkQueue::new(&s, "a#b").claim().await.map(drop)));
    assert!(invalid(WorkQueue::new(&s, "").len().await.map(drop)));
    assert!(invalid(
        q.enqueue(vec![0u8; MAX_PAYLOAD_LEN + 1]).await.map(drop)
    ));
    let p = EnqueueOptions::new().with_priority(MAX_PRIORITY + 1);
    assert!(invalid(q.enqueue_with("x", p).await.map(drop)));
    let k = EnqueueOptions::new().with_idempotency_key("");
    assert!(invalid(q.enqueue_with("x", k).await.map(drop)));
    assert!(invalid(q.claim_many(0).await.map(drop)));
    assert!(invalid(q.claim_many(MAX_BATCH + 1).await.map(drop)));
    let zero = q
        .clone()
        .with_options(QueueOptions::new().with_max_attempts(0));
    assert!(invalid(zero.claim().await.map(drop)));
    assert!(invalid(zero.enqueue("x").await.map(drop)));
    assert_eq!(s.metrics().txns, before, "nothing was sent");
    assert_eq!(s.metrics().reads, 0, "nothing was read");
    assert_eq!(q.len().await.unwrap(), 0);
}

/// Requests and watch events of `sessions` so far: (txns and range reads, watch events,
/// watches opened).
fn traffic(sessions: &[LeasedSession]) -> (u64, u64, u64) {
    sessions.iter().fold((0, 0, 0), |(t, e, w), s| {
        let m = s.metrics();
        (t + m.txns + m.reads, e + m.watch_events, w + m.watches)
    })
}

/// `n` claimers of the queue `name`, each on a session of its own, once every one waits in the
/// idle line; their claims arrive on the receiver.
async fn idle_claimers(
    etcd: &etcd_coord_testkit::TestEtcd,
    c: &Client,
    name: &str,
    n: usize,
) -> (
    Vec<LeasedSession>,
    tokio::sync::mpsc::UnboundedReceiver<Result<etcd_coord::Claimed, Error>>,
) {
    let mut sessions = Vec::new();
    let (done, claimed) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..n {
        let s = session(etcd, 30).await;
        let (q, done) = (WorkQueue::new(&s, name), done.clone());
        tokio::spawn(async move {
            let _ = done.send(q.claim().await);
        });
        sessions.push(s);
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            idle_line(c, name).await.len() == n
        })
        .await,
        "every claimer waits in line"
    );
    (sessions, claimed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_job_wakes_one_idle_claimer_not_the_herd_and_idle_claimers_do_not_poll() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let name = unique("queue-herd");
    let idle = 10;
    let (sessions, mut claimed) = idle_claimers(&etcd, &c, &name, idle).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // the head's watch is in place
    let quiet = traffic(&sessions);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        traffic(&sessions).0,
        quiet.0,
        "idle claimers sent requests: polling"
    );

    let producer = session(&etcd, 30).await;
    WorkQueue::new(&producer, &name)
        .enqueue("one")
        .await
        .unwrap();
    let job = tokio::time::timeout(Duration::from_secs(5), claimed.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // The hand-off to the next in line settles: its read, its watch.
    assert!(
        eventually(Duration::from_secs(5), || async {
            idle_line(&c, &name).await.len() == idle - 1
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    for s in &sessions {
        s.settled().await;
    }
    let after = traffic(&sessions);
    let (requests, events) = (after.0 - quiet.0, after.1 - quiet.1);
    eprintln!(
        "one job, {idle} idle claimers: {requests} requests, {events} watch events, {} watches",
        after.2 - quiet.2
    );
    // The head: a scan (two range reads), the claim, its line key's release; the next: its
    // place's re-read, a scan, maybe one confirming scan. A herd costs a scan and a claim per
    // idle claimer.
    assert!(
        requests <= 10,
        "{requests} requests for one job among {idle} idle claimers"
    );
    assert!(
        events <= 3,
        "{events} watch events for one job among {idle} idle claimers"
    );
    assert!(claimed.try_recv().is_err(), "only one claim returned");
    // Idle claimers wait through their sessions' one shared watch stream: none opens another.
    for s in &sessions {
        let streams = s.metrics().watch_streams;
        assert!(
            streams <= 1,
            "a session of an idle claimer opened {streams} watch streams"
        );
    }
    job.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_claim_leaves_no_claim_no_place_in_line_no_task_and_loses_no_job() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let s = session(&etcd, 30).await;
    for ready in [true, false] {
        let name = unique("queue-drop-claim");
        let q = WorkQueue::new(&s, &name)
            // Every claim that lands before a drop counts a delivery: none may dead-letter it.
            .with_options(QueueOptions::new().with_max_attempts(1000));
        if ready {
            q.enqueue("job").await.unwrap();
        }
        let ended = drop_at_every_await(
            || q.claim(),
            async |driven, step| {
                let what = format!("ready: {ready}, dropped at {step:?}");
                if let Driven::Completed(got) = driven {
                    drop(got.unwrap_or_else(|e| panic!("{what}: {e}"))); // gives it back
                }
                nothing_left_by(&c, &s, &name, &what).await;
                let jobs = under(&c, &name, "jobs").await.len();
                assert_eq!(jobs, usize::from(ready), "{what}: jobs {jobs}");
            },
        )
        .await;
        eprintln!("claim (ready: {ready}) ended: {ended:?}");
        match ready {
            true => assert!(
                matches!(ended, Ended::Completed { polls } if polls >= 2),
                "{ended:?}"
            ),
            false => assert!(
                matches!(ended, Ended::Waiting { polls } if polls >= 3),
                "{ended:?}"
            ),
        }
        if ready {
            let last = q.claim().await.unwrap();
            assert!(last.attempt() >= 2, "the claims that landed were counted");
            last.ack().await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_ack_acknowledges_the_job_or_gives_it_back_never_half() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let s = session(&etcd, 30).await;
    let name = unique("queue-drop-ack");
    let q = WorkQueue::new(&s, &name);
    let mut acked = 0;
    let mut ended = None;
    for step in drop_points() {
        let id = q.enqueue("job").await.unwrap();
        let job = q.claim().await.unwrap();
        let driven = drive(job.ack(), step.polls, step.at).await;
        ended = driven.ended(step);
        if let Driven::Completed(r) = driven {
            r.unwrap();
        }
        s.settled().await;
        let what = format!("ack dropped at {step:?}");
        assert!(
            under(&c, &name, "claims").await.is_empty(),
            "{what}: claim left"
        );
        assert!(keys_on_lease(&c, s.lease_id()).await.is_empty(), "{what}");
        only_its_own_task_runs(&s).await;
        match q.try_claim().await.unwrap() {
            Some(back) => {
                assert_eq!((back.id(), back.attempt()), (&id, 2), "{what}");
                back.ack().await.unwrap();
            }
            None => acked += 1,
        }
        assert_eq!(q.len().await.unwrap(), 0, "{what}");
        if ended.is_some() {
            break;
        }
    }
    eprintln!("ack ended: {ended:?}; acknowledged {acked} times");
    assert!(
        matches!(ended, Some(Ended::Completed { polls }) if polls >= 1),
        "{ended:?}"
    );
    assert!(acked >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_nack_gives_the_job_back_with_or_without_its_error_never_twice_or_lost() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let s = session(&etcd, 30).await;
    let name = unique("queue-drop-nack");
    let q = WorkQueue::new(&s, &name);
    let (mut recorded, mut ended) = (0, None);
    for step in drop_points() {
        let id = q.enqueue("job").await.unwrap();
        let job = q.claim().await.unwrap();
        let delay = Duration::from_millis(50); // the nack moves the job to a later key
        let driven = drive(job.nack_with_error("boom", delay), step.polls, step.at).await;
        ended = driven.ended(step);
        if let Driven::Completed(r) = driven {
            r.unwrap();
        }
        s.settled().await;
        let what = format!("nack dropped at {step:?}");
        assert!(
            under(&c, &name, "claims").await.is_empty(),
            "{what}: claim left"
        );
        assert_eq!(under(&c, &name, "jobs").await.len(), 1, "{what}: one job");
        assert!(keys_on_lease(&c, s.lease_id()).await.is_empty(), "{what}");
        only_its_own_task_runs(&s).await;
        let back = tokio::time::timeout(Duration::from_secs(5), q.claim())
            .await
            .unwrap_or_else(|_| panic!("{what}: the job did not come back"))
            .unwrap();
        assert_eq!((back.id(), back.attempt()), (&id, 2), "{what}");
        match back.last_error() {
            Some(e) => {
                assert_eq!(e, "boom", "{what}");
                recorded += 1;
            }
            None => assert!(ended.is_none(), "{what}: a completed nack lost its error"),
        }
        back.ack().await.unwrap();
        assert_eq!(q.len().await.unwrap(), 0, "{what}");
        if ended.is_some() {
            break;
        }
    }
    eprintln!("nack ended: {ended:?}; its error recorded {recorded} times");
    assert!(
        matches!(ended, Some(Ended::Completed { polls }) if polls >= 1),
        "{ended:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_claim_many_gives_back_every_claim_that_landed_and_loses_no_job() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let s = session(&etcd, 30).await;
    let name = unique("queue-drop-claim-many");
    let q = WorkQueue::new(&s, &name)
        // Every claim that lands before a drop counts a delivery: none may dead-letter it.
        .with_options(QueueOptions::new().with_max_attempts(1000));
    for i in 0..3 {
        q.enqueue(format!("{i}")).await.unwrap();
    }
    let ended = drop_at_every_await(
        || q.claim_many(3),
        async |driven, step| {
            let what = format!("claim_many dropped at {step:?}");
            if let Driven::Completed(got) = driven {
                let got = got.unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(got.len(), 3, "{what}");
                drop(got); // gives them back
            }
            nothing_left_by(&c, &s, &name, &what).await;
            assert_eq!(under(&c, &name, "jobs").await.len(), 3, "{what}: jobs");
        },
    )
    .await;
    eprintln!("claim_many ended: {ended:?}");
    assert!(
        matches!(ended, Ended::Completed { polls } if polls >= 2),
        "{ended:?}"
    );
    let all = q.claim_many(3).await.unwrap();
    assert_eq!(all.len(), 3);
    for job in all {
        assert!(job.attempt() >= 2, "the claims that landed were counted");
        job.ack().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claims_stream_dropped_at_any_await_leaves_no_claim_and_loses_no_job() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let s = session(&etcd, 30).await;
    let name = unique("queue-drop-stream");
    let q = WorkQueue::new(&s, &name)
        // Every claim that lands before a drop counts a delivery: none may dead-letter it.
        .with_options(QueueOptions::new().with_max_attempts(1000));
    q.enqueue("job").await.unwrap();
    let ended = drop_at_every_await(
        || {
            let mut claims = Box::pin(q.claims());
            async move { claims.next().await }
        },
        async |driven, step| {
            let what = format!("claims stream dropped at {step:?}");
            if let Driven::Completed(got) = driven {
                let got = got.expect("a stream of claims does not end while claims succeed");
                drop(got.unwrap_or_else(|e| panic!("{what}: {e}"))); // gives it back
            }
            nothing_left_by(&c, &s, &name, &what).await;
            assert_eq!(under(&c, &name, "jobs").await.len(), 1, "{what}: jobs");
        },
    )
    .await;
    eprintln!("claims stream ended: {ended:?}");
    assert!(
        matches!(ended, Ended::Completed { polls } if polls >= 2),
        "{ended:?}"
    );
    q.claim().await.unwrap().ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_enqueue_adds_its_job_whole_or_not_at_all_and_leaves_no_task() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let s = session(&etcd, 30).await;
    let name = unique("queue-drop-enqueue");
    let q = WorkQueue::new(&s, &name);
    q.enqueue("warm-up: the dedup lease").await.unwrap();
    q.claim().await.unwrap().ack().await.unwrap();
    let leases = c.clone().leases().await.unwrap().leases().len();
    let n = std::sync::atomic::AtomicUsize::new(0);
    let mut acked = 0;
    let ended = drop_at_every_await(
        || {
            let k = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            q.enqueue_with(
                "job",
                EnqueueOptions::new().with_idempotency_key(format!("k{k}")),
            )
        },
        async |driven, step| {
            let what = format!("enqueue dropped at {step:?}");
            if let Driven::Completed(r) = driven {
                r.unwrap();
            }
            s.settled().await;
            only_its_own_task_runs(&s).await;
            // A Txn dropped in flight may still land after the drop: read the markers and
            // the jobs in one read (one revision), so each landed enqueue counts whole.
            let all = keys_under(&c, &format!("{name}/#queue/")).await;
            let markers = all.iter().filter(|k| k.contains("/#queue/ids/k/")).count();
            let jobs = all.iter().filter(|k| k.contains("/#queue/jobs/")).count();
            assert_eq!(
                markers,
                jobs + acked,
                "{what}: {markers} markers, {jobs} jobs, {acked} acknowledged"
            );
            while let Some(job) = q.try_claim().await.unwrap() {
                job.ack().await.unwrap();
                acked += 1;
            }
            assert_eq!(
                c.clone().leases().await.unwrap().leases().len(),
                leases,
                "{what}"
            );
        },
    )
    .await;
    eprintln!("enqueue ended: {ended:?}");
    assert!(
        matches!(ended, Ended::Completed { polls } if polls >= 1),
        "{ended:?}"
    );
}

#[tokio::test]
async fn a_claim_whose_answer_is_lost_is_found_by_its_retry_and_claims_nothing_more() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let proxy = proxy(&etcd).await;
    let worker = session_via(&proxy, ttl(10)).await;
    let producer = session(&etcd, 10).await;
    let name = unique("queue-lost-claim");
    let pq = WorkQueue::new(&producer, &name);
    let id = pq.enqueue("first").await.unwrap();
    let other = pq.enqueue("second").await.unwrap();
    let q = WorkQueue::new(&worker, &name);
    let mut claiming = Box::pin(q.claim());
    // The scan's two reads are sent; their answers arrive while the future is not polled.
    assert!(step(&mut claiming).await.is_none());
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The next polls take the answers and send the claim: it lands, its answer does not.
    proxy.drop_responses();
    assert!(step(&mut claiming).await.is_none(), "the claim is sent");
    assert!(
        eventually(Duration::from_secs(5), || async {
            under(&c, &name, "claims").await.len() == 1
        })
        .await,
        "the claim never landed"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    proxy.heal();
    proxy.reset_peer();
    let job = tokio::time::timeout(Duration::from_secs(15), claiming)
        .await
        .expect("the retry finds its own claim")
        .unwrap();
    assert_eq!((job.id(), job.attempt()), (&id, 1));
    worker.settled().await;
    let claims = under(&c, &name, "claims").await;
    assert_eq!(
        claims,
        vec![job.key().to_owned()],
        "one claim, the one returned"
    );
    // A copy of the unanswered attempt may still land and claim the job this answer did not
    // win: the session sweeps for one while that job is unchanged since the read.
    assert_eq!(
        worker.metrics().background_jobs,
        1,
        "a sweep for the other job's claim"
    );
    let next = WorkQueue::new(&producer, &name)
        .try_claim()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (next.id(), next.attempt()),
        (&other, 1),
        "the other job untouched"
    );
    // The other job has changed: no copy can claim it any more, and the sweep ends.
    assert!(
        eventually(Duration::from_secs(5), || async {
            worker.metrics().background_jobs == 0
        })
        .await,
        "a sweep outlived the job it was for"
    );
    job.ack().await.unwrap();
    next.ack().await.unwrap();
}

/// The head of the line of idle claimers does not hold as the oldest member of the queue's
/// keys, so its release announces nothing: the claimers behind it put no hand-off pointers
/// (a pointer there would cost two writes per claimer and widen its watch to the whole name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_claimers_put_no_hand_off_pointers() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let name = unique("queue-no-pointers");
    // More than 8 ahead of the last ones: a line of a lock's waiters would announce there
    // (shorter lines count their deletions and put no pointers either way).
    const IDLE: usize = 11;
    let (_sessions, mut claimed) = idle_claimers(&etcd, &c, &name, IDLE).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // each has decided how to wait
    let pointers: Vec<String> = keys_under(&c, &format!("{name}/"))
        .await
        .into_iter()
        .filter(|k| is_pointer(k))
        .collect();
    assert!(
        pointers.is_empty(),
        "pointers in the idle line: {pointers:?}"
    );
    let producer = session(&etcd, 30).await;
    let q = WorkQueue::new(&producer, &name);
    for i in 0..IDLE {
        q.enqueue(format!("job {i}")).await.unwrap();
    }
    for _ in 0..IDLE {
        let job = tokio::time::timeout(Duration::from_secs(10), claimed.recv())
            .await
            .expect("every idle claimer gets a job")
            .unwrap()
            .unwrap();
        job.ack().await.unwrap();
    }
}

/// Four jobs with the largest payload a queue takes: 6 MiB together, over tonic's default of
/// 4 MiB for one answer.
async fn largest_jobs(etcd: &etcd_coord_testkit::TestEtcd, name: &str) -> Vec<JobId> {
    let producer = session(etcd, 10).await;
    let q = WorkQueue::new(&producer, name);
    let mut ids = Vec::new();
    for i in 0..4u8 {
        ids.push(q.enqueue(vec![i; MAX_PAYLOAD_LEN]).await.unwrap());
    }
    ids
}

/// An answer of several payloads is taken whatever its size, as etcd's Go client takes one:
/// the inspections read their pages, a batch takes its jobs, and sibling claims merged in one
/// Txn each get theirs (an answer refused as too large would leave claims that applied with
/// no guard, their jobs held until the session ends).
#[tokio::test]
async fn answers_over_4_mib_are_taken_by_inspections_batches_and_merged_claims() {
    let etcd = etcd().await;
    let name = unique("queue-largest");
    let ids = largest_jobs(&etcd, &name).await;
    let s = session(&etcd, 10).await;
    let q = WorkQueue::new(&s, &name);
    let pending = q.pending().await.expect("a page of 6 MiB");
    assert_eq!(pending.len(), 4);

    let batch = q.claim_many(4).await.expect("one answer of 6 MiB");
    assert_eq!(batch.len(), 4);
    for job in batch {
        assert_eq!(job.payload().len(), MAX_PAYLOAD_LEN);
        job.nack(Duration::ZERO).await.unwrap();
    }

    let mut family = vec![s.clone()];
    for _ in 1..4 {
        family.push(s.sibling(ttl(10)).await.unwrap());
    }
    let queues: Vec<WorkQueue> = family.iter().map(|s| WorkQueue::new(s, &name)).collect();
    let claimed = futures::future::join_all(queues.iter().map(|q| q.claim())).await;
    let mut got = HashSet::new();
    for job in claimed {
        let job = job.expect("a claim merged with its siblings'");
        assert_eq!(job.payload().len(), MAX_PAYLOAD_LEN);
        got.insert(job.id().clone());
        job.ack().await.unwrap();
    }
    assert_eq!(got, ids.into_iter().collect::<HashSet<_>>());
    assert_eq!(q.len().await.unwrap(), 0, "every job acknowledged");
}

/// While etcd's database is over its quota (`--quota-backend-bytes`), a claim is refused at
/// once, typed and never retried, and no job is lost. A claim puts only inside Txns nested in
/// its own, which etcd 3.4.23 does not count against the quota: the crate makes etcd count
/// them (`rpc::witness`; without, the claim goes through there). An ack deletes: etcd 3.4.23
/// takes it; etcd 3.5 before 3.5.7 (3.5.1 here) refuses every Txn over its quota, so there the
/// ack is refused at once, typed, too (and the guard's give-back as it is dropped, after which
/// the session ends and its lease takes the claim with it: the job is back in the queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_etcds_quota_a_claim_is_refused_at_once_and_no_job_is_lost() {
    init_tracing();
    let cluster =
        etcd_coord_testkit::EtcdCluster::start_with_args(1, &["--quota-backend-bytes", "4194304"])
            .await
            .unwrap();
    let mut client = cluster.client().await.unwrap();
    let session = LeasedSession::new(client.clone(), ttl(30)).await.unwrap();
    let queue = WorkQueue::new(&session, "full");
    queue.enqueue("a").await.unwrap();
    queue.enqueue("b").await.unwrap();
    let claimed = queue.try_claim().await.unwrap().expect("a job");

    // Fill the database until etcd refuses a put.
    let full = "database space exceeded";
    let value = vec![b'x'; 256 * 1024];
    for i in 0.. {
        assert!(i < 400, "etcd never filled up");
        match client.put(format!("filler/{i}"), value.clone(), None).await {
            Ok(_) => continue,
            Err(e) if e.to_string().contains(full) => break,
            Err(e) => match Error::from(e) {
                e if e.is_retryable() => continue,
                e => panic!("{e}"),
            },
        }
    }
    // Since etcd's fix that lets Txns that put nothing through (3.5: PR #14884, 3.5.7; 3.4.23
    // has it), an ack goes through; before it, every Txn is refused.
    let version = client.status().await.unwrap().version().to_owned();
    let patch = |minor: &str| {
        version
            .strip_prefix(minor)
            .and_then(|p| p.parse::<u32>().ok())
    };
    let takes_deletes = !matches!(patch("3.5."), Some(p) if p < 7);

    let is_full = |r: &Result<(), Error>| matches!(r, Err(e) if e.to_string().contains(full) && !e.is_retryable());
    let refused = tokio::time::timeout(Duration::from_secs(2), queue.try_claim())
        .await
        .expect("refused at once, not retried")
        .map(|_| ());
    assert!(is_full(&refused), "{refused:?}");
    let acked = tokio::time::timeout(Duration::from_secs(2), claimed.ack())
        .await
        .expect("answered at once, not retried");
    match takes_deletes {
        true => assert!(acked.is_ok(), "{version}: {acked:?}"),
        false => assert!(is_full(&acked), "{version}: {acked:?}"),
    }

    // Nothing was lost: the unacknowledged jobs are in etcd (read without a Txn).
    let left = under(&client, "full", "jobs").await.len();
    assert_eq!(left, if acked.is_ok() { 1 } else { 2 });
}
