//! `GET /health`: 204, or 503 `PREWARMING_POOL_DEPLETING` when some environment's idle share
//! of its pool fell below `server.alert.prewarmingpoolthreshold`.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::AppState;
use crate::error::ApiError;

pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/health", get(health))
}

async fn health(State(state): State<AppState>) -> Result<StatusCode, ApiError> {
    let depleting = state.core.depleting_environments(state.config.prewarming_pool_threshold);
    if depleting.is_empty() {
        return Ok(StatusCode::NO_CONTENT);
    }
    let environments = depleting.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    Err(ApiError::PoolDepleting { environments })
}
