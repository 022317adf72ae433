//! The statements of the versioned bucket table and of range moves
//! (docs/moving-chats.md, "Bucket ranges"): the stored versions, the fence
//! that stops chats of a range being created on its source, the check every
//! chat creation makes, and the range moves' records.

use chrono::NaiveDateTime;
use sqlx::MySqlConnection;

/// The newest version of the bucket table this shard stores, with its
/// ranges (JSON); `None`: only the configuration's (version 1).
pub async fn latest(conn: &mut MySqlConnection) -> sqlx::Result<Option<(u64, String)>> {
    sqlx::query_as("SELECT version, ranges FROM bucket_map ORDER BY version DESC LIMIT 1")
        .fetch_optional(conn)
        .await
}

/// The newest version stored here (0: none).
pub async fn latest_version(conn: &mut MySqlConnection) -> sqlx::Result<u64> {
    let v: Option<u64> = sqlx::query_scalar("SELECT MAX(version) FROM bucket_map")
        .fetch_one(conn)
        .await?;
    Ok(v.unwrap_or(0))
}

/// Stores a version, unless this shard has it already.
pub async fn store(
    conn: &mut MySqlConnection,
    version: u64,
    ranges: &str,
    now: NaiveDateTime,
) -> sqlx::Result<()> {
    sqlx::query("INSERT IGNORE INTO bucket_map (version, ranges, created_at) VALUES (?, ?, ?)")
        .bind(version)
        .bind(ranges)
        .bind(now)
        .execute(conn)
        .await?;
    Ok(())
}

/// Whether this shard may create a chat of `bucket`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateCheck {
    Allowed,
    /// A range move's last pass is running over the bucket: retry shortly.
    Fenced,
    /// The newest bucket table gives the bucket to the shard named.
    Owner(String),
}

/// The check a chat creation makes before it inserts (inside its
/// transaction): the guard row's lock shared, so a range fence being set
/// waits for this creation to commit (or this creation sees the fence);
/// then the fence, then the owner of the bucket by this shard's newest
/// bucket table.
pub async fn check_create(
    conn: &mut MySqlConnection,
    bucket: u16,
    this_shard: &str,
) -> sqlx::Result<CreateCheck> {
    sqlx::query("SELECT name FROM move_guard WHERE name = 'buckets' LOCK IN SHARE MODE")
        .fetch_optional(&mut *conn)
        .await?;
    let fenced: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM bucket_fence \
         WHERE first_bucket <= ? AND last_bucket >= ? AND fenced_until > NOW(6)",
    )
    .bind(bucket)
    .bind(bucket)
    .fetch_one(&mut *conn)
    .await?;
    if fenced > 0 {
        return Ok(CreateCheck::Fenced);
    }
    let Some((version, ranges)) = latest(conn).await? else {
        return Ok(CreateCheck::Allowed);
    };
    let map: crate::routing::BucketMap = serde_json::from_str(&ranges)
        .map_err(|e| sqlx::Error::Decode(format!("bucket_map version {version}: {e}").into()))?;
    for (shard, ranges) in &map.0 {
        let owns = ranges.iter().any(|r| {
            crate::routing::BucketRange::parse(r)
                .is_ok_and(|r| r.first <= bucket && bucket <= r.last)
        });
        if owns {
            return Ok(if shard == this_shard {
                CreateCheck::Allowed
            } else {
                CreateCheck::Owner(shard.clone())
            });
        }
    }
    Ok(CreateCheck::Allowed)
}

/// Fences a range on its source (inside the caller's transaction, under
/// the guard row's exclusive lock): from the commit on, no chat of the
/// range is created here until the fence lapses or is lifted.
pub async fn fence(
    conn: &mut MySqlConnection,
    move_id: u64,
    (first, last): (u16, u16),
    ms: u64,
) -> sqlx::Result<()> {
    sqlx::query("SELECT name FROM move_guard WHERE name = 'buckets' FOR UPDATE")
        .fetch_optional(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM bucket_fence WHERE move_id = ?")
        .bind(move_id)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO bucket_fence (move_id, first_bucket, last_bucket, fenced_until) \
         VALUES (?, ?, ?, DATE_ADD(NOW(6), INTERVAL ? MICROSECOND))",
    )
    .bind(move_id)
    .bind(first)
    .bind(last)
    .bind(ms * 1000)
    .execute(conn)
    .await?;
    Ok(())
}

