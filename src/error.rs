//! Error helpers every layer may use; this module depends on nothing else in
//! the crate, so no layer has to import a higher one to print an error.

/// An error and its sources, on one line, for logs and the admin view.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Why a server that answered refused a connection: a configuration error
/// (of the URL, its certificates, or the server's accounts), not an outage,
/// so retrying never helps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectRefusal {
    /// The TLS handshake failed: a certificate that does not verify
    /// (`ssl-mode=VERIFY_CA`, `VERIFY_IDENTITY`), a server without TLS under
    /// `ssl-mode=REQUIRED` or stricter, an unreadable certificate or key.
    Tls,
    /// The server takes only TLS (`require_secure_transport=ON`) and the URL
    /// disabled it (MySQL 8 says so: `ER_SECURE_TRANSPORT_REQUIRED`).
    TlsRequired,
    /// The login was refused (`ER_ACCESS_DENIED_ERROR`): a wrong user or
    /// password, or a MariaDB that takes only TLS reached with
    /// `ssl-mode=DISABLED` (MariaDB answers that with this error).
    Login,
}

impl std::fmt::Display for ConnectRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tls => "the TLS connection failed",
            Self::TlsRequired => {
                "the server requires TLS (require_secure_transport=ON) and the URL's ssl-mode disables it"
            }
            Self::Login => {
                "the login was refused: a wrong user or password, or a server that requires TLS \
                 (require_secure_transport=ON) reached with ssl-mode=DISABLED"
            }
        })
    }
}

/// `ER_ACCESS_DENIED_ERROR`, MariaDB and MySQL alike.
const ACCESS_DENIED: u16 = 1045;
/// `ER_SECURE_TRANSPORT_REQUIRED` (MySQL 8).
const SECURE_TRANSPORT_REQUIRED: u16 = 3159;

/// What `e`, from opening a connection, says when the server answered and
/// refused it; `None` for anything else (a server down or unreachable, a
/// timeout), which a retry may mend.
pub fn connect_refusal(e: &sqlx::Error) -> Option<ConnectRefusal> {
    match e {
        sqlx::Error::Tls(_) | sqlx::Error::Configuration(_) => Some(ConnectRefusal::Tls),
        // A handshake that fails after it started reaches sqlx as an I/O
        // error carrying rustls' own.
        sqlx::Error::Io(io)
            if io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()) =>
        {
            Some(ConnectRefusal::Tls)
        }
        sqlx::Error::Database(db) => {
            match db
                .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .map(|e| e.number())
            {
                Some(ACCESS_DENIED) => Some(ConnectRefusal::Login),
                Some(SECURE_TRANSPORT_REQUIRED) => Some(ConnectRefusal::TlsRequired),
                _ => None,
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_chain_names_every_cause() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(super::chain(&e), "outer: inner");
    }
}
