//! Timing a local process from spawn to its first stdout byte and to its exit: the floor
//! (fork+exec without a sandbox) and the Docker CLI baselines.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Command;

/// The PATH of a plain Debian system, so that the floor runs the same `bash` and `python3` as
/// the `host` image does (not a user's shims).
pub const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// No baseline process may run longer than this.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(60);

/// Failures of one timed process, naming the program.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("{program}")]
    Io {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} did not end within {PROCESS_TIMEOUT:?}")]
    Hung { program: String },
    #[error("{program} exited with {status}: {stderr}")]
    Failed { program: String, status: std::process::ExitStatus, stderr: String },
}

/// Timings of one process, measured from just before the spawn.
#[derive(Debug, Clone, Copy)]
pub struct ProcessTiming {
    pub first_stdout: Option<Duration>,
    pub exit: Duration,
}

/// Runs `program args` with `stdin` written to it, in `cwd`, and requires exit 0.
pub async fn time_process(
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    cwd: Option<&Path>,
) -> Result<ProcessTiming, ProcessError> {
    tokio::time::timeout(PROCESS_TIMEOUT, time_unbounded(program, args, stdin, cwd))
        .await
        .map_err(|_| ProcessError::Hung { program: program.to_owned() })?
}

async fn time_unbounded(
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    cwd: Option<&Path>,
) -> Result<ProcessTiming, ProcessError> {
    let io = |source| ProcessError::Io { program: program.to_owned(), source };
    let mut command = Command::new(program);
    command
        .args(args)
        .env("PATH", SYSTEM_PATH)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(dir) = cwd {
        command.current_dir(dir);
    }
    let started = Instant::now();
    let mut child = command.spawn().map_err(io)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input).await.map_err(io)?;
    }
    let mut stdout = child.stdout.take().ok_or_else(|| io(std::io::Error::other("no stdout")))?;
    let mut stderr = child.stderr.take().ok_or_else(|| io(std::io::Error::other("no stderr")))?;
    let mut first_stdout = None;
    let mut buffer = [0u8; 4096];
    while stdout.read(&mut buffer).await.map_err(io)? > 0 {
        first_stdout.get_or_insert_with(|| started.elapsed());
    }
    let mut errors = Vec::new();
    stderr.read_to_end(&mut errors).await.map_err(io)?;
    let status = child.wait().await.map_err(io)?;
    let exit = started.elapsed();
    if !status.success() {
        let stderr = String::from_utf8_lossy(&errors).chars().take(300).collect();
        return Err(ProcessError::Failed { program: program.to_owned(), status, stderr });
    }
    Ok(ProcessTiming { first_stdout, exit })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn echo_has_a_first_byte_before_its_exit() {
        let timing = time_process("bash", &["-c", "echo hi"], None, None).await.unwrap();
        let first = timing.first_stdout.unwrap();
        assert!(first <= timing.exit);
    }

    #[tokio::test]
    async fn failing_command_is_an_error() {
        let error = time_process("bash", &["-c", "exit 3"], None, None).await.unwrap_err();
        assert!(matches!(error, ProcessError::Failed { .. }), "{error}");
    }
}
