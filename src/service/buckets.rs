//! Bucket ranges that move between shards online (docs/moving-chats.md,
//! "Bucket ranges"): the versioned bucket table every instance follows, and
//! the range move that splits a shard.
//!
//! The configuration's `buckets` are version 1. A range move gives a range
//! to another shard in four steps: it moves every chat of the range with the
//! single-chat move (several at once, each throttled like any move), fences
//! the creation of new chats of the range on the source and moves the ones
//! created meanwhile, stores version N + 1 on the source in the transaction
//! that lifts that fence (the flip), then on every other shard. Instances
//! read the newest version every `moves.map_poll_ms`; one that routes by an
//! older version meets the source's tombstones (existing chats) or its
//! bucket table (new chats), which name the new owner.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use sqlx::Connection;

use super::moves::{Pacer, Watch};
use super::{ChatService, ServiceError, now};
use crate::domain::ChatId;
use crate::routing::{BucketMap, BucketRange, bucket_of};
use crate::shard::{OpError, Shard};
use crate::storage::buckets::{self, BucketMoveRow, Flip, Progress};

/// A range move as the admin view shows it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BucketMoveView {
    pub id: u64,
    /// The range, `first-last`.
    #[schema(example = "256-383")]
    pub buckets: String,
    pub source: String,
    pub target: String,
    /// `requested`, `copying` (moving the range's chats), `fenced` (the
    /// last pass: new chats of the range wait), `flipping` (from here a
    /// cancel is refused), `flipped` (the new version is on the source; the
    /// other shards are being told), `done`, `failed` (with `error`; the
    /// chats moved so far stay moved), `cancelling` (the chats moved so far
    /// are moved back) or `cancelled` (with `error` if some could not be).
    pub phase: String,
    /// The range's chats found on the source.
    pub chats_total: u64,
    /// The range's chats this move moved.
    pub chats_moved: u64,
    /// The version of the bucket table the move made, once flipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A cancel was asked for; the move stops after the chat moves under
    /// way and moves back what it moved.
    pub cancel_requested: bool,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

impl BucketMoveView {
    fn from_row(row: BucketMoveRow) -> Self {
        Self {
            id: row.id,
            buckets: format!("{}-{}", row.first_bucket, row.last_bucket),
            source: row.source,
            target: row.target,
            phase: row.phase,
            chats_total: row.chats_total,
            chats_moved: row.chats_moved,
            version: row.version,
            error: row.error,
            cancel_requested: row.cancel_requested != 0,
            created_at: crate::storage::utc(row.created_at),
            updated_at: crate::storage::utc(row.updated_at),
        }
    }
}

/// The bucket table an instance routes by.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BucketTableView {
    /// 1: the configuration's `buckets`; higher: written by range moves.
    pub version: u64,
    /// Every configured shard and the ranges it owns.
    pub shards: Vec<ShardBuckets>,
}

#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardBuckets {
    pub shard: String,
    #[schema(example = json!(["0-255"]))]
    pub buckets: Vec<String>,
}

/// Chats read per page when a range move walks its source.
const PAGE: u32 = 500;
/// Passes over the source before the fence; chats whose move failed (a move
/// of theirs was running, say, whose driver died) are tried again on the
/// next one, half a lease later, when such a move has been taken over.
const PASSES: u32 = 5;
/// Attempts at the fenced last pass and the flip.
const FENCE_ATTEMPTS: u32 = 3;

/// Why a range move stopped.
#[derive(Debug, thiserror::Error)]
enum RangeStop {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("the range's fence lapsed")]
    Lapsed,
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Failed(String),
}

impl From<crate::shard::ShardError> for RangeStop {
    fn from(e: crate::shard::ShardError) -> Self {
        Self::Service(e.into())
    }
}

/// What every walk of one range move shares.
struct Walk<'a> {
    id: u64,
    range: BucketRange,
    /// The source, its other chats left out of the range.
    watch: Watch,
    pacer: &'a tokio::sync::Mutex<Pacer>,
}

