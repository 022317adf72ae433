//! Moving one chat to another shard online (docs/moving-chats.md).
//!
//! The copy replays the chat's own event log on the target, batch after
//! batch, while writes go on at the source; a short fence at the source
//! freezes the last revisions, a final batch copies them, the two copies are
//! compared, and the switch leaves a tombstone at the source, makes the
//! target live and points the chat's home shard at it. The source's rows are
//! then deleted in small batches. Every step is recorded in the move's row on
//! the source shard.
//!
//! One move at a time per chat, driven by the instance that started it, with
//! verification and roll-back when the copies differ or the fence lapses. A
//! move whose driver died is taken over by whichever instance claims it
//! first ([`ChatService::recover_moves`]), which becomes its next driver:
//! the move is finished past its tombstone, rolled back if a cancel was
//! asked for, and resumed where the target's copy stands otherwise.
//! A move can be cancelled until its switch ([`ChatService::cancel_move`]).
//! A chat whose log was purged is first copied from a snapshot of its rows
//! ([`ChatService::copy_snapshot`]).

use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;

use super::chat_move::ChatMove;
use super::move_driver;
use super::move_plan::{self, Abandoned, Phase, Run, Source, Takeover, Unit};
use super::pacer::{Pacer, Watch};
use super::{ChatService, ServiceError, now};
use crate::domain::ChatId;
use crate::shard::{OpError, Shard};
use crate::storage::moves::{self, Digest};

/// How a move copies and fences (from `[moves]`).
#[derive(Debug, Clone)]
pub struct MoveSettings {
    /// Revisions replayed per target transaction.
    pub batch: u32,
    /// The copy fences the source once it is at most this many revisions behind.
    pub fence_lag: u64,
    /// How long the fence holds at most (writes get 503 `chat_moving`).
    pub fence: Duration,
    /// Rows deleted per statement when cleaning the source.
    pub clean_batch: u32,
    /// A pause between two copy (or clean) batches, so the source's other
    /// chats keep their share of it.
    pub pause: Duration,
    /// While the p99 of the source's other calls is above this many times
    /// its value before the copy, the copy's pause doubles (0: off).
    pub max_p99_ratio: f64,
    /// The longest pause that throttle takes.
    pub max_pause: Duration,
    /// A cap on the copy's pace (0: none).
    pub revisions_per_second: u32,
    /// A running move whose record has not changed for this long is taken
    /// for abandoned (its driver died) and finished or rolled back.
    pub lease: Duration,
    /// A write that meets a fence waits up to this long for the switch.
    pub hold_writes: Duration,
    /// A range move's copy batches in flight at once.
    pub concurrent_batches: usize,
    /// How often the newest bucket table is read from the shards.
    pub map_poll: Duration,
}

impl Default for MoveSettings {
    fn default() -> Self {
        Self {
            batch: 1000,
            fence_lag: 500,
            fence: Duration::from_secs(2),
            clean_batch: 1000,
            pause: Duration::from_millis(5),
            max_p99_ratio: 1.2,
            max_pause: Duration::from_secs(1),
            revisions_per_second: 20_000,
            lease: Duration::from_secs(30),
            hold_writes: Duration::from_millis(800),
            concurrent_batches: 4,
            map_poll: Duration::from_secs(1),
        }
    }
}

