//! Shared helpers: a simulator (with or without sandboxes) per test, HTTP and event-stream
//! clients, Poseidon's template job, polling.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use nomad_sim::{AllocInfo, SimConfig, SimHandle, Simulator};
use poseidon_sandbox::{Limits, Runtime, RuntimeConfig};
use serde_json::{Value, json};

pub const WAIT: Duration = Duration::from_secs(10);

/// A simulator and what it needs; [`TestSim::finish`] checks that nothing is left behind.
pub struct TestSim {
    pub sim: SimHandle,
    pub client: reqwest::Client,
    runtime: Option<(Runtime, String, tempfile::TempDir)>,
}

fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A sandbox runtime of its own (own cgroup, own state directory) for one test.
fn sandbox_runtime() -> (Runtime, String, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("nomad-sim-test-")
        .tempdir_in(std::env::temp_dir())
        .expect("state directory");
    let cgroup = unique("nomad-sim-test");
    let config = RuntimeConfig {
        state_dir: dir.path().to_owned(),
        init_program: env!("CARGO_BIN_EXE_nomad-sim").into(),
        init_args: vec!["sandbox-init".into()],
        cgroup_name: cgroup.clone(),
        uid_base: 500_000,
        defaults: Limits { pids: Some(128), disk_mb: Some(64), ..Limits::default() },
    };
    (Runtime::new(config).expect("sandbox runtime (run the tests as root)"), cgroup, dir)
}

impl TestSim {
    /// Without sandboxes: allocations run, exec is refused.
    pub async fn start(config: SimConfig) -> TestSim {
        let sim = Simulator::start(config).await.expect("start the simulator");
        TestSim { sim, client: reqwest::Client::new(), runtime: None }
    }

    /// With a sandbox per running allocation.
    pub async fn with_sandboxes(config: SimConfig) -> TestSim {
        let runtime = sandbox_runtime();
        let config = SimConfig { runtime: Some(runtime.0.clone()), ..config };
        let sim = Simulator::start(config).await.expect("start the simulator");
        TestSim { sim, client: reqwest::Client::new(), runtime: Some(runtime) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.sim.url())
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = self.client.get(self.url(path)).send().await.expect("GET");
        (response.status().as_u16(), response.text().await.expect("body"))
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let (status, body) = self.get(path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).expect("JSON")
    }

    pub async fn put(&self, path: &str, body: &Value) -> (u16, String) {
        let response = self.client.put(self.url(path)).json(body).send().await.expect("PUT");
        (response.status().as_u16(), response.text().await.expect("body"))
    }

    pub async fn delete(&self, path: &str) -> (u16, String) {
        let response = self.client.delete(self.url(path)).send().await.expect("DELETE");
        (response.status().as_u16(), response.text().await.expect("body"))
    }

    /// Registers and returns the evaluation ID.
    pub async fn register(&self, job: &Value) -> String {
        let (status, body) = self.put("/v1/jobs", &json!({"Job": job})).await;
        assert_eq!(status, 200, "register: {body}");
        let response: Value = serde_json::from_str(&body).expect("JSON");
        response["EvalID"].as_str().expect("EvalID").to_owned()
    }

