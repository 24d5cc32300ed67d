//! One watch stream per session, shared by all its waits.
//!
//! A wait subscribes to a *scope* — the prefix its keys live under (a lock's `N/`) — and says
//! which changes it waits for. The hub keeps one watch per scope on one gRPC stream, registered
//! from *now* when the first wait of the scope subscribes, and dispatches every revision's
//! events, in etcd's order, to the waits they concern (found through an index of the keys they
//! watch, so ten thousand waits on one lock cost one lookup per event, not ten thousand).
//!
//! Why one stream instead of one per wait:
//!
//! * **No registration per wait, so no 100 ms stall.** etcd computes a watch's start revision
//!   *before* it registers it: a write that commits in between puts the watch into the
//!   "unsynced" group, served on a 100 ms tick. Under contention that happens to a fraction of
//!   all registrations. A scope's watch is registered once and then lingers (see `linger`), so
//!   a wait on a busy lock registers nothing.
//! * **No confirming read in the common case.** A subscriber says up to which revision it has
//!   read (`after`). The hub keeps each scope's last [`KEPT`] revisions: if they reach back to
//!   `after`, they are replayed to the subscriber, which then has seen every change after its
//!   read without asking etcd again; else it is told from which revision on it sees every
//!   change, and reads once more.
//! * **The waiter's own key is in the same ordered stream.** Its deletion (or a put that moves
//!   it to another lease) reaches the wait before any later change: a change delivered to a
//!   wait happened while the waiter's key was still its own.
//!
//! * **Twins: two registrations, so that one slow one does not stall the scope.** The scope's
//!   watch is registered from now, and yet etcd (before its PR #20229: the 3.4.23 and 3.5.1
//!   tested here) puts it in its unsynced group when a write commits while it registers it (it
//!   reads its revision first, then takes the store's lock): every event of the scope then
//!   waits for etcd's next 100 ms sync, and so does every wait on it — under contention,
//!   measured on about one scope creation in fifty. So each scope is registered twice, back to
//!   back; it is in place once both are, from the higher of their revisions (each twin delivers
//!   every event after its own, in order, so dropping any revision not newer than the last
//!   dispatched loses none and repeats none). The first twin to deliver events is normally in
//!   etcd's synced group from then on (its first response was either a live one or its
//!   catch-up), so the other is cancelled. Both land unsynced only when two writes race two
//!   registrations.
//!
//! * **A mirror of a long queue** ([`members`]): for a waiter behind a long line the hub keeps
//!   a scope's keys (built from one read, then fed every revision before the waits hear of
//!   it), so that waiters decide from memory instead of reading the whole queue.
//!
//! The stream is probed when it stays quiet (a progress request, which etcd answers at once),
//! and torn down when it fails, when a probe or a creation gets no answer within the request
//! timeout, or when its session ends; every subscriber then re-reads ([`Woken::Recheck`]). A
//! scope without subscribers lingers for a while, then its watch is cancelled; the stream ends
//! with its last scope.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use etcd_client::{EventType, WatchOptions, WatchResponse, WatchStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Change, Watched, Woken};
use crate::rpc::{Rpc, Stats};

/// How many of a scope's most recent revisions (with events) are kept for late subscribers.
const KEPT: usize = 256;

/// A subscriber joining a stream quiet for longer than this asks etcd whether it still lives.
const STALE: Duration = Duration::from_secs(1);

/// How many watches a scope is registered with, back to back on the stream (see "Twins" in
/// the module's documentation).
const TWINS: usize = 2;

/// A session's shared watch stream. Dropping it ends the stream and its task.
pub(crate) struct Hub {
    rpc: Rpc,
    quiet: Duration,
    linger: Duration,
    shared: Arc<Mutex<State>>,
    stop: CancellationToken,
}

/// What a waiter knows about its own key: any delete of it, or a put that moves it off
/// `lease`, ends the wait with [`Note::Lost`].
#[derive(Debug, Clone)]
pub(crate) struct Own {
    pub(crate) key: Vec<u8>,
    pub(crate) lease: i64,
}

