//! Real network partitions: each etcd member in its own network namespace, cut off with
//! nftables drop rules (packets vanish; nothing is reset or refused). Needs Linux, root, `ip`
//! and `nft`; elsewhere each test prints why it is skipped — unless
//! `ETCD_COORD_REQUIRE_PARTITIONS=1` (set by `.ci/run` when it runs as root), which makes a
//! missing capability a failure.

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use etcd_client::{Client, Txn, TxnOp};
use etcd_coord::{recommended_connect_options, LeasedSession, Mutex, SessionOptions, WorkQueue};
use etcd_coord_testkit::{partitions_unsupported, EtcdCluster};

const TTL: Duration = Duration::from_secs(3);

/// A three-member cluster with each member in its own namespace, or `None` (with the reason
/// printed) where that cannot be made.
async fn partitionable_cluster() -> Option<EtcdCluster> {
    if let Some(why) = partitions_unsupported() {
        assert!(
            std::env::var("ETCD_COORD_REQUIRE_PARTITIONS").as_deref() != Ok("1"),
            "ETCD_COORD_REQUIRE_PARTITIONS=1 but partitions are unsupported: {why}"
        );
        eprintln!("skipped: real partitions are unsupported here: {why}");
        return None;
    }
    Some(
        EtcdCluster::start_partitionable(3)
            .await
            .expect("a three-member cluster in network namespaces"),
    )
}

/// A client of member `i` only.
async fn client_of(cluster: &EtcdCluster, i: usize) -> Client {
    Client::connect(
        [cluster.endpoint(i).unwrap()],
        Some(recommended_connect_options()),
    )
    .await
    .expect("client")
}

async fn session_on(cluster: &EtcdCluster, i: usize) -> LeasedSession {
    LeasedSession::new(
        client_of(cluster, i).await,
        SessionOptions::new().with_ttl(TTL),
    )
    .await
    .expect("session")
}

#[derive(Debug, Clone, Copy)]
enum Cut {
    /// The holder's member loses its peers; the holder still reaches it.
    FromPeers,
    /// The holder's member loses everyone: the holder's connection is blackholed.
    FromEveryone,
}

