//! Sending one request: within the request timeout, with one auth renewal, and — for a Txn
//! that only reads — never cancelled in flight.

use etcd_client::proto::{PbTxnOpRequest, PbTxnRequest};
use etcd_client::{
    GetOptions, GetResponse, LeaseGrantOptions, LeaseGrantResponse, LeaseKeepAliveStream,
    LeaseKeeper, LeaseTimeToLiveOptions, LeaseTimeToLiveResponse, Txn, TxnResponse, WatchOptions,
    WatchStream,
};
use tokio::sync::oneshot;

use super::auth::renewing;
use super::stats::Stats;
use super::Rpc;
use crate::Error;

/// Runs `request` with the deadline `limit`: its error converted, or [`Error::Timeout`] if the
/// deadline came first (the request is then dropped: only for requests that may be cancelled).
///
/// The request is boxed before anything else: a client's request future is kilobytes
/// (tonic's, ~2.7 KiB for a get), and an `async fn` keeps its arguments for its whole life
/// beside what it moves them into, so every future that awaits a request — an acquisition
/// nests many — would hold it inline, twice. One allocation per request, beside its round
/// trip; the acquisition that waits in a line is ~5 KiB instead of ~29 KiB.
pub(crate) fn within<T, E, F>(
    limit: std::time::Duration,
    request: F,
) -> impl std::future::Future<Output = Result<T, Error>>
where
    E: Into<Error>,
    F: std::future::Future<Output = Result<T, E>>,
{
    let request = Box::pin(request);
    async move {
        match tokio::time::timeout(limit, request).await {
            Err(_) => Err(Error::Timeout(limit)),
            Ok(answer) => answer.map_err(Into::into),
        }
    }
}

/// The largest answer taken, in bytes: as etcd's Go client (`math.MaxInt32`), not tonic's
/// 4 MiB — etcd sends answers of any size (a page of jobs, the Txn of several claims, each
/// with a payload of up to 1.5 MiB), and an answer refused as too large may be a Txn that
/// applied.
const MAX_ANSWER_BYTES: usize = i32::MAX as usize;

/// How many request timeouts a read-only Txn in flight is left to finish after its caller
/// stopped waiting, before it is cancelled after all.
const ABANDON_AFTER: u32 = 10;

/// Whether a Txn writes: any put, delete or nested Txn that writes, in either branch. etcd
/// sends such a Txn through raft and applies it with a context of its own, so cancelling the
/// request is harmless to the server; a Txn that only reads is applied with the request's
/// context, and etcd before 3.5.5 panics if that is cancelled while it is applied (#14110).
pub(crate) fn writes(txn: &Txn) -> bool {
    fn any_write(request: &PbTxnRequest) -> bool {
        request
            .success
            .iter()
            .chain(&request.failure)
            .filter_map(|op| op.request.as_ref())
            .any(|op| match op {
                PbTxnOpRequest::RequestRange(_) => false,
                PbTxnOpRequest::RequestPut(_) | PbTxnOpRequest::RequestDeleteRange(_) => true,
                PbTxnOpRequest::RequestTxn(nested) => any_write(nested),
            })
    }
    any_write(&PbTxnRequest::from(txn.clone()))
}

impl Rpc {
    /// Sends `txn` once (once more with a fresh token if etcd found the token stale) and
    /// records the revision of its answer. A Txn that writes is cancelled with its caller; one
    /// that only reads runs in a task of this handle, and a caller that gives up (or the
    /// timeout) only stops waiting — the task gives up after [`ABANDON_AFTER`] timeouts.
    pub(crate) async fn txn(&self, txn: Txn) -> Result<TxnResponse, Error> {
        let read_only = !writes(&txn);
        let resp = renewing(self.client(), || self.txn_once(txn.clone(), read_only)).await?;
        if let Some(header) = resp.header() {
            self.saw_revision(header.revision());
        }
        Ok(resp)
    }

