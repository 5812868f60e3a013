//! `poseidon serve`: configuration → logging → backend → core → restore → listen → shutdown.

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum_server::tls_rustls::RustlsConfig;
use poseidon_api::{ApiConfig, AppState, ServeOptions};
use poseidon_core::backend::Backend;
use poseidon_core::{Core, CoreConfig, CoreError};
use poseidon_local::{LocalBackend, LocalConfig};
use poseidon_nomad::NomadBackend;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormatter, LogLevel, TlsConfig};

/// Our crates log at `logger.level`; libraries only warnings, so that `DEBUG` stays readable.
const OUR_CRATES: [&str; 6] = [
    "poseidon",
    "poseidon_api",
    "poseidon_core",
    "poseidon_local",
    "poseidon_nomad",
    "poseidon_sandbox",
];
/// Longest pause between attempts to recover from an unreachable Nomad at start-up.
const MAX_RESTORE_DELAY: Duration = Duration::from_secs(30);

/// The crate version, plus the git revision when the build set `POSEIDON_GIT_REVISION`.
pub fn version() -> String {
    match option_env!("POSEIDON_GIT_REVISION") {
        Some(revision) if !revision.is_empty() => {
            format!("{}+{revision}", env!("CARGO_PKG_VERSION"))
        }
        _ => env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// Threads for blocking work (file operations, cgroup removal). Every use is short; a bound
/// this low means a bug that parks threads shows up in tests instead of at 512 threads.
const BLOCKING_THREADS: usize = 64;

pub fn run(config_file: Option<&Path>) -> anyhow::Result<()> {
    let env = std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)));
    let config = Config::load(config_file, env)?;
    init_logging(config.logger.level, config.logger.formatter);
    warn_about_ignored_settings(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config))
}

fn init_logging(level: LogLevel, formatter: LogFormatter) {
    let level = match level {
        LogLevel::Trace => "trace",
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error => "error",
    };
    let directives = OUR_CRATES.iter().map(|name| format!("{name}={level}"));
    let filter = std::iter::once("warn".to_owned()).chain(directives).collect::<Vec<_>>().join(",");
    // Internal errors of the logger (e.g. a closed stderr) must not panic a task, not even
    // the one that shuts the server down.
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .with_env_filter(EnvFilter::new(filter));
    match formatter {
        LogFormatter::Text => builder.init(),
        LogFormatter::Json => builder.json().init(),
    }
}

fn warn_about_ignored_settings(config: &Config) {
    if config.server.systemdsocketactivation {
        tracing::warn!("server.systemdsocketactivation is not supported; opening our own listener");
    }
    if !config.server.templatejobfile.is_empty() && !config.nomad.enabled {
        tracing::warn!("server.templatejobfile only applies to the Nomad backend; ignored");
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let backend: Arc<dyn Backend> = match config.nomad.enabled {
        true => Arc::new(
            NomadBackend::start(crate::nomad::nomad_config(&config))
                .await
                .context("cannot start the Nomad backend")?,
        ),
        false => Arc::new(
            LocalBackend::new(local_config(&config)?).context("cannot start the local backend")?,
        ),
    };
    let core = Core::new(backend, core_config(&config));
    // Like Go, serve only once environments and runners are back.
    let restored = restore(&core).await?;
    tracing::info!(restored, "execution environments restored");

    let tls = match config.server.tls.active {
        true => Some(tls_config(&config.server.tls).await?),
        false => None,
    };
    let listener = bind(&config)?;
    let address = listener.local_addr()?;
    tracing::info!(%address, tls = tls.is_some(), "listening");
    let state = AppState::new(core.clone(), api_config(&config, address));
    let options = ServeOptions {
        tls,
        shutdown_grace: Duration::from_secs(config.limits.shutdowngrace),
        ..ServeOptions::default()
    };
    let served = poseidon_api::serve(listener, state, options, shutdown_signal()).await;
    core.shutdown().await;
    tracing::info!("stopped");
    served.context("serving the API failed")
}

/// Restores the core; while the backend cannot be reached (Nomad down), retries with back-off
/// like Go's recovery loop instead of giving up.
async fn restore(core: &Core) -> anyhow::Result<usize> {
    let mut delay = Duration::from_secs(1);
    loop {
        match core.restore().await {
            Err(CoreError::Recover(error)) => {
                tracing::error!(%error, retry_in = ?delay, "cannot recover from the backend");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RESTORE_DELAY);
            }
            result => return result.context("cannot restore the execution environments"),
        }
    }
}

pub(crate) fn local_config(config: &Config) -> anyhow::Result<LocalConfig> {
    let local = &config.local;
    Ok(LocalConfig {
        state_dir: config.statedir.join("local"),
        init_program: std::env::current_exe().context("cannot find our own executable")?,
        init_args: vec![crate::SANDBOX_INIT.into()],
        cgroup_name: local.cgroupname.clone(),
        uid_base: local.uidbase,
        images: local.images.clone(),
        default_image: config.default_image(),
        memory_limit_mb: local.memorylimit,
        cpu_floor_mhz: local.cpufloor,
        pids_limit: local.pidslimit,
        disk_limit_mb: local.disklimit,
        nofile_limit: local.nofilelimit,
        network: network_config(&local.network)?,
        pull_policy: local.imagepullpolicy,
        registries: config.registries(),
        max_image_bytes: local.maximagesize.saturating_mul(1 << 20),
    })
}

