//! The REST routes: status codes, bodies and headers as CodeOcean expects them.

use std::io::{Read, Write};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use poseidon_api::ServeOptions;

use crate::helpers::{
    TOKEN, collect_body, spawn_app, spawn_app_with, spawn_app_with_options, status_and_body,
};

#[tokio::test]
async fn unknown_paths_and_wrong_methods_are_empty_404_and_405_before_auth() {
    let app = spawn_app().await;
    for (method, path) in
        [(Method::GET, "/api/v1/nothing"), (Method::GET, "/api/v1/runners/"), (Method::GET, "/api")]
    {
        let response = app
            .client
            .request(method, format!("http://{}{path}", app.address))
            .send()
            .await
            .unwrap();
        assert_eq!(status_and_body(response).await, (404, String::new()), "{path}");
    }
    for (method, path) in [
        (Method::GET, "/runners"),
        (Method::POST, "/health"),
        (Method::PUT, "/runners/some-id"),
        (Method::POST, "/execution-environments"),
    ] {
        let response = app.client.request(method, app.url(path)).send().await.unwrap();
        assert_eq!(status_and_body(response).await, (405, String::new()), "{path}");
    }
}

#[tokio::test]
async fn the_token_is_required_except_for_health_and_version() {
    let app = spawn_app().await;
    let statistics = app.url("/statistics/execution-environments");
    let missing = app.client.get(&statistics).send().await.unwrap();
    assert_eq!(status_and_body(missing).await, (401, String::new()));
    let wrong =
        app.client.get(&statistics).header("Poseidon-Token", "test-tokeN").send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    let right = app.client.get(&statistics).header("Poseidon-Token", TOKEN).send().await.unwrap();
    assert_eq!(status_and_body(right).await, (200, "{}".to_owned()));

    let health = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(status_and_body(health).await, (204, String::new()));
    let version = app.client.get(app.url("/version")).send().await.unwrap();
    assert_eq!(version.status(), 200);
    assert_eq!(version.headers()["content-type"], "application/json");
    let version: Value = version.json().await.unwrap();
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn without_a_configured_token_everything_is_open() {
    let app = spawn_app_with(|config| config.token = None).await;
    let response = app.client.get(app.url("/execution-environments")).send().await.unwrap();
    assert_eq!(
        status_and_body(response).await,
        (200, r#"{"executionEnvironments":[]}"#.to_owned())
    );
}

#[tokio::test]
async fn environments_are_created_updated_listed_and_deleted_with_gos_shapes() {
    let app = spawn_app().await;
    let put = |body: &'static str| {
        app.request(Method::PUT, "/execution-environments/7").body(body).send()
    };
    let (status, body) = status_and_body(put("").await.unwrap()).await;
    assert_eq!((status, body.as_str()), (400, r#"{"message":"EOF"}"#));
    let (status, body) = status_and_body(put("{\"prewarmingPoolSize\": -1}").await.unwrap()).await;
    assert_eq!(status, 400);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["message"].is_string());
    assert_eq!(put("{\"exposedPorts\": [70000]}").await.unwrap().status(), 400);

    // Unknown fields and CodeOcean's extra `id` are ignored; `exposedPorts: null` is fine.
    let body = r#"{"id": 99, "prewarmingPoolSize": 0, "cpuLimit": 20, "memoryLimit": 256,
        "image": "scripted", "networkAccess": false, "exposedPorts": null, "unknown": true}"#;
    let created = put(body).await.unwrap();
    assert_eq!(created.status(), 201);
    assert_eq!(created.headers()["content-length"], "0");
    assert_eq!(created.text().await.unwrap(), "");
    let updated = put(body).await.unwrap();
    assert_eq!(status_and_body(updated).await, (204, String::new()));

    let environment = app.request(Method::GET, "/execution-environments/7").send().await.unwrap();
    assert_eq!(
        status_and_body(environment).await,
        (
            200,
            r#"{"prewarmingPoolSize":0,"cpuLimit":20,"memoryLimit":256,"image":"scripted","networkAccess":false,"exposedPorts":[],"id":7}"#
                .to_owned()
        )
    );
    let list = app.get_json("/execution-environments?fetch=true").await;
    assert_eq!(list["executionEnvironments"][0]["id"], 7);
    let bad_fetch =
        app.request(Method::GET, "/execution-environments?fetch=maybe").send().await.unwrap();
    let (status, body) = status_and_body(bad_fetch).await;
    assert_eq!(status, 400);
    assert!(body.contains("could not parse fetch parameter"), "{body}");

    for (path, expected) in
        [("/execution-environments/abc", 404), ("/execution-environments/-1", 404)]
    {
        let response = app.request(Method::GET, path).send().await.unwrap();
        assert_eq!(status_and_body(response).await, (expected, String::new()), "{path}");
    }
    let huge = app
        .request(Method::GET, "/execution-environments/99999999999999999999")
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_body(huge).await;
    assert_eq!(status, 400);
    assert!(body.starts_with(r#"{"message":"#), "{body}");

    let broken = app
        .request(Method::PUT, "/execution-environments/8")
        .body(r#"{"image": "broken"}"#)
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_body(broken).await;
    assert_eq!(status, 500);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["errorCode"], "UNKNOWN");

    let deleted = app.request(Method::DELETE, "/execution-environments/7").send().await.unwrap();
    assert_eq!(status_and_body(deleted).await, (204, String::new()));
    let again = app.request(Method::DELETE, "/execution-environments/7").send().await.unwrap();
    assert_eq!(status_and_body(again).await, (404, String::new()));
    let gone = app.request(Method::GET, "/execution-environments/7").send().await.unwrap();
    assert_eq!(status_and_body(gone).await, (404, String::new()));
}

#[tokio::test]
async fn claiming_runners_answers_poseidons_codes() {
    let app = spawn_app().await;
    let claim = |body: Value| app.request(Method::POST, "/runners").json(&body).send();
    let unknown = claim(json!({"executionEnvironmentId": 404})).await.unwrap();
    assert_eq!(
        status_and_body(unknown).await,
        (404, r#"{"message":"execution environment not found"}"#.to_owned())
    );
    app.environment(1, 0).await;
    let empty = claim(json!({"executionEnvironmentId": 1})).await.unwrap();
    assert_eq!(
        status_and_body(empty).await,
        (
            500,
            r#"{"message":"no runners available for this execution environment","errorCode":"NOMAD_OVERLOAD"}"#
                .to_owned()
        )
    );
    let negative =
        claim(json!({"executionEnvironmentId": 1, "inactivityTimeout": -1})).await.unwrap();
    assert_eq!(negative.status(), 400);
    let invalid = app.request(Method::POST, "/runners").body("{").send().await.unwrap();
    assert_eq!(invalid.status(), 400);

    app.environment(2, 1).await;
    let claimed =
        claim(json!({"executionEnvironmentId": 2, "inactivityTimeout": 10})).await.unwrap();
    assert_eq!(claimed.status(), 200);
    let claimed: Value = claimed.json().await.unwrap();
    assert!(claimed["runnerId"].as_str().unwrap().starts_with("2-"), "{claimed}");
    assert_eq!(claimed["mappedPorts"], json!([]));
    assert_eq!(claimed.as_object().unwrap().len(), 2);

    let statistics = app.get_json("/statistics/execution-environments").await;
    assert_eq!(statistics["2"]["id"], 2);
    assert_eq!(statistics["2"]["prewarmingPoolSize"], 1);
    assert_eq!(statistics["2"]["usedRunners"], 1);
    assert!(statistics["2"]["idleRunners"].is_u64());
}

#[tokio::test]
async fn deleted_and_unknown_runners_are_gone_on_every_route() {
    let app = spawn_app().await;
    let runner = app.runner(3).await;
    let deleted = app.request(Method::DELETE, &format!("/runners/{runner}")).send().await.unwrap();
    assert_eq!(status_and_body(deleted).await, (204, String::new()));
    let gone = r#"{"message":"no runner found with this id"}"#.to_owned();
    for (method, path) in [
        (Method::DELETE, format!("/runners/{runner}")),
        (Method::POST, format!("/runners/{runner}/execute")),
        (Method::PATCH, "/runners/unknown/files".to_owned()),
        (Method::GET, "/runners/unknown/files".to_owned()),
        (Method::GET, "/runners/unknown/files/raw?path=a".to_owned()),
        (Method::GET, "/runners/unknown/websocket?executionID=x".to_owned()),
    ] {
        let response = app.request(method, &path).body("{}").send().await.unwrap();
        assert_eq!(status_and_body(response).await, (410, gone.clone()), "{path}");
    }
}

/// CodeOcean keeps connections alive: a 410 must not leave an unread upload on the connection.
#[tokio::test]
async fn a_large_upload_to_an_unknown_runner_is_drained_before_the_410() {
    let app = spawn_app().await;
    let address = app.address;
    let exchange = tokio::task::spawn_blocking(move || {
        let mut connection = std::net::TcpStream::connect(address).unwrap();
        connection.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let body = format!(r#"{{"copy":[{{"path":"a","content":"{}"}}]}}"#, "A".repeat(8 << 20));
        let head = format!(
            "PATCH /api/v1/runners/unknown/files HTTP/1.1\r\nHost: {address}\r\nPoseidon-Token: {TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        connection.write_all(head.as_bytes()).unwrap();
        connection.write_all(body.as_bytes()).unwrap();
        let first = read_response(&mut connection);
        let second = format!("GET /api/v1/version HTTP/1.1\r\nHost: {address}\r\n\r\n");
        connection.write_all(second.as_bytes()).unwrap();
        (first, read_response(&mut connection))
    });
    let (first, second) = exchange.await.unwrap();
    assert!(first.starts_with("HTTP/1.1 410"), "{first}");
    assert!(first.ends_with(r#"{"message":"no runner found with this id"}"#), "{first}");
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
}

/// Reads one response whose body has a Content-Length.
fn read_response(connection: &mut std::net::TcpStream) -> String {
    let mut received = Vec::new();
    let mut byte = [0u8; 1];
    while !received.ends_with(b"\r\n\r\n") {
        assert_eq!(connection.read(&mut byte).unwrap(), 1, "connection closed");
        received.push(byte[0]);
    }
    let head = String::from_utf8(received.clone()).unwrap();
    let length: usize = head
        .lines()
        .find_map(|line| {
            line.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_owned)
        })
        .map_or(0, |length| length.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    connection.read_exact(&mut body).unwrap();
    received.extend_from_slice(&body);
    String::from_utf8(received).unwrap()
}

#[tokio::test]
async fn execute_answers_the_websocket_url_for_the_host_the_client_used() {
    let app = spawn_app().await;
    let runner = app.runner(4).await;
    let response = app
        .request(Method::POST, &format!("/runners/{runner}/execute"))
        .header("Host", "poseidon.test:1234")
        .body(r#"{"command": "echo hi", "timeLimit": 10, "privilegedExecution": false}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    let url = answer["websocketUrl"].as_str().unwrap();
    let prefix = format!("ws://poseidon.test:1234/api/v1/runners/{runner}/websocket?executionID=");
    assert!(url.starts_with(&prefix), "{url}");
    assert!(url[prefix.len()..].parse::<uuid_like::Uuid>().is_ok(), "{url}");

    let quoted = app
        .request(Method::POST, &format!("/runners/{runner}/execute"))
        .body(r#"{"command": "echo 'hi'"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_and_body(quoted).await,
        (400, r#"{"message":"use of forbidden character"}"#.to_owned())
    );
}

/// A UUID check without another dependency: 36 characters, hex and dashes at 8-4-4-4-12.
mod uuid_like {
    pub struct Uuid;

    impl std::str::FromStr for Uuid {
        type Err = ();

        fn from_str(s: &str) -> Result<Self, ()> {
            let groups: Vec<_> = s.split('-').map(str::len).collect();
            let hex = s.chars().all(|c| c == '-' || c.is_ascii_hexdigit());
            (groups == [8, 4, 4, 4, 12] && hex).then_some(Uuid).ok_or(())
        }
    }
}

#[tokio::test]
async fn files_are_uploaded_listed_and_downloaded() {
    let app = spawn_app().await;
    let runner = app.runner(5).await;
    let files = format!("/runners/{runner}/files");
    let patch = |body: Value| app.request(Method::PATCH, &files).json(&body).send();
    let uploaded = patch(json!({"delete": ["./*"], "copy": [{"path": "dir/"}, {"path": "test.txt", "content": "SGVsbG8="}]}))
        .await
        .unwrap();
    assert_eq!(status_and_body(uploaded).await, (204, String::new()));
    let invalid = patch(json!({"copy": [{"path": "x", "content": "not base64!"}]})).await.unwrap();
    assert_eq!(invalid.status(), 400);
    let failed =
        patch(json!({"copy": [{"path": "/proc/1/environ", "content": ""}]})).await.unwrap();
    let (status, body) = status_and_body(failed).await;
    assert_eq!(status, 500);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["errorCode"], "UNKNOWN");
    assert!(body["message"].as_str().unwrap().starts_with("file copy failed: "), "{body}");

    let listing = app
        .request(Method::GET, &format!("{files}?path=.%2F&recursive=true"))
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_body(listing).await;
    assert_eq!(status, 200);
    assert!(
        body.contains(r#"{"name":"./test.txt","entryType":"-","size":5,"modificationTime":0,"permissions":"rwxr--r--","owner":"root","group":"root"}"#),
        "{body}"
    );
    let default_path = app.get_json(&files).await;
    assert!(default_path["files"].is_array());
    let missing = app.request(Method::GET, &format!("{files}?path=missing")).send().await.unwrap();
    assert_eq!(
        status_and_body(missing).await,
        (424, r#"{"message":"file not found or insufficient permissions"}"#.to_owned())
    );

    let download =
        app.request(Method::GET, &format!("{files}/raw?path=test.txt")).send().await.unwrap();
    assert_eq!(download.status(), 200);
    assert_eq!(download.headers()["content-length"], "5");
    assert_eq!(download.headers()["content-type"], "application/octet-stream");
    assert_eq!(download.headers()["content-disposition"], "attachment; filename=\"test.txt\"");
    assert_eq!(collect_body(download).await, b"Hello");
    let missing = app.request(Method::GET, &format!("{files}/raw?path=nope")).send().await.unwrap();
    assert_eq!(missing.status(), 424);
    let directory =
        app.request(Method::GET, &format!("{files}/raw?path=dir")).send().await.unwrap();
    assert_eq!(directory.status(), 500);
}

#[tokio::test]
async fn health_reports_depleting_pools() {
    let app = spawn_app_with(|config| config.prewarming_pool_threshold = 0.5).await;
    let health = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 204);
    let never = json!({"prewarmingPoolSize": 2, "image": "never"});
    let put =
        app.request(Method::PUT, "/execution-environments/10").json(&never).send().await.unwrap();
    assert_eq!(put.status(), 201);
    let health = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(
        status_and_body(health).await,
        (
            503,
            r#"{"message":"the prewarming pool is depleting: environments 10","errorCode":"PREWARMING_POOL_DEPLETING"}"#
                .to_owned()
        )
    );
}

#[tokio::test]
async fn silent_and_idle_connections_are_closed() {
    let options = ServeOptions {
        first_request_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(600),
        ..ServeOptions::default()
    };
    let app = spawn_app_with_options(|_| {}, options).await;
    let address = app.address;
    let closed_after = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let mut silent = std::net::TcpStream::connect(address).unwrap();
        silent.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(
            silent.read(&mut [0u8; 16]).unwrap(),
            0,
            "the server closes a silent connection"
        );
        let silent_closed = started.elapsed();

        let mut idle = std::net::TcpStream::connect(address).unwrap();
        idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let request = format!("GET /api/v1/version HTTP/1.1\r\nHost: {address}\r\n\r\n");
        idle.write_all(request.as_bytes()).unwrap();
        assert!(read_response(&mut idle).starts_with("HTTP/1.1 200"));
        let answered = std::time::Instant::now();
        assert_eq!(idle.read(&mut [0u8; 16]).unwrap(), 0, "the server closes an idle connection");
        (silent_closed, answered.elapsed())
    });
    let (silent, idle) = closed_after.await.unwrap();
    assert!(silent < Duration::from_secs(2), "{silent:?}");
    assert!(idle >= Duration::from_millis(500) && idle < Duration::from_secs(3), "{idle:?}");
}
