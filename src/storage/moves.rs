//! The statements of a chat move (docs/moving-chats.md): reading the source's
//! log with what each event needs, replaying it on the target, the fence, the
//! markers, the digests that verify a copy, the clean-up of the source, and
//! the move records (a purged chat's snapshot: `move_snapshot.rs`).

use chrono::NaiveDateTime;
use sqlx::MySqlConnection;

pub use super::move_snapshot::*;

/// `chat_event.event_type` of a message.
pub(super) const MESSAGE_SENT: u8 = crate::domain::EventType::MessageSent.code();
/// `chat_member.state` of a member who left.
const LEFT: u8 = crate::domain::MemberState::Left.code();

/// One event of the source's log with the message it names, if any.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LogRow {
    pub revision: u64,
    pub event_type: u8,
    pub user_id: String,
    pub created_at: NaiveDateTime,
    /// The source's id of the member row a join or leave touched.
    pub member_id: Option<u64>,
    /// The source's id of the message a `MESSAGE_SENT` names.
    pub message_id: Option<u64>,
    pub sender_id: Option<String>,
    pub client_message_id: Option<String>,
    pub body: Option<String>,
    pub message_created_at: Option<NaiveDateTime>,
}

/// The events after `after`, oldest first, at most `limit`.
pub async fn log_after(
    conn: &mut MySqlConnection,
    chat_id: &str,
    after: u64,
    limit: u32,
) -> sqlx::Result<Vec<LogRow>> {
    sqlx::query_as(
        "SELECT e.revision, e.event_type, e.user_id, e.created_at, \
                mb.id AS member_id, e.message_id, \
                m.sender_id, m.client_message_id, m.body, m.created_at AS message_created_at \
         FROM chat_event e LEFT JOIN chat_message m ON m.id = e.message_id \
         LEFT JOIN chat_member mb \
           ON e.event_type <> 1 AND mb.chat_id = e.chat_id AND mb.user_id = e.user_id \
         WHERE e.chat_id = ? AND e.revision > ? ORDER BY e.revision LIMIT ?",
    )
    .bind(chat_id)
    .bind(after)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// The source chat's row as the target's first copy takes it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ChatHead {
    pub max_members: u32,
    pub created_at: NaiveDateTime,
    /// The first revision still stored: above 1, the log was purged and the
    /// copy starts from a snapshot.
    pub first_revision: u64,
}

pub async fn head(conn: &mut MySqlConnection, chat_id: &str) -> sqlx::Result<Option<ChatHead>> {
    sqlx::query_as("SELECT max_members, created_at, first_revision FROM chat WHERE chat_id = ?")
        .bind(chat_id)
        .fetch_optional(conn)
        .await
}

/// Makes the target's chat row and count (inside the caller's transaction),
/// marked as held by `source` so nothing but the copy writes it until the
/// switch, unless it exists.
pub async fn open_target(
    conn: &mut MySqlConnection,
    chat_id: &str,
    head: &ChatHead,
    source: &str,
) -> Result<(), OpenError> {
    let exists: Option<(u64, Option<String>)> =
        sqlx::query_as("SELECT revision, moved_to FROM chat WHERE chat_id = ? FOR UPDATE")
            .bind(chat_id)
            .fetch_optional(&mut *conn)
            .await?;
    match exists {
        None => {
            super::chats::insert(&mut *conn, chat_id, head.max_members, head.created_at).await?;
            set_marker(conn, chat_id, Some(source)).await?;
        }
        // A marker: the tombstone of an earlier move away (the chat comes
        // back), or what a copy that did not switch left. Whatever rows it
        // still has are not the chat's any more: the copy starts afresh.
        Some((_, Some(_))) => {
            for sql in [
                "DELETE FROM chat_event WHERE chat_id = ?",
                "DELETE FROM chat_message WHERE chat_id = ?",
                "DELETE FROM chat_member WHERE chat_id = ?",
            ] {
                sqlx::query(sql).bind(chat_id).execute(&mut *conn).await?;
            }
            sqlx::query(
                "UPDATE chat SET revision = 0, first_revision = 1, checked_revision = 0, max_members = ?, \
                 created_at = ?, moved_to = ?, fenced_until = NULL WHERE chat_id = ?",
            )
            .bind(head.max_members)
            .bind(head.created_at)
            .bind(source)
            .bind(chat_id)
            .execute(&mut *conn)
            .await?;
            sqlx::query("UPDATE chat_member_count SET member_count = 0 WHERE chat_id = ?")
                .bind(chat_id)
                .execute(conn)
                .await?;
        }
        Some((_, None)) => return Err(OpenError::Live),
    }
    Ok(())
}

