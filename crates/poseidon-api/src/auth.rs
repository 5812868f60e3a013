//! The `Poseidon-Token` check, in front of every route except `/health` and `/version`
//! (including the WebSocket upgrade, where CodeOcean sends the header too).

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;

use crate::AppState;
use crate::error::ApiError;

/// `route` with the token check on its methods only: a wrong method still gets an empty 405
/// without a token, as gorilla/mux answers before any middleware.
pub(crate) fn authenticated(
    route: MethodRouter<AppState>,
    state: &AppState,
) -> MethodRouter<AppState> {
    route.route_layer(from_fn_with_state(state.clone(), require_token))
}

pub(crate) const TOKEN_HEADER: &str = "Poseidon-Token";

async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.config.token
        && !token_matches(request.headers().get(TOKEN_HEADER), token)
    {
        tracing::warn!(
            path = %crate::logging::sanitize(request.uri().path()),
            "request with a missing or wrong Poseidon-Token"
        );
        return ApiError::Unauthorized.into_response();
    }
    next.run(request).await
}

fn token_matches(given: Option<&HeaderValue>, expected: &str) -> bool {
    given.is_some_and(|given| constant_time_eq(given.as_bytes(), expected.as_bytes()))
}

/// Compares without an early exit on the first differing byte, so response times do not tell
/// an attacker how much of a guess was right (the length is not secret, as in Go's `subtle`).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_must_match_exactly() {
        let header = |s: &str| HeaderValue::from_str(s).unwrap();
        assert!(token_matches(Some(&header("secret")), "secret"));
        assert!(!token_matches(Some(&header("secreT")), "secret"));
        assert!(!token_matches(Some(&header("secret2")), "secret"));
        assert!(!token_matches(Some(&header("")), "secret"));
        assert!(!token_matches(None, "secret"));
    }
}
