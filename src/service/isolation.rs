//! Automatic isolation (docs/moving-chats.md): every second, each instance
//! looks at the chats its hot-chat detector (and the fleet's shared marks)
//! holds hot, and starts a move of each that stayed hot for
//! `isolation.afterSeconds` to `isolation.shard`. Whether a move may start is
//! decided on its source shard, under a lock, against the moves recorded
//! there: at most one running per source shard and `isolation.movesPerHour`
//! started there per hour, so the instances of a fleet take turns without
//! Redis. A dry run logs and counts the chats it would move instead.

use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

use super::{ChatService, ServiceError};
use crate::domain::ChatId;
use crate::throttle::Decisions;

/// How often hot chats are looked at.
const EVERY: Duration = Duration::from_secs(1);
/// How long a chat is left alone after it was moved, counted (dry run) or
/// refused (already there, purged log).
const SETTLED_FOR: Duration = Duration::from_secs(60);

impl ChatService {
    /// Starts the isolation task, until the service is dropped.
    pub fn spawn_isolation(self: &Arc<Self>) {
        let service = Arc::downgrade(self);
        // A chat left alone for a while, and whether a dry run put it there
        // (a real round does not skip those).
        let settled: Cache<ChatId, bool> = Cache::builder()
            .max_capacity(10_000)
            .time_to_live(SETTLED_FOR)
            .build();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(service) = service.upgrade() else {
                    return;
                };
                service.isolate_hot_chats(&settled).await;
            }
        });
    }

    /// One round: each chat hot for long enough, not on the isolation shard
    /// and not settled, is moved (or counted in a dry run).
    async fn isolate_hot_chats(self: &Arc<Self>, settled: &Cache<ChatId, bool>) {
        let config = self.live.load().config.isolation.clone();
        if !config.enabled || config.shard.is_empty() {
            return;
        }
        if self.shards.by_name(&config.shard).is_none() {
            tracing::warn!(shard = %config.shard, "isolation.shard is not a configured shard; nothing is isolated");
            return;
        }
        let decisions = &self.throttle.decisions;
        for hot in self.throttle.hot.hot_chats() {
            if hot.hot_for_ms < config.after_seconds * 1000
                || settled
                    .get(&hot.chat)
                    .is_some_and(|by_dry_run| config.dry_run || !by_dry_run)
                || self.shard(&hot.chat).name() == config.shard
            {
                continue;
            }
            let chat = hot.chat;
            if config.dry_run {
                Decisions::bump(&decisions.chats_isolated_dry_run);
                tracing::info!(chat = %chat, to = %config.shard, hot_for_ms = hot.hot_for_ms, events_per_second = hot.events_per_second, "chat_isolation_dry_run");
                settled.insert(chat, true);
                continue;
            }
            match self
                .start_isolation(&chat, &config.shard, config.moves_per_hour)
                .await
            {
                Ok(Some(view)) => {
                    Decisions::bump(&decisions.chats_isolated);
                    tracing::info!(chat = %chat, to = %config.shard, id = %view.id, hot_for_ms = hot.hot_for_ms, events_per_second = hot.events_per_second, "chat_isolation_started");
                    settled.insert(chat, false);
                }
                Ok(None) => Decisions::bump(&decisions.isolations_deferred),
                Err(ServiceError::MoveRefused { reason }) => {
                    tracing::info!(chat = %chat, %reason, "chat_isolation_refused");
                    settled.insert(chat, false);
                }
                Err(e) => {
                    tracing::warn!(chat = %chat, error = %crate::error::chain(&e), "chat_isolation_failed");
                }
            }
        }
    }
}
