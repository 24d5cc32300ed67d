use std::collections::BTreeMap;

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, PutOptions};
use proptest::prelude::*;

use super::*;

/// A member key of a lock's queue, its pointers' prefix, and the queue's prefix.
const HELD: &str = "lock#m/00000000000000aa-1";
const POINTERS: &str = "lock#m/next/00000000000000aa-1/";
const QUEUE: &str = "lock#m/";

/// A holder's release as the engine sends it: fenced on its key, deleting it and the
/// successors' pointers to it.
fn release() -> Vec<TxnOp> {
    vec![TxnOp::txn(
        Txn::new()
            .when([Compare::create_revision(HELD, CompareOp::Equal, 5)])
            .and_then([
                TxnOp::delete(HELD, None),
                TxnOp::delete(POINTERS, Some(DeleteOptions::new().with_prefix())),
            ])
            .or_else([TxnOp::get(HELD, None)]),
    )]
}

/// An enqueue as the engine sends it: puts `key` unless it exists, after reading the queue.
fn enqueue(key: &str) -> Vec<TxnOp> {
    vec![TxnOp::txn(
        Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([
                TxnOp::get(
                    QUEUE,
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                ),
                TxnOp::put(key, "", Some(PutOptions::new().with_lease(7))),
            ])
            .or_else([TxnOp::get(key, None)]),
    )]
}

/// A whole conditional Txn (as the engine sends releases and enqueues), ordered.
fn ordered(ops: &[TxnOp]) -> Shape {
    Shape::of(ops, true, true)
}

#[test]
fn a_release_goes_before_a_siblings_enqueue_in_one_txn_whichever_came_first() {
    let (release, enqueue) = (
        ordered(&release()),
        ordered(&enqueue("lock#m/00000000000000bb-2")),
    );
    assert_eq!(grouping(&[&release, &enqueue]), [vec![0, 1]]);
    assert_eq!(
        grouping(&[&enqueue, &release]),
        [vec![1, 0]],
        "the release goes first: the enqueue reads the queue without the released key"
    );
}

#[test]
fn two_enqueues_in_one_queue_never_share_a_txn() {
    // Each puts a key the other reads: one after the other, neither would see the other's
    // key created at its own revision, and their create revisions would tie.
    let (a, b) = (
        ordered(&enqueue("lock#m/00000000000000bb-2")),
        ordered(&enqueue("lock#m/00000000000000cc-3")),
    );
    let r = ordered(&release());
    assert_eq!(grouping(&[&a, &b]), [vec![0], vec![1]]);
    assert_eq!(grouping(&[&a, &r, &b]), [vec![1, 0], vec![2]]);
}

#[test]
fn two_enqueues_that_read_nothing_but_depend_on_their_queue_never_share_a_txn() {
    // Decided from the session's mirror: no read is sent, yet the outcome depends on the queue.
    let mirrored = |key: &str| {
        let mut shape = Shape::of(
            &[TxnOp::txn(
                Txn::new()
                    .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key, "", None)]),
            )],
            true,
            true,
        );
        shape.depends_on(&[TxnOp::get(QUEUE, Some(GetOptions::new().with_prefix()))]);
        shape
    };
    let (a, b) = (
        mirrored("lock#m/00000000000000bb-2"),
        mirrored("lock#m/00000000000000cc-3"),
    );
    let r = ordered(&release());
    assert_eq!(grouping(&[&a, &r, &b]), [vec![1, 0], vec![2]]);
}

#[test]
fn an_ordered_part_shares_no_key_with_a_strict_one() {
    let ops = |ordered| Shape::of(&enqueue("lock#m/00000000000000bb-2"), ordered, false);
    let strict = Shape::of(&[TxnOp::put(HELD, "", None)], false, false);
    assert_eq!(grouping(&[&strict, &ops(true)]), [vec![0], vec![1]]);
    let elsewhere = Shape::of(&[TxnOp::put("jobs/1", "", None)], false, false);
    assert_eq!(grouping(&[&elsewhere, &ops(true)]), [vec![0, 1]]);
}

