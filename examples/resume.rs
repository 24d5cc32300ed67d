//! A process that dies holding a lock, and its restart taking the lock back — same lease,
//! same fencing token — before anyone else can get it.
//!
//! `cargo run --example resume`
//!
//! The program runs itself twice: the first life takes the lock, saves its lease id, key and
//! fencing token to a file, and is killed with SIGKILL; the second life resumes the lease and
//! the lock from that file. A rival process waits for the lock all along.

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use etcd_coord::{LeasedSession, Mutex, SessionOptions};

const LOCK: &str = "examples/nightly-report";

#[tokio::main]
async fn main() -> Result<(), etcd_coord::Error> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, mode, endpoint, state] = &args[..] {
        if mode == "--first-life" {
            return first_life(endpoint, state).await;
        }
    }
    let etcd = support::etcd().await;
    let start = Instant::now();
    let dir = std::env::temp_dir().join(format!("etcd-coord-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a state directory");
    let state = dir.join("lock-state");

    let mut first = std::process::Command::new(std::env::current_exe().expect("this program"))
        .args([
            "--first-life",
            &etcd.endpoints()[0],
            state.to_str().unwrap(),
        ])
        .spawn()
        .expect("the first life");
    while !state.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rival = support::session(&etcd).await;
    let waiting = tokio::spawn(async move {
        let guard = Mutex::new(&rival, LOCK).lock().await?;
        println!(
            "[{:>4} ms] rival: got the lock, fencing token {}",
            start.elapsed().as_millis(),
            guard.fencing_token()
        );
        guard.release().await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.kill().expect("SIGKILL"); // no release, no revoke: the lease lives on for its TTL
    let _ = first.wait();
    println!("[{:>4} ms] first life killed", start.elapsed().as_millis());

    let saved = std::fs::read_to_string(&state).expect("the saved state");
    let [lease_id, key, token]: [&str; 3] = saved
        .split_whitespace()
        .collect::<Vec<_>>()
        .try_into()
        .expect("lease id, key, token");
    let (lease_id, token) = (lease_id.parse().unwrap(), token.parse().unwrap());
    let session = LeasedSession::resume(
        etcd.client().await.expect("client"),
        lease_id,
        SessionOptions::new(),
    )
    .await?;
    let guard = Mutex::new(&session, LOCK).resume(key, token).await?;
    println!(
        "[{:>4} ms] second life: resumed lease {lease_id:x} and the lock, fencing token {} (saved: {token})",
        start.elapsed().as_millis(),
        guard.fencing_token()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "[{:>4} ms] second life: done with the report, releasing",
        start.elapsed().as_millis()
    );
    guard.release().await?;
    waiting.await.expect("the rival")?;
    session.close().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Takes the lock, saves what a restart needs, and works until killed.
async fn first_life(endpoint: &str, state: &str) -> Result<(), etcd_coord::Error> {
    let client =
        etcd_client::Client::connect([endpoint], Some(etcd_coord::recommended_connect_options()))
            .await?;
    let session = LeasedSession::new(client, SessionOptions::new()).await?;
    let guard = Mutex::new(&session, LOCK).lock().await?;
    println!(
        "first life: holding the lock, lease {:x}, fencing token {}",
        session.lease_id(),
        guard.fencing_token()
    );
    let saved = format!(
        "{} {} {}",
        session.lease_id(),
        guard.key(),
        guard.fencing_token()
    );
    std::fs::write(format!("{state}.tmp"), saved).expect("the state file");
    std::fs::rename(format!("{state}.tmp"), state).expect("the state file");
    std::future::pending::<()>().await;
    Ok(())
}
