//! The WebSocket protocol: frame shapes and order, close code 1000, UTF-8 carry-over, stdin.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use poseidon_api::ServeOptions;

use crate::helpers::{TOKEN, TestApp, spawn_app, spawn_app_with_options, status_and_body};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect_with(url: &str, token: Option<&str>) -> Result<Socket, tungstenite::Error> {
    let mut request = url.into_client_request().unwrap();
    if let Some(token) = token {
        request.headers_mut().insert("Poseidon-Token", token.parse().unwrap());
    }
    tokio_tungstenite::connect_async(request).await.map(|(socket, _)| socket)
}

async fn connect(url: &str) -> Socket {
    connect_with(url, Some(TOKEN)).await.unwrap()
}

/// Every JSON frame until the server closes, and its close frame.
async fn frames_until_close(socket: &mut Socket) -> (Vec<Value>, Option<CloseFrame>) {
    let read = async {
        let mut frames = Vec::new();
        while let Some(message) = socket.next().await {
            match message.unwrap() {
                Message::Text(text) => frames.push(serde_json::from_str(text.as_str()).unwrap()),
                Message::Close(frame) => return (frames, frame),
                other => panic!("unexpected frame {other:?}"),
            }
        }
        (frames, None)
    };
    tokio::time::timeout(Duration::from_secs(5), read).await.expect("the server did not close")
}

fn assert_normal_close(close: Option<CloseFrame>) {
    let close = close.expect("a close frame");
    assert_eq!(close.code, CloseCode::Normal);
    assert_eq!(close.reason.as_str(), "");
}

/// The concatenated `data` of all frames of `kind`.
fn output(frames: &[Value], kind: &str) -> String {
    frames.iter().filter(|f| f["type"] == kind).map(|f| f["data"].as_str().unwrap()).collect()
}

async fn run(app: &TestApp, runner: &str, command: &str) -> (Vec<Value>, Option<CloseFrame>) {
    let url = app.execute(runner, json!({"command": command})).await;
    let mut socket = connect(&url).await;
    frames_until_close(&mut socket).await
}

#[tokio::test]
async fn a_session_is_start_output_exit_and_close_1000() {
    let app = spawn_app().await;
    let runner = app.runner(20).await;
    let (frames, close) = run(&app, &runner, "echo hello").await;
    assert_eq!(
        frames,
        [
            json!({"type": "start"}),
            json!({"type": "stdout", "data": "hello\n"}),
            json!({"type": "exit", "data": 0})
        ]
    );
    assert_normal_close(close);

    let (frames, close) = run(&app, &runner, "exit 3").await;
    assert_eq!(frames, [json!({"type": "start"}), json!({"type": "exit", "data": 3})]);
    assert_normal_close(close);

    let (frames, _) = run(&app, &runner, "stderr oops").await;
    assert_eq!(frames[1], json!({"type": "stderr", "data": "oops"}));
}

#[tokio::test]
async fn output_stays_valid_utf8_across_chunks() {
    let app = spawn_app().await;
    let runner = app.runner(21).await;
    let (frames, close) = run(&app, &runner, "emoji").await;
    assert_eq!(output(&frames, "stdout"), "a🦀b");
    assert!(frames.iter().all(|f| f["data"] != ""), "no empty output frames: {frames:?}");
    assert_normal_close(close);

    // Invalid bytes become U+FFFD, and so does a character the output ended in.
    let (frames, _) = run(&app, &runner, "invalid").await;
    assert_eq!(output(&frames, "stdout"), "x\u{fffd}\u{fffd}");
    assert_eq!(frames.last().unwrap(), &json!({"type": "exit", "data": 0}));
}

#[tokio::test]
async fn stdin_frames_reach_the_execution() {
    let app = spawn_app().await;
    let runner = app.runner(22).await;
    let url = app.execute(&runner, json!({"command": "cat"})).await;
    let mut socket = connect(&url).await;
    socket.send(Message::text("line one\n")).await.unwrap();
    socket.send(Message::binary(b"binary\n".to_vec())).await.unwrap();
    socket.send(Message::text("exit\n")).await.unwrap();
    let (frames, close) = frames_until_close(&mut socket).await;
    assert_eq!(frames.first().unwrap(), &json!({"type": "start"}));
    assert_eq!(output(&frames, "stdout"), "line one\nbinary\n");
    assert_eq!(frames.last().unwrap(), &json!({"type": "exit", "data": 0}));
    assert_normal_close(close);
}

