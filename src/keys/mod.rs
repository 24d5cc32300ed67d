//! Key naming and the Txns every primitive is built from.
//!
//! Two layouts ([`Layout`]):
//!
//! * **Shared with etcd's own clients** (Mutex, Election, LeaderSelector): the queue of `N` is
//!   every key *directly* under `N/`, in create-revision order — the layout of Go's
//!   `concurrency.Mutex`/`Election`, and so of `etcdctl lock`/`elect`, etcd's server-side lock
//!   and election services and the clients built on them (they key `N/<lease id in hex>`).
//!   Our own member keys are `N/#<lease id, 16 hex digits>-<number, hex>`. Keys of nested
//!   names (`N/sub/…`, ours or anyone's) contain another `/` and are not members.
//! * **Ours only** (Semaphore `semaphore`, RwLock `rwlock`, Barrier `barrier`, DoubleBarrier
//!   `double`): every key under `N/#<kind>/`. Those keys are nested below `N/`, so they are
//!   never members of a shared queue: a Mutex and a Semaphore of the same name are independent.
//!
//! Because names may not contain `#`, no name's keys can be mistaken for another's, and
//! because a session gives a number to one key at a time (a number goes back to the session's
//! pool only once its key is deleted, see `session::slots`), two acquisitions through one
//! session never alias (etcd #11777: Go keys one per session) while a retry of one acquisition
//! reuses its key (so it can never create a second waiter). Numbers used again keep a session's
//! key names few: etcd keeps deleted keys in its index until compaction, and every range read
//! over a prefix walks them.

use etcd_client::{
    Compare, CompareOp, GetOptions, GetResponse, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse, TxnResponse,
};

use crate::Error;

/// Longest accepted primitive name, in bytes.
pub const MAX_NAME_LEN: usize = 1024;

/// What separates a name from its member keys. Names may not contain `#`.
pub(crate) const QUEUE_SEPARATOR: &str = "/#";

/// The end of the range of keys that start with `prefix` (etcd's convention: `[0]`, "every
/// key from the start on", when the prefix is empty or only `0xff` bytes).
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Checks that `name` can serve as the key prefix of a primitive.
///
/// Rules: not empty, at most [`MAX_NAME_LEN`] bytes, no `#` (it separates a name from its
/// member keys), no control characters (U+0000–U+001F, U+007F–U+009F).
pub(crate) fn validate_name(name: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(Error::InvalidArgument("name must not be empty".into()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::InvalidArgument(format!(
            "name is {} bytes long; at most {MAX_NAME_LEN} are allowed",
            name.len()
        )));
    }
    if name.contains('#') {
        return Err(Error::InvalidArgument(format!(
            "name {name:?} contains '#', which separates a name from its member keys"
        )));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(Error::InvalidArgument(format!(
            "name {name:?} contains the control character {c:?}"
        )));
    }
    Ok(())
}

/// Where a primitive's keys sit under its name `N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// The queue etcd's own clients use: every key directly under `N/`.
    Shared,
    /// Ours only: the keys under `N/#<kind>/`.
    Own(&'static str),
}

/// The queue of one named primitive: the range its members are in, and where its own keys go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Queue {
    /// Every member key starts with it: `N/` (shared) or `N/#<kind>/` (ours only).
    prefix: String,
    /// Every key this crate puts starts with it: `N/#` (shared) or the prefix.
    own: String,
    /// Members are only the keys directly under `prefix` (no further `/`).
    direct: bool,
}

impl Queue {
    /// The queue of `name` in `layout`, or the reason `name` is not acceptable.
    pub(crate) fn new(name: &str, layout: Layout) -> Result<Queue, Error> {
        validate_name(name)?;
        Ok(match layout {
            Layout::Shared => Queue {
                prefix: format!("{name}/"),
                own: format!("{name}{QUEUE_SEPARATOR}"),
                direct: true,
            },
            Layout::Own(kind) => {
                let prefix = format!("{name}{QUEUE_SEPARATOR}{kind}/");
                Queue {
                    own: prefix.clone(),
                    prefix,
                    // Member keys hold no further `/`: keys below the prefix with one (nested
                    // names', successors' pointers `#next/…`) are not members.
                    direct: true,
                }
            }
        })
    }

