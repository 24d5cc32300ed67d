//! Permissions for nested Txns. etcd 3.4 and 3.5 releases before 2026 check the permissions
//! of a Txn's own compares and operations, but not of those in Txns nested in it (etcd PRs
//! #21689, #22134): a nested write slips past a role that may not write its key, a nested
//! read past one that may not read it. The crate's nested Txns are — but for two that nest
//! under compares of their own, writing keys their plain operations' permission covers
//! (`docs/design.md`, "Permissions of nested Txns") — the parts of a Txn without compares: a
//! work queue's claims and acks, alone or merged ([`batch`](super::batch)). Such a Txn
//! carries *witnesses* in its else-branch, which
//! etcd checks like every operation of the Txn's own and never applies (a Txn without
//! compares always takes its then-branch): per directory of the keys its nested Txns touch
//! (a key up to its last `/`), a range read over the span of those they read or compare,
//! and a range delete over the span of those they write. A role must then be allowed to
//! read and to write those spans — what the nested operations need, and, for a role that
//! grants prefixes (as every role that serves a queue must: its keys are random), no more.
//! And if they put a key, a put of nothing to a directory's own key (which a prefix
//! permission covers): etcd counts no nested put against its quota either (a claim went
//! through on 3.4.23 while the database was over its quota).

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

use etcd_client::proto::{PbTxnOpRequest, PbTxnRequest, PbTxnRequestOp};
use etcd_client::{DeleteOptions, GetOptions, Txn, TxnOp};

/// The Txn `Txn::new().and_then(ops)`, with the witnesses of what its nested Txns read and
/// write in its else-branch (see the module's docs); none if nothing in `ops` is nested.
pub(crate) fn compareless(ops: Vec<TxnOp>) -> Txn {
    compareless_if(ops, |_| true).unwrap_or_default()
}

/// [`compareless`], if `takes` says etcd takes it (with its witnesses; a witness is a plain
/// operation of the else-branch): `None` if not.
pub(crate) fn compareless_if(
    ops: Vec<TxnOp>,
    takes: impl Fn(&PbTxnRequest) -> bool,
) -> Option<Txn> {
    let txn = Txn::new().and_then(ops);
    let mut request = PbTxnRequest::from(txn.clone());
    let witnesses = witnesses(&request.success);
    // As many plain operations in the else-branch as there are witnesses: what etcd counts.
    request.failure = vec![PbTxnRequestOp::default(); witnesses.len()];
    if !takes(&request) {
        return None;
    }
    Some(match witnesses.is_empty() {
        true => txn,
        false => txn.or_else(witnesses),
    })
}

/// What a witness makes etcd check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Need {
    Read,
    Write,
}

/// The span `[from, to)` of keys a directory's witness covers; `to` empty: no end.
#[derive(Debug)]
struct Span {
    from: Vec<u8>,
    to: Vec<u8>,
}

impl Span {
    /// The keys a request's `key` and `range_end` name: one key, a range, or (`range_end`
    /// `\0`) every key from `key` on.
    fn of(key: &[u8], range_end: &[u8]) -> Span {
        let to = match range_end {
            [] => [key, &[0]].concat(),
            [0] => Vec::new(),
            end => end.to_vec(),
        };
        Span {
            from: key.to_vec(),
            to,
        }
    }

    fn widen(&mut self, other: Span) {
        self.from = self.from.clone().min(other.from);
        self.to = match (self.to.is_empty(), other.to.is_empty()) {
            (false, false) => self.to.clone().max(other.to),
            _ => Vec::new(),
        };
    }

    /// The witness of `need` over this span: one key's own request if it is one key.
    fn witness(self, need: Need) -> TxnOp {
        let one = self.to == [&self.from[..], &[0]].concat();
        let end = match self.to.is_empty() {
            true => vec![0],
            false => self.to,
        };
        match (need, one) {
            (Need::Read, true) => TxnOp::get(self.from, Some(GetOptions::new().with_keys_only())),
            (Need::Read, false) => TxnOp::get(
                self.from,
                Some(GetOptions::new().with_range(end).with_keys_only()),
            ),
            (Need::Write, true) => TxnOp::delete(self.from, None),
            (Need::Write, false) => {
                TxnOp::delete(self.from, Some(DeleteOptions::new().with_range(end)))
            }
        }
    }
}

