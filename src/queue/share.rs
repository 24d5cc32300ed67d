//! Claims of one process that go together: the claims of one queue made through one session
//! or its siblings ([`LeasedSession::sibling`](crate::LeasedSession::sibling)) — a worker
//! pool's workers, say — share their first read, and each tries first jobs that no other of
//! them is trying.
//!
//! - **One read for a burst.** A claim that starts while another's first scan is in flight
//!   waits for that scan instead of sending its own (unless the scan collects fewer
//!   candidates than the claim's chains need), so a burst of claimers reads the queue once,
//!   not once each. The scan is serializable (`scan_with`) and sized for as many claims as
//!   were ever under way at once, at most [`MAX_SHARED`] more, and reads past at least one
//!   claim per handle of the family ahead of the free jobs (`Claims::claims_hint`).
//! - **A read answered a moment ago.** A claim that starts within [`READ_KEPT`] (10 ms) after
//!   such a scan was answered takes its candidates from that answer, if it holds as many as
//!   the claim's chains need, and sends no read — while the family looks alone in claiming
//!   (as for "No chain while alone" below: a pool, only its own claims in that read, no
//!   collision since):
//!   a pool's workers that take their next jobs one after another read the queue about once
//!   per 10 ms instead of once per claim. A claim that finds nothing left for itself in it
//!   reads again, shared. (That read shows what the family claimed since, not what others
//!   did: where others claim, a claim that picked from it would collide and no longer take
//!   the first free job.)
//! - **Different first jobs.** Each claim then leaves out of its chain the jobs other claims
//!   of the family try first (or have won since that read); a claim that finds only such jobs
//!   in a shared read reads again on its own instead of racing its siblings for them (in a
//!   read of its own, it races them).
//! - **No chain while alone.** Once claims of the family have gone on side by side, while
//!   every claim the read shows is the family's and outside the few claims to decide after
//!   one found its first candidate taken, a claim tries its first jobs only, without a chain
//!   of others behind each: nobody else is seen claiming, and every candidate etcd must check,
//!   log and apply costs (a burst of 100 claims of chains of 8 took twice as long as of one,
//!   `docs/performance.md`). A claimer elsewhere that read at the same moment may take such a
//!   job; that claim then reads again, and it and the family's next claims chain.
//!
//! A claim that joins a sibling's read, or takes one answered a moment ago, sees the queue as
//! that read does, sent before the claim was called (for one answered, answered up to
//! [`READ_KEPT`] before): a job enqueued or given back meanwhile by anyone outside the family
//! may be missed (the claim then takes the best job it sees), never lost. One the family
//! enqueued or gave back is not: no read sent before that returned serves a claim after it,
//! answered or in flight (`Claims::wrote`, [`GivesBack`]) — but for a dropped guard's job,
//! which goes back in the background, after a read the family keeps may have been sent: it
//! may be passed over for up to [`READ_KEPT`] after it is back.
//!
//! Only the read and the choice of candidates are shared; each claim's Txn is its own, and a
//! claim Txn applies only where its job is unchanged since the read and unclaimed, whoever
//! read it: a shared read, however old, costs a claim a failed round, never a second claimer.
//! A claim whose first round won nothing reads again on its own. Nothing here sends a request
//! of its own or spawns a task: a claim dropped while it awaits a shared scan stops awaiting
//! it, and the last to stop drops the scan (two plain range reads).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use futures::future::{BoxFuture, FutureExt, Shared};

use super::layout::Keys;
use super::scan::{scan_with, Candidate, Scan};
use crate::rpc::unless_stopped;
use crate::session::Session;
use crate::Error;

/// A scan in flight, shared by whoever awaits it; `None` if it failed (each then reads on its
/// own, through its own session).
type InFlight = Shared<BoxFuture<'static, Option<Arc<Scan>>>>;

/// The most candidates a shared scan collects beyond what the claim that sends it wants, for
/// the claims that may join it.
const MAX_SHARED: usize = 256;