/// Why a target cannot take a copy.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    /// The chat is live on the target already.
    #[error("the chat is live on the target shard")]
    Live,
}

/// The target's revision, locked: where the copy goes on from.
pub async fn lock_revision(conn: &mut MySqlConnection, chat_id: &str) -> sqlx::Result<Option<u64>> {
    sqlx::query_scalar("SELECT revision FROM chat WHERE chat_id = ? FOR UPDATE")
        .bind(chat_id)
        .fetch_optional(conn)
        .await
}

/// A member row as a replayed batch leaves it (decided by
/// `service::replay::fold`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberFate {
    pub user_id: String,
    /// The source's id of the row.
    pub id: Option<u64>,
    /// Its state on the target before the batch (`None`: no row there).
    pub before: Option<u8>,
    pub state: u8,
    pub created_at: NaiveDateTime,
    pub joined_at: Option<NaiveDateTime>,
    pub left_at: Option<NaiveDateTime>,
    pub updated_at: NaiveDateTime,
}

/// The states of `users`' member rows in the chat, locked for the caller's
/// transaction (which holds the chat's row lock).
pub async fn lock_member_states(
    conn: &mut MySqlConnection,
    chat_id: &str,
    users: &[&str],
) -> sqlx::Result<std::collections::HashMap<String, u8>> {
    if users.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    let mut q = sqlx::QueryBuilder::new("SELECT user_id, state FROM chat_member WHERE chat_id = ");
    q.push_bind(chat_id).push(" AND user_id IN (");
    let mut list = q.separated(", ");
    for u in users {
        list.push_bind(*u);
    }
    list.push_unseparated(") FOR UPDATE");
    let existing: Vec<(String, u8)> = q.build_query_as().fetch_all(&mut *conn).await?;
    Ok(existing.into_iter().collect())
}

/// Replays a batch of the source's log on the target, inside the caller's
/// transaction (which holds the chat's row lock), in a handful of statements:
/// the member rows as `members` says the batch leaves them, the messages
/// (ids of the target's, read back by revision), and the events.
pub async fn replay_batch(
    conn: &mut MySqlConnection,
    chat_id: &str,
    rows: &[LogRow],
    members: &[MemberFate],
) -> sqlx::Result<()> {
    replay_chats(
        conn,
        &[ChatReplay {
            chat_id,
            rows,
            members,
        }],
    )
    .await
}

/// One chat's share of a replay: its log rows and the member rows as they
/// leave them.
#[derive(Debug, Clone, Copy)]
pub struct ChatReplay<'a> {
    pub chat_id: &'a str,
    pub rows: &'a [LogRow],
    pub members: &'a [MemberFate],
}

