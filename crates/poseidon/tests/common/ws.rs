//! The WebSocket side of an execution, read and checked frame by frame the way CodeOcean's
//! `backend-output.schema.json` checks it (a frame that fails the schema is silently dropped by
//! CodeOcean, so here it fails the test).

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const FINISH_TIMEOUT: Duration = Duration::from_secs(30);
const WAIT_FOR_OUTPUT_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// The close code CodeOcean expects in every case.
pub const NORMAL_CLOSURE: u16 = 1000;

/// How an execution ended, from its last frame.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Terminal {
    /// No `exit`, `timeout` or `error` frame (yet).
    #[default]
    Missing,
    Exit(u8),
    Timeout,
    Error(String),
}

/// Everything the server sent on one WebSocket.
#[derive(Debug, Default)]
pub struct WsTranscript {
    pub frames: Vec<Value>,
    /// All `stdout` data concatenated (chunk boundaries are arbitrary).
    pub stdout: String,
    pub stderr: String,
    pub terminal: Terminal,
    /// The code of the server's close frame (1005 for a close frame without a code).
    pub close_code: Option<u16>,
    /// From the upgrade until the close frame (or the end of the connection).
    pub elapsed: Duration,
    /// A transport error before any close frame, e.g. a TCP reset.
    pub transport_error: Option<String>,
}

impl WsTranscript {
    #[track_caller]
    pub fn assert_exit(&self, code: u8) {
        assert_eq!(
            self.terminal,
            Terminal::Exit(code),
            "unexpected end of the execution: {self:#?}"
        );
    }

    #[track_caller]
    pub fn exit_code(&self) -> u8 {
        match self.terminal {
            Terminal::Exit(code) => code,
            _ => panic!("execution did not end with an exit frame: {self:#?}"),
        }
    }

    fn record(&mut self, frame: Value) {
        if let Err(problem) = check_schema(&frame) {
            panic!("frame violates CodeOcean's schema ({problem}): {frame}; so far: {self:#?}");
        }
        let kind = frame["type"].as_str().unwrap_or_default().to_owned();
        assert!(
            self.terminal == Terminal::Missing,
            "frame after the terminal frame: {frame}; so far: {self:#?}"
        );
        assert_eq!(
            kind == "start",
            self.frames.is_empty(),
            "`start` must be the first frame and only the first: {frame}; so far: {self:#?}"
        );
        let data = &frame["data"];
        match kind.as_str() {
            "stdout" => self.stdout.push_str(data.as_str().unwrap_or_default()),
            "stderr" => self.stderr.push_str(data.as_str().unwrap_or_default()),
            "exit" => {
                let code = data.as_u64().and_then(|code| u8::try_from(code).ok());
                self.terminal = Terminal::Exit(code.unwrap_or_default());
            }
            "timeout" => self.terminal = Terminal::Timeout,
            "error" => self.terminal = Terminal::Error(data.as_str().unwrap_or_default().into()),
            _ => {}
        }
        self.frames.push(frame);
    }

    /// What every execution that the client did not close must look like.
    fn assert_well_formed(&self) {
        assert!(
            self.terminal != Terminal::Missing,
            "execution ended without exit/timeout/error frame: {self:#?}"
        );
        assert_eq!(
            self.close_code,
            Some(NORMAL_CLOSURE),
            "the server must close with 1000 after the terminal frame: {self:#?}"
        );
    }
}

/// `oneOf` of CodeOcean's schema; every branch has `additionalProperties: false`.
fn check_schema(frame: &Value) -> Result<(), &'static str> {
    let object = frame.as_object().ok_or("not a JSON object")?;
    let kind = object.get("type").and_then(Value::as_str).ok_or("no string `type`")?;
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let data = object.get("data");
    match kind {
        "start" | "timeout" if keys == ["type"] => Ok(()),
        "start" | "timeout" => Err("`start`/`timeout` carry no other key"),
        _ if keys != ["data", "type"] => Err("keys must be exactly `type` and `data`"),
        "stdout" | "stderr" | "error" if data.is_some_and(Value::is_string) => Ok(()),
        "exit" if data.and_then(Value::as_u64).is_some_and(|code| code <= 255) => Ok(()),
        "stdout" | "stderr" | "error" => Err("`data` must be a string"),
        "exit" => Err("`data` must be an integer in 0..=255"),
        _ => Err("unknown `type`"),
    }
}

