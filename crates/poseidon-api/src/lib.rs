//! Poseidon's REST and WebSocket API, exactly as CodeOcean uses it.
//!
//! Handlers parse HTTP into a call on the core's [`Core`] handle and map the outcome back;
//! the mapping of core errors to Poseidon's status codes and JSON bodies lives in [`error`]
//! only. The modules, one per resource:
//!
//! * `health`, `version`, `statistics`: the small read-only routes;
//! * `environments`: `/execution-environments[/{id}]`;
//! * `runners`: claiming and deleting runners, and the "find runner" guard (410 after draining
//!   the body) in front of every `/runners/{id}/…` route;
//! * `files`, `execute`, `websocket`: the runner-scoped routes; the WebSocket session speaks the
//!   wire format of [`ws_protocol`];
//! * `auth`, `logging`, `request`: the `Poseidon-Token` check, one log line per request, and
//!   bounded, Go-compatible decoding of bodies and queries;
//! * `server`: listening (plain or TLS), header timeouts and graceful shutdown.
#![forbid(unsafe_code)]

mod auth;
mod environments;
pub mod error;
mod execute;
mod files;
mod health;
mod logging;
mod request;
mod runners;
mod server;
mod statistics;
mod version;
mod websocket;
pub mod ws_protocol;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::middleware::from_fn;
use poseidon_core::Core;
use tokio_util::task::TaskTracker;

pub use server::{ServeOptions, serve};

/// Settings of the API layer, fixed at start-up.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// The required `Poseidon-Token`; `None` leaves every route open.
    pub token: Option<String>,
    /// Whether clients reach us over TLS: `websocketUrl` then uses `wss`.
    pub tls_active: bool,
    /// `/health` reports environments whose idle share of the pool is below this (0 = off).
    pub prewarming_pool_threshold: f64,
    /// Limit for JSON request bodies (all routes but `PATCH …/files`).
    pub max_body_bytes: usize,
    /// Limit for `PATCH …/files` bodies (base64 file contents).
    pub max_upload_bytes: usize,
    /// What `/version` answers.
    pub version: String,
    /// `host:port` for `websocketUrl` when a request carries no `Host` (HTTP/1.0 clients).
    pub fallback_host: String,
}

impl ApiConfig {
    /// Defaults matching the documented configuration; `fallback_host` is where we listen.
    pub fn new(fallback_host: SocketAddr) -> Self {
        Self {
            token: None,
            tls_active: false,
            prewarming_pool_threshold: 0.0,
            max_body_bytes: 1 << 20,
            max_upload_bytes: 64 << 20,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            fallback_host: fallback_host.to_string(),
        }
    }
}

/// What every handler gets: the core, the settings and the running WebSocket sessions.
#[derive(Clone)]
pub struct AppState {
    pub core: Core,
    pub config: Arc<ApiConfig>,
    /// WebSocket sessions outlive their HTTP request; shutdown waits for them here.
    pub sessions: TaskTracker,
}

impl AppState {
    pub fn new(core: Core, config: ApiConfig) -> Self {
        Self { core, config: Arc::new(config), sessions: TaskTracker::new() }
    }
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").field("config", &self.config).finish_non_exhaustive()
    }
}

/// The whole API under `/api/v1`. Unknown paths get an empty 404 and wrong methods an empty
/// 405, both before authentication (as gorilla/mux does it).
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .merge(health::router())
        .merge(version::router())
        .merge(statistics::router(&state))
        .merge(environments::router(&state))
        .merge(runners::router(&state));
    Router::new()
        .nest("/api/v1", api)
        .fallback(error::not_found)
        .layer(from_fn(logging::log_request))
        .with_state(state)
}
