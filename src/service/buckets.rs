//! Bucket ranges that move between shards online (docs/moving-chats.md,
//! "Bucket ranges"): the versioned bucket table every instance follows, and
//! the range move that splits a shard.
//!
//! The configuration's `buckets` are version 1. A range move gives a range
//! to another shard as a range (`range_move.rs`): it copies the range's
//! chats in bulk and catches up in passes, fences the whole range (its
//! writes and the creation of its chats) for a last pass, stores version
//! N + 1 and every chat's tombstone on the source in one transaction (the
//! flip), makes the copies live, then stores the version on every other
//! shard. Instances
//! read the newest version every `moves.map_poll_ms`; one that routes by an
//! older version meets the source's tombstones (existing chats) or its
//! bucket table (new chats), which name the new owner.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::move_plan::{Phase, Unit};
use super::{ChatService, ServiceError, now};
use crate::routing::{BucketMap, BucketRange};
use crate::shard::Shard;
use crate::storage::buckets::{self, BucketMoveRow, Progress};

/// What a range move measured (stored with its record as JSON).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RangeStats {
    /// Rows written to the target: chat rows, members, messages and events.
    pub rows_copied: u64,
    /// Chats copied whole (a chat copied again counts again).
    pub chats_copied: u64,
    /// Revisions replayed by the catch-up passes.
    pub revisions_replayed: u64,
    /// The first pass, the bulk copy: its seconds and rates.
    pub copy_seconds: f64,
    pub rows_per_second: f64,
    pub chats_per_second: f64,
    /// Passes after the bulk copy, including the one under the fence.
    pub pass_count: u64,
    /// The last 20 catch-up passes, oldest first.
    pub passes: Vec<PassStats>,
    /// `false` once the catch-up passes stopped shrinking: the range
    /// changes about as fast as it is copied.
    pub converging: bool,
    /// Fences set (a lapsed one is set again).
    pub fences: u32,
    /// From the last fence to the flip: how long the range's writes were
    /// held.
    pub fence_ms: Option<u64>,
    /// Where the last fence's time went, up to the flip.
    pub fence_steps: Option<FenceSteps>,
    /// The p99 of the source's other chats (this instance's requests, else
    /// the shard's calls) before the move, the highest 2 s window during
    /// the copy, and after the clean-up.
    pub p99_before_ms: Option<f64>,
    pub p99_during_ms: Option<f64>,
    pub p99_after_ms: Option<f64>,
    /// The digest check of every chat in step with its copy, before the
    /// fence: how long it took and the chats it compared.
    pub verify_ms: Option<u64>,
    pub chats_verified: u64,
    /// Seconds from the start of the copy to the flip, and the clean-up of
    /// the source after it.
    pub flip_seconds: Option<f64>,
    pub clean_seconds: Option<f64>,
    /// The bulk copy (the first pass) as a pass: its reads, writes and
    /// pauses.
    pub bulk: Option<PassStats>,
}

/// The steps of a range's last fence, in milliseconds: its transaction
/// (the range's writes wait on its row locks already, so it is not part of
/// `fence_ms`), the diff under it, the last pass, the check that the copy
/// is whole, and the flip (its record on the coordinator, the bucket tables
/// read, the source's transaction).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FenceSteps {
    pub set_ms: u64,
    pub diff_ms: u64,
    pub pass_ms: u64,
    pub check_ms: u64,
    pub flip_ms: u64,
    /// After the flip: the copies made live on the target (the range's
    /// writes reach them from then on).
    pub live_ms: u64,
}

/// One catch-up pass.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PassStats {
    /// Chats copied whole or caught up.
    pub chats: u64,
    pub revisions: u64,
    pub rows: u64,
    pub ms: u64,
    /// Reading both sides' chats to decide the pass.
    pub diff_ms: u64,
    /// The source's reads and the target's writes, each added up (they
    /// overlap: the next batch is read while one is written).
    pub read_ms: u64,
    pub write_ms: u64,
    /// The pacer's pauses.
    pub pause_ms: u64,
}

/// A range move as recorded on the coordinator.
#[derive(Debug, Clone)]
pub struct BucketMoveStatus {
    pub id: u64,
    /// The range, `first-last`.
    pub buckets: String,
    pub source: String,
    pub target: String,
    /// The phase's name (see [`Phase::name`]).
    pub phase: String,
    /// The range's chats found on the source.
    pub chats_total: u64,
    /// The range's chats this move moved.
    pub chats_moved: u64,
    /// The version of the bucket table the move made, once flipped.
    pub version: Option<u64>,
    pub error: Option<String>,
    /// A cancel was asked for; the move stops after the chat moves under
    /// way and moves back what it moved.
    pub cancel_requested: bool,
    /// What the move measured so far.
    pub stats: Option<RangeStats>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

impl BucketMoveStatus {
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
            stats: row
                .stats
                .as_deref()
                .and_then(|s| serde_json::from_str(s).ok()),
            created_at: crate::storage::utc(row.created_at),
            updated_at: crate::storage::utc(row.updated_at),
        }
    }
}

/// The bucket table an instance routes by.
#[derive(Debug, Clone)]
pub struct BucketTable {
    /// 1: the configuration's `buckets`; higher: written by range moves.
    pub version: u64,
    /// Every configured shard and the ranges it owns.
    pub shards: Vec<ShardRanges>,
}

/// The bucket ranges one shard owns.
#[derive(Debug, Clone)]
pub struct ShardRanges {
    pub shard: String,
    /// Each range as `first-last`.
    pub buckets: Vec<String>,
}

impl ChatService {
    /// The bucket table this instance routes by.
    pub fn bucket_table(&self) -> BucketTable {
        let current = self.shards.router();
        let names = self.shards.names();
        let map = BucketMap::of(&current.1, &names);
        BucketTable {
            version: current.0,
            shards: names
                .iter()
                .map(|name| ShardRanges {
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
    pub(super) fn coordinator(&self) -> &Arc<Shard> {
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
    ) -> Result<BucketMoveStatus, ServiceError> {
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
    pub async fn bucket_moves(&self) -> Vec<BucketMoveStatus> {
        self.coordinator()
            .read(None, "bucket_moves", |conn| {
                Box::pin(async move { Ok(buckets::list_moves(conn, 1000).await?) })
            })
            .await
            .map(|rows| rows.into_iter().map(BucketMoveStatus::from_row).collect())
            .unwrap_or_default()
    }

    /// One range move.
    pub async fn get_bucket_move(&self, id: u64) -> Option<BucketMoveStatus> {
        self.coordinator()
            .read(None, "bucket_move", move |conn| {
                Box::pin(async move { Ok(buckets::get_move(conn, id).await?) })
            })
            .await
            .ok()
            .flatten()
            .map(BucketMoveStatus::from_row)
    }

    /// Asks a running range move to stop (`DELETE /v1/admin/bucket-moves/{id}`),
    /// allowed until its flip begins: the driver (or the instance that takes
    /// it over) stops within a batch, lifts the fences, drops the copies on
    /// the target, and ends `cancelled`. The bucket table and the source do
    /// not change.
    pub async fn cancel_bucket_move(&self, id: u64) -> Result<BucketMoveStatus, ServiceError> {
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
            .map(BucketMoveStatus::from_row)
            .ok_or_else(|| ServiceError::MoveNotFound { id: id.to_string() })?;
        // Asking again while the move winds down is answered the same.
        let ended = Phase::parse(Unit::Range, &view.phase).is_some_and(Phase::is_terminal);
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
                    phase: Phase::Failed.name(Unit::Range).unwrap_or("failed"),
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
}
