//! Static configuration: a TOML file plus environment overrides, validated on load.
//!
//! Loading lists every problem at once (not just the first) so an operator can fix
//! a file in one pass. Environment overrides:
//!
//! - `CHATSHARD__<SECTION>__<KEY>=value` sets any key, e.g.
//!   `CHATSHARD__POOL__MAX_WAIT_MS=100`, `CHATSHARD__POOL__CHAT_SHARE=0.25` or
//!   `CHATSHARD__LISTEN=0.0.0.0:8080`; the value takes the type of the field it
//!   sets (integer, float, bool, string, or a TOML array such as `["0-511"]`);
//! - `CHATSHARD_SHARD_<NAME>_URL` replaces the URL of the shard named `<name>`
//!   (upper-cased, `-` as `_`), so credentials need not live in the file.
//!
//! Only `app` and `cli` read this module's types; lower layers receive the typed
//! pieces they need (`PoolSettings` for a shard, and so on).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::MaxMembers;
use crate::live::{HotChatConfig, JoinThrottleConfig, LiveConfig};
use crate::routing::{BucketRange, Router};

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
    #[serde(default)]
    pub startup: StartupSettings,
    #[serde(default)]
    pub admin: AdminSettings,
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

/// What one client connection may hold, and for how long.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Time allowed for a request's headers; also how long an idle keep-alive
    /// connection is kept waiting for its next request.
    pub header_read_timeout_ms: u64,
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
    /// buffer, at least 8192: a stream that does not drain waits at this
    /// (also the largest request head accepted).
    pub send_buffer_bytes: usize,
    /// The kernel's send buffer of each client socket (SO_SNDBUF); 0 leaves
    /// it to the kernel's autotuning (up to `net.ipv4.tcp_wmem`'s maximum,
    /// 4 MiB by default, per connection).
    pub socket_send_buffer_bytes: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 10_000,
            max_connections: 10_000,
            shutdown_grace_ms: 5_000,
            max_uri_bytes: 8_192,
            write_stall_timeout_ms: 30_000,
            send_buffer_bytes: 65_536,
            socket_send_buffer_bytes: 0,
        }
    }
}

impl HttpSettings {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
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

/// The bulkhead of each shard: how much work one shard may hold.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSettings {
    /// Connections (and so operations in flight) per shard.
    pub max_concurrent: usize,
    /// Callers allowed to wait for a connection; one more is refused at once.
    pub max_waiting: usize,
    /// How long a caller may wait for a connection before it is refused.
    pub max_wait_ms: u64,
    /// Time allowed to open a new connection.
    pub connect_timeout_ms: u64,
    /// Deadline of one shard operation (a query, or a whole write transaction).
    pub operation_timeout_ms: u64,
    /// The largest share (0 < share <= 1) of `max_concurrent` (and of
    /// `max_waiting`) that one chat may hold, so the other chats of the shard
    /// always keep the rest.
    pub chat_share: f64,
    /// `innodb_lock_wait_timeout` (seconds) of chatshard's sessions; 0 keeps
    /// the server's. Below `operation_timeout_ms`, a write stuck behind another
    /// writer's row lock ends as one chat's contention (503 `chat_contended`)
    /// instead of a deadline overrun that counts against the whole shard.
    pub lock_wait_timeout_secs: u64,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_concurrent: 16,
            max_waiting: 64,
            max_wait_ms: 50,
            connect_timeout_ms: 1000,
            operation_timeout_ms: 1000,
            chat_share: 0.5,
            lock_wait_timeout_secs: 0,
        }
    }
}

impl PoolSettings {
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn operation_timeout(&self) -> Duration {
        Duration::from_millis(self.operation_timeout_ms)
    }
    /// Operations one chat may have in flight on its shard (at least 1).
    pub fn per_chat_concurrent(&self) -> usize {
        ((self.max_concurrent as f64 * self.chat_share).floor() as usize).max(1)
    }
    /// Callers of one chat that may wait for one of its slots.
    pub fn per_chat_waiting(&self) -> usize {
        (self.max_waiting as f64 * self.chat_share).floor() as usize
    }
}

