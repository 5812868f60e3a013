//! The local backend: Poseidon runners as sandboxes on this machine.
//!
//! This crate only adapts: the sandbox runtime (`poseidon-sandbox`) knows namespaces, cgroups and
//! files; the core (`poseidon-core`) knows pools, timers and Poseidon's semantics. Here, an
//! environment becomes a [`SandboxSpec`] (image and limits), a sandbox process becomes an
//! [`ExecutionHandle`] (bounded channels, stop on drop), and blocking file operations move to
//! blocking threads.
#![forbid(unsafe_code)]

mod execution;
mod files;
mod images;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;

pub use images::PullPolicy;
use images::StoredImages;
use poseidon_image::{RegistryConfig, Store, StoreConfig};

use async_trait::async_trait;
use poseidon_core::backend::{
    Backend, BackendError, ExecRequest, ExecutionHandle, FileContent, FileEntry, FileUpdate,
    FilesError, ListRequest, LostReason, MappedPort, Runner,
};
use poseidon_core::environment::EnvironmentConfig;
use poseidon_core::ids::RunnerId;
use poseidon_sandbox::{
    Image, Limits, NetworkConfig, NetworkSpec, Runtime, RuntimeConfig, Sandbox, SandboxSpec,
};

/// Name of the built-in image: a read-only view of the host's programs.
pub const HOST_IMAGE: &str = "host";

