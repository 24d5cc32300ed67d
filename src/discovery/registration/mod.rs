//! Registrations: one endpoint's key under a lease, kept registered for as long as the
//! registration lives.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use tokio::sync::{watch, Mutex as AsyncMutex};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod supervise;

use super::endpoint::Endpoint;
use super::registration_key;
use crate::engine::Holding;
use crate::{Error, LeasedSession, SessionOptions};

/// Where a [`Registration`] stands, from [`Registration::state`] and
/// [`Registration::subscribe`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistrationState {
    /// The key exists, under a lease this registration keeps alive.
    Registered {
        /// The lease the key is attached to.
        lease_id: i64,
        /// The key's create revision (it changes with every re-registration).
        create_revision: i64,
        /// How many times the endpoint has been registered so far (1 for the first).
        generation: u64,
    },
    /// The registration's session was lost (or its key was deleted or taken over): it is
    /// registering again with a fresh session, after a jittered backoff between attempts.
    Reregistering {
        /// Why the last registration ended, or why the last attempt failed.
        reason: String,
        /// Attempts so far (the one under way included).
        attempts: u32,
    },
    /// Deregistered (by [`Registration::deregister`] or by dropping it). Final.
    Deregistered,
}

/// Shortest and longest wait between re-registration attempts.
pub(super) const REREGISTER_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(5));

/// Keeps one endpoint registered — key `<target>/<addr>` (or another suffix), value Go's
/// `endpoints.Update` JSON — for as long as it lives, on a [`LeasedSession`] of its own.
///
/// When that session is lost (a partition longer than its TTL, a lease revoked by someone
/// else) or the key is deleted or taken over, it registers again with a fresh session, with a
/// jittered backoff between attempts, for as long as it lives; [`subscribe`](Self::subscribe)
/// shows when. Between the loss and the new registration the endpoint is absent: views see a
/// removal, then an addition.
///
/// ```no_run
/// use std::time::Duration;
/// use etcd_coord::discovery::{Endpoint, Registration, RegistrationState};
/// use etcd_coord::SessionOptions;
///
/// # async fn demo(client: etcd_client::Client) -> Result<(), etcd_coord::Error> {
/// let registration = Registration::register(
///     client,
///     "services/greeter",
///     Endpoint::new("10.0.0.7:50051"),
///     SessionOptions::new().with_ttl(Duration::from_secs(10)),
/// )
/// .await?;
/// assert_eq!(registration.key(), "services/greeter/10.0.0.7:50051");
/// let mut states = registration.subscribe();
/// tokio::spawn(async move {
///     while states.changed().await.is_ok() {
///         if let RegistrationState::Reregistering { reason, .. } = &*states.borrow() {
///             eprintln!("registering again: {reason}");
///         }
///     }
/// });
/// registration
///     .update(Endpoint::new("10.0.0.7:50051").with_metadata(serde_json::json!({"weight": 2})))
///     .await?;
/// registration.deregister().await?;
/// # Ok(()) }
/// ```
///
/// # Cancel safety
/// Dropping a `register` future at any point leaves no key and no lease behind (a lease
/// granted for it is revoked in the background). Dropping the registration deregisters in
/// the background: its session revokes its lease (retrying for up to twice its TTL while etcd
/// is unreachable; the TTL is the last backstop) and its task ends. Until that revocation has
/// landed, registering the same key again is [`Error::AlreadyHeld`]; to register it again at
/// once, [`deregister`](Self::deregister) and await it instead of dropping.
#[must_use = "dropping a Registration deregisters the endpoint"]
pub struct Registration {
    inner: Arc<Inner>,
    state: watch::Receiver<RegistrationState>,
    stop: CancellationToken,
    supervisor: Option<JoinHandle<()>>,
}

pub(super) struct Inner {
    client: Client,
    key: String,
    options: SessionOptions,
    current: AsyncMutex<Current>,
    state: watch::Sender<RegistrationState>,
    generation: AtomicU64,
}

/// The endpoint to register and, while registered, what holds its key.
struct Current {
    endpoint: Endpoint,
    held: Option<Held>,
}

