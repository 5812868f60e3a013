//! `GET /statistics/execution-environments`: pool and usage counts, keyed by the environment
//! id as a string.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::AppState;
use crate::auth::authenticated;

pub(crate) fn router(state: &AppState) -> Router<AppState> {
    Router::new().route("/statistics/execution-environments", authenticated(get(statistics), state))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EnvironmentStatistics {
    id: i64,
    prewarming_pool_size: u32,
    idle_runners: usize,
    used_runners: usize,
}

async fn statistics(
    State(state): State<AppState>,
) -> Json<BTreeMap<String, EnvironmentStatistics>> {
    let statistics = state
        .core
        .statistics()
        .into_iter()
        .map(|s| {
            let entry = EnvironmentStatistics {
                id: s.id.0,
                prewarming_pool_size: s.prewarming_pool_size,
                idle_runners: s.idle_runners,
                used_runners: s.used_runners,
            };
            (s.id.to_string(), entry)
        })
        .collect();
    Json(statistics)
}
