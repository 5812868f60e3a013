//! The image store: content-addressed blobs, one unpacked root file system per image, and an
//! index of references.
//!
//! ```text
//! <root>/blobs/sha256/<hex>   layers, configs (written to tmp/, verified, then renamed)
//! <root>/rootfs/<hex>/        the unpacked image whose config digest is <hex>; read-only use
//! <root>/images.json          reference → image record
//! <root>/tmp/                 downloads and unpacks in progress; emptied when the store opens
//! <root>/lock                 flock: one writer of the index and the root file systems at a time
//! <root>/transfers.lock       flock: shared by imports and pulls, exclusive while collecting
//! ```
//!
//! A root file system appears under `rootfs/` only complete (unpacked in `tmp/`, then renamed),
//! so a crash never leaves a half-unpacked image that is used later. Installing takes the lock
//! and unpacks only when the image's root file system is missing, so concurrent pulls of one
//! image (from the service and the CLI alike) unpack it once.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::reference::{self, ReferenceError};
use crate::unpack::{Budget, HashingReader, Rootfs, UnpackError};

const INDEX: &str = "images.json";
const INDEX_TMP: &str = "images.json.tmp";
/// Largest accepted index and image config.
const MAX_JSON_BYTES: u64 = 16 << 20;

/// Where the store lives and how it unpacks.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub root: PathBuf,
    /// Host id of a runner's root: unpacked files owned by id `n` in the image are owned by
    /// `uid_base + n` on the host, so they show their image owner inside a runner.
    pub uid_base: u32,
    /// Upper bound of an image's unpacked size, and of the blobs downloaded for it.
    pub max_image_bytes: u64,
}

/// What a runner needs of an image's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunConfig {
    /// `WorkingDir`; `None` when the image sets none.
    pub working_dir: Option<String>,
    /// `Env` as `KEY=value`.
    pub env: Vec<String>,
    /// `User`, for information: executions run as root or as the account `user`.
    pub user: Option<String>,
}

/// An image in the store, under one reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageRecord {
    /// Normalised like Docker: `docker.io/library/python:3.12`.
    pub reference: String,
    /// The config digest (`sha256:…`): the image's identity; its root file system is named by it.
    pub id: String,
    /// Layer blob digests, bottom first.
    pub layers: Vec<String>,
    pub config: RunConfig,
    /// Unpacked size in bytes.
    pub size: u64,
}

/// A failed store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("image store {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("image store index {path} is corrupt: {source}")]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("image {0} is not in the store")]
    NotFound(String),
    #[error("image {reference} is used by execution environment(s) {users}; delete them first")]
    InUse { reference: String, users: String },
    #[error("blob {digest} does not match its content (got {actual})")]
    Digest { digest: String, actual: String },
    #[error("invalid digest {0:?}: only sha256 is supported")]
    InvalidDigest(String),
    #[error("blob {digest} exceeds the image size limit of {limit} bytes")]
    TooLarge { digest: String, limit: u64 },
    #[error("invalid image config {digest}: {source}")]
    Config { digest: String, source: serde_json::Error },
    #[error("image {id}: {source}")]
    Unpack { id: String, source: UnpackError },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_owned(), source }
}

/// A handle on the store; cheap to clone, safe to use from several processes.
#[derive(Debug, Clone)]
pub struct Store {
    config: StoreConfig,
}

