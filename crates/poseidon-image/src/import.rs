//! `poseidon image import`: a `docker save` archive or an OCI image layout (a directory or a
//! tar of one) into the store.
//!
//! A tar is read twice without unpacking it: once to find every member's offset, then once
//! per blob straight from those offsets. Names inside the archive are only looked up, never
//! used as paths on the host.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::reference::{self, ReferenceError};
use crate::store::{ImageRecord, Store, StoreError, hex_of};
use crate::unpack::clean_components;

/// Members an archive may have (bounds the offset table).
const MAX_MEMBERS: usize = 100_000;
/// Largest accepted `manifest.json`, `index.json` or image manifest.
const MAX_JSON_BYTES: u64 = 4 << 20;
/// How deep nested image indexes may go.
const MAX_INDEX_DEPTH: usize = 4;
const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// A failed import.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{0} is neither a docker save archive nor an OCI image layout")]
    UnknownFormat(PathBuf),
    #[error("the archive has no member {0:?}")]
    Missing(String),
    #[error("invalid {what}: {source}")]
    Json { what: String, source: serde_json::Error },
    #[error("the archive has more than {MAX_MEMBERS} members")]
    TooManyMembers,
    #[error("the archive exceeds {limit} bytes (twice local.maximagesize)")]
    TooLarge { limit: u64 },
    #[error("the archive holds no image")]
    Empty,
    #[error("image {0} has no name: give one with --tag")]
    Unnamed(String),
    #[error("unsupported manifest: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Imports every image of the archive at `path`; `tag` names them (instead of the names the
/// archive carries). Blocking.
pub fn import(
    store: &Store,
    path: &Path,
    tag: Option<&str>,
) -> Result<Vec<ImageRecord>, ImportError> {
    let archive = Archive::open(path)?;
    let images = if archive.has("manifest.json") {
        docker_images(&archive)?
    } else if archive.has("index.json") {
        oci_images(&archive)?
    } else {
        return Err(ImportError::UnknownFormat(path.to_owned()));
    };
    if images.is_empty() {
        return Err(ImportError::Empty);
    }
    let _transfer = store.begin_transfer()?;
    let mut records = Vec::new();
    for image in images {
        let names = match tag {
            Some(tag) => vec![reference::normalize(tag)?],
            None => {
                image.names.iter().map(|n| reference::normalize(n)).collect::<Result<_, _>>()?
            }
        };
        if names.is_empty() {
            return Err(ImportError::Unnamed(image.config.clone()));
        }
        let config =
            store.put_blob(archive.open_member(&image.config)?, image.config_digest.as_deref())?;
        let mut layers = Vec::new();
        for layer in &image.layers {
            layers.push(
                store.put_blob(archive.open_member(&layer.member)?, layer.digest.as_deref())?,
            );
        }
        records.push(store.install(&names, &config, &layers)?);
    }
    Ok(records)
}

/// Imports an archive read from a stream (`docker save IMAGE | poseidon image import -`). It is
/// spooled into the store's `tmp/` first, as archives are read by offset; at most twice
/// `max_image_bytes` (a `docker save` archive holds uncompressed layers).
pub fn import_stream(
    store: &Store,
    stream: impl Read,
    tag: Option<&str>,
) -> Result<Vec<ImageRecord>, ImportError> {
    let _transfer = store.begin_transfer()?;
    let tmp = store.tmp_dir();
    let read_error = |source| ImportError::Read { path: tmp.clone(), source };
    let mut spool = tempfile::NamedTempFile::new_in(&tmp).map_err(read_error)?;
    let limit = store.config().max_image_bytes.saturating_mul(2);
    let copied = io::copy(&mut stream.take(limit.saturating_add(1)), spool.as_file_mut())
        .map_err(read_error)?;
    if copied > limit {
        return Err(ImportError::TooLarge { limit });
    }
    import(store, spool.path(), tag)
}

