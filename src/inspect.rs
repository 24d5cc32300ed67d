//! Looking at a name's queues from outside, as an operator does at 3 a.m.: who holds
//! `jobs/nightly`, since when, who waits behind, and which client made each key — this crate,
//! or etcd's Go `concurrency` package (Go services, `etcdctl lock`/`elect`, etcd's lock
//! service). No lease is needed.
//!
//! ```no_run
//! # async fn demo(client: etcd_client::Client) -> Result<(), etcd_coord::Error> {
//! use etcd_coord::inspect::Inspector;
//!
//! for queue in Inspector::new(client).read_all("jobs/nightly", None).await? {
//!     for member in queue.members() {
//!         println!("{:?} {} token {} {:?}", queue.kind(), member.key(), member.fencing_token(), member.client());
//!     }
//! }
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, GetOptions, KeyValue, SortOrder, SortTarget};
use futures::{Stream, StreamExt};

use crate::keys::{Layout, Queue};
use crate::metrics::View;
use crate::rpc::Rpc;
use crate::watch::{Revisions, Update};
use crate::Error;

/// Which of a name's queues ([`QueueState::kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum QueueKind {
    /// The queue a [`Mutex`](crate::Mutex) and an [`Election`](crate::Election) share with etcd's
    /// own clients: every key directly under `<name>/`. The oldest holds (leads).
    Mutex,
    /// A [`Semaphore`](crate::Semaphore)'s keys, under `<name>/#semaphore/`.
    Semaphore,
    /// An [`RwLock`](crate::RwLock)'s readers and writers, under `<name>/#rwlock/`.
    RwLock,
    /// A [`Barrier`](crate::Barrier)'s one key, `<name>/#barrier/up`, while it is up.
    Barrier,
}

/// Which client made a member key, as far as its name and lease tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MemberClient {
    /// This crate (`<name>/#<lease, 16 hex digits>-<number>` on that lease, and the like).
    Ours,
    /// etcd's Go `concurrency` package: `<name>/<lease id in hex>` on that lease — a Go
    /// service's `Mutex`/`Election`, `etcdctl lock`/`elect` (a Go client of that package) or
    /// etcd's server-side lock and election services. etcd stores nothing that tells these
    /// apart.
    Go,
    /// Anything else: a key put by hand (`etcdctl put`), or a layout's key on another lease
    /// than its name says. It still takes its place in the queue.
    Foreign,
}

/// What a member is to its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Role {
    /// A member of a mutex's, election's or semaphore's queue.
    Member,
    /// An [`RwLock`](crate::RwLock)'s reader.
    Reader,
    /// An [`RwLock`](crate::RwLock)'s writer.
    Writer,
    /// A [`Barrier`](crate::Barrier) that is up.
    Barrier,
}

/// A lease's time to live, when it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTtl {
    /// What is left (`None`: the lease was gone by the time it was read).
    pub remaining: Option<Duration>,
    /// The TTL it was granted.
    pub granted: Duration,
}

/// One key of a queue, in create-revision order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    key: String,
    value: Vec<u8>,
    lease_id: i64,
    fencing_token: i64,
    mod_revision: i64,
    age: i64,
    client: MemberClient,
    role: Role,
    holds: Option<bool>,
    lease: Option<LeaseTtl>,
}

impl Member {
    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The value (an election candidate's proclamation; empty for locks).
    pub fn value(&self) -> &[u8] {
        &self.value
    }

    /// The lease the key is on (0: none).
    pub fn lease_id(&self) -> i64 {
        self.lease_id
    }

    /// The key's create revision: its fencing token once it holds.
    pub fn fencing_token(&self) -> i64 {
        self.fencing_token
    }

    /// The revision of the key's last change.
    pub fn mod_revision(&self) -> i64 {
        self.mod_revision
    }

    /// How many revisions the store has moved on since the key was created (etcd keeps no
    /// clock time: this, and the lease's TTL, is what tells a key's age).
    pub fn age_revisions(&self) -> i64 {
        self.age
    }

    /// Which client made it.
    pub fn client(&self) -> MemberClient {
        self.client
    }

    /// What it is to its queue.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether it holds (`None`: cannot be told — a semaphore read without its permits).
    pub fn holds(&self) -> Option<bool> {
        self.holds
    }

    /// Its lease's time to live (`None` for a key without a lease).
    pub fn lease_ttl(&self) -> Option<LeaseTtl> {
        self.lease
    }
}

/// One queue of a name, as one read saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueState {
    kind: QueueKind,
    name: String,
    revision: i64,
    members: Vec<Member>,
}

impl QueueState {
    /// Which queue.
    pub fn kind(&self) -> QueueKind {
        self.kind
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The store revision of the read.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The members, oldest (first served) first.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The members that hold.
    pub fn holders(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|m| m.holds == Some(true))
    }
}

/// Reads a name's queues from outside (no lease): see the [module](self).
#[derive(Clone)]
pub struct Inspector {
    rpc: Rpc,
}

