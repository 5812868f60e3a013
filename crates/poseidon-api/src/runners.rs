//! `POST /runners` (claim), `DELETE /runners/{id}`, and the guard in front of every route of
//! a claimed runner.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, post};
use axum::{Json, Router};
use poseidon_core::ids::{EnvironmentId, RunnerId};
use serde::{Deserialize, Serialize};

use crate::auth::authenticated;
use crate::error::ApiError;
use crate::request::{drain_body, read_json};
use crate::{AppState, execute, files, websocket};

pub(crate) fn router(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/runners", authenticated(post(claim_runner), state))
        .route("/runners/{runner_id}", claimed_runner_route(delete(delete_runner), state))
        .merge(files::router(state))
        .merge(execute::router(state))
        .merge(websocket::router(state))
}

/// A route of a claimed runner: the token check, then the runner check, then `route`.
pub(crate) fn claimed_runner_route(
    route: MethodRouter<AppState>,
    state: &AppState,
) -> MethodRouter<AppState> {
    let route = route.route_layer(from_fn_with_state(state.clone(), require_claimed_runner));
    authenticated(route, state)
}

/// Unknown, idle and destroyed runners are all 410 Gone, the signal CodeOcean's retry logic
/// keys on. The body is drained first: answering while a keep-alive client is still
/// uploading would break its next request.
async fn require_claimed_runner(
    State(state): State<AppState>,
    Path(raw_id): Path<String>,
    request: Request,
    next: Next,
) -> Response {
    if state.core.has_runner(&runner_id(&raw_id)) {
        return next.run(request).await;
    }
    let limit = state.config.max_body_bytes.max(state.config.max_upload_bytes);
    drain_body(request.into_body(), limit).await;
    ApiError::RunnerGone.into_response()
}

/// Any path segment names a runner; unknown ones are simply not found.
pub(crate) fn runner_id(raw: &str) -> RunnerId {
    match raw.parse() {
        Ok(id) => id,
        Err(never) => match never {},
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct ClaimRequest {
    /// Missing means environment 0, as in Go.
    execution_environment_id: Option<i64>,
    /// Seconds; 0 or missing means the runner never expires on its own.
    inactivity_timeout: Option<u64>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ClaimResponse {
    runner_id: RunnerId,
    mapped_ports: Vec<MappedPort>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct MappedPort {
    exposed_port: u16,
    host_address: String,
}

async fn claim_runner(
    State(state): State<AppState>,
    body: Body,
) -> Result<Json<ClaimResponse>, ApiError> {
    let request: ClaimRequest = read_json(body, state.config.max_body_bytes).await?;
    let environment = EnvironmentId(request.execution_environment_id.unwrap_or_default());
    let timeout = Duration::from_secs(request.inactivity_timeout.unwrap_or_default());
    let runner = state.core.claim(environment, timeout).await?;
    let mapped_ports = runner
        .mapped_ports
        .into_iter()
        .map(|port| MappedPort { exposed_port: port.exposed_port, host_address: port.host_address })
        .collect();
    Ok(Json(ClaimResponse { runner_id: runner.id, mapped_ports }))
}

async fn delete_runner(
    State(state): State<AppState>,
    Path(runner): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.core.destroy_runner(&runner_id(&runner)).await?;
    Ok(StatusCode::NO_CONTENT)
}