    /// The allocations of a job, waiting until `predicate` holds.
    pub async fn wait_allocs(
        &self,
        job: &str,
        predicate: impl Fn(&[AllocInfo]) -> bool,
    ) -> Vec<AllocInfo> {
        let deadline = Instant::now() + WAIT;
        loop {
            let allocs: Vec<AllocInfo> =
                self.sim.allocations().into_iter().filter(|a| a.job_id == job).collect();
            if predicate(&allocs) {
                return allocs;
            }
            assert!(Instant::now() < deadline, "allocations of {job} never matched: {allocs:#?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The one running allocation of a job's `default-group`.
    pub async fn running_alloc(&self, job: &str) -> AllocInfo {
        let allocs = self
            .wait_allocs(job, |a| {
                a.iter().any(|a| a.client_status == "running" && a.desired_status == "run")
            })
            .await;
        allocs
            .into_iter()
            .find(|a| a.client_status == "running" && a.desired_status == "run")
            .expect("running")
    }

    /// Stops everything and checks that no sandbox cgroup is left.
    pub async fn finish(self) {
        let TestSim { sim, runtime, .. } = self;
        sim.shutdown().await;
        if let Some((runtime, cgroup, dir)) = runtime {
            drop(runtime);
            for hierarchy in ["memory", "pids", "cpu", "freezer", "unified"] {
                let path = std::path::Path::new("/sys/fs/cgroup").join(hierarchy).join(&cgroup);
                assert!(!path.exists(), "cgroup {} left behind", path.display());
            }
            drop(dir);
        }
    }
}

/// Poseidon's template job for environment `env` (nomad-api.md §1.4), as a runner job `id`.
pub fn poseidon_job(id: &str, namespace: &str) -> Value {
    json!({
    "ID": id, "Name": id, "Namespace": namespace,
    "Type": "batch", "Datacenters": ["dc1"],
    "TaskGroups": [
      {"Name": "default-group", "Count": 1,
       "EphemeralDisk": {"Migrate": false, "SizeMB": 10, "Sticky": false},
       "Spreads": [{"Attribute": "${node.unique.name}", "Weight": 100}],
       "RestartPolicy": {"Attempts": 3, "Delay": 15000000000_i64, "Interval": 3600000000000_i64, "Mode": "fail"},
       "ReschedulePolicy": {"Unlimited": false, "Attempts": 3, "Interval": 21600000000000_i64,
                            "Delay": 60000000000_i64, "MaxDelay": 240000000000_i64, "DelayFunction": "exponential"},
       "Networks": [],
       "Tasks": [{"Name": "default-task", "Driver": "docker", "KillTimeout": 0, "KillSignal": "SIGKILL",
         "Config": {"image": "openhpi/docker_exec_phusion", "command": "sleep", "args": ["infinity"],
                    "network_mode": "none", "force_pull": true},
         "LogConfig": {"MaxFiles": 1, "MaxFileSizeMB": 1},
         "Resources": {"CPU": 40, "MemoryMB": 50, "MemoryMaxMB": 512}}]},
      {"Name": "config", "Count": 0,
       "Tasks": [{"Name": "config", "Driver": "exec", "Config": {"command": "true"},
         "LogConfig": {"MaxFiles": 1, "MaxFileSizeMB": 1},
         "Resources": {"CPU": 1, "MemoryMB": 10}}],
       "Meta": {"used": "false", "prewarmingPoolSize": "1"}}
    ]})
}

/// An open event stream, read line by line.
pub struct EventStream {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: Vec<u8>,
    /// Batches below this index are skipped (a resume past the end re-delivers one).
    min_index: u64,
}

impl EventStream {
    pub async fn open(sim: &TestSim, query: &str) -> EventStream {
        let response = sim
            .client
            .get(sim.url(&format!("/v1/event/stream?{query}")))
            .send()
            .await
            .expect("event stream");
        assert_eq!(response.status(), 200);
        EventStream { body: response.bytes_stream().boxed(), buffer: Vec::new(), min_index: 0 }
    }

    /// A stream of what happens from now on.
    pub async fn open_after(sim: &TestSim, topics: &str) -> EventStream {
        let next = sim.sim.index() + 1;
        let mut stream = EventStream::open(sim, &format!("{topics}&index={next}")).await;
        stream.min_index = next;
        stream
    }

    /// The next line, `None` at the end of the stream.
    pub async fn line(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                return Some(serde_json::from_slice(&line).expect("a JSON line"));
            }
            match tokio::time::timeout(WAIT, self.body.next()).await.expect("a line in time") {
                Some(Ok(chunk)) => self.buffer.extend_from_slice(&chunk),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// The next batch that is not a heartbeat.
    pub async fn batch(&mut self) -> Option<Value> {
        loop {
            let line = self.line().await?;
            if line != json!({}) && line["Index"].as_u64().unwrap_or(0) >= self.min_index {
                return Some(line);
            }
        }
    }

    /// Batches until one has an event matching `predicate`; returns every event seen, in
    /// order, as `(index, topic, type, payload)`.
    pub async fn until(&mut self, predicate: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let batch = self.batch().await.expect("the stream ended early");
            for event in batch["Events"].as_array().expect("Events") {
                assert_eq!(event["Index"], batch["Index"], "events carry their batch's index");
                seen.push(event.clone());
                if predicate(event) {
                    return seen;
                }
            }
        }
    }
}

/// An allocation event's `(ClientStatus, DesiredStatus)`.
pub fn alloc_status(event: &Value) -> Option<(String, String)> {
    let alloc = event["Payload"].get("Allocation")?;
    let client = alloc.get("ClientStatus").and_then(Value::as_str).unwrap_or_default();
    let desired = alloc.get("DesiredStatus").and_then(Value::as_str).unwrap_or_default();
    Some((client.to_owned(), desired.to_owned()))
}

/// A short description per event, for asserting sequences: `Topic/Type/status`.
pub fn describe(event: &Value) -> String {
    let payload = &event["Payload"];
    let status = if let Some(alloc) = payload.get("Allocation") {
        format!(
            "{}/{}",
            alloc["ClientStatus"].as_str().unwrap_or(""),
            alloc["DesiredStatus"].as_str().unwrap_or("")
        )
    } else if let Some(eval) = payload.get("Evaluation") {
        eval["Status"].as_str().unwrap_or("").to_owned()
    } else if let Some(job) = payload.get("Job") {
        job["Status"].as_str().unwrap_or("").to_owned()
    } else {
        String::new()
    };
    format!(
        "{}/{}/{status}",
        event["Topic"].as_str().unwrap_or(""),
        event["Type"].as_str().unwrap_or("")
    )
}

impl TestSim {
    /// Waits until an evaluation has `status`.
    pub async fn wait_eval(&self, id: &str, status: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let eval = self.get_json(&format!("/v1/evaluation/{id}")).await;
            if eval["Status"] == status {
                return eval;
            }
            assert!(Instant::now() < deadline, "evaluation never became {status}: {eval}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// What an exec session delivered.
#[derive(Debug, Default)]
pub struct ExecOutcome {
    pub stdout: String,
    pub stderr: String,
    /// The server's frames in order, as JSON.
    pub frames: Vec<Value>,
    /// `Some(code)` of the exited frame (a missing `exit_code` is 0).
    pub exit_code: Option<i64>,
    /// A close frame's code and reason.
    pub close: Option<(u16, String)>,
}

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens an exec session for `argv` on `default-task`.
pub async fn exec_connect(
    sim: &TestSim,
    alloc: &str,
    argv: &[&str],
    tty: bool,
    token: Option<&str>,
) -> Socket {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let command: String =
        form_urlencoded::byte_serialize(serde_json::to_string(argv).unwrap().as_bytes()).collect();
    let url = format!(
        "ws://{}/v1/client/allocation/{alloc}/exec?task=default-task&tty={tty}&command={command}",
        sim.sim.address()
    );
    let mut request = url.into_client_request().unwrap();
    if let Some(token) = token {
        request.headers_mut().insert("X-Nomad-Token", token.parse().unwrap());
    }
    let (socket, _) = tokio_tungstenite::connect_async(request).await.expect("WebSocket upgrade");
    socket
}

/// Sends one client frame.
pub async fn exec_send(socket: &mut Socket, frame: Value) {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    socket.send(Message::text(frame.to_string())).await.expect("send a frame");
}

/// `{"stdin":{"data":...}}`.
pub fn stdin_frame(data: &[u8]) -> Value {
    use base64::Engine;
    json!({"stdin": {"data": base64::engine::general_purpose::STANDARD.encode(data)}})
}

/// Reads the session to its end.
pub async fn exec_collect(mut socket: Socket) -> ExecOutcome {
    use base64::Engine;
    use tokio_tungstenite::tungstenite::Message;
    let mut outcome = ExecOutcome::default();
    let decode = |frame: &Value| {
        let data = frame["data"].as_str().unwrap_or_default();
        String::from_utf8_lossy(&base64::engine::general_purpose::STANDARD.decode(data).unwrap())
            .into_owned()
    };
    loop {
        let next =
            tokio::time::timeout(WAIT, socket.next()).await.expect("the session ends in time");
        match next {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).expect("a JSON frame");
                if let Some(out) = frame.get("stdout") {
                    outcome.stdout.push_str(&decode(out));
                }
                if let Some(err) = frame.get("stderr") {
                    outcome.stderr.push_str(&decode(err));
                }
                if frame["exited"] == true {
                    outcome.exit_code =
                        Some(frame["result"].get("exit_code").and_then(Value::as_i64).unwrap_or(0));
                }
                outcome.frames.push(frame);
            }
            Some(Ok(Message::Close(frame))) => {
                outcome.close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return outcome,
        }
    }
}

/// Runs a command to its end.
pub async fn exec(sim: &TestSim, alloc: &str, argv: &[&str], tty: bool) -> ExecOutcome {
    exec_collect(exec_connect(sim, alloc, argv, tty, None).await).await
}

/// Reads stdout frames until `text` appeared (the process is surely running then).
pub async fn exec_wait_for(socket: &mut Socket, text: &str) -> String {
    use base64::Engine;
    use tokio_tungstenite::tungstenite::Message;
    let mut stdout = String::new();
    while !stdout.contains(text) {
        let next = tokio::time::timeout(WAIT, socket.next()).await.expect("output in time");
        let Some(Ok(Message::Text(frame))) = next else {
            panic!("the session ended before {text:?}: {stdout:?}")
        };
        let frame: Value = serde_json::from_str(&frame).expect("a JSON frame");
        if let Some(data) = frame["stdout"]["data"].as_str() {
            let bytes = base64::engine::general_purpose::STANDARD.decode(data).unwrap();
            stdout.push_str(&String::from_utf8_lossy(&bytes));
        }
    }
    stdout
}
