//! [`Semaphore`]: N permits, FIFO, fenced, cancel-safe.

use std::sync::Arc;

use crate::engine::{holding_guard, inspect, measure, Blocker, Holder, Line};
use crate::keys::{Layout, Named, Queue};
use crate::metrics::AcquisitionKind;
#[cfg(doc)]
use crate::Fence;
use crate::{Error, LeasedSession};

/// Where a semaphore's keys go: `<name>/#semaphore/`.
pub(crate) const KIND: &str = "semaphore";

/// A distributed counting semaphore with `permits` permits, served in FIFO order.
///
/// Each acquisition puts its own key under the session's lease; it holds a permit while fewer
/// than `permits` keys created before its own remain — whichever holders leave, in any order.
/// A waiter that saw at most 8 keys ahead of it counts their deletions, and holds once fewer
/// than `permits` of them are left: no read. Behind a longer queue, the first waiter watches
/// every holder's key (one watch of the queue's deletions) and goes through as soon as any of
/// them is deleted; every other waiter watches only the waiter just ahead of it, which touches
/// its own key when it goes through. A release therefore wakes the counting waiters (at most
/// 8) and, behind them, at most one waiter moved up: never a herd. With one permit it is a
/// mutex.
///
/// Every handle on the same name must use the same number of permits, and every process the
/// same build of this crate (docs/production.md, "Upgrading this crate"). The keys live under
/// `<name>/#semaphore/`: this crate's own layout (etcd's Go recipes use another), independent
/// of a [`Mutex`](crate::Mutex) or any other kind of the same name.
///
/// # Example
/// ```no_run
/// # async fn demo() -> Result<(), etcd_coord::Error> {
/// use etcd_coord::{LeasedSession, Semaphore, SessionOptions};
///
/// let client = etcd_client::Client::connect(["127.0.0.1:2379"], None).await?;
/// let session = LeasedSession::new(client, SessionOptions::new()).await?;
/// let downloads = Semaphore::new(&session, "limits/downloads", 3);
/// let permit = downloads.acquire().await?; // at most 3 holders across the fleet
/// permit.release().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Semaphore {
    session: LeasedSession,
    /// Shared by its clones and by the permits it hands out (each keeps its handle, to
    /// `requeue()`).
    named: Arc<Named>,
    permits: usize,
}

impl Semaphore {
    /// A handle on the semaphore `name` with `permits` permits. Does no I/O; an invalid name or
    /// zero permits is reported by the operations.
    pub fn new(session: &LeasedSession, name: impl Into<String>, permits: usize) -> Semaphore {
        Semaphore {
            session: session.clone(),
            named: Arc::new(Named::new(name, Layout::Own(KIND))),
            permits,
        }
    }

    /// The semaphore's name.
    pub fn name(&self) -> &str {
        self.named.name()
    }

    /// The number of permits.
    pub fn permits(&self) -> usize {
        self.permits
    }

