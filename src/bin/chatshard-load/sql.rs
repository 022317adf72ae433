//! The shard over SQL, without chatshard in between: READ COMMITTED
//! connections, a join done with chatshard's own statements, member rows,
//! and SQL errors as the recorder's answers.

use chatshard::domain::{EventType, MemberState};
use chatshard::service::now;
use chatshard::storage::{chats, events, members};
use chrono::NaiveDateTime;
use sqlx::{Connection, MySqlConnection};

/// A connection to the shard at `url`, its transactions READ COMMITTED.
pub async fn connect_read_committed(url: &str) -> anyhow::Result<MySqlConnection> {
    let mut conn = MySqlConnection::connect(url).await?;
    sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .execute(&mut conn)
        .await?;
    Ok(conn)
}

/// A failed statement as the recorder's answer: `sql/` and the server's
/// error code.
pub fn sql_answer(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => format!("sql/{}", db.code().unwrap_or_default()),
        _ => "sql/error".to_owned(),
    }
}

/// Joins `users` to `chat` in one transaction, with chatshard's own
/// statements (one multi-row insert per table, one revision bump, one count
/// adjustment).
pub async fn join_in_one_transaction(
    conn: &mut MySqlConnection,
    chat: &str,
    users: &[String],
) -> sqlx::Result<()> {
    let mut tx = conn.begin().await?;
    let row = chats::lock(&mut tx, chat)
        .await?
        .ok_or(sqlx::Error::RowNotFound)?;
    let at = now();
    let new: Vec<members::NewMember<'_>> = users.iter().map(|u| joined(u, at)).collect();
    members::insert_many(&mut tx, chat, &new, at).await?;
    let appended: Vec<events::NewEvent<'_>> = users
        .iter()
        .enumerate()
        .map(|(i, u)| events::NewEvent {
            revision: row.revision + 1 + i as u64,
            event_type: EventType::MemberJoined.code(),
            user_id: u,
            message_id: None,
        })
        .collect();
    events::append(&mut tx, chat, &appended, at).await?;
    chats::advance_revision(&mut tx, chat, users.len() as u64).await?;
    chats::adjust_member_count(&mut tx, chat, users.len() as i64).await?;
    tx.commit().await
}

/// The row of `user_id` joined at `at`.
pub fn joined(user_id: &str, at: NaiveDateTime) -> members::NewMember<'_> {
    members::NewMember {
        user_id,
        state: MemberState::Joined.code(),
        joined_at: at,
        left_at: None,
    }
}
