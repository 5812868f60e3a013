//! The forked child of the runner init that becomes an execution: a flat sequence of steps
//! from the init's state to `execve("/bin/bash", ["bash", "-c", command])`.
//!
//! Order matters: the cgroup is joined before anything of the learner runs; fds are closed
//! as late as possible (after the cgroup fd was used); privileges are dropped after the last
//! privileged step; seccomp comes last before `execve`, after `no_new_privs`.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::signal::SigSet;
use nix::sys::stat::{Mode, umask};
use nix::unistd::{Gid, Uid, chdir, execve, setsid};

use crate::init::{cstring, lowered_nofile, set_nofile};
use crate::protocol::ExecRequest;
use crate::seccomp::Policy;
use crate::sys;

/// A failed step of starting an execution (reported to the service as text).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("reset signals: {0}")]
    Signals(#[source] Errno),
    #[error("start a session: {0}")]
    Session(#[source] Errno),
    #[error("attach stdio: {0}")]
    Stdio(#[source] Errno),
    #[error("set the controlling terminal: {0}")]
    ControllingTty(#[source] Errno),
    #[error("join the execution cgroup: {0}")]
    JoinCgroup(#[source] Errno),
    #[error("close inherited descriptors: {0}")]
    CloseFds(#[source] Errno),
    #[error("set resource limits: {0}")]
    Limits(#[source] Errno),
    #[error("switch to uid {uid}/gid {gid}: {source}")]
    Credentials { uid: u32, gid: u32, source: Errno },
    #[error("set no_new_privs: {0}")]
    NoNewPrivs(#[source] Errno),
    #[error("raise the OOM score: {0}")]
    OomScore(#[source] std::io::Error),
    #[error("limit the capabilities: {0}")]
    Capabilities(#[source] std::io::Error),
    #[error("install the seccomp filter: {0}")]
    Seccomp(#[source] seccompiler::Error),
    #[error("change to directory {path}: {source}")]
    Cwd { path: String, source: Errno },
    #[error("invalid argument or environment: {0}")]
    Argument(#[source] Errno),
    #[error("execute /bin/bash: {0}")]
    Exec(#[source] Errno),
}

/// Runs the steps; returns only on failure. `report` (close-on-exec) stays open so the error
/// can be reported.
pub fn run(
    request: &ExecRequest,
    fds: [OwnedFd; 4],
    report: BorrowedFd<'_>,
    policy: &Policy,
) -> ExecError {
    match steps(request, fds, report, policy) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

enum Never {}

fn steps(
    request: &ExecRequest,
    fds: [OwnedFd; 4],
    report: BorrowedFd<'_>,
    policy: &Policy,
) -> Result<Never, ExecError> {
    let [stdin, stdout, stderr, cgroup_procs] = fds;
    let argv = [cstring("bash"), cstring("-c"), cstring(&request.command)]
        .into_iter()
        .collect::<Result<Vec<CString>, _>>()
        .map_err(ExecError::Argument)?;
    let env = request
        .env
        .iter()
        .map(|v| cstring(v))
        .collect::<Result<Vec<CString>, _>>()
        .map_err(ExecError::Argument)?;
    reset_signals()?;
    setsid().map_err(ExecError::Session)?;
    attach_stdio(&stdin, &stdout, &stderr)?;
    if request.tty {
        sys::set_controlling_tty(std::io::stdin().as_fd()).map_err(ExecError::ControllingTty)?;
    }
    join_cgroup(&cgroup_procs)?;
    prefer_for_oom_kill()?;
    drop((stdin, stdout, stderr, cgroup_procs));
    close_other_fds(report)?;
    let nofile = lowered_nofile(request.nofile).map_err(ExecError::Limits)?;
    set_nofile(nofile).map_err(ExecError::Limits)?;
    umask(Mode::from_bits_truncate(0o022));
    drop_privileges(request.uid, request.gid)?;
    chdir(request.cwd.as_str())
        .map_err(|source| ExecError::Cwd { path: request.cwd.clone(), source })?;
    nix::sys::prctl::set_no_new_privs().map_err(ExecError::NoNewPrivs)?;
    policy.install().map_err(ExecError::Seccomp)?;
    match execve(c"/bin/bash", &argv, &env) {
        Err(e) => Err(ExecError::Exec(e)),
        Ok(never) => match never {},
    }
}

fn reset_signals() -> Result<(), ExecError> {
    SigSet::empty().thread_set_mask().map_err(ExecError::Signals)?;
    sys::reset_signal_dispositions();
    Ok(())
}

fn attach_stdio(stdin: &OwnedFd, stdout: &OwnedFd, stderr: &OwnedFd) -> Result<(), ExecError> {
    nix::unistd::dup2_stdin(stdin).map_err(ExecError::Stdio)?;
    nix::unistd::dup2_stdout(stdout).map_err(ExecError::Stdio)?;
    nix::unistd::dup2_stderr(stderr).map_err(ExecError::Stdio)
}

/// Writing `0` moves the writer. The kernel checks the permission against the credentials of
/// whoever opened the file: the service (host root).
fn join_cgroup(procs: &OwnedFd) -> Result<(), ExecError> {
    nix::unistd::write(procs, b"0").map(drop).map_err(ExecError::JoinCgroup)
}

/// Makes the execution the out-of-memory killer's choice before the runner's init (which
/// stays at 0): a memory hog should lose its execution, not the whole runner. Lowering the
/// value again needs `CAP_SYS_RESOURCE`, which nothing in a runner has, but it may go back
/// to 0, where the OOM killer still weighs memory use.
fn prefer_for_oom_kill() -> Result<(), ExecError> {
    // Inherited from the init, non-dumpability makes our /proc files the host root's; the
    // `execve` ahead makes the process dumpable again anyway.
    nix::sys::prctl::set_dumpable(true).map_err(|e| ExecError::OomScore(e.into()))?;
    std::fs::write("/proc/self/oom_score_adj", "500").map_err(ExecError::OomScore)
}

/// Closes everything above stderr except the error report pipe.
fn close_other_fds(report: BorrowedFd<'_>) -> Result<(), ExecError> {
    let keep = report.as_raw_fd() as u32;
    if keep > 3 {
        sys::close_range(3, keep - 1).map_err(ExecError::CloseFds)?;
    }
    sys::close_range(keep + 1, u32::MAX).map_err(ExecError::CloseFds)
}

/// What a privileged execution keeps: Docker's default set without `NET_RAW` and `MKNOD`.
/// `SYS_ADMIN`, `NET_ADMIN` and the rest would open kernel interfaces (nf_tables, mounts,
/// BPF) that learners never need and that are the usual way out of a user namespace.
const PRIVILEGED_CAPABILITIES: [u32; 12] = [
    0,  // CHOWN
    1,  // DAC_OVERRIDE
    3,  // FOWNER
    4,  // FSETID
    5,  // KILL
    6,  // SETGID
    7,  // SETUID
    8,  // SETPCAP
    10, // NET_BIND_SERVICE
    18, // SYS_CHROOT
    29, // AUDIT_WRITE
    31, // SETFCAP
];

/// Every other capability leaves the bounding set, so root's `execve` cannot regain it.
fn limit_root_capabilities() -> Result<(), std::io::Error> {
    for capability in (0..64).filter(|c| !PRIVILEGED_CAPABILITIES.contains(c)) {
        match sys::drop_bounding_capability(capability) {
            // Numbers above the kernel's last capability do not exist.
            Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
    Ok(())
}

/// Supplementary groups, gid, uid. Leaving uid 0 clears all capabilities; root of the user
/// namespace keeps only [`PRIVILEGED_CAPABILITIES`] (and seccomp bounds what they reach).
fn drop_privileges(uid: u32, gid: u32) -> Result<(), ExecError> {
    let error = |source| ExecError::Credentials { uid, gid, source };
    if uid == 0 {
        limit_root_capabilities().map_err(ExecError::Capabilities)?;
    }
    let (u, g) = (Uid::from_raw(uid), Gid::from_raw(gid));
    nix::unistd::setgroups(&[g]).map_err(error)?;
    nix::unistd::setresgid(g, g, g).map_err(error)?;
    nix::unistd::setresuid(u, u, u).map_err(error)
}
