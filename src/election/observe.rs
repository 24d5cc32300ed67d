//! [`Election::observe`](super::Election::observe): every change of leadership, from the
//! watch layer's stream of whole revisions under the election's prefix.

use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use etcd_client::EventType;
use futures::Stream;

use super::{LeaderEvent, LeaderInfo};
use crate::engine::inspect;
use crate::keys::{Layout, Queue};
use crate::metrics::View;
use crate::rpc::Rpc;
use crate::watch::{Revision, Revisions, Update};
use crate::Error;

/// Reads the oldest member of `queue` at `revision` (0: now). Returns it and the revision
/// the read saw.
pub(crate) async fn read_leader(
    rpc: &Rpc,
    queue: &Queue,
    revision: i64,
) -> Result<(Option<LeaderInfo>, i64), Error> {
    let (oldest, at) = inspect::oldest(rpc, queue, revision, Some(1)).await?;
    Ok((oldest.first().map(LeaderInfo::from_kv), at))
}

/// [`Election::observe`](super::Election::observe) for election `name` through `client`,
/// without a session, from revision `start` (0: from its first poll).
pub(crate) fn observe_with(
    client: etcd_client::Client,
    request_timeout: Duration,
    name: &str,
    start: i64,
) -> impl Stream<Item = Result<LeaderEvent, Error>> + Send + 'static {
    let rpc = Rpc::detached(client, request_timeout);
    let state = Queue::new(name, Layout::Shared).map(|queue| Observer {
        revisions: Revisions::new(
            rpc.clone(),
            queue.prefix(),
            reread(rpc.clone(), queue.clone(), start),
        )
        .for_view(View::Election),
        rpc,
        queue,
        leader: None,
    });
    futures::stream::unfold((state, false), |(mut state, done)| async move {
        if done {
            return None;
        }
        let item = match &mut state {
            Ok(observer) => observer.next_change().await,
            Err(Error::InvalidArgument(e)) => Err(Error::InvalidArgument(e.clone())),
            Err(e) => Err(Error::Internal(e.to_string())),
        };
        let done = item.is_err();
        Some((item, (state, done)))
    })
}

/// The read of the whole state an observer's stream starts with and falls back on after
/// compaction: the leader at `start` the first time (now, if that revision was compacted
/// away), now after that.
fn reread(
    rpc: Rpc,
    queue: Queue,
    start: i64,
) -> crate::watch::revisions::Reread<Option<LeaderInfo>> {
    let start = Arc::new(StdMutex::new(start));
    Box::new(move || {
        let (rpc, queue, start) = (rpc.clone(), queue.clone(), Arc::clone(&start));
        Box::pin(async move {
            let at = std::mem::take(&mut *start.lock().unwrap_or_else(|e| e.into_inner()));
            match read_leader(&rpc, &queue, at).await {
                Err(e) if at > 0 && e.is_compacted() => read_leader(&rpc, &queue, 0).await,
                other => other,
            }
        })
    })
}

/// The state behind [`Election::observe`](super::Election::observe): the leader last reported
/// and the stream of revisions.
struct Observer {
    rpc: Rpc,
    queue: Queue,
    /// `None` before the first report; `Some(None)` after reporting that nobody leads.
    leader: Option<Option<LeaderInfo>>,
    revisions: Revisions<Option<LeaderInfo>>,
}

impl Observer {
    /// Records `now` as the leader and returns the event to report, if it is a change.
    fn report(&mut self, now: Option<LeaderInfo>) -> Option<LeaderEvent> {
        if self.leader.as_ref() == Some(&now) {
            return None;
        }
        self.leader = Some(now.clone());
        Some(match now {
            Some(info) => LeaderEvent::Leader(info),
            None => LeaderEvent::NoLeader,
        })
    }

    async fn next_change(&mut self) -> Result<LeaderEvent, Error> {
        loop {
            let change = match self.revisions.next().await? {
                Update::Snapshot { state, .. } => self.report(state),
                Update::Revision(revision) => self.apply(&revision).await?,
            };
            if let Some(change) = change {
                return Ok(change);
            }
        }
    }

    /// What one revision's events (all of them: one Txn's, or one lease's end) make of the
    /// leader, and the change to report, if any. The leader is decided once per revision:
    /// when the leader's key went, or a key came while nobody led, by a read at that very
    /// revision (the oldest member then); when only the leader's value changed, from the
    /// event.
    async fn apply(&mut self, revision: &Revision) -> Result<Option<LeaderEvent>, Error> {
        let current = self.leader.clone().flatten();
        let is_leader_key = |key: &[u8]| current.as_ref().is_some_and(|l| l.key.as_bytes() == key);
        let mut reread = false;
        let mut proclaimed = None;
        for event in &revision.events {
            let Some(kv) = event.kv() else { continue };
            if !self.queue.is_member(kv.key()) {
                continue; // a nested name's key
            }
            match event.event_type() {
                // The leader left: whoever is oldest now leads.
                EventType::Delete if is_leader_key(kv.key()) => reread = true,
                // A candidate left: the leader stays.
                EventType::Delete => {}
                // The leader wrote its key: a new value is a proclaim; the same value (a
                // fenced write's bump) is no change.
                EventType::Put if is_leader_key(kv.key()) => {
                    if current.as_ref().is_some_and(|l| l.value != kv.value()) {
                        proclaimed = Some(LeaderInfo::from_kv(kv));
                    }
                }
                // Nobody led, so the queue was empty: a new key may lead now.
                EventType::Put if current.is_none() => reread = true,
                // A candidate queued behind the leader.
                EventType::Put => {}
            }
        }
        if reread {
            match read_leader(&self.rpc, &self.queue, revision.revision).await {
                Ok((next, _)) => return Ok(self.report(next)),
                // That revision was compacted away (or the read failed): read the state afresh
                // and go on from there.
                Err(_) => {
                    self.revisions.resync();
                    return Ok(None);
                }
            }
        }
        Ok(proclaimed.and_then(|info| self.report(Some(info))))
    }
}
