//! Executions as seen by the service: the request sent to the init, the stdio it keeps, and
//! the [`Process`] handle.
//!
//! When the main process exits, whatever else is left in the execution's cgroup (background
//! jobs, daemons, `setsid` children) is killed before [`Process::wait`] returns, so the
//! output descriptors reach end-of-file and nothing outlives its execution.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use crate::cgroup::{ExecCgroup, RunnerCgroup};
use crate::image::Image;
use crate::protocol::{ExecRequest, MAX_MESSAGE};
use crate::runtime::Limits;
use crate::{Error, sys};

/// The working directory of executions (and the unprivileged user's home).
pub const WORKDIR: &str = "/workspace";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const DEFAULT_NOFILE: u64 = 1024;
/// How long the rest of an execution may take to die after its main process exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct ProcessSpec {
    /// Run as `bash -c <command>`.
    pub command: String,
    /// Added to (and overriding) the default environment.
    pub env: Vec<(String, String)>,
    /// Root of the sandbox instead of its `user`.
    pub privileged: bool,
    /// A PTY for stdin and stdout (echo, `\r\n`, Ctrl-C).
    pub tty: bool,
    /// With `tty`: stderr on its own pipe instead of the PTY.
    pub separate_stderr: bool,
    /// Default: the image's working directory ([`WORKDIR`] unless the image sets one).
    pub cwd: Option<String>,
}

/// How an execution ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, when it exited normally.
    pub code: Option<i32>,
    /// Signal number, when a signal ended it.
    pub signal: Option<i32>,
    /// Killed by the kernel because the runner ran out of memory.
    pub oom_killed: bool,
}

impl ExitInfo {
    /// The shell convention: the exit code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        self.code.or(self.signal.map(|s| 128 + s)).unwrap_or(-1)
    }
}

impl ExitInfo {
    fn from_raw(raw: RawExit, oom_killed: bool) -> ExitInfo {
        ExitInfo { code: raw.code, signal: raw.signal, oom_killed }
    }
}

/// Exit status as reported by the init.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// Builds the init's request: ids, a clean environment, the working directory.
pub(crate) fn request(
    id: u64,
    spec: &ProcessSpec,
    image: &Image,
    limits: &Limits,
) -> Result<ExecRequest, Error> {
    let (uid, gid) = if spec.privileged { (0, 0) } else { image.user_ids() };
    let cwd = spec.cwd.clone().unwrap_or_else(|| image.working_dir().to_owned());
    if !cwd.starts_with('/') {
        return Err(Error::InvalidSpec(format!("cwd {cwd:?} is not absolute")));
    }
    let user = if spec.privileged { "root" } else { "user" };
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), PATH.into()),
        ("HOME".into(), WORKDIR.into()),
        ("USER".into(), user.into()),
        ("LOGNAME".into(), user.into()),
        ("LANG".into(), "C.UTF-8".into()),
    ];
    if spec.tty {
        env.push(("TERM".into(), "xterm".into()));
    }
    for (key, value) in image.env() {
        env.retain(|(k, _)| k != key);
        env.push((key.clone(), value.clone()));
    }
    for (key, value) in &spec.env {
        validate_env(key, value)?;
        env.retain(|(k, _)| k != key);
        env.push((key.clone(), value.clone()));
    }
    let request = ExecRequest {
        id,
        command: spec.command.clone(),
        env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
        uid,
        gid,
        cwd,
        tty: spec.tty,
        nofile: limits.nofile.unwrap_or(DEFAULT_NOFILE),
    };
    if spec.command.contains('\0') {
        return Err(Error::InvalidSpec("command contains NUL".into()));
    }
    let size = request.command.len() + request.env.iter().map(String::len).sum::<usize>();
    if size > MAX_MESSAGE / 2 {
        return Err(Error::InvalidSpec(format!(
            "command and environment exceed {} bytes",
            MAX_MESSAGE / 2
        )));
    }
    Ok(request)
}

