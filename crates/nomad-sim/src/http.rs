//! The HTTP API: routes, the request log, ACL, namespaces, blocking queries and Nomad's
//! plain-text errors.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use serde_json::{Value, json};

use crate::RecordedRequest;
use crate::cluster::Effects;
use crate::driver::Shared;
use crate::events::{self, BatchSource, Cursor, Filter};
use crate::jobspec::{self, JobError};
use crate::{exec, hcl, render};

/// Nomad caps blocking queries at 300 s (`MaxBlockingRPCQueryTime`).
const MAX_WAIT: Duration = Duration::from_secs(300);
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// Lines an event stream may have queued for a slow client.
const STREAM_QUEUE: usize = 64;

pub(crate) type App = Arc<Shared>;

pub(crate) fn router(shared: App) -> Router {
    Router::new()
        .route("/v1/jobs", get(list_jobs).put(register).post(register))
        .route("/v1/jobs/parse", post(parse).put(parse))
        .route("/v1/job/{id}", get(read_job).put(register_at).post(register_at).delete(deregister))
        .route("/v1/job/{id}/allocations", get(job_allocations))
        .route("/v1/allocations", get(list_allocations))
        .route("/v1/allocation/{id}", get(read_allocation))
        .route("/v1/allocation/{id}/stop", post(stop_allocation).put(stop_allocation))
        .route("/v1/evaluation/{id}", get(read_evaluation))
        .route("/v1/event/stream", get(event_stream))
        .route("/v1/client/allocation/{id}/exec", any(exec::handler))
        .route("/v1/status/leader", get(leader))
        .route("/v1/agent/self", get(agent_self))
        .fallback(|| async { text(StatusCode::NOT_FOUND, "resource not found") })
        .method_not_allowed_fallback(|| async {
            text(StatusCode::METHOD_NOT_ALLOWED, "Invalid method")
        })
        .layer(middleware::from_fn_with_state(shared.clone(), authorize))
        .layer(middleware::from_fn_with_state(shared.clone(), record))
        .with_state(shared)
}

/// A plain-text response, as Nomad answers errors.
pub(crate) fn text(status: StatusCode, body: impl Into<String>) -> Response {
    let mut response = (status, body.into()).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// A JSON response with Nomad's query-meta headers.
fn json_at(index: u64, value: &Value) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert("X-Nomad-Index", HeaderValue::from(index));
    headers.insert("X-Nomad-KnownLeader", HeaderValue::from_static("true"));
    headers.insert("X-Nomad-LastContact", HeaderValue::from_static("0"));
    response
}

/// Records method, path and body; bodies over the limit are refused.
async fn record(State(app): State<App>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = match axum::body::to_bytes(body, app.settings.max_body_bytes).await {
        Ok(bytes) => bytes,
        Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large"),
    };
    let path =
        parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_owned(), |p| p.to_string());
    app.record(RecordedRequest {
        method: parts.method.to_string(),
        path,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    });
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}

/// The request's ACL token, from `X-Nomad-Token` or `Authorization: Bearer`.
pub(crate) fn token(headers: &HeaderMap) -> Option<&str> {
    if let Some(token) = headers.get("X-Nomad-Token").and_then(|v| v.to_str().ok()) {
        return Some(token);
    }
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// `None` if allowed, else Nomad's 403 text.
pub(crate) fn denied(app: &Shared, headers: &HeaderMap) -> Option<&'static str> {
    let expected = app.settings.acl_token.as_deref()?;
    match token(headers) {
        Some(given) if given == expected => None,
        Some(_) => Some("ACL token not found"),
        None => Some("Permission denied"),
    }
}

/// Exec checks its token after the WebSocket upgrade, as Nomad does.
async fn authorize(State(app): State<App>, request: Request, next: Next) -> Response {
    let is_exec = request.uri().path().starts_with("/v1/client/allocation/");
    if !is_exec && let Some(reason) = denied(&app, request.headers()) {
        return text(StatusCode::FORBIDDEN, reason);
    }
    next.run(request).await
}

