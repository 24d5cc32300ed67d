//! [`History`]: a thread-safe recorder of [`Event`]s.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{Event, Mode, Rules, Step, Violation};

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

    /// Records that `client` starts to want something now (a no-op for the liveness check
    /// while it already wants).
    pub fn waiting(&self, client: usize) {
        self.push(Event::Waiting {
            client,
            at: Instant::now(),
        });
    }

    /// Records that an attempt of `client`'s failed now (it still wants).
    pub fn gave_up(&self, client: usize) {
        self.push(Event::GaveUp {
            client,
            at: Instant::now(),
        });
    }

    /// Records that `client` is gone now (killed, or stopped): what it wanted is not judged.
    pub fn exited(&self, client: usize) {
        self.push(Event::Exited {
            client,
            at: Instant::now(),
        });
    }

    /// Records that `client` works through a session with `lease` from now on.
    pub fn session(&self, client: usize, lease: i64) {
        self.push(Event::Session {
            client,
            lease,
            at: Instant::now(),
        });
    }

    /// Records that `client`'s process, stopped at `from`, was continued now.
    pub fn paused(&self, client: usize, from: Instant) {
        self.push(Event::Paused {
            client,
            from,
            at: Instant::now(),
        });
    }

    /// Records that observer `observer` reported `leader` (a fencing token, or nobody) now;
    /// `fresh` for the first report of a (re)started stream.
    pub fn observed(&self, observer: usize, leader: Option<i64>, fresh: bool) {
        self.push(Event::Observed {
            observer,
            leader,
            fresh,
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
        super::check(&self.events())
    }

    /// Checks properties (a)–(e) under `rules`.
    pub fn check_with(&self, rules: Rules) -> Vec<Violation> {
        super::check_with(&self.events(), rules)
    }
}