/// What a range move has done so far.
#[derive(Debug, Default)]
struct Tally {
    total: std::collections::HashSet<String>,
    moved: u64,
}

impl ChatService {
    /// The bucket table this instance routes by.
    pub fn bucket_table(&self) -> BucketTableView {
        let current = self.shards.router();
        let names = self.shards.names();
        let map = BucketMap::of(&current.1, &names);
        BucketTableView {
            version: current.0,
            shards: names
                .iter()
                .map(|name| ShardBuckets {
                    shard: (*name).to_owned(),
                    buckets: map.0.get(*name).cloned().unwrap_or_default(),
                })
                .collect(),
        }
    }

    /// Reads the newest bucket table of every shard and routes by the
    /// newest of them if it is newer than the one in use; whether every
    /// shard answered.
    pub async fn refresh_bucket_map(&self) -> bool {
        let mut newest: Option<(u64, String)> = None;
        let mut all = true;
        for shard in self.shards.all() {
            // A shard whose breaker is not closed is left to the requests
            // that need it; the others hold the same table.
            if shard.breaker_state() != crate::shard::BreakerState::Closed {
                all = false;
                continue;
            }
            let read = shard
                .read(None, "bucket_map_read", |conn| {
                    Box::pin(async move { Ok(buckets::latest(conn).await?) })
                })
                .await;
            match read {
                Ok(Some((v, ranges))) if newest.as_ref().is_none_or(|n| v > n.0) => {
                    newest = Some((v, ranges));
                }
                Ok(_) => {}
                Err(_) => all = false,
            }
        }
        let Some((version, ranges)) = newest else {
            return all;
        };
        if version <= self.shards.map_version() {
            return all;
        }
        let adopted = serde_json::from_str::<BucketMap>(&ranges)
            .map_err(|e| format!("bucket map version {version} does not parse: {e}"))
            .and_then(|map| self.shards.adopt_map(version, &map));
        match adopted {
            Ok(true) => tracing::info!(version, "bucket_map_adopted"),
            Ok(false) => {}
            Err(e) => {
                // Said once per version: the poll comes back every second.
                static SAID: AtomicU64 = AtomicU64::new(0);
                if SAID.swap(version, Ordering::Relaxed) != version {
                    tracing::error!(version, error = %e, "the newest bucket table cannot be followed; routing by the one in use");
                }
            }
        }
        all
    }

    /// Reads the newest bucket table every `moves.map_poll_ms`, and at once
    /// when a shard named another owner for a chat, until the service is
    /// dropped.
    pub fn spawn_bucket_map_poller(self: &Arc<Self>) {
        let service = Arc::downgrade(self);
        let every = self.move_settings.map_poll;
        let nudge = self.map_nudge.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = nudge.notified() => {}
                }
                let Some(service) = service.upgrade() else {
                    return;
                };
                service.refresh_bucket_map().await;
                drop(service);
                // Nudges come with every relocation: one read per 100 ms at most.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }

    /// The shard that records range moves: the first configured one.
    fn coordinator(&self) -> &Arc<Shard> {
        &self.shards.all()[0]
    }