/// Extends a fence that still holds; `false` when it lapsed (chats of the
/// range may have been created since: the last pass must start again).
pub async fn renew_fence(conn: &mut MySqlConnection, move_id: u64, ms: u64) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE bucket_fence SET fenced_until = DATE_ADD(NOW(6), INTERVAL ? MICROSECOND) \
         WHERE move_id = ? AND fenced_until > NOW(6)",
    )
    .bind(ms * 1000)
    .bind(move_id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Lifts a range's fence.
pub async fn lift_fence(conn: &mut MySqlConnection, move_id: u64) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM bucket_fence WHERE move_id = ?")
        .bind(move_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// How the flip at the source ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flip {
    /// The new version is stored and the fence lifted.
    Done,
    /// The fence lapsed: chats may have been created since the last pass.
    Lapsed,
    /// This shard stores that version (or a newer one) already.
    Stale(u64),
}

/// The flip at the source (inside the caller's transaction, under the guard
/// row's exclusive lock): the new version stored and the fence lifted, only
/// while the fence still holds.
pub async fn flip(
    conn: &mut MySqlConnection,
    move_id: u64,
    version: u64,
    ranges: &str,
    now: NaiveDateTime,
) -> sqlx::Result<Flip> {
    sqlx::query("SELECT name FROM move_guard WHERE name = 'buckets' FOR UPDATE")
        .fetch_optional(&mut *conn)
        .await?;
    let live: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM bucket_fence WHERE move_id = ? AND fenced_until > NOW(6)",
    )
    .bind(move_id)
    .fetch_one(&mut *conn)
    .await?;
    if live == 0 {
        return Ok(Flip::Lapsed);
    }
    let stored = latest_version(&mut *conn).await?;
    if stored >= version {
        return Ok(Flip::Stale(stored));
    }
    store(&mut *conn, version, ranges, now).await?;
    lift_fence(conn, move_id).await?;
    Ok(Flip::Done)
}

/// The chats after `after` on this shard, in id order, with their markers.
pub async fn chats_after(
    conn: &mut MySqlConnection,
    after: &str,
    limit: u32,
) -> sqlx::Result<Vec<(String, Option<String>)>> {
    sqlx::query_as("SELECT chat_id, moved_to FROM chat WHERE chat_id > ? ORDER BY chat_id LIMIT ?")
        .bind(after)
        .bind(limit)
        .fetch_all(conn)
        .await
}

/// Gives a chat held elsewhere a marker row here (inside the caller's
/// transaction), naming `to`, unless this shard has a row of it already.
pub async fn insert_marker(
    conn: &mut MySqlConnection,
    chat_id: &str,
    to: &str,
    now: NaiveDateTime,
) -> sqlx::Result<()> {
    let exists: Option<String> =
        sqlx::query_scalar("SELECT chat_id FROM chat WHERE chat_id = ? FOR UPDATE")
            .bind(chat_id)
            .fetch_optional(&mut *conn)
            .await?;
    if exists.is_none() {
        super::chats::insert(&mut *conn, chat_id, 1, now).await?;
        super::moves::set_marker(conn, chat_id, Some(to)).await?;
    }
    Ok(())
}

/// A range move's record (on the first configured shard).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BucketMoveRow {
    pub id: u64,
    pub first_bucket: u16,
    pub last_bucket: u16,
    pub source: String,
    pub target: String,
    pub phase: String,
    pub chats_total: u64,
    pub chats_moved: u64,
    pub version: Option<u64>,
    pub error: Option<String>,
    /// 1 once a cancel was asked for (`DELETE /v1/admin/bucket-moves/{id}`).
    pub cancel_requested: u8,
    /// What the move measured, as JSON.
    pub stats: Option<String>,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

const SELECT_MOVE: &str = "SELECT id, first_bucket, last_bucket, source, target, phase, chats_total, chats_moved, \
     version, error, cancel_requested, stats, created_at, updated_at FROM bucket_move";

