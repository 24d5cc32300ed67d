//! Merged Txns (group commit): the Txns that the sessions of one connection send at one
//! moment go to etcd as one Txn, which etcd checks, logs and applies as one request instead of
//! many (100 small claim Txns sent at one instant were answered in 7–16 ms here; the same in
//! one Txn in 2–6 ms: `docs/performance.md`, sixth session of 2026-12-06).
//!
//! A *part* is a list of operations that could have been a Txn of their own,
//! `Txn::new().and_then(ops)`: each operation is a Txn nested in it, or a plain one. A part
//! goes out at once in a round of its own while fewer than [`ROUNDS`] rounds are in flight;
//! else it waits, and when a round is answered, every part that waited goes out in the next
//! round. A round is as few Txns as hold its parts, each
//! within etcd's operations for a Txn ([`TXN_OPS`]) and with parts that share no key: etcd
//! evaluates every compare of a Txn, the nested ones too, against the store as it was before
//! the Txn, so parts that touch disjoint keys come to what they would have come to one after
//! the other (and etcd refuses a Txn that puts one key in two parts, or puts and deletes it).
//! A part that touches a range of keys goes alone.
//!
//! Each round sends each of its merged Txns **once** (once more with a fresh token if etcd
//! found the token stale, as every request), within the request timeout of the session of
//! its first part (through whose handle it goes, and in whose counters it counts), and
//! answers each part with its own slice of the answer and the Txn's revision. If that attempt fails,
//! every part is sent again alone, in a task of its own session and stopped by it alone, as
//! it would have been without merging: one part's failure is no other's (etcd refuses a
//! whole Txn for one part's lease that is gone), and a merged Txn never keeps a round, or a
//! session that stopped, waiting. An attempt that went unanswered makes a part's answer
//! *uncertain* (it may still land), and every later attempt of the part sends its `retry`
//! operations. A caller whose own session stops returns at once — uncertain if an attempt
//! carrying its part was sent; certain if not, and then none is sent after (see [`Fate`]).
//! A part whose caller is gone is retried no more.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};

use etcd_client::proto::{PbTxnOpRequest, PbTxnRequest, PbTxnRequestOp};
use etcd_client::{Txn, TxnOp, TxnOpResponse};
use futures::future::{join_all, BoxFuture};
use futures::FutureExt;
use tokio::sync::oneshot;

use super::{pause, Answered, Rpc, Stop, Unanswered};
use crate::backoff::Backoff;
use crate::Error;

/// etcd's default `--max-txn-ops`: the operations a Txn and the Txns nested in it may use,
/// each level's own taken from what the levels below it may use (etcd's `checkTxnRequest`).
pub(crate) const TXN_OPS: usize = 128;

/// How many rounds may be in flight at once: a part that comes while one is waits only if
/// another is too. Two: with one, a part that came just after a round was sent waited for all
/// of it (claim p99 27.4 against 18.4 ms at 100 workers); three measured no better
/// (`docs/performance.md`, sixth session of 2026-12-06).
const ROUNDS: usize = 2;

/// A part's answer: the responses to its operations, and the revision of the Txn that
/// applied them.
#[derive(Debug)]
pub(crate) struct Slice {
    pub(crate) ops: Vec<TxnOpResponse>,
    pub(crate) revision: i64,
}

type Reply = Result<Answered<Slice>, Unanswered>;

/// The merged Txns of one connection's sessions (kept per family of siblings).
#[derive(Default)]
pub(crate) struct Batcher {
    state: StdMutex<State>,
}

#[derive(Default)]
struct State {
    /// The parts waiting for the next round.
    open: Vec<Part>,
    /// The rounds in flight.
    sending: usize,
}

struct Part {
    first: Vec<TxnOp>,
    retry: Vec<TxnOp>,
    shape: Shape,
    rpc: Rpc,
    stop: Arc<dyn Stop>,
    reply: oneshot::Sender<Reply>,
    /// Whether an attempt carrying it was sent, or its caller left first (see [`Fate`]).
    fate: Arc<StdMutex<Fate>>,
}

/// What became of a part, decided under one lock by whichever comes first: an attempt that
/// carries it, or its caller leaving (its session stopped). A caller that left before any
/// attempt was sent is told its failure is certain, and no attempt carries the part after.
#[derive(Default)]
struct Fate {
    sent: bool,
    abandoned: bool,
}

