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
//! chaining to one of its CAs fails the handshake; the CA file is read again
//! on reload too, and a reload changes nothing unless the certificate, its
//! key and the CA file all load.
//!
//! Must not: read anything but the configured files, or decide connection
//! limits and timeouts (the connection loop does).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::HttpTlsSettings;
use crate::crypto::load_certificates;

/// The listener's TLS: its acceptor and the files its certificate is read
/// from.
pub struct Tls {
    /// What handshakes are made with, swapped when `client_ca_file` is
    /// reloaded.
    config: ArcSwap<ServerConfig>,
    current: Arc<Current>,
    provider: Arc<CryptoProvider>,
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
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
        let client_ca_file =
            (!settings.client_ca_file.is_empty()).then(|| PathBuf::from(&settings.client_ca_file));
        let key = load_certified_key(&cert_file, &key_file, &provider)?;
        let current = Arc::new(Current(ArcSwap::from_pointee(key)));
        let config = server_config(&provider, &current, client_ca_file.as_deref())?;
        Ok(Some(Arc::new(Self {
            config: ArcSwap::from_pointee(config),
            current,
            provider,
            cert_file,
            key_file,
            client_ca_file,
        })))
    }

    /// Hands each accepted socket to the handshake, with the configuration
    /// in force.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.load_full())
    }

    /// Reads the certificate, its key and the client CAs again; later
    /// handshakes use them, connections already open keep theirs. On
    /// failure (logged) everything in force stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let loaded =
            load_certified_key(&self.cert_file, &self.key_file, &self.provider).and_then(|key| {
                let config = match &self.client_ca_file {
                    Some(cas) => Some(server_config(&self.provider, &self.current, Some(cas))?),
                    None => None,
                };
                Ok((key, config))
            });
        match loaded {
            Ok((key, config)) => {
                self.current.0.store(Arc::new(key));
                if let Some(config) = config {
                    self.config.store(Arc::new(config));
                }
                tracing::info!(
                    cert_file = %self.cert_file.display(),
                    client_ca_file = %self.client_ca_file.as_deref().map(Path::display).map(|d| d.to_string()).unwrap_or_default(),
                    "reloaded the API listener's TLS certificate and client CAs"
                );
                Ok(())
            }
            Err(e) => {
                tracing::warn!(
                    error = %format!("{e:#}"),
                    "cannot reload the API listener's TLS files; the previous ones stay"
                );
                Err(e)
            }
        }
    }
}

/// The listener's configuration: the certificate `current` resolves, and a
/// client certificate verified against `client_ca_file` if given.
fn server_config(
    provider: &Arc<CryptoProvider>,
    current: &Arc<Current>,
    client_ca_file: Option<&Path>,
) -> anyhow::Result<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("http.tls: {e}"))?;
    let builder = match client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let roots = load_client_cas(path)?;
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| {
                        anyhow::anyhow!("http.tls.client_ca_file {}: {e}", path.display())
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(current.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
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