/// The holder's client talks only to member 0; a waiter's only to member 1. Member 0 is cut
/// off. The holder must learn that it lost the lock (its `lost()` fires) before the waiter
/// acquires it; its token must not pass the server's fence even after the partition heals; and
/// once healed, the same client takes the lock again.
async fn holder_cut_off_learns_of_its_loss_before_anyone_else_acquires(cut: Cut) {
    common::init_tracing();
    let Some(cluster) = partitionable_cluster().await else {
        return;
    };
    let name = common::unique("partition");
    let holder_session = session_on(&cluster, 0).await;
    let waiter_session = session_on(&cluster, 1).await;
    let held = Mutex::new(&holder_session, &name)
        .lock()
        .await
        .expect("the holder locks");
    let fence = held.fence();
    let waiter = tokio::spawn({
        let name = name.clone();
        let session = waiter_session.clone();
        async move {
            let guard = Mutex::new(&session, &name).lock().await;
            (Instant::now(), guard)
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "the waiter acquired a held lock");

    let cut_at = Instant::now();
    match cut {
        Cut::FromPeers => cluster.isolate_from_peers(0).unwrap(),
        Cut::FromEveryone => cluster.partition(0).unwrap(),
    }
    let lost = tokio::time::timeout(TTL * 3, fence.lost())
        .await
        .expect("the holder learns of its loss");
    let lost_at = Instant::now();
    let (acquired_at, next) = tokio::time::timeout(TTL * 5, waiter)
        .await
        .expect("the waiter acquires once the holder's lease expired")
        .unwrap();
    let next = next.expect("the waiter's lock");
    eprintln!(
        "{cut:?}: holder lost after {:?} ({lost}); waiter acquired after {:?}",
        lost_at - cut_at,
        acquired_at - cut_at
    );
    assert!(
        lost_at < acquired_at,
        "the waiter acquired before the holder knew it had lost the lock"
    );
    assert!(next.fencing_token() > fence.fencing_token());
    assert!(
        fence
            .txn_if_owner([TxnOp::put("x", "y", None)])
            .await
            .is_err(),
        "the holder's fenced write was accepted after its loss"
    );

    // Healed: the old token still does not pass the server's fence (sent by hand, so that
    // nothing on the client side can refuse it first) …
    cluster.heal(0).unwrap();
    let mut admin = client_of(&cluster, 1).await;
    let stale = admin
        .txn(
            Txn::new()
                .when([fence.owner_compare()])
                .and_then([TxnOp::put(format!("{name}-resource"), "stale", None)]),
        )
        .await
        .unwrap();
    assert!(!stale.succeeded(), "the stale token passed the fence");
    let next_token = next.fencing_token();
    next.release().await.unwrap();
    drop(held);

    // … and the holder's client, through the member that was cut off, locks again.
    let again = tokio::time::timeout(TTL * 5, async {
        loop {
            let Ok(session) = LeasedSession::new(
                holder_session.client().clone(),
                SessionOptions::new().with_ttl(TTL),
            )
            .await
            else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            match Mutex::new(&session, &name).lock().await {
                Ok(guard) => return (session, guard),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    })
    .await
    .expect("the holder's client locks again after the partition heals");
    assert!(again.1.fencing_token() > next_token);
    again.1.release().await.unwrap();
    again.0.close().await.unwrap();
    waiter_session.close().await.unwrap();
    assert!(
        common::keys_under(&admin, &format!("{name}/"))
            .await
            .is_empty(),
        "keys of the test remain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_member_is_cut_from_its_peers_knows_it_lost_the_lock_first() {
    holder_cut_off_learns_of_its_loss_before_anyone_else_acquires(Cut::FromPeers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_member_is_cut_from_everyone_knows_it_lost_the_lock_first() {
    holder_cut_off_learns_of_its_loss_before_anyone_else_acquires(Cut::FromEveryone).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_member_serves_again_after_heal() {
    let Some(cluster) = partitionable_cluster().await else {
        return;
    };
    let mut client = client_of(&cluster, 0).await;
    client.put("before", "1", None).await.unwrap();
    cluster.partition(0).unwrap();
    let cut = tokio::time::timeout(Duration::from_secs(3), client.put("during", "1", None)).await;
    assert!(
        !matches!(cut, Ok(Ok(_))),
        "a write through a partitioned member succeeded"
    );
    cluster.heal(0).unwrap();
    let healed = common::eventually(Duration::from_secs(10), || {
        let mut client = client.clone();
        async move { client.put("after", "1", None).await.is_ok() }
    })
    .await;
    assert!(healed, "the member does not serve after heal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_stm_read_on_a_member_behind_the_snapshot_waits_for_it_instead_of_failing() {
    // A transaction's first read fixes its snapshot R on one member; a later read lands on a
    // member that has not applied R yet (etcd #11963: "required revision is a future
    // revision"). The STM reads at R linearizably there — the member first catches up — so
    // the transaction commits with both values at R. (When the member rejoins, its pending
    // linearizable read may fail with "leader changed" — transient: the attempt runs again.
    // Without the fallback, the read fails for good with the future-revision error.)
    let Some(mut cluster) = partitionable_cluster().await else {
        return;
    };
    // The snapshot is fixed on the leader; a follower is made to lag.
    let front = cluster.leader().await.expect("a leader");
    let lagging = (front + 1) % 3;
    let cluster = cluster;
    let url = |i: usize| format!("http://{}", cluster.endpoint(i).unwrap());
    let lagging_id = client_of(&cluster, lagging)
        .await
        .status()
        .await
        .unwrap()
        .header()
        .unwrap()
        .member_id();
    let mut writer = client_of(&cluster, front).await;
    writer.put("stm-lag/a", "1", None).await.unwrap();
    writer.put("stm-lag/b", "1", None).await.unwrap();
    // The follower stops hearing from its peers: what is written now is beyond it.
    cluster.isolate_from_peers(lagging).unwrap();
    writer.put("stm-lag/a", "2", None).await.unwrap();
    writer.put("stm-lag/b", "2", None).await.unwrap();
    // No require-leader here: a linearizable read on the cut-off member waits for the heal
    // instead of failing at once.
    let options = etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
    let reader = Client::connect([url(front)], Some(options)).await.unwrap();
    let stm = etcd_coord::Stm::new(reader.clone()).with_request_timeout(Duration::from_secs(10));
    let second_read = std::sync::Mutex::new(String::new());
    let (first, cluster, url, reader, second_read) = (
        &std::sync::atomic::AtomicBool::new(true),
        &cluster,
        &url,
        &reader,
        &second_read,
    );
    let committed = stm
        .run(|tx: etcd_coord::StmTxn| async move {
            let a = tx.get("stm-lag/a").await?; // fixes the snapshot on the leader
            if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                // From now on the reader reaches only the lagging member.
                reader.add_endpoint(url(lagging)).await.unwrap();
                reader.remove_endpoint(url(front)).await.unwrap();
                let moved = common::eventually(Duration::from_secs(5), || async {
                    let status = reader.clone().status().await;
                    matches!(status, Ok(s) if s.header().map(|h| h.member_id()) == Some(lagging_id))
                })
                .await;
                assert!(moved, "the reader never reached the lagging member alone");
                let (b, _) = tokio::join!(tx.get("stm-lag/b"), async {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    cluster.heal(lagging).unwrap();
                });
                *second_read.lock().unwrap() = format!("{b:?}");
                return Ok::<_, etcd_coord::Error>((a, b?));
            }
            Ok((a, tx.get("stm-lag/b").await?))
        })
        .await
        .unwrap();
    let second_read = second_read.lock().unwrap().clone();
    eprintln!(
        "the read on the lagging member: {second_read}; attempts: {}",
        committed.attempts
    );
    assert!(
        second_read.starts_with("Ok") || second_read.contains("leader changed"),
        "{second_read}"
    );
    assert_eq!(
        committed.value,
        (Some(b"2".to_vec()), Some(b"2".to_vec())),
        "both reads at the snapshot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_through_a_member_behind_finds_the_job_its_first_read_missed() {
    // A claim reads the queue serializably first (so that under a burst of claims it does not
    // wait for etcd's read index). Through a member that has not applied the latest writes,
    // that read misses jobs: `try_claim` must read the present — linearizably, which waits
    // for the member to catch up — before it says there is none. Without that, it answers
    // "no job" at once, for a job enqueued before it was called.
    let Some(mut cluster) = partitionable_cluster().await else {
        return;
    };
    let front = cluster.leader().await.expect("a leader");
    let lagging = (front + 1) % 3;
    let cluster = cluster;
    // No require-leader: the cut-off member answers serializable reads from what it has.
    let options = etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
    let url = format!("http://{}", cluster.endpoint(lagging).unwrap());
    let worker = LeasedSession::new(
        Client::connect([url], Some(options)).await.unwrap(),
        SessionOptions::new().with_ttl(TTL),
    )
    .await
    .unwrap();
    let producer = session_on(&cluster, front).await;
    let name = "queue-behind";
    let q = WorkQueue::new(&worker, name);
    assert!(q.try_claim().await.unwrap().is_none(), "nothing yet");
    // The member stops hearing from its peers: the job enqueued now is beyond it.
    cluster.isolate_from_peers(lagging).unwrap();
    let id = WorkQueue::new(&producer, name)
        .enqueue("beyond the member")
        .await
        .unwrap();
    let (claimed, ()) = tokio::join!(q.try_claim(), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster.heal(lagging).unwrap();
    });
    let job = claimed
        .unwrap()
        .expect("the job enqueued before the claim was called");
    assert_eq!(job.id(), &id);
    job.ack().await.unwrap();
    worker.close().await.unwrap();
    producer.close().await.unwrap();
}
