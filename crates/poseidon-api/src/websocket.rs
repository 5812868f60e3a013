//! `GET /runners/{id}/websocket?executionID=…`: starts a stored execution and streams it.
//!
//! The session is one `select!` loop over [`Event`]s (a client frame, room in the execution's
//! stdin, an execution event). The loop is the only writer of the socket, and it reads the
//! next execution event only after the previous frame was written: a slow client slows the
//! execution down instead of making us buffer. Client frames are always read, so that a
//! client's close is noticed even when the program does not read its input; input the
//! program has not taken yet waits in a bounded queue, and input beyond it is dropped.

use std::collections::VecDeque;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{
    CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code,
    rejection::WebSocketUpgradeRejection,
};
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use futures::SinkExt;
use poseidon_core::ids::{ExecutionId, RunnerId};
use poseidon_core::{Core, ERROR_GENERIC, ExecutionEvent, RunningExecution};
use tokio::sync::mpsc::OwnedPermit;
use tokio::sync::mpsc::error::SendError;

use crate::AppState;
use crate::error::ApiError;
use crate::request::QueryParams;
use crate::runners::{claimed_runner_route, runner_id};
use crate::ws_protocol::{ServerMessage, Utf8Decoder};

/// Socket read buffer per session: clients send short stdin lines, and hundreds of sessions
/// at once must not hold tungstenite's default 128 KiB each.
const READ_BUFFER_BYTES: usize = 8 * 1024;
/// Largest client frame/message we accept (stdin lines are small).
const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// A client that does not take a frame within this time is considered gone.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long we wait for the client's reply to our close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Input the program has not read yet; more is dropped (only a program that never reads its
/// input while the client keeps typing gets there).
const MAX_PENDING_STDIN_BYTES: usize = 1 << 20;

pub(crate) fn router(state: &AppState) -> Router<AppState> {
    Router::new().route("/runners/{runner_id}/websocket", claimed_runner_route(get(connect), state))
}

/// Checks the execution id before upgrading (404 otherwise), then hands the socket to a
/// session that the server's shutdown can wait for.
async fn connect(
    State(state): State<AppState>,
    Path(runner): Path<String>,
    query: QueryParams,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let runner = runner_id(&runner);
    let execution = query
        .get("executionID")
        .and_then(|id| id.parse::<ExecutionId>().ok())
        .filter(|id| state.core.has_execution(&runner, *id))
        .ok_or(ApiError::ExecutionUnknown)?;
    let upgrade = upgrade.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let core = state.core.clone();
    let sessions = state.sessions.clone();
    let upgrade = upgrade
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES);
    Ok(upgrade.on_upgrade(move |socket| {
        sessions.track_future(run_session(socket, core, runner, execution))
    }))
}

async fn run_session(mut socket: WebSocket, core: Core, runner: RunnerId, execution: ExecutionId) {
    if send(&mut socket, &ServerMessage::Start).await.is_err() {
        return;
    }
    match core.start_execution(&runner, execution).await {
        Ok(running) => Session::new(socket, running).run().await,
        Err(error) => {
            tracing::warn!(runner_id = %runner, %error, "cannot start the execution");
            if send(&mut socket, &ServerMessage::Error(ERROR_GENERIC.to_owned())).await.is_ok() {
                close_normally(&mut socket).await;
            }
        }
    }
}

/// What the session loop reacts to.
enum Event {
    /// A frame from the client; `None` or an error means the connection is gone.
    Client(Option<Result<Message, axum::Error>>),
    /// The execution's stdin has room for the oldest pending input (or is closed).
    StdinReady(Result<OwnedPermit<Bytes>, SendError<()>>),
    /// Output or the end of the execution; `None` after the terminal event.
    Execution(Option<ExecutionEvent>),
}

/// Whether the session goes on after an event.
enum Flow {
    Continue,
    End,
}

struct Session {
    socket: WebSocket,
    execution: RunningExecution,
    /// Client input waiting for room in stdin, oldest first.
    pending_stdin: VecDeque<Bytes>,
    /// The bytes in `pending_stdin`, at most `MAX_PENDING_STDIN_BYTES`.
    pending_bytes: usize,
    stdout: Utf8Decoder,
    stderr: Utf8Decoder,
}

impl Session {
    fn new(socket: WebSocket, execution: RunningExecution) -> Self {
        Self {
            socket,
            execution,
            pending_stdin: VecDeque::new(),
            pending_bytes: 0,
            stdout: Utf8Decoder::default(),
            stderr: Utf8Decoder::default(),
        }
    }