impl std::fmt::Debug for Inspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inspector").finish_non_exhaustive()
    }
}

impl Inspector {
    /// Reads through `client`, each request given up after 5 s.
    pub fn new(client: Client) -> Inspector {
        Inspector::with_request_timeout(client, Duration::from_secs(5))
    }

    /// Reads through `client`, each request given up after `timeout`.
    pub fn with_request_timeout(client: Client, timeout: Duration) -> Inspector {
        Inspector {
            rpc: Rpc::detached(client, timeout),
        }
    }

    /// Every queue of `name` — the mutex's (and election's), the semaphore's (whose holders
    /// are told only given its `permits`), the read/write lock's and the barrier's — from one
    /// linearizable read of `<name>/`, plus one lease read per distinct lease. The mutex's
    /// queue comes first and always; the others only if they have members. Keys of nested
    /// names (`<name>/sub/…`) are not members of any.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an invalid name (nothing is sent); request errors
    /// ([`Error::Timeout`], [`Error::Etcd`], [`Error::PermissionDenied`]); nothing is retried.
    #[tracing::instrument(name = "etcd_coord.inspect.read_all", skip_all, fields(name))]
    pub async fn read_all(
        &self,
        name: &str,
        permits: Option<usize>,
    ) -> Result<Vec<QueueState>, Error> {
        let (kvs, revision) = read_prefix(&self.rpc, name).await?;
        let mut queues = sort(name, &kvs, revision, permits)?;
        let leases = lease_ttls(&self.rpc, &queues).await?;
        for member in queues.iter_mut().flat_map(|q| q.members.iter_mut()) {
            member.lease = leases.get(&member.lease_id).copied();
        }
        Ok(queues)
    }

    /// [`read_all`](Self::read_all) now, and again after every revision that changed a key
    /// under `<name>/` (changes close together may be merged into one item), across
    /// disconnects and compaction. Ends after an `Err` that retrying cannot fix.
    pub fn follow(
        &self,
        name: &str,
        permits: Option<usize>,
    ) -> impl Stream<Item = Result<Vec<QueueState>, Error>> + Send + 'static {
        let (inspector, name) = (self.clone(), name.to_owned());
        let prefix = format!("{name}/");
        let rpc = self.rpc.clone();
        let reread: crate::watch::revisions::Reread<()> = Box::new(move || {
            let rpc = rpc.clone();
            let prefix = prefix.clone();
            Box::pin(async move {
                let resp = rpc
                    .get(prefix, GetOptions::new().with_prefix().with_count_only())
                    .await?;
                Ok(((), resp.header().map_or(0, |h| h.revision())))
            })
        });
        let revisions = Revisions::new(self.rpc.clone(), &format!("{name}/"), reread)
            .for_view(View::Inspection);
        futures::stream::unfold(Some(revisions), move |state| {
            let (inspector, name) = (inspector.clone(), name.clone());
            async move {
                let mut revisions = state?;
                let item = match revisions.next().await {
                    Ok(Update::Snapshot { .. } | Update::Revision(_)) => {
                        inspector.read_all(&name, permits).await
                    }
                    Err(e) => Err(e),
                };
                let next = item.is_ok().then_some(revisions);
                Some((item, next))
            }
        })
        .boxed()
    }
}

/// Every key under `<name>/`, oldest first, and the revision of the read.
async fn read_prefix(rpc: &Rpc, name: &str) -> Result<(Vec<KeyValue>, i64), Error> {
    crate::keys::validate_name(name)?;
    let opts = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend);
    let resp = rpc.get(format!("{name}/"), opts).await?;
    let revision = resp
        .header()
        .map(|h| h.revision())
        .ok_or_else(|| Error::Protocol("a read without a header".into()))?;
    Ok((resp.kvs().to_vec(), revision))
}

