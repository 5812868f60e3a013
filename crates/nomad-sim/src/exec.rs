//! `GET /v1/client/allocation/:id/exec`: Nomad's exec WebSocket over a sandbox process.
//!
//! As in Nomad v1.10: a malformed `tty` or `command` fails the HTTP request (500) before the
//! upgrade; every later error is a close frame (1008, or 1011 for internal errors and
//! missing permission) with the text as reason. A normal end is the `exited` frame followed
//! by dropping the connection, without a close frame.

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use futures::{SinkExt, StreamExt};
use poseidon_sandbox::{ExitInfo, Process, ProcessOutput, ProcessSpec, ProcessStdin, Sandbox};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::driver::Shared;
use crate::http::{App, Query, denied, parse_bool, text};

/// Output chunk size of Nomad's docker exec path.
const CHUNK: usize = 1024;
/// Frames queued towards a slow client.
const OUTGOING_QUEUE: usize = 16;
const POLICY_VIOLATION: u16 = 1008;
const INTERNAL_ERROR: u16 = 1011;

/// What the session was asked to do.
#[derive(Debug)]
struct ExecRequest {
    alloc_id: String,
    task: String,
    tty: bool,
    command: Vec<String>,
    authorized: bool,
    ws_handshake: bool,
}

pub(crate) async fn handler(
    State(app): State<App>,
    Path(alloc_id): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if let Some(response) = check_origin(&headers) {
        return response;
    }
    let query = Query::parse(raw.as_deref());
    let tty = match query.get("tty") {
        None => false,
        Some(value) => match parse_bool(value) {
            Some(tty) => tty,
            None => {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("tty value is not a boolean: {value:?}"),
                );
            }
        },
    };
    let command = match query.get("command") {
        None => Vec::new(),
        Some(json) => match serde_json::from_str::<Vec<String>>(json) {
            Ok(command) => command,
            Err(e) => {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("failed to parse command: {e}"),
                );
            }
        },
    };
    let request = ExecRequest {
        alloc_id,
        task: query.get("task").unwrap_or_default().to_owned(),
        tty,
        command,
        authorized: denied(&app, &headers).is_none(),
        ws_handshake: query.flag("ws_handshake").unwrap_or(false),
    };
    let limit = app.settings.max_exec_frame_bytes;
    upgrade.max_message_size(limit).max_frame_size(limit).on_upgrade(move |socket| async move {
        let cancel = app.cancel.clone();
        let tasks = app.tasks.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = session(app, socket, request) => {}
                () = cancel.cancelled() => {}
            }
        });
    })
}

/// gorilla/websocket's default: an `Origin` must match `Host`.
fn check_origin(headers: &HeaderMap) -> Option<Response> {
    let origin = headers.get(header::ORIGIN)?.to_str().ok()?;
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
    let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    (!origin_host.eq_ignore_ascii_case(host)).then(|| {
        text(StatusCode::FORBIDDEN, "websocket: request origin not allowed by Upgrader.CheckOrigin")
    })
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from(reason) }))
}

/// The sandbox to run in, or the close frame Nomad would send.
fn target(app: &Shared, request: &ExecRequest) -> Result<Arc<Sandbox>, Message> {
    if request.task.is_empty() {
        return Err(close(POLICY_VIOLATION, "must provide task name"));
    }
    let cluster = app.cluster();
    let Some(alloc) = cluster.allocs.get(&request.alloc_id) else {
        return Err(close(POLICY_VIOLATION, &format!("Unknown allocation {:?}", request.alloc_id)));
    };
    if !request.authorized {
        return Err(close(INTERNAL_ERROR, "Permission denied"));
    }
    if alloc.client_terminal() {
        return Err(close(
            POLICY_VIOLATION,
            &format!(
                "exec not possible, client status of allocation {} is {}",
                alloc.id, alloc.client_status
            ),
        ));
    }
    let Some(state) = alloc.task_states.get(&request.task) else {
        if alloc.group.tasks.iter().any(|t| t.name == request.task) {
            return Err(close(
                POLICY_VIOLATION,
                &format!("task {:?} not started yet.", request.task),
            ));
        }
        return Err(close(POLICY_VIOLATION, &format!("unknown task name {:?}", request.task)));
    };
    if state.started_at.is_none() {
        return Err(close(POLICY_VIOLATION, &format!("task {:?} not started yet.", request.task)));
    }
    if state.state != "running" {
        return Err(close(POLICY_VIOLATION, &format!("task {:?} is not running.", request.task)));
    }
    if request.command.is_empty() {
        return Err(close(POLICY_VIOLATION, "command is not present"));
    }
    match (&alloc.sandbox, &app.runtime) {
        (Some(sandbox), _) => Ok(sandbox.clone()),
        (None, None) => Err(close(
            INTERNAL_ERROR,
            "exec is unavailable: the simulator runs without a sandbox runtime",
        )),
        (None, Some(_)) => Err(close(INTERNAL_ERROR, "failed to inspect exec: container is gone")),
    }
}

