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

use super::{ChatService, ServiceError};
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
    /// `replicas.auto_failover`: after how long without a writer this
    /// instance promotes a replica itself.
    auto_failover: Option<Duration>,
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
            auto_failover: settings
                .auto_failover
                .then(|| settings.auto_failover_after()),
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
            if let Some(after) = self.acked.auto_failover {
                self.spawn_auto_failover(shard, after);
            }
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

    /// `replicas.auto_failover`: once `shard` has had no writable member for
    /// `after`, the most advanced replica is promoted as `failover` without
    /// `force` would. A refusal (a replica lacks acknowledged writes, the
    /// replicas diverged, another instance's reparent runs) is logged and
    /// tried again after another `after` without a writer; a member made
    /// writable by anyone else ends the wait.
    fn spawn_auto_failover(self: &Arc<Self>, shard: &Arc<Shard>, after: Duration) {
        let service = Arc::downgrade(self);
        let shard = Arc::downgrade(shard);
        tokio::spawn(async move {
            let mut without_writer: Option<tokio::time::Instant> = None;
            loop {
                let Some(current) = shard.upgrade() else {
                    return;
                };
                let period = current.monitor_period();
                if current.gate() == crate::shard::topology::Gate::NoWriter {
                    let since = *without_writer.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= after {
                        let Some(service) = service.upgrade() else {
                            return;
                        };
                        match service.failover(current.name(), false).await {
                            Ok(done) => tracing::warn!(
                                shard = %done.shard, from = %done.from, to = %done.to,
                                "auto_failover_done"
                            ),
                            Err(e) => tracing::warn!(
                                shard = %current.name(), error = %e,
                                "auto_failover_refused"
                            ),
                        }
                        without_writer = None;
                    }
                } else {
                    without_writer = None;
                }
                drop(current);
                tokio::time::sleep(period).await;
            }
        });
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

    fn replicated(&self, name: &str) -> Result<Arc<Shard>, ServiceError> {
        let shard =
            self.shards
                .by_name(name)
                .cloned()
                .ok_or_else(|| ServiceError::UnknownShard {
                    shard: name.to_owned(),
                })?;
        if !shard.is_replicated() {
            return Err(ServiceError::ReparentRefused {
                reason: format!("shard {name} has no replicas"),
            });
        }
        Ok(shard)
    }

    /// Reads every replicated shard's members twice (a round and its
    /// confirmation), so that a process that just started knows the writers:
    /// the commands that reparent run in their own process.
    pub async fn look_at_members(&self) {
        for shard in self.shards.all() {
            shard.settle().await;
        }
    }

    /// A planned switchover of shard `name` to member `to` (`host:port`):
    /// returns the write pause this instance saw (docs/replicas.md).
    pub async fn switchover(&self, name: &str, to: &str) -> Result<Reparented, ServiceError> {
        let shard = self.replicated(name)?;
        let from = shard.address().to_owned();
        let pause = shard
            .switchover(to, &self.driver_name())
            .await
            .map_err(refused)?;
        Ok(Reparented {
            shard: name.to_owned(),
            from,
            to: shard.address().to_owned(),
            write_pause: Some(pause),
        })
    }

    /// An emergency failover of shard `name`: the most advanced replica is
    /// promoted, once it holds every revision this instance acknowledged of
    /// the shard's chats (unless `force`).
    pub async fn failover(&self, name: &str, force: bool) -> Result<Reparented, ServiceError> {
        let shard = self.replicated(name)?;
        let from = shard.address().to_owned();
        let candidate = shard.failover_candidate().await.map_err(refused)?;
        if !force {
            let behind = self.behind_on(&shard, candidate).await?;
            if !behind.is_empty() {
                return Err(ServiceError::ReparentRefused {
                    reason: format!(
                        "the most advanced replica lacks writes this instance acknowledged \
                         ({} chat(s), e.g. {}); send force to promote it anyway",
                        behind.len(),
                        behind
                            .iter()
                            .take(3)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
        }
        shard
            .promote(candidate, &self.driver_name())
            .await
            .map_err(refused)?;
        Ok(Reparented {
            shard: name.to_owned(),
            from,
            to: shard.address().to_owned(),
            write_pause: None,
        })
    }

    /// The chats of `shard` whose revision on member `i` is below what this
    /// instance acknowledged.
    async fn behind_on(&self, shard: &Arc<Shard>, i: usize) -> Result<Vec<String>, ServiceError> {
        let mine: Vec<(ChatId, u64)> = self
            .acked
            .revisions
            .iter()
            .filter(|(chat, _)| Arc::ptr_eq(self.shard(chat), shard))
            .map(|(chat, revision)| (ChatId::clone(&chat), revision))
            .collect();
        let mut behind = Vec::new();
        for batch in mine.chunks(CHECK_BATCH) {
            let ids: Vec<String> = batch.iter().map(|(c, _)| c.to_string()).collect();
            let rows = shard
                .read_member(i, None, "failover_check", move |conn| {
                    Box::pin(async move { Ok(chats::revisions(conn, &ids).await?) })
                })
                .await?;
            let found: std::collections::HashMap<&str, u64> =
                rows.iter().map(|(id, r, _)| (id.as_str(), *r)).collect();
            behind.extend(
                batch
                    .iter()
                    .filter(|(c, acked)| found.get(c.as_str()).copied().unwrap_or(0) < *acked)
                    .map(|(c, _)| c.to_string()),
            );
        }
        Ok(behind)
    }

    /// This instance's name in a reparent's record.
    fn driver_name(&self) -> String {
        self.fleet.as_ref().map_or_else(
            || format!("pid-{}", std::process::id()),
            |f| f.view().instance.id.clone(),
        )
    }
}

/// A reparent that ran.
#[derive(Debug, Clone)]
pub struct Reparented {
    pub shard: String,
    /// The writer before, and after.
    pub from: String,
    pub to: String,
    /// How long this instance held the shard's writes (switchover).
    pub write_pause: Option<Duration>,
}

fn refused(e: crate::shard::reparent::ReparentError) -> ServiceError {
    ServiceError::ReparentRefused {
        reason: e.to_string(),
    }
}