/// How long a claim of the family that won a job keeps it out of the others' chains: a read
/// older than the win still shows the job free. Not until a newer read comes — the claims
/// that share an older read pick after it, one by one (until the sixth session of
/// 2026-12-06 the first newer read forgot the win, and a claim that picked from the older
/// read after it found its first candidate taken). A claim whose read is older than this may
/// still find one taken, and reads again.
const WINS_KEPT: Duration = Duration::from_secs(1);

/// How long the family's claims take their candidates from a shared scan already answered
/// instead of reading again: a burst of claims — a pool's workers taking their next jobs —
/// goes on without waiting for a read, and claims that race for what it shows take
/// different jobs all the same (see [`Claims::pick`]). A claim that finds nothing left in it
/// for itself reads again. A job enqueued or given back outside the family after that read
/// may be passed over for this long (never lost; a claim that joins a scan in flight may
/// miss it too); one the family enqueued or gave back is not (see [`Claims::wrote`]), but
/// for a guard dropped (see [`GivesBack`]).
const READ_KEPT: Duration = Duration::from_millis(10);

/// How many claims of the family chain their candidates after one whose first candidate was
/// taken by someone else.
const CHAINED_AFTER_COLLISION: usize = 8;

/// The family's first scan in flight.
struct Pending {
    scan: InFlight,
    /// Set by the scan itself once answered (or failed): then nobody joins it any more.
    done: Arc<AtomicBool>,
    /// How many claims await it.
    awaiting: usize,
    /// How many candidates it collects at most.
    collects: usize,
}

/// What the claims of one queue in one family share (kept per queue name in [`Queues`]).
#[derive(Default)]
pub(super) struct Claims {
    state: StdMutex<State>,
    /// How many claims the last read saw, to size the next read's page.
    pub(super) seen: AtomicUsize,
}

#[derive(Default)]
struct State {
    /// The first scan in flight.
    scan: Option<Pending>,
    /// Jobs a claim of the family put first in its chain: while its Txn is under way
    /// (`i64::MAX`), and once won, the revision of the win (a read at an older one still
    /// shows the job free) for [`WINS_KEPT`].
    trying: HashMap<String, i64>,
    /// The wins in `trying`, oldest first, with when they were recorded.
    wins: VecDeque<(Instant, String, i64)>,
    /// How many claims are under way.
    active: usize,
    /// The most claims under way at once so far: a scan is read for as many.
    peak: usize,
    /// The leases of the family's handles on this queue, each with how many handles.
    members: HashMap<i64, usize>,
    /// How many more claims chain their candidates (since one found its first taken).
    chained: usize,
    /// The newest shared scan answered, and when (see [`READ_KEPT`]); never one sent before
    /// `wrote`.
    last: Option<(Instant, Arc<Scan>)>,
    /// When the family last added a job or gave one back (see [`Claims::wrote`]).
    wrote: Option<Instant>,
}

impl State {
    fn lock(claims: &Claims) -> std::sync::MutexGuard<'_, State> {
        claims.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The family's scan answered within [`READ_KEPT`], if it found at least `need`
    /// candidates, and while the family looks alone in claiming from the queue, as for
    /// [`Claims::alone`]: a pool (claims have gone on side by side), every claim that read
    /// shows is the family's, and no claim of the family found its first candidate taken
    /// since (see [`Claims::collided`]). A read of a moment ago shows what the family claimed
    /// since (its wins); it does not show what others did, and a claim that picks from it
    /// where others claim collides and no longer takes the first free job.
    fn recent(&self, need: usize) -> Option<Arc<Scan>> {
        let (at, scan) = self.last.as_ref()?;
        let alone = self.chained == 0 && self.looks_alone(scan);
        (alone && at.elapsed() < READ_KEPT && scan.candidates.len() >= need)
            .then(|| Arc::clone(scan))
    }

    /// Whether, by `found`, the family looks alone in claiming: its claims have gone on side
    /// by side at some time, and every claim the read shows is the family's.
    fn looks_alone(&self, found: &Scan) -> bool {
        self.peak > 1 && found.claimers.iter().all(|l| self.members.contains_key(l))
    }

