//! A real server on 127.0.0.1 with a tiny scripted backend: the API crate is backend-agnostic,
//! so its tests only need runners whose behaviour they control.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use poseidon_api::{ApiConfig, AppState, ServeOptions};
use poseidon_core::backend::{
    Backend, BackendError, ExecRequest, ExecutionHandle, ExitStatus, FileContent, FileEntry,
    FileUpdate, FilesError, ListRequest, LostReason, MappedPort, Output, Runner,
};
use poseidon_core::environment::EnvironmentConfig;
use poseidon_core::ids::RunnerId;
use poseidon_core::{Core, CoreConfig};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub const TOKEN: &str = "test-token";

/// The normal image; `never` creates no runner (pools stay empty), `broken` cannot be prepared.
pub const IMAGE: &str = "scripted";

/// Counts the executions that were stopped (dropped or timed out) rather than ending.
#[derive(Debug, Default)]
pub struct ScriptedBackend {
    pub stopped: Arc<AtomicUsize>,
}

#[async_trait]
impl Backend for ScriptedBackend {
    async fn prepare_environment(
        &self,
        environment: &EnvironmentConfig,
    ) -> Result<(), BackendError> {
        match environment.image.as_str() {
            "broken" => Err(BackendError::InvalidEnvironment("image broken is unknown".into())),
            _ => Ok(()),
        }
    }

    async fn create_runner(
        &self,
        environment: &EnvironmentConfig,
        id: RunnerId,
    ) -> Result<Arc<dyn Runner>, BackendError> {
        if environment.image == "never" {
            std::future::pending::<()>().await;
        }
        Ok(Arc::new(ScriptedRunner { id, files: Mutex::default(), stopped: self.stopped.clone() }))
    }
}

pub struct ScriptedRunner {
    id: RunnerId,
    files: Mutex<BTreeMap<String, Bytes>>,
    stopped: Arc<AtomicUsize>,
}

#[async_trait]
impl Runner for ScriptedRunner {
    fn id(&self) -> &RunnerId {
        &self.id
    }

    fn mapped_ports(&self) -> Vec<MappedPort> {
        Vec::new()
    }

    async fn execute(&self, request: ExecRequest) -> Result<ExecutionHandle, BackendError> {
        let (stdin_tx, stdin_rx) = mpsc::channel(4);
        let (output_tx, output_rx) = mpsc::channel(4);
        let (exit_tx, exit_rx) = oneshot::channel();
        let stop = CancellationToken::new();
        let script = Script { command: request.command, stdin: stdin_rx, output: output_tx };
        tokio::spawn(run_script(script, stop.clone(), exit_tx, self.stopped.clone()));
        Ok(ExecutionHandle::new(stdin_tx, output_rx, exit_rx, stop))
    }

    async fn update_files(&self, update: FileUpdate) -> Result<(), FilesError> {
        let mut files = self.files.lock().unwrap();
        for copy in update.copy {
            if copy.path.starts_with("/proc") {
                return Err(FilesError::CopyFailed(format!("{}: Cannot open", copy.path)));
            }
            files.insert(copy.path, copy.content);
        }
        Ok(())
    }

    async fn list_files(&self, request: ListRequest) -> Result<Vec<FileEntry>, FilesError> {
        if request.path != "./" {
            return Err(FilesError::NotFound);
        }
        let files = self.files.lock().unwrap();
        Ok(files
            .iter()
            .map(|(name, content)| FileEntry {
                name: format!("./{name}"),
                entry_type: '-',
                link_target: None,
                size: content.len() as u64,
                modification_time: 0,
                permissions: "rwxr--r--".into(),
                owner: "root".into(),
                group: "root".into(),
            })
            .collect())
    }

    async fn read_file(&self, path: &str, _privileged: bool) -> Result<FileContent, FilesError> {
        if path == "dir" {
            return Err(FilesError::NotAFile("dir is a directory".into()));
        }
        let content = self.files.lock().unwrap().get(path).cloned().ok_or(FilesError::NotFound)?;
        // Two chunks, so that the body is really streamed.
        let middle = content.len() / 2;
        let chunks = vec![Ok(content.slice(..middle)), Ok(content.slice(middle..))];
        Ok(FileContent {
            size: content.len() as u64,
            body: Box::pin(futures::stream::iter(chunks)),
        })
    }

    async fn destroy(&self) -> Result<(), BackendError> {
        Ok(())
    }

    async fn lost(&self) -> LostReason {
        std::future::pending().await
    }
}

struct Script {
    command: String,
    stdin: mpsc::Receiver<Bytes>,
    output: mpsc::Sender<Output>,
}

/// The commands the tests use:
/// `echo <text>`, `exit <n>`, `stderr <text>`, `emoji` (a crab split over three chunks),
/// `invalid` (bytes that are no UTF-8), `cat` (echoes stdin until a line `exit`), `sleep`.
async fn run_script(
    script: Script,
    stop: CancellationToken,
    exit: oneshot::Sender<Result<ExitStatus, BackendError>>,
    stopped: Arc<AtomicUsize>,
) {
    let status = tokio::select! {
        status = script_body(script) => status,
        () = stop.cancelled() => {
            stopped.fetch_add(1, Ordering::SeqCst);
            ExitStatus::Signaled(9)
        }
    };
    let _ = exit.send(Ok(status));
}

