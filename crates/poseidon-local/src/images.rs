//! Environments' images from the image store, pulled from their registry per the policy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use poseidon_image::{ImageRecord, Progress, PullError, RegistryConfig, Store, StoreError};
use poseidon_sandbox::{Image, Runtime};

/// When an environment's image is pulled (`local.imagepullpolicy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    /// At every PUT of an environment (and at restore); the stored image is used, with a
    /// warning, when the registry cannot be reached.
    Always,
    /// Only when the image is not in the store.
    #[default]
    #[serde(alias = "if-missing", alias = "ifnotpresent")]
    IfMissing,
    /// Never: images come from `poseidon image import` or `poseidon image pull`.
    Never,
}

/// Why an image cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum ImageUnavailable {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "{0} is not in the image store and local.imagepullpolicy is never (use `poseidon image import` or `poseidon image pull`)"
    )]
    NotStored(String),
    #[error(transparent)]
    Pull(#[from] PullError),
    #[error("the stored image {reference} is unusable: {source}")]
    Unusable { reference: String, source: poseidon_sandbox::Error },
}

/// The store, plus the sandbox images made of its records (one per image id).
#[derive(Debug, Clone)]
pub(crate) struct StoredImages {
    store: Store,
    runtime: Runtime,
    registries: Arc<RegistryConfig>,
    images: Arc<Mutex<HashMap<String, Image>>>,
}

impl StoredImages {
    pub(crate) fn new(store: Store, runtime: Runtime, registries: RegistryConfig) -> Self {
        Self { store, runtime, registries: Arc::new(registries), images: Arc::default() }
    }

    /// The stored image `name` refers to, if any.
    pub(crate) fn get(&self, name: &str) -> Result<Option<Image>, ImageUnavailable> {
        match self.store.get(name)? {
            Some(record) => self.image_of(&record).map(Some),
            None => Ok(None),
        }
    }

    /// The image `name` refers to, pulled first when the policy says so.
    pub(crate) async fn prepare(
        &self,
        name: &str,
        policy: PullPolicy,
    ) -> Result<Image, ImageUnavailable> {
        let stored = self.get(name)?;
        match (policy, stored) {
            (PullPolicy::Never, None) => Err(ImageUnavailable::NotStored(name.to_owned())),
            (PullPolicy::Never | PullPolicy::IfMissing, Some(image)) => Ok(image),
            (PullPolicy::IfMissing, None) => self.pull(name).await,
            (PullPolicy::Always, stored) => match (self.pull(name).await, stored) {
                (Ok(image), _) => Ok(image),
                (Err(error), Some(image)) => {
                    tracing::warn!(image = name, %error, "pull failed; using the stored image");
                    Ok(image)
                }
                (Err(error), None) => Err(error),
            },
        }
    }

    async fn pull(&self, name: &str) -> Result<Image, ImageUnavailable> {
        tracing::info!(image = name, "pulling image");
        let progress = Arc::new(|event| match event {
            Progress::Layer { done, total, .. } if done < total => {}
            event => tracing::debug!(?event, "pull progress"),
        });
        let record = poseidon_image::pull(&self.store, name, &self.registries, progress).await?;
        tracing::info!(image = %record.reference, id = %record.id, "image pulled");
        self.image_of(&record)
    }

    fn image_of(&self, record: &ImageRecord) -> Result<Image, ImageUnavailable> {
        let mut images = self.images.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(image) = images.get(&record.id) {
            return Ok(image.clone());
        }
        let unusable =
            |source| ImageUnavailable::Unusable { reference: record.reference.clone(), source };
        let image = self
            .runtime
            .directory_image(&self.store.rootfs(record))
            .map_err(unusable)?
            .with_run_config(record.config.working_dir.as_deref(), &record.config.env);
        images.insert(record.id.clone(), image.clone());
        Ok(image)
    }
}
