//! What keeps a [`Registration`](super::Registration) registered: a fresh session and its key
//! (or a resumed one), and the task that registers again when either ends.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use etcd_client::{Client, PutOptions, TxnOp};
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;

use super::{Held, Inner, RegistrationState, REREGISTER_BACKOFF};
use crate::backoff::Backoff;
use crate::engine::{self, Fence, Holding};
use crate::{Error, LeasedSession, SessionOptions};

pub(super) fn registered(held: &Held, generation: u64) -> RegistrationState {
    RegistrationState::Registered {
        lease_id: held.session.lease_id(),
        create_revision: held.holding.fence().fencing_token(),
        generation,
    }
}

/// A fenced put of the registration's value, keeping the key's lease.
pub(in crate::discovery) async fn write(held: &Held, key: &str, json: String) -> Result<(), Error> {
    let put = TxnOp::put(
        key,
        json,
        Some(PutOptions::new().with_lease(held.session.lease_id())),
    );
    held.holding.fence().txn_if_owner([put]).await.map(|_| ())
}

/// A fresh session and the key created under it, or why not.
pub(super) async fn establish(
    client: &Client,
    key: &str,
    json: &str,
    options: &SessionOptions,
) -> Result<Held, Error> {
    // In a task of its own: if this future is dropped while the grant is under way, the task
    // still gets the session and drops it, which revokes the lease.
    let session = tokio::spawn(LeasedSession::new(client.clone(), options.clone()))
        .await
        .map_err(|e| Error::Internal(format!("the session's creation task failed: {e}")))??;
    match engine::create_exclusive(&session, key, json.to_owned()).await? {
        Some(acquired) => Ok(Held {
            holding: Holding::new(session.clone(), acquired),
            session,
        }),
        // The unused session is dropped here, which revokes its lease.
        None => Err(Error::AlreadyHeld {
            key: key.to_owned(),
        }),
    }
}

/// The lease `lease_id` adopted and `key` on it taken back, its value set to `json` (fenced)
/// if it differs, or why not.
pub(super) async fn readopt(
    client: Client,
    key: String,
    json: String,
    lease_id: i64,
    options: SessionOptions,
) -> Result<Held, Error> {
    let session = LeasedSession::resume(client, lease_id, options).await?;
    match take_back(&session, &key, json).await? {
        Some(held) => Ok(held),
        None => {
            // Not ours to end: whoever holds this lease keeps it; it ends on its TTL otherwise.
            session.orphan();
            Err(Error::NotOnLease { key, lease_id })
        }
    }
}

/// `key` taken back from `session`'s lease, its value set to `json` (fenced) if it differs;
/// `None` if the key is not on that lease.
pub(in crate::discovery) async fn take_back(
    session: &LeasedSession,
    key: &str,
    json: String,
) -> Result<Option<Held>, Error> {
    let Some((acquired, value)) = engine::adopt_on_lease(session, key).await? else {
        return Ok(None);
    };
    let held = Held {
        holding: Holding::new(session.clone(), acquired),
        session: session.clone(),
    };
    if value != json.as_bytes() {
        write(&held, key, json).await?;
    }
    Ok(Some(held))
}

/// Watches the registration; when it ends (session lost, key gone), registers again.
pub(super) async fn supervise(inner: Arc<Inner>, stop: CancellationToken) {
    let mut backoff = Backoff::new(REREGISTER_BACKOFF.0, REREGISTER_BACKOFF.1);
    loop {
        let watched = {
            let current = inner.current.lock().await;
            current
                .held
                .as_ref()
                .map(|h| (h.session.clone(), h.holding.fence().clone()))
        };
        let mut reason = match watched {
            Some((session, fence)) => {
                let ended = ended(&session, &fence);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    why = ended => why,
                }
            }
            None => "not registered".to_owned(),
        };
        tracing::warn!(key = %inner.key, %reason, "registration ended; registering again");
        // Dropping the old holding and session deletes the key if it is still ours and revokes
        // the old lease, in the old session's task.
        inner.current.lock().await.held = None;
        let mut attempts = 0;
        loop {
            attempts += 1;
            inner.state.send_replace(RegistrationState::Reregistering {
                reason: reason.clone(),
                attempts,
            });
            let json = inner.current.lock().await.endpoint.to_json();
            let attempt = tokio::select! {
                _ = stop.cancelled() => return,
                r = establish(&inner.client, &inner.key, &json, &inner.options) => r,
            };
            let attempt = match attempt {
                Ok(held) => {
                    let current = inner.current.lock().await;
                    // An update() while we were registering: register what it asked for. If
                    // that write fails, this attempt failed: the key (with the old endpoint) is
                    // deleted and the lease revoked as `held` is dropped, and the next attempt
                    // registers the new endpoint.
                    let wanted = current.endpoint.to_json();
                    let written = if wanted == json {
                        Ok(())
                    } else {
                        write(&held, &inner.key, wanted).await
                    };
                    match written {
                        Ok(()) => Ok((held, current)),
                        Err(e) => Err(format!(
                            "could not apply an update made while re-registering: {e}"
                        )),
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            match attempt {
                Ok((held, mut current)) => {
                    let generation = inner.generation.fetch_add(1, Ordering::Relaxed) + 1;
                    inner.state.send_replace(registered(&held, generation));
                    current.held = Some(held);
                    tracing::info!(key = %inner.key, generation, "registered again");
                    backoff.reset();
                    break;
                }
                Err(why) => {
                    tracing::debug!(key = %inner.key, reason = %why, attempts, "re-registration failed");
                    reason = why;
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }
}

/// Completes when the registration held by `session` and `fence` ends, saying why.
fn ended(session: &LeasedSession, fence: &Fence) -> impl Future<Output = String> + Send + 'static {
    let (session_lost, key_lost) = (session.lost(), fence.lost());
    async move {
        tokio::select! {
            reason = session_lost => format!("session lost: {reason}"),
            e = key_lost => e.to_string(),
        }
    }
}