/// A chat move as recorded on its source shard, with how far behind its
/// copy is while it runs.
#[derive(Debug, Clone)]
pub struct MoveStatus {
    /// `<source shard>:<number>`.
    pub id: String,
    pub chat_id: String,
    pub source: String,
    pub target: String,
    /// The phase's name (see [`Phase::name`]).
    pub phase: String,
    /// The last revision copied to the target (0 while a purged chat's rows
    /// are copied from a snapshot).
    pub copied_revision: u64,
    /// Rows written to the target so far.
    pub rows_copied: u64,
    /// While the move runs, how many revisions the target is behind the
    /// source; `None` once the move has ended.
    pub lag_revisions: Option<u64>,
    pub error: Option<String>,
    /// A cancel was asked for; the move rolls back at its next batch.
    pub cancel_requested: bool,
    /// `admin`, `isolation`, or `range` (one chat of a bucket-range move).
    pub started_by: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

impl MoveStatus {
    fn from_row(row: moves::MoveRow) -> Self {
        let running = !Phase::parse(Unit::Chat, &row.phase).is_some_and(Phase::is_terminal);
        Self {
            lag_revisions: row
                .source_revision
                .filter(|_| running)
                .map(|at| at.saturating_sub(row.copied_revision)),
            id: format!("{}:{}", row.source, row.id),
            chat_id: row.chat_id,
            source: row.source,
            target: row.target,
            phase: row.phase,
            copied_revision: row.copied_revision,
            rows_copied: row.rows_copied,
            error: row.error,
            cancel_requested: row.cancel_requested == 1,
            started_by: row.started_by,
            created_at: crate::storage::utc(row.created_at),
            updated_at: crate::storage::utc(row.updated_at),
        }
    }
}

/// A chat that lives away from its home shard.
#[derive(Debug, Clone)]
pub struct RelocatedChat {
    pub chat_id: String,
    /// The shard its bucket gives it.
    pub home: String,
    /// The shard that holds it.
    pub shard: String,
}

/// Why a move stopped short of its switch.
#[derive(Debug, thiserror::Error)]
pub(super) enum Stop {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("the copies differ: source {from:?}, target {to:?}")]
    Mismatch { from: Box<Digest>, to: Box<Digest> },
    #[error("the chat left the source during the move")]
    Gone,
    #[error("the chat is live on the target shard")]
    TargetLive,
    #[error("cancelled")]
    Cancelled,
    #[error("the target's copy changed under the snapshot (another mover?)")]
    SnapshotTaken,
    /// Another instance took the move over (this driver was too slow to
    /// renew its lease): it drives the move from here, so this one stops
    /// without touching it.
    #[error("{SUPERSEDED}")]
    Superseded,
}

/// `startedBy` of a chat move made by a bucket-range move: taken over, it is
/// rolled back rather than resumed, since its range move (taken over too)
/// decides where the chat goes, and may be cancelling.
const RANGE: &str = "range";

/// A move (its record's id on the source) and the driver that holds it
/// ([`moves::claim`] counts the takeovers).
pub(super) type Hold = (u64, u32);

/// Why a move left to another driver stopped.
pub(super) const SUPERSEDED: &str = "taken over by another instance";

impl From<crate::shard::ShardError> for Stop {
    fn from(e: crate::shard::ShardError) -> Self {
        Self::Service(e.into())
    }
}

/// A move recorded and not yet running.
struct RecordedMove {
    id: u64,
    view: MoveStatus,
    source: Arc<Shard>,
    target: Arc<Shard>,
}

impl ChatService {
    /// Starts moving `chat` to the shard named `to`: records the move and
    /// runs it in the background. Refused when the chat is already there, is
    /// moving, or does not exist.
    pub async fn start_move(
        self: &Arc<Self>,
        chat: &ChatId,
        to: &str,
    ) -> Result<MoveStatus, ServiceError> {
        self.begin_move(chat, to, None)
            .await?
            .ok_or_else(|| ServiceError::MoveRefused {
                reason: format!("chat {chat} has a move running"),
            })
    }

    /// Starts an isolation move of `chat` to `to` if its source shard has no
    /// move running and started fewer than `per_hour` isolation moves within
    /// the hour (decided on the source, under a lock, so the instances of a
    /// fleet take turns); `Ok(None)` when it may not start now.
    pub async fn start_isolation(
        self: &Arc<Self>,
        chat: &ChatId,
        to: &str,
        per_hour: u32,
    ) -> Result<Option<MoveStatus>, ServiceError> {
        self.begin_move(chat, to, Some(per_hour)).await
    }

