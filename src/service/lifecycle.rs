//! The event log's lifecycle (docs/event-log.md): the background purge of
//! old events and the periodic digest check that repairs drift.
//!
//! Both walk each shard's `chat` table a page at a time in key order, from a
//! task per shard, through the shard's bulkhead and breaker like any other
//! work, and pace themselves (rows or chats per second) so that the other
//! requests of the shard keep their latency. A shard whose breaker is open
//! ends its round; the next round starts over.
//!
//! **Purge.** A chat keeps at least its last `minRevisions` revisions and
//! every event younger than `minDays` days (live `retention`, per-chat
//! overrides). For a chat with more stored, the oldest events are read a
//! batch at a time; the prefix old enough goes: `first_revision` is raised
//! first, then the rows below it are deleted, so a reader sees either the
//! whole page or a 410 `revision_purged`, never a page with a hole. A chat
//! with a move running is left alone (the move copies its log).
//!
//! **Digest check.** Every round checks the chats whose revision moved past
//! the revision they were last found whole at; every
//! `digest.full_sweep_rounds` rounds, every chat. See
//! [`super::repair`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::NaiveDateTime;

use super::ChatService;
use super::repair::{self, Repair};
use crate::config::{DigestSettings, PurgeSettings};
use crate::domain::ChatId;
use crate::live::Live;
use crate::shard::{Shard, ShardError};
use crate::storage::repair as sql;

/// Chats read per page while walking a shard.
const PAGE: u32 = 500;

/// What the purge and the digest check did since the start (metrics).
#[derive(Debug, Default)]
pub struct LifecycleStats {
    pub events_purged: AtomicU64,
    pub chats_purged: AtomicU64,
    pub purge_rounds: AtomicU64,
    pub chats_checked: AtomicU64,
    pub digest_rounds: AtomicU64,
    pub repairs_count: AtomicU64,
    pub repairs_revision: AtomicU64,
    pub repairs_events_missing: AtomicU64,
}

impl LifecycleStats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    fn repaired(&self, repair: &Repair) {
        for kind in repair.kinds() {
            Self::add(
                match kind {
                    "count" => &self.repairs_count,
                    "revision" => &self.repairs_revision,
                    _ => &self.repairs_events_missing,
                },
                1,
            );
        }
    }
}

/// Spends a budget of so many units a second: after `n` units, waits the
/// time they are worth.
struct Pace {
    per_second: f64,
}

impl Pace {
    async fn spend(&self, n: u64) {
        if n > 0 && self.per_second > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / self.per_second)).await;
        }
    }
}

/// The next page of a shard's chats after `after` (moved on to its last);
/// `None` once the walk is done.
async fn next_page(
    shard: &Shard,
    name: &'static str,
    after: &mut String,
) -> Result<Option<Vec<sql::ChatLog>>, ShardError> {
    let from = after.clone();
    let page = shard
        .read(None, name, move |conn| {
            Box::pin(async move { Ok(sql::chat_logs_after(conn, &from, PAGE).await?) })
        })
        .await?;
    match page.last() {
        Some(last) => {
            *after = last.chat_id.clone();
            Ok(Some(page))
        }
        None => Ok(None),
    }
}

/// What one purge round of one shard did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardPurge {
    pub shard: String,
    /// Chats with events purged (or to purge).
    pub chats: u64,
    /// Events purged (or to purge).
    pub events: u64,
    /// Why the round stopped early, if it did.
    pub stopped: Option<String>,
}

/// One purge round of one shard: every chat held there, in key order.
/// `dry_run` reads exactly what a purge would delete and deletes nothing.
pub async fn purge_shard(
    shard: &Shard,
    live: &Live,
    settings: &PurgeSettings,
    dry_run: bool,
    stats: Option<&LifecycleStats>,
) -> ShardPurge {
    purge_shard_telling(shard, live, settings, dry_run, stats, &|_, _| {}).await
}

