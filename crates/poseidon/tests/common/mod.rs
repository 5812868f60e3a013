//! Harness of the end-to-end suite: starts the real `poseidon` binary with the local backend on a
//! loopback port and drives it the way CodeOcean does (JSON over HTTP with `Poseidon-Token` and
//! `Content-Type: application/json` on every request, one WebSocket per execution).
//!
//! With `POSEIDON_E2E_BACKEND=nomad` the server uses the Nomad backend instead, against an
//! in-process Nomad simulator whose allocations are sandboxes of the `host` image.
//!
//! Every test starts its own server (start-up takes a fraction of a second), so tests run in
//! parallel without sharing state. Stopping a server is part of the test: it must exit on SIGTERM
//! and leave no cgroup and no process behind.

pub mod ws;

use std::fs::{self, OpenOptions};
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reqwest::header::HeaderMap;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{Value, json};
use tempfile::TempDir;

use ws::{WsSession, WsTranscript};

/// The image built into the local backend: the host's /usr with a curated /etc.
pub const IMAGE: &str = "host";
/// The unprivileged user's uid in the `host` image.
pub const USER_UID: &str = "1001";
/// CodeOcean's defaults for a new execution environment (`cpuLimit` 20, `memoryLimit` 256).
pub const CPU_LIMIT: u32 = 20;
pub const MEMORY_LIMIT: u32 = 256;
/// CodeOcean's `unused_runner_expiration_time` default, used as `inactivityTimeout`.
pub const INACTIVITY_TIMEOUT: u64 = 180;
/// `timeLimit` of ordinary test executions: long enough for a loaded CI machine.
pub const TIME_LIMIT: u64 = 20;

/// Set in the server's environment to check that it does not leak into executions.
pub const HOST_SECRET_VARIABLE: &str = "E2E_HOST_SECRET";

const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// What the server gives open WebSocket sessions at shutdown (`limits.shutdowngrace`); short,
/// so that stopping a server with a running execution does not slow the suite down.
const SHUTDOWN_GRACE_SECS: u64 = 2;
/// The bound on a graceful stop: the grace plus time to destroy every runner.
const STOP_TIMEOUT: Duration = Duration::from_secs(SHUTDOWN_GRACE_SECS + 8);
const POLL_INTERVAL: Duration = Duration::from_millis(25);
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
const CGROUP_ROOTS: [&str; 5] = [
    "/sys/fs/cgroup/memory",
    "/sys/fs/cgroup/pids",
    "/sys/fs/cgroup/cpu",
    "/sys/fs/cgroup/freezer",
    "/sys/fs/cgroup/unified",
];

