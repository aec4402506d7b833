//! TLS on every connection to and from a task, with rustls (ring): the task's certificate as
//! server and as client, and its CA as the only root for peers' certificates, so both ends of
//! every connection prove they belong to the cluster.

use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::base::errors::{Error, Result};
use crate::base::security::TlsPem;

/// A task's TLS, ready for tonic's server and channels and for pushes by hand.
#[derive(Clone)]
pub struct Tls {
    pem: Arc<TlsPem>,
    connector: TlsConnector,
}

impl Tls {
    /// Checks the PEMs (a CA, a certificate chain, a private key) and prepares the connector.
    pub fn new(pem: Arc<TlsPem>) -> Result<Self> {
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            Error::invalid_argument(format!("an unusable TLS {what}: {e}"))
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem.ca) {
            let cert = cert.map_err(|e| bad("CA", &e))?;
            roots.add(cert).map_err(|e| bad("CA", &e))?;
        }
        if roots.is_empty() {
            return Err(Error::invalid_argument("the TLS CA holds no certificate"));
        }
        let chain = CertificateDer::pem_slice_iter(&pem.cert)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| bad("certificate", &e))?;
        let key = PrivateKeyDer::from_pem_slice(&pem.key).map_err(|e| bad("key", &e))?;
        // AES-128-GCM first: with AES instructions it moves a third more bytes per second than
        // AES-256, and a tensor's bytes are most of what TLS carries. (A server follows the
        // client's order.)
        let mut provider = rustls::crypto::ring::default_provider();
        provider
            .cipher_suites
            .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        let provider = Arc::new(provider);
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("configuration", &e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| bad("certificate or key", &e))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            pem,
            connector: TlsConnector::from(Arc::new(config)),
        })
    }

    /// For tonic's server: this task's identity, and callers must show a certificate of the CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.pem.cert, &self.pem.key))
            .client_ca_root(Certificate::from_pem(&self.pem.ca))
    }

    /// For tonic's channels: peers' certificates must be of the CA and name the host dialled.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.pem.ca))
            .identity(Identity::from_pem(&self.pem.cert, &self.pem.key))
    }

    /// TLS over `stream` to the server at `host`, for a push by hand (HTTP/2 by ALPN).
    pub async fn connect(
        &self,
        host: &str,
        stream: TcpStream,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        self.connector.connect(name, stream).await
    }
}

/// A fresh CA and one certificate of it for `hosts` (names or IP addresses), which every task
/// of a local cluster shares: [`Security`](crate::base::security::Security)'s temporary TLS.
pub fn temporary(hosts: &[String]) -> Result<TlsPem> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let failed = |e: rcgen::Error| Error::internal(format!("cannot make a certificate: {e}"));
    let ca_key = KeyPair::generate().map_err(failed)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "distsrv temporary CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).map_err(failed)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().map_err(failed)?;
    let mut params = CertificateParams::new(hosts.to_vec()).map_err(failed)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "distsrv task");
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, &issuer).map_err(failed)?;
    Ok(TlsPem {
        ca: ca.pem().into_bytes(),
        cert: cert.pem().into_bytes(),
        key: key.serialize_pem().into_bytes(),
    })
}