impl Part {
    /// Whether the part goes out — its caller waits, its session has not stopped, and its
    /// caller did not leave — and if so, records that it was sent.
    fn send(&self) -> bool {
        if self.reply.is_closed() || self.stop.check().is_err() {
            return false;
        }
        let mut fate = self.fate.lock().unwrap_or_else(|e| e.into_inner());
        fate.sent = !fate.abandoned;
        fate.sent
    }

    /// What its own stop reports (the session stopped, or was closed meanwhile).
    fn stop_error(&self) -> Error {
        self.stop.check().err().unwrap_or(Error::SessionClosed)
    }

    fn answer(self, reply: Reply) {
        let _ = self.reply.send(reply);
    }
}

impl Batcher {
    /// Sends `first` — the operations of a Txn without compares — merged with other callers'
    /// (see the module's docs); `retry` after an attempt went unanswered (as many operations,
    /// each in `first`'s place). Stops when `stop` stops.
    pub(crate) async fn txn(
        self: &Arc<Self>,
        rpc: &Rpc,
        first: Vec<TxnOp>,
        retry: Vec<TxnOp>,
        stop: Arc<dyn Stop>,
    ) -> Result<Answered<Slice>, Unanswered> {
        let definite = |error| Unanswered {
            error,
            uncertain: false,
        };
        stop.check().map_err(definite)?;
        if first.len() != retry.len() {
            return Err(definite(Error::Internal(format!(
                "a merged Txn's part of {} operations retried as {}",
                first.len(),
                retry.len()
            ))));
        }
        // Only `first` goes merged (`retry` goes alone).
        let shape = Shape::of(&first);
        let (reply, answer) = oneshot::channel();
        let fate = Arc::new(StdMutex::new(Fate::default()));
        let part = Part {
            first,
            retry,
            shape,
            rpc: rpc.clone(),
            stop: Arc::clone(&stop),
            reply,
            fate: Arc::clone(&fate),
        };
        let start = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.open.push(part);
            let start = state.sending < ROUNDS;
            state.sending += start as usize;
            start
        };
        if start {
            rpc.spawn(Arc::clone(self).round());
        }
        tokio::select! {
            answer = answer => answer.unwrap_or_else(|_| Err(Unanswered {
                error: Error::Internal("a merged Txn's task ended without an answer".into()),
                uncertain: true,
            })),
            // Uncertain only if an attempt carrying it was sent; none is after this.
            error = stop.stopped() => {
                let mut fate = fate.lock().unwrap_or_else(|e| e.into_inner());
                fate.abandoned = true;
                Err(Unanswered { error, uncertain: fate.sent })
            }
        }
    }

    /// Sends the parts waiting as one round — those that came while the task was on its way
    /// too — each group once; then, in a task of their own, those that came meanwhile.
    fn round(self: Arc<Self>) -> BoxFuture<'static, ()> {
        let mut round = Round {
            batcher: self,
            ran: false,
        };
        async move {
            round.ran = true;
            let parts = {
                let mut state = round
                    .batcher
                    .state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                std::mem::take(&mut state.open)
            };
            join_all(groups(parts).into_iter().map(attempt)).await;
            drop(round);
        }
        .boxed()
    }
}

/// A round in flight (counted in `sending` from when its task is spawned). However it ends —
/// answered, or its task dropped or panicking — the next round starts if parts wait, else
/// one round fewer is in flight: no part waits for a round that will not come. A round
/// dropped before it ran (its runtime shuts down) starts none; if no other round is in
/// flight, the parts that wait are answered with an error.
struct Round {
    batcher: Arc<Batcher>,
    ran: bool,
}

impl Drop for Round {
    fn drop(&mut self) {
        let mut state = self.batcher.state.lock().unwrap_or_else(|e| e.into_inner());
        if self.ran {
            if let Some(rpc) = state.open.first().map(|p| p.rpc.clone()) {
                drop(state);
                rpc.spawn(Arc::clone(&self.batcher).round());
                return;
            }
        }
        state.sending -= 1;
        if self.ran || state.sending > 0 {
            return;
        }
        let stranded = std::mem::take(&mut state.open);
        drop(state);
        for p in stranded {
            p.answer(Err(Unanswered {
                error: Error::Internal("a merged Txn's round was dropped before it ran".into()),
                uncertain: false,
            }));
        }
    }
}

