//! [`FaultClient`]: a small async client of toxiproxy's HTTP API (this crate's server or a
//! real toxiproxy), for tests that drive faults the way users' chaos suites do.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::toxic::{Toxic, ToxicKind};
use super::ApiError;

/// A client of a toxiproxy API at `http://HOST:PORT`.
#[derive(Clone)]
pub struct FaultClient {
    base: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for FaultClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultClient")
            .field("base", &self.base)
            .finish()
    }
}

impl FaultClient {
    /// A client of the API at `base` (`http://HOST:PORT`).
    pub fn new(base: impl Into<String>) -> FaultClient {
        FaultClient {
            base: base.into().trim_end_matches('/').to_owned(),
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Sends one request; the answer's status and JSON body (`Null` when empty).
    ///
    /// # Errors
    /// The API's error (its message and status) for a status of 400 or more; status 0 if the
    /// server could not be reached.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), ApiError> {
        let unreachable = |e: &dyn std::fmt::Display| ApiError {
            message: format!("toxiproxy API unreachable: {e}"),
            status: 0,
        };
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .map_err(|e| unreachable(&e))?;
        let resp = self.http.request(req).await.map_err(|e| unreachable(&e))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(&e))?
            .to_bytes();
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        if status >= 400 {
            return Err(ApiError {
                message: json["error"].as_str().unwrap_or("").to_owned(),
                status,
            });
        }
        Ok((status, json))
    }

    /// Creates proxy `name` on `listen` (`HOST:0`: a free port) forwarding to `upstream`;
    /// returns the address it listens on.
    ///
    /// # Errors
    /// As [`request`](Self::request) (409 if the name is taken).
    pub async fn create_proxy(
        &self,
        name: &str,
        listen: &str,
        upstream: &str,
    ) -> Result<String, ApiError> {
        let (_, p) = self
            .request(
                Method::POST,
                "/proxies",
                Some(serde_json::json!({"name": name, "listen": listen, "upstream": upstream})),
            )
            .await?;
        Ok(p["listen"].as_str().unwrap_or_default().to_owned())
    }

    /// Adds a toxic to proxy `proxy`.
    ///
    /// # Errors
    /// As [`request`](Self::request).
    pub async fn add_toxic(&self, proxy: &str, toxic: &Toxic) -> Result<(), ApiError> {
        self.request(
            Method::POST,
            &format!("/proxies/{proxy}/toxics"),
            Some(toxic.to_json()),
        )
        .await
        .map(|_| ())
    }

    /// Adds a toxic of `kind` to both streams of proxy `proxy`, named `<name>_upstream` and
    /// `<name>_downstream`.
    ///
    /// # Errors
    /// As [`request`](Self::request).
    pub async fn add_both_ways(
        &self,
        proxy: &str,
        name: &str,
        kind: ToxicKind,
    ) -> Result<(), ApiError> {
        for toxic in Toxic::both_ways(name, kind) {
            self.add_toxic(proxy, &toxic).await?;
        }
        Ok(())
    }

    /// Removes toxic `toxic` of proxy `proxy`.
    ///
    /// # Errors
    /// As [`request`](Self::request) (404 if there is none).
    pub async fn remove_toxic(&self, proxy: &str, toxic: &str) -> Result<(), ApiError> {
        self.request(
            Method::DELETE,
            &format!("/proxies/{proxy}/toxics/{toxic}"),
            None,
        )
        .await
        .map(|_| ())
    }

    /// Removes every toxic of proxy `proxy` and enables it.
    ///
    /// # Errors
    /// As [`request`](Self::request).
    pub async fn heal(&self, proxy: &str) -> Result<(), ApiError> {
        let (_, toxics) = self
            .request(Method::GET, &format!("/proxies/{proxy}/toxics"), None)
            .await?;
        for t in toxics.as_array().into_iter().flatten() {
            if let Some(name) = t["name"].as_str() {
                self.remove_toxic(proxy, name).await?;
            }
        }
        self.set_enabled(proxy, true).await
    }

    /// Enables or disables proxy `proxy`.
    ///
    /// # Errors
    /// As [`request`](Self::request).
    pub async fn set_enabled(&self, proxy: &str, enabled: bool) -> Result<(), ApiError> {
        self.request(
            Method::POST,
            &format!("/proxies/{proxy}"),
            Some(serde_json::json!({ "enabled": enabled })),
        )
        .await
        .map(|_| ())
    }

    /// Resets every open connection of proxy `proxy` (this crate's
    /// `POST /proxies/{name}/reset_connections`; a real toxiproxy has no such call).
    ///
    /// # Errors
    /// As [`request`](Self::request).
    pub async fn reset_connections(&self, proxy: &str) -> Result<(), ApiError> {
        self.request(
            Method::POST,
            &format!("/proxies/{proxy}/reset_connections"),
            None,
        )
        .await
        .map(|_| ())
    }
}
