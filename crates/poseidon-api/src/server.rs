//! Serving the router on a bound listener, plain or TLS, until a shutdown signal.

use std::future::Future;
use std::io;
use std::time::Duration;

use axum_server::Handle;
use axum_server::accept::NoDelayAcceptor;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};

use crate::{AppState, router};

/// How the listener is driven.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Serve HTTPS/WSS with this configuration instead of plain HTTP.
    pub tls: Option<RustlsConfig>,
    /// A new connection must deliver its first request's headers within this time (Go's
    /// `ReadHeaderTimeout`).
    pub first_request_timeout: Duration,
    /// A kept-alive connection must deliver the next request's headers within this time after
    /// the previous response, or it is closed (Go's `IdleTimeout`).
    pub idle_timeout: Duration,
    /// After the shutdown signal, requests and WebSocket sessions get this long to finish.
    pub shutdown_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            tls: None,
            first_request_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Serves the API on `listener` until `shutdown` completes (with `TCP_NODELAY`: small
/// responses and WebSocket frames must not wait for Nagle's algorithm), then stops accepting and waits up
/// to `shutdown_grace` for running requests and WebSocket sessions (which the HTTP server
/// stops tracking once upgraded).
pub async fn serve(
    listener: std::net::TcpListener,
    state: AppState,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let handle = Handle::new();
    let grace = options.shutdown_grace;
    let drain = tokio::spawn({
        let handle = handle.clone();
        let sessions = state.sessions.clone();
        async move {
            shutdown.await;
            handle.graceful_shutdown(Some(grace));
            sessions.close();
            tracing::info!("shutting down: no new connections");
            if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
                tracing::warn!(sessions = sessions.len(), "WebSocket sessions still running");
            }
        }
    });
    let service = router(state).into_make_service();
    let served = match options.tls {
        None => {
            let mut server =
                axum_server::from_tcp(listener)?.acceptor(NoDelayAcceptor::new()).handle(handle);
            server.http_builder().http1().header_read_timeout(options.idle_timeout);
            server.first_request_timeout(options.first_request_timeout).serve(service).await
        }
        Some(tls) => {
            let acceptor = RustlsAcceptor::new(tls).acceptor(NoDelayAcceptor::new());
            let mut server = axum_server::from_tcp(listener)?.acceptor(acceptor).handle(handle);
            server.http_builder().http1().header_read_timeout(options.idle_timeout);
            server.first_request_timeout(options.first_request_timeout).serve(service).await
        }
    };
    if served.is_err() {
        drain.abort();
    }
    // The drain task only ends after the shutdown signal and the sessions' grace period.
    let _ = drain.await;
    served
}
