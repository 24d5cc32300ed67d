//! Exit codes. Once CMD has run to its end, `etcd-coord` exits with CMD's status (128 + N if a
//! signal N ended it, as shells report it); otherwise with one of these (docs/operations.md has
//! the same table):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 2 | bad usage: an unknown flag, a missing argument, an invalid name or duration |
//! | 69 | etcd unreachable: no answer within `--dial-timeout`/`--command-timeout`, or the session's lease could not be kept alive while waiting |
//! | 70 | any other failure (an etcd error that is neither of these, a failure of `etcd-coord`) |
//! | 75 | the lock (permit, leadership, barrier) was lost while CMD ran: CMD got SIGTERM and, after `--kill-after`, SIGKILL |
//! | 77 | permission denied or authentication failed |
//! | 124 | `--timeout` passed before the lock (permit, leadership, barrier) was had: CMD did not run |
//! | 126 | CMD could not be run |
//! | 127 | CMD was not found |
//! | 128 + N | `etcd-coord` got signal N (SIGINT, SIGTERM, SIGHUP) before CMD started |

use std::fmt;
use std::time::Duration;

use etcd_coord::{Error, LossReason};

pub const USAGE: i32 = 2;
pub const UNREACHABLE: i32 = 69;
pub const INTERNAL: i32 = 70;
pub const LOST: i32 = 75;
pub const DENIED: i32 = 77;
pub const TIMEOUT: i32 = 124;
pub const CANNOT_RUN: i32 = 126;
pub const NOT_FOUND: i32 = 127;

/// Why `etcd-coord` stops without CMD's status.
#[derive(Debug)]
pub enum Failure {
    Usage(String),
    Unreachable(String),
    Denied(String),
    /// Not had within `--timeout`.
    Timeout(Duration),
    Lost(String),
    CannotRun(String),
    NotFound(String),
    /// Interrupted by this signal before CMD ran.
    Signalled(i32),
    Internal(String),
}

impl Failure {
    pub fn code(&self) -> i32 {
        match self {
            Failure::Usage(_) => USAGE,
            Failure::Unreachable(_) => UNREACHABLE,
            Failure::Denied(_) => DENIED,
            Failure::Timeout(_) => TIMEOUT,
            Failure::Lost(_) => LOST,
            Failure::CannotRun(_) => CANNOT_RUN,
            Failure::NotFound(_) => NOT_FOUND,
            Failure::Signalled(signal) => 128 + signal,
            Failure::Internal(_) => INTERNAL,
        }
    }

    /// The failure of `what` (e.g. "lock jobs/nightly") with `error`.
    pub fn of(what: &str, error: Error) -> Failure {
        let message = format!("{what}: {error}");
        match &error {
            Error::InvalidArgument(_) => Failure::Usage(message),
            Error::PermissionDenied(_) | Error::AuthenticationFailed(_) => Failure::Denied(message),
            Error::Timeout(_) => Failure::Unreachable(message),
            Error::SessionLost(LossReason::DeadlineExceeded) => Failure::Unreachable(message),
            Error::SessionLost(_) | Error::SessionClosed | Error::LockLost { .. } => {
                Failure::Lost(message)
            }
            e if e.is_retryable() => Failure::Unreachable(message),
            _ => Failure::Internal(message),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Usage(m)
            | Failure::Unreachable(m)
            | Failure::Denied(m)
            | Failure::Lost(m)
            | Failure::CannotRun(m)
            | Failure::NotFound(m)
            | Failure::Internal(m) => f.write_str(m),
            Failure::Timeout(d) => write!(f, "not acquired within --timeout {d:?}"),
            Failure::Signalled(s) => write!(f, "interrupted by signal {s} before the command ran"),
        }
    }
}

/// The exit code of a process that ended with `status`, as a shell reports it.
pub fn of_status(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => INTERNAL,
    }
}