fn validate_env(key: &str, value: &str) -> Result<(), Error> {
    let key_ok = !key.is_empty() && !key.contains(['=', '\0']);
    if key_ok && !value.contains('\0') {
        Ok(())
    } else {
        Err(Error::InvalidSpec(format!("invalid environment variable {key:?}")))
    }
}

/// Both ends of an execution's stdio until the child's ends were sent to the init.
pub(crate) struct Stdio {
    tty: bool,
    parent_in: OwnedFd,
    parent_out: OwnedFd,
    parent_err: Option<OwnedFd>,
    child_in: OwnedFd,
    child_out: OwnedFd,
    child_err: Option<OwnedFd>,
}

impl Stdio {
    /// A PTY (plus an stderr pipe if asked) or three pipes.
    pub fn open(spec: &ProcessSpec) -> Result<Stdio, Error> {
        if spec.tty {
            let (master, slave) = open_pty()?;
            let (parent_err, child_err) = if spec.separate_stderr {
                let (r, w) = pipe()?;
                (Some(r), Some(w))
            } else {
                (None, None)
            };
            Ok(Stdio {
                tty: true,
                parent_out: master.try_clone().map_err(Error::Io)?,
                parent_in: master,
                parent_err,
                child_in: slave.try_clone().map_err(Error::Io)?,
                child_out: slave,
                child_err,
            })
        } else {
            let (child_in, parent_in) = pipe()?;
            let (parent_out, child_out) = pipe()?;
            let (parent_err, child_err) = pipe()?;
            Ok(Stdio {
                tty: false,
                parent_in,
                parent_out,
                parent_err: Some(parent_err),
                child_in,
                child_out,
                child_err: Some(child_err),
            })
        }
    }

    /// `[stdin, stdout, stderr, cgroup.procs]` for the init.
    pub fn child_fds<'a>(&'a self, procs: BorrowedFd<'a>) -> Vec<BorrowedFd<'a>> {
        let err = self.child_err.as_ref().unwrap_or(&self.child_out);
        vec![self.child_in.as_fd(), self.child_out.as_fd(), err.as_fd(), procs]
    }

    /// Closes the child's ends (the init has its own copies now) and wraps ours for tokio.
    pub fn into_parent(self) -> Result<ParentStdio, Error> {
        let pty = self.tty;
        Ok(ParentStdio {
            stdin: ProcessStdin::new(self.parent_in)?,
            stdout: ProcessOutput::new(self.parent_out, pty)?,
            stderr: self.parent_err.map(|fd| ProcessOutput::new(fd, false)).transpose()?,
        })
    }
}

pub(crate) struct ParentStdio {
    stdin: ProcessStdin,
    stdout: ProcessOutput,
    stderr: Option<ProcessOutput>,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), Error> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::Io(e.into()))
}

fn open_pty() -> Result<(OwnedFd, OwnedFd), Error> {
    let io = |e: nix::Error| Error::Io(e.into());
    let master =
        nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC).map_err(io)?;
    nix::pty::grantpt(&master).map_err(io)?;
    nix::pty::unlockpt(&master).map_err(io)?;
    let master = sys::pty_master_into_fd(master);
    let slave = sys::open_pty_peer(master.as_fd()).map_err(io)?;
    Ok((master, slave))
}

fn set_nonblocking(fd: &OwnedFd) -> Result<(), Error> {
    let io = |e: nix::Error| Error::Io(e.into());
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).map_err(io)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop).map_err(io)
}

/// An execution's stdin (PTY master or pipe). Shutting it down closes a pipe (end of input).
#[derive(Debug)]
pub struct ProcessStdin {
    fd: Option<AsyncFd<OwnedFd>>,
}

impl ProcessStdin {
    fn new(fd: OwnedFd) -> Result<ProcessStdin, Error> {
        set_nonblocking(&fd)?;
        Ok(ProcessStdin {
            fd: Some(sys::async_fd(fd, tokio::io::Interest::WRITABLE).map_err(Error::Io)?),
        })
    }
}