/// The circuit breaker of every shard (see `shard::breaker` for what counts).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    /// Open after this many counted failures in a row.
    pub consecutive_failures: u32,
    /// Open when more than this fraction of calls failed over the window...
    pub failure_rate: f64,
    /// ...once at least this many calls were seen in it.
    pub min_requests: u32,
    /// The window of the failure rate.
    pub window_secs: u64,
    /// How long the breaker stays open before it probes the shard.
    pub open_ms: u64,
    /// Calls let through at a time while half-open.
    pub half_open_probes: usize,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            failure_rate: 0.5,
            min_requests: 20,
            window_secs: 10,
            open_ms: 2000,
            half_open_probes: 1,
        }
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

/// How chat moves copy, fence and recover (see `docs/moving-chats.md`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MovesSettings {
    /// Revisions replayed on the target per transaction (at most 5,000).
    pub batch_revisions: u32,
    /// The copy fences the source once it is at most this many revisions
    /// behind.
    pub fence_lag: u64,
    /// How long the fence holds the chat's writes at most (503 `chat_moving`).
    pub fence_ms: u64,
    /// A pause between two copy or clean-up batches.
    pub pause_ms: u64,
    /// The copy slows down (its pause doubles, up to `max_pause_ms`) while the
    /// p99 latency of the source's calls, or of this instance's requests of
    /// the source's other chats, is above this many times what it was before
    /// the copy started; 0 turns that off.
    pub max_p99_ratio: f64,
    /// The longest pause the p99 throttle lets the copy take between batches
    /// (cut to a quarter of `lease_ms`, so a paused copy keeps its lease).
    pub max_pause_ms: u64,
    /// At most this many revisions copied per second (0: no cap).
    pub revisions_per_second: u32,
    /// Rows deleted per statement when the source is cleaned.
    pub clean_batch: u32,
    /// A running move whose record has not changed for this long is taken
    /// for abandoned and finished or rolled back by any instance.
    pub lease_ms: u64,
    /// A write that meets a move's fence waits up to this long for the
    /// switch (checking again every 20 ms) before it is answered 503
    /// `chat_moving`; 0 answers at once.
    pub hold_writes_ms: u64,
    /// A bucket-range move moves this many of its chats at once.
    pub concurrent_chats: u32,
    /// How often every instance reads the newest version of the bucket
    /// table from the shards (and at once when a shard names another owner).
    pub map_poll_ms: u64,
}

impl Default for MovesSettings {
    fn default() -> Self {
        Self {
            batch_revisions: 1000,
            fence_lag: 500,
            fence_ms: 2000,
            pause_ms: 5,
            max_p99_ratio: 1.2,
            max_pause_ms: 1000,
            revisions_per_second: 20_000,
            clean_batch: 1000,
            lease_ms: 30_000,
            hold_writes_ms: 800,
            concurrent_chats: 4,
            map_poll_ms: 1000,
        }
    }
}

impl MovesSettings {
    fn problems(&self, problems: &mut Vec<String>) {
        if !(1..=5000).contains(&self.batch_revisions) {
            problems.push("moves.batch_revisions must be between 1 and 5000".to_owned());
        }
        if self.clean_batch == 0 {
            problems.push("moves.clean_batch must be greater than 0".to_owned());
        }
        if self.fence_ms < 100 {
            problems.push("moves.fence_ms must be at least 100".to_owned());
        }
        if self.lease_ms < 1000 || self.lease_ms < 2 * self.fence_ms {
            problems.push(
                "moves.lease_ms must be at least 1000 and at least twice moves.fence_ms".to_owned(),
            );
        }
        if !(self.max_p99_ratio == 0.0 || (1.0..=100.0).contains(&self.max_p99_ratio)) {
            problems.push("moves.max_p99_ratio must be 0 (off) or between 1 and 100".to_owned());
        }
        if self.max_pause_ms < self.pause_ms {
            problems.push("moves.max_pause_ms must be at least moves.pause_ms".to_owned());
        }
        if self.hold_writes_ms > 5000 {
            problems.push("moves.hold_writes_ms must be at most 5000".to_owned());
        }
        if !(1..=64).contains(&self.concurrent_chats) {
            problems.push("moves.concurrent_chats must be between 1 and 64".to_owned());
        }
        if !(100..=3_600_000).contains(&self.map_poll_ms) {
            problems.push("moves.map_poll_ms must be between 100 and 3600000".to_owned());
        }
    }
}

