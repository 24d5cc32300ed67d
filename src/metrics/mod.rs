//! Metrics through the [`metrics`](https://docs.rs/metrics) facade: every name, label and label
//! value this crate records, in one place. Install any recorder (an exporter for Prometheus,
//! StatsD, OpenTelemetry, …) and they appear; without one every call is a no-op (the facade's
//! default), so a program that installs none pays next to nothing: the series recorded per
//! acquisition, guard, refresh or watch response build their keys from static names and
//! labels, without formatting or allocating.
//!
//! | name | type | labels | what |
//! |---|---|---|---|
//! | `etcd_coord_acquisitions_total` | counter | `kind`, `outcome` | acquisitions (and try-acquisitions) by how they ended |
//! | `etcd_coord_acquire_wait_seconds` | histogram | `kind`, `outcome` | from the call to its outcome |
//! | `etcd_coord_hold_seconds` | histogram | `kind` | from the acquisition to the guard's release or drop |
//! | `etcd_coord_guards_lost_total` | counter | `kind`, `cause` | guards found no longer holding (at most once per guard) |
//! | `etcd_coord_session_keepalive_rtt_seconds` | histogram | | a lease refresh's round trip |
//! | `etcd_coord_session_deadline_remaining_seconds` | histogram | | time left before the session's local deadline when a refresh was acknowledged |
//! | `etcd_coord_session_state_changes_total` | counter | `state` | sessions entering a state |
//! | `etcd_coord_session_losses_total` | counter | `reason` | sessions Lost, by reason |
//! | `etcd_coord_view_events_total` | counter | `view` | watch events a view (or `observe()`) applied |
//! | `etcd_coord_view_rereads_total` | counter | `view` | full re-reads after the watch's history was compacted away |
//! | `etcd_coord_view_lag_revisions` | histogram | `view` | revisions etcd was ahead of the view, at each watch response |
//! | `etcd_coord_request_retries_total` | counter | `cause` | requests sent again (and prefix watches re-opened) after a failure that may succeed again |
//!
//! Label values (bounded: no key, lease or endpoint ever becomes a label value):
//!
//! * `kind`: `mutex`, `semaphore`, `rwlock_read`, `rwlock_write`, `election`, `barrier`,
//!   `double_barrier`;
//! * `outcome`: `acquired`; `busy` (a try-acquisition found it taken, a barrier already up);
//!   `timeout` (given up by [`timeout`]); `cancelled` (the future was dropped
//!   before it finished: a `select!` that took another branch, `tokio::time::timeout`);
//!   `lost` (the waiter's key was deleted while it waited); `session_lost`; `failed` (any other
//!   error);
//! * `cause` of a lost guard: `key_gone` (its key deleted, expired or taken over by another
//!   client's put), `session_lost`, `session_closed`, `error` (`lost()` could not tell, e.g. a
//!   read was refused);
//! * `state`: `alive`, `suspended`, `lost`; `reason`: `deadline_exceeded`, `lease_gone`,
//!   `closed`, `keepalive_stopped`, `cleanup_failed`, `orphaned`;
//! * `view`: `discovery` (a [`ServiceView`](crate::discovery::ServiceView)), `election`
//!   ([`Election::observe`](crate::Election::observe) and the leader selector), `inspection`
//!   ([`Inspector::follow`](crate::inspect::Inspector::follow));
//! * `cause` of a retry: `timeout`, `unavailable`, `deadline_exceeded`, `cancelled`, `aborted`,
//!   `unknown`, `internal`, `too_many_requests`, `goaway` (an HTTP/2 GOAWAY with `ENHANCE_YOUR_CALM`: often a server whose `--grpc-keepalive-min-time` is above the client's keep-alive), `transport`, `io`, `watch_stream`, `other`.
//!
//! With [`set_name_labels(true)`](set_name_labels) the acquisition and guard metrics also carry
//! a `name` label: the primitive's name. Opt in only when the names are few and fixed.
//!
//! Every series is documented once more, for operators, in `docs/operations.md`.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use metrics::{counter, histogram, Key, Label, Metadata, SharedString, Unit};

