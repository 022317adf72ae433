//! `chat_message`.

use chrono::NaiveDateTime;
use sqlx::{MySqlConnection, QueryBuilder};

/// A message row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MessageRow {
    pub id: u64,
    pub sender_id: String,
    pub client_message_id: String,
    pub revision: u64,
    pub body: String,
    pub created_at: NaiveDateTime,
}

/// A message to insert.
#[derive(Debug, Clone)]
pub struct NewMessage<'a> {
    pub sender_id: &'a str,
    pub client_message_id: &'a str,
    pub revision: u64,
    pub body: &'a str,
}

/// Reads the messages with the given `(sender_id, client_message_id)` keys.
pub async fn find_by_keys(
    conn: &mut MySqlConnection,
    chat_id: &str,
    keys: &[(&str, &str)],
) -> sqlx::Result<Vec<MessageRow>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let mut qb = QueryBuilder::new(
        "SELECT id, sender_id, client_message_id, revision, body, created_at FROM chat_message \
         WHERE chat_id = ",
    );
    qb.push_bind(chat_id).push(" AND (");
    let mut any = qb.separated(" OR ");
    for (sender, client_id) in keys {
        any.push("(sender_id = ")
            .push_bind_unseparated(*sender)
            .push_unseparated(" AND client_message_id = ")
            .push_bind_unseparated(*client_id)
            .push_unseparated(")");
    }
    qb.push(")");
    qb.build_query_as().fetch_all(conn).await
}

/// Inserts messages with one multi-row `INSERT ... VALUES`.
pub async fn insert_many(
    conn: &mut MySqlConnection,
    chat_id: &str,
    rows: &[NewMessage<'_>],
    now: NaiveDateTime,
) -> sqlx::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut qb = QueryBuilder::new(
        "INSERT INTO chat_message (chat_id, sender_id, client_message_id, revision, body, created_at) ",
    );
    qb.push_values(rows, |mut b, row| {
        b.push_bind(chat_id)
            .push_bind(row.sender_id)
            .push_bind(row.client_message_id)
            .push_bind(row.revision)
            .push_bind(row.body)
            .push_bind(now);
    });
    qb.build().execute(conn).await?;
    Ok(())
}
