//! Waiting for changes: watches registered from now (plus one confirming read), `wait_gone`,
//! and prefix event streams that survive disconnects and compaction.
//!
//! Every wait takes the caller's [`Backoff`]: failures to open a watch, streams that end and
//! watches etcd cancels are all paused on it, so a wait that keeps failing slows down to one
//! attempt a second instead of spinning. Failures retrying cannot fix (a watch etcd refuses
//! for lack of permission) end the wait with a typed error.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, Txn, WatchFilterType, WatchOptions};
use tokio::time::sleep;

use crate::backoff::Backoff;
use crate::error::{renew_auth, within, RenewalGate};
use crate::keys;
use crate::session::{Counters, Shared};
use crate::Error;

use super::request::{pause, send_until_answered, unless_lost, Kind};

/// What a wait for a change ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Woken {
    /// One of the watched changes happened.
    Changed,
    /// A cancelled watch or a stream failure: re-read and decide again.
    Recheck,
    /// A change of a [`Watched::deciding`] target happened, at this revision: the event
    /// itself is the answer, whatever a later read shows.
    Decided(i64),
    /// A watch's history was compacted away up to this revision: watch again from there (a
    /// change before it can no longer be seen), re-read and decide again.
    Compacted(i64),
}

/// Which events of a watched key count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Events {
    Put,
    Delete,
    Any,
}

/// A change to wait for: a put and/or a delete of `key`, or of any key under it with
/// `prefix` — optionally only of the keys in `among`. From now on, unless it is watched
/// [`since`](Self::since) a revision of the past.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Watched {
    key: Vec<u8>,
    prefix: bool,
    events: Events,
    among: Option<Vec<Vec<u8>>>,
    since: Option<i64>,
    deciding: bool,
}

impl Watched {
    fn new(key: impl Into<Vec<u8>>, prefix: bool, events: Events) -> Watched {
        Watched {
            key: key.into(),
            prefix,
            events,
            among: None,
            since: None,
            deciding: false,
        }
    }

    /// The same change, also when it happened at or after `revision` (etcd's history: such a
    /// watch may take etcd's 100 ms "unsynced" path, so only waits that must not miss a change
    /// that came and went use it).
    pub(crate) fn since(self, revision: i64) -> Watched {
        Watched {
            since: Some(revision),
            ..self
        }
    }

    /// The change itself decides the wait ([`Woken::Decided`]) instead of asking for a re-read:
    /// for a change whose effect may be undone before a re-read sees it (a barrier's latch
    /// that goes away with the lease of whoever put it).
    pub(crate) fn deciding(self) -> Watched {
        Watched {
            deciding: true,
            ..self
        }
    }

    /// The same target, watched from `floor` on if its history before that is gone.
    pub(crate) fn not_before(&self, floor: i64) -> Watched {
        Watched {
            since: self.since.map(|since| since.max(floor)),
            ..self.clone()
        }
    }

    /// The deletion of exactly `key`.
    pub(crate) fn deleted(key: impl Into<Vec<u8>>) -> Watched {
        Watched::new(key, false, Events::Delete)
    }

    /// A put of exactly `key`.
    pub(crate) fn put(key: impl Into<Vec<u8>>) -> Watched {
        Watched::new(key, false, Events::Put)
    }

    /// A put or a delete of exactly `key`.
    pub(crate) fn changed(key: impl Into<Vec<u8>>) -> Watched {
        Watched::new(key, false, Events::Any)
    }

    /// A put of any key under `prefix`.
    pub(crate) fn put_under(prefix: impl Into<Vec<u8>>) -> Watched {
        Watched::new(prefix, true, Events::Put)
    }

    /// The deletion of any of `keys`, all under `prefix`: one watch of the prefix's
    /// deletions, filtered here.
    pub(crate) fn deleted_any(prefix: impl Into<Vec<u8>>, mut keys: Vec<Vec<u8>>) -> Watched {
        keys.sort();
        Watched {
            among: Some(keys),
            ..Watched::new(prefix, true, Events::Delete)
        }
    }

