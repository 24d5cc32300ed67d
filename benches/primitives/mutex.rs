//! The peer's basic modes: txn-floor, mutex-uncontended, mutex-contended, election-handoff,
//! session-create.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use etcd_coord::{
    Election, LeasedSession, Mutex, MutexGuard, RwLock, Semaphore, SemaphorePermit, SessionOptions,
};

use crate::discovery::{discovery_propagation, discovery_sync};
use crate::report::*;
use crate::scale::{guards_scale, waiters_scale};
use crate::stm::stm_transfer;
use crate::Args;

pub(crate) async fn run(a: &Args, clients: &[Client]) -> Result<Run, Box<dyn std::error::Error>> {
    let client_for = |i: usize| clients[i % clients.len()].clone();
    let prefix = format!("bench/{}/{:x}", a.mode, rand::random::<u32>());
    let opts = SessionOptions::new().with_ttl(Duration::from_secs(a.ttl));
    let n = a.clients;
    let needs_sessions = matches!(
        a.mode.as_str(),
        "mutex-uncontended"
            | "mutex-contended"
            | "election-handoff"
            | "semaphore-contended"
            | "rwlock-contended"
            | "waiters-scale"
    );
    // Sessions on one connection share its watch stream (`LeasedSession::sibling`), as the Go
    // peer's sessions on one client share theirs.
    let mut sessions: Vec<LeasedSession> = Vec::new();
    if needs_sessions {
        for i in 0..n {
            let session = match i.checked_sub(clients.len()) {
                Some(first) => {
                    sessions[first % clients.len()]
                        .sibling(opts.clone())
                        .await?
                }
                None => LeasedSession::new(client_for(i), opts.clone()).await?,
            };
            sessions.push(session);
        }
    }
    let remaining = Arc::new(AtomicI64::new(a.ops as i64));
    let claim = {
        let remaining = Arc::clone(&remaining);
        move || remaining.fetch_sub(1, Ordering::SeqCst) > 0
    };
    let clock = Arc::new(HandoffClock::new());
    let mut extra = Vec::new();
    crate::profile::reset();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    match a.mode.as_str() {
        "txn-floor" => {
            for i in 0..n {
                let mut c = client_for(i);
                let (k, prefix, fresh) = (split(a.ops, n, i), prefix.clone(), a.fresh);
                tasks.push(tokio::spawn(async move {
                    let mut lats = Vec::with_capacity(k);
                    for j in 0..k {
                        let key = if fresh {
                            format!("{prefix}/{i}/{j}")
                        } else {
                            format!("{prefix}/{i}")
                        };
                        let t = Instant::now();
                        c.txn(
                            Txn::new()
                                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                                .and_then([TxnOp::put(key.as_str(), "", None)])
                                .or_else([TxnOp::get(key.as_str(), None)]),
                        )
                        .await?;
                        lats.push(t.elapsed());
                    }
                    Ok::<_, etcd_client::Error>((lats, Vec::new()))
                }));
            }
        }
        "mutex-uncontended" => {
            for (i, s) in sessions.iter().enumerate() {
                let m = Mutex::new(s, format!("{prefix}/{i}"));
                let k = split(a.ops, n, i);
                tasks.push(tokio::spawn(async move {
                    let mut lats = Vec::with_capacity(k);
                    for _ in 0..k {
                        let t = Instant::now();
                        let g = m.lock().await.map_err(boxed)?;
                        g.release().await.map_err(boxed)?;
                        lats.push(t.elapsed());
                    }
                    Ok((lats, Vec::new()))
                }));
            }
        }
        "mutex-contended" | "election-handoff" | "semaphore-contended" | "rwlock-contended" => {
            let mode = a.mode.clone();
            let permits = if mode == "semaphore-contended" {
                a.permits.max(1)
            } else {
                1
            };
            for (i, s) in sessions.iter().enumerate() {
                let m = Mutex::new(s, format!("{prefix}/lock"));
                let e = Election::new(s, format!("{prefix}/election"));
                let sem = Semaphore::new(s, format!("{prefix}/semaphore"), permits);
                let rw = RwLock::new(s, format!("{prefix}/rwlock"));
                let (claim, clock, mode) = (claim.clone(), Arc::clone(&clock), mode.clone());
                let (requeue, profiling) = (a.requeue, a.profile);
                tasks.push(tokio::spawn(async move {
                    let (mut lats, mut hands) = (Vec::new(), Vec::new());
                    // With --requeue the guard held is taken into the next turn.
                    let mut kept: Option<Guard> = None;
                    while claim() {
                        let t = Instant::now();
                        let held = match kept.take() {
                            Some(held) => held.requeue(i).await.map_err(boxed)?,
                            None => match mode.as_str() {
                                "election-handoff" => Guard::Leader(
                                    e.campaign(format!("candidate-{i}")).await.map_err(boxed)?,
                                ),
                                "semaphore-contended" => {
                                    Guard::Permit(sem.acquire().await.map_err(boxed)?)
                                }
                                "rwlock-contended" => {
                                    Guard::Write(rw.write().await.map_err(boxed)?)
                                }
                                _ => Guard::Lock(m.lock().await.map_err(boxed)?),
                            },
                        };
                        let at = Instant::now();
                        lats.push(at - t);
                        if profiling {
                            crate::profile::waited(t, at, held.key());
                        }
                        // With several permits a release hands off to a waiter only while all
                        // are held: the clock then measures release → next acquisition too.
                        hands.extend(clock.acquired(at));
                        clock.releasing();
                        if requeue {
                            kept = Some(held);
                        } else {
                            held.release().await.map_err(boxed)?;
                        }
                    }
                    if let Some(held) = kept {
                        held.release().await.map_err(boxed)?;
                    }
                    Ok((lats, hands))
                }));
            }
        }
        "session-create" => {
            for i in 0..n {
                let (c, claim, opts) = (client_for(i), claim.clone(), opts.clone());
                tasks.push(tokio::spawn(async move {
                    let mut lats = Vec::new();
                    while claim() {
                        let t = Instant::now();
                        let s = LeasedSession::new(c.clone(), opts.clone())
                            .await
                            .map_err(boxed)?;
                        s.close().await.map_err(boxed)?;
                        lats.push(t.elapsed());
                    }
                    Ok((lats, Vec::new()))
                }));
            }
        }
        "relay-floor" => return crate::floor::relay_floor(a, &prefix, clients).await,
        "waiters-scale" => return waiters_scale(a, &prefix, sessions, client_for(0)).await,
        "guards-scale" => return guards_scale(a, &prefix, client_for(0), opts).await,
        "discovery-propagation" => return discovery_propagation(a, &prefix, clients).await,
        "discovery-sync" => return discovery_sync(a, &prefix, client_for(0)).await,
        "stm-transfer" => return stm_transfer(a, &prefix, clients).await,
        "queue" => return crate::queue::queue(a, &prefix, clients).await,
        other => return Err(format!("unknown mode {other}").into()),
    }
    let (mut lats, mut hands) = (Vec::new(), Vec::new());
    for t in tasks {
        let (l, h) = t.await??;
        lats.extend(l);
        hands.extend(h);
    }
    let total = t0.elapsed();
    for s in sessions {
        let _ = s.close().await;
    }
    if a.mode == "txn-floor" {
        let _ = client_for(0)
            .delete(
                prefix.as_str(),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await;
    }
    if a.profile {
        extra.extend(crate::profile::phases());
    }
    if a.requeue {
        extra.push(("requeue", Value::Bool(true)));
    }
    extra.shrink_to_fit();
    Ok(Run {
        lats,
        hands,
        total,
        extra,
    })
}

/// Whatever a contended mode holds.
enum Guard {
    Lock(MutexGuard),
    Leader(etcd_coord::Leadership),
    Permit(SemaphorePermit),
    Write(etcd_coord::RwLockWriteGuard),
}

impl Guard {
    fn key(&self) -> &str {
        match self {
            Guard::Lock(g) => g.key(),
            Guard::Leader(g) => g.key(),
            Guard::Permit(g) => g.key(),
            Guard::Write(g) => g.key(),
        }
    }

    /// Releases and takes the next turn in one write (candidate `i` campaigns again as itself).
    async fn requeue(self, i: usize) -> Result<Guard, etcd_coord::Error> {
        Ok(match self {
            Guard::Lock(g) => Guard::Lock(g.requeue().await?),
            Guard::Leader(g) => Guard::Leader(g.requeue(format!("candidate-{i}")).await?),
            Guard::Permit(g) => Guard::Permit(g.requeue().await?),
            Guard::Write(g) => Guard::Write(g.requeue().await?),
        })
    }

    async fn release(self) -> Result<(), etcd_coord::Error> {
        match self {
            Guard::Lock(g) => g.release().await,
            Guard::Leader(g) => g.release().await,
            Guard::Permit(g) => g.release().await,
            Guard::Write(g) => g.release().await,
        }
    }
}
