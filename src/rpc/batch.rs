//! Merged Txns (group commit): the Txns that the sessions of one connection send at one
//! moment go to etcd as one Txn, which etcd checks, logs and applies as one request instead of
//! many (100 small claim Txns sent at one instant were answered in 7–16 ms here; the same in
//! one Txn in 2–6 ms: `docs/performance.md`, sixth session of 2026-12-06).
//!
//! A *part* is a list of operations that could have been a Txn of their own,
//! `Txn::new().and_then(ops)`: each operation is a Txn nested in it, or a plain one (sent
//! with the witnesses of its nested Txns' permissions: [`witness`](super::witness)). A part
//! goes out at once in a round of its own while fewer than [`ROUNDS`] rounds are in flight;
//! else it waits, and when a round is answered, every part that waited goes out in the next
//! round. A round is as few Txns as hold its parts, each
//! within etcd's operations for a Txn ([`TXN_OPS`]) and with parts that share no key: etcd
//! evaluates every compare of a Txn, the nested ones too, against the store as it was before
//! the Txn, so parts that touch disjoint keys come to what they would have come to one after
//! the other (and etcd refuses a Txn that puts one key in two parts, or puts and deletes it).
//! A part that touches a range of keys goes alone.
//!
//! Two more kinds of part, for the releases and enqueues of locks ([`How`]):
//!
//! - A [`Conditional`] part is a whole Txn — compares, then-branch, else-branch — merged
//!   *flat*: the merged Txn's compares are all its parts', its then-branch all theirs in
//!   order, with no else-branch. If every compare holds, each part is answered from its own
//!   slice of the then-branch; if one fails, nothing was applied and each part goes alone,
//!   answered from its own branch. Flat, never nested: etcd 3.4/3.5 before 2026 checked
//!   neither the permissions nor the quota of operations inside a nested Txn (etcd PRs
//!   #21689, #22134), so a nested write would slip past a role that forbids it.
//! - An *ordered* part may share keys with the other parts of its Txn, within rules that make
//!   the merged Txn come to what its parts would have come to one after the other, in the
//!   Txn's order ([`shape`]); a *lingering* part starts no round of its own: it goes with the
//!   next round another part starts — in its Txn if the rules let it, else it lingers on — or
//!   alone once its linger is up.
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

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use etcd_client::proto::{PbTxnOpRequest, PbTxnRequest};
use etcd_client::{Compare, Txn, TxnOp, TxnOpResponse};
use futures::future::{join_all, BoxFuture};
use futures::FutureExt;
use tokio::sync::oneshot;

use self::shape::{grouping, Shape};
use super::witness::{compareless, compareless_if};
use super::{pause, Answered, Rpc, Stop, Unanswered};
use crate::backoff::Backoff;
use crate::Error;

/// etcd's default `--max-txn-ops`: the operations a Txn and the Txns nested in it may use,
/// each level's own taken from what the levels below it may use (etcd's `checkTxnRequest`).
pub(crate) const TXN_OPS: usize = 128;

/// Whether etcd takes `txn` within `budget` operations (etcd's `checkTxnRequest`): a level
/// uses as many as the longest of its compares, success and failure lists, and each Txn nested
/// in it may use what is left.
pub(crate) fn fits(txn: &PbTxnRequest, budget: usize) -> bool {
    let used = txn
        .compare
        .len()
        .max(txn.success.len())
        .max(txn.failure.len());
    used <= budget
        && txn
            .success
            .iter()
            .chain(&txn.failure)
            .all(|op| match &op.request {
                Some(PbTxnOpRequest::RequestTxn(nested)) => fits(nested, budget - used),
                _ => true,
            })
}

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
    /// Whether its compares held (a [`Batcher::conditional`] part's; always for operations,
    /// whose Txn has none).
    pub(crate) succeeded: bool,
}

type Reply = Result<Answered<Slice>, Unanswered>;

