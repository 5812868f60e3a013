//! The rustls client configuration for Nomad's API and exec WebSockets.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::client::NomadError;
use crate::config::TlsFiles;

/// Trusts the configured CA (or the web PKI without one) and presents the client certificate
/// when one is configured (mTLS with `verify_https_client`).
pub(crate) fn client_config(files: &TlsFiles) -> Result<rustls::ClientConfig, NomadError> {
    let mut roots = RootCertStore::empty();
    match &files.ca_file {
        Some(path) => {
            for certificate in CertificateDer::pem_file_iter(path).map_err(pem_error(path))? {
                roots
                    .add(certificate.map_err(pem_error(path))?)
                    .map_err(|error| NomadError::Tls(format!("{}: {error}", path.display())))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| NomadError::Tls(error.to_string()))?
        .with_root_certificates(roots);
    match (&files.cert_file, &files.key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(pem_error(cert))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(pem_error(cert))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(pem_error(key))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|error| NomadError::Tls(format!("client certificate: {error}")))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(NomadError::Tls("a client certificate needs both certfile and keyfile".into())),
    }
}

fn pem_error(path: &std::path::Path) -> impl Fn(rustls::pki_types::pem::Error) -> NomadError + '_ {
    move |error| NomadError::Tls(format!("{}: {error}", path.display()))
}
