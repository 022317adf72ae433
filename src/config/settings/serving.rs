//! What a server holds while it serves: client connections (`[http]`), the
//! in-process throttling state (`[throttle]`) and the in-memory tails of
//! chats with readers (`[tail]`); all fixed at start (the files of
//! `[http.tls]` are read again on SIGHUP, their paths are not).
//!
//! Invariants: the defaults here are the documented ones (a change is a
//! behaviour change); each `*_ms` field has a `Duration` helper where the
//! serving code needs one, and the helper only converts.
//!
//! Must not: import `crate::http` or `crate::throttle` (they take these
//! structs), or check values (`config::validate` does).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What one client connection may hold, and for how long.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Time allowed for a request's headers; also how long an idle keep-alive
    /// HTTP/1 connection is kept waiting for its next request, and how long
    /// any connection (HTTP/1 or HTTP/2) may go from its accept to its first
    /// request.
    pub header_read_timeout_ms: u64,
    /// A connection with no request open for this long is closed (HTTP/2
    /// with GOAWAY); a response still being sent (an event stream, a
    /// long-poll) is an open request.
    pub idle_timeout_ms: u64,
    /// How often an HTTP/2 connection is sent a PING; 0 sends none.
    pub ping_interval_ms: u64,
    /// How long a client has to answer a PING before its connection is
    /// closed; also how long a connection asked to close (idle, unused, or
    /// on shutdown) may take to close once no request is open on it.
    pub ping_timeout_ms: u64,
    /// Time allowed for a request's whole body (408 `request_timeout` past it).
    pub body_read_timeout_ms: u64,
    /// Open connections at most; one more is answered 503
    /// `too_many_connections` and closed.
    pub max_connections: usize,
    /// On shutdown, how long requests in flight may finish before every
    /// connection still open is closed.
    pub shutdown_grace_ms: u64,
    /// The longest request target (path and query) accepted; longer ones get
    /// 414 `uri_too_long`.
    pub max_uri_bytes: usize,
    /// A connection whose client has not taken any of the bytes written to
    /// it for this long is closed (a stream subscriber that stopped reading).
    pub write_stall_timeout_ms: u64,
    /// What the server buffers for one connection beyond the kernel's socket
    /// buffer, at least 8192: an answer that does not drain waits at this
    /// (also the largest request head accepted). An event stream on HTTP/1 is
    /// written without it once its head is out, one frame at a time.
    pub send_buffer_bytes: usize,
    /// The kernel's send buffer of each client socket (SO_SNDBUF); 0 leaves
    /// it to the kernel's autotuning (up to `net.ipv4.tcp_wmem`'s maximum,
    /// 4 MiB by default, per connection).
    pub socket_send_buffer_bytes: usize,
    /// A bearer token `/metrics` asks for; empty: `/metrics` is open.
    /// `CHATSHARD__HTTP__METRICS_TOKEN` sets it without the file.
    pub metrics_token: String,
    /// TLS on the listener (`[http.tls]`); plain HTTP while its files are
    /// unset.
    pub tls: HttpTlsSettings,
}

/// TLS on the API listener. The certificate and key are read at start and
/// again on SIGHUP; the client CA only at start.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpTlsSettings {
    /// The server's certificate chain (PEM, leaf first); empty: no TLS.
    pub cert_file: String,
    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
    /// CA certificates (PEM) a client's certificate must chain to; empty:
    /// clients are not asked for one.
    pub client_ca_file: String,
    /// Time a client has, from its accept, to complete the TLS handshake.
    pub handshake_timeout_ms: u64,
}

impl Default for HttpTlsSettings {
    fn default() -> Self {
        Self {
            cert_file: String::new(),
            key_file: String::new(),
            client_ca_file: String::new(),
            handshake_timeout_ms: 10_000,
        }
    }
}

impl HttpTlsSettings {
    /// Whether the listener speaks TLS (either file set; validation requires
    /// both).
    pub fn enabled(&self) -> bool {
        !self.cert_file.is_empty() || !self.key_file.is_empty()
    }
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 30_000,
            ping_interval_ms: 20_000,
            ping_timeout_ms: 10_000,
            body_read_timeout_ms: 10_000,
            max_connections: 10_000,
            shutdown_grace_ms: 5_000,
            max_uri_bytes: 8_192,
            write_stall_timeout_ms: 30_000,
            send_buffer_bytes: 65_536,
            socket_send_buffer_bytes: 0,
            metrics_token: String::new(),
            tls: HttpTlsSettings::default(),
        }
    }
}

impl HttpSettings {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms)
    }
    pub fn ping_timeout(&self) -> Duration {
        Duration::from_millis(self.ping_timeout_ms)
    }
    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
    pub fn write_stall_timeout(&self) -> Duration {
        Duration::from_millis(self.write_stall_timeout_ms)
    }
}

/// Sizes of the in-process throttling state (fixed at start).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThrottleSettings {
    /// Chats whose join window and hot-chat bucket are tracked at once (each).
    pub tracked_chats: u64,
    /// Bytes of event pages kept for hot chats.
    pub page_cache_bytes: u64,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        Self {
            tracked_chats: 100_000,
            page_cache_bytes: 64 * 1024 * 1024,
        }
    }
}

/// The in-memory tails of chats with readers (fixed at start).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TailSettings {
    /// Chats that keep a tail at once.
    pub chats: u64,
    /// Recent events kept per chat.
    pub events_per_chat: usize,
    /// Bytes the tails of all chats may hold together (events and their
    /// encoded JSON, estimated); past it, a chat that appends drops its oldest
    /// events first (their readers read the log).
    pub max_bytes: u64,
    /// How long the tail's knowledge is trusted before one read refreshes it:
    /// the longest a write made through another instance stays unseen by
    /// this instance's polls and long-polls.
    pub refresh_ms: u64,
}

impl Default for TailSettings {
    fn default() -> Self {
        Self {
            chats: 10_000,
            events_per_chat: 1024,
            max_bytes: 256 * 1024 * 1024,
            refresh_ms: 1000,
        }
    }
}