    /// The queue and what blocks an acquisition in it, or why the name or the number of
    /// permits is not acceptable.
    /// A place among the permits' holders and waiters.
    fn line(&self) -> Result<Line<'_>, Error> {
        let (queue, blocker) = self.queue()?;
        Ok(Line::new(&self.session, queue, "", blocker))
    }

    fn queue(&self) -> Result<(&Queue, Blocker), Error> {
        let queue = self.named.queue()?;
        let blocker = Blocker::over(queue, self.permits).map_err(|e| match e {
            Error::InvalidArgument(why) => Error::InvalidArgument(format!("semaphore: {why}")),
            other => other,
        })?;
        Ok((queue, blocker))
    }

    /// Waits for a permit.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an invalid name or zero permits;
    /// [`Error::SessionLost`] / [`Error::SessionClosed`] if the session is or becomes Lost;
    /// [`Error::LockLost`] if the waiter's key is deleted while it waits.
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future at any point leaves no key behind.
    #[tracing::instrument(name = "etcd_coord.semaphore.acquire", skip_all, fields(name = %self.name(), permits = self.permits, lease = %format_args!("{:x}", self.session.lease_id()), fencing_token = tracing::field::Empty))]
    pub async fn acquire(&self) -> Result<SemaphorePermit, Error> {
        let acquire = async { self.line()?.acquire(Vec::new()).await };
        let holding = measure::measured!(AcquisitionKind::Semaphore, self.name(), acquire)?;
        Ok(SemaphorePermit::from_holding(holding, self.clone()))
    }

    /// Takes a permit if one is free and nobody waits, else `None` (leaving no key behind).
    ///
    /// # Errors
    /// As [`acquire()`](Self::acquire), but never waits.
    ///
    /// # Cancel safety
    /// Cancel-safe, as [`acquire()`](Self::acquire).
    #[tracing::instrument(name = "etcd_coord.semaphore.try_acquire", skip_all, fields(name = %self.name(), permits = self.permits, lease = %format_args!("{:x}", self.session.lease_id()), fencing_token = tracing::field::Empty))]
    pub async fn try_acquire(&self) -> Result<Option<SemaphorePermit>, Error> {
        let attempt = async { self.line()?.try_acquire(Vec::new()).await };
        let got = measure::attempted!(AcquisitionKind::Semaphore, self.name(), attempt)?;
        Ok(got.map(|holding| SemaphorePermit::from_holding(holding, self.clone())))
    }
    /// Who holds the permits now, oldest first: at most [`permits()`](Self::permits) holders
    /// (the oldest keys; everyone behind them waits). One linearizable read; the answer may be
    /// stale by the time it is used.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an invalid name or zero permits (nothing is sent);
    /// [`Error::Timeout`], [`Error::Etcd`], [`Error::PermissionDenied`] if the read fails (it
    /// is not retried).
    ///
    /// # Cancel safety
    /// Only reads: dropping the future changes nothing.
    #[tracing::instrument(name = "etcd_coord.semaphore.holders", skip_all, fields(name = %self.name()))]
    pub async fn holders(&self) -> Result<Vec<Holder>, Error> {
        let (queue, _) = self.queue()?;
        inspect::oldest_members(&self.session, queue, Some(self.permits)).await
    }

    /// Takes back the permit (or the place in line) that an earlier process held under this
    /// session's lease — a session made with [`LeasedSession::resume`] — given the permit's
    /// [`key()`](Fence::key) and [`fencing_token()`](Fence::fencing_token) that process saved.
    /// Only that very key, created at that revision and still on this lease, is taken back:
    /// it keeps its place, so it still counts against the permits while it is being resumed
    /// and a waiter behind it stays blocked. If the key was still waiting, this waits like
    /// [`acquire()`](Self::acquire) from its place.
    ///
    /// # Errors
    /// [`Error::LockLost`] if the key is gone (the lease ended, it was released, or it was
    /// deleted as a leftover once the session's adoption window was over: see
    /// [`LeasedSession::resume`]) or is another incarnation; [`Error::InvalidArgument`] if
    /// `key` is not a permit key of this semaphore made under this session's lease, or for
    /// zero permits (nothing is sent); as [`acquire()`](Self::acquire) otherwise.
    ///
    /// # Cancel safety
    /// As [`acquire()`](Self::acquire) once the key is confirmed ours: dropping the future
    /// while it waits deletes the key (fenced), as for any waiter that gives up. Dropped before its first read confirmed the key (still the
    /// incarnation of `fencing_token` on this lease), it leaves the key as it was: it is
    /// nobody's, and the resumed session's rule deletes it once the adoption window ends
    /// ([`LeasedSession::resume`](crate::LeasedSession::resume)) unless it is taken back by then.
    ///
    /// # Example
    /// ```no_run
    /// # async fn demo(client: etcd_client::Client) -> Result<(), etcd_coord::Error> {
    /// use etcd_coord::{LeasedSession, Semaphore, SessionOptions};
    ///
    /// let session = LeasedSession::new(client.clone(), SessionOptions::new()).await?;
    /// let permit = Semaphore::new(&session, "limits/gpu", 2).acquire().await?;
    /// let (key, token) = (permit.key().to_owned(), permit.fencing_token());
    /// let lease_id = session.orphan(); // or the process dies: the TTL is the deadline
    /// drop(permit); // releases nothing: the session is orphaned
    ///
    /// // The next process, within the TTL:
    /// let session = LeasedSession::resume(client, lease_id, SessionOptions::new()).await?;
    /// let permit = Semaphore::new(&session, "limits/gpu", 2).resume(&key, token).await?;
    /// assert_eq!(permit.fencing_token(), token);
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(name = "etcd_coord.semaphore.resume", skip_all, fields(name = %self.name(), lease = %format_args!("{:x}", self.session.lease_id()), fencing_token))]
    pub async fn resume(&self, key: &str, fencing_token: i64) -> Result<SemaphorePermit, Error> {
        let adopt = async { self.line()?.adopt(key, fencing_token).await };
        let holding = measure::measured!(AcquisitionKind::Semaphore, self.name(), adopt)?;
        Ok(SemaphorePermit::from_holding(holding, self.clone()))
    }
}

