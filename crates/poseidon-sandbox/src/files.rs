//! Host-side access to a runner's files: uploads, listings and downloads.
//!
//! The service reaches a runner's files from the host through an fd of the runner's root
//! (`/proc/<init>/root`). Every request path is resolved with `openat2(RESOLVE_IN_ROOT |
//! RESOLVE_NO_MAGICLINKS)` relative to that fd, so `..` and symlinks planted by learner code
//! resolve inside the runner, never on the host. Relative paths are relative to the runner's
//! working directory. Each operation runs on a dedicated thread with the file system ids of the
//! runner's root (uploads, privileged listings and downloads) or of its `user`, and without
//! the host-wide capabilities the service has. All operations block.

mod creds;
mod download;
mod list;
mod names;
mod resolve;
#[allow(unsafe_code)]
mod sys;
mod update;

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};

use bytes::Bytes;

use self::creds::Identity;
use self::resolve::{Tree, normalize_workdir};

/// HOST ids of the sandbox's root and of its unprivileged `user`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdMap {
    pub root_uid: u32,
    pub root_gid: u32,
    pub user_uid: u32,
    pub user_gid: u32,
}

/// A runner's file system, seen from the host.
#[derive(Debug)]
pub struct Root {
    dir: OwnedFd,
    ids: IdMap,
    /// Absolute inside the runner, without a trailing `/`.
    workdir: String,
}

/// One entry of an upload. A `path` ending in `/` is a directory (`content` is ignored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyItem {
    pub path: String,
    pub content: Bytes,
}

/// One line of a listing, with the fields `ls -l` shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    /// The `ls` type character: `-`, `d`, `l`, `p`, `s`, `c` or `b`.
    pub entry_type: char,
    /// The symlink's target; `None` for other types and for unreadable links.
    pub link_target: Option<String>,
    pub size: u64,
    /// Seconds since the epoch.
    pub modification_time: i64,
    /// The nine `ls` permission characters, e.g. `rwxr--r--`.
    pub permissions: String,
    pub owner: String,
    pub group: String,
}

/// Why a file operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The path does not exist or the acting user may not reach it (HTTP 424).
    #[error("file not found or insufficient permissions")]
    NotFound,
    /// A download of a directory, fifo, socket or device.
    #[error("{0}")]
    NotAFile(String),
    /// One line per failed entry, worded like GNU tar: `tar: <path>: Cannot open: <reason>`.
    #[error("{0}")]
    CopyFailed(String),
    /// The service itself failed (threads, file descriptors, memory, I/O).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Root {
    /// `dir` is an `O_PATH | O_DIRECTORY` fd of the runner's `/`; `workdir` is the runner's
    /// working directory (relative request paths are relative to it).
    pub fn new(dir: OwnedFd, ids: IdMap, workdir: &str) -> Root {
        Root { dir, ids, workdir: normalize_workdir(workdir) }
    }

    /// Deletes `delete`, then writes `copy`, as the runner's root. Blocking.
    ///
    /// `./*` deletes every non-hidden entry of the working directory; other entries are
    /// removed recursively and failures are ignored (`rm -rf`). Directory entries become
    /// root-owned 01777, files root-owned 0744. A failed copy entry does not stop the others
    /// and makes the result [`FilesError::CopyFailed`]. One update deletes at most 100,000
    /// entries and descends at most 128 directory levels; what lies beyond is left in place.
    pub fn update(&self, delete: &[String], copy: &[CopyItem]) -> Result<(), FilesError> {
        creds::run_as(self.ids, Identity::Root, || {
            let tree = self.tree();
            update::delete_all(&tree, delete);
            update::copy_all(&tree, self.ids, copy)
        })
    }

    /// Lists `path` like `ls -l [--recursive]` run inside the runner as root (`privileged`)
    /// or as `user` would. Blocking.
    ///
    /// A listing holds at most 50,000 entries and descends at most 64 directory levels; past
    /// that it ends early, like the partial listing of a failing `ls`.
    pub fn list(
        &self,
        path: &str,
        recursive: bool,
        privileged: bool,
    ) -> Result<Vec<Entry>, FilesError> {
        creds::run_as(self.ids, Identity::from_privileged(privileged), || {
            list::list(&self.tree(), self.ids, path, recursive)
        })
    }

    /// Opens a regular file to download, as the runner's root (`privileged`) or `user`.
    /// Blocking. Returns the exact number of bytes the reader will yield: a file that shrinks
    /// meanwhile is padded with zero bytes, one that grows is cut. Pseudo files reporting size
    /// 0 (procfs, sysfs) are read into memory, up to 1 MiB.
    pub fn open(
        &self,
        path: &str,
        privileged: bool,
    ) -> Result<(u64, Box<dyn Read + Send>), FilesError> {
        creds::run_as(self.ids, Identity::from_privileged(privileged), || {
            download::open(&self.tree(), path)
        })
    }

    fn tree(&self) -> Tree<'_> {
        Tree::new(self.dir.as_fd(), &self.workdir)
    }
}