    /// [`Self::start_move`] (`isolation`: `None`) or
    /// [`Self::start_isolation`]; `None` when the record was refused.
    async fn begin_move(
        self: &Arc<Self>,
        chat: &ChatId,
        to: &str,
        isolation: Option<u32>,
    ) -> Result<Option<MoveStatus>, ServiceError> {
        let Some(recorded) = self.record_move(chat, to, isolation, "admin").await? else {
            return Ok(None);
        };
        let service = self.clone();
        let chat = chat.clone();
        let view = recorded.view.clone();
        tokio::spawn(async move {
            // The outcome is in the move's record.
            let _ = service
                .run_move(recorded.id, chat, recorded.source, recorded.target)
                .await;
        });
        Ok(Some(view))
    }

    /// Records a move on the chat's shard (its source), started by `by`
    /// (`admin` or [`RANGE`]; an isolation move when `isolation` is given);
    /// `None` when the record was refused.
    async fn record_move(
        &self,
        chat: &ChatId,
        to: &str,
        isolation: Option<u32>,
        by: &'static str,
    ) -> Result<Option<RecordedMove>, ServiceError> {
        let target =
            self.shards
                .by_name(to)
                .cloned()
                .ok_or_else(|| ServiceError::UnknownShard {
                    shard: to.to_owned(),
                })?;
        // Where the chat is now (following markers), and that it exists.
        self.get_chat(chat, super::ReadAt::Writer).await?;
        let source = self.shard(chat).clone();
        if Arc::ptr_eq(&source, &target) {
            return Err(ServiceError::MoveRefused {
                reason: format!("chat {chat} is already on shard {to}"),
            });
        }
        let (id, src, dst) = (chat.to_string(), source.name().to_owned(), to.to_owned());
        let record = source
            .write(Some(chat), "move_record", move |conn| {
                Box::pin(async move {
                    let Some(per_hour) = isolation else {
                        return match moves::insert_move(conn, &id, &src, &dst, by, now()).await {
                            Ok(n) => Ok(Some(n)),
                            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(None),
                            Err(e) => Err(e.into()),
                        };
                    };
                    let mut tx = conn.begin().await?;
                    let start =
                        moves::insert_isolation_move(&mut tx, &id, &src, &dst, per_hour, now())
                            .await?;
                    let moves::IsolationStart::Started(n) = start else {
                        tx.rollback().await?;
                        tracing::debug!(chat = %id, ?start, "isolation move not started");
                        return Ok(None);
                    };
                    tx.commit().await.map_err(OpError::Commit)?;
                    Ok(Some(n))
                })
            })
            .await?;
        let Some(record) = record else {
            return Ok(None);
        };
        let view = self.move_view(&source, record).await?;
        Ok(Some(RecordedMove {
            id: record,
            view,
            source,
            target,
        }))
    }

    /// Resumes, finishes or rolls back the moves whose driver died (their
    /// record has not changed for `lease`). One instance takes each move
    /// over, by a compare-and-set on its record that also makes it the
    /// move's next driver:
    ///
    /// - a move whose source already holds the tombstone is switched to the
    ///   end (target live, home marker) and cleaned;
    /// - a move with a cancel asked for is rolled back, and ends `cancelled`;
    /// - any other resumes where its target's copy stands (from the start if
    ///   the target was never opened), in the background.
    pub async fn recover_moves(self: &Arc<Self>) {
        let lease = self.move_settings.lease.as_secs().max(1);
        for source in self.shards.all() {
            let rows = source
                .read(None, "list_abandoned_moves", move |conn| {
                    Box::pin(async move { Ok(moves::abandoned(conn, lease).await?) })
                })
                .await;
            let Ok(rows) = rows else { continue };
            for row in rows {
                let (id, seen) = (row.id, row.updated_at);
                let claimed = source
                    .write(None, "claim_move", move |conn| {
                        Box::pin(async move { Ok(moves::claim(conn, id, seen, now()).await?) })
                    })
                    .await;
                if let Ok(Some(driver)) = claimed {
                    self.take_over(source, row, driver).await;
                }
            }
        }
    }

