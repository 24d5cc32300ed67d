//! A safety and liveness checker for coordination primitives, after Jepsen's lock checker:
//! record what every client believed and did, then verify the history.
//!
//! Record, from one process (one monotonic clock) — or from several, placing their readings of
//! `CLOCK_MONOTONIC` on one timeline (the chaos suite's client processes do):
//! - [`History::acquired`] when an exclusive acquisition returned (a mutex, a leadership, a
//!   semaphore permit, a write lock, a barrier held up), with its fencing token and lease;
//!   [`History::acquired_shared`] for a shared one (a read lock);
//! - [`History::ended`] when the client stopped believing it holds (its `lost()` fired, or it
//!   released);
//! - [`History::write`] for every write through a protected resource of your own, and whether
//!   the resource accepted it — or, for a resource in etcd, read back what etcd holds and check
//!   it with [`check_accepted_writes`];
//! - [`History::lease_gone`] when the server side observed a lease end (e.g. an observer saw its
//!   keys deleted);
//! - [`History::passed`] when a wait for the resource to be free (a barrier's `wait()`)
//!   returned, with the instant it was called;
//! - [`History::paused`] when a client's process was stopped (SIGSTOP) and continued.
//!
//! [`History::check`] then verifies, for a lock ([`Rules::lock`]):
//! - (a) fencing tokens strictly increase across successive exclusive holders, and a holder
//!   that starts after another ended (one of them exclusive) has the greater token — except
//!   that a lock taken back by its own lease right after it was let go (a resumed lock:
//!   `Mutex::resume`) keeps its token;
//! - (b) no two "believes it holds" intervals overlap, except shared with shared — and except
//!   a holder whose process was paused (SIGSTOP) when the other acquired, if it stopped
//!   believing within [`PAUSE_GRACE`] of being continued: no lease scheme can stop a frozen
//!   process from believing, only fencing protects from it (property (c));
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
//! Liveness ([`check_liveness`]): record [`History::waiting`] when a client starts to want
//! something (an acquisition, a barrier's wait, a double barrier's enter or leave — and before
//! it even has a session); acquisitions, passes and the double barrier's `Entered`/`Left`
//! steps serve it. [`History::gave_up`] (an error, a lost session) does **not**: the client
//! still wants, and the clock keeps running. [`History::exited`] (its process was killed, or
//! stopped) ends the want unjudged. Then, given when the last fault healed:
//! - (h) every want is served within a bound of the later of its start and the heal.
//!
//! Keys ([`KeyAudit`]): sample the keys of the primitives under test now and then:
//! - (i) no key stays without a holder — no open acquisition holds its token, no client that
//!   still wants waits on its lease — for longer than a bound after the later of the moment it
//!   was first seen so and the heal (a lease of a live session keeps a key nobody holds; or a
//!   dead session's lease outlives its TTL).
//!
//! Observers ([`check_observers`]): record [`History::observed`] for every leadership change
//! an observer (`Election::observe`) reports:
//! - (j) an observer never reports an older leader after a newer one (fencing tokens), and
//!   after the heal it reports every leader that anyone acquired.
//!
//! Work queues ([`check_queue`]): record [`Event::JobEnqueuing`] and [`Event::JobEnqueued`]
//! around every enqueue, [`Event::JobClaimed`] at every claim, [`Event::JobAcked`] for every
//! acknowledgement etcd accepted (or may have), [`Event::Ended`] when a claimer stops
//! believing it holds its claim; at the end read what is left in etcd ([`QueueEnd`]):
//! - (k) no job is lost; (l) every job is acknowledged once, through its newest claim;
//!   (m) no two claimers hold one job at once; (n) after the heal every ready job is claimed
//!   within a bound; (o) one enqueue adds one job.
//!
//! [`FencedRegister`] is an in-memory protected resource that rejects tokens lower than the
//! highest it has seen.

mod barrier;
mod history;
mod holders;
mod keys;
mod liveness;
mod observers;
mod queue;
mod writes;

use std::time::{Duration, Instant};

pub use barrier::check_double_barrier;
pub use history::History;
pub use holders::{check, check_with};
pub use keys::{KeyAudit, SeenKey};
pub use liveness::check_liveness;
pub use observers::check_observers;
pub use queue::{check_queue, QueueEnd};
pub use writes::{check_accepted_writes, AcceptedWrite, FencedRegister};