async fn script_body(mut script: Script) -> ExitStatus {
    let (program, argument) = script.command.split_once(' ').unwrap_or((&script.command, ""));
    let out = |bytes: &[u8]| Output::Stdout(Bytes::copy_from_slice(bytes));
    let chunks = match program {
        "echo" => vec![out(format!("{argument}\n").as_bytes())],
        "stderr" => vec![Output::Stderr(Bytes::from(argument.to_owned()))],
        "emoji" => {
            let crab = "🦀".as_bytes();
            vec![out(&[b'a', crab[0]]), out(&crab[1..3]), out(&[crab[3], b'b'])]
        }
        "invalid" => vec![out(b"x\xff"), out(b"\xf0\x9f")],
        "exit" => return ExitStatus::Exited(argument.parse().unwrap_or(1)),
        "cat" => {
            while let Some(input) = script.stdin.recv().await {
                if input.as_ref() == b"exit\n" {
                    return ExitStatus::Exited(0);
                }
                if script.output.send(out(&input)).await.is_err() {
                    break;
                }
            }
            return ExitStatus::Exited(1);
        }
        "sleep" => std::future::pending().await,
        _ => return ExitStatus::Exited(127),
    };
    for chunk in chunks {
        if script.output.send(chunk).await.is_err() {
            break;
        }
    }
    ExitStatus::Exited(0)
}

/// A running server and the handles tests need.
pub struct TestApp {
    pub address: SocketAddr,
    pub client: reqwest::Client,
    pub stopped: Arc<AtomicUsize>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(configure: impl FnOnce(&mut ApiConfig)) -> TestApp {
    let options =
        ServeOptions { shutdown_grace: Duration::from_secs(1), ..ServeOptions::default() };
    spawn_app_with_options(configure, options).await
}

pub async fn spawn_app_with_options(
    configure: impl FnOnce(&mut ApiConfig),
    options: ServeOptions,
) -> TestApp {
    let backend = ScriptedBackend::default();
    let stopped = backend.stopped.clone();
    let core = Core::new(Arc::new(backend), CoreConfig::default());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let mut config = ApiConfig::new(address);
    config.token = Some(TOKEN.to_owned());
    configure(&mut config);
    let (shutdown, shutdown_rx) = oneshot::channel();
    let state = AppState::new(core, config);
    let server = tokio::spawn(poseidon_api::serve(listener, state, options, async {
        let _ = shutdown_rx.await;
    }));
    TestApp {
        address,
        client: reqwest::Client::new(),
        stopped,
        shutdown: Some(shutdown),
        server: Some(server),
    }
}

impl TestApp {
    /// Signals shutdown and waits for `serve` to return.
    pub async fn shut_down(mut self) -> std::io::Result<()> {
        let _ = self.shutdown.take().unwrap().send(());
        let server = self.server.take().unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve did not return")
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/api/v1{path}", self.address)
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, self.url(path)).header("Poseidon-Token", TOKEN)
    }

    /// Creates environment `id` with a pool of `pool` runners and waits until they are idle.
    pub async fn environment(&self, id: i64, pool: u32) {
        let body = json!({"prewarmingPoolSize": pool, "image": IMAGE});
        let response = self
            .request(reqwest::Method::PUT, &format!("/execution-environments/{id}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{response:?}");
        for _ in 0..200 {
            let statistics: Value = self.get_json("/statistics/execution-environments").await;
            if statistics[id.to_string()]["idleRunners"].as_u64() >= Some(u64::from(pool)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the pool of environment {id} did not fill");
    }

    /// Claims a runner of a ready environment `id`.
    pub async fn runner(&self, id: i64) -> String {
        self.environment(id, 1).await;
        let body = json!({"executionEnvironmentId": id, "inactivityTimeout": 60});
        let response =
            self.request(reqwest::Method::POST, "/runners").json(&body).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let claimed: Value = response.json().await.unwrap();
        claimed["runnerId"].as_str().unwrap().to_owned()
    }

    /// Stores `command` on `runner` and returns the WebSocket URL.
    pub async fn execute(&self, runner: &str, body: Value) -> String {
        let response = self
            .request(reqwest::Method::POST, &format!("/runners/{runner}/execute"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let answer: Value = response.json().await.unwrap();
        answer["websocketUrl"].as_str().unwrap().to_owned()
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let response = self.request(reqwest::Method::GET, path).send().await.unwrap();
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.unwrap()
    }
}

/// Status and body text of a response.
pub async fn status_and_body(response: reqwest::Response) -> (u16, String) {
    (response.status().as_u16(), response.text().await.unwrap())
}

/// Collects the bytes of a stream of byte results (a download).
pub async fn collect_body(response: reqwest::Response) -> Vec<u8> {
    let mut stream = response.bytes_stream();
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk.unwrap());
    }
    body
}
