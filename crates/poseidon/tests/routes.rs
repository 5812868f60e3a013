//! The route table, status codes and error bodies CodeOcean depends on (spec §2, client §1 and
//! §6), and the `Poseidon-Token` check (spec §2.2).

// Shared by every test crate; each uses a part of it.
#[allow(dead_code)]
mod common;

use common::ws::WsSession;
use common::{Reply, ServerOptions, TestServer, environment_body, eventually, with_server, within};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

#[tokio::test]
async fn health_answers_204_with_an_empty_body() {
    with_server(ServerOptions::default(), async |server| {
        // CodeOcean: 204 is healthy; 200 counts as a failure.
        server.get("/health").await.expect_empty(204, "GET /health");
    })
    .await;
}

#[tokio::test]
async fn health_answers_503_while_a_pool_is_below_the_threshold() {
    let options = ServerOptions {
        // idle / size <= 1 < 1.5, so any environment with a pool is depleting (spec §2.5).
        pool_threshold: Some(1.5),
        ..ServerOptions::default()
    };
    with_server(options, async |server| {
        server.get("/health").await.expect_empty(204, "health without environments");
        // Pool size 0 divides by zero and is never flagged.
        server.create_env(8, 0).await;
        server.get("/health").await.expect_empty(204, "health with an empty pool size");

        server.create_env(7, 1).await;
        let body = server.get("/health").await.expect_message(503, "health with a depleting pool");
        assert_eq!(body["errorCode"], "PREWARMING_POOL_DEPLETING", "{body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains('7'), "message does not name environment 7: {message}");
        assert!(!message.contains('8'), "message names environment 8 (pool size 0): {message}");
    })
    .await;
}

#[tokio::test]
async fn health_answers_204_while_pools_are_full() {
    let options = ServerOptions { pool_threshold: Some(0.5), ..ServerOptions::default() };
    with_server(options, async |server| {
        server.create_env(7, 2).await;
        server.get("/health").await.expect_empty(204, "health with a full pool");
    })
    .await;
}

#[tokio::test]
async fn pool_size_changes_apply_on_put() {
    with_server(ServerOptions::default(), async |server| {
        server.create_env(9, 1).await;
        server.put_env(9, &environment_body(9, 3)).await.expect_empty(204, "PUT pool 3");
        server.wait_idle(9, 3).await;
        server.put_env(9, &environment_body(9, 1)).await.expect_empty(204, "PUT pool 1");
        let stored = server.get("/execution-environments/9").await.expect(200, "GET").json();
        assert_eq!(stored["prewarmingPoolSize"], 1, "{stored}");
        let shrunk = eventually(Duration::from_secs(5), async || {
            let statistics = server.statistics().await;
            statistics["9"]["prewarmingPoolSize"] == 1 && statistics["9"]["idleRunners"] == 1
        })
        .await;
        assert!(shrunk, "pool did not shrink to 1: {}", server.statistics().await);
    })
    .await;
}

#[tokio::test]
async fn version_is_a_json_string_and_needs_no_token() {
    with_server(ServerOptions::with_token("secret"), async |server| {
        let reply = server
            .client
            .get(format!("{}/version", server.base_url))
            .send()
            .await
            .expect("GET /version");
        assert_eq!(reply.status(), 200);
        let version: Value = reply.json().await.expect("version body is JSON");
        assert!(
            version.as_str().is_some_and(|version| !version.is_empty()),
            "version must be a non-empty JSON string: {version}"
        );
    })
    .await;
}

#[tokio::test]
async fn statistics_are_keyed_by_environment_id_string() {
    with_server(ServerOptions::default(), async |server| {
        server.create_env(5, 2).await;
        server.claim(5, 60).await;
        // The claim starts one replacement (spec §6.2).
        server.wait_idle(5, 2).await;
        let statistics = server.statistics().await;
        let object = statistics.as_object().expect("statistics is an object");
        assert_eq!(object.keys().collect::<Vec<_>>(), ["5"], "{statistics}");
        assert_eq!(
            statistics["5"],
            json!({"id": 5, "prewarmingPoolSize": 2, "idleRunners": 2, "usedRunners": 1}),
        );
    })
    .await;
}

#[tokio::test]
async fn put_environment_answers_201_then_204_without_body() {
    with_server(ServerOptions::default(), async |server| {
        let body = environment_body(3, 0);
        // CodeOcean accepts exactly 201 (new) or 204 (updated); 200 counts as failure.
        server.put_env(3, &body).await.expect_empty(201, "first PUT");
        server.put_env(3, &body).await.expect_empty(204, "second PUT");
    })
    .await;
}

#[tokio::test]
async fn put_environment_rejects_malformed_bodies_with_400_message() {
    with_server(ServerOptions::default(), async |server| {
        let malformed = [
            "",
            "{",
            "[1, 2]",
            r#"{"prewarmingPoolSize": "many", "image": "host"}"#,
            r#"{"prewarmingPoolSize": -1, "image": "host"}"#,
            r#"{"prewarmingPoolSize": 1, "image": "host", "exposedPorts": [70000]}"#,
        ];
        let mut problems = Vec::new();
        for body in malformed {
            let request = server.request(Method::PUT, "/execution-environments/4").body(body);
            let reply = Reply::from(request).await;
            // CodeOcean reads `message` from every 400.
            let has_message = serde_json::from_slice::<Value>(&reply.body)
                .is_ok_and(|json| json["message"].is_string());
            if reply.status != 400 || !has_message {
                problems.push(format!("{body:?} -> {} {}", reply.status, reply.text()));
            }
        }
        assert!(problems.is_empty(), "malformed PUT bodies not answered with 400: {problems:#?}");
        server.get("/execution-environments/4").await.expect_empty(404, "GET after rejected PUTs");
    })
    .await;
}

#[tokio::test]
async fn put_environment_accepts_the_id_field_and_unknown_fields() {
    with_server(ServerOptions::default(), async |server| {
        let mut body = environment_body(6, 0);
        // CodeOcean sends `id`; unknown fields must be ignored as Go's decoder does.
        body["id"] = json!(999);
        body["somethingNew"] = json!({"nested": true});
        server.put_env(6, &body).await.expect_empty(201, "PUT with extra fields");
        let stored = server.get("/execution-environments/6").await.expect(200, "GET").json();
        assert_eq!(stored["id"], 6, "the path id wins over the body id: {stored}");
    })
    .await;
}

#[tokio::test]
async fn get_environment_returns_every_field() {
    with_server(ServerOptions::default(), async |server| {
        server.put_env(10, &environment_body(10, 1)).await.expect_empty(201, "PUT");
        let stored = server.get("/execution-environments/10").await.expect(200, "GET").json();
        let mut keys: Vec<&str> = stored
            .as_object()
            .expect("environment is an object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "cpuLimit",
                "exposedPorts",
                "id",
                "image",
                "memoryLimit",
                "networkAccess",
                "prewarmingPoolSize"
            ],
            "{stored}"
        );
        assert_eq!(stored["id"], 10);
        assert_eq!(stored["image"], common::IMAGE);
        assert_eq!(stored["prewarmingPoolSize"], 1);
        assert_eq!(stored["cpuLimit"], common::CPU_LIMIT);
        assert_eq!(stored["memoryLimit"], common::MEMORY_LIMIT);
        assert_eq!(stored["networkAccess"], false);
        // Go sends null for no ports; both are fine for CodeOcean.
        assert!(
            stored["exposedPorts"].is_null() || stored["exposedPorts"] == json!([]),
            "{stored}"
        );
    })
    .await;
}

