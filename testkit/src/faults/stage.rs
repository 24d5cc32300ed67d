//! One toxic on one link: a stage of a link's chain (see `link.rs` for the model).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::chain::{draw, Chunk, Stamp};
use super::toxic::{Toxic, ToxicKind};

/// One toxic on one link.
pub(super) struct Stage {
    pub(super) toxic: Toxic,
    pub(super) stamp: Stamp,
    /// Drawn at each start: whether the toxic acts (else the stage passes everything on).
    pub(super) acts: bool,
    /// When it (re)started: `timeout`'s clock.
    pub(super) started: Instant,
    /// The chunks that reached it and wait for it.
    pub(super) queue: VecDeque<Chunk>,
    /// What it is working on: what leaves it, and when, in order.
    pub(super) leaving: VecDeque<(Instant, Chunk)>,
    /// `slicer`: the pieces of its chunk still to go, one each `gap` after the one before.
    pub(super) slices: VecDeque<Chunk>,
    pub(super) gap: Duration,
    /// It does nothing before then (`slicer`'s pause after each piece).
    pub(super) busy_until: Option<Instant>,
    /// `bandwidth`: nanoseconds it is behind (+) or ahead (−) of its rate.
    pub(super) debt: i128,
    /// `reset_peer`: when it resets the connection, once a chunk set it off.
    pub(super) fires_at: Option<Instant>,
    /// `limit_data`: bytes it let through on this link (kept when it restarts, dropped with it).
    pub(super) passed: u64,
    /// Removed from the proxy, but a `reset_peer` set off before fires anyway.
    pub(super) orphan: bool,
}

/// What a stage did in one step: what it let through, and whether a `reset_peer` fired.
#[derive(Default)]
pub(super) struct Step {
    pub(super) out: Vec<Chunk>,
    pub(super) fired: bool,
}

/// What happens to a removed stage.
pub(super) enum Removal {
    /// What it held goes on to the next stage.
    Carry(Vec<Chunk>),
    /// It closes the link (`timeout`).
    Close,
    /// It stays until it fires (a `reset_peer` set off).
    Orphan(Box<Stage>),
}

pub(super) fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// `at` moved by `nanos` (either way).
pub(super) fn shifted(at: Instant, nanos: i128) -> Instant {
    let d = Duration::from_nanos(nanos.unsigned_abs().min(u64::MAX as u128) as u64);
    if nanos >= 0 {
        at + d
    } else {
        at.checked_sub(d).unwrap_or(at)
    }
}

impl Stage {
    pub(super) fn new(toxic: Toxic, stamp: Stamp, now: Instant) -> Stage {
        Stage {
            acts: draw(toxic.toxicity),
            toxic,
            stamp,
            started: now,
            queue: VecDeque::new(),
            leaving: VecDeque::new(),
            slices: VecDeque::new(),
            gap: Duration::ZERO,
            busy_until: None,
            debt: 0,
            fires_at: None,
            passed: 0,
            orphan: false,
        }
    }

    pub(super) fn key(&self) -> (String, u64) {
        (self.toxic.name.clone(), self.stamp.added)
    }

    /// Starts again as `toxic` (toxiproxy's interrupt and re-run): what it was working on
    /// leaves at once (a held end of stream goes back to its queue, to be taken again), its
    /// clocks start from now, whether it acts is drawn again. A `reset_peer` set off cannot
    /// be interrupted and keeps its course.
    pub(super) fn restart(&mut self, toxic: Toxic, stamp: Stamp, now: Instant) {
        self.toxic = toxic;
        self.stamp = stamp;
        if self.fires_at.is_some() {
            return;
        }
        let (held, end) = self.held(now);
        self.leaving.extend(held.map(|c| (now, c)));
        if end {
            self.queue.push_front(Chunk::End);
        }
        self.busy_until = None;
        self.started = now;
        self.debt = 0;
        self.acts = draw(self.toxic.toxicity);
    }

    /// Empties `leaving` and `slices`: their bytes as one chunk (if any) and whether they held
    /// the end.
    pub(super) fn held(&mut self, now: Instant) -> (Option<Chunk>, bool) {
        let (mut bytes, mut at, mut end) = (Vec::new(), None, false);
        let slices = self.slices.drain(..).map(|c| (now, c));
        for (_, c) in self.leaving.drain(..).chain(slices) {
            match c {
                Chunk::Data { at: a, bytes: b } => {
                    at.get_or_insert(a);
                    bytes.extend(b);
                }
                Chunk::End => end = true,
            }
        }
        let data = (!bytes.is_empty()).then(|| Chunk::Data {
            at: at.unwrap_or(now),
            bytes,
        });
        (data, end)
    }

    pub(super) fn remove(mut self, now: Instant) -> Removal {
        if matches!(self.toxic.kind, ToxicKind::Timeout { .. }) {
            return Removal::Close;
        }
        if self.fires_at.is_some() {
            self.orphan = true;
            return Removal::Orphan(Box::new(self));
        }
        let (held, end) = self.held(now);
        let mut carry: Vec<Chunk> = held.into_iter().collect();
        if end {
            carry.push(Chunk::End);
        } else {
            carry.extend(self.queue.drain(..));
        }
        Removal::Carry(carry)
    }