/// Sends `parts` once, as one Txn, and answers each. If the attempt fails, each part is sent
/// again alone ([`alone`]); if it is refused, a part that was alone is answered with the
/// refusal. Parts whose callers gave up or whose sessions stopped are not sent.
async fn attempt(parts: Vec<Part>) {
    let (live, gone): (Vec<Part>, Vec<Part>) = parts.into_iter().partition(Part::send);
    for p in gone {
        let error = p.stop_error();
        p.answer(Err(Unanswered {
            error,
            uncertain: false,
        }));
    }
    let Some(rpc) = live.first().map(|p| p.rpc.clone()) else {
        return;
    };
    let ops: Vec<TxnOp> = live.iter().flat_map(|p| p.first.clone()).collect();
    let stop = AllOf(live.iter().map(|p| Arc::clone(&p.stop)).collect());
    let answer = tokio::select! {
        answer = rpc.txn(Txn::new().and_then(ops)) => answer,
        _ = stop.stopped() => {
            for p in live {
                let error = p.stop_error();
                p.answer(Err(Unanswered { error, uncertain: true }));
            }
            return;
        }
    };
    match answer {
        Ok(resp) => deliver(live, resp, false),
        // etcd refused it: nothing applied.
        Err(error) if !error.is_retryable() && live.len() == 1 => {
            if let Some(p) = live.into_iter().next() {
                p.answer(Err(Unanswered {
                    error,
                    uncertain: false,
                }));
            }
        }
        Err(error) => {
            let uncertain = error.is_retryable();
            tracing::debug!(%error, parts = live.len(), "a merged Txn failed; its parts go alone");
            for p in live {
                alone(p, uncertain);
            }
        }
    }
}

/// Sends `part` alone, in a task of its session, until it is answered, its session stops or
/// its caller is gone (after a pause, if an attempt carrying it is `uncertain`: it may still
/// land, and every attempt then sends its retry operations).
fn alone(mut part: Part, uncertain: bool) {
    let rpc = part.rpc.clone();
    rpc.spawn(async move {
        let mut backoff = Backoff::for_requests();
        if uncertain {
            if let Err(error) = pause(&*part.stop, &mut backoff).await {
                return part.answer(Err(Unanswered { error, uncertain }));
            }
        }
        let answered = {
            let sent = AtomicBool::new(uncertain);
            let (first, retry) = (&part.first, &part.retry);
            let attempt = || match sent.swap(true, Ordering::Relaxed) {
                false => Txn::new().and_then(first.clone()),
                true => Txn::new().and_then(retry.clone()),
            };
            let stop = Arc::clone(&part.stop);
            let sending = part.rpc.txn_until_answered(attempt, &mut backoff, &*stop);
            tokio::select! {
                answered = sending => answered,
                // Nobody reads the answer (an ack whose future was dropped): as a request
                // cancelled with its caller.
                () = part.reply.closed() => return,
            }
        };
        match answered {
            Ok(answered) => deliver(vec![part], answered.resp, uncertain || answered.uncertain),
            Err(u) => part.answer(Err(Unanswered {
                error: u.error,
                uncertain: uncertain || u.uncertain,
            })),
        }
    });
}

/// Hands each of `parts` its slice of `resp`.
fn deliver(parts: Vec<Part>, resp: etcd_client::TxnResponse, uncertain: bool) {
    let mut ops = resp.op_responses().into_iter();
    let width: usize = parts.iter().map(|p| p.first.len()).sum();
    let revision = match resp.header() {
        Some(header) if ops.len() == width => Ok(header.revision()),
        Some(_) => Err(format!(
            "a merged Txn of {width} operations answered for {}",
            ops.len()
        )),
        None => Err("txn response without header".to_owned()),
    };
    for p in parts {
        let reply = match &revision {
            Ok(revision) => {
                p.rpc.saw_revision(*revision);
                Ok(Answered {
                    resp: Slice {
                        ops: ops.by_ref().take(p.first.len()).collect(),
                        revision: *revision,
                    },
                    uncertain,
                })
            }
            // Answered, so applied as far as it could: what it did cannot be told.
            Err(e) => Err(Unanswered {
                error: Error::Protocol(e.clone()),
                uncertain: true,
            }),
        };
        let _ = p.reply.send(reply);
    }
}

/// Stopped once every one of them is.
struct AllOf(Vec<Arc<dyn Stop>>);

impl Stop for AllOf {
    fn check(&self) -> Result<(), Error> {
        let mut last = Ok(());
        for stop in &self.0 {
            match stop.check() {
                Ok(()) => return Ok(()),
                Err(e) => last = Err(e),
            }
        }
        last
    }