    /// Starts moving every chat of `range` to the shard named `to`, online,
    /// and then gives the range to it (`chatshard move-buckets`). Refused
    /// while another range move runs, when the range is not owned by one
    /// shard, or when a shard cannot be read (every shard must agree on the
    /// newest bucket table first).
    pub async fn start_bucket_move(
        self: &Arc<Self>,
        range: BucketRange,
        to: &str,
    ) -> Result<BucketMoveView, ServiceError> {
        let target =
            self.shards
                .by_name(to)
                .cloned()
                .ok_or_else(|| ServiceError::UnknownShard {
                    shard: to.to_owned(),
                })?;
        if !self.refresh_bucket_map().await {
            return Err(ServiceError::MoveRefused {
                reason: "every shard must answer before a bucket range moves (the newest bucket table is read from all of them)".to_owned(),
            });
        }
        let router = self.shards.router();
        let Some(owner) = router.1.owner_of_range(range) else {
            return Err(ServiceError::MoveRefused {
                reason: format!(
                    "buckets {range} belong to several shards; move each shard's part on its own"
                ),
            });
        };
        let source = self.shards.all()[owner].clone();
        if Arc::ptr_eq(&source, &target) {
            return Err(ServiceError::MoveRefused {
                reason: format!("buckets {range} are on shard {to} already"),
            });
        }
        let (src, dst) = (source.name().to_owned(), to.to_owned());
        let id = self
            .coordinator()
            .write(None, "bucket_move_record", move |conn| {
                Box::pin(async move {
                    match buckets::insert_move(conn, (range.first, range.last), &src, &dst, now())
                        .await
                    {
                        Ok(id) => Ok(Some(id)),
                        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(None),
                        Err(e) => Err(e.into()),
                    }
                })
            })
            .await?
            .ok_or_else(|| ServiceError::MoveRefused {
                reason: "a bucket-range move is running; one runs at a time".to_owned(),
            })?;
        let view = self.get_bucket_move(id).await.ok_or_else(|| {
            ServiceError::internal("a range move just recorded cannot be read back")
        })?;
        let service = self.clone();
        tokio::spawn(async move {
            service.run_bucket_move(id, range, source, target).await;
        });
        Ok(view)
    }

    /// Every range move, newest first (empty when the coordinator cannot
    /// answer).
    pub async fn bucket_moves(&self) -> Vec<BucketMoveView> {
        self.coordinator()
            .read(None, "bucket_moves", |conn| {
                Box::pin(async move { Ok(buckets::list_moves(conn, 1000).await?) })
            })
            .await
            .map(|rows| rows.into_iter().map(BucketMoveView::from_row).collect())
            .unwrap_or_default()
    }

    /// One range move.
    pub async fn get_bucket_move(&self, id: u64) -> Option<BucketMoveView> {
        self.coordinator()
            .read(None, "bucket_move", move |conn| {
                Box::pin(async move { Ok(buckets::get_move(conn, id).await?) })
            })
            .await
            .ok()
            .flatten()
            .map(BucketMoveView::from_row)
    }

    /// Asks a running range move to stop (`DELETE /v1/admin/bucket-moves/{id}`),
    /// allowed until its flip begins: the driver (or the instance that takes
    /// it over) lets the chat moves under way end, lifts the fence, moves the
    /// chats it moved back to the source, and ends `cancelled`. The bucket
    /// table does not change.
    pub async fn cancel_bucket_move(&self, id: u64) -> Result<BucketMoveView, ServiceError> {
        let asked = self
            .coordinator()
            .write(None, "bucket_move_cancel", move |conn| {
                Box::pin(async move { Ok(buckets::request_cancel(conn, id, now()).await?) })
            })
            .await?;
        let view = self
            .coordinator()
            .read(None, "bucket_move", move |conn| {
                Box::pin(async move { Ok(buckets::get_move(conn, id).await?) })
            })
            .await?
            .map(BucketMoveView::from_row)
            .ok_or_else(|| ServiceError::MoveNotFound { id: id.to_string() })?;
        // Asking again while the move winds down is answered the same.
        let ended = matches!(view.phase.as_str(), "done" | "failed" | "cancelled");
        if !asked && (ended || !view.cancel_requested) {
            return Err(ServiceError::MoveRefused {
                reason: format!(
                    "range move {id} is in phase {}: a range move can be cancelled only before its flip",
                    view.phase
                ),
            });
        }
        Ok(view)
    }