/// One image found in an archive: member names and, where the format states them, digests.
#[derive(Debug)]
struct FoundImage {
    names: Vec<String>,
    config: String,
    config_digest: Option<String>,
    layers: Vec<FoundLayer>,
}

#[derive(Debug)]
struct FoundLayer {
    member: String,
    digest: Option<String>,
}

/// `manifest.json` of `docker save`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn docker_images(archive: &Archive) -> Result<Vec<FoundImage>, ImportError> {
    let manifests: Vec<DockerManifest> = archive.json("manifest.json")?;
    Ok(manifests
        .into_iter()
        .map(|m| FoundImage {
            names: m.repo_tags.unwrap_or_default(),
            config_digest: digest_of_member(&m.config),
            config: m.config,
            layers: m
                .layers
                .into_iter()
                .map(|member| FoundLayer { digest: digest_of_member(&member), member })
                .collect(),
        })
        .collect())
}

/// Newer `docker save` names members `blobs/sha256/<hex>`; their digest is then known.
fn digest_of_member(member: &str) -> Option<String> {
    let hex = member.strip_prefix("blobs/sha256/")?;
    let digest = format!("sha256:{hex}");
    hex_of(&digest).is_some().then_some(digest)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciIndexOrManifest {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

fn oci_images(archive: &Archive) -> Result<Vec<FoundImage>, ImportError> {
    let index: OciIndexOrManifest = archive.json("index.json")?;
    let mut images = Vec::new();
    for descriptor in index.manifests.unwrap_or_default() {
        let names = descriptor_names(&descriptor);
        images.push(oci_image(archive, &descriptor.digest, names, 0)?);
    }
    Ok(images)
}

/// A full reference from the annotations; a bare tag (what `skopeo copy oci:dir:tag` writes)
/// names nothing by itself.
fn descriptor_names(descriptor: &Descriptor) -> Vec<String> {
    [CONTAINERD_NAME, REF_NAME]
        .iter()
        .filter_map(|key| descriptor.annotations.get(*key))
        .find(|name| name.contains('/') || name.contains(':'))
        .cloned()
        .into_iter()
        .collect()
}

fn oci_image(
    archive: &Archive,
    digest: &str,
    names: Vec<String>,
    depth: usize,
) -> Result<FoundImage, ImportError> {
    let member = blob_member(digest)?;
    let manifest: OciIndexOrManifest = archive.json(&member)?;
    if let Some(manifests) = manifest.manifests {
        if depth >= MAX_INDEX_DEPTH {
            return Err(ImportError::Unsupported("image indexes nested too deeply".into()));
        }
        let chosen = choose_platform(&manifests)
            .ok_or_else(|| ImportError::Unsupported(format!("index {digest} lists no manifest")))?;
        return oci_image(archive, &chosen.digest, names, depth + 1);
    }
    let config = manifest.config.ok_or_else(|| {
        ImportError::Unsupported(format!("{digest} ({:?}) has no config", manifest.media_type))
    })?;
    let layers = manifest
        .layers
        .iter()
        .map(|layer| {
            Ok(FoundLayer {
                member: blob_member(&layer.digest)?,
                digest: Some(layer.digest.clone()),
            })
        })
        .collect::<Result<_, ImportError>>()?;
    Ok(FoundImage {
        names,
        config: blob_member(&config.digest)?,
        config_digest: Some(config.digest),
        layers,
    })
}

/// linux on this machine's architecture, else the first manifest that is not an attestation.
fn choose_platform(manifests: &[Descriptor]) -> Option<&Descriptor> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    manifests
        .iter()
        .find(|m| m.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == arch))
        .or_else(|| manifests.iter().find(|m| !m.media_type.is_empty() || m.platform.is_some()))
        .or_else(|| manifests.first())
}

fn blob_member(digest: &str) -> Result<String, ImportError> {
    let hex = hex_of(digest).ok_or_else(|| StoreError::InvalidDigest(digest.to_owned()))?;
    Ok(format!("blobs/sha256/{hex}"))
}

