//! mTLS to Nomad (`nomad.tls.*`): the backend talks HTTPS, including the event stream, to an
//! agent that demands a client certificate (`verify_https_client`), and is refused without one.
//! The agent is the Nomad simulator behind a TLS-terminating proxy; the certificates are made by
//! `openssl` for each run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nomad_sim::{SimConfig, SimHandle, Simulator};
use poseidon_core::environment::EnvironmentConfig;
use poseidon_core::ids::EnvironmentId;
use poseidon_core::{Core, CoreConfig};
use poseidon_nomad::{NomadBackend, NomadConfig, TlsFiles};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

const ENV: EnvironmentId = EnvironmentId(11);

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA.
struct Certificates {
    dir: tempfile::TempDir,
}

impl Certificates {
    fn make() -> Certificates {
        let dir = tempfile::tempdir().expect("temp dir");
        // Every argument is one word, so each command is written as a line.
        let openssl = |command: &str| {
            let args: Vec<&str> = command.split_whitespace().collect();
            let status = Command::new("openssl")
                .args(&args)
                .current_dir(dir.path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .expect("run openssl (Debian: apt-get install openssl)");
            assert!(status.success(), "openssl {command}");
        };
        let new_key = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
        openssl(&format!(
            "req -x509 {new_key} -keyout ca.key -out ca.pem -days 1 -subj /CN=test-ca"
        ));
        for (name, extension) in [
            ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
            ("client", "extendedKeyUsage=clientAuth"),
        ] {
            std::fs::write(dir.path().join(format!("{name}.ext")), extension).unwrap();
            openssl(&format!("req {new_key} -keyout {name}.key -out {name}.csr -subj /CN={name}"));
            openssl(&format!(
                "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
                 -extfile {name}.ext -out {name}.pem"
            ));
        }
        Certificates { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
}

/// Terminates TLS (client certificate required) in front of `upstream`; returns its address.
async fn tls_proxy(certificates: &Certificates, upstream: SocketAddr) -> SocketAddr {
    let certificate =
        |path: &Path| CertificateDer::pem_file_iter(path).unwrap().map(Result::unwrap);
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(certificate(&certificates.path("ca.pem")));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certificate(&certificates.path("server.pem")).collect(),
            PrivateKeyDer::from_pem_file(certificates.path("server.key")).unwrap(),
        )
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else { return };
                let Ok(mut plain) = TcpStream::connect(upstream).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    address
}

fn config(proxy: SocketAddr, tls: TlsFiles) -> NomadConfig {
    NomadConfig {
        port: proxy.port(),
        tls: Some(tls),
        request_attempts: 2,
        start_timeout: Duration::from_secs(60),
        ..NomadConfig::default()
    }
}

fn environment() -> EnvironmentConfig {
    EnvironmentConfig {
        id: ENV,
        prewarming_pool_size: 1,
        cpu_limit: 20,
        memory_limit: 256,
        image: "openhpi/co_execenv_python:3.8".into(),
        network_access: false,
        exposed_ports: Vec::new(),
    }
}

async fn simulator() -> SimHandle {
    Simulator::start(SimConfig::default()).await.expect("simulator")
}

#[tokio::test]
async fn runners_start_over_mutual_tls() {
    let certificates = Certificates::make();
    let sim = simulator().await;
    let proxy = tls_proxy(&certificates, sim.address()).await;
    let tls = TlsFiles {
        ca_file: Some(certificates.path("ca.pem")),
        cert_file: Some(certificates.path("client.pem")),
        key_file: Some(certificates.path("client.key")),
    };
    let backend = NomadBackend::start(config(proxy, tls)).await.expect("backend");
    let core = Core::new(Arc::new(backend), CoreConfig::default());
    core.restore().await.expect("recovery over TLS");
    core.put_environment(environment()).await.expect("template job registered over TLS");
    // The runner only joins the pool once the event stream (also over TLS) reports it running.
    let deadline = Instant::now() + Duration::from_secs(15);
    while core.statistics().first().map_or(0, |s| s.idle_runners) < 1 {
        assert!(Instant::now() < deadline, "no runner over TLS");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(sim.jobs().iter().any(|job| job.id == format!("template-{ENV}")));
    core.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn an_agent_that_demands_a_client_certificate_refuses_us_without_one() {
    let certificates = Certificates::make();
    let sim = simulator().await;
    let proxy = tls_proxy(&certificates, sim.address()).await;
    let tls =
        TlsFiles { ca_file: Some(certificates.path("ca.pem")), cert_file: None, key_file: None };
    let backend = NomadBackend::start(config(proxy, tls)).await.expect("backend");
    let core = Core::new(Arc::new(backend), CoreConfig::default());
    assert!(core.restore().await.is_err(), "recovery succeeded without a client certificate");
    assert!(sim.requests().is_empty(), "a request got through: {:?}", sim.requests());
    sim.shutdown().await;
}
