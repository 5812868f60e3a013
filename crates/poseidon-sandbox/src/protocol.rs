//! The typed channel between the service and a runner's init: one JSON message per
//! `SOCK_SEQPACKET` datagram (so no length prefix is needed), file descriptors in
//! `SCM_RIGHTS`, received with `MSG_CMSG_CLOEXEC` and owned at once.
//!
//! Handshake (each side accepts only the next expected message, anything else is a
//! protocol error):
//!
//! ```text
//! service                                   init (intermediate)        init (PID 1)
//!   spawn, put pid into the runner cgroups
//!   Setup ───────────────────────────────▶  unshare(user,mnt,ipc,uts,net,pid)
//!         ◀─────────────────────────────── MapIds
//!   write uid_map/gid_map, IdsMapped ────▶  become root of the user ns, fork ──▶ (waits)
//!         ◀─────────────────────────────── Forked{pid} + pidfd, exit ─────▶ build the root
//!         ◀──────────────────────────────────────────────────────────────── Ready | SetupFailed
//!   Exec{..} + [stdin, stdout, stderr, cgroup.procs] ──────────────────────▶ fork, exec
//!         ◀──────────────────────────────────────────────────────────────── Started | SpawnFailed
//!         ◀──────────────────────────────────────────────────────────────── Exited (later)
//! ```

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::sys;

/// Largest message either side sends or accepts. An `Exec` carries the command and the
/// environment, which must fit.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Most descriptors one message carries (an `Exec`'s stdin, stdout, stderr, cgroup.procs).
pub const MAX_FDS: usize = 4;

/// Why a message could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("sending a message failed: {0}")]
    Send(#[source] nix::Error),
    #[error("receiving a message failed: {0}")]
    Receive(#[source] nix::Error),
    #[error("message larger than {MAX_MESSAGE} bytes")]
    TooLarge,
    #[error("descriptors of a message were truncated")]
    FdsTruncated,
    #[error("malformed message: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("unexpected message: {0}")]
    Unexpected(String),
    #[error("the peer closed the channel")]
    Closed,
    #[error("expected {expected} descriptors, got {got}")]
    FdCount { expected: usize, got: usize },
}

/// Messages from the service to the init.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum ToInit {
    Setup(SetupConfig),
    IdsMapped,
    /// Carries `[stdin, stdout, stderr, cgroup.procs]`.
    Exec(ExecRequest),
}

/// Messages from the init to the service.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum FromInit {
    MapIds,
    /// From the intermediate process; carries a pidfd of `pid` (PID 1 of the runner).
    Forked {
        pid: i32,
    },
    Ready,
    SetupFailed {
        error: String,
    },
    Started {
        id: u64,
    },
    SpawnFailed {
        id: u64,
        error: String,
    },
    Exited {
        id: u64,
        code: Option<i32>,
        signal: Option<i32>,
    },
}

/// How the init builds the runner's root.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SetupConfig {
    /// The unprivileged host id that creates the runner's user namespace (its owner).
    pub owner_id: u32,
    pub hostname: String,
    /// The image's root directory (overlay lower layer).
    pub image_root: PathBuf,
    /// An empty host directory the init mounts its scratch tmpfs on (in its own mount ns).
    pub scratch_dir: PathBuf,
    /// Size of the writable layer (which holds `/workspace` and `/tmp`).
    pub disk_bytes: u64,
    /// Bind the host's `/usr` read-only (the `host` image).
    pub bind_host_usr: bool,
    /// Written to the runner's `/etc/resolv.conf` (network-enabled runners).
    pub resolv_conf: Option<String>,
}

/// One execution.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecRequest {
    pub id: u64,
    pub command: String,
    /// The complete environment (`KEY=value`).
    pub env: Vec<String>,
    pub uid: u32,
    pub gid: u32,
    pub cwd: String,
    pub tty: bool,
    pub nofile: u64,
}

/// Sends one message with `fds` attached.
pub fn send<T: Serialize>(
    socket: BorrowedFd<'_>,
    message: &T,
    fds: &[BorrowedFd<'_>],
) -> Result<(), ProtocolError> {
    let bytes = encode(message)?;
    send_raw(socket, &bytes, fds).map_err(ProtocolError::Send)
}

/// Serializes a message, refusing oversized ones.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, ProtocolError> {
    let bytes = serde_json::to_vec(message).map_err(ProtocolError::Malformed)?;
    if bytes.len() > MAX_MESSAGE {
        return Err(ProtocolError::TooLarge);
    }
    Ok(bytes)
}