    /// The prefix every member key of this queue starts with.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether only the keys directly under the prefix are members (a shared queue, whose
    /// prefix also holds nested names' keys).
    pub(crate) fn direct(&self) -> bool {
        self.direct
    }

    /// Whether `key` is a member of this queue.
    pub(crate) fn is_member(&self, key: &[u8]) -> bool {
        key.strip_prefix(self.prefix.as_bytes())
            .is_some_and(|rest| !self.direct || (!rest.is_empty() && !rest.contains(&b'/')))
    }

    /// The member key numbered `seq` (see `session::slots`) of the session with lease `lease_id`, of
    /// kind `kind` (`""` for plain queues; a letter for primitives with several kinds of
    /// members, e.g. readers `r` and writers `w`). Kinds are letters outside the hex digits,
    /// so a kind's keys form their own sub-range.
    pub(crate) fn member_key(&self, kind: &str, lease_id: i64, seq: u64) -> String {
        format!("{}{kind}{:016x}-{seq:x}", self.own, lease_id)
    }

    /// Whether `key` is a member key of kind `kind` that a session of lease `lease_id` made
    /// ([`member_key`](Self::member_key) with any sequence number).
    pub(crate) fn is_member_of_lease(&self, kind: &str, lease_id: i64, key: &str) -> bool {
        key.strip_prefix(&format!("{}{kind}{lease_id:016x}-", self.own))
            .is_some_and(|seq| !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_hexdigit()))
    }

    /// The prefix of the members of kind `kind` (`""`: every member of a queue that is ours
    /// only), or of one of our own keys (a latch, a barrier).
    pub(crate) fn sub(&self, kind: &str) -> String {
        if kind.is_empty() {
            self.prefix.clone()
        } else {
            format!("{}{kind}", self.own)
        }
    }

    /// All member keys of this queue (and, for a shared queue, nested names' keys too: filter
    /// with [`is_member`](Self::is_member)), as a `Get` range.
    pub(crate) fn range(&self) -> GetOptions {
        GetOptions::new().with_prefix()
    }
}

/// A primitive's name and its queue, or why the name is not acceptable. Primitives are built
/// without I/O or errors; every operation then reports an invalid name.
#[derive(Debug, Clone)]
pub(crate) struct Named {
    name: String,
    queue: Result<Queue, String>,
}

