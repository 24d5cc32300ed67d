//! The API's error, as toxiproxy reports it.

use serde_json::Value;

/// An error of the API, as toxiproxy reports it: a message and an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({status})")]
pub struct ApiError {
    /// Toxiproxy's message, e.g. `proxy not found`.
    pub message: String,
    /// The HTTP status, e.g. 404.
    pub status: u16,
}

impl ApiError {
    pub(crate) fn bad_request(message: String) -> ApiError {
        ApiError {
            message,
            status: 400,
        }
    }
    pub(super) fn missing(field: &str) -> ApiError {
        ApiError::bad_request(format!("missing required field: {field}"))
    }
    pub(super) fn proxy_not_found() -> ApiError {
        ApiError {
            message: "proxy not found".into(),
            status: 404,
        }
    }
    pub(super) fn internal(message: String) -> ApiError {
        ApiError {
            message,
            status: 500,
        }
    }
    pub(super) fn proxy_exists() -> ApiError {
        ApiError {
            message: "proxy already exists".into(),
            status: 409,
        }
    }
    pub(crate) fn invalid_stream() -> ApiError {
        ApiError::bad_request("stream was invalid, can be either upstream or downstream".into())
    }
    pub(crate) fn invalid_toxic_type() -> ApiError {
        ApiError::bad_request("invalid toxic type".into())
    }
    pub(crate) fn toxic_exists() -> ApiError {
        ApiError {
            message: "toxic already exists".into(),
            status: 409,
        }
    }
    pub(super) fn toxic_not_found() -> ApiError {
        ApiError {
            message: "toxic not found".into(),
            status: 404,
        }
    }
    pub(super) fn io(e: std::io::Error) -> ApiError {
        ApiError {
            message: format!("could not listen: {e}"),
            status: 500,
        }
    }
    pub(super) fn to_json(&self) -> Value {
        serde_json::json!({ "error": self.message, "status": self.status })
    }
}
