//! The statements of a bucket-range move's bulk copy (docs/moving-chats.md,
//! "Bucket ranges"): the range's chats found through `ix_chat_bucket`, many
//! chats' rows read in one consistent snapshot and written in one target
//! transaction, the logs of many changed chats read in one statement, the
//! range's fence on every live chat row, its tombstones, and the clean-up of
//! either side. A single chat's copy uses the same row inserts
//! (`move_snapshot.rs`) and the same replay (`moves.rs`).

use chrono::NaiveDateTime;
use sqlx::{MySqlConnection, QueryBuilder};

use super::messages::MessageRow;
use super::move_snapshot::{
    EventRow, MemberRow, insert_event_rows, insert_member_rows, insert_message_rows,
};
use super::moves::LogRow;

/// A chat of the range as one side of the move holds it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RangeChat {
    pub bucket: u16,
    pub chat_id: String,
    pub revision: u64,
    pub first_revision: u64,
    pub moved_to: Option<String>,
}

/// The range's chats after `(bucket, chat)` in index order, at most `limit`.
pub async fn chats(
    conn: &mut MySqlConnection,
    (first, last): (u16, u16),
    (bucket, chat): (u16, &str),
    limit: u32,
) -> sqlx::Result<Vec<RangeChat>> {
    sqlx::query_as(
        "SELECT bucket, chat_id, revision, first_revision, moved_to FROM chat \
         WHERE bucket BETWEEN ? AND ? AND (bucket > ? OR (bucket = ? AND chat_id > ?)) \
         ORDER BY bucket, chat_id LIMIT ?",
    )
    .bind(first)
    .bind(last)
    .bind(bucket)
    .bind(bucket)
    .bind(chat)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// The range's chats among `ids` (any order): a pass's own chats read
/// again, on either side.
pub async fn chats_named(
    conn: &mut MySqlConnection,
    (first, last): (u16, u16),
    ids: &[String],
) -> sqlx::Result<Vec<RangeChat>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut q = QueryBuilder::new(
        "SELECT bucket, chat_id, revision, first_revision, moved_to FROM chat WHERE bucket BETWEEN ",
    );
    q.push_bind(first)
        .push(" AND ")
        .push_bind(last)
        .push(" AND chat_id IN ");
    in_list(&mut q, ids);
    q.build_query_as().fetch_all(conn).await
}

/// A chat's row and count as the copy takes them.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ChatHead {
    pub chat_id: String,
    pub bucket: u16,
    pub max_members: u32,
    pub revision: u64,
    pub first_revision: u64,
    pub created_at: NaiveDateTime,
    pub member_count: u32,
}

/// Many chats' rows as they stood at one instant.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub chats: Vec<ChatHead>,
    pub members: Vec<(String, MemberRow)>,
    pub messages: Vec<(String, MessageRow)>,
    pub events: Vec<(String, EventRow)>,
}

impl Snapshot {
    /// The rows the snapshot holds, chat rows included.
    pub fn rows(&self) -> u64 {
        (self.chats.len() + self.members.len() + self.messages.len() + self.events.len()) as u64
    }
}

#[derive(sqlx::FromRow)]
struct Owned<T> {
    chat_id: String,
    #[sqlx(flatten)]
    row: T,
}

fn pair<T>(o: Owned<T>) -> (String, T) {
    (o.chat_id, o.row)
}

fn in_list(q: &mut QueryBuilder<sqlx::MySql>, ids: &[String]) {
    q.push("(");
    let mut list = q.separated(", ");
    for id in ids {
        list.push_bind(id.as_str());
    }
    list.push_unseparated(")");
}