/// What a subscriber is told.
#[derive(Debug)]
pub(crate) enum Note {
    /// Every change after this revision reaches the subscriber.
    Ready(i64),
    /// A watched change happened.
    Woken(Woken),
    /// The waiter's own key was deleted or taken over.
    Lost,
    /// etcd refused the scope's watch, for this reason.
    Refused(String),
    /// The stream failed or ended: re-read.
    Broken,
}

#[derive(Default)]
struct State {
    conn: Conn,
    /// Tells the current stream's connection apart from earlier ones.
    generation: u64,
    scopes: HashMap<Vec<u8>, Scope>,
    ids: HashMap<i64, Vec<u8>>,
    subs: HashMap<u64, Sub>,
    next: u64,
    /// The last scope incarnation's number.
    serial: u64,
}

#[derive(Default)]
enum Conn {
    #[default]
    Idle,
    /// A subscriber is opening the stream; these scopes are created once it is open.
    Opening { unsent: Vec<Creation> },
    Running {
        commands: mpsc::UnboundedSender<Command>,
        stop: CancellationToken,
    },
}

enum Command {
    Create(Creation),
    Probe,
}

/// A scope whose watches are to be created: its key, and which incarnation of it (a scope
/// forgotten and subscribed to again is a new one, whose twins are its own).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Creation {
    scope: Vec<u8>,
    serial: u64,
}

struct Scope {
    /// Every event after this revision is delivered (`None` while the watches are created).
    created: Option<i64>,
    /// This incarnation's number (see [`Creation`]).
    serial: u64,
    /// Twins whose creation is not answered yet, and the highest revision the answered ones
    /// reported.
    awaiting: usize,
    reported: i64,
    /// The scope's live watches: its twins, then, once one of them has spoken, that one.
    watches: Vec<i64>,
    /// Events that arrived before every twin was created, in arrival order.
    early: Vec<(i64, Vec<Group>)>,
    /// The most recent revisions' events, oldest first: all events after `kept_from`.
    kept: VecDeque<Group>,
    kept_from: i64,
    /// Subscribers by the keys whose events concern them.
    index: HashMap<Vec<u8>, Vec<u64>>,
    /// Subscribers whose targets no key lookup finds (checked against every revision).
    scan: Vec<u64>,
    subs: usize,
    idle_since: Instant,
    /// The scope's members, kept exact from a read on (built when a waiter asks for it).
    mirror: Option<Mirror>,
}

impl Scope {
    /// The newest revision dispatched (a twin's copy of it, or of an older one, is dropped):
    /// every dispatched revision is kept, and only the oldest are let go.
    fn last(&self) -> i64 {
        self.kept.back().map_or(self.kept_from, |g| g.revision)
    }
}

/// One revision's events in a scope.
struct Group {
    revision: i64,
    events: Vec<Ev>,
}

struct Ev {
    kind: EventType,
    key: Vec<u8>,
    lease: i64,
    create_revision: i64,
}

struct Sub {
    scope: Vec<u8>,
    targets: Vec<Watched>,
    own: Option<Own>,
    after: i64,
    tx: mpsc::UnboundedSender<Note>,
    keys: Vec<Vec<u8>>,
}

/// A wait's place in the hub. Dropping it leaves.
pub(crate) struct Subscription {
    shared: Arc<Mutex<State>>,
    id: u64,
    rx: mpsc::UnboundedReceiver<Note>,
    /// This subscriber opens the stream (see [`Hub::open`]).
    pub(crate) opens: bool,
    scope: Vec<u8>,
    generation: u64,
}

fn lock(shared: &Mutex<State>) -> MutexGuard<'_, State> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The keys under which a target's events are looked up: an exact key under that key; a prefix
/// ending in `/` under the prefix; the keys of `among`, each. `None`: the target is checked
/// against every event.
fn index_keys(target: &Watched) -> Option<Vec<Vec<u8>>> {
    if let Some(among) = &target.among {
        return Some(among.clone());
    }
    if target.prefix {
        return target.key.ends_with(b"/").then(|| vec![target.key.clone()]);
    }
    Some(vec![target.key.clone()])
}

