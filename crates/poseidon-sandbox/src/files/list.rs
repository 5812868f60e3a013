//! Listings in the shape of `ls -l --time-style=+%s -1 --literal [--recursive] <path>` run
//! inside the runner, as the Go Poseidon parses them.
//!
//! Bounds: a listing returns at most [`MAX_ENTRIES`] entries, reads at most [`MAX_SCANNED`]
//! directory entries (hidden ones included) and descends at most [`MAX_DEPTH`] levels below
//! the listed directory. Past a bound the listing ends early and what was collected is
//! returned, like the partial listing the Go Poseidon streams when `ls` stops.

use std::os::fd::{AsFd, OwnedFd};

use nix::dir::Dir;
use nix::fcntl::{AtFlags, OFlag, readlinkat};
use nix::sys::stat::{FileStat, SFlag, fstatat};

use super::names::Names;
use super::resolve::{
    Tree, file_type, is_self_or_parent, lookup_error, open_child_directory, split_last,
};
use super::{Entry, FilesError, IdMap};

/// The most entries one listing returns.
const MAX_ENTRIES: usize = 50_000;
/// The most directory entries one listing reads, hidden ones included.
const MAX_SCANNED: usize = 200_000;
/// The deepest subdirectory level a recursive listing descends to.
const MAX_DEPTH: usize = 64;

/// Lists `path` (relative to the working directory or absolute inside the runner).
pub(super) fn list(
    tree: &Tree<'_>,
    ids: IdMap,
    path: &str,
    recursive: bool,
) -> Result<Vec<Entry>, FilesError> {
    if path.is_empty() {
        return Err(FilesError::NotFound);
    }
    let mut lister =
        Lister { names: Names::read(tree, ids), entries: Vec::new(), scans_left: MAX_SCANNED };
    match open_argument(tree, path)? {
        Argument::Single { parent, name, stat } => {
            let link_target = link_target(&parent, name.as_bytes(), &stat);
            lister.entries.push(lister.entry(path.to_owned(), &stat, link_target));
        }
        Argument::Directory(dir) => {
            let prefix = if recursive { with_trailing_slash(path) } else { String::new() };
            let dir = Dir::from_fd(dir).map_err(|errno| lookup_error(path, errno))?;
            lister
                .list_directory(dir, &prefix, recursive, 0)
                .map_err(|errno| lookup_error(path, errno))?;
        }
    }
    Ok(lister.entries)
}

/// What the listed path names.
enum Argument {
    /// A non-directory (a symlink is listed itself, as `ls -l` does with arguments).
    Single { parent: OwnedFd, name: String, stat: FileStat },
    /// A readable directory.
    Directory(OwnedFd),
}

