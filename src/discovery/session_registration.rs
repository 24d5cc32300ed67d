//! [`SessionRegistration`]: an endpoint registered inside a session you already have.

use std::future::Future;

use super::endpoint::Endpoint;
use super::registration::{take_back, write, Held};
use super::registration_key;
#[cfg(doc)]
use super::Registration;
use crate::engine::{self, Fence, Holding};
use crate::{Error, LeasedSession};

/// An endpoint registered inside a [`LeasedSession`] you already have: the key is attached to
/// that session's lease and lives as long as the session and this guard. Unlike
/// [`Registration`] it is **not** registered again when the session is lost — it ends with
/// the session ([`lost`](Self::lost) tells when); create a new session and register again if
/// you want that.
///
/// ```no_run
/// use etcd_coord::discovery::{Endpoint, SessionRegistration};
///
/// # async fn demo(session: etcd_coord::LeasedSession) -> Result<(), etcd_coord::Error> {
/// let registration =
///     SessionRegistration::register(&session, "services/greeter", Endpoint::new("10.0.0.7:50051")).await?;
/// tokio::select! {
///     e = registration.lost() => eprintln!("deregistered: {e}"),
///     _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
/// }
/// registration.deregister().await?;
/// # Ok(()) }
/// ```
///
/// # Cancel safety
/// Dropping a `register` future leaves no key behind; dropping the guard deletes the key
/// (fenced) in the session's background task.
#[must_use = "dropping a SessionRegistration deregisters the endpoint"]
pub struct SessionRegistration {
    held: Held,
}

impl std::fmt::Debug for SessionRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRegistration")
            .field("key", &self.key())
            .field("lease_id", &self.held.session.lease_id())
            .finish()
    }
}

impl SessionRegistration {
    /// Registers `endpoint` under `<target>/<addr>`, attached to `session`'s lease.
    ///
    /// # Errors
    /// As [`Registration::register`]; also [`Error::SessionLost`] / [`Error::SessionClosed`]
    /// if the session is not alive. A second registration of the same key through the same
    /// session is [`Error::AlreadyHeld`] too — also one made at the same time — for as long as
    /// the first is under way or registered (until its deregistration's delete is answered;
    /// nothing is sent).
    ///
    /// # Cancel safety
    /// A dropped future leaves no key behind.
    pub async fn register(
        session: &LeasedSession,
        target: impl AsRef<str>,
        endpoint: Endpoint,
    ) -> Result<SessionRegistration, Error> {
        let suffix = endpoint.addr().to_owned();
        SessionRegistration::register_with_suffix(session, target, suffix, endpoint).await
    }

    /// Like [`register`](Self::register), under the key `<target>/<suffix>`.
    ///
    /// # Errors
    /// As [`register`](Self::register).
    ///
    /// # Cancel safety
    /// As [`register`](Self::register).
    #[tracing::instrument(name = "etcd_coord.registration.register", skip_all, fields(target = %target.as_ref(), suffix = %suffix.as_ref(), lease = %format_args!("{:x}", session.lease_id())))]
    pub async fn register_with_suffix(
        session: &LeasedSession,
        target: impl AsRef<str>,
        suffix: impl AsRef<str>,
        endpoint: Endpoint,
    ) -> Result<SessionRegistration, Error> {
        let key = registration_key(target.as_ref(), suffix.as_ref())?;
        let json = endpoint.validate()?;
        match engine::create_exclusive(session, &key, json).await? {
            Some(acquired) => Ok(SessionRegistration {
                held: Held {
                    holding: Holding::new(session.clone(), acquired),
                    session: session.clone(),
                },
            }),
            None => Err(Error::AlreadyHeld { key }),
        }
    }