/// The index keys an event of `key` may concern: the key, and each of its prefixes that ends
/// with a `/`.
fn lookups(key: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::once(key).chain(
        key.iter()
            .enumerate()
            .filter(|(_, b)| **b == b'/')
            .map(move |(i, _)| &key[..=i]),
    )
}

/// The scope of a wait: the longest prefix ending in `/` that holds every target's key and
/// our own. `None` if there is none, or if a target must see the past (watched `since` a
/// revision): such waits open a watch of their own.
pub(crate) fn scope_of(targets: &[Watched], own: Option<&[u8]>) -> Option<Vec<u8>> {
    if targets.is_empty() || targets.iter().any(|t| t.since.is_some()) {
        return None;
    }
    let keys: Vec<&[u8]> = targets
        .iter()
        .map(|t| t.key.as_slice())
        .chain(own)
        .collect();
    scope_of_keys(&keys)
}

/// The scope of a mirror holding every one of `keys`: the longest prefix ending in `/` that
/// they share.
pub(crate) fn scope_of_keys(keys: &[&[u8]]) -> Option<Vec<u8>> {
    let (first, rest) = keys.split_first()?;
    let common = rest.iter().fold(first.len(), |len, key| {
        first[..len]
            .iter()
            .zip(key.iter())
            .take_while(|(a, b)| a == b)
            .count()
    });
    let end = first[..common].iter().rposition(|&b| b == b'/')?;
    Some(first[..=end].to_vec())
}

impl Hub {
    /// The hub of a session: its watches go through `rpc`; a stream quiet for `quiet` is
    /// probed; a scope without subscribers is kept for `linger`. The stream and its task end
    /// when the hub is dropped (with the last session that shares it), or earlier once no
    /// scope is left.
    pub(crate) fn new(rpc: Rpc, quiet: Duration, linger: Duration) -> Hub {
        Hub {
            rpc,
            quiet: quiet.max(Duration::from_millis(100)),
            linger,
            shared: Arc::default(),
            stop: CancellationToken::new(),
        }
    }

    /// Subscribes to the changes `targets` of `scope` after revision `after` (and to the loss
    /// of `own`). Synchronous: the subscription then waits for [`Note`]s. If it
    /// [`opens`](Subscription::opens) the stream, [`open`](Self::open) it first.
    pub(crate) fn subscribe(
        &self,
        scope: Vec<u8>,
        targets: &[Watched],
        own: Option<Own>,
        after: i64,
    ) -> Subscription {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = lock(&self.shared);
        let state = &mut *state;
        let id = state.next;
        state.next += 1;
        let mut opens = false;
        if !state.scopes.contains_key(&scope) {
            state.serial += 1;
            let creation = Creation {
                scope: scope.clone(),
                serial: state.serial,
            };
            state.scopes.insert(
                scope.clone(),
                Scope {
                    created: None,
                    serial: creation.serial,
                    awaiting: TWINS,
                    reported: 0,
                    watches: Vec::new(),
                    early: Vec::new(),
                    kept: VecDeque::new(),
                    kept_from: 0,
                    index: HashMap::new(),
                    scan: Vec::new(),
                    subs: 0,
                    idle_since: Instant::now(),
                    mirror: None,
                },
            );
            match &mut state.conn {
                Conn::Idle => {
                    opens = true;
                    state.conn = Conn::Opening { unsent: Vec::new() };
                }
                Conn::Opening { unsent } => unsent.push(creation),
                Conn::Running { commands, .. } => {
                    let _ = commands.send(Command::Create(creation));
                }
            }
        } else if let Conn::Running { commands, .. } = &state.conn {
            let _ = commands.send(Command::Probe);
        }
        let entry = state.scopes.get_mut(&scope).expect("inserted above");
        entry.subs += 1;
        let mut keys = Vec::new();
        let mut scanned = false;
        for target in targets {
            match index_keys(target) {
                Some(k) => keys.extend(k),
                None => scanned = true,
            }
        }
        if let Some(own) = &own {
            keys.push(own.key.clone());
        }
        keys.sort();
        keys.dedup();
        for key in &keys {
            entry.index.entry(key.clone()).or_default().push(id);
        }
        if scanned {
            entry.scan.push(id);
        }
        let sub = Sub {
            scope: scope.clone(),
            targets: targets.to_vec(),
            own,
            after,
            tx,
            keys,
        };
        // A live scope: replay what the subscriber has not seen, as far as it is kept.
        let mut delivered = false;
        if let Some(created) = entry.created {
            // Every event after `kept_from` (never before `created`) is kept or still to come.
            debug_assert!(entry.kept_from >= created);
            let from = after.max(entry.kept_from);
            let _ = sub.tx.send(Note::Ready(from));
            for group in entry.kept.iter().filter(|g| g.revision > after) {
                if let Some(note) = sub.outcome(group) {
                    let _ = sub.tx.send(note);
                    delivered = true;
                    break;
                }
            }
        }
        if delivered {
            unindex(entry, id, &sub.keys);
        } else {
            state.subs.insert(id, sub);
        }
        Subscription {
            shared: self.shared.clone(),
            id,
            rx,
            opens,
            scope,
            generation: state.generation,
        }
    }