/// Runs a test body under a deadline, so that a hanging server fails the test instead of CI.
pub async fn within<F: Future>(body: F) -> F::Output {
    let seconds = std::env::var("E2E_TEST_TIMEOUT_SECS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(60);
    tokio::time::timeout(Duration::from_secs(seconds), body).await.unwrap_or_else(|_| {
        panic!("test did not finish within {seconds} s (E2E_TEST_TIMEOUT_SECS raises the limit)")
    })
}

/// Starts a server, runs `test` against it under [`within`], then stops it gracefully.
pub async fn with_server(options: ServerOptions, test: impl AsyncFnOnce(&TestServer)) {
    let server = TestServer::start(options).await;
    within(test(&server)).await;
    let home = server.stop().await;
    if let Some(nomad) = home.nomad {
        nomad.sim.shutdown().await;
    }
}

/// Like [`with_server`], with environment 1 (pool size 1) created and one runner claimed.
pub async fn with_runner(test: impl AsyncFnOnce(&TestServer, &str)) {
    with_server(ServerOptions::default(), async |server| {
        server.create_env(1, 1).await;
        let runner = server.claim(1, INACTIVITY_TIMEOUT).await;
        test(server, &runner).await;
    })
    .await;
}

/// What differs between test servers.
#[derive(Debug, Default, Clone)]
pub struct ServerOptions {
    /// `server.token`; `None` leaves every route open.
    pub token: Option<String>,
    /// `server.alert.prewarmingpoolthreshold`; `None` disables the health alert.
    pub pool_threshold: Option<f64>,
    /// `limits.storedexecutionttl` in seconds; `None` keeps the server's default.
    pub stored_execution_ttl: Option<u64>,
    /// Extra `POSEIDON_*` variables for the server process (settings the YAML does not set).
    pub env: Vec<(&'static str, &'static str)>,
    /// Extra YAML lines of the `local` section (maps that variables cannot express), each
    /// indented by two spaces.
    pub local_yaml: String,
}

impl ServerOptions {
    pub fn with_token(token: &str) -> Self {
        ServerOptions { token: Some(token.to_owned()), ..ServerOptions::default() }
    }
}

/// Whether the suite runs against the Nomad backend (`POSEIDON_E2E_BACKEND=nomad`).
pub fn nomad_backend() -> bool {
    std::env::var("POSEIDON_E2E_BACKEND").is_ok_and(|backend| backend == "nomad")
}

/// The Nomad simulator a server of the Nomad backend talks to; it outlives server restarts.
#[derive(Debug)]
pub struct NomadHome {
    pub sim: nomad_sim::SimHandle,
    _state: TempDir,
}

impl NomadHome {
    async fn start(cgroup_name: &str) -> NomadHome {
        let state = tempfile::Builder::new()
            .prefix("poseidon-e2e-sim-")
            .tempdir()
            .expect("create the simulator's state directory");
        let runtime = poseidon_sandbox::Runtime::new(poseidon_sandbox::RuntimeConfig {
            state_dir: state.path().to_owned(),
            init_program: env!("CARGO_BIN_EXE_poseidon").into(),
            init_args: vec!["sandbox-init".into()],
            cgroup_name: format!("{cgroup_name}-sim"),
            uid_base: 100_000,
            defaults: poseidon_sandbox::Limits {
                pids: Some(512),
                disk_mb: Some(512),
                ..poseidon_sandbox::Limits::default()
            },
        })
        .expect("sandbox runtime of the Nomad simulator (run the tests as root)");
        let config = nomad_sim::SimConfig { runtime: Some(runtime), ..Default::default() };
        let sim = nomad_sim::Simulator::start(config).await.expect("start the Nomad simulator");
        NomadHome { sim, _state: state }
    }
}

/// What survives a server restart: the state directory, the cgroup name and, with the Nomad
/// backend, the simulated cluster.
#[derive(Debug)]
pub struct ServerHome {
    dir: TempDir,
    cgroup_name: String,
    pub nomad: Option<NomadHome>,
}

impl ServerHome {
    /// A fresh home with a cgroup name unique on this machine: each server removes every
    /// leftover cgroup under its name at start-up, so parallel servers must not share one.
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let number = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = tempfile::Builder::new()
            .prefix("poseidon-e2e-")
            .tempdir()
            .expect("create the server's temporary directory");
        fs::create_dir(dir.path().join("state")).expect("create the state directory");
        let cgroup_name = format!("e2e-{}-{number}", std::process::id());
        ServerHome { dir, cgroup_name, nomad: None }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn write_config(&self, port: u16, options: &ServerOptions) {
        // Strings are written as JSON, which YAML reads as quoted scalars.
        let yaml = format!(
            "\
server:
  address: 127.0.0.1
  port: {port}
  token: {token}
  interactivestderr: true
  alert:
    prewarmingpoolthreshold: {threshold:?}
logger:
  level: DEBUG
statedir: {state}
local:
  cgroupname: {cgroup}
{local}limits:
  shutdowngrace: {SHUTDOWN_GRACE_SECS}
{ttl}{nomad}",
            token = json!(options.token.as_deref().unwrap_or("")),
            threshold = options.pool_threshold.unwrap_or(0.0),
            state = json!(self.dir.path().join("state")),
            cgroup = json!(self.cgroup_name),
            local = options.local_yaml,
            ttl = options
                .stored_execution_ttl
                .map_or_else(String::new, |ttl| format!("  storedexecutionttl: {ttl}\n")),
            nomad = self.nomad.as_ref().map_or_else(String::new, |nomad| format!(
                "nomad:\n  enabled: true\n  address: 127.0.0.1\n  port: {}\n  reconcileinterval: 2\n",
                nomad.sim.address().port()
            )),
        );
        fs::write(self.config_path(), yaml).expect("write the server configuration");
    }
}

/// A running `poseidon serve`; killed (and its log printed) if the test panics.
#[derive(Debug)]
pub struct TestServer {
    /// `http://127.0.0.1:<port>/api/v1`, CodeOcean's `runner_management.url`.
    pub base_url: String,
    pub addr: SocketAddr,
    pub token: Option<String>,
    pub client: reqwest::Client,
    home: Option<ServerHome>,
    child: Option<Child>,
}

impl TestServer {
    pub async fn start(options: ServerOptions) -> TestServer {
        TestServer::start_in(ServerHome::new(), options).await
    }

    /// Starts a server on `home`, e.g. the home of a stopped server to test a restart.
    pub async fn start_in(mut home: ServerHome, options: ServerOptions) -> TestServer {
        if nomad_backend() && home.nomad.is_none() {
            home.nomad = Some(NomadHome::start(&home.cgroup_name).await);
        }
        let addr = free_loopback_addr();
        home.write_config(addr.port(), &options);
        let child = spawn_server(&home, &options.env);
        let mut server = TestServer {
            base_url: format!("http://{addr}/api/v1"),
            addr,
            token: options.token,
            client: reqwest::Client::builder()
                .timeout(HTTP_TIMEOUT)
                .build()
                .expect("build the HTTP client"),
            home: Some(home),
            child: Some(child),
        };
        server.wait_until_ready().await;
        server
    }

    async fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let url = format!("{}/health", self.base_url);
        loop {
            let answer = self.client.get(&url).timeout(Duration::from_secs(1)).send().await;
            if answer.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server did not answer GET /health within {READY_TIMEOUT:?}"
            );
            let child = self.child.as_mut().expect("the server is running");
            if let Some(status) = child.try_wait().expect("poll the server process") {
                panic!("server exited during start-up with {status}");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Stops the server with SIGTERM and checks that it exits cleanly and leaks no cgroup or
    /// process. Returns the home so that a test can start the server again.
    pub async fn stop(mut self) -> ServerHome {
        let mut child = self.child.take().expect("the server is running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("send SIGTERM");
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for the server") {
                break status;
            }
            if Instant::now() >= deadline {
                child.kill().expect("kill the server");
                child.wait().expect("reap the server");
                panic!("server did not exit within {STOP_TIMEOUT:?} after SIGTERM");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        };
        assert!(status.success(), "server exited with {status} after SIGTERM");
        let home = self.home.take().expect("the server has a home");
        assert_no_processes_left(&home.cgroup_name).await;
        assert_no_cgroups_left(&home.cgroup_name);
        home
    }

    /// The server's configuration file, for `poseidon image … --config` on the same state.
    pub fn config_path(&self) -> PathBuf {
        self.home.as_ref().expect("the server has a home").config_path()
    }

    /// The Nomad simulator behind a server of the Nomad backend.
    pub fn nomad_sim(&self) -> Option<&nomad_sim::SimHandle> {
        self.home.as_ref()?.nomad.as_ref().map(|nomad| &nomad.sim)
    }

    /// Runner jobs of environment `env` in the Nomad simulator.
    pub fn nomad_runner_jobs(&self, env: u32) -> Vec<String> {
        let sim = self.nomad_sim().expect("a server of the Nomad backend");
        let prefix = format!("{env}-");
        sim.jobs().into_iter().map(|job| job.id).filter(|id| id.starts_with(&prefix)).collect()
    }

    /// The server's resident memory in KiB, to check that buffers stay bounded.
    pub fn resident_kib(&self) -> u64 {
        let pid = self.child.as_ref().expect("the server is running").id();
        let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read the status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// A request as CodeOcean sends it: JSON content type and the token on every call.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let builder = self
            .client
            .request(method, format!("{}{path}", self.base_url))
            .header("Content-Type", "application/json");
        match &self.token {
            Some(token) => builder.header("Poseidon-Token", token),
            None => builder,
        }
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Reply {
        let builder = self.request(method, path);
        let builder = match body {
            Some(body) => builder.body(body.to_string()),
            None => builder,
        };
        Reply::from(builder).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.call(Method::GET, path, None).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.call(Method::DELETE, path, None).await
    }

    pub async fn put_env(&self, id: u32, body: &Value) -> Reply {
        self.call(Method::PUT, &format!("/execution-environments/{id}"), Some(body)).await
    }

    /// Creates environment `id` as CodeOcean syncs it and waits until its pool is full.
    pub async fn create_env(&self, id: u32, pool: u64) {
        self.put_env(id, &environment_body(id, pool))
            .await
            .expect_empty(201, "PUT of a new environment");
        self.wait_idle(id, pool).await;
    }

    pub async fn statistics(&self) -> Value {
        self.get("/statistics/execution-environments").await.expect(200, "GET statistics").json()
    }

    /// Waits until environment `env` has at least `count` idle runners.
    pub async fn wait_idle(&self, env: u32, count: u64) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let statistics = self.statistics().await;
            let idle = statistics[env.to_string()]["idleRunners"].as_u64();
            if idle.is_some_and(|idle| idle >= count) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "environment {env} did not reach {count} idle runners within 15 s: {statistics}"
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    pub async fn try_claim(&self, env: u32, inactivity_timeout: u64) -> Reply {
        let body = json!({"executionEnvironmentId": env, "inactivityTimeout": inactivity_timeout});
        self.call(Method::POST, "/runners", Some(&body)).await
    }

    pub async fn claim(&self, env: u32, inactivity_timeout: u64) -> String {
        let reply = self.try_claim(env, inactivity_timeout).await.expect(200, "POST /runners");
        reply.json()["runnerId"]
            .as_str()
            .unwrap_or_else(|| panic!("claim answered without a runnerId: {}", reply.text()))
            .to_owned()
    }

    pub async fn copy_files(&self, runner: &str, body: &Value) -> Reply {
        self.call(Method::PATCH, &format!("/runners/{runner}/files"), Some(body)).await
    }

    /// Copies `files` (path, content) like CodeOcean does, without a delete list.
    pub async fn copy(&self, runner: &str, files: &[(&str, &[u8])]) {
        self.copy_files(runner, &json!({ "copy": copy_entries(files) }))
            .await
            .expect_empty(204, "PATCH files");
    }

    /// `GET …/files` with CodeOcean's query (`path`, `recursive`, `privilegedExecution`).
    pub async fn list_files(&self, runner: &str, query: &[(&str, &str)]) -> Reply {
        Reply::from(self.request(Method::GET, &format!("/runners/{runner}/files")).query(query))
            .await
    }

    /// The names in a successful recursive listing of the workspace.
    pub async fn file_names(&self, runner: &str) -> Vec<String> {
        let listing = self.list_files(runner, &[]).await.expect(200, "GET files").json();
        listing["files"]
            .as_array()
            .unwrap_or_else(|| panic!("`files` is not an array: {listing}"))
            .iter()
            .map(|entry| entry["name"].as_str().expect("entry has a name").to_owned())
            .collect()
    }

    pub async fn download(&self, runner: &str, path: &str, privileged: bool) -> Reply {
        let privileged = privileged.to_string();
        Reply::from(
            self.request(Method::GET, &format!("/runners/{runner}/files/raw"))
                .query(&[("path", path), ("privilegedExecution", &privileged)]),
        )
        .await
    }

    pub async fn execute_with(&self, runner: &str, body: &Value) -> Reply {
        self.call(Method::POST, &format!("/runners/{runner}/execute"), Some(body)).await
    }

    /// Stores an execution and returns its `websocketUrl`.
    pub async fn execute(
        &self,
        runner: &str,
        command: &str,
        time_limit: u64,
        privileged: bool,
    ) -> String {
        let body =
            json!({"command": command, "timeLimit": time_limit, "privilegedExecution": privileged});
        self.execute_body(runner, &body).await
    }

    /// Stores an execution with a full request body and returns its checked `websocketUrl`.
    pub async fn execute_body(&self, runner: &str, body: &Value) -> String {
        let reply = self.execute_with(runner, body).await.expect(200, "POST execute");
        let url = reply.json()["websocketUrl"]
            .as_str()
            .unwrap_or_else(|| panic!("execute answered without websocketUrl: {}", reply.text()))
            .to_owned();
        // Built from the request's Host header (spec §2.11).
        let expected_prefix =
            format!("ws://{}/api/v1/runners/{runner}/websocket?executionID=", self.addr);
        assert!(
            url.starts_with(&expected_prefix),
            "websocketUrl {url} does not start with {expected_prefix}"
        );
        url
    }

    /// Runs `command` unprivileged without stdin and returns the finished transcript.
    pub async fn run(&self, runner: &str, command: &str) -> WsTranscript {
        let url = self.execute(runner, command, TIME_LIMIT, false).await;
        self.run_ws(&url, &[]).await
    }

    pub async fn run_privileged(&self, runner: &str, command: &str) -> WsTranscript {
        let url = self.execute(runner, command, TIME_LIMIT, true).await;
        self.run_ws(&url, &[]).await
    }

    /// Connects, sends each stdin frame as CodeOcean would, and reads until the server closes.
    pub async fn run_ws(&self, url: &str, stdin: &[&str]) -> WsTranscript {
        let mut session = self.connect(url).await;
        for text in stdin {
            session.send(text).await;
        }
        session.finish().await
    }

    /// Opens the WebSocket with the server's token; panics unless the upgrade succeeds.
    pub async fn connect(&self, url: &str) -> WsSession {
        WsSession::connect(url, self.token.as_deref())
            .await
            .unwrap_or_else(|status| panic!("WebSocket upgrade of {url} failed with {status}"))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if let Some(home) = &self.home {
                remove_cgroups_after_kill(&home.cgroup_name);
            }
        }
        if std::thread::panicking()
            && let Some(home) = &self.home
        {
            print_log_tail(&home.log_path());
        }
    }
}

/// A fully read HTTP response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub async fn from(request: RequestBuilder) -> Reply {
        let response = request.send().await.expect("send the HTTP request");
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.expect("read the HTTP body").to_vec();
        Reply { status, headers, body }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("body is not JSON ({error}): {:?}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|value| value.to_str().expect("header is ASCII"))
    }

    /// Asserts the status; `what` names the call in the failure message.
    #[track_caller]
    pub fn expect(self, status: u16, what: &str) -> Reply {
        assert_eq!(
            self.status.as_u16(),
            status,
            "{what}: unexpected status, body {:?}",
            self.text()
        );
        self
    }

    /// Asserts the status and an empty body (no `Content-Length` other than 0).
    #[track_caller]
    pub fn expect_empty(self, status: u16, what: &str) -> Reply {
        let reply = self.expect(status, what);
        assert!(reply.body.is_empty(), "{what}: body should be empty: {:?}", reply.text());
        let length = reply.header("content-length");
        assert!(
            length.is_none_or(|length| length == "0"),
            "{what}: Content-Length {length:?} on an empty body"
        );
        reply
    }

    /// Asserts the status and a JSON error body with a string `message`; returns the body.
    #[track_caller]
    pub fn expect_message(self, status: u16, what: &str) -> Value {
        let body = self.expect(status, what).json();
        assert!(body["message"].is_string(), "{what}: error body has no string `message`: {body}");
        body
    }
}

/// The body CodeOcean's `ExecutionEnvironment#to_json` sends (it includes the `id`).
pub fn environment_body(id: u32, pool: u64) -> Value {
    json!({
        "id": id,
        "image": IMAGE,
        "prewarmingPoolSize": pool,
        "cpuLimit": CPU_LIMIT,
        "memoryLimit": MEMORY_LIMIT,
        "networkAccess": false,
        "exposedPorts": [],
    })
}

/// Copy entries as CodeOcean builds them: base64 content, a path ending in `/` is a directory.
pub fn copy_entries(files: &[(&str, &[u8])]) -> Vec<Value> {
    use base64::Engine as _;
    files
        .iter()
        .map(|(path, content)| {
            if path.ends_with('/') {
                json!({ "path": path })
            } else {
                let content = base64::engine::general_purpose::STANDARD.encode(content);
                json!({ "path": path, "content": content })
            }
        })
        .collect()
}

/// Polls `condition` until it holds or `limit` passed; returns whether it held.
pub async fn eventually(limit: Duration, mut condition: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn free_loopback_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    listener.local_addr().expect("read the bound address")
}

fn spawn_server(home: &ServerHome, env: &[(&str, &str)]) -> Child {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(home.log_path())
        .expect("open the server log");
    let log_for_stdout = log.try_clone().expect("duplicate the log handle");
    Command::new(env!("CARGO_BIN_EXE_poseidon"))
        .arg("serve")
        .arg("--config")
        .arg(home.config_path())
        // Must not reach the runners' environment.
        .env(HOST_SECRET_VARIABLE, "do-not-leak")
        // Plain log lines in the printed tail.
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log_for_stdout)
        .stderr(log)
        .spawn()
        .expect("start the poseidon binary")
}

