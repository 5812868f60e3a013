//! `alloc exec` over WebSocket into the allocation's sandbox.

mod common;

use std::time::Duration;

use common::{
    TestSim, exec, exec_collect, exec_connect, exec_send, exec_wait_for, poseidon_job, stdin_frame,
};
use nomad_sim::SimConfig;
use serde_json::json;

#[tokio::test]
async fn non_tty_exec_keeps_stderr_apart_and_reports_the_exit_code() {
    let sim = TestSim::with_sandboxes(SimConfig::default()).await;
    sim.register(&poseidon_job("1-exec-a", "default")).await;
    let alloc = sim.running_alloc("1-exec-a").await;
    let outcome =
        exec(&sim, &alloc.id, &["/bin/bash", "-c", "echo hi; echo err >&2; exit 3"], false).await;
    assert_eq!(outcome.stdout, "hi\n");
    assert_eq!(outcome.stderr, "err\n");
    assert_eq!(outcome.exit_code, Some(3));
    assert_eq!(outcome.close, None, "Nomad drops the connection without a close frame");
    let last = outcome.frames.len() - 1;
    assert_eq!(outcome.frames[last], json!({"exited": true, "result": {"exit_code": 3}}));
    let closes: Vec<_> =
        outcome.frames[..last].iter().filter(|f| f.to_string().contains("close")).collect();
    assert_eq!(closes.len(), 2, "stdout and stderr close before the exit: {:?}", outcome.frames);

    let ok = exec(&sim, &alloc.id, &["/bin/bash", "-c", "pwd; id -u; true"], false).await;
    assert_eq!(ok.stdout, "/workspace\n0\n");
    assert_eq!(
        ok.frames.last(),
        Some(&json!({"exited": true, "result": {}})),
        "exit code 0 is omitted"
    );
    sim.finish().await;
}

#[tokio::test]
async fn tty_exec_merges_output_translates_newlines_and_echoes() {
    let sim = TestSim::with_sandboxes(SimConfig::default()).await;
    sim.register(&poseidon_job("1-exec-b", "default")).await;
    let alloc = sim.running_alloc("1-exec-b").await;
    let outcome =
        exec(&sim, &alloc.id, &["/bin/bash", "-c", "echo hi; echo err >&2; exit 3"], true).await;
    assert_eq!(outcome.stdout, "hi\r\nerr\r\n");
    assert_eq!(outcome.stderr, "");
    assert_eq!(outcome.exit_code, Some(3));

    let mut socket = exec_connect(
        &sim,
        &alloc.id,
        &["/bin/bash", "-c", "read line; echo got:$line"],
        true,
        None,
    )
    .await;
    exec_send(&mut socket, stdin_frame(b"abc\n")).await;
    let outcome = exec_collect(socket).await;
    assert_eq!(outcome.stdout, "abc\r\ngot:abc\r\n", "the terminal echoes the input");
    assert_eq!(outcome.exit_code, Some(0));

    // ^\ is SIGQUIT for the foreground process, Poseidon's way to stop a command. The
    // process says it is ready itself: a bash still on its way to `exec` survives SIGQUIT.
    let ready = "import time; print('ready', flush=True); time.sleep(30)";
    let argv = ["python3", "-c", ready];
    let mut socket = exec_connect(&sim, &alloc.id, &argv, true, None).await;
    exec_wait_for(&mut socket, "ready").await;
    exec_send(&mut socket, stdin_frame(&[0x1c])).await;
    let outcome = exec_collect(socket).await;
    assert_eq!(outcome.exit_code, Some(131), "{outcome:?}");
    sim.finish().await;
}

#[tokio::test]
async fn stdin_data_and_close_reach_the_process() {
    let sim = TestSim::with_sandboxes(SimConfig::default()).await;
    sim.register(&poseidon_job("1-exec-c", "default")).await;
    let alloc = sim.running_alloc("1-exec-c").await;
    let mut socket =
        exec_connect(&sim, &alloc.id, &["/bin/bash", "-c", "wc -c; cat /nonexistent"], false, None)
            .await;
    exec_send(&mut socket, json!({})).await;
    exec_send(&mut socket, stdin_frame(b"hello ")).await;
    exec_send(&mut socket, json!({"tty_size": {"height": 24, "width": 80}})).await;
    exec_send(&mut socket, stdin_frame(b"world")).await;
    exec_send(&mut socket, json!({"stdin": {"close": true}})).await;
    let outcome = exec_collect(socket).await;
    assert_eq!(outcome.stdout.trim(), "11");
    assert!(outcome.stderr.contains("No such file"), "{outcome:?}");
    assert_eq!(outcome.exit_code, Some(1));

    // Files written by one exec are seen by the next, as in one container.
    let mut socket = exec_connect(
        &sim,
        &alloc.id,
        &["/bin/bash", "-c", "tar -x -C /workspace && ls /workspace"],
        false,
        None,
    )
    .await;
    exec_send(&mut socket, stdin_frame(&tar_with("main.py", b"print(1)\n"))).await;
    exec_send(&mut socket, json!({"stdin": {"close": true}})).await;
    let outcome = exec_collect(socket).await;
    assert_eq!((outcome.stdout.as_str(), outcome.exit_code), ("main.py\n", Some(0)), "{outcome:?}");
    let cat = exec(&sim, &alloc.id, &["cat", "/workspace/main.py"], false).await;
    assert_eq!(cat.stdout, "print(1)\n");
    sim.finish().await;
}

