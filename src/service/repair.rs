//! `chatshard repair-counts`: recompute member counts from member rows.
//!
//! Each chat is repaired in its own short transaction that first locks the chat
//! row, exactly as every writer does, so a repair never races a join or leave:
//! the count it writes is the JOINED row count at that instant. Chats are walked
//! a page at a time in key order, so a shard of millions of chats is repaired
//! without holding anything for long.

use crate::domain::ChatId;
use crate::shard::{OpError, Shard, ShardError, ShardSet};
use crate::storage::repair as sql;

/// A count that did not match its rows, and was fixed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountFix {
    pub shard: String,
    pub chat_id: String,
    /// The stored count (`None` when the count row was missing).
    pub stored: Option<u32>,
    pub actual: u32,
}

/// Chats read per page while walking a shard.
const PAGE: u32 = 500;

/// Repairs one chat, or every chat of every shard.
pub async fn repair_counts(
    shards: &ShardSet,
    only: Option<&ChatId>,
) -> Result<Vec<CountFix>, ShardError> {
    let mut fixes = Vec::new();
    if let Some(chat) = only {
        let shard = shards.for_chat(chat);
        if let Some(fix) = repair_chat(shard, chat.as_str().to_owned()).await? {
            fixes.push(fix);
        }
        return Ok(fixes);
    }
    for shard in shards.all() {
        let mut after = String::new();
        loop {
            let from = after.clone();
            let ids = shard
                .read(None, "repair_list_chats", move |conn| {
                    Box::pin(async move { Ok(sql::chat_ids_after(conn, &from, PAGE).await?) })
                })
                .await?;
            let Some(last) = ids.last().cloned() else {
                break;
            };
            for id in ids {
                if let Some(fix) = repair_chat(shard, id).await? {
                    fixes.push(fix);
                }
            }
            after = last;
        }
    }
    Ok(fixes)
}

async fn repair_chat(shard: &Shard, chat_id: String) -> Result<Option<CountFix>, ShardError> {
    let name = shard.name().to_owned();
    shard
        .write(None, "repair_count", move |conn| {
            Box::pin(async move {
                use sqlx::Connection;
                let mut tx = conn.begin().await?;
                if !sql::lock_chat(&mut tx, &chat_id).await? {
                    return Ok(None);
                }
                let stored = sql::lock_count(&mut tx, &chat_id).await?;
                let actual =
                    u32::try_from(sql::count_joined(&mut tx, &chat_id).await?).unwrap_or(u32::MAX);
                if stored == Some(actual) {
                    tx.rollback().await?;
                    return Ok(None);
                }
                sql::set_count(&mut tx, &chat_id, actual).await?;
                tx.commit().await.map_err(OpError::Commit)?;
                Ok(Some(CountFix {
                    shard: name,
                    chat_id,
                    stored,
                    actual,
                }))
            })
        })
        .await
}
