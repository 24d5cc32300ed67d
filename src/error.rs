//! The crate's one error type.

use std::time::Duration;

use tonic::Code;

/// Why a [`LeasedSession`](crate::LeasedSession) became [`Lost`](crate::SessionState::Lost).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LossReason {
    /// The local deadline passed: no refresh was acknowledged in time, so the lease *may* be
    /// gone on the server. Decided on our own monotonic clock, before the server can expire
    /// the lease.
    DeadlineExceeded,
    /// etcd answered that the lease no longer exists (a refresh returned TTL ≤ 0, or the
    /// lease was revoked by someone else).
    LeaseGone,
    /// The session was closed with [`close()`](crate::LeasedSession::close), or its last
    /// handle was dropped.
    Closed,
}

impl std::fmt::Display for LossReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LossReason::DeadlineExceeded => {
                "no lease refresh was acknowledged before the local deadline"
            }
            LossReason::LeaseGone => "etcd reports the lease is gone",
            LossReason::Closed => "the session was closed",
        })
    }
}

/// Every error this crate returns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument was rejected before anything was sent to etcd (empty or malformed name,
    /// TTL of zero or beyond etcd's maximum, …). Nothing stored was touched.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The session's lease is gone or may be gone; nothing held through it can be trusted.
    #[error("session lost: {0}")]
    SessionLost(LossReason),

    /// The operation was attempted on a session that was closed (or whose last handle was
    /// dropped).
    #[error("session closed")]
    SessionClosed,

    /// The key that represented this holder or waiter no longer exists (or belongs to another
    /// incarnation): the lock, or the place in its queue, is lost.
    #[error("lock lost: key {key} no longer exists with create revision {create_revision}")]
    LockLost {
        /// The key that was lost.
        key: String,
        /// The create revision (fencing token) it had.
        create_revision: i64,
    },

    /// The key is already held by someone else (e.g. a [`Barrier`](crate::Barrier) another
    /// holder has put up). Nothing was changed.
    #[error("already held: {key} exists and is not ours")]
    AlreadyHeld {
        /// The key that is held.
        key: String,
    },

    /// An etcd request failed (transport error, gRPC status, …). The etcd-client error is kept
    /// as the source.
    #[error("etcd request failed: {0}")]
    Etcd(#[from] etcd_client::Error),

    /// An etcd request did not answer within the session's request timeout. Its outcome on the
    /// server is unknown.
    #[error("etcd request timed out after {0:?}")]
    Timeout(Duration),

    /// etcd answered with something this crate did not expect (a missing header or operation
    /// response). Indicates a server or protocol mismatch, not a user error.
    #[error("unexpected response from etcd: {0}")]
    Protocol(String),
}

impl Error {
    /// The error for a session lost for `reason`.
    pub(crate) fn lost(reason: LossReason) -> Error {
        match reason {
            LossReason::Closed => Error::SessionClosed,
            other => Error::SessionLost(other),
        }
    }

    /// True for errors after which a retry of the same request may succeed: transport
    /// failures and timeouts, whose outcome on the server is unknown.
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            Error::Timeout(_) => true,
            Error::Etcd(e) => match e {
                etcd_client::Error::GRpcStatus(s) => matches!(
                    s.code(),
                    Code::Unavailable
                        | Code::DeadlineExceeded
                        | Code::Cancelled
                        | Code::Unknown
                        | Code::Aborted
                        | Code::Internal
                ),
                etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
                _ => false,
            },
            _ => false,
        }
    }
}
