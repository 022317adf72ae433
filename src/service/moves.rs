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

use super::move_plan::{self, Abandoned, Phase, Source, Takeover};
use super::{ChatService, ServiceError, now};
use crate::domain::ChatId;
use crate::routing::BucketRange;
use crate::shard::{OpError, Shard};
use crate::storage::moves::{self, CleanTable, Digest, LogRow};

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
    /// A bucket-range move moves this many of its chats at once.
    pub concurrent_chats: usize,
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
            concurrent_chats: 4,
            map_poll: Duration::from_secs(1),
        }
    }
}

/// Calls the throttle needs in its window before it trusts a p99.
const PACER_MIN_CALLS: u64 = 50;
/// The window of the p99 the throttle compares with its baseline.
const PACER_WINDOW: Duration = Duration::from_secs(2);
/// A baseline p99 below this counts as this: under it, the p99 of a quiet
/// shard is noise.
const PACER_FLOOR: Duration = Duration::from_millis(1);

/// Copy rounds in a row whose lag does not shrink before the p99 throttle
/// gives way (see [`Pacer::give_way`]).
const STALLED_ROUNDS: u32 = 3;
/// The throttle halves the copy's batch down to this share of
/// `moves.batch_revisions`.
const PACER_MIN_BATCH_SHARE: u32 = 8;
/// Pauses at `max_pause` adding up to this long, the others still slow: the
/// move is not what slows them, and what they see becomes the baseline (see
/// [`Pacer::next`]). Two p99 windows: the last holds no batch of the move's
/// beyond one longest pause apart.
const PACER_HELD: Duration = Duration::from_secs(4);

/// What a move's pacer watches on a shard, leaving out what the move moves.
///
/// Two p99s: the shard's calls as chatshard makes them (a move's own
/// `move_*` calls not counted), and this instance's requests of the shard's
/// other chats, from arrival to answer. The second also feels what the
/// shard's calls do not: the instance's and the machine's load, which a
/// move adds to when the shards share a host.
#[derive(Debug, Clone)]
pub(super) struct Watch {
    shard: Arc<Shard>,
    moving: Moving,
}

/// The chats a move moves, left out of what its pacer watches.
#[derive(Debug, Clone, Copy)]
enum Moving {
    /// One chat, by its key ([`crate::routing::chat_key`]).
    Chat(u64),
    Buckets(BucketRange),
}

impl Moving {
    fn covers(self, key: u64) -> bool {
        match self {
            Self::Chat(chat) => key == chat,
            Self::Buckets(range) => {
                let b = crate::routing::bucket_of_key(key);
                b >= range.first && b <= range.last
            }
        }
    }
}

impl Watch {
    /// A move of `chat` from `shard`.
    pub(super) fn chat(shard: &Arc<Shard>, chat: &ChatId) -> Self {
        Self {
            shard: shard.clone(),
            moving: Moving::Chat(crate::routing::chat_key(chat)),
        }
    }

    /// A move of every chat of `range` from `shard`.
    pub(super) fn buckets(shard: &Arc<Shard>, range: BucketRange) -> Self {
        Self {
            shard: shard.clone(),
            moving: Moving::Buckets(range),
        }
    }

    /// Both p99s over the last `window`.
    pub(super) fn now(&self, window: Duration) -> Signals {
        let moving = self.moving;
        Signals {
            calls: self.shard.recent_latency(0.99, window),
            requests: self
                .shard
                .request_latency(0.99, window, |key| !moving.covers(key)),
        }
    }

    /// Both p99s over the last 10 s: a move's baseline.
    pub(super) fn baseline(&self) -> Signals {
        self.now(Duration::from_secs(10))
    }
}

/// A p99 of the shard's calls and one of its other chats' requests, each
/// with the number it comes from (`None`: nothing seen).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Signals {
    pub calls: Option<(Duration, u64)>,
    pub requests: Option<(Duration, u64)>,
}

/// Paces a move's work on its source (the copy, then the clean-up): while
/// either p99 its [`Watch`] sees is above `max_p99_ratio` times its value
/// before the move, the pause after each batch doubles (up to `max_pause`)
/// and the batch halves (down to an eighth); once neither is, both go back
/// step by step. Held at `max_pause` for [`PACER_HELD`] with the others
/// still slow, it takes what they see as its new baseline. The copy also
/// keeps under `revisions_per_second`.
pub(super) struct Pacer {
    watch: Option<Watch>,
    /// Each p99 before the copy (`None`: too few to tell, or the throttle
    /// gave way so the copy converges; then only the cap and `pause` apply).
    baseline: [Option<Duration>; 2],
    pause: Duration,
    /// Revisions per copy batch now.
    batch: u32,
    started: std::time::Instant,
    copied: u64,
    /// Time spent in throttled pauses (beyond `pause`), for the log.
    throttled: Duration,
    /// The pauses handed out in a row at `max_pause` while the others were
    /// slow, added up.
    held: Duration,
}

impl Pacer {
    /// Paced against what `watch` sees now and saw before (`before`).
    pub(super) fn watching(watch: Watch, before: Signals, settings: &MoveSettings) -> Self {
        Self {
            watch: Some(watch),
            ..Self::new(before, settings)
        }
    }

    /// Paced against `before`, with the p99s of each step given to
    /// [`Self::next`].
    pub(super) fn new(before: Signals, settings: &MoveSettings) -> Self {
        let trusted = |s: Option<(Duration, u64)>| {
            s.filter(|(_, n)| *n >= PACER_MIN_CALLS)
                .map(|(p99, _)| p99.max(PACER_FLOOR))
        };
        let baseline = [trusted(before.calls), trusted(before.requests)];
        tracing::info!(
            calls_p99_ms = baseline[0].map(|b| b.as_secs_f64() * 1e3),
            requests_p99_ms = baseline[1].map(|b| b.as_secs_f64() * 1e3),
            "a move's copy starts"
        );
        Self {
            watch: None,
            baseline,
            pause: settings.pause,
            batch: settings.batch,
            started: std::time::Instant::now(),
            copied: 0,
            throttled: Duration::ZERO,
            held: Duration::ZERO,
        }
    }

    /// The p99s paced against, as trusted signals (a range move hands its
    /// baseline to each chat's copy).
    pub(super) fn baseline(&self) -> Signals {
        let signal = |b: Option<Duration>| b.map(|p99| (p99, PACER_MIN_CALLS));
        Signals {
            calls: signal(self.baseline[0]),
            requests: signal(self.baseline[1]),
        }
    }