    async fn txn_once(&self, txn: Txn, read_only: bool) -> Result<TxnResponse, Error> {
        Stats::add(&self.stats().txns, 1);
        let timeout = self.timeout();
        let mut kv = self
            .client()
            .kv_client()
            .max_decoding_message_size(MAX_ANSWER_BYTES);
        if !read_only {
            return within(timeout, kv.txn(txn)).await;
        }
        let (tx, rx) = oneshot::channel();
        let patience = timeout.saturating_mul(ABANDON_AFTER);
        self.spawn(async move {
            if let Ok(answer) = tokio::time::timeout(patience, kv.txn(txn)).await {
                let _ = tx.send(answer);
            }
        });
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(Error::Timeout(timeout)),
            Ok(Err(_)) => Err(Error::Timeout(patience)),
            Ok(Ok(answer)) => answer.map_err(Error::from),
        }
    }

    /// A range read (cancellable: plain reads are not applied in a Txn).
    pub(crate) async fn get(
        &self,
        key: impl Into<Vec<u8>>,
        options: GetOptions,
    ) -> Result<GetResponse, Error> {
        let key = key.into();
        Stats::add(&self.stats().ranges, 1);
        let resp = renewing(self.client(), || {
            let (mut kv, key, options) = (
                self.client()
                    .kv_client()
                    .max_decoding_message_size(MAX_ANSWER_BYTES),
                key.clone(),
                options.clone(),
            );
            async move { within(self.timeout(), kv.get(key, Some(options))).await }
        })
        .await?;
        if let Some(header) = resp.header() {
            self.saw_revision(header.revision());
        }
        Ok(resp)
    }

    /// Grants a lease of `ttl_secs` with the id `id` (0: etcd chooses).
    pub(crate) async fn lease_grant(
        &self,
        ttl_secs: i64,
        id: i64,
    ) -> Result<LeaseGrantResponse, Error> {
        renewing(self.client(), || {
            let mut lease = self.client().lease_client();
            let options = (id != 0).then(|| LeaseGrantOptions::new().with_id(id));
            async move { within(self.timeout(), lease.grant(ttl_secs, options)).await }
        })
        .await
    }

    /// Revokes lease `id`; a lease that is already gone counts as revoked.
    pub(crate) async fn lease_revoke(&self, id: i64) -> Result<(), Error> {
        let revoked = renewing(self.client(), || {
            let mut lease = self.client().lease_client();
            async move { within(self.timeout(), lease.revoke(id)).await }
        })
        .await;
        match revoked {
            Err(e) if e.is_lease_not_found() => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Lease `id`'s remaining TTL (and, with `keys`, the keys attached to it).
    pub(crate) async fn lease_time_to_live(
        &self,
        id: i64,
        keys: bool,
    ) -> Result<LeaseTimeToLiveResponse, Error> {
        renewing(self.client(), || {
            let mut lease = self.client().lease_client();
            let options = keys.then(|| LeaseTimeToLiveOptions::new().with_keys());
            async move { within(self.timeout(), lease.time_to_live(id, options)).await }
        })
        .await
    }

    /// Opens a keep-alive stream of lease `id`, which sends its first refresh; given up after
    /// `limit`.
    pub(crate) async fn lease_keep_alive(
        &self,
        id: i64,
        limit: std::time::Duration,
    ) -> Result<(LeaseKeeper, LeaseKeepAliveStream), Error> {
        Stats::add(&self.stats().keepalive_requests, 1);
        renewing(self.client(), || {
            let mut lease = self.client().lease_client();
            async move { within(limit, lease.keep_alive(id)).await }
        })
        .await
    }

    /// Opens a watch stream with its first watch (its answer comes on the stream). For the
    /// watch layer only.
    pub(crate) async fn open_watch(
        &self,
        key: impl Into<Vec<u8>>,
        options: WatchOptions,
    ) -> Result<WatchStream, Error> {
        Stats::add(&self.stats().watches, 1);
        Stats::add(&self.stats().watch_streams, 1);
        let mut watches = self
            .client()
            .watch_client()
            .max_decoding_message_size(MAX_ANSWER_BYTES);
        within(self.timeout(), watches.watch(key, Some(options))).await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use etcd_client::{Compare, CompareOp, TxnOp};

    /// A request future of 16 KiB: it holds a large local across its await. For every test that
    /// a wrapper above the request layer holds the future it wraps boxed (`within`,
    /// `unless_stopped`, the keep-alive's `before`; `metrics`, below, has its own).
    pub(crate) async fn large_request() -> Result<u8, Error> {
        let pad = [7u8; 16 * 1024];
        tokio::task::yield_now().await;
        Ok(pad[pad.len() - 1])
    }

    #[tokio::test]
    async fn a_request_under_a_deadline_is_held_boxed_not_inline() {
        let request = large_request();
        assert!(std::mem::size_of_val(&request) >= 16 * 1024);
        let limited = within(std::time::Duration::from_secs(10), request);
        let size = std::mem::size_of_val(&limited);
        assert!(
            size < 1024,
            "within's future holds the request inline: {size} bytes"
        );
        assert_eq!(limited.await.unwrap(), 7);
    }

    #[test]
    fn only_txns_without_puts_and_deletes_in_either_branch_are_read_only() {
        let get = || TxnOp::get("k", None);
        assert!(!writes(&Txn::new()));
        assert!(!writes(&Txn::new().and_then([get()]).or_else([get()])));
        assert!(!writes(
            &Txn::new()
                .when([Compare::version("k", CompareOp::Equal, 1)])
                .and_then([TxnOp::txn(Txn::new().and_then([get()]))])
        ));
        assert!(writes(&Txn::new().and_then([TxnOp::put("k", "v", None)])));
        assert!(writes(&Txn::new().or_else([TxnOp::delete("k", None)])));
        assert!(writes(&Txn::new().and_then([TxnOp::txn(
            Txn::new().or_else([TxnOp::put("k", "v", None)])
        )])));
    }
}
