//! A stream of every event under a prefix, a whole revision at a time, that resumes after a
//! broken stream, re-reads the state after compaction, and knows how far behind etcd it is.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use etcd_client::WatchOptions;
use tokio::time::sleep;

use crate::backoff::Backoff;
use crate::metrics::{self, View};
use crate::rpc::send::within;
use crate::rpc::{Rpc, Stats};
use crate::Error;

/// Every event of one store revision under a prefix: one Txn's operations, or every key
/// deleted by one lease revoke or expiry, in the order etcd applied them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Revision<E = etcd_client::Event> {
    /// The revision every event here carries (its `mod_revision`; a deletion's own).
    pub(crate) revision: i64,
    pub(crate) events: Vec<E>,
}

/// What a [`Revisions`] stream delivers next.
pub(crate) enum Update<S> {
    /// The whole state, read at `revision`: first (unless the stream started after a read of
    /// the caller's), and after the history since the last delivered revision was compacted
    /// away — what changed in between is summed up by it.
    Snapshot { state: S, revision: i64 },
    /// Every event of the next revision.
    Revision(Revision),
}

/// A read of the whole state a stream follows: the state and the revision it was read at.
pub(crate) type Reread<S> =
    Box<dyn FnMut() -> Pin<Box<dyn Future<Output = Result<(S, i64), Error>> + Send>> + Send>;

/// Every event under a prefix, a whole revision at a time, in revision order, across
/// disconnects and compaction:
///
/// * after a stream failure it re-opens the watch just after the last delivered revision (with
///   backoff), so nothing is skipped;
/// * a revision is delivered only with all its events (etcd sends them in one response, as no
///   watch here asks for `fragment`), and the position moves past a revision only once it was
///   delivered;
/// * when the history after the position was compacted away (or on [`resync`](Self::resync)),
///   it reads the whole state again (retrying what may succeed again) and delivers it as an
///   [`Update::Snapshot`], then goes on after that read's revision;
/// * a stream quiet for [`QUIET`] is probed with a progress request and re-opened when that
///   goes unanswered, so a silently dead stream is noticed even without HTTP/2 keep-alive; the
///   progress answers also tell how far etcd is ([`lag`](Self::lag)).
///
/// Independent of any session's lease. It ends only with a failure retrying cannot fix (etcd
/// refused the watch or the read: no permission, say).
pub(crate) struct Revisions<S> {
    rpc: Rpc,
    prefix: String,
    /// Every event at or below this revision has been delivered (or was covered by a read);
    /// `None` before the first read.
    after: Option<i64>,
    stream: Option<etcd_client::WatchStream>,
    /// Revisions received and not delivered yet, oldest first.
    pending: VecDeque<Revision>,
    /// The newest store revision etcd reported on the stream.
    head: i64,
    backoff: Backoff,
    /// A progress request is outstanding on the current stream.
    probed: bool,
    reread: Reread<S>,
    /// Whether the next delivery must be a fresh read.
    resync: bool,
    /// What follows the prefix, for the metrics' `view` label.
    view: View,
}

/// A prefix watch quiet for this long is asked for a progress notification …
const QUIET: Duration = Duration::from_secs(10);
/// … and re-opened (from the last delivered revision + 1) if none comes within this.
const PROBE_PATIENCE: Duration = Duration::from_secs(5);

/// Appends `events` (each with its revision, in etcd's order) to `pending`, grouped by
/// revision, dropping those at or below `after` (covered by a read or delivered already).
fn group_by_revision<E>(
    pending: &mut VecDeque<Revision<E>>,
    after: i64,
    events: impl IntoIterator<Item = (i64, E)>,
) {
    for (revision, event) in events {
        let last = pending.back().map_or(after, |r| r.revision);
        if revision <= after || revision < last {
            continue; // covered already (or out of order: never from etcd)
        }
        match pending.back_mut() {
            Some(r) if r.revision == revision => r.events.push(event),
            _ => pending.push_back(Revision {
                revision,
                events: vec![event],
            }),
        }
    }
}

