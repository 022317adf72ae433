//! `direct-sql`: the shard without chatshard, one chat joined over plain SQL
//! connections: one join per transaction, then a batch per transaction.

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

/// `direct-sql`: what the shard itself sustains for one chat without
/// chatshard: `clients` connections, each committing one transaction per
/// join with the same statements a group-commit batch of one runs (lock the
/// chat row, insert the member, append the event, bump revision and count),
/// and then the batched ceiling: `batch` joins per transaction.
pub async fn direct_sql(
    shard_url: &str,
    recorder: &Recorder,
    clients: usize,
    duration: Duration,
    batch: usize,
) -> anyhow::Result<Value> {
    let mut setup = MySqlConnection::connect(shard_url).await?;
    let mut results = Vec::new();
    for (kind, per_txn) in [("direct_join", 1), ("direct_batched", batch.max(1))] {
        let run = run_id(kind);
        let chat = run.clone();
        chats::insert(&mut setup, &chat, 1_000_000, now()).await?;
        let users = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + duration;
        recorder.mark(&format!("{kind} start"));
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let (recorder, users, chat, url) = (
                    recorder.clone(),
                    users.clone(),
                    chat.clone(),
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
        for task in tasks {
            task.await??;
        }
        results.push(json!({"kind": kind, "chat": chat, "joinsPerTransaction": per_txn}));
    }
    Ok(json!({
        "name": "direct-sql",
        "clients": clients,
        "durationSeconds": duration.as_secs_f64(),
        "runs": results,
    }))
}
