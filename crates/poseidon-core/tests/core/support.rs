//! A tiny scripted backend: runners whose executions follow their command, with counters and
//! switches for creation delays, failures and lost runners.
//!
//! Commands are `;`-separated steps: `out:TEXT`, `err:TEXT`, `exit:N`, `oom`, `pause` (10 ms),
//! `hang` (until stopped), `stubborn` (ignores being stopped), `flood` (stdout every 10 ms until
//! stopped), `exiterr` (the exit channel reports an error), `dropexit` (the exit channel is
//! dropped), `refuse` (`execute` itself fails).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use poseidon_core::backend::{
    Backend, BackendError, ExecRequest, ExecutionHandle, ExitStatus, FileContent, FileEntry,
    FileUpdate, FilesError, ListRequest, LostReason, MappedPort, Output, Recovery, Runner,
};
use poseidon_core::environment::EnvironmentConfig;
use poseidon_core::ids::{EnvironmentId, RunnerId};
use poseidon_core::{Core, CoreConfig};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
pub struct TestBackend {
    pub created: AtomicUsize,
    pub creation_attempts: AtomicUsize,
    pub destroyed: Arc<AtomicUsize>,
    pub creations_in_flight: AtomicUsize,
    pub max_creations_in_flight: AtomicUsize,
    /// The next this many creations fail.
    pub failing_creations: AtomicUsize,
    pub reject_prepare: AtomicBool,
    pub fail_destroy: AtomicBool,
    pub creation_delay: Mutex<Duration>,
    pub runners: Mutex<Vec<Arc<TestRunner>>>,
    /// What `recover` hands out (once).
    pub recovery: Mutex<Option<Recovery>>,
    /// Environments `delete_environment` was called for.
    pub deleted_environments: Mutex<Vec<EnvironmentId>>,
    /// Whether runners outlive the service (as Nomad's do).
    pub outlive: AtomicBool,
    /// Every `claimed` call: runner and inactivity timeout.
    pub claims: Arc<Mutex<Vec<(RunnerId, Duration)>>>,
}

impl TestBackend {
    pub fn live_runners(&self) -> usize {
        self.created.load(Ordering::SeqCst) - self.destroyed.load(Ordering::SeqCst)
    }

    pub fn created(&self) -> usize {
        self.created.load(Ordering::SeqCst)
    }

    pub fn destroyed(&self) -> usize {
        self.destroyed.load(Ordering::SeqCst)
    }

    pub fn set_creation_delay(&self, delay: Duration) {
        *self.creation_delay.lock().unwrap() = delay;
    }

    pub fn runner(&self, id: &RunnerId) -> Arc<TestRunner> {
        self.runners
            .lock()
            .unwrap()
            .iter()
            .find(|runner| runner.id == *id)
            .cloned()
            .expect("runner was created")
    }
}

#[async_trait]
impl Backend for TestBackend {
    async fn prepare_environment(
        &self,
        environment: &EnvironmentConfig,
    ) -> Result<(), BackendError> {
        if self.reject_prepare.load(Ordering::SeqCst) {
            return Err(BackendError::InvalidEnvironment(format!(
                "image {} not found",
                environment.image
            )));
        }
        Ok(())
    }

    async fn create_runner(
        &self,
        environment: &EnvironmentConfig,
        id: RunnerId,
    ) -> Result<Arc<dyn Runner>, BackendError> {
        self.creation_attempts.fetch_add(1, Ordering::SeqCst);
        let in_flight = self.creations_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_creations_in_flight.fetch_max(in_flight, Ordering::SeqCst);
        let delay = *self.creation_delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        self.creations_in_flight.fetch_sub(1, Ordering::SeqCst);
        let failing = self.failing_creations.load(Ordering::SeqCst);
        if failing > 0 {
            self.failing_creations.store(failing - 1, Ordering::SeqCst);
            return Err(BackendError::Unavailable("no capacity".into()));
        }
        Ok(self.new_runner(id, environment.exposed_ports.clone()))
    }

