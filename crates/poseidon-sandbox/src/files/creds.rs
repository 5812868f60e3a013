//! Running a file operation with the credentials of one of the runner's users.
//!
//! The service is host root, which is far more than the runner's root: with `CAP_SYS_PTRACE`,
//! `CAP_SYSLOG` or `CAP_SYS_RAWIO` it could read other processes' memory, the kernel log or
//! kernel memory through the runner's own `/proc`. So every operation runs on a fresh thread
//! that first takes the identity of the runner's root or `user`. Linux keeps file system ids,
//! supplementary groups and capabilities per thread, and the thread ends with the operation:
//! a failure half-way can never leave another thread of the service with altered credentials.

use std::io;

use nix::errno::Errno;
use nix::unistd::{Gid, Uid, setfsgid, setfsuid};

use super::{FilesError, IdMap, sys};

/// Who performs a file operation inside the runner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Identity {
    /// The runner's root: its ids plus the file capabilities a container's root keeps
    /// (`CAP_CHOWN`, `CAP_DAC_OVERRIDE`, `CAP_DAC_READ_SEARCH`, `CAP_FOWNER`, `CAP_FSETID`)
    /// and nothing else.
    Root,
    /// The runner's unprivileged `user`: its ids, no supplementary groups, no capabilities.
    User,
}

impl Identity {
    pub(super) fn from_privileged(privileged: bool) -> Identity {
        if privileged { Identity::Root } else { Identity::User }
    }
}

/// `CAP_CHOWN` (0), `CAP_DAC_OVERRIDE` (1), `CAP_DAC_READ_SEARCH` (2), `CAP_FOWNER` (3) and
/// `CAP_FSETID` (4).
const FILE_CAPABILITIES: u64 = 0b1_1111;

/// Runs `operation` on a dedicated thread acting as `identity`.
pub(super) fn run_as<T: Send>(
    ids: IdMap,
    identity: Identity,
    operation: impl FnOnce() -> Result<T, FilesError> + Send,
) -> Result<T, FilesError> {
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name("runner-files".to_owned())
            .spawn_scoped(scope, move || {
                become_identity(ids, identity)?;
                operation()
            })
            .map_err(|source| FilesError::Io {
                context: "starting a file operation thread".to_owned(),
                source,
            })?;
        worker.join().unwrap_or_else(|_| {
            Err(FilesError::Io {
                context: "file operation thread".to_owned(),
                source: io::Error::other("panicked"),
            })
        })
    })
}

/// Switches the calling thread (only) to `identity`, and verifies the switch.
fn become_identity(ids: IdMap, identity: Identity) -> Result<(), FilesError> {
    let (uid, gid, capabilities) = match identity {
        Identity::Root => (ids.root_uid, ids.root_gid, FILE_CAPABILITIES),
        Identity::User => (ids.user_uid, ids.user_gid, 0),
    };
    let failed = |step: &str, errno: Errno| FilesError::Io {
        context: format!("dropping privileges: {step}"),
        source: errno.into(),
    };
    sys::clear_thread_groups().map_err(|errno| failed("setgroups", errno))?;
    setfsgid(Gid::from_raw(gid));
    setfsuid(Uid::from_raw(uid));
    // An invalid id changes nothing and returns the current one: the documented way to check.
    let fsgid = setfsgid(Gid::from_raw(u32::MAX));
    let fsuid = setfsuid(Uid::from_raw(u32::MAX));
    if fsuid.as_raw() != uid || fsgid.as_raw() != gid {
        return Err(failed("setfsuid/setfsgid", Errno::EPERM));
    }
    sys::limit_thread_capabilities(capabilities).map_err(|errno| failed("capset", errno))
}
