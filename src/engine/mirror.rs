//! Deciding from the session's mirror of a queue instead of a read.
//!
//! A waiter whose enqueue page did not hold the whole queue must find the keys just ahead of
//! it among all the others. etcd answers a read sorted or filtered by create revision by
//! reading the whole queue, whatever its limit: n waiters lining up that way cost etcd
//! n²/2 key reads (ten thousand waiters: 5·10⁷, minutes of its CPU). So such a waiter asks
//! the session's watch hub instead, which keeps a mirror of the queue's directory (built from
//! one paged read per stream, kept exact by the stream's events: `crate::watch::hub::members`)
//! and answers from memory. A decision from the mirror at a revision at or after our own
//! create revision, with our key there as ours, is the decision a fenced read at that
//! revision would give (docs/design.md, "The line-up from the session's mirror"). When the
//! mirror cannot answer in time (the stream is being opened or failed, the build lost a race
//! with compaction), the waiter reads etcd as before.

use std::sync::Arc;

use crate::rpc::{unless_stopped, Stats};
use crate::session::Session;
use crate::watch::hub::{self, Mirrored, Note, Own};
use crate::Error;

use super::acquire::read_all;
use super::decision::{Blocker, Snapshot};
use super::ticket::Ticket;

/// How many keys one page of a mirror's build reads (in key order: etcd reads only these).
const BUILD_PAGE: i64 = 2_000;

/// The decision input for `ticket` behind `blocker` from the session's mirror of the queue,
/// or `None` if the mirror cannot give it now (read etcd instead). The mirror must have
/// applied our own put and revision `fresh` (the change that woke us: it may have reached us
/// through another scope of the stream); one that does not exist yet is built here, by one
/// paged read of the queue's directory. Every step is bounded by the request timeout.
///
/// # Errors
/// Only the session's loss (a failed build leaves the waiter to read etcd, which reports a
/// failure that persists).
pub(super) async fn line_from_mirror(
    session: &Arc<Session>,
    ticket: &Ticket,
    blocker: &Blocker,
    fresh: i64,
) -> Result<Option<Snapshot>, Error> {
    let waits = session.waits();
    unless_stopped(waits.stop, async {
        let Some(hub) = waits.hub else {
            return Ok(None);
        };
        let Some(scope) = scope(blocker, &ticket.key) else {
            return Ok(None);
        };
        let patience = session.rpc.timeout();
        // Holds the scope's watch (and with it the mirror) in place while we use it.
        let mut sub = hub.subscribe(scope.clone(), &[], None, 0);
        if sub.opens && hub.open(&mut sub).await.is_err() {
            return Ok(None);
        }
        if !matches!(
            tokio::time::timeout(patience, sub.next()).await,
            Ok(Some(Note::Ready(_)))
        ) {
            return Ok(None);
        }
        let mut seen = match hub.mirror(&scope) {
            None => return Ok(None),
            Some(Mirrored::Ready(seen)) => seen,
            Some(Mirrored::Build(builder)) => {
                // A build that takes longer than a request is given up (its waiters read etcd).
                let read = read_all(session, &scope, 0, BUILD_PAGE, true);
                let (kvs, revision) = match tokio::time::timeout(patience, read).await {
                    Ok(Ok(read)) => read,
                    // Its revision compacted between pages, say. The waiter's own read
                    // reports a failure that persists.
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "the queue's mirror could not be read");
                        return Ok(None);
                    }
                    Err(_) => {
                        tracing::debug!("the queue's mirror took too long to read");
                        return Ok(None);
                    }
                };
                let kvs = kvs
                    .iter()
                    .map(|kv| (kv.key().to_vec(), kv.create_revision(), kv.lease()));
                if !builder.finish(revision, kvs) {
                    return Ok(None);
                }
                match hub.mirror(&scope) {
                    Some(Mirrored::Ready(seen)) => seen,
                    _ => return Ok(None),
                }
            }
        };
        // Our own put is in the same stream: wait until the mirror has applied it (and the
        // change that woke us).
        let wanted = ticket.create_revision.max(fresh);
        let at_our_key = seen.wait_for(|&at| at >= wanted);
        if !matches!(tokio::time::timeout(patience, at_our_key).await, Ok(Ok(_))) {
            return Ok(None);
        }
        let own = Own {
            key: ticket.key.as_bytes().to_vec(),
            lease: session.lease_id,
        };
        let line = hub.line(
            &scope,
            &own,
            ticket.create_revision,
            |k| blocker.counts(k),
            blocker.line_length(),
        );
        drop(sub);
        if line.is_some() {
            Stats::add(&session.rpc.stats().mirrored, 1);
        }
        Ok(line.map(|line| Snapshot {
            revision: line.revision,
            gets: Vec::new(),
            line: Some(line),
        }))
    })
    .await
}

/// Whether the session's hub already mirrors the queue that `key` joins behind `blocker` (then
/// its enqueue need not read the queue: the wait decides from the mirror).
pub(super) fn mirrors(session: &Session, blocker: &Blocker, key: &str) -> bool {
    let waits = session.waits();
    blocker.announced()
        && waits
            .hub
            .is_some_and(|hub| scope(blocker, key).is_some_and(|scope| hub.mirrors(&scope)))
}

/// The scope of the mirror for `key`'s place behind `blocker`: the directory holding the
/// keys that can block it and `key` itself.
fn scope(blocker: &Blocker, key: &str) -> Option<Vec<u8>> {
    hub::scope_of_keys(&[blocker.prefix().as_bytes(), key.as_bytes()])
}