/// Reads the live ones of `ids` (not marked as held elsewhere), with every
/// member, message and stored event. The caller runs it in one REPEATABLE
/// READ transaction, so each chat's rows are those of its revision read.
pub async fn read_snapshot(conn: &mut MySqlConnection, ids: &[String]) -> sqlx::Result<Snapshot> {
    if ids.is_empty() {
        return Ok(Snapshot::default());
    }
    let mut q = QueryBuilder::new(
        "SELECT c.chat_id, c.bucket, c.max_members, c.revision, c.first_revision, c.created_at, \
         n.member_count FROM chat c JOIN chat_member_count n ON n.chat_id = c.chat_id \
         WHERE c.moved_to IS NULL AND c.chat_id IN ",
    );
    in_list(&mut q, ids);
    let chats: Vec<ChatHead> = q.build_query_as().fetch_all(&mut *conn).await?;
    let live: Vec<String> = chats.iter().map(|c| c.chat_id.clone()).collect();
    if live.is_empty() {
        return Ok(Snapshot::default());
    }
    let mut q = QueryBuilder::new(
        "SELECT chat_id, id, user_id, state, joined_at, left_at, created_at, updated_at \
         FROM chat_member WHERE chat_id IN ",
    );
    in_list(&mut q, &live);
    let members: Vec<Owned<MemberRow>> = q.build_query_as().fetch_all(&mut *conn).await?;
    let mut q = QueryBuilder::new(
        "SELECT chat_id, id, sender_id, client_message_id, revision, body, created_at \
         FROM chat_message WHERE chat_id IN ",
    );
    in_list(&mut q, &live);
    let messages: Vec<Owned<MessageRow>> = q.build_query_as().fetch_all(&mut *conn).await?;
    let mut q = QueryBuilder::new(
        "SELECT e.chat_id, e.revision, e.event_type, e.user_id, e.created_at \
         FROM chat_event e JOIN chat c ON c.chat_id = e.chat_id \
         WHERE e.revision >= c.first_revision AND e.chat_id IN ",
    );
    in_list(&mut q, &live);
    q.push(" ORDER BY e.chat_id, e.revision");
    let events: Vec<Owned<EventRow>> = q.build_query_as().fetch_all(&mut *conn).await?;
    Ok(Snapshot {
        chats,
        members: members.into_iter().map(pair).collect(),
        messages: messages.into_iter().map(pair).collect(),
        events: events.into_iter().map(pair).collect(),
    })
}

/// Why a target cannot take a range's copy.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    /// A chat of the range is live on the target already.
    #[error("chat {0} is live on the target shard")]
    Live(String),
}

/// Writes a snapshot to the target (inside the caller's transaction): each
/// chat's row marked as held by `source`, its count, and its rows with their
/// ids (see `moves::keep_id`). Whatever the target held of those chats
/// under a marker (a copy of an earlier pass, a tombstone of an earlier
/// move away) is replaced; a chat live there stops the copy.
pub async fn write_snapshot(
    conn: &mut MySqlConnection,
    snap: &Snapshot,
    source: &str,
) -> Result<(), WriteError> {
    if snap.chats.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = snap.chats.iter().map(|c| c.chat_id.clone()).collect();
    let mut q = QueryBuilder::new("SELECT chat_id, moved_to FROM chat WHERE chat_id IN ");
    in_list(&mut q, &ids);
    q.push(" FOR UPDATE");
    let held: Vec<(String, Option<String>)> = q.build_query_as().fetch_all(&mut *conn).await?;
    if let Some((chat, _)) = held.iter().find(|(_, to)| to.is_none()) {
        return Err(WriteError::Live(chat.clone()));
    }
    let stale: Vec<String> = held.into_iter().map(|(c, _)| c).collect();
    drop_rows(&mut *conn, &stale, None).await?;
    let mut q = QueryBuilder::new(
        "INSERT INTO chat (chat_id, max_members, revision, first_revision, created_at, bucket, moved_to) ",
    );
    q.push_values(&snap.chats, |mut b, c| {
        b.push_bind(&c.chat_id)
            .push_bind(c.max_members)
            .push_bind(c.revision)
            .push_bind(c.first_revision)
            .push_bind(c.created_at)
            .push_bind(c.bucket)
            .push_bind(source);
    });
    q.build().execute(&mut *conn).await?;
    let mut q = QueryBuilder::new("INSERT INTO chat_member_count (chat_id, member_count) ");
    q.push_values(&snap.chats, |mut b, c| {
        b.push_bind(&c.chat_id).push_bind(c.member_count);
    });
    q.build().execute(&mut *conn).await?;
    let members: Vec<(&str, &MemberRow)> =
        snap.members.iter().map(|(c, r)| (c.as_str(), r)).collect();
    for chunk in members.chunks(2000) {
        insert_member_rows(&mut *conn, chunk).await?;
    }
    let messages: Vec<(&str, &MessageRow)> =
        snap.messages.iter().map(|(c, r)| (c.as_str(), r)).collect();
    for chunk in messages.chunks(1000) {
        insert_message_rows(&mut *conn, chunk).await?;
    }
    let events: Vec<(&str, &EventRow)> = snap.events.iter().map(|(c, r)| (c.as_str(), r)).collect();
    for chunk in events.chunks(2000) {
        insert_event_rows(&mut *conn, chunk).await?;
    }
    Ok(())
}

