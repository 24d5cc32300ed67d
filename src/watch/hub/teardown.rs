//! Tearing a session's watch stream down: every subscriber is told to re-read.

use std::sync::Mutex;

use super::{lock, Conn, Note, State};

/// Ends connection `generation` (if it is still the current one): every subscriber but
/// `except` is told [`Note::Broken`], every scope is forgotten, the stream's task stops.
pub(super) fn fail_all(shared: &Mutex<State>, generation: u64, except: Option<u64>) {
    let mut state = lock(shared);
    if state.generation != generation {
        return;
    }
    state.generation += 1;
    if let Conn::Running { stop, .. } = std::mem::take(&mut state.conn) {
        stop.cancel();
    }
    state.scopes.clear();
    state.ids.clear();
    for (id, sub) in state.subs.drain() {
        if Some(id) != except {
            let _ = sub.tx.send(Note::Broken);
        }
    }
}

/// Tears the connection of `generation` down when dropped armed: an opening of the stream
/// that did not finish (failed, or its future dropped); every subscriber but `id` re-reads.
pub(super) struct Abandoned<'a> {
    pub(super) shared: &'a Mutex<State>,
    pub(super) generation: u64,
    pub(super) id: u64,
    pub(super) armed: bool,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.armed {
            fail_all(self.shared, self.generation, Some(self.id));
        }
    }
}
