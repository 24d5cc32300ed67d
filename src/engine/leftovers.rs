//! What a resumed session does with the keys on its lease that no guard of it holds: the
//! earlier process's leftovers.
//!
//! A process can die with a put on its way — a `lock()` whose enqueue reached etcd but whose
//! answer did not come back, a barrier hold, a registration — or hand its lease off with
//! [`orphan`](super::LeasedSession::orphan) while one is in flight. The key lands on the lease
//! and nobody knows its fencing token. Before a resume, the lease's expiry would have removed
//! it; a resumed session keeps the lease alive for as long as it runs, so a key nobody will
//! release would block its queue for as long.
//!
//! The rule: every key on a resumed session's lease ends up either held by this session or
//! deleted. The session looks at its lease (`LeaseTimeToLive` with its keys, then their create
//! revisions) once per TTL, and once more when the adoption window ends, for as long as it
//! lives, and deletes — each fenced on its create revision and on being attached to this lease
//! — every key that is neither
//!
//! * put by this session's own primitives (recorded before the put is sent, so a put in flight
//!   is never mistaken for a leftover), nor
//! * taken back by one of its guards (`resume` of the key and its create revision),
//!
//! provided that, for a key that was on the lease when the resume listed it (the earlier
//! process's keys, which a guard may still take back), the adoption window is over. A key that
//! appeared after that listing and that this session did not put cannot be taken back by
//! anyone — its put was never answered (etcd's leader lists a lease's keys only once it has
//! applied everything committed), so nobody knows its token: it is deleted at the next look. A
//! key the rule has decided to delete cannot be taken back any more (the taking-back fails
//! with `LockLost`), and one whose taking-back began first is never deleted.
//!
//! The [`Ledger`] is this, without I/O; [`watch_over`] is the looking and deleting.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex as StdMutex, MutexGuard};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use tokio::time::{sleep_until, Instant};

use super::until_answered;
use crate::backoff::Backoff;
use crate::rpc::pause;
use crate::session::Session;
use crate::Error;

/// How many keys one read of the sweep asks for (etcd's default `--max-txn-ops` is 128).
const KEYS_PER_READ: usize = 64;

/// A key by name and create revision: one incarnation, never seen again once deleted.
type Incarnation = (Vec<u8>, i64);

/// The leftovers rule of one resumed session: when its window ends and what it knows.
pub(crate) struct Leftovers {
    /// When the adoption window ends (`None`: never).
    window_ends: Option<Instant>,
    ledger: StdMutex<Ledger>,
}

impl Leftovers {
    /// The rule for a session whose resume listed the keys `earlier` on its lease, and whose
    /// window ends at `window_ends`.
    pub(super) fn new(earlier: &[Vec<u8>], window_ends: Option<Instant>) -> Leftovers {
        Leftovers {
            window_ends,
            ledger: StdMutex::new(Ledger {
                earlier: earlier.iter().cloned().collect(),
                ..Ledger::default()
            }),
        }
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the session knows of the keys on its lease.
#[derive(Debug, Default)]
struct Ledger {
    /// The names on the lease when `resume` listed it: the earlier process's keys, which a
    /// guard may take back within the window (forgotten once a look no longer lists them).
    earlier: HashSet<Vec<u8>>,
    /// Keys this session put or took back (forgotten once a look finds them gone).
    ours: HashSet<Incarnation>,
    /// Names with a put or a taking-back of this session under way, counted.
    pending: HashMap<Vec<u8>, usize>,
    /// Keys the rule decided to delete: a taking-back that comes later fails. Kept for the
    /// session's life (one entry per leftover, and leftovers are few).
    condemned: HashSet<Incarnation>,
}

impl Ledger {
    fn claim(&mut self, key: &[u8]) {
        *self.pending.entry(key.to_vec()).or_insert(0) += 1;
    }

    fn unclaim(&mut self, key: &[u8]) {
        if let Some(n) = self.pending.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                self.pending.remove(key);
            }
        }
    }

