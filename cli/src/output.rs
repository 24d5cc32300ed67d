//! What `etcd-coord` prints: `-w simple` (for people) or `-w json` (one JSON object a line).

use std::io::Write;

use serde_json::{json, Value};

/// The output format (`-w/--write-out`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Lines for people.
    Simple,
    /// One JSON object a line.
    Json,
}

/// Prints `line` (simple) or `value` (json) on stdout, and flushes it: a script reading the
/// output sees it at once.
pub fn emit(format: Format, line: impl FnOnce() -> String, value: impl FnOnce() -> Value) {
    let text = match format {
        Format::Simple => line(),
        Format::Json => value().to_string(),
    };
    let mut out = std::io::stdout().lock();
    // A closed stdout (the reader went away) is not a reason to stop holding or following.
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

/// What was acquired, printed when no CMD is given: the key, the fencing token and the lease.
pub fn acquired(format: Format, key: &str, fencing_token: i64, lease_id: i64) {
    emit(
        format,
        || format!("{key}\nfencing token {fencing_token}, lease {lease_id:x}"),
        || json!({"key": key, "fencing_token": fencing_token, "lease": format!("{lease_id:x}")}),
    );
}

/// A lease id as etcdctl shows it.
pub fn lease_hex(lease_id: i64) -> String {
    format!("{lease_id:x}")
}
