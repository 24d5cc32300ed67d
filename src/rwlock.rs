//! [`RwLock`]: readers share, writers exclude, FIFO with no writer starvation.

use std::sync::Arc;

use crate::engine::{holding_guard, inspect, measure, Blocker, Holder, Holding, Line};
use crate::keys::{Layout, Named};
use crate::metrics::AcquisitionKind;
#[cfg(doc)]
use crate::Fence;
use crate::{Error, LeasedSession};

/// Member-key kinds: readers and writers form their own sub-ranges of one queue.
const READER: &str = "r";
/// Where a read/write lock's keys go: `<name>/#rwlock/`.
pub(crate) const KIND: &str = "rwlock";
const WRITER: &str = "w";

/// A distributed read/write lock, FIFO across readers and writers.
///
/// Readers and writers queue in one create-revision order. A reader waits only for the newest
/// *writer* created before it; a writer waits for the newest key of any kind created before it.
/// So readers overlap, writers exclude everyone, and a waiting writer is never starved by a
/// stream of later readers (they queue behind it). After every wake-up the decision is re-made
/// from a fresh read, so a waiter whose lease is revoked mid-wait can never let two writers in
/// (etcd #16221, where the recipe trusted the wake-up).
///
/// # Example
/// ```no_run
/// # async fn demo() -> Result<(), etcd_coord::Error> {
/// use etcd_coord::{LeasedSession, RwLock, SessionOptions};
///
/// let client = etcd_client::Client::connect(["127.0.0.1:2379"], None).await?;
/// let session = LeasedSession::new(client, SessionOptions::new()).await?;
/// let config = RwLock::new(&session, "locks/config");
/// let reading = config.read().await?; // shared with other readers
/// reading.release().await?;
/// let writing = config.write().await?; // exclusive
/// writing.release().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RwLock {
    session: LeasedSession,
    /// Shared by its clones and by the guards it hands out (each keeps its handle, to
    /// `requeue()`).
    named: Arc<Named>,
}

impl RwLock {
    /// A handle on the read/write lock `name`. Does no I/O; an invalid name is reported by the
    /// operations.
    pub fn new(session: &LeasedSession, name: impl Into<String>) -> RwLock {
        RwLock {
            session: session.clone(),
            named: Arc::new(Named::new(name, Layout::Own(KIND))),
        }
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        self.named.name()
    }