/// The directory of `key`: up to and with its last `/` (empty if it has none).
fn directory(key: &[u8]) -> Vec<u8> {
    match key.iter().rposition(|&b| b == b'/') {
        Some(at) => key[..=at].to_vec(),
        None => Vec::new(),
    }
}

/// The witnesses of what the Txns nested in `ops` read and write, at every level below; and,
/// if they put a key, the [`quota`] witness.
fn witnesses(ops: &[PbTxnRequestOp]) -> Vec<TxnOp> {
    let mut spans = Spans::default();
    for op in ops {
        if let Some(PbTxnOpRequest::RequestTxn(t)) = &op.request {
            spans.nested(t);
        }
    }
    let quota = spans.puts.then(|| quota(&spans.by_place)).flatten();
    spans
        .by_place
        .into_iter()
        .map(|((_, need), span)| span.witness(need))
        .chain(quota)
        .collect()
}

/// The witness of a nested put for etcd's quota: a put of nothing to the key of the first
/// written directory that lies in no written span, which etcd counts as a put of the Txn's
/// own — so that the Txn is refused, as every put is, while etcd's database is over its
/// quota; etcd 3.4/3.5 before 2026 count no put inside a nested Txn. (Outside every written
/// span: etcd refuses a put inside a range deleted in the same branch.) `None` if there is no
/// such directory.
fn quota(spans: &BTreeMap<(Vec<u8>, Need), Span>) -> Option<TxnOp> {
    let written = || spans.iter().filter(|((_, need), _)| *need == Need::Write);
    let inside = |key: &[u8], s: &Span| s.from[..] <= *key && (s.to.is_empty() || *key < s.to[..]);
    let ((directory, _), _) = written().find(|((directory, _), _)| {
        !directory.is_empty() && !written().any(|(_, s)| inside(directory, s))
    })?;
    Some(TxnOp::put(directory.clone(), Vec::new(), None))
}

/// What nested Txns need.
#[derive(Default)]
struct Spans {
    /// Per directory and need, the span of the keys.
    by_place: BTreeMap<(Vec<u8>, Need), Span>,
    /// Whether they put a key.
    puts: bool,
}

impl Spans {
    fn add(&mut self, need: Need, key: &[u8], range_end: &[u8]) {
        let span = Span::of(key, range_end);
        match self.by_place.entry((directory(key), need)) {
            Entry::Vacant(v) => {
                v.insert(span);
            }
            Entry::Occupied(mut o) => o.get_mut().widen(span),
        }
    }

    /// Adds what `txn` compares, reads and writes, and what the Txns nested in it do.
    fn nested(&mut self, txn: &PbTxnRequest) {
        for c in &txn.compare {
            self.add(Need::Read, &c.key, &c.range_end);
        }
        for op in txn.success.iter().chain(&txn.failure) {
            match &op.request {
                Some(PbTxnOpRequest::RequestRange(r)) => self.add(Need::Read, &r.key, &r.range_end),
                Some(PbTxnOpRequest::RequestPut(p)) => {
                    self.puts = true;
                    self.add(Need::Write, &p.key, &[]);
                    if p.prev_kv {
                        self.add(Need::Read, &p.key, &[]);
                    }
                }
                Some(PbTxnOpRequest::RequestDeleteRange(d)) => {
                    self.add(Need::Write, &d.key, &d.range_end);
                    if d.prev_kv {
                        self.add(Need::Read, &d.key, &d.range_end);
                    }
                }
                Some(PbTxnOpRequest::RequestTxn(t)) => self.nested(t),
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests;
