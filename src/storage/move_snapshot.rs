//! The statements that copy a chat whose log was purged from a snapshot of
//! its rows (docs/moving-chats.md, "A purged log"): its members, messages
//! and stored events read page by page on the source and written on the
//! target, keeping their ids where the target lets them, then settled.

use chrono::NaiveDateTime;
use sqlx::MySqlConnection;

use super::moves::{IdTable, MESSAGE_SENT, id_owners, keep_id};

/// A member row as a snapshot copies it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MemberRow {
    pub id: u64,
    pub user_id: String,
    pub state: u8,
    pub joined_at: NaiveDateTime,
    pub left_at: Option<NaiveDateTime>,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

/// The chat's member rows after `after` in user order, at most `limit` (the
/// unique key `(chat_id, user_id)` serves it).
pub async fn members_after(
    conn: &mut MySqlConnection,
    chat_id: &str,
    after: &str,
    limit: u32,
) -> sqlx::Result<Vec<MemberRow>> {
    sqlx::query_as(
        "SELECT id, user_id, state, joined_at, left_at, created_at, updated_at FROM chat_member \
         WHERE chat_id = ? AND user_id > ? ORDER BY user_id LIMIT ?",
    )
    .bind(chat_id)
    .bind(after)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Copies member rows to the target with their ids (see [`keep_id`]); a row
/// there already (a retried page) stays as it is.
pub async fn insert_members(
    conn: &mut MySqlConnection,
    chat_id: &str,
    rows: &[MemberRow],
) -> sqlx::Result<()> {
    let rows: Vec<(&str, &MemberRow)> = rows.iter().map(|r| (chat_id, r)).collect();
    insert_member_rows(conn, &rows).await
}

/// [`insert_members`] of rows of several chats, each with its chat.
pub async fn insert_member_rows(
    conn: &mut MySqlConnection,
    rows: &[(&str, &MemberRow)],
) -> sqlx::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let wanted: Vec<u64> = rows.iter().map(|(_, r)| r.id).collect();
    let owners = id_owners(&mut *conn, IdTable::Members, &wanted).await?;
    let mut q = sqlx::QueryBuilder::new(
        "INSERT INTO chat_member (id, chat_id, user_id, state, joined_at, left_at, created_at, updated_at) ",
    );
    q.push_values(rows, |mut b, (chat_id, r)| {
        b.push_bind(keep_id(&owners, Some(r.id), chat_id, &r.user_id))
            .push_bind(*chat_id)
            .push_bind(&r.user_id)
            .push_bind(r.state)
            .push_bind(r.joined_at)
            .push_bind(r.left_at)
            .push_bind(r.created_at)
            .push_bind(r.updated_at);
    });
    q.push(" ON DUPLICATE KEY UPDATE user_id = user_id");
    q.build().execute(conn).await?;
    Ok(())
}

/// A message row as a snapshot copies it: the row as the chat's reads see it.
pub use super::messages::MessageRow;

/// The chat's messages after `(sender, key)` in the order of the unique key
/// `(chat_id, sender_id, client_message_id)`, which serves it; at most
/// `limit`.
pub async fn messages_after(
    conn: &mut MySqlConnection,
    chat_id: &str,
    (sender, key): (&str, &str),
    limit: u32,
) -> sqlx::Result<Vec<MessageRow>> {
    sqlx::query_as(
        "SELECT id, sender_id, client_message_id, revision, body, created_at FROM chat_message \
         WHERE chat_id = ? AND (sender_id > ? OR (sender_id = ? AND client_message_id > ?)) \
         ORDER BY sender_id, client_message_id LIMIT ?",
    )
    .bind(chat_id)
    .bind(sender)
    .bind(sender)
    .bind(key)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Copies message rows to the target with their ids (see [`keep_id`]); a
/// message there already (a retried page) stays as it is.
pub async fn insert_messages(
    conn: &mut MySqlConnection,
    chat_id: &str,
    rows: &[MessageRow],
) -> sqlx::Result<()> {
    let rows: Vec<(&str, &MessageRow)> = rows.iter().map(|r| (chat_id, r)).collect();
    insert_message_rows(conn, &rows).await
}

/// [`insert_messages`] of rows of several chats, each with its chat.
pub async fn insert_message_rows(
    conn: &mut MySqlConnection,
    rows: &[(&str, &MessageRow)],
) -> sqlx::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let wanted: Vec<u64> = rows.iter().map(|(_, r)| r.id).collect();
    let owners = id_owners(&mut *conn, IdTable::Messages, &wanted).await?;
    let mut q = sqlx::QueryBuilder::new(
        "INSERT INTO chat_message (id, chat_id, sender_id, client_message_id, revision, body, created_at) ",
    );
    q.push_values(rows, |mut b, (chat_id, r)| {
        b.push_bind(keep_id(
            &owners,
            Some(r.id),
            chat_id,
            &r.revision.to_string(),
        ))
        .push_bind(*chat_id)
        .push_bind(&r.sender_id)
        .push_bind(&r.client_message_id)
        .push_bind(r.revision)
        .push_bind(&r.body)
        .push_bind(r.created_at);
    });
    q.push(" ON DUPLICATE KEY UPDATE revision = revision");
    q.build().execute(conn).await?;
    Ok(())
}