/// An open WebSocket to one execution.
#[derive(Debug)]
pub struct WsSession {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    transcript: WsTranscript,
    connected: Instant,
    ended: bool,
}

impl WsSession {
    /// Performs the upgrade with the token header as CodeOcean does; `Err` carries the HTTP
    /// status when the server refused the upgrade.
    pub async fn connect(url: &str, token: Option<&str>) -> Result<WsSession, u16> {
        let mut request = url
            .into_client_request()
            .unwrap_or_else(|error| panic!("websocketUrl {url} is not usable: {error}"));
        if let Some(token) = token {
            let value = token.parse().expect("the token is a valid header value");
            request.headers_mut().insert("Poseidon-Token", value);
        }
        let Ok(attempt) = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect_async(request)).await
        else {
            panic!("WebSocket handshake with {url} took over {HANDSHAKE_TIMEOUT:?}");
        };
        match attempt {
            Ok((stream, _response)) => Ok(WsSession {
                stream,
                transcript: WsTranscript::default(),
                connected: Instant::now(),
                ended: false,
            }),
            Err(Error::Http(response)) => Err(response.status().as_u16()),
            Err(error) => panic!("WebSocket connection to {url} failed: {error}"),
        }
    }

    /// Sends one stdin text frame (CodeOcean appends `\n` to each input itself).
    pub async fn send(&mut self, text: &str) {
        self.stream.send(Message::text(text)).await.expect("send a stdin frame");
    }

    /// Sends a binary frame, which CodeOcean never does (spec §3.3).
    pub async fn send_binary(&mut self, bytes: &[u8]) {
        self.stream.send(Message::binary(bytes.to_vec())).await.expect("send a binary frame");
    }

    pub fn transcript(&self) -> &WsTranscript {
        &self.transcript
    }

    /// Reads frames until the concatenated stdout contains `needle`.
    pub async fn wait_for_stdout(&mut self, needle: &str) {
        let deadline = Instant::now() + WAIT_FOR_OUTPUT_TIMEOUT;
        while !self.transcript.stdout.contains(needle) {
            assert!(
                self.read_one(deadline).await,
                "connection ended before stdout contained {needle:?}: {:#?}",
                self.transcript
            );
        }
    }

    /// Reads until the server closed the connection and checks the ending.
    pub async fn finish(mut self) -> WsTranscript {
        let deadline = Instant::now() + FINISH_TIMEOUT;
        while self.read_one(deadline).await {}
        self.transcript.assert_well_formed();
        self.transcript
    }

    /// Closes from the client side (code 1000, as Faye does) and reads until the connection
    /// ended. The transcript's `close_code` is the server's close reply, if any.
    pub async fn close(mut self) -> WsTranscript {
        let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
        // The server may have closed at the same moment; the reads below show what happened.
        let _ = self.stream.close(Some(frame)).await;
        let deadline = Instant::now() + CLOSE_REPLY_TIMEOUT;
        while self.read_one(deadline).await {}
        self.transcript
    }

    /// Reads one message; `false` once the connection has ended.
    async fn read_one(&mut self, deadline: Instant) -> bool {
        if self.ended {
            return false;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let next = tokio::time::timeout(remaining, self.stream.next()).await.unwrap_or_else(|_| {
            panic!(
                "server sent nothing more and did not close in time; so far: {:#?}",
                self.transcript
            )
        });
        match next {
            Some(Ok(message)) => self.handle(message),
            Some(Err(error)) => {
                if self.transcript.close_code.is_none() {
                    self.transcript.transport_error = Some(error.to_string());
                }
                self.end();
            }
            None => self.end(),
        }
        !self.ended
    }

    fn handle(&mut self, message: Message) {
        match message {
            Message::Text(text) => {
                let frame = serde_json::from_str(text.as_str())
                    .unwrap_or_else(|error| panic!("text frame is not JSON ({error}): {text:?}"));
                self.transcript.record(frame);
            }
            Message::Binary(bytes) => {
                panic!("binary frame (it would crash CodeOcean's reactor): {bytes:?}")
            }
            Message::Close(frame) => {
                let code = frame.map_or(1005, |frame| u16::from(frame.code));
                self.transcript.close_code = Some(code);
                self.transcript.elapsed = self.connected.elapsed();
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }

    fn end(&mut self) {
        if self.transcript.close_code.is_none() {
            self.transcript.elapsed = self.connected.elapsed();
        }
        self.ended = true;
    }
}