/// How a part goes ([`Batcher::txn_with`]); by default strict, at once, until answered.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct How {
    /// It may share keys with the other parts of its Txn, which then run in an order that
    /// comes to what one after the other would have (`shape`'s rules); else it shares none.
    pub(crate) ordered: bool,
    /// It starts no round of its own for this long: it goes with the next round that another
    /// part starts (a write it can share a raft entry with), or once this is up.
    pub(crate) linger: Option<Duration>,
    /// It is sent once: a failed attempt is answered with its error (uncertain if it may have
    /// landed; a merged Txn that went unanswered as [`Error::Timeout`], whatever its own error
    /// was) instead of being retried alone — unless etcd refused a merged Txn, or a compare of
    /// a flat one failed, when it is sent alone once (the cause may have been another part's).
    /// For callers with a retry loop of their own.
    pub(crate) once: bool,
}

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

impl State {
    /// Whether a round may start now (fewer than [`ROUNDS`] are in flight); if so, counts it
    /// in flight (its caller spawns it once the lock is let go).
    fn round_starts(&mut self) -> bool {
        let start = self.sending < ROUNDS;
        self.sending += start as usize;
        start
    }
}

struct Part {
    body: Body,
    /// May share keys with other parts in an order (see [`How::ordered`]).
    ordered: bool,
    /// Whether it starts a round (else it lingers: see [`How::linger`]); set by its caller
    /// once its linger is up, wherever the part is then.
    urgent: Arc<AtomicBool>,
    /// Whether it is sent once only (see [`How::once`]).
    once: bool,
    rpc: Rpc,
    stop: Arc<dyn Stop>,
    reply: oneshot::Sender<Reply>,
    /// Whether an attempt carrying it was sent, or its caller left first (see [`Fate`]).
    fate: Arc<StdMutex<Fate>>,
}

/// What a part sends.
enum Body {
    /// Operations of a Txn without compares: `first`, and `retry` after an attempt went
    /// unanswered. Merged as they are, each part's Txns nested in the merged one.
    Ops {
        first: Vec<TxnOp>,
        retry: Vec<TxnOp>,
    },
    /// A whole conditional Txn, the same on every attempt. Merged *flat*: the merged Txn's
    /// compares are all the parts', its then-branch all theirs in order; if a compare fails,
    /// nothing was applied and each part goes alone, with its own else-branch.
    Whole(Conditional),
}

impl Body {
    /// How many of a merged Txn's answers are this part's.
    fn width(&self) -> usize {
        match self {
            Body::Ops { first, .. } => first.len(),
            Body::Whole(c) => c.then.len(),
        }
    }

    /// What it sends alone: `first` or `retry` (once `sent`), or its whole Txn.
    fn alone(&self, sent: bool) -> Txn {
        match self {
            Body::Ops { first, .. } if !sent => compareless(first.clone()),
            Body::Ops { retry, .. } => compareless(retry.clone()),
            Body::Whole(c) => c.txn(),
        }
    }
}

/// A Txn given as its parts — compares, then-branch, else-branch — so that several can be
/// merged flat into one ([`Batcher::conditional`]).
#[derive(Debug, Clone)]
pub(crate) struct Conditional {
    pub(crate) when: Vec<Compare>,
    pub(crate) then: Vec<TxnOp>,
    pub(crate) otherwise: Vec<TxnOp>,
    /// Reads never sent, that the part counts as its own when it is merged: what its outcome
    /// depends on beyond what it reads (an enqueue that decides from its session's mirror of
    /// the queue rather than from a read still depends on the queue: no other enqueue of it
    /// may share its Txn, and with it its create revision).
    pub(crate) depends: Vec<TxnOp>,
}

impl From<(Vec<Compare>, Vec<TxnOp>, Vec<TxnOp>)> for Conditional {
    /// A Txn's compares, then-branch and else-branch, depending on nothing more.
    fn from((when, then, otherwise): (Vec<Compare>, Vec<TxnOp>, Vec<TxnOp>)) -> Conditional {
        Conditional {
            when,
            then,
            otherwise,
            depends: Vec::new(),
        }
    }
}

impl Conditional {
    /// Depending on the reads of `ops` too (see [`Conditional::depends`]).
    pub(crate) fn depending_on(mut self, ops: Vec<TxnOp>) -> Conditional {
        self.depends.extend(ops);
        self
    }

