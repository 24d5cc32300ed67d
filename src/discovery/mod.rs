//! Service registration and discovery in the layout of etcd's Go `naming/endpoints` (and so of
//! grpc-go's etcd resolver): one key `<target>/<addr>` per endpoint, kept under a lease, whose
//! value is the JSON of Go's `endpoints.Update` (`{"Op":0,"Addr":…,"Metadata":…}`).
//!
//! * [`Registration`] keeps one endpoint registered for as long as it lives, on a session of
//!   its own: when that session is lost (a partition longer than its TTL) it registers again
//!   with a fresh one. [`SessionRegistration`] registers inside a session you already have and
//!   ends with it.
//! * [`Discovery`] reads a target's endpoints once ([`list`](Discovery::list)) or keeps a
//!   [`ServiceView`] of them current ([`view`](Discovery::view)), across disconnects,
//!   compaction and member failures, with a [`Stream`](futures::Stream) of
//!   [`ViewChange`]s.
//! * With the `tonic` feature, `balanced_channel` is a load-balanced
//!   `tonic::transport::Channel` whose endpoints follow a view.
//!
//! ```no_run
//! use std::time::Duration;
//! use etcd_coord::discovery::{Discovery, Endpoint, Registration};
//! use etcd_coord::SessionOptions;
//!
//! # async fn demo() -> Result<(), etcd_coord::Error> {
//! let client = etcd_client::Client::connect(
//!     ["127.0.0.1:2379"],
//!     Some(etcd_coord::recommended_connect_options()),
//! )
//! .await?;
//! // A server registers itself …
//! let registration = Registration::register(
//!     client.clone(),
//!     "services/greeter",
//!     Endpoint::new("10.0.0.7:50051").with_metadata(serde_json::json!({"zone": "a"})),
//!     SessionOptions::new().with_ttl(Duration::from_secs(10)),
//! )
//! .await?;
//! // … and clients follow the set.
//! let view = Discovery::new(client, "services/greeter").view().await?;
//! for (key, endpoint) in view.endpoints() {
//!     println!("{key} → {}", endpoint.addr());
//! }
//! registration.deregister().await?;
//! # Ok(()) }
//! ```
//!
//! See `docs/discovery.md` for the guarantees and what re-registration can and cannot promise.

mod changes;
mod endpoint;
mod read;
mod registration;
mod session_registration;
mod view;

#[cfg(feature = "tonic")]
mod channel;

pub use changes::{ViewChange, ViewChanges};
#[cfg(feature = "tonic")]
pub use channel::{balanced_channel, default_tonic_endpoint};
pub use endpoint::{Endpoint, MAX_ENDPOINT_JSON_LEN};
pub use registration::{Registration, RegistrationState};
pub use session_registration::SessionRegistration;
pub use view::{Discovery, ServiceView, ViewMetrics};

use crate::keys::MAX_NAME_LEN;
use crate::Error;

/// The prefix a target's endpoints sit under: `<target>/`. Views watch this, never the bare
/// target, so the view of `svc` does not show `svc2/…`.
fn target_prefix(target: &str) -> Result<String, Error> {
    if target.is_empty() {
        return Err(Error::InvalidArgument("target must not be empty".into()));
    }
    if target.ends_with('/') {
        return Err(Error::InvalidArgument(format!(
            "target {target:?} ends with '/'; endpoints go under \"<target>/\", give the target without it"
        )));
    }
    if target.len() > MAX_NAME_LEN {
        return Err(Error::InvalidArgument(format!(
            "target is {} bytes long; at most {MAX_NAME_LEN} are allowed",
            target.len()
        )));
    }
    Ok(format!("{target}/"))
}

/// The key `<target>/<suffix>` of a registration.
fn registration_key(target: &str, suffix: &str) -> Result<String, Error> {
    let prefix = target_prefix(target)?;
    if suffix.is_empty() {
        return Err(Error::InvalidArgument(
            "a registration's key suffix (by default the address) must not be empty".into(),
        ));
    }
    if suffix.len() > MAX_NAME_LEN {
        return Err(Error::InvalidArgument(format!(
            "key suffix is {} bytes long; at most {MAX_NAME_LEN} are allowed",
            suffix.len()
        )));
    }
    Ok(prefix + suffix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_target_slash_suffix_and_bad_names_are_refused() {
        assert_eq!(
            registration_key("svc", "1.2.3.4:80").unwrap(),
            "svc/1.2.3.4:80"
        );
        assert_eq!(target_prefix("a/b").unwrap(), "a/b/");
        for (target, suffix) in [("", "a"), ("svc/", "a"), ("svc", "")] {
            assert!(matches!(
                registration_key(target, suffix),
                Err(Error::InvalidArgument(_))
            ));
        }
        let long = "x".repeat(MAX_NAME_LEN + 1);
        assert!(registration_key(&long, "a").is_err());
        assert!(registration_key("svc", &long).is_err());
    }
}