/// How the background purge deletes old events (the policy itself is the
/// live `retention` section). Each shard is purged by its own task, through
/// its bulkhead like any other work, at most `rows_per_second` rows a
/// second, `batch_rows` per statement; a shard whose breaker is open is
/// skipped until the next round.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PurgeSettings {
    /// Time between two purge rounds of a shard.
    pub interval_ms: u64,
    /// Events deleted per statement at most.
    pub batch_rows: u32,
    /// Events deleted per second per shard at most.
    pub rows_per_second: u32,
}

impl Default for PurgeSettings {
    fn default() -> Self {
        Self {
            interval_ms: 300_000,
            batch_rows: 1000,
            rows_per_second: 5000,
        }
    }
}

/// The periodic digest check (docs/event-log.md): every `interval_ms`, each
/// shard's chats that changed since they were last checked have their
/// member count compared with their JOINED rows and their revision with
/// their stored events, and a mismatch is repaired under the chat's lock.
/// Every `full_sweep_rounds` rounds every chat is checked, changed or not.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DigestSettings {
    /// Whether the check runs.
    pub enabled: bool,
    /// Time between two rounds of a shard.
    pub interval_ms: u64,
    /// Chats checked per second per shard at most.
    pub chats_per_second: u32,
    /// Every this many rounds, a round checks every chat (1 = every round).
    pub full_sweep_rounds: u32,
}

impl Default for DigestSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_ms: 60_000,
            chats_per_second: 500,
            full_sweep_rounds: 1440,
        }
    }
}

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

    /// Checks the URLs without connecting.
    fn check_urls(&self) -> Result<(), String> {
        let urls = self.urls();
        for url in &urls {
            redis::Client::open(url.as_str()).map_err(|e| format!("{url}: {e}"))?;
        }
        if !self.cluster && urls.len() > 1 {
            return Err("several URLs name a Redis Cluster: set redis.cluster = true".into());
        }
        Ok(())
    }

    fn problems(&self, problems: &mut Vec<String>) {
        if let Err(e) = self.check_urls() {
            problems.push(format!("redis.url: {e}"));
        }
        for (name, value) in [
            ("redis.timeout_ms", self.timeout_ms),
            ("redis.connect_timeout_ms", self.connect_timeout_ms),
            ("redis.heartbeat_ms", self.heartbeat_ms),
            ("redis.publish_queue", self.publish_queue as u64),
            ("redis.join_lease_max", self.join_lease_max),
            (
                "redis.breaker.consecutive_failures",
                u64::from(self.breaker.consecutive_failures),
            ),
            ("redis.breaker.open_ms", self.breaker.open_ms),
            ("redis.breaker.window_secs", self.breaker.window_secs),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be greater than 0"));
            }
        }
        if self.instance_ttl_ms < 2 * self.heartbeat_ms {
            problems
                .push("redis.instance_ttl_ms must be at least twice redis.heartbeat_ms".to_owned());
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(['{', '}']) {
            problems.push("redis.key_prefix must be non-empty and hold no braces".to_owned());
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

/// Group commit: writes to one chat are folded into one transaction.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupCommitSettings {
    /// Most writes committed in one transaction.
    pub max_batch: usize,
    /// Most writes queued for one chat; one more is refused with `chat_busy`.
    pub max_pending_per_chat: usize,
}

impl Default for GroupCommitSettings {
    fn default() -> Self {
        Self {
            max_batch: 256,
            max_pending_per_chat: 4096,
        }
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

/// One MySQL shard.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShardSettings {
    /// A stable name, used in logs, metrics and the `shard` field of a chat.
    pub name: String,
    /// `mysql://user:password@host:port/database`.
    pub url: String,
    /// Bucket ranges this shard owns, e.g. `["0-511"]`.
    pub buckets: Vec<String>,
    /// The shard's series of `memberId`s and `messageId`s, 0 to 1023, unique
    /// per shard; by default its position in `[[shards]]`. Set it when
    /// shards are reordered or removed so each keeps its series: ids of one
    /// series never meet those of another, which lets a moved chat keep its
    /// ids (docs/moving-chats.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_block: Option<u16>,
}

impl ShardSettings {
    /// The URL without its password, for logs and the admin view.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

/// Drops the password from a `scheme://user:password@host/...` URL.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<unparseable url>".to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}@{host}")
        }
        None => url.to_owned(),
    }
}

