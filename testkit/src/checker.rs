//! A safety checker for lock-like primitives, after Jepsen's lock checker: record what every
//! client believed and did, then verify the history.
//!
//! Record, from one process (one monotonic clock):
//! - [`History::acquired`] when an exclusive acquisition returned (a mutex, a leadership, a
//!   semaphore permit, a write lock, a barrier held up), with its fencing token and lease;
//!   [`History::acquired_shared`] for a shared one (a read lock);
//! - [`History::ended`] when the client stopped believing it holds (its `lost()` fired, or it
//!   released);
//! - [`History::write`] for every write through the protected resource, and whether the
//!   resource accepted it;
//! - [`History::lease_gone`] when the server side observed a lease end (e.g. an observer saw its
//!   keys deleted);
//! - [`History::passed`] when a wait for the resource to be free (a barrier's `wait()`)
//!   returned, with the instant it was called.
//!
//! [`History::check`] then verifies, for a lock ([`Rules::lock`]):
//! - (a) fencing tokens strictly increase across successive exclusive holders, and a holder
//!   that starts after another ended (one of them exclusive) has the greater token — except
//!   that a lock taken back by its own lease right after it was let go (a resumed lock:
//!   `Mutex::resume`) keeps its token;
//! - (b) no two "believes it holds" intervals overlap, except shared with shared;
//! - (c) every write with a stale token (lower than one the resource already accepted) was
//!   rejected;
//! - (d) no acquisition succeeded after its session's lease was already gone;
//! - (e) no wait passed although an exclusive holder believed it held for the whole call.
//!
//! [`History::check_with`] takes other [`Rules`]: with [`Rules::semaphore`]`(n)` up to `n`
//! exclusive holders may overlap, and (a) only asks that tokens be unique (concurrent holders
//! return in any order; a permit taken back by its own lease after it was let go keeps its
//! token).
//!
//! A double barrier's history ([`History::entering`], [`History::entered`],
//! [`History::leaving`], [`History::left`] and [`History::lease_gone`]) is checked by
//! [`check_double_barrier`]:
//! - (f) nobody passed `enter()` unless, at some instant between its call and its return,
//!   `count` participants were in (from their `enter()` call until their `leave()` returned or
//!   their lease was gone);
//! - (g) nobody's `leave()` returned before every participant that had passed `enter()` before
//!   that `leave()` was called had called `leave()` too, or lost its lease.
//!
//! Liveness ([`check_liveness`]): record [`History::waiting`] when a client starts to wait
//! (an acquisition, a barrier's wait, a double barrier's enter or leave) and
//! [`History::gave_up`] when a wait ends with an error; acquisitions, passes and the double
//! barrier's `Entered`/`Left` steps end waits too. Then, given when the last fault healed:
//! - (h) no wait lasted more than a bound past the later of its start and the heal.
//!
//! The chaos suite also checks (i): no key of an acquisition that ended outlives it by more
//! than the lease TTL and the bound ([`Property::OrphanKey`]).
//!
//! [`FencedRegister`] is an in-memory protected resource that rejects tokens lower than the
//! highest it has seen.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A property the checker verifies; the letters are those of the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Property {
    /// (a) Fencing tokens strictly increase across successive exclusive holders (a lock
    /// resumed by its own lease keeps its token; unique with
    /// several permits).
    TokenOrder,
    /// (b) No more holders at once than the rules allow.
    Exclusion,
    /// (c) Every write with a stale token was rejected by the protected resource.
    StaleWrite,
    /// (d) No acquisition succeeded after its session's lease was gone.
    AfterLeaseGone,
    /// (e) No wait for a free resource passed while a holder held throughout.
    PassedWhileHeld,
    /// (f) Nobody passed a double barrier's `enter()` before `count` participants were in.
    EarlyEnter,
    /// (g) Nobody's `leave()` returned while another participant was still in.
    EarlyLeave,
    /// (h) After the faults healed, no wait lasted longer than the bound.
    Starved,
    /// (i) No key of an ended acquisition outlived it by more than the lease TTL and the bound.
    OrphanKey,
}

impl Property {
    /// The property's letter in the module docs.
    pub fn letter(self) -> char {
        match self {
            Property::TokenOrder => 'a',
            Property::Exclusion => 'b',
            Property::StaleWrite => 'c',
            Property::AfterLeaseGone => 'd',
            Property::PassedWhileHeld => 'e',
            Property::EarlyEnter => 'f',
            Property::EarlyLeave => 'g',
            Property::Starved => 'h',
            Property::OrphanKey => 'i',
        }
    }
}

