//! Starting and stopping a Poseidon of our own (`--spawn`): a free loopback port, a temporary
//! state directory, a unique cgroup name, a random token.

use crate::client::Poseidon;
use crate::memory::cgroup_directories;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// How long a fresh service may take to answer its health check.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the service may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
const HEALTH_POLL: Duration = Duration::from_millis(20);

/// Failures of starting or stopping the spawned service.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("preparing to start {binary}")]
    Prepare {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{binary} exited with {status} before it was healthy; its log:\n{log}")]
    Died { binary: PathBuf, status: std::process::ExitStatus, log: String },
    #[error("{binary} was not healthy within {START_TIMEOUT:?}; its log:\n{log}")]
    Unhealthy { binary: PathBuf, log: String },
    #[error("stopping the service (pid {pid})")]
    Stop {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("the service (pid {pid}) ignored SIGTERM for {STOP_TIMEOUT:?} and was killed")]
    Killed { pid: u32 },
    #[error("removing the cgroup {dir} the service left")]
    Cgroup {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the harness knows about a service it spawned.
#[derive(Debug, Clone)]
pub struct ServiceProcess {
    pub pid: u32,
    /// The service's `local.cgroupname`: every runner's cgroup is below it.
    pub cgroup: String,
}

/// A running service started by the harness; [`SpawnedService::stop`] ends it.
#[derive(Debug)]
pub struct SpawnedService {
    child: Child,
    pid: u32,
    url: String,
    token: String,
    cgroup: String,
    log: PathBuf,
    /// Holds the config, the state directory and the log; removed when dropped.
    _dir: tempfile::TempDir,
}

impl SpawnedService {
    /// Starts `binary serve` and waits until `GET /health` answers 204.
    pub async fn start(binary: &Path) -> Result<SpawnedService, ServiceError> {
        let prepare = |source| ServiceError::Prepare { binary: binary.to_owned(), source };
        let dir = tempfile::Builder::new().prefix("poseidon-bench-").tempdir().map_err(prepare)?;
        let port = free_loopback_port().map_err(prepare)?;
        let token = uuid::Uuid::new_v4().simple().to_string();
        // Unique, so that parallel runs and the test suites never share cgroups.
        let cgroup = format!("poseidon-bench-{}-{}", std::process::id(), &token[..8]);
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, config_yaml(port, &token, &dir.path().join("state"), &cgroup))
            .map_err(prepare)?;
        let log = dir.path().join("poseidon.log");
        let log_file = std::fs::File::create(&log).map_err(prepare)?;
        let log_err = log_file.try_clone().map_err(prepare)?;
        let child = Command::new(binary)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| ServiceError::Spawn { binary: binary.to_owned(), source })?;
        let pid = child.id().unwrap_or_default();
        let mut service = SpawnedService {
            child,
            pid,
            url: format!("http://127.0.0.1:{port}"),
            token,
            cgroup,
            log,
            _dir: dir,
        };
        service.await_health(binary).await?;
        Ok(service)
    }

    async fn await_health(&mut self, binary: &Path) -> Result<(), ServiceError> {
        let client = Poseidon::new(&self.url, Some(self.token.clone())).map_err(|error| {
            ServiceError::Prepare {
                binary: binary.to_owned(),
                source: std::io::Error::other(error),
            }
        })?;
        let started = Instant::now();
        while started.elapsed() < START_TIMEOUT {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(ServiceError::Died {
                    binary: binary.to_owned(),
                    status,
                    log: self.log_tail(),
                });
            }
            if client.health().await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(HEALTH_POLL).await;
        }
        Err(ServiceError::Unhealthy { binary: binary.to_owned(), log: self.log_tail() })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// The process and cgroup name, for memory and CPU figures.
    pub fn process(&self) -> ServiceProcess {
        ServiceProcess { pid: self.pid, cgroup: self.cgroup.clone() }
    }

    /// The last lines of the service's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let mut tail = String::new();
        for line in &lines[lines.len().saturating_sub(30)..] {
            let _ = writeln!(tail, "  {line}");
        }
        tail
    }

    /// SIGTERM, a bounded wait, then SIGKILL; then removes the cgroup directories the service
    /// left and returns them (a stopped service should leave none).
    pub async fn stop(mut self) -> Result<Vec<PathBuf>, ServiceError> {
        self.terminate().await?;
        let leftovers = cgroup_directories(&self.cgroup);
        for dir in &leftovers {
            remove_cgroup_tree(dir)
                .map_err(|source| ServiceError::Cgroup { dir: dir.clone(), source })?;
        }
        Ok(leftovers)
    }

    async fn terminate(&mut self) -> Result<(), ServiceError> {
        let pid = self.pid;
        let stop_error = |source| ServiceError::Stop { pid, source };
        if let Ok(Some(_)) = self.child.try_wait() {
            return Ok(());
        }
        let raw_pid =
            i32::try_from(pid).map_err(|error| stop_error(std::io::Error::other(error)))?;
        kill(Pid::from_raw(raw_pid), Signal::SIGTERM).map_err(|errno| stop_error(errno.into()))?;
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(status) => status.map(drop).map_err(stop_error),
            Err(_) => {
                self.child.kill().await.map_err(stop_error)?;
                Err(ServiceError::Killed { pid })
            }
        }
    }
}

/// A port the kernel just handed out on 127.0.0.1; the short race until the service binds it
/// is acceptable for a benchmark.
fn free_loopback_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Removes a cgroup directory and the ones below it, deepest first (a cgroup directory goes
/// with `rmdir` once it has no children and no processes).
fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    std::fs::remove_dir(dir)
}

/// The service's YAML configuration.
fn config_yaml(port: u16, token: &str, statedir: &Path, cgroup: &str) -> String {
    format!(
        "server:\n  address: 127.0.0.1\n  port: {port}\n  token: {token}\n\
         statedir: {}\n\
         local:\n  cgroupname: {cgroup}\n\
         \x20 network:\n    enabled: true\n    bridge: pbench0\n    subnet: 10.218.0.0/16\n\
         logger:\n  level: warn\n",
        statedir.display()
    )
}
