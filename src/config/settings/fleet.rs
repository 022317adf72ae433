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

use super::BreakerSettings;

/// Redis between the instances of a fleet (see `docs/fleet.md`). With no
/// `url`, the instance works alone, exactly as without a fleet.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// `redis://host:port/`; for a Redis Cluster, any of its nodes, separated
    /// by commas, with `cluster = true`. Empty: no fleet.
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
}
