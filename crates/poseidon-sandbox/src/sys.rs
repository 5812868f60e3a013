//! The crate's only `unsafe`: one safe wrapper per raw syscall or ioctl that neither `nix` nor
//! `std` offers (JUSTIFICATION on each), or that is `unsafe` in `nix` for reasons that do not
//! apply at the call site (documented in each `SAFETY:` comment), and the calls into
//! `libnftables` ([`Nftables`]), which has no Rust binding.
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

/// `libnftables`, loaded at run time: only network access needs it, so the binary still
/// starts on a host without nftables. Running a batch in-process takes a fraction of a
/// millisecond where spawning `nft` took several.
pub struct Nftables {
    context: std::sync::Mutex<NftContext>,
    /// Keeps the library mapped while its functions are in use; dropped after `context`.
    _library: libloading::Library,
}

type NftNew = unsafe extern "C" fn(u32) -> *mut std::ffi::c_void;
type NftBuffer = unsafe extern "C" fn(*mut std::ffi::c_void) -> libc::c_int;
type NftRun = unsafe extern "C" fn(*mut std::ffi::c_void, *const libc::c_char) -> libc::c_int;
type NftGetBuffer = unsafe extern "C" fn(*mut std::ffi::c_void) -> *const libc::c_char;
type NftFree = unsafe extern "C" fn(*mut std::ffi::c_void);

/// An `nft_ctx` and the functions that use it. Not thread-safe in C: used under a lock.
struct NftContext {
    ctx: std::ptr::NonNull<std::ffi::c_void>,
    run: NftRun,
    error_buffer: NftGetBuffer,
    output_buffer: NftGetBuffer,
    free: NftFree,
}

// SAFETY: an `nft_ctx` is not bound to the thread that created it; `Nftables` only uses it
// under its mutex, one thread at a time.
unsafe impl Send for NftContext {}

impl Nftables {
    /// Loads `libnftables.so.1` and creates a context whose output and errors are buffered
    /// (never written to our stdout or stderr).
    pub fn load() -> Result<Nftables, String> {
        // SAFETY: libnftables' initialisers only set up its own state.
        let library = unsafe { libloading::Library::new("libnftables.so.1") }
            .map_err(|e| format!("cannot load libnftables (is nftables installed?): {e}"))?;
        // SAFETY: each symbol has the C signature of `libnftables(3)` given to it here, and the
        // copied function pointers are only used while `_library` keeps the library mapped.
        let (new, buffer, run, error_buffer, output_buffer, free) = unsafe {
            (
                *symbol::<NftNew>(&library, b"nft_ctx_new\0")?,
                [
                    *symbol::<NftBuffer>(&library, b"nft_ctx_buffer_output\0")?,
                    *symbol::<NftBuffer>(&library, b"nft_ctx_buffer_error\0")?,
                ],
                *symbol::<NftRun>(&library, b"nft_run_cmd_from_buffer\0")?,
                *symbol::<NftGetBuffer>(&library, b"nft_ctx_get_error_buffer\0")?,
                *symbol::<NftGetBuffer>(&library, b"nft_ctx_get_output_buffer\0")?,
                *symbol::<NftFree>(&library, b"nft_ctx_free\0")?,
            )
        };
        // SAFETY: `nft_ctx_new(NFT_CTX_DEFAULT)` has no preconditions.
        let ctx = std::ptr::NonNull::new(unsafe { new(0) })
            .ok_or("libnftables cannot create a context")?;
        // From here on, dropping `context` frees the context.
        let context = NftContext { ctx, run, error_buffer, output_buffer, free };
        // SAFETY: `ctx` is a live context, not yet shared.
        if buffer.iter().any(|buffer| unsafe { buffer(ctx.as_ptr()) } != 0) {
            return Err("libnftables cannot buffer its output".into());
        }
        Ok(Nftables { context: std::sync::Mutex::new(context), _library: library })
    }

    /// Runs `commands` as one transaction (all or nothing); the error is nft's message.
    pub fn run(&self, commands: &str) -> Result<(), String> {
        let commands = std::ffi::CString::new(commands).map_err(|e| e.to_string())?;
        let context = self.context.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: `ctx` is a live context used by this thread alone (the lock); `commands` is a
        // NUL-terminated string that outlives the call. Reading a buffer returns a string the
        // context owns until its next call, copied here before the lock is released; reading
        // also rewinds the buffer, so neither grows across calls.
        unsafe {
            let status = (context.run)(context.ctx.as_ptr(), commands.as_ptr());
            (context.output_buffer)(context.ctx.as_ptr());
            let error = (context.error_buffer)(context.ctx.as_ptr());
            if status == 0 {
                return Ok(());
            }
            let message = if error.is_null() {
                String::new()
            } else {
                CStr::from_ptr(error).to_string_lossy().trim().to_owned()
            };
            Err(if message.is_empty() { format!("nft failed ({status})") } else { message })
        }
    }
}

/// Looks up `name` in `library`.
///
/// # Safety
/// `T` must be the symbol's real type.
unsafe fn symbol<'l, T>(
    library: &'l libloading::Library,
    name: &[u8],
) -> Result<libloading::Symbol<'l, T>, String> {
    // SAFETY: the caller guarantees that `T` is the symbol's type.
    unsafe { library.get(name) }.map_err(|e| {
        format!("libnftables lacks {}: {e}", String::from_utf8_lossy(name).trim_end_matches('\0'))
    })
}

impl Drop for NftContext {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from `nft_ctx_new` and is freed once, here.
        unsafe { (self.free)(self.ctx.as_ptr()) }
    }
}

impl std::fmt::Debug for Nftables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nftables").finish_non_exhaustive()
    }
}