    /// A reader's or a writer's place: a reader waits for the last writer ahead of it, a
    /// writer for the last key of any kind.
    fn line(&self, kind: &'static str) -> Result<Line<'_>, Error> {
        let queue = self.named.queue()?;
        let blocks = if kind == READER { WRITER } else { "" };
        let blocker = Blocker::new(queue.sub(blocks), 1)?;
        Ok(Line::new(&self.session, queue, kind, blocker))
    }

    async fn acquire(&self, kind: &'static str) -> Result<Holding, Error> {
        let acquire = async { self.line(kind)?.acquire(Vec::new()).await };
        measure::measured!(measured(kind), self.name(), acquire)
    }

    async fn requeue(&self, kind: &'static str, holding: Holding) -> Result<Holding, Error> {
        let requeue = async { self.line(kind)?.requeue(holding, Vec::new()).await };
        measure::measured!(measured(kind), self.name(), requeue)
    }

    async fn try_acquire(&self, kind: &'static str) -> Result<Option<Holding>, Error> {
        let attempt = async { self.line(kind)?.try_acquire(Vec::new()).await };
        measure::attempted!(measured(kind), self.name(), attempt)
    }

    async fn resume(
        &self,
        kind: &'static str,
        key: &str,
        fencing_token: i64,
    ) -> Result<Holding, Error> {
        let adopt = async { self.line(kind)?.adopt(key, fencing_token).await };
        measure::measured!(measured(kind), self.name(), adopt)
    }

    /// Waits for shared (read) access.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an invalid name; [`Error::SessionLost`] /
    /// [`Error::SessionClosed`] if the session is or becomes Lost; [`Error::LockLost`] if the
    /// waiter's key is deleted while it waits; [`Error::PermissionDenied`] if etcd's auth
    /// refuses a request.
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future at any point leaves no key behind.
    #[tracing::instrument(name = "etcd_coord.rwlock.read", skip_all, fields(name = %self.name(), lease = %format_args!("{:x}", self.session.lease_id()), fencing_token = tracing::field::Empty))]
    pub async fn read(&self) -> Result<RwLockReadGuard, Error> {
        Ok(RwLockReadGuard::from_holding(
            self.acquire(READER).await?,
            self.clone(),
        ))
    }

    /// Waits for exclusive (write) access.
    ///
    /// # Errors
    /// As [`read()`](Self::read).
    ///
    /// # Cancel safety
    /// Cancel-safe, as [`read()`](Self::read).
    #[tracing::instrument(name = "etcd_coord.rwlock.write", skip_all, fields(name = %self.name(), lease = %format_args!("{:x}", self.session.lease_id()), fencing_token = tracing::field::Empty))]
    pub async fn write(&self) -> Result<RwLockWriteGuard, Error> {
        Ok(RwLockWriteGuard::from_holding(
            self.acquire(WRITER).await?,
            self.clone(),
        ))
    }

    /// Takes shared access if no writer holds or waits, in one round trip; else `None`
    /// (leaving no key behind).
    ///
    /// # Errors
    /// As [`read()`](Self::read), but never waits.
    ///
    /// # Cancel safety
    /// Cancel-safe, as [`read()`](Self::read).
    #[tracing::instrument(name = "etcd_coord.rwlock.try_read", skip_all, fields(name = %self.name(), lease = %format_args!("{:x}", self.session.lease_id()), fencing_token = tracing::field::Empty))]
    pub async fn try_read(&self) -> Result<Option<RwLockReadGuard>, Error> {
        Ok(self
            .try_acquire(READER)
            .await?
            .map(|holding| RwLockReadGuard::from_holding(holding, self.clone())))
    }

    /// Takes exclusive access if nobody holds or waits, in one round trip; else `None`
    /// (leaving no key behind).
    ///
    /// # Errors
    /// As [`read()`](Self::read), but never waits.
    ///
    /// # Cancel safety
    /// Cancel-safe, as [`read()`](Self::read).
    #[tracing::instrument(name = "etcd_coord.rwlock.try_write", skip_all, fields(name = %self.name(), lease = %format_args!("{:x}", self.session.lease_id()), fencing_token = tracing::field::Empty))]
    pub async fn try_write(&self) -> Result<Option<RwLockWriteGuard>, Error> {
        Ok(self
            .try_acquire(WRITER)
            .await?
            .map(|holding| RwLockWriteGuard::from_holding(holding, self.clone())))
    }

    /// Who holds the lock now, oldest first: one writer, or the readers ahead of the first
    /// writer in line (empty if nobody holds). One linearizable read of the whole queue; the
    /// answer may be stale by the time it is used.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an invalid name (nothing is sent); [`Error::Timeout`],
    /// [`Error::Etcd`], [`Error::PermissionDenied`] if the read fails (it is not retried).
    ///
    /// # Cancel safety
    /// Only reads: dropping the future changes nothing.
    #[tracing::instrument(name = "etcd_coord.rwlock.holders", skip_all, fields(name = %self.name()))]
    pub async fn holders(&self) -> Result<Vec<Holder>, Error> {
        let queue = self.named.queue()?;
        let writers = queue.sub(WRITER);
        let is_writer = |h: &Holder| h.key().starts_with(&writers);
        let members = inspect::oldest_members(&self.session, queue, None).await?;
        Ok(match members.first() {
            Some(first) if is_writer(first) => vec![first.clone()],
            _ => members.into_iter().take_while(|h| !is_writer(h)).collect(),
        })
    }

    /// Takes back the shared access (or the place in line) that an earlier process held
    /// under this session's lease — a session made with [`LeasedSession::resume`] — given the
    /// read guard's [`key()`](Fence::key) and [`fencing_token()`](Fence::fencing_token) that
    /// process saved. Only that very reader key, created at that revision and still on this
    /// lease, is taken back; it keeps its place, so writers behind it stay blocked. If it was
    /// still waiting, this waits like [`read()`](Self::read) from its place.
    ///
    /// # Errors
    /// [`Error::LockLost`] if the key is gone (the lease ended, it was released, or it was
    /// deleted as a leftover once the session's adoption window was over: see
    /// [`LeasedSession::resume`]) or is another incarnation; [`Error::InvalidArgument`] if
    /// `key` is not a reader key of this lock made under this session's lease — a writer's
    /// key included (nothing is sent); as [`read()`](Self::read) otherwise.
    ///
    /// # Cancel safety
    /// As [`read()`](Self::read) once the key is confirmed ours: dropping the future while it
    /// waits deletes the key (fenced). Dropped before its first read confirmed the key (still the
    /// incarnation of `fencing_token` on this lease), it leaves the key as it was: it is
    /// nobody's, and the resumed session's rule deletes it once the adoption window ends
    /// ([`LeasedSession::resume`](crate::LeasedSession::resume)) unless it is taken back by then.
    ///
    /// # Example
    /// ```no_run
    /// # async fn demo(client: etcd_client::Client) -> Result<(), etcd_coord::Error> {
    /// use etcd_coord::{LeasedSession, RwLock, SessionOptions};
    ///
    /// let session = LeasedSession::new(client.clone(), SessionOptions::new()).await?;
    /// let reading = RwLock::new(&session, "locks/config").read().await?;
    /// let (key, token) = (reading.key().to_owned(), reading.fencing_token());
    /// let lease_id = session.orphan();
    /// drop(reading); // releases nothing: the session is orphaned
    ///
    /// let session = LeasedSession::resume(client, lease_id, SessionOptions::new()).await?;
    /// let reading = RwLock::new(&session, "locks/config").resume_read(&key, token).await?;
    /// # drop(reading); Ok(()) }
    /// ```
    #[tracing::instrument(name = "etcd_coord.rwlock.resume_read", skip_all, fields(name = %self.name(), lease = %format_args!("{:x}", self.session.lease_id()), fencing_token))]
    pub async fn resume_read(
        &self,
        key: &str,
        fencing_token: i64,
    ) -> Result<RwLockReadGuard, Error> {
        let holding = self.resume(READER, key, fencing_token).await?;
        Ok(RwLockReadGuard::from_holding(holding, self.clone()))
    }

    /// Takes back the exclusive access (or the place in line) that an earlier process held
    /// under this session's lease, as [`resume_read()`](Self::resume_read) does for a reader:
    /// only that very writer key, at that revision and on this lease; readers and writers
    /// behind it stay blocked.
    ///
    /// # Errors
    /// As [`resume_read()`](Self::resume_read), with writer and reader swapped.
    ///
    /// # Cancel safety
    /// As [`write()`](Self::write) once the key is confirmed ours: dropping the future while it
    /// waits deletes the key (fenced). Dropped before its first read confirmed the key (still the
    /// incarnation of `fencing_token` on this lease), it leaves the key as it was: it is
    /// nobody's, and the resumed session's rule deletes it once the adoption window ends
    /// ([`LeasedSession::resume`](crate::LeasedSession::resume)) unless it is taken back by then.
    #[tracing::instrument(name = "etcd_coord.rwlock.resume_write", skip_all, fields(name = %self.name(), lease = %format_args!("{:x}", self.session.lease_id()), fencing_token))]
    pub async fn resume_write(
        &self,
        key: &str,
        fencing_token: i64,
    ) -> Result<RwLockWriteGuard, Error> {
        let holding = self.resume(WRITER, key, fencing_token).await?;
        Ok(RwLockWriteGuard::from_holding(holding, self.clone()))
    }
}

/// The metrics' kind of a member of `kind`.
fn measured(kind: &str) -> AcquisitionKind {
    if kind == READER {
        AcquisitionKind::RwLockRead
    } else {
        AcquisitionKind::RwLockWrite
    }
}

holding_guard! {
    /// Shared access to an [`RwLock`]. Releases when dropped (in the background) or with
    /// [`release()`](Self::release); dereferences to its [`Fence`].
    #[must_use = "dropping an RwLockReadGuard releases it at once"]
    pub struct RwLockReadGuard {
        rwlock: RwLock,
    };
}

impl RwLockReadGuard {
    /// Releases this shared access and lines up for it again, in one write — as
    /// [`MutexGuard::requeue`](crate::MutexGuard::requeue) does for a mutex: whoever is in line
    /// goes first (a writer waiting behind this reader gets in once the other readers ahead
    /// of it are gone), and the returned guard reads once no writer is ahead of it.
    ///
    /// # Errors
    /// As [`MutexGuard::requeue`](crate::MutexGuard::requeue): [`Error::LockLost`] for this
    /// guard's key if it was lost before the call (nothing is queued); afterwards as
    /// [`RwLock::read`]. Whatever the outcome, this guard's access is released.
    ///
    /// # Cancel safety
    /// Cancel-safe, as [`MutexGuard::requeue`](crate::MutexGuard::requeue): no key is left
    /// behind at any point.
    #[tracing::instrument(name = "etcd_coord.rwlock.requeue_read", skip_all, fields(name = %self.rwlock.name(), lease = %format_args!("{:x}", self.session().lease_id()), released_token = self.fencing_token(), fencing_token = tracing::field::Empty))]
    pub async fn requeue(self) -> Result<RwLockReadGuard, Error> {
        let RwLockReadGuard { holding, rwlock } = self;
        let holding = rwlock.requeue(READER, holding).await?;
        Ok(RwLockReadGuard::from_holding(holding, rwlock))
    }
}

holding_guard! {
    /// Exclusive access to an [`RwLock`]. Releases when dropped (in the background) or with
    /// [`release()`](Self::release); dereferences to its [`Fence`], whose
    /// [`fencing_token()`](Fence::fencing_token) strictly increases across writers.
    #[must_use = "dropping an RwLockWriteGuard releases it at once"]
    pub struct RwLockWriteGuard {
        rwlock: RwLock,
    };
}

impl RwLockWriteGuard {
    /// Releases this exclusive access and lines up for it again, in one write — as
    /// [`MutexGuard::requeue`](crate::MutexGuard::requeue) does for a mutex: every reader and
    /// writer already in line goes first, and the returned guard writes after them, with a
    /// larger [`fencing_token()`](Fence::fencing_token).
    ///
    /// # Errors
    /// As [`MutexGuard::requeue`](crate::MutexGuard::requeue): [`Error::LockLost`] for this
    /// guard's key if it was lost before the call (nothing is queued); afterwards as
    /// [`RwLock::write`]. Whatever the outcome, this guard's access is released.
    ///
    /// # Cancel safety
    /// Cancel-safe, as [`MutexGuard::requeue`](crate::MutexGuard::requeue): no key is left
    /// behind at any point.
    ///
    /// # Example
    /// ```no_run
    /// # async fn demo(session: etcd_coord::LeasedSession) -> Result<(), etcd_coord::Error> {
    /// use etcd_coord::RwLock;
    ///
    /// let mut writing = RwLock::new(&session, "locks/config").write().await?;
    /// for round in 0..3 {
    ///     println!("round {round} writes under token {}", writing.fencing_token());
    ///     writing = writing.requeue().await?; // readers and writers in line go first
    /// }
    /// writing.release().await?;
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(name = "etcd_coord.rwlock.requeue_write", skip_all, fields(name = %self.rwlock.name(), lease = %format_args!("{:x}", self.session().lease_id()), released_token = self.fencing_token(), fencing_token = tracing::field::Empty))]
    pub async fn requeue(self) -> Result<RwLockWriteGuard, Error> {
        let RwLockWriteGuard { holding, rwlock } = self;
        let holding = rwlock.requeue(WRITER, holding).await?;
        Ok(RwLockWriteGuard::from_holding(holding, rwlock))
    }
}