/// Decoded query parameters (repeatable keys kept).
#[derive(Debug, Default)]
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    pub fn parse(raw: Option<&str>) -> Query {
        Query(form_urlencoded::parse(raw.unwrap_or_default().as_bytes()).into_owned().collect())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn all(&self, key: &str) -> Vec<String> {
        self.0.iter().filter(|(k, _)| k == key).map(|(_, v)| v.clone()).collect()
    }

    /// Go's `strconv.ParseBool`; absent is `false`.
    pub fn flag(&self, key: &str) -> Result<bool, String> {
        match self.get(key) {
            None => Ok(false),
            Some(v) => parse_bool(v)
                .ok_or_else(|| format!("Failed to parse value of {key:?} ({v:?}) as a bool")),
        }
    }

    pub fn namespace(&self) -> &str {
        self.get("namespace").filter(|n| !n.is_empty()).unwrap_or("default")
    }
}

pub(crate) fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// A Go duration (`300ms`, `1m30s`).
pub(crate) fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(number * seconds).ok()?;
    }
    Some(total)
}

/// Blocks while the index is not above `?index=` (up to `?wait=`); returns the index.
async fn block(app: &Shared, query: &Query) -> Result<u64, Response> {
    let mut index_rx = app.index.subscribe();
    let Some(min) = query.get("index") else {
        return Ok(*index_rx.borrow());
    };
    let min: u64 = min.parse().map_err(|_| text(StatusCode::BAD_REQUEST, "Invalid index"))?;
    let wait = match query.get("wait") {
        Some(w) => parse_go_duration(w)
            .ok_or_else(|| text(StatusCode::BAD_REQUEST, "Invalid wait time"))?,
        None => DEFAULT_WAIT,
    };
    let wait = wait.min(MAX_WAIT);
    let _ = tokio::time::timeout(wait, index_rx.wait_for(|i| *i > min)).await;
    Ok(*index_rx.borrow())
}

fn job_error(error: JobError) -> Response {
    match error {
        JobError::BadRequest(message) => text(StatusCode::BAD_REQUEST, message),
        JobError::Invalid(message) => text(StatusCode::INTERNAL_SERVER_ERROR, message),
    }
}

async fn register(State(app): State<App>, RawQuery(raw): RawQuery, body: Bytes) -> Response {
    register_job(&app, Query::parse(raw.as_deref()), None, &body)
}

async fn register_at(
    State(app): State<App>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> Response {
    register_job(&app, Query::parse(raw.as_deref()), Some(&id), &body)
}

fn register_job(app: &App, query: Query, path_id: Option<&str>, body: &[u8]) -> Response {
    if body.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Request body is empty");
    }
    let value: Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("Request decode failed: {e}")),
    };
    let spec = match jobspec::from_register_body(&value, path_id, query.get("namespace")) {
        Ok(spec) => spec,
        Err(e) => return job_error(e),
    };
    let result = app.with_cluster(|c| match c.register(spec) {
        Ok((registered, effects)) => (Ok(registered), effects),
        Err(e) => (Err(e), Effects::default()),
    });
    match result {
        Ok(r) => json_at(
            r.index,
            &json!({"EvalID": r.eval_id, "EvalCreateIndex": r.index, "JobModifyIndex": r.index,
                    "Warnings": r.warnings, "Index": r.index, "LastContact": 0,
                    "KnownLeader": false, "NextToken": ""}),
        ),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn parse(State(app): State<App>, body: Bytes) -> Response {
    let _ = app;
    let value: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("Request decode failed: {e}")),
    };
    if let Err(e) = crate::schema::validate("JobsParseRequest", &value) {
        return text(StatusCode::BAD_REQUEST, format!("Request decode failed: {e}"));
    }
    let source = value.get("JobHCL").and_then(Value::as_str).unwrap_or_default();
    if source.trim().is_empty() {
        return text(StatusCode::BAD_REQUEST, "Job spec is empty");
    }
    match hcl::parse_job(source) {
        Ok(job) => json_at(0, &job),
        Err(e) => text(StatusCode::BAD_REQUEST, format!("Failed to parse job: {e}")),
    }
}

