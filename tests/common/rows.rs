//! What a shard stores, read straight from it: a chat's count equals its
//! JOINED rows, and its event revisions run without a gap.

use sqlx::MySqlConnection;

/// (member_count, JOINED rows) of a chat, read from its shard.
pub async fn count_and_rows(db: &mut MySqlConnection, chat: &str) -> (i64, i64) {
    let count: i64 = sqlx::query_scalar(
        "SELECT CAST(member_count AS SIGNED) FROM chat_member_count WHERE chat_id = ?",
    )
    .bind(chat)
    .fetch_one(&mut *db)
    .await
    .expect("count");
    let rows: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM chat_member WHERE chat_id = ? AND state = 1")
            .bind(chat)
            .fetch_one(&mut *db)
            .await
            .expect("rows");
    (count, rows)
}

/// The users JOINED to a chat, from its shard.
pub async fn joined_users(db: &mut MySqlConnection, chat: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT user_id FROM chat_member WHERE chat_id = ? AND state = 1")
        .bind(chat)
        .fetch_all(&mut *db)
        .await
        .expect("members")
}

/// Asserts that a chat's stored count equals its JOINED rows and that its
/// event revisions are 1, 2, ... up to the chat's revision, with no gap.
pub async fn assert_chat_consistent(db: &mut MySqlConnection, chat: &str) {
    let (count, rows) = count_and_rows(db, chat).await;
    assert_eq!(count, rows, "count of {chat}");
    // The log and the chat row from one snapshot: a purge round (which
    // raises `first_revision`, then deletes) may run between two reads.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *db)
        .await
        .expect("isolation");
    sqlx::query("START TRANSACTION WITH CONSISTENT SNAPSHOT")
        .execute(&mut *db)
        .await
        .expect("snapshot");
    let revisions: Vec<i64> = sqlx::query_scalar(
        "SELECT CAST(e.revision AS SIGNED) FROM chat_event e JOIN chat c ON c.chat_id = e.chat_id \
         WHERE e.chat_id = ? AND e.revision >= c.first_revision ORDER BY e.revision",
    )
    .bind(chat)
    .fetch_all(&mut *db)
    .await
    .expect("events");
    // Gapless from the first revision still stored (1 until a purge).
    let (latest, first): (i64, i64) = sqlx::query_as(
        "SELECT CAST(revision AS SIGNED), CAST(first_revision AS SIGNED) FROM chat WHERE chat_id = ?",
    )
    .bind(chat)
    .fetch_one(&mut *db)
    .await
    .expect("chat");
    sqlx::query("COMMIT")
        .execute(&mut *db)
        .await
        .expect("commit");
    assert_eq!(
        revisions,
        (first..=latest).collect::<Vec<_>>(),
        "gap in {chat} (revision {latest}, first stored {first})"
    );
}

/// The revisions of a `GET /events` page, in order.
pub fn page_revisions(page: &serde_json::Value) -> Vec<u64> {
    page["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["revision"].as_u64().expect("revision"))
        .collect()
}