/// Deletes `ids`' rows and chat rows from this shard, only where the chat
/// row is marked as held elsewhere (`to`: by that shard only), never a live
/// chat's. The chat rows deleted.
pub async fn drop_rows(
    conn: &mut MySqlConnection,
    ids: &[String],
    to: Option<&str>,
) -> sqlx::Result<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    let mut q = QueryBuilder::new("SELECT chat_id FROM chat WHERE moved_to IS NOT NULL");
    if let Some(to) = to {
        q.push(" AND moved_to = ").push_bind(to);
    }
    q.push(" AND chat_id IN ");
    in_list(&mut q, ids);
    q.push(" FOR UPDATE");
    let marked: Vec<String> = q.build_query_scalar().fetch_all(&mut *conn).await?;
    if marked.is_empty() {
        return Ok(0);
    }
    for table in [
        "chat_event",
        "chat_message",
        "chat_member",
        "chat_member_count",
        "chat",
    ] {
        let mut q = QueryBuilder::new(format!("DELETE FROM {table} WHERE chat_id IN "));
        in_list(&mut q, &marked);
        q.build().execute(&mut *conn).await?;
    }
    Ok(marked.len() as u64)
}

/// The logs of several chats, each after its revision and up to its
/// `upto`, at most `limit` events of each, oldest first per chat: one
/// statement (a `UNION ALL` of primary-key ranges).
pub async fn logs_after(
    conn: &mut MySqlConnection,
    from: &[(String, u64, u64)],
    limit: u32,
) -> sqlx::Result<Vec<(String, LogRow)>> {
    if from.is_empty() {
        return Ok(Vec::new());
    }
    let mut q = QueryBuilder::new("");
    for (i, (chat, after, upto)) in from.iter().enumerate() {
        if i > 0 {
            q.push(" UNION ALL ");
        }
        q.push(
            "(SELECT e.chat_id, e.revision, e.event_type, e.user_id, e.created_at, \
                mb.id AS member_id, e.message_id, \
                m.sender_id, m.client_message_id, m.body, m.created_at AS message_created_at \
             FROM chat_event e LEFT JOIN chat_message m ON m.id = e.message_id \
             LEFT JOIN chat_member mb \
               ON e.event_type <> 1 AND mb.chat_id = e.chat_id AND mb.user_id = e.user_id \
             WHERE e.chat_id = ",
        )
        .push_bind(chat.as_str())
        .push(" AND e.revision > ")
        .push_bind(*after)
        .push(" AND e.revision <= ")
        .push_bind(*upto)
        .push(" ORDER BY e.revision LIMIT ")
        .push_bind(limit)
        .push(")");
    }
    let rows: Vec<Owned<LogRow>> = q.build_query_as().fetch_all(conn).await?;
    Ok(rows.into_iter().map(|o| (o.chat_id, o.row)).collect())
}

