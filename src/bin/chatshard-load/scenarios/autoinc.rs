//! `autoinc`: the incident's database lesson on two local shards the tool
//! starts, `innodb_autoinc_lock_mode=1` and `=2`: member inserts with plain
//! `INSERT ... VALUES`, then with `INSERT ... SELECT`.

use std::time::{Duration, Instant};

use chatshard::localdb::cluster::{LocalCluster, Location};
use chatshard::service::now;
use chatshard::storage::{chats, members};
use serde_json::{Value, json};
use sqlx::{Connection, MySqlConnection};

use crate::client::run_id;
use crate::report::Recorder;
use crate::sql::{joined, sql_answer};

/// The statement OpenChat's join spike serialised on under
/// `innodb_autoinc_lock_mode=1`: an `INSERT ... SELECT`, a "bulk insert" whose
/// row count InnoDB cannot know in advance, so it holds the table-level
/// AUTO-INC lock to the end of the statement. chatshard itself never runs it
/// (its inserts are plain `INSERT ... VALUES`, `storage::members`); it is here
/// only to reproduce the lesson.
const INSERT_SELECT: &str = "INSERT INTO chat_member \
     (chat_id, user_id, state, joined_at, left_at, created_at, updated_at) \
     SELECT chat_id, ?, 1, ?, NULL, ?, ? FROM chat WHERE chat_id = ?";

/// `autoinc`: the incident's database lesson. Starts a local shard with
/// `innodb_autoinc_lock_mode=1` and one with `=2`, and on each runs `writers`
/// connections, each inserting members of its own chat one autocommit
/// statement at a time, first with plain `INSERT ... VALUES` (chatshard's
/// statement), then with `INSERT ... SELECT`, for `duration` each.
pub async fn autoinc(
    recorder: &Recorder,
    writers: usize,
    duration: Duration,
) -> anyhow::Result<Value> {
    let mut runs = Vec::new();
    for mode in [1u8, 2] {
        let args = [format!("--innodb-autoinc-lock-mode={mode}")];
        let mut cluster = LocalCluster::start_with_args(1, Location::Temp, &args).await?;
        let url = cluster.settings()?.shards[0].url.clone();
        for (statement, kind) in [
            (
                "values",
                if mode == 1 {
                    "mode1_insert_values"
                } else {
                    "mode2_insert_values"
                },
            ),
            (
                "select",
                if mode == 1 {
                    "mode1_insert_select"
                } else {
                    "mode2_insert_select"
                },
            ),
        ] {
            let run = run_id(kind);
            let deadline = Instant::now() + duration;
            recorder.mark(&format!("{kind} start"));
            let tasks: Vec<_> = (0..writers)
                .map(|w| {
                    let (recorder, url, chat) =
                        (recorder.clone(), url.clone(), format!("{run}-{w}"));
                    tokio::spawn(async move {
                        let mut conn = MySqlConnection::connect(&url).await?;
                        chats::insert(&mut conn, &chat, 1_000_000, now()).await?;
                        let mut n = 0u64;
                        while Instant::now() < deadline {
                            n += 1;
                            let user = format!("u{n}");
                            let at = now();
                            let started = Instant::now();
                            let result = if statement == "values" {
                                let row = joined(&user, at);
                                members::insert_many(&mut conn, &chat, &[row], at).await
                            } else {
                                sqlx::query(INSERT_SELECT)
                                    .bind(&user)
                                    .bind(at)
                                    .bind(at)
                                    .bind(at)
                                    .bind(&chat)
                                    .execute(&mut conn)
                                    .await
                                    .map(|_| ())
                            };
                            match result {
                                Ok(()) => {
                                    recorder.record(kind, started.elapsed(), "inserted", true)
                                }
                                Err(e) => {
                                    recorder.record(kind, started.elapsed(), &sql_answer(&e), false)
                                }
                            }
                        }
                        Ok::<(), anyhow::Error>(())
                    })
                })
                .collect();
            for task in tasks {
                task.await??;
            }
            runs.push(json!({
                "autoincLockMode": mode,
                "statement": statement,
                "kind": kind,
                "insertsPerSecond": recorder.ok_count(kind) as f64 / duration.as_secs_f64(),
                "p50Ms": recorder.quantile_ms(kind, 0.5),
                "p99Ms": recorder.quantile_ms(kind, 0.99),
            }));
        }
        cluster.stop().await;
    }
    Ok(json!({"name": "autoinc", "writers": writers, "runs": runs}))
}
