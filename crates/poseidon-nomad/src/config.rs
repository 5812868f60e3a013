//! The backend's settings (the binary maps the `nomad.*` keys onto them).

use std::path::PathBuf;
use std::time::Duration;

/// How to reach Nomad and how to shape runner jobs.
#[derive(Debug, Clone)]
pub struct NomadConfig {
    /// Host name or address of a Nomad agent.
    pub address: String,
    pub port: u16,
    /// ACL token (`X-Nomad-Token`); empty: none.
    pub token: String,
    /// `Some`: HTTPS and WSS to Nomad.
    pub tls: Option<TlsFiles>,
    pub namespace: String,
    /// The network block of network-enabled environments.
    pub network: NetworkConfig,
    /// Never set `force_pull` (images are pre-pulled on the clients).
    pub disable_force_pull: bool,
    /// Where the template job comes from.
    pub template: TemplateSource,
    /// Attempts per API call while Nomad is unreachable (back-off 100 ms, doubling).
    pub request_attempts: u32,
    /// How long a runner job may take to get a running allocation (a blocked evaluation waits
    /// for capacity); afterwards the job is deregistered so that a late placement cannot
    /// over-provision the pool.
    pub start_timeout: Duration,
    /// Period of the full reconciliation with Nomad's allocations, so that a missed event
    /// cannot leave a runner wrong for long.
    pub reconcile_interval: Duration,
    /// How long the deregistration of a destroyed runner is retried in the background.
    pub deregister_patience: Duration,
}

impl Default for NomadConfig {
    fn default() -> Self {
        Self {
            address: "127.0.0.1".into(),
            port: 4646,
            token: String::new(),
            tls: None,
            namespace: "default".into(),
            network: NetworkConfig::default(),
            disable_force_pull: false,
            template: TemplateSource::Embedded,
            request_attempts: 3,
            start_timeout: Duration::from_secs(10 * 60),
            reconcile_interval: Duration::from_secs(30),
            deregister_patience: Duration::from_secs(30 * 60),
        }
    }
}

/// (m)TLS to Nomad: the cluster's CA, and a client certificate when Nomad verifies clients.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// Empty: the public web PKI roots.
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// Nomad's `NetworkResource` as `nomad.network` configures it (string fields only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// `bridge` by default; `cni/secure-bridge` recommended.
    pub mode: String,
    pub device: String,
    pub cidr: String,
    pub ip: String,
    pub hostname: String,
    pub dns_servers: Vec<String>,
    pub dns_searches: Vec<String>,
    pub dns_options: Vec<String>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            mode: "bridge".into(),
            device: String::new(),
            cidr: String::new(),
            ip: String::new(),
            hostname: String::new(),
            dns_servers: Vec::new(),
            dns_searches: Vec::new(),
            dns_options: Vec::new(),
        }
    }
}

/// `server.templatejobfile`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateSource {
    /// Poseidon's own template (spec §7.1).
    Embedded,
    /// A file: JSON (a job, or `{"Job": job}`) is used as is, anything else is HCL and parsed
    /// by Nomad's `/v1/jobs/parse`.
    File(PathBuf),
}