/// How an acquisition holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Alone (a mutex, a leadership, a write lock, a barrier held up), or as one of at most
    /// [`Rules::holders`] (a semaphore permit).
    Exclusive,
    /// Together with other shared holders, never with an exclusive one (a read lock).
    Shared,
}

/// One recorded event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An acquisition returned to `client`.
    Acquired {
        /// Who.
        client: usize,
        /// Its fencing token.
        token: i64,
        /// The session's lease.
        lease: i64,
        /// Exclusive or shared.
        mode: Mode,
        /// When (monotonic).
        at: Instant,
    },
    /// `client` stopped believing it holds `token`.
    Ended {
        /// Who.
        client: usize,
        /// The token it held.
        token: i64,
        /// When.
        at: Instant,
    },
    /// `client` wrote through the protected resource with `token`.
    Write {
        /// Who.
        client: usize,
        /// The token it wrote with.
        token: i64,
        /// Whether the resource accepted the write.
        accepted: bool,
        /// When the write was applied (or rejected).
        at: Instant,
    },
    /// The server side observed that `lease` had ended.
    LeaseGone {
        /// The lease.
        lease: i64,
        /// When it was observed.
        at: Instant,
    },
    /// A double-barrier participant (`client` on `lease`) reached `step`.
    Participant {
        /// Who.
        client: usize,
        /// Its session's lease.
        lease: i64,
        /// Which step.
        step: Step,
        /// When.
        at: Instant,
    },
    /// `client` started to wait: an acquisition, a barrier's wait, a double barrier's enter or
    /// leave.
    Waiting {
        /// Who.
        client: usize,
        /// When.
        at: Instant,
    },
    /// `client`'s wait ended without success (an error, a lost session, a killed process).
    GaveUp {
        /// Who.
        client: usize,
        /// When.
        at: Instant,
    },
    /// A wait for the resource to be free (e.g. [`Barrier::wait`](etcd_coord::Barrier::wait))
    /// returned to `client`.
    Passed {
        /// Who.
        client: usize,
        /// When the wait was called.
        called: Instant,
        /// When it returned.
        at: Instant,
    },
}

/// A double-barrier participant's steps, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// It called `enter()`.
    Entering,
    /// Its `enter()` returned.
    Entered,
    /// It called `leave()`.
    Leaving,
    /// Its `leave()` returned.
    Left,
}

/// What a history is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// How many exclusive holders may overlap: 1 for a lock, `n` for a semaphore of `n`
    /// permits.
    pub holders: usize,
}

impl Rules {
    /// A lock (mutex, election, read-write lock, barrier): one exclusive holder at a time.
    pub fn lock() -> Rules {
        Rules { holders: 1 }
    }

    /// A semaphore of `permits` permits (at least 1).
    pub fn semaphore(permits: usize) -> Rules {
        Rules {
            holders: permits.max(1),
        }
    }
}

/// A violation found by the checker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which property.
    pub property: Property,
    /// What happened.
    pub detail: String,
}

/// A thread-safe recorder of [`Event`]s (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct History {
    events: Arc<Mutex<Vec<Event>>>,
}

impl History {
    /// An empty history.
    pub fn new() -> History {
        History::default()
    }