    /// The claim on `key` is settled: the key is ours at `create_revision` — unless the rule
    /// condemned that very key first (false).
    fn confirm(&mut self, key: &[u8], create_revision: i64) -> bool {
        self.unclaim(key);
        let incarnation = (key.to_vec(), create_revision);
        if self.condemned.contains(&incarnation) {
            return false;
        }
        self.ours.insert(incarnation);
        true
    }

    /// The names of a look's listing whose create revisions it must read: all but those with
    /// a claim under way (which are ours whatever they hold).
    fn to_read(&self, listed: &[Vec<u8>]) -> Vec<Vec<u8>> {
        listed
            .iter()
            .filter(|k| !self.pending.contains_key(k.as_slice()))
            .cloned()
            .collect()
    }

    /// Judges a look: `known` is [`ours`](Self::ours) as it was before the look was sent,
    /// `listed` the names on the lease, `read` the names whose keys were then read and
    /// `found` what those reads found on this lease. Forgets our keys that are gone (and
    /// earlier names no longer listed), and returns (and condemns) the keys to delete:
    /// neither ours nor pending, and either not on the lease when the resume listed it or
    /// found once the window is over.
    fn judge(
        &mut self,
        known: &HashSet<Incarnation>,
        listed: &[Vec<u8>],
        read: &[Vec<u8>],
        found: &[Incarnation],
        window_over: bool,
    ) -> Vec<Incarnation> {
        let listed: HashSet<&[u8]> = listed.iter().map(Vec::as_slice).collect();
        let read: HashSet<&[u8]> = read.iter().map(Vec::as_slice).collect();
        let present: HashSet<&Incarnation> = found.iter().collect();
        // A key of ours that a look sent after it was known does not show is gone for good
        // (etcd never creates a key again with the same create revision).
        for incarnation in known {
            let name = incarnation.0.as_slice();
            if !listed.contains(name) || (read.contains(name) && !present.contains(incarnation)) {
                self.ours.remove(incarnation);
            }
        }
        // An earlier key not listed is gone; a key of that name found later landed later.
        self.earlier.retain(|name| listed.contains(name.as_slice()));
        let mut doomed = Vec::new();
        for incarnation in found {
            let name = &incarnation.0;
            if self.pending.contains_key(name) || self.ours.contains(incarnation) {
                continue;
            }
            if self.earlier.contains(name) && !window_over {
                continue; // the earlier process's: a guard may still take it back
            }
            self.condemned.insert(incarnation.clone());
            doomed.push(incarnation.clone());
        }
        doomed
    }
}

/// A put (or a taking-back) of `key` under way through a session: while it lives, the
/// leftovers rule leaves every key of that name alone; [`confirm`](Self::confirm) records the
/// key it made (or took back) as the session's. Inert for a session that was not resumed.
pub(crate) struct Intent {
    held: Option<(Arc<Leftovers>, Vec<u8>)>,
}

impl Intent {
    pub(super) fn new(leftovers: Option<&Arc<Leftovers>>, key: &str) -> Intent {
        let held = leftovers.map(|l| {
            let key = key.as_bytes().to_vec();
            l.ledger().claim(&key);
            (Arc::clone(l), key)
        });
        Intent { held }
    }

    /// The key exists as this session's, created at `create_revision`: the rule never
    /// deletes it. False if the rule had already decided to delete that very key (a
    /// taking-back that came too late); then it is not the session's.
    pub(crate) fn confirm(mut self, create_revision: i64) -> bool {
        match self.held.take() {
            Some((leftovers, key)) => leftovers.ledger().confirm(&key, create_revision),
            None => true,
        }
    }
}

impl Drop for Intent {
    fn drop(&mut self) {
        if let Some((leftovers, key)) = self.held.take() {
            leftovers.ledger().unclaim(&key);
        }
    }
}