    /// Takes over the range moves whose driver died (their record has not
    /// changed for `moves.lease_ms`) and runs them on: every step of a range
    /// move can run again.
    pub(super) async fn recover_bucket_moves(self: &Arc<Self>) {
        let lease = self.move_settings.lease.as_secs().max(1);
        let coordinator = self.coordinator().clone();
        let Ok(rows) = coordinator
            .read(None, "bucket_moves_abandoned", move |conn| {
                Box::pin(async move { Ok(buckets::abandoned(conn, lease).await?) })
            })
            .await
        else {
            return;
        };
        for row in rows {
            let (id, seen) = (row.id, row.updated_at);
            let claimed = coordinator
                .write(None, "bucket_move_claim", move |conn| {
                    Box::pin(async move { Ok(buckets::claim(conn, id, seen, now()).await?) })
                })
                .await;
            if !matches!(claimed, Ok(true)) {
                continue;
            }
            let range = BucketRange {
                first: row.first_bucket,
                last: row.last_bucket,
            };
            let shards = (
                self.shards.by_name(&row.source).cloned(),
                self.shards.by_name(&row.target).cloned(),
            );
            let (Some(source), Some(target)) = shards else {
                let p = Progress {
                    phase: "failed",
                    error: Some("its shards are not configured here".to_owned()),
                    finished: true,
                    ..Progress::default()
                };
                self.record_range(id, p).await;
                continue;
            };
            tracing::warn!(id, phase = %row.phase, buckets = %range, "taking over an abandoned bucket-range move");
            let service = self.clone();
            tokio::spawn(async move {
                service.run_bucket_move(id, range, source, target).await;
            });
        }
    }

