//! Path resolution confined to the runner's root.
//!
//! Every lookup of a request path goes through `openat2(RESOLVE_IN_ROOT |
//! RESOLVE_NO_MAGICLINKS)` relative to the root fd: `..` stops at the runner's `/`, absolute
//! symlinks are resolved against the runner's `/`, and `/proc` magic links cannot jump to the
//! host. Below a resolved directory, only single names are opened (with `O_NOFOLLOW`), so no
//! other lookup can leave the runner either.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, OpenHow, ResolveFlag, fcntl, openat2};
use nix::sys::stat::{FileStat, SFlag, fstat};

use super::FilesError;

/// `openat2` fails with `EAGAIN` when a rename or mount raced with a confined lookup; a few
/// retries ride out innocent races without letting a hostile loop stall us.
const RESOLVE_ATTEMPTS: usize = 8;

/// A runner's root and working directory.
#[derive(Clone, Copy, Debug)]
pub(super) struct Tree<'a> {
    root: BorrowedFd<'a>,
    /// Absolute, without a trailing `/` (empty for `/`).
    workdir: &'a str,
}

impl<'a> Tree<'a> {
    pub(super) fn new(root: BorrowedFd<'a>, workdir: &'a str) -> Self {
        Tree { root, workdir }
    }

    /// The absolute path inside the runner of a request path: relative paths are relative to
    /// the working directory, like the shell commands of the Go Poseidon.
    pub(super) fn absolute(&self, path: &str) -> String {
        if path.starts_with('/') { path.to_owned() } else { format!("{}/{path}", self.workdir) }
    }

    /// Opens an absolute runner path, following symlinks only inside the runner.
    pub(super) fn open(&self, path: &str, flags: OFlag) -> nix::Result<OwnedFd> {
        // `openat2` rejects any flag but these three next to `O_PATH`.
        let implied = if flags.contains(OFlag::O_PATH) {
            OFlag::O_CLOEXEC
        } else {
            OFlag::O_CLOEXEC | OFlag::O_NOCTTY
        };
        let how = OpenHow::new()
            .flags(flags | implied)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        retry_eagain(|| openat2(self.root, path, how))
    }

    /// Opens a directory (as `O_PATH`: only for `*at` calls) at an absolute runner path.
    pub(super) fn open_directory_path(&self, path: &str) -> nix::Result<OwnedFd> {
        self.open(path, OFlag::O_PATH | OFlag::O_DIRECTORY)
    }

    /// Opens a regular file for reading, still `O_NONBLOCK`. Fifos and devices are opened
    /// non-blocking and rejected, so a fifo planted at the path can never hang the caller; a
    /// pseudo file (procfs, sysfs) read non-blocking cannot hang it either.
    pub(super) fn open_regular(&self, path: &str) -> Result<(File, FileStat), OpenRegularError> {
        let fd =
            self.open(path, OFlag::O_RDONLY | OFlag::O_NONBLOCK).map_err(OpenRegularError::Open)?;
        let stat = fstat(&fd).map_err(OpenRegularError::Open)?;
        if file_type(&stat) != SFlag::S_IFREG {
            return Err(OpenRegularError::NotRegular);
        }
        Ok((File::from(fd), stat))
    }
}

/// Clears `O_NONBLOCK` of a file opened by [`Tree::open_regular`].
pub(super) fn clear_nonblocking(file: &File) -> nix::Result<()> {
    fcntl(file, FcntlArg::F_SETFL(OFlag::O_RDONLY)).map(drop)
}

/// Why [`Tree::open_regular`] failed.
#[derive(Debug)]
pub(super) enum OpenRegularError {
    Open(Errno),
    NotRegular,
}

/// Opens a subdirectory by a single name without following a symlink, as an `O_RDONLY` fd
/// that can be read with `readdir`.
pub(super) fn open_child_directory(parent: impl AsFd, name: &[u8]) -> nix::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    retry_eagain(|| openat2(parent.as_fd(), name, how))
}

/// Like [`open_child_directory`], but refuses a mount point: recursive deletion stays on one
/// file system (`rm --one-file-system`), so it cannot empty a mounted `/proc` or bind mount.
pub(super) fn open_child_directory_same_mount(
    parent: impl AsFd,
    name: &[u8],
) -> nix::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
    retry_eagain(|| openat2(parent.as_fd(), name, how))
}

fn retry_eagain(mut open: impl FnMut() -> nix::Result<OwnedFd>) -> nix::Result<OwnedFd> {
    let mut result = open();
    for _ in 1..RESOLVE_ATTEMPTS {
        match result {
            Err(Errno::EAGAIN | Errno::EINTR) => result = open(),
            _ => break,
        }
    }
    result
}

/// The file type bits of a stat.
pub(super) fn file_type(stat: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits())
}

/// Go's `path.Clean`, which the Go Poseidon applies to upload and delete paths: `a/../b` →
/// `b`, `test/` → `test`, leading `..` of relative paths kept, `..` above `/` dropped.
pub(super) fn clean(path: &str) -> String {
    path_clean::clean(path).to_string_lossy().into_owned()
}

/// Splits an absolute path into its parent directory and its last component.
pub(super) fn split_last(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(0) => ("/", &path[1..]),
        Some(slash) => (&path[..slash], &path[slash + 1..]),
        None => (".", path),
    }
}

/// Whether a last component cannot name an entry of its parent (`rm` refuses these).
pub(super) fn is_self_or_parent(name: &str) -> bool {
    matches!(name, "" | "." | "..")
}

/// The working directory as stored: absolute, without trailing `/`.
pub(super) fn normalize_workdir(workdir: &str) -> String {
    let absolute = clean(&format!("/{workdir}"));
    absolute.trim_end_matches('/').to_owned()
}

/// Maps a failed lookup of a request path to the API's answer: what `ls` or `cat` would report
/// as missing or inaccessible is [`FilesError::NotFound`] (HTTP 424), anything else (fd or
/// memory exhaustion, I/O errors) is an internal error.
pub(super) fn lookup_error(path: &str, errno: Errno) -> FilesError {
    match errno {
        Errno::ENOENT
        | Errno::EACCES
        | Errno::EPERM
        | Errno::ENOTDIR
        | Errno::ELOOP
        | Errno::ENAMETOOLONG
        | Errno::EXDEV
        | Errno::EINVAL
        | Errno::ENXIO
        | Errno::EAGAIN => FilesError::NotFound,
        other => FilesError::Io { context: format!("opening {path:?}"), source: other.into() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_matches_go_path_clean() {
        for (input, cleaned) in [
            ("", "."),
            ("./", "."),
            ("test/", "test"),
            ("a/../b", "b"),
            ("../x", "../x"),
            ("a/../../x", "../x"),
            ("/../x", "/x"),
            ("/a//b/./c/", "/a/b/c"),
            ("/", "/"),
            ("//", "/"),
        ] {
            assert_eq!(clean(input), cleaned, "clean({input:?})");
        }
    }

    #[test]
    fn split_last_separates_parent_and_name() {
        assert_eq!(split_last("/workspace/a"), ("/workspace", "a"));
        assert_eq!(split_last("/a"), ("/", "a"));
        assert_eq!(split_last("/"), ("/", ""));
        assert_eq!(split_last("/workspace/.."), ("/workspace", ".."));
    }

    #[test]
    fn workdir_is_absolute_without_trailing_slash() {
        assert_eq!(normalize_workdir("/workspace/"), "/workspace");
        assert_eq!(normalize_workdir("workspace"), "/workspace");
        assert_eq!(normalize_workdir("/"), "");
        assert_eq!(normalize_workdir(""), "");
    }
}