/// A directory or a tar, read by member name.
#[derive(Debug)]
enum Archive {
    Directory(PathBuf),
    Tar { path: PathBuf, members: HashMap<String, Member> },
}

#[derive(Debug, Clone)]
enum Member {
    File { offset: u64, size: u64 },
    Link(String),
}

impl Archive {
    fn open(path: &Path) -> Result<Archive, ImportError> {
        let read_error = |source| ImportError::Read { path: path.to_owned(), source };
        if path.is_dir() {
            return Ok(Archive::Directory(path.to_owned()));
        }
        let file = File::open(path).map_err(read_error)?;
        let mut archive = tar::Archive::new(file);
        let mut members = HashMap::new();
        for entry in archive.entries_with_seek().map_err(read_error)? {
            let entry = entry.map_err(read_error)?;
            if members.len() >= MAX_MEMBERS {
                return Err(ImportError::TooManyMembers);
            }
            let name = member_name(&entry.path_bytes());
            let member = match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    Member::File { offset: entry.raw_file_position(), size: entry.size() }
                }
                tar::EntryType::Symlink => {
                    let Some(target) = entry.link_name_bytes() else { continue };
                    let dir = name.rsplit_once('/').map_or("", |(dir, _)| dir);
                    Member::Link(member_name(
                        format!("{dir}/{}", String::from_utf8_lossy(&target)).as_bytes(),
                    ))
                }
                tar::EntryType::Link => {
                    let Some(target) = entry.link_name_bytes() else { continue };
                    Member::Link(member_name(&target))
                }
                _ => continue,
            };
            members.insert(name, member);
        }
        Ok(Archive::Tar { path: path.to_owned(), members })
    }

    fn has(&self, name: &str) -> bool {
        match self {
            Archive::Directory(dir) => dir.join(name).is_file(),
            Archive::Tar { members, .. } => members.contains_key(name),
        }
    }

    fn open_member(&self, name: &str) -> Result<Box<dyn Read>, ImportError> {
        let name = member_name(name.as_bytes());
        match self {
            Archive::Directory(dir) => {
                let path = dir.join(&name);
                let file = File::open(&path).map_err(|source| match source.kind() {
                    io::ErrorKind::NotFound => ImportError::Missing(name.clone()),
                    _ => ImportError::Read { path: path.clone(), source },
                })?;
                Ok(Box::new(file))
            }
            Archive::Tar { path, members } => {
                let (offset, size) = resolve(members, &name)?;
                let read_error = |source| ImportError::Read { path: path.clone(), source };
                let mut file = File::open(path).map_err(read_error)?;
                file.seek(SeekFrom::Start(offset)).map_err(read_error)?;
                Ok(Box::new(file.take(size)))
            }
        }
    }

    fn json<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<T, ImportError> {
        let mut text = Vec::new();
        self.open_member(name)?
            .take(MAX_JSON_BYTES)
            .read_to_end(&mut text)
            .map_err(|source| ImportError::Read { path: name.into(), source })?;
        serde_json::from_slice(&text)
            .map_err(|source| ImportError::Json { what: name.to_owned(), source })
    }
}

/// Follows links between members (old `docker save` links repeated layers), a few hops at most.
fn resolve(members: &HashMap<String, Member>, name: &str) -> Result<(u64, u64), ImportError> {
    let mut current = name.to_owned();
    for _ in 0..8 {
        match members.get(&current) {
            Some(Member::File { offset, size }) => return Ok((*offset, *size)),
            Some(Member::Link(target)) => current = target.clone(),
            None => break,
        }
    }
    Err(ImportError::Missing(name.to_owned()))
}

/// A member's name without `./`, `..` or leading `/`: only a lookup key, never a host path.
fn member_name(raw: &[u8]) -> String {
    clean_components(raw)
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}