    async fn recover(&self) -> Result<Recovery, BackendError> {
        Ok(self.recovery.lock().unwrap().take().unwrap_or_default())
    }

    async fn delete_environment(&self, id: EnvironmentId) -> Result<(), BackendError> {
        self.deleted_environments.lock().unwrap().push(id);
        Ok(())
    }

    fn runners_outlive_service(&self) -> bool {
        self.outlive.load(Ordering::SeqCst)
    }
}

impl TestBackend {
    /// A runner counted as created (also used for runners handed out by `recover`).
    pub fn new_runner(&self, id: RunnerId, exposed_ports: Vec<u16>) -> Arc<TestRunner> {
        self.created.fetch_add(1, Ordering::SeqCst);
        let runner = Arc::new(TestRunner {
            id,
            exposed_ports,
            destroyed: AtomicBool::new(false),
            fail_destroy: self.fail_destroy.load(Ordering::SeqCst),
            destroyed_count: self.destroyed.clone(),
            lost: watch::Sender::new(None),
            requests: Mutex::new(Vec::new()),
            stopped_executions: Arc::new(AtomicUsize::new(0)),
            file_operations: AtomicUsize::new(0),
            claims: self.claims.clone(),
        });
        self.runners.lock().unwrap().push(runner.clone());
        runner
    }
}

pub struct TestRunner {
    pub id: RunnerId,
    exposed_ports: Vec<u16>,
    pub destroyed: AtomicBool,
    fail_destroy: bool,
    destroyed_count: Arc<AtomicUsize>,
    lost: watch::Sender<Option<LostReason>>,
    pub requests: Mutex<Vec<ExecRequest>>,
    pub stopped_executions: Arc<AtomicUsize>,
    pub file_operations: AtomicUsize,
    claims: Arc<Mutex<Vec<(RunnerId, Duration)>>>,
}

impl TestRunner {
    pub fn make_lost(&self, reason: LostReason) {
        self.lost.send_replace(Some(reason));
    }