/// Fences the range's live chats on the source for `ms` (inside the
/// caller's transaction, which holds the range's creation fence): every
/// live chat row is locked, so the write transactions in flight finish
/// first, and each write after meets the fence. The chats and the
/// revisions the fence froze.
pub async fn fence(
    conn: &mut MySqlConnection,
    (first, last): (u16, u16),
    ms: u64,
) -> sqlx::Result<Vec<(String, u64)>> {
    sqlx::query(
        "UPDATE chat SET fenced_until = DATE_ADD(NOW(6), INTERVAL ? MICROSECOND) \
         WHERE bucket BETWEEN ? AND ? AND moved_to IS NULL",
    )
    .bind(ms * 1000)
    .bind(first)
    .bind(last)
    .execute(&mut *conn)
    .await?;
    sqlx::query_as(
        "SELECT chat_id, revision FROM chat WHERE bucket BETWEEN ? AND ? AND moved_to IS NULL",
    )
    .bind(first)
    .bind(last)
    .fetch_all(conn)
    .await
}

/// Lifts the fence of the range's live chats on the source.
pub async fn unfence(conn: &mut MySqlConnection, (first, last): (u16, u16)) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE chat SET fenced_until = NULL \
         WHERE bucket BETWEEN ? AND ? AND fenced_until IS NOT NULL",
    )
    .bind(first)
    .bind(last)
    .execute(conn)
    .await?;
    Ok(())
}

/// The range's live chats on the source whose fence does not hold (lapsed,
/// or never set: made before the fence by a creation it did not see), and
/// a checksum of the live chats' revisions: what the flip checks.
pub async fn unfenced(
    conn: &mut MySqlConnection,
    (first, last): (u16, u16),
) -> sqlx::Result<(i64, i64, i64)> {
    sqlx::query_as(
        "SELECT CAST(COALESCE(SUM(fenced_until IS NULL OR fenced_until <= NOW(6)), 0) AS SIGNED), \
                COUNT(*), CAST(COALESCE(SUM(revision), 0) AS SIGNED) \
         FROM chat WHERE bucket BETWEEN ? AND ? AND moved_to IS NULL",
    )
    .bind(first)
    .bind(last)
    .fetch_one(conn)
    .await
}

/// The flip's tombstones on the source (inside its transaction): every live
/// chat of the range now names `to`; the chats tombstoned.
pub async fn tombstone(
    conn: &mut MySqlConnection,
    (first, last): (u16, u16),
    to: &str,
) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "UPDATE chat SET moved_to = ?, fenced_until = NULL \
         WHERE bucket BETWEEN ? AND ? AND moved_to IS NULL",
    )
    .bind(to)
    .bind(first)
    .bind(last)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Makes the range's copies on the target live (their marker named the
/// source); the chats made live.
pub async fn go_live(
    conn: &mut MySqlConnection,
    (first, last): (u16, u16),
    source: &str,
) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "UPDATE chat SET moved_to = NULL WHERE bucket BETWEEN ? AND ? AND moved_to = ?",
    )
    .bind(first)
    .bind(last)
    .bind(source)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Up to `limit` of the range's chats here that are marked as held by `to`,
/// after `after` (in chat order): the source's tombstones to clean behind,
/// or the target's copies to drop.
pub async fn marked(
    conn: &mut MySqlConnection,
    (first, last): (u16, u16),
    to: &str,
    after: &str,
    limit: u32,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT chat_id FROM chat WHERE moved_to = ? AND bucket BETWEEN ? AND ? AND chat_id > ? \
         ORDER BY chat_id LIMIT ?",
    )
    .bind(to)
    .bind(first)
    .bind(last)
    .bind(after)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Deletes up to `limit` rows of one table of tombstoned chats `ids` (the
/// chat rows and their counts stay); the rows deleted.
pub async fn clean(
    conn: &mut MySqlConnection,
    table: super::moves::CleanTable,
    ids: &[String],
    limit: u32,
) -> sqlx::Result<u64> {
    use super::moves::CleanTable;
    if ids.is_empty() {
        return Ok(0);
    }
    let name = match table {
        CleanTable::Events => "chat_event",
        CleanTable::Messages => "chat_message",
        CleanTable::Members => "chat_member",
    };
    let mut q = QueryBuilder::new(format!("DELETE FROM {name} WHERE chat_id IN "));
    in_list(&mut q, ids);
    q.push(" LIMIT ").push_bind(limit);
    Ok(q.build().execute(conn).await?.rows_affected())
}