    /// The pause after a batch of `revisions`, from what the watch sees now
    /// (nothing without one).
    pub(super) fn pace(&mut self, settings: &MoveSettings, revisions: u64) -> Duration {
        let recent = self
            .watch
            .as_ref()
            .map(|w| w.now(PACER_WINDOW))
            .unwrap_or_default();
        self.next(recent, settings, revisions)
    }

    /// The pause after a batch of `revisions`; `recent`: both p99s over
    /// [`PACER_WINDOW`].
    pub(super) fn next(
        &mut self,
        recent: Signals,
        settings: &MoveSettings,
        revisions: u64,
    ) -> Duration {
        self.copied += revisions;
        let over = |baseline: Option<Duration>, now: Option<(Duration, u64)>| match baseline {
            Some(baseline) if settings.max_p99_ratio > 0.0 => now.is_some_and(|(p99, n)| {
                n >= PACER_MIN_CALLS
                    && p99.as_secs_f64() > baseline.as_secs_f64() * settings.max_p99_ratio
            }),
            _ => false,
        };
        let seen = [recent.calls, recent.requests];
        let slow = [
            over(self.baseline[0], seen[0]),
            over(self.baseline[1], seen[1]),
        ];
        let mut hurt = slow.iter().any(|s| *s);
        // Held at the longest pause for two windows and the others are still
        // slow: the move, which has barely run, is not what slows them (a
        // range's chats now served by another shard on the same host, other
        // load). What they see now becomes the baseline, so the move is
        // paced against its own cost from here on, not held at a crawl.
        if hurt && self.pause >= settings.max_pause {
            self.held += self.pause;
            if self.held >= PACER_HELD {
                for ((baseline, slow), seen) in self.baseline.iter_mut().zip(slow).zip(seen) {
                    if let (true, Some((p99, _))) = (slow, seen) {
                        *baseline = Some(p99.max(PACER_FLOOR));
                    }
                }
                tracing::warn!(
                    calls_p99_ms = self.baseline[0].map(|b| b.as_secs_f64() * 1e3),
                    requests_p99_ms = self.baseline[1].map(|b| b.as_secs_f64() * 1e3),
                    "the other chats stay slow while a move waits at its longest pause; what they see now is its new baseline"
                );
                self.held = Duration::ZERO;
                hurt = false;
            }
        } else {
            self.held = Duration::ZERO;
        }
        let least = (settings.batch / PACER_MIN_BATCH_SHARE).max(1);
        (self.pause, self.batch) = if hurt {
            (
                (self.pause.max(Duration::from_millis(5)) * 2).min(settings.max_pause),
                (self.batch / 2).max(least),
            )
        } else {
            (
                (self.pause / 2).max(settings.pause),
                self.batch.saturating_mul(2).min(settings.batch),
            )
        };
        self.throttled += self.pause.saturating_sub(settings.pause);
        // The cap: no faster than `revisions_per_second` since the start.
        let due = if settings.revisions_per_second > 0 {
            Duration::from_secs_f64(self.copied as f64 / f64::from(settings.revisions_per_second))
                .saturating_sub(self.started.elapsed())
        } else {
            Duration::ZERO
        };
        self.pause.max(due)
    }

    /// The clean-up's batch: `clean_batch` scaled like the copy's batch.
    fn clean_batch(&self, settings: &MoveSettings) -> u32 {
        let scaled = u64::from(settings.clean_batch) * u64::from(self.batch)
            / u64::from(settings.batch.max(1));
        u32::try_from(scaled).unwrap_or(settings.clean_batch).max(1)
    }

    /// The copy does not catch up while throttled (the chat is written
    /// faster than the throttled copy goes): the p99 throttle gives way for
    /// the rest of the move, since a move that never converges holds its
    /// cost forever.
    fn give_way(&mut self, settings: &MoveSettings) {
        if std::mem::take(&mut self.baseline)
            .iter()
            .any(Option::is_some)
        {
            tracing::warn!(
                "a move's copy does not catch up while throttled; it goes on unthrottled"
            );
        }
        self.pause = settings.pause;
        self.batch = settings.batch;
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        if self.copied > 0 {
            tracing::info!(
                revisions = self.copied,
                seconds = self.started.elapsed().as_secs_f64(),
                throttled_ms = self.throttled.as_millis() as u64,
                "a move's copy paced"
            );
        }
    }
}

/// A move as the admin view shows it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MoveView {
    /// `<source shard>:<number>`.
    pub id: String,
    pub chat_id: String,
    pub source: String,
    pub target: String,
    /// `requested`, `copying`, `fenced`, `verified`, `switching`,
    /// `switched`, `cleaning`, `done`, `cancelled`, or `rolled_back` (with
    /// `error`).
    pub phase: String,
    /// The last revision copied to the target (0 while a purged chat's rows
    /// are copied from a snapshot).
    pub copied_revision: u64,
    /// Rows written to the target so far: each replayed event with the
    /// member and message rows it wrote, and each row a snapshot copied (a
    /// page copied again after a takeover counts again).
    pub rows_copied: u64,
    /// While the move runs, how many revisions the target is behind the
    /// source (the source's revision now minus `copiedRevision`); absent
    /// once the move has ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_revisions: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A cancel was asked for; the move rolls back at its next batch.
    pub cancel_requested: bool,
    /// `admin` (the admin API or `chatshard move-chat`), `isolation`, or
    /// `range` (one chat of a bucket-range move).
    pub started_by: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