async fn list_jobs(State(app): State<App>, RawQuery(raw): RawQuery) -> Response {
    let query = Query::parse(raw.as_deref());
    let index = match block(&app, &query).await {
        Ok(index) => index,
        Err(response) => return response,
    };
    let prefix = query.get("prefix").unwrap_or_default();
    let namespace = query.namespace();
    let with_meta = query.flag("meta").unwrap_or(false);
    let cluster = app.cluster();
    let stubs: Vec<Value> = cluster
        .jobs
        .values()
        .filter(|j| namespace == "*" || j.spec.namespace == namespace)
        .filter(|j| j.spec.id.starts_with(prefix))
        .map(|j| render::job_stub(j, &cluster.summary(&j.spec.namespace, &j.spec.id), with_meta))
        .collect();
    json_at(index, &Value::Array(stubs))
}

async fn read_job(
    State(app): State<App>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let query = Query::parse(raw.as_deref());
    let index = match block(&app, &query).await {
        Ok(index) => index,
        Err(response) => return response,
    };
    let cluster = app.cluster();
    match cluster.jobs.get(&(query.namespace().to_owned(), id)) {
        Some(job) => json_at(index, &render::job(job)),
        None => text(StatusCode::NOT_FOUND, "job not found"),
    }
}

async fn deregister(
    State(app): State<App>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let query = Query::parse(raw.as_deref());
    let purge = match query.flag("purge") {
        Ok(purge) => purge,
        Err(message) => return text(StatusCode::BAD_REQUEST, message),
    };
    let namespace = query.namespace().to_owned();
    let result = app.with_cluster(|c| c.deregister(&namespace, &id, purge));
    json_at(
        result.index,
        &json!({"EvalID": result.eval_id, "EvalCreateIndex": result.index,
                "JobModifyIndex": result.index, "VolumeEvalID": "", "VolumeEvalIndex": 0,
                "Index": result.index, "LastContact": 0, "KnownLeader": false, "NextToken": ""}),
    )
}

async fn job_allocations(
    State(app): State<App>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let query = Query::parse(raw.as_deref());
    let index = match block(&app, &query).await {
        Ok(index) => index,
        Err(response) => return response,
    };
    let all = query.flag("all").unwrap_or(false);
    let namespace = query.namespace();
    let cluster = app.cluster();
    let job = cluster.jobs.get(&(namespace.to_owned(), id.clone()));
    let min_create = if all { 0 } else { job.map_or(0, |j| j.create_index) };
    let job_type = job.and_then(|j| j.spec.value["Type"].as_str()).unwrap_or("service").to_owned();
    let stubs: Vec<Value> = cluster
        .allocs
        .values()
        .filter(|a| a.namespace == namespace && a.job_id == id && a.job_create_index >= min_create)
        .map(|a| render::alloc_stub(a, &job_type, false, true))
        .collect();
    json_at(index, &Value::Array(stubs))
}

async fn list_allocations(State(app): State<App>, RawQuery(raw): RawQuery) -> Response {
    let query = Query::parse(raw.as_deref());
    let index = match block(&app, &query).await {
        Ok(index) => index,
        Err(response) => return response,
    };
    let namespace = query.namespace();
    let with_resources = query.flag("resources").unwrap_or(false);
    let with_states = query.get("task_states").and_then(parse_bool).unwrap_or(true);
    let prefix = query.get("prefix").unwrap_or_default();
    let cluster = app.cluster();
    let stubs: Vec<Value> = cluster
        .allocs
        .values()
        .filter(|a| (namespace == "*" || a.namespace == namespace) && a.id.starts_with(prefix))
        .map(|a| {
            let job_type = cluster.job_type(&a.namespace, &a.job_id);
            render::alloc_stub(a, &job_type, with_resources, with_states)
        })
        .collect();
    json_at(index, &Value::Array(stubs))
}

