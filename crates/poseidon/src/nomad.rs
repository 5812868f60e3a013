//! The `nomad.*` keys and `server.templatejobfile` as the Nomad backend takes them.

use std::time::Duration;

use poseidon_nomad::{NetworkConfig, NomadConfig, TemplateSource, TlsFiles};

use crate::config::Config;

pub fn nomad_config(config: &Config) -> NomadConfig {
    let nomad = &config.nomad;
    let path = |path: &std::path::Path| Some(path.to_owned()).filter(|p| !p.as_os_str().is_empty());
    let tls = nomad.tls.active.then(|| TlsFiles {
        ca_file: path(&nomad.tls.cafile),
        cert_file: path(&nomad.tls.certfile),
        key_file: path(&nomad.tls.keyfile),
    });
    let network = &nomad.network;
    let template = match config.server.templatejobfile.as_str() {
        "" => TemplateSource::Embedded,
        file => TemplateSource::File(file.into()),
    };
    NomadConfig {
        address: nomad.address.clone(),
        port: nomad.port,
        token: nomad.token.clone(),
        tls,
        namespace: nomad.namespace.clone(),
        network: NetworkConfig {
            mode: network.mode.clone(),
            device: network.device.clone(),
            cidr: network.cidr.clone(),
            ip: network.ip.clone(),
            hostname: network.hostname.clone(),
            dns_servers: network.dns.servers.clone(),
            dns_searches: network.dns.searches.clone(),
            dns_options: network.dns.options.clone(),
        },
        disable_force_pull: nomad.disableforcepull,
        template,
        start_timeout: Duration::from_secs(nomad.starttimeout.max(1)),
        reconcile_interval: Duration::from_secs(nomad.reconcileinterval.max(1)),
        ..NomadConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_onto_the_backend_config() {
        let yaml = "server:\n  templatejobfile: /job.hcl\nnomad:\n  enabled: true\n  \
                    token: t\n  tls:\n    active: true\n    cafile: /ca.pem\n  \
                    network:\n    mode: cni/secure-bridge\n  starttimeout: 20\n";
        let config = nomad_config(&Config::from_sources(Some(yaml), []).unwrap());
        assert_eq!(config.template, TemplateSource::File("/job.hcl".into()));
        let tls = config.tls.unwrap();
        assert_eq!(tls.ca_file.as_deref(), Some(std::path::Path::new("/ca.pem")));
        assert!(tls.cert_file.is_none());
        assert_eq!(config.network.mode, "cni/secure-bridge");
        assert_eq!(config.start_timeout, Duration::from_secs(20));
        assert_eq!(config.token, "t");
        let plain = nomad_config(&Config::from_sources(None, []).unwrap());
        assert!(plain.tls.is_none());
        assert_eq!(plain.template, TemplateSource::Embedded);
    }
}
