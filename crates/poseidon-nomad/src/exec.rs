//! `alloc exec` sessions over WebSocket (nomad-api §4): connecting (with TLS and the token),
//! and driving one session into an [`ExecutionHandle`]'s channels.
//!
//! A session ends when Nomad sends the exit frame, when the socket ends, or at once when the
//! runner dies (`dead`), because Nomad does not always end exec sessions of a stopped
//! allocation (nomad-api §6.4).

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use poseidon_core::backend::{BackendError, ExitStatus, Output};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

use crate::client::{ExecTarget, NomadError};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Nomad's own client sends a heartbeat this often; proxies cut idle sockets otherwise.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// Bytes of stdin per frame (as Nomad's client).
const STDIN_CHUNK: usize = 2048;
/// The terminal's quit character: SIGQUIT to the foreground process group, as Go stops.
const QUIT: u8 = 0x1c;
const MAX_FRAME: usize = 1 << 20;
/// How long a failed session waits for the allocation event that explains it.
const LOSS_REPORT_WAIT: Duration = Duration::from_secs(2);
/// How long it then keeps its output open for the core to learn the runner's end.
const END_REPORT_GRACE: Duration = Duration::from_millis(500);

/// A byte stream a WebSocket can run over (plain TCP or TLS).
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub(crate) type Socket = WebSocketStream<Box<dyn Io>>;

/// Opens the exec WebSocket.
pub(crate) async fn connect(target: &ExecTarget) -> Result<Socket, NomadError> {
    tokio::time::timeout(CONNECT_TIMEOUT, connect_unbounded(target))
        .await
        .map_err(|_| NomadError::Unreachable("exec connection timed out".into()))?
}

