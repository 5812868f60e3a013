//! The one place where failures become Poseidon's status codes and JSON error bodies.
//!
//! CodeOcean branches on the status and on `errorCode` only (never on `message`): 410 drives
//! all its "request a new runner" logic, 500 with `NOMAD_OVERLOAD` means "try again later",
//! 424 is a workspace error, and 400 on a file copy makes it drop its runner.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use poseidon_core::backend::{BackendError, FilesError};
use poseidon_core::{ClaimError, EnvironmentError, FileOpError, RunnerError};
use serde::Serialize;

/// Poseidon's `errorCode` values of server errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// No idle runner: CodeOcean retries later.
    NomadOverload,
    /// Destroying a runner failed.
    NomadInternalServerError,
    PrewarmingPoolDepleting,
    Unknown,
}

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// `404`, empty body: unknown path, environment or malformed environment id.
    #[error("not found")]
    NotFound,
    /// `401`, empty body.
    #[error("missing or wrong Poseidon-Token")]
    Unauthorized,
    /// `400 {"message"}`: a malformed request.
    #[error("{0}")]
    BadRequest(String),
    /// `404 {"message"}` on `POST /runners`; CodeOcean then syncs the environment.
    #[error("execution environment not found")]
    EnvironmentNotFound,
    /// `404 {"message"}` before a WebSocket upgrade.
    #[error("execution id unknown")]
    ExecutionUnknown,
    /// `410 {"message"}`: the runner is not (or no longer) claimed.
    #[error("no runner found with this id")]
    RunnerGone,
    /// `424 {"message"}`.
    #[error("file not found or insufficient permissions")]
    FileNotFound,
    /// `408 {"message"}`: the client sent its body too slowly.
    #[error("reading the request body timed out")]
    BodyTimeout,
    /// `413 {"message"}`.
    #[error("the request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// `503 {"message","errorCode"}` from `/health`.
    #[error("the prewarming pool is depleting: environments {environments}")]
    PoolDepleting { environments: String },
    /// `500 {"message","errorCode"}`.
    #[error("{message}")]
    Server { code: ErrorCode, message: String },
}

impl ApiError {
    /// A `500` with `errorCode` `UNKNOWN`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::Server { code: ErrorCode::Unknown, message: message.into() }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::NotFound | Self::EnvironmentNotFound | Self::ExecutionUnknown => {
                StatusCode::NOT_FOUND
            }
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::RunnerGone => StatusCode::GONE,
            Self::FileNotFound => StatusCode::FAILED_DEPENDENCY,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::PoolDepleting { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Server { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_code(&self) -> Option<ErrorCode> {
        match self {
            Self::PoolDepleting { .. } => Some(ErrorCode::PrewarmingPoolDepleting),
            Self::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Go answers these with no body at all.
    fn has_body(&self) -> bool {
        !matches!(self, Self::NotFound | Self::Unauthorized)
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorBody {
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<ErrorCode>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            // An empty pool is an expected, temporary state; CodeOcean retries.
            Self::Server { code: ErrorCode::NomadOverload, message } => {
                tracing::warn!(message = %message, "request failed");
            }
            Self::Server { code, message } => {
                tracing::error!(?code, message = %message.replace(['\r', '\n'], " "), "request failed");
            }
            _ => {}
        }
        if !self.has_body() {
            return status.into_response();
        }
        let body = ErrorBody { message: self.to_string(), error_code: self.error_code() };
        (status, Json(body)).into_response()
    }
}

/// The fallback of the router: unknown paths get an empty 404.
pub(crate) async fn not_found() -> ApiError {
    ApiError::NotFound
}

impl From<EnvironmentError> for ApiError {
    fn from(error: EnvironmentError) -> Self {
        match error {
            EnvironmentError::NotFound => Self::NotFound,
            other => Self::internal(other.to_string()),
        }
    }
}

impl From<ClaimError> for ApiError {
    fn from(error: ClaimError) -> Self {
        match error {
            ClaimError::UnknownEnvironment => Self::EnvironmentNotFound,
            ClaimError::NoIdleRunner => {
                Self::Server { code: ErrorCode::NomadOverload, message: error.to_string() }
            }
        }
    }
}

impl From<RunnerError> for ApiError {
    fn from(error: RunnerError) -> Self {
        match error {
            RunnerError::Unknown | RunnerError::Backend(BackendError::RunnerGone) => {
                Self::RunnerGone
            }
            // A client error rather than 429: CodeOcean only understands 400/401/410/500.
            RunnerError::TooManyExecutions => Self::BadRequest(error.to_string()),
            RunnerError::Backend(backend) => Self::Server {
                code: ErrorCode::NomadInternalServerError,
                message: backend.to_string(),
            },
        }
    }
}

impl From<FileOpError> for ApiError {
    fn from(error: FileOpError) -> Self {
        match error {
            FileOpError::UnknownRunner => Self::RunnerGone,
            FileOpError::Files(files) => files.into(),
        }
    }
}

impl From<FilesError> for ApiError {
    fn from(error: FilesError) -> Self {
        match error {
            FilesError::NotFound => Self::FileNotFound,
            FilesError::Backend(BackendError::RunnerGone) => Self::RunnerGone,
            FilesError::CopyFailed(details) => {
                Self::internal(format!("file copy failed: {details}"))
            }
            other => Self::internal(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_of(error: ApiError) -> (StatusCode, String) {
        let response = error.into_response();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn error_bodies_have_poseidons_shapes() {
        assert_eq!(body_of(ApiError::NotFound).await, (StatusCode::NOT_FOUND, String::new()));
        assert_eq!(
            body_of(ApiError::Unauthorized).await,
            (StatusCode::UNAUTHORIZED, String::new())
        );
        assert_eq!(
            body_of(ApiError::from(ClaimError::NoIdleRunner)).await,
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                r#"{"message":"no runners available for this execution environment","errorCode":"NOMAD_OVERLOAD"}"#
                    .to_owned()
            )
        );
        assert_eq!(
            body_of(ApiError::RunnerGone).await,
            (StatusCode::GONE, r#"{"message":"no runner found with this id"}"#.to_owned())
        );
        assert_eq!(
            body_of(ApiError::from(FilesError::CopyFailed("x: Cannot open".into()))).await,
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                r#"{"message":"file copy failed: x: Cannot open","errorCode":"UNKNOWN"}"#
                    .to_owned()
            )
        );
    }
}