impl<S> Revisions<S> {
    /// Events under `prefix`, starting with a read of the whole state by `reread`.
    pub(crate) fn new(rpc: Rpc, prefix: &str, reread: Reread<S>) -> Revisions<S> {
        Revisions {
            rpc,
            prefix: prefix.to_owned(),
            after: None,
            stream: None,
            pending: VecDeque::new(),
            head: 0,
            backoff: Backoff::for_requests(),
            probed: false,
            reread,
            resync: true,
            view: View::Discovery,
        }
    }

    /// The same stream, counted in the metrics as a view of kind `view` (default: discovery).
    pub(crate) fn for_view(self, view: View) -> Revisions<S> {
        Revisions { view, ..self }
    }

    /// Events under `prefix` after `revision`, the revision of a read the caller made itself.
    pub(crate) fn after(rpc: Rpc, prefix: &str, revision: i64, reread: Reread<S>) -> Revisions<S> {
        Revisions {
            after: Some(revision),
            resync: false,
            head: revision,
            ..Revisions::new(rpc, prefix, reread)
        }
    }

    /// Drops what is buffered and makes the next delivery a fresh read of the whole state.
    pub(crate) fn resync(&mut self) {
        self.resync = true;
        self.stream = None;
        self.pending.clear();
        self.probed = false;
    }

    /// Whether every revision received so far has been delivered (what etcd sent in one
    /// response is all applied once this holds).
    pub(crate) fn is_drained(&self) -> bool {
        self.pending.is_empty()
    }

    /// How many revisions etcd is known to be ahead of what was delivered (0: caught up as
    /// of the last response or progress report).
    pub(crate) fn lag(&self) -> i64 {
        (self.head - self.after.unwrap_or(0)).max(0)
    }

    /// The next update: a fresh read of the whole state, or every event of the next revision.
    ///
    /// # Errors
    /// A failure retrying cannot fix (a refused watch or read); the stream may be polled again
    /// (it starts over with a read).
    pub(crate) async fn next(&mut self) -> Result<Update<S>, Error> {
        loop {
            if self.resync {
                let (state, revision) = self.read().await?;
                self.resync = false;
                self.after = Some(revision);
                self.head = self.head.max(revision);
                return Ok(Update::Snapshot { state, revision });
            }
            if let Some(revision) = self.pending.pop_front() {
                self.after = Some(revision.revision);
                metrics::view_events(self.view, revision.events.len());
                return Ok(Update::Revision(revision));
            }
            if let Err(e) = self.receive().await {
                self.resync();
                return Err(e);
            }
        }
    }

    /// Reads the whole state, retrying what may succeed again.
    async fn read(&mut self) -> Result<(S, i64), Error> {
        let mut backoff = Backoff::for_requests();
        loop {
            match (self.reread)().await {
                Err(e) if e.is_retryable() => sleep(backoff.next_delay()).await,
                other => return other,
            }
        }
    }

