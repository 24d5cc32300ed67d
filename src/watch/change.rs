//! Waiting for a change of a few keys or ranges, with watches registered from now.

use std::future::Future;
use std::time::Duration;

use etcd_client::EventType;

use super::hub::{self, Hub, Note, Own};
use super::{Change, Watched, Woken};
use crate::backoff::Backoff;
use crate::rpc::{pause, unless_stopped, Rpc, Stats, Stop};
use crate::Error;

/// What a wait goes through: the request handle its watches are opened with, what ends it
/// (its session's loss), and how long its watch stream may stay quiet before it is probed.
#[derive(Clone, Copy)]
pub(crate) struct Waits<'a> {
    pub(crate) rpc: &'a Rpc,
    pub(crate) stop: &'a dyn Stop,
    /// A stream quiet for this long is asked for a progress notification.
    pub(crate) quiet: Duration,
    /// The session's shared watch stream, if it has one.
    pub(crate) hub: Option<&'a Hub>,
    /// The lease the waiter's own key is on.
    pub(crate) lease: i64,
}

/// A watch for changes to a few keys or ranges (and, optionally, the deletion of our own key),
/// registered *from now*.
///
/// etcd puts a watch whose start revision is at or below its current revision into the
/// "unsynced" group, served on a 100 ms tick. A watch from `read revision + 1` lands there
/// whenever anything was written between the read and the watch's creation — constantly under
/// contention. A watch without a start revision lands there only when a write commits while
/// etcd registers it, before etcd's PR #20229 (the hub's scopes, which every engine wait uses,
/// guard against even that with twins: `hub`'s documentation). It is delivered every event
/// after the revision its `created` response reports; if that is newer than the read that
/// decided to wait, the caller confirms with a fresh read while the watch is already in place:
/// anything after the watch's revision is delivered, anything up to the fresh read's is seen
/// by it.
struct ChangeWatch {
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
        waits: Waits<'_>,
        targets: &[Watched],
        own: Option<(&str, i64)>,
        backoff: &mut Backoff,
    ) -> Result<Option<(ChangeWatch, i64)>, Error> {
        let rpc = waits.rpc;
        let requests = targets.len() + usize::from(own.is_some());
        let opened = unless_stopped(waits.stop, async {
            let created = async {
                let (first, rest) = targets
                    .split_first()
                    .ok_or_else(|| Error::Internal("a wait without targets".into()))?;
                let mut stream = rpc.open_watch(first.key.clone(), first.options()).await?;
                Stats::add(&rpc.stats().watches, requests as u64 - 1);
                for t in rest {
                    stream.watch(t.key.clone(), Some(t.options())).await?;
                }
                if let Some((own_key, _)) = own {
                    stream
                        .watch(own_key, Some(Watched::deleted(own_key).options()))
                        .await?;
                }
                let mut watch = ChangeWatch {
                    stream,
                    targets: targets.to_vec(),
                    own: own.map(|(k, r)| (k.to_owned(), r)),
                    early: None,
                };
                let mut pending = requests;
                let mut revision = 0;
                while pending > 0 {
                    let resp = watch
                        .stream
                        .message()
                        .await?
                        .ok_or_else(Error::stream_ended)?;
                    if resp.created() {
                        if resp.canceled() {
                            return Err(Error::watch_refused(resp.cancel_reason()));
                        }
                        pending -= 1;
                        revision = revision.max(resp.header().map_or(0, |h| h.revision()));
                    }
                    if watch.early.is_none() {
                        watch.early = watch.classify(rpc, &resp);
                    }
                }
                Ok((watch, revision))
            };
            crate::rpc::send::within(rpc.timeout(), created).await
        })
        .await;
        match opened {
            Ok(opened) => Ok(Some(opened)),
            Err(e) if e.is_retryable() => {
                tracing::debug!(error = %e, "opening a watch failed; re-reading");
                pause(waits.stop, backoff).await?;
                Ok(None)
            }
            Err(e) if rpc.watch_refusal_renews(&e) => {
                tracing::debug!(error = %e, "a watch was refused; renewing the auth token");
                rpc.renew_auth().await?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// What a watch response means for this wait, if anything.
    fn classify(
        &self,
        rpc: &Rpc,
        resp: &etcd_client::WatchResponse,
    ) -> Option<Result<Woken, Error>> {
        Stats::add(&rpc.stats().watch_events, resp.events().len() as u64);
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
                tracing::trace!(
                    target: "etcd_coord::handoff",
                    key = %String::from_utf8_lossy(kv.key()),
                    waiter = self.own.as_ref().map_or("", |(k, _)| k.as_str()),
                    revision = kv.mod_revision(),
                    "woken"
                );
                if target.deciding {
                    return Some(Ok(Woken::Decided(kv.mod_revision())));
                }
                // Every matching event of this response: one revision's, all of them.
                let keys = resp
                    .events()
                    .iter()
                    .filter_map(|e| e.kv().map(|kv| (e.event_type(), kv)))
                    .filter(|(kind, kv)| self.targets.iter().any(|t| t.matches(*kind, kv.key())))
                    .map(|(_, kv)| kv.key().to_vec())
                    .collect();
                return Some(Ok(Woken::Changed(Change {
                    revision: kv.mod_revision(),
                    keys,
                    ordered: false,
                })));
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
    async fn wait(mut self, waits: Waits<'_>, backoff: &mut Backoff) -> Result<Woken, Error> {
        let quiet = waits.quiet.max(Duration::from_millis(100));
        let outcome = match self.early.take() {
            Some(outcome) => outcome,
            None => loop {
                let mut probed = false;
                let msg = loop {
                    let patience = if probed { waits.rpc.timeout() } else { quiet };
                    let next = unless_stopped(waits.stop, async {
                        Ok(tokio::time::timeout(patience, self.stream.message()).await)
                    })
                    .await?;
                    match next {
                        Ok(msg) => break Some(msg),
                        Err(_) if probed => break None,
                        Err(_) => {
                            probed = true;
                            Stats::add(&waits.rpc.stats().watch_probes, 1);
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
                        if let Some(outcome) = self.classify(waits.rpc, &resp) {
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
                pause(waits.stop, backoff).await.map(|()| woken)
            }
            other => other,
        }
    }
}

/// The wait step every primitive goes through: with a watch of `targets` in place (from now,
/// or from their [`since`](Watched::since) revision; and of our own key's deletion, and the
/// session's loss), waits for a change. `read_at` is the revision of the read that decided to
/// wait; if changes since then may have been missed, `reread` runs once the watch is in place
/// and says whether to still wait. Failures pause on `backoff`, which is reset when a change
/// really happened.
///
/// Through the session's [`Hub`] when it has one and the wait has a scope
/// ([`hub::scope_of`]): no watch is registered per wait, and no re-read is needed when the
/// hub's kept revisions reach back to `read_at`. Else on a watch stream of its own.
#[tracing::instrument(name = "etcd_coord.watch_wait", level = "debug", skip_all, fields(targets = targets.len()))]
pub(crate) async fn wait_for_change<R, Fut>(
    waits: Waits<'_>,
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
    let scope = waits
        .hub
        .and_then(|hub| Some((hub, hub::scope_of(targets, own.map(|(k, _)| k.as_bytes()))?)));
    let step = Step {
        waits,
        targets,
        own,
        read_at,
    };
    let woken = match scope {
        Some((hub, scope)) => step.through_hub(hub, scope, reread, backoff).await?,
        None => step.alone(reread, backoff).await?,
    };
    if matches!(woken, Woken::Changed(_) | Woken::Decided(_)) {
        backoff.reset();
    }
    Ok(woken)
}

/// One [`wait_for_change`]: what it waits for, and since which read.
struct Step<'a> {
    waits: Waits<'a>,
    targets: &'a [Watched],
    own: Option<(&'a str, i64)>,
    read_at: i64,
}

impl Step<'_> {
    /// The wait on a watch stream of its own.
    async fn alone<R, Fut>(self, reread: R, backoff: &mut Backoff) -> Result<Woken, Error>
    where
        R: FnOnce() -> Fut,
        Fut: Future<Output = Result<bool, Error>>,
    {
        let opened = ChangeWatch::open(self.waits, self.targets, self.own, backoff).await?;
        let Some((watch, from)) = opened else {
            return Ok(Woken::Recheck);
        };
        if from > self.read_at && !reread().await? {
            return Ok(Woken::Changed(Change::default()));
        }
        watch.wait(self.waits, backoff).await
    }

    /// The wait through the session's hub, on its `scope`.
    async fn through_hub<R, Fut>(
        self,
        hub: &Hub,
        scope: Vec<u8>,
        reread: R,
        backoff: &mut Backoff,
    ) -> Result<Woken, Error>
    where
        R: FnOnce() -> Fut,
        Fut: Future<Output = Result<bool, Error>>,
    {
        let Step {
            waits,
            targets,
            own,
            read_at,
        } = self;
        let mine = own.map(|(key, _)| Own {
            key: key.as_bytes().to_vec(),
            lease: waits.lease,
        });
        let mut sub = hub.subscribe(scope, targets, mine, read_at);
        if sub.opens {
            if let Err(e) = unless_stopped(waits.stop, hub.open(&mut sub)).await {
                return refused_or_failed(waits, e, backoff).await;
            }
        }
        // The scope's watch is in place (at once, unless it is being created).
        let first = unless_stopped(waits.stop, async {
            Ok(tokio::time::timeout(waits.rpc.timeout(), sub.next()).await)
        })
        .await?;
        let note = match first {
            Ok(Some(Note::Ready(from))) => {
                if from > read_at && !reread().await? {
                    return Ok(Woken::Changed(Change::default()));
                }
                unless_stopped(waits.stop, async { Ok(sub.next().await) }).await?
            }
            Ok(note) => note,
            Err(_) => {
                tracing::debug!("a shared watch was not created in time; re-reading");
                hub.reset(sub.generation());
                None
            }
        };
        match note {
            Some(Note::Woken(woken)) => {
                if let Woken::Changed(change) = &woken {
                    Stats::add(
                        &waits.rpc.stats().watch_events,
                        change.keys.len().max(1) as u64,
                    );
                } else {
                    Stats::add(&waits.rpc.stats().watch_events, 1);
                }
                Ok(woken)
            }
            Some(Note::Lost) => {
                let (key, create_revision) = own.expect("only a wait with its own key loses it");
                Err(Error::LockLost {
                    key: key.to_owned(),
                    create_revision,
                })
            }
            Some(Note::Refused(reason)) => {
                // The stream keeps the token it was opened with: renew it on a new stream.
                hub.reset(sub.generation());
                refused_or_failed(waits, Error::watch_refused(&reason), backoff).await
            }
            Some(Note::Ready(_)) | Some(Note::Broken) | None => {
                pause(waits.stop, backoff).await?;
                Ok(Woken::Recheck)
            }
        }
    }
}

/// What a wait does when its watch failed with `e`: re-read after a pause if it may succeed
/// again, after renewing the token if the refusal may be a stale one, else fail.
async fn refused_or_failed(
    waits: Waits<'_>,
    e: Error,
    backoff: &mut Backoff,
) -> Result<Woken, Error> {
    if e.is_retryable() {
        tracing::debug!(error = %e, "watching failed; re-reading");
        pause(waits.stop, backoff).await?;
        Ok(Woken::Recheck)
    } else if waits.rpc.watch_refusal_renews(&e) {
        tracing::debug!(error = %e, "a watch was refused; renewing the auth token");
        waits.rpc.renew_auth().await?;
        Ok(Woken::Recheck)
    } else {
        Err(e)
    }
}
