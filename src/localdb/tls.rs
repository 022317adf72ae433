//! Throw-away certificates for local TLS servers: a CA of its own and server
//! certificates it signs, made with the `openssl` command (installed with
//! apt-get when missing, as `mariadb-server` is).
//!
//! Invariants: everything lives in one fresh directory of the caller's
//! (`$TMPDIR/chatshard-pki-<pid>-<n>` for [`TestCertificates::temp`]),
//! removed when the [`TestCertificates`] is dropped; keys are elliptic-curve
//! (P-256: quick to make, read by MariaDB's OpenSSL and by rustls) and valid
//! for two days.
//!
//! Must not: be used for anything but local test and development servers (the
//! CA key sits unprotected beside the certificates).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context as _, Result, anyhow, bail};

const DAYS: &str = "2";

/// A CA and the directory its certificates are made in.
#[derive(Debug)]
pub struct TestCertificates {
    dir: PathBuf,
    openssl: PathBuf,
    ca: PathBuf,
    ca_key: PathBuf,
    /// Remove `dir` on drop.
    owns_dir: bool,
}

/// A certificate and its private key, PEM files.
#[derive(Debug, Clone)]
pub struct CertifiedKey {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCertificates {
    /// A new CA in a fresh temporary directory, removed on drop.
    pub fn temp() -> Result<Self> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("chatshard-pki-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir); // a leftover of a process with our pid
        let mut pki = Self::in_dir(&dir)?;
        pki.owns_dir = true;
        Ok(pki)
    }

    /// A new CA in `dir` (created if missing), which is kept on drop.
    pub fn in_dir(dir: &Path) -> Result<Self> {
        let openssl = super::find_or_install(|| super::find_program(&["openssl"]), "openssl")?
            .ok_or_else(|| {
                anyhow!("openssl not found: install it, e.g. `sudo apt-get install -y openssl`")
            })?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = std::path::absolute(dir)?;
        let pki = Self {
            openssl,
            ca: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            dir,
            owns_dir: false,
        };
        let config = pki.dir.join("ca.cnf");
        fs::write(
            &config,
            "[req]\ndistinguished_name = dn\nprompt = no\nx509_extensions = v3\n\
             [dn]\nCN = chatshard test CA\n\
             [v3]\nbasicConstraints = critical,CA:TRUE\n\
             keyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n",
        )?;
        pki.run(&[
            "req".as_ref(),
            "-x509".as_ref(),
            "-new".as_ref(),
            "-nodes".as_ref(),
            "-newkey".as_ref(),
            "ec".as_ref(),
            "-pkeyopt".as_ref(),
            "ec_paramgen_curve:prime256v1".as_ref(),
            "-days".as_ref(),
            DAYS.as_ref(),
            "-config".as_ref(),
            config.as_os_str(),
            "-keyout".as_ref(),
            pki.ca_key.as_os_str(),
            "-out".as_ref(),
            pki.ca.as_os_str(),
        ])?;
        Ok(pki)
    }

    /// The CA's certificate (what clients verify against: `ssl-ca`).
    pub fn ca(&self) -> &Path {
        &self.ca
    }

    /// A server certificate signed by the CA, for the DNS names and IP
    /// addresses in `names` (the first is also its common name), in
    /// `<dir>/<file>.pem` and `<dir>/<file>.key`.
    pub fn server(&self, file: &str, names: &[&str]) -> Result<CertifiedKey> {
        self.issue(file, names, "serverAuth")
    }

    /// A client certificate signed by the CA (for servers that ask clients
    /// for one), named `name`, in `<dir>/<file>.pem` and `<dir>/<file>.key`.
    pub fn client(&self, file: &str, name: &str) -> Result<CertifiedKey> {
        self.issue(file, &[name], "clientAuth")
    }

    /// A certificate for `names` with the extended key usage `usage`.
    fn issue(&self, file: &str, names: &[&str], usage: &str) -> Result<CertifiedKey> {
        let Some(first) = names.first() else {
            bail!("a certificate needs at least one name");
        };
        let alt_names: Vec<String> = names
            .iter()
            .map(|name| match name.parse::<std::net::IpAddr>() {
                Ok(_) => format!("IP:{name}"),
                Err(_) => format!("DNS:{name}"),
            })
            .collect();
        let config = self.dir.join(format!("{file}.cnf"));
        fs::write(
            &config,
            format!(
                "[req]\ndistinguished_name = dn\nprompt = no\n\
                 [dn]\nCN = {first}\n\
                 [v3]\nbasicConstraints = CA:FALSE\n\
                 keyUsage = critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage = {usage}\n\
                 subjectAltName = {}\nauthorityKeyIdentifier = keyid\n",
                alt_names.join(",")
            ),
        )?;
        let issued = CertifiedKey {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}.key")),
        };
        let request = self.dir.join(format!("{file}.csr"));
        let serial = self.dir.join("ca.srl");
        self.run(&[
            "req".as_ref(),
            "-new".as_ref(),
            "-nodes".as_ref(),
            "-newkey".as_ref(),
            "ec".as_ref(),
            "-pkeyopt".as_ref(),
            "ec_paramgen_curve:prime256v1".as_ref(),
            "-config".as_ref(),
            config.as_os_str(),
            "-keyout".as_ref(),
            issued.key.as_os_str(),
            "-out".as_ref(),
            request.as_os_str(),
        ])?;
        self.run(&[
            "x509".as_ref(),
            "-req".as_ref(),
            "-in".as_ref(),
            request.as_os_str(),
            "-CA".as_ref(),
            self.ca.as_os_str(),
            "-CAkey".as_ref(),
            self.ca_key.as_os_str(),
            "-CAcreateserial".as_ref(),
            "-CAserial".as_ref(),
            serial.as_os_str(),
            "-days".as_ref(),
            DAYS.as_ref(),
            "-extfile".as_ref(),
            config.as_os_str(),
            "-extensions".as_ref(),
            "v3".as_ref(),
            "-out".as_ref(),
            issued.cert.as_os_str(),
        ])?;
        Ok(issued)
    }

    fn run(&self, args: &[&std::ffi::OsStr]) -> Result<()> {
        let out = Command::new(&self.openssl)
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", self.openssl.display()))?;
        if !out.status.success() {
            bail!(
                "openssl {} failed ({}): {}",
                args.first()
                    .map(|a| a.to_string_lossy())
                    .unwrap_or_default(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

impl Drop for TestCertificates {
    fn drop(&mut self) {
        if self.owns_dir {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
