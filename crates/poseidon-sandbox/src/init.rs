//! The runner init: started by the service for each runner, it enters the runner's
//! namespaces, builds its root and stays as PID 1, forking every execution.
//!
//! Process model (chosen because it needs no `pre_exec` work in the multi-threaded service
//! and no raw `clone`; measured on the 2-vCPU project machine: runner creation 3.9–5 ms
//! median, first output byte of an execution 2.6–3.6 ms, about 0.6 MiB of host memory per
//! idle runner, see `examples/sandbox_bench.rs`):
//!
//! 1. The service spawns this program with the control socket as stdin and puts it into the
//!    runner's cgroups before sending anything.
//! 2. **Intermediate**: `unshare`s user, mount, IPC, UTS, network and PID namespaces, asks
//!    the service to write `uid_map`/`gid_map` (only a process outside the namespace may),
//!    becomes root of the user namespace and forks once: only children enter a new PID
//!    namespace. It sends the child's pid together with a pidfd (race-free: the child cannot
//!    be reaped yet) and exits. The host's init (or a subreaper) later reaps the runner init.
//! 3. **PID 1** builds the root as a flat sequence of steps (see [`build_root`]), compiles the
//!    seccomp policy, reports `Ready` and serves the socket in a single-threaded `poll` loop
//!    that also reaps every child through a signalfd. When the socket closes (the service is
//!    gone or destroys the runner) it exits, and the kernel kills the whole PID namespace.

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, symlink};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, unshare};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
use nix::sys::stat::{Mode, umask};
use nix::sys::statvfs::{FsFlags, statvfs};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, chdir, pivot_root};

use crate::protocol::{self, ExecRequest, FromInit, ProtocolError, SetupConfig, ToInit};
use crate::seccomp::Policy;
use crate::sys;

/// Most bytes of an execution's set-up error that are read back from the child.
const MAX_SPAWN_ERROR: u64 = 4096;

