//! What a failover may have lost, and telling readers (docs/replicas.md).
//!
//! Every acknowledged write leaves the chat's revision here (the highest one
//! this instance answered, kept `replicas.acked_keep_secs`, at most
//! `replicas.acked_chats` chats). When a replicated shard's writes go to
//! another member, the chats of that shard are read on the new writer, a
//! batch at a time; a chat whose revision there is below what was
//! acknowledged lost acknowledged writes (semi-synchronous replication was
//! off, or timed out). Such a chat is reported (a warning, the metric
//! `chatshard_failover_lost_chats_total`, the admin view), its tail is
//! dropped, and for as long as it is remembered a reader ahead of its log
//! (one that saw revisions the new writer does not have) is answered 410
//! `revision_purged`, the signal every client already handles by
//! full-syncing from the snapshot.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::ChatService;
use crate::config::ReplicaSettings;
use crate::domain::ChatId;
use crate::shard::Shard;
use crate::storage::chats;

/// Chats read per statement when a new writer is checked.
const CHECK_BATCH: usize = 500;
/// Lost chats the admin view lists (the newest).
const LOST_LISTED: usize = 100;

/// A chat found behind what this instance acknowledged.
#[derive(Debug, Clone)]
pub struct LostChat {
    pub chat_id: String,
    pub shard: String,
    /// The highest revision this instance acknowledged.
    pub acknowledged: u64,
    /// The chat's revision on the new writer.
    pub found: u64,
    pub at: DateTime<Utc>,
}

/// The acknowledged revisions and what the checks found.
pub struct Acked {
    revisions: moka::sync::Cache<ChatId, u64>,
    /// Chats that lost revisions, with the revision the new writer had.
    reset: moka::sync::Cache<ChatId, u64>,
    lost: Mutex<VecDeque<LostChat>>,
    lost_total: AtomicU64,
    checks: AtomicU64,
}

impl Acked {
    pub fn new(settings: &ReplicaSettings) -> Self {
        let keep = Duration::from_secs(settings.acked_keep_secs);
        Self {
            revisions: moka::sync::Cache::builder()
                .max_capacity(settings.acked_chats)
                .time_to_live(keep)
                .build(),
            reset: moka::sync::Cache::builder()
                .max_capacity(settings.acked_chats)
                .time_to_live(keep)
                .build(),
            lost: Mutex::new(VecDeque::new()),
            lost_total: AtomicU64::new(0),
            checks: AtomicU64::new(0),
        }
    }

    /// Remembers that `revision` of `chat` was acknowledged.
    pub fn record(&self, chat: &ChatId, revision: u64) {
        if revision == 0 {
            return;
        }
        self.revisions
            .entry_by_ref(chat)
            .and_upsert_with(|old| old.map_or(revision, |e| (*e.value()).max(revision)));
    }

    /// Whether `chat` lost revisions in a failover (and is still remembered).
    pub fn was_reset(&self, chat: &ChatId) -> bool {
        self.reset.contains_key(chat)
    }

    /// Chats found behind, newest last.
    pub fn lost(&self) -> Vec<LostChat> {
        self.lost
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// Chats found behind since start.
    pub fn lost_total(&self) -> u64 {
        self.lost_total.load(Ordering::Relaxed)
    }

    /// New writers checked since start.
    pub fn checks(&self) -> u64 {
        self.checks.load(Ordering::Relaxed)
    }
}

impl ChatService {
    /// Starts every replicated shard's member monitor, and the check of
    /// acknowledged revisions after each change of writer, until the
    /// service is dropped.
    pub fn spawn_replica_monitors(self: &Arc<Self>) {
        for shard in self.shards.all() {
            if !shard.is_replicated() {
                continue;
            }
            shard.spawn_monitor();
            let mut changes = shard.writer_changes();
            let service = Arc::downgrade(self);
            let shard = Arc::downgrade(shard);
            tokio::spawn(async move {
                while changes.changed().await.is_ok() {
                    let (Some(service), Some(shard)) = (service.upgrade(), shard.upgrade()) else {
                        return;
                    };
                    if let Some(fleet) = &service.fleet {
                        fleet.announce_writer(shard.name());
                    }
                    service.check_acked(&shard).await;
                }
            });
        }
    }

    /// Reads, on the shard's new writer, every chat of the shard this
    /// instance acknowledged a revision of, and reports those behind.
    pub async fn check_acked(&self, shard: &Arc<Shard>) {
        self.acked.checks.fetch_add(1, Ordering::Relaxed);
        let mine: Vec<(ChatId, u64)> = self
            .acked
            .revisions
            .iter()
            .filter(|(chat, _)| Arc::ptr_eq(self.shard(chat), shard))
            .map(|(chat, revision)| (ChatId::clone(&chat), revision))
            .collect();
        let mut found_behind = 0;
        for batch in mine.chunks(CHECK_BATCH) {
            let ids: Vec<String> = batch.iter().map(|(c, _)| c.to_string()).collect();
            let read = shard
                .read(None, "failover_check", move |conn| {
                    Box::pin(async move { Ok(chats::revisions(conn, &ids).await?) })
                })
                .await;
            let rows = match read {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(
                        shard = %shard.name(),
                        error = %crate::error::chain(&e),
                        "failover_check_failed"
                    );
                    return;
                }
            };
            let now: std::collections::HashMap<&str, u64> = rows
                .iter()
                .map(|(id, revision, _)| (id.as_str(), *revision))
                .collect();
            for (chat, acknowledged) in batch {
                // A chat missing on the new writer lost everything.
                let found = now.get(chat.as_str()).copied().unwrap_or(0);
                if found >= *acknowledged {
                    continue;
                }
                found_behind += 1;
                tracing::error!(
                    shard = %shard.name(),
                    chat = %chat,
                    acknowledged,
                    found,
                    "failover_lost_revisions"
                );
                self.acked.reset.insert(chat.clone(), found);
                self.acked.revisions.insert(chat.clone(), found);
                self.acked.lost_total.fetch_add(1, Ordering::Relaxed);
                let mut lost = self
                    .acked
                    .lost
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if lost.len() == LOST_LISTED {
                    lost.pop_front();
                }
                lost.push_back(LostChat {
                    chat_id: chat.to_string(),
                    shard: shard.name().to_owned(),
                    acknowledged: *acknowledged,
                    found,
                    at: Utc::now(),
                });
                drop(lost);
                self.tails.forget(chat);
            }
        }
        tracing::info!(
            shard = %shard.name(),
            checked = mine.len(),
            behind = found_behind,
            "failover_checked"
        );
    }

    /// The acknowledged revisions and what the checks found.
    pub fn acked(&self) -> &Acked {
        &self.acked
    }
}