    async fn run(mut self) {
        loop {
            let stdin = self.execution.stdin.clone();
            let event = tokio::select! {
                frame = self.socket.recv() => Event::Client(frame),
                permit = stdin.reserve_owned(), if !self.pending_stdin.is_empty() => {
                    Event::StdinReady(permit)
                }
                event = self.execution.next_event() => Event::Execution(event),
            };
            if let Flow::End = self.handle(event).await {
                return;
            }
        }
    }

    async fn handle(&mut self, event: Event) -> Flow {
        match event {
            Event::Client(Some(Ok(Message::Text(text)))) => self.hold_stdin(Bytes::from(text)),
            // CodeOcean only sends text; binary input is taken as raw stdin bytes as well.
            Event::Client(Some(Ok(Message::Binary(bytes)))) => self.hold_stdin(bytes),
            // Pongs to pings are answered by the socket itself.
            Event::Client(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => Flow::Continue,
            // The client closed or vanished: dropping the session stops the execution.
            Event::Client(Some(Ok(Message::Close(_)))) => {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.socket.close()).await;
                Flow::End
            }
            Event::Client(None | Some(Err(_))) => Flow::End,
            Event::StdinReady(Ok(permit)) => {
                if let Some(input) = self.pending_stdin.pop_front() {
                    self.pending_bytes -= input.len();
                    permit.send(input);
                }
                Flow::Continue
            }
            // The process no longer reads stdin; its end arrives as an execution event.
            Event::StdinReady(Err(_)) => {
                self.pending_stdin.clear();
                self.pending_bytes = 0;
                Flow::Continue
            }
            Event::Execution(Some(ExecutionEvent::Stdout(bytes))) => {
                let text = self.stdout.decode(&bytes);
                self.send_output(ServerMessage::Stdout(text)).await
            }
            Event::Execution(Some(ExecutionEvent::Stderr(bytes))) => {
                let text = self.stderr.decode(&bytes);
                self.send_output(ServerMessage::Stderr(text)).await
            }
            Event::Execution(Some(ExecutionEvent::Exit(code))) => {
                self.finish(ServerMessage::Exit(code)).await
            }
            Event::Execution(Some(ExecutionEvent::Timeout)) => {
                self.finish(ServerMessage::Timeout).await
            }
            Event::Execution(Some(ExecutionEvent::Error(message))) => {
                self.finish(ServerMessage::Error(message)).await
            }
            Event::Execution(None) => {
                self.finish(ServerMessage::Error(ERROR_GENERIC.to_owned())).await
            }
        }
    }

    fn hold_stdin(&mut self, input: Bytes) -> Flow {
        if self.pending_bytes + input.len() > MAX_PENDING_STDIN_BYTES {
            tracing::debug!(bytes = input.len(), "input dropped: the program does not read it");
        } else if !input.is_empty() {
            self.pending_bytes += input.len();
            self.pending_stdin.push_back(input);
        }
        Flow::Continue
    }

    /// Sends an output frame unless it is empty (a chunk that only started a character).
    async fn send_output(&mut self, message: ServerMessage) -> Flow {
        let empty = matches!(&message, ServerMessage::Stdout(text) | ServerMessage::Stderr(text) if text.is_empty());
        if empty || send(&mut self.socket, &message).await.is_ok() {
            Flow::Continue
        } else {
            Flow::End
        }
    }

    /// Flushes incomplete characters, sends the one terminal message and closes with 1000.
    async fn finish(&mut self, terminal: ServerMessage) -> Flow {
        let stdout = ServerMessage::Stdout(self.stdout.finish());
        let stderr = ServerMessage::Stderr(self.stderr.finish());
        for message in [stdout, stderr] {
            if let Flow::End = self.send_output(message).await {
                return Flow::End;
            }
        }
        if send(&mut self.socket, &terminal).await.is_ok() {
            close_normally(&mut self.socket).await;
        }
        Flow::End
    }
}

/// Writes one JSON text frame, giving up on a client that does not read.
async fn send(socket: &mut WebSocket, message: &ServerMessage) -> Result<(), ()> {
    match tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::text(message.to_json()))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) | Err(_) => Err(()),
    }
}

/// Sends close 1000 with an empty reason and waits briefly for the client's reply; the
/// connection is dropped afterwards either way.
async fn close_normally(socket: &mut WebSocket) {
    let frame = CloseFrame { code: close_code::NORMAL, reason: "".into() };
    let handshake = async {
        socket.send(Message::Close(Some(frame))).await?;
        while let Some(message) = socket.recv().await {
            if let Message::Close(_) = message? {
                break;
            }
        }
        Ok::<(), axum::Error>(())
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, handshake).await;
}
