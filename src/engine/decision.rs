//! What a queue acquisition waits for, without I/O: the [`Blocker`] and its decision.
//!
//! [`Blocker`] says what a queue acquisition waits for: nothing once fewer than `permits` keys
//! are ahead of it; else the deletion of the key just ahead (one permit), of any key ahead (the
//! first waiter of a semaphore), or any change of the waiter just ahead (a semaphore waiter
//! behind another waiter) — or, when the read held a short queue whole, the deletions that
//! leave fewer than `permits` of those keys (a counted hand-off).

use etcd_client::{GetOptions, GetResponse, SortOrder, SortTarget, Txn, TxnOp};

use crate::keys::Queue;
use crate::watch::hub::Line;
use crate::watch::Watched;
use crate::Error;

use super::wait::Reads;

/// What a read (run while our key still exists) saw: its revision and its `Get` results — or,
/// instead of a read, what the session's mirror of the queue showed at that revision (`line`,
/// with no `gets`; see `super::mirror`).
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub(crate) revision: i64,
    pub(crate) gets: Vec<GetResponse>,
    pub(crate) line: Option<Line>,
}

impl Snapshot {
    /// What a read at `revision` returned.
    pub(crate) fn read(revision: i64, gets: Vec<GetResponse>) -> Snapshot {
        Snapshot {
            revision,
            gets,
            line: None,
        }
    }
}

/// What a primitive makes of a [`Snapshot`] taken while its key exists.
#[derive(Debug)]
pub(crate) enum Decision {
    /// Done: the acquisition is through. With `touch`, a waiter may be watching our key for
    /// the moment we stop waiting: touch it (in the background) so that it re-reads.
    Through { touch: bool },
    /// Send `txn` (it must be safe to repeat), then read again. If it may create a key under
    /// the session's lease (a double barrier's latch), `creates` names it, and `txn`'s
    /// else-branch gets it first: the key is then the session's, spared by a resumed
    /// session's look at its lease, when `txn` created it — or, after an unanswered attempt,
    /// when the else-branch finds it on our lease, created since the act began.
    Act { txn: Txn, creates: Option<String> },
    /// Wait for one of these changes, then read again — or, for a change watched as
    /// [`Watched::deciding`], be through once it happened while our key exists.
    Wait(Vec<Watched>),
    /// One permit, and `key` (created at `create_revision`) is the newest key ahead: wait for
    /// its deletion. If its holder releases it — which a release of ours announces by deleting
    /// the successors' pointers to it (`…#next/<its id>/…`, beside the queue) in the same Txn —
    /// nothing is ahead of us any more, and only our own key needs confirming (see the wait
    /// loop).
    Follow { key: Vec<u8>, create_revision: i64 },
    /// The read held every key ahead of us — these, with their create revisions, at least
    /// `permits` and at most [`DRAIN_MAX`] of them: through at the revision that leaves fewer
    /// than `permits` of them (one permit: deletes the last), with our key still ours. Nothing
    /// can be created ahead of us any more (create revisions only grow), so their deletions
    /// alone decide, whoever made them; a wait that sees them in order with our own key's
    /// events needs no read and no announcement (see the wait loop).
    Drain {
        keys: Vec<(Vec<u8>, i64)>,
        permits: usize,
    },
    /// The read was cut short before it found what decides (a page of a shared queue holding
    /// only nested names' keys): read again without a limit.
    Widen,
}

/// What blocks a queue acquisition: among the members under `prefix` created before ours, it
/// is through once fewer than `permits` remain (1: a mutex, an election, a reader over the
/// writers' sub-range, a writer over everything; N: a semaphore of N permits). Over a shared
/// queue (`direct`) only the keys directly under `prefix` are members.
#[derive(Debug, Clone)]
pub(crate) struct Blocker {
    prefix: String,
    permits: usize,
    direct: bool,
    /// Whether the holders this blocker waits behind announce their releases (a line of this
    /// crate's exclusive holders): a waiter then announces itself to the key just ahead.
    announced: bool,
}

/// How many more keys than it needs a read of a shared queue fetches, so that a few nested
/// names' keys among them do not make it read again.
pub(super) const SHARED_PAGE_SLACK: i64 = 7;

/// How many keys the enqueue's read fetches (in key order): a queue this short decides at once.
const ENQUEUE_PAGE: i64 = 64;

/// The most keys ahead a waiter counts down instead of following the one just ahead (one
/// permit) or waiting for the first waiter's place (several) ([`Decision::Drain`]): each
/// deletion among them wakes it, so a release wakes at most this many waiters.
pub(crate) const DRAIN_MAX: usize = 8;