/// [`purge_shard`], telling `purged` of each chat whose first revision it
/// raised, and to what.
pub async fn purge_shard_telling(
    shard: &Shard,
    live: &Live,
    settings: &PurgeSettings,
    dry_run: bool,
    stats: Option<&LifecycleStats>,
    purged: &(dyn Fn(&str, u64) + Sync),
) -> ShardPurge {
    let mut report = ShardPurge {
        shard: shard.name().to_owned(),
        ..ShardPurge::default()
    };
    let pace = Pace {
        per_second: if dry_run {
            0.0
        } else {
            f64::from(settings.rows_per_second)
        },
    };
    let mut after = String::new();
    loop {
        let page = match next_page(shard, "purge_list_chats", &mut after).await {
            Ok(Some(page)) => page,
            Ok(None) => return report,
            Err(e) => {
                report.stopped = Some(crate::error::chain(&e));
                return report;
            }
        };
        let config = live.load();
        let now = super::now();
        for chat in page {
            let rule = config.config.retention_rule(&chat.chat_id);
            if !rule.enabled {
                continue;
            }
            // The highest revision the count floor lets go.
            let Some(upto) = chat.revision.checked_sub(rule.min_revisions) else {
                continue;
            };
            if upto < chat.first_revision {
                continue;
            }
            let cutoff = now - chrono::Duration::days(i64::try_from(rule.min_days).unwrap_or(0));
            match purge_chat(shard, &chat, upto, cutoff, settings, dry_run, &pace).await {
                Ok((0, _)) => {}
                Ok((n, first)) => {
                    if !dry_run && first > chat.first_revision {
                        purged(&chat.chat_id, first);
                    }
                    report.chats += 1;
                    report.events += n;
                    if let Some(stats) = stats {
                        LifecycleStats::add(&stats.events_purged, n);
                        LifecycleStats::add(&stats.chats_purged, 1);
                    }
                }
                Err(e) => {
                    report.stopped = Some(crate::error::chain(&e));
                    return report;
                }
            }
        }
    }
}

/// Purges one chat's events in `[first, upto]` older than `cutoff`, a batch
/// at a time; the events purged (or, dry, that would be), and the chat's first
/// revision after it.
async fn purge_chat(
    shard: &Shard,
    chat: &sql::ChatLog,
    upto: u64,
    cutoff: NaiveDateTime,
    settings: &PurgeSettings,
    dry_run: bool,
    pace: &Pace,
) -> Result<(u64, u64), ShardError> {
    let mut first = chat.first_revision;
    let mut purged = 0;
    let batch = settings.batch_rows;
    while first <= upto {
        let id = chat.chat_id.clone();
        let oldest = shard
            .read(None, "purge_oldest", move |conn| {
                Box::pin(
                    async move { Ok(sql::oldest_events(conn, &id, first, upto, batch).await?) },
                )
            })
            .await?;
        // The prefix old enough: the log is purged from its start, never
        // with a hole.
        let old = oldest.iter().take_while(|(_, at)| *at < cutoff).count();
        let Some(&(last, _)) = old.checked_sub(1).and_then(|i| oldest.get(i)) else {
            break;
        };
        if dry_run {
            purged += old as u64;
        } else {
            let id = chat.chat_id.clone();
            let deleted = shard
                .write(None, "purge_events", move |conn| {
                    Box::pin(async move {
                        // First the bound readers check, then the rows: a
                        // page read in between is refused (410), not holed.
                        if !sql::raise_first_revision(conn, &id, last + 1).await? {
                            return Ok(None);
                        }
                        // Rows below an earlier bound that a crash left are
                        // deleted too: at most one batch more.
                        Ok(Some(
                            sql::delete_events_below(conn, &id, last + 1, batch.saturating_mul(2))
                                .await?,
                        ))
                    })
                })
                .await?;
            let Some(deleted) = deleted else {
                // Moved away, or a move started: leave it.
                break;
            };
            first = last + 1;
            purged += deleted;
            pace.spend(deleted).await;
        }
        if old < oldest.len() || oldest.len() < batch as usize {
            break;
        }
        first = last + 1;
    }
    Ok((purged, first))
}

/// What one digest round of one shard did.
#[derive(Debug, Clone, Default)]
pub struct DigestRound {
    pub checked: u64,
    pub repairs: Vec<(String, Repair)>,
    pub stopped: Option<String>,
}

