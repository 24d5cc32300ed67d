//! A load-balanced tonic channel whose endpoints follow a [`ServiceView`] (feature `tonic`).

use tonic::transport::channel::Change;
use tonic::transport::Channel;

use super::{Endpoint, ServiceView, ViewChange};
use crate::Error;

/// How many endpoint changes may wait for the channel's balancer.
const CHANGE_BUFFER: usize = 64;

/// A load-balanced [`Channel`] (tonic's `Channel::balance_channel`, power-of-two-choices over
/// ready connections) over the endpoints of `view`, following it: an endpoint added to the
/// view is inserted, an updated one replaced, a removed one removed (its connection closed).
/// `build` turns each endpoint into a `tonic::transport::Endpoint` — the place for TLS,
/// timeouts and keep-alive; [`default_tonic_endpoint`] is plain `http://<addr>`. An endpoint
/// `build` rejects is left out (with a `tracing` warning).
///
/// The channel owns the view: a task applies its changes until every clone of the channel is
/// dropped, or the view ends (the channel then keeps its last endpoints). Needs a Tokio
/// runtime.
///
/// ```no_run
/// use std::time::Duration;
/// use etcd_coord::discovery::{balanced_channel, default_tonic_endpoint, Discovery};
///
/// # async fn demo(client: etcd_client::Client) -> Result<(), etcd_coord::Error> {
/// let view = Discovery::new(client, "services/greeter").view().await?;
/// let channel = balanced_channel(view, |e| {
///     Ok(default_tonic_endpoint(e)?.connect_timeout(Duration::from_secs(1)))
/// });
/// // let mut greeter = GreeterClient::new(channel);
/// # drop(channel);
/// # Ok(()) }
/// ```
pub fn balanced_channel<F>(view: ServiceView, build: F) -> Channel
where
    F: Fn(&Endpoint) -> Result<tonic::transport::Endpoint, Error> + Send + 'static,
{
    use futures::StreamExt;

    let (channel, tx) = Channel::balance_channel::<String>(CHANGE_BUFFER);
    let mut changes = view.changes_from_empty();
    tokio::spawn(async move {
        let _view = view;
        loop {
            let change = tokio::select! {
                _ = tx.closed() => return,
                change = changes.next() => change,
            };
            let update = match change {
                None => return,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "the channel's view ended; keeping its last endpoints");
                    return;
                }
                Some(Ok(ViewChange::Added { key, endpoint }))
                | Some(Ok(ViewChange::Updated { key, endpoint, .. })) => match build(&endpoint) {
                    Ok(built) => Change::Insert(key, built),
                    Err(e) => {
                        tracing::warn!(%key, addr = endpoint.addr(), error = %e, "endpoint left out of the channel");
                        Change::Remove(key)
                    }
                },
                Some(Ok(ViewChange::Removed { key, .. })) => Change::Remove(key),
            };
            if tx.send(update).await.is_err() {
                return;
            }
        }
    });
    channel
}

/// `http://<addr>` (or the address itself if it has a scheme) as a
/// `tonic::transport::Endpoint`, with tonic's defaults.
///
/// # Errors
/// [`Error::InvalidArgument`] if that is not a valid URI.
pub fn default_tonic_endpoint(endpoint: &Endpoint) -> Result<tonic::transport::Endpoint, Error> {
    let addr = endpoint.addr();
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    tonic::transport::Endpoint::from_shared(uri)
        .map_err(|e| Error::InvalidArgument(format!("endpoint address {addr:?}: {e}")))
}