impl Blocker {
    /// The blocker over the keys under `prefix` for `permits` permits.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for zero permits, or more than etcd can count in a read.
    pub(crate) fn new(prefix: String, permits: usize) -> Result<Blocker, Error> {
        if permits == 0 {
            return Err(Error::InvalidArgument(
                "at least one permit is needed".into(),
            ));
        }
        if i64::try_from(permits).map_or(true, |p| p == i64::MAX) {
            return Err(Error::InvalidArgument(format!(
                "{permits} permits are more than etcd can count (at most {})",
                i64::MAX - 1
            )));
        }
        Ok(Blocker {
            prefix,
            permits,
            // Member keys never hold a further `/`: keys below the prefix with one (nested
            // names', successors' pointers `#next/…`) are not members.
            direct: true,
            announced: true,
        })
    }

    /// This blocker, behind holders whose releases do not announce (a line whose head does
    /// not hold as the oldest member of its queue, as a WorkQueue's idle line): waiters then
    /// put no pointer, and read again after a wake-up.
    pub(crate) fn behind_unannounced_releases(self) -> Blocker {
        Blocker {
            announced: false,
            ..self
        }
    }

    /// Whether waiters announce themselves to the key just ahead (see the field).
    pub(crate) fn announced(&self) -> bool {
        self.announced
    }

