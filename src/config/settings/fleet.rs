//! `[redis]`: Redis between the instances of a fleet; with no URL an
//! instance works alone.
//!
//! Invariants: the defaults here are the documented ones (a change is a
//! behaviour change); Redis's own breaker defaults differ from the shards'
//! (`[breaker]`) only where written below.
//!
//! Must not: connect to Redis or import `crate::fleet` (it takes this
//! struct), or check values (`config::validate` does, URLs included).

use serde::{Deserialize, Serialize};

use super::{BreakerSettings, redact_url};

/// Redis between the instances of a fleet (see `docs/fleet.md`). With no
/// `url`, the instance works alone, exactly as without a fleet.
///
/// `Debug` shows the URLs without their passwords.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// `redis://host:port/`, or `rediss://host:port/` for TLS; for a Redis
    /// Cluster, any of its nodes, separated by commas, with `cluster = true`.
    /// Empty: no fleet.
    pub url: String,
    /// The URLs name Redis Cluster nodes (sharded pub/sub, slot routing).
    pub cluster: bool,
    /// Prefix of every key and channel, so deployments can share one Redis.
    pub key_prefix: String,
    /// Longest wait for one Redis answer; past it the call fails, counts
    /// against Redis's breaker, and the instance acts alone.
    pub timeout_ms: u64,
    /// Longest wait for a connection to Redis.
    pub connect_timeout_ms: u64,
    /// How often an instance says it is alive (and reads who else is).
    pub heartbeat_ms: u64,
    /// An instance not heard of for this long is no longer counted.
    pub instance_ttl_ms: u64,
    /// A notice carries its batch's events while they take at most this
    /// many bytes; a larger batch's notice only names its revisions.
    pub notice_max_bytes: usize,
    /// Notices and fleet messages waiting to be sent; past it they are
    /// dropped (and counted): readers then learn of those writes through
    /// their own refresh.
    pub publish_queue: usize,
    /// Largest lease of joins an instance takes from a chat's global limit.
    pub join_lease_max: u64,
    /// Redis's own circuit breaker (same fields as `[breaker]`).
    pub breaker: BreakerSettings,
    /// Certificates for `rediss://` URLs.
    pub tls: RedisTlsSettings,
}

/// `[redis.tls]`: certificates for `rediss://` URLs. Without any, the server's
/// certificate is checked against the system's roots and none is presented.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisTlsSettings {
    /// PEM file of the CA(s) that signed Redis's certificates, for a private
    /// CA; empty: the system's roots.
    pub ca_file: String,
    /// PEM certificate (chain) this instance presents when Redis asks for
    /// one (`tls-auth-clients`); with `key_file`.
    pub cert_file: String,
    /// PEM private key of `cert_file`.
    pub key_file: String,
}

impl RedisTlsSettings {
    /// Whether any certificate is configured.
    pub fn is_set(&self) -> bool {
        !(self.ca_file.is_empty() && self.cert_file.is_empty() && self.key_file.is_empty())
    }
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &self.redacted_url())
            .field("cluster", &self.cluster)
            .field("key_prefix", &self.key_prefix)
            .field("timeout_ms", &self.timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("instance_ttl_ms", &self.instance_ttl_ms)
            .field("notice_max_bytes", &self.notice_max_bytes)
            .field("publish_queue", &self.publish_queue)
            .field("join_lease_max", &self.join_lease_max)
            .field("breaker", &self.breaker)
            .field("tls", &self.tls)
            .finish()
    }
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            cluster: false,
            key_prefix: "chatshard".to_owned(),
            timeout_ms: 100,
            connect_timeout_ms: 500,
            heartbeat_ms: 1000,
            instance_ttl_ms: 5000,
            notice_max_bytes: 16 * 1024,
            publish_queue: 10_000,
            join_lease_max: 64,
            breaker: BreakerSettings {
                consecutive_failures: 3,
                open_ms: 1000,
                ..BreakerSettings::default()
            },
            tls: RedisTlsSettings::default(),
        }
    }
}

impl RedisSettings {
    /// The Redis URLs of `url` (comma-separated); none when no fleet is
    /// configured.
    pub fn urls(&self) -> Vec<String> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// `url` with every password left out, to show.
    pub fn redacted_url(&self) -> String {
        self.urls()
            .iter()
            .map(|u| redact_url(u))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Whether the URLs ask for TLS (`rediss://`); with several, whether any does.
    pub fn wants_tls(&self) -> bool {
        self.urls().iter().any(|u| {
            u.get(..9)
                .is_some_and(|s| s.eq_ignore_ascii_case("rediss://"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_of_redis_urls_are_never_shown() {
        let settings = RedisSettings {
            url: "rediss://:s3cret@r1:6380/, redis://app:hunter2@r2/".to_owned(),
            ..RedisSettings::default()
        };
        assert_eq!(
            settings.redacted_url(),
            "rediss://@r1:6380/,redis://app@r2/"
        );
        let shown = format!("{settings:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("hunter2"),
            "{shown}"
        );
        assert!(settings.wants_tls());
        assert!(!RedisSettings::default().wants_tls());
    }
}