    /// Takes back the registration of `endpoint` (key `<target>/<addr>`) that an earlier
    /// process made on `session`'s lease — a session made with [`LeasedSession::resume`] —
    /// keeping the key's create revision; the endpoint is written (fenced) only if it differs
    /// from what is stored. See [`Registration::resume`].
    ///
    /// # Errors
    /// [`Error::NotOnLease`] if the key is not on the session's lease (nothing is changed) —
    /// also once the session's adoption window is over and its rule for keys nobody took back
    /// has condemned it (see [`LeasedSession::resume`]); otherwise as
    /// [`register`](Self::register).
    ///
    /// # Cancel safety
    /// Dropping the future leaves the key as it was (a key not taken back, which the resumed
    /// session deletes once its adoption window is over), or (once taken back) hands its
    /// fenced delete to the session's task, like a dropped registration.
    ///
    /// # Example
    /// ```no_run
    /// # async fn demo(client: etcd_client::Client, lease_id: i64) -> Result<(), etcd_coord::Error> {
    /// use etcd_coord::discovery::{Endpoint, SessionRegistration};
    /// use etcd_coord::{LeasedSession, SessionOptions};
    ///
    /// let session = LeasedSession::resume(client, lease_id, SessionOptions::new()).await?;
    /// let registered =
    ///     SessionRegistration::resume(&session, "svc", Endpoint::new("10.0.0.7:50051")).await?;
    /// # drop(registered); Ok(()) }
    /// ```
    pub async fn resume(
        session: &LeasedSession,
        target: impl AsRef<str>,
        endpoint: Endpoint,
    ) -> Result<SessionRegistration, Error> {
        Self::resume_with_suffix(session, target, endpoint.addr().to_owned(), endpoint).await
    }

    /// Like [`resume`](Self::resume), under the key `<target>/<suffix>`.
    ///
    /// # Errors
    /// As [`resume`](Self::resume).
    ///
    /// # Cancel safety
    /// As [`resume`](Self::resume).
    #[tracing::instrument(name = "etcd_coord.registration.resume", skip_all, fields(target = %target.as_ref(), suffix = %suffix.as_ref(), lease = %format_args!("{:x}", session.lease_id())))]
    pub async fn resume_with_suffix(
        session: &LeasedSession,
        target: impl AsRef<str>,
        suffix: impl AsRef<str>,
        endpoint: Endpoint,
    ) -> Result<SessionRegistration, Error> {
        let key = registration_key(target.as_ref(), suffix.as_ref())?;
        let json = endpoint.validate()?;
        match take_back(session, &key, json).await? {
            Some(held) => Ok(SessionRegistration { held }),
            None => Err(Error::NotOnLease {
                key,
                lease_id: session.lease_id(),
            }),
        }
    }

    /// The key.
    pub fn key(&self) -> &str {
        self.held.holding.fence().key()
    }

    /// The key's fence (its create revision is a fencing token).
    pub fn fence(&self) -> Fence {
        self.held.holding.fence().clone()
    }

    /// Changes the registered endpoint, fenced on the key as [`Registration::update`].
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad endpoint; [`Error::LockLost`] if the key is not
    /// ours any more; [`Error::SessionLost`], [`Error::Timeout`], [`Error::Etcd`] otherwise.
    ///
    /// # Cancel safety
    /// The fenced write may or may not land if the future is dropped.
    #[tracing::instrument(name = "etcd_coord.registration.update", skip_all, fields(key = %self.key()))]
    pub async fn update(&self, endpoint: Endpoint) -> Result<(), Error> {
        let json = endpoint.validate()?;
        write(&self.held, self.key(), json).await
    }

    /// Completes when the registration has ended: the session was lost, or the key was
    /// deleted or taken over.
    pub fn lost(&self) -> impl Future<Output = Error> + Send + 'static {
        let (session_lost, key_lost) = (self.held.session.lost(), self.fence().lost());
        async move {
            tokio::select! {
                reason = session_lost => Error::lost(reason),
                e = key_lost => e,
            }
        }
    }

    /// Deletes the key (fenced); the session lives on.
    ///
    /// # Errors
    /// [`Error::LockLost`] if the key was not ours any more; [`Error::Timeout`] or
    /// [`Error::Etcd`] if the delete failed (the session's task retries it).
    ///
    /// # Cancel safety
    /// If dropped, the guard is dropped too and the session's task deletes the key.
    #[tracing::instrument(name = "etcd_coord.registration.deregister", skip_all, fields(key = %self.key()))]
    pub async fn deregister(mut self) -> Result<(), Error> {
        self.held.holding.release().await.map(|_| ())
    }
}