/// The `local.network.*` keys as the sandbox runtime takes them; `None` when disabled.
fn network_config(
    section: &crate::config::NetworkSection,
) -> anyhow::Result<Option<poseidon_sandbox::NetworkConfig>> {
    if !section.enabled {
        return Ok(None);
    }
    let cidrs = |list: &[String], key: &str| {
        list.iter()
            .map(|c| c.parse().with_context(|| format!("local.network.{key}: {c:?}")))
            .collect::<anyhow::Result<Vec<_>>>()
    };
    let resolvers = match section.resolvers.as_slice() {
        [] => host_resolvers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()),
        list => list
            .iter()
            .map(|r| r.parse().with_context(|| format!("local.network.resolvers: {r:?}")))
            .collect::<anyhow::Result<_>>()?,
    };
    let host_ports = section
        .hostports
        .split_once('-')
        .and_then(|(first, last)| Some((first.trim().parse().ok()?, last.trim().parse().ok()?)))
        .with_context(|| {
            format!("local.network.hostports: {:?} is not first-last", section.hostports)
        })?;
    let advertised_address = match section.advertisedaddress.as_str() {
        "" => None,
        address => Some(address.parse().context("local.network.advertisedaddress")?),
    };
    Ok(Some(poseidon_sandbox::NetworkConfig {
        bridge: section.bridge.clone(),
        subnet: section.subnet.parse().context("local.network.subnet")?,
        resolvers,
        allow: cidrs(&section.allow, "allow")?,
        deny: cidrs(&section.deny, "deny")?,
        host_ports,
        advertised_address,
    }))
}

/// The IPv4 `nameserver`s of a `resolv.conf`, without loopback ones (a runner's loopback is
/// its own).
fn host_resolvers(resolv_conf: &str) -> Vec<std::net::Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|line| line.strip_prefix("nameserver"))
        .filter_map(|address| address.trim().parse::<std::net::Ipv4Addr>().ok())
        .filter(|address| !address.is_loopback())
        .collect()
}

fn core_config(config: &Config) -> CoreConfig {
    CoreConfig {
        state_dir: Some(config.statedir.clone()),
        separate_stderr: config.server.interactivestderr,
        max_stored_executions: config.limits.storedexecutions,
        stored_execution_ttl: Duration::from_secs(config.limits.storedexecutionttl),
        creation_concurrency: config.limits.creationconcurrency,
    }
}

fn api_config(config: &Config, address: std::net::SocketAddr) -> ApiConfig {
    let mut api = ApiConfig::new(address);
    api.token = Some(config.server.token.clone()).filter(|token| !token.is_empty());
    api.tls_active = config.server.tls.active;
    api.prewarming_pool_threshold = config.server.alert.prewarmingpoolthreshold;
    api.max_body_bytes = config.limits.maxbodybytes;
    api.max_upload_bytes = config.limits.maxuploadbytes;
    api.version = match config.sentry.release.as_str() {
        "" => version(),
        release => release.to_owned(),
    };
    api
}

fn bind(config: &Config) -> anyhow::Result<TcpListener> {
    let address = (config.listen_host(), config.server.port);
    TcpListener::bind(address)
        .with_context(|| format!("cannot listen on {}:{}", address.0, address.1))
}

/// TLS 1.3 only, like Go Poseidon.
async fn tls_config(tls: &TlsConfig) -> anyhow::Result<RustlsConfig> {
    // Several crates may try to install a provider; the first one wins and that is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certificates = CertificateDer::pem_file_iter(&tls.certfile)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read server.tls.certfile {}", tls.certfile.display()))?;
    let key = PrivateKeyDer::from_pem_file(&tls.keyfile)
        .with_context(|| format!("cannot read server.tls.keyfile {}", tls.keyfile.display()))?;
    let mut server =
        rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            .with_no_client_auth()
            .with_single_cert(certificates, key)
            .context("invalid TLS certificate or key")?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(RustlsConfig::from_config(Arc::new(server)))
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_resolvers_skip_loopback_and_ipv6() {
        let text = "# x\nnameserver 127.0.0.53\nnameserver 10.255.255.53\nnameserver fd00::1\n";
        assert_eq!(host_resolvers(text), [std::net::Ipv4Addr::new(10, 255, 255, 53)]);
    }

    #[test]
    fn network_keys_become_the_runtime_config() {
        let mut section = crate::config::NetworkSection { enabled: true, ..Default::default() };
        section.resolvers = vec!["192.0.2.53".into()];
        section.hostports = "31000-31099".into();
        let config = network_config(&section).unwrap().unwrap();
        assert_eq!(config.host_ports, (31000, 31099));
        assert_eq!(config.subnet.to_string(), "10.213.0.0/16");
        section.hostports = "31000".into();
        assert!(network_config(&section).is_err());
        section.enabled = false;
        assert!(network_config(&crate::config::NetworkSection::default()).unwrap().is_none());
    }
}
