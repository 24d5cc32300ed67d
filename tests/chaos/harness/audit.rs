//! What the harness watches from the server's side while clients run, and reads back
//! afterwards: leases that ended, keys nobody holds, what the protected resource accepted,
//! election observers, and what is left once everything stopped.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, DeleteOptions, GetOptions};
use etcd_coord::{Election, LeaderEvent, LeasedSession};
use etcd_coord_testkit::checker::{
    check_accepted_writes, AcceptedWrite, KeyAudit, Property, SeenKey, Violation,
};
use futures::StreamExt;

use super::client::{session_options, Resume};
use super::report::Shared;
use super::{connect, Broken, Primitive, TTL};

/// Records leases the server no longer has (checker property d), every 200 ms.
pub async fn lease_observer(admin: Client, sh: Arc<Shared>) {
    let mut gone = HashSet::new();
    while !sh.stopped.is_cancelled() {
        let leases: Vec<i64> = sh.leases.lock().unwrap().clone();
        for lease in leases {
            if gone.contains(&lease) {
                continue;
            }
            if let Ok(r) = admin.clone().lease_time_to_live(lease, None).await {
                if r.ttl() == -1 {
                    gone.insert(lease);
                    sh.history.lease_gone(lease);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How long a key may stay without a holder (after the heal): a dead session's lease expires
/// within the TTL; 3 s for releases retried after the faults, on 2 busy cores.
pub const UNHELD_BOUND: Duration = Duration::from_secs(TTL.as_secs() + 3);

/// Property (i): every 500 ms, reads the keys of the run and judges them with the checker's
/// [`KeyAudit`] against the history so far.
pub async fn key_auditor(admin: Client, sh: Arc<Shared>) -> Vec<Violation> {
    // A double barrier's participant may also have put the latch.
    let per_waiter = if sh.primitive == Primitive::DoubleBarrier {
        2
    } else {
        1
    };
    let mut audit = KeyAudit::new(UNHELD_BOUND, per_waiter);
    let mut found = Vec::new();
    let prefix = format!("{}/", sh.name);
    while !sh.stopped.is_cancelled() {
        if let Some(healed) = sh.healed.get() {
            audit.healed(*healed);
        }
        let opts = GetOptions::new().with_prefix().with_keys_only();
        if let Ok(resp) = admin.clone().get(prefix.as_str(), Some(opts)).await {
            let now = Instant::now();
            let keys: Vec<SeenKey> = resp
                .kvs()
                .iter()
                .filter(|kv| {
                    sh.primitive != Primitive::Queue
                        || !super::queue::unowned_by_design(kv.key_str().unwrap_or("?"))
                })
                .map(|kv| SeenKey {
                    key: kv.key_str().unwrap_or("?").to_owned(),
                    create_revision: kv.create_revision(),
                    lease: kv.lease(),
                })
                .collect();
            found.extend(audit.observe(now, &keys, &sh.history.events()));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    found
}

/// Property (c) end to end: reads back every write etcd accepted under the protected
/// resource's prefix (each write has a key of its own: value the token, key
/// `<client>-<tag>-<n>`), checks them against the fencing tokens and the writes the clients
/// saw succeed, and deletes them. Returns the violations and how many writes etcd holds.
pub async fn check_resource(admin: &Client, sh: &Shared) -> (Vec<Violation>, usize) {
    let prefix = format!("{}-resource/", sh.name);
    let resp = retried("the protected resource can be read", || {
        let (mut admin, prefix) = (admin.clone(), prefix.clone());
        async move {
            admin
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
        }
    })
    .await;
    let accepted: Vec<AcceptedWrite> = resp
        .kvs()
        .iter()
        .map(|kv| {
            let key = kv.key_str().expect("a key").to_owned();
            let client = key[prefix.len()..]
                .split('-')
                .next()
                .and_then(|c| c.parse().ok())
                .expect("the writer's number");
            AcceptedWrite {
                key,
                revision: kv.mod_revision(),
                token: kv
                    .value_str()
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .expect("a token"),
                client,
            }
        })
        .collect();
    let reported = sh.written.lock().unwrap().clone();
    let mut violations = check_accepted_writes(&accepted, &reported);
    // A late write — through the fence of a hold that had ended, sent at the next hold — must
    // be refused, whatever its writer saw of it (it may have given up on the answer, or been
    // cut short by its own loss): judged from etcd alone.
    violations.extend(accepted.iter().filter(|w| w.key.ends_with(super::client::LATE)).map(
        |w| Violation {
            property: Property::StaleWrite,
            detail: format!(
                "etcd accepted client {}'s late write {} through the fence of an ended hold (token {})",
                w.client, w.key, w.token
            ),
        },
    ));
    retried("the protected resource is cleared", || {
        let (mut admin, prefix) = (admin.clone(), prefix.clone());
        async move {
            admin
                .delete(prefix, Some(DeleteOptions::new().with_prefix()))
                .await
        }
    })
    .await;
    (violations, accepted.len())
}

/// The answer of the checker's request `send`, sent again (up to 10 times, 300 ms apart) on
/// an error: the admin client's connection to a member restarted during the run may still
/// report its failed reconnection ("tcp connect error") once, which is not what the run
/// examines. Panics with `what` and the last error if it keeps failing.
pub async fn retried<T, F, Fut>(what: &str, mut send: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut last = None;
    for _ in 0..10 {
        match send().await {
            Ok(answer) => return answer,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!("{what}: {last:?}");
}

/// Observer `j` of the run's election (`Election::observe`, through path `j` with a session
/// of its own, restarted after an error): every event it reports is recorded for checker
/// property (j). Deliberately broken ([`Broken::DropsEvents`]): it drops every third event.
/// Runs until the run's observers stop (`stop`); returns the session to close.
pub async fn observer(
    j: usize,
    sh: Arc<Shared>,
    broken: Option<Broken>,
    stop: tokio_util::sync::CancellationToken,
) {
    let client = connect(sh.proxies[j].endpoint(), sh.secure.as_ref()).await;
    let session = loop {
        tokio::select! {
            s = LeasedSession::new(client.clone(), session_options()) => match s {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            },
            _ = stop.cancelled() => return,
        }
    };
    let election = Election::new(&session, sh.name.as_str());
    let mut n = 0u64;
    while !stop.is_cancelled() {
        let mut events = Box::pin(election.observe());
        let mut fresh = true;
        loop {
            let event = tokio::select! {
                e = events.next() => e,
                _ = stop.cancelled() => break,
            };
            let leader = match event {
                Some(Ok(LeaderEvent::Leader(info))) => Some(info.fencing_token()),
                Some(Ok(_)) => None,
                Some(Err(e)) => {
                    tracing::debug!(observer = j, error = %e, "observing failed; again");
                    break;
                }
                None => break,
            };
            n += 1;
            if broken == Some(Broken::DropsEvents) && n.is_multiple_of(3) {
                continue; // deliberately broken
            }
            sh.history.observed(j, leader, std::mem::take(&mut fresh));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = session.close().await;
}

/// Once every candidate resigned (or its lease ended: TTL + 3 s): every observer's last report
/// must be "nobody leads" (property j).
pub async fn observers_see_nobody_lead(sh: &Shared, observers: usize) -> Vec<Violation> {
    let last = |j: usize| {
        sh.history.events().iter().rev().find_map(|e| match e {
            etcd_coord_testkit::checker::Event::Observed {
                observer, leader, ..
            } if *observer == j => Some(*leader),
            _ => None,
        })
    };
    let nobody = |j| matches!(last(j), Some(None));
    let all = || (0..observers).all(nobody);
    let limit = TTL + Duration::from_secs(3);
    if crate::common::eventually(limit, || async { all() }).await {
        return Vec::new();
    }
    (0..observers)
        .filter(|j| !nobody(*j))
        .map(|j| Violation {
            property: Property::Observed,
            detail: format!(
                "observer {j} still reports {:?} {limit:?} after every candidate stopped",
                last(j)
            ),
        })
        .collect()
}

/// After the run's clients stopped, nothing of the test may remain once every lease could
/// have expired (TTL + 3 s): no key under the run's name, no lease in the cluster (a lease
/// still there is refreshed by a session nobody closed). Panics saying what remains.
pub async fn nothing_remains(admin: &Client, sh: &Shared, seed: u64) {
    let prefix = format!("{}/", sh.name);
    let limit = TTL + Duration::from_secs(3);
    let clean = crate::common::eventually(limit, || {
        let (admin, prefix) = (admin.clone(), prefix.clone());
        async move {
            let keys = admin
                .clone()
                .get(
                    prefix.as_str(),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await
                .map(|r| r.count())
                .unwrap_or(1);
            let leases = admin
                .clone()
                .leases()
                .await
                .map(|r| r.leases().len())
                .unwrap_or(1);
            keys == 0 && leases == 0
        }
    })
    .await;
    if clean {
        return;
    }
    // Say what remains, so that a rare leak can be told apart from a slow expiry.
    let keys: Vec<String> = admin
        .clone()
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .map(|r| {
            r.kvs()
                .iter()
                .map(|kv| format!("{} (lease {:x})", kv.key_str().unwrap_or("?"), kv.lease()))
                .collect()
        })
        .unwrap_or_default();
    let mut alive = Vec::new();
    if let Ok(r) = admin.clone().leases().await {
        for l in r.leases() {
            if let Ok(r) = admin.clone().lease_time_to_live(l.id(), None).await {
                alive.push(format!(
                    "{:x} (ttl {} of {})",
                    l.id(),
                    r.ttl(),
                    r.granted_ttl()
                ));
            }
        }
    }
    panic!("seed {seed}: keys or leases remain {limit:?} after the clients stopped: keys {keys:?}, leases {alive:?}");
}

/// The lock a killed holder of `token` left under `name`, if its key is still there.
pub async fn held_lock(admin: &Client, name: &str, token: i64, delay: Duration) -> Option<Resume> {
    let resp = admin
        .clone()
        .get(format!("{name}/"), Some(GetOptions::new().with_prefix()))
        .await
        .ok()?;
    let kv = resp.kvs().iter().find(|kv| kv.create_revision() == token)?;
    Some(Resume {
        lease: kv.lease(),
        key: kv.key_str().ok()?.to_owned(),
        token,
        delay,
    })
}

/// The bound within which a selector's `leaders()` shows a leader at least as new as the one
/// that led this long before the end (it conflates changes, but must catch up).
pub const LEADERS_LAG: Duration = Duration::from_secs(2);

/// Each selector's `leaders()` must end the window showing a leader no older than the newest
/// one acquired [`LEADERS_LAG`] before `end` — or nobody, if it said so after that one was
/// acquired (property j).
pub fn selectors_follow(sh: &Shared, end: Instant) -> Vec<Violation> {
    use etcd_coord_testkit::checker::Event;
    let events = sh.history.events();
    let newest = events
        .iter()
        .filter_map(|e| match e {
            Event::Acquired { token, at, .. } if *at + LEADERS_LAG <= end => Some((*token, *at)),
            _ => None,
        })
        .max();
    let Some((newest, acquired)) = newest else {
        return Vec::new();
    };
    let mut violations = Vec::new();
    for client in 0..super::CLIENTS {
        let observer = super::report::selector_observer(client);
        let last = events.iter().rev().find_map(|e| match e {
            Event::Observed {
                observer: o,
                leader,
                at,
                ..
            } if *o == observer && *at <= end => Some((*leader, *at)),
            _ => None,
        });
        let stale = match last {
            Some((Some(token), _)) => token < newest,
            Some((None, at)) => at < acquired,
            None => true,
        };
        if stale {
            violations.push(Violation {
                property: Property::Observed,
                detail: format!(
                    "client {client}'s selector's leaders() showed {last:?} at the end, older than token {newest}, acquired {LEADERS_LAG:?} before"
                ),
            });
        }
    }
    violations
}