/// A configuration that failed to load or validate; lists every problem.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

impl Settings {
    /// Reads a TOML file, applies the process environment, validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(vec![format!("cannot read {}: {e}", path.display())]))?;
        Self::from_toml(&text, std::env::vars())
    }

    /// Parses TOML text, applies the given environment, validates.
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let settings = Self::from_toml_unvalidated(text, env)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Parses TOML text and applies the environment, without the checks that
    /// need shards (for `serve --dev`, which adds its own shards).
    pub fn from_toml_unvalidated(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e| ConfigError(vec![format!("not valid TOML: {e}")]))?;
        let env: Vec<(String, String)> = env.into_iter().collect();
        apply_key_overrides(&mut table, &env)?;
        let mut settings: Settings = table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError(vec![e.message().to_owned()]))?;
        settings.apply_shard_url_overrides(&env);
        if let Some((_, token)) = env.iter().find(|(k, _)| k == "CHATSHARD_ADMIN_TOKEN") {
            settings.admin.token = token.clone();
        }
        Ok(settings)
    }

    /// Reads a file for `serve --dev`: its shards are replaced by local ones.
    pub fn load_without_shards(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(vec![format!("cannot read {}: {e}", path.display())]))?;
        let mut settings = Self::from_toml_unvalidated(&text, std::env::vars())?;
        settings.shards.clear();
        Ok(settings)
    }

    fn apply_shard_url_overrides(&mut self, env: &[(String, String)]) {
        for shard in &mut self.shards {
            let key = format!(
                "CHATSHARD_SHARD_{}_URL",
                shard.name.to_uppercase().replace('-', "_")
            );
            if let Some((_, url)) = env.iter().find(|(k, _)| *k == key) {
                shard.url = url.clone();
            }
        }
    }

    /// Each shard's series of auto-increment ids, in `[[shards]]` order: its
    /// `id_block`, or its position.
    pub fn id_blocks(&self) -> Vec<u16> {
        self.shards
            .iter()
            .enumerate()
            .map(|(i, s)| s.id_block.unwrap_or(u16::try_from(i).unwrap_or(u16::MAX)))
            .collect()
    }

    /// Checks everything a running service relies on; lists every problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.shards.is_empty() {
            problems.push("at least one [[shards]] entry is required".to_owned());
        }
        let mut names = std::collections::HashSet::new();
        for shard in &self.shards {
            if shard.name.is_empty()
                || !shard
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                problems.push(format!(
                    "shard name {:?} must be non-empty and use only A-Z, a-z, 0-9, '-' and '_'",
                    shard.name
                ));
            }
            if !names.insert(shard.name.as_str()) {
                problems.push(format!("shard name {:?} is used twice", shard.name));
            }
            if !shard.url.starts_with("mysql://") && !shard.url.starts_with("mariadb://") {
                problems.push(format!(
                    "shard {:?}: url must start with mysql:// (got {})",
                    shard.name,
                    shard.redacted_url()
                ));
            }
        }
        let mut blocks = std::collections::HashMap::new();
        for (shard, block) in self.shards.iter().zip(self.id_blocks()) {
            if block >= crate::storage::server::ID_SERIES {
                problems.push(format!(
                    "shard {:?}: id_block must be below {}",
                    shard.name,
                    crate::storage::server::ID_SERIES
                ));
            } else if let Some(other) = blocks.insert(block, shard.name.as_str()) {
                problems.push(format!(
                    "shards {other:?} and {:?} have the same id_block {block} (it defaults to the \
                     shard's position)",
                    shard.name
                ));
            }
        }
        match self.bucket_ranges() {
            Ok(ranges) => {
                if !self.shards.is_empty()
                    && let Err(mut p) = Router::new(&ranges)
                {
                    problems.append(&mut p);
                }
            }
            Err(mut p) => problems.append(&mut p),
        }
        if MaxMembers::parse(i64::from(self.defaults.max_members)).is_err() {
            problems.push(format!(
                "defaults.max_members must be between 1 and {}",
                MaxMembers::MAX
            ));
        }
        let pool = &self.pool;
        for (name, value) in [
            (
                "http.header_read_timeout_ms",
                self.http.header_read_timeout_ms,
            ),
            ("http.body_read_timeout_ms", self.http.body_read_timeout_ms),
            ("http.max_connections", self.http.max_connections as u64),
            ("http.max_uri_bytes", self.http.max_uri_bytes as u64),
            (
                "http.write_stall_timeout_ms",
                self.http.write_stall_timeout_ms,
            ),
            ("tail.chats", self.tail.chats),
            ("tail.events_per_chat", self.tail.events_per_chat as u64),
            ("tail.max_bytes", self.tail.max_bytes),
            ("tail.refresh_ms", self.tail.refresh_ms),
            ("pool.max_concurrent", pool.max_concurrent as u64),
            ("pool.max_wait_ms", pool.max_wait_ms),
            ("pool.connect_timeout_ms", pool.connect_timeout_ms),
            ("pool.operation_timeout_ms", pool.operation_timeout_ms),
            ("group_commit.max_batch", self.group_commit.max_batch as u64),
            (
                "group_commit.max_pending_per_chat",
                self.group_commit.max_pending_per_chat as u64,
            ),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be greater than 0"));
            }
        }
        if self.http.send_buffer_bytes < 8_192 {
            problems.push("http.send_buffer_bytes must be at least 8192".to_owned());
        }
        if self.pool.lock_wait_timeout_secs > 0
            && self.pool.lock_wait_timeout_secs * 1000 >= self.pool.operation_timeout_ms
        {
            problems.push(
                "pool.lock_wait_timeout_secs must be below pool.operation_timeout_ms (or 0)"
                    .to_owned(),
            );
        }
        if !(self.pool.chat_share > 0.0 && self.pool.chat_share <= 1.0) {
            problems.push("pool.chat_share must be greater than 0 and at most 1".to_owned());
        }
        let b = &self.breaker;
        if !(b.failure_rate > 0.0 && b.failure_rate <= 1.0) {
            problems.push("breaker.failure_rate must be greater than 0 and at most 1".to_owned());
        }
        for (name, value) in [
            (
                "breaker.consecutive_failures",
                u64::from(b.consecutive_failures),
            ),
            ("breaker.window_secs", b.window_secs),
            ("breaker.open_ms", b.open_ms),
            ("breaker.half_open_probes", b.half_open_probes as u64),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be greater than 0"));
            }
        }
        if !self.admin.token.is_empty() && self.admin.token.len() < 16 {
            problems.push(
                "admin.token must be at least 16 characters (or empty to turn the admin API off)"
                    .to_owned(),
            );
        }
        problems.extend(self.live().problems());
        if !self.isolation.shard.is_empty()
            && !self.shards.is_empty()
            && !self.shards.iter().any(|s| s.name == self.isolation.shard)
        {
            problems.push(format!(
                "isolation.shard {:?} is not a configured shard",
                self.isolation.shard
            ));
        }
        self.redis.problems(&mut problems);
        self.moves.problems(&mut problems);
        for (name, value) in [
            ("purge.interval_ms", self.purge.interval_ms),
            ("purge.batch_rows", u64::from(self.purge.batch_rows)),
            (
                "purge.rows_per_second",
                u64::from(self.purge.rows_per_second),
            ),
            ("digest.interval_ms", self.digest.interval_ms),
            (
                "digest.chats_per_second",
                u64::from(self.digest.chats_per_second),
            ),
            (
                "digest.full_sweep_rounds",
                u64::from(self.digest.full_sweep_rounds),
            ),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be greater than 0"));
            }
        }
        if self.purge.batch_rows > 10_000 {
            problems.push("purge.batch_rows must be at most 10000".to_owned());
        }
        if self.throttle.tracked_chats == 0 {
            problems.push("throttle.tracked_chats must be greater than 0".to_owned());
        }
        if self.group_commit.max_batch > 1000 {
            // Each write binds up to 6 values per statement; 1000 keeps every
            // statement far below MySQL's 65,535 placeholders.
            problems.push("group_commit.max_batch must be at most 1000".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(problems))
        }
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

