//! One consistent read of a target's endpoints: every key under its prefix, in pages, at one
//! revision.

use std::collections::BTreeMap;

use etcd_client::{GetOptions, SortOrder, SortTarget};

use super::endpoint::{decode, Endpoint, Stored};
use crate::keys::prefix_end;
use crate::rpc::Rpc;
use crate::Error;

/// Keys per page of a read: pages are read at one revision, so a read is one snapshot
/// however many endpoints a target has.
const PAGE: i64 = 1000;

/// How often a read restarts because its revision was compacted between pages, before it
/// reports the failure.
const READ_RESTARTS: u32 = 5;

/// One consistent read: the endpoints, the keys whose values are not endpoints, the revision.
pub(super) struct Snapshot {
    pub(super) endpoints: BTreeMap<String, Endpoint>,
    pub(super) malformed: BTreeMap<String, String>,
    pub(super) revision: i64,
}

/// Reads every key under `prefix` at one revision, in pages.
pub(super) async fn read(rpc: &Rpc, prefix: &str) -> Result<Snapshot, Error> {
    let end = prefix_end(prefix.as_bytes());
    let mut restarts = 0;
    'read: loop {
        let mut snapshot = Snapshot {
            endpoints: BTreeMap::new(),
            malformed: BTreeMap::new(),
            revision: 0,
        };
        let mut from = prefix.as_bytes().to_vec();
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(PAGE)
                .with_sort(SortTarget::Key, SortOrder::Ascend);
            if snapshot.revision > 0 {
                opts = opts.with_revision(snapshot.revision);
            }
            let resp = match rpc.get(from.clone(), opts).await {
                Ok(resp) => resp,
                Err(e) if snapshot.revision > 0 && e.is_compacted() && restarts < READ_RESTARTS => {
                    restarts += 1;
                    continue 'read;
                }
                Err(e) => return Err(e),
            };
            if snapshot.revision == 0 {
                snapshot.revision = resp
                    .header()
                    .map(|h| h.revision())
                    .ok_or_else(|| Error::Protocol("a read without a header".into()))?;
            }
            for kv in resp.kvs() {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                match decode(kv.value()) {
                    Ok(Stored::Add(e)) => {
                        snapshot.endpoints.insert(key, e);
                    }
                    Err(e) => {
                        snapshot.malformed.insert(key, e.to_string());
                    }
                }
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(snapshot),
            }
        }
    }
}