    /// Forgets the wins recorded more than [`WINS_KEPT`] ago.
    fn forget_old_wins(&mut self) {
        while let Some((at, _, _)) = self.wins.front() {
            if at.elapsed() < WINS_KEPT {
                break;
            }
            let Some((_, id, revision)) = self.wins.pop_front() else {
                break;
            };
            if self.trying.get(&id) == Some(&revision) {
                self.trying.remove(&id);
            }
        }
    }
}

/// The claims of each queue a family claims from, by name.
#[derive(Default)]
struct Queues(StdMutex<HashMap<String, Weak<Claims>>>);

impl Claims {
    /// The shared state of the claims from the queue `name` through `session`'s family.
    pub(super) fn of(session: &Session, name: &str) -> Arc<Claims> {
        let queues = session.family_extension(Queues::default);
        let mut queues = queues.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(claims) = queues.get(name).and_then(Weak::upgrade) {
            return claims;
        }
        queues.retain(|_, c| c.strong_count() > 0);
        let claims = Arc::new(Claims::default());
        queues.insert(name.to_owned(), Arc::downgrade(&claims));
        claims
    }

    /// A handle's membership, under `lease`: its claims are the family's while it lives.
    pub(super) fn join(self: &Arc<Self>, lease: i64) -> Member {
        *State::lock(self).members.entry(lease).or_default() += 1;
        Member {
            claims: Arc::clone(self),
            lease,
        }
    }

    /// Records that the family added a job or gave one back (an enqueue returned, or failed;
    /// a claim ended other than by its ack): no read sent before now serves a claim any more
    /// — neither one answered ([`READ_KEPT`]) nor one in flight (a claim starting now sends a
    /// read of its own, which others may join) — so a claim made after it sees that job (as
    /// far as the member it reads through has it).
    pub(super) fn wrote(&self) {
        let mut state = State::lock(self);
        state.wrote = Some(Instant::now());
        state.last = None;
        // Those awaiting it still get it (`Awaiting` tells scans apart by pointer).
        state.scan = None;
    }

    /// How many claims a read of the queue is sized to find ahead of the free jobs: as many
    /// as the last read saw, and at least one per handle of the family on the queue (the
    /// handles counted up to [`MAX_SHARED`]; a pool's workers hold about one each; the last
    /// read may have come when they held none, and a read sized for none found too few jobs
    /// for the claims that shared it).
    pub(super) fn claims_hint(&self) -> usize {
        let handles: usize = State::lock(self).members.values().sum();
        self.seen
            .load(Ordering::Relaxed)
            .max(handles.min(MAX_SHARED))
    }

    /// Whether a claim from `found` may try its own first candidates alone, without a chain
    /// of others behind each: claims of the family have gone on side by side at some time
    /// (so their first candidates are their own), every claim the read shows is the
    /// family's (so nobody else seems to be claiming), and this is not one of the
    /// [`CHAINED_AFTER_COLLISION`] claims to decide after a collision. A claimer elsewhere
    /// that read the queue at the same moment may still take a first candidate: that claim
    /// then reads again, and it and the family's next claims chain.
    pub(super) fn alone(&self, found: &Scan) -> bool {
        let mut state = State::lock(self);
        if state.chained > 0 {
            state.chained -= 1;
            return false;
        }
        state.looks_alone(found)
    }

    /// Records that a claim of the family found its first candidate taken: the family's next
    /// [`CHAINED_AFTER_COLLISION`] claims to decide chain their candidates (and that claim's
    /// next round chains anyway: see `claim_up_to`).
    pub(super) fn collided(&self) {
        State::lock(self).chained = CHAINED_AFTER_COLLISION;
    }

    /// How many more candidates a scan for a claim of `n` collects than it wants, because the
    /// family's other claims under way may hold them as their first (at most
    /// [`MAX_SHARED`]).
    pub(super) fn first_candidates_under_way(&self, n: usize) -> usize {
        (n * State::lock(self).active.saturating_sub(1)).min(MAX_SHARED)
    }

    /// Marks a claim under way until the returned value is dropped.
    pub(super) fn active(self: &Arc<Self>) -> Active {
        let mut state = State::lock(self);
        state.active += 1;
        state.peak = state.peak.max(state.active);
        Active(Arc::clone(self))
    }

