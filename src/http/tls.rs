//! TLS on the API listener (`[http.tls]`): the acceptor the connection loop
//! ([`super::serve`]) hands each accepted socket to, and the certificate it
//! presents, swapped on [`Tls::reload`] (SIGHUP).
//!
//! Invariants: every handshake takes the certificate in force when its
//! ClientHello arrives; a reload changes only what later handshakes get, so
//! the connections and streams already open carry on; a certificate or key
//! that does not load (at start or on reload) is named by its setting and
//! file, and on reload leaves the previous pair in force. ALPN offers `h2`
//! and `http/1.1`. With `client_ca_file`, a client without a certificate
//! chaining to one of its CAs fails the handshake; the CA file is read at
//! start only.
//!
//! Must not: read anything but the configured files, or decide connection
//! limits and timeouts (the connection loop does).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::HttpTlsSettings;

/// The listener's TLS: its acceptor and the files its certificate is read
/// from.
pub struct Tls {
    acceptor: TlsAcceptor,
    current: Arc<Current>,
    provider: Arc<CryptoProvider>,
    cert_file: PathBuf,
    key_file: PathBuf,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// The listener's TLS as `settings` configure it; `None` when they leave
    /// it plain. Fails, naming the setting and the file, when a file cannot
    /// be read or holds nothing usable.
    pub fn from_settings(settings: &HttpTlsSettings) -> anyhow::Result<Option<Arc<Self>>> {
        if !settings.enabled() {
            return Ok(None);
        }
        // ring: no post-quantum key exchange (hence the deprecation), but the
        // provider the rest of the tree builds rustls with, and no cmake.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert_file = PathBuf::from(&settings.cert_file);
        let key_file = PathBuf::from(&settings.key_file);
        let key = load_certified_key(&cert_file, &key_file, &provider)?;
        let current = Arc::new(Current(ArcSwap::from_pointee(key)));
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow::anyhow!("http.tls: {e}"))?;
        let builder = if settings.client_ca_file.is_empty() {
            builder.with_no_client_auth()
        } else {
            let roots = load_client_cas(Path::new(&settings.client_ca_file))?;
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| {
                        anyhow::anyhow!("http.tls.client_ca_file {}: {e}", settings.client_ca_file)
                    })?;
            builder.with_client_cert_verifier(verifier)
        };
        let mut config = builder.with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Some(Arc::new(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            current,
            provider,
            cert_file,
            key_file,
        })))
    }

    /// Hands each accepted socket to the handshake.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Reads the certificate and key again; later handshakes present them,
    /// connections already open keep theirs. On failure (logged) the pair in
    /// force stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        match load_certified_key(&self.cert_file, &self.key_file, &self.provider) {
            Ok(key) => {
                self.current.0.store(Arc::new(key));
                tracing::info!(
                    cert_file = %self.cert_file.display(),
                    "reloaded the API listener's TLS certificate"
                );
                Ok(())
            }
            Err(e) => {
                tracing::warn!(
                    error = %format!("{e:#}"),
                    "cannot reload the API listener's TLS certificate; the previous one stays"
                );
                Err(e)
            }
        }
    }
}

/// The client certificate a connection's handshake verified against
/// `client_ca_file`, kept in the extensions of each of its requests
/// (`[[api.clients]]` `cert_common_name` names a client by it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    /// The first common name (`CN`) of the certificate's subject, if any
    /// (and valid UTF-8).
    pub common_name: Option<Arc<str>>,
}

impl ClientCertificate {
    /// The verified certificate of a connection (its leaf), if the client
    /// showed one. Only called for a handshake that succeeded, so with
    /// `client_ca_file` set the certificate chains to one of its CAs.
    pub fn of(connection: &rustls::ServerConnection) -> Option<Self> {
        let leaf = connection.peer_certificates()?.first()?;
        Some(Self {
            common_name: common_name(leaf.as_ref()).map(Arc::from),
        })
    }
}

/// The first common name of a DER certificate's subject.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// The certificate and key in force, which every handshake takes.
#[derive(Debug)]
struct Current(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// The chain of `cert_file` with the key of `key_file`, checked to match.
fn load_certified_key(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> anyhow::Result<CertifiedKey> {
    let chain = load_certificates(cert_file, "http.tls.cert_file")?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        anyhow::anyhow!(
            "http.tls.key_file {}: no private key read: {e}",
            key_file.display()
        )
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        anyhow::anyhow!(
            "http.tls.key_file {}: not a usable key for the certificate of {}: {e}",
            key_file.display(),
            cert_file.display()
        )
    })
}

/// Every certificate in the PEM file `path` (at least one).
fn load_certificates(path: &Path, setting: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("{setting} {}: {e}", path.display());
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(&e))?;
    if chain.is_empty() {
        return Err(fail(&"holds no PEM certificate"));
    }
    Ok(chain)
}

/// The CAs of `client_ca_file`.
fn load_client_cas(path: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for ca in load_certificates(path, "http.tls.client_ca_file")? {
        roots
            .add(ca)
            .map_err(|e| anyhow::anyhow!("http.tls.client_ca_file {}: {e}", path.display()))?;
    }
    Ok(roots)
}
