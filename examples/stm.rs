//! Bank transfers with software transactional memory: four tellers move money between five
//! accounts at once; every transfer reads two balances and writes both, atomically, and runs
//! again when another teller got there first. The total never changes — checked at the end
//! by reading every account, and by one transaction that reads them all with a prefix read.
//!
//! `cargo run --example stm`

#[path = "support/mod.rs"]
#[allow(dead_code)]
mod support;

use etcd_coord::{Error, Stm, StmTxn};

const ACCOUNTS: usize = 5;

fn account(i: usize) -> String {
    format!("examples/bank/{i}")
}

fn balance(v: Option<Vec<u8>>) -> Result<i64, Error> {
    v.and_then(|v| String::from_utf8(v).ok()?.parse().ok())
        .ok_or_else(|| Error::InvalidArgument("not a balance".into()))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let etcd = support::etcd().await;
    let mut client = etcd.client().await.expect("client");
    for i in 0..ACCOUNTS {
        client.put(account(i), "100", None).await?;
    }
    let mut tellers = Vec::new();
    for teller in 0..4 {
        let stm = Stm::new(etcd.client().await.expect("client"));
        tellers.push(tokio::spawn(async move {
            let (mut moved, mut retries) = (0, 0);
            for n in 0..25 {
                let (from, to) = (
                    &account((teller * 7 + n * 3) % ACCOUNTS),
                    &account((teller + n * n + 1) % ACCOUNTS),
                );
                if from == to {
                    continue;
                }
                let done = stm
                    .run(|tx: StmTxn| async move {
                        let (a, b) = (
                            balance(tx.get(from.as_str()).await?)?,
                            balance(tx.get(to.as_str()).await?)?,
                        );
                        if a < 7 {
                            return Ok::<_, Error>(false);
                        }
                        tx.put(from.as_str(), (a - 7).to_string());
                        tx.put(to.as_str(), (b + 7).to_string());
                        Ok(true)
                    })
                    .await?;
                moved += usize::from(done.value);
                retries += done.attempts - 1;
            }
            println!("teller {teller}: {moved} transfers, {retries} retries after conflicts");
            Ok::<_, Error>(())
        }));
    }
    for t in tellers {
        t.await.expect("a teller")?;
    }
    let mut total = 0;
    for i in 0..ACCOUNTS {
        let b = balance(
            client
                .get(account(i), None)
                .await?
                .kvs()
                .first()
                .map(|kv| kv.value().to_vec()),
        )?;
        println!("account {i}: {b}");
        total += b;
    }
    println!("total: {total} (was {})", 100 * ACCOUNTS);
    assert_eq!(total, 100 * ACCOUNTS as i64);
    // The same audit as one transaction: a prefix read sees every account at one snapshot.
    let audit = Stm::new(etcd.client().await.expect("client"))
        .run(|tx: StmTxn| async move {
            let accounts = tx.get_prefix("examples/bank/").await?;
            accounts
                .into_values()
                .map(|v| balance(Some(v)))
                .sum::<Result<i64, Error>>()
        })
        .await?;
    println!(
        "audited in one snapshot (revision {}): {}",
        audit.revision, audit.value
    );
    assert_eq!(audit.value, total);
    Ok(())
}