/// Settings of the local backend (the `local.*` configuration keys).
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Where the runtime keeps the host image and runner state.
    pub state_dir: PathBuf,
    /// The program started as each runner's init (our own binary).
    pub init_program: PathBuf,
    /// Arguments that make `init_program` act as the init (e.g. `sandbox-init`).
    pub init_args: Vec<OsString>,
    /// Our top-level cgroup in every hierarchy; leftovers below it are removed at start.
    pub cgroup_name: String,
    /// Host uid/gid that a sandbox's root maps to (65536 ids from there).
    pub uid_base: u32,
    /// Directory images: name → unpacked root filesystem.
    pub images: BTreeMap<String, PathBuf>,
    /// Image used for names that are neither configured nor can be had from the image store
    /// (or a registry); `None` makes such environments fail.
    pub default_image: Option<String>,
    /// When an environment's image is pulled from its registry.
    pub pull_policy: PullPolicy,
    /// How registries are reached (plain HTTP, credentials).
    pub registries: RegistryConfig,
    /// Upper bound of one image's unpacked size (and of its downloaded layers).
    pub max_image_bytes: u64,
    /// Memory limit for environments that ask for 0 MB.
    pub memory_limit_mb: u64,
    /// Lowest CPU quota in MHz: CodeOcean's default of 20 MHz is a soft share under Nomad,
    /// as a hard quota it would make every run crawl.
    pub cpu_floor_mhz: u32,
    pub pids_limit: u64,
    /// Size of the writable layer (image changes, `/workspace` and `/tmp` together).
    pub disk_limit_mb: u64,
    pub nofile_limit: u64,
    /// Network access for environments with `networkAccess`; `None` keeps every runner on
    /// loopback only.
    pub network: Option<NetworkConfig>,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/poseidon/local"),
            init_program: PathBuf::from("/proc/self/exe"),
            init_args: vec![OsString::from("sandbox-init")],
            cgroup_name: "poseidon".to_owned(),
            uid_base: 100_000,
            images: BTreeMap::new(),
            default_image: None,
            pull_policy: PullPolicy::IfMissing,
            registries: RegistryConfig::default(),
            max_image_bytes: 4 << 30,
            memory_limit_mb: 512,
            cpu_floor_mhz: 1000,
            pids_limit: 512,
            disk_limit_mb: 512,
            nofile_limit: 4096,
            network: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot start the sandbox runtime: {0}")]
    Runtime(#[source] poseidon_sandbox::Error),
    #[error("image {name:?} at {path}: {source}")]
    Image {
        name: String,
        path: PathBuf,
        #[source]
        source: poseidon_sandbox::Error,
    },
    #[error("the default image {0:?} is not configured")]
    UnknownDefaultImage(String),
    #[error(transparent)]
    Store(#[from] poseidon_image::StoreError),
}

impl LocalConfig {
    /// The image store of this backend (`<state_dir>/store`), also for the `image` commands.
    pub fn store_config(&self) -> StoreConfig {
        StoreConfig {
            root: self.state_dir.join("store"),
            uid_base: self.uid_base,
            max_image_bytes: self.max_image_bytes,
        }
    }
}

/// Creates runners as local sandboxes.
#[derive(Clone)]
pub struct LocalBackend {
    runtime: Runtime,
    images: Arc<BTreeMap<String, Image>>,
    stored: StoredImages,
    config: Arc<LocalConfig>,
}

impl std::fmt::Debug for LocalBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBackend")
            .field("images", &self.images.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl LocalBackend {
    /// Starts the sandbox runtime (which cleans up after a previous crash) and loads the images.
    pub fn new(config: LocalConfig) -> Result<Self, LocalError> {
        let runtime = Runtime::with_network(
            RuntimeConfig {
                state_dir: config.state_dir.clone(),
                init_program: config.init_program.clone(),
                init_args: config.init_args.clone(),
                cgroup_name: config.cgroup_name.clone(),
                uid_base: config.uid_base,
                defaults: Limits {
                    memory_mb: Some(config.memory_limit_mb),
                    cpu_mhz: None,
                    pids: Some(config.pids_limit),
                    disk_mb: Some(config.disk_limit_mb),
                    nofile: Some(config.nofile_limit),
                },
            },
            config.network.clone(),
        )
        .map_err(LocalError::Runtime)?;
        let mut images = BTreeMap::from([(HOST_IMAGE.to_owned(), runtime.host_image())]);
        for (name, path) in &config.images {
            let image = runtime.directory_image(path).map_err(|source| LocalError::Image {
                name: name.clone(),
                path: path.clone(),
                source,
            })?;
            images.insert(name.clone(), image);
        }
        if let Some(default) = &config.default_image
            && !images.contains_key(default)
        {
            return Err(LocalError::UnknownDefaultImage(default.clone()));
        }
        let store = Store::open(config.store_config())?;
        let stored = StoredImages::new(store, runtime.clone(), config.registries.clone());
        Ok(Self { runtime, images: Arc::new(images), stored, config: Arc::new(config) })
    }

    /// The image of an environment whose image was prepared (no pull here).
    fn image(&self, name: &str) -> Result<Image, BackendError> {
        if let Some(image) = self.images.get(name) {
            return Ok(image.clone());
        }
        match self.stored.get(name) {
            Ok(Some(image)) => Ok(image),
            Ok(None) => self.default_image().ok_or_else(|| self.unavailable(name, None)),
            Err(error) => self.default_image().ok_or_else(|| self.unavailable(name, Some(error))),
        }
    }

    /// Finds an environment's image: configured, in the store, or pulled per the policy.
    async fn prepare_image(&self, name: &str) -> Result<Image, BackendError> {
        if let Some(image) = self.images.get(name) {
            return Ok(image.clone());
        }
        match self.stored.prepare(name, self.config.pull_policy).await {
            Ok(image) => Ok(image),
            Err(error) => match self.default_image() {
                Some(image) => {
                    tracing::warn!(image = name, %error, "using the default image instead");
                    Ok(image)
                }
                None => Err(self.unavailable(name, Some(error))),
            },
        }
    }

    fn default_image(&self) -> Option<Image> {
        self.config.default_image.as_ref().and_then(|d| self.images.get(d)).cloned()
    }

    fn unavailable(&self, name: &str, error: Option<images::ImageUnavailable>) -> BackendError {
        let known: Vec<&str> = self.images.keys().map(String::as_str).collect();
        let reason = error.map_or_else(String::new, |e| format!(": {e}"));
        BackendError::InvalidEnvironment(format!(
            "image {name:?} is not available on this host{reason} (configured images: {}; \
             stored images: `poseidon image ls`)",
            known.join(", ")
        ))
    }

    fn limits(&self, environment: &EnvironmentConfig) -> Limits {
        let memory_mb = match environment.memory_limit {
            0 => self.config.memory_limit_mb,
            mb => u64::from(mb),
        };
        let cpu_mhz = match environment.cpu_limit {
            0 => None,
            mhz => Some(mhz.max(self.config.cpu_floor_mhz)),
        };
        Limits {
            memory_mb: Some(memory_mb),
            cpu_mhz,
            pids: Some(self.config.pids_limit),
            disk_mb: Some(self.config.disk_limit_mb),
            nofile: Some(self.config.nofile_limit),
        }
    }
}

#[async_trait]
impl Backend for LocalBackend {
    async fn prepare_environment(
        &self,
        environment: &EnvironmentConfig,
    ) -> Result<(), BackendError> {
        self.prepare_image(&environment.image).await?;
        if environment.network_access && !self.runtime.network_enabled() {
            tracing::warn!(
                environment = %environment.id,
                "network access is not enabled on the local backend (local.network.enabled); runners get loopback only"
            );
        }
        Ok(())
    }

    async fn create_runner(
        &self,
        environment: &EnvironmentConfig,
        id: RunnerId,
    ) -> Result<Arc<dyn Runner>, BackendError> {
        let spec = SandboxSpec {
            name: id.to_string(),
            image: self.image(&environment.image)?,
            limits: self.limits(environment),
        };
        let network = (environment.network_access && self.runtime.network_enabled())
            .then(|| NetworkSpec { exposed_ports: environment.exposed_ports.clone() });
        let sandbox = self
            .runtime
            .create_with_network(spec, network)
            .await
            .map_err(|e| BackendError::Internal(format!("cannot create runner {id}: {e}")))?;
        Ok(Arc::new(LocalRunner { id, sandbox: Arc::new(sandbox) }))
    }
}

/// A runner backed by one sandbox.
struct LocalRunner {
    id: RunnerId,
    sandbox: Arc<Sandbox>,
}

#[async_trait]
impl Runner for LocalRunner {
    fn id(&self) -> &RunnerId {
        &self.id
    }

    fn mapped_ports(&self) -> Vec<MappedPort> {
        self.sandbox
            .mapped_ports()
            .into_iter()
            .map(|(exposed_port, address)| MappedPort {
                exposed_port,
                host_address: address.to_string(),
            })
            .collect()
    }

    async fn execute(&self, request: ExecRequest) -> Result<ExecutionHandle, BackendError> {
        execution::start(&self.sandbox, request).await
    }

    async fn update_files(&self, update: FileUpdate) -> Result<(), FilesError> {
        files::update(&self.sandbox, update).await
    }

    async fn list_files(&self, request: ListRequest) -> Result<Vec<FileEntry>, FilesError> {
        files::list(&self.sandbox, request).await
    }

    async fn read_file(&self, path: &str, privileged: bool) -> Result<FileContent, FilesError> {
        files::read(&self.sandbox, path, privileged).await
    }

    async fn destroy(&self) -> Result<(), BackendError> {
        self.sandbox
            .destroy()
            .await
            .map_err(|e| BackendError::Internal(format!("cannot destroy runner {}: {e}", self.id)))
    }

    async fn lost(&self) -> LostReason {
        self.sandbox.exited().await;
        LostReason::Failed(format!("the init process of runner {} exited", self.id))
    }
}