    pub(super) fn next_wake(&self) -> Option<Instant> {
        let timeout = match self.toxic.kind {
            ToxicKind::Timeout { timeout } if self.acts && timeout > 0 => {
                Some(self.started + millis(timeout))
            }
            _ => None,
        };
        [
            self.leaving.front().map(|(t, _)| *t),
            self.busy_until.filter(|_| self.leaving.is_empty()),
            timeout,
            self.fires_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Does what is due at `now`: lets through what is due, takes the next chunks.
    pub(super) fn step(&mut self, now: Instant) -> Step {
        let mut step = Step::default();
        loop {
            while self.leaving.front().is_some_and(|(t, _)| *t <= now) {
                let (_, c) = self.leaving.pop_front().expect("a front");
                let end = matches!(c, Chunk::End);
                step.out.push(c);
                if end {
                    return step;
                }
            }
            if !self.leaving.is_empty() {
                return step;
            }
            match self.busy_until {
                Some(b) if b > now => return step,
                _ => self.busy_until = None,
            }
            if let Some(piece) = self.slices.pop_front() {
                step.out.push(piece);
                self.busy_until = Some(now + self.gap);
                continue;
            }
            if let Some(at) = self.fires_at {
                if at <= now {
                    step.fired = true;
                    step.out.push(Chunk::End);
                }
                return step; // set off: it takes nothing more
            }
            if self.acts {
                match self.toxic.kind {
                    ToxicKind::Timeout { timeout }
                        if timeout > 0 && now >= self.started + millis(timeout) =>
                    {
                        step.out.push(Chunk::End);
                        return step;
                    }
                    ToxicKind::Blackhole => return step,
                    _ => {}
                }
            }
            let Some(chunk) = self.queue.pop_front() else {
                return step;
            };
            self.take(chunk, now);
        }
    }

    /// Starts work on `chunk` (toxiproxy's `Pipe` of each toxic, one chunk at a time).
    pub(super) fn take(&mut self, chunk: Chunk, now: Instant) {
        if !self.acts {
            self.leaving.push_back((now, chunk));
            return;
        }
        let (at, bytes) = match chunk {
            Chunk::End => {
                match self.toxic.kind {
                    ToxicKind::SlowClose { delay } => {
                        self.leaving.push_back((now + millis(delay), Chunk::End))
                    }
                    ToxicKind::ResetPeer { timeout } => self.fires_at = Some(now + millis(timeout)),
                    _ => self.leaving.push_back((now, Chunk::End)),
                }
                return;
            }
            Chunk::Data { at, bytes } => (at, bytes),
        };
        match self.toxic.kind {
            ToxicKind::Latency { latency, jitter } => {
                // Delayed from when it was read (or when an earlier latency let it go).
                let delay = i128::from(ToxicKind::latency_ms(latency, jitter)) * 1_000_000;
                let waited = now.saturating_duration_since(at).as_nanos() as i128;
                let sleep = delay - waited;
                let leaves = if sleep > 0 { shifted(now, sleep) } else { now };
                let at = shifted(at, sleep);
                self.leaving.push_back((leaves, Chunk::Data { at, bytes }));
            }
            ToxicKind::Bandwidth { rate: 0 } => {
                self.debt = 0;
                self.leaving.push_back((now, Chunk::Data { at, bytes }));
            }
            ToxicKind::Bandwidth { rate } => {
                // rate KB/s: each byte costs 1/rate ms; more than 100 ms' worth goes in
                // 100 ms slices.
                self.debt += bytes.len() as i128 * 1_000_000 / i128::from(rate);
                let slice = usize::try_from(rate.saturating_mul(100)).unwrap_or(usize::MAX);
                let mut leaves = now;
                let mut rest = &bytes[..];
                while rest.len() > slice {
                    leaves += millis(100);
                    self.leaving.push_back((
                        leaves,
                        Chunk::Data {
                            at,
                            bytes: rest[..slice].to_vec(),
                        },
                    ));
                    rest = &rest[slice..];
                    self.debt -= 100_000_000;
                }
                leaves = shifted(leaves, self.debt.max(0));
                self.debt = self.debt.min(0);
                self.leaving.push_back((
                    leaves,
                    Chunk::Data {
                        at,
                        bytes: rest.to_vec(),
                    },
                ));
            }
            ToxicKind::Slicer {
                average_size,
                size_variation,
                delay,
            } => {
                let average = usize::try_from(average_size.max(1)).unwrap_or(usize::MAX);
                let variation = usize::try_from(size_variation)
                    .unwrap_or(0)
                    .min(average.saturating_sub(1));
                // Each piece leaves `delay` µs after the one before left.
                self.gap = Duration::from_micros(delay);
                self.slices = ToxicKind::slices(bytes.len(), average, variation)
                    .into_iter()
                    .map(|(a, b)| Chunk::Data {
                        at,
                        bytes: bytes[a..b].to_vec(),
                    })
                    .collect();
            }
            ToxicKind::Timeout { .. } => {} // dropped
            ToxicKind::ResetPeer { timeout } => self.fires_at = Some(now + millis(timeout)),
            ToxicKind::LimitData { bytes: limit } => {
                let room = usize::try_from(limit.saturating_sub(self.passed)).unwrap_or(usize::MAX);
                let take = bytes.len().min(room);
                if take > 0 {
                    self.passed += take as u64;
                    self.leaving.push_back((
                        now,
                        Chunk::Data {
                            at,
                            bytes: bytes[..take].to_vec(),
                        },
                    ));
                }
                if self.passed >= limit {
                    self.leaving.push_back((now, Chunk::End));
                }
            }
            ToxicKind::SlowClose { .. }
            | ToxicKind::Noop
            | ToxicKind::Refuse
            | ToxicKind::Blackhole => {
                self.leaving.push_back((now, Chunk::Data { at, bytes }));
            }
        }
    }
}
