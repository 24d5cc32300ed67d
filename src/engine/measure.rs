//! Measuring an acquisition: its outcome and wait time in the metrics, its guard's hold time
//! and loss from then on, and its fencing token on the caller's span. What a primitive's public
//! acquisition wraps its work in (`crate::metrics` has the names).

use std::future::Future;

use crate::metrics::{Acquisition, Kind, Outcome};
use crate::Error;

use super::Holding;

/// Runs the acquisition `acquire` of a `kind` named `name`, measured: a dropped future counts
/// as cancelled (or timed out, inside [`crate::timeout`]).
pub(crate) fn acquisition<'a>(
    kind: Kind,
    name: &'a str,
    acquire: impl Future<Output = Result<Holding, Error>> + Send + 'a,
) -> impl Future<Output = Result<Holding, Error>> + Send + 'a {
    // Boxed before the returned future exists: the acquisition's future is deep and large
    // (~25 KiB in a debug build), and a caller's future — a task, a `#[tokio::test]`, a
    // `block_on` on a 2 MiB thread — should not carry it inline (tests/future_sizes.rs).
    let acquire = Box::pin(acquire);
    async move {
        let measured = Acquisition::start(kind, name);
        let result = acquire.await;
        match &result {
            Ok(holding) => {
                measured.finish(Outcome::Acquired);
                holds(holding, kind, name);
            }
            Err(e) => measured.finish(Outcome::of_error(e)),
        }
        result
    }
}

/// Runs the attempt `acquire` (a try-acquire: `None` when busy) of a `kind` named `name`,
/// measured like [`acquisition`]; boxed the same way.
pub(crate) fn attempt<'a>(
    kind: Kind,
    name: &'a str,
    acquire: impl Future<Output = Result<Option<Holding>, Error>> + Send + 'a,
) -> impl Future<Output = Result<Option<Holding>, Error>> + Send + 'a {
    let acquire = Box::pin(acquire);
    async move {
        let measured = Acquisition::start(kind, name);
        let result = acquire.await;
        match &result {
            Ok(Some(holding)) => {
                measured.finish(Outcome::Acquired);
                holds(holding, kind, name);
            }
            Ok(None) => measured.finish(Outcome::Busy),
            Err(e) => measured.finish(Outcome::of_error(e)),
        }
        result
    }
}

/// `holding` holds from now: its hold time and loss are measured, and the current span (the
/// public operation's) gets its fencing token.
fn holds(holding: &Holding, kind: Kind, name: &str) {
    let fence = holding.fence();
    fence.held.start(kind, name);
    tracing::Span::current().record("fencing_token", fence.fencing_token());
}
