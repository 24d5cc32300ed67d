//! [`RwLock`]: readers share, writers exclude, FIFO with no writer starvation.

use crate::engine::{self, holding_guard, Blocker, Holding};
use crate::keys::Named;
#[cfg(doc)]
use crate::Fence;
use crate::{Error, LeasedSession};

/// Member-key kinds: readers and writers form their own sub-ranges of one queue.
const READER: &str = "r";
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
    named: Named,
}

impl RwLock {
    /// A handle on the read/write lock `name`. Does no I/O; an invalid name is reported by the
    /// operations.
    pub fn new(session: &LeasedSession, name: impl Into<String>) -> RwLock {
        RwLock {
            session: session.clone(),
            named: Named::new(name),
        }
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        self.named.name()
    }

    /// Waits for shared (read) access.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an invalid name; [`Error::SessionLost`] /
    /// [`Error::SessionClosed`] if the session is or becomes Lost; [`Error::LockLost`] if the
    /// waiter's key is deleted while it waits.
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future at any point leaves no key behind.
    pub async fn read(&self) -> Result<RwLockReadGuard, Error> {
        let queue = self.named.queue()?;
        let acquired = engine::acquire(
            &self.session,
            queue,
            READER,
            Blocker::new(queue.sub(WRITER), 1)?,
            Vec::new(),
        )
        .await?;
        Ok(RwLockReadGuard::from_holding(Holding::new(
            self.session.clone(),
            acquired,
        )))
    }

    /// Waits for exclusive (write) access.
    ///
    /// # Errors
    /// As [`read()`](Self::read).
    ///
    /// # Cancel safety
    /// Cancel-safe, as [`read()`](Self::read).
    pub async fn write(&self) -> Result<RwLockWriteGuard, Error> {
        let queue = self.named.queue()?;
        let acquired = engine::acquire(
            &self.session,
            queue,
            WRITER,
            Blocker::new(queue.sub(""), 1)?,
            Vec::new(),
        )
        .await?;
        Ok(RwLockWriteGuard::from_holding(Holding::new(
            self.session.clone(),
            acquired,
        )))
    }

    /// Takes shared access if no writer holds or waits, in one round trip; else `None`
    /// (leaving no key behind).
    ///
    /// # Errors
    /// As [`read()`](Self::read), but never waits.
    pub async fn try_read(&self) -> Result<Option<RwLockReadGuard>, Error> {
        let queue = self.named.queue()?;
        let got = engine::try_acquire(
            &self.session,
            queue,
            READER,
            Blocker::new(queue.sub(WRITER), 1)?,
            Vec::new(),
        )
        .await?;
        Ok(got.map(|a| RwLockReadGuard::from_holding(Holding::new(self.session.clone(), a))))
    }

    /// Takes exclusive access if nobody holds or waits, in one round trip; else `None`
    /// (leaving no key behind).
    ///
    /// # Errors
    /// As [`read()`](Self::read), but never waits.
    pub async fn try_write(&self) -> Result<Option<RwLockWriteGuard>, Error> {
        let queue = self.named.queue()?;
        let got = engine::try_acquire(
            &self.session,
            queue,
            WRITER,
            Blocker::new(queue.sub(""), 1)?,
            Vec::new(),
        )
        .await?;
        Ok(got.map(|a| RwLockWriteGuard::from_holding(Holding::new(self.session.clone(), a))))
    }
}

holding_guard! {
    /// Shared access to an [`RwLock`]. Releases when dropped (in the background) or with
    /// [`release()`](Self::release); dereferences to its [`Fence`].
    #[must_use = "dropping an RwLockReadGuard releases it at once"]
    pub struct RwLockReadGuard;
}

holding_guard! {
    /// Exclusive access to an [`RwLock`]. Releases when dropped (in the background) or with
    /// [`release()`](Self::release); dereferences to its [`Fence`], whose
    /// [`fencing_token()`](Fence::fencing_token) strictly increases across writers.
    #[must_use = "dropping an RwLockWriteGuard releases it at once"]
    pub struct RwLockWriteGuard;
}
