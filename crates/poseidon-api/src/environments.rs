//! `/execution-environments[/{id}]`: list, get, create or update, delete.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use poseidon_core::PutOutcome;
use poseidon_core::environment::EnvironmentConfig;
use poseidon_core::ids::EnvironmentId;
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::auth::authenticated;
use crate::error::ApiError;
use crate::request::{QueryParams, parse_go_bool, read_json};

pub(crate) fn router(state: &AppState) -> Router<AppState> {
    let environment = get(get_environment).put(put_environment).delete(delete_environment);
    Router::new()
        .route("/execution-environments", authenticated(get(list_environments), state))
        .route("/execution-environments/{id}", authenticated(environment, state))
}

/// The body of `PUT`; every field may be missing or `null` (Go's zero values), the `id`
/// CodeOcean also sends is ignored in favour of the path's.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct EnvironmentRequest {
    prewarming_pool_size: Option<u32>,
    cpu_limit: Option<u32>,
    memory_limit: Option<u32>,
    image: Option<String>,
    network_access: Option<bool>,
    exposed_ports: Option<Vec<u16>>,
}

impl EnvironmentRequest {
    fn into_config(self, id: EnvironmentId) -> EnvironmentConfig {
        EnvironmentConfig {
            id,
            prewarming_pool_size: self.prewarming_pool_size.unwrap_or_default(),
            cpu_limit: self.cpu_limit.unwrap_or_default(),
            memory_limit: self.memory_limit.unwrap_or_default(),
            image: self.image.unwrap_or_default(),
            network_access: self.network_access.unwrap_or_default(),
            exposed_ports: self.exposed_ports.unwrap_or_default(),
        }
    }
}

/// One environment, with Go's field order.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct EnvironmentResponse {
    prewarming_pool_size: u32,
    cpu_limit: u32,
    memory_limit: u32,
    image: String,
    network_access: bool,
    exposed_ports: Vec<u16>,
    id: EnvironmentId,
}

impl From<EnvironmentConfig> for EnvironmentResponse {
    fn from(config: EnvironmentConfig) -> Self {
        Self {
            prewarming_pool_size: config.prewarming_pool_size,
            cpu_limit: config.cpu_limit,
            memory_limit: config.memory_limit,
            image: config.image,
            network_access: config.network_access,
            exposed_ports: config.exposed_ports,
            id: config.id,
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct EnvironmentList {
    execution_environments: Vec<EnvironmentResponse>,
}

/// The id of the path: Go's route only matches `[0-9]+` (anything else is a plain 404), and
/// a digit string too large for an int is a 400.
fn parse_environment_id(raw: &str) -> Result<EnvironmentId, ApiError> {
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::NotFound);
    }
    raw.parse().map(EnvironmentId).map_err(|_| {
        ApiError::BadRequest(format!("strconv.Atoi: parsing {raw:?}: value out of range"))
    })
}

/// `fetch` only asks to reconcile with the backend's own records; the local backend has none
/// beyond ours, so it is validated and otherwise changes nothing.
fn check_fetch_parameter(query: &QueryParams) -> Result<(), ApiError> {
    match query.get("fetch") {
        Some(value) if !value.is_empty() && parse_go_bool(value).is_none() => {
            Err(ApiError::BadRequest(format!(
                "could not parse fetch parameter: strconv.ParseBool: parsing {value:?}: invalid syntax"
            )))
        }
        _ => Ok(()),
    }
}

async fn list_environments(
    State(state): State<AppState>,
    query: QueryParams,
) -> Result<Json<EnvironmentList>, ApiError> {
    check_fetch_parameter(&query)?;
    let mut environments = state.core.environments();
    environments.sort_by_key(|environment| environment.id);
    let execution_environments = environments.into_iter().map(Into::into).collect();
    Ok(Json(EnvironmentList { execution_environments }))
}

async fn get_environment(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: QueryParams,
) -> Result<Json<EnvironmentResponse>, ApiError> {
    let id = parse_environment_id(&id)?;
    check_fetch_parameter(&query)?;
    let environment = state.core.environment(id).ok_or(ApiError::NotFound)?;
    Ok(Json(environment.into()))
}

/// 201 when the environment is new, 204 when it replaced an existing one; no body either way.
async fn put_environment(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    // Go decodes the body before it looks at the id.
    let id_check = parse_environment_id(&id);
    if let Err(ApiError::NotFound) = id_check {
        return Err(ApiError::NotFound);
    }
    let request: EnvironmentRequest = read_json(body, state.config.max_body_bytes).await?;
    let config = request.into_config(id_check?);
    match state.core.put_environment(config).await? {
        PutOutcome::Created => Ok(StatusCode::CREATED),
        PutOutcome::Updated => Ok(StatusCode::NO_CONTENT),
    }
}

async fn delete_environment(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_environment_id(&id)?;
    state.core.delete_environment(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_ids_follow_gos_route_and_atoi() {
        assert_eq!(parse_environment_id("0").unwrap(), EnvironmentId(0));
        assert_eq!(parse_environment_id("007").unwrap(), EnvironmentId(7));
        assert!(matches!(parse_environment_id("abc"), Err(ApiError::NotFound)));
        assert!(matches!(parse_environment_id("-1"), Err(ApiError::NotFound)));
        assert!(matches!(parse_environment_id("1a"), Err(ApiError::NotFound)));
        assert!(matches!(
            parse_environment_id("99999999999999999999"),
            Err(ApiError::BadRequest(message)) if message.contains("out of range")
        ));
    }

    #[test]
    fn responses_keep_gos_field_order() {
        let config = EnvironmentRequest {
            prewarming_pool_size: Some(1),
            image: Some("img".into()),
            ..Default::default()
        }
        .into_config(EnvironmentId(3));
        assert_eq!(
            serde_json::to_string(&EnvironmentResponse::from(config)).unwrap(),
            r#"{"prewarmingPoolSize":1,"cpuLimit":0,"memoryLimit":0,"image":"img","networkAccess":false,"exposedPorts":[],"id":3}"#
        );
    }
}