impl MoveView {
    fn from_row(row: moves::MoveRow) -> Self {
        let running = !Phase::parse(&row.phase).is_some_and(Phase::is_terminal);
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
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MovedChat {
    pub chat_id: String,
    /// The shard its bucket gives it.
    pub home: String,
    /// The shard that holds it.
    pub shard: String,
}

/// Why a move stopped short of its switch.
#[derive(Debug, thiserror::Error)]
enum Stop {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("the copies differ: source {from:?}, target {to:?}")]
    Mismatch { from: Box<Digest>, to: Box<Digest> },
    #[error("the fence lapsed {0} times before the switch")]
    FenceLapsed(u32),
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
    #[error("taken over by another instance")]
    Superseded,
    /// Whether the switch went in is not known (the source could not be
    /// asked): the move is left as it stands to the instance that takes it
    /// over, which reads the source again.
    #[error("the switch's outcome is unknown: {0}")]
    Undecided(String),
}

/// `startedBy` of a chat move made by a bucket-range move: taken over, it is
/// rolled back rather than resumed, since its range move (taken over too)
/// decides where the chat goes, and may be cancelling.
const RANGE: &str = "range";

/// A move (its record's id on the source) and the driver that holds it
/// ([`moves::claim`] counts the takeovers).
type Hold = (u64, u32);

impl From<crate::shard::ShardError> for Stop {
    fn from(e: crate::shard::ShardError) -> Self {
        Self::Service(e.into())
    }
}

/// A move recorded and not yet running.
struct RecordedMove {
    id: u64,
    view: MoveView,
    source: Arc<Shard>,
    target: Arc<Shard>,
}

/// Attempts at fencing, copying the last revisions and switching.
const FENCE_ATTEMPTS: u32 = 3;

impl ChatService {
    /// Starts moving `chat` to the shard named `to`: records the move and
    /// runs it in the background. Refused when the chat is already there, is
    /// moving, or does not exist.
    pub async fn start_move(
        self: &Arc<Self>,
        chat: &ChatId,
        to: &str,
    ) -> Result<MoveView, ServiceError> {
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
    ) -> Result<Option<MoveView>, ServiceError> {
        self.begin_move(chat, to, Some(per_hour)).await
    }

    /// [`Self::start_move`] (`isolation`: `None`) or
    /// [`Self::start_isolation`]; `None` when the record was refused.
    async fn begin_move(
        self: &Arc<Self>,
        chat: &ChatId,
        to: &str,
        isolation: Option<u32>,
    ) -> Result<Option<MoveView>, ServiceError> {
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

    /// Moves `chat` to `to` and waits for the end (a bucket-range move's
    /// step): `Ok(true)` when it moved, `Ok(false)` when it has a move
    /// running already (it is tried again later), and the reason otherwise.
    /// `paced`: what the copy is paced by, and against (a range move's
    /// watch and its baseline from before it began, rather than this chat's
    /// moment).
    pub(super) async fn move_and_wait(
        &self,
        chat: &ChatId,
        to: &str,
        (watch, baseline): (&Watch, Signals),
    ) -> Result<bool, String> {
        let recorded = match self.record_move(chat, to, None, RANGE).await {
            Ok(Some(recorded)) => recorded,
            Ok(None) => return Ok(false),
            Err(e) => return Err(e.to_string()),
        };
        self.drive_to_end(
            (recorded.id, 0),
            chat.clone(),
            (recorded.source, recorded.target),
            Pacer::watching(watch.clone(), baseline, &self.move_settings),
            false,
        )
        .await
        .map(|()| true)
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
        self.get_chat(chat).await?;
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
            phase: Phase::parse(&row.phase).unwrap_or(Phase::Copying),
            target_known: target.is_some(),
            source: at_source,
            cancel: row.cancel_requested,
            of_range: row.started_by == RANGE,
        };
        let step = move_plan::take_over(&abandoned);
        tracing::warn!(chat = %chat, phase = %row.phase, ?step, driver, "taking over an abandoned chat move");
        let Some(target) = target else {
            if let Takeover::End { phase, reason } = step {
                let _ = self
                    .record(source, hold, phase, row.copied_revision, Some(reason), true)
                    .await;
            }
            return;
        };
        let settings = self.move_settings.clone();
        match step {
            Takeover::RetryLater | Takeover::End { .. } => {}
            Takeover::FinishSwitch => match self.finish_switch(&chat, source, &target).await {
                Ok(()) => {
                    let _ = self
                        .record(
                            source,
                            hold,
                            Phase::Cleaning,
                            row.copied_revision,
                            None,
                            false,
                        )
                        .await;
                    let watch = Watch::chat(source, &chat);
                    let mut pacer = Pacer::watching(watch.clone(), watch.baseline(), &settings);
                    self.clean_source(&chat, source, &settings, Some(&mut pacer))
                        .await;
                    let _ = self
                        .record(source, hold, Phase::Done, row.copied_revision, None, true)
                        .await;
                }
                Err(e) => {
                    // Left running: the next round tries again.
                    tracing::warn!(chat = %chat, error = %e, "finishing an abandoned switch failed; retrying later");
                }
            },
            Takeover::RollBack { ends } => {
                self.roll_back(&chat, source, &target, &settings).await;
                let reason = (ends == Phase::RolledBack)
                    .then(|| format!("abandoned by its driver in phase {}", row.phase));
                let _ = self
                    .record(source, hold, ends, 0, reason.as_deref(), true)
                    .await;
            }
            Takeover::Resume { from_start } => {
                let (service, source) = (self.clone(), source.clone());
                tokio::spawn(async move {
                    let watch = Watch::chat(&source, &chat);
                    let pacer =
                        Pacer::watching(watch.clone(), watch.baseline(), &service.move_settings);
                    // The outcome is in the move's record.
                    let _ = service
                        .drive_to_end(hold, chat, (source, target), pacer, !from_start)
                        .await;
                });
            }
        }
    }

    /// Switch steps 2 and 3: the target made live, the home shard's marker
    /// pointed at it (idempotent).
    async fn finish_switch(
        &self,
        chat: &ChatId,
        source: &Arc<Shard>,
        target: &Arc<Shard>,
    ) -> Result<(), Stop> {
        let c = chat.to_string();
        target
            .write(Some(chat), "move_live", move |conn| {
                Box::pin(async move { Ok(moves::set_marker(conn, &c, None).await?) })
            })
            .await?;
        let home = self.shards.home_of(chat).clone();
        if !Arc::ptr_eq(&home, source) && !Arc::ptr_eq(&home, target) {
            let (c, to_name) = (chat.to_string(), target.name().to_owned());
            home.write(Some(chat), "move_home_marker", move |conn| {
                Box::pin(async move { Ok(moves::set_marker(conn, &c, Some(&to_name)).await?) })
            })
            .await?;
        }
        self.shards.relocate(chat, target.name());
        Ok(())
    }

