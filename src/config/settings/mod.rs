//! The typed settings: one struct per section of the file, each with its
//! defaults, and the root [`Settings`] that holds them all.
//!
//! Invariants: every struct denies unknown keys, and a key the file leaves out
//! takes its `Default` (only a shard's `name`, `url` and `buckets` are
//! required); field names are the file's keys, so renaming a field renames a
//! key operators use. The helpers here (durations, shares, bucket ranges, the
//! router) only derive values from fields.
//!
//! Must not: read files or the environment (`super` loads, `super::env`
//! overlays), judge values (`super::validate` does), or import the crate's
//! layers that take these structs (`crate::shard`, `crate::service`,
//! `crate::fleet`, `crate::http`, ...).
//!
//! The sections live beside this file:
//!
//! - `shards`: `[[shards]]`, and how each is reached (`[pool]`, `[breaker]`,
//!   `[group_commit]`);
//! - `serving`: client connections and a server's in-memory state (`[http]`,
//!   `[throttle]`, `[tail]`);
//! - `background`: work that runs beside requests (`[moves]`, `[purge]`,
//!   `[digest]`);
//! - `fleet`: Redis between the instances of a fleet (`[redis]`).

mod api;
mod background;
mod fleet;
mod serving;
mod shards;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::live::{HotChatConfig, JoinThrottleConfig, LiveConfig};
use crate::routing::{BucketRange, Router};

pub use api::{ApiClient, ApiSettings, Scope};
pub use background::{DigestSettings, MovesSettings, PurgeSettings};
pub use fleet::{RedisSettings, RedisTlsSettings};
pub use serving::{HttpSettings, HttpTlsSettings, TailSettings, ThrottleSettings};
pub use shards::{
    BreakerSettings, GroupCommitSettings, PoolSettings, ReplicaSettings, ShardSettings, redact_url,
};

/// The whole static configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address the HTTP API listens on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default)]
    pub http: HttpSettings,
    #[serde(default)]
    pub defaults: ChatDefaults,
    #[serde(default)]
    pub pool: PoolSettings,
    #[serde(default)]
    pub group_commit: GroupCommitSettings,
    #[serde(default)]
    pub breaker: BreakerSettings,
    /// Replicated shards: the member monitor and replica reads.
    #[serde(default)]
    pub replicas: ReplicaSettings,
    #[serde(default)]
    pub startup: StartupSettings,
    #[serde(default)]
    pub admin: AdminSettings,
    /// Who may call the data API (`[[api.clients]]`; none: it is open).
    #[serde(default)]
    pub api: ApiSettings,
    #[serde(default)]
    pub throttle: ThrottleSettings,
    #[serde(default)]
    pub tail: TailSettings,
    /// The fleet: Redis between instances (absent URL = one instance alone).
    #[serde(default)]
    pub redis: RedisSettings,
    /// Online chat moves (docs/moving-chats.md).
    #[serde(default)]
    pub moves: MovesSettings,
    #[serde(default)]
    pub telemetry: crate::telemetry::TelemetrySettings,
    /// Live: hot-chat detection and fetch throttling (changeable at run time).
    #[serde(default)]
    pub hot_chat: HotChatConfig,
    /// Live: join throttling (changeable at run time).
    #[serde(default)]
    pub join_throttle: JoinThrottleConfig,
    /// Live: event streams (changeable at run time).
    #[serde(default)]
    pub streams: crate::live::StreamsConfig,
    /// Live: how long the event log keeps events (changeable at run time).
    #[serde(default)]
    pub retention: crate::live::RetentionConfig,
    /// Live: automatic isolation of hot chats (changeable at run time).
    #[serde(default)]
    pub isolation: crate::live::IsolationConfig,
    /// How the purge paces its deletes (docs/event-log.md).
    #[serde(default)]
    pub purge: PurgeSettings,
    /// The digest check that finds and repairs drift (docs/event-log.md).
    #[serde(default)]
    pub digest: DigestSettings,
    #[serde(default)]
    pub shards: Vec<ShardSettings>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

/// Defaults for new chats.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChatDefaults {
    /// `maxMembers` of a chat created without one.
    pub max_members: u32,
}

impl Default for ChatDefaults {
    fn default() -> Self {
        Self {
            max_members: 10_000,
        }
    }
}

/// The admin API (`/v1/admin/...`).
#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Bearer token of the admin API; `CHATSHARD_ADMIN_TOKEN` overrides it.
    /// Empty: the admin API is off.
    pub token: String,
}

impl std::fmt::Debug for AdminSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminSettings")
            .field(
                "token",
                &if self.token.is_empty() {
                    "<none>"
                } else {
                    "<set>"
                },
            )
            .finish()
    }
}

/// Checks made when `serve` starts.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StartupSettings {
    /// Refuse to start (instead of warning) when a shard does not run with
    /// `innodb_autoinc_lock_mode=2` and `innodb_flush_log_at_trx_commit=1`.
    pub require_safe_innodb: bool,
}

impl Settings {
    /// Each shard's series of auto-increment ids, in `[[shards]]` order: its
    /// `id_block`, or its position.
    pub fn id_blocks(&self) -> Vec<u16> {
        self.shards
            .iter()
            .enumerate()
            .map(|(i, s)| s.id_block.unwrap_or(u16::try_from(i).unwrap_or(u16::MAX)))
            .collect()
    }

    /// The live section of the file.
    pub fn live(&self) -> LiveConfig {
        LiveConfig {
            hot_chat: self.hot_chat.clone(),
            join_throttle: self.join_throttle.clone(),
            streams: self.streams.clone(),
            retention: self.retention.clone(),
            isolation: self.isolation.clone(),
        }
    }

    /// Every shard's parsed bucket ranges, in shard order.
    pub fn bucket_ranges(&self) -> Result<Vec<Vec<BucketRange>>, Vec<String>> {
        let mut problems = Vec::new();
        let ranges = self
            .shards
            .iter()
            .map(|s| {
                s.buckets
                    .iter()
                    .filter_map(|r| {
                        BucketRange::parse(r)
                            .map_err(|e| problems.push(format!("shard {:?}: {e}", s.name)))
                            .ok()
                    })
                    .collect()
            })
            .collect();
        if problems.is_empty() {
            Ok(ranges)
        } else {
            Err(problems)
        }
    }

    /// The routing table; only valid settings reach here.
    pub fn router(&self) -> Result<Router, ConfigError> {
        let ranges = self.bucket_ranges().map_err(ConfigError)?;
        Router::new(&ranges).map_err(ConfigError)
    }
}
