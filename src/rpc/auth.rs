//! Renewing the client's auth token: the one place requests survive token expiry and changes
//! of users or roles.

use std::future::Future;
use std::sync::Mutex as StdMutex;
use std::time::{Duration, Instant};

use crate::Error;

/// Fetches a fresh auth token for `client` (a no-op for a client without credentials).
pub(crate) async fn renew(client: &etcd_client::Client) -> Result<(), Error> {
    tracing::debug!("renewing the client's auth token");
    // Boxed: every request's future would otherwise hold a token request inline (`within`).
    Box::pin(client.refresh_token()).await.map_err(Error::from)
}

/// Runs `request()`; if etcd refused it for a stale auth token ([`Error::is_stale_auth`]),
/// renews the token and runs it once more.
pub(crate) async fn renewing<T, F, Fut>(
    client: &etcd_client::Client,
    mut request: F,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    match request().await {
        Err(e) if e.is_stale_auth() => {
            renew(client).await?;
            request().await
        }
        answer => answer,
    }
}

/// Lets a refused watch renew the auth token at most once per [`Renewal::INTERVAL`]: etcd
/// reports a stale token on a watch as "permission denied", so a denial is believed only if
/// it comes again right after a renewal.
#[derive(Debug, Default)]
pub(crate) struct Renewal(StdMutex<Option<Instant>>);

impl Renewal {
    /// The shortest time between two renewals for refused watches.
    pub(crate) const INTERVAL: Duration = Duration::from_secs(1);

    /// Whether a renewal may happen now; if so, records it.
    pub(crate) fn due(&self) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let due = last.is_none_or(|at| now.duration_since(at) >= Renewal::INTERVAL);
        if due {
            *last = Some(now);
        }
        due
    }
}
