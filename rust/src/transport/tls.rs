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
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::base::budget::Peer;
use crate::base::cluster::TaskId;
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

/// The URI (a SPIFFE ID) by which a certificate names the one task it belongs to.
fn task_uri(task: &TaskId) -> String {
    format!("spiffe://distsrv/job/{}/task/{}", task.job, task.index)
}

/// The task a certificate (DER) names, if it names one (see [`temporary`]).
pub fn task_of_certificate(der: &[u8]) -> Option<TaskId> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let names = cert.subject_alternative_name().ok()??;
    names
        .value
        .general_names
        .iter()
        .find_map(|name| match name {
            GeneralName::URI(uri) => {
                let rest = uri.strip_prefix("spiffe://distsrv/job/")?;
                let (job, index) = rest.split_once("/task/")?;
                Some(TaskId::new(job, index.parse().ok()?))
            }
            _ => None,
        })
}

/// The task the certificate of a TLS connection names: the authenticated peer, when its
/// certificate is bound to a task.
pub fn certified_task(certs: Option<&Vec<CertificateDer<'static>>>) -> Option<TaskId> {
    task_of_certificate(certs?.first()?.as_ref())
}

/// The peer a request counts against (see [`Peer`]): the task its connection's certificate
/// names, else the address it comes from.
pub fn calling_peer<B>(request: &http::Request<B>) -> Peer {
    let extensions = request.extensions();
    if let Some(info) = extensions.get::<TlsConnectInfo<TcpConnectInfo>>() {
        if let Some(task) = certified_task(info.peer_certs().as_deref()) {
            return Peer::Task(task);
        }
        return info
            .get_ref()
            .remote_addr()
            .map_or(Peer::Unknown, |a| Peer::Address(a.ip()));
    }
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .map_or(Peer::Unknown, |address| Peer::Address(address.ip()))
}

/// Refuses `claimed` (a tensor's source, a call's caller, a handshake's task) unless the
/// connection's certificate names it, or names no task at all.
pub fn check_identity(certified: Option<&TaskId>, claimed: &TaskId, what: &str) -> Result<()> {
    match certified {
        Some(peer) if peer != claimed => Err(Error::permission_denied(format!(
            "{peer} (by its certificate) cannot {what} as {claimed}"
        ))),
        _ => Ok(()),
    }
}

/// A fresh CA, and one certificate of it for `hosts` (names or IP addresses) per entry of
/// `tasks`: bound to that task where one is named, else any task's. For a local cluster;
/// [`Security`](crate::base::security::Security)'s temporary TLS.
pub fn temporary(hosts: &[String], tasks: &[Option<TaskId>]) -> Result<Vec<TlsPem>> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    let failed = |e: rcgen::Error| Error::internal(format!("cannot make a certificate: {e}"));
    let ca_key = KeyPair::generate().map_err(failed)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "distsrv temporary CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).map_err(failed)?.pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let mut issued = Vec::with_capacity(tasks.len());
    for task in tasks {
        let key = KeyPair::generate().map_err(failed)?;
        let mut params = CertificateParams::new(hosts.to_vec()).map_err(failed)?;
        let name = task
            .as_ref()
            .map_or("distsrv task".to_owned(), TaskId::to_string);
        params.distinguished_name.push(DnType::CommonName, name);
        if let Some(task) = task {
            let uri = task_uri(task).try_into().map_err(failed)?;
            params.subject_alt_names.push(SanType::URI(uri));
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer).map_err(failed)?;
        issued.push(TlsPem {
            ca: ca.clone().into_bytes(),
            cert: cert.pem().into_bytes(),
            key: key.serialize_pem().into_bytes(),
        });
    }
    Ok(issued)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_certificate_names_its_task_and_a_cluster_one_none() {
        let worker = TaskId::new("worker", 3);
        let issued = temporary(&["localhost".into()], &[Some(worker.clone()), None]).unwrap();
        let der = |pem: &[u8]| CertificateDer::from_pem_slice(pem).unwrap();
        assert_eq!(
            task_of_certificate(&der(&issued[0].cert)),
            Some(worker.clone())
        );
        assert_eq!(task_of_certificate(&der(&issued[1].cert)), None);
        assert_eq!(issued[0].ca, issued[1].ca);
        assert!(check_identity(Some(&worker), &worker, "send").is_ok());
        assert!(check_identity(None, &worker, "send").is_ok());
        let other = TaskId::new("worker", 1);
        let refused = check_identity(Some(&worker), &other, "send").unwrap_err();
        assert_eq!(refused.code, crate::base::errors::Code::PermissionDenied);
        Tls::new(Arc::new(issued[0].clone())).unwrap();
    }
}
