//! Restart with the same state directory: environments are persisted and their pools refilled.
//!
//! Claimed runners of the local backend do not survive a restart: their processes belong to the
//! stopped service, which destroys them on the way out. CodeOcean recovers through the 410 it
//! then gets for the old runner id (it claims a new runner and copies its files again).

// Shared by every test crate; each uses a part of it.
#[allow(dead_code)]
mod common;

use common::{ServerOptions, TestServer, environment_body, within};

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
        assert_eq!(statistics["1"]["usedRunners"], 0, "{statistics}");
        assert_eq!(statistics["1"]["prewarmingPoolSize"], 1, "{statistics}");
        // Restored, not duplicated: exactly the pool size.
        assert_eq!(statistics["1"]["idleRunners"], 1, "{statistics}");

        server.list_files(&runner, &[]).await.expect(410, "runner claimed before the restart");
        // The restored environment is known: a PUT updates it.
        server.put_env(1, &environment_body(1, 1)).await.expect_empty(204, "PUT after restart");
        server.wait_idle(1, 1).await;
        server.claim(1, 60).await;
    })
    .await;
    server.stop().await;
}
