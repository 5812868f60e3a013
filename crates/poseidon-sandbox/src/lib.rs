//! A Linux sandbox runtime for Poseidon runners.
//!
//! A runner is a tiny init process (see [`init`]) in its own user, PID, mount, IPC, UTS and
//! network namespaces, with a root built from a read-only [`Image`] under a size-limited
//! writable overlay, held in its own cgroups. Executions are forked by that init; the service
//! keeps their stdio and kills them through per-execution cgroups. `docs/security.md`
//! describes the threat model and every measure in set-up order.
#![deny(unsafe_code)]

mod cgroup;
mod exec;
pub mod files;
mod image;
pub mod init;
mod network;
mod process;
mod protocol;
mod runtime;
mod seccomp;
mod sys;

use std::io;
use std::path::PathBuf;

pub use cgroup::CgroupError;
pub use image::{Image, ImageError};
pub use network::{Ipv4Cidr, NetworkConfig, NetworkError, NetworkSpec};
pub use process::{ExitInfo, Killer, Process, ProcessOutput, ProcessSpec, ProcessStdin, WORKDIR};
pub use protocol::ProtocolError;
pub use runtime::{Limits, MAPPED_IDS, Runtime, RuntimeConfig, Sandbox, SandboxSpec};

/// Errors of the runtime, by operation family.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid runtime configuration: {0}")]
    Config(&'static str),
    #[error("cannot prepare state directory {path}: {source}")]
    StateDir { path: PathBuf, source: io::Error },
    #[error("invalid sandbox name {0:?}: use 1 to 63 of [A-Za-z0-9-]")]
    InvalidName(String),
    #[error("invalid limit {0}: must be above 0")]
    InvalidLimit(&'static str),
    #[error("invalid process spec: {0}")]
    InvalidSpec(String),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("control channel: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("cannot create the control socket: {0}")]
    Socket(#[source] nix::Error),
    #[error("cannot start the runner init {path}: {source}")]
    SpawnInit { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    IdMap { path: PathBuf, source: io::Error },
    #[error("runner set-up failed: {0}")]
    Setup(String),
    #[error("runner set-up timed out")]
    SetupTimeout,
    #[error("the runner's init is gone")]
    InitDied,
    #[error("cannot start the execution: {0}")]
    Spawn(String),
    #[error("the execution's processes did not die in time")]
    Drain,
    #[error("cannot open the runner's root {path}: {source}")]
    OpenRoot { path: PathBuf, source: nix::Error },
    #[error("{0} panicked")]
    Panicked(&'static str),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("network access was requested but networking is not enabled")]
    NetworkDisabled,
    #[error("I/O: {0}")]
    Io(#[source] io::Error),
}

#[cfg(test)]
mod tests {
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn handles_can_be_shared_between_tasks() {
        assert_send_sync::<super::Runtime>();
        assert_send_sync::<super::Sandbox>();
        assert_send_sync::<super::Killer>();
        assert_send_sync::<super::Process>();
    }
}
