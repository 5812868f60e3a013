//! `networkAccess` and `mappedPorts` through the real server: a claimed runner of a
//! network-enabled environment serves HTTP on its exposed port, and the client reaches it at
//! the `hostAddress` of the claim response. Only addresses on this machine are used.

// Shared by every test crate; each uses a part of it.
#[allow(dead_code)]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{ServerOptions, TIME_LIMIT, environment_body, nomad_backend, with_server};

const BRIDGE: &str = "pste2e0";

/// The server is configured through `POSEIDON_*` variables (the harness writes the file).
const NETWORK_SETTINGS: [(&str, &str); 4] = [
    ("POSEIDON_LOCAL_NETWORK_ENABLED", "true"),
    ("POSEIDON_LOCAL_NETWORK_BRIDGE", BRIDGE),
    ("POSEIDON_LOCAL_NETWORK_SUBNET", "10.216.0.0/24"),
    ("POSEIDON_LOCAL_NETWORK_HOSTPORTS", "32000-32099"),
];

/// Removes the bridge and the table when the test fails (a killed server leaves them for its
/// next start to clean up).
struct NetworkCleanup;

impl Drop for NetworkCleanup {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", BRIDGE]).status();
        let _ = Command::new("nft").args(["delete", "table", "inet", BRIDGE]).status();
    }
}

#[test]
fn mapped_ports_reach_a_server_in_the_runner() {
    let _cleanup = NetworkCleanup;
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let options = ServerOptions { env: NETWORK_SETTINGS.to_vec(), ..ServerOptions::default() };
    runtime.block_on(with_server(options, async |server| {
        let mut environment = environment_body(1, 1);
        environment["networkAccess"] = true.into();
        environment["exposedPorts"] = serde_json::json!([8080]);
        server.put_env(1, &environment).await.expect_empty(201, "PUT environment");
        server.wait_idle(1, 1).await;
        let claim = server.try_claim(1, 60).await.expect(200, "POST /runners").json();
        let runner = claim["runnerId"].as_str().expect("runnerId").to_owned();
        let mapped = claim["mappedPorts"].as_array().expect("mappedPorts").clone();
        assert_eq!(mapped.len(), 1, "{claim}");
        assert_eq!(mapped[0]["exposedPort"], 8080, "{claim}");
        let host_address = mapped[0]["hostAddress"].as_str().expect("hostAddress").to_owned();
        // Local runners are reached through our bridge; Nomad's at the allocation's dynamic port.
        if !nomad_backend() {
            assert!(host_address.starts_with("10.216.0.1:320"), "{claim}");
        }

        let command = "echo served-by-the-runner > index.html; exec python3 -m http.server 8080";
        let url = server.execute(&runner, command, TIME_LIMIT, false).await;
        let session = server.connect(&url).await;
        let body = fetch_until_served(&format!("http://{host_address}/index.html")).await;
        assert_eq!(body.trim(), "served-by-the-runner");
        session.close().await;
        server.delete(&format!("/runners/{runner}")).await.expect_empty(204, "DELETE runner");
        let gone = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(1))
            .build()
            .unwrap()
            .get(format!("http://{host_address}/"))
            .send()
            .await;
        assert!(gone.is_err(), "the mapping outlived its runner");
    }));
    let links = Command::new("ip").args(["link", "show", BRIDGE]).output().expect("ip link");
    assert!(!links.status.success(), "the stopped server left its bridge");
    let table = Command::new("nft").args(["list", "table", "inet", BRIDGE]).output();
    assert!(!table.expect("nft").status.success(), "the stopped server left its table");
}

/// GETs `url` until the runner's server answers (it needs a moment to start).
async fn fetch_until_served(url: &str) -> String {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("HTTP client");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match client.get(url).send().await {
            Ok(reply) if reply.status() == 200 => return reply.text().await.expect("body"),
            other => {
                let status = other.map(|r| r.status().to_string()).map_err(|e| e.to_string());
                assert!(Instant::now() < deadline, "{url} did not answer: {status:?}");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
