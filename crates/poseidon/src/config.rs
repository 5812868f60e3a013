//! The configuration: Go Poseidon's YAML keys and `POSEIDON_*` environment variables, plus the
//! keys of the local backend and our additions to the Nomad backend's.
//!
//! Precedence: environment > YAML file > defaults. Keys are lowercase and nested; a variable's
//! name is `POSEIDON_` followed by the key path joined with `_`
//! (`server.alert.prewarmingpoolthreshold` ⇔ `POSEIDON_SERVER_ALERT_PREWARMINGPOOLTHRESHOLD`).
//! Unknown keys are ignored, as Go's loader does, so Go configuration files keep working.
//! Environment values stay strings until a field asks for a number or a boolean, so a token
//! like `007` keeps its zeros; booleans accept Go's `strconv.ParseBool` spellings (`TRUE`).

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use figment::Figment;
use figment::providers::{Format, Serialized, Yaml};
use serde::Deserialize;
use serde::de::{self, Deserializer, IntoDeserializer, Visitor};

/// Where Go Poseidon looks for its configuration when no `--config` is given.
pub const DEFAULT_CONFIG_FILE: &str = "./configuration.yaml";
const ENV_PREFIX: &str = "POSEIDON_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The causes are part of the messages (and deliberately not `source`s), so that each
    // appears once however the error is printed.
    #[error("cannot read the configuration file {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("invalid configuration: {0}")]
    Rejected(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    pub server: ServerConfig,
    pub logger: LoggerConfig,
    /// Persisted environments and the local backend's runtime state live below this.
    pub statedir: PathBuf,
    pub local: LocalSection,
    pub limits: LimitsConfig,
    pub nomad: NomadSection,
    pub aws: BackendSwitch,
    pub sentry: SentryConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            logger: LoggerConfig::default(),
            statedir: PathBuf::from("/var/lib/poseidon"),
            local: LocalSection::default(),
            limits: LimitsConfig::default(),
            nomad: NomadSection::default(),
            aws: BackendSwitch::default(),
            sentry: SentryConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ServerConfig {
    /// Listen address; empty means every IPv4 interface.
    pub address: String,
    #[serde(deserialize_with = "lenient")]
    pub port: u16,
    /// The `Poseidon-Token` clients must send; empty disables authentication.
    pub token: String,
    pub tls: TlsConfig,
    /// Keep stderr apart from stdout in executions.
    #[serde(deserialize_with = "go_bool")]
    pub interactivestderr: bool,
    pub alert: AlertConfig,
    /// Accepted for compatibility; we always open our own listener.
    #[serde(deserialize_with = "go_bool")]
    pub systemdsocketactivation: bool,
    /// The Nomad backend's template job (HCL or JSON); empty: the embedded one.
    pub templatejobfile: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            address: "127.0.0.1".to_owned(),
            port: 7200,
            token: String::new(),
            tls: TlsConfig::default(),
            interactivestderr: true,
            alert: AlertConfig::default(),
            systemdsocketactivation: false,
            templatejobfile: String::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct TlsConfig {
    #[serde(deserialize_with = "go_bool")]
    pub active: bool,
    pub certfile: PathBuf,
    pub keyfile: PathBuf,
    /// Only used by Go's systemd watchdog client; accepted.
    pub cafile: PathBuf,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct AlertConfig {
    /// `/health` answers 503 when an environment's idle share of its pool is below this.
    #[serde(deserialize_with = "lenient")]
    pub prewarmingpoolthreshold: f64,
    /// Seconds before Go reloads a depleting pool; accepted (our pools refill on their own).
    #[serde(deserialize_with = "lenient")]
    pub prewarmingpoolreloadtimeout: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct LoggerConfig {
    pub level: LogLevel,
    pub formatter: LogFormatter,
}

/// logrus' level names, case-insensitive; `fatal` and `panic` log errors only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    #[default]
    Info,
    Warn,
    Error,
}

impl FromStr for LogLevel {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.to_ascii_lowercase().as_str() {
            "trace" => Ok(Self::Trace),
            "debug" => Ok(Self::Debug),
            "info" => Ok(Self::Info),
            "warn" | "warning" => Ok(Self::Warn),
            "error" | "fatal" | "panic" => Ok(Self::Error),
            _ => Err(format!("unknown logger.level {value:?} (TRACE, DEBUG, INFO, WARN or ERROR)")),
        }
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormatter {
    #[default]
    Text,
    Json,
}

impl<'de> Deserialize<'de> for LogFormatter {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = String::deserialize(deserializer)?;
        match value.as_str() {
            "TextFormatter" | "" => Ok(Self::Text),
            "JSONFormatter" => Ok(Self::Json),
            _ => Err(de::Error::custom(format!(
                "unknown logger.formatter {value:?} (TextFormatter or JSONFormatter)"
            ))),
        }
    }
}

/// The `local.*` keys: the sandboxes of the local backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LocalSection {
    pub cgroupname: String,
    #[serde(deserialize_with = "lenient")]
    pub uidbase: u32,
    /// Directory images: name (the environment's `image`) → unpacked root filesystem.
    pub images: BTreeMap<String, PathBuf>,
    /// Image for names not in `images`; empty: such environments are refused.
    pub defaultimage: String,
    /// MB, for environments that ask for 0.
    #[serde(deserialize_with = "lenient")]
    pub memorylimit: u64,
    /// MHz; the lowest CPU quota of a runner.
    #[serde(deserialize_with = "lenient")]
    pub cpufloor: u32,
    #[serde(deserialize_with = "lenient")]
    pub pidslimit: u64,
    /// MB of writable layer (image changes, workspace and /tmp together).
    #[serde(deserialize_with = "lenient")]
    pub disklimit: u64,
    #[serde(deserialize_with = "lenient")]
    pub nofilelimit: u64,
    /// Network access for environments with `networkAccess` (`docs/configuration.md`).
    pub network: NetworkSection,
    /// When an environment's image is pulled: `always`, `ifmissing` or `never`.
    pub imagepullpolicy: poseidon_local::PullPolicy,
    /// MB: the largest unpacked image (and its downloaded layers) the image store accepts.
    #[serde(deserialize_with = "lenient")]
    pub maximagesize: u64,
    /// Registries by host (`docker.io`, `registry.example.org:5000`): plain HTTP, credentials.
    pub registries: BTreeMap<String, RegistrySection>,
}

/// One entry of `local.registries`.
#[derive(Clone, Default, Deserialize)]
#[serde(default)]
pub struct RegistrySection {
    /// Speak plain HTTP to this registry (a registry on this host or a trusted network only).
    #[serde(deserialize_with = "go_bool")]
    pub plainhttp: bool,
    /// Basic credentials; with a token-auth registry, used to get the token.
    pub username: String,
    pub password: String,
}

impl fmt::Debug for RegistrySection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistrySection")
            .field("plainhttp", &self.plainhttp)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The `local.network.*` keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct NetworkSection {
    /// Off: every runner has loopback only, whatever its environment asks for.
    #[serde(deserialize_with = "go_bool")]
    pub enabled: bool,
    /// Our bridge, nftables table and veth prefix: 1 to 9 of `[a-z0-9]`.
    pub bridge: String,
    /// The runners' IPv4 range (CIDR); must not overlap any network of the host.
    pub subnet: String,
    /// IPv4 name servers for runners; empty: the host's non-loopback ones.
    pub resolvers: Vec<String>,
    /// IPv4 CIDRs reachable even inside a denied range.
    pub allow: Vec<String>,
    /// IPv4 CIDRs denied on top of the built-in private and special ranges.
    pub deny: Vec<String>,
    /// Host ports for exposed ports, `first-last`.
    pub hostports: String,
    /// Address put into `mappedPorts`; empty: the bridge's address (this machine only).
    pub advertisedaddress: String,
}

impl Default for NetworkSection {
    fn default() -> Self {
        Self {
            enabled: false,
            bridge: "poseidon0".to_owned(),
            subnet: "10.213.0.0/16".to_owned(),
            resolvers: Vec::new(),
            allow: Vec::new(),
            deny: Vec::new(),
            hostports: "20000-29999".to_owned(),
            advertisedaddress: String::new(),
        }
    }
}

impl Default for LocalSection {
    fn default() -> Self {
        Self {
            cgroupname: "poseidon".to_owned(),
            uidbase: 100_000,
            images: BTreeMap::new(),
            defaultimage: String::new(),
            memorylimit: 512,
            cpufloor: 1000,
            pidslimit: 512,
            disklimit: 512,
            nofilelimit: 4096,
            network: NetworkSection::default(),
            imagepullpolicy: poseidon_local::PullPolicy::IfMissing,
            maximagesize: 4096,
            registries: BTreeMap::new(),
        }
    }
}

/// The `limits.*` keys: bounds that protect the service itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LimitsConfig {
    /// Bytes of a JSON request body (all routes but the file upload).
    #[serde(deserialize_with = "lenient")]
    pub maxbodybytes: usize,
    /// Bytes of a `PATCH …/files` body.
    #[serde(deserialize_with = "lenient")]
    pub maxuploadbytes: usize,
    /// Stored, not yet connected executions per runner.
    #[serde(deserialize_with = "lenient")]
    pub storedexecutions: usize,
    /// Seconds until a stored execution that was never connected expires (0: never).
    #[serde(deserialize_with = "lenient")]
    pub storedexecutionttl: u64,
    /// Runner creations in flight over all environments.
    #[serde(deserialize_with = "lenient")]
    pub creationconcurrency: usize,
    /// Seconds that requests and WebSocket sessions get to finish at shutdown.
    #[serde(deserialize_with = "lenient")]
    pub shutdowngrace: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            maxbodybytes: 1 << 20,
            maxuploadbytes: 64 << 20,
            storedexecutions: 32,
            storedexecutionttl: 300,
            creationconcurrency: 8,
            shutdowngrace: 10,
        }
    }
}