/// Records a new range move; a unique violation means one is running.
pub async fn insert_move(
    conn: &mut MySqlConnection,
    (first, last): (u16, u16),
    source: &str,
    target: &str,
    now: NaiveDateTime,
) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "INSERT INTO bucket_move (first_bucket, last_bucket, source, target, phase, active, created_at, updated_at) \
         VALUES (?, ?, ?, ?, 'requested', 1, ?, ?)",
    )
    .bind(first)
    .bind(last)
    .bind(source)
    .bind(target)
    .bind(now)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(done.last_insert_id())
}

/// What a range move's driver records as it goes (which renews its lease).
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub phase: &'static str,
    pub chats_total: u64,
    pub chats_moved: u64,
    pub version: Option<u64>,
    pub error: Option<String>,
    pub finished: bool,
    /// What the move measured, as JSON (kept when `None`).
    pub stats: Option<String>,
}

pub async fn set_progress(
    conn: &mut MySqlConnection,
    id: u64,
    p: &Progress,
    now: NaiveDateTime,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE bucket_move SET phase = ?, chats_total = ?, chats_moved = ?, \
         version = COALESCE(?, version), stats = COALESCE(?, stats), error = ?, updated_at = ?, \
         active = CASE WHEN ? THEN NULL ELSE active END WHERE id = ? AND active = 1",
    )
    .bind(p.phase)
    .bind(p.chats_total)
    .bind(p.chats_moved)
    .bind(p.version)
    .bind(p.stats.as_deref())
    .bind(p.error.as_deref())
    .bind(now)
    .bind(p.finished)
    .bind(id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Asks a running range move to stop: only before its flip began
/// (`requested`, `copying`, `fenced`); whether the request was recorded now.
pub async fn request_cancel(
    conn: &mut MySqlConnection,
    id: u64,
    now: NaiveDateTime,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE bucket_move SET cancel_requested = 1, updated_at = ? \
         WHERE id = ? AND active = 1 AND cancel_requested = 0 \
         AND phase IN ('requested', 'copying', 'fenced')",
    )
    .bind(now)
    .bind(id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Whether a cancel was asked for (`false` when the record cannot be found).
pub async fn cancel_requested(conn: &mut MySqlConnection, id: u64) -> sqlx::Result<bool> {
    super::moves::cancel_flag(conn, "bucket_move", id).await
}

/// Marks a range move `flipping` unless a cancel came first (`false`): from
/// here a cancel is refused, until the flip is done or the move fences again.
pub async fn begin_flip(
    conn: &mut MySqlConnection,
    id: u64,
    now: NaiveDateTime,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE bucket_move SET phase = 'flipping', updated_at = ? \
         WHERE id = ? AND active = 1 AND cancel_requested = 0",
    )
    .bind(now)
    .bind(id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Renews a running range move's lease (its record's `updated_at`).
pub async fn touch(conn: &mut MySqlConnection, id: u64, now: NaiveDateTime) -> sqlx::Result<()> {
    sqlx::query("UPDATE bucket_move SET updated_at = ? WHERE id = ? AND active = 1")
        .bind(now)
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// The running range moves whose record has not changed for `seconds`.
pub async fn abandoned(
    conn: &mut MySqlConnection,
    seconds: u64,
) -> sqlx::Result<Vec<BucketMoveRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT_MOVE} WHERE active = 1 AND updated_at < DATE_SUB(NOW(6), INTERVAL ? SECOND)"
    )))
    .bind(seconds)
    .fetch_all(conn)
    .await
}

/// Takes an abandoned range move over, only if its record is still as
/// `seen`.
pub async fn claim(
    conn: &mut MySqlConnection,
    id: u64,
    seen: NaiveDateTime,
    now: NaiveDateTime,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE bucket_move SET updated_at = ? WHERE id = ? AND active = 1 AND updated_at = ?",
    )
    .bind(now)
    .bind(id)
    .bind(seen)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn get_move(conn: &mut MySqlConnection, id: u64) -> sqlx::Result<Option<BucketMoveRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!("{SELECT_MOVE} WHERE id = ?")))
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// The range moves, newest first.
pub async fn list_moves(
    conn: &mut MySqlConnection,
    limit: u32,
) -> sqlx::Result<Vec<BucketMoveRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT_MOVE} ORDER BY id DESC LIMIT ?"
    )))
    .bind(limit)
    .fetch_all(conn)
    .await
}
