//! Restart with the same state directory: environments are persisted and their pools refilled.
//!
//! Claimed runners of the local backend do not survive a restart: their processes belong to the
//! stopped service, which destroys them on the way out. CodeOcean recovers through the 410 it
//! then gets for the old runner id (it claims a new runner and copies its files again).
//! Runners of the Nomad backend are Nomad jobs: they survive, claimed ones with a fresh
//! inactivity timer (spec §8.1).

// Shared by every test crate; each uses a part of it.
#[allow(dead_code)]
mod common;

use std::time::{Duration, Instant};

use common::{ServerOptions, TestServer, environment_body, nomad_backend, within};

#[tokio::test]
async fn environments_survive_a_restart_and_their_pools_refill() {
    let server = TestServer::start(ServerOptions::default()).await;
    let (runner, before) = within(async {
        server.create_env(1, 1).await;
        server.create_env(2, 0).await;
        server.create_env(3, 0).await;
        server.delete("/execution-environments/3").await.expect_empty(204, "DELETE 3");
        let runner = server.claim(1, 600).await;
        let before = server.get("/execution-environments/1").await.expect(200, "GET 1").json();
        (runner, before)
    })
    .await;
    let home = server.stop().await;

    let server = TestServer::start_in(home, ServerOptions::default()).await;
    within(async {
        let after = server.get("/execution-environments/1").await.expect(200, "GET 1").json();
        assert_eq!(after, before, "environment 1 changed across the restart");
        server.get("/execution-environments/2").await.expect(200, "GET 2");
        server.get("/execution-environments/3").await.expect_empty(404, "deleted environment 3");

        server.wait_idle(1, 1).await;
        let statistics = server.statistics().await;
        let used = if nomad_backend() { 1 } else { 0 };
        assert_eq!(statistics["1"]["usedRunners"], used, "{statistics}");
        assert_eq!(statistics["1"]["prewarmingPoolSize"], 1, "{statistics}");
        // Restored, not duplicated: exactly the pool size.
        assert_eq!(statistics["1"]["idleRunners"], 1, "{statistics}");

        let status = if nomad_backend() { 200 } else { 410 };
        server.list_files(&runner, &[]).await.expect(status, "runner claimed before the restart");
        // The restored environment is known: a PUT updates it.
        server.put_env(1, &environment_body(1, 1)).await.expect_empty(204, "PUT after restart");
        server.wait_idle(1, 1).await;
        server.claim(1, 60).await;
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn nomad_claimed_runners_survive_a_restart_with_a_fresh_inactivity_timer() {
    if !nomad_backend() {
        eprintln!("skipped: only for the Nomad backend (POSEIDON_E2E_BACKEND=nomad)");
        return;
    }
    let server = TestServer::start(ServerOptions::default()).await;
    let runner = within(async {
        server.create_env(1, 2).await;
        let runner = server.claim(1, 5).await;
        server.copy(&runner, &[("kept.txt", b"kept")]).await;
        server.wait_idle(1, 2).await;
        runner
    })
    .await;
    // Let the background claim reach Nomad's job metadata.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let home = server.stop().await;

    let server = TestServer::start_in(home, ServerOptions::default()).await;
    within(async {
        let restarted = Instant::now();
        let statistics = server.statistics().await;
        assert_eq!(statistics["1"]["usedRunners"], 1, "{statistics}");
        assert_eq!(statistics["1"]["idleRunners"], 2, "{statistics}");
        assert_eq!(server.nomad_runner_jobs(1).len(), 3, "exactly pool + used runner jobs");
        let reply = server.download(&runner, "kept.txt", false).await.expect(200, "kept file");
        assert_eq!(reply.body, b"kept");
        // The download reset the timer; it fires 5 s after the last use, not earlier. Polling
        // the statistics does not touch the runner.
        let used = Instant::now();
        while server.statistics().await["1"]["usedRunners"] == 1 {
            assert!(used.elapsed() < Duration::from_secs(12), "the inactivity timer never fired");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(restarted.elapsed() >= Duration::from_secs(4), "the timer was not restarted");
        server.list_files(&runner, &[]).await.expect(410, "timed out runner");
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.nomad_runner_jobs(1).len() != 2 {
            assert!(Instant::now() < deadline, "the timed-out runner's job stays");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    server.stop().await;
}