/// One digest round of one shard: the chats changed since they were last
/// found whole, or (`full`) every chat.
pub async fn digest_shard(
    shard: &Shard,
    settings: &DigestSettings,
    full: bool,
    stats: Option<&LifecycleStats>,
) -> DigestRound {
    let mut round = DigestRound::default();
    let pace = Pace {
        per_second: f64::from(settings.chats_per_second),
    };
    let mut after = String::new();
    loop {
        let page = match next_page(shard, "digest_list_chats", &mut after).await {
            Ok(Some(page)) => page,
            Ok(None) => return round,
            Err(e) => {
                round.stopped = Some(crate::error::chain(&e));
                return round;
            }
        };
        for chat in page {
            if !full && chat.revision == chat.checked_revision {
                continue;
            }
            let from = if full { 0 } else { chat.checked_revision };
            let result =
                repair::check_and_repair(shard, &chat.chat_id, from, chat.checked_revision).await;
            round.checked += 1;
            if let Some(stats) = stats {
                LifecycleStats::add(&stats.chats_checked, 1);
            }
            match result {
                Ok(None) => {}
                Ok(Some(repair)) => {
                    report_repair(shard, &chat.chat_id, &repair);
                    if let Some(stats) = stats {
                        stats.repaired(&repair);
                    }
                    round.repairs.push((chat.chat_id.clone(), repair));
                }
                Err(e) => {
                    round.stopped = Some(crate::error::chain(&e));
                    return round;
                }
            }
            pace.spend(1).await;
        }
    }
}

/// A repair is logged with what it changed, in a span of its own.
fn report_repair(shard: &Shard, chat_id: &str, repair: &Repair) {
    let span = tracing::warn_span!("digest_repair", shard = shard.name(), chat_id);
    let _entered = span.enter();
    let kinds: Vec<&str> = repair.kinds().collect();
    tracing::warn!(
        kinds = ?kinds,
        count = ?repair.count.as_ref().map(|c| (c.stored, c.actual)),
        revision = ?repair.revision,
        first_revision = ?repair.first_revision,
        "digest_repaired"
    );
}

impl ChatService {
    /// Starts the purge and the digest check of every shard, each shard in a
    /// task of its own, until the service is dropped.
    pub fn spawn_lifecycle(self: &Arc<Self>, purge: PurgeSettings, digest: DigestSettings) {
        for index in 0..self.shards.all().len() {
            let service = Arc::downgrade(self);
            let settings = purge.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(settings.interval_ms));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let Some(service) = service.upgrade() else {
                        return;
                    };
                    let Some(shard) = service.shards.all().get(index).cloned() else {
                        return;
                    };
                    if !service.live.load().config.retention.enabled
                        && service.live.load().config.retention.overrides.is_empty()
                    {
                        continue;
                    }
                    let told = |chat: &str, first: u64| service.purged(chat, first);
                    let report = purge_shard_telling(
                        &shard,
                        &service.live,
                        &settings,
                        false,
                        Some(&service.lifecycle),
                        &told,
                    )
                    .await;
                    LifecycleStats::add(&service.lifecycle.purge_rounds, 1);
                    if report.events > 0 || report.stopped.is_some() {
                        tracing::info!(
                            shard = shard.name(),
                            chats = report.chats,
                            events = report.events,
                            stopped = report.stopped.as_deref(),
                            "purge_round"
                        );
                    }
                }
            });
            if !digest.enabled {
                continue;
            }
            let service = Arc::downgrade(self);
            let settings = digest.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(settings.interval_ms));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                let mut rounds: u64 = 0;
                loop {
                    tick.tick().await;
                    let Some(service) = service.upgrade() else {
                        return;
                    };
                    let Some(shard) = service.shards.all().get(index).cloned() else {
                        return;
                    };
                    rounds += 1;
                    let full = rounds.is_multiple_of(u64::from(settings.full_sweep_rounds));
                    let round =
                        digest_shard(&shard, &settings, full, Some(&service.lifecycle)).await;
                    LifecycleStats::add(&service.lifecycle.digest_rounds, 1);
                    if !round.repairs.is_empty() || round.stopped.is_some() {
                        tracing::info!(
                            shard = shard.name(),
                            full,
                            checked = round.checked,
                            repaired = round.repairs.len(),
                            stopped = round.stopped.as_deref(),
                            "digest_round"
                        );
                    }
                }
            });
        }
    }

    /// After the purge raised the chat's first revision to `first_revision`:
    /// this instance's tail drops what went and its kept pages retire, and
    /// the fleet is told, so that every instance answers reads below it 410.
    fn purged(&self, chat: &str, first_revision: u64) {
        let Ok(chat) = ChatId::parse(chat) else {
            return;
        };
        self.tails.purged(&chat, first_revision);
        self.throttle.hot.retire(&chat);
        if let Some(fleet) = &self.fleet {
            fleet.purged(&chat, first_revision);
        }
    }

    /// What the purge and the digest check did since the start.
    pub fn lifecycle(&self) -> &LifecycleStats {
        &self.lifecycle
    }
}