async fn read_allocation(
    State(app): State<App>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let query = Query::parse(raw.as_deref());
    let index = match block(&app, &query).await {
        Ok(index) => index,
        Err(response) => return response,
    };
    let cluster = app.cluster();
    match cluster.allocs.get(&id) {
        Some(alloc) => json_at(index, &render::alloc(alloc, true)),
        None => text(StatusCode::NOT_FOUND, "alloc not found"),
    }
}

async fn stop_allocation(State(app): State<App>, Path(id): Path<String>) -> Response {
    let result = app.with_cluster(|c| match c.stop(&id) {
        Ok(effects) => (Ok(c.last_eval()), effects),
        Err(e) => (Err(e), Effects::default()),
    });
    match result {
        Ok((eval, index)) => json_at(index, &json!({"EvalID": eval, "Index": index})),
        Err(_) => text(StatusCode::NOT_FOUND, "alloc not found"),
    }
}

async fn read_evaluation(
    State(app): State<App>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let query = Query::parse(raw.as_deref());
    let index = match block(&app, &query).await {
        Ok(index) => index,
        Err(response) => return response,
    };
    let cluster = app.cluster();
    match cluster.evals.get(&id) {
        Some(eval) => json_at(index, &render::eval(eval)),
        None => text(StatusCode::NOT_FOUND, "eval not found"),
    }
}

async fn leader() -> Response {
    json_at(0, &json!("127.0.0.1:4647"))
}

async fn agent_self(State(app): State<App>) -> Response {
    let index = app.cluster().index;
    json_at(
        index,
        &json!({"config": {"Region": "global", "Datacenter": "dc1", "NodeName": crate::cluster::NODE_NAME},
                "member": {"Name": "nomad-sim.global", "Status": "alive"},
                "stats": {"nomad": {"leader": "true", "server": "true"}}}),
    )
}

impl BatchSource for Shared {
    fn read(&self, cursor: Cursor) -> Option<Vec<Arc<events::Batch>>> {
        self.cluster().events.read(cursor)
    }
}

async fn event_stream(State(app): State<App>, RawQuery(raw): RawQuery) -> Response {
    let query = Query::parse(raw.as_deref());
    let index = match query.get("index").map(str::parse::<u64>) {
        None => 0,
        Some(Ok(index)) => index,
        Some(Err(e)) => {
            return text(StatusCode::BAD_REQUEST, format!("Unable to parse index: {e}"));
        }
    };
    let filter = match Filter::parse(&query.all("topic"), query.namespace()) {
        Ok(filter) => filter,
        Err(message) => return text(StatusCode::BAD_REQUEST, message),
    };
    let (cursor, published) = {
        let cluster = app.cluster();
        (cluster.events.start(index), cluster.events.subscribe())
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(STREAM_QUEUE);
    let source: Arc<dyn BatchSource> = app.clone();
    let heartbeat = app.settings.heartbeat;
    let drops = app.stream_drops.subscribe();
    let cancel = app.cancel.clone();
    app.tasks.spawn(async move {
        tokio::select! {
            _ = events::produce(source, cursor, filter, heartbeat, published, drops, tx) => {}
            () = cancel.cancelled() => {}
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok::<_, std::io::Error>(line), rx))
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("5"), None);
        assert_eq!(parse_go_duration(""), None);
    }

    #[test]
    fn repeated_query_keys_are_kept() {
        let query = Query::parse(Some("topic=Job%3A*&topic=Allocation&namespace=poseidon"));
        assert_eq!(query.all("topic"), vec!["Job:*".to_owned(), "Allocation".to_owned()]);
        assert_eq!(query.namespace(), "poseidon");
        assert_eq!(Query::parse(None).namespace(), "default");
    }
}
