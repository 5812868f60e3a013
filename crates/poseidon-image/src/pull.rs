//! `poseidon image pull`: an image from an OCI registry into the store, with `oci-client`
//! doing the protocol (token and basic auth, manifest lists, digest checks).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWrite;

use crate::reference::{self, ReferenceError};
use crate::store::{ImageRecord, Store, StoreError, hex_of};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A registry that sends nothing for this long is given up on.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// Registries (`host[:port]`) spoken to over plain HTTP; all others need HTTPS.
    pub plain_http: Vec<String>,
    /// Credentials by registry (`docker.io`, `registry.example.org:5000`); anonymous otherwise.
    pub credentials: BTreeMap<String, Credentials>,
}

/// A registry account; registries that use token auth get the token with it.
#[derive(Clone, Default)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).finish_non_exhaustive()
    }
}

/// A failed pull.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("cannot pull {reference}: {source}")]
    Registry { reference: String, source: oci_client::errors::OciDistributionError },
    #[error("{reference}: the registry sent a config that does not match {digest}")]
    ConfigDigest { reference: String, digest: String },
    #[error("{reference}: its layers ({bytes} bytes) exceed the image size limit of {limit} bytes")]
    TooLarge { reference: String, bytes: u64, limit: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the unpack task failed")]
    Panicked,
}

/// What a pull is doing, for a progress display.
#[derive(Debug, Clone)]
pub enum Progress {
    /// The manifest is known: `layers` layers of `bytes` bytes in all.
    Manifest { layers: usize, bytes: u64 },
    /// A layer is already in the store.
    LayerCached { index: usize, digest: String },
    /// `done` of `total` bytes of a layer arrived.
    Layer { index: usize, digest: String, done: u64, total: u64 },
    /// All layers are here; unpacking (skipped when the image is already unpacked).
    Unpacking,
}

/// Receives [`Progress`]; called from the pulling task, so keep it quick.
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// Pulls `name` and records it under its normalised reference. The store lock is held only
/// while unpacking, so pulls of different images download in parallel.
pub async fn pull(
    store: &Store,
    name: &str,
    registries: &RegistryConfig,
    progress: ProgressFn,
) -> Result<ImageRecord, PullError> {
    let reference = reference::parse(name)?;
    let whole = reference.whole();
    let registry_error = |source| PullError::Registry { reference: whole.clone(), source };
    install_crypto_provider();
    let transfer = store.begin_transfer()?;
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(registries.plain_http.clone()),
        connect_timeout: Some(CONNECT_TIMEOUT),
        read_timeout: Some(READ_TIMEOUT),
        ..ClientConfig::default()
    });
    let auth = auth_for(&reference, registries);
    let (manifest, _digest, config) =
        client.pull_manifest_and_config(&reference, &auth).await.map_err(registry_error)?;
    let config_digest = manifest.config.digest.clone();
    if format!("sha256:{}", hex::encode(Sha256::digest(config.as_bytes()))) != config_digest {
        return Err(PullError::ConfigDigest { reference: whole, digest: config_digest });
    }
    let limit = store.config().max_image_bytes;
    let bytes = manifest
        .layers
        .iter()
        .map(|l| u64::try_from(l.size).unwrap_or(u64::MAX))
        .fold(0u64, u64::saturating_add);
    if bytes > limit {
        return Err(PullError::TooLarge { reference: whole, bytes, limit });
    }
    progress(Progress::Manifest { layers: manifest.layers.len(), bytes });
    store.put_blob(config.as_bytes(), Some(&config_digest))?;
    let mut layers = Vec::new();
    for (index, layer) in manifest.layers.iter().enumerate() {
        if store.has_blob(&layer.digest)? {
            progress(Progress::LayerCached { index, digest: layer.digest.clone() });
        } else {
            download_layer(store, &client, &reference, layer, index, &progress).await.map_err(
                |e| match e {
                    DownloadError::Registry(source) => {
                        PullError::Registry { reference: whole.clone(), source }
                    }
                    DownloadError::Store(e) => PullError::Store(e),
                },
            )?;
        }
        layers.push(layer.digest.clone());
    }
    progress(Progress::Unpacking);
    let store = store.clone();
    let references = vec![whole];
    tokio::task::spawn_blocking(move || {
        let installed = store.install(&references, &config_digest, &layers);
        drop(transfer);
        installed
    })
    .await
    .map_err(|_| PullError::Panicked)?
    .map_err(PullError::Store)
}

enum DownloadError {
    Registry(oci_client::errors::OciDistributionError),
    Store(StoreError),
}

async fn download_layer(
    store: &Store,
    client: &Client,
    reference: &Reference,
    layer: &oci_client::manifest::OciDescriptor,
    index: usize,
    progress: &ProgressFn,
) -> Result<(), DownloadError> {
    let store_error =
        |source| DownloadError::Store(StoreError::Io { path: store.tmp_dir(), source });
    if hex_of(&layer.digest).is_none() {
        return Err(DownloadError::Store(StoreError::InvalidDigest(layer.digest.clone())));
    }
    let temp = tempfile::NamedTempFile::new_in(store.tmp_dir()).map_err(store_error)?;
    let file = tokio::fs::File::from_std(temp.reopen().map_err(store_error)?);
    let total = u64::try_from(layer.size).unwrap_or(0);
    let mut writer = CountingWriter {
        inner: file,
        hasher: Sha256::new(),
        done: 0,
        limit: total,
        report: Box::new({
            let progress = progress.clone();
            let digest = layer.digest.clone();
            move |done| progress(Progress::Layer { index, digest: digest.clone(), done, total })
        }),
    };
    client.pull_blob(reference, layer, &mut writer).await.map_err(DownloadError::Registry)?;
    tokio::io::AsyncWriteExt::flush(&mut writer.inner).await.map_err(store_error)?;
    let actual = format!("sha256:{}", hex::encode(writer.hasher.clone().finalize()));
    store.commit_blob(temp, &actual, Some(&layer.digest)).map_err(DownloadError::Store)?;
    Ok(())
}

/// Hashes and counts what it writes and refuses more than the descriptor announced.
struct CountingWriter {
    inner: tokio::fs::File,
    hasher: Sha256,
    done: u64,
    limit: u64,
    report: Box<dyn Fn(u64) + Send + Sync>,
}

impl AsyncWrite for CountingWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.done.saturating_add(buf.len() as u64) > self.limit {
            return Poll::Ready(Err(std::io::Error::other(
                "the registry sent more than the layer's size",
            )));
        }
        let this = &mut *self;
        let written = match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        this.hasher.update(&buf[..written]);
        this.done += written as u64;
        (this.report)(this.done);
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn auth_for(reference: &Reference, registries: &RegistryConfig) -> RegistryAuth {
    [reference.registry(), reference.resolve_registry()]
        .iter()
        .find_map(|name| registries.credentials.get(*name))
        .map_or(RegistryAuth::Anonymous, |c| {
            RegistryAuth::Basic(c.username.clone(), c.password.clone())
        })
}

/// reqwest is built without a default TLS provider; ring is the one the rest of Poseidon uses.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
