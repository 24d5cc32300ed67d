//! `--profile`: where a hand-off's time goes. The engine emits `tracing` events of the target
//! `etcd_coord::handoff` (release sent / answered, waiter woken by the key ahead, re-read,
//! through); a layer records them with their times, and after the run each hand-off is split
//! into: the release's round trip (commit), the time until the next waiter hears of it (notify),
//! its re-read (if any), what is left until it is through (decide, schedule), and from there to
//! its own release sent (the caller's hold and the release's set-up: `hold`).

use std::sync::Mutex as StdMutex;
use std::time::Instant;

use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, Layer};

use crate::report::Value;

/// One recorded event: when, what, the key it is about, the waiter it woke (if any).
#[derive(Debug, Clone)]
struct Step {
    at: Instant,
    what: String,
    key: String,
    waiter: String,
}

static STEPS: StdMutex<Vec<Step>> = StdMutex::new(Vec::new());

/// The layer that records the engine's hand-off events.
pub(crate) struct Recorder;

#[derive(Default)]
struct Fields {
    message: String,
    key: String,
    waiter: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}").trim_matches('"').to_owned();
        match field.name() {
            "message" => self.message = text,
            "key" => self.key = text,
            "waiter" => self.waiter = text,
            _ => {}
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_owned(),
            "key" => self.key = value.to_owned(),
            "waiter" => self.waiter = value.to_owned(),
            _ => {}
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for Recorder {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() != "etcd_coord::handoff" {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let step = Step {
            at: Instant::now(),
            what: fields.message,
            key: fields.key,
            waiter: fields.waiter,
        };
        STEPS.lock().unwrap().push(step);
    }
}

/// Forgets what was recorded so far (the set-up's steps).
pub(crate) fn reset() {
    STEPS.lock().unwrap().clear();
    SLOW.lock().unwrap().clear();
}

/// Acquisitions that waited longer than [`SLOW_MS`]: when the wait began and ended, and the key.
static SLOW: StdMutex<Vec<(Instant, Instant, String)>> = StdMutex::new(Vec::new());

/// A wait this long is printed with the hand-off steps recorded during it.
const SLOW_MS: u128 = 40;

/// Notes an acquisition of `key` that waited from `from` to `to`, if it was slow (`--profile`
/// only).
pub(crate) fn waited(from: Instant, to: Instant, key: &str) {
    if to.duration_since(from).as_millis() >= SLOW_MS {
        SLOW.lock().unwrap().push((from, to, key.to_owned()));
    }
}

/// Prints (to stderr) the first few slow waits with the hand-off steps recorded while each
/// lasted, times in ms from its start.
fn print_slow(steps: &[Step]) {
    for (from, to, key) in SLOW.lock().unwrap().iter().take(5) {
        let ms = |at: Instant| at.duration_since(*from).as_secs_f64() * 1000.0;
        eprintln!("slow wait of {key}: {:.1} ms", ms(*to));
        for s in steps.iter().filter(|s| s.at >= *from && s.at <= *to) {
            eprintln!("  {:8.3} {} {} {}", ms(s.at), s.what, s.key, s.waiter);
        }
    }
}

/// The medians (ms) of each phase over the hand-offs recorded since [`reset`].
pub(crate) fn phases() -> Vec<(&'static str, Value)> {
    let steps = STEPS.lock().unwrap().clone();
    print_slow(&steps);
    let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1000.0;
    let (mut commit, mut notify, mut reread, mut through) = (vec![], vec![], vec![], vec![]);
    let mut hold = vec![];
    for (i, sent) in steps.iter().enumerate() {
        if sent.what != "release sent" {
            continue;
        }
        let rest = &steps[i + 1..];
        if let Some(done) = rest
            .iter()
            .find(|s| s.what == "release answered" && s.key == sent.key)
        {
            commit.push(ms(sent.at, done.at));
        }
        // The waiter this release let in: of those it woke (a counting line wakes several),
        // the first through after it.
        let woken_by = |waiter: &str| {
            rest.iter()
                .find(|s| s.what == "woken" && s.key == sent.key && s.waiter == waiter)
        };
        let Some(woken) = rest
            .iter()
            .filter(|s| s.what == "through")
            .find_map(|s| woken_by(&s.key))
            .or_else(|| rest.iter().find(|s| s.what == "woken" && s.key == sent.key))
        else {
            continue;
        };
        notify.push(ms(sent.at, woken.at));
        let mut after = rest
            .iter()
            .skip_while(|s| s.at < woken.at)
            .filter(|s| s.key == woken.waiter);
        let done = match after
            .clone()
            .find(|s| s.what == "re-read" || s.what == "through")
        {
            Some(read) if read.what == "re-read" => {
                reread.push(ms(woken.at, read.at));
                after
                    .find(|s| s.what == "through" && s.at >= read.at)
                    .inspect(|done| through.push(ms(read.at, done.at)))
            }
            // Through without a read (a counted or announced hand-off).
            Some(done) => {
                through.push(ms(woken.at, done.at));
                Some(done)
            }
            None => None,
        };
        // From through to the new holder's own release: the caller's hold, and the set-up of
        // its release (or requeue) until it is sent.
        if let Some(done) = done {
            let next = rest.iter().skip_while(|s| s.at < done.at);
            if let Some(sent) = next
                .filter(|s| s.key == woken.waiter)
                .find(|s| s.what == "release sent")
            {
                hold.push(ms(done.at, sent.at));
            }
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let m = v.get(v.len() / 2).copied().unwrap_or(0.0);
        Value::Num((m * 1000.0).round() / 1000.0)
    };
    vec![
        ("profile_handoffs", Value::Int(notify.len() as u64)),
        ("profile_release_rtt_ms", median(commit)),
        ("profile_notify_ms", median(notify)),
        ("profile_reread_ms", median(reread)),
        ("profile_through_ms", median(through)),
        ("profile_hold_ms", median(hold)),
    ]
}
