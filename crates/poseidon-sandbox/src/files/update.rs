//! Uploads: the Go Poseidon's `rm --recursive --force <delete>; tar --extract --absolute-names`
//! as root, done with confined `*at` system calls instead of a shell.
//!
//! Deletion bound: one update removes at most [`MAX_DELETED_ENTRIES`] entries (every file,
//! link and directory visited counts) and descends at most [`MAX_DELETE_DEPTH`] directory
//! levels. What lies beyond stays in place, like any other failed deletion it is ignored, so a
//! planted million-file tree costs a bounded amount of work per request.

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fchmod, fstatat, futimens, mkdirat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, unlinkat};

use super::resolve::{
    Tree, clean, file_type, is_self_or_parent, open_child_directory_same_mount, split_last,
};
use super::{CopyItem, FilesError, IdMap};

/// The delete entry the Go Poseidon passes to the shell unquoted: every non-hidden entry of the
/// working directory.
const WORKSPACE_GLOB: &str = "./*";
/// The most entries one update deletes.
const MAX_DELETED_ENTRIES: usize = 100_000;
/// The deepest directory level deletion descends to.
const MAX_DELETE_DEPTH: usize = 128;
/// Creating a file retries after removing what was in the way; a learner process that keeps
/// recreating the entry only makes the copy fail.
const CREATE_ATTEMPTS: usize = 3;

const FILE_MODE: u32 = 0o744;
const DIRECTORY_MODE: u32 = 0o1777;
const PARENT_MODE: u32 = 0o755;

/// Deletes the `delete` entries (failures are ignored, as `rm --force` in Go's shell command).
pub(super) fn delete_all(tree: &Tree<'_>, delete: &[String]) {
    let mut budget = MAX_DELETED_ENTRIES;
    for path in delete {
        let result = if path == WORKSPACE_GLOB {
            delete_workspace_contents(tree, &mut budget)
        } else {
            delete_path(tree, path, &mut budget)
        };
        if let Err(errno) = result {
            tracing::debug!(path, %errno, "ignoring a failed deletion");
        }
    }
}

fn delete_workspace_contents(tree: &Tree<'_>, budget: &mut usize) -> nix::Result<()> {
    let workdir = tree.open(&tree.absolute("."), OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
    let mut dir = Dir::from_fd(workdir)?;
    let names = entry_names(&mut dir, *budget)?;
    for name in names.iter().filter(|name| !name.starts_with(b".")) {
        // Every entry is attempted, like `rm` does with each glob match.
        let _ = remove_tree(&dir, name, budget, 0);
    }
    Ok(())
}

fn delete_path(tree: &Tree<'_>, path: &str, budget: &mut usize) -> nix::Result<()> {
    let absolute = tree.absolute(&clean(path));
    let (parent, name) = split_last(&absolute);
    if is_self_or_parent(name) {
        // `rm` refuses to remove `.`, `..` and `/`.
        return Ok(());
    }
    let parent = tree.open_directory_path(parent)?;
    remove_tree(&parent, name.as_bytes(), budget, 0)
}

/// Removes `name` from `parent` like `rm -rf --one-file-system`: symlinks are removed, never
/// followed, and mounted directories are not entered.
fn remove_tree(
    parent: impl AsFd,
    name: &[u8],
    budget: &mut usize,
    depth: usize,
) -> nix::Result<()> {
    let parent = parent.as_fd();
    *budget = budget.checked_sub(1).ok_or(Errno::E2BIG)?;
    let stat = fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
    if file_type(&stat) != SFlag::S_IFDIR {
        return unlinkat(parent, name, UnlinkatFlags::NoRemoveDir);
    }
    if depth < MAX_DELETE_DEPTH
        && let Ok(mut dir) = open_child_directory_same_mount(parent, name).and_then(Dir::from_fd)
    {
        for child in entry_names(&mut dir, *budget)? {
            let _ = remove_tree(&dir, &child, budget, depth + 1);
        }
    }
    unlinkat(parent, name, UnlinkatFlags::RemoveDir)
}

/// At most `limit` names of `dir`, without `.` and `..`.
fn entry_names(dir: &mut Dir, limit: usize) -> nix::Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    for entry in dir.iter() {
        if names.len() >= limit {
            break;
        }
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(name);
        }
    }
    Ok(names)
}

/// Writes the `copy` entries in order; a failing entry does not stop the others.
pub(super) fn copy_all(tree: &Tree<'_>, ids: IdMap, copy: &[CopyItem]) -> Result<(), FilesError> {
    let mut failures = Vec::new();
    let mut directories = Vec::new();
    for item in copy {
        let name = clean(&item.path);
        let absolute = tree.absolute(&name);
        let result = if item.path.ends_with('/') {
            make_directory(tree, ids, &absolute).map(|()| directories.push(absolute))
        } else {
            write_file(tree, ids, &absolute, &item.content)
        };
        if let Err(failure) = result {
            failures.push(format!("tar: {name}: {failure}"));
        }
    }
    // Like tar, set directory times after their contents were written.
    for directory in &directories {
        if let Ok(fd) =
            tree.open(directory, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW)
        {
            let _ = set_upload_time(&fd);
        }
    }
    if failures.is_empty() { Ok(()) } else { Err(FilesError::CopyFailed(failures.join("\n"))) }
}

/// A failed copy entry, worded like GNU tar's diagnostics.
#[derive(Debug)]
struct Failure {
    action: &'static str,
    errno: Errno,
}

impl Failure {
    fn at(action: &'static str) -> impl Fn(Errno) -> Failure {
        move |errno| Failure { action, errno }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.action, self.errno.desc())
    }
}

