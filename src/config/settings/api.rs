//! `[api]`: who may call the data API (docs/operations.md, "Securing a
//! deployment").
//!
//! Each `[[api.clients]]` entry names a caller, the SHA-256 of its bearer
//! token (so the file holds no secret) and/or the common name of its client
//! certificate (with mutual TLS, `http.tls.client_ca_file`), and its scopes.
//! No entry: the data API is open, as it was before clients existed. Must not: hold a token in
//! clear, or decide what a route needs (`http::auth` does).

use serde::{Deserialize, Serialize};

/// The `[api]` section.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    /// The callers of the API; two entries with one name and two tokens
    /// let a client's token be rotated without a gap.
    pub clients: Vec<ApiClient>,
}

/// One caller of the API.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiClient {
    /// Shown on the request's span and in logs (never the token).
    pub name: String,
    /// The hex SHA-256 of the bearer token (`printf %s "$TOKEN" | sha256sum`);
    /// empty: the client is known by its certificate only.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token_sha256: String,
    /// The common name (the subject's `CN`, compared exactly) of the client
    /// certificate that stands for this client over mutual TLS; empty: none.
    /// Only a certificate that the handshake verified against
    /// `http.tls.client_ca_file` is looked at.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cert_common_name: String,
    /// What the caller may do.
    pub scopes: Vec<Scope>,
}

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Reads: chats, members, counts, events, streams.
    Read,
    /// Writes: create chats, join, leave, post.
    Write,
    /// The admin API (beside `admin.token`).
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }
}

impl ApiClient {
    /// The token's digest, if `token_sha256` is 64 hex digits.
    pub fn digest(&self) -> Option<[u8; 32]> {
        let hex = self.token_sha256.trim();
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(out)
    }
}