    /// Opens the stream with `sub`'s scope as its first watch and starts the task that reads
    /// it. On failure every other subscriber is told [`Note::Broken`] and the error is
    /// returned (the caller's policy decides: retry, renew the token, or give up).
    pub(crate) async fn open(&self, sub: &mut Subscription) -> Result<(), crate::Error> {
        sub.opens = false;
        // Dropped before the stream is in place (the opener's wait was cancelled): tear the
        // connection down, so that the subscribers waiting for it re-read at once and the next
        // one opens a stream, instead of waiting out the request timeout.
        let mut abandoned = Abandoned {
            shared: &self.shared,
            generation: sub.generation,
            id: sub.id,
            armed: true,
        };
        match self
            .rpc
            .open_watch(sub.scope.clone(), scope_options())
            .await
        {
            Ok(stream) => {
                let (commands, rx) = mpsc::unbounded_channel();
                let stop = self.stop.child_token();
                abandoned.armed = false;
                let (first, unsent) = {
                    let mut state = lock(&self.shared);
                    if state.generation != sub.generation {
                        // Torn down meanwhile (the subscriber was told): drop this stream.
                        return Ok(());
                    }
                    // (The scope is there: only a teardown, which changes the generation,
                    // forgets a scope before its watches are created.)
                    let first = Creation {
                        scope: sub.scope.clone(),
                        serial: state.scopes.get(&sub.scope).map_or(0, |s| s.serial),
                    };
                    let unsent = match std::mem::take(&mut state.conn) {
                        Conn::Opening { unsent } => unsent,
                        _ => Vec::new(),
                    };
                    state.conn = Conn::Running {
                        commands,
                        stop: stop.clone(),
                    };
                    (first, unsent)
                };
                let task = Task {
                    shared: self.shared.clone(),
                    rpc: self.rpc.clone(),
                    quiet: self.quiet,
                    linger: self.linger,
                    generation: sub.generation,
                };
                tokio::spawn(task.run(stream, rx, stop, first, unsent));
                Ok(())
            }
            Err(e) => Err(e), // `abandoned` tells every other subscriber
        }
    }

    /// The way to `scope`'s mirror (see [`members`]): build it, or wait for it. `None` while
    /// the scope's watch is not in place (subscribe first: the mirror lives as long as the
    /// scope).
    pub(crate) fn mirror(&self, scope: &[u8]) -> Option<Mirrored> {
        let mut state = lock(&self.shared);
        let generation = state.generation;
        let entry = state.scopes.get_mut(scope)?;
        entry.created?;
        if let Some(mirror) = &entry.mirror {
            return Some(Mirrored::Ready(mirror.seen.subscribe()));
        }
        let (seen, _) = tokio::sync::watch::channel(0);
        entry.mirror = Some(Mirror {
            members: None,
            seen,
        });
        Some(Mirrored::Build(Builder {
            shared: self.shared.clone(),
            scope: scope.to_vec(),
            generation,
            done: false,
        }))
    }