/// The image config fields we read (Docker's and OCI's are the same JSON).
#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<ContainerConfig>,
    #[serde(default)]
    rootfs: Option<RootfsConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfig {
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RootfsConfig {
    #[serde(default)]
    diff_ids: Vec<String>,
}

impl Store {
    /// Creates the directories when needed and removes leftovers of interrupted operations.
    pub fn open(config: StoreConfig) -> Result<Store, StoreError> {
        let store = Store { config };
        for dir in [store.root().to_owned(), store.blobs_dir(), store.rootfs_dir(), store.tmp_dir()]
        {
            fs::DirBuilder::new()
                .mode(0o755)
                .recursive(true)
                .create(&dir)
                .map_err(io_error(&dir))?;
        }
        // A runner's root (an unprivileged host id) must traverse to its image.
        for dir in [store.root().to_owned(), store.rootfs_dir()] {
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).map_err(io_error(&dir))?;
        }
        let _lock = store.lock()?;
        if let Some(_collecting) = store.try_collect()? {
            store.clean_tmp()?;
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.config.root
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root().join("blobs/sha256")
    }

    fn rootfs_dir(&self) -> PathBuf {
        self.root().join("rootfs")
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root().join("tmp")
    }

    /// The unpacked root file system of an image.
    pub fn rootfs(&self, record: &ImageRecord) -> PathBuf {
        self.rootfs_dir().join(hex_of(&record.id).unwrap_or("invalid"))
    }

    /// Serialises changes of the index and of `rootfs/`.
    fn lock(&self) -> Result<Flock<File>, StoreError> {
        self.flock("lock", FlockArg::LockExclusive)
    }

    /// Held (shared) by every import and pull from its first download to its install, so that
    /// garbage collection never deletes blobs or downloads in flight.
    pub(crate) fn begin_transfer(&self) -> Result<Flock<File>, StoreError> {
        self.flock("transfers.lock", FlockArg::LockShared)
    }

    /// Exclusive hold on `transfers.lock` when no transfer runs; `None` otherwise (then the
    /// collection is left to a later removal or start).
    fn try_collect(&self) -> Result<Option<Flock<File>>, StoreError> {
        match self.flock("transfers.lock", FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(lock)),
            Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::WouldBlock => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn flock(&self, name: &str, how: FlockArg) -> Result<Flock<File>, StoreError> {
        let path = self.root().join(name);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error(&path))?;
        Flock::lock(file, how).map_err(|(_, errno)| StoreError::Io { path, source: errno.into() })
    }

    fn clean_tmp(&self) -> Result<(), StoreError> {
        let tmp = self.tmp_dir();
        for entry in fs::read_dir(&tmp).map_err(io_error(&tmp))? {
            let path = entry.map_err(io_error(&tmp))?.path();
            let removed =
                if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
            removed.map_err(io_error(&path))?;
        }
        Ok(())
    }

    /// All images, by reference.
    pub fn list(&self) -> Result<Vec<ImageRecord>, StoreError> {
        Ok(self.read_index()?.into_values().collect())
    }

    /// The image a reference names (normalised first), if it is in the store.
    pub fn get(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        let reference = reference::normalize(name)?;
        Ok(self.read_index()?.remove(&reference))
    }

    /// Removes a reference; the image's root file system and blobs go when no other reference
    /// needs them. `users_of` names the execution environments that use the reference; removal
    /// is refused when there are any.
    pub fn remove(
        &self,
        name: &str,
        users_of: impl FnOnce(&ImageRecord) -> Vec<String>,
    ) -> Result<ImageRecord, StoreError> {
        let reference = reference::normalize(name)?;
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        let record = index
            .get(&reference)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(reference.clone()))?;
        let users = users_of(&record);
        if !users.is_empty() {
            return Err(StoreError::InUse { reference, users: users.join(", ") });
        }
        index.remove(&reference);
        self.write_index(&index)?;
        if !index.values().any(|r| r.id == record.id) {
            self.remove_rootfs(&record)?;
        }
        if let Some(_collecting) = self.try_collect()? {
            self.collect_blobs(&index)?;
        }
        Ok(record)
    }

    /// Moved to `tmp/` first, so an interrupted removal never leaves a partial root in use.
    fn remove_rootfs(&self, record: &ImageRecord) -> Result<(), StoreError> {
        let rootfs = self.rootfs(record);
        let doomed = self.tmp_dir().join(format!("removed-{}", hex_of(&record.id).unwrap_or("x")));
        match fs::rename(&rootfs, &doomed) {
            Ok(()) => fs::remove_dir_all(&doomed).map_err(io_error(&doomed)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io { path: rootfs, source }),
        }
    }

    /// Deletes blobs no image refers to (no transfer runs: see [`Store::begin_transfer`]).
    fn collect_blobs(&self, index: &BTreeMap<String, ImageRecord>) -> Result<(), StoreError> {
        let referenced: std::collections::HashSet<&str> = index
            .values()
            .flat_map(|r| r.layers.iter().chain(std::iter::once(&r.id)))
            .filter_map(|d| hex_of(d))
            .collect();
        let blobs = self.blobs_dir();
        for entry in fs::read_dir(&blobs).map_err(io_error(&blobs))? {
            let entry = entry.map_err(io_error(&blobs))?;
            if !referenced.contains(entry.file_name().to_string_lossy().as_ref()) {
                fs::remove_file(entry.path()).map_err(io_error(&entry.path()))?;
            }
        }
        Ok(())
    }

    fn read_index(&self) -> Result<BTreeMap<String, ImageRecord>, StoreError> {
        let path = self.root().join(INDEX);
        let mut text = Vec::new();
        match File::open(&path) {
            Ok(file) => {
                file.take(MAX_JSON_BYTES).read_to_end(&mut text).map_err(io_error(&path))?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        serde_json::from_slice(&text).map_err(|source| StoreError::Corrupt { path, source })
    }

    fn write_index(&self, index: &BTreeMap<String, ImageRecord>) -> Result<(), StoreError> {
        let tmp = self.root().join(INDEX_TMP);
        let json = serde_json::to_vec_pretty(index).expect("records always serialize");
        let mut file = File::create(&tmp).map_err(io_error(&tmp))?;
        file.write_all(&json).and_then(|()| file.sync_all()).map_err(io_error(&tmp))?;
        let path = self.root().join(INDEX);
        fs::rename(&tmp, &path).map_err(io_error(&path))
    }

    /// Whether a blob is stored.
    pub(crate) fn has_blob(&self, digest: &str) -> Result<bool, StoreError> {
        Ok(self.blob_path(digest)?.is_file())
    }

    pub(crate) fn blob_path(&self, digest: &str) -> Result<PathBuf, StoreError> {
        let hex = hex_of(digest).ok_or_else(|| StoreError::InvalidDigest(digest.to_owned()))?;
        Ok(self.blobs_dir().join(hex))
    }

    /// Stores a blob read from `content`; its digest must be `expected` when given. Returns the
    /// digest.
    pub(crate) fn put_blob(
        &self,
        content: impl Read,
        expected: Option<&str>,
    ) -> Result<String, StoreError> {
        if let Some(expected) = expected {
            self.blob_path(expected)?;
            if self.has_blob(expected)? {
                return Ok(expected.to_owned());
            }
        }
        let limit = self.config.max_image_bytes;
        let mut temp =
            tempfile::NamedTempFile::new_in(self.tmp_dir()).map_err(io_error(&self.tmp_dir()))?;
        let mut hashing = HashingReader::new(content.take(limit.saturating_add(1)));
        let written = io::copy(&mut hashing, temp.as_file_mut()).map_err(io_error(temp.path()))?;
        let actual = hashing.digest();
        if written > limit {
            return Err(StoreError::TooLarge {
                digest: expected.unwrap_or(&actual).to_owned(),
                limit,
            });
        }
        self.commit_blob(temp, &actual, expected)
    }

    /// Moves a downloaded blob into place after checking its digest.
    pub(crate) fn commit_blob(
        &self,
        temp: tempfile::NamedTempFile,
        actual: &str,
        expected: Option<&str>,
    ) -> Result<String, StoreError> {
        if let Some(expected) = expected
            && expected != actual
        {
            return Err(StoreError::Digest {
                digest: expected.to_owned(),
                actual: actual.to_owned(),
            });
        }
        let path = self.blob_path(actual)?;
        temp.as_file().sync_all().map_err(io_error(temp.path()))?;
        temp.persist(&path).map_err(|e| StoreError::Io { path, source: e.error })?;
        Ok(actual.to_owned())
    }

    /// Records `references` for the image whose config and layer blobs are stored, unpacking
    /// it first unless its root file system exists.
    pub(crate) fn install(
        &self,
        references: &[String],
        config_digest: &str,
        layers: &[String],
    ) -> Result<ImageRecord, StoreError> {
        let config_path = self.blob_path(config_digest)?;
        let mut text = Vec::new();
        File::open(&config_path)
            .and_then(|f| f.take(MAX_JSON_BYTES).read_to_end(&mut text))
            .map_err(io_error(&config_path))?;
        let config: ConfigFile = serde_json::from_slice(&text)
            .map_err(|source| StoreError::Config { digest: config_digest.to_owned(), source })?;
        let _lock = self.lock()?;
        let mut record = ImageRecord {
            reference: String::new(),
            id: config_digest.to_owned(),
            layers: layers.to_vec(),
            config: run_config(&config),
            size: 0,
        };
        let rootfs = self.rootfs(&record);
        let mut index = self.read_index()?;
        record.size = match index.values().find(|r| r.id == record.id) {
            Some(existing) if rootfs.is_dir() => existing.size,
            _ => self.unpack(&record, &config, &rootfs)?,
        };
        for reference in references {
            index.insert(
                reference.clone(),
                ImageRecord { reference: reference.clone(), ..record.clone() },
            );
        }
        self.write_index(&index)?;
        record.reference = references.first().cloned().unwrap_or_default();
        Ok(record)
    }

    /// Unpacks all layers into a fresh directory in `tmp/` and renames it into place.
    fn unpack(
        &self,
        record: &ImageRecord,
        config: &ConfigFile,
        rootfs: &Path,
    ) -> Result<u64, StoreError> {
        let started = std::time::Instant::now();
        let unpack_error = |source| StoreError::Unpack { id: record.id.clone(), source };
        let staging = tempfile::Builder::new()
            .prefix("rootfs-")
            .tempdir_in(self.tmp_dir())
            .map_err(io_error(&self.tmp_dir()))?;
        let root_owner = Some(nix::unistd::Uid::from_raw(self.config.uid_base));
        let root_group = Some(nix::unistd::Gid::from_raw(self.config.uid_base));
        nix::unistd::chown(staging.path(), root_owner, root_group)
            .map_err(|e| StoreError::Io { path: staging.path().to_owned(), source: e.into() })?;
        fs::set_permissions(staging.path(), fs::Permissions::from_mode(0o755))
            .map_err(io_error(staging.path()))?;
        let root =
            Rootfs::open(staging.path(), self.config.uid_base).map_err(io_error(staging.path()))?;
        let diff_ids = config.rootfs.as_ref().map(|r| r.diff_ids.as_slice()).unwrap_or_default();
        let mut budget = Budget::new(self.config.max_image_bytes);
        for (position, layer) in record.layers.iter().enumerate() {
            let path = self.blob_path(layer)?;
            let file = File::open(&path).map_err(io_error(&path))?;
            root.apply_layer(file, diff_ids.get(position).map(String::as_str), &mut budget)
                .map_err(unpack_error)?;
        }
        if let Some(dir) = record.config.working_dir.as_deref().filter(|d| d.starts_with('/')) {
            root.ensure_dir(dir).map_err(io_error(staging.path()))?;
        }
        fs::rename(staging.path(), rootfs).map_err(io_error(rootfs))?;
        // The directory now lives on under its final name; nothing is left to clean up.
        let _ = staging.keep();
        tracing::info!(id = %record.id, bytes = budget.used(), elapsed_ms = started.elapsed().as_millis() as u64, "image unpacked");
        Ok(budget.used())
    }
}

fn run_config(config: &ConfigFile) -> RunConfig {
    let container = config.config.as_ref();
    RunConfig {
        working_dir: container.and_then(|c| c.working_dir.clone()).filter(|d| !d.is_empty()),
        env: container.and_then(|c| c.env.clone()).unwrap_or_default(),
        user: container.and_then(|c| c.user.clone()).filter(|u| !u.is_empty()),
    }
}

/// The hex part of a `sha256:` digest, when it is one.
pub(crate) fn hex_of(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
        .then_some(hex)
}