    /// Undoes a move that did not switch: no fence at the source, and the
    /// target's copy (still marked as held by the source) dropped.
    async fn roll_back(
        &self,
        chat: &ChatId,
        source: &Arc<Shard>,
        target: &Arc<Shard>,
        settings: &MoveSettings,
    ) {
        let c = chat.to_string();
        let _ = source
            .write(Some(chat), "move_unfence", move |conn| {
                Box::pin(async move { Ok(moves::unfence(conn, &c).await?) })
            })
            .await;
        self.drop_copy(chat, target, settings).await;
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
    pub async fn moved_chats(&self, limit: u32) -> (Vec<MovedChat>, bool) {
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
                    chats.push(MovedChat {
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
    pub async fn moves(&self) -> Vec<MoveView> {
        let mut all = Vec::new();
        for shard in self.shards.all() {
            let rows = shard
                .read(None, "list_moves", |conn| {
                    Box::pin(async move { Ok(moves::list_moves(conn, 1000).await?) })
                })
                .await;
            if let Ok(rows) = rows {
                all.extend(rows.into_iter().map(MoveView::from_row));
            }
        }
        all.sort_by_key(|m| std::cmp::Reverse(m.created_at));
        all
    }

    async fn move_view(&self, source: &Shard, id: u64) -> Result<MoveView, ServiceError> {
        source
            .read(None, "get_move", move |conn| {
                Box::pin(async move { Ok(moves::get_move(conn, id).await?) })
            })
            .await?
            .map(MoveView::from_row)
            .ok_or_else(|| ServiceError::internal("a move just recorded cannot be read back"))
    }

    /// One move by its id (`<source shard>:<number>`); `None` when no shard
    /// records it (or its shard cannot answer).
    pub async fn get_move(&self, id: &str) -> Option<MoveView> {
        let (shard, n) = id.rsplit_once(':')?;
        let source = self.shards.by_name(shard)?;
        self.move_view(source, n.parse().ok()?).await.ok()
    }

    /// Asks a running move to stop (`DELETE /v1/admin/moves/{id}`): allowed
    /// until the first step of its switch. The driver (or, if it died, the
    /// instance that takes the move over) rolls it back at its next batch:
    /// the fence is lifted, the target's copy dropped, and the move ends
    /// `cancelled`. The chat stays on its source throughout.
    pub async fn cancel_move(&self, id: &str) -> Result<MoveView, ServiceError> {
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
            .map(MoveView::from_row)
            .ok_or_else(not_found)?;
        // Asking again while the move winds down is answered the same.
        let ended = Phase::parse(&view.phase).is_some_and(Phase::is_terminal);
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
    /// copy stands where its old driver left it).
    async fn drive_to_end(
        &self,
        hold: Hold,
        chat: ChatId,
        (source, target): (Arc<Shard>, Arc<Shard>),
        mut pacer: Pacer,
        resuming: bool,
    ) -> Result<(), String> {
        let settings = self.move_settings.clone();
        let outcome = self
            .drive(
                hold,
                &chat,
                (&source, &target),
                &settings,
                &mut pacer,
                resuming,
            )
            .await;
        match outcome {
            Ok(copied) => {
                tracing::info!(chat = %chat, from = source.name(), to = target.name(), revision = copied, "chat_moved");
                // Switched: whoever holds the move now, the clean-up is the
                // same (and idempotent).
                let _ = self
                    .record(&source, hold, Phase::Cleaning, copied, None, false)
                    .await;
                self.clean_source(&chat, &source, &settings, Some(&mut pacer))
                    .await;
                let _ = self
                    .record(&source, hold, Phase::Done, copied, None, true)
                    .await;
                Ok(())
            }
            Err(Stop::Superseded) => {
                tracing::info!(chat = %chat, from = source.name(), to = target.name(), "chat_move_taken_over");
                Err(Stop::Superseded.to_string())
            }
            Err(Stop::Undecided(why)) => {
                tracing::warn!(chat = %chat, from = source.name(), to = target.name(), error = %why, "chat_move_stopped; left to a takeover");
                Err(Stop::Undecided(why).to_string())
            }
            Err(stop) => {
                match self.standing(&source, hold).await {
                    Some(moves::Standing::Holds | moves::Standing::Cancelled) => {}
                    // Another driver took the move over meanwhile: its copy
                    // is not this one's to drop.
                    Some(moves::Standing::Superseded) => {
                        tracing::info!(chat = %chat, from = source.name(), to = target.name(), "chat_move_taken_over");
                        return Err(Stop::Superseded.to_string());
                    }
                    // The source cannot be asked (nor its record ended):
                    // the instance that takes the move over after its lease
                    // resumes it from the target's copy, which is left as
                    // it stands.
                    None => {
                        let reason = stop.to_string();
                        tracing::warn!(chat = %chat, from = source.name(), to = target.name(), error = %reason, "chat_move_stopped; left to a takeover");
                        return Err(reason);
                    }
                }
                // The chat stays where it is.
                self.roll_back(&chat, &source, &target, &settings).await;
                if matches!(stop, Stop::Cancelled) {
                    tracing::info!(chat = %chat, from = source.name(), to = target.name(), "chat_move_cancelled");
                    let _ = self
                        .record(&source, hold, Phase::Cancelled, 0, None, true)
                        .await;
                    return Err("cancelled".to_owned());
                }
                let reason = stop.to_string();
                tracing::warn!(chat = %chat, from = source.name(), to = target.name(), error = %reason, "chat_move_rolled_back");
                let _ = self
                    .record(&source, hold, Phase::RolledBack, 0, Some(&reason), true)
                    .await;
                Err(reason)
            }
        }
    }

    async fn drive(
        &self,
        hold: Hold,
        chat: &ChatId,
        (source, target): (&Arc<Shard>, &Arc<Shard>),
        settings: &MoveSettings,
        pacer: &mut Pacer,
        resuming: bool,
    ) -> Result<u64, Stop> {
        let chat_id = chat.to_string();
        let c = chat_id.clone();
        let head = source
            .read(Some(chat), "move_head", move |conn| {
                Box::pin(async move { Ok(moves::head(conn, &c).await?) })
            })
            .await?
            .ok_or(Stop::Gone)?;
        let first = head.first_revision;
        // A move taken over goes on with its target's copy, if the target
        // holds one for this source.
        let resumed = if resuming {
            match self.row_on(chat, target).await? {
                Some((at, Some(holder))) if holder == source.name() => Some(at),
                _ => None,
            }
        } else {
            None
        };
        if let Some(at) = resumed {
            tracing::info!(chat = %chat, revision = at, "resuming a chat move's copy where its target stands");
        } else {
            self.open_target(chat, &head, (source, target)).await?;
        }
        self.record(
            source,
            hold,
            Phase::Copying,
            resumed.unwrap_or(0),
            None,
            false,
        )
        .await?;
        // A purged log: the rows as they stand first (again, if a snapshot
        // was not settled: its pages are idempotent).
        let mut copied = match resumed {
            Some(at) if at > 0 => at,
            _ if first > 1 => {
                self.copy_snapshot(hold, chat, (source, target), settings, pacer, first)
                    .await?
            }
            _ => 0,
        };
        // Copy while writes go on, each round up to the revision the source
        // had when it began, until the target is close behind; paced.
        for attempt in 1..=FENCE_ATTEMPTS {
            // Rounds in a row whose lag did not shrink.
            let (mut last_lag, mut stalled) = (u64::MAX, 0);
            loop {
                let latest = self.source_revision(chat, source).await?;
                let lag = latest.saturating_sub(copied);
                if lag <= settings.fence_lag {
                    break;
                }
                stalled = if lag >= last_lag { stalled + 1 } else { 0 };
                last_lag = lag;
                if stalled >= STALLED_ROUNDS {
                    pacer.give_way(settings);
                }
                copied = self
                    .copy_until(
                        (hold, Phase::Copying),
                        chat,
                        (source, target),
                        settings,
                        Some(&mut *pacer),
                        latest,
                    )
                    .await?;
            }
            self.record(source, hold, Phase::Copying, copied, None, false)
                .await?;
            // The fence: from here the source takes no write of the chat.
            let (c, ms) = (chat_id.clone(), settings.fence.as_millis() as u64);
            let frozen = source
                .write(Some(chat), "move_fence", move |conn| {
                    Box::pin(async move {
                        // One transaction: the revision read under the row lock
                        // is the last one the source takes.
                        let mut tx = conn.begin().await?;
                        let frozen = moves::fence(&mut tx, &c, ms).await?;
                        tx.commit().await.map_err(OpError::Commit)?;
                        Ok(frozen)
                    })
                })
                .await?
                .ok_or(Stop::Gone)?;
            self.record(source, hold, Phase::Fenced, copied, None, false)
                .await?;
            // Under the fence the chat's writes wait: no pause.
            copied = self
                .copy_until(
                    (hold, Phase::Fenced),
                    chat,
                    (source, target),
                    settings,
                    None,
                    frozen,
                )
                .await?;
            let (from, to) = (
                self.digest(chat, source).await?,
                self.digest(chat, target).await?,
            );
            // Writes past the frozen revision: the fence lapsed before the
            // copies were compared (a slow target), and they cannot agree.
            // Copy on and fence again, as for a lapse found at the switch.
            if from.revision != frozen
                || (from != to && self.source_revision(chat, source).await? != frozen)
            {
                tracing::warn!(chat = %chat, attempt, "the fence lapsed before the verification; copying on");
                continue;
            }
            if from != to {
                return Err(Stop::Mismatch {
                    from: Box::new(from),
                    to: Box::new(to),
                });
            }
            self.record(source, hold, Phase::Verified, copied, None, false)
                .await?;
            // The switch, in its order: the tombstone at the source (only if
            // the fence still holds and no cancel came first), then the
            // target made live, then the home shard's marker.
            let (c, to_name) = (chat_id.clone(), target.name().to_owned());
            let written = source
                .write(Some(chat), "move_switch", move |conn| {
                    Box::pin(async move {
                        let mut tx = conn.begin().await?;
                        let step = moves::switch_source(&mut tx, hold, &c, &to_name, frozen, now())
                            .await?;
                        if step == moves::SwitchStep::Done {
                            tx.commit().await.map_err(OpError::Commit)?;
                        } else {
                            tx.rollback().await?;
                        }
                        Ok(step)
                    })
                })
                .await;
            let step = match written {
                Ok(step) => step,
                // The commit's outcome may be unknown: the source says
                // whether the tombstone went in. If it cannot say, the move
                // is left as it stands to the instance that takes it over.
                Err(e) => match self.row_on(chat, source).await {
                    Ok(Some((_, Some(to)))) if to == target.name() => moves::SwitchStep::Done,
                    Ok(_) => return Err(e.into()),
                    Err(_) => return Err(Stop::Undecided(e.to_string())),
                },
            };
            match step {
                moves::SwitchStep::Done => {}
                moves::SwitchStep::Cancelled => return Err(Stop::Cancelled),
                moves::SwitchStep::Superseded => return Err(Stop::Superseded),
                moves::SwitchStep::Lapsed => {
                    tracing::warn!(chat = %chat, attempt, "the fence lapsed before the switch; copying on");
                    continue;
                }
            }
            // Past the tombstone there is no way back: the switch's other
            // steps are retried until they are done, for as long as this
            // driver holds the move (the instance that takes it over
            // finishes them otherwise). Rolling back here would drop the
            // only live copy.
            let mut pause = Duration::from_millis(100);
            while let Err(e) = self.finish_switch(chat, source, target).await {
                tracing::warn!(chat = %chat, error = %e, "finishing a switch failed; retrying");
                if let Err(Stop::Superseded) = self
                    .record(source, hold, Phase::Switching, copied, None, false)
                    .await
                {
                    return Err(Stop::Superseded);
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            // Switched: the tombstone stands whoever holds the record now.
            let _ = self
                .record(source, hold, Phase::Switched, copied, None, false)
                .await;
            return Ok(copied);
        }
        Err(Stop::FenceLapsed(FENCE_ATTEMPTS))
    }

    /// The target's row, marked as held by the source until the switch (any
    /// rows a marker there still had dropped); refused if the chat is live
    /// on the target.
    async fn open_target(
        &self,
        chat: &ChatId,
        head: &moves::ChatHead,
        (source, target): (&Arc<Shard>, &Arc<Shard>),
    ) -> Result<(), Stop> {
        let (c, src, head) = (chat.to_string(), source.name().to_owned(), head.clone());
        let opened = target
            .write(Some(chat), "move_open", move |conn| {
                Box::pin(async move {
                    let mut tx = conn.begin().await?;
                    match moves::open_target(&mut tx, &c, &head, &src).await {
                        Ok(()) => {}
                        Err(moves::OpenError::Sql(e)) => return Err(e.into()),
                        Err(moves::OpenError::Live) => {
                            tx.rollback().await?;
                            return Ok(false);
                        }
                    }
                    tx.commit().await.map_err(OpError::Commit)?;
                    Ok(true)
                })
            })
            .await?;
        if opened {
            Ok(())
        } else {
            Err(Stop::TargetLive)
        }
    }

    /// The copy of a chat whose log was purged (its first stored revision
    /// `first` is above 1), which replaying the log cannot rebuild: its rows
    /// as they stand are copied, members, then messages, then the stored
    /// events up to the revision the source had when this began, a page per
    /// transaction at each end, paced. The target then stands at that
    /// revision, with its count taken from its rows, and the log's replay
    /// goes on from there. Returns that revision.
    ///
    /// Writes go on at the source meanwhile, so a row may be copied with a
    /// later write already in it. Replaying that write again leaves it as it
    /// is: the replay sets each member it touches to its state after the
    /// batch and counts the change from the target's row, and a message or
    /// event above the revision is not copied here. So the copy needs no
    /// lock or long transaction on the source.
    async fn copy_snapshot(
        &self,
        hold: Hold,
        chat: &ChatId,
        (source, target): (&Arc<Shard>, &Arc<Shard>),
        settings: &MoveSettings,
        pacer: &mut Pacer,
        first: u64,
    ) -> Result<u64, Stop> {
        let until = self.source_revision(chat, source).await?;
        // Members, in user order.
        let mut after = String::new();
        loop {
            let (c, from, n) = (chat.to_string(), after.clone(), pacer.batch);
            let rows = source
                .read(Some(chat), "move_snapshot_read", move |conn| {
                    Box::pin(async move { Ok(moves::members_after(conn, &c, &from, n).await?) })
                })
                .await?;
            let Some(last) = rows.last() else { break };
            after.clone_from(&last.user_id);
            let n = rows.len() as u64;
            let c = chat.to_string();
            self.snapshot_page(chat, target, move |conn| {
                Box::pin(async move { moves::insert_members(conn, &c, &rows).await })
            })
            .await?;
            self.snapshot_step(hold, source, settings, pacer, n).await?;
        }
        // Messages (none is purged), in the order of their unique key; those
        // above the revision come with the log's replay.
        let mut after = (String::new(), String::new());
        loop {
            let (c, from, n) = (chat.to_string(), after.clone(), pacer.batch);
            let rows = source
                .read(Some(chat), "move_snapshot_read", move |conn| {
                    Box::pin(async move {
                        Ok(moves::messages_after(conn, &c, (&from.0, &from.1), n).await?)
                    })
                })
                .await?;
            let Some(last) = rows.last() else { break };
            after = (last.sender_id.clone(), last.client_message_id.clone());
            let n = rows.len() as u64;
            let rows: Vec<_> = rows.into_iter().filter(|m| m.revision <= until).collect();
            let c = chat.to_string();
            self.snapshot_page(chat, target, move |conn| {
                Box::pin(async move { moves::insert_messages(conn, &c, &rows).await })
            })
            .await?;
            self.snapshot_step(hold, source, settings, pacer, n).await?;
        }
        // The stored events, each message event naming the target's message.
        let mut after = first - 1;
        while after < until {
            let (c, n) = (chat.to_string(), pacer.batch);
            let rows = source
                .read(Some(chat), "move_snapshot_read", move |conn| {
                    Box::pin(async move {
                        Ok(moves::events_between(conn, &c, (after, until), n).await?)
                    })
                })
                .await?;
            let Some(last) = rows.last() else { break };
            after = last.revision;
            let n = rows.len() as u64;
            let c = chat.to_string();
            self.snapshot_page(chat, target, move |conn| {
                Box::pin(async move { moves::insert_events(conn, &c, &rows).await })
            })
            .await?;
            self.snapshot_step(hold, source, settings, pacer, n).await?;
        }
        let c = chat.to_string();
        self.snapshot_page(chat, target, move |conn| {
            Box::pin(async move { moves::settle_snapshot(conn, &c, until, first).await })
        })
        .await?;
        tracing::info!(chat = %chat, revision = until, first_revision = first, "a purged chat's rows copied; its log is replayed from here");
        Ok(until)
    }

    /// One page of a snapshot written on the target, in a transaction that
    /// holds the chat's row and finds it still at revision 0 (the snapshot
    /// not settled yet).
    async fn snapshot_page<F>(
        &self,
        chat: &ChatId,
        target: &Arc<Shard>,
        write: F,
    ) -> Result<(), Stop>
    where
        F: for<'c> FnOnce(
                &'c mut sqlx::MySqlConnection,
            ) -> futures_util::future::BoxFuture<'c, sqlx::Result<()>>
            + Send
            + 'static,
    {
        let c = chat.to_string();
        let written = target
            .write(Some(chat), "move_snapshot_write", move |conn| {
                Box::pin(async move {
                    let mut tx = conn.begin().await?;
                    if moves::lock_revision(&mut tx, &c).await? != Some(0) {
                        tx.rollback().await?;
                        return Ok(false);
                    }
                    write(&mut tx).await?;
                    tx.commit().await.map_err(OpError::Commit)?;
                    Ok(true)
                })
            })
            .await?;
        if written {
            Ok(())
        } else {
            Err(Stop::SnapshotTaken)
        }
    }

    /// After a page of a snapshot: the move's lease renewed (and a cancel
    /// seen), then the pacer's pause.
    async fn snapshot_step(
        &self,
        hold: Hold,
        source: &Arc<Shard>,
        settings: &MoveSettings,
        pacer: &mut Pacer,
        rows: u64,
    ) -> Result<(), Stop> {
        self.record_copy(source, hold, Phase::Copying, (0, rows), None, false)
            .await?;
        tokio::time::sleep(pacer.pace(settings, rows)).await;
        Ok(())
    }

    /// Replays the source's log on the target up to `until`, paced by
    /// `pacer` if given; the target's revision after.
    async fn copy_until(
        &self,
        (hold, phase): (Hold, Phase),
        chat: &ChatId,
        (source, target): (&Arc<Shard>, &Arc<Shard>),
        settings: &MoveSettings,
        mut pacer: Option<&mut Pacer>,
        until: u64,
    ) -> Result<u64, Stop> {
        loop {
            let (at, _) = self.row_on(chat, target).await?.ok_or(Stop::Gone)?;
            if at >= until {
                return Ok(at);
            }
            let batch = pacer.as_deref().map_or(settings.batch, |p| p.batch);
            let c = chat.to_string();
            let rows: Vec<LogRow> = source
                .read(Some(chat), "move_read_log", move |conn| {
                    Box::pin(async move { Ok(moves::log_after(conn, &c, at, batch).await?) })
                })
                .await?;
            let rows: Vec<LogRow> = rows.into_iter().filter(|r| r.revision <= until).collect();
            let Some(last) = rows.last().map(|r| r.revision) else {
                return Ok(at);
            };
            let c = chat.to_string();
            let written = target
                .write(Some(chat), "move_replay", move |conn| {
                    Box::pin(async move {
                        let mut tx = conn.begin().await?;
                        // The copy goes on from where the target stands: a
                        // batch replayed already (a retry) is not replayed twice.
                        if moves::lock_revision(&mut tx, &c).await? != Some(at) {
                            tx.rollback().await?;
                            return Ok(0);
                        }
                        let (delta, written) = moves::replay_batch(&mut tx, &c, &rows).await?;
                        moves::settle(&mut tx, &c, last, delta).await?;
                        tx.commit().await.map_err(OpError::Commit)?;
                        Ok(written)
                    })
                })
                .await?;
            // Progress, and the move's lease: a move whose record stops
            // moving is taken for abandoned (see `recover_moves`).
            self.record_copy(source, hold, phase, (last, written), None, false)
                .await?;
            if let Some(pacer) = pacer.as_deref_mut() {
                tokio::time::sleep(pacer.pace(settings, last - at)).await;
            }
        }
    }

    /// The chat's revision on `shard` and its marker there (`None`: no row).
    async fn row_on(
        &self,
        chat: &ChatId,
        shard: &Shard,
    ) -> Result<Option<(u64, Option<String>)>, crate::shard::ShardError> {
        let c = chat.to_string();
        shard
            .read(Some(chat), "move_chat_row", move |conn| {
                Box::pin(async move { Ok(crate::storage::chats::revision(conn, &c).await?) })
            })
            .await
    }

    async fn source_revision(&self, chat: &ChatId, source: &Arc<Shard>) -> Result<u64, Stop> {
        match self.row_on(chat, source).await? {
            Some((revision, None)) => Ok(revision),
            _ => Err(Stop::Gone),
        }
    }

    async fn digest(&self, chat: &ChatId, shard: &Arc<Shard>) -> Result<Digest, Stop> {
        let c = chat.to_string();
        Ok(shard
            .read(Some(chat), "move_digest", move |conn| {
                Box::pin(async move { Ok(moves::digest(conn, &c).await?) })
            })
            .await?)
    }

    /// Deletes the moved chat's rows from `shard`, a batch at a time (paced
    /// by `pacer` if given); the chat row stays as the tombstone.
    async fn clean_source(
        &self,
        chat: &ChatId,
        shard: &Arc<Shard>,
        settings: &MoveSettings,
        mut pacer: Option<&mut Pacer>,
    ) {
        for table in [
            CleanTable::Events,
            CleanTable::Messages,
            CleanTable::Members,
        ] {
            loop {
                let n = pacer
                    .as_deref()
                    .map_or(settings.clean_batch, |p| p.clean_batch(settings));
                let c = chat.to_string();
                let deleted = shard
                    .write(Some(chat), "move_clean", move |conn| {
                        Box::pin(async move { Ok(moves::clean(conn, table, &c, n).await?) })
                    })
                    .await;
                match deleted {
                    Ok(n) if n > 0 => {
                        let pause = match pacer.as_deref_mut() {
                            Some(p) => p.pace(settings, 0),
                            None => settings.pause,
                        };
                        tokio::time::sleep(pause).await;
                    }
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(chat = %chat, error = %crate::error::chain(&e), "cleaning a moved chat's rows stopped; they stay behind its tombstone");
                        return;
                    }
                }
            }
        }
    }

    /// Drops what a rolled-back move copied to the target (its rows, then its
    /// chat row), if the target's row is still the copy's (marked).
    async fn drop_copy(&self, chat: &ChatId, target: &Arc<Shard>, settings: &MoveSettings) {
        let marked = self.row_on(chat, target).await;
        if !matches!(marked, Ok(Some((_, Some(_))))) {
            return;
        }
        self.clean_source(chat, target, settings, None).await;
        let c = chat.to_string();
        let _ = target
            .write(Some(chat), "move_drop_copy", move |conn| {
                Box::pin(async move { Ok(moves::drop_chat_row(conn, &c).await?) })
            })
            .await;
    }

    /// Writes the move's phase and progress (its lease) as driver `hold`;
    /// `Err` when the driver is to stop: a cancel was asked for, or another
    /// driver took the move over. A record that cannot be written is logged
    /// and the move goes on (its next write renews the lease).
    async fn record(
        &self,
        source: &Arc<Shard>,
        hold: Hold,
        phase: Phase,
        copied: u64,
        error: Option<&str>,
        finished: bool,
    ) -> Result<(), Stop> {
        self.record_copy(source, hold, phase, (copied, 0), error, finished)
            .await
    }

    /// [`Self::record`], adding `rows` to the rows the move has written to
    /// its target (`(copied revision, rows)`).
    async fn record_copy(
        &self,
        source: &Arc<Shard>,
        hold: Hold,
        phase: Phase,
        progress: (u64, u64),
        error: Option<&str>,
        finished: bool,
    ) -> Result<(), Stop> {
        let error = error.map(str::to_owned);
        let written = source
            .write(None, "move_record", move |conn| {
                Box::pin(async move {
                    Ok(moves::set_phase(
                        conn,
                        hold,
                        phase.as_str(),
                        progress,
                        error.as_deref(),
                        finished,
                        now(),
                    )
                    .await?)
                })
            })
            .await;
        match written {
            Ok(moves::Standing::Holds) => Ok(()),
            Ok(moves::Standing::Cancelled) => Err(Stop::Cancelled),
            Ok(moves::Standing::Superseded) => Err(Stop::Superseded),
            Err(e) => {
                tracing::warn!(id = hold.0, phase = phase.as_str(), error = %crate::error::chain(&e), "cannot record a move's phase");
                Ok(())
            }
        }
    }

    /// Where driver `hold` stands with the move's record (`None`: the
    /// source cannot be read).
    async fn standing(&self, source: &Arc<Shard>, hold: Hold) -> Option<moves::Standing> {
        source
            .read(None, "move_standing", move |conn| {
                Box::pin(async move { Ok(moves::standing(conn, hold).await?) })
            })
            .await
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_pacer_backs_off_while_the_source_is_slow_and_comes_back_after() {
        let settings = MoveSettings {
            revisions_per_second: 0,
            ..MoveSettings::default()
        };
        let mut pacer = Pacer::new(calls(Some((ms(4), 500))), &settings);
        // Within 1.2 × the baseline: the base pause.
        assert_eq!(
            pacer.next(calls(Some((ms(4), 500))), &settings, 1000),
            ms(5)
        );
        // Above it: doubling up to the cap.
        let mut pauses = Vec::new();
        for _ in 0..10 {
            pauses.push(pacer.next(calls(Some((ms(6), 500))), &settings, 1000));
        }
        assert_eq!(pauses[..3], [ms(10), ms(20), ms(40)]);
        assert_eq!(*pauses.last().unwrap(), settings.max_pause);
        // The batch halved down to an eighth, the clean-up's with it.
        assert_eq!(pacer.batch, 125);
        assert_eq!(pacer.clean_batch(&settings), 125);
        // Too few calls to tell, then healthy again: halving back to the base.
        assert_eq!(
            pacer.next(calls(Some((ms(60), 10))), &settings, 1000),
            ms(500)
        );
        let mut pause = ms(500);
        for _ in 0..10 {
            pause = pacer.next(calls(Some((ms(4), 500))), &settings, 1000);
        }
        assert_eq!(pause, ms(5));
        assert_eq!(pacer.batch, 1000);
        // Giving way: the throttle is off for the rest of the move.
        pacer.next(calls(Some((ms(60), 500))), &settings, 1000);
        pacer.give_way(&settings);
        assert_eq!((pacer.pause, pacer.batch), (ms(5), 1000));
        assert_eq!(
            pacer.next(calls(Some((ms(60), 500))), &settings, 1000),
            ms(5)
        );
    }

    /// Only the shard's calls seen.
    fn calls(calls: Option<(Duration, u64)>) -> Signals {
        Signals {
            calls,
            requests: None,
        }
    }

    #[test]
    fn the_other_chats_requests_slow_the_pacer_even_when_the_shards_calls_do_not() {
        let settings = MoveSettings {
            revisions_per_second: 0,
            ..MoveSettings::default()
        };
        let seen = |calls: u64, requests: u64| Signals {
            calls: Some((ms(calls), 500)),
            requests: Some((ms(requests), 500)),
        };
        let mut pacer = Pacer::new(seen(4, 20), &settings);
        assert_eq!(pacer.next(seen(4, 24), &settings, 1000), ms(5));
        // The calls as before, the requests 1.5 times slower: it backs off.
        assert_eq!(pacer.next(seen(4, 30), &settings, 1000), ms(10));
        assert_eq!(pacer.next(seen(4, 30), &settings, 1000), ms(20));
        // Both within their ratio: back.
        assert_eq!(pacer.next(seen(4, 22), &settings, 1000), ms(10));
        // Too few requests to trust (as the baseline) counts for nothing.
        let mut pacer = Pacer::new(
            Signals {
                calls: Some((ms(4), 500)),
                requests: Some((ms(20), 10)),
            },
            &settings,
        );
        assert_eq!(pacer.next(seen(4, 900), &settings, 1000), ms(5));
    }

    #[test]
    fn held_at_its_longest_pause_with_the_others_still_slow_the_pacer_takes_a_new_baseline() {
        let settings = MoveSettings {
            revisions_per_second: 0,
            ..MoveSettings::default()
        };
        let seen = |requests: u64| Signals {
            calls: Some((ms(4), 500)),
            requests: Some((ms(requests), 500)),
        };
        let mut pacer = Pacer::new(seen(10), &settings);
        // The others twice as slow whatever the move does: the pause climbs
        // to its longest, stays there for 4 s, then the slow p99 is the
        // baseline and the pause comes down.
        let pauses: Vec<Duration> = (0..12)
            .map(|_| pacer.next(seen(20), &settings, 0))
            .collect();
        assert_eq!(
            pauses,
            [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000, 1000, 500].map(ms),
            "{pauses:?}"
        );
        assert_eq!(pacer.baseline().requests, Some((ms(20), PACER_MIN_CALLS)));
        assert_eq!(pacer.baseline().calls, Some((ms(4), PACER_MIN_CALLS)));
        // Paced against the new baseline from here on.
        assert_eq!(pacer.next(seen(23), &settings, 0), ms(250));
        assert_eq!(pacer.next(seen(30), &settings, 0), ms(500));
        // A p99 that comes back while held resets the count.
        let mut pacer = Pacer::new(seen(10), &settings);
        for _ in 0..10 {
            pacer.next(seen(20), &settings, 0);
        }
        pacer.next(seen(10), &settings, 0);
        let pauses: Vec<Duration> = (0..4).map(|_| pacer.next(seen(20), &settings, 0)).collect();
        assert_eq!(pauses, [1000, 1000, 1000, 1000].map(ms), "{pauses:?}");
        assert_eq!(pacer.baseline().requests, Some((ms(10), PACER_MIN_CALLS)));
    }

    #[test]
    fn without_a_baseline_or_with_the_throttle_off_only_the_base_pause_and_the_cap_apply() {
        let quiet = MoveSettings {
            revisions_per_second: 0,
            ..MoveSettings::default()
        };
        let mut pacer = Pacer::new(calls(Some((ms(4), 3))), &quiet);
        assert_eq!(pacer.next(calls(Some((ms(900), 900))), &quiet, 1000), ms(5));
        let off = MoveSettings {
            max_p99_ratio: 0.0,
            ..quiet.clone()
        };
        let mut pacer = Pacer::new(calls(Some((ms(4), 500))), &off);
        assert_eq!(pacer.next(calls(Some((ms(900), 900))), &off, 1000), ms(5));
        // A sub-millisecond baseline counts as 1 ms.
        let mut pacer = Pacer::new(calls(Some((Duration::from_micros(200), 500))), &quiet);
        assert_eq!(pacer.next(calls(Some((ms(1), 500))), &quiet, 1000), ms(5));
        // The cap: 10,000 revisions at 1,000/s are due in about 10 s.
        let capped = MoveSettings {
            revisions_per_second: 1000,
            ..quiet
        };
        let mut pacer = Pacer::new(calls(None), &capped);
        let pause = pacer.next(calls(None), &capped, 10_000);
        assert!(
            pause > Duration::from_secs(9) && pause <= Duration::from_secs(10),
            "{pause:?}"
        );
    }
}
