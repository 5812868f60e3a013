//! A runner: one Nomad job `<envId>-<uuid>` bound to one running allocation.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use poseidon_core::backend::{
    BackendError, ExecRequest, ExecutionHandle, FileContent, FileEntry, FileUpdate, FilesError,
    ListRequest, LostReason, MappedPort, Output, Runner,
};
use poseidon_core::ids::RunnerId;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::backend::Shared;
use crate::command;
use crate::exec::{self, Channel, Session};
use crate::files;
use crate::retry::{self, Attempt};
use crate::template::{self, RUNNER_TASK};
use crate::tracker::Phase;

/// Output chunks and stdin writes buffered per execution.
const CHANNEL_CAPACITY: usize = 16;
/// How long the stderr reader of a split execution may lag behind the main command.
const STDERR_GRACE: Duration = Duration::from_secs(1);
/// Bytes of output a file operation keeps (listings of huge trees are cut, not buffered).
const MAX_COLLECTED: usize = 16 << 20;
/// The size line of a download is short; a longer one is not a size line.
const MAX_FIRST_LINE: usize = 8 << 10;
/// How long the kill of a stopped execution may take.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Claim metadata is written with retries for about this long.
const CLAIM_PATIENCE: Duration = Duration::from_secs(5 * 60);

pub(crate) struct NomadRunner {
    id: RunnerId,
    /// The registered job, for rewriting its claim metadata.
    job: Value,
    allocation: String,
    ports: Vec<MappedPort>,
    phase: watch::Receiver<Phase>,
    /// Cancelled once the runner is lost or destroyed: every exec session ends at once.
    dead: CancellationToken,
    destroyed: AtomicBool,
    /// Serializes writes of the job (claim metadata, deregistration), so that a claim retried
    /// late can never register the job again after its deregistration.
    job_writes: Arc<tokio::sync::Mutex<()>>,
    shared: Arc<Shared>,
}

