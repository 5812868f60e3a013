//! Raw per-thread credential syscalls.
//!
//! glibc's `setgroups` (like `setuid`) broadcasts the change to every thread of the process,
//! as POSIX demands. The kernel calls change only the calling thread, which is exactly what a
//! short-lived worker thread that acts as the sandbox's `user` needs.

use nix::errno::Errno;

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit capability sets, passed as two data structs.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapabilityHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
struct CapabilityData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Removes every supplementary group of the calling thread only.
pub(super) fn clear_thread_groups() -> nix::Result<()> {
    // SAFETY: with a count of 0 the kernel never dereferences the list pointer, so passing NULL
    // is valid; the syscall touches no memory of this process.
    let rc =
        unsafe { libc::syscall(libc::SYS_setgroups, 0_usize, std::ptr::null::<libc::gid_t>()) };
    Errno::result(rc).map(drop)
}

/// Sets the effective and permitted capabilities of the calling thread only to `capabilities`
/// (a bit set of `CAP_*` numbers) and clears its inheritable ones.
pub(super) fn limit_thread_capabilities(capabilities: u64) -> nix::Result<()> {
    // pid 0 means the calling thread.
    let header = CapabilityHeader { version: CAPABILITY_VERSION_3, pid: 0 };
    // Version 3 splits each 64-bit set into a low and a high 32-bit word.
    let word = |shift: u32| {
        let bits = (capabilities >> shift) as u32;
        CapabilityData { effective: bits, permitted: bits, inheritable: 0 }
    };
    let data = [word(0), word(32)];
    // SAFETY: `header` and `data` are a valid `__user_cap_header_struct` and the two
    // `__user_cap_data_struct`s version 3 requires, both `#[repr(C)]` and alive for the whole
    // call; `capset` only reads them.
    let rc = unsafe { libc::syscall(libc::SYS_capset, std::ptr::from_ref(&header), data.as_ptr()) };
    Errno::result(rc).map(drop)
}
