//! `chat_event`: the per-chat event log.

use chrono::NaiveDateTime;
use sqlx::{MySqlConnection, QueryBuilder};

/// An event with its message text, when it is a message.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    pub revision: u64,
    pub event_type: u8,
    pub user_id: String,
    pub message_id: Option<u64>,
    pub body: Option<String>,
    pub created_at: NaiveDateTime,
}

/// An event to append.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    pub revision: u64,
    pub event_type: u8,
    pub user_id: &'a str,
    pub message_id: Option<u64>,
}

/// Appends events with one multi-row `INSERT ... VALUES`. The primary key
/// `(chat_id, revision)` makes a duplicate revision impossible.
pub async fn append(
    conn: &mut MySqlConnection,
    chat_id: &str,
    events: &[NewEvent<'_>],
    now: NaiveDateTime,
) -> sqlx::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let mut qb = QueryBuilder::new(
        "INSERT INTO chat_event (chat_id, revision, event_type, user_id, message_id, created_at) ",
    );
    qb.push_values(events, |mut b, e| {
        b.push_bind(chat_id)
            .push_bind(e.revision)
            .push_bind(e.event_type)
            .push_bind(e.user_id)
            .push_bind(e.message_id)
            .push_bind(now);
    });
    qb.build().execute(conn).await?;
    Ok(())
}

/// Events after `after`, oldest first.
pub async fn page(
    conn: &mut MySqlConnection,
    chat_id: &str,
    after: u64,
    limit: u32,
) -> sqlx::Result<Vec<EventRow>> {
    sqlx::query_as(
        "SELECT e.revision, e.event_type, e.user_id, e.message_id, m.body, e.created_at \
         FROM chat_event e LEFT JOIN chat_message m ON m.id = e.message_id \
         WHERE e.chat_id = ? AND e.revision > ? ORDER BY e.revision LIMIT ?",
    )
    .bind(chat_id)
    .bind(after)
    .bind(limit)
    .fetch_all(conn)
    .await
}