    /// Runs a recorded range move to its end, recording its phases; its
    /// record is renewed every `lease / 3` meanwhile.
    async fn run_bucket_move(
        self: &Arc<Self>,
        id: u64,
        range: BucketRange,
        source: Arc<Shard>,
        target: Arc<Shard>,
    ) {
        let coordinator = self.coordinator().clone();
        let every = (self.move_settings.lease / 3).max(Duration::from_millis(100));
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let _ = coordinator
                    .write(None, "bucket_move_touch", move |conn| {
                        Box::pin(async move { Ok(buckets::touch(conn, id, now()).await?) })
                    })
                    .await;
            }
        });
        let mut tally = Tally::default();
        let outcome = self
            .drive_range(id, range, (&source, &target), &mut tally)
            .await;
        heartbeat.abort();
        let (total, moved) = (tally.total.len() as u64, tally.moved);
        match outcome {
            Ok(version) => {
                tracing::info!(id, buckets = %range, from = source.name(), to = target.name(), version, chats = moved, "bucket_range_moved");
                let p = Progress {
                    phase: "done",
                    chats_total: total,
                    chats_moved: moved,
                    version: Some(version),
                    finished: true,
                    ..Progress::default()
                };
                self.record_range(id, p).await;
            }
            Err(RangeStop::Cancelled) => {
                let _ = source
                    .write(None, "bucket_unfence", move |conn| {
                        Box::pin(async move { Ok(buckets::lift_fence(conn, id).await?) })
                    })
                    .await;
                tracing::info!(id, buckets = %range, from = source.name(), to = target.name(), "bucket_range_move_cancelled");
                let left = self
                    .move_back(id, range, (&source, &target), (total, moved))
                    .await;
                let p = Progress {
                    phase: "cancelled",
                    chats_total: total,
                    chats_moved: moved,
                    error: left,
                    finished: true,
                    ..Progress::default()
                };
                self.record_range(id, p).await;
            }
            Err(stop) => {
                let reason = stop.to_string();
                tracing::warn!(id, buckets = %range, from = source.name(), to = target.name(), error = %reason, "bucket_range_move_failed");
                let _ = source
                    .write(None, "bucket_unfence", move |conn| {
                        Box::pin(async move { Ok(buckets::lift_fence(conn, id).await?) })
                    })
                    .await;
                let p = Progress {
                    phase: "failed",
                    chats_total: total,
                    chats_moved: moved,
                    error: Some(reason),
                    finished: true,
                    ..Progress::default()
                };
                self.record_range(id, p).await;
            }
        }
    }

    async fn drive_range(
        &self,
        id: u64,
        range: BucketRange,
        (source, target): (&Arc<Shard>, &Arc<Shard>),
        tally: &mut Tally,
    ) -> Result<u64, RangeStop> {
        // The source's p99s before the range move (its calls, and this
        // instance's requests of its chats outside the range): what every
        // chat's copy, and the start of every chat move, is paced against.
        let watch = Watch::buckets(source, range);
        let pacer = tokio::sync::Mutex::new(Pacer::watching(
            watch.clone(),
            watch.baseline(),
            &self.move_settings,
        ));
        let walk = Walk {
            id,
            range,
            watch,
            pacer: &pacer,
        };
        // Taken over after its flip: only the telling is left.
        if let Some(version) = self.flipped_at(range, source, target).await? {
            self.tell_every_shard(id, version, (source, target), tally)
                .await;
            return Ok(version);
        }
        if self.cancel_asked(id).await {
            return Err(RangeStop::Cancelled);
        }
        self.progress(id, "copying", tally).await;
        for pass in 1..=PASSES {
            let failed = self
                .range_pass(&walk, (source, target), None, tally)
                .await?;
            if failed.is_empty() {
                break;
            }
            tracing::info!(
                id,
                pass,
                left = failed.len(),
                "a range pass left chats behind; passing again"
            );
            tokio::time::sleep(self.move_settings.lease / 2).await;
        }
        // The fence, the last pass under it, and the flip.
        let fence_ms = self.move_settings.lease.as_millis() as u64;
        for attempt in 1..=FENCE_ATTEMPTS {
            source
                .write(None, "bucket_fence", move |conn| {
                    Box::pin(async move {
                        let mut tx = conn.begin().await?;
                        buckets::fence(&mut tx, id, (range.first, range.last), fence_ms).await?;
                        tx.commit().await.map_err(OpError::Commit)?;
                        Ok(())
                    })
                })
                .await?;
            self.progress(id, "fenced", tally).await;
            let failed = match self
                .range_pass(&walk, (source, target), Some(fence_ms), tally)
                .await
            {
                Ok(failed) => failed,
                Err(RangeStop::Lapsed) => {
                    tracing::warn!(
                        id,
                        attempt,
                        "the range's fence lapsed during its last pass; fencing again"
                    );
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Some((chat, why)) = failed.first() {
                return Err(RangeStop::Failed(format!(
                    "{} chat(s) of the range could not be moved, e.g. {chat}: {why}",
                    failed.len()
                )));
            }
            // Every chat of the range is held elsewhere now: the new version,
            // unless a cancel came first (from here on it is refused).
            let began = self
                .coordinator()
                .write(None, "bucket_move_flipping", move |conn| {
                    Box::pin(async move { Ok(buckets::begin_flip(conn, id, now()).await?) })
                })
                .await?;
            if !began {
                return Err(RangeStop::Cancelled);
            }
            if !self.refresh_bucket_map().await {
                return Err(RangeStop::Failed(
                    "a shard did not answer before the flip; run the move again".to_owned(),
                ));
            }
            let current = self.shards.router();
            let version = current.0 + 1;
            let moved = current.1.with_range(range, self.index_of(target)?);
            let ranges = serde_json::to_string(&BucketMap::of(&moved, &self.shards.names()))
                .map_err(|e| RangeStop::Failed(e.to_string()))?;
            let stored = ranges.clone();
            let flip = source
                .write(None, "bucket_flip", move |conn| {
                    Box::pin(async move {
                        let mut tx = conn.begin().await?;
                        let flip = buckets::flip(&mut tx, id, version, &stored, now()).await?;
                        if flip == Flip::Done {
                            tx.commit().await.map_err(OpError::Commit)?;
                        } else {
                            tx.rollback().await?;
                        }
                        Ok(flip)
                    })
                })
                .await?;
            match flip {
                Flip::Done => {
                    let map: BucketMap = serde_json::from_str(&ranges)
                        .map_err(|e| RangeStop::Failed(e.to_string()))?;
                    if let Err(e) = self.shards.adopt_map(version, &map) {
                        tracing::error!(error = %e, "cannot route by the bucket table just written");
                    }
                    tracing::info!(id, version, buckets = %range, "bucket_range_flipped");
                    let p = Progress {
                        phase: "flipped",
                        chats_total: tally.total.len() as u64,
                        chats_moved: tally.moved,
                        version: Some(version),
                        ..Progress::default()
                    };
                    self.record_range(id, p).await;
                    self.tell_every_shard(id, version, (source, target), tally)
                        .await;
                    return Ok(version);
                }
                Flip::Lapsed => {
                    tracing::warn!(
                        id,
                        attempt,
                        "the range's fence lapsed before its flip; fencing again"
                    );
                }
                Flip::Stale(stored) => {
                    return Err(RangeStop::Failed(format!(
                        "shard {} stores bucket table version {stored} already, newer than this instance's {}; run the move again",
                        source.name(),
                        current.0
                    )));
                }
            }
        }
        Err(RangeStop::Failed(format!(
            "the range's fence lapsed {FENCE_ATTEMPTS} times"
        )))
    }

    /// A cancelled range move's roll-back: every chat of the range that the
    /// source's marker says is on the target is moved back,
    /// `moves.concurrent_chats` at a time, each copy paced against the
    /// target's p99 (the shard the chats now leave), in passes until none
    /// is left. What is found
    /// from the source's rows, so an instance that takes the roll-back over
    /// finds the same. A description of the chats left on the target, if
    /// any could not be moved back.
    async fn move_back(
        &self,
        id: u64,
        range: BucketRange,
        (source, target): (&Arc<Shard>, &Arc<Shard>),
        (total, moved): (u64, u64),
    ) -> Option<String> {
        let cancelling = Progress {
            phase: "cancelling",
            chats_total: total,
            chats_moved: moved,
            ..Progress::default()
        };
        self.record_range(id, cancelling.clone()).await;
        let watch = Watch::buckets(target, range);
        let baseline = watch.baseline();
        let mut left = Vec::new();
        for pass in 1..=PASSES {
            left.clear();
            let mut after = String::new();
            loop {
                let from = after.clone();
                let page = match source
                    .read(None, "bucket_chats", move |conn| {
                        Box::pin(async move { Ok(buckets::chats_after(conn, &from, PAGE).await?) })
                    })
                    .await
                {
                    Ok(page) => page,
                    Err(e) => {
                        left.push(format!("the walk of {} stopped: {e}", source.name()));
                        break;
                    }
                };
                let Some((last, _)) = page.last() else {
                    break;
                };
                after.clone_from(last);
                let there: Vec<ChatId> = page
                    .into_iter()
                    .filter(|(_, moved_to)| moved_to.as_deref() == Some(target.name()))
                    .filter_map(|(chat, _)| ChatId::parse(&chat).ok())
                    .filter(|chat| (range.first..=range.last).contains(&bucket_of(chat)))
                    .collect();
                let home = source.name().to_owned();
                let mut back = futures_util::stream::iter(there)
                    .map(|chat| {
                        let (home, watch) = (home.clone(), &watch);
                        async move {
                            let outcome = self.move_and_wait(&chat, &home, (watch, baseline)).await;
                            (chat, outcome)
                        }
                    })
                    .buffer_unordered(self.move_settings.concurrent_chats.max(1));
                while let Some((chat, outcome)) = back.next().await {
                    match outcome {
                        Ok(true) => {}
                        Ok(false) => left.push(format!("{chat}: a move of it is running")),
                        Err(why) => left.push(format!("{chat}: {why}")),
                    }
                    self.record_range(id, cancelling.clone()).await;
                }
            }
            if left.is_empty() {
                return None;
            }
            tracing::info!(
                id,
                pass,
                left = left.len(),
                "chats of a cancelled range move are still on its target"
            );
            tokio::time::sleep(self.move_settings.lease / 2).await;
        }
        Some(format!(
            "{} chat(s) stay on {} (move them with move-chat), e.g. {}",
            left.len(),
            target.name(),
            left.first().map_or("", String::as_str)
        ))
    }

    fn index_of(&self, shard: &Arc<Shard>) -> Result<usize, RangeStop> {
        self.shards
            .all()
            .iter()
            .position(|s| Arc::ptr_eq(s, shard))
            .ok_or_else(|| RangeStop::Failed("the target shard is not configured".to_owned()))
    }

    /// The version of the source's newest bucket table, if that table
    /// already gives the range to the target (the move flipped before its
    /// driver died).
    async fn flipped_at(
        &self,
        range: BucketRange,
        source: &Arc<Shard>,
        target: &Arc<Shard>,
    ) -> Result<Option<u64>, RangeStop> {
        let newest = source
            .read(None, "bucket_map_read", |conn| {
                Box::pin(async move { Ok(buckets::latest(conn).await?) })
            })
            .await?;
        let Some((version, ranges)) = newest else {
            return Ok(None);
        };
        let Ok(map) = serde_json::from_str::<BucketMap>(&ranges) else {
            return Ok(None);
        };
        let Ok(router) = map.router(&self.shards.names()) else {
            return Ok(None);
        };
        let owner = router.owner_of_range(range);
        Ok((owner == Some(self.index_of(target)?)).then_some(version))
    }

    /// Stores the source's newest version on every other shard (each tried
    /// until it answers, while the move's lease is kept).
    async fn tell_every_shard(
        &self,
        id: u64,
        version: u64,
        (source, target): (&Arc<Shard>, &Arc<Shard>),
        tally: &Tally,
    ) {
        let newest = source
            .read(None, "bucket_map_read", |conn| {
                Box::pin(async move { Ok(buckets::latest(conn).await?) })
            })
            .await;
        let Ok(Some((v, ranges))) = newest else {
            return;
        };
        if v != version {
            return;
        }
        // The target first: until it stores the version, it would send a
        // new chat of the range back to the source.
        let mut shards: Vec<&Arc<Shard>> = self.shards.all().iter().collect();
        shards.sort_by_key(|s| !Arc::ptr_eq(s, target));
        for shard in shards {
            if Arc::ptr_eq(shard, source) {
                continue;
            }
            let mut pause = Duration::from_millis(100);
            loop {
                let r = ranges.clone();
                let stored = shard
                    .write(None, "bucket_map_store", move |conn| {
                        Box::pin(async move { Ok(buckets::store(conn, version, &r, now()).await?) })
                    })
                    .await;
                match stored {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(shard = shard.name(), error = %crate::error::chain(&e), "cannot store the new bucket table there yet; retrying");
                        self.progress(id, "flipped", tally).await;
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }

    /// One walk over the source's chats: the range's live chats are moved
    /// (`moves.concurrent_chats` at once), and the target gets a marker for
    /// each chat of the range held by a third shard. Under a fence
    /// (`fenced`: its length), the fence is renewed as the walk goes, and a
    /// lapse stops the walk. The chats whose move failed, with the reason.
    async fn range_pass(
        &self,
        walk: &Walk<'_>,
        (source, target): (&Arc<Shard>, &Arc<Shard>),
        fenced: Option<u64>,
        tally: &mut Tally,
    ) -> Result<Vec<(String, String)>, RangeStop> {
        let (id, range) = (walk.id, walk.range);
        let phase = if fenced.is_some() {
            "fenced"
        } else {
            "copying"
        };
        let mut failed = Vec::new();
        let cancelled = AtomicBool::new(false);
        let mut after = String::new();
        loop {
            let from = after.clone();
            let page = source
                .read(None, "bucket_chats", move |conn| {
                    Box::pin(async move { Ok(buckets::chats_after(conn, &from, PAGE).await?) })
                })
                .await?;
            let Some((last, _)) = page.last() else {
                break;
            };
            after.clone_from(last);
            let mut live = Vec::new();
            let mut markers = Vec::new();
            for (chat, moved_to) in page {
                let Ok(chat) = ChatId::parse(&chat) else {
                    continue;
                };
                let b = bucket_of(&chat);
                if b < range.first || b > range.last {
                    continue;
                }
                tally.total.insert(chat.to_string());
                match moved_to {
                    None => live.push(chat),
                    Some(to) if to != target.name() => markers.push((chat.to_string(), to)),
                    Some(_) => {}
                }
            }
            if !markers.is_empty() {
                target
                    .write(None, "bucket_markers", move |conn| {
                        Box::pin(async move {
                            let mut tx = conn.begin().await?;
                            for (chat, to) in &markers {
                                buckets::insert_marker(&mut tx, chat, to, now()).await?;
                            }
                            tx.commit().await.map_err(OpError::Commit)?;
                            Ok(())
                        })
                    })
                    .await?;
            }
            let to = target.name().to_owned();
            let cancelled = &cancelled;
            let mut moves = futures_util::stream::iter(live)
                .map(|chat| {
                    let to = to.clone();
                    async move {
                        if cancelled.load(Ordering::Relaxed) {
                            return (chat, Ok(None));
                        }
                        // Chat moves start one pause apart, the pause paced
                        // by the source's p99s against the range's baseline,
                        // which each chat's copy is paced against too.
                        // Under the fence new chats wait: no pause.
                        let baseline = {
                            let mut pacer = walk.pacer.lock().await;
                            if fenced.is_none() {
                                let pause = pacer.pace(&self.move_settings, 0);
                                tokio::time::sleep(pause).await;
                            }
                            pacer.baseline()
                        };
                        let outcome = self
                            .move_and_wait(&chat, &to, (&walk.watch, baseline))
                            .await;
                        (chat, outcome.map(Some))
                    }
                })
                .buffer_unordered(self.move_settings.concurrent_chats.max(1));
            while let Some((chat, outcome)) = moves.next().await {
                match outcome {
                    Ok(None) => {}
                    Ok(Some(true)) => tally.moved += 1,
                    Ok(Some(false)) => {
                        failed.push((chat.to_string(), "a move of it is running".to_owned()))
                    }
                    Err(why) => failed.push((chat.to_string(), why)),
                }
                if let Some(ms) = fenced {
                    self.renew_fence(source, id, ms).await?;
                }
                self.progress(id, phase, tally).await;
                // A cancel lets the chat moves under way end (a move cut
                // short would wait for its lease) and starts no more.
                if !cancelled.load(Ordering::Relaxed) && self.cancel_asked(id).await {
                    cancelled.store(true, Ordering::Relaxed);
                }
            }
            if cancelled.load(Ordering::Relaxed) {
                return Err(RangeStop::Cancelled);
            }
            if let Some(ms) = fenced {
                self.renew_fence(source, id, ms).await?;
            }
            self.progress(id, phase, tally).await;
        }
        Ok(failed)
    }

    async fn renew_fence(&self, source: &Arc<Shard>, id: u64, ms: u64) -> Result<(), RangeStop> {
        let held = source
            .write(None, "bucket_fence_renew", move |conn| {
                Box::pin(async move { Ok(buckets::renew_fence(conn, id, ms).await?) })
            })
            .await?;
        if held { Ok(()) } else { Err(RangeStop::Lapsed) }
    }

    /// Whether a cancel was asked for (a record that cannot be read is not
    /// a cancel: the move goes on).
    async fn cancel_asked(&self, id: u64) -> bool {
        let asked = self
            .coordinator()
            .read(None, "bucket_move_cancelled", move |conn| {
                Box::pin(async move { Ok(buckets::cancel_requested(conn, id).await?) })
            })
            .await;
        matches!(asked, Ok(true))
    }

    async fn progress(&self, id: u64, phase: &'static str, tally: &Tally) {
        let p = Progress {
            phase,
            chats_total: tally.total.len() as u64,
            chats_moved: tally.moved,
            ..Progress::default()
        };
        self.record_range(id, p).await;
    }

    async fn record_range(&self, id: u64, p: Progress) {
        let written = self
            .coordinator()
            .write(None, "bucket_move_progress", move |conn| {
                Box::pin(async move { Ok(buckets::set_progress(conn, id, &p, now()).await?) })
            })
            .await;
        if let Err(e) = written {
            tracing::warn!(id, error = %crate::error::chain(&e), "cannot record a bucket-range move's progress");
        }
    }
}