fn open_argument(tree: &Tree<'_>, path: &str) -> Result<Argument, FilesError> {
    let absolute = tree.absolute(path);
    let (parent_path, name) = split_last(&absolute);
    let not_found = |errno| lookup_error(path, errno);
    // `ls -l dir/` and `ls -l .` follow the last component; `ls -l link` does not.
    if absolute.ends_with('/') || is_self_or_parent(name) {
        let dir = tree.open(&absolute, OFlag::O_RDONLY | OFlag::O_DIRECTORY).map_err(not_found)?;
        return Ok(Argument::Directory(dir));
    }
    let parent = tree.open_directory_path(parent_path).map_err(not_found)?;
    let stat = fstatat(&parent, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(not_found)?;
    if file_type(&stat) == SFlag::S_IFDIR {
        let dir = open_child_directory(&parent, name.as_bytes()).map_err(not_found)?;
        return Ok(Argument::Directory(dir));
    }
    Ok(Argument::Single { parent, name: name.to_owned(), stat })
}

struct Lister {
    names: Names,
    entries: Vec<Entry>,
    scans_left: usize,
}

impl Lister {
    /// Appends the visible entries of `dir`, then (recursively) those of each subdirectory,
    /// in `ls -R` order. Only a failure to read `dir` itself is an error; unreadable
    /// subdirectories are skipped like `ls` skips them.
    fn list_directory(
        &mut self,
        mut dir: Dir,
        prefix: &str,
        recursive: bool,
        depth: usize,
    ) -> nix::Result<()> {
        let names = self.visible_names(&mut dir)?;
        let mut subdirectories = Vec::new();
        for name in names {
            if self.entries.len() >= MAX_ENTRIES {
                return Ok(());
            }
            let Ok(stat) = fstatat(&dir, name.as_slice(), AtFlags::AT_SYMLINK_NOFOLLOW) else {
                continue;
            };
            let display = format!("{prefix}{}", String::from_utf8_lossy(&name));
            let link_target = link_target(&dir, &name, &stat);
            self.entries.push(self.entry(display, &stat, link_target));
            if recursive && file_type(&stat) == SFlag::S_IFDIR {
                subdirectories.push(name);
            }
        }
        if depth >= MAX_DEPTH {
            return Ok(());
        }
        for name in subdirectories {
            let Ok(child) = open_child_directory(&dir, &name).and_then(Dir::from_fd) else {
                continue;
            };
            let child_prefix = format!("{prefix}{}/", String::from_utf8_lossy(&name));
            // An unreadable subdirectory does not end the listing (`ls` goes on too).
            let _ = self.list_directory(child, &child_prefix, true, depth + 1);
        }
        Ok(())
    }

    /// The names of `dir` that `ls` shows without `-a`, in byte order.
    fn visible_names(&mut self, dir: &mut Dir) -> nix::Result<Vec<Vec<u8>>> {
        let mut names = Vec::new();
        for entry in dir.iter() {
            if self.scans_left == 0 {
                break;
            }
            self.scans_left -= 1;
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if !name.starts_with(b".") {
                names.push(name.to_vec());
            }
        }
        names.sort_unstable();
        Ok(names)
    }

    fn entry(&self, name: String, stat: &FileStat, link_target: Option<String>) -> Entry {
        Entry {
            name,
            entry_type: entry_type(stat.st_mode),
            link_target,
            size: u64::try_from(stat.st_size).unwrap_or(0),
            modification_time: stat.st_mtime,
            permissions: permissions(stat.st_mode),
            owner: self.names.owner(stat.st_uid),
            group: self.names.group(stat.st_gid),
        }
    }
}

/// The target of a symlink; `None` for other types and for unreadable links (which `ls`
/// prints without ` -> `).
fn link_target(parent: impl AsFd, name: &[u8], stat: &FileStat) -> Option<String> {
    if file_type(stat) != SFlag::S_IFLNK {
        return None;
    }
    readlinkat(parent, name).ok().map(|target| target.to_string_lossy().into_owned())
}

fn with_trailing_slash(path: &str) -> String {
    if path.ends_with('/') { path.to_owned() } else { format!("{path}/") }
}

/// The first character of an `ls -l` line.
pub(super) fn entry_type(mode: u32) -> char {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => '-',
        SFlag::S_IFDIR => 'd',
        SFlag::S_IFLNK => 'l',
        SFlag::S_IFIFO => 'p',
        SFlag::S_IFSOCK => 's',
        SFlag::S_IFCHR => 'c',
        SFlag::S_IFBLK => 'b',
        _ => '?',
    }
}

/// The nine permission characters of an `ls -l` line, with `s`/`S` for set-id bits and
/// `t`/`T` for the sticky bit (upper case when the execute bit under it is missing).
pub(super) fn permissions(mode: u32) -> String {
    let flag = |bit: u32, set: char| if mode & bit != 0 { set } else { '-' };
    let execute = |bit: u32, special: u32, with_exec: char, without_exec: char| match (
        mode & bit != 0,
        mode & special != 0,
    ) {
        (true, true) => with_exec,
        (false, true) => without_exec,
        (true, false) => 'x',
        (false, false) => '-',
    };
    [
        flag(0o400, 'r'),
        flag(0o200, 'w'),
        execute(0o100, 0o4000, 's', 'S'),
        flag(0o040, 'r'),
        flag(0o020, 'w'),
        execute(0o010, 0o2000, 's', 'S'),
        flag(0o004, 'r'),
        flag(0o002, 'w'),
        execute(0o001, 0o1000, 't', 'T'),
    ]
    .into_iter()
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_render_like_ls() {
        assert_eq!(permissions(0o100_744), "rwxr--r--");
        assert_eq!(permissions(0o041_777), "rwxrwxrwt");
        assert_eq!(permissions(0o041_776), "rwxrwxrwT");
        assert_eq!(permissions(0o104_755), "rwsr-xr-x");
        assert_eq!(permissions(0o104_644), "rwSr--r--");
        assert_eq!(permissions(0o102_755), "rwxr-sr-x");
        assert_eq!(permissions(0o102_745), "rwxr-Sr-x");
        assert_eq!(permissions(0o100_000), "---------");
        assert_eq!(permissions(0o107_777), "rwsrwsrwt");
    }

    #[test]
    fn entry_types_render_like_ls() {
        assert_eq!(entry_type(0o100_644), '-');
        assert_eq!(entry_type(0o040_755), 'd');
        assert_eq!(entry_type(0o120_777), 'l');
        assert_eq!(entry_type(0o010_644), 'p');
        assert_eq!(entry_type(0o140_755), 's');
        assert_eq!(entry_type(0o020_666), 'c');
        assert_eq!(entry_type(0o060_660), 'b');
    }

    #[test]
    fn recursive_prefix_gets_exactly_one_trailing_slash() {
        assert_eq!(with_trailing_slash("./"), "./");
        assert_eq!(with_trailing_slash("."), "./");
        assert_eq!(with_trailing_slash("/workspace"), "/workspace/");
        assert_eq!(with_trailing_slash("dir"), "dir/");
    }
}
