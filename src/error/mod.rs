//! The crate's one error type, and the one place that says which failures are worth a retry.

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
    /// The session's background task stopped without closing the session (its runtime was
    /// shut down, or the task panicked): nothing refreshes the lease any more.
    KeepAliveStopped,
    /// A background release failed with an error retrying cannot fix (for example, etcd's auth
    /// denied it), or a resumed session's look at the keys on its lease did (listing them,
    /// reading them or deleting one nobody took back: see
    /// [`LeasedSession::resume`](crate::LeasedSession::resume)). The session ends and revokes
    /// its lease rather than keep a live lease on a key nobody holds any more.
    CleanupFailed,
    /// The session was handed off with [`orphan()`](crate::LeasedSession::orphan): it stopped
    /// refreshing the lease without revoking it, for another process to
    /// [`resume`](crate::LeasedSession::resume).
    Orphaned,
}

impl std::fmt::Display for LossReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LossReason::DeadlineExceeded => {
                "no lease refresh was acknowledged before the local deadline"
            }
            LossReason::LeaseGone => "etcd reports the lease is gone",
            LossReason::Closed => "the session was closed",
            LossReason::KeepAliveStopped => "the session's background task stopped",
            LossReason::CleanupFailed => "a background release failed permanently",
            LossReason::Orphaned => "the session was orphaned: its lease was handed off",
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

    /// The key is already held by someone else (a [`Barrier`](crate::Barrier) another holder
    /// has put up, or a service registration's key another live registration owns). Nothing
    /// was changed.
    #[error("already held: {key} exists and is not ours")]
    AlreadyHeld {
        /// The key that is held.
        key: String,
    },

    /// A [`Registration`](crate::discovery::Registration) is between registrations (its session
    /// was lost and it is registering again): there is no key to write through now.
    #[error("not registered now: {key} is being registered again")]
    NotRegistered {
        /// The registration's key.
        key: String,
    },

    /// A [`ServiceView`](crate::discovery::ServiceView) ended because etcd refused it in a way
    /// retrying cannot fix (for example, its permission to read the target was revoked).
    /// Carries the cause.
    #[error("service view ended: {0}")]
    ViewEnded(#[source] std::sync::Arc<Error>),

    /// The lease does not exist (any more): it expired or was revoked before
    /// [`LeasedSession::resume`](crate::LeasedSession::resume) could adopt it. Nothing was
    /// changed.
    #[error("lease {0:x} not found: it expired or was revoked")]
    LeaseNotFound(i64),

    /// [`Registration::resume`](crate::discovery::Registration::resume) (or
    /// [`SessionRegistration::resume`](crate::discovery::SessionRegistration::resume)) found
    /// the lease but not the key on it (deleted, never registered under it, or now on another lease).
    /// Nothing was changed (`Registration::resume` neither refreshes nor revokes the lease:
    /// it ends on its TTL unless someone else keeps it).
    #[error("key {key} does not exist on lease {lease_id:x}")]
    NotOnLease {
        /// The key that was to be taken back.
        key: String,
        /// The lease it was expected on.
        lease_id: i64,
    },

    /// An [`Stm`](crate::Stm) attempt cannot go on: the revision its reads see was compacted
    /// away. [`Stm::run`](crate::Stm::run) runs the attempt again; a closure only passes it
    /// on.
    #[error("STM attempt void: its snapshot was compacted away")]
    Conflict,

    /// Every attempt of an [`Stm`](crate::Stm) transaction conflicted with other writers (or
    /// failed to read): nothing was committed.
    #[error("STM transaction gave up after {attempts} attempts")]
    TooManyConflicts {
        /// The attempts made.
        attempts: u32,
    },

    /// The answer to an [`Stm`](crate::Stm) commit was lost (a timeout, a broken connection):
    /// it may or may not have been applied, and it is not sent again — a second copy could
    /// apply the transaction twice. Also a [`Claimed::ack`](crate::Claimed::ack) whose attempt
    /// went unanswered when whether it landed can no longer be told (the session was Lost
    /// first, or etcd's history of the keys was compacted). Carries the failure.
    #[error("STM commit outcome unknown: {0}")]
    CommitUncertain(#[source] Box<Error>),

    /// etcd's authorization refused the request (the user's roles lack a permission it needs).
    /// Never retried. Carries etcd's message.
    #[error("permission denied by etcd: {0}")]
    PermissionDenied(String),

    /// etcd refused the client's credentials or its auth token. Never retried. Carries
    /// etcd's message.
    #[error("authentication failed: {0}")]
    AuthenticationFailed(String),

    /// An etcd request failed (transport error, gRPC status, …). The etcd-client error is kept
    /// as the source.
    #[error("etcd request failed: {0}")]
    Etcd(#[source] etcd_client::Error),

    /// An etcd request did not answer within the session's request timeout. Its outcome on the
    /// server is unknown.
    #[error("etcd request timed out after {0:?}")]
    Timeout(Duration),

    /// etcd answered with something this crate did not expect (a missing header or operation
    /// response, a key in a state this crate never leaves it in). Indicates a server or protocol
    /// mismatch, not a user error.
    #[error("unexpected response from etcd: {0}")]
    Protocol(String),

    /// A failure inside this crate: a background task it relies on panicked or was stopped
    /// by its runtime's shutdown before it answered. Carries what failed. Not retried.
    #[error("internal failure: {0}")]
    Internal(String),

    /// The API was used against its contract (an [`Stm`](crate::Stm) closure that went on
    /// after one of its reads failed, a handle of an attempt that is over). Nothing was
    /// written. Carries what was wrong.
    #[error("misuse: {0}")]
    Misuse(String),
}

impl From<etcd_client::Error> for Error {
    /// Auth failures become their own variants; everything else is kept as [`Error::Etcd`].
    fn from(e: etcd_client::Error) -> Error {
        if let etcd_client::Error::GRpcStatus(status) = &e {
            let message = status.message();
            match status.code() {
                Code::PermissionDenied => return Error::PermissionDenied(message.to_owned()),
                Code::Unauthenticated => return Error::AuthenticationFailed(message.to_owned()),
                // etcd's ErrGRPCAuthFailed ("authentication failed, invalid user ID or
                // password") is an InvalidArgument status.
                Code::InvalidArgument if message.contains("authentication failed") => {
                    return Error::AuthenticationFailed(message.to_owned())
                }
                _ => {}
            }
        }
        Error::Etcd(e)
    }
}

impl Error {
    /// The error for a session lost for `reason`.
    pub(crate) fn lost(reason: LossReason) -> Error {
        match reason {
            LossReason::Closed => Error::SessionClosed,
            other => Error::SessionLost(other),
        }
    }

    /// The error for a watch etcd created and cancelled at once, from its cancel reason.
    pub(crate) fn watch_refused(reason: &str) -> Error {
        if reason.contains("permission denied") {
            Error::PermissionDenied(reason.to_owned())
        } else if reason.contains("invalid auth token")
            || reason.contains("authentication")
            || is_old_auth_revision(reason)
        {
            Error::AuthenticationFailed(reason.to_owned())
        } else {
            Error::Protocol(format!("etcd refused a watch: {reason}"))
        }
    }

    /// Whether sending the same request again may succeed. Every retry in this crate asks
    /// this one question; the answers, and why:
    ///
    /// | failure | retried | why |
    /// |---|---|---|
    /// | [`Error::Timeout`] | yes | the outcome is unknown; every request this crate retries is idempotent or fenced |
    /// | transport and I/O errors | yes | connection refused, reset or broken: another attempt may get through |
    /// | a watch stream that ended or failed | yes | its connection broke; a new stream may work |
    /// | `Unavailable` | yes | etcd has no leader, the leader changed, a member is stopping, or a proposal timed out |
    /// | `DeadlineExceeded` | yes | etcd's or gRPC's deadline passed; the next attempt gets a new one |
    /// | `Cancelled` | yes | the HTTP/2 stream was reset under us (a connection lost) |
    /// | `Aborted` | yes | a conflict, retryable by definition |
    /// | `Unknown`, `Internal` | yes | how tonic reports a broken HTTP/2 connection (h2 errors) |
    /// | `ResourceExhausted` "too many requests" | yes | etcd sheds load while its apply lags behind |
    /// | `ResourceExhausted` "h2 protocol error" | yes | an HTTP/2 GOAWAY (`ENHANCE_YOUR_CALM`, also sent by the client's own h2 after too many streams reset under load): the connection is closed, the next attempt reconnects |
    /// | `ResourceExhausted`, other (the NOSPACE alarm "database space exceeded", message size) | no | needs an operator or a smaller request |
    /// | `PermissionDenied` ([`Error::PermissionDenied`]) | no | the user's roles lack a permission |
    /// | `Unauthenticated` ([`Error::AuthenticationFailed`]) | no | bad credentials or a token etcd no longer accepts (this crate renews a stale token itself, once, before it reports this) |
    /// | `InvalidArgument`, `FailedPrecondition`, `OutOfRange`, `NotFound`, `AlreadyExists`, `Unimplemented`, `DataLoss` | no | the same request would fail the same way |
    /// | every other error of this crate or of etcd-client | no | a bad argument, a lost session or lock, a protocol mismatch, an internal failure |
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Timeout(_) => true,
            Error::Etcd(e) => match e {
                etcd_client::Error::GRpcStatus(s) => match s.code() {
                    Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::Cancelled
                    | Code::Aborted
                    | Code::Unknown
                    | Code::Internal => true,
                    // etcd shedding load; or tonic's name for an HTTP/2 GOAWAY with
                    // ENHANCE_YOUR_CALM — the connection is closed and the next attempt
                    // reconnects.
                    Code::ResourceExhausted => {
                        s.message().contains("too many requests")
                            || s.message().starts_with("h2 protocol error")
                    }
                    _ => false,
                },
                etcd_client::Error::TransportError(_)
                | etcd_client::Error::IoError(_)
                | etcd_client::Error::WatchError(_) => true,
                _ => false,
            },
            _ => false,
        }
    }

    /// A bounded name for what went wrong, for the `cause` label of retried requests (see
    /// `crate::metrics`): the rows of [`is_retryable`](Self::is_retryable)'s table.
    pub(crate) fn retry_cause(&self) -> &'static str {
        match self {
            Error::Timeout(_) => "timeout",
            Error::Etcd(etcd_client::Error::GRpcStatus(s)) => match s.code() {
                Code::Unavailable => "unavailable",
                Code::DeadlineExceeded => "deadline_exceeded",
                Code::Cancelled => "cancelled",
                Code::Aborted => "aborted",
                Code::Unknown => "unknown",
                Code::Internal => "internal",
                Code::ResourceExhausted if s.message().contains("too many requests") => {
                    "too_many_requests"
                }
                Code::ResourceExhausted if s.message().starts_with("h2 protocol error") => "goaway",
                _ => "other",
            },
            Error::Etcd(etcd_client::Error::TransportError(_)) => "transport",
            Error::Etcd(etcd_client::Error::IoError(_)) => "io",
            Error::Etcd(etcd_client::Error::WatchError(_)) => "watch_stream",
            _ => "other",
        }
    }

    /// The error for a watch stream that ended without a reason (retryable).
    pub(crate) fn stream_ended() -> Error {
        Error::Etcd(etcd_client::Error::WatchError("watch stream ended".into()))
    }

    /// Whether etcd refused a read at a revision its history no longer has (etcd's
    /// `ErrCompacted`, "required revision has been compacted").
    pub(crate) fn is_compacted(&self) -> bool {
        self.status_says("required revision has been compacted")
    }

    /// Whether the member that answered has not applied the revision a read asked for yet
    /// (etcd's `ErrFutureRev`, "required revision is a future revision"; etcd #11963).
    pub(crate) fn is_future_revision(&self) -> bool {
        self.status_says("required revision is a future revision")
    }

    /// Whether etcd refused a Txn for holding more operations than its `--max-txn-ops`.
    pub(crate) fn is_too_many_ops(&self) -> bool {
        self.status_says("too many operations in txn request")
    }

    /// Whether a lease grant with a chosen id found that id taken ("lease already exists").
    pub(crate) fn is_lease_taken(&self) -> bool {
        self.status_says("lease already exists")
    }

    /// Whether etcd answered that the lease does not exist (expired or revoked): a gRPC
    /// `NotFound` ("requested lease not found"), or the keep-alive stream's own report of it.
    pub(crate) fn is_lease_not_found(&self) -> bool {
        match self {
            Error::Etcd(etcd_client::Error::LeaseKeepAliveError(m)) => m.contains("not found"),
            Error::Etcd(etcd_client::Error::GRpcStatus(s)) => {
                s.code() == Code::NotFound || s.message().contains("lease not found")
            }
            _ => false,
        }
    }

    fn status_says(&self, what: &str) -> bool {
        matches!(self, Error::Etcd(etcd_client::Error::GRpcStatus(s)) if s.message().contains(what))
    }
}

