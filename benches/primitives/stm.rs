//! `stm-transfer`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use etcd_client::{Client, Txn, TxnOp};

use crate::report::*;
use crate::Args;

/// As the peer's `stm-transfer`: `--accounts` accounts of 1000; N clients run transfers of
/// 1..10 units between two distinct random accounts (chosen once per transaction, kept across
/// its retries), two reads then two writes, SerializableSnapshot; a transfer from an account
/// holding too little is skipped but still commits; M commits in total. Latency = one
/// committed transaction with its retries.
pub(crate) async fn stm_transfer(
    a: &Args,
    prefix: &str,
    clients: &[Client],
) -> Result<Run, Box<dyn std::error::Error>> {
    use etcd_coord::{Stm, StmTxn};
    use rand::{Rng, SeedableRng};

    let accounts = a.accounts;
    if accounts < 2 {
        return Err("--accounts must be >= 2".into());
    }
    let acct = |i: usize| format!("{prefix}/acct/{i:03}");
    for start in (0..accounts).step_by(128) {
        let puts: Vec<TxnOp> = (start..accounts.min(start + 128))
            .map(|j| TxnOp::put(acct(j), "1000", None))
            .collect();
        clients[0].clone().txn(Txn::new().and_then(puts)).await?;
    }
    let remaining = Arc::new(AtomicI64::new(a.ops as i64));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for g in 0..a.clients {
        let stm = Stm::new(clients[g % clients.len()].clone()).with_max_attempts(u32::MAX);
        let (remaining, prefix) = (Arc::clone(&remaining), prefix.to_owned());
        tasks.push(tokio::spawn(async move {
            let acct = |i: usize| format!("{prefix}/acct/{i:03}");
            let mut rng = rand::rngs::StdRng::from_os_rng();
            let (mut lats, mut attempts, mut skipped) = (Vec::new(), 0u64, 0u64);
            let mut deltas = vec![0i64; accounts];
            while remaining.fetch_sub(1, Ordering::SeqCst) > 0 {
                let from = rng.random_range(0..accounts);
                let to = (from + rng.random_range(1..accounts)) % accounts;
                let amount: i64 = rng.random_range(1..=10);
                let (from_key, to_key) = (&acct(from), &acct(to));
                let t = Instant::now();
                let done = stm
                    .run(|tx: StmTxn| async move {
                        let number = |v: Option<Vec<u8>>| -> Result<i64, etcd_coord::Error> {
                            v.and_then(|v| String::from_utf8(v).ok()?.parse().ok())
                                .ok_or_else(|| {
                                    etcd_coord::Error::InvalidArgument("a bad balance".into())
                                })
                        };
                        let have = number(tx.get(from_key.as_str()).await?)?;
                        let other = number(tx.get(to_key.as_str()).await?)?;
                        if have < amount {
                            return Ok(false);
                        }
                        tx.put(from_key.as_str(), (have - amount).to_string());
                        tx.put(to_key.as_str(), (other + amount).to_string());
                        Ok::<_, etcd_coord::Error>(true)
                    })
                    .await
                    .map_err(boxed)?;
                lats.push(t.elapsed());
                attempts += u64::from(done.attempts);
                if done.value {
                    deltas[from] -= amount;
                    deltas[to] += amount;
                } else {
                    skipped += 1;
                }
            }
            Ok::<_, etcd_client::Error>((lats, attempts, skipped, deltas))
        }));
    }
    let (mut lats, mut attempts, mut skipped) = (Vec::new(), 0u64, 0u64);
    let mut expected = vec![1000i64; accounts];
    for t in tasks {
        let (l, at, sk, deltas) = t.await??;
        lats.extend(l);
        attempts += at;
        skipped += sk;
        for (e, d) in expected.iter_mut().zip(deltas) {
            *e += d;
        }
    }
    let total = t0.elapsed();
    let balances: Vec<i64> = clients[0]
        .clone()
        .get(
            format!("{prefix}/acct/"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await?
        .kvs()
        .iter()
        .map(|kv| {
            kv.value_str()
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(i64::MIN)
        })
        .collect();
    let conserved = balances.iter().sum::<i64>() == 1000 * accounts as i64;
    let history_ok = balances == expected;
    let _ = clients[0]
        .clone()
        .delete(
            format!("{prefix}/"),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await;
    let commits = lats.len() as u64;
    Ok(Run {
        lats,
        hands: Vec::new(),
        total,
        extra: vec![
            ("accounts", Value::Int(accounts as u64)),
            ("attempts", Value::Int(attempts)),
            (
                "retries_per_commit",
                Value::Num(round3((attempts - commits) as f64 / commits.max(1) as f64)),
            ),
            ("skipped", Value::Int(skipped)),
            ("conserved", Value::Bool(conserved)),
            ("history_ok", Value::Bool(history_ok)),
        ],
    })
}
