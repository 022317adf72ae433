//! The process's TLS cryptography: rustls on ring, and PEM files read with
//! the setting (or variable) that names them in every error.
//!
//! Invariants: one provider (ring) for every TLS client and server of the
//! process: the shards (sqlx), Redis, the API listener, OTLP collectors and
//! the load tool; no aws-lc, so no C toolchain beyond `cc`.
//!
//! Must not: read any file but the one it is given, or decide what a file is
//! for (callers do).

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The ring provider.
pub fn provider() -> Arc<CryptoProvider> {
    // ring: no post-quantum key exchange (hence the deprecation), but the
    // provider the rest of the tree builds rustls with, and no cmake.
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process's default provider, for clients that take the
/// default (reqwest, built with `rustls-no-provider`, refuses to build a
/// client without one). Call once at start, before any client is built;
/// later calls change nothing.
pub fn install_default_provider() {
    // Err: a default is already installed, which is all this asks for.
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Every certificate in the PEM file `path` (at least one); an error names
/// `setting` and the file.
pub fn load_certificates(
    path: &Path,
    setting: &str,
) -> anyhow::Result<Vec<CertificateDer<'static>>> {
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

/// The private key in the PEM file `path`; an error names `setting` and the
/// file.
pub fn load_private_key(path: &Path, setting: &str) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| anyhow::anyhow!("{setting} {}: no private key read: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_file_is_named_with_its_setting() -> crate::TestResult {
        let dir = std::env::temp_dir().join(format!("chatshard-crypto-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n")?;
        let missing = dir.join("missing.pem");
        let e = load_certificates(&missing, "SOME_SETTING")
            .err()
            .ok_or("a missing file loaded")?;
        assert!(e.to_string().starts_with("SOME_SETTING "), "{e}");
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let e = load_certificates(&empty, "OTHER")
            .err()
            .ok_or("an empty file loaded")?;
        assert!(e.to_string().contains("holds no PEM certificate"), "{e}");
        let e = load_private_key(&empty, "KEY_SETTING")
            .err()
            .ok_or("a key loaded from nothing")?;
        assert!(e.to_string().starts_with("KEY_SETTING "), "{e}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
