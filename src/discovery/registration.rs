//! Registrations: one endpoint's key under a lease, kept registered for as long as the
//! registration lives.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, PutOptions, TxnOp};
use tokio::sync::{watch, Mutex as AsyncMutex};
use tokio::task::JoinHandle;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;

use super::endpoint::Endpoint;
use super::registration_key;
use crate::backoff::Backoff;
use crate::engine::{self, Fence, Holding};
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
const REREGISTER_BACKOFF: (Duration, Duration) =
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

struct Inner {
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

struct Held {
    session: LeasedSession,
    holding: Holding,
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
        let key = registration_key(target.as_ref(), endpoint.addr())?;
        Registration::register_key(client, key, endpoint, options).await
    }

    /// Like [`register`](Self::register), under the key `<target>/<suffix>` (Go's
    /// `Manager.AddEndpoint` allows any key under `<target>/`).
    ///
    /// # Errors
    /// As [`register`](Self::register); an empty suffix is [`Error::InvalidArgument`].
    ///
    /// # Cancel safety
    /// As [`register`](Self::register).
    pub async fn register_with_suffix(
        client: Client,
        target: impl AsRef<str>,
        suffix: impl AsRef<str>,
        endpoint: Endpoint,
        options: SessionOptions,
    ) -> Result<Registration, Error> {
        let key = registration_key(target.as_ref(), suffix.as_ref())?;
        Registration::register_key(client, key, endpoint, options).await
    }

    async fn register_key(
        client: Client,
        key: String,
        endpoint: Endpoint,
        options: SessionOptions,
    ) -> Result<Registration, Error> {
        let json = endpoint.validate()?;
        options.validate()?;
        let held = establish(&client, &key, &json, &options).await?;
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
        let key = registration_key(target.as_ref(), endpoint.addr())?;
        Registration::resume_key(client, key, endpoint, lease_id, options).await
    }

    /// Like [`resume`](Self::resume), for a registration made with
    /// [`register_with_suffix`](Self::register_with_suffix).
    ///
    /// # Errors
    /// As [`resume`](Self::resume); an empty suffix is [`Error::InvalidArgument`].
    ///
    /// # Cancel safety
    /// As [`resume`](Self::resume).
    pub async fn resume_with_suffix(
        client: Client,
        target: impl AsRef<str>,
        suffix: impl AsRef<str>,
        endpoint: Endpoint,
        lease_id: i64,
        options: SessionOptions,
    ) -> Result<Registration, Error> {
        let key = registration_key(target.as_ref(), suffix.as_ref())?;
        Registration::resume_key(client, key, endpoint, lease_id, options).await
    }

    async fn resume_key(
        client: Client,
        key: String,
        endpoint: Endpoint,
        lease_id: i64,
        options: SessionOptions,
    ) -> Result<Registration, Error> {
        let json = endpoint.validate()?;
        options.validate()?;
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
            .map_err(|e| Error::Protocol(format!("the resumption failed: {e}")))??;
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

fn registered(held: &Held, generation: u64) -> RegistrationState {
    RegistrationState::Registered {
        lease_id: held.session.lease_id(),
        create_revision: held.holding.fence().fencing_token(),
        generation,
    }
}

/// A fenced put of the registration's value, keeping the key's lease.
async fn write(held: &Held, key: &str, json: String) -> Result<(), Error> {
    let put = TxnOp::put(
        key,
        json,
        Some(PutOptions::new().with_lease(held.session.lease_id())),
    );
    held.holding.fence().txn_if_owner([put]).await.map(|_| ())
}

/// A fresh session and the key created under it, or why not.
async fn establish(
    client: &Client,
    key: &str,
    json: &str,
    options: &SessionOptions,
) -> Result<Held, Error> {
    // In a task of its own: if this future is dropped while the grant is under way, the task
    // still gets the session and drops it, which revokes the lease.
    let session = tokio::spawn(LeasedSession::new(client.clone(), options.clone()))
        .await
        .map_err(|e| Error::Protocol(format!("the session's creation failed: {e}")))??;
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
async fn readopt(
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
async fn take_back(
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
async fn supervise(inner: Arc<Inner>, stop: CancellationToken) {
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
        let key = registration_key(target.as_ref(), endpoint.addr())?;
        SessionRegistration::register_key(session, key, endpoint).await
    }

    /// Like [`register`](Self::register), under the key `<target>/<suffix>`.
    ///
    /// # Errors
    /// As [`register`](Self::register).
    ///
    /// # Cancel safety
    /// As [`register`](Self::register).
    pub async fn register_with_suffix(
        session: &LeasedSession,
        target: impl AsRef<str>,
        suffix: impl AsRef<str>,
        endpoint: Endpoint,
    ) -> Result<SessionRegistration, Error> {
        let key = registration_key(target.as_ref(), suffix.as_ref())?;
        SessionRegistration::register_key(session, key, endpoint).await
    }

    async fn register_key(
        session: &LeasedSession,
        key: String,
        endpoint: Endpoint,
    ) -> Result<SessionRegistration, Error> {
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
        let key = registration_key(target.as_ref(), endpoint.addr())?;
        SessionRegistration::resume_key(session, key, endpoint).await
    }

    /// Like [`resume`](Self::resume), under the key `<target>/<suffix>`.
    ///
    /// # Errors
    /// As [`resume`](Self::resume).
    ///
    /// # Cancel safety
    /// As [`resume`](Self::resume).
    pub async fn resume_with_suffix(
        session: &LeasedSession,
        target: impl AsRef<str>,
        suffix: impl AsRef<str>,
        endpoint: Endpoint,
    ) -> Result<SessionRegistration, Error> {
        let key = registration_key(target.as_ref(), suffix.as_ref())?;
        SessionRegistration::resume_key(session, key, endpoint).await
    }

    async fn resume_key(
        session: &LeasedSession,
        key: String,
        endpoint: Endpoint,
    ) -> Result<SessionRegistration, Error> {
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
    pub async fn deregister(mut self) -> Result<(), Error> {
        self.held.holding.release().await.map(|_| ())
    }
}