    /// The blocker over every member of `queue` (a shared queue: only the keys directly under
    /// its prefix) for `permits` permits.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub(crate) fn over(queue: &Queue, permits: usize) -> Result<Blocker, Error> {
        Ok(Blocker {
            direct: queue.direct(),
            ..Blocker::new(queue.prefix().to_owned(), permits)?
        })
    }

    /// Whether `key` counts: under the prefix and, over a shared queue, directly under it.
    pub(super) fn counts(&self, key: &[u8]) -> bool {
        key.strip_prefix(self.prefix.as_bytes())
            .is_some_and(|rest| !self.direct || (!rest.is_empty() && !rest.contains(&b'/')))
    }

    /// How many members it lets through at once.
    pub(crate) fn permits(&self) -> usize {
        self.permits
    }

    /// The prefix of the keys that can block.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether an acquisition through this blocker holds as the oldest member of `queue` (one
    /// permit over the whole queue): its release then announces it to the successor.
    pub(crate) fn heads(&self, queue: &Queue) -> bool {
        self.permits == 1 && self.prefix == queue.prefix()
    }

    /// Whether an acquisition with this many permits can go through in one conditional put.
    pub(crate) fn is_exclusive(&self) -> bool {
        self.permits == 1
    }

    /// How many of the newest keys ahead a decision needs: with one permit the key just ahead;
    /// with more, enough to tell the first waiter (exactly `permits` ahead) from the others.
    fn depth(&self) -> i64 {
        if self.permits == 1 {
            1
        } else {
            self.permits as i64 + 1
        }
    }

    /// How many keys a read fetches (over a shared queue a few more, as some may be nested).
    fn page(&self) -> i64 {
        if self.direct {
            self.depth() + SHARED_PAGE_SLACK
        } else {
            self.depth()
        }
    }

    /// The `Get` of the newest keys created at or before `max_create_revision` (0: any),
    /// newest first, keys only; a page of them, or (`wide`) all.
    fn ahead(&self, max_create_revision: i64, wide: bool) -> TxnOp {
        let mut opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_keys_only();
        if !wide {
            opts = opts.with_limit(self.page());
        }
        if max_create_revision > 0 {
            opts = opts.with_max_create_revision(max_create_revision);
        }
        TxnOp::get(self.prefix.as_str(), Some(opts))
    }

    /// The reads of the enqueue Txn (they run just before our put: every key is ahead): the
    /// first page of the queue *in key order*. etcd applies a Txn that writes one at a time,
    /// and answers a read sorted by create revision by reading the whole queue; a page in key
    /// order it reads from its index, however long the queue. A short queue fits the page
    /// whole, which decides at once; a longer one is read again, sorted, by a read-only Txn
    /// (which etcd serves concurrently) — see [`decides_at_enqueue`](Self::decides_at_enqueue).
    pub(crate) fn reads_at_enqueue(&self) -> Vec<TxnOp> {
        let opts = GetOptions::new()
            .with_prefix()
            .with_keys_only()
            .with_limit(self.page().max(ENQUEUE_PAGE));
        vec![TxnOp::get(self.prefix.as_str(), Some(opts))]
    }

    /// Whether a snapshot of [`reads_at_enqueue`](Self::reads_at_enqueue) decides: its page
    /// holds every key that was ahead.
    pub(crate) fn decides_at_enqueue(&self, snapshot: &Snapshot) -> bool {
        snapshot.gets.first().is_some_and(|g| !g.more())
    }

    /// Whether a snapshot of [`reads_at_enqueue`](Self::reads_at_enqueue) shows a long line of
    /// members (its page cut short, and more members in it than a waiter counts): one that
    /// the wait should decide from the session's mirror of the queue rather than from a
    /// read sorted by create revision, which etcd answers by reading the whole queue. Only
    /// for a line of this crate's primitives (a WorkQueue's idle line shares its directory
    /// with the queue's jobs, which a mirror would hold too).
    pub(crate) fn long_at_enqueue(&self, snapshot: &Snapshot) -> bool {
        self.announced
            && snapshot.gets.first().is_some_and(|g| {
                g.more() && g.kvs().iter().filter(|kv| self.counts(kv.key())).count() > DRAIN_MAX
            })
    }

    /// The reads of a re-read of the acquisition created at `create_revision`: the keys
    /// ahead and, with several permits, whether any key was created after ours (a waiter
    /// behind us that may be watching our key).
    pub(crate) fn reads_after(&self, create_revision: i64) -> Reads {
        Reads {
            narrow: self.reads_after_with(create_revision, false),
            wide: self.reads_after_with(create_revision, true),
            // Only a line of this crate's primitives: a WorkQueue's idle line shares its
            // directory with the queue's jobs, which a mirror would hold too.
            line: self.announced.then(|| self.clone()),
            build: false,
        }
    }

    fn reads_after_with(&self, create_revision: i64, wide: bool) -> Vec<TxnOp> {
        let mut reads = vec![self.ahead(create_revision - 1, wide)];
        if self.permits > 1 {
            let behind = GetOptions::new()
                .with_prefix()
                .with_min_create_revision(create_revision + 1)
                .with_limit(1)
                .with_keys_only();
            reads.push(TxnOp::get(self.prefix.as_str(), Some(behind)));
        }
        reads
    }

    /// The decision for a snapshot of [`reads_at_enqueue`](Self::reads_at_enqueue) or
    /// [`reads_after`](Self::reads_after).
    pub(crate) fn decide(&self, snapshot: &Snapshot) -> Decision {
        if let Some(line) = &snapshot.line {
            let ahead = line.ahead.iter().map(|(k, r)| (k.as_slice(), *r)).collect();
            return self.decide_line(ahead, line.more, line.behind);
        }
        let Some(read) = snapshot.gets.first() else {
            return Decision::Widen; // cannot happen: every read of a blocker has its Get
        };
        // Newest first (a re-read comes sorted so; the enqueue's whole page in key order).
        let mut ahead: Vec<(&[u8], i64)> = read
            .kvs()
            .iter()
            .map(|kv| (kv.key(), kv.create_revision()))
            .filter(|(k, _)| self.counts(k))
            .collect();
        ahead.sort_by_key(|&(_, revision)| std::cmp::Reverse(revision));
        let behind = snapshot.gets.get(1).is_some_and(|g| !g.kvs().is_empty());
        self.decide_line(ahead, read.more(), behind)
    }

    /// How many of the newest keys ahead a line from the session's mirror holds: enough for
    /// every decision (`depth`), and one more than a counted hand-off counts, so that a queue
    /// too long to count is told from one that is not.
    pub(crate) fn line_length(&self) -> usize {
        (self.depth() as usize).max(DRAIN_MAX + 1)
    }

    /// The decision for the members `ahead` of us (newest first, counted keys only; `more`:
    /// others are ahead that these do not show), `behind`: a member was created after ours.
    fn decide_line(&self, mut ahead: Vec<(&[u8], i64)>, more: bool, behind: bool) -> Decision {
        if let Some(drain) = counted(self.permits, self.announced, more, &ahead) {
            return drain;
        }
        // A page cut short among nested names' keys: read it whole if it ended before what
        // decides, or, with several permits, if it may hide a short queue that we would count
        // (a waiter ahead of us that counts does not touch its key when it goes through, so
        // we must not wait for that touch: see the wait loop).
        let depth = self.depth() as usize;
        let may_count = self.permits > 1 && ahead.len() <= DRAIN_MAX;
        if more && (ahead.len() < depth || may_count) {
            return Decision::Widen;
        }
        ahead.truncate(depth);
        queue_decision(&self.prefix, self.permits, &ahead, behind)
    }
}