    /// The Txn itself.
    pub(crate) fn txn(&self) -> Txn {
        Txn::new()
            .when(self.when.clone())
            .and_then(self.then.clone())
            .or_else(self.otherwise.clone())
    }
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

    /// What it takes of a merged Txn.
    fn shape(&self) -> Shape {
        match &self.body {
            Body::Ops { first, .. } => Shape::of(first, self.ordered, false),
            Body::Whole(c) => {
                let mut shape = Shape::of(&[TxnOp::txn(c.txn())], self.ordered, true);
                shape.depends_on(&c.depends);
                shape
            }
        }
    }

    fn urgent(&self) -> bool {
        self.urgent.load(Ordering::SeqCst)
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
        self.txn_with(rpc, first, retry, stop, How::default()).await
    }

    /// [`txn`](Self::txn), going as `how` says.
    pub(crate) async fn txn_with(
        self: &Arc<Self>,
        rpc: &Rpc,
        first: Vec<TxnOp>,
        retry: Vec<TxnOp>,
        stop: Arc<dyn Stop>,
        how: How,
    ) -> Result<Answered<Slice>, Unanswered> {
        // Only `first` goes merged (`retry` goes alone).
        self.send(rpc, Body::Ops { first, retry }, stop, how).await
    }

    /// Sends the conditional Txn `txn` merged flat with other callers' (see [`Body::Whole`]),
    /// going as `how` says; the answer's `succeeded` and operations are as for `txn` alone.
    /// Stops when `stop` stops.
    pub(crate) async fn conditional(
        self: &Arc<Self>,
        rpc: &Rpc,
        txn: Conditional,
        stop: Arc<dyn Stop>,
        how: How,
    ) -> Result<Answered<Slice>, Unanswered> {
        self.send(rpc, Body::Whole(txn), stop, how).await
    }

    async fn send(
        self: &Arc<Self>,
        rpc: &Rpc,
        body: Body,
        stop: Arc<dyn Stop>,
        how: How,
    ) -> Result<Answered<Slice>, Unanswered> {
        let definite = |error| Unanswered {
            error,
            uncertain: false,
        };
        stop.check().map_err(definite)?;
        if let Body::Ops { first, retry } = &body {
            if first.len() != retry.len() {
                return Err(definite(Error::Internal(format!(
                    "a merged Txn's part of {} operations retried as {}",
                    first.len(),
                    retry.len()
                ))));
            }
        }
        let (reply, mut answer) = oneshot::channel();
        let fate = Arc::new(StdMutex::new(Fate::default()));
        let urgent = Arc::new(AtomicBool::new(how.linger.is_none()));
        let part = Part {
            body,
            ordered: how.ordered,
            urgent: Arc::clone(&urgent),
            once: how.once,
            rpc: rpc.clone(),
            stop: Arc::clone(&stop),
            reply,
            fate: Arc::clone(&fate),
        };
        if let Some(part) = self.open(part) {
            let round = Round {
                batcher: Arc::clone(self),
                ran: true,
            };
            // Boxed: a request's future is large, and every caller's future would hold it.
            Box::pin(attempt(vec![part])).await;
            drop(round);
        }
        // A caller that leaves takes back a part no round took yet (one lingering, say).
        let _withdraw = Withdraw {
            batcher: self,
            fate: &fate,
        };
        let mut linger = how.linger.map(|d| Box::pin(tokio::time::sleep(d)));
        loop {
            tokio::select! {
                answer = &mut answer => return answer.unwrap_or_else(|_| Err(Unanswered {
                    error: Error::Internal("a merged Txn's task ended without an answer".into()),
                    uncertain: true,
                })),
                // Uncertain only if an attempt carrying it was sent; none is after this.
                error = stop.stopped() => {
                    let mut fate = fate.lock().unwrap_or_else(|e| e.into_inner());
                    fate.abandoned = true;
                    return Err(Unanswered { error, uncertain: fate.sent });
                }
                () = async { linger.as_mut().expect("only while lingering").await },
                    if linger.is_some() =>
                {
                    linger = None;
                    self.hurry(&urgent, rpc);
                }
            }
        }
    }

