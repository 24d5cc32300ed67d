//! Toxiproxy's HTTP API over a [`Registry`], with axum.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;

use super::link::Proxy;
use super::toxic::Toxic;
use super::{
    add_toxic, differs, link_stamps, listed, remove_toxic, reset_all, set_enabled, update_toxic,
    ApiError, ProxyBody, ProxyInfo, Registry, TOXIPROXY_API_VERSION,
};

type Shared = State<Arc<Registry>>;

pub(super) async fn serve(listener: tokio::net::TcpListener, registry: Arc<Registry>) {
    let app = Router::new()
        .route("/version", get(version))
        .route("/reset", post(reset))
        .route("/populate", post(populate))
        .route("/proxies", get(proxy_index).post(proxy_create))
        .route(
            "/proxies/{proxy}",
            get(proxy_show)
                .post(proxy_update)
                .patch(proxy_update)
                .delete(proxy_delete),
        )
        .route(
            "/proxies/{proxy}/toxics",
            get(toxic_index).post(toxic_create),
        )
        .route(
            "/proxies/{proxy}/toxics/{toxic}",
            get(toxic_show)
                .post(toxic_update)
                .patch(toxic_update)
                .delete(toxic_delete),
        )
        .route(
            "/proxies/{proxy}/reset_connections",
            post(reset_connections),
        )
        .with_state(registry);
    let _ = axum::serve(listener, app).await;
}

fn json(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json(
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            self.to_json(),
        )
    }
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("bad request body: {e}")))
}

async fn version() -> Response {
    json(
        StatusCode::OK,
        serde_json::json!({ "version": TOXIPROXY_API_VERSION }),
    )
}

async fn reset(State(r): Shared) -> Result<Response, ApiError> {
    reset_all(&r).await?;
    Ok(no_content())
}

async fn proxy_index(State(r): Shared) -> Response {
    let all: serde_json::Map<String, Value> = r
        .lock()
        .values()
        .map(|p| (p.name.clone(), ProxyInfo::of(p).to_json()))
        .collect();
    json(StatusCode::OK, Value::Object(all))
}

async fn proxy_create(State(r): Shared, bytes: Bytes) -> Result<Response, ApiError> {
    let info = r.create(body(&bytes)?).await?;
    Ok(json(StatusCode::CREATED, info.to_json()))
}

async fn populate(State(r): Shared, bytes: Bytes) -> Result<Response, ApiError> {
    let wanted: Vec<ProxyBody> = body(&bytes)?;
    let json_of =
        |done: Vec<ProxyInfo>| Value::Array(done.iter().map(ProxyInfo::to_json).collect());
    match r.populate(wanted).await {
        Ok(done) => Ok(json(
            StatusCode::CREATED,
            serde_json::json!({ "proxies": json_of(done) }),
        )),
        Err((e, done)) => {
            // toxiproxy answers the error with the proxies made before it.
            let mut answer = e.to_json();
            answer["proxies"] = json_of(done);
            Ok(json(
                StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                answer,
            ))
        }
    }
}

async fn proxy_show(State(r): Shared, Path(name): Path<String>) -> Result<Response, ApiError> {
    let p = r.get(&name)?;
    Ok(json(StatusCode::OK, ProxyInfo::of(&p).to_json()))
}

async fn proxy_update(
    State(r): Shared,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let p = r.get(&name)?;
    let update: ProxyBody = body(&bytes)?;
    // As toxiproxy's `Proxy.Update`: fields not given keep their values.
    let listen = update
        .listen
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| p.listen.to_string());
    let upstream = update
        .upstream
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| p.upstream.clone());
    let enabled = update.enabled.unwrap_or_else(|| p.enabled());
    if differs(&p, &listen, &upstream).await? {
        // A new address or upstream: the proxy stops (its connections closed) and starts
        // anew there — a new proxy of the same name here, with the same toxics.
        p.disable();
        let moved = Proxy::start(name.clone(), &listen, upstream, enabled)
            .await
            .map_err(ApiError::io)?;
        moved.toxics.send_if_modified(|list| {
            *list = p.toxics.borrow().clone();
            *link_stamps(&moved) = link_stamps(&p).clone();
            true
        });
        r.lock().insert(name, moved.clone());
        return Ok(json(StatusCode::OK, ProxyInfo::of(&moved).to_json()));
    }
    if enabled != p.enabled() {
        set_enabled(&p, enabled).await?;
    }
    Ok(json(StatusCode::OK, ProxyInfo::of(&p).to_json()))
}

async fn proxy_delete(State(r): Shared, Path(name): Path<String>) -> Result<Response, ApiError> {
    let p = r
        .lock()
        .remove(&name)
        .ok_or_else(ApiError::proxy_not_found)?;
    p.disable();
    Ok(no_content())
}

async fn toxic_index(State(r): Shared, Path(name): Path<String>) -> Result<Response, ApiError> {
    let p = r.get(&name)?;
    let toxics: Vec<Value> = listed(&p.toxics.borrow())
        .iter()
        .map(Toxic::to_json)
        .collect();
    Ok(json(StatusCode::OK, Value::Array(toxics)))
}

async fn toxic_create(
    State(r): Shared,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let p = r.get(&name)?;
    let taken = |name: &str| p.toxics.borrow().iter().any(|t| t.name == name);
    let toxic = add_toxic(&p, Toxic::from_json(&bytes, taken)?)?;
    Ok(json(StatusCode::OK, toxic.to_json()))
}

async fn toxic_show(
    State(r): Shared,
    Path((name, toxic)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let p = r.get(&name)?;
    let found = p
        .toxics
        .borrow()
        .iter()
        .find(|t| t.name == toxic)
        .map(Toxic::to_json)
        .ok_or_else(ApiError::toxic_not_found)?;
    Ok(json(StatusCode::OK, found))
}

async fn toxic_update(
    State(r): Shared,
    Path((name, toxic)): Path<(String, String)>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let p = r.get(&name)?;
    let updated = update_toxic(&p, &toxic, &bytes)?;
    Ok(json(StatusCode::OK, updated.to_json()))
}

async fn toxic_delete(
    State(r): Shared,
    Path((name, toxic)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let p = r.get(&name)?;
    remove_toxic(&p, &toxic)?;
    Ok(no_content())
}

async fn reset_connections(
    State(r): Shared,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    r.get(&name)?.reset_connections();
    Ok(no_content())
}