    fn push(&self, e: Event) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(e);
    }

    /// Records an exclusive acquisition that returned now.
    pub fn acquired(&self, client: usize, token: i64, lease: i64) {
        self.push(Event::Acquired {
            client,
            token,
            lease,
            mode: Mode::Exclusive,
            at: Instant::now(),
        });
    }

    /// Records a shared acquisition (a read lock) that returned now.
    pub fn acquired_shared(&self, client: usize, token: i64, lease: i64) {
        self.push(Event::Acquired {
            client,
            token,
            lease,
            mode: Mode::Shared,
            at: Instant::now(),
        });
    }

    /// Records that double-barrier participant `client` (on `lease`) reaches `step` now.
    pub fn participant(&self, client: usize, lease: i64, step: Step) {
        self.push(Event::Participant {
            client,
            lease,
            step,
            at: Instant::now(),
        });
    }

    /// [`participant`](Self::participant) at [`Step::Entering`]: it calls `enter()` now.
    pub fn entering(&self, client: usize, lease: i64) {
        self.participant(client, lease, Step::Entering);
    }

    /// [`participant`](Self::participant) at [`Step::Entered`].
    pub fn entered(&self, client: usize, lease: i64) {
        self.participant(client, lease, Step::Entered);
    }

    /// [`participant`](Self::participant) at [`Step::Leaving`].
    pub fn leaving(&self, client: usize, lease: i64) {
        self.participant(client, lease, Step::Leaving);
    }

    /// [`participant`](Self::participant) at [`Step::Left`].
    pub fn left(&self, client: usize, lease: i64) {
        self.participant(client, lease, Step::Left);
    }

    /// Records that `client` starts to wait now.
    pub fn waiting(&self, client: usize) {
        self.push(Event::Waiting {
            client,
            at: Instant::now(),
        });
    }

    /// Records that `client`'s wait ended without success now.
    pub fn gave_up(&self, client: usize) {
        self.push(Event::GaveUp {
            client,
            at: Instant::now(),
        });
    }

    /// Records that a wait for the resource to be free, called at `called`, returned now.
    pub fn passed(&self, client: usize, called: Instant) {
        self.push(Event::Passed {
            client,
            called,
            at: Instant::now(),
        });
    }

    /// Records that `client` stopped believing it holds `token`, now.
    pub fn ended(&self, client: usize, token: i64) {
        self.push(Event::Ended {
            client,
            token,
            at: Instant::now(),
        });
    }

    /// Records a write through the protected resource, now.
    pub fn write(&self, client: usize, token: i64, accepted: bool) {
        self.push(Event::Write {
            client,
            token,
            accepted,
            at: Instant::now(),
        });
    }

    /// Records that the server side observed `lease` ended, now.
    pub fn lease_gone(&self, lease: i64) {
        self.push(Event::LeaseGone {
            lease,
            at: Instant::now(),
        });
    }

    /// Records an arbitrary event (e.g. a hand-made history in a test).
    pub fn record(&self, e: Event) {
        self.push(e);
    }

    /// A copy of the events so far.
    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Checks properties (a)–(e) for a lock; returns every violation found (empty: the
    /// history is safe).
    pub fn check(&self) -> Vec<Violation> {
        check(&self.events())
    }

    /// Checks properties (a)–(e) under `rules`.
    pub fn check_with(&self, rules: Rules) -> Vec<Violation> {
        check_with(&self.events(), rules)
    }
}

fn at(e: &Event) -> Instant {
    match e {
        Event::Acquired { at, .. }
        | Event::Ended { at, .. }
        | Event::Write { at, .. }
        | Event::LeaseGone { at, .. }
        | Event::Passed { at, .. }
        | Event::Waiting { at, .. }
        | Event::GaveUp { at, .. }
        | Event::Participant { at, .. } => *at,
    }
}

/// One "believes it holds" interval.
#[derive(Debug, Clone, Copy)]
struct Interval {
    client: usize,
    token: i64,
    lease: i64,
    mode: Mode,
    start: Instant,
    /// `None` while still held at the end of the history.
    end: Option<Instant>,
}

impl Interval {
    fn ended_before(&self, t: Instant) -> bool {
        self.end.is_some_and(|end| end <= t)
    }

    fn describe(&self) -> String {
        let mode = match self.mode {
            Mode::Exclusive => "",
            Mode::Shared => ", shared",
        };
        format!("client {} (token {}{mode})", self.client, self.token)
    }
}

/// The intervals of a history sorted by time, in acquisition order.
fn intervals(events: &[Event]) -> Vec<Interval> {
    let mut out: Vec<Interval> = Vec::new();
    for e in events {
        match e {
            Event::Acquired {
                client,
                token,
                lease,
                mode,
                at,
            } => out.push(Interval {
                client: *client,
                token: *token,
                lease: *lease,
                mode: *mode,
                start: *at,
                end: None,
            }),
            Event::Ended { client, token, at } => {
                if let Some(iv) = out
                    .iter_mut()
                    .rev()
                    .find(|iv| iv.client == *client && iv.token == *token && iv.end.is_none())
                {
                    iv.end = Some(*at);
                }
            }
            _ => {}
        }
    }
    out
}

/// Checks a lock's history (events in any order; they are sorted by time).
pub fn check(events: &[Event]) -> Vec<Violation> {
    check_with(events, Rules::lock())
}

