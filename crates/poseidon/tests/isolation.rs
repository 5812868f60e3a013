//! A few isolation smoke checks through the public API; the sandbox crate has the deep tests.

// Shared by every test crate; each uses a part of it.
#[allow(dead_code)]
mod common;

use common::{ServerOptions, TIME_LIMIT, with_runner, with_server};

#[tokio::test]
async fn host_home_directories_are_not_visible() {
    with_runner(async |server, runner| {
        for directory in ["/root", "/home"] {
            let listing = server.run_privileged(runner, &format!("ls -A {directory}")).await;
            assert_eq!(
                listing.stdout, "",
                "{directory} is not empty inside the runner: {listing:#?}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn the_learner_cannot_read_shadow() {
    with_runner(async |server, runner| {
        let shadow = server.run(runner, "cat /etc/shadow").await;
        assert_ne!(shadow.exit_code(), 0, "{shadow:#?}");
        assert_eq!(shadow.stdout, "", "{shadow:#?}");
    })
    .await;
}

#[tokio::test]
async fn only_the_runners_own_processes_are_visible() {
    with_runner(async |server, runner| {
        let processes = server.run(runner, "ps ax").await;
        processes.assert_exit(0);
        let lines = processes.stdout.lines().count();
        // Header, the runner's init, bash and ps: a handful, never the host's.
        assert!(lines <= 6, "{lines} lines of `ps ax`: {processes:#?}");
        assert!(!processes.stdout.contains("poseidon serve"), "{processes:#?}");
    })
    .await;
}

#[tokio::test]
async fn the_poseidon_api_is_unreachable_from_inside() {
    with_runner(async |server, runner| {
        let port = server.addr.port();
        let command = format!(
            "(echo > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo connected || echo refused"
        );
        let probe = server.run(runner, &command).await;
        assert_eq!(probe.stdout, "refused\r\n", "{probe:#?}");
    })
    .await;
}

#[tokio::test]
async fn runners_cannot_see_each_others_files_or_processes() {
    with_server(ServerOptions::default(), async |server| {
        server.create_env(1, 2).await;
        let first = server.claim(1, 60).await;
        let second = server.claim(1, 60).await;
        server.copy(&first, &[("secret.txt", b"only for the first runner")]).await;
        let url = server.execute(&first, "echo ready; exec sleep 777", TIME_LIMIT, false).await;
        let mut session = server.connect(&url).await;
        session.wait_for_stdout("ready").await;

        let workspace = server.run(&second, "ls -A /workspace").await;
        assert_eq!(workspace.stdout, "", "{workspace:#?}");
        let processes = server.run(&second, "ps ax").await;
        assert!(!processes.stdout.contains("sleep 777"), "{processes:#?}");
        let secret = server.download(&second, "secret.txt", true).await;
        secret.expect_message(424, "the other runner's file");

        session.close().await;
    })
    .await;
}
