//! Applying layers to a root file system, whatever the archive contains.
//!
//! Every entry is placed like a `chroot`ed `tar` would place it, without a chroot: names are
//! cleaned lexically (`..` stops at the root), the parent directory is resolved with
//! `openat2(RESOLVE_IN_ROOT)` (symlinks, even absolute ones, resolve inside the root), and the
//! last component is created with `*at` calls relative to that parent without following it.
//! So neither `../` names, absolute names nor a symlink planted by an earlier entry can make
//! an entry land outside the root. Devices are skipped; ownership is shifted into the ids a
//! runner's user namespace maps; a byte budget bounds what one image may write.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use rustix::fs::{
    AtFlags, Dir, FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps, Uid,
};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

/// Ids mapped into a runner's user namespace; ids above appear as `nobody` there.
pub const MAPPED_IDS: u32 = 65536;
const NOBODY: u32 = 65534;
/// What an entry's header costs of the budget: empty files are not free (inodes).
const ENTRY_COST: u64 = 512;
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// How deep a directory removed by a whiteout may nest.
const MAX_REMOVE_DEPTH: usize = 1024;

/// A layer that could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("cannot read the layer: {0}")]
    Read(#[source] io::Error),
    #[error("cannot apply {path:?}: {source}")]
    Apply { path: String, source: io::Error },
    #[error("the image exceeds the size limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("layer content does not match its digest: expected {expected}, got {actual}")]
    DiffId { expected: String, actual: String },
}

/// Bytes an image may still write.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: u64,
    used: u64,
}

impl Budget {
    pub(crate) fn new(limit: u64) -> Budget {
        Budget { limit, used: 0 }
    }

    fn charge(&mut self, bytes: u64) -> Result<(), UnpackError> {
        self.used = self.used.saturating_add(bytes);
        if self.used > self.limit {
            return Err(UnpackError::TooLarge { limit: self.limit });
        }
        Ok(())
    }

    fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.used)
    }

    pub(crate) fn used(&self) -> u64 {
        self.used
    }
}

/// A root file system being built.
#[derive(Debug)]
pub(crate) struct Rootfs {
    root: OwnedFd,
    uid_base: u32,
}

