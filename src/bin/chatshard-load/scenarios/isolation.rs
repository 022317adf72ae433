//! `isolation`: steady traffic on a chat of one shard, alone and then during
//! a join spike on another shard: how much the spike costs the bystander.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::client::{MEMBERS_PER_CHAT, Target, run_id};
use crate::report::Recorder;

/// `isolation`: steady traffic on a chat of shard B, first alone, then while
/// `clients` clients spike joins on a chat of another shard A (its join
/// throttle off). Reports B's p50 and p99 during the spike over alone.
pub async fn isolation(
    target: &Target,
    recorder: &Recorder,
    clients: usize,
    steady_clients: usize,
    duration: Duration,
) -> anyhow::Result<Value> {
    let run = run_id("iso");
    let spike_chat = format!("{run}-a0");
    let shard_a = target.chat_with_poster(&spike_chat, "poster").await?;
    // The spike's chats, all on shard A: a fresh one every 90,000 members.
    let mut spike_chats = vec![spike_chat];
    for i in 1..256 {
        if spike_chats.len() == 8 {
            break;
        }
        let chat = format!("{run}-a{i}");
        if target.chat_with_poster(&chat, "poster").await? == shard_a {
            spike_chats.push(chat);
        }
    }
    for chat in &spike_chats {
        target.set_join_throttle(chat, false).await?;
    }
    let spike_chats = Arc::new(spike_chats);
    let mut steady_chat = None;
    for i in 0..64 {
        let chat = format!("{run}-b{i}");
        if target.chat_with_poster(&chat, "poster").await? != shard_a {
            steady_chat = Some(chat);
            break;
        }
    }
    let Some(steady_chat) = steady_chat else {
        anyhow::bail!("isolation needs a service with at least two shards");
    };
    target.set_join_throttle(&steady_chat, false).await?;
    let half = duration / 2;
    // Alone.
    let until = Instant::now() + half;
    for t in steady(
        target,
        recorder,
        &steady_chat,
        steady_clients,
        "b_alone",
        until,
    ) {
        let _ = t.await;
    }
    // With the spike on shard A.
    recorder.mark("spike on shard A");
    let until = Instant::now() + half;
    let b = steady(
        target,
        recorder,
        &steady_chat,
        steady_clients,
        "b_during_spike",
        until,
    );
    let users = Arc::new(AtomicU64::new(0));
    let spike: Vec<_> = (0..clients)
        .map(|_| {
            let (target, recorder, chats, users) = (
                target.clone(),
                recorder.clone(),
                spike_chats.clone(),
                users.clone(),
            );
            tokio::spawn(async move {
                while Instant::now() < until {
                    let n = users.fetch_add(1, Ordering::Relaxed);
                    let Some(chat) = chats.get((n / MEMBERS_PER_CHAT) as usize) else {
                        return;
                    };
                    target
                        .join(&recorder, "a_spike_join", chat, &format!("s{n}"))
                        .await;
                }
            })
        })
        .collect();
    for t in b.into_iter().chain(spike) {
        let _ = t.await;
    }
    let ratio = |q: f64| match (
        recorder.quantile_ms("b_during_spike", q),
        recorder.quantile_ms("b_alone", q),
    ) {
        (Some(during), Some(alone)) if alone > 0.0 => json!(during / alone),
        _ => Value::Null,
    };
    Ok(json!({
        "name": "isolation",
        "spikeClients": clients,
        "steadyClients": steady_clients,
        "shardA": shard_a,
        "shardBP50Ratio": ratio(0.5),
        "shardBP99Ratio": ratio(0.99),
    }))
}

/// Steady traffic on one chat: `clients` clients, each a join of a new user
/// then a member-count read every 20 ms (100 requests/s per client),
/// recorded under `kind`, until `until`.
fn steady(
    target: &Target,
    recorder: &Recorder,
    chat: &str,
    clients: usize,
    kind: &'static str,
    until: Instant,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|c| {
            let (target, recorder, chat) = (target.clone(), recorder.clone(), chat.to_owned());
            tokio::spawn(async move {
                let mut n = 0u64;
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while Instant::now() < until {
                    tick.tick().await;
                    n += 1;
                    target
                        .join(&recorder, kind, &chat, &format!("{kind}-{c}-{n}"))
                        .await;
                    target.read_count(&recorder, kind, &chat).await;
                }
            })
        })
        .collect()
}