/// Checks a history under `rules` (events in any order; they are sorted by time).
pub fn check_with(events: &[Event], rules: Rules) -> Vec<Violation> {
    let mut events = events.to_vec();
    events.sort_by_key(at);
    let mut violations = Vec::new();
    let mut v = |property, detail: String| violations.push(Violation { property, detail });
    let ivs = intervals(&events);

    // (a) With one holder at a time, tokens strictly increase across successive exclusive
    // holders, and whoever starts after another ended (either exclusive) has the greater
    // token. With several permits, holders may return in any order: tokens are unique.
    if rules.holders == 1 {
        let exclusive: Vec<&Interval> = ivs.iter().filter(|i| i.mode == Mode::Exclusive).collect();
        for w in exclusive.windows(2) {
            // The same key taken back under its own lease, nobody in between: a resumed lock.
            let resumed = w[1].token == w[0].token && w[1].lease == w[0].lease;
            if w[1].token <= w[0].token && !resumed {
                v(
                    Property::TokenOrder,
                    format!(
                        "{} acquired after {} had acquired",
                        w[1].describe(),
                        w[0].describe()
                    ),
                );
            }
        }
        for (i, later) in ivs.iter().enumerate() {
            for earlier in &ivs[..i] {
                let mixed = earlier.mode != later.mode;
                if mixed && earlier.ended_before(later.start) && later.token <= earlier.token {
                    v(
                        Property::TokenOrder,
                        format!(
                            "{} acquired after {} had ended",
                            later.describe(),
                            earlier.describe()
                        ),
                    );
                }
            }
        }
    } else {
        for (i, a) in ivs.iter().enumerate() {
            // A permit taken back by its own lease after it was let go is the same permit.
            let again = |b: &&Interval| b.lease == a.lease && a.ended_before(b.start);
            if let Some(b) = ivs[i + 1..]
                .iter()
                .find(|b| b.token == a.token && !again(b))
            {
                v(
                    Property::TokenOrder,
                    format!("{} and {} share a token", a.describe(), b.describe()),
                );
            }
        }
    }
    // (b) At no instant more than `holders` exclusive holders, nor an exclusive and a shared
    // one (an interval still open runs to the end of the history).
    for (i, b) in ivs.iter().enumerate() {
        let open: Vec<&Interval> = ivs[..i]
            .iter()
            .filter(|a| !a.ended_before(b.start) && a.start <= b.start)
            .collect();
        let exclusive = open.iter().filter(|a| a.mode == Mode::Exclusive).count();
        let clash = match b.mode {
            Mode::Exclusive => exclusive >= rules.holders || exclusive < open.len(),
            Mode::Shared => exclusive > 0,
        };
        if clash {
            let others: Vec<String> = open
                .iter()
                .filter(|a| a.mode == Mode::Exclusive || b.mode == Mode::Exclusive)
                .map(|a| a.describe())
                .collect();
            v(
                Property::Exclusion,
                format!(
                    "{} acquired while {} still believed they held",
                    b.describe(),
                    others.join(", ")
                ),
            );
        }
    }
    // (c) stale writes rejected.
    let mut highest: Option<i64> = None;
    for e in &events {
        if let Event::Write {
            client,
            token,
            accepted,
            ..
        } = e
        {
            if *accepted {
                if highest.is_some_and(|h| *token < h) {
                    v(Property::StaleWrite, format!("client {client}'s write with stale token {token} was accepted (highest accepted: {})", highest.unwrap_or(0)));
                }
                highest = Some(highest.map_or(*token, |h| h.max(*token)));
            }
        }
    }
    // (d) no acquisition after the session's lease was observed gone.
    for e in &events {
        if let Event::LeaseGone { lease, at: gone } = e {
            for iv in ivs
                .iter()
                .filter(|iv| iv.lease == *lease && iv.start > *gone)
            {
                v(
                    Property::AfterLeaseGone,
                    format!(
                        "{} acquired after its lease {lease:x} was gone",
                        iv.describe()
                    ),
                );
            }
        }
    }
    // (e) no wait passed while an exclusive holder believed it held from before the call to
    // after the return (the holder's key existed throughout: there was no moment to pass).
    for e in &events {
        if let Event::Passed { client, called, at } = e {
            for iv in ivs.iter().filter(|iv| {
                iv.mode == Mode::Exclusive
                    && iv.start < *called
                    && iv.end.is_none_or(|end| *at < end)
            }) {
                v(
                    Property::PassedWhileHeld,
                    format!(
                        "client {client}'s wait passed while {} held throughout",
                        iv.describe()
                    ),
                );
            }
        }
    }
    violations
}

/// One `enter()` … `leave()` of a double-barrier participant.
#[derive(Debug, Clone, Copy)]
struct Participation {
    client: usize,
    lease: i64,
    entering: Instant,
    entered: Option<Instant>,
    leaving: Option<Instant>,
    left: Option<Instant>,
}

/// How late the lease observer may see a lease gone (it polls).
const OBSERVER_LAG: std::time::Duration = std::time::Duration::from_millis(500);

