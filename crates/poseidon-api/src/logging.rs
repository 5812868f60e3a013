//! One log line per request: method, path (never the query, which may carry ids), status and
//! duration. User-controlled strings lose CR and LF so that they cannot forge log lines.

use std::time::Instant;

use axum::extract::Request;
use axum::http::header::USER_AGENT;
use axum::middleware::Next;
use axum::response::Response;

pub(crate) async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = sanitize(request.uri().path());
    let user_agent = request
        .headers()
        .get(USER_AGENT)
        .map(|agent| sanitize(&String::from_utf8_lossy(agent.as_bytes())))
        .unwrap_or_default();
    let started = Instant::now();
    let response = next.run(request).await;
    tracing::debug!(
        code = response.status().as_u16(),
        %method,
        %path,
        duration = ?started.elapsed(),
        %user_agent,
        "request"
    );
    response
}

/// `value` without CR and LF.
pub(crate) fn sanitize(value: &str) -> String {
    value.replace(['\r', '\n'], "")
}

#[cfg(test)]
mod tests {
    #[test]
    fn line_breaks_are_stripped() {
        assert_eq!(super::sanitize("a\r\nforged line\n"), "aforged line");
    }
}
