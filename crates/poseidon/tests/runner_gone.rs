//! 410 Gone for unknown and destroyed runners on every runner route (spec §2.4, client §6.2),
//! and the drained request body that keeps CodeOcean's keep-alive connection usable (client §6.17).

// Shared by every test crate; each uses a part of it.
#[allow(dead_code)]
mod common;

use std::time::Duration;

use base64::Engine as _;
use common::ws::WsSession;
use common::{Reply, ServerOptions, TestServer, with_runner, with_server};
use reqwest::Method;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Asserts 410 on every HTTP runner route and on the WebSocket upgrade of `websocket_url`.
async fn assert_gone_everywhere(server: &TestServer, runner: &str, websocket_url: &str) {
    let routes = [
        (Method::DELETE, format!("/runners/{runner}"), None),
        (Method::GET, format!("/runners/{runner}/files"), None),
        (
            Method::PATCH,
            format!("/runners/{runner}/files"),
            Some(json!({"copy": [], "delete": ["./*"]})),
        ),
        (Method::GET, format!("/runners/{runner}/files/raw?path=main.py"), None),
        (
            Method::POST,
            format!("/runners/{runner}/execute"),
            Some(json!({"command": "true", "timeLimit": 10})),
        ),
    ];
    for (method, path, body) in routes {
        let what = format!("{method} {path}");
        server.call(method, &path, body.as_ref()).await.expect_message(410, &what);
    }
    assert_eq!(
        WsSession::connect(websocket_url, server.token.as_deref()).await.err(),
        Some(410),
        "WebSocket upgrade of {websocket_url}"
    );
}

#[tokio::test]
async fn unknown_runners_are_gone_on_every_route() {
    with_server(ServerOptions::with_token("secret"), async |server| {
        server.create_env(1, 1).await;
        let long = format!("1-{}", "a".repeat(2000));
        let ids = ["1-unknown", "1-00000000-0000-1000-8000-000000000000", "nonsense", &long];
        for runner in ids {
            let url = format!(
                "ws://{}/api/v1/runners/{runner}/websocket?executionID=00000000-0000-4000-8000-000000000000",
                server.addr
            );
            assert_gone_everywhere(server, runner, &url).await;
        }
    })
    .await;
}

#[tokio::test]
async fn malformed_requests_to_unknown_runners_are_gone_not_bad() {
    with_server(ServerOptions::default(), async |server| {
        // The runner lookup comes before the body is decoded (spec §2.4).
        let patch = server.request(Method::PATCH, "/runners/1-unknown/files").body("{");
        Reply::from(patch).await.expect(410, "PATCH with broken JSON");
        let body = json!({"command": "echo 'quoted'"});
        server
            .execute_with("1-unknown", &body)
            .await
            .expect(410, "execute with a forbidden character");
    })
    .await;
}

#[tokio::test]
async fn deleted_runners_are_gone_on_every_route() {
    with_runner(async |server, runner| {
        let pending = server.execute(runner, "true", 10, false).await;
        // CodeOcean accepts 204 (and 410) on DELETE.
        server.delete(&format!("/runners/{runner}")).await.expect_empty(204, "DELETE runner");
        // The stored execution died with its runner.
        assert_gone_everywhere(server, runner, &pending).await;
        let statistics = server.statistics().await;
        assert_eq!(statistics["1"]["usedRunners"], 0, "{statistics}");
    })
    .await;
}

#[tokio::test]
async fn early_410_drains_a_large_body_and_keeps_the_connection_usable() {
    with_server(ServerOptions::default(), async |server| {
        let content = base64::engine::general_purpose::STANDARD.encode(vec![b'x'; 1 << 20]);
        let body = json!({"copy": [{"path": "big.bin", "content": content}], "delete": ["./*"]})
            .to_string();
        let mut connection = RawConnection::open(server).await;

        let first = connection.send("PATCH", "/api/v1/runners/1-unknown/files", &body).await;
        assert_eq!(first.status, 410, "large PATCH to an unknown runner: {first:?}");

        // Without draining, the rest of the body would be parsed as the next request.
        let second = connection.send("GET", "/api/v1/version", "").await;
        assert_eq!(second.status, 200, "request after the early 410: {second:?}");
        let version: serde_json::Value =
            serde_json::from_slice(&second.body).expect("version is JSON");
        assert!(version.is_string(), "{version}");
    })
    .await;
}

/// One keep-alive HTTP/1.1 connection written by hand, to see exactly what happens on the wire.
struct RawConnection {
    stream: BufReader<TcpStream>,
    host: String,
}

#[derive(Debug)]
struct RawResponse {
    status: u16,
    body: Vec<u8>,
}

impl RawConnection {
    async fn open(server: &TestServer) -> RawConnection {
        let stream = TcpStream::connect(server.addr).await.expect("connect to the server");
        RawConnection { stream: BufReader::new(stream), host: server.addr.to_string() }
    }

    async fn send(&mut self, method: &str, path: &str, body: &str) -> RawResponse {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let writing = async {
            let socket = self.stream.get_mut();
            socket.write_all(head.as_bytes()).await?;
            socket.write_all(body.as_bytes()).await?;
            socket.flush().await
        };
        tokio::time::timeout(Duration::from_secs(10), writing)
            .await
            .expect("the server stopped reading the request body")
            .unwrap_or_else(|error| panic!("writing {method} {path} failed: {error}"));
        tokio::time::timeout(Duration::from_secs(10), self.read_response())
            .await
            .unwrap_or_else(|_| panic!("no response to {method} {path} within 10 s"))
    }

    async fn read_response(&mut self) -> RawResponse {
        let status_line = self.read_line().await;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("malformed status line {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.read_line().await;
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').expect("header line has a colon");
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        let header = |name: &str| {
            headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.clone())
        };
        let body = if header("transfer-encoding").is_some_and(|coding| coding.contains("chunked")) {
            self.read_chunked_body().await
        } else {
            let length = header("content-length")
                .map_or(0, |length| length.parse().expect("numeric length"));
            self.read_exactly(length).await
        };
        RawResponse { status, body }
    }

    async fn read_chunked_body(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let size_line = self.read_line().await;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .unwrap_or_else(|_| panic!("malformed chunk size {size_line:?}"));
            let chunk = self.read_exactly(size).await;
            body.extend_from_slice(&chunk);
            assert_eq!(self.read_line().await, "", "chunk not followed by CRLF");
            if size == 0 {
                return body;
            }
        }
    }

    async fn read_line(&mut self) -> String {
        let mut line = String::new();
        let read = self.stream.read_line(&mut line).await.expect("read from the server");
        assert!(read > 0, "the server closed the connection");
        line.trim_end_matches(['\r', '\n']).to_owned()
    }

    async fn read_exactly(&mut self, length: usize) -> Vec<u8> {
        let mut buffer = vec![0; length];
        self.stream.read_exact(&mut buffer).await.expect("read the response body");
        buffer
    }
}
