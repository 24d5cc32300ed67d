//! Measuring an acquisition: its outcome and wait time in the metrics, its guard's hold time
//! and loss from then on, and its fencing token on the caller's span. What a primitive's public
//! acquisition wraps its work in (`crate::metrics` has the names).

use std::future::Future;

use crate::metrics::{Acquisition, Kind, Outcome};
use crate::Error;

use super::Holding;

/// Runs the acquisition `acquire` of a `kind` named `name`, measured: a dropped future counts
/// as cancelled (or timed out, inside [`crate::timeout`]).
pub(crate) async fn acquisition(
    kind: Kind,
    name: &str,
    acquire: impl Future<Output = Result<Holding, Error>>,
) -> Result<Holding, Error> {
    let measured = Acquisition::start(kind, name);
    // Boxed: the acquisition's future is deep, and every layer around it adds to the depth
    // the compiler walks for the caller's future.
    let result = Box::pin(acquire).await;
    match &result {
        Ok(holding) => {
            measured.finish(Outcome::Acquired);
            holds(holding, kind, name);
        }
        Err(e) => measured.finish(Outcome::of_error(e)),
    }
    result
}

/// As [`acquisition`], for a try-acquisition: `None` is busy.
pub(crate) async fn attempt(
    kind: Kind,
    name: &str,
    acquire: impl Future<Output = Result<Option<Holding>, Error>>,
) -> Result<Option<Holding>, Error> {
    let measured = Acquisition::start(kind, name);
    let result = Box::pin(acquire).await;
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

/// `holding` holds from now: its hold time and loss are measured, and the current span (the
/// public operation's) gets its fencing token.
fn holds(holding: &Holding, kind: Kind, name: &str) {
    let fence = holding.fence();
    fence.held.start(kind, name);
    tracing::Span::current().record("fencing_token", fence.fencing_token());
}