/// `mkdir -p` plus tar's attributes for a directory entry: root-owned, mode 01777.
fn make_directory(tree: &Tree<'_>, ids: IdMap, absolute: &str) -> Result<(), Failure> {
    let (parent, name) = split_last(absolute);
    let dir = if is_self_or_parent(name) {
        tree.open(absolute, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
            .map_err(Failure::at("Cannot mkdir"))?
    } else {
        let parent = ensure_directory(tree, ids, parent).map_err(Failure::at("Cannot mkdir"))?;
        replace_with_directory(&parent, name.as_bytes()).map_err(Failure::at("Cannot mkdir"))?
    };
    set_owner_and_mode(&dir, ids, DIRECTORY_MODE)
}

/// Returns the directory at `absolute`, creating it and its missing parents (root-owned 0755,
/// as tar creates them). Symlinks on the way are followed inside the runner.
fn ensure_directory(tree: &Tree<'_>, ids: IdMap, absolute: &str) -> nix::Result<OwnedFd> {
    match tree.open(absolute, OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
        Err(Errno::ENOENT) => {}
        other => return other,
    }
    let (parent, name) = split_last(absolute);
    if is_self_or_parent(name) {
        return Err(Errno::ENOENT);
    }
    let parent = ensure_directory(tree, ids, parent)?;
    match mkdirat(&parent, name, Mode::from_bits_truncate(0o700)) {
        Ok(()) => {
            let dir = open_created_directory(&parent, name.as_bytes())?;
            fchown(&dir, Some(Uid::from_raw(ids.root_uid)), Some(Gid::from_raw(ids.root_gid)))?;
            fchmod(&dir, Mode::from_bits_truncate(PARENT_MODE))?;
            Ok(dir)
        }
        Err(Errno::EEXIST) => open_created_directory(&parent, name.as_bytes()),
        Err(errno) => Err(errno),
    }
}

/// Makes `name` a directory: an existing directory is kept, anything else (a planted symlink
/// included) is removed first, as GNU tar does without `--keep-directory-symlink`.
fn replace_with_directory(parent: impl AsFd, name: &[u8]) -> nix::Result<OwnedFd> {
    let parent = parent.as_fd();
    match fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(stat) if file_type(&stat) == SFlag::S_IFDIR => {}
        Ok(_) => unlinkat(parent, name, UnlinkatFlags::NoRemoveDir)?,
        Err(Errno::ENOENT) => {}
        Err(errno) => return Err(errno),
    }
    match mkdirat(parent, name, Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(Errno::EEXIST) => open_created_directory(parent, name),
        Err(errno) => Err(errno),
    }
}

fn open_created_directory(parent: impl AsFd, name: &[u8]) -> nix::Result<OwnedFd> {
    openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Writes a file entry: replaces whatever non-directory is at the path (never following or
/// opening it), then sets tar's attributes: root-owned, mode 0744, mtime 0.
fn write_file(tree: &Tree<'_>, ids: IdMap, absolute: &str, content: &[u8]) -> Result<(), Failure> {
    let (parent, name) = split_last(absolute);
    if is_self_or_parent(name) {
        return Err(Failure::at("Cannot open")(Errno::EISDIR));
    }
    let parent = ensure_directory(tree, ids, parent).map_err(Failure::at("Cannot open"))?;
    let fd = create_replacing(&parent, name.as_bytes()).map_err(Failure::at("Cannot open"))?;
    let mut file = File::from(fd);
    file.write_all(content).map_err(|error| Failure::at("Cannot write")(io_errno(&error)))?;
    set_owner_and_mode(&file, ids, FILE_MODE)?;
    set_upload_time(&file).map_err(Failure::at("Cannot utime"))
}

fn create_replacing(parent: impl AsFd, name: &[u8]) -> nix::Result<OwnedFd> {
    let parent = parent.as_fd();
    let flags = OFlag::O_WRONLY
        | OFlag::O_CREAT
        | OFlag::O_EXCL
        | OFlag::O_NOFOLLOW
        | OFlag::O_NOCTTY
        | OFlag::O_CLOEXEC;
    for _ in 0..CREATE_ATTEMPTS {
        // Nobody but the runner's root can open it before its content and mode are final.
        match openat(parent, name, flags, Mode::S_IRUSR | Mode::S_IWUSR) {
            Ok(fd) => return Ok(fd),
            Err(Errno::EEXIST) => remove_non_directory(parent, name)?,
            Err(errno) => return Err(errno),
        }
    }
    Err(Errno::EEXIST)
}

fn remove_non_directory(parent: impl AsFd, name: &[u8]) -> nix::Result<()> {
    let parent = parent.as_fd();
    let stat = fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
    if file_type(&stat) == SFlag::S_IFDIR {
        return Err(Errno::EISDIR);
    }
    unlinkat(parent, name, UnlinkatFlags::NoRemoveDir)
}

fn set_owner_and_mode(fd: impl AsFd, ids: IdMap, mode: u32) -> Result<(), Failure> {
    fchown(&fd, Some(Uid::from_raw(ids.root_uid)), Some(Gid::from_raw(ids.root_gid)))
        .map_err(Failure::at("Cannot change ownership to uid 0, gid 0"))?;
    fchmod(&fd, Mode::from_bits_truncate(mode)).map_err(Failure::at("Cannot change mode"))
}

/// The Go Poseidon's tar headers carry a zero time, which tar writes as the epoch: uploaded
/// entries list `modificationTime` 0 until they are modified.
fn set_upload_time(fd: impl AsFd) -> nix::Result<()> {
    futimens(fd, &TimeSpec::UTIME_NOW, &TimeSpec::new(0, 0))
}

fn io_errno(error: &std::io::Error) -> Errno {
    error.raw_os_error().map_or(Errno::EIO, Errno::from_raw)
}
