//! Executions as clients see them: stored one-shot requests, and running executions that turn
//! the backend's streams into Poseidon's events with exactly one terminal event.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::{BackendError, ExecRequest, ExecutionHandle, ExitStatus, LostReason, Output};
use crate::ids::RunnerId;

/// The error text CodeOcean maps to "out of memory".
pub const ERROR_OOM: &str = "the allocation was OOM Killed";
/// The error text for a runner that was deleted or stopped as a normal part of its life.
pub const ERROR_STOPPED: &str = "the allocation stopped as expected";
/// The error text for every other failure.
pub const ERROR_GENERIC: &str = "Error executing the request";

/// How long a stopped execution may take to end before its runner is destroyed.
const STOP_GRACE_PERIOD: Duration = Duration::from_secs(3);

/// A command stored by `POST …/execute` until the client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionRequest {
    pub command: String,
    pub privileged: bool,
    /// `None`: no limit. Zero: already expired (Go's negative `timeLimit`).
    pub time_limit: Option<Duration>,
    pub environment: Vec<(String, String)>,
}

impl ExecutionRequest {
    /// The backend's request: always a terminal, and `CODEOCEAN=true` whatever the client sent.
    pub(crate) fn to_exec_request(&self, separate_stderr: bool) -> ExecRequest {
        let mut env: Vec<(String, String)> =
            self.environment.iter().filter(|(name, _)| name != "CODEOCEAN").cloned().collect();
        env.push(("CODEOCEAN".into(), "true".into()));
        ExecRequest {
            command: self.command.clone(),
            env,
            privileged: self.privileged,
            tty: true,
            separate_stderr,
        }
    }

    /// When the time limit ends if the execution starts at `start`; `None` for no limit (also
    /// for a limit too large to represent).
    pub(crate) fn deadline(&self, start: Instant) -> Option<Instant> {
        self.time_limit.and_then(|limit| start.checked_add(limit))
    }
}

/// What a client sees of a running execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecutionEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    /// Terminal: the command ended with this code.
    Exit(u8),
    /// Terminal: the time limit or the runner's inactivity timeout was reached.
    Timeout,
    /// Terminal: one of `ERROR_OOM`, `ERROR_STOPPED`, `ERROR_GENERIC`.
    Error(String),
}

impl ExecutionEvent {
    /// Whether this is the last event of an execution (`Exit`, `Timeout` or `Error`).
    pub fn is_terminal(&self) -> bool {
        !matches!(self, ExecutionEvent::Stdout(_) | ExecutionEvent::Stderr(_))
    }
}

/// Why a runner ended while executions may still run on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EndReason {
    InactivityTimeout,
    Destroyed,
    EnvironmentChanged,
    Lost(LostReason),
    ExecutionDidNotStop,
    Shutdown,
}

impl EndReason {
    fn event(&self) -> ExecutionEvent {
        match self {
            EndReason::InactivityTimeout => ExecutionEvent::Timeout,
            EndReason::Destroyed | EndReason::Shutdown | EndReason::Lost(LostReason::Stopped) => {
                ExecutionEvent::Error(ERROR_STOPPED.into())
            }
            EndReason::Lost(LostReason::OomKilled) => ExecutionEvent::Error(ERROR_OOM.into()),
            EndReason::EnvironmentChanged
            | EndReason::ExecutionDidNotStop
            | EndReason::Lost(LostReason::Failed(_)) => ExecutionEvent::Error(ERROR_GENERIC.into()),
        }
    }
}

/// Ends every execution of one runner at once, with the reason that decides their last event.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunnerEnd {
    token: CancellationToken,
    reason: Arc<OnceLock<EndReason>>,
}

impl RunnerEnd {
    /// The first reason wins; later calls change nothing.
    pub(crate) fn end(&self, reason: EndReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    fn reason(&self) -> EndReason {
        self.reason.get().cloned().unwrap_or(EndReason::Destroyed)
    }
}

/// Called when an execution does not end after it was stopped, so that its runner is destroyed.
pub(crate) type StuckHandler = Box<dyn FnOnce() + Send>;

/// A running execution. Read it with [`RunningExecution::next_event`]; dropping it stops it.
///
/// Events are computed from the backend's bounded channels while the consumer reads, so a slow
/// consumer slows the process down instead of filling a buffer.
pub struct RunningExecution {
    /// Raw input for the execution's terminal.
    pub stdin: mpsc::Sender<Bytes>,
    runner: RunnerId,
    handle: Option<ExecutionHandle>,
    runner_end: RunnerEnd,
    deadline: Option<Instant>,
    output_ended: bool,
    on_stuck: Option<StuckHandler>,
}

/// One step of an execution, before it becomes an event.
enum Step {
    Output(Output),
    OutputEnded,
    TimeLimit,
    Terminal(ExecutionEvent),
}

impl RunningExecution {
    pub(crate) fn new(
        runner: RunnerId,
        handle: ExecutionHandle,
        runner_end: RunnerEnd,
        deadline: Option<Instant>,
        on_stuck: StuckHandler,
    ) -> Self {
        Self {
            stdin: handle.stdin.clone(),
            runner,
            handle: Some(handle),
            runner_end,
            deadline,
            output_ended: false,
            on_stuck: Some(on_stuck),
        }
    }

