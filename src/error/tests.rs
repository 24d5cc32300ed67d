//! Unit tests of `error`.

use super::*;

fn status(code: Code, message: &str) -> Error {
    Error::from(etcd_client::Error::GRpcStatus(tonic::Status::new(
        code, message,
    )))
}

#[test]
fn auth_failures_get_their_own_variants_and_are_not_retried() {
    let denied = status(Code::PermissionDenied, "etcdserver: permission denied");
    assert!(matches!(&denied, Error::PermissionDenied(m) if m.contains("permission denied")));
    assert!(!denied.is_retryable());
    let token = status(Code::Unauthenticated, "etcdserver: invalid auth token");
    assert!(matches!(token, Error::AuthenticationFailed(_)));
    let password = status(
        Code::InvalidArgument,
        "etcdserver: authentication failed, invalid user ID or password",
    );
    assert!(matches!(password, Error::AuthenticationFailed(_)));
}

#[test]
fn transient_and_permanent_failures_follow_the_table() {
    for code in [
        Code::Unavailable,
        Code::DeadlineExceeded,
        Code::Cancelled,
        Code::Aborted,
        Code::Unknown,
        Code::Internal,
    ] {
        assert!(status(code, "x").is_retryable(), "{code:?}");
    }
    assert!(status(Code::ResourceExhausted, "etcdserver: too many requests").is_retryable());
    assert!(status(Code::ResourceExhausted, "h2 protocol error: http2 error").is_retryable());
    assert!(!status(
        Code::ResourceExhausted,
        "etcdserver: mvcc: database space exceeded"
    )
    .is_retryable());
    for code in [
        Code::InvalidArgument,
        Code::FailedPrecondition,
        Code::OutOfRange,
        Code::NotFound,
        Code::AlreadyExists,
        Code::Unimplemented,
        Code::DataLoss,
    ] {
        assert!(!status(code, "x").is_retryable(), "{code:?}");
    }
    assert!(Error::Timeout(Duration::from_secs(1)).is_retryable());
    assert!(!Error::InvalidArgument("x".into()).is_retryable());
    assert!(!Error::SessionClosed.is_retryable());
}

#[test]
fn every_retryable_failure_has_a_cause_of_its_own() {
    let cases = [
        (Error::Timeout(Duration::from_secs(1)), "timeout"),
        (status(Code::Unavailable, "x"), "unavailable"),
        (status(Code::DeadlineExceeded, "x"), "deadline_exceeded"),
        (status(Code::Cancelled, "x"), "cancelled"),
        (status(Code::Aborted, "x"), "aborted"),
        (status(Code::Unknown, "x"), "unknown"),
        (status(Code::Internal, "x"), "internal"),
        (
            status(Code::ResourceExhausted, "etcdserver: too many requests"),
            "too_many_requests",
        ),
        (
            status(Code::ResourceExhausted, "h2 protocol error: http2 error"),
            "goaway",
        ),
        (Error::stream_ended(), "watch_stream"),
    ];
    for (error, cause) in cases {
        assert!(error.is_retryable(), "{error}");
        assert_eq!(error.retry_cause(), cause, "{error}");
    }
}

#[test]
fn refused_watches_say_why() {
    assert!(matches!(
        Error::watch_refused("etcdserver: permission denied"),
        Error::PermissionDenied(_)
    ));
    assert!(matches!(
        Error::watch_refused("something else"),
        Error::Protocol(_)
    ));
}

#[test]
fn stale_tokens_are_told_from_denials() {
    let status =
        |code, m: &str| Error::Etcd(etcd_client::Error::GRpcStatus(tonic::Status::new(code, m)));
    assert!(status(
        Code::InvalidArgument,
        "etcdserver: revision of auth store is old"
    )
    .is_stale_auth());
    assert!(status(Code::Unknown, "auth: revision in header is old").is_stale_auth());
    assert!(
        Error::from(etcd_client::Error::GRpcStatus(tonic::Status::new(
            Code::Unauthenticated,
            "etcdserver: invalid auth token"
        )))
        .is_stale_auth()
    );
    assert!(Error::watch_refused(
        "rpc error: code = InvalidArgument desc = etcdserver: revision of auth store is old"
    )
    .is_stale_auth());
    assert!(!Error::PermissionDenied("etcdserver: permission denied".into()).is_stale_auth());
    assert!(!status(
        Code::InvalidArgument,
        "etcdserver: authentication failed, invalid user ID or password"
    )
    .is_stale_auth());
    assert!(!Error::Timeout(std::time::Duration::from_secs(1)).is_stale_auth());
}
