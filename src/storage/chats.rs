//! `chat` and `chat_member_count`.

use chrono::NaiveDateTime;
use sqlx::MySqlConnection;

/// A chat with its member count.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ChatRow {
    pub chat_id: String,
    pub max_members: u32,
    pub revision: u64,
    pub created_at: NaiveDateTime,
    pub member_count: u32,
    /// The shard that holds the chat, when it is not this one
    /// (docs/moving-chats.md).
    pub moved_to: Option<String>,
    /// 1 while a move's fence holds the chat's writes here.
    pub fenced: i64,
    /// The lowest revision still stored (docs/event-log.md).
    pub first_revision: u64,
}

const SELECT_CHAT: &str = "SELECT c.chat_id, c.max_members, c.revision, c.created_at, n.member_count, c.moved_to, \
     CAST(COALESCE(c.fenced_until > NOW(6), 0) AS SIGNED) AS fenced, c.first_revision \
     FROM chat c JOIN chat_member_count n ON n.chat_id = c.chat_id WHERE c.chat_id = ?";

/// Reads a chat without locking it.
pub async fn get(conn: &mut MySqlConnection, chat_id: &str) -> sqlx::Result<Option<ChatRow>> {
    sqlx::query_as(SELECT_CHAT)
        .bind(chat_id)
        .fetch_optional(conn)
        .await
}

/// Reads and locks a chat and its count row until the transaction ends. Every
/// write transaction of a chat starts here, so writers of one chat run one at a
/// time and see each other's committed work.
pub async fn lock(conn: &mut MySqlConnection, chat_id: &str) -> sqlx::Result<Option<ChatRow>> {
    sqlx::query_as(
        "SELECT c.chat_id, c.max_members, c.revision, c.created_at, n.member_count, c.moved_to, \
         CAST(COALESCE(c.fenced_until > NOW(6), 0) AS SIGNED) AS fenced, c.first_revision \
         FROM chat c JOIN chat_member_count n ON n.chat_id = c.chat_id WHERE c.chat_id = ? \
         FOR UPDATE",
    )
    .bind(chat_id)
    .fetch_optional(conn)
    .await
}

/// The bucket stored with a chat row: the routing bucket of its id.
pub fn bucket_of(chat_id: &str) -> u16 {
    crate::routing::bucket_of_key(crate::routing::key_of(chat_id))
}

/// Fills the bucket of up to `limit` chat rows made before the column
/// existed (migration `20261207000010`); the rows filled (0: none left).
pub async fn fill_buckets(conn: &mut MySqlConnection, limit: u32) -> sqlx::Result<u64> {
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT chat_id FROM chat WHERE bucket IS NULL LIMIT ?")
            .bind(limit)
            .fetch_all(&mut *conn)
            .await?;
    if ids.is_empty() {
        return Ok(0);
    }
    let mut q = sqlx::QueryBuilder::new("UPDATE chat SET bucket = CASE chat_id ");
    for id in &ids {
        q.push(" WHEN ")
            .push_bind(id)
            .push(" THEN ")
            .push_bind(bucket_of(id));
    }
    q.push(" END WHERE bucket IS NULL AND chat_id IN (");
    let mut list = q.separated(", ");
    for id in &ids {
        list.push_bind(id);
    }
    list.push_unseparated(")");
    Ok(q.build().execute(conn).await?.rows_affected())
}

/// Inserts a new chat and its zero count. Fails with a unique violation when the
/// chat exists.
pub async fn insert(
    conn: &mut MySqlConnection,
    chat_id: &str,
    max_members: u32,
    now: NaiveDateTime,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO chat (chat_id, max_members, revision, created_at, bucket) VALUES (?, ?, 0, ?, ?)",
    )
    .bind(chat_id)
    .bind(max_members)
    .bind(now)
    .bind(bucket_of(chat_id))
    .execute(&mut *conn)
    .await?;
    sqlx::query("INSERT INTO chat_member_count (chat_id, member_count) VALUES (?, 0)")
        .bind(chat_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Sets a locked chat's member limit.
pub async fn set_max_members(
    conn: &mut MySqlConnection,
    chat_id: &str,
    max_members: u32,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE chat SET max_members = ? WHERE chat_id = ?")
        .bind(max_members)
        .bind(chat_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Reads the member count (one primary-key lookup, never `COUNT(*)`) and
/// where the chat is if not here.
pub async fn member_count(
    conn: &mut MySqlConnection,
    chat_id: &str,
) -> sqlx::Result<Option<(u32, Option<String>)>> {
    sqlx::query_as(
        "SELECT n.member_count, c.moved_to FROM chat c \
         JOIN chat_member_count n ON n.chat_id = c.chat_id WHERE c.chat_id = ?",
    )
    .bind(chat_id)
    .fetch_optional(conn)
    .await
}

/// Reads a chat's latest revision, and where the chat is if not here.
pub async fn revision(
    conn: &mut MySqlConnection,
    chat_id: &str,
) -> sqlx::Result<Option<(u64, Option<String>)>> {
    sqlx::query_as("SELECT revision, moved_to FROM chat WHERE chat_id = ?")
        .bind(chat_id)
        .fetch_optional(conn)
        .await
}

/// What of a chat's log is stored: its latest and its first revision, and
/// where the chat is if not here.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LogBounds {
    pub revision: u64,
    pub first_revision: u64,
    pub moved_to: Option<String>,
}

pub async fn log_bounds(
    conn: &mut MySqlConnection,
    chat_id: &str,
) -> sqlx::Result<Option<LogBounds>> {
    sqlx::query_as("SELECT revision, first_revision, moved_to FROM chat WHERE chat_id = ?")
        .bind(chat_id)
        .fetch_optional(conn)
        .await
}

/// The latest and first stored revisions of several chats (of those that
/// exist here and have not moved away).
pub async fn revisions(
    conn: &mut MySqlConnection,
    chat_ids: &[String],
) -> sqlx::Result<Vec<(String, u64, u64)>> {
    if chat_ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut query = sqlx::QueryBuilder::new(
        "SELECT chat_id, revision, first_revision FROM chat WHERE chat_id IN (",
    );
    let mut ids = query.separated(", ");
    for id in chat_ids {
        ids.push_bind(id);
    }
    ids.push_unseparated(") AND moved_to IS NULL");
    query.build_query_as().fetch_all(conn).await
}

/// Advances a locked chat's revision by `n` (the events just appended).
pub async fn advance_revision(
    conn: &mut MySqlConnection,
    chat_id: &str,
    n: u64,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE chat SET revision = revision + ? WHERE chat_id = ?")
        .bind(n)
        .bind(chat_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Adds `delta` to a locked chat's member count, in the same transaction as the
/// membership changes it accounts for. The `WHERE` guard refuses to go below
/// zero; a count that does not change the row is reported as an error by the
/// caller.
pub async fn adjust_member_count(
    conn: &mut MySqlConnection,
    chat_id: &str,
    delta: i64,
) -> sqlx::Result<u64> {
    let result = if delta >= 0 {
        sqlx::query(
            "UPDATE chat_member_count SET member_count = member_count + ? WHERE chat_id = ?",
        )
        .bind(delta.unsigned_abs())
        .bind(chat_id)
        .execute(conn)
        .await?
    } else {
        sqlx::query(
            "UPDATE chat_member_count SET member_count = member_count - ? \
             WHERE chat_id = ? AND member_count >= ?",
        )
        .bind(delta.unsigned_abs())
        .bind(chat_id)
        .bind(delta.unsigned_abs())
        .execute(conn)
        .await?
    };
    Ok(result.rows_affected())
}