/// The `nomad.*` keys (Go's, plus `starttimeout` and `reconcileinterval`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct NomadSection {
    /// Use the Nomad backend instead of the local one.
    #[serde(deserialize_with = "go_bool")]
    pub enabled: bool,
    pub address: String,
    #[serde(deserialize_with = "lenient")]
    pub port: u16,
    pub token: String,
    pub tls: TlsConfig,
    pub namespace: String,
    #[serde(deserialize_with = "go_bool")]
    pub disableforcepull: bool,
    pub network: NomadNetworkSection,
    /// Seconds a runner job may wait for an allocation (blocked evaluations) before it is
    /// deregistered.
    #[serde(deserialize_with = "lenient")]
    pub starttimeout: u64,
    /// Seconds between full reconciliations with Nomad's allocations.
    #[serde(deserialize_with = "lenient")]
    pub reconcileinterval: u64,
}

impl Default for NomadSection {
    fn default() -> Self {
        Self {
            enabled: false,
            address: "127.0.0.1".to_owned(),
            port: 4646,
            token: String::new(),
            tls: TlsConfig::default(),
            namespace: "default".to_owned(),
            disableforcepull: false,
            network: NomadNetworkSection::default(),
            starttimeout: 600,
            reconcileinterval: 30,
        }
    }
}