/// [`replay_batch`] of several chats at once (the caller's transaction holds
/// every chat's row lock): one insert of the new member rows of them all,
/// one update per member row that changes state, one insert of their
/// messages, one read of the messages' ids, one insert of their events.
pub async fn replay_chats(
    conn: &mut MySqlConnection,
    chats: &[ChatReplay<'_>],
) -> sqlx::Result<()> {
    use sqlx::QueryBuilder;
    use std::collections::HashMap;
    let new: Vec<(&str, &MemberFate)> = chats
        .iter()
        .flat_map(|c| {
            c.members
                .iter()
                .filter(|f| f.before.is_none())
                .map(|f| (c.chat_id, f))
        })
        .collect();
    if !new.is_empty() {
        let wanted: Vec<u64> = new.iter().filter_map(|(_, f)| f.id).collect();
        let owners = id_owners(&mut *conn, IdTable::Members, &wanted).await?;
        let mut q = QueryBuilder::new(
            "INSERT INTO chat_member (id, chat_id, user_id, state, joined_at, left_at, created_at, updated_at) ",
        );
        q.push_values(&new, |mut b, (chat_id, f)| {
            b.push_bind(keep_id(&owners, f.id, chat_id, &f.user_id))
                .push_bind(*chat_id)
                .push_bind(&f.user_id)
                .push_bind(f.state)
                .push_bind(f.joined_at.unwrap_or(f.created_at))
                .push_bind(f.left_at)
                .push_bind(f.created_at)
                .push_bind(f.updated_at);
        });
        q.build().execute(&mut *conn).await?;
    }
    for c in chats {
        for f in c.members.iter().filter(|f| f.before.is_some()) {
            sqlx::query(
                "UPDATE chat_member SET state = ?, joined_at = COALESCE(?, joined_at), left_at = ?, updated_at = ? \
                 WHERE chat_id = ? AND user_id = ?",
            )
            .bind(f.state)
            .bind(f.joined_at)
            .bind(f.left_at.filter(|_| f.state == LEFT))
            .bind(f.updated_at)
            .bind(c.chat_id)
            .bind(&f.user_id)
            .execute(&mut *conn)
            .await?;
        }
    }
    // Messages, then their ids by revision (unique per chat).
    let messages: Vec<(&str, &LogRow)> = chats
        .iter()
        .flat_map(|c| {
            c.rows
                .iter()
                .filter(|r| r.event_type == MESSAGE_SENT)
                .map(|r| (c.chat_id, r))
        })
        .collect();
    let mut ids: HashMap<(&str, u64), u64> = HashMap::new();
    if !messages.is_empty() {
        let wanted: Vec<u64> = messages.iter().filter_map(|(_, r)| r.message_id).collect();
        let owners = id_owners(&mut *conn, IdTable::Messages, &wanted).await?;
        let mut q = QueryBuilder::new(
            "INSERT INTO chat_message (id, chat_id, sender_id, client_message_id, revision, body, created_at) ",
        );
        q.push_values(&messages, |mut b, (chat_id, r)| {
            b.push_bind(keep_id(
                &owners,
                r.message_id,
                chat_id,
                &r.revision.to_string(),
            ))
            .push_bind(*chat_id)
            .push_bind(r.sender_id.as_deref().unwrap_or(&r.user_id))
            .push_bind(r.client_message_id.as_deref().unwrap_or_default())
            .push_bind(r.revision)
            .push_bind(r.body.as_deref().unwrap_or_default())
            .push_bind(r.message_created_at.unwrap_or(r.created_at));
        });
        q.build().execute(&mut *conn).await?;
        let mut q = QueryBuilder::new("SELECT chat_id, revision, id FROM chat_message WHERE ");
        let mut any = q.separated(" OR ");
        for c in chats {
            let sent = || {
                c.rows
                    .iter()
                    .filter(|r| r.event_type == MESSAGE_SENT)
                    .map(|r| r.revision)
            };
            let (Some(first), Some(last)) = (sent().min(), sent().max()) else {
                continue;
            };
            any.push("(chat_id = ")
                .push_bind_unseparated(c.chat_id)
                .push_unseparated(" AND revision BETWEEN ")
                .push_bind_unseparated(first)
                .push_unseparated(" AND ")
                .push_bind_unseparated(last)
                .push_unseparated(")");
        }
        let read: Vec<(String, u64, u64)> = q.build_query_as().fetch_all(&mut *conn).await?;
        for (chat, revision, id) in read {
            if let Some(c) = chats.iter().find(|c| c.chat_id == chat) {
                ids.insert((c.chat_id, revision), id);
            }
        }
    }
    let events: Vec<(&str, &LogRow)> = chats
        .iter()
        .flat_map(|c| c.rows.iter().map(|r| (c.chat_id, r)))
        .collect();
    if !events.is_empty() {
        let mut q = QueryBuilder::new(
            "INSERT INTO chat_event (chat_id, revision, event_type, user_id, message_id, created_at) ",
        );
        q.push_values(&events, |mut b, (chat_id, r)| {
            b.push_bind(*chat_id)
                .push_bind(r.revision)
                .push_bind(r.event_type)
                .push_bind(&r.user_id)
                .push_bind(if r.event_type == MESSAGE_SENT {
                    ids.get(&(*chat_id, r.revision)).copied()
                } else {
                    None
                })
                .push_bind(r.created_at);
        });
        q.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// The revisions of `chat_ids` here, locked for the caller's transaction:
/// where each copy goes on from.
pub async fn lock_revisions(
    conn: &mut MySqlConnection,
    chat_ids: &[&str],
) -> sqlx::Result<std::collections::HashMap<String, u64>> {
    if chat_ids.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    let mut q = sqlx::QueryBuilder::new("SELECT chat_id, revision FROM chat WHERE chat_id IN (");
    let mut list = q.separated(", ");
    for c in chat_ids {
        list.push_bind(*c);
    }
    list.push_unseparated(") FOR UPDATE");
    let rows: Vec<(String, u64)> = q.build_query_as().fetch_all(conn).await?;
    Ok(rows.into_iter().collect())
}

/// The states of each chat's `users`' member rows, locked for the caller's
/// transaction (which holds the chats' row locks): one statement for them all.
pub async fn lock_member_states_of(
    conn: &mut MySqlConnection,
    users: &[(&str, Vec<&str>)],
) -> sqlx::Result<std::collections::HashMap<(String, String), u8>> {
    let users: Vec<&(&str, Vec<&str>)> = users.iter().filter(|(_, u)| !u.is_empty()).collect();
    if users.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    let mut q = sqlx::QueryBuilder::new("SELECT chat_id, user_id, state FROM chat_member WHERE ");
    let mut any = q.separated(" OR ");
    for (chat, list) in users {
        any.push("(chat_id = ")
            .push_bind_unseparated(*chat)
            .push_unseparated(" AND user_id IN (");
        for (i, u) in list.iter().enumerate() {
            if i > 0 {
                any.push_unseparated(", ");
            }
            any.push_bind_unseparated(*u);
        }
        any.push_unseparated("))");
    }
    q.push(" FOR UPDATE");
    let rows: Vec<(String, String, u8)> = q.build_query_as().fetch_all(conn).await?;
    Ok(rows.into_iter().map(|(c, u, s)| ((c, u), s)).collect())
}

/// [`settle`] of several chats in two statements: each chat's revision, and
/// its count changed by its delta.
pub async fn settle_chats(
    conn: &mut MySqlConnection,
    chats: &[(&str, u64, i64)],
) -> sqlx::Result<()> {
    if chats.is_empty() {
        return Ok(());
    }
    let mut q = sqlx::QueryBuilder::new("UPDATE chat SET revision = CASE chat_id ");
    for (chat, revision, _) in chats {
        q.push(" WHEN ")
            .push_bind(*chat)
            .push(" THEN ")
            .push_bind(*revision);
    }
    q.push(" ELSE revision END WHERE chat_id IN (");
    let mut list = q.separated(", ");
    for (chat, ..) in chats {
        list.push_bind(*chat);
    }
    list.push_unseparated(")");
    q.build().execute(&mut *conn).await?;
    let changed: Vec<&(&str, u64, i64)> = chats.iter().filter(|(_, _, d)| *d != 0).collect();
    if changed.is_empty() {
        return Ok(());
    }
    let mut q = sqlx::QueryBuilder::new(
        "UPDATE chat_member_count SET member_count = CAST(member_count AS SIGNED) + CASE chat_id ",
    );
    for (chat, _, delta) in &changed {
        q.push(" WHEN ")
            .push_bind(*chat)
            .push(" THEN ")
            .push_bind(*delta);
    }
    q.push(" ELSE 0 END WHERE chat_id IN (");
    let mut list = q.separated(", ");
    for (chat, ..) in &changed {
        list.push_bind(*chat);
    }
    list.push_unseparated(")");
    q.build().execute(conn).await?;
    Ok(())
}

/// The tables whose ids a copy keeps.
#[derive(Debug, Clone, Copy)]
pub(super) enum IdTable {
    /// `chat_member`, a row named by its user.
    Members,
    /// `chat_message`, a row named by its revision.
    Messages,
}

/// Who holds each of `ids` on this shard: the chat and the row's name in it
/// (user or revision).
pub(super) async fn id_owners(
    conn: &mut MySqlConnection,
    table: IdTable,
    ids: &[u64],
) -> sqlx::Result<std::collections::HashMap<u64, (String, String)>> {
    if ids.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    let mut q = sqlx::QueryBuilder::new(match table {
        IdTable::Members => "SELECT id, chat_id, user_id FROM chat_member WHERE id IN (",
        IdTable::Messages => {
            "SELECT id, chat_id, CAST(revision AS CHAR) FROM chat_message WHERE id IN ("
        }
    });
    let mut list = q.separated(", ");
    for id in ids {
        list.push_bind(*id);
    }
    list.push_unseparated(")");
    let rows: Vec<(u64, String, String)> = q.build_query_as().fetch_all(conn).await?;
    Ok(rows.into_iter().map(|(id, c, n)| (id, (c, n))).collect())
}

/// The id a copied row is inserted with: the source's (`id`), so clients'
/// `memberId` and `messageId` survive the move, unless another row of the
/// target already holds it (rows made before the shards' id series were
/// interleaved, see `storage::server::prepare_session`). Then `None`: the
/// target gives the row a new id of its own series. The same row there
/// already (a retried page) keeps its id, and the insert leaves it alone.
pub(super) fn keep_id(
    owners: &std::collections::HashMap<u64, (String, String)>,
    id: Option<u64>,
    chat_id: &str,
    name: &str,
) -> Option<u64> {
    id.filter(|id| {
        owners
            .get(id)
            .is_none_or(|(c, n)| c == chat_id && n == name)
    })
}

/// Sets the target's revision and count after a replayed batch.
pub async fn settle(
    conn: &mut MySqlConnection,
    chat_id: &str,
    revision: u64,
    delta: i64,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE chat SET revision = ? WHERE chat_id = ?")
        .bind(revision)
        .bind(chat_id)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "UPDATE chat_member_count SET member_count = CAST(member_count AS SIGNED) + ? WHERE chat_id = ?",
    )
    .bind(delta)
    .bind(chat_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Fences the chat's writes on the source for `millis`, inside the caller's
/// transaction (under the chat's row lock, so the write transaction in flight
/// finishes first); returns the revision the fence froze, `None` when the
/// chat is not (or no longer) here.
pub async fn fence(
    conn: &mut MySqlConnection,
    chat_id: &str,
    millis: u64,
) -> sqlx::Result<Option<u64>> {
    let revision: Option<(u64, Option<String>)> =
        sqlx::query_as("SELECT revision, moved_to FROM chat WHERE chat_id = ? FOR UPDATE")
            .bind(chat_id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some((revision, None)) = revision else {
        return Ok(None);
    };
    sqlx::query(
        "UPDATE chat SET fenced_until = DATE_ADD(NOW(6), INTERVAL ? MICROSECOND) WHERE chat_id = ?",
    )
    .bind(millis * 1000)
    .bind(chat_id)
    .execute(conn)
    .await?;
    Ok(Some(revision))
}

/// Lifts a fence (a move that does not switch).
pub async fn unfence(conn: &mut MySqlConnection, chat_id: &str) -> sqlx::Result<()> {
    sqlx::query("UPDATE chat SET fenced_until = NULL WHERE chat_id = ?")
        .bind(chat_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// The switch at the source: the tombstone, only if the fence still holds
/// and the revision is the one verified. `false`: the fence lapsed or the
/// chat moved on; nothing changed.
pub async fn tombstone(
    conn: &mut MySqlConnection,
    chat_id: &str,
    to: &str,
    revision: u64,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE chat SET moved_to = ?, fenced_until = NULL \
         WHERE chat_id = ? AND revision = ? AND moved_to IS NULL AND fenced_until > NOW(6)",
    )
    .bind(to)
    .bind(chat_id)
    .bind(revision)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Sets (or, with `None`, clears) a chat's marker, if the chat has a row here.
pub async fn set_marker(
    conn: &mut MySqlConnection,
    chat_id: &str,
    to: Option<&str>,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE chat SET moved_to = ? WHERE chat_id = ?")
        .bind(to)
        .bind(chat_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// What a copy is verified by: the revision, the count, and per table the
/// rows and a checksum of what identifies them (ids left out: the target
/// gives its own).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Digest {
    pub revision: u64,
    /// The first revision stored; events below it (a purge cut short) are
    /// not counted.
    pub first_revision: u64,
    pub member_count: i64,
    pub joined: i64,
    pub members: (i64, i64),
    pub messages: (i64, i64),
    pub events: (i64, i64),
}

pub async fn digest(conn: &mut MySqlConnection, chat_id: &str) -> sqlx::Result<Digest> {
    let ids = [chat_id.to_owned()];
    digests(conn, &ids)
        .await?
        .remove(chat_id)
        .ok_or(sqlx::Error::RowNotFound)
}

/// [`digest`] of each of `chat_ids` that has a row here, in four statements
/// for them all (run them in one REPEATABLE READ transaction for a
/// consistent view).
pub async fn digests(
    conn: &mut MySqlConnection,
    chat_ids: &[String],
) -> sqlx::Result<std::collections::HashMap<String, Digest>> {
    use std::collections::HashMap;
    if chat_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let within = |sql: &str| {
        let mut q = sqlx::QueryBuilder::new(sql);
        q.push("(");
        let mut list = q.separated(", ");
        for c in chat_ids {
            list.push_bind(c.as_str());
        }
        list.push_unseparated(")");
        q
    };
    let heads: Vec<(String, u64, u64, i64)> = within(
        "SELECT c.chat_id, c.revision, c.first_revision, CAST(n.member_count AS SIGNED) FROM chat c \
         JOIN chat_member_count n ON n.chat_id = c.chat_id WHERE c.chat_id IN ",
    )
    .build_query_as()
    .fetch_all(&mut *conn)
    .await?;
    let mut all: HashMap<String, Digest> = heads
        .into_iter()
        .map(|(chat, revision, first_revision, member_count)| {
            let d = Digest {
                revision,
                first_revision,
                member_count,
                ..Digest::default()
            };
            (chat, d)
        })
        .collect();
    let mut q = within(
        "SELECT chat_id, COUNT(*), CAST(COALESCE(SUM(state = 1), 0) AS SIGNED), \
         CAST(COALESCE(BIT_XOR(CRC32(CONCAT_WS('|', user_id, state))), 0) AS SIGNED) \
         FROM chat_member WHERE chat_id IN ",
    );
    q.push(" GROUP BY chat_id");
    let members: Vec<(String, i64, i64, i64)> = q.build_query_as().fetch_all(&mut *conn).await?;
    for (chat, n, joined, sum) in members {
        if let Some(d) = all.get_mut(&chat) {
            d.joined = joined;
            d.members = (n, sum);
        }
    }
    let mut q = within(
        "SELECT chat_id, COUNT(*), CAST(COALESCE(BIT_XOR(CRC32(CONCAT_WS('|', sender_id, client_message_id, revision, body))), 0) AS SIGNED) \
         FROM chat_message WHERE chat_id IN ",
    );
    q.push(" GROUP BY chat_id");
    let messages: Vec<(String, i64, i64)> = q.build_query_as().fetch_all(&mut *conn).await?;
    for (chat, n, sum) in messages {
        if let Some(d) = all.get_mut(&chat) {
            d.messages = (n, sum);
        }
    }
    let mut q = within(
        "SELECT e.chat_id, COUNT(*), CAST(COALESCE(BIT_XOR(CRC32(CONCAT_WS('|', e.revision, e.event_type, e.user_id, e.created_at))), 0) AS SIGNED) \
         FROM chat_event e JOIN chat c ON c.chat_id = e.chat_id \
         WHERE e.revision >= c.first_revision AND e.chat_id IN ",
    );
    q.push(" GROUP BY e.chat_id");
    let events: Vec<(String, i64, i64)> = q.build_query_as().fetch_all(&mut *conn).await?;
    for (chat, n, sum) in events {
        if let Some(d) = all.get_mut(&chat) {
            d.events = (n, sum);
        }
    }
    Ok(all)
}

/// Deletes up to `limit` of the chat's rows of one table from the source;
/// the rows deleted. The chat row (the tombstone) and its count stay.
pub async fn clean(
    conn: &mut MySqlConnection,
    table: CleanTable,
    chat_id: &str,
    limit: u32,
) -> sqlx::Result<u64> {
    let sql = match table {
        CleanTable::Events => "DELETE FROM chat_event WHERE chat_id = ? LIMIT ?",
        CleanTable::Messages => "DELETE FROM chat_message WHERE chat_id = ? LIMIT ?",
        CleanTable::Members => "DELETE FROM chat_member WHERE chat_id = ? LIMIT ?",
    };
    let done = sqlx::query(sql)
        .bind(chat_id)
        .bind(limit)
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

/// Deletes a copy's chat row and count, only while the row is still marked
/// as held elsewhere (a rolled-back copy, never a live chat).
pub async fn drop_chat_row(conn: &mut MySqlConnection, chat_id: &str) -> sqlx::Result<()> {
    let done = sqlx::query("DELETE FROM chat WHERE chat_id = ? AND moved_to IS NOT NULL")
        .bind(chat_id)
        .execute(&mut *conn)
        .await?;
    if done.rows_affected() == 1 {
        sqlx::query("DELETE FROM chat_member_count WHERE chat_id = ?")
            .bind(chat_id)
            .execute(conn)
            .await?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
pub enum CleanTable {
    Events,
    Messages,
    Members,
}

/// A move as recorded on its source shard.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MoveRow {
    pub id: u64,
    pub chat_id: String,
    pub source: String,
    pub target: String,
    pub phase: String,
    pub copied_revision: u64,
    pub error: Option<String>,
    /// 1 once a cancel was asked for (`DELETE /v1/admin/moves/{id}`).
    pub cancel_requested: u8,
    /// `admin` or `isolation`.
    pub started_by: String,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
    /// Which driver holds the move: 0 for the one that started it, one more
    /// with each takeover ([`claim`]).
    pub driver: u32,
    /// Rows written to the target so far.
    pub rows_copied: u64,
    /// The chat's revision at the source (the record's shard) as read with
    /// the record; `None` when the chat has no row there.
    pub source_revision: Option<u64>,
}

/// The chats of this shard whose row is a marker (`moved_to` set): the
/// chat and the shard it names, at most `limit`, in marker order (served
/// by `ix_chat_moved_to`).
pub async fn markers(
    conn: &mut MySqlConnection,
    limit: u32,
) -> sqlx::Result<Vec<(String, String)>> {
    sqlx::query_as(
        "SELECT chat_id, moved_to FROM chat WHERE moved_to IS NOT NULL \
         ORDER BY moved_to, chat_id LIMIT ?",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Records a new move; a unique violation means the chat has a move running.
pub async fn insert_move(
    conn: &mut MySqlConnection,
    chat_id: &str,
    source: &str,
    target: &str,
    started_by: &str,
    now: NaiveDateTime,
) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "INSERT INTO chat_move (chat_id, source, target, phase, active, copied_revision, started_by, created_at, updated_at) \
         VALUES (?, ?, ?, 'requested', 1, 0, ?, ?, ?)",
    )
    .bind(chat_id)
    .bind(source)
    .bind(target)
    .bind(started_by)
    .bind(now)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(done.last_insert_id())
}

/// Whether an isolation move may start on this shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsolationStart {
    /// Recorded, with its id.
    Started(u64),
    /// A move from this shard is running.
    Busy,
    /// `per_hour` isolation moves started here within the last hour.
    RateLimited,
    /// The chat has a move running.
    ChatMoving,
}

/// Records an isolation move if no move from this shard is running and fewer
/// than `per_hour` isolation moves started here within the hour, all under
/// the guard row's lock so instances take turns (in a transaction).
pub async fn insert_isolation_move(
    conn: &mut MySqlConnection,
    chat_id: &str,
    source: &str,
    target: &str,
    per_hour: u32,
    now: NaiveDateTime,
) -> sqlx::Result<IsolationStart> {
    sqlx::query("SELECT name FROM move_guard WHERE name = 'isolation' FOR UPDATE")
        .fetch_optional(&mut *conn)
        .await?;
    let running: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM chat_move WHERE active = 1")
        .fetch_one(&mut *conn)
        .await?;
    if running > 0 {
        return Ok(IsolationStart::Busy);
    }
    let recent: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM chat_move WHERE started_by = 'isolation' AND created_at > ?",
    )
    .bind(now - chrono::Duration::hours(1))
    .fetch_one(&mut *conn)
    .await?;
    if recent >= i64::from(per_hour) {
        return Ok(IsolationStart::RateLimited);
    }
    match insert_move(conn, chat_id, source, target, "isolation", now).await {
        Ok(id) => Ok(IsolationStart::Started(id)),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(IsolationStart::ChatMoving),
        Err(e) => Err(e),
    }
}

/// Moves a record to `phase` (finished phases free the chat for another
/// move); whether a cancel was asked for.
pub async fn set_phase(
    conn: &mut MySqlConnection,
    (id, driver): (u64, u32),
    phase: &str,
    (copied_revision, rows): (u64, u64),
    error: Option<&str>,
    finished: bool,
    now: NaiveDateTime,
) -> sqlx::Result<Standing> {
    sqlx::query(
        "UPDATE chat_move SET phase = ?, copied_revision = ?, rows_copied = rows_copied + ?, \
         error = ?, updated_at = ?, active = CASE WHEN ? THEN NULL ELSE active END \
         WHERE id = ? AND driver = ?",
    )
    .bind(phase)
    .bind(copied_revision)
    .bind(rows)
    .bind(error)
    .bind(now)
    .bind(finished)
    .bind(id)
    .bind(driver)
    .execute(&mut *conn)
    .await?;
    standing(conn, (id, driver)).await
}

/// Where a move's driver stands with its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// It holds the move, and no cancel was asked for.
    Holds,
    /// It holds the move, and a cancel was asked for.
    Cancelled,
    /// Another driver took the move over (or the record is gone).
    Superseded,
}

/// [`Standing`] of driver `driver` of the move `id`.
pub async fn standing(
    conn: &mut MySqlConnection,
    (id, driver): (u64, u32),
) -> sqlx::Result<Standing> {
    let row: Option<(u8, u32)> =
        sqlx::query_as("SELECT cancel_requested, driver FROM chat_move WHERE id = ?")
            .bind(id)
            .fetch_optional(conn)
            .await?;
    Ok(match row {
        // 2: the bar of an earlier build's takeover.
        Some((c, d)) if d == driver && c != 2 => {
            if c == 0 {
                Standing::Holds
            } else {
                Standing::Cancelled
            }
        }
        _ => Standing::Superseded,
    })
}

/// Whether the move `id` of `table` (`chat_move` or `bucket_move`) has a
/// cancel asked for (`false` when the record cannot be found).
pub(crate) async fn cancel_flag(
    conn: &mut MySqlConnection,
    table: &'static str,
    id: u64,
) -> sqlx::Result<bool> {
    let cancel: Option<u8> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT cancel_requested FROM {table} WHERE id = ?"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await?;
    Ok(cancel.unwrap_or(0) != 0)
}

/// Asks a running move to stop, only while it has not reached its switch
/// (the phases before `switching`); whether it was asked.
pub async fn request_cancel(
    conn: &mut MySqlConnection,
    id: u64,
    now: NaiveDateTime,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE chat_move SET cancel_requested = 1, updated_at = ? \
         WHERE id = ? AND active = 1 AND phase IN ('requested', 'copying', 'fenced', 'verified')",
    )
    .bind(now)
    .bind(id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// How the switch's first step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchStep {
    /// The tombstone stands and the move is `switching`.
    Done,
    /// The fence lapsed (or the chat moved on): nothing changed.
    Lapsed,
    /// A cancel came first: nothing changed.
    Cancelled,
    /// Another driver took the move over: nothing changed.
    Superseded,
}

/// The switch at the source (inside the caller's transaction): under the
/// move row's lock, the tombstone unless the move was cancelled or taken
/// over by another driver, and the move recorded as `switching` with it, so
/// a cancel or a takeover ([`claim`], which writes the same row) either
/// stops the switch or finds the move past it.
pub async fn switch_source(
    conn: &mut MySqlConnection,
    (id, driver): (u64, u32),
    chat_id: &str,
    to: &str,
    revision: u64,
    now: NaiveDateTime,
) -> sqlx::Result<SwitchStep> {
    let row: Option<(u8, u32)> =
        sqlx::query_as("SELECT cancel_requested, driver FROM chat_move WHERE id = ? FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    match row {
        Some((0, d)) if d == driver => {}
        Some((1, d)) if d == driver => return Ok(SwitchStep::Cancelled),
        _ => return Ok(SwitchStep::Superseded),
    }
    if !tombstone(&mut *conn, chat_id, to, revision).await? {
        return Ok(SwitchStep::Lapsed);
    }
    sqlx::query("UPDATE chat_move SET phase = 'switching', updated_at = ? WHERE id = ?")
        .bind(now)
        .bind(id)
        .execute(conn)
        .await?;
    Ok(SwitchStep::Done)
}

/// The running moves recorded on this shard whose record has not changed for
/// `seconds`: their driver is taken for gone.
pub async fn abandoned(conn: &mut MySqlConnection, seconds: u64) -> sqlx::Result<Vec<MoveRow>> {
    sqlx::query_as(
        "SELECT m.id, m.chat_id, m.source, m.target, m.phase, m.copied_revision, m.error, m.cancel_requested, \
                m.started_by, m.created_at, m.updated_at, m.driver, m.rows_copied, \
                c.revision AS source_revision \
         FROM chat_move m LEFT JOIN chat c ON c.chat_id = m.chat_id \
         WHERE m.active = 1 AND m.updated_at < DATE_SUB(NOW(6), INTERVAL ? SECOND)",
    )
    .bind(seconds)
    .fetch_all(conn)
    .await
}

/// Takes an abandoned move over: only if its record is still as `seen`
/// (another instance did not take it first). The record then names the
/// next driver, which this returns: from here the old driver's record
/// writes and switch are refused, even if it was only slow.
pub async fn claim(
    conn: &mut MySqlConnection,
    id: u64,
    seen: NaiveDateTime,
    now: NaiveDateTime,
) -> sqlx::Result<Option<u32>> {
    let done = sqlx::query(
        "UPDATE chat_move SET updated_at = ?, driver = driver + 1 \
         WHERE id = ? AND active = 1 AND updated_at = ?",
    )
    .bind(now)
    .bind(id)
    .bind(seen)
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() != 1 {
        return Ok(None);
    }
    sqlx::query_scalar("SELECT driver FROM chat_move WHERE id = ?")
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// One move recorded on this shard.
pub async fn get_move(conn: &mut MySqlConnection, id: u64) -> sqlx::Result<Option<MoveRow>> {
    sqlx::query_as(
        "SELECT m.id, m.chat_id, m.source, m.target, m.phase, m.copied_revision, m.error, m.cancel_requested, \
                m.started_by, m.created_at, m.updated_at, m.driver, m.rows_copied, \
                c.revision AS source_revision \
         FROM chat_move m LEFT JOIN chat c ON c.chat_id = m.chat_id WHERE m.id = ?",
    )
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// The moves recorded on this shard, newest first.
pub async fn list_moves(conn: &mut MySqlConnection, limit: u32) -> sqlx::Result<Vec<MoveRow>> {
    sqlx::query_as(
        "SELECT m.id, m.chat_id, m.source, m.target, m.phase, m.copied_revision, m.error, m.cancel_requested, \
                m.started_by, m.created_at, m.updated_at, m.driver, m.rows_copied, \
                c.revision AS source_revision \
         FROM chat_move m LEFT JOIN chat c ON c.chat_id = m.chat_id ORDER BY m.id DESC LIMIT ?",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
}