    /// Adds `part` to those waiting for the next round; starts one if it is urgent and fewer
    /// than [`ROUNDS`] are in flight. An urgent whole Txn that finds nothing waiting and no
    /// round in flight is handed back instead, counted as a round in flight: its caller sends
    /// it at once, in its own task (a spawned round would cost a task hop on every
    /// uncontended request); it is a request cancelled with its caller, as any write of ours
    /// sent directly (a release or an enqueue of the engine, each fenced or idempotent).
    fn open(self: &Arc<Self>, part: Part) -> Option<Part> {
        let rpc = part.rpc.clone();
        let start = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let alone = matches!(part.body, Body::Whole(_)) && part.urgent();
            if alone && state.open.is_empty() && state.sending == 0 {
                state.sending += 1;
                return Some(part);
            }
            let start = part.urgent() && state.round_starts();
            state.open.push(part);
            start
        };
        if start {
            rpc.spawn(Arc::clone(self).round());
        }
        None
    }

    /// The lingering part `urgent` is urgent from now on: it starts a round if it waits for
    /// one and fewer than [`ROUNDS`] are in flight. A round that has it in hand sends it, or
    /// puts it back, and then starts the next round for it as it ends.
    fn hurry(self: &Arc<Self>, urgent: &Arc<AtomicBool>, rpc: &Rpc) {
        urgent.store(true, Ordering::SeqCst);
        let start = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let waits = state.open.iter().any(|p| Arc::ptr_eq(&p.urgent, urgent));
            waits && state.round_starts()
        };
        if start {
            rpc.spawn(Arc::clone(self).round());
        }
    }

    /// Puts `parts` — lingering, taken by a round whose Txns they may not share — back first
    /// among those waiting, but for those whose callers left meanwhile (their `Withdraw` found
    /// nothing to take back); starts a round if one of them hurried meanwhile (its `hurry`
    /// found nothing either) and fewer than [`ROUNDS`] are in flight.
    fn put_back(self: &Arc<Self>, parts: Vec<Part>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut back: Vec<Part> = parts
            .into_iter()
            .filter(|p| {
                let fate = p.fate.lock().unwrap_or_else(|e| e.into_inner());
                !p.reply.is_closed() && !fate.abandoned
            })
            .collect();
        let rpc = back.iter().find(|p| p.urgent()).map(|p| p.rpc.clone());
        back.append(&mut state.open);
        state.open = back;
        let start = rpc.filter(|_| state.round_starts());
        drop(state);
        if let Some(rpc) = start {
            rpc.spawn(Arc::clone(self).round());
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
            let (groups, lingering): (Vec<Vec<Part>>, Vec<Vec<Part>>) = groups(parts)
                .into_iter()
                .partition(|group| group.iter().any(Part::urgent));
            if !lingering.is_empty() {
                round
                    .batcher
                    .put_back(lingering.into_iter().flatten().collect());
            }
            join_all(groups.into_iter().map(attempt)).await;
            drop(round);
        }
        .boxed()
    }
}

