//! `[[shards]]` and how every shard is reached: its bulkhead (`[pool]`), its
//! circuit breaker (`[breaker]`) and the folding of writes into one
//! transaction (`[group_commit]`).
//!
//! Invariants: the defaults here are the documented ones (a change is a
//! behaviour change); logs and views show a shard URL only through
//! [`redact_url`], which never shows a password.
//!
//! Must not: open connections, import `crate::shard` (it takes these
//! structs) or `crate::storage`, or check values (`config::validate` does).

use std::time::Duration;

use serde::{Deserialize, Serialize};

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
