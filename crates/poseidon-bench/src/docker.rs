//! The Docker baseline (`--docker`): a private dockerd started and stopped by
//! `scripts/docker-baseline.sh`, measured through the Docker CLI.

use crate::process::{ProcessError, ProcessTiming, time_process};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

/// The script is compiled in, so the binary works from any directory.
const SCRIPT: &str = include_str!("../scripts/docker-baseline.sh");
/// Matches the names in the script.
const IMAGE: &str = "poseidon-bench/host:1";
const EXEC_CONTAINER: &str = "poseidon-bench-exec";
/// Starting dockerd and importing the image; stopping it.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);
/// The script's exit code for "docker.io not installed".
const NOT_INSTALLED: i32 = 3;

/// Failures of starting or stopping the private dockerd.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("docker.io not installed")]
    NotInstalled,
    #[error("docker-baseline.sh {step} {dir}: {detail}")]
    Script { step: &'static str, dir: PathBuf, detail: String },
    #[error("temporary directory for dockerd")]
    TempDir(#[source] std::io::Error),
}

/// A running private dockerd with the exec container; [`DockerBaseline::stop`] undoes it.
#[derive(Debug)]
pub struct DockerBaseline {
    dir: tempfile::TempDir,
}

impl DockerBaseline {
    pub async fn start() -> Result<DockerBaseline, DockerError> {
        let dir = tempfile::Builder::new()
            .prefix("poseidon-bench-docker-")
            .tempdir()
            .map_err(DockerError::TempDir)?;
        let baseline = DockerBaseline { dir };
        match baseline.script("start").await {
            Ok(()) => Ok(baseline),
            Err(error) => {
                // A half-started dockerd must not outlive the run either.
                let _ = baseline.script("stop").await;
                Err(error)
            }
        }
    }

    pub async fn stop(self) -> Result<(), DockerError> {
        self.script("stop").await
    }

    async fn script(&self, step: &'static str) -> Result<(), DockerError> {
        let dir = self.dir.path().to_owned();
        let script_error = |detail: String| DockerError::Script { step, dir: dir.clone(), detail };
        let run = Command::new("bash")
            .args(["-c", SCRIPT, "docker-baseline.sh", step])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(SCRIPT_TIMEOUT, run)
            .await
            .map_err(|_| script_error(format!("no end within {SCRIPT_TIMEOUT:?}")))?
            .map_err(|error| script_error(error.to_string()))?;
        match output.status.code() {
            Some(0) => Ok(()),
            Some(NOT_INSTALLED) => Err(DockerError::NotInstalled),
            _ => Err(script_error(format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ))),
        }
    }

    fn host(&self) -> String {
        format!("unix://{}", self.dir.path().join("docker.sock").display())
    }

    /// `docker run --rm IMAGE bash -c COMMAND`: a fresh container per execution.
    pub async fn run(
        &self,
        command: &str,
        stdin: Option<&[u8]>,
    ) -> Result<ProcessTiming, ProcessError> {
        let host = self.host();
        let mut args = vec!["-H", &host, "run", "--rm", "--network", "none"];
        if stdin.is_some() {
            args.push("-i");
        }
        args.extend([IMAGE, "bash", "-c", command]);
        time_process("docker", &args, stdin, None).await
    }

    /// `docker exec CONTAINER bash -c COMMAND`: an execution in a running container, the
    /// closest Docker analogue of a prewarmed runner.
    pub async fn exec(
        &self,
        command: &str,
        stdin: Option<&[u8]>,
    ) -> Result<ProcessTiming, ProcessError> {
        let host = self.host();
        let mut args = vec!["-H", &host, "exec"];
        if stdin.is_some() {
            args.push("-i");
        }
        args.extend([EXEC_CONTAINER, "bash", "-c", command]);
        time_process("docker", &args, stdin, None).await
    }
}