#[test]
fn whole_txns_and_operations_never_share_a_txn() {
    let ops = Shape::of(&[TxnOp::put("jobs/1", "", None)], false, false);
    let whole = ordered(&release());
    assert_eq!(grouping(&[&ops, &whole]), [vec![0], vec![1]]);
}

// A model of etcd's Txn over the keys "a".."e", to check that every grouping comes to what
// its parts would have come to one after the other.

/// A range `[start, end)` of the model's keys: `end` empty for the single key `start`, `\0`
/// for every key from `start`.
#[derive(Debug, Clone)]
struct Range(String, String);

impl Range {
    fn holds(&self, key: &str) -> bool {
        match self.1.as_str() {
            "" => key == self.0,
            "\0" => key >= self.0.as_str(),
            end => key >= self.0.as_str() && key < end,
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Get(Range),
    Put(String),
    Delete(Range),
}

/// A part: a Txn comparing whether a key exists, with its two branches.
#[derive(Debug, Clone)]
struct ModelPart {
    exists: (String, bool),
    then: Vec<Op>,
    otherwise: Vec<Op>,
    ordered: bool,
    /// Merged flat (a whole conditional Txn), else nested.
    whole: bool,
}

fn key() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["a", "b", "c", "d", "e"]).prop_map(str::to_owned)
}

fn range() -> impl Strategy<Value = Range> {
    // An end not after the start holds no key, as in etcd.
    (key(), prop::sample::select(vec!["", "c", "e", "f", "\0"]))
        .prop_map(|(start, end)| Range(start, end.to_owned()))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        range().prop_map(Op::Get),
        key().prop_map(Op::Put),
        range().prop_map(Op::Delete),
    ]
}

fn part() -> impl Strategy<Value = ModelPart> {
    (
        (key(), any::<bool>()),
        prop::collection::vec(op(), 0..3),
        prop::collection::vec(op(), 0..2),
        prop::bool::weighted(0.8),
        any::<bool>(),
    )
        .prop_map(|(exists, then, otherwise, ordered, whole)| ModelPart {
            exists,
            then,
            otherwise,
            ordered,
            whole,
        })
}

fn txn_op(op: &Op) -> TxnOp {
    let with_end = |r: &Range| match r.1.as_str() {
        "" => None,
        end => Some(end.to_owned()),
    };
    match op {
        Op::Get(r) => TxnOp::get(
            r.0.as_str(),
            with_end(r).map(|end| GetOptions::new().with_range(end)),
        ),
        Op::Put(k) => TxnOp::put(k.as_str(), "", None),
        Op::Delete(r) => TxnOp::delete(
            r.0.as_str(),
            with_end(r).map(|end| DeleteOptions::new().with_range(end)),
        ),
    }
}

impl ModelPart {
    /// Whether an operation of either branch writes `key`.
    fn may_write(&self, key: &str) -> bool {
        self.then.iter().chain(&self.otherwise).any(|op| match op {
            Op::Put(k) => k == key,
            Op::Delete(r) => r.holds(key),
            Op::Get(_) => false,
        })
    }

    fn ops(&self) -> Vec<TxnOp> {
        let (key, exists) = &self.exists;
        let compare = match exists {
            true => Compare::create_revision(key.as_str(), CompareOp::Greater, 0),
            false => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
        };
        vec![TxnOp::txn(
            Txn::new()
                .when([compare])
                .and_then(self.then.iter().map(txn_op).collect::<Vec<_>>())
                .or_else(self.otherwise.iter().map(txn_op).collect::<Vec<_>>()),
        )]
    }
}

/// The store: each key and which part put it (`None`: there before).
type Store = BTreeMap<String, Option<usize>>;

/// What part `i` did: its branch, what each of its reads saw, and what it wrote.
#[derive(Debug, PartialEq)]
struct Did {
    branch: bool,
    reads: Vec<Vec<(String, Option<usize>)>>,
}