    /// Whether `scope`'s mirror is built (and its watch in place).
    pub(crate) fn mirrors(&self, scope: &[u8]) -> bool {
        lock(&self.shared)
            .scopes
            .get(scope)
            .and_then(|s| s.mirror.as_ref())
            .is_some_and(|m| m.members.is_some())
    }

    /// What `scope`'s mirror says is ahead of `own` (see [`Members::line`]); `None` if the
    /// mirror is not built, or cannot tell.
    pub(crate) fn line(
        &self,
        scope: &[u8],
        own: &Own,
        create_revision: i64,
        counts: impl Fn(&[u8]) -> bool,
        take: usize,
    ) -> Option<Line> {
        let state = lock(&self.shared);
        let members = state.scopes.get(scope)?.mirror.as_ref()?.members.as_ref()?;
        members.line(&own.key, create_revision, own.lease, counts, take)
    }

    /// Tears the stream down (a creation that got no answer in time): every subscriber
    /// re-reads.
    pub(crate) fn reset(&self, generation: u64) {
        fail_all(&self.shared, generation, None);
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Subscription {
    /// The next note (`None`: the hub is gone, which only happens with its session).
    pub(crate) async fn next(&mut self) -> Option<Note> {
        self.rx.recv().await
    }

    /// The connection this subscription was made on.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut state = lock(&self.shared);
        if let Some(sub) = state.subs.remove(&self.id) {
            if let Some(scope) = state.scopes.get_mut(&sub.scope) {
                unindex(scope, self.id, &sub.keys);
            }
        }
    }
}

/// Takes subscriber `id` out of `scope`'s index.
fn unindex(scope: &mut Scope, id: u64, keys: &[Vec<u8>]) {
    for key in keys {
        if let Some(ids) = scope.index.get_mut(key) {
            ids.retain(|&i| i != id);
            if ids.is_empty() {
                scope.index.remove(key);
            }
        }
    }
    scope.scan.retain(|&i| i != id);
    scope.subs = scope.subs.saturating_sub(1);
    if scope.subs == 0 {
        scope.idle_since = Instant::now();
    }
}

/// A scope's watch: every event under it, from now.
fn scope_options() -> WatchOptions {
    WatchOptions::new().with_prefix()
}

impl Sub {
    /// What `group` means for this subscriber, if anything: the loss of its own key comes
    /// first, then the first watched change (with every watched key of the revision).
    fn outcome(&self, group: &Group) -> Option<Note> {
        if group.revision <= self.after {
            return None;
        }
        if let Some(own) = &self.own {
            let lost = group
                .events
                .iter()
                .any(|e| e.key == own.key && (e.kind == EventType::Delete || e.lease != own.lease));
            if lost {
                return Some(Note::Lost);
            }
        }
        let first = group.events.iter().find_map(|e| {
            self.targets
                .iter()
                .find(|t| t.matches(e.kind, &e.key))
                .map(|t| (t, e))
        })?;
        let (target, event) = first;
        tracing::trace!(
            target: "etcd_coord::handoff",
            key = %String::from_utf8_lossy(&event.key),
            waiter = %self.own.as_ref().map_or(String::new(), |o| String::from_utf8_lossy(&o.key).into_owned()),
            revision = group.revision,
            "woken"
        );
        if target.deciding {
            return Some(Note::Woken(Woken::Decided(group.revision)));
        }
        let keys = group
            .events
            .iter()
            .filter(|e| self.targets.iter().any(|t| t.matches(e.kind, &e.key)))
            .map(|e| e.key.clone())
            .collect();
        Some(Note::Woken(Woken::Changed(Change {
            revision: group.revision,
            keys,
            ordered: self.own.is_some(),
        })))
    }
}

mod dispatch;
pub(crate) mod members;
mod task;
mod teardown;
#[cfg(test)]
mod tests;

use members::{Builder, Mirror};
pub(crate) use members::{Line, Mirrored};
use task::Task;
use teardown::{fail_all, Abandoned};