    fn stopped(&self) -> Pin<Box<dyn Future<Output = Error> + Send + 'static>> {
        let all: Vec<_> = self.0.iter().map(|s| s.stopped()).collect();
        Box::pin(async move { join_all(all).await.pop().unwrap_or(Error::SessionClosed) })
    }
}

/// What a part takes of a merged Txn.
#[derive(Debug, Clone, PartialEq)]
struct Shape {
    /// Its operations: the merged Txn's own level holds them all.
    width: usize,
    /// What its nested Txns use below that level.
    depth: usize,
    /// Every key it compares, reads or writes; `None` if it touches a range of keys.
    keys: Option<HashSet<Vec<u8>>>,
}

impl Shape {
    fn of(ops: &[TxnOp]) -> Shape {
        let txn = PbTxnRequest::from(Txn::new().and_then(ops.to_vec()));
        let mut keys = Some(HashSet::new());
        let depth = txn
            .success
            .iter()
            .map(|op| below(op, &mut keys))
            .max()
            .unwrap_or(0);
        Shape {
            width: txn.success.len(),
            depth,
            keys,
        }
    }
}

/// The operations `op` uses below its own level (etcd's `checkTxnRequest`: a Txn uses the
/// longest of its compares, success and failure lists, and its nested Txns what they use
/// below that); adds the keys it touches to `keys` (`None` for a range).
fn below(op: &PbTxnRequestOp, keys: &mut Option<HashSet<Vec<u8>>>) -> usize {
    let mut touch = |key: &[u8], range_end: &[u8]| match range_end.is_empty() {
        true => {
            if let Some(keys) = keys.as_mut() {
                keys.insert(key.to_vec());
            }
        }
        false => *keys = None,
    };
    match &op.request {
        Some(PbTxnOpRequest::RequestRange(r)) => touch(&r.key, &r.range_end),
        Some(PbTxnOpRequest::RequestPut(p)) => touch(&p.key, &[]),
        Some(PbTxnOpRequest::RequestDeleteRange(d)) => touch(&d.key, &d.range_end),
        Some(PbTxnOpRequest::RequestTxn(t)) => {
            for c in &t.compare {
                touch(&c.key, &c.range_end);
            }
            let own = t.compare.len().max(t.success.len()).max(t.failure.len());
            let nested = t
                .success
                .iter()
                .chain(&t.failure)
                .map(|op| below(op, keys))
                .max()
                .unwrap_or(0);
            return own + nested;
        }
        None => {}
    }
    0
}

/// `parts` in as few groups as hold them (see [`grouping`]).
fn groups(parts: Vec<Part>) -> Vec<Vec<Part>> {
    let shapes: Vec<&Shape> = parts.iter().map(|p| &p.shape).collect();
    let grouping = grouping(&shapes);
    let mut parts: Vec<Option<Part>> = parts.into_iter().map(Some).collect();
    grouping
        .into_iter()
        .map(|members| {
            members
                .into_iter()
                .filter_map(|i| parts[i].take())
                .collect()
        })
        .collect()
}

/// Parts of `shapes` in as few groups as hold them, in order, as indices: each group within
/// [`TXN_OPS`] and its parts' keys disjoint; a part that touches a range alone.
fn grouping(shapes: &[&Shape]) -> Vec<Vec<usize>> {
    let mut groups: Vec<(Vec<usize>, Shape)> = Vec::new();
    for (i, part) in shapes.iter().enumerate() {
        match groups.iter_mut().find(|(_, group)| may_join(group, part)) {
            Some((members, group)) => {
                group.width += part.width;
                group.depth = group.depth.max(part.depth);
                if let (Some(keys), Some(more)) = (group.keys.as_mut(), &part.keys) {
                    keys.extend(more.iter().cloned());
                }
                members.push(i);
            }
            None => groups.push((vec![i], (*part).clone())),
        }
    }
    groups.into_iter().map(|(members, _)| members).collect()
}

/// Whether a part of shape `part` may join a group of shape `group`.
fn may_join(group: &Shape, part: &Shape) -> bool {
    let (Some(keys), Some(more)) = (&group.keys, &part.keys) else {
        return false;
    };
    group.width + part.width + group.depth.max(part.depth) <= TXN_OPS && keys.is_disjoint(more)
}

#[cfg(test)]
mod tests;