/// Applies part `i` to `store`, its branch chosen by `before` (the store its compare sees);
/// returns what it did and the keys it wrote.
fn apply(part: &ModelPart, i: usize, before: &Store, store: &mut Store) -> (Did, Vec<Range>) {
    let (key, exists) = &part.exists;
    let branch = before.contains_key(key) == *exists;
    let (mut reads, mut writes) = (Vec::new(), Vec::new());
    for op in if branch { &part.then } else { &part.otherwise } {
        match op {
            Op::Get(r) => reads.push(
                store
                    .iter()
                    .filter(|(k, _)| r.holds(k))
                    .map(|(k, by)| (k.clone(), *by))
                    .collect(),
            ),
            Op::Put(k) => {
                store.insert(k.clone(), Some(i));
                writes.push(Range(k.clone(), String::new()));
            }
            Op::Delete(r) => {
                store.retain(|k, _| !r.holds(k));
                writes.push(r.clone());
            }
        }
    }
    (Did { branch, reads }, writes)
}

proptest! {
    // A range reaching past every key is drawn rarely enough to need this many.
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Every group of parts, run as one Txn in the grouping's order (every compare against
    /// the store before it, the operations in order, one revision; merged flat, only if every
    /// compare holds), comes to what its parts would have come to one after the other: the
    /// same branches, reads and store; no part reads a key put by another at their shared
    /// revision, or reads keys that a later part then writes; and no two parts write one
    /// key.
    #[test]
    fn a_merged_txn_comes_to_what_its_parts_one_after_the_other_would_have(
        parts in prop::collection::vec(part(), 2..5),
        initial in prop::collection::btree_set(key(), 0..5),
    ) {
        let shapes: Vec<Shape> = parts
            .iter()
            .map(|p| Shape::of(&p.ops(), p.ordered, p.whole))
            .collect();
        let refs: Vec<&Shape> = shapes.iter().collect();
        let initial: Store = initial.into_iter().map(|k| (k, None)).collect();
        for group in grouping(&refs) {
            // One after the other.
            let mut store = initial.clone();
            let mut serial = Vec::new();
            for &i in &group {
                let before = store.clone();
                serial.push(apply(&parts[i], i, &before, &mut store).0);
            }
            // One Txn. Merged flat, it applies only if every part's compare holds (else
            // nothing, and each part goes alone: one after the other).
            let flat = parts[group[0]].whole && group.len() > 1;
            if flat {
                let held = group.iter().all(|&i| {
                    let (key, exists) = &parts[i].exists;
                    initial.contains_key(key) == *exists
                });
                if !held {
                    continue;
                }
                prop_assert!(serial.iter().all(|did| did.branch), "one after the other, a compare failed");
            }
            let mut merged_store = initial.clone();
            let mut merged = Vec::new();
            let mut writes: Vec<(usize, Vec<Range>)> = Vec::new();
            for &i in &group {
                let (did, wrote) = apply(&parts[i], i, &initial, &mut merged_store);
                merged.push(did);
                writes.push((i, wrote));
            }
            prop_assert_eq!(&merged, &serial, "group {:?}", group);
            // etcd refuses a Txn in which two parts write one key (either branch).
            for (n, &i) in group.iter().enumerate() {
                for &j in &group[n + 1..] {
                    let both = ["a", "b", "c", "d", "e"]
                        .into_iter()
                        .find(|k| parts[i].may_write(k) && parts[j].may_write(k));
                    prop_assert!(both.is_none(), "parts {} and {} both write {:?}", i, j, both);
                }
            }
            prop_assert_eq!(&merged_store, &store);
            for (n, (&i, did)) in group.iter().zip(&merged).enumerate() {
                for read in &did.reads {
                    for (key, by) in read {
                        prop_assert!(
                            by.is_none_or(|by| by == i),
                            "part {} read {} put by part {} at their one revision", i, key, by.unwrap()
                        );
                        for (j, wrote) in &writes[n + 1..] {
                            prop_assert!(
                                !wrote.iter().any(|r| r.holds(key)),
                                "part {} read {} that part {} then wrote", i, key, j
                            );
                        }
                    }
                }
            }
        }
    }
}