impl NomadRunner {
    pub(crate) fn new(
        shared: Arc<Shared>,
        id: RunnerId,
        job: Value,
        allocation: String,
        ports: Vec<MappedPort>,
        phase: watch::Receiver<Phase>,
    ) -> Arc<Self> {
        let dead = CancellationToken::new();
        let mut watched = phase.clone();
        let on_end = dead.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = on_end.cancelled() => {}
                _ = watched.wait_for(|phase| matches!(phase, Phase::Ended(_))) => on_end.cancel(),
            }
        });
        Arc::new(Self {
            id,
            job,
            allocation,
            ports,
            phase,
            dead,
            destroyed: AtomicBool::new(false),
            job_writes: Arc::new(tokio::sync::Mutex::new(())),
            shared,
        })
    }

    /// Once `stop` is cancelled before the execution finished, kills its processes from a
    /// second exec (as root), bounded in time.
    fn kill_on_stop(&self, stop: CancellationToken, finished: CancellationToken, pid_file: String) {
        let client = self.shared.client.clone();
        let allocation = self.allocation.clone();
        let dead = self.dead.clone();
        tokio::spawn(async move {
            tokio::select! {
                biased;
                () = finished.cancelled() => return,
                () = dead.cancelled() => return,
                () = stop.cancelled() => {}
            }
            let argv = command::kill(&pid_file);
            let killing = async {
                let target = client.exec_target(&allocation, RUNNER_TASK, false, &argv)?;
                let socket = exec::connect(&target).await.map_err(BackendError::from)?;
                let (output, _receiver) = mpsc::channel(1);
                Session::internal(socket, output, dead).run().await.map(drop)
            };
            match tokio::time::timeout(KILL_TIMEOUT, killing).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::warn!(allocation, %error, "cannot kill a stopped execution")
                }
                Err(_) => tracing::warn!(allocation, "killing a stopped execution timed out"),
            }
        });
    }

    fn check_alive(&self) -> Result<(), BackendError> {
        match self.dead.is_cancelled() {
            true => Err(BackendError::RunnerGone),
            false => Ok(()),
        }
    }

    async fn connect(&self, argv: &[String], tty: bool) -> Result<exec::Socket, BackendError> {
        self.check_alive()?;
        let target = self.shared.client.exec_target(&self.allocation, RUNNER_TASK, tty, argv)?;
        Ok(exec::connect(&target).await?)
    }

    /// Runs an internal script without a terminal, feeding `stdin`, and collects its output.
    ///
    /// Without input, stdin is never closed: Nomad stops reading a session when its process
    /// ends and then drops the connection, and a frame it left unread turns that into a TCP
    /// reset that can swallow the exit frame. A script that gets input must read it to the end
    /// (see [`files::update_script`]) for the same reason.
    async fn run_internal(
        &self,
        script: &str,
        privileged: bool,
        stdin: Option<Bytes>,
    ) -> Result<Collected, BackendError> {
        let socket = self.connect(&command::internal(script, privileged), false).await?;
        let (output, mut receiver) = mpsc::channel(CHANNEL_CAPACITY);
        let stdin = stdin.map(|bytes| {
            let (sender, receiver) = mpsc::channel(1);
            sender.try_send(bytes).expect("room for one chunk");
            receiver
        });
        let session = Session { stdin, ..Session::internal(socket, output, self.dead.clone()) };
        let running = tokio::spawn(session.run());
        let mut collected = Collected::default();
        while let Some(chunk) = receiver.recv().await {
            collected.add(chunk);
        }
        let exit = running.await.map_err(|error| BackendError::Internal(error.to_string()))??;
        collected.exit = exit.code();
        Ok(collected)
    }

    /// Starts a download: reads the size line, then streams exactly that many bytes.
    async fn open_download(&self, path: &str, privileged: bool) -> Result<FileContent, FilesError> {
        let socket =
            self.connect(&command::internal(&files::read_script(path), privileged), false).await?;
        let (output, mut receiver) = mpsc::channel(CHANNEL_CAPACITY);
        let stop = CancellationToken::new();
        let session =
            Session { stop: stop.clone(), ..Session::internal(socket, output, self.dead.clone()) };
        let running = tokio::spawn(session.run());
        let mut head = BytesMut::new();
        let newline = loop {
            match receiver.recv().await {
                Some(Output::Stdout(chunk)) => {
                    head.extend_from_slice(&chunk);
                    if let Some(position) = head.iter().position(|byte| *byte == b'\n') {
                        break position;
                    }
                    if head.len() > MAX_FIRST_LINE {
                        return Err(BackendError::Internal(format!("no size of {path}")).into());
                    }
                }
                Some(Output::Stderr(_)) => {}
                None => {
                    let exit = running
                        .await
                        .map_err(|error| BackendError::Internal(error.to_string()))??;
                    return Err(match exit.code() {
                        0 => BackendError::Internal(format!("no size of {path}")).into(),
                        files::NOT_A_FILE => {
                            FilesError::NotAFile(format!("{path} is not a regular file"))
                        }
                        _ => FilesError::NotFound,
                    });
                }
            }
        };
        let line = String::from_utf8_lossy(&head[..newline]).into_owned();
        let size = line
            .trim()
            .parse()
            .map_err(|_| BackendError::Internal(format!("unexpected size of {path}: {line}")))?;
        let first = head.split_off(newline + 1).freeze();
        Ok(FileContent { size, body: body_stream(first, receiver, size, stop) })
    }
}

/// The download body: `first`, then stdout chunks, cut at `size`; fewer bytes are an error
/// (the file shrank between `ls` and `cat`), so the response never lies about its length.
fn body_stream(
    first: Bytes,
    receiver: mpsc::Receiver<Output>,
    size: u64,
    stop: CancellationToken,
) -> std::pin::Pin<Box<dyn futures::Stream<Item = std::io::Result<Bytes>> + Send>> {
    let state = (Some(first), receiver, size, stop.drop_guard());
    Box::pin(futures::stream::unfold(
        state,
        |(mut first, mut receiver, remaining, guard)| async move {
            if remaining == 0 {
                return None;
            }
            let chunk = match first.take().filter(|chunk| !chunk.is_empty()) {
                Some(chunk) => Some(chunk),
                None => loop {
                    match receiver.recv().await {
                        Some(Output::Stdout(chunk)) => break Some(chunk),
                        Some(Output::Stderr(_)) => continue,
                        None => break None,
                    }
                },
            };
            let Some(mut chunk) = chunk else {
                let error =
                    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the file shrank");
                return Some((Err(error), (None, receiver, 0, guard)));
            };
            chunk.truncate(remaining.min(chunk.len() as u64) as usize);
            let remaining = remaining - chunk.len() as u64;
            Some((Ok(chunk), (None, receiver, remaining, guard)))
        },
    ))
}

