//! Looking back into etcd's history.

use etcd_client::{WatchFilterType, WatchOptions};

use super::Waits;
use crate::backoff::Backoff;
use crate::rpc::send::within;
use crate::rpc::{pause, unless_stopped};
use crate::Error;

/// The revision at which the incarnation `create_revision` of `key` was deleted, read from
/// etcd's history (a watch of its deletions from its creation on); `None` if that history was
/// compacted away. For a key known to be gone whose deletion went unanswered. Failures that
/// may succeed again are retried with one backoff until `waits` stops.
pub(crate) async fn deleted_at(
    waits: Waits<'_>,
    key: &str,
    create_revision: i64,
) -> Result<Option<i64>, Error> {
    let rpc = waits.rpc;
    let mut backoff = Backoff::for_requests();
    let opts = WatchOptions::new()
        .with_start_revision(create_revision + 1)
        .with_filters([WatchFilterType::NoPut]);
    loop {
        let found = unless_stopped(waits.stop, async {
            let read = async {
                let mut stream = rpc.open_watch(key, opts.clone()).await?;
                loop {
                    let resp = stream.message().await?.ok_or_else(Error::stream_ended)?;
                    if resp.canceled() {
                        return if resp.compact_revision() > 0 {
                            Ok(None)
                        } else {
                            Err(Error::watch_refused(resp.cancel_reason()))
                        };
                    }
                    if let Some(kv) = resp.events().first().and_then(|e| e.kv()) {
                        return Ok(Some(kv.mod_revision()));
                    }
                }
            };
            within(rpc.timeout(), read).await
        })
        .await;
        match found {
            Err(e) if e.is_retryable() => pause(waits.stop, &mut backoff).await?,
            Err(e) if rpc.watch_refusal_renews(&e) => rpc.renew_auth().await?,
            other => return other,
        }
    }
}
