//! A fault-injecting TCP proxy server that speaks **toxiproxy's HTTP API** (2.x: the same
//! paths, JSON fields and status codes) and implements its toxics with toxiproxy's semantics
//! (its `toxics/*.go`, `link.go`, `toxic_collection.go`, `proxy_collection.go`) — for chaos
//! tests where toxiproxy's Go binary is not at hand. Existing toxiproxy clients
//! (`toxiproxy_rust`, `toxiproxy-python`, `toxiproxy-node-client`) drive it unchanged.
//!
//! * Embed it: [`FaultServer::start`] (`"127.0.0.1:0"` for a free port), then create proxies
//!   and toxics over HTTP — with any toxiproxy client or this module's [`FaultClient`] — or
//!   in process with [`FaultServer::create_proxy`], [`FaultServer::add_toxic`], ….
//! * Run it on its own: `cargo run -p etcd-coord-testkit --bin etcd-coord-faults -- --listen
//!   127.0.0.1:8474`.
//!
//! Toxics (see [`ToxicKind`]): toxiproxy's `latency`, `bandwidth`, `slow_close`, `timeout`,
//! `reset_peer`, `slicer`, `limit_data` and `noop`, and two of this crate's own: `blackhole`
//! (hold every byte, close nothing, until removed) and `refuse` (reset new connections at
//! once). Each acts on one stream (`upstream`: client → server; `downstream`, the default:
//! server → client) of every connection, also of connections already open when it is added.
//! As in toxiproxy, a toxic *starts* on a connection when the connection opens or the toxic is
//! added, and draws then whether it acts there (probability `toxicity`); an update of its
//! attributes or toxicity restarts it on every open connection — a new draw, its clock
//! (`timeout`) from zero, what it was delaying let go at once — as does adding a toxic right
//! after it in the same stream, or removing the one right after it. Removing a toxic lets
//! what it holds go on unchanged, except `timeout`, whose removal closes every connection of
//! its proxy, and a `reset_peer` already set off, which resets its connection anyway.
//! `POST /proxies/{name}/reset_connections` (this crate's) resets every open connection of a
//! proxy at once.
//!
//! API: `GET /version`; `POST /reset` (every proxy enabled, every toxic removed; 204);
//! `GET /proxies`; `POST /proxies` (`name`, `listen`, `upstream`, `enabled`; 201, 409 if the
//! name exists, 400 without name or upstream); `POST /populate` (a JSON array of proxies,
//! every entry checked before any is made — 400 `missing required field: name at proxy 2`;
//! a proxy of an existing name whose listen address (resolved) and upstream are the same is
//! left as it is, with its connections, toxics and enabled state; one that differs is
//! stopped and replaced by a new one; 201 with `{"proxies": […]}`);
//! `GET/POST/PATCH/DELETE /proxies/{name}` (`enabled: false` closes every connection and
//! stops listening; a new `listen` or `upstream` closes them and moves the proxy, toxics
//! kept); `GET/POST /proxies/{name}/toxics` (400 for an unknown type or stream, 409 for a
//! taken name); `GET/POST/PATCH/DELETE /proxies/{name}/toxics/{toxic}` (404 for an unknown
//! proxy or toxic). Toxics are listed upstream ones first, each stream in the order its
//! toxics act. Errors are `{"error": …, "status": …}`, as toxiproxy's.

mod api_error;
mod chain;
mod client;
mod http;
pub(crate) mod link;
mod stage;
mod toxic;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex as StdMutex};

use serde_json::Value;
use tokio::task::JoinHandle;

pub use api_error::ApiError;
pub use client::FaultClient;
/// The HTTP method of a [`FaultClient::request`].
pub use hyper::Method;
pub use toxic::{Stream, Toxic, ToxicKind};

use chain::Stamp;
use link::Proxy;

/// The toxiproxy version this server's API follows, as `GET /version` reports it.
pub const TOXIPROXY_API_VERSION: &str = "2.12.0";

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
    /// Its toxics as toxiproxy lists them: the upstream ones, then the downstream ones, each
    /// in the order they act.
    pub toxics: Vec<Toxic>,
}