    /// A serializable scan of the queue (see [`scan_with`]) for up to `want` candidates (and
    /// `per_claim` more for each claim ever under way at once, idle ones included, up to
    /// [`MAX_SHARED`] more): if `recent` is allowed, the family's scan answered within
    /// [`READ_KEPT`] that holds the `need`ed candidates; else the one another claim has in
    /// flight, if it collects at least the `need`ed beside the `per_claim` each claim already
    /// awaiting it takes first; else a new one through `session` that claims starting
    /// meanwhile share. With it, whether it was an answered one. `None` if the scan failed,
    /// or if one that collects fewer is in flight: the claim reads on its own.
    ///
    /// # Errors
    /// The caller's `session`'s loss, as soon as it is lost (whoever's scan it awaits).
    pub(super) async fn scan(
        self: &Arc<Self>,
        session: &Arc<Session>,
        keys: &Keys,
        (want, need, per_claim): (usize, usize, usize),
        claims_hint: usize,
        recent: bool,
    ) -> Result<(Option<Arc<Scan>>, bool), Error> {
        let in_flight = {
            let mut state = State::lock(self);
            if let Some(answered) = state.recent(need).filter(|_| recent) {
                return Ok((Some(answered), true));
            }
            match &mut state.scan {
                // Each claim awaiting it takes up to `per_claim` of its candidates first.
                Some(p)
                    if !p.done.load(Ordering::Acquire)
                        && p.collects >= need + per_claim * p.awaiting =>
                {
                    p.awaiting += 1;
                    p.scan.clone()
                }
                // A claim that wants more (a bigger `claim_many`) reads on its own.
                Some(p) if !p.done.load(Ordering::Acquire) => return Ok((None, false)),
                _ => {
                    let collects = want + (per_claim * state.peak).min(MAX_SHARED);
                    self.start(&mut state, session, keys, collects, claims_hint)
                }
            }
        };
        let awaiting = Awaiting {
            claims: self,
            scan: in_flight.clone(),
        };
        let found = unless_stopped(&**session, in_flight.map(Ok)).await;
        drop(awaiting);
        Ok((found?, false))
    }

    /// Starts a shared scan (see [`scan`](Self::scan)) that one claim awaits; once answered,
    /// it is the family's most recent.
    fn start(
        self: &Arc<Self>,
        state: &mut State,
        session: &Arc<Session>,
        keys: &Keys,
        collects: usize,
        claims_hint: usize,
    ) -> InFlight {
        let done = Arc::new(AtomicBool::new(false));
        let (session, keys, answered) = (Arc::clone(session), keys.clone(), Arc::clone(&done));
        let family = Arc::downgrade(self);
        let scan = async move {
            let sent = Instant::now();
            let found = scan_with(&session, &keys, collects, claims_hint, true)
                .await
                .ok()
                .map(Arc::new);
            answered.store(true, Ordering::Release);
            if let (Some(found), Some(family)) = (&found, family.upgrade()) {
                let mut state = State::lock(&family);
                let newer = state
                    .last
                    .as_ref()
                    .is_none_or(|(_, l)| l.revision <= found.revision);
                if newer && state.wrote.is_none_or(|at| at <= sent) {
                    state.last = Some((Instant::now(), Arc::clone(found)));
                }
            }
            found
        }
        .boxed()
        .shared();
        state.scan = Some(Pending {
            scan: scan.clone(),
            done,
            awaiting: 1,
            collects,
        });
        scan
    }

