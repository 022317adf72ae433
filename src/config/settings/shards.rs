//! `[[shards]]` and how every shard is reached: its bulkhead (`[pool]`), its
//! circuit breaker (`[breaker]`) and the folding of writes into one
//! transaction (`[group_commit]`).
//!
//! Invariants: the defaults here are the documented ones (a change is a
//! behaviour change); logs, errors and views show a shard URL only through
//! [`redact_url`], which never shows a password nor the path of a client key
//! (`ssl-key`); `Debug` shows the redacted URL too.
//!
//! Must not: open connections, import `crate::shard` (it takes these
//! structs) or `crate::storage`, or check values (`config::validate` does).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One MySQL shard.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShardSettings {
    /// A stable name, used in logs, metrics and the `shard` field of a chat.
    pub name: String,
    /// `mysql://user:password@host:port/database`, optionally with sqlx's
    /// MySQL options: `?ssl-mode=VERIFY_IDENTITY&ssl-ca=/path/ca.pem` (and
    /// `ssl-cert`, `ssl-key` for a client certificate).
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
    /// Replicas of the shard, each a URL like `url` (same database, TLS
    /// options as for `url`). With replicas, reads may be served by them and
    /// the writer is followed across a failover (docs/replicas.md): the
    /// members are `url` (the writer at start) then these, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<String>,
}

impl ShardSettings {
    /// Every member's URL: `url` first, then the replicas.
    pub fn member_urls(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.url.as_str()).chain(self.replicas.iter().map(String::as_str))
    }

    /// The URL without its password nor its key path, for logs and the
    /// admin view.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

impl std::fmt::Debug for ShardSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardSettings")
            .field("name", &self.name)
            .field("url", &self.redacted_url())
            .field("buckets", &self.buckets)
            .field("id_block", &self.id_block)
            .field(
                "replicas",
                &self
                    .replicas
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Shown in place of a secret.
const REDACTED: &str = "<redacted>";

/// Query options whose values are secrets: the path of a client's private
/// key (sqlx spells it both ways) and a password given as an option.
/// `ssl-mode`, `ssl-ca` and `ssl-cert` stay visible: they say how a shard is
/// reached and are no secret.
const SECRET_OPTIONS: [&str; 3] = ["ssl-key", "sslkey", "password"];

/// Drops the password from a `scheme://user:password@host/...?options` URL
/// and the values of secret options (`ssl-key`).
///
/// The user information ends at the last `@` before the options, as a URL
/// parser reads it; a URL whose `@` only comes after a `?` cannot be read
/// safely and is not shown at all.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<unparseable url>".to_owned();
    };
    let (head, query) = match rest.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (rest, None),
    };
    let head = match head.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{user}@{host}")
        }
        // A password holding a `?` would put its `@` among the options.
        None if query.is_some_and(|q| q.contains('@')) => {
            return "<unparseable url>".to_owned();
        }
        None => head.to_owned(),
    };
    match query {
        Some(query) => format!("{scheme}://{head}?{}", redact_options(query)),
        None => format!("{scheme}://{head}"),
    }
}