pub(super) struct Held {
    pub(super) session: LeasedSession,
    pub(super) holding: Holding,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("key", &self.inner.key)
            .field("state", &*self.state.borrow())
            .finish()
    }
}

impl Registration {
    /// Registers `endpoint` under `<target>/<addr>` with a new session of `options`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad target, an empty address, metadata too large or bad
    /// session options (nothing is sent); [`Error::AlreadyHeld`] if another live registration
    /// owns the key (it is left as it was); [`Error::Timeout`], [`Error::Etcd`],
    /// [`Error::PermissionDenied`] when etcd cannot be reached or refuses.
    ///
    /// # Cancel safety
    /// See the type's documentation: a dropped future leaves nothing behind.
    pub async fn register(
        client: Client,
        target: impl AsRef<str>,
        endpoint: Endpoint,
        options: SessionOptions,
    ) -> Result<Registration, Error> {
        let suffix = endpoint.addr().to_owned();
        Box::pin(Registration::register_with_suffix(
            client, target, suffix, endpoint, options,
        ))
        .await
    }

    /// Like [`register`](Self::register), under the key `<target>/<suffix>` (Go's
    /// `Manager.AddEndpoint` allows any key under `<target>/`).
    ///
    /// # Errors
    /// As [`register`](Self::register); an empty suffix is [`Error::InvalidArgument`].
    ///
    /// # Cancel safety
    /// As [`register`](Self::register).
    #[tracing::instrument(name = "etcd_coord.registration.register", skip_all, fields(target = %target.as_ref(), suffix = %suffix.as_ref()))]
    pub async fn register_with_suffix(
        client: Client,
        target: impl AsRef<str>,
        suffix: impl AsRef<str>,
        endpoint: Endpoint,
        options: SessionOptions,
    ) -> Result<Registration, Error> {
        let key = registration_key(target.as_ref(), suffix.as_ref())?;
        let json = endpoint.validate()?;
        options.validate()?;
        let held = Box::pin(establish(&client, &key, &json, &options)).await?;
        Ok(Registration::supervised(
            client, key, endpoint, options, held,
        ))
    }