impl Named {
    pub(crate) fn new(name: impl Into<String>, layout: Layout) -> Named {
        let name = name.into();
        let queue = Queue::new(&name, layout).map_err(|e| match e {
            Error::InvalidArgument(why) => why,
            other => other.to_string(),
        });
        Named { name, queue }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The queue, or [`Error::InvalidArgument`] for an invalid name.
    pub(crate) fn queue(&self) -> Result<&Queue, Error> {
        self.queue
            .as_ref()
            .map_err(|why| Error::InvalidArgument(why.clone()))
    }
}

/// Holds exactly while `key` exists with create revision `create_revision`: the key was not
/// deleted (or expired) and re-created since. It does not see a plain put of the key by
/// someone else, which keeps the create revision: see [`owner_compares`].
pub(crate) fn owner_compare(key: &str, create_revision: i64) -> Compare {
    Compare::create_revision(key, CompareOp::Equal, create_revision)
}

/// Holds exactly while `key` is the incarnation created at `create_revision` *and* is still
/// attached to `lease_id`: the owner-only compares behind every fenced write and release. A
/// put of the key by another client (Go's `AddEndpoint`, `etcdctl put`, a put under another
/// lease or none) keeps its create revision but moves it off our lease, so it fails them.
pub(crate) fn owner_compares(key: &str, create_revision: i64, lease_id: i64) -> Vec<Compare> {
    vec![
        owner_compare(key, create_revision),
        Compare::lease(key, CompareOp::Equal, lease_id),
    ]
}

/// Where the pointers of the waiters behind our member key `member` go
/// ([`successor_pointer`]): `…#next/<member's id>/`, beside the queue's members rather than
/// under them — not a member of any queue (members hold no further `/`), and not deleted by
/// a delete of `member` with the keys under it (`etcdctl del --prefix <member>`), which is no
/// release. `None` for a key that is not one of ours.
pub(crate) fn pointers_of(member: &str) -> Option<String> {
    if !is_our_member_key(member.as_bytes()) {
        return None;
    }
    let hash = member.rfind('#')?;
    Some(format!("{}#next/{}/", &member[..hash], &member[hash + 1..]))
}

/// The pointer a waiter (created at `waiter_revision`) puts under its own lease to be told
/// that its predecessor `predecessor` — a member key of ours ([`pointers_of`]) — was released
/// by its holder: the holder's release deletes it in the same Txn as its key
/// ([`release_announcing`]), so the waiter sees both deletions at one revision.
pub(crate) fn successor_pointer(predecessor: &[u8], waiter_revision: i64) -> Option<Vec<u8>> {
    let predecessor = std::str::from_utf8(predecessor).ok()?;
    Some(format!("{}{waiter_revision}", pointers_of(predecessor)?).into_bytes())
}

/// Whether `key` is a pointer of [`successor_pointer`]'s making.
pub(crate) fn is_pointer(key: &[u8]) -> bool {
    pointer_parts(key).is_some()
}

/// A pointer of [`successor_pointer`]'s making, taken apart: the member key it points to
/// (the predecessor whose release it waits for) and the create revision of the waiter that put
/// it. `None` for any other key.
pub(crate) fn pointer_parts(key: &[u8]) -> Option<(String, i64)> {
    const NEXT: &str = "#next/";
    let key = std::str::from_utf8(key).ok()?;
    let (next, slash) = (key.rfind(NEXT)?, key.rfind('/')?);
    let revision = &key[slash + 1..];
    if slash <= next + NEXT.len()
        || revision.is_empty()
        || !revision.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let predecessor = format!("{}#{}", &key[..next], &key[next + NEXT.len()..slash]);
    if !is_our_member_key(predecessor.as_bytes()) {
        return None;
    }
    Some((predecessor, revision.parse().ok()?))
}

/// Whether a waiter behind `member` may take a release of it that deletes the waiter's
/// pointer as the hand-off itself: `member` is ours and exclusive — when it held, nothing was
/// ahead of it. Not a reader of a read/write lock: other readers may still hold when one
/// lets go.
pub(crate) fn announces_release(member: &[u8]) -> bool {
    is_our_member_key(member) && member_id(member).first() != Some(&b'r')
}

/// Whether `key` is one of this crate's member keys (`…#<lease, 16 hex digits>-<number>`, or
/// `…#<kind>/<lease>-<number>` in a queue of our own; an RwLock's carry their kind's letter
/// before the lease): the only keys a release of ours ever announces to successors (a Go or
/// etcdctl holder does not).
pub(crate) fn is_our_member_key(key: &[u8]) -> bool {
    if !key.contains(&b'#') {
        return false;
    }
    let id = member_id(key);
    let id = match id.first() {
        Some(b'r' | b'w') => &id[1..],
        _ => id,
    };
    id.len() > 17
        && id[..16].iter().all(u8::is_ascii_hexdigit)
        && id[16] == b'-'
        && id[17..].iter().all(u8::is_ascii_hexdigit)
}

/// A member key's last segment without its `#`: `[kind]<lease>-<number>`.
fn member_id(key: &[u8]) -> &[u8] {
    let last = key
        .iter()
        .rposition(|&b| b == b'/')
        .map_or(key, |slash| &key[slash + 1..]);
    last.strip_prefix(b"#").unwrap_or(last)
}

/// Deletes `key` only while it is ours: the incarnation created at `create_revision`, on
/// `lease_id`. Else-branch: `[Get(key)]`, which tells a key taken over by another client's put
/// (same create revision, another lease) from one that is gone.
pub(crate) fn fenced_delete(key: &str, create_revision: i64, lease_id: i64) -> Txn {
    fenced_release(key, create_revision, lease_id, false)
}

/// [`fenced_delete`], or with `announces` [`release_announcing`].
fn fenced_release(key: &str, create_revision: i64, lease_id: i64, announces: bool) -> Txn {
    txn_of(release_parts(key, create_revision, lease_id, announces))
}

/// A Txn given as its parts — compares, then-branch, else-branch — so that the request layer
/// can merge several flat into one (`rpc::batch::Conditional`).
pub(crate) type TxnParts = (Vec<Compare>, Vec<TxnOp>, Vec<TxnOp>);

/// The Txn of `parts`.
fn txn_of((when, then, otherwise): TxnParts) -> Txn {
    Txn::new().when(when).and_then(then).or_else(otherwise)
}

/// [`fenced_delete`] (or with `announces` [`release_announcing`]) as its parts.
pub(crate) fn release_parts(
    key: &str,
    create_revision: i64,
    lease_id: i64,
    announces: bool,
) -> TxnParts {
    (
        owner_compares(key, create_revision, lease_id),
        release_ops(key, announces),
        vec![keys_only_get(key)],
    )
}

/// What a release deletes: `key` and, with `announces` for a key of ours, every successor's
/// pointer to it ([`successor_pointer`]).
fn release_ops(key: &str, announces: bool) -> Vec<TxnOp> {
    let mut ops = vec![TxnOp::delete(key, None)];
    if let Some(pointers) = pointers_of(key).filter(|_| announces) {
        ops.push(TxnOp::delete(
            pointers,
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        ));
    }
    ops
}

/// A get of `key` that tells whether it is there, and which incarnation on which lease.
fn keys_only_get(key: &str) -> TxnOp {
    TxnOp::get(key, Some(etcd_client::GetOptions::new().with_keys_only()))
}

/// The put of member key `key` under `lease_id`.
fn member_put(key: &str, value: Vec<u8>, lease_id: i64) -> TxnOp {
    TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease_id)))
}

