//! The boundary between the core and a backend (local sandboxes, Nomad).
//!
//! A backend creates runners; a runner executes commands and manages files. The core owns
//! everything else (pools, claims, timers, the mapping of outcomes to Poseidon's messages), so
//! that every backend behaves the same towards clients.
//!
//! Liveness rule for [`ExecutionHandle`]: the consumer reads `output` until it yields `None` and
//! then awaits `exit`; dropping the handle (or calling [`ExecutionHandle::stop`]) stops every
//! process of the execution.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::environment::EnvironmentConfig;
use crate::ids::{EnvironmentId, RunnerId};

/// Creates runners for execution environments.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Checks that runners of `environment` can be created (e.g. that its image exists) before
    /// the core stores it. Called on every PUT and when environments are restored at start-up.
    async fn prepare_environment(
        &self,
        environment: &EnvironmentConfig,
    ) -> Result<(), BackendError>;

    /// Creates a runner of `environment` named `id`; returns once it can execute commands.
    async fn create_runner(
        &self,
        environment: &EnvironmentConfig,
        id: RunnerId,
    ) -> Result<Arc<dyn Runner>, BackendError>;

    /// What survived a restart of the service (Nomad keeps environments and runners as jobs).
    /// Called once, by [`crate::Core::restore`], before the API serves anything.
    async fn recover(&self) -> Result<Recovery, BackendError> {
        Ok(Recovery::default())
    }

    /// Forgets the backend's own record of an environment (Nomad: its template job). Its runners
    /// were destroyed by the core already.
    async fn delete_environment(&self, _id: EnvironmentId) -> Result<(), BackendError> {
        Ok(())
    }

    /// Whether runners survive a restart of the service, so that shutdown must keep them for
    /// [`Backend::recover`] instead of destroying them.
    fn runners_outlive_service(&self) -> bool {
        false
    }
}

/// A runner whose creation was under way before a restart; resolves once it can execute.
pub type StartingRunner = BoxFuture<'static, Result<Arc<dyn Runner>, BackendError>>;

/// Environments and runners a backend still holds after a restart of the service.
#[derive(Default)]
pub struct Recovery {
    /// Environments the backend knows. When any are reported they replace the persisted ones.
    pub environments: Vec<EnvironmentConfig>,
    /// Runners ready to be claimed, with their environment.
    pub idle: Vec<(EnvironmentId, Arc<dyn Runner>)>,
    /// Runners a client had claimed, with their environment and inactivity timeout (zero: none).
    pub used: Vec<(EnvironmentId, Arc<dyn Runner>, Duration)>,
    /// Runners still starting; each counts towards its pool like a creation in flight.
    pub starting: Vec<(EnvironmentId, StartingRunner)>,
}

impl fmt::Debug for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recovery")
            .field("environments", &self.environments.len())
            .field("idle", &self.idle.len())
            .field("used", &self.used.len())
            .field("starting", &self.starting.len())
            .finish()
    }
}

/// A long-lived, isolated sandbox that runs executions and holds files.
#[async_trait]
pub trait Runner: Send + Sync + 'static {
    fn id(&self) -> &RunnerId;

    /// Host addresses of the environment's exposed ports (empty without network access).
    fn mapped_ports(&self) -> Vec<MappedPort>;

    /// Starts `request` and returns its streams at once; output flows while it runs.
    async fn execute(&self, request: ExecRequest) -> Result<ExecutionHandle, BackendError>;

    /// Deletes `update.delete`, then writes `update.copy` (as root: files 0744, directories 01777).
    async fn update_files(&self, update: FileUpdate) -> Result<(), FilesError>;

    /// Lists `request.path` as seen from inside the runner.
    async fn list_files(&self, request: ListRequest) -> Result<Vec<FileEntry>, FilesError>;

    /// Opens a regular file inside the runner for streaming; the size is known before the body.
    async fn read_file(&self, path: &str, privileged: bool) -> Result<FileContent, FilesError>;

    /// Kills every process and releases every resource of the runner. Idempotent.
    async fn destroy(&self) -> Result<(), BackendError>;

    /// A client claimed the runner. Must return at once; a backend that records claims (Nomad's
    /// `used` meta, for recovery) does so in the background.
    fn claimed(&self, _inactivity_timeout: Duration) {}

    /// Resolves when the runner died on its own (its init process vanished, the Nomad
    /// allocation stopped), with the reason. Never resolves for a healthy runner.
    async fn lost(&self) -> LostReason;
}

/// What to run and how. The command runs as `bash -c <command>` in the working directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub command: String,
    /// Variables added to the environment; `CODEOCEAN=true` is already among them.
    pub env: Vec<(String, String)>,
    /// Run as root instead of the image's unprivileged `user`.
    pub privileged: bool,
    /// Give stdin and stdout a terminal (echo, `\r\n`, Ctrl-C as SIGINT).
    pub tty: bool,
    /// Keep stderr apart from stdout (a pipe) even when `tty` is set.
    pub separate_stderr: bool,
}