#[tokio::test]
async fn a_time_limit_ends_with_timeout_and_close_1000() {
    let app = spawn_app().await;
    let runner = app.runner(23).await;
    let url = app.execute(&runner, json!({"command": "sleep", "timeLimit": 1})).await;
    let started = Instant::now();
    let mut socket = connect(&url).await;
    let (frames, close) = frames_until_close(&mut socket).await;
    assert_eq!(frames, [json!({"type": "start"}), json!({"type": "timeout"})]);
    assert_normal_close(close);
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_client_close_stops_the_execution() {
    let app = spawn_app().await;
    let runner = app.runner(24).await;
    let url = app.execute(&runner, json!({"command": "sleep"})).await;
    let mut socket = connect(&url).await;
    let start = socket.next().await.unwrap().unwrap();
    assert_eq!(start, Message::text(r#"{"type":"start"}"#));
    let before = app.stopped.load(Ordering::SeqCst);
    socket.close(None).await.unwrap();
    // The server answers the close handshake and ends the connection.
    let rest = tokio::time::timeout(Duration::from_secs(2), socket.next()).await.unwrap();
    assert!(matches!(rest, None | Some(Ok(Message::Close(_))) | Some(Err(_))), "{rest:?}");
    for _ in 0..200 {
        if app.stopped.load(Ordering::SeqCst) > before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the execution was not stopped");
}

#[tokio::test]
async fn executions_are_checked_before_the_upgrade_and_used_once() {
    let app = spawn_app().await;
    let runner = app.runner(25).await;
    let base = format!("/runners/{runner}/websocket");
    for query in [
        "",
        "?executionID=",
        "?executionID=garbage",
        "?executionID=6f1e2f36-3c1b-4a8e-9a39-d0b4f0a0a0a0",
    ] {
        let response = app.request(Method::GET, &format!("{base}{query}")).send().await.unwrap();
        assert_eq!(
            status_and_body(response).await,
            (404, r#"{"message":"execution id unknown"}"#.to_owned()),
            "{query}"
        );
    }
    let url = app.execute(&runner, json!({"command": "echo once"})).await;
    // A plain GET is no handshake: 400, and the execution stays stored.
    let path = url.split_once("/api/v1").unwrap().1;
    let plain = app.request(Method::GET, path).send().await.unwrap();
    assert_eq!(plain.status(), 400);
    // Without the token: 401 before anything else.
    match connect_with(&url, None).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }
    let mut socket = connect(&url).await;
    let (frames, _) = frames_until_close(&mut socket).await;
    assert_eq!(output(&frames, "stdout"), "once\n");
    match connect_with(&url, Some(TOKEN)).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 404),
        other => panic!("expected 404, got {other:?}"),
    }
}

#[tokio::test]
async fn shutdown_waits_for_sessions_only_for_the_grace_period() {
    let options =
        ServeOptions { shutdown_grace: Duration::from_millis(500), ..ServeOptions::default() };
    let app = spawn_app_with_options(|_| {}, options).await;
    let address = app.address;
    let runner = app.runner(26).await;
    let url = app.execute(&runner, json!({"command": "sleep"})).await;
    let mut socket = connect(&url).await;
    assert_eq!(socket.next().await.unwrap().unwrap(), Message::text(r#"{"type":"start"}"#));
    let started = Instant::now();
    app.shut_down().await.unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(400) && took < Duration::from_secs(3), "{took:?}");
    assert!(TcpStream::connect(address).await.is_err(), "the listener is closed");
}

#[tokio::test]
async fn a_client_close_is_noticed_while_the_program_does_not_read_its_input() {
    let app = spawn_app().await;
    let runner = app.runner(27).await;
    let url = app.execute(&runner, json!({"command": "sleep"})).await;
    let mut socket = connect(&url).await;
    assert_eq!(socket.next().await.unwrap().unwrap(), Message::text(r#"{"type":"start"}"#));
    let before = app.stopped.load(Ordering::SeqCst);
    // Far more than the execution's stdin queue holds.
    for _ in 0..64 {
        socket.send(Message::text("x".repeat(1000))).await.unwrap();
    }
    socket.close(None).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(2), socket.next()).await;
    let reply = reply.expect("the server answers the close while stdin is full");
    assert!(matches!(reply, None | Some(Ok(Message::Close(_))) | Some(Err(_))), "{reply:?}");
    for _ in 0..200 {
        if app.stopped.load(Ordering::SeqCst) > before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the execution was not stopped");
}
