//! `chat_member`.

use chrono::NaiveDateTime;
use sqlx::{MySqlConnection, QueryBuilder};

use super::placeholders;

/// A member row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MemberRow {
    pub id: u64,
    pub user_id: String,
    pub state: u8,
    pub joined_at: NaiveDateTime,
}

/// A row to insert.
#[derive(Debug, Clone)]
pub struct NewMember<'a> {
    pub user_id: &'a str,
    pub state: u8,
    pub joined_at: NaiveDateTime,
    pub left_at: Option<NaiveDateTime>,
}

/// Reads one member.
pub async fn get(
    conn: &mut MySqlConnection,
    chat_id: &str,
    user_id: &str,
) -> sqlx::Result<Option<MemberRow>> {
    sqlx::query_as(
        "SELECT id, user_id, state, joined_at FROM chat_member WHERE chat_id = ? AND user_id = ?",
    )
    .bind(chat_id)
    .bind(user_id)
    .fetch_optional(conn)
    .await
}

/// A member row and the chat's row, read at once: `None` when the chat is not
/// on this shard at all; otherwise where the chat is if it moved away, and the
/// member's row if it has one.
pub async fn get_located(
    conn: &mut MySqlConnection,
    chat_id: &str,
    user_id: &str,
) -> sqlx::Result<Option<(Option<String>, Option<MemberRow>)>> {
    let row: Option<LocatedMember> = sqlx::query_as(
        "SELECT c.moved_to, m.id, m.user_id, m.state, m.joined_at FROM chat c \
         LEFT JOIN chat_member m ON m.chat_id = c.chat_id AND m.user_id = ? \
         WHERE c.chat_id = ?",
    )
    .bind(user_id)
    .bind(chat_id)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|r| {
        let member = match (r.id, r.user_id, r.state, r.joined_at) {
            (Some(id), Some(user_id), Some(state), Some(joined_at)) => Some(MemberRow {
                id,
                user_id,
                state,
                joined_at,
            }),
            _ => None,
        };
        (r.moved_to, member)
    }))
}

#[derive(sqlx::FromRow)]
struct LocatedMember {
    moved_to: Option<String>,
    id: Option<u64>,
    user_id: Option<String>,
    state: Option<u8>,
    joined_at: Option<chrono::NaiveDateTime>,
}

/// Reads the rows of the given users (at most one each), locking them.
pub async fn lock_many(
    conn: &mut MySqlConnection,
    chat_id: &str,
    users: &[&str],
) -> sqlx::Result<Vec<MemberRow>> {
    if users.is_empty() {
        return Ok(Vec::new());
    }
    let mut sql = String::from(
        "SELECT id, user_id, state, joined_at FROM chat_member WHERE chat_id = ? AND user_id IN (",
    );
    placeholders(&mut sql, users.len());
    sql.push_str(") FOR UPDATE");
    let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(chat_id);
    for user in users {
        query = query.bind(*user);
    }
    query.fetch_all(conn).await
}

/// Inserts new members with one multi-row `INSERT ... VALUES`.
pub async fn insert_many(
    conn: &mut MySqlConnection,
    chat_id: &str,
    rows: &[NewMember<'_>],
    now: NaiveDateTime,
) -> sqlx::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut qb = QueryBuilder::new(
        "INSERT INTO chat_member (chat_id, user_id, state, joined_at, left_at, created_at, updated_at) ",
    );
    qb.push_values(rows, |mut b, row| {
        b.push_bind(chat_id)
            .push_bind(row.user_id)
            .push_bind(row.state)
            .push_bind(row.joined_at)
            .push_bind(row.left_at)
            .push_bind(now)
            .push_bind(now);
    });
    qb.build().execute(conn).await?;
    Ok(())
}

/// Moves existing rows (by id) to JOINED as of `now`.
pub async fn mark_joined(
    conn: &mut MySqlConnection,
    ids: &[u64],
    now: NaiveDateTime,
) -> sqlx::Result<()> {
    set_state(
        conn,
        ids,
        "state = 1, joined_at = ?, left_at = NULL, updated_at = ?",
        now,
    )
    .await
}

/// Moves existing rows (by id) to LEFT as of `now`.
pub async fn mark_left(
    conn: &mut MySqlConnection,
    ids: &[u64],
    now: NaiveDateTime,
) -> sqlx::Result<()> {
    set_state(conn, ids, "state = 2, left_at = ?, updated_at = ?", now).await
}

async fn set_state(
    conn: &mut MySqlConnection,
    ids: &[u64],
    set: &str,
    now: NaiveDateTime,
) -> sqlx::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut sql = format!("UPDATE chat_member SET {set} WHERE id IN (");
    placeholders(&mut sql, ids.len());
    sql.push(')');
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now).bind(now);
    for id in ids {
        query = query.bind(*id);
    }
    query.execute(conn).await?;
    Ok(())
}

/// One page of JOINED members after `after_id`, in id order. Served by the
/// `(chat_id, state, id)` index.
pub async fn page_joined(
    conn: &mut MySqlConnection,
    chat_id: &str,
    after_id: u64,
    limit: u32,
) -> sqlx::Result<Vec<MemberRow>> {
    sqlx::query_as(
        "SELECT id, user_id, state, joined_at FROM chat_member \
         WHERE chat_id = ? AND state = 1 AND id > ? ORDER BY id LIMIT ?",
    )
    .bind(chat_id)
    .bind(after_id)
    .bind(limit)
    .fetch_all(conn)
    .await
}