fn print_log_tail(path: &Path) {
    const TAIL_LINES: usize = 200;
    let Ok(log) = fs::read_to_string(path) else {
        eprintln!("(no server log at {})", path.display());
        return;
    };
    let lines: Vec<&str> = log.lines().collect();
    let tail = &lines[lines.len().saturating_sub(TAIL_LINES)..];
    eprintln!("----- last {} lines of the server log -----", tail.len());
    for line in tail {
        eprintln!("{line}");
    }
    eprintln!("----- end of the server log -----");
}

/// The cgroup named after the server may remain as an empty directory, but no runner cgroup
/// below it.
fn assert_no_cgroups_left(cgroup_name: &str) {
    for root in CGROUP_ROOTS {
        let dir = Path::new(root).join(cgroup_name);
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        let children: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            children.is_empty(),
            "cgroups left under {} after a graceful stop: {children:?}",
            dir.display()
        );
        // The empty parent is allowed; remove it so that test runs do not pile them up.
        let _ = fs::remove_dir(&dir);
    }
}

/// Best effort after a failed test killed the server: its runners' inits die with it, then
/// their cgroup directories can go, deepest first, so that failed runs leave nothing behind.
fn remove_cgroups_after_kill(cgroup_name: &str) {
    fn remove_tree(dir: &Path) {
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.filter_map(Result::ok) {
                if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                    remove_tree(&entry.path());
                }
            }
        }
        let _ = fs::remove_dir(dir);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    for root in CGROUP_ROOTS {
        let dir = Path::new(root).join(cgroup_name);
        while dir.exists() && Instant::now() < deadline {
            remove_tree(&dir);
            if dir.exists() {
                std::thread::sleep(POLL_INTERVAL);
            }
        }
    }
}

