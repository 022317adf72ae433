//! Statements of the digest check, the purge and `chatshard repair-counts`:
//! the one place that counts rows.
//!
//! `COUNT(*)` is never on the request path; the repair tool and the digest
//! check use it per chat to compare against `chat_member_count`.

use sqlx::MySqlConnection;

/// Chat ids after `after`, in key order, a page at a time.
pub async fn chat_ids_after(
    conn: &mut MySqlConnection,
    after: &str,
    limit: u32,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar("SELECT chat_id FROM chat WHERE chat_id > ? ORDER BY chat_id LIMIT ?")
        .bind(after)
        .bind(limit)
        .fetch_all(conn)
        .await
}

/// The number of JOINED rows of a chat.
pub async fn count_joined(conn: &mut MySqlConnection, chat_id: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT COUNT(*) FROM chat_member WHERE chat_id = ? AND state = 1")
        .bind(chat_id)
        .fetch_one(conn)
        .await
}

/// Sets a locked chat's count to a recomputed value (creating the count row if it
/// is missing).
pub async fn set_count(conn: &mut MySqlConnection, chat_id: &str, count: u32) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO chat_member_count (chat_id, member_count) VALUES (?, ?) \
         ON DUPLICATE KEY UPDATE member_count = ?",
    )
    .bind(chat_id)
    .bind(count)
    .bind(count)
    .execute(conn)
    .await?;
    Ok(())
}

/// Reads and locks the chat row (without requiring a count row).
pub async fn lock_chat(conn: &mut MySqlConnection, chat_id: &str) -> sqlx::Result<bool> {
    let found: Option<String> =
        sqlx::query_scalar("SELECT chat_id FROM chat WHERE chat_id = ? FOR UPDATE")
            .bind(chat_id)
            .fetch_optional(conn)
            .await?;
    Ok(found.is_some())
}

/// Reads and locks a chat's count row, if present.
pub async fn lock_count(conn: &mut MySqlConnection, chat_id: &str) -> sqlx::Result<Option<u32>> {
    sqlx::query_scalar("SELECT member_count FROM chat_member_count WHERE chat_id = ? FOR UPDATE")
        .bind(chat_id)
        .fetch_optional(conn)
        .await
}

/// A chat as the purge and the digest check walk a shard: where its log
/// stands and when it was last checked.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ChatLog {
    pub chat_id: String,
    pub revision: u64,
    pub first_revision: u64,
    pub checked_revision: u64,
}