/// Parses a received message.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ProtocolError> {
    serde_json::from_slice(bytes).map_err(ProtocolError::Malformed)
}

/// One `sendmsg`; on a non-blocking socket `EAGAIN` is returned as is.
pub fn send_raw(socket: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> nix::Result<()> {
    let raw: Vec<_> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let cmsgs = if raw.is_empty() { Vec::new() } else { vec![ControlMessage::ScmRights(&raw)] };
    let iov = [IoSlice::new(bytes)];
    sendmsg::<()>(socket.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None).map(drop)
}

/// A received datagram: its bytes and the descriptors that came with it.
#[derive(Debug)]
pub struct Datagram {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// One `recvmsg`. `Ok(None)` means the peer closed the channel. Received descriptors are
/// owned before anything is checked, so every error path closes them.
pub fn recv_raw(socket: BorrowedFd<'_>) -> Result<Option<Datagram>, RecvError> {
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; MAX_FDS]);
    let (len, flags, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(RecvError::Os)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(RecvError::Os)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                fds.extend(raw.into_iter().map(sys::own_received_fd));
            }
        }
        (msg.bytes, msg.flags, fds)
    };
    if flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(RecvError::Protocol(ProtocolError::FdsTruncated));
    }
    if flags.contains(MsgFlags::MSG_TRUNC) || len > MAX_MESSAGE {
        return Err(RecvError::Protocol(ProtocolError::TooLarge));
    }
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    buf.truncate(len);
    Ok(Some(Datagram { bytes: buf, fds }))
}

/// A failed `recv_raw`: an OS error (possibly `EAGAIN`) or a bad datagram.
#[derive(Debug)]
pub enum RecvError {
    Os(nix::Error),
    Protocol(ProtocolError),
}

impl From<RecvError> for ProtocolError {
    fn from(e: RecvError) -> Self {
        match e {
            RecvError::Os(e) => ProtocolError::Receive(e),
            RecvError::Protocol(e) => e,
        }
    }
}

/// Blocking receive and decode, for the init.
pub fn recv<T: DeserializeOwned>(
    socket: BorrowedFd<'_>,
) -> Result<(T, Vec<OwnedFd>), ProtocolError> {
    loop {
        match recv_raw(socket) {
            Ok(Some(d)) => return Ok((decode(&d.bytes)?, d.fds)),
            Ok(None) => return Err(ProtocolError::Closed),
            Err(RecvError::Os(nix::Error::EINTR)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    use std::os::fd::AsFd;

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap()
    }

    #[test]
    fn exec_request_round_trips_with_descriptors() {
        let (a, b) = pair();
        let request = ToInit::Exec(ExecRequest {
            id: 7,
            command: "echo hi".into(),
            env: vec!["A=b".into()],
            uid: 1001,
            gid: 1001,
            cwd: "/workspace".into(),
            tty: true,
            nofile: 1024,
        });
        let (r, w) = nix::unistd::pipe().unwrap();
        send(a.as_fd(), &request, &[r.as_fd(), w.as_fd()]).unwrap();
        let (got, fds): (ToInit, _) = recv(b.as_fd()).unwrap();
        assert_eq!(got, request);
        assert_eq!(fds.len(), 2);
        nix::unistd::write(&fds[1], b"x").unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(nix::unistd::read(&r, &mut buf).unwrap(), 1);
    }

    #[test]
    fn closed_peer_is_reported() {
        let (a, b) = pair();
        drop(a);
        assert!(matches!(recv::<FromInit>(b.as_fd()), Err(ProtocolError::Closed)));
    }

    #[test]
    fn oversized_and_garbage_messages_are_refused() {
        let big = FromInit::SpawnFailed { id: 1, error: "x".repeat(MAX_MESSAGE) };
        assert!(matches!(encode(&big), Err(ProtocolError::TooLarge)));
        let (a, b) = pair();
        send_raw(a.as_fd(), b"{not json", &[]).unwrap();
        assert!(matches!(recv::<FromInit>(b.as_fd()), Err(ProtocolError::Malformed(_))));
    }
}
