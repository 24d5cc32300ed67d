//! `Stm` against real etcd: conservation under concurrent transfers (also through dropped
//! answers and resets), each isolation level's checks, bounded retries, compaction.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use etcd_client::{Client, GetOptions};
use etcd_coord::{Committed, Error, Isolation, Stm, StmTxn};
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
    let etcd = etcd().await;
    let mut other = client(&etcd).await;
    let prefix = unique("stm-compacted");
    let (a, b) = (format!("{prefix}/a"), format!("{prefix}/b"));
    other.put(a.as_str(), "1", None).await.unwrap();
    other.put(b.as_str(), "2", None).await.unwrap();
    let (first, a, b, prefix, other, etcd) =
        (&AtomicBool::new(true), &a, &b, &prefix, &other, &etcd);
    let done = Stm::new(client(etcd).await)
        .run(|tx: StmTxn| async move {
            let x = number(tx.get(a.as_str()).await?);
            if first.swap(false, Ordering::SeqCst) {
                // Move the store on and compact past this attempt's snapshot.
                other.clone().put(format!("{prefix}/z"), "", None).await?;
                etcd.compact().await.unwrap();
            }
            let y = number(tx.get(b.as_str()).await?);
            tx.put(format!("{prefix}/sum"), (x + y).to_string());
            Ok::<_, Error>(x + y)
        })
        .await
        .unwrap();
    assert_eq!(done.value, 3);
    assert_eq!(done.attempts, 2);
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