/// A counted hand-off ([`Decision::Drain`]) for the members `ahead` of us that a read saw
/// (`more`: the read was cut short), or `None`: only in a line whose holders announce (this
/// crate's own), when the read held every key ahead and they are `permits` to [`DRAIN_MAX`].
fn counted(
    permits: usize,
    announced: bool,
    more: bool,
    ahead: &[(&[u8], i64)],
) -> Option<Decision> {
    (announced && !more && (permits..=DRAIN_MAX).contains(&ahead.len())).then(|| Decision::Drain {
        keys: ahead.iter().map(|&(k, r)| (k.to_vec(), r)).collect(),
        permits,
    })
}

/// The queue decision, without I/O. `ahead` holds the newest keys created before ours, newest
/// first (at most `permits + 1`, or 1 for one permit); `behind` says whether a key was created
/// after ours.
///
/// * Fewer than `permits` keys ahead: through. With several permits, a waiter behind us may be
///   watching our key for the moment we stop waiting: touch it (see below).
/// * One permit: wait for the deletion of the key just ahead — only it can let us in, and a
///   release wakes exactly the one waiter behind it.
/// * Exactly `permits` keys ahead (the first waiter of a semaphore): every one of them holds,
///   and the deletion of *any* lets us in — whichever holder leaves first. One watch of the
///   queue's deletions, filtered to those keys.
/// * More than `permits` ahead: no single deletion can let us in; wait for any change of the
///   key just ahead (a waiter): its deletion, or its touch when it goes through — either way we
///   may now be the first waiter, and re-read.
///
/// So a release wakes the first waiter (which goes through), and its touch wakes the one
/// waiter behind it (which becomes the first waiter): two watch events, never a herd.
///
/// Not decided here: when the read held the whole queue ahead, `permits` to [`DRAIN_MAX`]
/// keys, in a line of this crate's own holders, [`Blocker::decide`] counts their deletions
/// down to fewer than `permits` instead ([`Decision::Drain`]), and a release wakes each of
/// those counting waiters.
pub(crate) fn queue_decision(
    prefix: &str,
    permits: usize,
    ahead: &[(&[u8], i64)],
    behind: bool,
) -> Decision {
    if ahead.len() < permits {
        return Decision::Through {
            touch: permits > 1 && behind,
        };
    }
    let Some(&(next, next_revision)) = ahead.first() else {
        return Decision::Through { touch: false }; // unreachable: permits >= 1
    };
    if permits == 1 {
        return Decision::Follow {
            key: next.to_vec(),
            create_revision: next_revision,
        };
    }
    if ahead.len() == permits {
        let holders = ahead.iter().map(|(k, _)| k.to_vec()).collect();
        return Decision::Wait(vec![Watched::deleted_any(prefix, holders)]);
    }
    Decision::Wait(vec![Watched::changed(next.to_vec())])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(i: usize) -> Vec<u8> {
        format!("q/#{i:04}").into_bytes()
    }

    /// The keys a decision waits on, and for which events.
    fn waits(d: &Decision) -> Option<&[Watched]> {
        match d {
            Decision::Wait(t) => Some(t),
            _ => None,
        }
    }

    proptest! {
        /// A waiter counts the keys ahead exactly when its line's holders are this crate's own,
        /// its read was not cut short and held `permits` to DRAIN_MAX members — and then it
        /// counts every one of them, by name and incarnation, down to fewer than `permits`.
        #[test]
        fn a_waiter_counts_exactly_a_whole_short_queue(
            permits in 1usize..4,
            announced in any::<bool>(),
            more in any::<bool>(),
            queued_ahead in 0usize..(2 * DRAIN_MAX),
        ) {
            let all: Vec<(Vec<u8>, i64)> =
                (0..queued_ahead).rev().map(|i| (key(i), 10 + i as i64)).collect();
            let ahead: Vec<(&[u8], i64)> = all.iter().map(|(k, r)| (k.as_slice(), *r)).collect();
            let d = counted(permits, announced, more, &ahead);
            let expected = announced && !more && (permits..=DRAIN_MAX).contains(&queued_ahead);
            match d {
                Some(Decision::Drain { keys, permits: counted_down_to }) => {
                    prop_assert!(expected);
                    prop_assert_eq!(keys, all);
                    prop_assert_eq!(counted_down_to, permits);
                }
                None => prop_assert!(!expected),
                Some(other) => prop_assert!(false, "{other:?}"),
            }
        }

        /// For any queue and any permits: through exactly when fewer than `permits` keys are
        /// ahead; a blocked acquisition always waits on something that is ahead of it; the
        /// first waiter of a semaphore wakes on the deletion of any key ahead of it; a waiter
        /// further back waits on the one key just ahead.
        #[test]
        fn the_queue_decision_lets_through_exactly_when_a_permit_is_free(
            permits in 1usize..6,
            queued_ahead in 0usize..12,
            behind in any::<bool>(),
        ) {
            // What the reads return: newest first, at most depth keys.
            let depth = if permits == 1 { 1 } else { permits + 1 };
            let all: Vec<(Vec<u8>, i64)> =
                (0..queued_ahead).rev().map(|i| (key(i), 10 + i as i64)).collect();
            let ahead: Vec<(&[u8], i64)> =
                all.iter().take(depth).map(|(k, r)| (k.as_slice(), *r)).collect();
            let d = queue_decision("q/#", permits, &ahead, behind);
            if queued_ahead < permits {
                prop_assert!(matches!(d, Decision::Through { touch } if touch == (permits > 1 && behind)), "{d:?}");
                return Ok(());
            }
            if permits == 1 {
                // The newest key ahead, by name and incarnation.
                let follows = matches!(
                    &d,
                    Decision::Follow { key: k, create_revision: r }
                        if *k == key(queued_ahead - 1) && *r == 10 + queued_ahead as i64 - 1
                );
                prop_assert!(follows, "{d:?}");
                return Ok(());
            }
            let targets = waits(&d).expect("blocked");
            prop_assert_eq!(targets.len(), 1);
            let t = &targets[0];
            if queued_ahead == permits {
                // Every key ahead holds a permit: any deletion frees one.
                for i in 0..queued_ahead {
                    prop_assert!(t.matches(etcd_client::EventType::Delete, &key(i)), "key {i} not watched");
                }
                prop_assert!(!t.matches(etcd_client::EventType::Put, &key(0)));
            } else {
                prop_assert_eq!(t, &Watched::changed(key(queued_ahead - 1)));
            }
        }
    }

    /// A line from the session's mirror holds the newest keys ahead and says whether more are
    /// ahead: a short line is counted, a long one followed (one permit) or waited behind
    /// (several) — never widened, as a complete answer needs no second read.
    #[test]
    fn a_decision_from_the_mirror_counts_a_short_line_and_follows_a_long_one() {
        let from_mirror = |ahead: usize, more: bool| Snapshot {
            revision: 100,
            gets: Vec::new(),
            line: Some(Line {
                revision: 100,
                ahead: (0..ahead).rev().map(|i| (key(i), 10 + i as i64)).collect(),
                more,
                behind: true,
            }),
        };
        let mutex = Blocker::new("q/#".into(), 1).unwrap();
        let take = mutex.line_length();
        assert_eq!(take, DRAIN_MAX + 1);
        assert!(matches!(
            mutex.decide(&from_mirror(3, false)),
            Decision::Drain { keys, permits: 1 } if keys.len() == 3
        ));
        assert!(matches!(
            mutex.decide(&from_mirror(take, true)),
            Decision::Follow { key: k, create_revision: r } if k == key(take - 1) && r == 10 + take as i64 - 1
        ));
        assert!(matches!(
            mutex.decide(&from_mirror(0, false)),
            Decision::Through { touch: false }
        ));
        let semaphore = Blocker::new("q/#".into(), 3).unwrap();
        assert!(matches!(
            semaphore.decide(&from_mirror(2, false)),
            Decision::Through { touch: true }
        ));
        assert!(matches!(
            semaphore.decide(&from_mirror(semaphore.line_length(), true)),
            Decision::Wait(t) if t == vec![Watched::changed(key(semaphore.line_length() - 1))]
        ));
        let wide = Blocker::new("q/#".into(), 20).unwrap();
        assert_eq!(
            wide.line_length(),
            21,
            "enough for the first waiter of 20 permits"
        );
    }

    #[test]
    fn blockers_refuse_zero_permits_and_more_than_etcd_can_count() {
        assert!(matches!(
            Blocker::new("q/#".into(), 0),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Blocker::new("q/#".into(), usize::MAX),
            Err(Error::InvalidArgument(_))
        ));
        assert!(Blocker::new("q/#".into(), 1_000_000).is_ok());
    }
}