use crate::error::{Error, LossReason};

/// Acquisitions by kind and outcome (counter).
pub const ACQUISITIONS: &str = "etcd_coord_acquisitions_total";
/// Time from an acquisition's call to its outcome, by kind and outcome (histogram, seconds).
pub const ACQUIRE_WAIT: &str = "etcd_coord_acquire_wait_seconds";
/// Time from an acquisition to its guard's release or drop, by kind (histogram, seconds).
pub const HOLD: &str = "etcd_coord_hold_seconds";
/// Guards found no longer holding, by kind and cause (counter).
pub const GUARDS_LOST: &str = "etcd_coord_guards_lost_total";
/// A lease refresh's round trip (histogram, seconds).
pub const KEEPALIVE_RTT: &str = "etcd_coord_session_keepalive_rtt_seconds";
/// Time left before a session's local deadline when a refresh was acknowledged (histogram,
/// seconds): how close the session came to being Lost.
pub const DEADLINE_REMAINING: &str = "etcd_coord_session_deadline_remaining_seconds";
/// Sessions entering a state, by state (counter).
pub const SESSION_STATE_CHANGES: &str = "etcd_coord_session_state_changes_total";
/// Sessions Lost, by reason (counter).
pub const SESSION_LOSSES: &str = "etcd_coord_session_losses_total";
/// Watch events applied by views, by view (counter).
pub const VIEW_EVENTS: &str = "etcd_coord_view_events_total";
/// Full re-reads of views after compaction, by view (counter).
pub const VIEW_REREADS: &str = "etcd_coord_view_rereads_total";
/// Revisions etcd was ahead of a view at each watch response, by view (histogram).
pub const VIEW_LAG: &str = "etcd_coord_view_lag_revisions";
/// Requests sent again after a failure that may succeed again, by cause (counter).
pub const REQUEST_RETRIES: &str = "etcd_coord_request_retries_total";

/// Every metric this crate records.
pub const NAMES: [&str; 12] = [
    ACQUISITIONS,
    ACQUIRE_WAIT,
    HOLD,
    GUARDS_LOST,
    KEEPALIVE_RTT,
    DEADLINE_REMAINING,
    SESSION_STATE_CHANGES,
    SESSION_LOSSES,
    VIEW_EVENTS,
    VIEW_REREADS,
    VIEW_LAG,
    REQUEST_RETRIES,
];

static NAME_LABELS: AtomicBool = AtomicBool::new(false);

/// Whether acquisition and guard metrics carry a `name` label with the primitive's name (off
/// by default: names are unbounded, and every distinct value is a series of its own). Applies
/// to acquisitions started after the call.
pub fn set_name_labels(on: bool) {
    NAME_LABELS.store(on, Ordering::Relaxed);
}

/// Describes every metric (help text and unit) to the installed recorder, for exporters that
/// publish descriptions (Prometheus' `# HELP`). Call it once after installing the recorder;
/// recording works without it.
pub fn describe() {
    use metrics::{describe_counter, describe_histogram};
    describe_counter!(ACQUISITIONS, "acquisitions by kind and outcome");
    describe_histogram!(
        ACQUIRE_WAIT,
        Unit::Seconds,
        "time from an acquisition's call to its outcome"
    );
    describe_histogram!(
        HOLD,
        Unit::Seconds,
        "time from an acquisition to its guard's release or drop"
    );
    describe_counter!(GUARDS_LOST, "guards found no longer holding, by cause");
    describe_histogram!(KEEPALIVE_RTT, Unit::Seconds, "lease refresh round trip");
    describe_histogram!(
        DEADLINE_REMAINING,
        Unit::Seconds,
        "time left before the session's local deadline when a refresh was acknowledged"
    );
    describe_counter!(SESSION_STATE_CHANGES, "sessions entering a state");
    describe_counter!(SESSION_LOSSES, "sessions lost, by reason");
    describe_counter!(VIEW_EVENTS, "watch events applied by views");
    describe_counter!(VIEW_REREADS, "full re-reads of views after compaction");
    describe_histogram!(
        VIEW_LAG,
        "revisions etcd was ahead of a view at each watch response"
    );
    describe_counter!(
        REQUEST_RETRIES,
        "requests sent again after a transient failure, by cause"
    );
}