    pub(crate) fn matches(&self, kind: EventType, key: &[u8]) -> bool {
        let kind_ok = match self.events {
            Events::Put => kind == EventType::Put,
            Events::Delete => kind == EventType::Delete,
            Events::Any => true,
        };
        let key_ok = if self.prefix {
            key.starts_with(&self.key)
        } else {
            key == self.key
        };
        let among_ok = self
            .among
            .as_ref()
            .is_none_or(|keys| keys.binary_search_by(|k| k.as_slice().cmp(key)).is_ok());
        kind_ok && key_ok && among_ok
    }

    fn options(&self) -> WatchOptions {
        let opts = match self.events {
            Events::Delete => WatchOptions::new().with_filters([WatchFilterType::NoPut]),
            Events::Put => WatchOptions::new().with_filters([WatchFilterType::NoDelete]),
            Events::Any => WatchOptions::new(),
        };
        let opts = match self.since {
            Some(revision) => opts.with_start_revision(revision),
            None => opts,
        };
        if self.prefix {
            opts.with_prefix()
        } else {
            opts
        }
    }
}

/// A watch for changes to a few keys or ranges (and, optionally, the deletion of our own key),
/// registered *from now*.
///
/// etcd puts a watch whose start revision is at or below its current revision into the
/// "unsynced" group, served on a 100 ms tick. A watch from `read revision + 1` lands there
/// whenever anything was written between the read and the watch's creation — constantly under
/// contention. A watch without a start revision is always registered in the synced group, at
/// the revision its `created` response reports; if that is newer than the read that decided to
/// wait, the caller confirms with a fresh read while the watch is already in place: anything
/// after the watch's revision is delivered, anything up to the fresh read's is seen by it.
struct ChangeWatch {
    shared: Arc<Shared>,
    stream: etcd_client::WatchStream,
    targets: Vec<Watched>,
    own: Option<(String, i64)>,
    /// A change that arrived while the watch was still being created.
    early: Option<Result<Woken, Error>>,
}

