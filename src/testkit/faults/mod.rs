//! A fault-injecting TCP proxy server that speaks **toxiproxy's HTTP API** (2.x: the same
//! paths, JSON fields and status codes) and implements its toxics with toxiproxy's semantics —
//! for chaos tests where toxiproxy's Go binary is not at hand. Existing toxiproxy clients
//! (`toxiproxy_rust`, `toxiproxy-python`, `toxiproxy-node-client`) drive it unchanged.
//!
//! * Embed it: [`FaultServer::start`] (`"127.0.0.1:0"` for a free port), then create proxies
//!   and toxics over HTTP — with any toxiproxy client or this module's [`FaultClient`] — or
//!   in process with [`FaultServer::create_proxy`], [`FaultServer::add_toxic`], ….
//! * Run it on its own: `cargo run --features testkit --bin etcd-coord-faults -- --listen
//!   127.0.0.1:8474`.
//!
//! Toxics (see [`Kind`]): toxiproxy's `latency`, `bandwidth`, `slow_close`, `timeout`,
//! `reset_peer`, `slicer`, `limit_data`, and two of this crate's own: `blackhole` (hold every
//! byte, close nothing, until removed) and `refuse` (reset new connections at once). Each acts
//! on one stream (`upstream`: client → server; `downstream`, the default: server → client) of
//! every connection — also of connections already open when it is added — with probability
//! `toxicity`, drawn once per connection. `POST /proxies/{name}/reset_connections` (this
//! crate's) resets every open connection of a proxy at once.
//!
//! API: `GET /version`; `POST /reset` (every proxy enabled, every toxic removed; 204);
//! `GET /proxies`; `POST /proxies` (`name`, `listen`, `upstream`, `enabled`; 201, 409 if the
//! name exists, 400 without name or upstream); `POST /populate` (a JSON array of proxies;
//! 201 with `{"proxies": […]}`; existing ones with other settings are replaced);
//! `GET/POST/PATCH/DELETE /proxies/{name}` (`enabled: false` closes every connection and
//! stops listening); `GET/POST /proxies/{name}/toxics` (400 for an unknown type or stream,
//! 409 for a taken name); `GET/POST/PATCH/DELETE /proxies/{name}/toxics/{toxic}` (404 for an
//! unknown proxy or toxic). Errors are `{"error": …, "status": …}`, as toxiproxy's.

mod client;
mod http;
pub(crate) mod link;
mod toxic;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex as StdMutex};

use serde_json::Value;
use tokio::task::JoinHandle;

pub use client::FaultClient;
/// The HTTP method of a [`FaultClient::request`].
pub use hyper::Method;
pub use toxic::{Kind, Stream, Toxic};

use link::Proxy;

/// The toxiproxy version this server's API follows, as `GET /version` reports it.
pub const TOXIPROXY_API_VERSION: &str = "2.12.0";

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
    fn missing(field: &str) -> ApiError {
        ApiError::bad_request(format!("missing required field: {field}"))
    }
    fn proxy_not_found() -> ApiError {
        ApiError {
            message: "proxy not found".into(),
            status: 404,
        }
    }
    fn proxy_exists() -> ApiError {
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
    fn toxic_exists() -> ApiError {
        ApiError {
            message: "toxic already exists".into(),
            status: 409,
        }
    }
    fn toxic_not_found() -> ApiError {
        ApiError {
            message: "toxic not found".into(),
            status: 404,
        }
    }
    fn io(e: std::io::Error) -> ApiError {
        ApiError {
            message: format!("could not listen: {e}"),
            status: 500,
        }
    }
    fn to_json(&self) -> Value {
        serde_json::json!({ "error": self.message, "status": self.status })
    }
}

/// A proxy as the API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyInfo {
    /// Its name.
    pub name: String,
    /// The address it listens on (`HOST:PORT`, the port it really bound).
    pub listen: String,
    /// Where it forwards to.
    pub upstream: String,
    /// Whether it accepts connections.
    pub enabled: bool,
    /// Its toxics, in the order they act.
    pub toxics: Vec<Toxic>,
}

impl ProxyInfo {
    fn of(p: &Proxy) -> ProxyInfo {
        ProxyInfo {
            name: p.name.clone(),
            listen: p.listen.to_string(),
            upstream: p.upstream.clone(),
            enabled: p.enabled(),
            toxics: p.toxics.borrow().clone(),
        }
    }