/// A one-file ustar archive.
fn tar_with(name: &str, content: &[u8]) -> Vec<u8> {
    let mut header = [0u8; 512];
    header[..name.len()].copy_from_slice(name.as_bytes());
    header[100..107].copy_from_slice(b"0000644");
    header[108..115].copy_from_slice(b"0000000");
    header[116..123].copy_from_slice(b"0000000");
    header[124..135].copy_from_slice(format!("{:011o}", content.len()).as_bytes());
    header[136..147].copy_from_slice(b"00000000000");
    header[156] = b'0';
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|b| u32::from(*b)).sum();
    header[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    let mut archive = header.to_vec();
    archive.extend_from_slice(content);
    archive.resize(archive.len().div_ceil(512) * 512 + 1024, 0);
    archive
}

#[tokio::test]
async fn exec_errors_are_close_frames() {
    let sim =
        TestSim::with_sandboxes(SimConfig { acl_token: Some("t".into()), ..SimConfig::default() })
            .await;
    let job = poseidon_job("1-exec-d", "default");
    let response = sim
        .client
        .put(sim.url("/v1/jobs"))
        .header("X-Nomad-Token", "t")
        .json(&json!({"Job": job}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let alloc = sim.running_alloc("1-exec-d").await;
    let outcome =
        exec_collect(exec_connect(&sim, "no-such-alloc", &["true"], false, Some("t")).await).await;
    assert_eq!(outcome.close, Some((1008, "Unknown allocation \"no-such-alloc\"".into())));
    let outcome = exec_collect(exec_connect(&sim, &alloc.id, &["true"], false, None).await).await;
    assert_eq!(outcome.close, Some((1011, "Permission denied".into())));
    let outcome = exec_collect(exec_connect(&sim, &alloc.id, &[], false, Some("t")).await).await;
    assert_eq!(outcome.close, Some((1008, "command is not present".into())));
    let response = sim
        .client
        .delete(sim.url("/v1/job/1-exec-d?purge=true"))
        .header("X-Nomad-Token", "t")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    sim.wait_allocs("1-exec-d", |a| a[0].client_status == "complete").await;
    let outcome =
        exec_collect(exec_connect(&sim, &alloc.id, &["true"], false, Some("t")).await).await;
    let expected =
        format!("exec not possible, client status of allocation {} is complete", alloc.id);
    assert_eq!(outcome.close, Some((1008, expected)));
    sim.finish().await;
}

#[tokio::test]
async fn stopping_the_allocation_ends_running_sessions() {
    let sim = TestSim::with_sandboxes(SimConfig::default()).await;
    sim.register(&poseidon_job("1-exec-e", "default")).await;
    let alloc = sim.running_alloc("1-exec-e").await;
    let argv = ["/bin/bash", "-c", "echo started; sleep 60"];
    let mut socket = exec_connect(&sim, &alloc.id, &argv, false, None).await;
    assert_eq!(exec_wait_for(&mut socket, "started").await, "started\n");
    sim.sim.restart_allocation(&alloc.id, true).unwrap();
    let started = std::time::Instant::now();
    let outcome = exec_collect(socket).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        outcome.close,
        Some((1011, "failed to inspect exec: container is gone".into())),
        "{outcome:?}"
    );
    // The restarted allocation is a new container: running again, files gone.
    let restarted = sim
        .wait_allocs("1-exec-e", |a| a[0].client_status == "running" && a[0].restarts == 1)
        .await;
    assert_eq!(restarted[0].id, alloc.id);
    let outcome = exec(&sim, &alloc.id, &["/bin/bash", "-c", "echo again"], false).await;
    assert_eq!(outcome.stdout, "again\n");
    sim.finish().await;
}

#[tokio::test]
async fn a_client_disconnect_does_not_kill_the_process() {
    let sim = TestSim::with_sandboxes(SimConfig::default()).await;
    sim.register(&poseidon_job("1-exec-f", "default")).await;
    let alloc = sim.running_alloc("1-exec-f").await;
    let socket = exec_connect(
        &sim,
        &alloc.id,
        &["/bin/bash", "-c", "sleep 0.3; touch /workspace/done"],
        false,
        None,
    )
    .await;
    drop(socket);
    let deadline = std::time::Instant::now() + common::WAIT;
    while exec(&sim, &alloc.id, &["ls", "/workspace"], false).await.stdout != "done\n" {
        assert!(
            std::time::Instant::now() < deadline,
            "the process did not finish after the disconnect"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sim.finish().await;
}

#[tokio::test]
async fn sessions_run_concurrently_and_the_user_account_exists() {
    let sim = TestSim::with_sandboxes(SimConfig::default()).await;
    sim.register(&poseidon_job("1-exec-g", "default")).await;
    let alloc = sim.running_alloc("1-exec-g").await;
    // Poseidon's split-stderr technique: a second session reads a FIFO the first writes.
    let reader = exec_connect(
        &sim,
        &alloc.id,
        &["/bin/bash", "-c", "mkfifo /tmp/e.fifo && cat /tmp/e.fifo; rm /tmp/e.fifo"],
        true,
        None,
    )
    .await;
    let writer = exec_connect(
        &sim,
        &alloc.id,
        &["/bin/bash", "-c", "until [ -e /tmp/e.fifo ]; do sleep 0.01; done; (echo out; echo err >&2) 2> /tmp/e.fifo"],
        true,
        None,
    )
    .await;
    let (read, written) = tokio::join!(exec_collect(reader), exec_collect(writer));
    assert_eq!(written.stdout, "out\r\n");
    assert_eq!(read.stdout, "err\r\n");
    assert_eq!((read.exit_code, written.exit_code), (Some(0), Some(0)));
    let user = exec(
        &sim,
        &alloc.id,
        &["setpriv", "--reuid=1001", "--regid=1001", "--clear-groups", "id", "-un"],
        false,
    )
    .await;
    assert_eq!(user.stdout, "user\n", "{user:?}");
    sim.finish().await;
}

#[tokio::test]
async fn exec_into_a_pending_allocation_is_refused() {
    let sim = TestSim::start(SimConfig {
        pending_delay: Duration::from_secs(30),
        ..SimConfig::default()
    })
    .await;
    sim.register(&poseidon_job("1-exec-h", "default")).await;
    let allocs = sim.wait_allocs("1-exec-h", |a| !a.is_empty()).await;
    let outcome = exec(&sim, &allocs[0].id, &["true"], false).await;
    assert_eq!(outcome.close, Some((1008, "task \"default-task\" not started yet.".into())));
    let command: String = form_urlencoded::byte_serialize(b"[\"true\"]").collect();
    let url = format!(
        "ws://{}/v1/client/allocation/{}/exec?tty=false&command={command}",
        sim.sim.address(),
        allocs[0].id
    );
    let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let outcome = exec_collect(socket).await;
    assert_eq!(outcome.close, Some((1008, "must provide task name".into())));
    let url = format!(
        "ws://{}/v1/client/allocation/{}/exec?task=default-task&command=nojson",
        sim.sim.address(),
        allocs[0].id
    );
    assert!(
        tokio_tungstenite::connect_async(url).await.is_err(),
        "a malformed command fails before the upgrade"
    );
    sim.finish().await;
}

#[tokio::test]
async fn a_server_in_the_allocation_is_reachable_on_its_host_port() {
    let sim = TestSim::with_sandboxes(SimConfig::default()).await;
    let mut job = poseidon_job("1-exec-i", "default");
    job["TaskGroups"][0]["Networks"] =
        json!([{"Mode": "bridge", "DynamicPorts": [{"Label": "8080", "To": 8080}]}]);
    sim.register(&job).await;
    let alloc = sim.running_alloc("1-exec-i").await;
    let host_port = alloc.ports[0].1;
    // The server lives as long as its exec session.
    let server = exec_connect(
        &sim,
        &alloc.id,
        &[
            "/bin/bash",
            "-c",
            "cd /tmp && echo hello > index.txt && python3 -m http.server 8080 --bind 127.0.0.1",
        ],
        false,
        None,
    )
    .await;
    let url = format!("http://127.0.0.1:{host_port}/index.txt");
    let deadline = std::time::Instant::now() + common::WAIT;
    let body = loop {
        if let Ok(response) = reqwest::get(&url).await
            && response.status() == 200
        {
            break response.text().await.unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "the server never answered on {url}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(body, "hello\n");
    drop(server);
    sim.finish().await;
}

#[tokio::test]
async fn the_browser_handshake_carries_the_token() {
    use tokio_tungstenite::tungstenite::Message;
    let sim =
        TestSim::with_sandboxes(SimConfig { acl_token: Some("t".into()), ..SimConfig::default() })
            .await;
    let response = sim
        .client
        .put(sim.url("/v1/jobs"))
        .header("X-Nomad-Token", "t")
        .json(&json!({"Job": poseidon_job("1-exec-j", "default")}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let alloc = sim.running_alloc("1-exec-j").await;
    let command: String = form_urlencoded::byte_serialize(b"[\"echo\",\"ok\"]").collect();
    let url = format!(
        "ws://{}/v1/client/allocation/{}/exec?task=default-task&ws_handshake=true&command={command}",
        sim.sim.address(),
        alloc.id
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
    futures::SinkExt::send(
        &mut socket,
        Message::text(json!({"version": 1, "auth_token": "t"}).to_string()),
    )
    .await
    .unwrap();
    let outcome = exec_collect(socket).await;
    assert_eq!((outcome.stdout.as_str(), outcome.exit_code), ("ok\n", Some(0)));
    let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
    futures::SinkExt::send(&mut socket, Message::text(json!({"version": 2}).to_string()))
        .await
        .unwrap();
    let outcome = exec_collect(socket).await;
    assert_eq!(outcome.close, Some((1008, "unexpected handshake value: 2".into())));
    sim.finish().await;
}