    async fn take_over(self: &Arc<Self>, source: &Arc<Shard>, row: moves::MoveRow, driver: u32) {
        let Ok(chat) = ChatId::parse(&row.chat_id) else {
            return;
        };
        let hold = (row.id, driver);
        let target = self.shards.by_name(&row.target).cloned();
        // The claim made this instance the move's driver: the old driver, if
        // it was only slow, can no longer switch (its switch reads the driver
        // under the move row's lock, which the claim wrote). Only now is the
        // source read: either the old switch went in before, and the source
        // says so, or it never will. A source that cannot be read may hold
        // the tombstone: nothing is done on a guess.
        let at_source = match &target {
            None => Source::Holds,
            Some(_) => match self.row_on(&chat, source).await {
                Ok(Some((_, Some(to)))) if to == row.target => Source::Switched,
                Ok(_) => Source::Holds,
                Err(e) => {
                    tracing::warn!(chat = %chat, error = %e, "reading an abandoned move's source failed; retrying later");
                    Source::Unreadable
                }
            },
        };
        let abandoned = Abandoned {
            // A phase of a newer build counts as under way.
            phase: Phase::parse(Unit::Chat, &row.phase).unwrap_or(Phase::Copying),
            target_known: target.is_some(),
            source: at_source,
            cancel: row.cancel_requested,
            of_range: row.started_by == RANGE,
        };
        let decision = move_plan::take_over(&abandoned);
        tracing::warn!(chat = %chat, phase = %row.phase, ?decision, driver, "taking over an abandoned chat move");
        let Some(start) = Run::taken_over(abandoned.phase, &decision) else {
            return;
        };
        // An unknown target is only named: its end touches no shard.
        let target = target.unwrap_or_else(|| source.clone());
        let (service, source) = (self.clone(), source.clone());
        tokio::spawn(async move {
            let watch = Watch::chat(&source, &chat);
            let pacer = Pacer::watching(watch.clone(), watch.baseline(), &service.move_settings);
            let mut mover = ChatMove::new(&service, hold, chat, (source, target), pacer);
            mover.resuming = matches!(decision, Takeover::Resume { from_start: false });
            mover.copied = row.copied_revision;
            // The outcome is in the move's record.
            let outcome = move_driver::drive(&mut mover, start).await;
            mover.log(&outcome);
        });
    }

