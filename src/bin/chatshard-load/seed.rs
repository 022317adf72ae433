//! Rows written straight to a shard, past chatshard: a chat with a long,
//! old log (for the purge) and many small chats (for the digest's cost).

use chatshard::domain::{EventType, MemberState};
use chatshard::service::now;
use chatshard::storage::{chats, members};
use chrono::NaiveDateTime;
use sqlx::MySqlConnection;

use crate::sql::joined;

/// A chat with `n` events 40 days old (the joins of users `u1` to `u{n}`)
/// and their member rows, written straight to the shard in batches.
pub async fn seed_old_log(db: &mut MySqlConnection, chat: &str, n: u64) -> anyhow::Result<()> {
    let at = now() - chrono::Duration::days(40);
    chats::insert(db, chat, 100_000, at).await?;
    let mut revision = 0u64;
    while revision < n {
        let batch: Vec<u64> = ((revision + 1)..=(revision + 2000).min(n)).collect();
        let rows: Vec<(&str, u64)> = batch.iter().map(|r| (chat, *r)).collect();
        insert_join_events(db, &rows, at).await?;
        revision = batch.last().copied().unwrap_or(n);
    }
    // The member rows the joins left, so the chat is whole for the digest.
    let mut user = 0u64;
    while user < n {
        let batch: Vec<u64> = ((user + 1)..=(user + 2000).min(n)).collect();
        let names: Vec<String> = batch.iter().map(|u| format!("u{u}")).collect();
        let rows: Vec<members::NewMember<'_>> = names.iter().map(|u| joined(u, at)).collect();
        members::insert_many(db, chat, &rows, at).await?;
        user = batch.last().copied().unwrap_or(n);
    }
    sqlx::query("UPDATE chat SET revision = ?, checked_revision = ? WHERE chat_id = ?")
        .bind(n)
        .bind(n)
        .bind(chat)
        .execute(&mut *db)
        .await?;
    sqlx::query("UPDATE chat_member_count SET member_count = ? WHERE chat_id = ?")
        .bind(n)
        .bind(chat)
        .execute(&mut *db)
        .await?;
    Ok(())
}

/// `n` chats of 3 members and 3 events each, written straight to the shard.
pub async fn seed_small_chats(
    db: &mut MySqlConnection,
    prefix: &str,
    n: u64,
) -> anyhow::Result<()> {
    let at = now();
    let mut i = 0u64;
    while i < n {
        let ids: Vec<String> = (i..(i + 1000).min(n))
            .map(|k| format!("{prefix}-{k:06}"))
            .collect();
        let mut q = sqlx::QueryBuilder::new(
            "INSERT INTO chat (chat_id, max_members, revision, created_at, checked_revision) ",
        );
        q.push_values(&ids, |mut b, id| {
            b.push_bind(id)
                .push_bind(100u32)
                .push_bind(3u64)
                .push_bind(at)
                .push_bind(3u64);
        });
        q.build().execute(&mut *db).await?;
        let mut q =
            sqlx::QueryBuilder::new("INSERT INTO chat_member_count (chat_id, member_count) ");
        q.push_values(&ids, |mut b, id| {
            b.push_bind(id).push_bind(3u32);
        });
        q.build().execute(&mut *db).await?;
        let rows: Vec<(&str, u64)> = ids
            .iter()
            .flat_map(|id| (1..=3).map(move |r| (id.as_str(), r)))
            .collect();
        let mut q = sqlx::QueryBuilder::new(
            "INSERT INTO chat_member (chat_id, user_id, state, joined_at, left_at, created_at, updated_at) ",
        );
        q.push_values(&rows, |mut b, (id, r)| {
            b.push_bind(*id)
                .push_bind(format!("u{r}"))
                .push_bind(MemberState::Joined.code())
                .push_bind(at)
                .push_bind(None::<NaiveDateTime>)
                .push_bind(at)
                .push_bind(at);
        });
        q.build().execute(&mut *db).await?;
        insert_join_events(db, &rows, at).await?;
        i += 1000;
    }
    Ok(())
}

/// A join event (`MemberJoined`) of user `u{revision}` per `(chat,
/// revision)` of `rows`, created `at`, in one statement.
async fn insert_join_events(
    db: &mut MySqlConnection,
    rows: &[(&str, u64)],
    at: NaiveDateTime,
) -> anyhow::Result<()> {
    let mut q = sqlx::QueryBuilder::new(
        "INSERT INTO chat_event (chat_id, revision, event_type, user_id, message_id, created_at) ",
    );
    q.push_values(rows, |mut b, (chat, r)| {
        b.push_bind(*chat)
            .push_bind(*r)
            .push_bind(EventType::MemberJoined.code())
            .push_bind(format!("u{r}"))
            .push_bind(None::<u64>)
            .push_bind(at);
    });
    q.build().execute(&mut *db).await?;
    Ok(())
}
