//! The crate's only `unsafe`: one safe wrapper per raw syscall or ioctl that neither `nix` nor
//! `std` offers (JUSTIFICATION on each), or that is `unsafe` in `nix` for reasons that do not
//! apply at the call site (documented in each `SAFETY:` comment).
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::pty::PtyMaster;
use nix::unistd::{ForkResult, Pid};

/// Forks the calling process.
///
/// Only called by the runner init, which is single-threaded, so the child may allocate and
/// run arbitrary code until it execs.
pub fn fork_single_threaded() -> nix::Result<ForkResult> {
    // SAFETY: the init never starts a second thread, so no lock can be held by another
    // thread at the time of the fork and the child is free to run normal Rust code.
    unsafe { nix::unistd::fork() }
}

/// Ends the calling process at once, without running exit handlers: used by a forked child
/// whose set-up failed, so that nothing of the parent's state is flushed twice.
pub fn exit_immediately(code: i32) -> ! {
    // SAFETY: `_exit` has no preconditions.
    unsafe { libc::_exit(code) }
}

/// `pidfd_open(2)`. JUSTIFICATION: nix 0.30 has no pidfd support.
pub fn pidfd_open(pid: Pid) -> nix::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments; on success it returns a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    let fd = Errno::result(fd)?;
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_send_signal(2)`; `signal` 0 only checks that the process still exists.
/// JUSTIFICATION: nix 0.30 has no pidfd support.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: i32) -> nix::Result<()> {
    // SAFETY: the fd is borrowed for the call; a null siginfo is allowed by the syscall.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    Errno::result(rc).map(drop)
}

/// `close_range(first, last, 0)`. JUSTIFICATION: not in nix 0.30.
pub fn close_range(first: u32, last: u32) -> nix::Result<()> {
    // SAFETY: closing fds never violates memory safety by itself; callers only use it in a
    // freshly forked, single-threaded child (or at the init's start) that owns no `OwnedFd`
    // in that range it will use afterwards.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
    Errno::result(rc).map(drop)
}

/// Takes ownership of an fd the kernel installed for us (SCM_RIGHTS).
pub fn own_received_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: the fd was just installed by `recvmsg` into our table and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Turns a `PtyMaster` into a plain `OwnedFd`. JUSTIFICATION: nix 0.30 has no such conversion.
pub fn pty_master_into_fd(master: PtyMaster) -> OwnedFd {
    // SAFETY: `into_raw_fd` gives up ownership, which the new `OwnedFd` takes over.
    unsafe { OwnedFd::from_raw_fd(master.into_raw_fd()) }
}

/// Opens the slave side of a PTY from its master (`TIOCGPTPEER`), which avoids a lookup of
/// `/dev/pts/N` by path. JUSTIFICATION: not in nix 0.30.
pub fn open_pty_peer(master: BorrowedFd<'_>) -> nix::Result<OwnedFd> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes an int flags argument and returns a new fd on success.
    let fd = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    let fd = Errno::result(fd)?;
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes the terminal on `fd` the controlling terminal of the calling session leader.
/// JUSTIFICATION: nix's ioctl macros generate `unsafe` functions.
pub fn set_controlling_tty(fd: BorrowedFd<'_>) -> nix::Result<()> {
    // SAFETY: TIOCSCTTY takes an int argument (0: do not steal).
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSCTTY, 0) };
    Errno::result(rc).map(drop)
}

/// Sets `IFF_UP` on the interface `name` through the socket `sock`.
/// JUSTIFICATION: nix has no interface-flag ioctls.
pub fn set_interface_up(sock: BorrowedFd<'_>, name: &CStr) -> nix::Result<()> {
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.to_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return Err(Errno::EINVAL);
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid, properly sized ifreq that lives for the call.
    Errno::result(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above.
    Errno::result(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) }).map(drop)
}

/// Restores the default disposition of every catchable signal. The Rust runtime ignores
/// SIGPIPE; learner programs must not inherit that.
pub fn reset_signal_dispositions() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: installing SIG_DFL does not run any code of ours in signal context.
        // Errors (signals that cannot be changed) are irrelevant here.
        let _ = unsafe { signal(sig, SigHandler::SigDfl) };
    }
}

/// Registers an owned descriptor with tokio's reactor.
pub fn async_fd(
    fd: OwnedFd,
    interest: tokio::io::Interest,
) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is a valid open descriptor, it is moved into the `AsyncFd` and so
    // stays open and unchanged for the `AsyncFd`'s whole lifetime.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) }.map_err(Into::into)
}

/// Returns freed heap pages to the kernel: an idle runner init should hold as little
/// memory as possible. JUSTIFICATION: glibc-specific, no safe binding exists.
pub fn release_free_heap() {
    // SAFETY: `malloc_trim` only manipulates the allocator's own free lists.
    unsafe { libc::malloc_trim(0) };
}

/// Removes `capability` from the calling process's bounding set, so that no later `execve`
/// (as root of the user namespace) can gain it back.
pub fn drop_bounding_capability(capability: u32) -> nix::Result<()> {
    // SAFETY: PR_CAPBSET_DROP takes a capability number by value; the kernel reads no memory of
    // this process.
    let rc =
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(capability), 0, 0, 0) };
    Errno::result(rc).map(drop)
}
