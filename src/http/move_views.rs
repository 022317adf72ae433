//! The admin API's JSON views of moves and of the bucket table, and their
//! OpenAPI schemas (`MoveView`, `MovedChat`, `BucketMoveView`,
//! `BucketTableView`, `ShardBuckets`).
//!
//! Each view is built from the service's own record of the same thing by a
//! `From` conversion that copies fields and never decides anything: phases,
//! lags and progress are the service's. The schema names and fields are part
//! of the published document and do not change with the service's structs.
//! Nothing here reads a shard or knows a status code.

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use crate::service::buckets::{BucketMoveStatus, BucketTable, PassStats, RangeStats, ShardRanges};
use crate::service::moves::{MoveStatus, RelocatedChat};

/// A move as the admin view shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
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
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<MoveStatus> for MoveView {
    fn from(m: MoveStatus) -> Self {
        Self {
            id: m.id,
            chat_id: m.chat_id,
            source: m.source,
            target: m.target,
            phase: m.phase,
            copied_revision: m.copied_revision,
            rows_copied: m.rows_copied,
            lag_revisions: m.lag_revisions,
            error: m.error,
            cancel_requested: m.cancel_requested,
            started_by: m.started_by,
            created_at: m.created_at,
            updated_at: m.updated_at,
        }
    }
}

/// A chat that lives away from its home shard.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MovedChat {
    pub chat_id: String,
    /// The shard its bucket gives it.
    pub home: String,
    /// The shard that holds it.
    pub shard: String,
}

impl From<RelocatedChat> for MovedChat {
    fn from(c: RelocatedChat) -> Self {
        Self {
            chat_id: c.chat_id,
            home: c.home,
            shard: c.shard,
        }
    }
}

/// A range move as the admin view shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BucketMoveView {
    pub id: u64,
    /// The range, `first-last`.
    #[schema(example = "256-383")]
    pub buckets: String,
    pub source: String,
    pub target: String,
    /// `requested`, `copying` (the bulk copy, then catch-up passes),
    /// `fenced` (the range's writes and new chats held for the last pass),
    /// `flipping` (from here a cancel is refused), `flipped` (the new table
    /// and the tombstones are on the source; the other shards are being
    /// told, and the source cleaned), `done`, `failed` (with `error`; the
    /// target's copies are dropped and the range stays where it was),
    /// `cancelling` (the copies are being dropped) or `cancelled` (with
    /// `error` if some could not be).
    pub phase: String,
    /// The range's chats found on the source (live or held elsewhere).
    pub chats_total: u64,
    /// Chats copied whole to the target so far (a chat copied again
    /// counts again).
    pub chats_moved: u64,
    /// What the move measured so far: rows and chats copied and their
    /// rates, the catch-up passes, the fence, the source's other chats'
    /// p99 before, during and after.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<RangeStatsView>,
    /// The version of the bucket table the move made, once flipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A cancel was asked for; the move stops within a batch, lifts its
    /// fences and drops its copies on the target.
    pub cancel_requested: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<BucketMoveStatus> for BucketMoveView {
    fn from(m: BucketMoveStatus) -> Self {
        Self {
            id: m.id,
            buckets: m.buckets,
            source: m.source,
            target: m.target,
            phase: m.phase,
            chats_total: m.chats_total,
            chats_moved: m.chats_moved,
            stats: m.stats.map(RangeStatsView::from),
            version: m.version,
            error: m.error,
            cancel_requested: m.cancel_requested,
            created_at: m.created_at,
            updated_at: m.updated_at,
        }
    }
}

