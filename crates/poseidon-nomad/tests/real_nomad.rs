//! Against a real Nomad cluster, only when `NOMAD_ADDR` is set (e.g. `http://127.0.0.1:4646`
//! of `nomad agent -dev` with Docker); `NOMAD_TOKEN` and `NOMAD_NAMESPACE` are honoured and
//! `POSEIDON_NOMAD_TEST_IMAGE` picks the image (default `openhpi/docker_exec_phusion`).
//! Without `NOMAD_ADDR` the test says that it was skipped and passes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use poseidon_core::backend::{FileCopy, FileUpdate, ListRequest};
use poseidon_core::environment::EnvironmentConfig;
use poseidon_core::ids::EnvironmentId;
use poseidon_core::{Core, CoreConfig, ExecutionEvent, ExecutionRequest};
use poseidon_nomad::{NomadBackend, NomadConfig};

/// `http://host:port` → host and port.
fn address(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest).trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').unwrap_or((rest, "4646"));
    (host.to_owned(), port.parse().expect("a port in NOMAD_ADDR"))
}

#[tokio::test]
async fn a_runner_on_a_real_nomad_cluster_executes_and_holds_files() {
    let Ok(url) = std::env::var("NOMAD_ADDR") else {
        eprintln!(
            "SKIPPED a_runner_on_a_real_nomad_cluster_executes_and_holds_files: NOMAD_ADDR is not set"
        );
        return;
    };
    let (host, port) = address(&url);
    let config = NomadConfig {
        address: host,
        port,
        token: std::env::var("NOMAD_TOKEN").unwrap_or_default(),
        namespace: std::env::var("NOMAD_NAMESPACE").unwrap_or_else(|_| "default".into()),
        ..NomadConfig::default()
    };
    let backend = NomadBackend::start(config).await.expect("the Nomad backend");
    let core = Core::new(Arc::new(backend), CoreConfig::default());
    core.restore().await.expect("recovery from the cluster");
    let id = EnvironmentId(9000 + i64::from(std::process::id() % 999));
    let image = std::env::var("POSEIDON_NOMAD_TEST_IMAGE")
        .unwrap_or_else(|_| "openhpi/docker_exec_phusion".into());
    let environment = EnvironmentConfig {
        id,
        prewarming_pool_size: 1,
        cpu_limit: 20,
        memory_limit: 256,
        image,
        network_access: false,
        exposed_ports: Vec::new(),
    };
    core.put_environment(environment).await.expect("the template job registers");
    let deadline = Instant::now() + Duration::from_secs(300);
    while core.statistics().iter().all(|statistics| statistics.idle_runners == 0) {
        assert!(Instant::now() < deadline, "no runner started within 5 minutes");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let runner = core.claim(id, Duration::from_secs(300)).await.expect("a runner").id;
    let copy = FileCopy { path: "hello.txt".into(), content: Bytes::from_static(b"hello") };
    core.update_files(&runner, FileUpdate { delete: vec!["./*".into()], copy: vec![copy] })
        .await
        .expect("upload");
    let listing = core
        .list_files(&runner, ListRequest { path: "./".into(), recursive: true, privileged: false })
        .await
        .expect("listing");
    assert!(listing.iter().any(|entry| entry.name == "./hello.txt"), "{listing:?}");

    let request = ExecutionRequest {
        command: "cat hello.txt; echo oops >&2; exit 3".into(),
        privileged: false,
        time_limit: Some(Duration::from_secs(60)),
        environment: Vec::new(),
    };
    let execution = core.store_execution(&runner, request).expect("stored");
    let mut running = core.start_execution(&runner, execution).await.expect("started");
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let exit = loop {
        match running.next_event().await.expect("a terminal event") {
            ExecutionEvent::Stdout(bytes) => stdout.extend_from_slice(&bytes),
            ExecutionEvent::Stderr(bytes) => stderr.extend_from_slice(&bytes),
            other => break other,
        }
    };
    assert_eq!(exit, ExecutionEvent::Exit(3));
    assert!(String::from_utf8_lossy(&stdout).contains("hello"));
    assert!(String::from_utf8_lossy(&stderr).contains("oops"));

    core.destroy_runner(&runner).await.expect("destroy");
    core.delete_environment(id).await.expect("delete");
    core.shutdown().await;
}