    /// The `candidates` (read at `revision`) a claim of `n` should try, in claim order: those
    /// that no other claim of the family tries first or has won since the read — the others'
    /// are left out, so that a chain never tries a lower-priority job before a sibling's
    /// higher first one. If there are none such: `None` if the claim should `rather_read`
    /// again, else the others' (racing them). The first `n` of a claim's own are its own
    /// while the returned [`Trying`] lives. Copies no candidate: a burst of claims picks from
    /// one read of a hundred or more.
    pub(super) fn pick<'a>(
        self: &Arc<Self>,
        candidates: &'a [Candidate],
        revision: i64,
        n: usize,
        rather_read: bool,
    ) -> Option<(Vec<&'a Candidate>, Trying)> {
        let mut state = State::lock(self);
        state.forget_old_wins();
        // Wins this read shows claimed (or done) are no news to it.
        let free: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| state.trying.get(&c.id).is_none_or(|at| *at <= revision))
            .collect();
        let (list, mine) = match (free.is_empty(), rather_read) {
            (false, _) => {
                let mine: Vec<String> = free.iter().take(n).map(|c| c.id.clone()).collect();
                for id in &mine {
                    state.trying.insert(id.clone(), i64::MAX);
                }
                (free, mine)
            }
            (true, true) => return None,
            // Racing the others for theirs (every one is theirs): they stay marked as theirs.
            (true, false) => (candidates.iter().collect(), Vec::new()),
        };
        let trying = Trying {
            claims: Arc::clone(self),
            ids: mine,
        };
        Some((list, trying))
    }
}

/// A claimed job's tie to its family: unless the job is acknowledged, the claim's end — a
/// nack, a release, a dropped guard, a failed ack, a dead letter — gives the job back (or
/// moves it), and the family's claims after it take no read sent before (see
/// [`Claims::wrote`]; a read a moment old shows the job claimed, and the family's win keeps
/// it out of picks from any read older than the claim). A nack, a release and a dead letter
/// end after their request returned; a dropped guard (and a failed ack, or a nack or release
/// whose future was dropped) gives the job back in the session's task, later: a read sent
/// between that drop and the give-back's landing still shows the job claimed and may be
/// kept, so that job may be passed over for up to [`READ_KEPT`] (it is never lost).
pub(crate) struct GivesBack(Option<Arc<Claims>>);

impl GivesBack {
    pub(super) fn new(claims: &Arc<Claims>) -> GivesBack {
        GivesBack(Some(Arc::clone(claims)))
    }

    /// The job was acknowledged: nothing goes back.
    pub(super) fn acked(&mut self) {
        self.0 = None;
    }
}

impl Drop for GivesBack {
    fn drop(&mut self) {
        if let Some(claims) = self.0.take() {
            claims.wrote();
        }
    }
}

/// A handle on the queue, a member of its family's claims (see [`Claims::join`]).
pub(super) struct Member {
    claims: Arc<Claims>,
    lease: i64,
}

impl std::ops::Deref for Member {
    type Target = Arc<Claims>;
    fn deref(&self) -> &Arc<Claims> {
        &self.claims
    }
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("lease", &self.lease)
            .finish()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut state = State::lock(&self.claims);
        if let Some(count) = state.members.get_mut(&self.lease) {
            *count -= 1;
            if *count == 0 {
                state.members.remove(&self.lease);
            }
        }
    }
}

/// A claim under way (see [`Claims::active`]).
pub(super) struct Active(Arc<Claims>);

impl Drop for Active {
    fn drop(&mut self) {
        State::lock(&self.0).active -= 1;
    }
}

/// A claim awaiting a shared scan: the last to stop awaiting it (done, or dropped) clears it,
/// so that no claim joins a scan that is over, or that nobody drives any more.
struct Awaiting<'a> {
    claims: &'a Claims,
    scan: InFlight,
}

impl Drop for Awaiting<'_> {
    fn drop(&mut self) {
        let mut state = State::lock(self.claims);
        if let Some(p) = &mut state.scan {
            if p.scan.ptr_eq(&self.scan) {
                p.awaiting -= 1;
                // Over, or nobody drives it any more; or it panicked (nobody joins that).
                if p.awaiting == 0 || p.done.load(Ordering::Acquire) || std::thread::panicking() {
                    state.scan = None;
                }
            }
        }
    }
}

/// The jobs a claim tries first (see [`Claims::pick`]): given up when dropped, unless
/// recorded [`won`](Trying::won).
pub(super) struct Trying {
    claims: Arc<Claims>,
    ids: Vec<String>,
}

impl Trying {
    /// Records that the claim won the jobs `won` at `revision` (those it tried first stay
    /// marked until a read at that revision or later shows them).
    pub(super) fn won<'a>(self, won: impl IntoIterator<Item = &'a str>, revision: i64) {
        let mut state = State::lock(&self.claims);
        let now = Instant::now();
        for id in won {
            state.trying.insert(id.to_owned(), revision);
            state.wins.push_back((now, id.to_owned(), revision));
        }
    }
}