/// What a range move measured.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RangeStatsView {
    /// Rows written to the target (chat rows, members, messages, events).
    pub rows_copied: u64,
    /// Chats copied whole.
    pub chats_copied: u64,
    /// Revisions replayed by the catch-up passes.
    pub revisions_replayed: u64,
    /// The bulk copy (the first pass): seconds, rows and chats per second.
    pub copy_seconds: f64,
    pub rows_per_second: f64,
    pub chats_per_second: f64,
    /// Catch-up passes so far, the fenced one included.
    pub pass_count: u64,
    /// The last 20 catch-up passes, oldest first.
    pub passes: Vec<PassView>,
    /// `false` once the passes stopped shrinking (the range changes about
    /// as fast as it is copied); after 60 passes the move fails.
    pub converging: bool,
    /// Fences set (a lapsed fence is set again, three times at most).
    pub fences: u32,
    /// How long the range's writes were held, from the last fence to the
    /// flip.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fence_ms: Option<u64>,
    /// Where the last fence's time went, up to the flip.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fence_steps: Option<FenceStepsView>,
    /// The source's other chats' p99 (ms) before the move, the highest
    /// 2 s window during its copy, and after its clean-up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_before_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_during_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_after_ms: Option<f64>,
    /// The digest check of the chats in step before the fence: its time
    /// (ms) and the chats it compared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_ms: Option<u64>,
    pub chats_verified: u64,
    /// Seconds from the start of the copy to the flip (the range's writes
    /// go to the target from then on), and of the source's clean-up after.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flip_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clean_seconds: Option<f64>,
    /// The bulk copy (the first pass), timed as a pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulk: Option<PassView>,
}

/// The steps of a range's last fence (ms each): its transaction (the
/// range's writes already wait on its row locks; not in `fenceMs`), the
/// diff under it, the last pass, the check that the copy is whole, and the
/// flip (its record, the bucket tables read, the source's transaction).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FenceStepsView {
    pub set_ms: u64,
    pub diff_ms: u64,
    pub pass_ms: u64,
    pub check_ms: u64,
    pub flip_ms: u64,
    /// After the flip: the copies made live on the target.
    pub live_ms: u64,
}

/// One catch-up pass of a range move.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PassView {
    /// Chats copied whole or caught up.
    pub chats: u64,
    pub revisions: u64,
    pub rows: u64,
    pub ms: u64,
    /// Reading both sides' chats to decide the pass (ms).
    pub diff_ms: u64,
    /// The source's reads and the target's writes, each added up (ms);
    /// they overlap, as the next batch is read while one is written.
    pub read_ms: u64,
    pub write_ms: u64,
    /// The pacer's pauses (ms).
    pub pause_ms: u64,
}

impl From<RangeStats> for RangeStatsView {
    fn from(s: RangeStats) -> Self {
        Self {
            rows_copied: s.rows_copied,
            chats_copied: s.chats_copied,
            revisions_replayed: s.revisions_replayed,
            copy_seconds: s.copy_seconds,
            rows_per_second: s.rows_per_second,
            chats_per_second: s.chats_per_second,
            pass_count: s.pass_count,
            passes: s.passes.into_iter().map(PassView::from).collect(),
            bulk: s.bulk.map(PassView::from),
            flip_seconds: s.flip_seconds,
            clean_seconds: s.clean_seconds,
            converging: s.converging,
            fences: s.fences,
            fence_ms: s.fence_ms,
            fence_steps: s.fence_steps.map(|f| FenceStepsView {
                set_ms: f.set_ms,
                diff_ms: f.diff_ms,
                pass_ms: f.pass_ms,
                check_ms: f.check_ms,
                flip_ms: f.flip_ms,
                live_ms: f.live_ms,
            }),
            p99_before_ms: s.p99_before_ms,
            p99_during_ms: s.p99_during_ms,
            p99_after_ms: s.p99_after_ms,
            verify_ms: s.verify_ms,
            chats_verified: s.chats_verified,
        }
    }
}

impl From<PassStats> for PassView {
    fn from(p: PassStats) -> Self {
        Self {
            chats: p.chats,
            revisions: p.revisions,
            rows: p.rows,
            ms: p.ms,
            diff_ms: p.diff_ms,
            read_ms: p.read_ms,
            write_ms: p.write_ms,
            pause_ms: p.pause_ms,
        }
    }
}

/// The bucket table an instance routes by.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BucketTableView {
    /// 1: the configuration's `buckets`; higher: written by range moves.
    pub version: u64,
    /// Every configured shard and the ranges it owns.
    pub shards: Vec<ShardBuckets>,
}

impl From<BucketTable> for BucketTableView {
    fn from(t: BucketTable) -> Self {
        Self {
            version: t.version,
            shards: t.shards.into_iter().map(ShardBuckets::from).collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardBuckets {
    pub shard: String,
    #[schema(example = json!(["0-255"]))]
    pub buckets: Vec<String>,
}

impl From<ShardRanges> for ShardBuckets {
    fn from(s: ShardRanges) -> Self {
        Self {
            shard: s.shard,
            buckets: s.buckets,
        }
    }
}
