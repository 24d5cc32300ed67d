//! The toxics of one link (see `link.rs` for the model): the chain of stages a stream's chunks
//! go through, in the order the toxics were added.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};

use rand::Rng;
use tokio::time::Instant;

use super::stage::{Removal, Stage};
use super::toxic::Toxic;

/// Which addition of a toxic (by name) is in force and how often it was updated since: a link
/// tells a toxic removed and added again, or updated to the same values, from one left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Stamp {
    pub(super) added: u64,
    updates: u64,
}

impl Stamp {
    /// The stamp of a toxic added now.
    pub(crate) fn fresh() -> Stamp {
        static ADDITIONS: AtomicU64 = AtomicU64::new(1);
        Stamp {
            added: ADDITIONS.fetch_add(1, Ordering::Relaxed),
            updates: 0,
        }
    }

    /// This stamp after one more update.
    pub(crate) fn updated(self) -> Stamp {
        Stamp {
            updates: self.updates + 1,
            ..self
        }
    }
}

/// Whether a toxic of `toxicity` acts (toxiproxy's draw: a uniform number in [0, 1) below it).
pub(super) fn draw(toxicity: f32) -> bool {
    rand::rng().random::<f32>() < toxicity
}

/// A piece of a stream inside a link.
#[derive(Debug)]
pub(super) enum Chunk {
    /// Bytes, stamped with when they were read (toxiproxy's `Timestamp`, moved on by latency).
    Data { at: Instant, bytes: Vec<u8> },
    /// The end of the stream: the link closes when it reaches the destination.
    End,
}

impl Chunk {
    pub(super) fn len(&self) -> usize {
        match self {
            Chunk::Data { bytes, .. } => bytes.len(),
            Chunk::End => 0,
        }
    }
}

/// The toxics of one link: a chain of stages, then what waits for the destination.
#[derive(Default)]
pub(super) struct Chain {
    pub(super) stages: Vec<Stage>,
    /// What the last stage let through, for the destination.
    pub(super) out: VecDeque<Chunk>,
    /// Stages ended by a close further down: never started again on this link.
    pub(super) dead: HashSet<(String, u64)>,
    /// A stage closed the link: nothing read any more can get through.
    pub(super) cut: bool,
}

impl Chain {
    /// Takes a chunk read from the source.
    pub(super) fn push(&mut self, chunk: Chunk) {
        if self.cut {
            return;
        }
        match self.stages.first_mut() {
            Some(s) => s.queue.push_back(chunk),
            None => self.out.push_back(chunk),
        }
    }

    /// Moves everything along that is due at `now`. True if a `reset_peer` fired.
    pub(super) fn pump(&mut self, now: Instant) -> bool {
        let mut fired = false;
        let mut i = 0;
        while i < self.stages.len() {
            let step = self.stages[i].step(now);
            fired |= step.fired;
            let closed = matches!(step.out.last(), Some(Chunk::End));
            match self.stages.get_mut(i + 1) {
                Some(next) => next.queue.extend(step.out),
                None => self.out.extend(step.out),
            }
            if closed {
                // The stage passed the end on: the stages before it can deliver nothing more.
                for s in self.stages.drain(..=i) {
                    self.dead.insert(s.key());
                }
                self.cut = true;
                i = 0;
                continue;
            }
            i += 1;
        }
        fired
    }

    /// Whether the end of the stream is all that is left for the destination.
    pub(super) fn finished(&self) -> bool {
        matches!(self.out.front(), Some(Chunk::End))
    }

    pub(super) fn has_output(&self) -> bool {
        matches!(self.out.front(), Some(Chunk::Data { .. }))
    }

    pub(super) fn pop_output(&mut self) -> Vec<u8> {
        match self.out.pop_front() {
            Some(Chunk::Data { bytes, .. }) => bytes,
            other => {
                // Only called when has_output(); put anything else back.
                if let Some(c) = other {
                    self.out.push_front(c);
                }
                Vec::new()
            }
        }
    }

    /// Bytes waiting in the stages and for the destination.
    pub(super) fn buffered(&self) -> usize {
        let stages: usize = self
            .stages
            .iter()
            .map(|s| {
                s.queue.iter().map(Chunk::len).sum::<usize>()
                    + s.leaving.iter().map(|(_, c)| c.len()).sum::<usize>()
                    + s.slices.iter().map(Chunk::len).sum::<usize>()
            })
            .sum();
        stages + self.out.iter().map(Chunk::len).sum::<usize>()
    }

    /// The next moment a stage has something to do on its own.
    pub(super) fn next_wake(&self) -> Option<Instant> {
        self.stages.iter().filter_map(Stage::next_wake).min()
    }

    /// Brings the chain to `wanted` (this link's toxics, in order), as toxiproxy's links
    /// follow each addition, update and removal.
    pub(super) fn apply(&mut self, wanted: Vec<(Toxic, Stamp)>, now: Instant) {
        let wanted: Vec<(Toxic, Stamp)> = wanted
            .into_iter()
            .filter(|(t, s)| !self.dead.contains(&(t.name.clone(), s.added)))
            .collect();
        let keys: HashMap<(String, u64), usize> = wanted
            .iter()
            .enumerate()
            .map(|(i, (t, s))| ((t.name.clone(), s.added), i))
            .collect();
        // Removals, in chain order: what a removed stage held goes to the next stage.
        let mut kept: Vec<Stage> = Vec::new();
        let mut carry: Vec<Chunk> = Vec::new();
        let mut restart: HashSet<(String, u64)> = HashSet::new();
        for mut stage in std::mem::take(&mut self.stages) {
            stage.queue.extend(carry.drain(..));
            if stage.orphan || keys.contains_key(&stage.key()) {
                kept.push(stage);
                continue;
            }
            let key = stage.key();
            match stage.remove(now) {
                Removal::Carry(held) => {
                    carry = held;
                    if let Some(before) = kept.last() {
                        restart.insert(before.key());
                    }
                }
                Removal::Close => {
                    self.dead.insert(key);
                    for s in kept.drain(..) {
                        self.dead.insert(s.key());
                    }
                    restart.clear();
                    carry = vec![Chunk::End];
                    self.cut = true;
                }
                Removal::Orphan(stage) => kept.push(*stage),
            }
        }
        self.out.extend(carry);
        // Updates: a toxic whose values or stamp changed starts again.
        for stage in &mut kept {
            if let Some(&i) = keys.get(&stage.key()) {
                let (toxic, stamp) = &wanted[i];
                if stage.toxic != *toxic || stage.stamp != *stamp {
                    stage.restart(toxic.clone(), *stamp, now);
                    restart.remove(&stage.key());
                }
            }
        }
        // Additions go to the end of the chain and restart the stage before them.
        let present: HashSet<(String, u64)> = kept.iter().map(Stage::key).collect();
        let old = kept.len();
        for (toxic, stamp) in wanted {
            if !present.contains(&(toxic.name.clone(), stamp.added)) {
                if kept.len() == old {
                    if let Some(before) = kept.last() {
                        restart.insert(before.key());
                    }
                }
                kept.push(Stage::new(toxic, stamp, now));
            }
        }
        for stage in &mut kept[..old] {
            if restart.contains(&stage.key()) {
                stage.restart(stage.toxic.clone(), stage.stamp, now);
            }
        }
        self.stages = kept;
    }
}

#[cfg(test)]
#[path = "chain_tests.rs"]
mod tests;