    /// The next output chunk or the terminal event; `None` once the terminal event was returned.
    ///
    /// Cancel-safe: it may be a branch of a `select!`; a dropped call loses no event.
    pub async fn next_event(&mut self) -> Option<ExecutionEvent> {
        let handle = self.handle.as_mut()?;
        loop {
            // Biased: the runner's end and the time limit win over output that keeps flowing.
            let step = tokio::select! {
                biased;
                () = self.runner_end.token.cancelled() => Step::Terminal(self.runner_end.reason().event()),
                () = sleep_until_deadline(self.deadline) => Step::TimeLimit,
                output = handle.output.recv(), if !self.output_ended => match output {
                    Some(output) => Step::Output(output),
                    None => Step::OutputEnded,
                },
                exit = &mut handle.exit, if self.output_ended => Step::Terminal(exit_event(&self.runner, exit)),
            };
            match step {
                Step::Output(Output::Stdout(bytes)) => return Some(ExecutionEvent::Stdout(bytes)),
                Step::Output(Output::Stderr(bytes)) => return Some(ExecutionEvent::Stderr(bytes)),
                Step::OutputEnded => self.output_ended = true,
                Step::TimeLimit => {
                    self.stop_after_time_limit();
                    return Some(ExecutionEvent::Timeout);
                }
                Step::Terminal(event) => {
                    self.handle = None;
                    return Some(event);
                }
            }
        }
    }

    /// Stops the execution after its `Timeout` was reported; the runner stays usable unless the
    /// execution refuses to end.
    fn stop_after_time_limit(&mut self) {
        let Some(mut handle) = self.handle.take() else { return };
        let on_stuck = self.on_stuck.take();
        let runner = self.runner.clone();
        handle.stop();
        tokio::spawn(async move {
            let ended = async {
                while handle.output.recv().await.is_some() {}
                let _ = (&mut handle.exit).await;
            };
            if tokio::time::timeout(STOP_GRACE_PERIOD, ended).await.is_err() {
                tracing::warn!(%runner, "execution did not stop after its time limit; destroying the runner");
                if let Some(on_stuck) = on_stuck {
                    on_stuck();
                }
            }
        });
    }
}

impl fmt::Debug for RunningExecution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunningExecution")
            .field("runner", &self.runner)
            .field("finished", &self.handle.is_none())
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

async fn sleep_until_deadline(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Maps how the backend says the command ended to the client's terminal event.
fn exit_event(
    runner: &RunnerId,
    exit: Result<Result<ExitStatus, BackendError>, tokio::sync::oneshot::error::RecvError>,
) -> ExecutionEvent {
    match exit {
        Ok(Ok(ExitStatus::OomKilled)) => ExecutionEvent::Error(ERROR_OOM.into()),
        Ok(Ok(status)) => ExecutionEvent::Exit(status.code()),
        Ok(Err(error)) => {
            tracing::warn!(%runner, %error, "execution failed");
            ExecutionEvent::Error(ERROR_GENERIC.into())
        }
        Err(_) => {
            tracing::warn!(%runner, "the backend dropped the execution's exit status");
            ExecutionEvent::Error(ERROR_GENERIC.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codeocean_is_forced_to_true() {
        let request = ExecutionRequest {
            command: "env".into(),
            privileged: true,
            time_limit: None,
            environment: vec![("CODEOCEAN".into(), "false".into()), ("A".into(), "b".into())],
        };
        let exec = request.to_exec_request(true);
        assert_eq!(exec.env, vec![("A".into(), "b".into()), ("CODEOCEAN".into(), "true".into())]);
        assert!(exec.tty && exec.separate_stderr && exec.privileged);
        assert_eq!(exec.command, "env");
    }

    #[test]
    fn a_zero_limit_has_expired_and_a_huge_one_means_none() {
        let start = Instant::now();
        let mut request = ExecutionRequest {
            command: String::new(),
            privileged: false,
            time_limit: None,
            environment: Vec::new(),
        };
        assert_eq!(request.deadline(start), None);
        request.time_limit = Some(Duration::ZERO);
        assert_eq!(request.deadline(start), Some(start));
        request.time_limit = Some(Duration::MAX);
        assert_eq!(request.deadline(start), None);
        request.time_limit = Some(Duration::from_secs(2));
        assert_eq!(request.deadline(start), Some(start + Duration::from_secs(2)));
    }

    #[test]
    fn end_reasons_map_to_poseidon_messages() {
        let error = |text: &str| ExecutionEvent::Error(text.into());
        assert_eq!(EndReason::InactivityTimeout.event(), ExecutionEvent::Timeout);
        assert_eq!(EndReason::Destroyed.event(), error(ERROR_STOPPED));
        assert_eq!(EndReason::EnvironmentChanged.event(), error(ERROR_GENERIC));
        assert_eq!(EndReason::Lost(LostReason::OomKilled).event(), error(ERROR_OOM));
        assert_eq!(EndReason::Lost(LostReason::Stopped).event(), error(ERROR_STOPPED));
        assert_eq!(EndReason::Lost(LostReason::Failed("x".into())).event(), error(ERROR_GENERIC));
    }

    #[test]
    fn the_first_end_reason_wins() {
        let end = RunnerEnd::default();
        end.end(EndReason::InactivityTimeout);
        end.end(EndReason::Destroyed);
        assert_eq!(end.reason(), EndReason::InactivityTimeout);
        assert!(end.token.is_cancelled());
    }
}
