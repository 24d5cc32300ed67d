//! Toxiproxy's HTTP API over a [`Registry`], with axum.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;

use super::toxic::Toxic;
use super::{
    add_toxic, remove_toxic, reset_all, set_enabled, update_toxic, ApiError, ProxyBody, ProxyInfo,
    Registry, TOXIPROXY_API_VERSION,
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
    let info = r.create(body(&bytes)?, false).await?;
    Ok(json(StatusCode::CREATED, info.to_json()))
}

async fn populate(State(r): Shared, bytes: Bytes) -> Result<Response, ApiError> {
    let wanted: Vec<ProxyBody> = body(&bytes)?;
    let mut done = Vec::new();
    for p in wanted {
        match r.create(p, true).await {
            Ok(info) => done.push(info.to_json()),
            Err(e) => {
                let mut answer = e.to_json();
                answer["proxies"] = Value::Array(done);
                return Ok(json(
                    StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    answer,
                ));
            }
        }
    }
    Ok(json(
        StatusCode::CREATED,
        serde_json::json!({ "proxies": done }),
    ))
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
    let moved = update
        .upstream
        .as_ref()
        .is_some_and(|u| !u.is_empty() && *u != p.upstream)
        || update
            .listen
            .as_ref()
            .is_some_and(|l| !l.is_empty() && *l != p.listen.to_string());
    if moved {
        // New address or upstream: a new proxy of the same name, with the same toxics.
        let toxics = p.toxics.borrow().clone();
        let info = r
            .create(
                ProxyBody {
                    name: Some(name.clone()),
                    listen: update.listen.or(Some(p.listen.to_string())),
                    upstream: update.upstream.or(Some(p.upstream.clone())),
                    enabled: update.enabled.or(Some(p.enabled())),
                },
                true,
            )
            .await?;
        let new = r.get(&name)?;
        new.toxics.send_replace(toxics);
        return Ok(json(
            StatusCode::OK,
            ProxyInfo {
                toxics: new.toxics.borrow().clone(),
                ..info
            }
            .to_json(),
        ));
    }
    if let Some(enabled) = update.enabled {
        set_enabled(&p, enabled).await?;
    }
    Ok(json(StatusCode::OK, ProxyInfo::of(&p).to_json()))
}

async fn proxy_delete(State(r): Shared, Path(name): Path<String>) -> Result<Response, ApiError> {
    let p = r
        .lock()
        .remove(&name)
        .ok_or_else(ApiError::proxy_not_found)?;
    p.stop();
    Ok(no_content())
}

async fn toxic_index(State(r): Shared, Path(name): Path<String>) -> Result<Response, ApiError> {
    let p = r.get(&name)?;
    let toxics: Vec<Value> = p.toxics.borrow().iter().map(Toxic::to_json).collect();
    Ok(json(StatusCode::OK, Value::Array(toxics)))
}

async fn toxic_create(
    State(r): Shared,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let p = r.get(&name)?;
    let toxic = add_toxic(&p, Toxic::from_json(&bytes)?)?;
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