/// Kinds of acquisition (the `kind` label), in the order of [`KIND_LABELS`]' rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AcquisitionKind {
    Mutex,
    Semaphore,
    RwLockRead,
    RwLockWrite,
    Election,
    Barrier,
    DoubleBarrier,
}

/// How an acquisition ended (the `outcome` label), in the order of [`KIND_OUTCOME_LABELS`]'
/// columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Acquired,
    Busy,
    Timeout,
    Cancelled,
    Lost,
    SessionLost,
    Failed,
}

impl Outcome {
    /// The outcome of an acquisition that failed with `error`.
    pub(crate) fn of_error(error: &Error) -> Outcome {
        match error {
            Error::LockLost { .. } => Outcome::Lost,
            Error::SessionLost(_) | Error::SessionClosed => Outcome::SessionLost,
            Error::AlreadyHeld { .. } => Outcome::Busy,
            _ => Outcome::Failed,
        }
    }
}

/// Why a guard was found no longer holding (the `cause` label of [`GUARDS_LOST`]), in the
/// order of [`KIND_CAUSE_LABELS`]' columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LossCause {
    KeyGone,
    SessionLost,
    SessionClosed,
    Error,
}

/// Which kind of view follows a prefix (the `view` label), in the order of [`VIEW_LABELS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum View {
    Discovery,
    Election,
    Inspection,
}

// Every label set the per-acquisition, per-guard and per-watch-response series use, built at
// compile time: recording one builds its `Key` from a static name and static labels, without
// allocating or formatting — and with no recorder installed, the facade's no-op recorder
// returns a no-op handle for it. (Only the opt-in `name` label allocates.)

/// `[kind, outcome]` for each acquisition kind (rows) and outcome (columns).
macro_rules! grid {
    ($key:literal: $($value:literal),*; $col_key:literal: $cols:tt) => {
        [$(grid!(@row $key, $value; $col_key: $cols)),*]
    };
    (@row $key:literal, $value:literal; $col_key:literal: [$($col:literal),*]) => {
        [$([Label::from_static_parts($key, $value), Label::from_static_parts($col_key, $col)]),*]
    };
}

/// The `kind` label values, by [`AcquisitionKind`].
macro_rules! kinds {
    ($($then:tt)*) => {
        grid!("kind": "mutex", "semaphore", "rwlock_read", "rwlock_write", "election", "barrier", "double_barrier"; $($then)*)
    };
}

static KIND_OUTCOME_LABELS: [[[Label; 2]; 7]; 7] = kinds!("outcome": [
    "acquired", "busy", "timeout", "cancelled", "lost", "session_lost", "failed"
]);
static KIND_CAUSE_LABELS: [[[Label; 2]; 4]; 7] = kinds!("cause": [
    "key_gone", "session_lost", "session_closed", "error"
]);
static KIND_LABELS: [[Label; 1]; 7] = [
    [Label::from_static_parts("kind", "mutex")],
    [Label::from_static_parts("kind", "semaphore")],
    [Label::from_static_parts("kind", "rwlock_read")],
    [Label::from_static_parts("kind", "rwlock_write")],
    [Label::from_static_parts("kind", "election")],
    [Label::from_static_parts("kind", "barrier")],
    [Label::from_static_parts("kind", "double_barrier")],
];
static VIEW_LABELS: [[Label; 1]; 3] = [
    [Label::from_static_parts("view", "discovery")],
    [Label::from_static_parts("view", "election")],
    [Label::from_static_parts("view", "inspection")],
];

/// What the facade's macros pass along with a key: where it was recorded.
static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// The series `name` with the static `labels`, plus a `name` label when one is given (the
/// opt-in of [`set_name_labels`], which allocates).
fn key(name: &'static str, labels: &'static [Label], primitive: Option<&SharedString>) -> Key {
    match primitive {
        None => Key::from_static_parts(name, labels),
        Some(primitive) => Key::from_static_parts(name, labels)
            .with_extra_labels(vec![Label::new("name", primitive.clone())]),
    }
}