    /// Receives one response (or opens the stream, or probes it) into `pending`; sets
    /// `resync` when the history was compacted away.
    async fn receive(&mut self) -> Result<(), Error> {
        let after = self.after.unwrap_or(0);
        let stream = match self.stream.as_mut() {
            Some(s) => s,
            None => {
                let opts = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(after + 1);
                match self.rpc.open_watch(self.prefix.as_str(), opts).await {
                    Ok(s) => self.stream.insert(s),
                    Err(e) => return self.failed(e).await,
                }
            }
        };
        let patience = if self.probed { PROBE_PATIENCE } else { QUIET };
        let message = match tokio::time::timeout(patience, stream.message()).await {
            Ok(message) => message,
            Err(_) if self.probed => {
                tracing::debug!(prefix = %self.prefix, "a quiet prefix watch did not answer a progress request; re-opening");
                self.stream = None;
                self.probed = false;
                return Ok(());
            }
            Err(_) => {
                self.probed = true;
                Stats::add(&self.rpc.stats().watch_probes, 1);
                let asked = within(self.rpc.timeout(), stream.request_progress()).await;
                if asked.is_err() {
                    self.stream = None;
                    self.probed = false;
                }
                return Ok(());
            }
        };
        self.probed = false;
        let resp = match message {
            Ok(Some(resp)) => resp,
            Ok(None) => return self.failed(Error::stream_ended()).await,
            Err(e) => return self.failed(Error::from(e)).await,
        };
        if resp.canceled() {
            self.stream = None;
            if resp.compact_revision() > 0 {
                tracing::info!(prefix = %self.prefix, "a prefix watch's history was compacted away; re-reading");
                metrics::view_reread(self.view);
                self.resync = true;
                return Ok(());
            }
            if resp.created() {
                // Refused as it was created: no permission, or a stale token.
                return self
                    .failed(Error::watch_refused(resp.cancel_reason()))
                    .await;
            }
            // An established watch cancelled by the server (a member stopping, say).
            return self.failed(Error::stream_ended()).await;
        }
        if !resp.created() {
            self.backoff.reset();
        }
        if let Some(header) = resp.header() {
            self.head = self.head.max(header.revision());
        }
        Stats::add(&self.rpc.stats().watch_events, resp.events().len() as u64);
        metrics::view_lag(self.view, self.lag());
        let events = resp
            .events()
            .iter()
            .map(|event| (event.kv().map_or(0, |kv| kv.mod_revision()), event.clone()));
        group_by_revision(&mut self.pending, after, events);
        Ok(())
    }

    /// A failure of the stream: renews the token (once per interval) for a refusal that may be
    /// a stale one, pauses before trying again for what may succeed again, and gives up on the
    /// rest.
    async fn failed(&mut self, e: Error) -> Result<(), Error> {
        self.stream = None;
        self.probed = false;
        if self.rpc.watch_refusal_renews(&e) {
            tracing::debug!(prefix = %self.prefix, error = %e, "a watch was refused; renewing the auth token");
            return self.rpc.renew_auth().await;
        }
        if e.is_stale_auth() || e.is_retryable() {
            tracing::debug!(prefix = %self.prefix, error = %e, "prefix watch failed; resuming");
            metrics::retried(&e);
            sleep(self.backoff.next_delay()).await;
            return Ok(());
        }
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever responses etcd splits a history into, every event after the position is
        /// delivered exactly once, in order, and each revision comes whole: all its events in
        /// one batch, no batch mixing two revisions.
        #[test]
        fn revisions_are_delivered_whole_exactly_once_and_in_order(
            sizes in prop::collection::vec(1usize..4, 1..12),
            after in 0i64..6,
            cuts in prop::collection::vec(any::<bool>(), 0..40),
        ) {
            // A history: revision r (from 1) has sizes[r-1] events, numbered in order.
            let history: Vec<(i64, usize)> = sizes
                .iter()
                .enumerate()
                .flat_map(|(i, n)| std::iter::repeat_n(i as i64 + 1, *n))
                .enumerate()
                .map(|(n, r)| (r, n))
                .collect();
            // Split it into responses at revision boundaries (etcd never splits a revision
            // without `fragment`).
            let mut responses: Vec<Vec<(i64, usize)>> = vec![Vec::new()];
            for (i, e) in history.iter().enumerate() {
                let boundary = i > 0 && history[i - 1].0 != e.0;
                if boundary && cuts.get(i).copied().unwrap_or(false) {
                    responses.push(Vec::new());
                }
                responses.last_mut().unwrap().push(*e);
            }
            let mut pending = std::collections::VecDeque::new();
            let mut delivered = Vec::new();
            for response in responses {
                group_by_revision(&mut pending, after, response);
                delivered.extend(pending.drain(..));
            }
            let expected: Vec<Revision<usize>> = sizes
                .iter()
                .enumerate()
                .map(|(i, _)| i as i64 + 1)
                .filter(|r| *r > after)
                .map(|r| Revision {
                    revision: r,
                    events: history.iter().filter(|e| e.0 == r).map(|e| e.1).collect(),
                })
                .collect();
            prop_assert_eq!(delivered, expected);
        }
    }
}