    pub fn stopped_executions(&self) -> usize {
        self.stopped_executions.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Runner for TestRunner {
    fn id(&self) -> &RunnerId {
        &self.id
    }

    fn mapped_ports(&self) -> Vec<MappedPort> {
        self.exposed_ports
            .iter()
            .map(|port| MappedPort {
                exposed_port: *port,
                host_address: format!("127.0.0.1:{}", 20000 + port),
            })
            .collect()
    }

    async fn execute(&self, request: ExecRequest) -> Result<ExecutionHandle, BackendError> {
        self.requests.lock().unwrap().push(request.clone());
        if request.command == "refuse" {
            return Err(BackendError::Internal("cannot start".into()));
        }
        let (stdin, stdin_receiver) = mpsc::channel(4);
        let (output_sender, output) = mpsc::channel(4);
        let (exit_sender, exit) = oneshot::channel();
        let stop = CancellationToken::new();
        let script = Script {
            steps: request.command.clone(),
            stop: stop.clone(),
            stopped: self.stopped_executions.clone(),
        };
        tokio::spawn(async move {
            let _stdin = stdin_receiver;
            script.run(output_sender, exit_sender).await;
        });
        Ok(ExecutionHandle::new(stdin, output, exit, stop))
    }

    async fn update_files(&self, _update: FileUpdate) -> Result<(), FilesError> {
        self.file_operations.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn list_files(&self, _request: ListRequest) -> Result<Vec<FileEntry>, FilesError> {
        self.file_operations.fetch_add(1, Ordering::SeqCst);
        Ok(Vec::new())
    }

    async fn read_file(&self, _path: &str, _privileged: bool) -> Result<FileContent, FilesError> {
        self.file_operations.fetch_add(1, Ordering::SeqCst);
        Ok(FileContent { size: 0, body: Box::pin(futures::stream::empty()) })
    }

    async fn destroy(&self) -> Result<(), BackendError> {
        if !self.destroyed.swap(true, Ordering::SeqCst) {
            self.destroyed_count.fetch_add(1, Ordering::SeqCst);
        }
        if self.fail_destroy {
            return Err(BackendError::Internal("destroy failed".into()));
        }
        Ok(())
    }

    fn claimed(&self, inactivity_timeout: Duration) {
        self.claims.lock().unwrap().push((self.id.clone(), inactivity_timeout));
    }

    async fn lost(&self) -> LostReason {
        let mut receiver = self.lost.subscribe();
        let reason =
            receiver.wait_for(Option::is_some).await.expect("the sender lives in the runner");
        reason.clone().expect("waited for it")
    }
}

type ExitSender = oneshot::Sender<Result<ExitStatus, BackendError>>;

struct Script {
    steps: String,
    stop: CancellationToken,
    stopped: Arc<AtomicUsize>,
}

impl Script {
    async fn run(self, output: mpsc::Sender<Output>, exit: ExitSender) {
        for step in self.steps.split(';') {
            let (name, argument) = step.split_once(':').unwrap_or((step, ""));
            let chunk = Bytes::from(argument.to_owned());
            match name {
                "out" => self.send(&output, Output::Stdout(chunk)).await,
                "err" => self.send(&output, Output::Stderr(chunk)).await,
                "hang" => self.stop.cancelled().await,
                "stubborn" => std::future::pending().await,
                "pause" => tokio::time::sleep(Duration::from_millis(10)).await,
                "flood" => loop {
                    tokio::select! {
                        () = self.stop.cancelled() => break,
                        _ = output.send(Output::Stdout(Bytes::from_static(b"x"))) => {}
                    }
                    // Lets the paused test clock advance while output keeps flowing.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                },
                "exit" => {
                    return finish(output, exit, Ok(ExitStatus::Exited(argument.parse().unwrap())));
                }
                "oom" => return finish(output, exit, Ok(ExitStatus::OomKilled)),
                "exiterr" => {
                    return finish(
                        output,
                        exit,
                        Err(BackendError::Internal("exec stream broke".into())),
                    );
                }
                "dropexit" => return,
                other => panic!("unknown script step {other}"),
            }
            if self.stop.is_cancelled() {
                self.stopped.fetch_add(1, Ordering::SeqCst);
                return finish(output, exit, Ok(ExitStatus::Signaled(9)));
            }
        }
        finish(output, exit, Ok(ExitStatus::Exited(0)));
    }

    async fn send(&self, output: &mpsc::Sender<Output>, chunk: Output) {
        tokio::select! {
            () = self.stop.cancelled() => {}
            _ = output.send(chunk) => {}
        }
    }
}

fn finish(
    output: mpsc::Sender<Output>,
    exit: ExitSender,
    status: Result<ExitStatus, BackendError>,
) {
    drop(output);
    let _ = exit.send(status);
}

pub fn environment(id: i64, pool_size: u32) -> EnvironmentConfig {
    EnvironmentConfig {
        id: EnvironmentId(id),
        prewarming_pool_size: pool_size,
        cpu_limit: 20,
        memory_limit: 100,
        image: "debian:12".into(),
        network_access: false,
        exposed_ports: Vec::new(),
    }
}

pub fn core_with(config: CoreConfig) -> (Core, Arc<TestBackend>) {
    let backend = Arc::new(TestBackend::default());
    (Core::new(backend.clone(), config), backend)
}

pub fn core() -> (Core, Arc<TestBackend>) {
    core_with(CoreConfig::default())
}

/// Lets (virtual) time pass until `condition` holds; fails after 60 s.
pub async fn eventually(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..60_000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("timed out waiting until {what}");
}

/// Lets background tasks run without moving the clock much.
pub async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}