/// Checks a double barrier's history for `count` participants: properties (f) and (g) of the
/// module docs (events in any order; they are sorted by time).
pub fn check_double_barrier(events: &[Event], count: usize) -> Vec<Violation> {
    let mut events = events.to_vec();
    events.sort_by_key(at);
    let mut ps: Vec<Participation> = Vec::new();
    let mut gone: std::collections::HashMap<i64, Instant> = std::collections::HashMap::new();
    for e in &events {
        let (client, lease, step, t) = match e {
            Event::LeaseGone { lease, at } => {
                gone.entry(*lease).or_insert(*at);
                continue;
            }
            Event::Participant {
                client,
                lease,
                step,
                at,
            } => (*client, *lease, *step, *at),
            _ => continue,
        };
        if step == Step::Entering {
            ps.push(Participation {
                client,
                lease,
                entering: t,
                entered: None,
                leaving: None,
                left: None,
            });
            continue;
        }
        if let Some(p) = ps
            .iter_mut()
            .rev()
            .find(|p| p.client == client && p.lease == lease)
        {
            match step {
                Step::Entering => {}
                Step::Entered => p.entered = Some(t),
                Step::Leaving => p.leaving = Some(t),
                Step::Left => p.left = Some(t),
            }
        }
    }
    // A participant's key exists at most from its enter() call until its leave() returned or
    // its lease was seen gone.
    let span = |p: &Participation| {
        let end = [p.left, gone.get(&p.lease).copied()]
            .into_iter()
            .flatten()
            .min();
        (p.entering, end)
    };
    let mut violations = Vec::new();
    for (i, p) in ps.iter().enumerate() {
        // (f)
        if let Some(entered) = p.entered {
            let inside_at = |t: Instant| {
                ps.iter()
                    .filter(|q| {
                        let (start, end) = span(q);
                        start <= t && end.is_none_or(|end| end > t)
                    })
                    .count()
            };
            let met = std::iter::once(p.entering)
                .chain(
                    ps.iter()
                        .map(|q| q.entering)
                        .filter(|&t| t >= p.entering && t <= entered),
                )
                .any(|t| inside_at(t) >= count);
            if !met {
                violations.push(Violation {
                    property: Property::EarlyEnter,
                    detail: format!(
                        "client {} (lease {:x}) passed enter() while fewer than {count} were in",
                        p.client, p.lease
                    ),
                });
            }
        }
        // (g)
        if let (Some(leaving), Some(left)) = (p.leaving, p.left) {
            for (j, q) in ps.iter().enumerate() {
                if i == j || q.entered.is_none_or(|e| e >= leaving) {
                    continue;
                }
                let q_left = q.leaving.is_some_and(|l| l <= left);
                let q_gone = gone
                    .get(&q.lease)
                    .is_some_and(|g| *g <= left + OBSERVER_LAG);
                if !q_left && !q_gone {
                    violations.push(Violation {
                        property: Property::EarlyLeave,
                        detail: format!(
                            "client {}'s leave() returned while client {} (lease {:x}) was still in",
                            p.client, q.client, q.lease
                        ),
                    });
                }
            }
        }
    }
    violations
}

/// Checks liveness, property (h) of the module docs: `healed` is when the last fault healed,
/// `end` when the history ends (its clients were still running until then). A wait that started
/// at `s` must end by `max(s, healed) + bound`; a wait that cannot have reached that point by
/// `end` is not judged. Events in any order; they are sorted by time.
pub fn check_liveness(
    events: &[Event],
    healed: Instant,
    bound: Duration,
    end: Instant,
) -> Vec<Violation> {
    let mut events = events.to_vec();
    events.sort_by_key(at);
    // Each client's open wait, by when it started.
    let mut open: std::collections::HashMap<usize, Instant> = std::collections::HashMap::new();
    let mut violations = Vec::new();
    let mut judge = |client: usize, start: Instant, stop: Option<Instant>| {
        let due = start.max(healed) + bound;
        if due > end {
            return;
        }
        if stop.is_none_or(|stop| stop > due) {
            let until = match stop {
                Some(stop) => format!(
                    "{:?} after the heal",
                    stop.saturating_duration_since(healed)
                ),
                None => "the end".to_owned(),
            };
            violations.push(Violation {
                property: Property::Starved,
                detail: format!(
                    "client {client} waited from {:?} after the heal until {until}, longer than {bound:?}",
                    start.saturating_duration_since(healed)
                ),
            });
        }
    };
    for e in &events {
        let (client, t, starts) = match e {
            Event::Waiting { client, at } => (*client, *at, true),
            Event::Participant {
                client, step, at, ..
            } => (*client, *at, matches!(step, Step::Entering | Step::Leaving)),
            Event::Acquired { client, at, .. }
            | Event::Passed { client, at, .. }
            | Event::GaveUp { client, at } => (*client, *at, false),
            _ => continue,
        };
        if let Some(start) = open.remove(&client) {
            judge(client, start, Some(t));
        }
        if starts {
            open.insert(client, t);
        }
    }
    for (client, start) in open {
        judge(client, start, None);
    }
    violations
}