impl AsyncWrite for ProcessStdin {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let Some(fd) = &self.get_mut().fd else {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        };
        loop {
            let mut guard = ready!(fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| Ok(nix::unistd::write(fd.get_ref(), data)?)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().fd = None;
        Poll::Ready(Ok(()))
    }
}

/// An execution's stdout or stderr. On a PTY master, `EIO` (all slaves closed) is end-of-file.
#[derive(Debug)]
pub struct ProcessOutput {
    fd: AsyncFd<OwnedFd>,
    pty: bool,
}

impl ProcessOutput {
    fn new(fd: OwnedFd, pty: bool) -> Result<ProcessOutput, Error> {
        set_nonblocking(&fd)?;
        Ok(ProcessOutput {
            fd: sys::async_fd(fd, tokio::io::Interest::READABLE).map_err(Error::Io)?,
            pty,
        })
    }
}

impl AsyncRead for ProcessOutput {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| Ok(nix::unistd::read(fd.get_ref(), unfilled)?)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if this.pty && e.raw_os_error() == Some(libc::EIO) => {
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Removes an execution's cgroup (killing what is left) when the execution is dropped.
#[derive(Debug)]
pub(crate) struct CgroupGuard(Arc<ExecCgroup>);

impl CgroupGuard {
    pub fn new(cgroup: ExecCgroup) -> CgroupGuard {
        CgroupGuard(Arc::new(cgroup))
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.remove();
    }
}

/// Kills every process of one execution. Cheap to clone; usable after the execution ended.
#[derive(Clone, Debug)]
pub struct Killer(Arc<ExecCgroup>);

impl Killer {
    /// Kills the execution's cgroup (`cgroup.kill`, or freezer + SIGKILL on v1-only hosts).
    /// Returns once the signals are sent; [`Process::wait`] then observes the exit.
    pub fn kill(&self) {
        let _ = self.0.kill();
    }
}

/// A running execution.
///
/// Read the outputs concurrently with [`Process::wait`]: processes the main process left
/// behind may hold the outputs open until `wait` kills them.
#[derive(Debug)]
pub struct Process {
    pub stdin: Option<ProcessStdin>,
    pub stdout: Option<ProcessOutput>,
    pub stderr: Option<ProcessOutput>,
    cgroup: CgroupGuard,
    runner: RunnerCgroup,
    oom_before: u64,
    exited: Option<oneshot::Receiver<RawExit>>,
    result: Option<ExitInfo>,
}

impl Process {
    pub(crate) fn new(
        stdio: ParentStdio,
        cgroup: CgroupGuard,
        runner: RunnerCgroup,
        oom_before: u64,
        exited: oneshot::Receiver<RawExit>,
    ) -> Process {
        Process {
            stdin: Some(stdio.stdin),
            stdout: Some(stdio.stdout),
            stderr: stdio.stderr,
            cgroup,
            runner,
            oom_before,
            exited: Some(exited),
            result: None,
        }
    }

    /// A handle that kills every process of this execution.
    pub fn killer(&self) -> Killer {
        Killer(self.cgroup.0.clone())
    }

    /// Waits for the main process, then kills the rest of the execution's cgroup.
    pub async fn wait(&mut self) -> Result<ExitInfo, Error> {
        if let Some(info) = self.result {
            return Ok(info);
        }
        let exited = self.exited.as_mut().ok_or(Error::InitDied)?;
        let raw = exited.await;
        self.exited = None;
        let raw = raw.map_err(|_| Error::InitDied)?;
        let oom_killed =
            raw.signal == Some(libc::SIGKILL) && self.runner.oom_kills()? > self.oom_before;
        self.drain().await?;
        let info = ExitInfo::from_raw(raw, oom_killed);
        self.result = Some(info);
        Ok(info)
    }

    /// Kills what is left in the cgroup and waits (bounded) until it is empty.
    async fn drain(&self) -> Result<(), Error> {
        let cgroup = &self.cgroup.0;
        cgroup.kill()?;
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        while !cgroup.is_empty() {
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Drain);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(cgroup.remove()?)
    }
}
