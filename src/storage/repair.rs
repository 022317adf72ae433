//! Statements of `chatshard repair-counts`: the one place that counts rows.
//!
//! `COUNT(*)` is never on the request path; the repair tool uses it per chat,
//! under the chat's row lock, to compare against `chat_member_count`.

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