/// How soon after being continued (SIGCONT) a holder whose process was paused must stop
/// believing it holds, for an overlap with a holder that acquired during the pause to be
/// excused (property (b)): its session's deadline passed during the pause, so its `lost()`
/// fires as soon as its threads run again.
pub const PAUSE_GRACE: Duration = Duration::from_secs(1);

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
    /// (h) After the faults healed, every want was served within the bound.
    Starved,
    /// (i) No key stayed without a holder for longer than the bound.
    OrphanKey,
    /// (j) Observers report leaders in order and, after the heal, every one.
    Observed,
    /// (k) A work queue's job was neither acknowledged nor left in etcd.
    JobLost,
    /// (l) A job was acknowledged twice, or through a claim that was no longer its newest.
    AckNotOnce,
    /// (m) Two claimers believed they held one job at once.
    ClaimShared,
    /// (n) After the faults healed, a ready job waited longer than the bound for a claim.
    JobStarved,
    /// (o) One enqueue (one idempotency key) added two jobs.
    EnqueuedTwice,
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
            Property::Observed => 'j',
            Property::JobLost => 'k',
            Property::AckNotOnce => 'l',
            Property::ClaimShared => 'm',
            Property::JobStarved => 'n',
            Property::EnqueuedTwice => 'o',
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
    /// `client` started to want something: an acquisition, a barrier's wait, a double
    /// barrier's enter or leave (a no-op while it already wants).
    Waiting {
        /// Who.
        client: usize,
        /// When.
        at: Instant,
    },
    /// An attempt of `client`'s failed (an error, a lost session). It still wants: this does
    /// not end its wait.
    GaveUp {
        /// Who.
        client: usize,
        /// When.
        at: Instant,
    },
    /// `client` is gone (its process was killed, or it was stopped): whatever it wanted is no
    /// longer judged.
    Exited {
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
    /// `client` works through a session with `lease` from now on (its previous sessions are
    /// over, for [`KeyAudit`]).
    Session {
        /// Who.
        client: usize,
        /// The session's lease.
        lease: i64,
        /// When.
        at: Instant,
    },
    /// `client`'s process was stopped (SIGSTOP) `from`, and continued (SIGCONT) `at`.
    Paused {
        /// Who.
        client: usize,
        /// When it was stopped.
        from: Instant,
        /// When it was continued.
        at: Instant,
    },
    /// Observer `observer` reported a leadership change: the leader's fencing token, or
    /// `None` (nobody leads). `fresh` marks the first report of a stream (re)started then.
    Observed {
        /// Which observer.
        observer: usize,
        /// The leader's fencing token (its key's create revision), or `None`.
        leader: Option<i64>,
        /// The first report of a (re)started stream.
        fresh: bool,
        /// When.
        at: Instant,
    },
    /// `client` starts to enqueue the job named `job` (a name unique to the job, e.g. its
    /// payload and idempotency key).
    JobEnqueuing {
        /// Who.
        client: usize,
        /// The job's name.
        job: String,
        /// When.
        at: Instant,
    },
    /// `client`'s enqueue of `job` returned the job's id.
    JobEnqueued {
        /// Who.
        client: usize,
        /// The job's name.
        job: String,
        /// Its id in the queue.
        id: String,
        /// When.
        at: Instant,
    },
    /// `client` claimed job `id` (named `job`) under `lease`: it believes it holds the job
    /// until an [`Event::Ended`] of `token`, the claim's fencing token.
    JobClaimed {
        /// Who.
        client: usize,
        /// The job's name.
        job: String,
        /// Its id in the queue.
        id: String,
        /// The claim's fencing token.
        token: i64,
        /// The claimer's session lease.
        lease: i64,
        /// Which delivery (1 the first time).
        attempt: u32,
        /// When.
        at: Instant,
    },
    /// etcd accepted `client`'s acknowledgement through the claim `token` (`certain`), or its
    /// answer was lost and it may have.
    JobAcked {
        /// Who.
        client: usize,
        /// The claim's fencing token.
        token: i64,
        /// Whether etcd's answer said it applied.
        certain: bool,
        /// When.
        at: Instant,
    },
}

impl Event {
    /// When it happened (for [`Event::Paused`], when the process was continued).
    pub fn at(&self) -> Instant {
        match self {
            Event::Acquired { at, .. }
            | Event::Ended { at, .. }
            | Event::Write { at, .. }
            | Event::LeaseGone { at, .. }
            | Event::Passed { at, .. }
            | Event::Waiting { at, .. }
            | Event::GaveUp { at, .. }
            | Event::Exited { at, .. }
            | Event::Session { at, .. }
            | Event::Paused { at, .. }
            | Event::Observed { at, .. }
            | Event::Participant { at, .. }
            | Event::JobEnqueuing { at, .. }
            | Event::JobEnqueued { at, .. }
            | Event::JobClaimed { at, .. }
            | Event::JobAcked { at, .. } => *at,
        }
    }
}

/// The events sorted by time.
fn sorted(events: &[Event]) -> Vec<Event> {
    let mut events = events.to_vec();
    events.sort_by_key(Event::at);
    events
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

impl Violation {
    fn new(property: Property, detail: impl Into<String>) -> Violation {
        Violation {
            property,
            detail: detail.into(),
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Hand-made histories for the unit tests.
    use super::*;

    pub fn t0() -> Instant {
        Instant::now()
    }

    pub fn ms(base: Instant, n: u64) -> Instant {
        base + Duration::from_millis(n)
    }

    pub fn acq(client: usize, token: i64, mode: Mode, at: Instant) -> Event {
        Event::Acquired {
            client,
            token,
            lease: client as i64,
            mode,
            at,
        }
    }

    pub fn end(client: usize, token: i64, at: Instant) -> Event {
        Event::Ended { client, token, at }
    }

    pub fn write(client: usize, token: i64, accepted: bool, at: Instant) -> Event {
        Event::Write {
            client,
            token,
            accepted,
            at,
        }
    }

    pub fn db(step: Step, client: usize, at: Instant) -> Event {
        Event::Participant {
            client,
            lease: client as i64,
            step,
            at,
        }
    }

    /// Whether checking `h` as a lock reports `property`.
    pub fn caught(h: &[Event], property: Property) -> bool {
        check(h).iter().any(|v| v.property == property)
    }
}