/// An in-memory protected resource: accepts a write only if its token is at least the highest
/// it has accepted. Pair it with [`History::write`].
#[derive(Debug, Clone, Default)]
pub struct FencedRegister {
    highest: Arc<Mutex<i64>>,
}

impl FencedRegister {
    /// An empty register.
    pub fn new() -> FencedRegister {
        FencedRegister::default()
    }

    /// Writes with `token`; `true` if accepted.
    pub fn write(&self, token: i64) -> bool {
        let mut h = self.highest.lock().unwrap_or_else(|e| e.into_inner());
        if token >= *h {
            *h = token;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn t0() -> Instant {
        Instant::now()
    }

    fn ms(base: Instant, n: u64) -> Instant {
        base + Duration::from_millis(n)
    }

    fn acq(client: usize, token: i64, mode: Mode, at: Instant) -> Event {
        Event::Acquired {
            client,
            token,
            lease: client as i64,
            mode,
            at,
        }
    }

    fn end(client: usize, token: i64, at: Instant) -> Event {
        Event::Ended { client, token, at }
    }

    /// Whether checking `h` as a lock reports `property`.
    fn caught(h: &[Event], property: Property) -> bool {
        check(h).iter().any(|v| v.property == property)
    }

    fn write(client: usize, token: i64, accepted: bool, at: Instant) -> Event {
        Event::Write {
            client,
            token,
            accepted,
            at,
        }
    }

    #[test]
    fn a_safe_history_passes() {
        let b = t0();
        let h = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            write(1, 10, true, ms(b, 1)),
            end(1, 10, ms(b, 2)),
            acq(2, 12, Mode::Exclusive, ms(b, 3)),
            write(1, 10, false, ms(b, 4)),
            write(2, 12, true, ms(b, 5)),
            end(2, 12, ms(b, 6)),
        ];
        assert_eq!(check(&h), vec![]);
    }

    #[test]
    fn overlapping_holders_are_caught() {
        let b = t0();
        let h = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            acq(2, 12, Mode::Exclusive, ms(b, 1)),
            end(1, 10, ms(b, 2)),
        ];
        let found = check(&h);
        assert!(
            found.iter().any(|v| v.property == Property::Exclusion),
            "{found:?}"
        );
    }