impl ProxyInfo {
    fn of(p: &Proxy) -> ProxyInfo {
        ProxyInfo {
            name: p.name.clone(),
            listen: p.listen.to_string(),
            upstream: p.upstream.clone(),
            enabled: p.enabled(),
            toxics: listed(&p.toxics.borrow()),
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

/// `toxics` in toxiproxy's order: upstream ones first (stable).
fn listed(toxics: &[Toxic]) -> Vec<Toxic> {
    let mut all = toxics.to_vec();
    all.sort_by_key(|t| t.stream != Stream::Upstream);
    all
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
/// it stops the API and every proxy (resetting their connections with a TCP RST).
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

    /// Creates a proxy (`POST /proxies`).
    async fn create(&self, body: ProxyBody) -> Result<ProxyInfo, ApiError> {
        let name = body
            .name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::missing("name"))?;
        let upstream = body
            .upstream
            .filter(|u| !u.is_empty())
            .ok_or_else(|| ApiError::missing("upstream"))?;
        if self.lock().contains_key(&name) {
            return Err(ApiError::proxy_exists());
        }
        let listen = listen_of(body.listen);
        let proxy = Proxy::start(
            name.clone(),
            &listen,
            upstream,
            body.enabled.unwrap_or(true),
        )
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

    /// Creates or replaces the proxies of `wanted` (`POST /populate`, toxiproxy's
    /// `PopulateJson`): every entry is checked first; then each is made in turn. On an error
    /// part way, the error and the proxies made until then.
    async fn populate(
        &self,
        wanted: Vec<ProxyBody>,
    ) -> Result<Vec<ProxyInfo>, (ApiError, Vec<ProxyInfo>)> {
        for (i, p) in wanted.iter().enumerate() {
            for (field, value) in [("name", &p.name), ("upstream", &p.upstream)] {
                if value.as_deref().is_none_or(str::is_empty) {
                    let e = ApiError::missing(&format!("{field} at proxy {}", i + 1));
                    return Err((e, Vec::new()));
                }
            }
        }
        let mut done = Vec::new();
        for p in wanted {
            match self.add_or_replace(p).await {
                Ok(info) => done.push(info),
                Err(e) => return Err((e, done)),
            }
        }
        Ok(done)
    }

    /// One entry of a populate (toxiproxy's `AddOrReplace`): an existing proxy of the name
    /// with the same listen address and upstream is left as it is; one that differs is
    /// stopped and replaced.
    async fn add_or_replace(&self, body: ProxyBody) -> Result<ProxyInfo, ApiError> {
        let name = body.name.unwrap_or_default();
        let upstream = body.upstream.unwrap_or_default();
        let listen = listen_of(body.listen);
        let existing = self.lock().get(&name).cloned();
        if let Some(existing) = existing {
            if !differs(&existing, &listen, &upstream).await? {
                return Ok(ProxyInfo::of(&existing));
            }
            existing.disable();
        }
        let proxy = Proxy::start(
            name.clone(),
            &listen,
            upstream,
            body.enabled.unwrap_or(true),
        )
        .await
        .map_err(ApiError::io)?;
        let info = ProxyInfo::of(&proxy);
        self.lock().insert(name, proxy);
        Ok(info)
    }
}

/// The listen address of a body: `127.0.0.1:0` (a free loopback port) if none.
fn listen_of(listen: Option<String>) -> String {
    listen
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "127.0.0.1:0".into())
}

/// Whether `listen` (resolved as toxiproxy's `Differs`: `localhost:8080` is `127.0.0.1:8080`)
/// or `upstream` differ from `proxy`'s.
async fn differs(proxy: &Proxy, listen: &str, upstream: &str) -> Result<bool, ApiError> {
    let listen = link::resolve(listen)
        .await
        .map_err(|e| ApiError::internal(format!("cannot resolve {listen}: {e}")))?;
    Ok(listen != proxy.listen || upstream != proxy.upstream)
}

async fn set_enabled(proxy: &Arc<Proxy>, enabled: bool) -> Result<(), ApiError> {
    if enabled {
        proxy.enable().await.map_err(ApiError::io)
    } else {
        proxy.disable();
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
            .create(ProxyBody {
                name: Some(name.into()),
                listen: Some(listen.into()),
                upstream: Some(upstream.into()),
                enabled: Some(true),
            })
            .await
    }

    /// Proxy `name` (`GET /proxies/{name}`).
    ///
    /// # Errors
    /// 404 if there is none.
    pub fn proxy(&self, name: &str) -> Result<ProxyInfo, ApiError> {
        self.registry.get(name).map(|p| ProxyInfo::of(&p))
    }

    /// Enables or disables proxy `name` (disabled: not listening, every connection closed as
    /// toxiproxy closes them: FIN, RST where a `reset_peer` asked for it).
    ///
    /// # Errors
    /// 404 if there is none; 500 if its address cannot be bound again.
    pub async fn set_enabled(&self, name: &str, enabled: bool) -> Result<ProxyInfo, ApiError> {
        let proxy = self.registry.get(name)?;
        set_enabled(&proxy, enabled).await?;
        Ok(ProxyInfo::of(&proxy))
    }

    /// Adds `toxic` to proxy `name`; it starts on open connections at once.
    ///
    /// # Errors
    /// 404 for an unknown proxy; 409 if the proxy has a toxic of that name.
    pub fn add_toxic(&self, name: &str, toxic: Toxic) -> Result<Toxic, ApiError> {
        let proxy = self.registry.get(name)?;
        add_toxic(&proxy, toxic)
    }

    /// Removes toxic `toxic` of proxy `name` (a `timeout` closes every connection of the
    /// proxy as it goes).
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
        link_stamps(proxy).insert(toxic.name.clone(), Stamp::fresh());
        true
    });
    result.map(|()| toxic)
}

fn link_stamps(
    proxy: &Proxy,
) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Stamp>> {
    proxy.stamps.lock().unwrap_or_else(|e| e.into_inner())
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
                let mut stamps = link_stamps(proxy);
                let stamp = stamps.entry(name.to_owned()).or_default();
                *stamp = stamp.updated();
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
        link_stamps(proxy).remove(name);
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
            link_stamps(&p).clear();
            had
        });
        set_enabled(&p, true).await?;
    }
    Ok(())
}