impl Rootfs {
    /// Opens an existing, empty-or-partial root directory.
    pub(crate) fn open(path: &Path, uid_base: u32) -> io::Result<Rootfs> {
        let root = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Rootfs { root, uid_base })
    }

    /// Applies one layer (gzip, zstd or plain tar) and returns its diff id (`sha256:` of the
    /// uncompressed tar), after checking it against `expected_diff_id` when given.
    pub(crate) fn apply_layer(
        &self,
        layer: impl Read,
        expected_diff_id: Option<&str>,
        budget: &mut Budget,
    ) -> Result<String, UnpackError> {
        let mut hashing = HashingReader::new(decompress(layer).map_err(UnpackError::Read)?);
        let mut layer_state = LayerState::default();
        {
            let mut archive = tar::Archive::new(&mut hashing);
            for entry in archive.entries().map_err(UnpackError::Read)? {
                let mut entry = entry.map_err(UnpackError::Read)?;
                budget.charge(ENTRY_COST)?;
                self.apply_entry(&mut entry, &mut layer_state, budget)?;
            }
        }
        // The digest covers the whole stream, including what follows the end-of-archive blocks.
        let mut rest = (&mut hashing).take(budget.remaining().saturating_add(1));
        let trailing = io::copy(&mut rest, &mut io::sink()).map_err(UnpackError::Read)?;
        budget.charge(trailing)?;
        let actual = hashing.digest();
        match expected_diff_id {
            Some(expected) if expected != actual => {
                Err(UnpackError::DiffId { expected: expected.to_owned(), actual })
            }
            _ => Ok(actual),
        }
    }

    fn apply_entry<R: Read>(
        &self,
        entry: &mut tar::Entry<R>,
        layer: &mut LayerState,
        budget: &mut Budget,
    ) -> Result<(), UnpackError> {
        let raw_name = entry.path_bytes().into_owned();
        let components = clean_components(&raw_name);
        let shown = String::from_utf8_lossy(&raw_name).into_owned();
        let error = |source: io::Error| UnpackError::Apply { path: shown.clone(), source };
        let Some((name, parents)) = components.split_last() else {
            return Ok(()); // the root itself keeps its own attributes
        };
        if name.as_bytes() == OPAQUE_MARKER {
            let parent = self.parent(parents, true).map_err(error)?;
            return self.make_opaque(parent.as_fd(), parents, layer).map_err(error);
        }
        if let Some(hidden) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX) {
            return match self.parent(parents, false) {
                Ok(parent) => {
                    remove_at(parent.as_fd(), OsStr::from_bytes(hidden), 0).map_err(error)
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(error(e)),
            };
        }
        let header = entry.header();
        let kind = header.entry_type();
        let owner =
            (self.map_id(header.uid().unwrap_or(0)), self.map_id(header.gid().unwrap_or(0)));
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let mtime = header.mtime().unwrap_or(0);
        let parent = self.parent(parents, true).map_err(error)?;
        let parent = parent.as_fd();
        let name = name.as_os_str();
        layer
            .created
            .insert(components.iter().map(|c| c.as_bytes()).collect::<Vec<_>>().join(&b'/'));
        match kind {
            tar::EntryType::Directory => self.make_dir(parent, name, owner, mode).map_err(error),
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                budget.charge(entry.size())?;
                self.write_file(parent, name, entry, owner, mode, mtime).map_err(error)
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| error(invalid("symlink without target")))?;
                replace_with(parent, name, |p, n| {
                    rustix::fs::symlinkat(OsStr::from_bytes(&target), p, n)
                })
                .map_err(error)?;
                chown_at(parent, name, owner).map_err(error)?;
                set_mtime_at(parent, name, mtime).map_err(error)
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| error(invalid("hard link without target")))?;
                self.hard_link(parent, name, &target).map_err(error)
            }
            // Devices and FIFOs have no business in a runner's image; the runner gets its own /dev.
            _ => Ok(()),
        }
    }

    fn map_id(&self, id: u64) -> u32 {
        let inside = u32::try_from(id).ok().filter(|id| *id < MAPPED_IDS).unwrap_or(NOBODY);
        self.uid_base + inside
    }

    /// The directory `components` inside the root, following symlinks inside the root only;
    /// missing directories are created (owned by the runner's root) when `create` is set.
    fn parent(&self, components: &[OsString], create: bool) -> io::Result<OwnedFd> {
        let mut current = rustix::io::fcntl_dupfd_cloexec(&self.root, 0)?;
        for depth in 0..components.len() {
            let prefix = join(&components[..=depth]);
            match open_in_root(self.root.as_fd(), &prefix) {
                Ok(fd) => current = fd,
                Err(Errno::NOENT) if create => {
                    let name = &components[depth];
                    rustix::fs::mkdirat(&current, name.as_os_str(), Mode::from_raw_mode(0o755))?;
                    chown_at(current.as_fd(), name, (self.uid_base, self.uid_base))?;
                    current = open_in_root(self.root.as_fd(), &prefix)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(current)
    }

    fn make_dir(
        &self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        owner: (u32, u32),
        mode: u32,
    ) -> io::Result<()> {
        match kind_at(parent, name)? {
            Some(FileType::Directory) => {}
            Some(_) => {
                remove_at(parent, name, 0)?;
                rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700))?;
            }
            None => rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700))?,
        }
        chown_at(parent, name, owner)?;
        rustix::fs::chmodat(parent, name, Mode::from_raw_mode(mode), AtFlags::empty())?;
        Ok(())
    }

    fn write_file(
        &self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        content: &mut impl Read,
        owner: (u32, u32),
        mode: u32,
        mtime: u64,
    ) -> io::Result<()> {
        remove_at(parent, name, 0)?;
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(parent, name, flags, Mode::from_raw_mode(0o600))?;
        let mut file = std::fs::File::from(fd);
        io::copy(content, &mut file)?;
        file.flush()?;
        rustix::fs::fchown(&file, Some(Uid::from_raw(owner.0)), Some(Gid::from_raw(owner.1)))?;
        rustix::fs::fchmod(&file, Mode::from_raw_mode(mode))?;
        rustix::fs::futimens(&file, &timestamps(mtime))?;
        Ok(())
    }

    fn hard_link(&self, parent: BorrowedFd<'_>, name: &OsStr, target: &[u8]) -> io::Result<()> {
        let components = clean_components(target);
        let Some((target_name, target_parents)) = components.split_last() else {
            return Err(invalid("hard link to the root"));
        };
        let target_parent = self.parent(target_parents, false)?;
        replace_with(parent, name, |p, n| {
            rustix::fs::linkat(&target_parent, target_name.as_os_str(), p, n, AtFlags::empty())
        })
    }

    /// Removes what lower layers put into the directory; what this layer made stays.
    fn make_opaque(
        &self,
        dir: BorrowedFd<'_>,
        path: &[OsString],
        layer: &LayerState,
    ) -> io::Result<()> {
        let prefix = path.iter().map(|c| c.as_bytes()).collect::<Vec<_>>().join(&b'/');
        for child in list_dir(dir)? {
            let mut full = prefix.clone();
            if !full.is_empty() {
                full.push(b'/');
            }
            full.extend_from_slice(child.as_bytes());
            if !layer.created.contains(&full) {
                remove_at(dir, &child, 0)?;
            }
        }
        Ok(())
    }

    /// Makes sure `path` (an image's `WorkingDir`) exists, as Docker does when it creates a container.
    pub(crate) fn ensure_dir(&self, path: &str) -> io::Result<()> {
        let components = clean_components(path.as_bytes());
        self.parent(&components, true).map(drop)
    }
}