/// The queues of `name` in `kvs` (every key under `<name>/`, oldest first).
fn sort(
    name: &str,
    kvs: &[KeyValue],
    revision: i64,
    permits: Option<usize>,
) -> Result<Vec<QueueState>, Error> {
    let shared = Queue::new(name, Layout::Shared)?;
    let semaphore = Queue::new(name, Layout::Own(crate::semaphore::KIND))?;
    let rwlock = Queue::new(name, Layout::Own(crate::rwlock::KIND))?;
    let barrier = Queue::new(name, Layout::Own(crate::barrier::KIND))?.sub(crate::barrier::BARRIER);
    let state = |kind, members| QueueState {
        kind,
        name: name.to_owned(),
        revision,
        members,
    };
    let member = |kv: &KeyValue, client, role| Member {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        lease_id: kv.lease(),
        fencing_token: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        age: revision - kv.create_revision(),
        client,
        role,
        holds: Some(false),
        lease: None,
    };
    let mut queues = vec![state(QueueKind::Mutex, Vec::new())];
    let (mut sem, mut rw, mut up) = (Vec::new(), Vec::new(), Vec::new());
    for kv in kvs {
        let key = kv.key();
        if shared.is_member(key) {
            let rest = &key[shared.prefix().len()..];
            queues[0]
                .members
                .push(member(kv, shared_client(rest, kv.lease()), Role::Member));
        } else if let Some(rest) = key.strip_prefix(semaphore.prefix().as_bytes()) {
            sem.push(member(kv, own_client(rest, kv.lease()), Role::Member));
        } else if let Some(rest) = key.strip_prefix(rwlock.prefix().as_bytes()) {
            let (role, rest) = match rest.split_first() {
                Some((b'r', rest)) => (Role::Reader, rest),
                Some((b'w', rest)) => (Role::Writer, rest),
                _ => (Role::Member, rest),
            };
            rw.push(member(kv, own_client(rest, kv.lease()), role));
        } else if key == barrier.as_bytes() {
            up.push(member(
                kv,
                own_client(kv.value(), kv.lease()),
                Role::Barrier,
            ));
        }
    }
    // Who holds: a mutex's oldest; a semaphore's `permits` oldest; an RwLock's oldest if it
    // is a writer, else every reader ahead of the first writer; a barrier that is up.
    if let Some(first) = queues[0].members.first_mut() {
        first.holds = Some(true);
    }
    for (i, m) in sem.iter_mut().enumerate() {
        m.holds = permits.map(|n| i < n);
    }
    let first_writer = rw.iter().position(|m| m.role == Role::Writer);
    for (i, m) in rw.iter_mut().enumerate() {
        m.holds = Some(match first_writer {
            Some(0) => i == 0,
            Some(w) => i < w,
            None => true,
        });
    }
    for m in &mut up {
        m.holds = Some(true);
    }
    for (kind, members) in [
        (QueueKind::Semaphore, sem),
        (QueueKind::RwLock, rw),
        (QueueKind::Barrier, up),
    ] {
        if !members.is_empty() {
            queues.push(state(kind, members));
        }
    }
    Ok(queues)
}

/// Who made a member `<name>/<rest>` of a shared queue on lease `lease`.
fn shared_client(rest: &[u8], lease: i64) -> MemberClient {
    match rest.strip_prefix(b"#") {
        Some(ours) => own_client(ours, lease),
        None if lease != 0 && rest == format!("{lease:x}").as_bytes() => MemberClient::Go,
        None => MemberClient::Foreign,
    }
}

/// Whether `rest` (after the prefix and kind of one of our layouts) is ours on lease `lease`:
/// `<lease, 16 hex digits>-<number, hex>`.
fn own_client(rest: &[u8], lease: i64) -> MemberClient {
    let ours = lease != 0
        && rest.len() > 17
        && rest.starts_with(format!("{lease:016x}-").as_bytes())
        && rest[17..].iter().all(u8::is_ascii_hexdigit);
    if ours {
        MemberClient::Ours
    } else {
        MemberClient::Foreign
    }
}

/// The time to live of every lease the members of `queues` are on.
async fn lease_ttls(rpc: &Rpc, queues: &[QueueState]) -> Result<BTreeMap<i64, LeaseTtl>, Error> {
    let mut ids: Vec<i64> = queues
        .iter()
        .flat_map(|q| q.members.iter().map(|m| m.lease_id))
        .filter(|id| *id != 0)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let answers =
        futures::future::join_all(ids.iter().map(|id| rpc.lease_time_to_live(*id, false))).await;
    let mut ttls = BTreeMap::new();
    for (id, answer) in ids.into_iter().zip(answers) {
        let resp = match answer {
            Ok(resp) => resp,
            Err(e) if e.is_lease_not_found() => {
                ttls.insert(
                    id,
                    LeaseTtl {
                        remaining: None,
                        granted: Duration::ZERO,
                    },
                );
                continue;
            }
            Err(e) => return Err(e),
        };
        let secs = |s: i64| Duration::from_secs(s.max(0).unsigned_abs());
        ttls.insert(
            id,
            LeaseTtl {
                remaining: (resp.ttl() >= 0).then(|| secs(resp.ttl())),
                granted: secs(resp.granted_ttl()),
            },
        );
    }
    Ok(ttls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_told_apart_by_their_names_and_leases() {
        let lease = 0x694d_i64;
        assert_eq!(shared_client(b"694d", lease), MemberClient::Go);
        assert_eq!(shared_client(b"694e", lease), MemberClient::Foreign);
        assert_eq!(shared_client(b"694d", 0), MemberClient::Foreign);
        assert_eq!(
            shared_client(b"#000000000000694d-a", lease),
            MemberClient::Ours
        );
        assert_eq!(
            shared_client(b"#000000000000694d-a", 7),
            MemberClient::Foreign
        );
        assert_eq!(
            shared_client(b"#000000000000694d-", lease),
            MemberClient::Foreign
        );
        assert_eq!(shared_client(b"backup", lease), MemberClient::Foreign);
        assert_eq!(
            own_client(b"000000000000694d-1f", lease),
            MemberClient::Ours
        );
        assert_eq!(
            own_client(b"000000000000694d-x", lease),
            MemberClient::Foreign
        );
    }
}
