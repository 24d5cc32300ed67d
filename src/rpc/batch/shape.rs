//! What a part takes of a merged Txn — its operations, and the keys it compares, reads and
//! writes — and which parts may share one Txn, in which order.
//!
//! etcd evaluates every compare of a Txn, the nested ones too, against the store as it was
//! before the Txn, then applies the operations in order, each read seeing the writes before
//! it; the whole Txn has one revision. So a merged Txn does what its parts would have done one
//! after the other, in its order, when:
//!
//! - no part compares a key that a part before it writes (its compare saw the store before
//!   that write);
//! - no part reads a key that a part before it puts (it would see a key created or changed at
//!   its own revision — one after the other, an earlier one); a key deleted before it is
//!   simply not there, as one after the other;
//! - no part writes a key that a part before it read (that read would show the store at the
//!   Txn's revision without a write made at that same revision: a watch from the next
//!   revision would never see it);
//! - no two parts write one key (etcd refuses a Txn that puts a key twice, or puts and
//!   deletes it).
//!
//! Parts sent at one moment are concurrent requests, none answered: any order of them is one
//! they could have been applied in. A *strict* part (the default) shares no key at all with
//! the others of its Txn and touches no range, so it goes anywhere; an *ordered* part may
//! share keys within the rules above, and goes before or after the parts already in a group
//! (a release, which reads nothing, goes before an enqueue, which reads its queue).

use std::collections::{BTreeSet, VecDeque};
use std::ops::Bound;

use etcd_client::proto::{PbTxnOpRequest, PbTxnRequest, PbTxnRequestOp};
use etcd_client::{Txn, TxnOp};

use super::TXN_OPS;

/// A set of keys: single keys, and ranges `[start, end)` (an `end` of `\0` reaches past every
/// key, as etcd's `range_end`).
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Keys {
    single: BTreeSet<Vec<u8>>,
    ranges: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Keys {
    /// Adds `key`, or the range from it to `range_end` (etcd's: empty for one key).
    fn add(&mut self, key: &[u8], range_end: &[u8]) {
        match range_end.is_empty() {
            true => {
                self.single.insert(key.to_vec());
            }
            false => self.ranges.push((key.to_vec(), range_end.to_vec())),
        }
    }

    fn extend(&mut self, other: &Keys) {
        self.single.extend(other.single.iter().cloned());
        self.ranges.extend(other.ranges.iter().cloned());
    }

    #[cfg(test)]
    pub(super) fn singles(&self) -> impl Iterator<Item = &Vec<u8>> {
        self.single.iter()
    }

    pub(super) fn has_range(&self) -> bool {
        !self.ranges.is_empty()
    }

    /// Whether a key is in both.
    pub(super) fn meets(&self, other: &Keys) -> bool {
        let (small, large) = match self.single.len() <= other.single.len() {
            true => (self, other),
            false => (other, self),
        };
        small.single.iter().any(|k| large.single.contains(k))
            || self.ranges.iter().any(|r| other.covers_any(r))
            || other.ranges.iter().any(|r| self.single_in(r))
    }

    /// Whether one of our keys or ranges meets `range`.
    fn covers_any(&self, range: &(Vec<u8>, Vec<u8>)) -> bool {
        self.single_in(range) || self.ranges.iter().any(|r| overlap(r, range))
    }

    /// Whether one of our single keys lies in `range`.
    fn single_in(&self, (start, end): &(Vec<u8>, Vec<u8>)) -> bool {
        let upper = match end.as_slice() {
            b"\0" => Bound::Unbounded,
            // etcd's range up to a key not after its start holds nothing.
            end if end <= start.as_slice() => return false,
            end => Bound::Excluded(end.to_vec()),
        };
        self.single
            .range((Bound::Included(start.clone()), upper))
            .next()
            .is_some()
    }
}

/// Whether two ranges `[start, end)` (`end` `\0`: no end) share a key.
fn overlap((s1, e1): &(Vec<u8>, Vec<u8>), (s2, e2): &(Vec<u8>, Vec<u8>)) -> bool {
    let before = |s: &Vec<u8>, e: &Vec<u8>| e.as_slice() == b"\0" || s < e;
    before(s1, e2) && before(s2, e1)
}

/// The keys a part (or a group of parts) compares, reads, puts and deletes, at any depth and
/// in either branch.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Access {
    pub(super) compares: Keys,
    pub(super) reads: Keys,
    pub(super) puts: Keys,
    pub(super) deletes: Keys,
}

impl Access {
    fn extend(&mut self, other: &Access) {
        self.compares.extend(&other.compares);
        self.reads.extend(&other.reads);
        self.puts.extend(&other.puts);
        self.deletes.extend(&other.deletes);
    }

    fn writes_meet(&self, keys: &Keys) -> bool {
        self.puts.meets(keys) || self.deletes.meets(keys)
    }

    /// Every key it touches.
    pub(super) fn touched(&self) -> Keys {
        let mut all = self.compares.clone();
        all.extend(&self.reads);
        all.extend(&self.puts);
        all.extend(&self.deletes);
        all
    }

    /// Whether `self`, applied after `before` in one Txn, comes to what it would have one after
    /// the other (the rules of the module's docs).
    fn may_follow(&self, before: &Access) -> bool {
        !before.writes_meet(&self.compares)
            && !before.puts.meets(&self.reads)
            && !self.writes_meet(&before.reads)
            && !self.writes_meet(&before.puts)
            && !self.writes_meet(&before.deletes)
    }
}

