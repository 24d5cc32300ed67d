//! Reading a queue from outside: who is at its head, through a client and a request timeout
//! only (no lease needed) — for [`Election::leader`](crate::Election::leader) and
//! `observe()`, and for the primitives' `holder()` / `holders()`.

use etcd_client::{KeyValue, SortOrder, SortTarget};

use crate::keys::Queue;
use crate::rpc::Rpc;
use crate::{Error, LeasedSession};

/// A member of a queue that holds it now: a mutex's owner, a semaphore's permit holder, an
/// RwLock's reader or writer — whichever client made it (this crate, etcd's Go package,
/// `etcdctl lock`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    key: String,
    lease_id: i64,
    fencing_token: i64,
}

impl Holder {
    pub(crate) fn from_kv(kv: &KeyValue) -> Holder {
        Holder {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            lease_id: kv.lease(),
            fencing_token: kv.create_revision(),
        }
    }

    /// The holder's key (its guard's [`key()`](crate::Fence::key)).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lease the key is attached to: the holder's session
    /// ([`LeasedSession::lease_id`]).
    pub fn lease_id(&self) -> i64 {
        self.lease_id
    }

    /// The key's create revision: the holder's fencing token.
    pub fn fencing_token(&self) -> i64 {
        self.fencing_token
    }
}

/// How many keys beyond those wanted a read of the oldest members fetches at first (a shared
/// queue's range also holds nested names' keys, which are not members).
const SPARE: i64 = 7;

/// The oldest `count` members of `queue` (every member: `None`), oldest first, at `revision`
/// (0: now), in one linearizable read — or two, if nested names' keys crowded the first page
/// (then every key is read). Returns them and the revision the read saw.
pub(crate) async fn oldest(
    rpc: &Rpc,
    queue: &Queue,
    revision: i64,
    count: Option<usize>,
) -> Result<(Vec<KeyValue>, i64), Error> {
    let mut limit = count.map(|n| i64::try_from(n).unwrap_or(i64::MAX).saturating_add(SPARE));
    loop {
        let mut opts = queue
            .range()
            .with_sort(SortTarget::Create, SortOrder::Ascend);
        if let Some(limit) = limit {
            opts = opts.with_limit(limit);
        }
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let resp = rpc.get(queue.prefix(), opts).await?;
        // A read at a past revision answers with the current revision in its header: the
        // state it returned is as of `revision`.
        let at = if revision > 0 {
            revision
        } else {
            resp.header().map_or(0, |h| h.revision())
        };
        let wanted = count.unwrap_or(usize::MAX);
        let members: Vec<KeyValue> = resp
            .kvs()
            .iter()
            .filter(|kv| queue.is_member(kv.key()))
            .take(wanted)
            .cloned()
            .collect();
        if members.len() < wanted && resp.more() && limit.take().is_some() {
            continue;
        }
        return Ok((members, at));
    }
}

/// The oldest `count` members of `queue` now (every member: `None`), oldest first, read
/// through `leased`'s request handle (no lease needed).
pub(crate) async fn oldest_members(
    leased: &LeasedSession,
    queue: &Queue,
    count: Option<usize>,
) -> Result<Vec<Holder>, Error> {
    let (members, _) = oldest(&leased.inner().rpc, queue, 0, count).await?;
    Ok(members.iter().map(Holder::from_kv).collect())
}