/// `key=value&...` with the values of [`SECRET_OPTIONS`] replaced.
fn redact_options(query: &str) -> String {
    query
        .split('&')
        .map(|pair| {
            let key = pair.split_once('=').map_or(pair, |(key, _)| key);
            let secret = SECRET_OPTIONS
                .iter()
                .any(|s| key.replace('_', "-").eq_ignore_ascii_case(s));
            if secret {
                format!("{key}={REDACTED}")
            } else {
                pair.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("&")
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

/// Replicated shards (`[[shards]] replicas`): how members are watched and
/// when a replica may serve a read (docs/replicas.md).
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicaSettings {
    /// How often every member's `read_only`, reachability and lag are read.
    pub monitor_ms: u64,
    /// A candidate writer is read again this soon before it is followed
    /// (the confirmation after one monitor period).
    pub confirm_ms: u64,
    /// A replica behind the writer by more than this (by the heartbeat row)
    /// leaves the rotation until it catches up; it is also the staleness a
    /// read without `minRevision` may see.
    pub max_lag_ms: u64,
    /// The share (0 < share <= 1) of the writer's `max_concurrent` that reads
    /// meant for replicas may take on the writer when no replica can serve
    /// them, so a replica outage cannot double the writer's load.
    pub primary_fallback_share: f64,
    /// How long the highest revision this instance acknowledged per chat is
    /// kept, to find revisions lost in a failover.
    pub acked_keep_secs: u64,
    /// Chats whose acknowledged revision is kept at once.
    pub acked_chats: u64,
    /// The account a repointed replica logs in to its new source with, in a
    /// reparent run by chatshard (empty: reparents are refused).
    pub replication_user: String,
    pub replication_password: String,
    /// The account reparents run their statements with (`read_only`,
    /// promotion, repointing); empty: the member's own account. Give the data
    /// account no `READ_ONLY ADMIN` (nor `SUPER` on MySQL) and this one the
    /// reparent privileges, so that a demoted writer refuses every
    /// instance's writes.
    pub admin_user: String,
    pub admin_password: String,
    /// How long a switchover holds the shard's writes (then they are
    /// refused, retryable).
    pub hold_writes_ms: u64,
    /// How long a reparent waits for its target to apply the old writer's
    /// last transaction before it gives up (and rolls back).
    pub catch_up_ms: u64,
    /// Whether this instance runs an emergency failover by itself when a
    /// replicated shard had no writable member for `auto_failover_after_ms`
    /// (the most advanced replica is promoted, as `chatshard failover`
    /// without `--force` would; refused when it lacks acknowledged writes).
    pub auto_failover: bool,
    pub auto_failover_after_ms: u64,
}

impl Default for ReplicaSettings {
    fn default() -> Self {
        Self {
            monitor_ms: 500,
            confirm_ms: 100,
            max_lag_ms: 2000,
            primary_fallback_share: 0.25,
            acked_keep_secs: 600,
            acked_chats: 200_000,
            replication_user: String::new(),
            replication_password: String::new(),
            admin_user: String::new(),
            admin_password: String::new(),
            hold_writes_ms: 1000,
            catch_up_ms: 5000,
            auto_failover: false,
            auto_failover_after_ms: 5000,
        }
    }
}

impl std::fmt::Debug for ReplicaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaSettings")
            .field("monitor_ms", &self.monitor_ms)
            .field("max_lag_ms", &self.max_lag_ms)
            .field("replication_user", &self.replication_user)
            .field(
                "replication_password",
                &if self.replication_password.is_empty() {
                    ""
                } else {
                    REDACTED
                },
            )
            .field("admin_user", &self.admin_user)
            .field(
                "admin_password",
                &if self.admin_password.is_empty() {
                    ""
                } else {
                    REDACTED
                },
            )
            .finish_non_exhaustive()
    }
}

impl ReplicaSettings {
    pub fn monitor(&self) -> Duration {
        Duration::from_millis(self.monitor_ms)
    }
    pub fn confirm(&self) -> Duration {
        Duration::from_millis(self.confirm_ms)
    }
    pub fn max_lag(&self) -> Duration {
        Duration::from_millis(self.max_lag_ms)
    }
    pub fn hold_writes(&self) -> Duration {
        Duration::from_millis(self.hold_writes_ms)
    }
    pub fn auto_failover_after(&self) -> Duration {
        Duration::from_millis(self.auto_failover_after_ms)
    }
    pub fn catch_up(&self) -> Duration {
        Duration::from_millis(self.catch_up_ms)
    }
    /// Fallback reads the writer takes at once (at least 1).
    pub fn fallback_slots(&self, max_concurrent: usize) -> usize {
        ((max_concurrent as f64 * self.primary_fallback_share).floor() as usize).max(1)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_drops_the_password_and_the_key_path_and_keeps_ssl_mode() {
        assert_eq!(
            redact_url("mysql://app:s3cret@db1:3306/chat"),
            "mysql://app@db1:3306/chat"
        );
        assert_eq!(
            redact_url(
                "mysql://app:s3cret@db1:3306/chat?ssl-mode=VERIFY_IDENTITY\
                 &ssl-ca=/etc/ca.pem&ssl-cert=/etc/c.pem&ssl-key=/etc/secret/c.key"
            ),
            "mysql://app@db1:3306/chat?ssl-mode=VERIFY_IDENTITY\
             &ssl-ca=/etc/ca.pem&ssl-cert=/etc/c.pem&ssl-key=<redacted>"
        );
        assert_eq!(
            redact_url("mysql://app@db1/chat?sslkey=/k&SSL_KEY=/k2&sslmode=REQUIRED"),
            "mysql://app@db1/chat?sslkey=<redacted>&SSL_KEY=<redacted>&sslmode=REQUIRED"
        );
        // The last `@` ends the user information, as the URL parser reads it.
        assert_eq!(
            redact_url("mysql://app:p@ss@db1/chat"),
            "mysql://app@db1/chat"
        );
        assert_eq!(redact_url("mysql://db1/chat"), "mysql://db1/chat");
        assert_eq!(redact_url("db1/chat"), "<unparseable url>");
    }

    #[test]
    fn no_form_of_a_url_shows_its_secrets() {
        for url in [
            "mysql://app:hun?ter2@db1/chat?ssl-mode=REQUIRED",
            "mysql://app:hun/ter2@db1/chat",
            "mysql://app:hunter2@db1/chat?ssl-key=/secret/k.pem",
            "mysql://app@db1/chat?password=hunter2",
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains("ter2"), "{url} shown as {shown}");
            assert!(!shown.contains("/secret/"), "{url} shown as {shown}");
        }
        let shard = ShardSettings {
            name: "s0".into(),
            url: "mysql://app:hunter2@db1/chat?ssl-key=/secret/k.pem".into(),
            buckets: vec![],
            id_block: None,
            replicas: vec![],
        };
        let debug = format!("{shard:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("/secret/"),
            "{debug}"
        );
    }
}
