//! Getting a lease: granting a new one (cancel-safe: a grant nobody will use is revoked), or
//! adopting one that still exists.

use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::rpc::Rpc;
use crate::Error;

/// A lease this session may keep: its id, TTL, the store revision of the answer, and when the
/// request whose acknowledgement starts the deadline was sent.
pub(super) struct Lease {
    pub(super) id: i64,
    pub(super) ttl: Duration,
    pub(super) revision: i64,
    pub(super) sent: Instant,
}

/// Grants a lease of `ttl_secs`. The lease's id is chosen here, before the grant is sent: if
/// the answer is lost, or the caller gives up before it arrives, the id is revoked in the
/// background (see [`OrphanedGrant`]).
pub(super) async fn grant(rpc: &Rpc, ttl_secs: i64) -> Result<Lease, Error> {
    let sent = Instant::now();
    let (granted, orphan) = loop {
        let orphan = OrphanedGrant::new(rpc, ttl_secs);
        match rpc.lease_grant(ttl_secs, orphan.id).await {
            // Another lease has this id (odds 2^-63): not ours to revoke; choose again.
            Err(e) if e.is_lease_taken() => orphan.disarm(),
            Err(e) => return Err(e),
            Ok(granted) => break (granted, orphan),
        }
    };
    orphan.disarm();
    if granted.ttl() <= 0 {
        return Err(Error::Protocol(format!(
            "lease granted with TTL {}",
            granted.ttl()
        )));
    }
    Ok(Lease {
        id: granted.id(),
        ttl: Duration::from_secs(granted.ttl() as u64),
        revision: granted.header().map_or(0, |h| h.revision()),
        sent,
    })
}

/// A lease that still exists, refreshed once now, with the keys attached to it.
pub(crate) struct Adopted {
    pub(super) lease: Lease,
    /// The keys on the lease when it was adopted.
    pub(crate) keys: Vec<Vec<u8>>,
}

/// Refreshes lease `id` (so the deadline starts from an acknowledgement of ours, never from a
/// guess about an earlier owner's refreshes) and reads its TTL and its keys.
pub(super) async fn adopt(rpc: &Rpc, id: i64) -> Result<Adopted, Error> {
    let gone = |e: Error| {
        if e.is_lease_not_found() {
            Error::LeaseNotFound(id)
        } else {
            e
        }
    };
    let sent = Instant::now();
    // The keeper and its stream close at once: the session opens its own.
    rpc.lease_keep_alive(id, rpc.timeout())
        .await
        .map_err(gone)?;
    let alive = rpc.lease_time_to_live(id, true).await.map_err(gone)?;
    if alive.ttl() <= 0 || alive.granted_ttl() <= 0 {
        return Err(Error::LeaseNotFound(id));
    }
    Ok(Adopted {
        lease: Lease {
            id,
            ttl: Duration::from_secs(alive.granted_ttl() as u64),
            revision: alive.header().map_or(0, |h| h.revision()),
            sent,
        },
        keys: alive.keys().to_vec(),
    })
}

/// A lease grant that may have landed without anyone knowing: unless disarmed, dropping it
/// revokes its lease id in a background task (retrying while etcd is unreachable, for up to
/// twice the TTL — after that the lease has expired anyway).
struct OrphanedGrant {
    rpc: Rpc,
    id: i64,
    ttl: Duration,
    armed: bool,
}

impl OrphanedGrant {
    fn new(rpc: &Rpc, ttl_secs: i64) -> OrphanedGrant {
        // etcd's lease ids are positive; 0 asks etcd to choose.
        let id = loop {
            let id = rand::random::<i64>() & i64::MAX;
            if id != 0 {
                break id;
            }
        };
        OrphanedGrant {
            rpc: rpc.clone(),
            id,
            ttl: Duration::from_secs(ttl_secs.max(1) as u64),
            armed: true,
        }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for OrphanedGrant {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // no runtime to revoke from: the lease expires by its TTL
        };
        let (rpc, id, ttl) = (self.rpc.clone(), self.id, self.ttl);
        runtime.spawn(async move {
            let until = Instant::now() + ttl.saturating_mul(2);
            let mut backoff = Backoff::for_requests();
            loop {
                match rpc.lease_revoke(id).await {
                    Ok(()) => return,
                    _ if Instant::now() >= until => return,
                    _ => tokio::time::sleep(backoff.next_delay()).await,
                }
            }
        });
    }
}
