//! [`Barrier`]: a gate held up by one holder; everyone else waits until it is down.

use etcd_client::TxnOp;

use crate::engine::{self, holding_guard, measure, Holding, SessionKeys};
use crate::keys::{Layout, Named};
use crate::metrics::AcquisitionKind;
use crate::{Error, LeasedSession};

/// Where a barrier's key goes: `<name>/#barrier/`.
pub(crate) const KIND: &str = "barrier";
/// The barrier key, under `<name>/#barrier/`.
pub(crate) const BARRIER: &str = "up";

/// A gate: while someone holds it up, [`wait()`](Self::wait) blocks; when it comes down
/// (released, or its holder's lease ended) every waiter continues.
///
/// The barrier is one key under the holder's session lease, put with a `CreateRevision == 0`
/// compare; waiters watch it for deletion (registered from now, so they all continue within a
/// round trip of the release).
///
/// # Example
/// ```no_run
/// # async fn demo() -> Result<(), etcd_coord::Error> {
/// use etcd_coord::{Barrier, LeasedSession, SessionOptions};
///
/// let client = etcd_client::Client::connect(["127.0.0.1:2379"], None).await?;
/// let session = LeasedSession::new(client, SessionOptions::new()).await?;
/// let deploy = Barrier::new(&session, "gates/deploy");
/// let hold = deploy.hold().await?; // others' wait() now blocks
/// // ... migrate ...
/// hold.release().await?; // every waiter continues
/// deploy.wait().await?; // returns at once: the barrier is down
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Barrier {
    session: LeasedSession,
    named: Named,
}

impl Barrier {
    /// A handle on the barrier `name`. Does no I/O; an invalid name is reported by the
    /// operations.
    pub fn new(session: &LeasedSession, name: impl Into<String>) -> Barrier {
        Barrier {
            session: session.clone(),
            named: Named::new(name, Layout::Own(KIND)),
        }
    }

    /// The barrier's name.
    pub fn name(&self) -> &str {
        self.named.name()
    }

    fn key(&self) -> Result<String, Error> {
        Ok(self.named.queue()?.sub(BARRIER))
    }

    /// Puts the barrier up, under the session's lease.
    ///
    /// # Errors
    /// [`Error::AlreadyHeld`] if it is already up (held by anyone, including another
    /// [`BarrierHold`] of this session): nothing changes. [`Error::InvalidArgument`] for an
    /// invalid name; [`Error::SessionLost`] / [`Error::SessionClosed`] if the session is Lost.
    ///
    /// # Cancel safety
    /// Cancel-safe: if the future is dropped after the request was sent, the barrier it put up
    /// (if any) is taken down by the session's background task.
    #[tracing::instrument(name = "etcd_coord.barrier.hold", skip_all, fields(name = %self.name(), lease = %format_args!("{:x}", self.session.lease_id()), fencing_token = tracing::field::Empty))]
    pub async fn hold(&self) -> Result<BarrierHold, Error> {
        let hold = async {
            let key = self.key()?;
            let session = self.session.inner();
            // A value unique to this attempt lets a retry recognise its own earlier put.
            let token = format!("{:016x}-{:x}", session.lease_id, session.book().next_seq());
            match engine::create_exclusive(&self.session, &key, token).await? {
                Some(acquired) => Ok(Holding::new(self.session.clone(), acquired)),
                None => Err(Error::AlreadyHeld { key }),
            }
        };
        let holding = measure::measured!(AcquisitionKind::Barrier, self.name(), hold)?;
        Ok(BarrierHold::from_holding(holding))
    }

    /// Returns at once when the barrier is down, else when it comes down (released, or its
    /// holder's lease expired).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an invalid name; [`Error::SessionLost`] /
    /// [`Error::SessionClosed`] if this session is Lost while waiting.
    ///
    /// # Cancel safety
    /// Cancel-safe: waiting creates nothing.
    #[tracing::instrument(name = "etcd_coord.barrier.wait", skip_all, fields(name = %self.name()))]
    pub async fn wait(&self) -> Result<(), Error> {
        let key = self.key()?;
        let session = self.session.inner();
        let now = Box::pin(engine::read(session, vec![TxnOp::get(key.as_str(), None)])).await?;
        match now.gets.first().and_then(|g| g.kvs().first()) {
            None => Ok(()),
            Some(kv) => {
                Box::pin(engine::wait_gone(
                    session,
                    &key,
                    kv.create_revision(),
                    now.revision,
                ))
                .await
            }
        }
    }
}

holding_guard! {
    /// A [`Barrier`] held up. Taken down when dropped (in the background, through the
    /// session's task) or with [`release()`](Self::release); dereferences to its [`Fence`](crate::Fence).
    #[must_use = "dropping a BarrierHold takes the barrier down at once"]
    pub struct BarrierHold;
}