    fn to_json(&self) -> Value {
        serde_json::json!({
            "name": self.name,
            "listen": self.listen,
            "upstream": self.upstream,
            "enabled": self.enabled,
            "toxics": self.toxics.iter().map(Toxic::to_json).collect::<Vec<_>>(),
        })
    }
}

/// A proxy as JSON comes in (`POST /proxies`, `/populate`, updates).
#[derive(Debug, Default, serde::Deserialize)]
struct ProxyBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    listen: Option<String>,
    #[serde(default)]
    upstream: Option<String>,
    #[serde(default)]
    enabled: Option<bool>,
}

/// The proxies of a server, by name.
#[derive(Default)]
struct Registry {
    proxies: StdMutex<BTreeMap<String, Arc<Proxy>>>,
}

/// A toxiproxy-compatible fault server: its proxies and, once started, its HTTP API. Dropping
/// it stops the API and every proxy (resetting their connections).
pub struct FaultServer {
    registry: Arc<Registry>,
    api: SocketAddr,
    serving: JoinHandle<()>,
}

impl std::fmt::Debug for FaultServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultServer")
            .field("api", &self.api)
            .field("proxies", &self.proxies().len())
            .finish()
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.serving.abort();
        let proxies = std::mem::take(&mut *self.registry.lock());
        for p in proxies.values() {
            p.stop();
        }
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Proxy>>> {
        self.proxies.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, name: &str) -> Result<Arc<Proxy>, ApiError> {
        self.lock()
            .get(name)
            .cloned()
            .ok_or_else(ApiError::proxy_not_found)
    }

    async fn create(&self, body: ProxyBody, replace: bool) -> Result<ProxyInfo, ApiError> {
        let name = body
            .name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::missing("name"))?;
        let upstream = body
            .upstream
            .filter(|u| !u.is_empty())
            .ok_or_else(|| ApiError::missing("upstream"))?;
        let listen = body
            .listen
            .filter(|l| !l.is_empty())
            .unwrap_or_else(|| "127.0.0.1:0".into());
        let enabled = body.enabled.unwrap_or(true);
        let existing = self.lock().get(&name).cloned();
        if let Some(existing) = existing {
            let same = existing.upstream == upstream
                && (listen == existing.listen.to_string() || listen.ends_with(":0"));
            if !replace {
                return Err(ApiError::proxy_exists());
            }
            if same {
                set_enabled(&existing, enabled).await?;
                return Ok(ProxyInfo::of(&existing));
            }
            self.lock().remove(&name);
            existing.stop();
            drop(existing);
        }
        let proxy = Proxy::start(name.clone(), &listen, upstream, enabled)
            .await
            .map_err(ApiError::io)?;
        let info = ProxyInfo::of(&proxy);
        let mut proxies = self.lock();
        if proxies.contains_key(&name) {
            return Err(ApiError::proxy_exists());
        }
        proxies.insert(name, proxy);
        Ok(info)
    }
}

async fn set_enabled(proxy: &Arc<Proxy>, enabled: bool) -> Result<(), ApiError> {
    if enabled {
        proxy.enable().await.map_err(ApiError::io)
    } else {
        proxy.stop();
        Ok(())
    }
}

impl FaultServer {
    /// Starts the API on `listen` (`HOST:PORT`; port 0 picks a free one).
    ///
    /// # Errors
    /// If `listen` cannot be bound.
    pub async fn start(listen: &str) -> Result<FaultServer, super::TestkitError> {
        let registry = Arc::new(Registry::default());
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let api = listener.local_addr()?;
        let serving = tokio::spawn(http::serve(listener, Arc::clone(&registry)));
        Ok(FaultServer {
            registry,
            api,
            serving,
        })
    }

    /// The API's address.
    pub fn api_addr(&self) -> SocketAddr {
        self.api
    }