    /// Takes back the registration an earlier process kept — `endpoint`'s key under
    /// `<target>/<addr>` on lease `lease_id` (its [`RegistrationState::Registered`]
    /// `lease_id`, saved before it died) — without the endpoint ever disappearing: after a
    /// restart within the TTL the key keeps its create revision, so views see no removal and
    /// no addition (an [`Updated`](super::ViewChange::Updated) if `endpoint` differs from what
    /// is stored: it is written, fenced). The lease is adopted with
    /// [`LeasedSession::resume`] and kept alive from then on; the registration then behaves
    /// exactly like one made by [`register`](Self::register), re-registrations included.
    ///
    /// Without the lease id, [`register`](Self::register) answers [`Error::AlreadyHeld`]
    /// until the dead process's lease expires. Resume only a lease whose earlier owner is
    /// gone (or has stopped refreshing it): this does not — cannot — check that.
    ///
    /// # Errors
    /// [`Error::LeaseNotFound`] if the lease is gone (expired or revoked: register afresh);
    /// [`Error::NotOnLease`] if the lease exists but the key is not on it (the lease is then
    /// left as it was, to end on its TTL — it may be another's); otherwise as
    /// [`register`](Self::register).
    ///
    /// # Cancel safety
    /// Dropping the future leaves nothing this call made: if the lease had been adopted (or
    /// is adopted after the caller left — the adoption runs in a task of its own), it ends
    /// like a dropped registration: the lease is revoked in the background and the key goes
    /// with it. If it was not adopted (the future was never polled, or the adoption failed —
    /// etcd unreachable for longer than the request timeout), the key and the lease are left
    /// as they were and end on the lease's TTL.
    ///
    /// # Example
    /// ```no_run
    /// use etcd_coord::discovery::{Endpoint, Registration, RegistrationState};
    /// use etcd_coord::{Error, SessionOptions};
    ///
    /// # async fn demo(client: etcd_client::Client, saved: Option<i64>) -> Result<(), Error> {
    /// let endpoint = Endpoint::new("10.0.0.7:50051");
    /// let options = SessionOptions::new();
    /// // `saved`: the lease id the previous run of this process wrote down, if any.
    /// let resumed = match saved {
    ///     Some(lease_id) => {
    ///         Registration::resume(client.clone(), "svc", endpoint.clone(), lease_id, options.clone())
    ///             .await
    ///             .map(Some)
    ///     }
    ///     None => Ok(None),
    /// };
    /// let registration = match resumed {
    ///     Ok(Some(registration)) => registration,
    ///     // Nothing to take back: no lease saved, the lease ended, or the key is not on it.
    ///     Ok(None) | Err(Error::LeaseNotFound(_) | Error::NotOnLease { .. }) => {
    ///         Registration::register(client, "svc", endpoint, options).await?
    ///     }
    ///     Err(e) => return Err(e),
    /// };
    /// if let RegistrationState::Registered { lease_id, .. } = registration.state() {
    ///     // write `lease_id` down for the next run
    /// #   let _ = lease_id;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn resume(
        client: Client,
        target: impl AsRef<str>,
        endpoint: Endpoint,
        lease_id: i64,
        options: SessionOptions,
    ) -> Result<Registration, Error> {
        let suffix = endpoint.addr().to_owned();
        Registration::resume_with_suffix(client, target, suffix, endpoint, lease_id, options).await
    }

    /// Like [`resume`](Self::resume), for a registration made with
    /// [`register_with_suffix`](Self::register_with_suffix).
    ///
    /// # Errors
    /// As [`resume`](Self::resume); an empty suffix is [`Error::InvalidArgument`].
    ///
    /// # Cancel safety
    /// As [`resume`](Self::resume).
    #[tracing::instrument(name = "etcd_coord.registration.resume", skip_all, fields(target = %target.as_ref(), suffix = %suffix.as_ref(), lease = %format_args!("{lease_id:x}")))]
    pub async fn resume_with_suffix(
        client: Client,
        target: impl AsRef<str>,
        suffix: impl AsRef<str>,
        endpoint: Endpoint,
        lease_id: i64,
        options: SessionOptions,
    ) -> Result<Registration, Error> {
        options.validate()?;
        let key = registration_key(target.as_ref(), suffix.as_ref())?;
        let json = endpoint.validate()?;
        // In a task of its own, like `establish`: a caller that leaves does not leave a
        // resumed session behind (its drop revokes the lease).
        let resumed = tokio::spawn(readopt(
            client.clone(),
            key.clone(),
            json,
            lease_id,
            options.clone(),
        ));
        let held = resumed
            .await
            .map_err(|e| Error::Internal(format!("the resumption's task failed: {e}")))??;
        Ok(Registration::supervised(
            client, key, endpoint, options, held,
        ))
    }

    /// A registration holding `held`, and its supervising task.
    fn supervised(
        client: Client,
        key: String,
        endpoint: Endpoint,
        options: SessionOptions,
        held: Held,
    ) -> Registration {
        let (state, receiver) = watch::channel(registered(&held, 1));
        let inner = Arc::new(Inner {
            client,
            key,
            options,
            current: AsyncMutex::new(Current {
                endpoint,
                held: Some(held),
            }),
            state,
            generation: AtomicU64::new(1),
        });
        let stop = CancellationToken::new();
        let supervisor = tokio::spawn(supervise(Arc::clone(&inner), stop.clone()));
        Registration {
            inner,
            state: receiver,
            stop,
            supervisor: Some(supervisor),
        }
    }

    /// The key: `<target>/<addr>` (or the suffix given).
    pub fn key(&self) -> &str {
        &self.inner.key
    }

    /// Where the registration stands now.
    pub fn state(&self) -> RegistrationState {
        self.state.borrow().clone()
    }

    /// Every change of [`state`](Self::state) from now on. As with any `tokio::sync::watch`
    /// receiver, do not keep a borrow of it (`borrow()`, `wait_for`'s result) alive across an
    /// `.await`: the registration's task waits for it to publish the next state.
    pub fn subscribe(&self) -> watch::Receiver<RegistrationState> {
        self.state.clone()
    }

    /// How many times the endpoint has been registered (1, plus one per re-registration).
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Relaxed)
    }

    /// Completes when the endpoint is registered (at once if it is).
    ///
    /// # Cancel safety
    /// Only waits: dropping it changes nothing.
    pub async fn registered(&self) {
        let mut rx = self.state.clone();
        let _ = rx
            .wait_for(|s| !matches!(s, RegistrationState::Reregistering { .. }))
            .await;
    }

    /// Changes the registered endpoint (its address or metadata; the key stays). The write is
    /// fenced: it applies only while this registration owns the key. The new endpoint is
    /// also what later re-registrations register, whether or not this write succeeded.
    ///
    /// Called while re-registering, it records the endpoint ([`Error::NotRegistered`]); an
    /// attempt already under way with the old endpoint writes the new one as soon as it has
    /// registered. If that write fails, the attempt counts as failed: its key is deleted and
    /// its lease revoked, [`state`](Self::state) is
    /// [`Reregistering`](RegistrationState::Reregistering) with the failure as its reason, and
    /// the next attempt registers the new endpoint — never `Registered` with another endpoint
    /// than the one asked for.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an empty address or metadata too large (nothing is
    /// changed); [`Error::NotRegistered`] while re-registering (the next registration uses
    /// the new endpoint); [`Error::LockLost`] if the key is gone or is not ours any more (it
    /// is not re-created by this write; the registration registers again);
    /// [`Error::SessionLost`], [`Error::Timeout`], [`Error::Etcd`] otherwise.
    ///
    /// # Cancel safety
    /// The endpoint to register is recorded before the first await; the write itself may or
    /// may not land if the future is dropped (it is fenced either way).
    #[tracing::instrument(name = "etcd_coord.registration.update", skip_all, fields(key = %self.key()))]
    pub async fn update(&self, endpoint: Endpoint) -> Result<(), Error> {
        let json = endpoint.validate()?;
        let mut current = self.inner.current.lock().await;
        current.endpoint = endpoint;
        match &current.held {
            Some(held) => write(held, &self.inner.key, json).await,
            None => Err(Error::NotRegistered {
                key: self.inner.key.clone(),
            }),
        }
    }

    /// Deregisters: stops re-registering, deletes the key (fenced: only if it is still ours)
    /// and revokes the session's lease.
    ///
    /// # Errors
    /// [`Error::LockLost`] if the key was not ours any more (deleted or taken over by someone
    /// else; it is left alone); [`Error::Timeout`] or [`Error::Etcd`] if the delete or the
    /// revocation failed (the lease then ends by its TTL, as nothing refreshes it any more).
    /// Between registrations there is nothing to delete: `Ok`.
    ///
    /// # Cancel safety
    /// If the future is dropped, the registration is dropped with it and deregisters in the
    /// background.
    #[tracing::instrument(name = "etcd_coord.registration.deregister", skip_all, fields(key = %self.key()))]
    pub async fn deregister(mut self) -> Result<(), Error> {
        self.stop.cancel();
        if let Some(supervisor) = self.supervisor.take() {
            let _ = supervisor.await;
        }
        let held = self.inner.current.lock().await.held.take();
        self.inner
            .state
            .send_replace(RegistrationState::Deregistered);
        let Some(Held {
            session,
            mut holding,
        }) = held
        else {
            return Ok(());
        };
        let released = holding.release().await;
        let closed = session.close().await;
        released.map(|_| ())?;
        closed
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // The supervisor ends; the last `Inner` reference drops the holding (a fenced delete
        // handed to the session's task) and the session (which revokes its lease).
        self.stop.cancel();
        self.inner
            .state
            .send_replace(RegistrationState::Deregistered);
    }
}

use supervise::{establish, readopt, registered, supervise};
pub(in crate::discovery) use supervise::{take_back, write};