/// Live processes in any cgroup below the server's cgroup name, as "pid state cmdline [cgroup]".
/// Zombies are dead already; the host's init reaps those the server left unreaped.
fn processes_in(cgroup_name: &str) -> Vec<String> {
    let top = format!("/{cgroup_name}");
    let in_server_cgroup = |line: &&str| {
        line.split(':').nth(2).is_some_and(|path| {
            path == top
                || path.starts_with(&format!("{top}/"))
                || path.starts_with(&format!("{top} "))
        })
    };
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|entry| {
            let cgroups = fs::read_to_string(entry.path().join("cgroup")).ok()?;
            let cgroup = cgroups.lines().find(in_server_cgroup)?.to_owned();
            let stat = fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let state = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next());
            if state == Some("Z") {
                return None;
            }
            let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            Some(format!(
                "{} {} {} [{cgroup}]",
                entry.file_name().to_string_lossy(),
                state.unwrap_or("?"),
                cmdline.trim_end()
            ))
        })
        .collect()
}

/// No process may remain in any cgroup below the server's cgroup name. The kernel tears down a
/// runner's PID namespace asynchronously, so the last processes get a moment to vanish.
async fn assert_no_processes_left(cgroup_name: &str) {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut survivors = processes_in(cgroup_name);
    while !survivors.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(POLL_INTERVAL).await;
        survivors = processes_in(cgroup_name);
    }
    assert!(
        survivors.is_empty(),
        "processes left in cgroups of {cgroup_name} 2 s after a graceful stop: {survivors:#?}"
    );
}