impl ChangeWatch {
    /// Opens the watch and waits until etcd confirmed it. Returns it with the revision after
    /// which every change is delivered, or `None` after a transient failure (the caller
    /// re-reads; a delay of `backoff` has been served).
    async fn open(
        shared: &Arc<Shared>,
        targets: &[Watched],
        own: Option<(&str, i64)>,
        backoff: &mut Backoff,
    ) -> Result<Option<(ChangeWatch, i64)>, Error> {
        let mut watches = shared.client.watch_client();
        let requests = targets.len() + usize::from(own.is_some());
        let opened = unless_lost(shared, async {
            let created = async {
                let (first, rest) = targets
                    .split_first()
                    .ok_or_else(|| Error::Protocol("a watch without targets".into()))?;
                Counters::add(&shared.counters.watches, requests as u64);
                let mut stream = watches
                    .watch(first.key.clone(), Some(first.options()))
                    .await?;
                for t in rest {
                    stream.watch(t.key.clone(), Some(t.options())).await?;
                }
                if let Some((own_key, _)) = own {
                    stream
                        .watch(own_key, Some(Watched::deleted(own_key).options()))
                        .await?;
                }
                let mut watch = ChangeWatch {
                    shared: Arc::clone(shared),
                    stream,
                    targets: targets.to_vec(),
                    own: own.map(|(k, r)| (k.to_owned(), r)),
                    early: None,
                };
                let mut pending = requests;
                let mut revision = 0;
                while pending > 0 {
                    let resp = watch.stream.message().await?.ok_or_else(|| {
                        Error::Etcd(etcd_client::Error::WatchError("watch stream ended".into()))
                    })?;
                    if resp.created() {
                        if resp.canceled() {
                            return Err(Error::watch_refused(resp.cancel_reason()));
                        }
                        pending -= 1;
                        revision = revision.max(resp.header().map_or(0, |h| h.revision()));
                    }
                    if watch.early.is_none() {
                        watch.early = watch.classify(&resp);
                    }
                }
                Ok((watch, revision))
            };
            within(shared.request_timeout, created).await
        })
        .await;
        match opened {
            Ok(opened) => Ok(Some(opened)),
            Err(e)
                if e.is_transient()
                    || matches!(e, Error::Etcd(etcd_client::Error::WatchError(_))) =>
            {
                tracing::debug!(error = %e, "opening a watch failed; re-reading");
                pause(shared, backoff).await?;
                Ok(None)
            }
            Err(e) if may_be_stale_auth(&e) && shared.auth_renewal_due() => {
                tracing::debug!(error = %e, "a watch was refused; renewing the auth token");
                renew_auth(&shared.client).await?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// What a watch response means for this wait, if anything.
    fn classify(&self, resp: &etcd_client::WatchResponse) -> Option<Result<Woken, Error>> {
        Counters::add(
            &self.shared.counters.watch_events,
            resp.events().len() as u64,
        );
        if resp.canceled() && !resp.created() {
            tracing::debug!(
                compact_revision = resp.compact_revision(),
                reason = resp.cancel_reason(),
                "watch cancelled; re-reading"
            );
            return Some(Ok(match resp.compact_revision() {
                0 => Woken::Recheck,
                compacted => Woken::Compacted(compacted),
            }));
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let kind = event.event_type();
            if let Some((own_key, create_revision)) = &self.own {
                if kind == EventType::Delete && kv.key() == own_key.as_bytes() {
                    return Some(Err(Error::LockLost {
                        key: own_key.clone(),
                        create_revision: *create_revision,
                    }));
                }
            }
            if let Some(target) = self.targets.iter().find(|t| t.matches(kind, kv.key())) {
                return Some(Ok(if target.deciding {
                    Woken::Decided(kv.mod_revision())
                } else {
                    Woken::Changed
                }));
            }
        }
        None
    }

    /// Waits for a change. Our own key's deletion is [`Error::LockLost`], the session's loss
    /// [`Error::SessionLost`] / [`Error::SessionClosed`]. A stream that ends or a watch etcd
    /// cancels is a [`Woken::Recheck`], after a delay of `backoff`.
    ///
    /// A stream that stays quiet for a third of the session's TTL is probed: we ask etcd for a
    /// progress notification on it, which etcd answers at once on a live stream whose watches
    /// are in sync (ours are: they start from now). No answer within the request timeout means
    /// the stream is dead, whatever the connection seems to say: [`Woken::Recheck`]. So a wait
    /// never hangs on a silent stream.
    async fn wait(mut self, shared: &Arc<Shared>, backoff: &mut Backoff) -> Result<Woken, Error> {
        let quiet = (shared.ttl / 3).max(Duration::from_millis(100));
        let outcome = match self.early.take() {
            Some(outcome) => outcome,
            None => loop {
                let mut probed = false;
                let msg = loop {
                    let patience = if probed {
                        shared.request_timeout
                    } else {
                        quiet
                    };
                    let next = unless_lost(shared, async {
                        Ok(tokio::time::timeout(patience, self.stream.message()).await)
                    })
                    .await?;
                    match next {
                        Ok(msg) => break Some(msg),
                        Err(_) if probed => break None,
                        Err(_) => {
                            probed = true;
                            Counters::add(&shared.counters.watch_probes, 1);
                            if self.stream.request_progress().await.is_err() {
                                break None;
                            }
                        }
                    }
                };
                let Some(msg) = msg else {
                    tracing::debug!(
                        "a quiet watch stream did not answer a progress request; re-reading"
                    );
                    break Ok(Woken::Recheck);
                };
                match msg {
                    Ok(Some(resp)) => {
                        if let Some(outcome) = self.classify(&resp) {
                            tracing::trace!(
                                revision = resp.header().map_or(0, |h| h.revision()),
                                "woken"
                            );
                            break outcome;
                        }
                    }
                    Ok(None) | Err(_) => {
                        tracing::debug!("watch stream ended; re-reading");
                        break Ok(Woken::Recheck);
                    }
                }
            },
        };
        match outcome {
            Ok(woken @ (Woken::Recheck | Woken::Compacted(_))) => {
                pause(shared, backoff).await.map(|()| woken)
            }
            other => other,
        }
    }
}

/// The wait step every primitive goes through: with a watch registered from now on `targets`
/// (or from their [`since`](Watched::since) revision; and on our own key's deletion, and the
/// session's loss), waits for a change. `read_at` is the
/// revision of the read that decided to wait; if writes landed since, `reread` runs once the
/// watch is in place and says whether to still wait. Failures pause on `backoff`, which is
/// reset when a change really happened.
pub(crate) async fn wait_for_change<R, Fut>(
    shared: &Arc<Shared>,
    targets: &[Watched],
    own: Option<(&str, i64)>,
    read_at: i64,
    reread: R,
    backoff: &mut Backoff,
) -> Result<Woken, Error>
where
    R: FnOnce() -> Fut,
    Fut: Future<Output = Result<bool, Error>>,
{
    let Some((watch, from)) = ChangeWatch::open(shared, targets, own, backoff).await? else {
        return Ok(Woken::Recheck);
    };
    let woken = if from > read_at && !reread().await? {
        Woken::Changed
    } else {
        watch.wait(shared, backoff).await?
    };
    if matches!(woken, Woken::Changed | Woken::Decided(_)) {
        backoff.reset();
    }
    Ok(woken)
}

/// Completes with `Ok` once `key` is no longer the incarnation `create_revision` (known to
/// exist at revision `seen_at`): deleted, expired with its lease, or never there. `Err` if the
/// session is Lost first, or on a failure retrying cannot fix. Survives stream failures and
/// compaction by re-reading, with one backoff for the whole wait.
pub(crate) async fn wait_gone(
    shared: &Arc<Shared>,
    key: &str,
    create_revision: i64,
    mut seen_at: i64,
) -> Result<(), Error> {
    let check = Txn::new().when([keys::owner_compare(key, create_revision)]);
    let mut backoff = Backoff::for_requests();
    loop {
        let still_there = || async {
            let answer = send_until_answered(
                shared,
                || check.clone(),
                Kind::MaybeReadOnly,
                &mut Backoff::for_requests(),
            )
            .await?;
            Ok(answer.resp.succeeded())
        };
        let targets = [Watched::deleted(key)];
        match wait_for_change(shared, &targets, None, seen_at, still_there, &mut backoff).await? {
            // A delete event of the key (or a re-read that found it gone): that incarnation
            // has ended — keys are never re-created with the same create revision.
            Woken::Changed => return Ok(()),
            // Uncertain: the next round confirms once its watch is in place. (`Decided` and
            // `Compacted` come only from targets watched `since` a past revision.)
            Woken::Recheck | Woken::Decided(_) | Woken::Compacted(_) => seen_at = 0,
        }
    }
}

/// The revision at which the incarnation `create_revision` of `key` was deleted, read from
/// etcd's history (a watch of its deletions from its creation on); `None` if that history was
/// compacted away. For a key known to be gone whose deletion went unanswered. Transient
/// failures are retried with one backoff while the session lives.
pub(crate) async fn deleted_at(
    shared: &Arc<Shared>,
    key: &str,
    create_revision: i64,
) -> Result<Option<i64>, Error> {
    let mut backoff = Backoff::for_requests();
    let opts = WatchOptions::new()
        .with_start_revision(create_revision + 1)
        .with_filters([WatchFilterType::NoPut]);
    loop {
        let mut watches = shared.client.watch_client();
        let found = unless_lost(shared, async {
            let read = async {
                Counters::add(&shared.counters.watches, 1);
                let mut stream = watches.watch(key, Some(opts.clone())).await?;
                loop {
                    let Some(resp) = stream.message().await? else {
                        return Err(Error::Etcd(etcd_client::Error::WatchError(
                            "watch stream ended".into(),
                        )));
                    };
                    if resp.canceled() {
                        return if resp.compact_revision() > 0 {
                            Ok(None)
                        } else {
                            Err(Error::watch_refused(resp.cancel_reason()))
                        };
                    }
                    if let Some(kv) = resp.events().first().and_then(|e| e.kv()) {
                        return Ok(Some(kv.mod_revision()));
                    }
                }
            };
            within(shared.request_timeout, read).await
        })
        .await;
        match found {
            Err(e)
                if e.is_transient()
                    || matches!(e, Error::Etcd(etcd_client::Error::WatchError(_))) =>
            {
                pause(shared, &mut backoff).await?
            }
            Err(e) if may_be_stale_auth(&e) && shared.auth_renewal_due() => {
                renew_auth(&shared.client).await?
            }
            other => return other,
        }
    }
}

/// etcd checks a watch stream's auth token when a watch is created and reports a stale token
/// (expired, or issued before a change of users or roles) as "permission denied": a refused
/// watch renews the token and is tried again, at most once per [`RenewalGate::INTERVAL`];
/// refused again, the denial is believed.
fn may_be_stale_auth(e: &Error) -> bool {
    e.is_stale_auth() || matches!(e, Error::PermissionDenied(_))
}

/// What interrupts a [`PrefixEvents`] stream.
pub(crate) enum Gap {
    /// The history after the last revision was compacted away: re-read the state, then
    /// [`PrefixEvents::resume_after`] the read's revision.
    Compacted,
    /// A failure retrying cannot fix (etcd refused the watch: no permission, say).
    Fatal(Error),
}

/// Every event of one store revision under a prefix: one Txn's operations, or every key
/// deleted by one lease revoke or expiry, in the order etcd applied them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Revision<E = etcd_client::Event> {
    /// The revision every event here carries (its `mod_revision`; a deletion's own).
    pub(crate) revision: i64,
    pub(crate) events: Vec<E>,
}

/// Every event under a prefix, a whole revision at a time, in revision order, across
/// disconnects: after a stream failure it re-opens the watch just after the last delivered
/// revision (with backoff), so nothing is skipped. A revision is delivered only with all its events
/// (etcd sends them in one response, as no watch here asks for `fragment`), and the position
/// moves past a revision only once it was delivered. A stream quiet for [`PREFIX_QUIET`] is
/// probed with a progress request and re-opened when that goes unanswered, so a silently dead
/// stream is noticed even without HTTP/2 keep-alive. Independent of any session's lease.
pub(crate) struct PrefixEvents {
    client: etcd_client::Client,
    prefix: String,
    /// Every event at or below this revision has been delivered (or was covered by a read).
    after: i64,
    stream: Option<etcd_client::WatchStream>,
    /// Revisions received and not delivered yet, oldest first.
    pending: std::collections::VecDeque<Revision>,
    backoff: Backoff,
    /// A progress request is outstanding on the current stream.
    probed: bool,
    /// When a refused watch of this stream may renew the client's auth token.
    auth_renewal: RenewalGate,
}

/// A prefix watch quiet for this long is asked for a progress notification …
const PREFIX_QUIET: Duration = Duration::from_secs(10);
/// … and re-opened (from the last delivered revision + 1) if none comes within this.
const PREFIX_PROBE_PATIENCE: Duration = Duration::from_secs(5);
/// Opening a prefix watch that is not answered within this is given up and tried again (the
/// connection it went to may be frozen, with nothing to close it).
const PREFIX_OPEN_PATIENCE: Duration = Duration::from_secs(5);

/// Appends `events` (each with its revision, in etcd's order) to `pending`, grouped by
/// revision, dropping those at or below `after` (covered by a read or delivered already).
fn group_by_revision<E>(
    pending: &mut std::collections::VecDeque<Revision<E>>,
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

impl PrefixEvents {
    /// Events under `prefix` with revisions after `after`.
    pub(crate) fn new(client: etcd_client::Client, prefix: &str, after: i64) -> PrefixEvents {
        PrefixEvents {
            client,
            prefix: prefix.to_owned(),
            after,
            stream: None,
            pending: Default::default(),
            backoff: Backoff::for_requests(),
            probed: false,
            auth_renewal: RenewalGate::default(),
        }
    }

    /// Continues after `revision` (a fresh read's), dropping anything buffered.
    pub(crate) fn resume_after(&mut self, revision: i64) {
        self.after = revision;
        self.stream = None;
        self.pending.clear();
        self.probed = false;
    }

    /// Whether every revision received so far has been handed out (what etcd sent in one
    /// response is all applied once this holds).
    pub(crate) fn is_drained(&self) -> bool {
        self.pending.is_empty()
    }

    /// The next revision's events, all of them.
    pub(crate) async fn next(&mut self) -> Result<Revision, Gap> {
        loop {
            if let Some(revision) = self.pending.pop_front() {
                self.after = revision.revision;
                return Ok(revision);
            }
            let stream = match self.stream.as_mut() {
                Some(s) => s,
                None => {
                    let opts = WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(self.after + 1);
                    let opening = self.client.watch(self.prefix.as_str(), Some(opts));
                    match within(PREFIX_OPEN_PATIENCE, opening).await {
                        Ok(s) => self.stream.insert(s),
                        Err(e) => {
                            if may_be_stale_auth(&e) && self.auth_renewal.due() {
                                renew_auth(&self.client).await.map_err(Gap::Fatal)?;
                                continue;
                            }
                            if !e.is_transient() {
                                return Err(Gap::Fatal(e));
                            }
                            tracing::debug!(error = %e, "opening a prefix watch failed; retrying");
                            sleep(self.backoff.next_delay()).await;
                            continue;
                        }
                    }
                }
            };
            let patience = if self.probed {
                PREFIX_PROBE_PATIENCE
            } else {
                PREFIX_QUIET
            };
            let message = match tokio::time::timeout(patience, stream.message()).await {
                Ok(message) => message,
                Err(_) if self.probed => {
                    tracing::debug!(prefix = %self.prefix, "a quiet prefix watch did not answer a progress request; re-opening");
                    self.stream = None;
                    self.probed = false;
                    continue;
                }
                Err(_) => {
                    self.probed = true;
                    if stream.request_progress().await.is_err() {
                        self.stream = None;
                        self.probed = false;
                    }
                    continue;
                }
            };
            self.probed = false;
            match message {
                Ok(Some(resp)) => {
                    if resp.canceled() {
                        self.stream = None;
                        if resp.compact_revision() > 0 {
                            return Err(Gap::Compacted);
                        }
                        if resp.created() {
                            let e = Error::watch_refused(resp.cancel_reason());
                            if may_be_stale_auth(&e) && self.auth_renewal.due() {
                                tracing::debug!(prefix = %self.prefix, "a watch was refused; renewing the auth token");
                                renew_auth(&self.client).await.map_err(Gap::Fatal)?;
                                continue;
                            }
                            return Err(Gap::Fatal(e));
                        }
                        sleep(self.backoff.next_delay()).await;
                        continue;
                    }
                    if !resp.created() {
                        self.backoff.reset();
                    }
                    let events = resp
                        .events()
                        .iter()
                        .map(|event| (event.kv().map_or(0, |kv| kv.mod_revision()), event.clone()));
                    group_by_revision(&mut self.pending, self.after, events);
                }
                other => {
                    if let Err(e) = other {
                        if Error::from(e).is_stale_auth() && self.auth_renewal.due() {
                            let _ = renew_auth(&self.client).await;
                        }
                    }
                    tracing::debug!(prefix = %self.prefix, "prefix watch ended; resuming");
                    self.stream = None;
                    sleep(self.backoff.next_delay()).await;
                }
            }
        }
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
