//! `POST /runners/{id}/execute`: stores a one-shot execution and answers the WebSocket URL that
//! starts it.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Uri, header};
use axum::routing::post;
use axum::{Json, Router};
use poseidon_core::ExecutionRequest;
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::error::ApiError;
use crate::request::read_json;
use crate::runners::{claimed_runner_route, runner_id};

pub(crate) fn router(state: &AppState) -> Router<AppState> {
    Router::new().route("/runners/{runner_id}/execute", claimed_runner_route(post(execute), state))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct ExecuteRequest {
    command: Option<String>,
    privileged_execution: Option<bool>,
    /// Seconds; 0 or missing = no limit, negative = already expired (as in Go).
    time_limit: Option<i64>,
    environment: Option<BTreeMap<String, String>>,
}

impl ExecuteRequest {
    fn into_execution(self) -> Result<ExecutionRequest, ApiError> {
        let command = self.command.unwrap_or_default();
        // Go Poseidon refuses single quotes since it wrapped commands in them; CodeOcean sees
        // this 400, so we keep it.
        if command.contains('\'') {
            return Err(ApiError::BadRequest("use of forbidden character".to_owned()));
        }
        let time_limit = match self.time_limit.unwrap_or_default() {
            0 => None,
            seconds => Some(Duration::from_secs(seconds.max(0).unsigned_abs())),
        };
        Ok(ExecutionRequest {
            command,
            privileged: self.privileged_execution.unwrap_or_default(),
            time_limit,
            environment: self.environment.unwrap_or_default().into_iter().collect(),
        })
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ExecuteResponse {
    websocket_url: String,
}

async fn execute(
    State(state): State<AppState>,
    Path(runner): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ExecuteResponse>, ApiError> {
    let request: ExecuteRequest = read_json(body, state.config.max_body_bytes).await?;
    let runner = runner_id(&runner);
    let execution = state.core.store_execution(&runner, request.into_execution()?)?;
    let scheme = if state.config.tls_active { "wss" } else { "ws" };
    let host = request_host(&headers, &uri).unwrap_or(&state.config.fallback_host);
    let websocket_url =
        format!("{scheme}://{host}/api/v1/runners/{runner}/websocket?executionID={execution}");
    Ok(Json(ExecuteResponse { websocket_url }))
}

/// The host the client addressed, verbatim: the `Host` header (HTTP/1.1) or the URI's
/// authority (HTTP/2).
fn request_host<'a>(headers: &'a HeaderMap, uri: &'a Uri) -> Option<&'a str> {
    headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .filter(|host| !host.is_empty())
        .or_else(|| uri.authority().map(|authority| authority.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_quotes_are_forbidden() {
        let request = ExecuteRequest { command: Some("echo 'hi'".into()), ..Default::default() };
        assert!(matches!(
            request.into_execution(),
            Err(ApiError::BadRequest(message)) if message == "use of forbidden character"
        ));
    }

    #[test]
    fn time_limits_follow_go() {
        let limit = |seconds| {
            ExecuteRequest { time_limit: Some(seconds), ..Default::default() }
                .into_execution()
                .unwrap()
                .time_limit
        };
        assert_eq!(limit(0), None);
        assert_eq!(limit(5), Some(Duration::from_secs(5)));
        assert_eq!(limit(-3), Some(Duration::ZERO));
    }

    #[test]
    fn the_host_header_wins_over_the_fallback() {
        let mut headers = HeaderMap::new();
        let uri: Uri = "/api/v1/runners/x/execute".parse().unwrap();
        assert_eq!(request_host(&headers, &uri), None);
        headers.insert(header::HOST, "poseidon.example:7200".parse().unwrap());
        assert_eq!(request_host(&headers, &uri), Some("poseidon.example:7200"));
    }
}
