//! CodeOcean's flows end to end: environment validation right after a sync, and a classroom of
//! learners who claim, copy, run with input, list, download and destroy at the same time.

// Shared by every test crate; each uses a part of it.
#[allow(dead_code)]
mod common;

use std::time::{Duration, Instant};

use common::{
    INACTIVITY_TIMEOUT, ServerOptions, TIME_LIMIT, TestServer, environment_body, with_server,
};
use futures::future::join_all;
use serde_json::json;

const LEARNERS: u64 = 50;
const MAIN_PY: &[u8] = b"from helper import greet\n\nname = input()\nprint(greet(name))\n";
const HELPER_PY: &[u8] = b"def greet(name):\n    return \"Hello, \" + name.upper() + \"!\"\n";

/// `POST /runners` as CodeOcean's callers use it: NOMAD_OVERLOAD means "try again later".
async fn claim_with_retry(server: &TestServer, env: u32) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reply = server.try_claim(env, INACTIVITY_TIMEOUT).await;
        if reply.status == 200 {
            return reply.json()["runnerId"].as_str().expect("runnerId").to_owned();
        }
        let body = reply.expect_message(500, "claim");
        assert_eq!(body["errorCode"], "NOMAD_OVERLOAD", "{body}");
        assert!(Instant::now() < deadline, "no runner became available within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One learner's "run": copy (wiping the workspace), execute with one line of input, list the
/// files, download one, and finally give the runner back. Returns the runner's id.
async fn learner(server: &TestServer, number: u64) -> String {
    let runner = claim_with_retry(server, 1).await;
    for attempt in 0..2 {
        let copy = json!({
            "copy": common::copy_entries(&[("main.py", MAIN_PY), ("helper.py", HELPER_PY)]),
            "delete": ["./*"],
        });
        server.copy_files(&runner, &copy).await.expect_empty(204, "PATCH files");

        let url = server.execute(&runner, "python3 main.py", TIME_LIMIT, false).await;
        let name = format!("learner{number}x{attempt}");
        let transcript = server.run_ws(&url, &[&format!("{name}\n")]).await;
        transcript.assert_exit(0);
        let greeting = format!("Hello, {}!\r\n", name.to_uppercase());
        assert!(transcript.stdout.contains(&greeting), "learner {number}: {transcript:#?}");
        assert_eq!(transcript.stderr, "", "learner {number}: {transcript:#?}");

        let query = [("path", "./"), ("privilegedExecution", "false"), ("recursive", "true")];
        let listing = server.list_files(&runner, &query).await.expect(200, "GET files").json();
        let names: Vec<&str> = listing["files"]
            .as_array()
            .expect("files is an array")
            .iter()
            .filter_map(|entry| entry["name"].as_str())
            .collect();
        assert!(names.contains(&"./main.py") && names.contains(&"./helper.py"), "{listing}");

        let download = server.download(&runner, "main.py", false).await.expect(200, "download");
        assert_eq!(download.body, MAIN_PY);
    }
    server.delete(&format!("/runners/{runner}")).await.expect_empty(204, "DELETE runner");
    runner
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classroom_of_learners_at_once() {
    with_server(ServerOptions::default(), async |server| {
        let started = Instant::now();
        server.create_env(1, LEARNERS).await;
        let filled = started.elapsed();

        let started = Instant::now();
        let mut runners = join_all((0..LEARNERS).map(|number| learner(server, number))).await;
        let wall = started.elapsed();
        runners.sort_unstable();
        runners.dedup();
        // Go once handed one runner to two learners (spec §13.7).
        assert_eq!(runners.len() as u64, LEARNERS, "a runner was handed out twice");
        eprintln!(
            "{LEARNERS} learners (2 runs each): pool of {LEARNERS} filled in {filled:?}, all done in {wall:?}"
        );
        let statistics = server.statistics().await;
        assert_eq!(statistics["1"]["usedRunners"], 0, "{statistics}");
        // Every claim started one replacement: the pool is full again.
        server.wait_idle(1, LEARNERS).await;
        // Pending creations count towards the pool: no over-provisioning (spec §13.6).
        let statistics = server.statistics().await;
        assert_eq!(statistics["1"]["idleRunners"], LEARNERS, "{statistics}");
    })
    .await;
}

#[tokio::test]
async fn environment_validation_right_after_the_sync() {
    with_server(ServerOptions::default(), async |server| {
        // CodeOcean PUTs, then claims and runs `whoami`, retrying on any error (client §1).
        server.put_env(2, &environment_body(2, 1)).await.expect_empty(201, "PUT");
        let runner = claim_with_retry(server, 2).await;
        let whoami = server.run(&runner, "whoami").await;
        whoami.assert_exit(0);
        assert_eq!(whoami.stdout, "user\r\n", "{whoami:#?}");
        assert_eq!(whoami.stderr, "", "any stderr fails CodeOcean's validation: {whoami:#?}");
    })
    .await;
}