#[tokio::test]
async fn unknown_or_non_numeric_environment_ids_are_404_with_empty_body() {
    with_server(ServerOptions::default(), async |server| {
        server.get("/execution-environments/12345").await.expect_empty(404, "GET unknown");
        // Environment ids must match [0-9]+ (spec §2.3).
        server.get("/execution-environments/abc").await.expect_empty(404, "GET abc");
        server.get("/execution-environments/-1").await.expect_empty(404, "GET -1");
        // Digits that overflow a 64-bit integer are a bad request in Go (spec §2.3).
        let overflow = server.get("/execution-environments/99999999999999999999").await;
        overflow.expect(400, "GET of an overflowing id");
        let body = environment_body(1, 0);
        let reply = server.call(Method::PUT, "/execution-environments/abc", Some(&body)).await;
        reply.expect_empty(404, "PUT abc");
    })
    .await;
}

#[tokio::test]
async fn list_environments_wraps_them_in_execution_environments() {
    with_server(ServerOptions::default(), async |server| {
        let empty = server.get("/execution-environments").await.expect(200, "list").json();
        // Go sends null for none; CodeOcean treats null as [].
        let none = &empty["executionEnvironments"];
        assert!(none.is_null() || none == &json!([]), "{empty}");

        server.create_env(11, 0).await;
        server.create_env(12, 0).await;
        let listing = server.get("/execution-environments").await.expect(200, "list").json();
        let mut ids: Vec<u64> = listing["executionEnvironments"]
            .as_array()
            .unwrap_or_else(|| panic!("executionEnvironments is not an array: {listing}"))
            .iter()
            .map(|environment| environment["id"].as_u64().expect("integer id"))
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, [11, 12]);
    })
    .await;
}