/// The output of an internal command.
#[derive(Default)]
struct Collected {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: u8,
}

impl Collected {
    fn add(&mut self, chunk: Output) {
        let (buffer, bytes) = match chunk {
            Output::Stdout(bytes) => (&mut self.stdout, bytes),
            Output::Stderr(bytes) => (&mut self.stderr, bytes),
        };
        let room = MAX_COLLECTED.saturating_sub(buffer.len());
        buffer.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

#[async_trait]
impl Runner for NomadRunner {
    fn id(&self) -> &RunnerId {
        &self.id
    }

    fn mapped_ports(&self) -> Vec<MappedPort> {
        self.ports.clone()
    }

    async fn execute(&self, request: ExecRequest) -> Result<ExecutionHandle, BackendError> {
        let (stdin, stdin_receiver) = mpsc::channel(CHANNEL_CAPACITY);
        let (output, output_receiver) = mpsc::channel(CHANNEL_CAPACITY);
        let (exit_sender, exit) = oneshot::channel();
        let stop = CancellationToken::new();
        let unique = unique_suffix();
        let pid_file = format!("/tmp/.poseidon_{unique}.pid");
        let main = |socket| Session {
            socket,
            stdin: Some(stdin_receiver),
            output: output.clone(),
            channel: Channel::Native,
            tty: request.tty,
            stop: stop.clone(),
            dead: self.dead.clone(),
        };
        let finished = CancellationToken::new();
        let finish = finished.clone().drop_guard();
        if request.tty && request.separate_stderr {
            let fifo = format!("/tmp/stderr_{unique}.fifo");
            let (main_argv, reader_argv) = command::split_stderr(&request, &fifo, &pid_file);
            // The reader first: a main command without its reader would block on the fifo
            // forever, while a reader without its command gives up by itself.
            let reader_socket = self.connect(&reader_argv, true).await?;
            let main_socket = self.connect(&main_argv, true).await?;
            let reader = Session {
                socket: reader_socket,
                stdin: None,
                output: output.clone(),
                channel: Channel::Stderr,
                tty: true,
                stop: CancellationToken::new(),
                dead: self.dead.clone(),
            };
            let main = main(main_socket);
            tokio::spawn(async move {
                let reader = tokio::spawn(reader.run());
                let status = main.run().await;
                drop(finish);
                let abort = reader.abort_handle();
                if tokio::time::timeout(STDERR_GRACE, reader).await.is_err() {
                    abort.abort();
                }
                let _ = exit_sender.send(status);
            });
        } else {
            let argv = command::single(&request, &pid_file);
            let session = main(self.connect(&argv, request.tty).await?);
            tokio::spawn(async move {
                let status = session.run().await;
                drop(finish);
                let _ = exit_sender.send(status);
            });
        }
        drop(output);
        self.kill_on_stop(stop.clone(), finished, pid_file);
        Ok(ExecutionHandle::new(stdin, output_receiver, exit, stop))
    }

    async fn update_files(&self, update: FileUpdate) -> Result<(), FilesError> {
        let archive = files::archive(&update.copy, unix_now());
        let collected =
            self.run_internal(&files::update_script(&update), true, Some(archive.into())).await?;
        if collected.exit != 0 {
            return Err(FilesError::CopyFailed(format!(
                "stderr output '{}' and stdout output '{}'",
                String::from_utf8_lossy(&collected.stderr),
                String::from_utf8_lossy(&collected.stdout)
            )));
        }
        Ok(())
    }

    async fn list_files(&self, request: ListRequest) -> Result<Vec<FileEntry>, FilesError> {
        let path = if request.path.is_empty() { "./" } else { request.path.as_str() };
        let script = files::list_script(path, request.recursive);
        let collected = self.run_internal(&script, request.privileged, None).await?;
        let entries = files::parse_listing(&String::from_utf8_lossy(&collected.stdout));
        if collected.exit != 0 && entries.is_empty() {
            return Err(FilesError::NotFound);
        }
        Ok(entries)
    }

    async fn read_file(&self, path: &str, privileged: bool) -> Result<FileContent, FilesError> {
        self.open_download(path, privileged).await
    }

    async fn destroy(&self) -> Result<(), BackendError> {
        if self.destroyed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.dead.cancel();
        self.shared.tracker.forget(self.id.as_str());
        self.shared.deregister_in_background(self.id.to_string(), Some(self.job_writes.clone()));
        Ok(())
    }

    fn claimed(&self, inactivity_timeout: Duration) {
        let job = template::mark_used(&self.job, inactivity_timeout);
        let shared = self.shared.clone();
        let dead = self.dead.clone();
        let writes = self.job_writes.clone();
        let id = self.id.to_string();
        tokio::spawn(async move {
            retry::until_done("record the claim", &id, CLAIM_PATIENCE, || async {
                let _writing = writes.lock().await;
                if dead.is_cancelled() {
                    return Attempt::Finished;
                }
                match shared.client.register_job(&job).await {
                    Ok(()) => Attempt::Finished,
                    Err(error) => Attempt::Failed(error),
                }
            })
            .await;
        });
    }

    async fn lost(&self) -> LostReason {
        let mut phase = self.phase.clone();
        let ended = phase
            .wait_for(|phase| matches!(phase, Phase::Ended(_)))
            .await
            .map(|phase| phase.clone());
        match ended {
            Ok(Phase::Ended(reason)) => reason,
            // Forgotten: the core destroyed the runner itself.
            _ => std::future::pending().await,
        }
    }
}

impl Drop for NomadRunner {
    fn drop(&mut self) {
        self.dead.cancel();
    }
}

/// Names the files of one execution (Go's fifo names use the Unix time in nanoseconds).
fn unique_suffix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("{nanos}_{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use poseidon_core::backend::ExitStatus;

    use super::*;

    #[test]
    fn collected_output_is_bounded() {
        let mut collected = Collected::default();
        collected.add(Output::Stdout(Bytes::from(vec![0; MAX_COLLECTED])));
        collected.add(Output::Stdout(Bytes::from_static(b"more")));
        collected.add(Output::Stderr(Bytes::from_static(b"err")));
        assert_eq!(
            (collected.stdout.len(), collected.stderr.as_slice()),
            (MAX_COLLECTED, &b"err"[..])
        );
        assert_eq!(ExitStatus::Exited(2).code(), 2);
    }

    #[tokio::test]
    async fn downloads_stream_exactly_the_announced_size() {
        let (sender, receiver) = mpsc::channel(4);
        sender.send(Output::Stdout(Bytes::from_static(b"llo wor"))).await.unwrap();
        sender.send(Output::Stderr(Bytes::from_static(b"noise"))).await.unwrap();
        sender.send(Output::Stdout(Bytes::from_static(b"ld and more"))).await.unwrap();
        drop(sender);
        let body = body_stream(Bytes::from_static(b"he"), receiver, 11, CancellationToken::new());
        let chunks: Vec<_> = body.collect().await;
        let bytes: Vec<u8> = chunks.into_iter().flat_map(|chunk| chunk.unwrap()).collect();
        assert_eq!(bytes, b"hello world");

        let (sender, receiver) = mpsc::channel(1);
        drop(sender);
        let mut short =
            body_stream(Bytes::from_static(b"he"), receiver, 5, CancellationToken::new());
        assert!(short.next().await.unwrap().is_ok());
        assert!(short.next().await.unwrap().is_err());
    }
}