    /// Runs [`Self::recover_moves`] every `lease / 3` until the service is
    /// dropped.
    pub fn spawn_move_recovery(self: &Arc<Self>) {
        let service = Arc::downgrade(self);
        let every = (self.move_settings.lease / 3).max(Duration::from_secs(1));
        tokio::spawn(async move {
            // Not at start: a move is abandoned only after a lease, and a
            // start-up scan would add work (and breaker verdicts) to shards
            // before any request needs them.
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(service) = service.upgrade() else {
                    return;
                };
                service.recover_moves().await;
                service.recover_bucket_moves().await;
            }
        });
    }

    /// The chats that live away from their home shard (the shard their
    /// bucket gives them), read from the homes' markers: at most `limit` a
    /// shard, and whether a shard had more (or could not answer).
    pub async fn moved_chats(&self, limit: u32) -> (Vec<RelocatedChat>, bool) {
        let (mut chats, mut partial) = (Vec::new(), false);
        for shard in self.shards.all() {
            let rows = shard
                .read(None, "list_markers", move |conn| {
                    Box::pin(async move { Ok(moves::markers(conn, limit + 1).await?) })
                })
                .await;
            let Ok(mut rows) = rows else {
                partial = true;
                continue;
            };
            if rows.len() > limit as usize {
                rows.truncate(limit as usize);
                partial = true;
            }
            for (chat, to) in rows {
                // A marker on another shard than the home is a tombstone or
                // a copy under way: the home's marker says where it lives.
                let Ok(id) = ChatId::parse(&chat) else {
                    continue;
                };
                if Arc::ptr_eq(self.shards.home_of(&id), shard) {
                    chats.push(RelocatedChat {
                        chat_id: chat,
                        home: shard.name().to_owned(),
                        shard: to,
                    });
                }
            }
        }
        chats.sort_by(|a, b| a.chat_id.cmp(&b.chat_id));
        (chats, partial)
    }

    /// Every move recorded on any shard, newest first (a shard that cannot
    /// answer is left out).
    pub async fn moves(&self) -> Vec<MoveStatus> {
        let mut all = Vec::new();
        for shard in self.shards.all() {
            let rows = shard
                .read(None, "list_moves", |conn| {
                    Box::pin(async move { Ok(moves::list_moves(conn, 1000).await?) })
                })
                .await;
            if let Ok(rows) = rows {
                all.extend(rows.into_iter().map(MoveStatus::from_row));
            }
        }
        all.sort_by_key(|m| std::cmp::Reverse(m.created_at));
        all
    }

    async fn move_view(&self, source: &Shard, id: u64) -> Result<MoveStatus, ServiceError> {
        source
            .read(None, "get_move", move |conn| {
                Box::pin(async move { Ok(moves::get_move(conn, id).await?) })
            })
            .await?
            .map(MoveStatus::from_row)
            .ok_or_else(|| ServiceError::internal("a move just recorded cannot be read back"))
    }

    /// One move by its id (`<source shard>:<number>`); `None` when no shard
    /// records it (or its shard cannot answer).
    pub async fn get_move(&self, id: &str) -> Option<MoveStatus> {
        let (shard, n) = id.rsplit_once(':')?;
        let source = self.shards.by_name(shard)?;
        self.move_view(source, n.parse().ok()?).await.ok()
    }

    /// Asks a running move to stop (`DELETE /v1/admin/moves/{id}`): allowed
    /// until the first step of its switch. The driver (or, if it died, the
    /// instance that takes the move over) rolls it back at its next batch:
    /// the fence is lifted, the target's copy dropped, and the move ends
    /// `cancelled`. The chat stays on its source throughout.
    pub async fn cancel_move(&self, id: &str) -> Result<MoveStatus, ServiceError> {
        let not_found = || ServiceError::MoveNotFound { id: id.to_owned() };
        let (shard, n) = id.rsplit_once(':').ok_or_else(not_found)?;
        let source = self.shards.by_name(shard).ok_or_else(not_found)?;
        let n: u64 = n.parse().map_err(|_| not_found())?;
        let asked = source
            .write(None, "move_cancel", move |conn| {
                Box::pin(async move { Ok(moves::request_cancel(conn, n, now()).await?) })
            })
            .await?;
        let view = source
            .read(None, "get_move", move |conn| {
                Box::pin(async move { Ok(moves::get_move(conn, n).await?) })
            })
            .await?
            .map(MoveStatus::from_row)
            .ok_or_else(not_found)?;
        // Asking again while the move winds down is answered the same.
        let ended = Phase::parse(Unit::Chat, &view.phase).is_some_and(Phase::is_terminal);
        if !asked && (ended || !view.cancel_requested) {
            return Err(ServiceError::MoveRefused {
                reason: format!(
                    "move {id} is in phase {}: a move can be cancelled only before its switch",
                    view.phase
                ),
            });
        }
        Ok(view)
    }

    /// Runs a recorded move to its end, recording each phase; why it did
    /// not move the chat, if it did not.
    pub async fn run_move(
        &self,
        id: u64,
        chat: ChatId,
        source: Arc<Shard>,
        target: Arc<Shard>,
    ) -> Result<(), String> {
        // Paced so the source's other chats keep their p99, from the p99
        // they had before the move.
        let watch = Watch::chat(&source, &chat);
        let pacer = Pacer::watching(watch.clone(), watch.baseline(), &self.move_settings);
        self.drive_to_end((id, 0), chat, (source, target), pacer, false)
            .await
    }

    /// Drives a move to its end (`resuming`: one taken over, whose target's
    /// copy stands where its old driver left it); why it did not move the
    /// chat, if it did not.
    async fn drive_to_end(
        &self,
        hold: Hold,
        chat: ChatId,
        (source, target): (Arc<Shard>, Arc<Shard>),
        pacer: Pacer,
        resuming: bool,
    ) -> Result<(), String> {
        let mut mover = ChatMove::new(self, hold, chat, (source, target), pacer);
        mover.resuming = resuming;
        let outcome = move_driver::drive(&mut mover, Run::start(Unit::Chat)).await;
        mover.log(&outcome);
        outcome.done()
    }
}