#[tokio::test]
async fn list_environments_parses_the_fetch_flag() {
    with_server(ServerOptions::default(), async |server| {
        let reply = server.get("/execution-environments?fetch=maybe").await;
        reply.expect_message(400, "fetch=maybe");
        server.get("/execution-environments?fetch=false").await.expect(200, "fetch=false");
        server.get("/execution-environments?fetch=true").await.expect(200, "fetch=true");
    })
    .await;
}

#[tokio::test]
async fn delete_environment_answers_204_then_404_and_its_runners_are_gone() {
    with_server(ServerOptions::default(), async |server| {
        server.create_env(13, 1).await;
        let runner = server.claim(13, 60).await;
        server.delete("/execution-environments/13").await.expect_empty(204, "DELETE");
        // CodeOcean treats 404 on DELETE as failure, but a second DELETE has nothing to delete.
        server.delete("/execution-environments/13").await.expect_empty(404, "second DELETE");
        server.get("/execution-environments/13").await.expect_empty(404, "GET after DELETE");
        let files = format!("/runners/{runner}/files");
        let gone =
            eventually(Duration::from_secs(2), async || server.get(&files).await.status == 410)
                .await;
        assert!(gone, "a runner of a deleted environment must answer 410");
        let statistics = server.statistics().await;
        assert!(statistics.get("13").is_none(), "deleted environment in statistics: {statistics}");
    })
    .await;
}

#[tokio::test]
async fn claim_answers_200_with_runner_id_and_empty_mapped_ports() {
    with_server(ServerOptions::default(), async |server| {
        server.create_env(14, 1).await;
        // CodeOcean accepts 200 only (not 201).
        let body = server.try_claim(14, 60).await.expect(200, "claim").json();
        let runner = body["runnerId"].as_str().expect("runnerId is a string");
        assert!(runner.starts_with("14-"), "runner id {runner} lacks the `<env>-` prefix");
        // Ids go into URL paths unescaped (client §1).
        assert!(
            runner.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-'),
            "runner id {runner} is not URL-path-safe"
        );
        assert_eq!(body["mappedPorts"], json!([]), "{body}");
        // Both fields are optional in Go; a missing inactivityTimeout means none.
        server.wait_idle(14, 1).await;
        let lenient = json!({"executionEnvironmentId": 14});
        server
            .call(Method::POST, "/runners", Some(&lenient))
            .await
            .expect(200, "claim without timeout");
    })
    .await;
}

#[tokio::test]
async fn claim_errors_are_404_for_unknown_env_500_overload_for_empty_pool_and_400_for_bad_json() {
    with_server(ServerOptions::default(), async |server| {
        // 404 makes CodeOcean sync the environment (client §1, request_new_id).
        server.try_claim(404, 60).await.expect_message(404, "claim of an unknown environment");

        server.create_env(15, 0).await;
        let body = server.try_claim(15, 60).await.expect_message(500, "claim from an empty pool");
        assert_eq!(body["errorCode"], "NOMAD_OVERLOAD", "{body}");

        let request = server.request(Method::POST, "/runners").body("{\"executionEnvironmentId\":");
        Reply::from(request).await.expect_message(400, "claim with broken JSON");
    })
    .await;
}

#[tokio::test]
async fn unknown_paths_are_404_and_wrong_methods_405() {
    with_server(ServerOptions::default(), async |server| {
        server.get("/nope").await.expect_empty(404, "unknown path");
        server.get("/runners").await.expect_empty(405, "GET /runners");
        server.call(Method::POST, "/health", None).await.expect_empty(405, "POST /health");
        server
            .call(Method::POST, "/execution-environments/1", None)
            .await
            .expect_empty(405, "POST environment");
        let root =
            server.client.get(format!("http://{}/", server.addr)).send().await.expect("GET /");
        assert_eq!(root.status(), 404, "GET / outside the API prefix");
    })
    .await;
}