/// Looks at the lease once per TTL, and once when the adoption window ends, deleting what
/// the rule says, for as long as the session lives: a job of the session (a look that fails
/// in a way retrying cannot fix — etcd refusing to list or delete the lease's keys — ends it,
/// and so the session, as no key may outlive its rule).
pub(super) async fn watch_over(
    session: Arc<Session>,
    leftovers: Arc<Leftovers>,
) -> Result<(), Error> {
    let period = session.ttl;
    let mut next = Instant::now() + period;
    let mut window = leftovers.window_ends;
    loop {
        let at = match window {
            Some(w) if w < next => w,
            _ => next,
        };
        sleep_until(at).await;
        if window.is_some_and(|w| w <= at) {
            window = None;
        }
        if at >= next {
            next = at + period;
        }
        look(&session, &leftovers).await?;
    }
}

/// One look: lists the lease's keys, reads their create revisions, deletes what the rule says.
async fn look(session: &Arc<Session>, leftovers: &Leftovers) -> Result<(), Error> {
    let known = leftovers.ledger().ours.clone();
    let Some(listed) = list(session).await? else {
        return Ok(()); // the lease is gone: the keep-alive says so
    };
    let read = leftovers.ledger().to_read(&listed);
    let mut found = Vec::new();
    for names in read.chunks(KEYS_PER_READ) {
        let gets = names
            .iter()
            .map(|k| TxnOp::get(k.clone(), Some(GetOptions::new().with_keys_only())))
            .collect();
        let snapshot = crate::engine::read(session, gets).await?;
        found.extend(
            snapshot
                .gets
                .iter()
                .flat_map(|g| g.kvs())
                .filter(|kv| kv.lease() == session.lease_id)
                .map(|kv| (kv.key().to_vec(), kv.create_revision())),
        );
    }
    let window_over = leftovers.window_ends.is_some_and(|w| Instant::now() >= w);
    let doomed = leftovers
        .ledger()
        .judge(&known, &listed, &read, &found, window_over);
    for (key, create_revision) in doomed {
        let delete = Txn::new()
            .when([
                Compare::create_revision(key.clone(), CompareOp::Equal, create_revision),
                Compare::lease(key.clone(), CompareOp::Equal, session.lease_id),
            ])
            .and_then([TxnOp::delete(key.clone(), None)]);
        let mut backoff = Backoff::for_requests();
        let deleted = until_answered(session, || delete.clone(), &mut backoff)
            .await?
            .resp
            .succeeded();
        if deleted {
            tracing::warn!(
                lease = session.lease_id,
                key = %String::from_utf8_lossy(&key),
                create_revision,
                "deleted a key on the resumed lease that nobody took back"
            );
        }
    }
    Ok(())
}

/// The names of the keys attached to the lease; `None` if the lease is gone. Retries
/// transient failures while the session lives.
async fn list(session: &Arc<Session>) -> Result<Option<Vec<Vec<u8>>>, Error> {
    let mut backoff = Backoff::for_requests();
    loop {
        session.check()?;
        let answer = session.rpc.lease_time_to_live(session.lease_id, true).await;
        match answer {
            Ok(resp) if resp.ttl() < 0 => return Ok(None),
            Ok(resp) => {
                if let Some(h) = resp.header() {
                    session.rpc.saw_revision(h.revision());
                }
                return Ok(Some(resp.keys().to_vec()));
            }
            Err(e) if e.is_lease_not_found() => return Ok(None),
            Err(e) if e.is_retryable() => pause(&**session, &mut backoff).await?,
            Err(e) => return Err(e),
        }
    }
}