    #[test]
    fn a_lock_resumed_by_its_own_lease_keeps_its_token_but_not_past_another_holder() {
        let b = t0();
        // Client 1's process dies holding 10; its restart (same lease) takes 10 back.
        let resumed = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            end(1, 10, ms(b, 1)),
            acq(1, 10, Mode::Exclusive, ms(b, 2)),
            end(1, 10, ms(b, 3)),
            acq(2, 12, Mode::Exclusive, ms(b, 4)),
        ];
        assert_eq!(check(&resumed), vec![]);
        // Another lease with the same token is no resumption.
        let stolen = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            end(1, 10, ms(b, 1)),
            acq(2, 10, Mode::Exclusive, ms(b, 2)),
        ];
        assert!(caught(&stolen, Property::TokenOrder));
        // Taken back after someone else held: caught.
        let late = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            end(1, 10, ms(b, 1)),
            acq(2, 12, Mode::Exclusive, ms(b, 2)),
            end(2, 12, ms(b, 3)),
            acq(1, 10, Mode::Exclusive, ms(b, 4)),
        ];
        assert!(caught(&late, Property::TokenOrder));
    }

    #[test]
    fn a_permit_resumed_by_its_own_lease_keeps_its_token_but_another_lease_may_not_share_it() {
        let b = t0();
        let rules = Rules::semaphore(2);
        let resumed = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            acq(2, 12, Mode::Exclusive, ms(b, 1)),
            end(1, 10, ms(b, 2)),
            acq(1, 10, Mode::Exclusive, ms(b, 3)),
        ];
        assert_eq!(check_with(&resumed, rules), vec![]);
        let shared = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            end(1, 10, ms(b, 1)),
            acq(2, 10, Mode::Exclusive, ms(b, 2)),
        ];
        assert!(check_with(&shared, rules)
            .iter()
            .any(|v| v.property == Property::TokenOrder));
        // Held twice at once by the same lease: not a resumption.
        let twice = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            acq(1, 10, Mode::Exclusive, ms(b, 1)),
        ];
        assert!(check_with(&twice, rules)
            .iter()
            .any(|v| v.property == Property::TokenOrder));
    }

    #[test]
    fn a_token_that_does_not_increase_is_caught() {
        let b = t0();
        let h = [
            acq(1, 12, Mode::Exclusive, ms(b, 0)),
            end(1, 12, ms(b, 1)),
            acq(2, 10, Mode::Exclusive, ms(b, 2)),
        ];
        assert!(caught(&h, Property::TokenOrder));
    }

    #[test]
    fn an_accepted_stale_write_is_caught() {
        let b = t0();
        let h = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            end(1, 10, ms(b, 1)),
            acq(2, 12, Mode::Exclusive, ms(b, 2)),
            write(2, 12, true, ms(b, 3)),
            write(1, 10, true, ms(b, 4)),
        ];
        let found = check(&h);
        assert!(
            found.iter().any(|v| v.property == Property::StaleWrite),
            "{found:?}"
        );
    }

    #[test]
    fn an_acquisition_after_the_lease_was_gone_is_caught() {
        let b = t0();
        // acq() gives client 7 the lease 7.
        let h = [
            Event::LeaseGone {
                lease: 7,
                at: ms(b, 0),
            },
            acq(7, 10, Mode::Exclusive, ms(b, 1)),
        ];
        assert!(caught(&h, Property::AfterLeaseGone));
    }

    #[test]
    fn a_semaphore_admits_up_to_its_permits_and_no_more() {
        let b = t0();
        let two = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            acq(2, 11, Mode::Exclusive, ms(b, 1)),
            end(1, 10, ms(b, 2)),
            acq(3, 12, Mode::Exclusive, ms(b, 3)),
        ];
        assert_eq!(check_with(&two, Rules::semaphore(2)), vec![]);
        // The same history breaks a lock.
        assert!(caught(&two, Property::Exclusion));
        let three = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            acq(2, 11, Mode::Exclusive, ms(b, 1)),
            acq(3, 12, Mode::Exclusive, ms(b, 2)),
        ];
        let found = check_with(&three, Rules::semaphore(2));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].property, Property::Exclusion);
    }

    #[test]
    fn semaphore_holders_may_return_out_of_token_order_but_not_share_a_token() {
        let b = t0();
        let late = [
            acq(2, 12, Mode::Exclusive, ms(b, 0)),
            end(2, 12, ms(b, 1)),
            acq(1, 11, Mode::Exclusive, ms(b, 2)),
        ];
        assert_eq!(check_with(&late, Rules::semaphore(2)), vec![]);
        let shared_token = [
            acq(1, 11, Mode::Exclusive, ms(b, 0)),
            acq(2, 11, Mode::Exclusive, ms(b, 1)),
        ];
        assert!(check_with(&shared_token, Rules::semaphore(2))
            .iter()
            .any(|v| v.property == Property::TokenOrder));
    }

    #[test]
    fn readers_share_but_never_with_a_writer() {
        let b = t0();
        let readers = [
            acq(1, 10, Mode::Shared, ms(b, 0)),
            acq(2, 11, Mode::Shared, ms(b, 1)),
            end(1, 10, ms(b, 2)),
            end(2, 11, ms(b, 3)),
            acq(3, 12, Mode::Exclusive, ms(b, 4)),
            end(3, 12, ms(b, 5)),
            acq(1, 13, Mode::Shared, ms(b, 6)),
        ];
        assert_eq!(check(&readers), vec![]);
        let writer_among_readers = [
            acq(1, 10, Mode::Shared, ms(b, 0)),
            acq(3, 12, Mode::Exclusive, ms(b, 1)),
        ];
        assert!(caught(&writer_among_readers, Property::Exclusion));
        let reader_during_writer = [
            acq(3, 12, Mode::Exclusive, ms(b, 0)),
            acq(1, 13, Mode::Shared, ms(b, 1)),
        ];
        assert!(caught(&reader_during_writer, Property::Exclusion));
    }

    #[test]
    fn a_reader_after_a_writer_with_a_lower_token_is_caught() {
        let b = t0();
        let h = [
            acq(3, 12, Mode::Exclusive, ms(b, 0)),
            end(3, 12, ms(b, 1)),
            acq(1, 9, Mode::Shared, ms(b, 2)),
        ];
        assert!(caught(&h, Property::TokenOrder));
    }

    #[test]
    fn a_wait_that_passed_while_the_barrier_was_up_throughout_is_caught() {
        let b = t0();
        let ok = [
            // Called before the hold began: it may have seen the barrier down.
            acq(1, 10, Mode::Exclusive, ms(b, 5)),
            Event::Passed {
                client: 2,
                called: ms(b, 0),
                at: ms(b, 6),
            },
            // Returned after the hold ended.
            Event::Passed {
                client: 3,
                called: ms(b, 7),
                at: ms(b, 9),
            },
            end(1, 10, ms(b, 8)),
        ];
        assert_eq!(check(&ok), vec![]);
        let bad = [
            acq(1, 10, Mode::Exclusive, ms(b, 0)),
            Event::Passed {
                client: 2,
                called: ms(b, 1),
                at: ms(b, 2),
            },
            end(1, 10, ms(b, 3)),
        ];
        assert!(caught(&bad, Property::PassedWhileHeld));
    }

    fn db(step: Step, client: usize, at: Instant) -> Event {
        Event::Participant {
            client,
            lease: client as i64,
            step,
            at,
        }
    }

    #[test]
    fn a_double_barrier_round_passes_and_early_passes_are_caught() {
        let b = t0();
        let round = [
            db(Step::Entering, 1, ms(b, 0)),
            db(Step::Entering, 2, ms(b, 1)),
            db(Step::Entered, 1, ms(b, 2)),
            db(Step::Entered, 2, ms(b, 2)),
            db(Step::Leaving, 1, ms(b, 3)),
            db(Step::Leaving, 2, ms(b, 4)),
            db(Step::Left, 2, ms(b, 5)),
            db(Step::Left, 1, ms(b, 5)),
        ];
        assert_eq!(check_double_barrier(&round, 2), vec![]);
        // Client 1 passes enter alone …
        let early_enter = [
            db(Step::Entering, 1, ms(b, 0)),
            db(Step::Entered, 1, ms(b, 1)),
            db(Step::Entering, 2, ms(b, 2)),
            db(Step::Entered, 2, ms(b, 3)),
        ];
        let found = check_double_barrier(&early_enter, 2);
        assert!(
            found.iter().any(|v| v.property == Property::EarlyEnter),
            "{found:?}"
        );
        // … or leaves while client 2 has not called leave().
        let early_leave = [
            db(Step::Entering, 1, ms(b, 0)),
            db(Step::Entering, 2, ms(b, 1)),
            db(Step::Entered, 1, ms(b, 2)),
            db(Step::Entered, 2, ms(b, 2)),
            db(Step::Leaving, 1, ms(b, 3)),
            db(Step::Left, 1, ms(b, 4)),
            db(Step::Leaving, 2, ms(b, 5)),
        ];
        let found = check_double_barrier(&early_leave, 2);
        assert!(
            found.iter().any(|v| v.property == Property::EarlyLeave),
            "{found:?}"
        );
        // A participant whose lease is gone counts as having left.
        let mut lost = early_leave.to_vec();
        lost.push(Event::LeaseGone {
            lease: 2,
            at: ms(b, 4),
        });
        assert_eq!(check_double_barrier(&lost, 2), vec![]);
    }

    #[test]
    fn waits_that_outlast_the_bound_after_the_heal_are_caught() {
        let b = t0();
        let healed = ms(b, 1_000);
        let bound = Duration::from_millis(500);
        let end = ms(b, 3_000);
        let waiting = |client, at| Event::Waiting { client, at };
        let ok = [
            // Waited through the faults, served soon after the heal.
            waiting(1, ms(b, 0)),
            acq(1, 10, Mode::Exclusive, ms(b, 1_400)),
            // Started after the heal, served within the bound.
            waiting(2, ms(b, 2_000)),
            Event::Passed {
                client: 2,
                called: ms(b, 2_000),
                at: ms(b, 2_300),
            },
            // Gave up (its session was lost): the wait is over.
            waiting(3, ms(b, 1_100)),
            Event::GaveUp {
                client: 3,
                at: ms(b, 1_200),
            },
            // Still waiting at the end, but not yet due.
            waiting(4, ms(b, 2_800)),
            db(Step::Entering, 5, ms(b, 1_000)),
            db(Step::Entered, 5, ms(b, 1_100)),
            db(Step::Leaving, 5, ms(b, 1_200)),
            db(Step::Left, 5, ms(b, 1_300)),
        ];
        assert_eq!(check_liveness(&ok, healed, bound, end), vec![]);
        let starved = [
            waiting(1, ms(b, 0)),
            acq(1, 10, Mode::Exclusive, ms(b, 1_600)),
            waiting(2, ms(b, 2_000)),
            db(Step::Entering, 3, ms(b, 1_000)),
            db(Step::Entered, 3, ms(b, 1_100)),
            db(Step::Leaving, 3, ms(b, 1_200)),
        ];
        let found = check_liveness(&starved, healed, bound, end);
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found.iter().all(|v| v.property == Property::Starved));
    }

    #[test]
    fn the_register_rejects_lower_tokens() {
        let r = FencedRegister::new();
        assert!(r.write(5));
        assert!(r.write(5));
        assert!(!r.write(4));
        assert!(r.write(9));
        assert!(!r.write(5));
    }
}
