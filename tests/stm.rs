//! `Stm` against real etcd: conservation under concurrent transfers (also through dropped
//! answers and resets), each isolation level's checks, bounded retries, compaction.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use etcd_client::{Client, GetOptions};
use etcd_coord::{Committed, Error, Isolation, Stm, StmTxn};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

const START: i64 = 1000;

fn number(v: Option<Vec<u8>>) -> i64 {
    v.and_then(|v| String::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(0)
}

fn account(prefix: &str, i: usize) -> String {
    format!("{prefix}/acct/{i:03}")
}

async fn open_accounts(client: &Client, prefix: &str, accounts: usize) {
    let mut c = client.clone();
    for i in 0..accounts {
        c.put(account(prefix, i), START.to_string(), None)
            .await
            .unwrap();
    }
}

async fn read_all(client: &Client, prefix: &str) -> BTreeMap<String, String> {
    let mut c = client.clone();
    c.get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .unwrap()
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_owned(),
                kv.value_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// One transfer: moves `amount` from `from` to `to` if `from` has it, and records itself under
/// `<prefix>/done/<id>` in the same transaction. Returns whether it moved anything.
async fn transfer(
    stm: &Stm,
    prefix: &str,
    id: &str,
    from: usize,
    to: usize,
    amount: i64,
) -> Result<Committed<bool>, Error> {
    let (from_key, to_key) = (&account(prefix, from), &account(prefix, to));
    let record = &format!("{prefix}/done/{id}");
    stm.run(|tx: StmTxn| async move {
        let have = number(tx.get(from_key.as_str()).await?);
        let other = number(tx.get(to_key.as_str()).await?);
        if have < amount {
            return Ok(false);
        }
        tx.put(from_key.as_str(), (have - amount).to_string());
        tx.put(to_key.as_str(), (other + amount).to_string());
        tx.put(record.as_str(), format!("{from} {to} {amount}"));
        Ok(true)
    })
    .await
}

/// What the clients saw: transfers etcd confirmed, and those whose commit went unanswered.
#[derive(Default)]
struct Outcomes {
    committed: BTreeSet<String>,
    uncertain: BTreeSet<String>,
    attempts: u64,
}

/// Runs one transferring task per client in `clients`, each making `per_client` random
/// transfers between `accounts` accounts.
async fn run_transfers(
    clients: Vec<Client>,
    prefix: &str,
    accounts: usize,
    per_client: usize,
    timeout: Duration,
) -> Outcomes {
    let mut tasks = Vec::new();
    for (c, client) in clients.into_iter().enumerate() {
        let prefix = prefix.to_owned();
        tasks.push(tokio::spawn(async move {
            let stm = Stm::new(client)
                .with_request_timeout(timeout)
                .with_max_attempts(1000);
            let mut rng = rand::rngs::StdRng::seed_from_u64(c as u64);
            let mut out = Outcomes::default();
            for i in 0..per_client {
                let from = rng.random_range(0..accounts);
                let to = (from + rng.random_range(1..accounts)) % accounts;
                let amount = rng.random_range(1..=10);
                let id = format!("{c}-{i}");
                match transfer(&stm, &prefix, &id, from, to, amount).await {
                    Ok(done) => {
                        out.attempts += u64::from(done.attempts);
                        if done.value {
                            out.committed.insert(id);
                        }
                    }
                    Err(Error::CommitUncertain(_)) => {
                        out.uncertain.insert(id);
                    }
                    // A read that kept failing through a fault: nothing was committed.
                    Err(Error::TooManyConflicts { .. }) => {}
                    Err(e) => panic!("transfer {id}: {e:?}"),
                }
            }
            out
        }));
    }
    let mut all = Outcomes::default();
    for t in tasks {
        let out = t.await.unwrap();
        all.committed.extend(out.committed);
        all.uncertain.extend(out.uncertain);
        all.attempts += out.attempts;
    }
    all
}

/// The balances are conserved and are exactly the start plus the transfers recorded in etcd;
/// every confirmed transfer is recorded, and only confirmed or uncertain ones are.
fn check_history(state: &BTreeMap<String, String>, prefix: &str, accounts: usize, out: &Outcomes) {
    let mut expected = vec![START; accounts];
    let done_prefix = format!("{prefix}/done/");
    let mut recorded = BTreeSet::new();
    for (key, value) in state {
        if let Some(id) = key.strip_prefix(&done_prefix) {
            let v: Vec<i64> = value.split(' ').map(|x| x.parse().unwrap()).collect();
            expected[v[0] as usize] -= v[2];
            expected[v[1] as usize] += v[2];
            recorded.insert(id.to_owned());
        }
    }
    let balances: Vec<i64> = (0..accounts)
        .map(|i| state[&account(prefix, i)].parse().unwrap())
        .collect();
    assert_eq!(
        balances.iter().sum::<i64>(),
        START * accounts as i64,
        "the total changed"
    );
    assert_eq!(
        balances, expected,
        "the balances are not the start plus the recorded transfers (one applied twice?)"
    );
    let lost: Vec<_> = out.committed.difference(&recorded).collect();
    assert!(lost.is_empty(), "confirmed transfers missing: {lost:?}");
    let unexplained: Vec<_> = recorded
        .iter()
        .filter(|id| !out.committed.contains(*id) && !out.uncertain.contains(*id))
        .collect();
    assert!(
        unexplained.is_empty(),
        "transfers nobody confirmed: {unexplained:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_conserve_the_total_and_apply_every_commit_exactly_once() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let prefix = unique("stm-bank");
    let accounts = 8;
    open_accounts(&observer, &prefix, accounts).await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(client(&etcd).await);
    }
    let out = run_transfers(clients, &prefix, accounts, 40, Duration::from_secs(5)).await;
    assert!(out.uncertain.is_empty());
    assert!(
        out.attempts > out.committed.len() as u64,
        "no conflict at all: the test did not contend"
    );
    check_history(&read_all(&observer, &prefix).await, &prefix, accounts, &out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_through_dropped_answers_and_resets_lose_nothing_and_apply_nothing_twice() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let prefix = unique("stm-bank-faults");
    let accounts = 6;
    open_accounts(&observer, &prefix, accounts).await;
    let proxy = Arc::new(proxy(&etcd).await);
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(client_via(&proxy).await);
    }
    let faults = {
        let proxy = Arc::clone(&proxy);
        tokio::spawn(async move {
            for round in 0.. {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if round % 2 == 0 {
                    proxy.drop_responses();
                } else {
                    proxy.reset_peer();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                proxy.heal();
                proxy.reset_peer(); // the streams that lost answers have gaps: start afresh
            }
        })
    };
    let out = run_transfers(clients, &prefix, accounts, 60, Duration::from_millis(300)).await;
    faults.abort();
    proxy.heal();
    eprintln!(
        "stm under faults: {} confirmed, {} uncertain, {} attempts",
        out.committed.len(),
        out.uncertain.len(),
        out.attempts
    );
    assert!(
        !out.committed.is_empty(),
        "nothing committed through the faults"
    );
    check_history(&read_all(&observer, &prefix).await, &prefix, accounts, &out);
}

/// Two transactions each read x and y and, if together they hold at least 150, take 150 from
/// "their" key — a constraint (x + y ≥ 0) each keeps alone. Both read before either commits.
async fn write_skew(isolation: Isolation) -> (i64, u32) {
    let etcd = etcd().await;
    let mut observer = client(&etcd).await;
    let prefix = unique("stm-skew");
    let (x, y) = (format!("{prefix}/x"), format!("{prefix}/y"));
    observer.put(x.as_str(), "100", None).await.unwrap();
    observer.put(y.as_str(), "100", None).await.unwrap();
    let both_read = Arc::new(tokio::sync::Barrier::new(2));
    let attempts = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for mine in [x.clone(), y.clone()] {
        let stm = Stm::new(client(&etcd).await).with_isolation(isolation);
        let (x, y, both_read, attempts) = (
            x.clone(),
            y.clone(),
            Arc::clone(&both_read),
            Arc::clone(&attempts),
        );
        tasks.push(tokio::spawn(async move {
            let first = &AtomicBool::new(true);
            let (x, y, mine, both_read, attempts) = (&x, &y, &mine, &both_read, &attempts);
            stm.run(|tx: StmTxn| async move {
                attempts.fetch_add(1, Ordering::SeqCst);
                let sum = number(tx.get(x.as_str()).await?) + number(tx.get(y.as_str()).await?);
                if first.swap(false, Ordering::SeqCst) {
                    both_read.wait().await;
                }
                if sum >= 150 {
                    let now = number(tx.get(mine.as_str()).await?);
                    tx.put(mine.as_str(), (now - 150).to_string());
                }
                Ok::<_, Error>(())
            })
            .await
            .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let state = read_all(&observer, &prefix).await;
    let total = state[&x].parse::<i64>().unwrap() + state[&y].parse::<i64>().unwrap();
    (total, attempts.load(Ordering::SeqCst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_levels_prevent_write_skew() {
    for isolation in [
        Isolation::SerializableSnapshot,
        Isolation::Serializable,
        Isolation::RepeatableReads,
    ] {
        let (total, attempts) = write_skew(isolation).await;
        assert_eq!(total, 50, "{isolation:?}: x + y");
        assert_eq!(attempts, 3, "{isolation:?}: one of the two ran again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_committed_shows_write_skew() {
    let (total, attempts) = write_skew(Isolation::ReadCommitted).await;
    assert_eq!(total, -100, "both took 150 from 200");
    assert_eq!(attempts, 2);
}

/// A transaction reads `a`, then someone else writes `b`, then the transaction writes `b`.
async fn blind_write_after_the_snapshot(isolation: Isolation) -> Committed<()> {
    let etcd = etcd().await;
    let other = client(&etcd).await;
    let prefix = unique("stm-blind");
    let (a, b) = (&format!("{prefix}/a"), &format!("{prefix}/b"));
    let (first, other) = (&AtomicBool::new(true), &other);
    Stm::new(client(&etcd).await)
        .with_isolation(isolation)
        .run(|tx: StmTxn| async move {
            tx.get(a.as_str()).await?;
            if first.swap(false, Ordering::SeqCst) {
                other.clone().put(b.as_str(), "theirs", None).await?;
            }
            tx.put(b.as_str(), "ours");
            Ok::<_, Error>(())
        })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_snapshot_also_checks_keys_only_written_and_serializable_does_not() {
    let snapshot = blind_write_after_the_snapshot(Isolation::SerializableSnapshot).await;
    assert_eq!(
        snapshot.attempts, 2,
        "the write to b after the snapshot is a conflict"
    );
    let serializable = blind_write_after_the_snapshot(Isolation::Serializable).await;
    assert_eq!(serializable.attempts, 1, "only the read set is checked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_reads_see_one_revision_and_read_committed_sees_the_latest() {
    let etcd = etcd().await;
    let mut other = client(&etcd).await;
    let prefix = unique("stm-snapshot");
    let (a, c) = (format!("{prefix}/a"), format!("{prefix}/c"));
    other.put(a.as_str(), "1", None).await.unwrap();
    other.put(c.as_str(), "old", None).await.unwrap();
    for (isolation, expected) in [
        (Isolation::SerializableSnapshot, "old"),
        (Isolation::Serializable, "old"),
        (Isolation::ReadCommitted, "new"),
    ] {
        other.put(c.as_str(), "old", None).await.unwrap();
        let (a, c, other) = (&a, &c, &other);
        let seen = Stm::new(client(&etcd).await)
            .with_isolation(isolation)
            .run(|tx: StmTxn| async move {
                tx.get(a.as_str()).await?;
                let at = tx.revision();
                other.clone().put(c.as_str(), "new", None).await?;
                let c = tx.get(c.as_str()).await?.unwrap();
                Ok::<_, Error>((String::from_utf8(c).unwrap(), at))
            })
            .await
            .unwrap();
        assert_eq!(seen.value.0, expected, "{isolation:?}");
        assert_eq!(
            seen.value.1.is_some(),
            isolation != Isolation::ReadCommitted,
            "{isolation:?}: a snapshot revision"
        );
        assert_eq!(seen.attempts, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_bounded_and_exhaustion_is_a_typed_error_with_nothing_written() {
    let etcd = etcd().await;
    let other = client(&etcd).await;
    let prefix = unique("stm-bounded");
    let (a, b) = (format!("{prefix}/a"), format!("{prefix}/b"));
    let ran = &AtomicU32::new(0);
    let (a, b, other) = (&a, &b, &other);
    let result = Stm::new(client(&etcd).await)
        .with_max_attempts(3)
        .run(|tx: StmTxn| async move {
            ran.fetch_add(1, Ordering::SeqCst);
            tx.get(a.as_str()).await?;
            // Someone else changes what we read, every time.
            other.clone().put(a.as_str(), "theirs", None).await?;
            tx.put(b.as_str(), "ours");
            Ok::<_, Error>(())
        })
        .await;
    assert!(
        matches!(result, Err(Error::TooManyConflicts { attempts: 3 })),
        "{result:?}"
    );
    assert_eq!(ran.load(Ordering::SeqCst), 3);
    assert!(keys_under(other, b).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborting_closure_writes_nothing_and_bad_settings_are_refused() {
    let etcd = etcd().await;
    let observer = client(&etcd).await;
    let prefix = unique("stm-abort");
    let key = &format!("{prefix}/k");
    let aborted: Result<Committed<()>, Error> = Stm::new(client(&etcd).await)
        .run(|tx: StmTxn| async move {
            tx.put(key.as_str(), "v");
            Err(Error::InvalidArgument("changed my mind".into()))
        })
        .await;
    assert!(matches!(aborted, Err(Error::InvalidArgument(_))));
    assert!(keys_under(&observer, key).await.is_empty());
    for stm in [
        Stm::new(client(&etcd).await).with_max_attempts(0),
        Stm::new(client(&etcd).await).with_request_timeout(Duration::ZERO),
    ] {
        let refused = stm
            .run(|tx: StmTxn| async move {
                tx.put(key.as_str(), "v");
                Ok::<_, Error>(())
            })
            .await;
        assert!(
            matches!(refused, Err(Error::InvalidArgument(_))),
            "{refused:?}"
        );
    }
    assert!(keys_under(&observer, key).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_whose_snapshot_is_compacted_away_runs_again() {
    // The snapshot is fixed by a read of a, or (a prefetched) by the prefetch; either way b,
    // read after the compaction, is read at it.
    for prefetched in [false, true] {
        let etcd = etcd().await;
        let mut other = client(&etcd).await;
        let prefix = unique("stm-compacted");
        let (a, b) = (format!("{prefix}/a"), format!("{prefix}/b"));
        other.put(a.as_str(), "1", None).await.unwrap();
        other.put(b.as_str(), "2", None).await.unwrap();
        let mut stm = Stm::new(client(&etcd).await);
        if prefetched {
            stm = stm.with_prefetch([a.as_str()]);
        }
        let (first, a, b, prefix, other, etcd) =
            (&AtomicBool::new(true), &a, &b, &prefix, &other, &etcd);
        let done = stm
            .run(|tx: StmTxn| async move {
                if !prefetched {
                    tx.get(a.as_str()).await?;
                }
                if first.swap(false, Ordering::SeqCst) {
                    // Move the store on and compact past this attempt's snapshot.
                    other.clone().put(format!("{prefix}/z"), "", None).await?;
                    etcd.compact().await.unwrap();
                }
                let y = number(tx.get(b.as_str()).await?);
                let x = number(tx.get(a.as_str()).await?);
                tx.put(format!("{prefix}/sum"), (x + y).to_string());
                Ok::<_, Error>(x + y)
            })
            .await
            .unwrap();
        assert_eq!(
            (done.value, done.attempts),
            (3, 2),
            "prefetched: {prefetched}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetched_keys_are_read_at_one_revision_and_a_read_only_transaction_commits_nothing() {
    let etcd = etcd().await;
    let mut other = client(&etcd).await;
    let prefix = unique("stm-prefetch");
    let (a, b) = (format!("{prefix}/a"), format!("{prefix}/b"));
    other.put(a.as_str(), "1", None).await.unwrap();
    let at = other
        .put(b.as_str(), "2", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let (a, b, other) = (&a, &b, &other);
    let done = Stm::new(client(&etcd).await)
        .with_prefetch([a.as_str(), b.as_str()])
        .run(|tx: StmTxn| async move {
            // Written after the prefetch: not seen.
            other.clone().put(b.as_str(), "20", None).await?;
            let sum = number(tx.get(a.as_str()).await?) + number(tx.get(b.as_str()).await?);
            Ok::<_, Error>((sum, tx.revision()))
        })
        .await
        .unwrap();
    assert_eq!(done.value, (3, Some(at)));
    assert_eq!(
        done.revision, at,
        "a read-only transaction reports its reads' revision"
    );
}

/// A change made by someone else between a transaction's range read and its commit.
#[derive(Debug, Clone, Copy)]
enum Disturbance {
    Insert,
    Delete,
    Update,
}

/// A transaction counts the keys under `<prefix>/r/` and records the count; on its first
/// attempt someone else changes the range after the read. Returns the count stored, the true
/// count, and the attempts.
async fn count_the_range(isolation: Isolation, disturbance: Disturbance) -> (usize, usize, u32) {
    let etcd = etcd().await;
    let mut other = client(&etcd).await;
    let prefix = unique("stm-range");
    let range = format!("{prefix}/r/");
    for k in ["1", "2"] {
        other.put(format!("{range}{k}"), "v", None).await.unwrap();
    }
    let stm = Stm::new(client(&etcd).await).with_isolation(isolation);
    let first = &AtomicBool::new(true);
    let (range, count, other) = (&range, &format!("{prefix}/count"), &other);
    let committed = stm
        .run(|tx: StmTxn| async move {
            let seen = tx.get_prefix(range.as_str()).await?;
            if first.swap(false, Ordering::SeqCst) {
                let mut other = other.clone();
                match disturbance {
                    Disturbance::Insert => {
                        other.put(format!("{range}3"), "v", None).await.unwrap();
                    }
                    Disturbance::Delete => {
                        other.delete(format!("{range}1"), None).await.unwrap();
                    }
                    Disturbance::Update => {
                        other.put(format!("{range}2"), "w", None).await.unwrap();
                    }
                }
            }
            tx.put(count.as_str(), seen.len().to_string());
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    let mut c = other.clone();
    let truth = c
        .get(
            range.as_str(),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap()
        .count() as usize;
    let stored = number(
        c.get(count.as_str(), None)
            .await
            .unwrap()
            .kvs()
            .first()
            .map(|kv| kv.value().to_vec()),
    );
    (stored as usize, truth, committed.attempts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_read_conflicts_with_any_later_insert_delete_or_update_at_the_checking_levels() {
    for isolation in [
        Isolation::SerializableSnapshot,
        Isolation::Serializable,
        Isolation::RepeatableReads,
    ] {
        for disturbance in [
            Disturbance::Insert,
            Disturbance::Delete,
            Disturbance::Update,
        ] {
            let (stored, truth, attempts) = count_the_range(isolation, disturbance).await;
            assert_eq!(
                (stored, attempts),
                (truth, 2),
                "{isolation:?}, {disturbance:?}: the count and the attempts"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_committed_range_reads_are_not_checked() {
    let (stored, truth, attempts) =
        count_the_range(Isolation::ReadCommitted, Disturbance::Insert).await;
    assert_eq!(
        (stored, truth, attempts),
        (2, 3, 1),
        "a phantom went unseen"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_read_shows_the_transactions_own_writes_and_repeats() {
    let etcd = etcd().await;
    let mut other = client(&etcd).await;
    let prefix = unique("stm-own");
    let p = format!("{prefix}/p/");
    for (k, v) in [("a", "1"), ("b", "2"), ("c", "3")] {
        other.put(format!("{p}{k}"), v, None).await.unwrap();
    }
    other
        .put(format!("{prefix}/q"), "outside", None)
        .await
        .unwrap();
    let stm = Stm::new(client(&etcd).await);
    let (p, other, first) = (&p, &other, &AtomicBool::new(true));
    let committed = stm
        .run(|tx: StmTxn| async move {
            tx.delete(format!("{p}a"));
            tx.put(format!("{p}b"), "20");
            tx.put(format!("{p}d"), "4");
            let seen = tx.get_prefix(p.as_str()).await?;
            // Someone else inserts into the range (once): the same read repeats, and a get
            // of the new key sees the snapshot (it does not exist there).
            if first.swap(false, Ordering::SeqCst) {
                other.clone().put(format!("{p}e"), "5", None).await.unwrap();
                assert_eq!(tx.get_prefix(p.as_str()).await?, seen);
                assert_eq!(tx.get(format!("{p}e")).await?, None);
            }
            let e = tx.get(format!("{p}e")).await?;
            Ok::<_, Error>((seen, e))
        })
        .await
        .unwrap();
    let (seen, e) = committed.value;
    let mut expected: BTreeMap<Vec<u8>, Vec<u8>> = [("b", "20"), ("c", "3"), ("d", "4")]
        .into_iter()
        .map(|(k, v)| (format!("{p}{k}").into_bytes(), v.as_bytes().to_vec()))
        .collect();
    // The first attempt conflicted on the insert; the second saw it.
    expected.insert(format!("{p}e").into_bytes(), b"5".to_vec());
    assert_eq!(committed.attempts, 2);
    assert_eq!(seen, expected);
    assert_eq!(e, Some(b"5".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_read_of_many_keys_reads_every_key_once_in_pages() {
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let prefix = unique("stm-pages");
    let n = 1100;
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let puts: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|i| etcd_client::TxnOp::put(format!("{prefix}/k/{i:05}"), i.to_string(), None))
            .collect();
        c.clone()
            .txn(etcd_client::Txn::new().and_then(puts))
            .await
            .unwrap();
    }
    let stm = Stm::new(c.clone());
    let key_prefix = &format!("{prefix}/k/");
    let committed = stm
        .run(|tx: StmTxn| async move { tx.get_prefix(key_prefix.as_str()).await })
        .await
        .unwrap();
    let seen = committed.value;
    assert_eq!(seen.len(), n);
    for (i, (k, v)) in seen.iter().enumerate() {
        assert_eq!(k, format!("{prefix}/k/{i:05}").as_bytes());
        assert_eq!(v, i.to_string().as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_range_is_refused_and_the_attempt_goes_on() {
    let etcd = etcd().await;
    let prefix = unique("stm-bad-range");
    let stm = Stm::new(client(&etcd).await);
    let key = &format!("{prefix}/x");
    let committed = stm
        .run(|tx: StmTxn| async move {
            assert!(matches!(
                tx.get_range("b", "a").await,
                Err(Error::InvalidArgument(_))
            ));
            assert!(matches!(
                tx.get_range("a", "a").await,
                Err(Error::InvalidArgument(_))
            ));
            assert!(matches!(
                tx.get_prefix("").await,
                Err(Error::InvalidArgument(_))
            ));
            assert!(matches!(
                tx.get_prefix(vec![0xff, 0xff]).await,
                Err(Error::InvalidArgument(_))
            ));
            tx.get(key.as_str()).await?;
            tx.put(key.as_str(), "written");
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(committed.attempts, 1);
    let got = client(&etcd).await.get(key.as_str(), None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_too_large_for_etcd_is_a_clear_error_with_nothing_written() {
    // At the levels that check reads every key read is compared; etcd allows 128 compares per
    // Txn by default. ReadCommitted compares nothing, so the same transaction commits.
    let etcd = etcd().await;
    let c = client(&etcd).await;
    let prefix = unique("stm-large");
    for range in [0..100, 100..200] {
        let puts: Vec<etcd_client::TxnOp> = range
            .map(|i| etcd_client::TxnOp::put(format!("{prefix}/k/{i:03}"), "v", None))
            .collect();
        c.clone()
            .txn(etcd_client::Txn::new().and_then(puts))
            .await
            .unwrap();
    }
    let (keys, marker) = (&format!("{prefix}/k/"), &format!("{prefix}/marker"));
    for isolation in [Isolation::SerializableSnapshot, Isolation::ReadCommitted] {
        let attempts = &AtomicU32::new(0);
        let done = Stm::new(c.clone())
            .with_isolation(isolation)
            .run(|tx: StmTxn| async move {
                attempts.fetch_add(1, Ordering::SeqCst);
                let seen = tx.get_prefix(keys.as_str()).await?;
                tx.put(marker.as_str(), seen.len().to_string());
                Ok::<_, Error>(())
            })
            .await;
        let stored = c.clone().get(marker.as_str(), None).await.unwrap();
        match isolation {
            Isolation::ReadCommitted => {
                done.unwrap();
                assert_eq!(stored.kvs()[0].value(), b"200");
            }
            _ => {
                assert!(
                    matches!(&done, Err(Error::InvalidArgument(m)) if m.contains("--max-txn-ops")),
                    "{done:?}"
                );
                assert!(stored.kvs().is_empty(), "something was written");
                assert_eq!(attempts.load(Ordering::SeqCst), 1, "it was retried");
            }
        }
    }
}

/// How a transaction first reads a key it did not prefetch.
#[derive(Debug, Clone, Copy)]
enum FirstRead {
    Get,
    ModRevision,
    Range,
}

/// Moves `amount` from `from` (holding `balances.0`) to `to` (holding `balances.1`) in one
/// plain Txn, as another client would: the total stays the same.
async fn move_in_one_txn(client: &Client, from: &str, to: &str, balances: (i64, i64), amount: i64) {
    let puts = [
        etcd_client::TxnOp::put(from, (balances.0 - amount).to_string(), None),
        etcd_client::TxnOp::put(to, (balances.1 + amount).to_string(), None),
    ];
    client
        .clone()
        .txn(etcd_client::Txn::new().and_then(puts))
        .await
        .unwrap();
}

/// Accounts a and b hold 100 each (200 in all). A read-only transaction has `a` prefetched;
/// between the prefetch and its reads another client moves 10 from a to b; it then reads b
/// (by `first`) and then a, and returns the sum. Also returns the revision of the prefetch.
async fn sum_after_a_transfer_past_the_prefetch(
    isolation: Isolation,
    first: FirstRead,
) -> (Committed<i64>, i64) {
    let etcd = etcd().await;
    let other = client(&etcd).await;
    let prefix = unique("stm-prefetch-past");
    let (a, b) = (format!("{prefix}/a"), format!("{prefix}/b"));
    other.clone().put(a.as_str(), "100", None).await.unwrap();
    let prefetched_at = other
        .clone()
        .put(b.as_str(), "100", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let (a, b, other, moved) = (&a, &b, &other, &AtomicBool::new(false));
    let done = Stm::new(client(&etcd).await)
        .with_isolation(isolation)
        .with_prefetch([a.as_str()])
        .run(|tx: StmTxn| async move {
            if !moved.swap(true, Ordering::SeqCst) {
                move_in_one_txn(other, a, b, (100, 100), 10).await;
            }
            let b_value = match first {
                FirstRead::Get => number(tx.get(b.as_str()).await?),
                FirstRead::ModRevision => {
                    tx.mod_revision(b.as_str()).await?;
                    number(tx.get(b.as_str()).await?)
                }
                FirstRead::Range => number(
                    tx.get_prefix(b.as_str())
                        .await?
                        .remove(b.as_bytes())
                        .map(|v| v.to_vec()),
                ),
            };
            let a_value = number(tx.get(a.as_str()).await?);
            Ok::<_, Error>(a_value + b_value)
        })
        .await
        .unwrap();
    (done, prefetched_at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_not_prefetched_are_read_at_the_prefetchs_revision_so_a_read_only_sum_is_conserved() {
    for isolation in [Isolation::SerializableSnapshot, Isolation::Serializable] {
        for first in [FirstRead::Get, FirstRead::ModRevision, FirstRead::Range] {
            let (done, prefetched_at) =
                sum_after_a_transfer_past_the_prefetch(isolation, first).await;
            assert_eq!(
                (done.value, done.attempts, done.revision),
                (200, 1, prefetched_at),
                "{isolation:?}, b read by {first:?} first: the sum, the attempts and the \
                 revision of the reads (the prefetch's)"
            );
        }
    }
    // RepeatableReads reads b as it is now and a as prefetched; the read-only commit's check
    // sees that a changed, and the second attempt reads both as the failed check fetched them.
    let (done, _) =
        sum_after_a_transfer_past_the_prefetch(Isolation::RepeatableReads, FirstRead::Get).await;
    assert_eq!((done.value, done.attempts), (200, 2), "RepeatableReads");
    // ReadCommitted checks nothing: it sees b after the transfer and a before it.
    let (done, _) =
        sum_after_a_transfer_past_the_prefetch(Isolation::ReadCommitted, FirstRead::Get).await;
    assert_eq!((done.value, done.attempts), (210, 1), "ReadCommitted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_after_a_conflict_reads_new_keys_at_the_revision_of_the_reads_it_reuses() {
    // Accounts a and b hold 100 each. The first attempt reads a, another client moves 10 from
    // a to b, and the attempt writes a note: its commit conflicts and fetches a anew. Before
    // the second attempt reads, the other client moves 10 more; the second attempt reads b (not
    // among the reused reads) and then a, writes nothing, and commits the sum it saw.
    for isolation in [Isolation::SerializableSnapshot, Isolation::Serializable] {
        let etcd = etcd().await;
        let other = client(&etcd).await;
        let prefix = unique("stm-retry-past");
        let (a, b, note) = (
            format!("{prefix}/a"),
            format!("{prefix}/b"),
            format!("{prefix}/note"),
        );
        other.clone().put(a.as_str(), "100", None).await.unwrap();
        other.clone().put(b.as_str(), "100", None).await.unwrap();
        let (a, b, note, other, attempt) = (&a, &b, &note, &other, &AtomicU32::new(0));
        let done = Stm::new(client(&etcd).await)
            .with_isolation(isolation)
            .run(|tx: StmTxn| async move {
                match attempt.fetch_add(1, Ordering::SeqCst) {
                    0 => {
                        let seen = number(tx.get(a.as_str()).await?);
                        move_in_one_txn(other, a, b, (100, 100), 10).await;
                        tx.put(note.as_str(), seen.to_string());
                        Ok::<_, Error>(None)
                    }
                    n => {
                        if n == 1 {
                            move_in_one_txn(other, a, b, (90, 110), 10).await;
                        }
                        let b_value = number(tx.get(b.as_str()).await?);
                        let a_value = number(tx.get(a.as_str()).await?);
                        Ok(Some(a_value + b_value))
                    }
                }
            })
            .await
            .unwrap();
        assert_eq!(
            (done.value, done.attempts),
            (Some(200), 2),
            "{isolation:?}: the second attempt's sum"
        );
    }
}

/// One audit: a transaction that sums every account and writes nothing (from its second
/// attempt on, if its first attempt writes).
#[derive(Debug, Clone)]
struct Audit {
    isolation: Isolation,
    /// The order every account is read in.
    order: Vec<usize>,
    /// The accounts prefetched (`with_prefetch`); maybe none.
    prefetch: Vec<usize>,
    /// If set, the first attempt reads only these accounts and writes a note: it commits
    /// unless one of them changed meanwhile; then the next attempt starts from the reads the
    /// failed commit fetched, and reads the other accounts itself.
    first_attempt_writes: Option<Vec<usize>>,
    /// Milliseconds paused before each read (writers move money meanwhile).
    pause_ms: u64,
}

fn audits(accounts: usize) -> impl Strategy<Value = Audit> {
    let all: Vec<usize> = (0..accounts).collect();
    (
        prop_oneof![
            Just(Isolation::SerializableSnapshot),
            Just(Isolation::Serializable)
        ],
        Just(all.clone()).prop_shuffle(),
        proptest::sample::subsequence(all.clone(), 0..=accounts),
        proptest::option::of(proptest::sample::subsequence(all, 1..accounts)),
        0u64..3,
    )
        .prop_map(
            |(isolation, order, prefetch, first_attempt_writes, pause_ms)| Audit {
                isolation,
                order,
                prefetch,
                first_attempt_writes,
                pause_ms,
            },
        )
}

/// What an audit committed: the sum its last attempt saw (`None` if its first attempt
/// committed its note), whether a writer committed after the revision it read at, while it
/// was reading, and its attempts.
struct Audited {
    sum: Option<i64>,
    overtaken: bool,
    attempts: u32,
}

async fn audit(client: &Client, prefix: &str, audit: &Audit, last_write: &AtomicI64) -> Audited {
    let key = |i: &usize| account(prefix, *i);
    let (note, attempt) = (&format!("{prefix}/note"), &AtomicU32::new(0));
    let pause = Duration::from_millis(audit.pause_ms);
    let done = Stm::new(client.clone())
        .with_isolation(audit.isolation)
        .with_prefetch(audit.prefetch.iter().map(key))
        .run(|tx: StmTxn| async move {
            let first = attempt.fetch_add(1, Ordering::SeqCst) == 0;
            let (reads, writes) = match &audit.first_attempt_writes {
                Some(some) if first => (some, true),
                _ => (&audit.order, false),
            };
            let mut sum = 0;
            for i in reads {
                tokio::time::sleep(pause).await;
                sum += number(tx.get(key(i)).await?);
            }
            let overtaken = last_write.load(Ordering::SeqCst) > tx.revision().unwrap();
            if writes {
                tx.put(note.as_str(), sum.to_string());
                return Ok::<_, Error>((None, overtaken));
            }
            Ok((Some(sum), overtaken))
        })
        .await
        .unwrap();
    Audited {
        sum: done.value.0,
        overtaken: done.value.1,
        attempts: done.attempts,
    }
}

/// Moves money between random accounts until `stop`: through an `Stm` at `isolation` (with
/// both accounts prefetched or not), or with plain Txns if `isolation` is `None` (read both,
/// then put both if neither changed). Publishes each commit's revision in `last_write`.
async fn keep_transferring(
    client: Client,
    prefix: String,
    accounts: usize,
    isolation: Option<Isolation>,
    seed: u64,
    stop: Arc<AtomicBool>,
    last_write: Arc<AtomicI64>,
) -> usize {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut moves = 0;
    while !stop.load(Ordering::SeqCst) {
        let from = rng.random_range(0..accounts);
        let to = (from + rng.random_range(1..accounts)) % accounts;
        let amount = rng.random_range(1..=10);
        let (from, to) = (account(&prefix, from), account(&prefix, to));
        let revision = match isolation {
            Some(isolation) => {
                let mut stm = Stm::new(client.clone())
                    .with_isolation(isolation)
                    .with_max_attempts(1000);
                if rng.random_bool(0.5) {
                    stm = stm.with_prefetch([from.as_str(), to.as_str()]);
                }
                let (from, to) = (&from, &to);
                stm.run(|tx: StmTxn| async move {
                    let have = number(tx.get(from.as_str()).await?);
                    let other = number(tx.get(to.as_str()).await?);
                    tx.put(from.as_str(), (have - amount).to_string());
                    tx.put(to.as_str(), (other + amount).to_string());
                    Ok::<_, Error>(())
                })
                .await
                .unwrap()
                .revision
            }
            None => loop {
                use etcd_client::{Compare, CompareOp, Txn, TxnOp};
                let mut c = client.clone();
                let read = c
                    .txn(Txn::new().and_then([
                        TxnOp::get(from.as_str(), None),
                        TxnOp::get(to.as_str(), None),
                    ]))
                    .await
                    .unwrap();
                let kvs: Vec<(i64, i64)> = read
                    .op_responses()
                    .into_iter()
                    .map(|r| match r {
                        etcd_client::TxnOpResponse::Get(g) => {
                            let kv = &g.kvs()[0];
                            (number(Some(kv.value().to_vec())), kv.mod_revision())
                        }
                        _ => unreachable!(),
                    })
                    .collect();
                let moved = c
                    .txn(
                        Txn::new()
                            .when([
                                Compare::mod_revision(from.as_str(), CompareOp::Equal, kvs[0].1),
                                Compare::mod_revision(to.as_str(), CompareOp::Equal, kvs[1].1),
                            ])
                            .and_then([
                                TxnOp::put(from.as_str(), (kvs[0].0 - amount).to_string(), None),
                                TxnOp::put(to.as_str(), (kvs[1].0 + amount).to_string(), None),
                            ]),
                    )
                    .await
                    .unwrap();
                if moved.succeeded() {
                    break moved.header().unwrap().revision();
                }
            },
        };
        last_write.fetch_max(revision, Ordering::SeqCst);
        moves += 1;
    }
    moves
}

/// A conservation audit: writers keep moving money between 6 accounts (two through `Stm`, one
/// with plain Txns) while read-only transactions sum every account, in a random order, with a
/// random subset prefetched, at SerializableSnapshot and Serializable — some after a first
/// attempt that wrote and conflicted. Every one must see exactly the conserved total.
#[test]
fn read_only_audits_see_the_conserved_total_whatever_they_prefetch_and_in_whatever_order() {
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    const ACCOUNTS: usize = 6;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let etcd = rt.block_on(etcd());
    let prefix = unique("stm-audit");
    let (stop, last_write) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicI64::new(0)),
    );
    let (auditor, writers) = rt.block_on(async {
        let auditor = client(&etcd).await;
        open_accounts(&auditor, &prefix, ACCOUNTS).await;
        let mut writers = Vec::new();
        for (seed, isolation) in [
            Some(Isolation::SerializableSnapshot),
            Some(Isolation::Serializable),
            None,
        ]
        .into_iter()
        .enumerate()
        {
            writers.push(tokio::spawn(keep_transferring(
                client(&etcd).await,
                prefix.clone(),
                ACCOUNTS,
                isolation,
                seed as u64,
                Arc::clone(&stop),
                Arc::clone(&last_write),
            )));
        }
        (auditor, writers)
    });
    let total = START * ACCOUNTS as i64;
    let counts = std::cell::Cell::new((0usize, 0usize, 0usize)); // read-only, overtaken, after a conflict
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: 24,
            failure_persistence: None,
            max_shrink_iters: 32,
            ..Config::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let result = runner.run(&proptest::collection::vec(audits(ACCOUNTS), 4), |case| {
        for a in &case {
            let seen = rt.block_on(audit(&auditor, &prefix, a, &last_write));
            let Some(sum) = seen.sum else { continue };
            prop_assert_eq!(sum, total, "{:?} saw a total that never was", a);
            let (r, o, c) = counts.get();
            counts.set((
                r + 1,
                o + usize::from(seen.overtaken),
                c + usize::from(seen.attempts > 1),
            ));
        }
        Ok(())
    });
    stop.store(true, Ordering::SeqCst);
    let moves: usize = rt.block_on(async {
        let mut moves = 0;
        for w in writers {
            moves += w.await.unwrap();
        }
        moves
    });
    let (read_only, overtaken, after_a_conflict) = counts.get();
    eprintln!(
        "audit: {read_only} read-only audits ({overtaken} overtaken by a writer while reading, \
         {after_a_conflict} after a conflict), {moves} transfers"
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    let balances = rt.block_on(read_all(&auditor, &format!("{prefix}/acct/")));
    let sum: i64 = balances.values().map(|v| v.parse::<i64>().unwrap()).sum();
    assert_eq!(sum, total, "the writers did not conserve the total");
    assert!(
        overtaken >= read_only / 4 && after_a_conflict > 0,
        "too little concurrency to test anything: {overtaken} of {read_only} audits overtaken, \
         {after_a_conflict} after a conflict"
    );
}