/// Applies `CHATSHARD__A__B=value` overrides to the parsed table.
///
/// An environment value is text; its type comes from the field it sets: the
/// value already in the file, else the field's default. So `0.25` sets a float,
/// `true` a bool, and a string setting keeps its text even when it looks like a
/// number. A key that names no known field is inferred (integer, float, bool,
/// else string) and then refused by the unknown-field check with the others.
fn apply_key_overrides(
    table: &mut toml::Table,
    env: &[(String, String)],
) -> Result<(), ConfigError> {
    let defaults = defaults_table();
    let mut problems = Vec::new();
    for (key, raw) in env {
        let Some(path) = key.strip_prefix("CHATSHARD__") else {
            continue;
        };
        let parts: Vec<String> = path.split("__").map(str::to_lowercase).collect();
        if parts.iter().any(String::is_empty) {
            problems.push(format!("environment variable {key}: empty path segment"));
            continue;
        }
        let target = lookup(table, &parts).or_else(|| lookup(&defaults, &parts));
        let value = match typed_env_value(raw, target) {
            Ok(value) => value,
            Err(p) => {
                problems.push(format!("environment variable {key}: {p}"));
                continue;
            }
        };
        if let Err(p) = set_path(table, &parts, value) {
            problems.push(format!("environment variable {key}: {p}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError(problems))
    }
}

/// Every setting at its default, as TOML: the types environment values take.
fn defaults_table() -> toml::Table {
    toml::Table::new()
        .try_into::<Settings>()
        .ok()
        .and_then(|defaults| toml::Table::try_from(defaults).ok())
        .unwrap_or_default()
}

/// The value at `path`; a key matches whatever its case and underscores (the
/// live sections are camelCase when serialized, snake_case in files).
fn lookup<'t>(table: &'t toml::Table, path: &[String]) -> Option<&'t toml::Value> {
    let (first, rest) = path.split_first()?;
    let folded = |k: &str| k.replace('_', "").to_lowercase();
    let value = table.get(first).or_else(|| {
        table
            .iter()
            .find(|(k, _)| folded(k) == folded(first))
            .map(|(_, v)| v)
    })?;
    match (rest.is_empty(), value) {
        (true, v) => Some(v),
        (false, toml::Value::Table(inner)) => lookup(inner, rest),
        (false, _) => None,
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    match path {
        [] => Err("empty key".to_owned()),
        [last] => {
            table.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => match table
            .entry(first.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            toml::Value::Table(inner) => set_path(inner, rest, value),
            _ => Err(format!("{first} is not a section")),
        },
    }
}

/// The environment text `raw` as a value of the type of `target`.
fn typed_env_value(raw: &str, target: Option<&toml::Value>) -> Result<toml::Value, String> {
    use toml::Value;
    let trimmed = raw.trim();
    match target {
        Some(Value::String(_)) => Ok(Value::String(raw.to_owned())),
        Some(Value::Integer(_)) => trimmed
            .parse::<i64>()
            .map(Value::Integer)
            .map_err(|_| format!("{raw:?} is not a whole number")),
        Some(Value::Float(_)) => trimmed
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(Value::Float)
            .ok_or_else(|| format!("{raw:?} is not a number")),
        Some(Value::Boolean(_)) => trimmed
            .parse::<bool>()
            .map(Value::Boolean)
            .map_err(|_| format!("{raw:?} is not true or false")),
        Some(Value::Array(_)) => format!("v = {trimmed}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .filter(toml::Value::is_array)
            .ok_or_else(|| format!("{raw:?} is not a TOML array such as [\"0-511\"]")),
        Some(Value::Table(_)) => Err("names a section, not a setting".to_owned()),
        Some(Value::Datetime(_)) | None => Ok(infer_env_value(raw)),
    }
}

fn infer_env_value(raw: &str) -> toml::Value {
    if let Ok(i) = raw.parse::<i64>() {
        toml::Value::Integer(i)
    } else if let Some(f) = raw.parse::<f64>().ok().filter(|f| f.is_finite()) {
        toml::Value::Float(f)
    } else if let Ok(b) = raw.parse::<bool>() {
        toml::Value::Boolean(b)
    } else {
        toml::Value::String(raw.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_SHARDS: &str = r#"
        [[shards]]
        name = "a"
        url = "mysql://root:secret@127.0.0.1:3307/chatshard"
        buckets = ["0-511"]

        [[shards]]
        name = "b-2"
        url = "mysql://root@127.0.0.1:3308/chatshard"
        buckets = ["512-1023"]
    "#;

    #[test]
    fn shipped_example_config_loads() -> crate::TestResult {
        let text = include_str!("../config/chatshard.example.toml");
        let settings = Settings::from_toml(text, [])?;
        assert!(!settings.shards.is_empty());
        Ok(())
    }

    #[test]
    fn id_blocks_default_to_positions_and_must_be_unique_and_in_range() -> crate::TestResult {
        let s = Settings::from_toml(TWO_SHARDS, [])?;
        assert_eq!(s.id_blocks(), vec![0, 1]);
        let swapped = TWO_SHARDS.replace(
            "buckets = [\"512-1023\"]",
            "buckets = [\"512-1023\"]\n        id_block = 0",
        );
        let swapped = swapped.replacen(
            "buckets = [\"0-511\"]",
            "buckets = [\"0-511\"]\n        id_block = 1",
            1,
        );
        assert_eq!(Settings::from_toml(&swapped, [])?.id_blocks(), vec![1, 0]);
        let clash = TWO_SHARDS.replace(
            "buckets = [\"512-1023\"]",
            "buckets = [\"512-1023\"]\n        id_block = 0",
        );
        let err = Settings::from_toml(&clash, [])
            .err()
            .ok_or("a shared id_block was accepted")?;
        assert!(err.to_string().contains("same id_block 0"), "{err}");
        let far = TWO_SHARDS.replace(
            "buckets = [\"512-1023\"]",
            "buckets = [\"512-1023\"]\n        id_block = 1024",
        );
        let err = Settings::from_toml(&far, [])
            .err()
            .ok_or("id_block 1024 was accepted")?;
        assert!(err.to_string().contains("below 1024"), "{err}");
        Ok(())
    }

    #[test]
    fn defaults_apply_and_env_overrides_win() -> crate::TestResult {
        let env = [
            ("CHATSHARD__POOL__MAX_WAIT_MS".to_owned(), "75".to_owned()),
            ("CHATSHARD__LISTEN".to_owned(), "0.0.0.0:9000".to_owned()),
            (
                "CHATSHARD_SHARD_B_2_URL".to_owned(),
                "mysql://u:p@db:3306/x".to_owned(),
            ),
        ];
        let s = Settings::from_toml(TWO_SHARDS, env)?;
        assert_eq!(s.pool.max_wait_ms, 75);
        assert_eq!(s.pool.max_concurrent, 16);
        assert_eq!(s.listen.port(), 9000);
        assert_eq!(s.shards[1].url, "mysql://u:p@db:3306/x");
        assert_eq!(
            s.shards[0].redacted_url(),
            "mysql://root@127.0.0.1:3307/chatshard"
        );
        Ok(())
    }

    #[test]
    fn env_values_take_the_type_of_the_field_they_set() -> crate::TestResult {
        let text = format!("[admin]\ntoken = \"file-token-0123456789\"\n{TWO_SHARDS}");
        let env = [
            ("CHATSHARD__POOL__CHAT_SHARE", "0.25"),
            ("CHATSHARD__BREAKER__FAILURE_RATE", "1"),
            ("CHATSHARD__HOT_CHAT__THROTTLE_RATE", "0.75"),
            ("CHATSHARD__HOT_CHAT__DRY_RUN", "true"),
            // A string setting that looks like a number stays a string.
            ("CHATSHARD__ADMIN__TOKEN", "12345678901234567890"),
            ("CHATSHARD__TELEMETRY__OTLP_ENDPOINT", "4318"),
            ("CHATSHARD__POOL__MAX_WAITING", "7"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let s = Settings::from_toml(&text, env)?;
        assert_eq!(s.pool.chat_share, 0.25);
        assert_eq!(s.breaker.failure_rate, 1.0);
        assert_eq!(s.hot_chat.throttle_rate, 0.75);
        assert!(s.hot_chat.dry_run);
        assert_eq!(s.admin.token, "12345678901234567890");
        assert_eq!(s.telemetry.otlp_endpoint, "4318");
        assert_eq!(s.pool.max_waiting, 7);
        Ok(())
    }

    #[test]
    fn every_default_is_known_to_the_env_typing() {
        let defaults = defaults_table();
        let path = |p: &str| p.split('.').map(str::to_owned).collect::<Vec<_>>();
        for key in [
            "listen",
            "pool.chat_share",
            "hot_chat.dry_run",
            "admin.token",
            "shards",
        ] {
            assert!(lookup(&defaults, &path(key)).is_some(), "{key} missing");
        }
    }

    #[test]
    fn bad_env_values_are_listed_together() {
        let env = [
            ("CHATSHARD__POOL__CHAT_SHARE", "half"),
            ("CHATSHARD__POOL__MAX_WAITING", "1.5"),
            ("CHATSHARD__HOT_CHAT__DRY_RUN", "yes"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let err = Settings::from_toml(TWO_SHARDS, env).unwrap_err();
        assert_eq!(err.0.len(), 3, "{err}");
        assert!(
            err.0
                .iter()
                .all(|p| p.starts_with("environment variable CHATSHARD__"))
        );
        let env = [("CHATSHARD__POOL__COLOUR".to_owned(), "1".to_owned())];
        let err = Settings::from_toml(TWO_SHARDS, env).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn every_problem_is_listed() {
        let text = r#"
            [pool]
            max_concurrent = 0
            [[shards]]
            name = "bad name"
            url = "postgres://x"
            buckets = ["0-100", "x"]
        "#;
        let err = Settings::from_toml(text, []).unwrap_err();
        let all = err.0.join("\n");
        assert!(all.contains("shard name"), "{all}");
        assert!(all.contains("url must start with mysql://"), "{all}");
        assert!(all.contains("\"x\" is not a bucket number"), "{all}");
        assert!(all.contains("pool.max_concurrent"), "{all}");
    }

    #[test]
    fn the_copy_throttle_is_checked() {
        let text = format!(
            "{TWO_SHARDS}\n[moves]\nmax_p99_ratio = 0.5\npause_ms = 50\nmax_pause_ms = 10\n"
        );
        let err = Settings::from_toml(&text, []).unwrap_err();
        let all = err.0.join("\n");
        assert!(all.contains("moves.max_p99_ratio"), "{all}");
        assert!(all.contains("moves.max_pause_ms"), "{all}");
        let text = format!("{TWO_SHARDS}\n[moves]\nmax_p99_ratio = 0\nrevisions_per_second = 0\n");
        let settings = Settings::from_toml(&text, []).expect("the throttle and the cap off");
        assert_eq!(settings.moves.max_p99_ratio, 0.0);
    }

    #[test]
    fn unknown_keys_and_uncovered_buckets_are_rejected() {
        let err = Settings::from_toml("colour = 1\n", []).unwrap_err();
        assert!(err.0[0].contains("colour"), "{err}");
        let text = TWO_SHARDS.replace("512-1023", "512-1000");
        let err = Settings::from_toml(&text, []).unwrap_err();
        assert!(err.to_string().contains("not assigned"), "{err}");
    }
}