/// `nomad.network`: Nomad's `NetworkResource` for environments with network access.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct NomadNetworkSection {
    /// `bridge`; `cni/secure-bridge` is recommended (docs/nomad.md).
    pub mode: String,
    pub device: String,
    pub cidr: String,
    pub ip: String,
    pub hostname: String,
    pub dns: NomadDnsSection,
}

impl Default for NomadNetworkSection {
    fn default() -> Self {
        Self {
            mode: "bridge".to_owned(),
            device: String::new(),
            cidr: String::new(),
            ip: String::new(),
            hostname: String::new(),
            dns: NomadDnsSection::default(),
        }
    }
}

/// `nomad.network.dns`; from the environment, lists are space-separated.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct NomadDnsSection {
    #[serde(deserialize_with = "go_list")]
    pub servers: Vec<String>,
    #[serde(deserialize_with = "go_list")]
    pub searches: Vec<String>,
    #[serde(deserialize_with = "go_list")]
    pub options: Vec<String>,
}

/// `aws.enabled`: that backend is not available in this build.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct BackendSwitch {
    #[serde(deserialize_with = "go_bool")]
    pub enabled: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SentryConfig {
    /// As in Go, a non-empty release is what `/version` reports.
    pub release: String,
}

impl Config {
    /// Loads `path` (if given it must exist; the default file may be missing) and the
    /// `POSEIDON_*` variables of `env`, then validates the result.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let yaml = match path {
            Some(path) => Some(read_file(path)?),
            None => match std::fs::read_to_string(DEFAULT_CONFIG_FILE) {
                Ok(yaml) => Some(yaml),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
                Err(error) => {
                    return Err(ConfigError::Read { path: DEFAULT_CONFIG_FILE.into(), error });
                }
            },
        };
        Self::from_sources(yaml.as_deref(), env)
    }

    /// Builds the configuration from YAML text and environment variables.
    pub fn from_sources(
        yaml: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        if let Some(yaml) = yaml {
            figment = figment.merge(Yaml::string(yaml));
        }
        for (key, value) in env_keys(env) {
            figment = figment.merge(Serialized::defaults(figment::util::nest(&key, value.into())));
        }
        let config: Config = figment.extract().map_err(describe)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let reject = |message: &str| Err(ConfigError::Rejected(message.to_owned()));
        let nomad = &self.nomad;
        if nomad.enabled && (nomad.address.is_empty() || nomad.namespace.is_empty()) {
            return reject("nomad.address and nomad.namespace must not be empty");
        }
        if nomad.tls.certfile.as_os_str().is_empty() != nomad.tls.keyfile.as_os_str().is_empty() {
            return reject("nomad.tls.certfile and nomad.tls.keyfile go together");
        }
        if self.aws.enabled {
            return reject("aws.enabled is true, but the AWS Lambda backend is not supported");
        }
        let threshold = self.server.alert.prewarmingpoolthreshold;
        // Go documents [0, 1) but accepts any value; above 1 every pool counts as depleting.
        if !threshold.is_finite() || threshold < 0.0 {
            return reject("server.alert.prewarmingpoolthreshold must be a number >= 0");
        }
        let tls = &self.server.tls;
        if tls.active && (tls.certfile.as_os_str().is_empty() || tls.keyfile.as_os_str().is_empty())
        {
            return reject("server.tls.active needs server.tls.certfile and server.tls.keyfile");
        }
        if self.statedir.as_os_str().is_empty() {
            return reject("statedir must not be empty");
        }
        let local = &self.local;
        if local.cgroupname.is_empty() || local.cgroupname.contains('/') {
            return reject("local.cgroupname must be a non-empty name without '/'");
        }
        if [
            local.memorylimit,
            local.pidslimit,
            local.disklimit,
            local.nofilelimit,
            local.maximagesize,
        ]
        .contains(&0)
        {
            return reject(
                "local.memorylimit, pidslimit, disklimit, nofilelimit and maximagesize must be positive",
            );
        }
        if self.limits.maxbodybytes == 0 || self.limits.maxuploadbytes == 0 {
            return reject("limits.maxbodybytes and limits.maxuploadbytes must be positive");
        }
        Ok(())
    }

    /// The address to listen on (`server.address` empty: every IPv4 interface).
    pub fn listen_host(&self) -> &str {
        match self.server.address.as_str() {
            "" => "0.0.0.0",
            address => address,
        }
    }

    /// `local.registries` as the image puller takes them.
    pub fn registries(&self) -> poseidon_image::RegistryConfig {
        let registries = &self.local.registries;
        poseidon_image::RegistryConfig {
            plain_http: registries
                .iter()
                .filter(|(_, r)| r.plainhttp)
                .map(|(n, _)| n.clone())
                .collect(),
            credentials: registries
                .iter()
                .filter(|(_, r)| !r.username.is_empty())
                .map(|(name, r)| {
                    let credentials = poseidon_image::Credentials {
                        username: r.username.clone(),
                        password: r.password.clone(),
                    };
                    (name.clone(), credentials)
                })
                .collect(),
        }
    }

    /// `local.defaultimage`, `None` when empty.
    pub fn default_image(&self) -> Option<String> {
        Some(self.local.defaultimage.clone()).filter(|image| !image.is_empty())
    }
}