/// Takes a part out of those waiting for a round, as its caller leaves.
struct Withdraw<'a> {
    batcher: &'a Batcher,
    fate: &'a Arc<StdMutex<Fate>>,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        let mut state = self.batcher.state.lock().unwrap_or_else(|e| e.into_inner());
        state.open.retain(|p| !Arc::ptr_eq(&p.fate, self.fate));
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
        // Lingering parts start no round: they go with the next, or start one when they
        // hurry.
        if self.ran {
            if let Some(rpc) = state
                .open
                .iter()
                .find(|p| p.urgent())
                .map(|p| p.rpc.clone())
            {
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
    // A group is all of one kind ([`Shape::whole`]).
    let whole = matches!(live[0].body, Body::Whole(_));
    let txn = match (whole, live.len()) {
        (true, 1) => live[0].body.alone(false),
        (true, _) => {
            let (mut when, mut then) = (Vec::new(), Vec::new());
            for p in &live {
                if let Body::Whole(c) = &p.body {
                    when.extend(c.when.iter().cloned());
                    then.extend(c.then.iter().cloned());
                }
            }
            Txn::new().when(when).and_then(then)
        }
        (false, _) => {
            let ops: Vec<TxnOp> = live
                .iter()
                .flat_map(|p| match &p.body {
                    Body::Ops { first, .. } => first.clone(),
                    Body::Whole(_) => Vec::new(),
                })
                .collect();
            // Parts of many queues can need more witnesses than etcd takes: each goes alone.
            match compareless_if(ops, |r| live.len() == 1 || fits(r, TXN_OPS)) {
                Some(txn) => txn,
                None => {
                    for p in live {
                        alone(p, false);
                    }
                    return;
                }
            }
        }
    };
    let stop = AllOf(live.iter().map(|p| Arc::clone(&p.stop)).collect());
    let answer = tokio::select! {
        answer = rpc.txn(txn) => answer,
        _ = stop.stopped() => {
            for p in live {
                let error = p.stop_error();
                p.answer(Err(Unanswered { error, uncertain: true }));
            }
            return;
        }
    };
    match answer {
        // A compare of a flat merged Txn failed: nothing applied; each goes alone.
        Ok(resp) if whole && live.len() > 1 && !resp.succeeded() => {
            for p in live {
                alone(p, false);
            }
        }
        Ok(resp) => deliver(live, resp, false),
        // Alone and refused (nothing applied), or alone and sent once only.
        Err(error) if live.len() == 1 && (!error.is_retryable() || live[0].once) => {
            if let Some(p) = live.into_iter().next() {
                let uncertain = error.is_retryable();
                p.answer(Err(Unanswered { error, uncertain }));
            }
        }
        Err(error) => {
            let uncertain = error.is_retryable();
            tracing::debug!(%error, parts = live.len(), "a merged Txn failed; its parts go alone");
            for p in live {
                match p.once && uncertain {
                    // Answered: its caller's own loop retries (the attempt may have landed).
                    true => {
                        let error = Error::Timeout(p.rpc.timeout());
                        p.answer(Err(Unanswered {
                            error,
                            uncertain: true,
                        }));
                    }
                    false => alone(p, uncertain),
                }
            }
        }
    }
}

/// Sends `part` alone, in a task of its session, until it is answered, its session stops or
/// its caller is gone — once only for a part sent [`How::once`] — (after a pause, if an attempt
/// carrying it is `uncertain`: it may still land, and every attempt then sends its retry
/// operations).
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
            let body = &part.body;
            let attempt = || body.alone(sent.swap(true, Ordering::Relaxed));
            let stop = Arc::clone(&part.stop);
            let sending = async {
                if !part.once {
                    return part
                        .rpc
                        .txn_until_answered(attempt, &mut backoff, &*stop)
                        .await;
                }
                tokio::select! {
                    sent = part.rpc.txn(attempt()) => match sent {
                        Ok(resp) => Ok(Answered { resp, uncertain: false }),
                        Err(error) => Err(Unanswered { uncertain: error.is_retryable(), error }),
                    },
                    // In flight: it may still land.
                    error = stop.stopped() => Err(Unanswered { error, uncertain: true }),
                }
            };
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

/// Hands each of `parts` its slice of `resp` (a part alone: all of it, either branch).
fn deliver(parts: Vec<Part>, resp: etcd_client::TxnResponse, uncertain: bool) {
    let mut ops = resp.op_responses().into_iter();
    let succeeded = resp.succeeded();
    // A whole Txn alone is answered from either branch: all of it is the part's.
    let whole_alone = matches!(&parts[..], [p] if matches!(p.body, Body::Whole(_)));
    let width: usize = match whole_alone {
        true => ops.len(),
        false => parts.iter().map(|p| p.body.width()).sum(),
    };
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
                        ops: ops
                            .by_ref()
                            .take(if whole_alone { width } else { p.body.width() })
                            .collect(),
                        revision: *revision,
                        succeeded,
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

/// `parts` in as few groups as hold them (see [`grouping`]).
fn groups(parts: Vec<Part>) -> Vec<Vec<Part>> {
    // Shapes cost a copy of every key: only worth it when there is a choice.
    if parts.len() < 2 {
        return vec![parts];
    }
    let shapes: Vec<Shape> = parts.iter().map(Part::shape).collect();
    let grouping = grouping(&shapes.iter().collect::<Vec<_>>());
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

mod shape;
#[cfg(test)]
mod tests;