impl Error {
    /// Whether etcd refused the request only because the client's auth token is stale: it
    /// expired (simple tokens after `--auth-token-ttl` without use, JWTs after their TTL) or
    /// was issued before a change of users or roles ("revision of auth store is old"). A fresh
    /// token fixes it (the request layer renews it and sends the request once more).
    pub(crate) fn is_stale_auth(&self) -> bool {
        match self {
            Error::AuthenticationFailed(m) => {
                m.contains("invalid auth token") || is_old_auth_revision(m)
            }
            Error::Etcd(etcd_client::Error::GRpcStatus(s)) => {
                s.message().contains("invalid auth token") || is_old_auth_revision(s.message())
            }
            _ => false,
        }
    }
}

impl Error {
    /// Whether a refused *watch* may be a stale token: etcd checks a watch stream's token when
    /// a watch is created and reports a stale one as "permission denied", so a denial is
    /// believed only if it comes again right after a renewal.
    pub(crate) fn may_be_stale_watch_auth(&self) -> bool {
        self.is_stale_auth() || matches!(self, Error::PermissionDenied(_))
    }
}

/// etcd's "the token predates a change of users or roles": its gRPC error, and the raw one
/// some of its code paths return.
fn is_old_auth_revision(message: &str) -> bool {
    message.contains("revision of auth store is old")
        || message.contains("auth: revision in header is old")
}

#[cfg(test)]
mod tests;