/// Every problem as `key: what is wrong`, without figment's internal provider names.
fn describe(error: figment::Error) -> ConfigError {
    let problems: Vec<String> = error
        .into_iter()
        .map(|problem| match problem.path.join(".") {
            key if key.is_empty() => problem.kind.to_string(),
            key => format!("{key}: {}", problem.kind),
        })
        .collect();
    ConfigError::Invalid(problems.join("; "))
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|error| ConfigError::Read { path: path.to_owned(), error })
}

/// `POSEIDON_SERVER_TLS_ACTIVE=x` → (`server.tls.active`, `x`); other variables are skipped.
fn env_keys(env: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    let mut keys: Vec<_> = env
        .into_iter()
        .filter_map(|(name, value)| {
            let path = name.strip_prefix(ENV_PREFIX)?.to_ascii_lowercase();
            let valid = path.split('_').all(|segment| !segment.is_empty());
            valid.then(|| (path.replace('_', "."), value))
        })
        .collect();
    // Deterministic when a deeper key and its parent are both set.
    keys.sort();
    keys
}

/// Deserializes a number from a native value or from a string (environment variables).
fn lenient<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + FromStr,
    T::Err: fmt::Display,
{
    struct Lenient<T>(PhantomData<T>);

    impl<'de, T> Visitor<'de> for Lenient<T>
    where
        T: Deserialize<'de> + FromStr,
        T::Err: fmt::Display,
    {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number")
        }

        fn visit_u64<E: de::Error>(self, value: u64) -> Result<T, E> {
            T::deserialize(value.into_deserializer())
        }

        fn visit_i64<E: de::Error>(self, value: i64) -> Result<T, E> {
            T::deserialize(value.into_deserializer())
        }

        fn visit_f64<E: de::Error>(self, value: f64) -> Result<T, E> {
            T::deserialize(value.into_deserializer())
        }

        fn visit_str<E: de::Error>(self, value: &str) -> Result<T, E> {
            value
                .trim()
                .parse()
                .map_err(|error| E::custom(format!("invalid number {value:?}: {error}")))
        }
    }

    deserializer.deserialize_any(Lenient(PhantomData))
}