/// The release of a holder that was the oldest member of its queue: deletes `key` only while it
/// is ours (as [`fenced_delete`]) and, in the same Txn, every successor's pointer to it
/// ([`successor_pointer`]) — so the waiter just behind sees both deletions at one revision
/// and knows the holder released (a waiter giving up deletes its key alone). A plain
/// [`fenced_delete`] for a key that is not one of ours.
pub(crate) fn release_announcing(key: &str, create_revision: i64, lease_id: i64) -> Txn {
    fenced_release(key, create_revision, lease_id, true)
}

/// Deletes `key` only while it is ours (as [`fenced_delete`]), and `pointers` (successors'
/// pointers of ours, each only while it is on our lease) whatever becomes of `key`.
pub(crate) fn fenced_delete_with_pointers(
    key: &str,
    create_revision: i64,
    lease_id: i64,
    pointers: &[Vec<u8>],
) -> Txn {
    let pointers_gone = || {
        pointers.iter().map(|pointer| {
            TxnOp::txn(
                Txn::new()
                    .when([Compare::lease(pointer.clone(), CompareOp::Equal, lease_id)])
                    .and_then([TxnOp::delete(pointer.clone(), None)]),
            )
        })
    };
    let mut then = vec![TxnOp::delete(key, None)];
    then.extend(pointers_gone());
    let mut otherwise = vec![keys_only_get(key)];
    otherwise.extend(pointers_gone());
    Txn::new()
        .when(owner_compares(key, create_revision, lease_id))
        .and_then(then)
        .or_else(otherwise)
}

/// Bumps `key`'s mod revision (value and lease unchanged) only while it is ours (the
/// incarnation `create_revision`, on `lease_id`): a "touch" that wakes whoever watches the key
/// for changes.
pub(crate) fn touch(key: &str, create_revision: i64, lease_id: i64) -> Txn {
    Txn::new()
        .when(owner_compares(key, create_revision, lease_id))
        .and_then([TxnOp::put(
            key,
            Vec::new(),
            Some(PutOptions::new().with_ignore_value().with_ignore_lease()),
        )])
}

/// One round trip that puts `key` (under `lease_id`, value `value`) unless it exists already,
/// and runs `reads` just before the put (a queue reads what blocks it, which excludes our own
/// key).
///
/// Then-branch: `[reads…, Put]`; our create revision is the header revision. Else-branch (a
/// retry of the same acquisition): `[Get(key)]`; the caller reads afresh.
pub(crate) fn enqueue_txn(key: &str, value: Vec<u8>, lease_id: i64, reads: Vec<TxnOp>) -> Txn {
    txn_of(enqueue_parts(key, value, lease_id, reads))
}

/// The queue of member key `key`: its name up to its last `/` (`<name>/` for a lock's
/// shared queue, `<name>/#<kind>/` for a queue of our own; a read/write lock's readers and
/// writers share one).
pub(crate) fn queue_of(key: &str) -> &str {
    key.rfind('/').map_or(key, |slash| &key[..=slash])
}