/// An event row as a snapshot copies it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    pub revision: u64,
    pub event_type: u8,
    pub user_id: String,
    pub created_at: NaiveDateTime,
}

/// The chat's stored events in `(after, until]`, oldest first, at most
/// `limit` (a primary-key range).
pub async fn events_between(
    conn: &mut MySqlConnection,
    chat_id: &str,
    (after, until): (u64, u64),
    limit: u32,
) -> sqlx::Result<Vec<EventRow>> {
    sqlx::query_as(
        "SELECT revision, event_type, user_id, created_at FROM chat_event \
         WHERE chat_id = ? AND revision > ? AND revision <= ? ORDER BY revision LIMIT ?",
    )
    .bind(chat_id)
    .bind(after)
    .bind(until)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Copies event rows to the target, each message event naming the target's
/// message of its revision (copied before); an event there already (a
/// retried page) stays as it is.
pub async fn insert_events(
    conn: &mut MySqlConnection,
    chat_id: &str,
    rows: &[EventRow],
) -> sqlx::Result<()> {
    let rows: Vec<(&str, &EventRow)> = rows.iter().map(|r| (chat_id, r)).collect();
    insert_event_rows(conn, &rows).await
}

/// [`insert_events`] of rows of several chats, each with its chat.
pub async fn insert_event_rows(
    conn: &mut MySqlConnection,
    rows: &[(&str, &EventRow)],
) -> sqlx::Result<()> {
    use std::collections::{BTreeMap, HashMap};
    if rows.is_empty() {
        return Ok(());
    }
    // Each chat's span of message events, whose target ids are read back.
    let mut spans: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for (chat_id, r) in rows.iter().filter(|(_, r)| r.event_type == MESSAGE_SENT) {
        let span = spans.entry(chat_id).or_insert((r.revision, r.revision));
        span.0 = span.0.min(r.revision);
        span.1 = span.1.max(r.revision);
    }
    let mut ids: HashMap<(String, u64), u64> = HashMap::new();
    if !spans.is_empty() {
        let mut q =
            sqlx::QueryBuilder::new("SELECT chat_id, revision, id FROM chat_message WHERE ");
        let mut any = q.separated(" OR ");
        for (chat_id, (first, last)) in &spans {
            any.push("(chat_id = ")
                .push_bind_unseparated(*chat_id)
                .push_unseparated(" AND revision BETWEEN ")
                .push_bind_unseparated(*first)
                .push_unseparated(" AND ")
                .push_bind_unseparated(*last)
                .push_unseparated(")");
        }
        let read: Vec<(String, u64, u64)> = q.build_query_as().fetch_all(&mut *conn).await?;
        ids = read.into_iter().map(|(c, r, id)| ((c, r), id)).collect();
    }
    let mut q = sqlx::QueryBuilder::new(
        "INSERT INTO chat_event (chat_id, revision, event_type, user_id, message_id, created_at) ",
    );
    q.push_values(rows, |mut b, (chat_id, r)| {
        b.push_bind(*chat_id)
            .push_bind(r.revision)
            .push_bind(r.event_type)
            .push_bind(&r.user_id)
            .push_bind(if r.event_type == MESSAGE_SENT {
                ids.get(&((*chat_id).to_owned(), r.revision)).copied()
            } else {
                None
            })
            .push_bind(r.created_at);
    });
    q.push(" ON DUPLICATE KEY UPDATE revision = revision");
    q.build().execute(conn).await?;
    Ok(())
}

/// Ends a snapshot on the target (inside the caller's transaction, which
/// holds the chat's row lock): the chat stands at `revision` with its log
/// from `first_revision`, and its count is its JOINED rows.
pub async fn settle_snapshot(
    conn: &mut MySqlConnection,
    chat_id: &str,
    revision: u64,
    first_revision: u64,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE chat SET revision = ?, first_revision = ? WHERE chat_id = ?")
        .bind(revision)
        .bind(first_revision)
        .bind(chat_id)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "UPDATE chat_member_count SET member_count = \
         (SELECT COUNT(*) FROM chat_member WHERE chat_id = ? AND state = 1) WHERE chat_id = ?",
    )
    .bind(chat_id)
    .bind(chat_id)
    .execute(conn)
    .await?;
    Ok(())
}
