//! Turns a sandbox process into the core's [`ExecutionHandle`].
//!
//! One supervising task per execution owns the process. It pumps stdin and both output
//! streams through small bounded channels, so a consumer that stops reading makes the learner's
//! process block on write instead of making us buffer. The exit status is sent only after both
//! output streams ended, so no output can follow it.

use bytes::{Bytes, BytesMut};
use poseidon_core::backend::{BackendError, ExecRequest, ExecutionHandle, ExitStatus, Output};
use poseidon_sandbox::{ExitInfo, Process, ProcessSpec, Sandbox};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Chunks queued between the process and the consumer, per direction.
const CHANNEL_CHUNKS: usize = 16;
/// Largest chunk read from a process at once.
const READ_CHUNK: usize = 64 * 1024;
const SIGKILL: i32 = 9;

pub(crate) async fn start(
    sandbox: &Sandbox,
    request: ExecRequest,
) -> Result<ExecutionHandle, BackendError> {
    let spec = ProcessSpec {
        command: request.command,
        env: request.env,
        privileged: request.privileged,
        tty: request.tty,
        separate_stderr: request.separate_stderr,
        cwd: None,
    };
    let process = sandbox.spawn(spec).await.map_err(|e| match e {
        poseidon_sandbox::Error::InitDied => BackendError::RunnerGone,
        e => BackendError::Internal(format!("cannot start the execution: {e}")),
    })?;

    let (stdin_tx, stdin_rx) = mpsc::channel(CHANNEL_CHUNKS);
    let (output_tx, output_rx) = mpsc::channel(CHANNEL_CHUNKS);
    let (exit_tx, exit_rx) = oneshot::channel();
    let stop = CancellationToken::new();
    tokio::spawn(supervise(process, stdin_rx, output_tx, exit_tx, stop.clone()));
    Ok(ExecutionHandle::new(stdin_tx, output_rx, exit_rx, stop))
}

async fn supervise(
    mut process: Process,
    stdin: mpsc::Receiver<Bytes>,
    output: mpsc::Sender<Output>,
    exit: oneshot::Sender<Result<ExitStatus, BackendError>>,
    stop: CancellationToken,
) {
    let killer = process.killer();
    let mut pumps = JoinSet::new();
    if let Some(writer) = process.stdin.take() {
        // stdin ends on its own when the process exits; it is not awaited below.
        tokio::spawn(pump_stdin(stdin, writer, stop.clone()));
    }
    if let Some(reader) = process.stdout.take() {
        pumps.spawn(pump_output(reader, output.clone(), Output::Stdout));
    }
    if let Some(reader) = process.stderr.take() {
        pumps.spawn(pump_output(reader, output.clone(), Output::Stderr));
    }
    drop(output);

    let status = tokio::select! {
        status = process.wait() => status,
        () = stop.cancelled() => {
            killer.kill();
            process.wait().await
        }
    };
    // The sandbox killed whatever the main process left behind, so the streams reach their
    // end; a consumer that gave up (stop) no longer needs them.
    tokio::select! {
        () = async { while pumps.join_next().await.is_some() {} } => {}
        () = stop.cancelled() => pumps.abort_all(),
    }
    let result = status
        .map(exit_status)
        .map_err(|e| BackendError::Internal(format!("waiting for the execution failed: {e}")));
    // The consumer may be gone already; then nobody needs the status.
    let _ = exit.send(result);
}

fn exit_status(info: ExitInfo) -> ExitStatus {
    match info {
        ExitInfo { oom_killed: true, .. } => ExitStatus::OomKilled,
        ExitInfo { signal: Some(signal), .. } => ExitStatus::Signaled(signal),
        ExitInfo { code: Some(code), .. } => ExitStatus::Exited((code & 0xff) as u8),
        // No status at all: the process vanished with its runner, which kills with SIGKILL.
        ExitInfo { .. } => ExitStatus::Signaled(SIGKILL),
    }
}

async fn pump_stdin(
    mut chunks: mpsc::Receiver<Bytes>,
    mut writer: impl tokio::io::AsyncWrite + Unpin,
    stop: CancellationToken,
) {
    loop {
        let chunk = tokio::select! {
            chunk = chunks.recv() => chunk,
            () = stop.cancelled() => None,
        };
        let Some(chunk) = chunk else { return };
        if writer.write_all(&chunk).await.is_err() || writer.flush().await.is_err() {
            return;
        }
    }
}

async fn pump_output(
    mut reader: impl AsyncRead + Unpin,
    output: mpsc::Sender<Output>,
    wrap: fn(Bytes) -> Output,
) {
    let mut buffer = BytesMut::with_capacity(READ_CHUNK);
    loop {
        buffer.reserve(READ_CHUNK);
        match reader.read_buf(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if output.send(wrap(buffer.split().freeze())).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_info_maps_to_the_core_status() {
        let info = |code, signal, oom_killed| ExitInfo { code, signal, oom_killed };
        assert_eq!(exit_status(info(Some(3), None, false)), ExitStatus::Exited(3));
        assert_eq!(exit_status(info(None, Some(2), false)), ExitStatus::Signaled(2));
        assert_eq!(exit_status(info(None, Some(9), true)), ExitStatus::OomKilled);
        assert_eq!(exit_status(info(Some(300), None, false)), ExitStatus::Exited(44));
    }
}