impl Drop for Trying {
    fn drop(&mut self) {
        let mut state = State::lock(&self.claims);
        for id in &self.ids {
            if state.trying.get(id) == Some(&i64::MAX) {
                state.trying.remove(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates(n: usize) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate {
                key: format!("q/#queue/jobs/0/{i:017}-{i:016x}"),
                id: format!("{i:016x}"),
                rank: 0,
                mod_revision: i as i64 + 1,
            })
            .collect()
    }

    fn ids<'a>(list: &[&'a Candidate]) -> Vec<&'a str> {
        list.iter().map(|c| &c.id[14..]).collect()
    }

    #[test]
    fn claims_side_by_side_try_different_jobs_first_and_give_back_what_they_did_not_win() {
        let claims = Arc::new(Claims::default());
        let four = candidates(4);
        let (a, ta) = claims.pick(&four, 10, 1, true).unwrap();
        let (b, tb) = claims.pick(&four, 10, 1, true).unwrap();
        assert_eq!(ids(&a), ["00", "01", "02", "03"]);
        // The job `a` tries first is not `b`'s to try.
        assert_eq!(ids(&b), ["01", "02", "03"]);
        // `a` won its job at 12; `b` won nothing.
        ta.won([a[0].id.as_str()], 12);
        drop(tb);
        // A read older than the win still shows `a`'s job free: it stays out of the firsts.
        let (c, tc) = claims.pick(&four, 11, 1, true).unwrap();
        assert_eq!(ids(&c), ["01", "02", "03"]);
        drop(tc);
        // A read at the win shows it claimed (or done): no news any more.
        let (d, _td) = claims.pick(&four, 12, 1, true).unwrap();
        assert_eq!(ids(&d), ["00", "01", "02", "03"]);
    }

    #[test]
    fn a_win_stays_out_of_the_chains_of_claims_that_pick_from_an_older_read_after_a_newer_one() {
        let claims = Arc::new(Claims::default());
        let four = candidates(4);
        let (a, ta) = claims.pick(&four, 10, 1, true).unwrap();
        ta.won([a[0].id.as_str()], 12);
        // A claim from a read at 13, which shows `a`'s job claimed, picks first...
        let (_, tb) = claims.pick(&four[1..], 13, 1, true).unwrap();
        drop(tb);
        // ...and one from a read at 11, shared with others and picked from later, still
        // leaves `a`'s job out.
        let (c, _tc) = claims.pick(&four, 11, 1, true).unwrap();
        assert_eq!(ids(&c), ["01", "02", "03"]);
    }

    #[test]
    fn a_win_is_forgotten_once_kept_long_enough() {
        let claims = Arc::new(Claims::default());
        let four = candidates(4);
        let (a, ta) = claims.pick(&four, 10, 1, true).unwrap();
        ta.won([a[0].id.as_str()], 12);
        {
            let mut state = State::lock(&claims);
            let recorded = &mut state.wins.front_mut().expect("the win").0;
            *recorded = Instant::now() - WINS_KEPT;
        }
        let (c, _tc) = claims.pick(&four, 11, 1, true).unwrap();
        assert_eq!(ids(&c), ["00", "01", "02", "03"]);
        let state = State::lock(&claims);
        assert!(state.wins.is_empty());
        assert_eq!(state.trying.len(), 1, "only the new claim's first job");
    }

    #[test]
    fn a_read_answered_serves_a_pool_that_claims_alone_within_read_kept_if_it_holds_its_need() {
        let claims = Arc::new(Claims::default());
        let scan = Arc::new(Scan {
            candidates: candidates(4),
            revision: 10,
            ..Scan::default()
        });
        let mut state = State::lock(&claims);
        assert!(state.recent(1).is_none(), "nothing answered yet");
        state.last = Some((Instant::now(), Arc::clone(&scan)));
        assert!(state.recent(1).is_none(), "no two claims side by side yet");
        state.peak = 2;
        assert!(state.recent(4).is_some_and(|s| Arc::ptr_eq(&s, &scan)));
        let fewer = "fewer candidates than the claim needs";
        assert!(state.recent(5).is_none(), "{fewer}");
        state.chained = 1;
        assert!(state.recent(1).is_none(), "a claim of the family collided");
        state.chained = 0;
        let foreign = Scan {
            candidates: candidates(4),
            claimers: [7].into(),
            ..Scan::default()
        };
        state.last = Some((Instant::now(), Arc::new(foreign)));
        assert!(
            state.recent(1).is_none(),
            "another family's claim in the read"
        );
        state.last = Some((Instant::now() - READ_KEPT, scan));
        assert!(state.recent(1).is_none(), "answered READ_KEPT ago");
    }

    #[test]
    fn a_claim_whose_candidates_are_all_another_claims_reads_again_or_competes() {
        let claims = Arc::new(Claims::default());
        let two = candidates(2);
        let (_, _t) = claims.pick(&two, 10, 2, true).unwrap();
        assert!(claims.pick(&two, 10, 1, true).is_none());
        let (all, racing) = claims.pick(&two, 10, 1, false).unwrap();
        assert_eq!(ids(&all), ["00", "01"]);
        drop(racing);
        // The racer gave back nothing of the first claim's.
        assert!(claims.pick(&two, 10, 1, true).is_none());
    }

    #[test]
    fn claims_go_alone_only_beside_siblings_and_while_no_one_else_holds_a_claim() {
        let claims = Arc::new(Claims::default());
        let (_m1, _m2) = (claims.join(1), claims.join(2));
        let scan = |leases: &[i64]| Scan {
            claimers: leases.iter().copied().collect(),
            ..Scan::default()
        };
        let one = claims.active();
        assert!(!claims.alone(&scan(&[])), "one claim at a time so far");
        let two = claims.active();
        drop((one, two));
        assert!(claims.alone(&scan(&[])));
        assert!(claims.alone(&scan(&[1, 2])));
        assert!(!claims.alone(&scan(&[1, 3])), "lease 3 is not the family's");
        // A claim found its first candidate taken: the next claims to decide chain, however
        // many rounds decided before end meanwhile.
        claims.collided();
        for _ in 0..CHAINED_AFTER_COLLISION {
            assert!(!claims.alone(&scan(&[1, 2])), "so soon after a collision");
        }
        assert!(claims.alone(&scan(&[1, 2])));
        drop(_m2);
        assert!(!claims.alone(&scan(&[2])), "lease 2's handles are gone");
    }

    #[test]
    fn a_scan_that_panics_is_joined_by_no_one() {
        let claims = Arc::new(Claims::default());
        let scan: InFlight = async { panic!("a scan that panics") }.boxed().shared();
        State::lock(&claims).scan = Some(Pending {
            scan: scan.clone(),
            done: Arc::new(AtomicBool::new(false)),
            awaiting: 2,
            collects: 10,
        });
        let _other = Awaiting {
            claims: &claims,
            scan: scan.clone(),
        };
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _awaiting = Awaiting {
                claims: &claims,
                scan: scan.clone(),
            };
            scan.clone().now_or_never()
        }));
        assert!(polled.is_err(), "the panic reaches the claim that polled");
        assert!(State::lock(&claims).scan.is_none(), "nobody joins it");
    }

    #[test]
    fn a_scan_nobody_awaits_any_more_is_dropped_and_joined_by_no_one() {
        let claims = Arc::new(Claims::default());
        let scan: InFlight = futures::future::pending().boxed().shared();
        State::lock(&claims).scan = Some(Pending {
            scan: scan.clone(),
            done: Arc::new(AtomicBool::new(false)),
            awaiting: 2,
            collects: 10,
        });
        let (first, second) = (
            Awaiting {
                claims: &claims,
                scan: scan.clone(),
            },
            Awaiting {
                claims: &claims,
                scan,
            },
        );
        drop(first);
        assert!(State::lock(&claims).scan.is_some(), "one still awaits it");
        drop(second);
        assert!(
            State::lock(&claims).scan.is_none(),
            "nobody drives it any more"
        );
    }
}