/// What a part takes of a merged Txn.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Shape {
    /// Its operations: the merged Txn's own level holds them all.
    pub(super) width: usize,
    /// What its nested Txns use below that level.
    pub(super) depth: usize,
    /// The keys it compares, reads and writes.
    pub(super) access: Access,
    /// Whether it may share keys with the other parts of its Txn, within the module's rules
    /// and in an order they fix; else it shares none and touches no range.
    pub(super) ordered: bool,
    /// Whether it is a whole conditional Txn (merged flat, only with others of its kind),
    /// rather than operations (merged nested).
    pub(super) whole: bool,
}

impl Shape {
    /// The shape of a part of `ops`, `ordered` or strict; `whole` for a whole conditional Txn
    /// (`ops` is then that Txn, nested).
    pub(super) fn of(ops: &[TxnOp], ordered: bool, whole: bool) -> Shape {
        let txn = PbTxnRequest::from(Txn::new().and_then(ops.to_vec()));
        let mut access = Access::default();
        let depth = txn
            .success
            .iter()
            .map(|op| below(op, &mut access))
            .max()
            .unwrap_or(0);
        let (mut width, mut depth) = (txn.success.len(), depth);
        if let (true, [op]) = (whole, &txn.success[..]) {
            if let Some(PbTxnOpRequest::RequestTxn(t)) = &op.request {
                // Merged flat: its compares and its then-branch join the merged Txn's own.
                let own = t.compare.len().max(t.success.len()).max(t.failure.len());
                width = t.compare.len().max(t.success.len());
                depth -= own;
            }
        }
        Shape {
            width,
            depth,
            access,
            ordered,
            whole,
        }
    }
}

impl Shape {
    /// Counts the reads of `ops` as its own, though they are not sent.
    pub(super) fn depends_on(&mut self, ops: &[TxnOp]) {
        let txn = PbTxnRequest::from(Txn::new().and_then(ops.to_vec()));
        for op in &txn.success {
            below(op, &mut self.access);
        }
    }
}

/// The operations `op` uses below its own level (etcd's `checkTxnRequest`: a Txn uses the
/// longest of its compares, success and failure lists, and its nested Txns what they use
/// below that); adds the keys it touches to `access`.
fn below(op: &PbTxnRequestOp, access: &mut Access) -> usize {
    match &op.request {
        Some(PbTxnOpRequest::RequestRange(r)) => access.reads.add(&r.key, &r.range_end),
        Some(PbTxnOpRequest::RequestPut(p)) => access.puts.add(&p.key, &[]),
        Some(PbTxnOpRequest::RequestDeleteRange(d)) => access.deletes.add(&d.key, &d.range_end),
        Some(PbTxnOpRequest::RequestTxn(t)) => {
            for c in &t.compare {
                access.compares.add(&c.key, &c.range_end);
            }
            let own = t.compare.len().max(t.success.len()).max(t.failure.len());
            let nested = t
                .success
                .iter()
                .chain(&t.failure)
                .map(|op| below(op, access))
                .max()
                .unwrap_or(0);
            return own + nested;
        }
        None => {}
    }
    0
}

/// A group being formed: its parts in order, and what they take together.
struct Group {
    members: VecDeque<usize>,
    width: usize,
    depth: usize,
    /// What its parts compare, read and write.
    access: Access,
    /// Every key its parts touch.
    touched: Keys,
    /// What its strict parts touch (no ordered part may touch it).
    strict: Keys,
    /// Its part is strict and touches a range: it goes alone.
    alone: bool,
    /// Its parts are whole conditional Txns.
    whole: bool,
}

impl Group {
    fn of(i: usize, part: &Shape, touched: Keys) -> Group {
        let strict = match part.ordered {
            true => Keys::default(),
            false => touched.clone(),
        };
        Group {
            members: VecDeque::from([i]),
            width: part.width,
            depth: part.depth,
            access: part.access.clone(),
            alone: !part.ordered && touched.has_range(),
            whole: part.whole,
            touched,
            strict,
        }
    }

    /// Adds part `i` of shape `part` (touching `touched`) if it may join: last, or first if
    /// only so.
    fn join(&mut self, i: usize, part: &Shape, touched: &Keys) -> bool {
        if self.alone
            || self.whole != part.whole
            || self.width + part.width + self.depth.max(part.depth) > TXN_OPS
        {
            return false;
        }
        let last = if !part.ordered {
            // Strict: shares no key with any part, and touches no range.
            if touched.has_range() || touched.meets(&self.touched) {
                return false;
            }
            true
        } else {
            if touched.meets(&self.strict) {
                return false;
            }
            if part.access.may_follow(&self.access) {
                true
            } else if self.access.may_follow(&part.access) {
                false
            } else {
                return false;
            }
        };
        match last {
            true => self.members.push_back(i),
            false => self.members.push_front(i),
        }
        self.width += part.width;
        self.depth = self.depth.max(part.depth);
        self.access.extend(&part.access);
        if !part.ordered {
            self.strict.extend(touched);
        }
        self.touched.extend(touched);
        true
    }
}

/// Parts of `shapes` in as few groups as hold them, as indices in the order each group's Txn
/// runs them: each group within [`TXN_OPS`], each part joining the first group it may (see
/// the module's docs); a strict part that touches a range alone.
pub(super) fn grouping(shapes: &[&Shape]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Group> = Vec::new();
    for (i, part) in shapes.iter().enumerate() {
        let touched = part.access.touched();
        if !groups.iter_mut().any(|group| group.join(i, part, &touched)) {
            groups.push(Group::of(i, part, touched));
        }
    }
    groups
        .into_iter()
        .map(|group| group.members.into())
        .collect()
}

#[cfg(test)]
mod tests;