/// When the adoption window of a session resumed now ends, for a window of `window`.
pub(super) fn window_end(window: Duration) -> Option<Instant> {
    Instant::now().checked_add(window)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    #[test]
    fn the_rule_spares_what_is_ours_or_pending_and_waits_out_the_window_for_the_earlier_keys() {
        // The resume listed the earlier process's keys "adopted" and "early".
        let mut ledger = Ledger {
            earlier: [key("adopted"), key("early")].into_iter().collect(),
            ..Ledger::default()
        };
        // Ours: put (confirmed), taken back (confirmed), and a put still under way.
        ledger.claim(b"put");
        assert!(ledger.confirm(b"put", 20));
        ledger.claim(b"adopted");
        assert!(ledger.confirm(b"adopted", 5));
        ledger.claim(b"in-flight");
        let listed = vec![
            key("put"),
            key("adopted"),
            key("in-flight"),
            key("early"),
            key("late"),
        ];
        let read = ledger.to_read(&listed);
        assert!(
            !read.contains(&key("in-flight")),
            "a pending name is not read"
        );
        let found = vec![
            (key("put"), 20),
            (key("adopted"), 5),
            (key("early"), 7),
            (key("late"), 30),
        ];
        let known = ledger.ours.clone();
        // In the window: only the key that appeared after the resume's listing goes.
        let doomed = ledger.judge(&known, &listed, &read, &found, false);
        assert_eq!(doomed, vec![(key("late"), 30)]);
        // After it (the late key deleted meanwhile): the earlier process's key goes too; ours
        // never.
        let found: Vec<_> = found.into_iter().filter(|(k, _)| k != b"late").collect();
        let doomed = ledger.judge(&known, &listed, &read, &found, true);
        assert_eq!(doomed, vec![(key("early"), 7)]);
        // A taking-back that comes after the rule condemned the key fails.
        ledger.claim(b"early");
        assert!(!ledger.confirm(b"early", 7));
        assert!(!ledger.ours.contains(&(key("early"), 7)));
        // The pending claim settles; nothing is left pending.
        assert!(ledger.confirm(b"in-flight", 40));
        assert!(ledger.pending.is_empty());
    }

    #[test]
    fn a_key_that_is_gone_is_forgotten_and_its_name_no_longer_spares_a_stranger() {
        let mut ledger = Ledger {
            earlier: [key("old")].into_iter().collect(),
            ..Ledger::default()
        };
        ledger.claim(b"barrier");
        assert!(ledger.confirm(b"barrier", 20));
        // Our key was deleted; a late put of the same name (the earlier process's) landed.
        let known = ledger.ours.clone();
        let listed = vec![key("barrier")];
        let read = ledger.to_read(&listed);
        let doomed = ledger.judge(&known, &listed, &read, &[(key("barrier"), 25)], false);
        assert_eq!(doomed, vec![(key("barrier"), 25)]);
        assert!(ledger.ours.is_empty());
        // The earlier key "old" was not listed: gone. A key of that name landing later is a
        // late put, window or not.
        let listed = vec![key("old")];
        let doomed = ledger.judge(
            &HashSet::new(),
            &listed,
            &listed,
            &[(key("old"), 40)],
            false,
        );
        assert_eq!(doomed, vec![(key("old"), 40)]);
        // A key of ours not listed at all is forgotten too.
        ledger.claim(b"lock");
        assert!(ledger.confirm(b"lock", 30));
        let known = ledger.ours.clone();
        assert!(ledger.judge(&known, &[], &[], &[], true).is_empty());
        assert!(ledger.ours.is_empty());
    }

    #[test]
    fn a_claim_dropped_unsettled_leaves_nothing_pending() {
        let leftovers = Arc::new(Leftovers::new(&[], None));
        let a = Intent::new(Some(&leftovers), "k");
        let b = Intent::new(Some(&leftovers), "k");
        drop(a);
        assert_eq!(leftovers.ledger().pending.get(b"k".as_slice()), Some(&1));
        drop(b);
        assert!(leftovers.ledger().pending.is_empty());
        assert!(
            Intent::new(None, "k").confirm(1),
            "inert for a fresh session"
        );
    }
}