async fn connect_unbounded(target: &ExecTarget) -> Result<Socket, NomadError> {
    let host = target.url.host_str().unwrap_or_default().to_owned();
    let port = target.url.port_or_known_default().unwrap_or(4646);
    let address = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let tcp = TcpStream::connect((address.as_str(), port))
        .await
        .map_err(|error| NomadError::Unreachable(format!("exec connection: {error}")))?;
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Io> = match &target.tls {
        None => Box::new(tcp),
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from(address.clone())
                .map_err(|error| NomadError::Tls(error.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .map_err(|error| NomadError::Unreachable(format!("exec TLS: {error}")))?;
            Box::new(tls)
        }
    };
    let mut request = target
        .url
        .as_str()
        .into_client_request()
        .map_err(|error| NomadError::Decode(error.to_string()))?;
    if let Some(token) = &target.token {
        let value = token.parse().map_err(|_| NomadError::Decode("invalid token".into()))?;
        request.headers_mut().insert("X-Nomad-Token", value);
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME))
        .max_frame_size(Some(MAX_FRAME));
    let (socket, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
        .await
        .map_err(exec_error)?;
    Ok(socket)
}

fn exec_error(error: tungstenite::Error) -> NomadError {
    match error {
        tungstenite::Error::Http(response) => {
            let body = response.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            NomadError::Status { status: response.status().as_u16(), message: body.into_owned() }
        }
        other => NomadError::Unreachable(format!("exec: {other}")),
    }
}

/// One server frame (nomad-api §4.3); unknown frames decode as empty and are ignored.
#[derive(Debug, Default, Deserialize)]
struct Frame {
    #[serde(default)]
    stdout: Option<StreamFrame>,
    #[serde(default)]
    stderr: Option<StreamFrame>,
    #[serde(default)]
    exited: bool,
    #[serde(default)]
    result: Option<ExitResult>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamFrame {
    #[serde(default)]
    data: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ExitResult {
    /// Omitted for 0.
    #[serde(default)]
    exit_code: i64,
}

/// How a session's output is labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Channel {
    /// stdout frames are stdout, stderr frames stderr.
    Native,
    /// Everything this session prints is the execution's stderr (the fifo reader).
    Stderr,
}

/// One exec session and where its data goes.
pub(crate) struct Session {
    pub socket: Socket,
    /// `None`: stdin stays open and empty.
    pub stdin: Option<mpsc::Receiver<Bytes>>,
    pub output: mpsc::Sender<Output>,
    pub channel: Channel,
    pub tty: bool,
    /// Cancelled: stop the command (the quit character on a terminal, else the socket closes).
    pub stop: CancellationToken,
    /// Cancelled: the runner is gone; end at once.
    pub dead: CancellationToken,
}

impl Session {
    /// A session of an internal command (file operations, kills): no terminal, no input, output
    /// as Nomad sends it, stopped only by the runner's death.
    pub(crate) fn internal(
        socket: Socket,
        output: mpsc::Sender<Output>,
        dead: CancellationToken,
    ) -> Session {
        Session {
            socket,
            stdin: None,
            output,
            channel: Channel::Native,
            tty: false,
            stop: CancellationToken::new(),
            dead,
        }
    }

    /// Runs the session to its end; the exit status, or why there is none.
    pub(crate) async fn run(mut self) -> Result<ExitStatus, BackendError> {
        let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
        heartbeat.reset();
        let mut stopping = false;
        let result = loop {
            // Biased: a stop must reach the terminal before the end of stdin that a dropped
            // handle also causes (Nomad ignores stdin after its close).
            tokio::select! {
                biased;
                () = self.dead.cancelled() => break Err(BackendError::RunnerGone),
                () = self.stop.cancelled(), if !stopping => {
                    stopping = true;
                    self.stdin = None;
                    if !self.tty {
                        break Ok(ExitStatus::Signaled(9));
                    }
                    if self.send(&stdin_frame(&[QUIT])).await.is_err() {
                        break Ok(ExitStatus::Signaled(3));
                    }
                }
                input = recv_stdin(&mut self.stdin) => {
                    let sent = match input {
                        Some(bytes) => self.send_stdin(&bytes).await,
                        None => {
                            self.stdin = None;
                            self.send(r#"{"stdin":{"close":true}}"#).await
                        }
                    };
                    if let Err(error) = sent {
                        break Err(error);
                    }
                }
                _ = heartbeat.tick() => {
                    if let Err(error) = self.send("{}").await {
                        break Err(error);
                    }
                }
                message = self.socket.next() => match self.handle(message).await {
                    Some(result) => break result,
                    None => continue,
                },
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), self.socket.close(None)).await;
        if result.is_err() {
            await_runner_end(&self.dead).await;
        }
        result
    }

    /// `Some` once the session is over.
    async fn handle(
        &mut self,
        message: Option<Result<Message, tungstenite::Error>>,
    ) -> Option<Result<ExitStatus, BackendError>> {
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                let reason = frame.map(|frame| frame.reason.to_string()).unwrap_or_default();
                return Some(Err(session_error(&reason)));
            }
            Some(Ok(_)) => return None,
            Some(Err(error)) => return Some(Err(session_error(&error.to_string()))),
            None => return Some(Err(session_error("the exec socket closed without exit code"))),
        };
        let frame: Frame = serde_json::from_str(text.as_str()).unwrap_or_default();
        if frame.exited {
            let code = frame.result.map_or(0, |result| result.exit_code);
            return Some(Ok(ExitStatus::Exited(code.clamp(0, 255) as u8)));
        }
        for (stream, is_stderr) in [(frame.stdout, false), (frame.stderr, true)] {
            let Some(data) = stream.and_then(|stream| stream.data) else { continue };
            let Ok(bytes) = BASE64.decode(data) else {
                return Some(Err(BackendError::Internal("undecodable exec output".into())));
            };
            let chunk = match (self.channel, is_stderr) {
                (Channel::Native, false) => Output::Stdout(bytes.into()),
                _ => Output::Stderr(bytes.into()),
            };
            tokio::select! {
                () = self.dead.cancelled() => return Some(Err(BackendError::RunnerGone)),
                sent = self.output.send(chunk) => if sent.is_err() {
                    // Nobody reads any more: the handle was dropped, which stops the execution.
                    return Some(Ok(ExitStatus::Signaled(9)));
                },
            }
        }
        None
    }

    async fn send_stdin(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        for chunk in bytes.chunks(STDIN_CHUNK) {
            self.send(&stdin_frame(chunk)).await?;
        }
        Ok(())
    }

    async fn send(&mut self, frame: &str) -> Result<(), BackendError> {
        self.socket
            .send(Message::text(frame))
            .await
            .map_err(|error| session_error(&error.to_string()))
    }
}

/// An exec session of a dying allocation often fails before Nomad reports why. Holding the
/// output open a moment lets the runner's end (an OOM kill, a stop) reach the core first, so
/// that the client gets that message rather than a generic error.
async fn await_runner_end(dead: &CancellationToken) {
    if tokio::time::timeout(LOSS_REPORT_WAIT, dead.cancelled()).await.is_ok() {
        tokio::time::sleep(END_REPORT_GRACE).await;
    }
}

async fn recv_stdin(stdin: &mut Option<mpsc::Receiver<Bytes>>) -> Option<Bytes> {
    match stdin {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

fn stdin_frame(bytes: &[u8]) -> String {
    serde_json::json!({"stdin": {"data": BASE64.encode(bytes)}}).to_string()
}

/// Nomad's close reasons (`Unknown allocation …`, `… is not running`) name a dead runner.
fn session_error(reason: &str) -> BackendError {
    let gone = ["Unknown allocation", "not running", "client status of allocation"];
    if gone.iter().any(|marker| reason.contains(marker)) {
        return BackendError::RunnerGone;
    }
    BackendError::Internal(format!("exec session failed: {reason}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_decode_like_nomad_sends_them() {
        let frame: Frame = serde_json::from_str(r#"{"exited":true,"result":{}}"#).unwrap();
        assert!(frame.exited);
        assert_eq!(frame.result.unwrap().exit_code, 0);
        let frame: Frame = serde_json::from_str(r#"{"stdout":{"data":"aGkK"}}"#).unwrap();
        assert_eq!(frame.stdout.unwrap().data.as_deref(), Some("aGkK"));
        let frame: Frame = serde_json::from_str(r#"{"stderr":{"close":true}}"#).unwrap();
        assert!(frame.stderr.unwrap().data.is_none());
        assert_eq!(stdin_frame(b"hello\n"), r#"{"stdin":{"data":"aGVsbG8K"}}"#);
    }

    #[test]
    fn close_reasons_of_dead_allocations_mean_the_runner_is_gone() {
        assert_eq!(session_error("Unknown allocation \"x\""), BackendError::RunnerGone);
        assert_eq!(
            session_error("task \"default-task\" is not running."),
            BackendError::RunnerGone
        );
        assert!(matches!(session_error("Permission denied"), BackendError::Internal(_)));
    }
}