fn count(key: &Key, n: u64) {
    metrics::with_recorder(|r| r.register_counter(key, &METADATA)).increment(n);
}

fn observe(key: &Key, value: f64) {
    metrics::with_recorder(|r| r.register_histogram(key, &METADATA)).record(value);
}

fn name_label(name: &str) -> Option<SharedString> {
    NAME_LABELS
        .load(Ordering::Relaxed)
        .then(|| SharedString::from(name.to_owned()))
}

thread_local! {
    /// Set while [`timeout`] drops a future whose time is up: an acquisition dropped then
    /// timed out rather than being cancelled.
    static EXPIRING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `fut` for at most `limit`: its output, or `None` once `limit` has passed (the future is
/// then dropped — every acquisition of this crate is cancel-safe). The same as
/// `tokio::time::timeout`, except that `limit` runs from the first poll, not from the call,
/// and that an acquisition it gives up on is counted with `outcome="timeout"` rather than
/// `"cancelled"` in [`ACQUISITIONS`].
///
/// ```no_run
/// # async fn demo(mutex: etcd_coord::Mutex) -> Result<(), etcd_coord::Error> {
/// use std::time::Duration;
///
/// match etcd_coord::timeout(Duration::from_secs(5), mutex.lock()).await {
///     Some(guard) => guard?.release().await?,
///     None => eprintln!("still held by someone else after 5 s"),
/// }
/// # Ok(()) }
/// ```
pub fn timeout<F: Future>(limit: Duration, fut: F) -> impl Future<Output = Option<F::Output>> {
    // Boxed before the async block takes it: an `async fn` would keep `fut` inline as its
    // argument beside the box.
    let mut fut = Box::pin(fut);
    async move {
        tokio::select! {
            biased;
            out = fut.as_mut() => Some(out),
            () = tokio::time::sleep(limit) => {
                EXPIRING.with(|e| e.set(true));
                drop(fut);
                EXPIRING.with(|e| e.set(false));
                None
            }
        }
    }
}

/// One acquisition being measured: created when it starts, [`finish`](Self::finish)ed with
/// its outcome; dropped unfinished, it was cancelled (or timed out, inside [`timeout`]).
pub(crate) struct Acquisition {
    kind: AcquisitionKind,
    name: Option<SharedString>,
    start: Instant,
    done: bool,
}

impl Acquisition {
    pub(crate) fn start(kind: AcquisitionKind, name: &str) -> Acquisition {
        Acquisition {
            kind,
            name: name_label(name),
            start: Instant::now(),
            done: false,
        }
    }

    /// Records the outcome and the time since the start.
    pub(crate) fn finish(mut self, outcome: Outcome) {
        self.record(outcome);
    }

    fn record(&mut self, outcome: Outcome) {
        self.done = true;
        let labels = &KIND_OUTCOME_LABELS[self.kind as usize][outcome as usize];
        count(&key(ACQUISITIONS, labels, self.name.as_ref()), 1);
        observe(
            &key(ACQUIRE_WAIT, labels, self.name.as_ref()),
            self.start.elapsed().as_secs_f64(),
        );
    }
}

impl Drop for Acquisition {
    fn drop(&mut self) {
        if !self.done {
            let outcome = if EXPIRING.with(Cell::get) {
                Outcome::Timeout
            } else {
                Outcome::Cancelled
            };
            self.record(outcome);
        }
    }
}

/// What a guard's fence records: the hold time (once, when the guard ends) and its loss (once,
/// when first seen). Records nothing until [`start`](Self::start)ed with a kind.
#[derive(Debug, Default)]
pub(crate) struct Held {
    started: OnceLock<(AcquisitionKind, Option<SharedString>, Instant)>,
    ended: AtomicBool,
    lost: AtomicBool,
}

impl Held {
    /// The guard of an acquisition of `kind` on `name` holds from now.
    pub(crate) fn start(&self, kind: AcquisitionKind, name: &str) {
        let _ = self.started.set((kind, name_label(name), Instant::now()));
    }

    /// The guard was released or dropped: records the hold time (the first time only).
    pub(crate) fn ended(&self) {
        if let Some((kind, name, since)) = self.started.get() {
            if !self.ended.swap(true, Ordering::AcqRel) {
                let labels = &KIND_LABELS[*kind as usize];
                observe(
                    &key(HOLD, labels, name.as_ref()),
                    since.elapsed().as_secs_f64(),
                );
            }
        }
    }

    /// The guard was found no longer holding, because of `error`: counted the first time only.
    pub(crate) fn lost(&self, error: &Error) {
        let cause = match error {
            Error::LockLost { .. } => LossCause::KeyGone,
            Error::SessionLost(_) => LossCause::SessionLost,
            Error::SessionClosed => LossCause::SessionClosed,
            _ => LossCause::Error,
        };
        if let Some((kind, name, _)) = self.started.get() {
            if !self.lost.swap(true, Ordering::AcqRel) {
                let labels = &KIND_CAUSE_LABELS[*kind as usize][cause as usize];
                count(&key(GUARDS_LOST, labels, name.as_ref()), 1);
            }
        }
    }
}

/// A lease refresh sent at `sent` was answered now, when the local deadline was `deadline`.
pub(crate) fn refresh_acknowledged(sent: tokio::time::Instant, deadline: tokio::time::Instant) {
    let now = tokio::time::Instant::now();
    histogram!(KEEPALIVE_RTT).record(now.saturating_duration_since(sent).as_secs_f64());
    histogram!(DEADLINE_REMAINING).record(deadline.saturating_duration_since(now).as_secs_f64());
}

/// A session entered `state` (`alive`, `suspended`, `lost`; anything else is not recorded).
pub(crate) fn session_state(state: &'static str) {
    // Literal labels: the facade builds the key from static parts (no allocation).
    match state {
        "alive" => counter!(SESSION_STATE_CHANGES, "state" => "alive").increment(1),
        "suspended" => counter!(SESSION_STATE_CHANGES, "state" => "suspended").increment(1),
        "lost" => counter!(SESSION_STATE_CHANGES, "state" => "lost").increment(1),
        _ => {}
    }
}

/// A session became Lost for `reason`.
pub(crate) fn session_lost(reason: LossReason) {
    let counter = match reason {
        LossReason::DeadlineExceeded => counter!(SESSION_LOSSES, "reason" => "deadline_exceeded"),
        LossReason::LeaseGone => counter!(SESSION_LOSSES, "reason" => "lease_gone"),
        LossReason::Closed => counter!(SESSION_LOSSES, "reason" => "closed"),
        LossReason::KeepAliveStopped => counter!(SESSION_LOSSES, "reason" => "keepalive_stopped"),
        LossReason::CleanupFailed => counter!(SESSION_LOSSES, "reason" => "cleanup_failed"),
        LossReason::Orphaned => counter!(SESSION_LOSSES, "reason" => "orphaned"),
    };
    counter.increment(1);
}

/// A view of kind `view` applied `events` watch events.
pub(crate) fn view_events(view: View, events: usize) {
    count(
        &key(VIEW_EVENTS, &VIEW_LABELS[view as usize], None),
        events as u64,
    );
}

/// A view of kind `view` re-read its whole prefix after compaction.
pub(crate) fn view_reread(view: View) {
    count(&key(VIEW_REREADS, &VIEW_LABELS[view as usize], None), 1);
}

/// A view of kind `view` was `lag` revisions behind etcd at a watch response.
pub(crate) fn view_lag(view: View, lag: i64) {
    observe(
        &key(VIEW_LAG, &VIEW_LABELS[view as usize], None),
        lag as f64,
    );
}

/// A request failed with `error`, which may succeed again, and is sent again. (Off the hot
/// path: its key is built per call, with one small allocation.)
pub(crate) fn retried(error: &Error) {
    counter!(REQUEST_RETRIES, "cause" => error.retry_cause()).increment(1);
}

#[cfg(test)]
#[allow(unsafe_code)] // A counting global allocator: the only unsafe code of the crate's tests.
mod tests;
