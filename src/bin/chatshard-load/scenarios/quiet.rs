//! `quiet`: one client's sequential joins and count reads on quiet chats
//! through chatshard, then the same done directly with sqlx: what chatshard
//! adds to an unloaded request.

use std::time::{Duration, Instant};

use chatshard::service::now;
use chatshard::storage::chats;
use serde_json::{Value, json};

use crate::client::{Target, run_id};
use crate::report::Recorder;
use crate::sql::{connect_read_committed, join_in_one_transaction, sql_answer};

/// `quiet`: one client, sequential joins and count reads on quiet chats
/// through chatshard, then the same operations done directly with sqlx in one
/// transaction (what a chat server would do without chatshard), for
/// `duration` each.
pub async fn quiet(
    target: &Target,
    shard_url: Option<&str>,
    recorder: &Recorder,
    duration: Duration,
) -> anyhow::Result<Value> {
    let run = run_id("quiet");
    let chats: Vec<String> = (0..20).map(|i| format!("{run}-{i}")).collect();
    for chat in &chats {
        target.create_chat(chat).await?;
    }
    recorder.mark("through chatshard");
    let deadline = Instant::now() + duration;
    let mut n = 0u64;
    while Instant::now() < deadline {
        let chat = &chats[(n % chats.len() as u64) as usize];
        target
            .join(recorder, "quiet_join", chat, &format!("q{n}"))
            .await;
        target.read_count(recorder, "quiet_count", chat).await;
        n += 1;
    }
    if let Some(url) = shard_url {
        let mut conn = connect_read_committed(url).await?;
        let direct: Vec<String> = (0..20).map(|i| format!("{run}-direct-{i}")).collect();
        for chat in &direct {
            chats::insert(&mut conn, chat, 100_000, now()).await?;
        }
        recorder.mark("direct sqlx");
        let deadline = Instant::now() + duration;
        let mut n = 0u64;
        while Instant::now() < deadline {
            let chat = &direct[(n % direct.len() as u64) as usize];
            let started = Instant::now();
            let result = join_in_one_transaction(&mut conn, chat, &[format!("q{n}")]).await;
            let answer = result
                .as_ref()
                .map_or_else(sql_answer, |()| "committed".to_owned());
            recorder.record("direct_join", started.elapsed(), &answer, result.is_ok());
            let started = Instant::now();
            let result = chats::member_count(&mut conn, chat).await;
            let answer = result
                .as_ref()
                .map_or_else(sql_answer, |_| "read".to_owned());
            recorder.record("direct_count", started.elapsed(), &answer, result.is_ok());
            n += 1;
        }
    }
    Ok(json!({
        "name": "quiet",
        "durationSeconds": duration.as_secs_f64(),
        "direct": shard_url.is_some(),
    }))
}
