//! One execution as CodeOcean runs it: `POST …/execute`, connect to the returned WebSocket,
//! send stdin lines, read frames until the terminal message and the close.

use crate::client::{ClientError, Poseidon};
use futures::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

/// Extra time beyond the execution's own time limit before the harness gives up on a socket.
const SOCKET_GRACE: Duration = Duration::from_secs(10);
/// How long the server may take to close after its terminal message.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Failures of one execution, naming the runner.
#[derive(Debug, thiserror::Error)]
pub enum ExecutionError {
    #[error(transparent)]
    Http(#[from] ClientError),
    #[error("websocket of runner {runner}")]
    Socket {
        runner: String,
        #[source]
        source: Box<tungstenite::Error>,
    },
    #[error("websocket of runner {runner}: bad frame {frame}")]
    Frame { runner: String, frame: String },
    #[error("execution on runner {runner} did not end within {limit:?}")]
    Hung { runner: String, limit: Duration },
    #[error(
        "execution on runner {runner} ended with {outcome:?}, expected exit 0; stderr {stderr:?}"
    )]
    Failed { runner: String, outcome: Outcome, stderr: String },
    #[error("websocket of runner {runner} closed with {close} instead of 1000")]
    Close { runner: String, close: String },
}

/// The terminal message of an execution.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Exit(u8),
    Timeout,
    Error(String),
    /// The socket closed without a terminal message.
    Vanished,
}

/// Poseidon's server → client frames (§3.1 of the spec).
#[derive(Debug, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
enum Frame {
    Start,
    Stdout(String),
    Stderr(String),
    Exit(u8),
    Timeout,
    Error(String),
}

/// When each step of one execution happened, measured from just before `POST …/execute`.
#[derive(Debug, Clone)]
pub struct ExecutionTiming {
    /// `POST …/execute` answered.
    pub posted: Duration,
    /// The WebSocket handshake finished (101).
    pub connected: Duration,
    pub first_stdout: Option<Duration>,
    /// The terminal message arrived.
    pub ended: Duration,
    pub outcome: Outcome,
    pub stdout: String,
    pub stderr: String,
}

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct Command<'a> {
    pub line: &'a str,
    pub stdin: Option<&'a str>,
    pub time_limit_secs: u64,
    /// Incremented once the WebSocket is connected, for callers that start other work then.
    pub connected: Option<&'a AtomicU64>,
}

/// Runs `command` on `runner` and requires exit 0 and a normal close.
pub async fn run(
    client: &Poseidon,
    runner: &str,
    command: Command<'_>,
) -> Result<ExecutionTiming, ExecutionError> {
    let limit = Duration::from_secs(command.time_limit_secs) + SOCKET_GRACE;
    let timing = tokio::time::timeout(limit, run_unbounded(client, runner, command))
        .await
        .map_err(|_| ExecutionError::Hung { runner: runner.to_owned(), limit })??;
    if timing.outcome != Outcome::Exit(0) {
        let stderr = timing.stderr.chars().take(300).collect();
        return Err(ExecutionError::Failed {
            runner: runner.to_owned(),
            outcome: timing.outcome,
            stderr,
        });
    }
    Ok(timing)
}

/// Runs `command` on `runner` and returns whatever it ended with (the caller bounds the time).
pub async fn run_unbounded(
    client: &Poseidon,
    runner: &str,
    command: Command<'_>,
) -> Result<ExecutionTiming, ExecutionError> {
    let socket_error =
        |source| ExecutionError::Socket { runner: runner.to_owned(), source: Box::new(source) };
    let started = Instant::now();
    let url = client.execute(runner, command.line, command.time_limit_secs).await?;
    let posted = started.elapsed();
    let mut request = url.as_str().into_client_request().map_err(socket_error)?;
    if let Some(token) = client.token() {
        let value = HeaderValue::from_str(token)
            .map_err(|error| socket_error(tungstenite::Error::HttpFormat(error.into())))?;
        request.headers_mut().insert("Poseidon-Token", value);
    }
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.map_err(socket_error)?;
    let connected = started.elapsed();
    if let Some(counter) = command.connected {
        counter.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(line) = command.stdin {
        socket.send(Message::text(line)).await.map_err(socket_error)?;
    }
    let mut timing = ExecutionTiming {
        posted,
        connected,
        first_stdout: None,
        ended: Duration::ZERO,
        outcome: Outcome::Vanished,
        stdout: String::new(),
        stderr: String::new(),
    };
    while let Some(message) = socket.next().await {
        let text = match message.map_err(socket_error)? {
            Message::Text(text) => text,
            Message::Close(frame) => return closed(runner, frame, timing, started),
            Message::Binary(_) => {
                let frame = "binary frame".to_owned();
                return Err(ExecutionError::Frame { runner: runner.to_owned(), frame });
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        };
        let frame: Frame = serde_json::from_str(text.as_str()).map_err(|_| {
            ExecutionError::Frame { runner: runner.to_owned(), frame: text.as_str().to_owned() }
        })?;
        let outcome = match frame {
            Frame::Start => continue,
            Frame::Stderr(data) => {
                timing.stderr.push_str(&data);
                continue;
            }
            Frame::Stdout(data) => {
                timing.first_stdout.get_or_insert_with(|| started.elapsed());
                timing.stdout.push_str(&data);
                continue;
            }
            Frame::Exit(code) => Outcome::Exit(code),
            Frame::Timeout => Outcome::Timeout,
            Frame::Error(message) => Outcome::Error(message),
        };
        timing.ended = started.elapsed();
        timing.outcome = outcome;
        return await_close(runner, &mut socket, timing).await;
    }
    timing.ended = started.elapsed();
    Ok(timing)
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// After the terminal message the server must close with 1000; CodeOcean waits for that close.
async fn await_close(
    runner: &str,
    socket: &mut Socket,
    timing: ExecutionTiming,
) -> Result<ExecutionTiming, ExecutionError> {
    let close_error =
        |close: &str| ExecutionError::Close { runner: runner.to_owned(), close: close.to_owned() };
    let wait = async {
        while let Some(message) = socket.next().await {
            match message {
                Ok(Message::Close(frame)) => return check_close_code(runner, frame),
                Ok(_) => continue,
                // The server may drop the TCP connection right after its close frame.
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::Protocol(_)) => {
                    return Ok(());
                }
                Err(error) => return Err(close_error(&error.to_string())),
            }
        }
        Ok(())
    };
    tokio::time::timeout(CLOSE_WAIT, wait).await.map_err(|_| close_error("no close"))??;
    Ok(timing)
}

fn closed(
    runner: &str,
    frame: Option<CloseFrame>,
    mut timing: ExecutionTiming,
    started: Instant,
) -> Result<ExecutionTiming, ExecutionError> {
    timing.ended = started.elapsed();
    check_close_code(runner, frame)?;
    Ok(timing)
}

fn check_close_code(runner: &str, frame: Option<CloseFrame>) -> Result<(), ExecutionError> {
    match frame {
        Some(frame) if frame.code == CloseCode::Normal => Ok(()),
        other => Err(ExecutionError::Close {
            runner: runner.to_owned(),
            close: other.map_or("no code".to_owned(), |frame| frame.code.to_string()),
        }),
    }
}
