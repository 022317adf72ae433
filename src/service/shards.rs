//! What the callers of the service may know of the shards: their names, the
//! shard a chat routes to, and read-only snapshots of their health and load
//! (for `/readyz`, the admin view and request spans).
//!
//! Everything here reads; nothing changes a shard, a breaker or the routing.
//! A caller gets names and snapshots, never a shard itself, so that the
//! shards are reached only through the use cases.

use std::time::Duration;

use super::ChatService;
use crate::domain::ChatId;
use crate::shard::{BreakerState, MemberStatus, RECENT_SECS, ShardStatus};

/// One shard's answer to a ping.
#[derive(Debug, Clone)]
pub struct ShardHealth {
    pub name: String,
    pub address: String,
    /// The breaker's state after the ping.
    pub breaker: BreakerState,
    /// Why the ping failed (its cause chain); `None` when the shard answered.
    pub error: Option<String>,
    /// Where writes go (`Gate::as_str`).
    pub writes: &'static str,
    /// The members of a replicated shard (empty without replicas).
    pub members: Vec<MemberStatus>,
}

impl ShardHealth {
    /// The shard answered the ping.
    pub fn ready(&self) -> bool {
        self.error.is_none()
    }
}

/// One shard's status with its recent latencies, over the last
/// [`RECENT_SECS`] seconds.
#[derive(Debug, Clone)]
pub struct ShardLoad {
    pub status: ShardStatus,
    /// The p99 of the shard's calls, a move's own calls left out (`None`
    /// without calls).
    pub call_p99: Option<Duration>,
    /// Requests of the shard's chats this instance answered.
    pub requests: u64,
    /// Their p99, from arrival to answer (`None` without requests).
    pub request_p99: Option<Duration>,
}

impl ChatService {
    /// The name of the shard `chat` routes to now.
    pub fn shard_of(&self, chat: &ChatId) -> &str {
        self.shards.for_chat(chat).name()
    }

    /// The configured shards' names, in their configured order.
    pub fn shard_names(&self) -> Vec<String> {
        self.shards.names().into_iter().map(str::to_owned).collect()
    }

    /// Pings every shard at once; one answer per shard, in their configured
    /// order.
    pub async fn shard_health(&self) -> Vec<ShardHealth> {
        let checks = self.shards.all().iter().map(|shard| async move {
            let result = shard.ping().await;
            let status = shard.status();
            ShardHealth {
                name: shard.name().to_owned(),
                address: shard.address().to_owned(),
                breaker: shard.breaker_state(),
                error: result.err().map(|e| crate::error::chain(&e)),
                writes: status.gate.as_str(),
                members: status.members,
            }
        });
        futures_util::future::join_all(checks).await
    }

    /// Every shard's status and recent latencies, in their configured order.
    ///
    /// The p99s are read here only, not in every status (which the metrics
    /// read on each export): the requests' p99 sorts up to 65,536 samples.
    pub fn shard_loads(&self) -> Vec<ShardLoad> {
        let window = Duration::from_secs(RECENT_SECS);
        self.shards
            .all()
            .iter()
            .map(|shard| {
                let requests = shard.request_latency(0.99, window, |_| true);
                ShardLoad {
                    status: shard.status(),
                    call_p99: shard.recent_latency(0.99, window).map(|(d, _)| d),
                    requests: requests.map_or(0, |(_, n)| n),
                    request_p99: requests.map(|(d, _)| d),
                }
            })
            .collect()
    }
}