/// Entries of the layer being applied, for opaque directories.
#[derive(Debug, Default)]
struct LayerState {
    created: HashSet<Vec<u8>>,
}

/// `a/./b/../../../c` → `[c]`: `..` never climbs above the root, like in a chroot.
pub(crate) fn clean_components(name: &[u8]) -> Vec<OsString> {
    let mut components: Vec<OsString> = Vec::new();
    for part in name.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                components.pop();
            }
            part => components.push(OsString::from_vec(part.to_vec())),
        }
    }
    components
}

fn join(components: &[OsString]) -> OsString {
    let bytes = components.iter().map(|c| c.as_bytes()).collect::<Vec<_>>().join(&b'/');
    OsString::from_vec(bytes)
}

fn open_in_root(root: BorrowedFd<'_>, path: &OsStr) -> Result<OwnedFd, Errno> {
    rustix::fs::openat2(
        root,
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
}

fn kind_at(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<FileType>> {
    match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => Ok(Some(FileType::from_raw_mode(stat.st_mode))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Removes whatever is at `name` (a directory with its content), never following a symlink.
fn remove_at(parent: BorrowedFd<'_>, name: &OsStr, depth: usize) -> io::Result<()> {
    match kind_at(parent, name)? {
        None => Ok(()),
        Some(FileType::Directory) => {
            if depth >= MAX_REMOVE_DEPTH {
                return Err(invalid("directory nested too deeply"));
            }
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let dir = rustix::fs::openat(parent, name, flags, Mode::empty())?;
            for child in list_dir(dir.as_fd())? {
                remove_at(dir.as_fd(), &child, depth + 1)?;
            }
            Ok(rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)?)
        }
        Some(_) => Ok(rustix::fs::unlinkat(parent, name, AtFlags::empty())?),
    }
}

/// Names in a directory; `dir` may be an `O_PATH` descriptor (reopened for reading).
fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let readable = rustix::fs::openat(dir, ".", flags, Mode::empty())?;
    let mut names = Vec::new();
    for entry in Dir::read_from(&readable)? {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(OsString::from_vec(name));
        }
    }
    Ok(names)
}

/// Removes what is at `name` and creates the new entry there.
fn replace_with(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    create: impl FnOnce(BorrowedFd<'_>, &OsStr) -> Result<(), Errno>,
) -> io::Result<()> {
    remove_at(parent, name, 0)?;
    Ok(create(parent, name)?)
}

fn chown_at(parent: BorrowedFd<'_>, name: &OsStr, (uid, gid): (u32, u32)) -> io::Result<()> {
    rustix::fs::chownat(
        parent,
        name,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

fn set_mtime_at(parent: BorrowedFd<'_>, name: &OsStr, mtime: u64) -> io::Result<()> {
    rustix::fs::utimensat(parent, name, &timestamps(mtime), AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

fn timestamps(mtime: u64) -> Timestamps {
    let time = Timespec { tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX), tv_nsec: 0 };
    Timestamps { last_access: time, last_modification: time }
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

/// Recognises gzip and zstd by their magic numbers (media types lie, docker archives say none).
pub(crate) fn decompress<'a>(layer: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let mut reader = BufReader::new(layer);
    let head = reader.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(reader)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let decoder = ruzstd::decoding::StreamingDecoder::new(reader)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        Ok(Box::new(decoder))
    } else {
        Ok(Box::new(reader))
    }
}

/// Hashes what passes through (a layer's diff id, a blob's digest).
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        HashingReader { inner, hasher: Sha256::new() }
    }

    /// `sha256:<hex>` of everything read so far.
    pub(crate) fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.clone().finalize()))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

impl<R> std::fmt::Debug for HashingReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashingReader").finish_non_exhaustive()
    }
}