/// `argv` as one `bash -c` line that execs it unchanged.
fn shell_line(argv: &[String]) -> String {
    let quoted: Vec<String> =
        argv.iter().map(|a| format!("'{}'", a.replace('\'', r"'\''"))).collect();
    format!("exec {}", quoted.join(" "))
}

async fn session(app: Arc<Shared>, socket: WebSocket, mut request: ExecRequest) {
    let (mut sink, mut incoming) = socket.split();
    if request.ws_handshake {
        match handshake(&app, &mut incoming).await {
            Ok(authorized) => request.authorized = authorized,
            Err(frame) => {
                let _ = sink.send(frame).await;
                return;
            }
        }
    }
    let sandbox = match target(&app, &request) {
        Ok(sandbox) => sandbox,
        Err(frame) => {
            let _ = sink.send(frame).await;
            return;
        }
    };
    let spec = ProcessSpec {
        command: shell_line(&request.command),
        privileged: true,
        tty: request.tty,
        ..ProcessSpec::default()
    };
    let process = match sandbox.spawn(spec).await {
        Ok(process) => process,
        Err(e) => {
            let _ = sink.send(close(INTERNAL_ERROR, &format!("failed to create exec: {e}"))).await;
            return;
        }
    };
    let mut unreachable = app.unreachable.subscribe();
    let (outgoing, queue) = mpsc::channel(OUTGOING_QUEUE);
    let writer = tokio::spawn(write_frames(sink, queue));
    tokio::select! {
        () = run(process, incoming, outgoing) => {}
        _ = unreachable.wait_for(|down| *down) => {}
    }
    let _ = writer.await;
}

/// The `ws_handshake=true` first frame: `{"version": 1, "auth_token": "..."}`.
async fn handshake(
    app: &Shared,
    incoming: &mut futures::stream::SplitStream<WebSocket>,
) -> Result<bool, Message> {
    let frame = match incoming.next().await {
        Some(Ok(Message::Text(text))) => serde_json::from_str::<Value>(&text).ok(),
        _ => None,
    };
    let Some(frame) = frame else {
        return Err(close(INTERNAL_ERROR, "failed to read handshake"));
    };
    let version = frame.get("version").and_then(Value::as_i64).unwrap_or(0);
    if version != 1 {
        return Err(close(POLICY_VIOLATION, &format!("unexpected handshake value: {version}")));
    }
    let token = frame.get("auth_token").and_then(Value::as_str).unwrap_or_default();
    Ok(app.settings.acl_token.as_deref().is_none_or(|t| t == token))
}

/// Sends frames in order; a close frame ends the session. After the client is gone the
/// rest is discarded, so the process is never blocked by a dead connection.
async fn write_frames(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut queue: mpsc::Receiver<Message>,
) {
    let mut connected = true;
    while let Some(frame) = queue.recv().await {
        let is_close = matches!(frame, Message::Close(_));
        if connected && sink.send(frame).await.is_err() {
            connected = false;
        }
        if is_close {
            connected = false;
        }
    }
    // Dropping the sink (and with it the connection) without a close frame is how Nomad
    // ends a session.
}