/// One chunk of output of a running execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout(Bytes),
    Stderr(Bytes),
}

/// How an execution ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// The main process exited with this code.
    Exited(u8),
    /// The main process was killed by this signal.
    Signaled(i32),
    /// The kernel's out-of-memory killer ended a process of the execution.
    OomKilled,
}

impl ExitStatus {
    /// The shell convention: the exit code, or 128 + signal number, truncated to 8 bits.
    pub fn code(self) -> u8 {
        match self {
            ExitStatus::Exited(code) => code,
            ExitStatus::Signaled(signal) => (128 + signal).clamp(0, 255) as u8,
            ExitStatus::OomKilled => 137,
        }
    }
}

/// A running execution's streams. Dropping it stops the execution.
pub struct ExecutionHandle {
    /// Raw bytes for the process's stdin (the terminal when `tty` is set). Bounded: a process
    /// that does not read makes `send` wait.
    pub stdin: mpsc::Sender<Bytes>,
    /// Output as it is produced, in order per stream. Bounded: a consumer that does not read
    /// makes the process block on write. Ends (`None`) after both streams reached end of file.
    pub output: mpsc::Receiver<Output>,
    /// Completes after `output` has ended.
    pub exit: oneshot::Receiver<Result<ExitStatus, BackendError>>,
    stop: CancellationToken,
    _stop_on_drop: DropGuard,
}

impl ExecutionHandle {
    /// Builds a handle; the backend stops the execution once `stop` is cancelled.
    pub fn new(
        stdin: mpsc::Sender<Bytes>,
        output: mpsc::Receiver<Output>,
        exit: oneshot::Receiver<Result<ExitStatus, BackendError>>,
        stop: CancellationToken,
    ) -> Self {
        let guard = stop.clone().drop_guard();
        Self { stdin, output, exit, stop, _stop_on_drop: guard }
    }

    /// Kills every process of the execution; `output` and `exit` still complete.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl fmt::Debug for ExecutionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecutionHandle").field("stopped", &self.stop.is_cancelled()).finish()
    }
}

/// An exposed port of a runner and where clients reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedPort {
    pub exposed_port: u16,
    /// `host:port` as clients should dial it.
    pub host_address: String,
}

/// A `PATCH …/files` request: deletions first, then copies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileUpdate {
    /// Paths to delete recursively; the literal `./*` means every non-dot entry of the workspace.
    pub delete: Vec<String>,
    pub copy: Vec<FileCopy>,
}

/// One file (or, when `path` ends in `/`, one directory) to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCopy {
    pub path: String,
    pub content: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListRequest {
    /// Relative to the working directory, or absolute inside the runner.
    pub path: String,
    pub recursive: bool,
    pub privileged: bool,
}

/// One entry of a listing, as Poseidon reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// The requested path's prefix plus the entry's name (`./test.txt` in a recursive listing of `./`).
    pub name: String,
    /// One `ls -l` type character: `-`, `d`, `l`, `p`, `s`, `c`, `b`.
    pub entry_type: char,
    pub link_target: Option<String>,
    pub size: u64,
    /// Seconds since the epoch.
    pub modification_time: i64,
    /// Nine `ls -l` permission characters, e.g. `rwxr--r--`.
    pub permissions: String,
    pub owner: String,
    pub group: String,
}

/// A file being downloaded: its size first, then its bytes.
pub struct FileContent {
    pub size: u64,
    pub body: Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>,
}

impl fmt::Debug for FileContent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileContent").field("size", &self.size).finish_non_exhaustive()
    }
}

/// Why a runner died on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LostReason {
    /// The whole runner ran out of memory.
    OomKilled,
    /// The runner stopped as a normal consequence of the backend's life (e.g. a Nomad stop).
    Stopped,
    /// Anything else, with a description for the logs.
    Failed(String),
}

/// A failure of the backend itself (not of the user's command).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The environment cannot be served, e.g. its image is unknown. Shown to the client.
    #[error("{0}")]
    InvalidEnvironment(String),
    /// The runner is gone (destroyed or lost).
    #[error("the runner is gone")]
    RunnerGone,
    /// The backend's infrastructure is overloaded or unreachable (Nomad down, no capacity).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

/// A failure of a file operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilesError {
    /// The path does not exist or the user may not read it (Poseidon's 424).
    #[error("file not found or insufficient permissions")]
    NotFound,
    /// The path exists but cannot be downloaded (a directory, a fifo, a device).
    #[error("{0}")]
    NotAFile(String),
    /// Some entries of a copy failed; the others were written. The message names each failure.
    #[error("{0}")]
    CopyFailed(String),
    #[error(transparent)]
    Backend(#[from] BackendError),
}