holding_guard! {
    /// One permit of a [`Semaphore`]. Releases when dropped (in the background, through the
    /// session's task) or deterministically with [`release()`](Self::release). Dereferences to
    /// its [`Fence`] ([`fencing_token()`](Fence::fencing_token), [`lost()`](Fence::lost), …).
    #[must_use = "dropping a SemaphorePermit releases it at once"]
    pub struct SemaphorePermit {
        semaphore: Semaphore,
    };
}

impl SemaphorePermit {
    /// Releases this permit and lines up for one again, in one write — as
    /// [`MutexGuard::requeue`](crate::MutexGuard::requeue) does for a mutex: the waiters
    /// already in line go first (the first of them holds a permit from the Txn's revision on,
    /// as after a release), and the returned permit is held once fewer than
    /// [`permits()`](Semaphore::permits) keys are ahead of it, with a larger
    /// [`fencing_token()`](Fence::fencing_token). With nobody waiting it holds again at once,
    /// after one round trip.
    ///
    /// # Errors
    /// [`Error::LockLost`] for this permit's key if it was lost before the call (nothing is
    /// queued); afterwards as [`Semaphore::acquire`]. Whatever the outcome, this permit is
    /// released.
    ///
    /// # Cancel safety
    /// Cancel-safe, as [`MutexGuard::requeue`](crate::MutexGuard::requeue): no key is left
    /// behind at any point, and the permit is released whenever the future is dropped.
    ///
    /// # Example
    /// ```no_run
    /// # async fn demo(session: etcd_coord::LeasedSession) -> Result<(), etcd_coord::Error> {
    /// use etcd_coord::Semaphore;
    ///
    /// let mut permit = Semaphore::new(&session, "limits/exports", 2).acquire().await?;
    /// for batch in 0..3 {
    ///     println!("batch {batch} under token {}", permit.fencing_token());
    ///     permit = permit.requeue().await?; // whoever waits for a permit goes first
    /// }
    /// permit.release().await?;
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(name = "etcd_coord.semaphore.requeue", skip_all, fields(name = %self.semaphore.name(), permits = self.semaphore.permits, lease = %format_args!("{:x}", self.session().lease_id()), released_token = self.fencing_token(), fencing_token = tracing::field::Empty))]
    pub async fn requeue(self) -> Result<SemaphorePermit, Error> {
        let SemaphorePermit { holding, semaphore } = self;
        let requeue = async { semaphore.line()?.requeue(holding, Vec::new()).await };
        let holding = measure::measured!(AcquisitionKind::Semaphore, semaphore.name(), requeue)?;
        Ok(SemaphorePermit::from_holding(holding, semaphore))
    }
}