/// A failed step of the runner set-up, naming the step and the path.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SetupError {
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("unshare namespaces: {0}")]
    Unshare(#[source] Errno),
    #[error("become root of the user namespace: {0}")]
    BecomeRoot(#[source] Errno),
    #[error("fork PID 1: {0}")]
    Fork(#[source] Errno),
    #[error("open a pidfd: {0}")]
    Pidfd(#[source] Errno),
    #[error("make mounts private: {0}")]
    MakePrivate(#[source] Errno),
    #[error("mount {what} at {path}: {source}")]
    Mount { what: &'static str, path: PathBuf, source: Errno },
    #[error("create {path}: {source}")]
    Create { path: PathBuf, source: std::io::Error },
    #[error("pivot_root into {path}: {source}")]
    PivotRoot { path: PathBuf, source: Errno },
    #[error("detach the old root: {0}")]
    DetachOldRoot(#[source] Errno),
    #[error("bring up the loopback interface: {0}")]
    Loopback(#[source] Errno),
    #[error("set the hostname: {0}")]
    Hostname(#[source] Errno),
    #[error("prepare signal handling: {0}")]
    Signals(#[source] Errno),
    #[error("{0}")]
    Seccomp(#[from] crate::seccomp::PolicyError),
}

/// Entry point of the init program. Never returns.
pub fn main(_args: Vec<OsString>) -> ! {
    // Start from a clean slate: nothing but the control socket (stdin) and /dev/null
    // (stdout, stderr) is inherited on purpose.
    let _ = sys::close_range(3, u32::MAX);
    let socket = std::io::stdin();
    let socket = socket.as_fd();
    if let Err(e) = intermediate(socket) {
        let _ = protocol::send(socket, &FromInit::SetupFailed { error: e.to_string() }, &[]);
    }
    sys::exit_immediately(1)
}

/// Steps 2 and 3 of the module doc; returns only on error.
fn intermediate(socket: BorrowedFd<'_>) -> Result<(), SetupError> {
    let setup = wait_for_setup(socket)?;
    become_owner(setup.owner_id)?;
    // Non-dumpable (after the id change, which resets it): processes of the runner (even its
    // root) may not ptrace PID 1.
    nix::sys::prctl::set_dumpable(false).map_err(SetupError::BecomeRoot)?;
    unshare_namespaces()?;
    request_id_mapping(socket)?;
    become_namespace_root()?;
    // The child waits for this pipe to close, so that `Forked` precedes its own messages.
    let (gate_read, gate_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(SetupError::Fork)?;
    match sys::fork_single_threaded().map_err(SetupError::Fork)? {
        ForkResult::Parent { child } => {
            drop(gate_read);
            let pidfd = sys::pidfd_open(child).map_err(SetupError::Pidfd)?;
            protocol::send(socket, &FromInit::Forked { pid: child.as_raw() }, &[pidfd.as_fd()])?;
            drop(gate_write);
            sys::exit_immediately(0)
        }
        ForkResult::Child => {
            drop(gate_write);
            let mut byte = [0u8; 1];
            let _ = fs::File::from(gate_read).read(&mut byte);
            let result = pid1(socket, &setup);
            if let Err(e) = result {
                let _ =
                    protocol::send(socket, &FromInit::SetupFailed { error: e.to_string() }, &[]);
            }
            sys::exit_immediately(1)
        }
    }
}

fn wait_for_setup(socket: BorrowedFd<'_>) -> Result<SetupConfig, SetupError> {
    match protocol::recv(socket)? {
        (ToInit::Setup(setup), fds) if fds.is_empty() => Ok(setup),
        (other, _) => Err(ProtocolError::Unexpected(format!("{other:?}")).into()),
    }
}

fn unshare_namespaces() -> Result<(), SetupError> {
    unshare(
        CloneFlags::CLONE_NEWUSER
            | CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWPID,
    )
    .map_err(SetupError::Unshare)
}

fn request_id_mapping(socket: BorrowedFd<'_>) -> Result<(), SetupError> {
    protocol::send(socket, &FromInit::MapIds, &[])?;
    match protocol::recv(socket)? {
        (ToInit::IdsMapped, fds) if fds.is_empty() => Ok(()),
        (other, _) => Err(ProtocolError::Unexpected(format!("{other:?}")).into()),
    }
}

/// Leaves host root before creating the user namespace, so that the namespace's owner (whose
/// per-user limits its processes are charged to) is this runner's own unprivileged host id.
fn become_owner(owner: u32) -> Result<(), SetupError> {
    let (uid, gid) = (Uid::from_raw(owner), Gid::from_raw(owner));
    nix::unistd::setgroups(&[]).map_err(SetupError::BecomeRoot)?;
    nix::unistd::setresgid(gid, gid, gid).map_err(SetupError::BecomeRoot)?;
    nix::unistd::setresuid(uid, uid, uid).map_err(SetupError::BecomeRoot)
}

/// Our host ids (the owner id) are not mapped in the new user namespace; switch to its root,
/// which keeps the namespace's full capability set.
fn become_namespace_root() -> Result<(), SetupError> {
    let root = (Uid::from_raw(0), Gid::from_raw(0));
    nix::unistd::setgroups(&[]).map_err(SetupError::BecomeRoot)?;
    nix::unistd::setresgid(root.1, root.1, root.1).map_err(SetupError::BecomeRoot)?;
    nix::unistd::setresuid(root.0, root.0, root.0).map_err(SetupError::BecomeRoot)
}

/// PID 1: build the root, then serve. Returns only on a set-up error.
fn pid1(socket: BorrowedFd<'_>, setup: &SetupConfig) -> Result<(), SetupError> {
    umask(Mode::empty());
    build_root(setup)?;
    let policy = Policy::compile()?;
    let signals = block_sigchld()?;
    protocol::send(socket, &FromInit::Ready, &[])?;
    sys::release_free_heap();
    let mut init = Init { socket, signals, policy, running: HashMap::new() };
    init.serve()
}

/// The root, step by step. Every mount happens in the runner's own mount namespace.
fn build_root(setup: &SetupConfig) -> Result<(), SetupError> {
    let scratch = &setup.scratch_dir;
    let new_root = scratch.join("root");
    make_mounts_private()?;
    mount_scratch(scratch, setup.disk_bytes)?;
    prepare_upper_layer(scratch)?;
    if let Some(text) = &setup.resolv_conf {
        write_resolv_conf(scratch, text)?;
    }
    mount_overlay(&setup.image_root, scratch, &new_root)?;
    if setup.bind_host_usr {
        bind_host_usr(&new_root)?;
        // /usr/local holds the host's own tools, not the image's.
        mask_usr_local(scratch, &new_root)?;
    }
    // proc before pivot_root: mounting procfs requires a fully visible procfs in the mount
    // namespace, which the old root still provides.
    mount_proc(&new_root)?;
    mount_dev(scratch, &new_root)?;
    enter_new_root(&new_root)?;
    bring_loopback_up()?;
    nix::unistd::sethostname(&setup.hostname).map_err(SetupError::Hostname)
}

fn make_mounts_private() -> Result<(), SetupError> {
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(SetupError::MakePrivate)
}

fn mount_at(
    what: &'static str,
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), SetupError> {
    mount(source, target, fstype, flags, data).map_err(|source| SetupError::Mount {
        what,
        path: target.to_owned(),
        source,
    })
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);

/// The size-limited tmpfs that holds the writable layer (and with it /workspace and /tmp).
fn mount_scratch(scratch: &Path, disk_bytes: u64) -> Result<(), SetupError> {
    mount_at(
        "scratch tmpfs",
        Some(Path::new("tmpfs")),
        scratch,
        Some("tmpfs"),
        NOSUID_NODEV,
        Some(&format!("size={disk_bytes},mode=0755")),
    )
}

fn create_dir(path: &Path, mode: u32) -> Result<(), SetupError> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(|source| SetupError::Create { path: path.to_owned(), source })
}

/// Mount points and the shared directories are made in the upper layer before the overlay
/// is mounted: their attributes then come from the upper layer (owned by the runner's root),
/// whatever the image has at those paths.
fn prepare_upper_layer(scratch: &Path) -> Result<(), SetupError> {
    let upper = scratch.join("upper");
    create_dir(&upper, 0o755)?;
    create_dir(&scratch.join("work"), 0o755)?;
    create_dir(&scratch.join("root"), 0o755)?;
    create_dir(&scratch.join("dev"), 0o755)?;
    create_dir(&scratch.join("empty"), 0o755)?;
    for (dir, mode) in
        [("workspace", 0o1777), ("tmp", 0o1777), ("proc", 0o555), ("dev", 0o755), ("usr", 0o755)]
    {
        create_dir(&upper.join(dir), mode)?;
    }
    Ok(())
}

fn mount_overlay(image: &Path, scratch: &Path, new_root: &Path) -> Result<(), SetupError> {
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        image.display(),
        scratch.join("upper").display(),
        scratch.join("work").display()
    );
    mount_at(
        "overlay",
        Some(Path::new("overlay")),
        new_root,
        Some("overlay"),
        NOSUID_NODEV,
        Some(&options),
    )
}

/// Binds the host's /usr read-only. The remount keeps the flags the host mount has (a user
/// namespace may not clear locked flags).
fn bind_host_usr(new_root: &Path) -> Result<(), SetupError> {
    let target = new_root.join("usr");
    mount_at(
        "host /usr",
        Some(Path::new("/usr")),
        &target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    let locked = statvfs("/usr").map(|s| locked_flags(s.flags())).map_err(|source| {
        SetupError::Mount { what: "host /usr (statvfs)", path: target.clone(), source }
    })?;
    mount_at(
        "host /usr read-only",
        None,
        &target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | NOSUID_NODEV | locked,
        None,
    )
}

fn locked_flags(flags: FsFlags) -> MsFlags {
    let mut ms = MsFlags::empty();
    if flags.contains(FsFlags::ST_NOEXEC) {
        ms |= MsFlags::MS_NOEXEC;
    }
    if flags.contains(FsFlags::ST_NOATIME) {
        ms |= MsFlags::MS_NOATIME;
    }
    if flags.contains(FsFlags::ST_NODIRATIME) {
        ms |= MsFlags::MS_NODIRATIME;
    }
    ms
}

/// Hides the host's /usr/local behind an empty, read-only directory of the scratch tmpfs
/// (a bind mount costs no superblock of its own).
fn mask_usr_local(scratch: &Path, new_root: &Path) -> Result<(), SetupError> {
    let target = new_root.join("usr/local");
    mount_at(
        "empty /usr/local",
        Some(&scratch.join("empty")),
        &target,
        None,
        MsFlags::MS_BIND,
        None,
    )?;
    mount_at(
        "empty /usr/local read-only",
        None,
        &target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | NOSUID_NODEV,
        None,
    )
}

fn mount_proc(new_root: &Path) -> Result<(), SetupError> {
    mount_at(
        "proc",
        Some(Path::new("proc")),
        &new_root.join("proc"),
        Some("proc"),
        NOSUID_NODEV | MsFlags::MS_NOEXEC,
        None,
    )
}

/// Host devices bound into a fresh /dev (device nodes cannot be created in a user namespace).
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// A minimal /dev: a directory of the scratch tmpfs (no superblock of its own) with a few
/// bound host devices, the runner's own devpts, `shm` and the usual links.
fn mount_dev(scratch: &Path, new_root: &Path) -> Result<(), SetupError> {
    let dev = new_root.join("dev");
    mount_at("dev", Some(&scratch.join("dev")), &dev, None, MsFlags::MS_BIND, None)?;
    for name in DEVICES {
        let node = dev.join(name);
        fs::File::create(&node)
            .map_err(|source| SetupError::Create { path: node.clone(), source })?;
        let host = Path::new("/dev").join(name);
        mount_at("device", Some(&host), &node, None, MsFlags::MS_BIND, None)?;
    }
    create_dir(&dev.join("pts"), 0o755)?;
    mount_at(
        "devpts",
        Some(Path::new("devpts")),
        &dev.join("pts"),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        // All devpts instances share the kernel's PTY limit: one runner must not take them all.
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5,max=64"),
    )?;
    // /dev/shm shares the writable layer's size limit.
    create_dir(&dev.join("shm"), 0o1777)?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(target, dev.join(link))
            .map_err(|source| SetupError::Create { path: dev.join(link), source })?;
    }
    Ok(())
}

/// `pivot_root(".", ".")` stacks the old root on the new one; detaching it leaves only the
/// runner's mounts (no directory for the old root is needed in the image).
fn enter_new_root(new_root: &Path) -> Result<(), SetupError> {
    let pivot = |source| SetupError::PivotRoot { path: new_root.to_owned(), source };
    chdir(new_root).map_err(pivot)?;
    pivot_root(".", ".").map_err(pivot)?;
    umount2(".", MntFlags::MNT_DETACH).map_err(SetupError::DetachOldRoot)?;
    chdir("/").map_err(pivot)
}

/// Into the upper layer before the overlay is mounted: the image's `/etc` is not writable by
/// the runner's root, and whatever the image has at that path (even a symlink) is shadowed.
fn write_resolv_conf(scratch: &Path, text: &str) -> Result<(), SetupError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let etc = scratch.join("upper/etc");
    create_dir(&etc, 0o755)?;
    let path = etc.join("resolv.conf");
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .map_err(|source| SetupError::Create { path, source })
}

fn bring_loopback_up() -> Result<(), SetupError> {
    let sock = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .map_err(SetupError::Loopback)?;
    sys::set_interface_up(sock.as_fd(), c"lo").map_err(SetupError::Loopback)
}

/// SIGCHLD is consumed through a signalfd in the poll loop.
fn block_sigchld() -> Result<SignalFd, SetupError> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.thread_block().map_err(SetupError::Signals)?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(SetupError::Signals)
}

/// The serving state of PID 1.
struct Init<'a> {
    socket: BorrowedFd<'a>,
    signals: SignalFd,
    policy: Policy,
    /// Main processes of executions, by pid, with their execution id.
    running: HashMap<Pid, u64>,
}

impl Init<'_> {
    fn serve(&mut self) -> ! {
        loop {
            let (socket_events, signal_events) = self.wait();
            if signal_events.intersects(PollFlags::POLLIN) {
                while let Ok(Some(_)) = self.signals.read_signal() {}
                self.reap_children();
            }
            if socket_events.intersects(PollFlags::POLLIN) {
                self.handle_request();
                sys::release_free_heap();
            } else if socket_events.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                sys::exit_immediately(0);
            }
        }
    }

    fn wait(&self) -> (PollFlags, PollFlags) {
        let mut fds = [
            PollFd::new(self.socket, PollFlags::POLLIN),
            PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => (
                fds[0].revents().unwrap_or(PollFlags::empty()),
                fds[1].revents().unwrap_or(PollFlags::empty()),
            ),
            Err(_) => (PollFlags::empty(), PollFlags::empty()),
        }
    }

    fn handle_request(&mut self) {
        match protocol::recv::<ToInit>(self.socket) {
            Ok((ToInit::Exec(request), fds)) => self.start_execution(request, fds),
            Ok(_) => {}
            // The service is gone (or broke the protocol): end the runner.
            Err(_) => sys::exit_immediately(0),
        }
    }

    fn start_execution(&mut self, request: ExecRequest, fds: Vec<OwnedFd>) {
        let id = request.id;
        let reply = match self.spawn(&request, fds) {
            Ok(pid) => {
                self.running.insert(pid, id);
                FromInit::Started { id }
            }
            Err(error) => FromInit::SpawnFailed { id, error },
        };
        self.reply(&reply);
    }

    fn reply(&self, message: &FromInit) {
        if protocol::send(self.socket, message, &[]).is_err() {
            sys::exit_immediately(0);
        }
    }

    /// Forks the execution and waits until it has exec'd (or reported why it could not).
    fn spawn(&self, request: &ExecRequest, fds: Vec<OwnedFd>) -> Result<Pid, String> {
        let fds: [OwnedFd; 4] = fds
            .try_into()
            .map_err(|fds: Vec<OwnedFd>| format!("expected 4 descriptors, got {}", fds.len()))?;
        let (report_read, report_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        match sys::fork_single_threaded().map_err(|e| format!("fork: {e}"))? {
            ForkResult::Child => {
                drop(report_read);
                let error = crate::exec::run(request, fds, report_write.as_fd(), &self.policy);
                let _ = nix::unistd::write(&report_write, error.to_string().as_bytes());
                sys::exit_immediately(127)
            }
            ForkResult::Parent { child } => {
                drop(report_write);
                drop(fds);
                let mut error = String::new();
                let _ =
                    fs::File::from(report_read).take(MAX_SPAWN_ERROR).read_to_string(&mut error);
                if error.is_empty() { Ok(child) } else { Err(error) }
            }
        }
    }

    /// Reaps every exited child; reports the executions' main processes.
    fn reap_children(&mut self) {
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => status,
            };
            let (pid, code, signal) = match status {
                WaitStatus::Exited(pid, code) => (pid, Some(code), None),
                WaitStatus::Signaled(pid, signal, _) => (pid, None, Some(signal as i32)),
                _ => continue,
            };
            if let Some(id) = self.running.remove(&pid) {
                self.reply(&FromInit::Exited { id, code, signal });
            }
        }
    }
}

/// The soft and hard `RLIMIT_NOFILE` for an execution: the request, but never above the
/// current hard limit (raising it needs CAP_SYS_RESOURCE).
pub(crate) fn lowered_nofile(requested: u64) -> nix::Result<u64> {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(requested.min(hard))
}

pub(crate) fn set_nofile(limit: u64) -> nix::Result<()> {
    setrlimit(Resource::RLIMIT_NOFILE, limit, limit)
}

pub(crate) fn cstring(s: &str) -> Result<CString, Errno> {
    CString::new(s).map_err(|_| Errno::EINVAL)
}
