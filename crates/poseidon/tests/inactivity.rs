//! The runner inactivity timeout (spec §6.4, client §6.11): it starts at the claim, file
//! operations and execution starts reset it, and when it fires running executions end with
//! `timeout` and the runner answers 410.

// Shared by every test crate; each uses a part of it.
#[allow(dead_code)]
mod common;

use std::time::{Duration, Instant};

use common::ws::Terminal;
use common::{ServerOptions, TestServer, eventually, with_server};

/// Whether environment 1 has no used runner; unlike any runner route, this does not reset the
/// inactivity timer it observes.
async fn no_used_runner(server: &TestServer) -> bool {
    server.statistics().await["1"]["usedRunners"] == 0
}

async fn is_gone(server: &TestServer, runner: &str) -> bool {
    server.list_files(runner, &[]).await.status == 410
}

#[tokio::test]
async fn inactivity_timeout_ends_a_running_execution_with_timeout() {
    with_server(ServerOptions::default(), async |server| {
        server.create_env(1, 1).await;
        let runner = server.claim(1, 2).await;
        let url = server.execute(&runner, "sleep infinity", 0, false).await;
        let transcript = server.run_ws(&url, &[]).await;
        // Go's e2e: `timeout` within inactivity + 5 s.
        assert_eq!(transcript.terminal, Terminal::Timeout, "{transcript:#?}");
        assert!(
            (Duration::from_millis(1500)..Duration::from_secs(7)).contains(&transcript.elapsed),
            "timeout after {:?} for an inactivity timeout of 2 s",
            transcript.elapsed
        );
        let expired =
            eventually(Duration::from_secs(2), async || no_used_runner(server).await).await;
        assert!(expired, "the expired runner is still counted as used");
        assert!(is_gone(server, &runner).await, "the expired runner must answer 410");
        // CodeOcean deletes after a timeout and accepts 410.
        server.delete(&format!("/runners/{runner}")).await.expect(410, "DELETE expired runner");
    })
    .await;
}

#[tokio::test]
async fn file_operations_reset_the_inactivity_timer() {
    with_server(ServerOptions::default(), async |server| {
        server.create_env(1, 1).await;
        let runner = server.claim(1, 2).await;
        server.copy(&runner, &[("a.txt", b"a")]).await;
        // Each step comes 1 s after the previous one, well inside the 2 s timeout, and the
        // last one comes long after the first deadline.
        for step in 0..4 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let status = match step % 3 {
                0 => server.list_files(&runner, &[]).await.status,
                1 => server.download(&runner, "a.txt", false).await.status,
                _ => {
                    server.copy(&runner, &[("b.txt", b"b")]).await;
                    reqwest::StatusCode::NO_CONTENT
                }
            };
            assert!(status.is_success(), "file operation {step} answered {status}");
        }
        let last_operation = Instant::now();
        let expired =
            eventually(Duration::from_secs(5), async || no_used_runner(server).await).await;
        let idle_for = last_operation.elapsed();
        assert!(expired, "the runner did not expire within 5 s of inactivity");
        assert!(is_gone(server, &runner).await, "the expired runner must answer 410");
        assert!(idle_for >= Duration::from_millis(1500), "the runner expired after {idle_for:?}");
    })
    .await;
}

#[tokio::test]
async fn executions_reset_the_inactivity_timer() {
    with_server(ServerOptions::default(), async |server| {
        server.create_env(1, 1).await;
        let runner = server.claim(1, 2).await;
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            server.run(&runner, "true").await.assert_exit(0);
        }
        assert!(
            !is_gone(server, &runner).await,
            "runner expired although it was used every second"
        );
    })
    .await;
}

#[tokio::test]
async fn zero_inactivity_timeout_never_expires() {
    with_server(ServerOptions::default(), async |server| {
        server.create_env(1, 1).await;
        let runner = server.claim(1, 0).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        server.list_files(&runner, &[]).await.expect(200, "runner with inactivityTimeout 0");
    })
    .await;
}
