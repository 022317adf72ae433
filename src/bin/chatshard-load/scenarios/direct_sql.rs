//! `direct-sql`: the shard without chatshard, one chat (or one per
//! connection) joined over plain SQL connections: one join per transaction,
//! then a batch per transaction; and what a member and an event row take on
//! disk.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chatshard::service::now;
use chatshard::storage::chats;
use serde_json::{Value, json};
use sqlx::{Connection, MySqlConnection};

use crate::client::run_id;
use crate::report::Recorder;
use crate::sql::{connect_read_committed, join_in_one_transaction, sql_answer};

/// `direct-sql`: what the shard itself sustains without chatshard:
/// `clients` connections, each committing one transaction per join with the
/// same statements a group-commit batch of one runs (lock the chat row,
/// insert the member, append the event, bump revision and count), and then
/// the batched ceiling: `batch` joins per transaction. With `chats` = 1 every
/// connection joins the same chat (its row lock sets the pace); with more,
/// connection `c` joins chat `c % chats` (the shard's commits set it).
pub async fn direct_sql(
    shard_url: &str,
    recorder: &Recorder,
    clients: usize,
    duration: Duration,
    batch: usize,
    chat_count: usize,
) -> anyhow::Result<Value> {
    let mut setup = MySqlConnection::connect(shard_url).await?;
    let mut results = Vec::new();
    for (kind, per_txn) in [("direct_join", 1), ("direct_batched", batch.max(1))] {
        let run = run_id(kind);
        let mut chat_ids = Vec::with_capacity(chat_count);
        for i in 0..chat_count.max(1) {
            let chat = if i == 0 {
                run.clone()
            } else {
                format!("{run}-{i}")
            };
            chats::insert(&mut setup, &chat, 1_000_000, now()).await?;
            chat_ids.push(chat);
        }
        let chat = run.clone();
        let users = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + duration;
        let started_at = Instant::now();
        recorder.mark(&format!("{kind} start"));
        let tasks: Vec<_> = (0..clients)
            .map(|c| {
                let (recorder, users, chat, url) = (
                    recorder.clone(),
                    users.clone(),
                    chat_ids[c % chat_ids.len()].clone(),
                    shard_url.to_owned(),
                );
                tokio::spawn(async move {
                    let mut conn = connect_read_committed(&url).await?;
                    while Instant::now() < deadline {
                        let first = users.fetch_add(per_txn as u64, Ordering::Relaxed);
                        let names: Vec<String> = (first..first + per_txn as u64)
                            .map(|n| format!("u{n}"))
                            .collect();
                        let started = Instant::now();
                        let result = join_in_one_transaction(&mut conn, &chat, &names).await;
                        let took = started.elapsed();
                        match result {
                            Ok(()) => {
                                for _ in &names {
                                    recorder.record(kind, took, "committed", true);
                                }
                            }
                            Err(e) => recorder.record(kind, took, &sql_answer(&e), false),
                        }
                    }
                    Ok::<(), anyhow::Error>(())
                })
            })
            .collect();
        let committed_before = recorder.ok_count(kind);
        for task in tasks {
            task.await??;
        }
        let joins = recorder.ok_count(kind) - committed_before;
        let seconds = started_at.elapsed().as_secs_f64().max(1e-9);
        results.push(json!({
            "kind": kind,
            "chat": chat,
            "chats": chat_ids.len(),
            "joinsPerTransaction": per_txn,
            "commitsPerSecond": joins as f64 / per_txn as f64 / seconds,
        }));
    }
    Ok(json!({
        "name": "direct-sql",
        "clients": clients,
        "chats": chat_count,
        "durationSeconds": duration.as_secs_f64(),
        "runs": results,
        "storage": row_sizes(&mut setup).await.unwrap_or(Value::Null),
    }))
}

/// What a member row and an event row take on the shard, indexes included
/// (InnoDB's statistics after `ANALYZE TABLE`: an estimate, of every row the
/// shard holds).
async fn row_sizes(conn: &mut MySqlConnection) -> anyhow::Result<Value> {
    let mut out = serde_json::Map::new();
    for (key, table) in [
        ("memberBytesPerRow", "chat_member"),
        ("eventBytesPerRow", "chat_event"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE TABLE {table}")))
            .execute(&mut *conn)
            .await?;
        let (bytes, rows): (i64, i64) = sqlx::query_as(
            "SELECT CAST(data_length + index_length AS SIGNED), CAST(table_rows AS SIGNED) \
             FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = ?",
        )
        .bind(table)
        .fetch_one(&mut *conn)
        .await?;
        if rows > 0 {
            out.insert(key.to_owned(), json!(bytes as f64 / rows as f64));
        }
    }
    Ok(Value::Object(out))
}
