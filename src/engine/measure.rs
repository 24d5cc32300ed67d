//! Measuring an acquisition: its outcome and wait time in the metrics, its guard's hold time
//! and loss from then on, and its fencing token on the caller's span. What a primitive's public
//! acquisition wraps its work in (`crate::metrics` has the names).
//!
//! Macros rather than functions taking the acquisition's future, so that the future is
//! created where it is awaited — and boxed there: unboxed, the acquisition's deep future
//! (~29 KiB before every request in it was boxed by `rpc::send::within`, ~5 KiB since:
//! `mutex::tests`) sat inline in every public operation's future, and a caller
//! that `block_on`s or `#[tokio::test]`s a lock on a 2 MiB thread overflowed its stack
//! (tests/future_sizes.rs keeps every public future under 8 KiB). One allocation per
//! acquisition, beside its round trips.

use crate::metrics::{Acquisition, AcquisitionKind, Outcome};
use crate::Error;

use super::Holding;

/// `$future`, boxed (see the module's documentation).
macro_rules! boxed {
    ($future:expr) => {
        Box::pin($future)
    };
}
pub(crate) use boxed;

/// Awaits the acquisition `$acquire` (a future of `Result<Holding, Error>`) of a `$kind`
/// (`metrics::AcquisitionKind`) named `$name`, measured: a dropped future counts as cancelled (or timed
/// out, inside [`crate::timeout`]). Evaluates to its result.
macro_rules! measured {
    ($kind:expr, $name:expr, $acquire:expr) => {{
        let measured = $crate::metrics::Acquisition::start($kind, $name);
        let result = $crate::engine::measure::boxed!($acquire).await;
        $crate::engine::measure::acquired(measured, &result, $kind, $name);
        result
    }};
}
pub(crate) use measured;

/// As [`measured!`], for a try-acquisition (a future of `Result<Option<Holding>, Error>`):
/// `None` is busy.
macro_rules! attempted {
    ($kind:expr, $name:expr, $attempt:expr) => {{
        let measured = $crate::metrics::Acquisition::start($kind, $name);
        let result = $crate::engine::measure::boxed!($attempt).await;
        $crate::engine::measure::attempt_ended(measured, &result, $kind, $name);
        result
    }};
}
pub(crate) use attempted;

/// Records how the acquisition `measured` ended.
pub(crate) fn acquired(
    measured: Acquisition,
    result: &Result<Holding, Error>,
    kind: AcquisitionKind,
    name: &str,
) {
    match result {
        Ok(holding) => {
            measured.finish(Outcome::Acquired);
            holds(holding, kind, name);
        }
        Err(e) => measured.finish(Outcome::of_error(e)),
    }
}

/// Records how the try-acquisition `measured` ended.
pub(crate) fn attempt_ended(
    measured: Acquisition,
    result: &Result<Option<Holding>, Error>,
    kind: AcquisitionKind,
    name: &str,
) {
    match result {
        Ok(Some(holding)) => {
            measured.finish(Outcome::Acquired);
            holds(holding, kind, name);
        }
        Ok(None) => measured.finish(Outcome::Busy),
        Err(e) => measured.finish(Outcome::of_error(e)),
    }
}

/// `holding` holds from now: its hold time and loss are measured, and the current span (the
/// public operation's) gets its fencing token.
fn holds(holding: &Holding, kind: AcquisitionKind, name: &str) {
    let fence = holding.fence();
    fence.shared.held.start(kind, name);
    tracing::Span::current().record("fencing_token", fence.fencing_token());
}