    /// The API's base URL, `http://HOST:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.api)
    }

    /// Serves until the task is aborted or the process ends (for the standalone binary).
    pub async fn wait(&mut self) {
        let _ = (&mut self.serving).await;
    }

    /// Every proxy (`GET /proxies`).
    pub fn proxies(&self) -> Vec<ProxyInfo> {
        self.registry
            .lock()
            .values()
            .map(|p| ProxyInfo::of(p))
            .collect()
    }

    /// Creates proxy `name` listening on `listen` (port 0: a free one) and forwarding to
    /// `upstream` (`POST /proxies`).
    ///
    /// # Errors
    /// 409 if the name is taken; 400 for an empty name or upstream; 500 if `listen` cannot be
    /// bound.
    pub async fn create_proxy(
        &self,
        name: &str,
        listen: &str,
        upstream: &str,
    ) -> Result<ProxyInfo, ApiError> {
        self.registry
            .create(
                ProxyBody {
                    name: Some(name.into()),
                    listen: Some(listen.into()),
                    upstream: Some(upstream.into()),
                    enabled: Some(true),
                },
                false,
            )
            .await
    }

    /// Proxy `name` (`GET /proxies/{name}`).
    ///
    /// # Errors
    /// 404 if there is none.
    pub fn proxy(&self, name: &str) -> Result<ProxyInfo, ApiError> {
        self.registry.get(name).map(|p| ProxyInfo::of(&p))
    }

    /// Enables or disables proxy `name` (disabled: not listening, every connection closed).
    ///
    /// # Errors
    /// 404 if there is none; 500 if its address cannot be bound again.
    pub async fn set_enabled(&self, name: &str, enabled: bool) -> Result<ProxyInfo, ApiError> {
        let proxy = self.registry.get(name)?;
        set_enabled(&proxy, enabled).await?;
        Ok(ProxyInfo::of(&proxy))
    }

    /// Adds `toxic` to proxy `name`; it acts on open connections at once.
    ///
    /// # Errors
    /// 404 for an unknown proxy; 409 if the proxy has a toxic of that name.
    pub fn add_toxic(&self, name: &str, toxic: Toxic) -> Result<Toxic, ApiError> {
        let proxy = self.registry.get(name)?;
        add_toxic(&proxy, toxic)
    }

    /// Removes toxic `toxic` of proxy `name`.
    ///
    /// # Errors
    /// 404 for an unknown proxy or toxic.
    pub fn remove_toxic(&self, name: &str, toxic: &str) -> Result<(), ApiError> {
        let proxy = self.registry.get(name)?;
        remove_toxic(&proxy, toxic)
    }

    /// Resets (TCP RST) every open connection of proxy `name`; new ones are served as before.
    ///
    /// # Errors
    /// 404 for an unknown proxy.
    pub fn reset_connections(&self, name: &str) -> Result<(), ApiError> {
        self.registry.get(name)?.reset_connections();
        Ok(())
    }

    /// Enables every proxy and removes every toxic (`POST /reset`).
    ///
    /// # Errors
    /// 500 if a disabled proxy's address cannot be bound again.
    pub async fn reset(&self) -> Result<(), ApiError> {
        reset_all(&self.registry).await
    }
}

fn add_toxic(proxy: &Proxy, toxic: Toxic) -> Result<Toxic, ApiError> {
    let mut result = Ok(());
    proxy.toxics.send_if_modified(|list| {
        if list.iter().any(|t| t.name == toxic.name) {
            result = Err(ApiError::toxic_exists());
            return false;
        }
        list.push(toxic.clone());
        true
    });
    result.map(|()| toxic)
}

fn update_toxic(proxy: &Proxy, name: &str, body: &[u8]) -> Result<Toxic, ApiError> {
    let mut result = Err(ApiError::toxic_not_found());
    proxy.toxics.send_if_modified(|list| {
        let Some(t) = list.iter_mut().find(|t| t.name == name) else {
            return false;
        };
        match t.updated(body) {
            Ok(new) => {
                *t = new.clone();
                result = Ok(new);
                true
            }
            Err(e) => {
                result = Err(e);
                false
            }
        }
    });
    result
}

fn remove_toxic(proxy: &Proxy, name: &str) -> Result<(), ApiError> {
    let mut found = false;
    proxy.toxics.send_if_modified(|list| {
        let before = list.len();
        list.retain(|t| t.name != name);
        found = list.len() != before;
        found
    });
    if found {
        Ok(())
    } else {
        Err(ApiError::toxic_not_found())
    }
}

async fn reset_all(registry: &Registry) -> Result<(), ApiError> {
    let proxies: Vec<Arc<Proxy>> = registry.lock().values().cloned().collect();
    for p in proxies {
        p.toxics.send_if_modified(|list| {
            let had = !list.is_empty();
            list.clear();
            had
        });
        set_enabled(&p, true).await?;
    }
    Ok(())
}