/// A read of every key of `key`'s queue ([`queue_of`]), and of the names nested in a shared
/// one: what an enqueue's outcome depends on, whether it reads the queue or decides from its
/// session's mirror.
pub(crate) fn whole_queue(key: &str) -> TxnOp {
    let options = etcd_client::GetOptions::new()
        .with_prefix()
        .with_keys_only();
    TxnOp::get(queue_of(key), Some(options))
}

/// [`enqueue_txn`] as its parts (whatever it reads, it depends on its [`whole_queue`]).
pub(crate) fn enqueue_parts(
    key: &str,
    value: Vec<u8>,
    lease_id: i64,
    reads: Vec<TxnOp>,
) -> TxnParts {
    let mut then = reads;
    then.push(member_put(key, value, lease_id));
    (
        vec![Compare::create_revision(key, CompareOp::Equal, 0)],
        then,
        vec![TxnOp::get(key, None)],
    )
}

/// The member key `held` (created at `create_revision` on `lease_id`) released and `key` put
/// in its queue, in one Txn — one raft entry where a release and a new enqueue are two — as
/// its parts (it depends on `key`'s [`whole_queue`]). The release is
/// [`release_announcing`]'s (with `announces`) or [`fenced_delete`]'s, the put
/// [`enqueue_txn`]'s: both happen, only while `held` is ours and `key` does not exist, or
/// neither. `reads` run between them, so they see the queue without `held`.
///
/// Then-branch: `[Delete(held), (Delete(pointers)), reads…, Put]`; `key`'s create revision is
/// the header revision. Else-branch: `[Get(held, keys only), Get(key)]`.
pub(crate) fn requeue_parts(
    held: (&str, i64),
    announces: bool,
    lease_id: i64,
    key: &str,
    value: Vec<u8>,
    reads: Vec<TxnOp>,
) -> TxnParts {
    let (held, create_revision) = held;
    let mut when = owner_compares(held, create_revision, lease_id);
    when.push(Compare::create_revision(key, CompareOp::Equal, 0));
    let mut then = release_ops(held, announces);
    then.extend(reads);
    then.push(member_put(key, value, lease_id));
    (when, then, vec![keys_only_get(held), TxnOp::get(key, None)])
}

/// One round trip that runs `reads` only while `key` is still ours: the incarnation
/// `create_revision`, on `lease_id` (the compares fail once it is gone or taken over).
pub(crate) fn fenced_reads(
    key: &str,
    create_revision: i64,
    lease_id: i64,
    reads: Vec<TxnOp>,
) -> Txn {
    Txn::new()
        .when(owner_compares(key, create_revision, lease_id))
        .and_then(reads)
}

/// One round trip for a try-acquire (one permit only) that leaves no key behind when busy:
/// puts `key` only if nothing is under `prefix` (the range of what blocks it). Else-branch:
/// `[Get(key), Get(the `page` oldest under prefix)]`, which tells a retry of the same
/// acquisition whether its earlier, unanswered put landed and is through (no member of the
/// range is older than it), and a shared queue whether a member holds at all.
pub(crate) fn try_enqueue_txn(
    prefix: &str,
    key: &str,
    value: Vec<u8>,
    lease_id: i64,
    page: i64,
) -> Txn {
    let oldest = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend)
        .with_limit(page)
        .with_keys_only();
    Txn::new()
        .when([Compare::create_revision(prefix, CompareOp::Equal, 0).with_prefix()])
        .and_then([member_put(key, value, lease_id)])
        .or_else([TxnOp::get(key, None), TxnOp::get(prefix, Some(oldest))])
}

/// The revision of the store when etcd answered.
pub(crate) fn header_revision(resp: &TxnResponse) -> Result<i64, Error> {
    resp.header()
        .map(|h| h.revision())
        .ok_or_else(|| Error::Protocol("txn response without header".into()))
}

/// The `Get` responses of a Txn, in order.
pub(crate) fn txn_gets(resp: &TxnResponse) -> Vec<GetResponse> {
    op_gets(&resp.op_responses())
}

/// The answers of the `Get`s among `ops` (a Txn's answers), in order.
pub(crate) fn op_gets(ops: &[TxnOpResponse]) -> Vec<GetResponse> {
    ops.iter()
        .filter_map(|op| match op {
            TxnOpResponse::Get(g) => Some(g.clone()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests;