/// The chats held here after `after`, in key order, a page at a time (one
/// primary-key range read; markers of chats that moved away are left out).
pub async fn chat_logs_after(
    conn: &mut MySqlConnection,
    after: &str,
    limit: u32,
) -> sqlx::Result<Vec<ChatLog>> {
    sqlx::query_as(
        "SELECT chat_id, revision, first_revision, checked_revision FROM chat \
         WHERE chat_id > ? AND moved_to IS NULL ORDER BY chat_id LIMIT ?",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// What the digest check compares for one chat, read in one statement (so
/// in one consistent view, even in READ COMMITTED): the stored count and
/// the JOINED rows, the revision and the events stored above `from` and the
/// highest stored. `None` when the chat is not held here.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Observed {
    pub revision: u64,
    pub first_revision: u64,
    pub member_count: Option<i64>,
    pub joined: i64,
    pub events_above: i64,
    pub max_event: u64,
}

pub async fn observe(
    conn: &mut MySqlConnection,
    chat_id: &str,
    from: u64,
) -> sqlx::Result<Option<Observed>> {
    sqlx::query_as(
        "SELECT c.revision, c.first_revision, CAST(n.member_count AS SIGNED) AS member_count, \
         (SELECT COUNT(*) FROM chat_member m WHERE m.chat_id = c.chat_id AND m.state = 1) AS joined, \
         (SELECT COUNT(*) FROM chat_event e WHERE e.chat_id = c.chat_id AND e.revision > ?) AS events_above, \
         (SELECT CAST(COALESCE(MAX(e.revision), 0) AS UNSIGNED) FROM chat_event e WHERE e.chat_id = c.chat_id) AS max_event \
         FROM chat c LEFT JOIN chat_member_count n ON n.chat_id = c.chat_id \
         WHERE c.chat_id = ? AND c.moved_to IS NULL",
    )
    .bind(from)
    .bind(chat_id)
    .fetch_optional(conn)
    .await
}

/// Reads and locks the chat row as every writer does; `None` when the chat
/// is not held here (absent, or a marker).
pub async fn lock_log(conn: &mut MySqlConnection, chat_id: &str) -> sqlx::Result<Option<ChatLog>> {
    sqlx::query_as(
        "SELECT chat_id, revision, first_revision, checked_revision FROM chat \
         WHERE chat_id = ? AND moved_to IS NULL FOR UPDATE",
    )
    .bind(chat_id)
    .fetch_optional(conn)
    .await
}

/// The highest event revision stored for a chat (0 when none).
pub async fn max_event(conn: &mut MySqlConnection, chat_id: &str) -> sqlx::Result<u64> {
    sqlx::query_scalar(
        "SELECT CAST(COALESCE(MAX(revision), 0) AS UNSIGNED) FROM chat_event WHERE chat_id = ?",
    )
    .bind(chat_id)
    .fetch_one(conn)
    .await
}

/// Stored revisions in `(above, upto]`, highest first, at most `limit`.
pub async fn revisions_down(
    conn: &mut MySqlConnection,
    chat_id: &str,
    above: u64,
    upto: u64,
    limit: u32,
) -> sqlx::Result<Vec<u64>> {
    sqlx::query_scalar(
        "SELECT revision FROM chat_event WHERE chat_id = ? AND revision > ? AND revision <= ? \
         ORDER BY revision DESC LIMIT ?",
    )
    .bind(chat_id)
    .bind(above)
    .bind(upto)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Sets a locked chat's revision (the repair of a revision behind its log).
pub async fn set_revision(
    conn: &mut MySqlConnection,
    chat_id: &str,
    revision: u64,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE chat SET revision = ? WHERE chat_id = ?")
        .bind(revision)
        .bind(chat_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Sets a locked chat's first stored revision (the repair of a log with
/// missing events: readers behind them full-sync instead of skipping them).
pub async fn set_first_revision(
    conn: &mut MySqlConnection,
    chat_id: &str,
    first: u64,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE chat SET first_revision = ? WHERE chat_id = ?")
        .bind(first)
        .bind(chat_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Records that a chat was found whole at `revision` (never moves back).
pub async fn mark_checked(
    conn: &mut MySqlConnection,
    chat_id: &str,
    revision: u64,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE chat SET checked_revision = ? WHERE chat_id = ? AND checked_revision < ?")
        .bind(revision)
        .bind(chat_id)
        .bind(revision)
        .execute(conn)
        .await?;
    Ok(())
}

/// The oldest stored events of a chat in `[first, upto]`: revision and
/// commit time, at most `limit` (a primary-key range read).
pub async fn oldest_events(
    conn: &mut MySqlConnection,
    chat_id: &str,
    first: u64,
    upto: u64,
    limit: u32,
) -> sqlx::Result<Vec<(u64, chrono::NaiveDateTime)>> {
    sqlx::query_as(
        "SELECT revision, created_at FROM chat_event \
         WHERE chat_id = ? AND revision >= ? AND revision <= ? ORDER BY revision LIMIT ?",
    )
    .bind(chat_id)
    .bind(first)
    .bind(upto)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Raises a chat's first stored revision to `to` before the events below it
/// are deleted, so that a reader never gets a page with a hole. Not for a
/// chat that moved away or has a move running (the move copies the log);
/// `false` when nothing changed.
pub async fn raise_first_revision(
    conn: &mut MySqlConnection,
    chat_id: &str,
    to: u64,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE chat c SET c.first_revision = ? \
         WHERE c.chat_id = ? AND c.first_revision < ? AND c.revision + 1 >= ? AND c.moved_to IS NULL \
         AND NOT EXISTS (SELECT 1 FROM chat_move m WHERE m.chat_id = c.chat_id AND m.active = 1)",
    )
    .bind(to)
    .bind(chat_id)
    .bind(to)
    .bind(to)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Deletes up to `limit` of a chat's events below `below` (its first stored
/// revision): a primary-key range, so a bounded delete.
pub async fn delete_events_below(
    conn: &mut MySqlConnection,
    chat_id: &str,
    below: u64,
    limit: u32,
) -> sqlx::Result<u64> {
    let done = sqlx::query("DELETE FROM chat_event WHERE chat_id = ? AND revision < ? LIMIT ?")
        .bind(chat_id)
        .bind(below)
        .bind(limit)
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}