/// Pumps stdin and output until the process ends; then the exit frame.
async fn run(
    mut process: Process,
    incoming: futures::stream::SplitStream<WebSocket>,
    outgoing: mpsc::Sender<Message>,
) {
    let stdin = process.stdin.take();
    let stdout = process.stdout.take();
    let stderr = process.stderr.take();
    // A JoinSet aborts the reader when dropped, also when the session is cancelled.
    let mut input = tokio::task::JoinSet::new();
    input.spawn(read_client(incoming, stdin, outgoing.clone()));
    let output = async {
        tokio::join!(
            pump(stdout, "stdout", outgoing.clone()),
            pump(stderr, "stderr", outgoing.clone())
        )
    };
    let (_, exit) = tokio::join!(output, process.wait());
    input.abort_all();
    let frame = match exit {
        Ok(info) => Message::Text(Utf8Bytes::from(exited_frame(info).to_string())),
        Err(_) => close(INTERNAL_ERROR, "failed to inspect exec: container is gone"),
    };
    let _ = outgoing.send(frame).await;
}

/// `{"exited":true,"result":{}}`; the exit code is omitted when 0.
fn exited_frame(info: ExitInfo) -> Value {
    let code = info.shell_code();
    let result = if code == 0 { json!({}) } else { json!({"exit_code": code}) };
    json!({"exited": true, "result": result})
}

async fn pump(output: Option<ProcessOutput>, name: &str, outgoing: mpsc::Sender<Message>) {
    let Some(mut output) = output else { return };
    let mut buffer = [0u8; CHUNK];
    loop {
        match output.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let frame = json!({name: {"data": STANDARD.encode(&buffer[..n])}});
                if outgoing.send(Message::Text(Utf8Bytes::from(frame.to_string()))).await.is_err() {
                    return;
                }
            }
        }
    }
    let frame = json!({name: {"close": true}});
    let _ = outgoing.send(Message::Text(Utf8Bytes::from(frame.to_string()))).await;
}

/// Client frames: stdin data and close, `tty_size` (accepted, the PTY keeps its size) and
/// heartbeats. A disconnect leaves the process running, as Nomad does.
async fn read_client(
    mut incoming: futures::stream::SplitStream<WebSocket>,
    mut stdin: Option<ProcessStdin>,
    outgoing: mpsc::Sender<Message>,
) {
    while let Some(Ok(message)) = incoming.next().await {
        let text = match message {
            Message::Text(text) => text,
            Message::Close(_) => return,
            _ => continue,
        };
        let Ok(frame) = serde_json::from_str::<Value>(&text) else {
            let _ = outgoing.send(close(INTERNAL_ERROR, "invalid character in exec frame")).await;
            return;
        };
        if frame.get("setup").is_some() {
            let _ = outgoing.send(close(INTERNAL_ERROR, "unexpected message type")).await;
            return;
        }
        let Some(input) = frame.get("stdin") else { continue };
        if let Some(data) = input.get("data").and_then(Value::as_str) {
            let Ok(bytes) = STANDARD.decode(data) else {
                let _ = outgoing.send(close(INTERNAL_ERROR, "illegal base64 data in stdin")).await;
                return;
            };
            if let Some(pipe) = stdin.as_mut()
                && pipe.write_all(&bytes).await.is_err()
            {
                stdin = None;
            }
        }
        if input.get("close").and_then(Value::as_bool) == Some(true)
            && let Some(mut pipe) = stdin.take()
        {
            let _ = pipe.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_is_quoted_for_bash() {
        let argv = ["/bin/bash".to_owned(), "-c".to_owned(), "echo 'hi' $X".to_owned()];
        assert_eq!(shell_line(&argv), r#"exec '/bin/bash' '-c' 'echo '\''hi'\'' $X'"#);
    }

    #[test]
    fn exit_code_zero_is_omitted() {
        let ok = ExitInfo { code: Some(0), signal: None, oom_killed: false };
        assert_eq!(exited_frame(ok), json!({"exited": true, "result": {}}));
        let killed = ExitInfo { code: None, signal: Some(9), oom_killed: false };
        assert_eq!(exited_frame(killed), json!({"exited": true, "result": {"exit_code": 137}}));
    }
}