/// Deserializes a boolean from a native value or a string in Go's `strconv.ParseBool` spellings.
fn go_bool<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    struct GoBool;

    impl Visitor<'_> for GoBool {
        type Value = bool;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a boolean")
        }

        fn visit_bool<E: de::Error>(self, value: bool) -> Result<bool, E> {
            Ok(value)
        }

        fn visit_u64<E: de::Error>(self, value: u64) -> Result<bool, E> {
            match value {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(E::custom(format!("invalid boolean {value}"))),
            }
        }

        fn visit_str<E: de::Error>(self, value: &str) -> Result<bool, E> {
            match value.trim() {
                "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
                "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
                _ => Err(E::custom(format!("invalid boolean {value:?}"))),
            }
        }
    }

    deserializer.deserialize_any(GoBool)
}

/// A list as YAML gives it, or space-separated (optionally quoted) words from the environment.
fn go_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum List {
        Items(Vec<String>),
        Words(String),
    }
    Ok(match List::deserialize(deserializer)? {
        List::Items(items) => items,
        List::Words(words) => words
            .trim_matches(|c| c == '"' || c == '\'')
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn rejected(yaml: &str) -> String {
        Config::from_sources(Some(yaml), []).unwrap_err().to_string()
    }

    #[test]
    fn defaults_match_go_poseidon() {
        let config = Config::from_sources(None, []).unwrap();
        assert_eq!(config.server.address, "127.0.0.1");
        assert_eq!(config.server.port, 7200);
        assert!(config.server.token.is_empty());
        assert!(config.server.interactivestderr);
        assert!(!config.server.tls.active);
        assert_eq!(config.server.alert.prewarmingpoolthreshold, 0.0);
        assert_eq!(config.logger.level, LogLevel::Info);
        assert_eq!(config.logger.formatter, LogFormatter::Text);
        assert_eq!(config.statedir, PathBuf::from("/var/lib/poseidon"));
        assert_eq!(config.local.uidbase, 100_000);
        assert_eq!(config.default_image(), None);
        assert_eq!(config.limits.maxbodybytes, 1 << 20);
    }

    #[test]
    fn yaml_sets_nested_keys_and_ignores_unknown_ones() {
        let yaml = "
server:
  port: 7300
  token: secret
  alert:
    prewarmingpoolthreshold: 0.5
    prewarmingpoolreloadtimeout: 300
  somethingnew: 1
logger:
  level: debug
  formatter: JSONFormatter
nomad:
  enabled: false
  address: 10.0.0.1
influxdb:
  url: http://influx
local:
  images:
    openhpi/co_execenv_python:3.8: /srv/images/python
  defaultimage: host
";
        let config = Config::from_sources(Some(yaml), []).unwrap();
        assert_eq!(config.server.port, 7300);
        assert_eq!(config.server.token, "secret");
        assert_eq!(config.server.alert.prewarmingpoolthreshold, 0.5);
        assert_eq!(config.logger.level, LogLevel::Debug);
        assert_eq!(config.logger.formatter, LogFormatter::Json);
        assert_eq!(
            config.local.images.get("openhpi/co_execenv_python:3.8"),
            Some(&PathBuf::from("/srv/images/python"))
        );
        assert_eq!(config.default_image().as_deref(), Some("host"));
    }

    #[test]
    fn environment_variables_override_yaml_at_any_depth() {
        let vars = env(&[
            ("POSEIDON_SERVER_PORT", "7400"),
            ("POSEIDON_SERVER_TOKEN", "007"),
            ("POSEIDON_SERVER_ALERT_PREWARMINGPOOLTHRESHOLD", "0.25"),
            ("POSEIDON_SERVER_TLS_ACTIVE", "FALSE"),
            ("POSEIDON_SERVER_SYSTEMDSOCKETACTIVATION", "TRUE"),
            ("POSEIDON_LOGGER_FORMATTER", "JSONFormatter"),
            ("POSEIDON_LOCAL_IMAGES_PYTHON", "/srv/python"),
            ("POSEIDON_LIMITS_MAXBODYBYTES", "2048"),
            ("OTHER_SERVER_PORT", "1"),
            ("POSEIDON__BROKEN", "x"),
        ]);
        let config =
            Config::from_sources(Some("server:\n  port: 7300\n  token: yaml\n"), vars).unwrap();
        assert_eq!(config.server.port, 7400);
        assert_eq!(config.server.token, "007");
        assert_eq!(config.server.alert.prewarmingpoolthreshold, 0.25);
        assert!(!config.server.tls.active);
        assert!(config.server.systemdsocketactivation);
        assert_eq!(config.logger.formatter, LogFormatter::Json);
        assert_eq!(config.local.images.get("python"), Some(&PathBuf::from("/srv/python")));
        assert_eq!(config.limits.maxbodybytes, 2048);
    }

    #[test]
    fn invalid_values_fail_with_the_key() {
        assert!(rejected("server:\n  port: 70000\n").contains("port"));
        assert!(rejected("server:\n  port: seven\n").contains("seven"));
        assert!(rejected("logger:\n  level: LOUD\n").contains("LOUD"));
        assert!(rejected("logger:\n  formatter: XML\n").contains("XML"));
        assert!(
            rejected("server:\n  alert:\n    prewarmingpoolthreshold: -1\n").contains("threshold")
        );
        assert!(rejected("server:\n  tls:\n    active: true\n").contains("certfile"));
        assert!(rejected("nomad:\n  enabled: true\n  namespace: ''\n").contains("namespace"));
        assert!(rejected("nomad:\n  tls:\n    certfile: /c\n").contains("keyfile"));
        assert!(rejected("local:\n  memorylimit: 0\n").contains("memorylimit"));
        let from_env = Config::from_sources(None, env(&[("POSEIDON_SERVER_TLS_ACTIVE", "yes")]));
        assert!(from_env.unwrap_err().to_string().contains("yes"));
    }

    #[test]
    fn the_documented_example_is_valid() {
        let docs = include_str!("../../../docs/configuration.md");
        let example = docs.split("```yaml\n").nth(1).unwrap().split("```").next().unwrap();
        let config = Config::from_sources(Some(example), []).unwrap();
        assert_eq!(config.local.images.len(), 2);
        assert!(config.server.tls.active);
        let registries = config.registries();
        assert_eq!(registries.plain_http, ["127.0.0.1:5000"]);
        assert_eq!(registries.credentials["registry.example.org:5000"].username, "poseidon");
        assert_eq!(config.local.imagepullpolicy, poseidon_local::PullPolicy::IfMissing);
        let never = Config::from_sources(None, env(&[("POSEIDON_LOCAL_IMAGEPULLPOLICY", "never")]));
        assert_eq!(never.unwrap().local.imagepullpolicy, poseidon_local::PullPolicy::Never);
    }

    #[test]
    fn nomad_keys_come_from_yaml_and_the_environment() {
        let defaults = Config::from_sources(None, []).unwrap().nomad;
        assert!(!defaults.enabled);
        assert_eq!((defaults.address.as_str(), defaults.port), ("127.0.0.1", 4646));
        assert_eq!(
            (defaults.namespace.as_str(), defaults.network.mode.as_str()),
            ("default", "bridge")
        );
        let yaml = "nomad:\n  enabled: true\n  network:\n    mode: cni/secure-bridge\n    \
                    dns:\n      servers: [1.1.1.1]\n";
        let vars = env(&[
            ("POSEIDON_NOMAD_ADDRESS", "nomad.example"),
            ("POSEIDON_NOMAD_PORT", "4747"),
            ("POSEIDON_NOMAD_TOKEN", "0123"),
            ("POSEIDON_NOMAD_NAMESPACE", "poseidon"),
            ("POSEIDON_NOMAD_DISABLEFORCEPULL", "TRUE"),
            ("POSEIDON_NOMAD_TLS_ACTIVE", "true"),
            ("POSEIDON_NOMAD_TLS_CAFILE", "/ca.pem"),
            ("POSEIDON_NOMAD_NETWORK_DNS_SEARCHES", "\"a.example b.example\""),
            ("POSEIDON_SERVER_TEMPLATEJOBFILE", "/etc/poseidon/job.hcl"),
        ]);
        let config = Config::from_sources(Some(yaml), vars).unwrap();
        let nomad = &config.nomad;
        assert!(nomad.enabled && nomad.disableforcepull && nomad.tls.active);
        assert_eq!((nomad.address.as_str(), nomad.port), ("nomad.example", 4747));
        assert_eq!((nomad.token.as_str(), nomad.namespace.as_str()), ("0123", "poseidon"));
        assert_eq!(nomad.tls.cafile, PathBuf::from("/ca.pem"));
        assert_eq!(nomad.network.mode, "cni/secure-bridge");
        assert_eq!(nomad.network.dns.servers, ["1.1.1.1"]);
        assert_eq!(nomad.network.dns.searches, ["a.example", "b.example"]);
        assert_eq!(config.server.templatejobfile, "/etc/poseidon/job.hcl");
    }

    #[test]
    fn an_explicit_config_file_must_exist() {
        let missing = Path::new("/nonexistent/poseidon.yaml");
        assert!(matches!(Config::load(Some(missing), []), Err(ConfigError::Read { .. })));
    }
}