/// Every protected route with a body that would otherwise be valid enough to get past parsing.
fn protected_routes() -> Vec<(Method, &'static str, Option<Value>)> {
    vec![
        (Method::GET, "/statistics/execution-environments", None),
        (Method::GET, "/execution-environments", None),
        (Method::GET, "/execution-environments/1", None),
        (Method::PUT, "/execution-environments/1", Some(environment_body(1, 0))),
        (Method::DELETE, "/execution-environments/1", None),
        (
            Method::POST,
            "/runners",
            Some(json!({"executionEnvironmentId": 1, "inactivityTimeout": 60})),
        ),
        (Method::DELETE, "/runners/1-unknown", None),
        (Method::GET, "/runners/1-unknown/files", None),
        (Method::PATCH, "/runners/1-unknown/files", Some(json!({"copy": []}))),
        (Method::GET, "/runners/1-unknown/files/raw?path=x", None),
        (Method::POST, "/runners/1-unknown/execute", Some(json!({"command": "true"}))),
        (Method::GET, "/runners/1-unknown/websocket?executionID=x", None),
    ]
}

#[tokio::test]
async fn every_route_but_health_and_version_needs_the_token() {
    with_server(ServerOptions::with_token("secret"), async |server| {
        for (method, path, body) in protected_routes() {
            for token in [None, Some("wrong"), Some("secre"), Some("secret2")] {
                let mut request = server
                    .client
                    .request(method.clone(), format!("{}{path}", server.base_url))
                    .header("Content-Type", "application/json");
                if let Some(token) = token {
                    request = request.header("Poseidon-Token", token);
                }
                if let Some(body) = &body {
                    request = request.body(body.to_string());
                }
                let reply = Reply::from(request).await;
                // Auth comes before the runner lookup: 401, not 410 (spec §2.2).
                reply.expect_empty(401, &format!("{method} {path} with token {token:?}"));
            }
        }
        let health = server.client.get(format!("{}/health", server.base_url)).send().await;
        assert_eq!(health.expect("GET /health").status(), 204, "health needs no token");
        server.get("/execution-environments").await.expect(200, "list with the right token");
    })
    .await;
}

#[tokio::test]
async fn websocket_upgrade_needs_the_token_header() {
    with_server(ServerOptions::with_token("secret"), async |server| {
        server.create_env(1, 1).await;
        let runner = server.claim(1, 60).await;
        let url = server.execute(&runner, "echo authorized", 10, false).await;
        for token in [None, Some("wrong")] {
            let refused = WsSession::connect(&url, token).await;
            assert_eq!(refused.err(), Some(401), "upgrade with token {token:?}");
        }
        // The refused attempts must not have consumed the one-shot execution.
        let transcript = server.connect(&url).await.finish().await;
        transcript.assert_exit(0);
        assert!(transcript.stdout.contains("authorized"), "{transcript:#?}");
    })
    .await;
}

#[tokio::test]
async fn requests_with_unknown_headers_are_served() {
    with_server(ServerOptions::default(), async |server| {
        // Faraday, Sentry tracing and CodeOcean's JSON content type on a GET (client §1).
        let reply = server
            .request(Method::GET, "/execution-environments")
            .header("User-Agent", "Faraday v2.9.0")
            .header("sentry-trace", "771a43a4192642f0b136d5159a501700-b3f4d8e0f0a3c1b2-1")
            .header("baggage", "sentry-environment=production")
            .send()
            .await
            .expect("GET with extra headers");
        assert_eq!(reply.status(), 200);
    })
    .await;
}

#[tokio::test]
async fn graceful_stop_ends_running_executions_and_pools() {
    let server = TestServer::start(ServerOptions::default()).await;
    let session = within(async {
        server.create_env(16, 3).await;
        let runner = server.claim(16, 60).await;
        let url = server.execute(&runner, "sleep 100", 0, false).await;
        server.connect(&url).await
    })
    .await;
    // `stop` checks that no cgroup and no process of the runners survive.
    server.stop().await;
    drop(session);
}
