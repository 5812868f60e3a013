//! `GET /version`: the release as a JSON string (CodeOcean shows it to administrators).

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use crate::AppState;

pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/version", get(version))
}

async fn version(State(state): State<AppState>) -> Json<String> {
    Json(state.config.version.clone())
}
