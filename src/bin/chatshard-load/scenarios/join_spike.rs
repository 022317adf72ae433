//! `join-spike`: clients join new users to one chat as fast as they are
//! admitted, moving to a fresh chat every [`MEMBERS_PER_CHAT`] members; with
//! the service's pid, its CPU per committed join; from its `/metrics`, the
//! group-commit transactions the joins took.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::client::{MEMBERS_PER_CHAT, Target, run_id};
use crate::procfs::process_usage;
use crate::report::Recorder;

/// `join-spike`: `clients` clients join new users to one chat as fast as they
/// are admitted, for `duration`.
pub async fn join_spike(
    target: &Target,
    recorder: &Recorder,
    clients: usize,
    duration: Duration,
    throttle: bool,
    service_pid: Option<u32>,
) -> anyhow::Result<Value> {
    let run = run_id("spike");
    let chats = Arc::new(ChatRotation::new(target.clone(), run.clone()));
    let first = chats.current().await?;
    if target.admin_token.is_some() {
        target.set_join_throttle(&first, throttle).await?;
    }
    let users = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let cpu_before = service_pid.and_then(process_usage);
    let batches_before = commit_batches(target).await;
    recorder.mark("spike start");
    // With --also, the clients are spread over the fleet's instances.
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let (target, recorder, chats, users) = (
                target.instance(i),
                recorder.clone(),
                chats.clone(),
                users.clone(),
            );
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let n = users.fetch_add(1, Ordering::Relaxed);
                    let chat = match chats.for_member(n, throttle).await {
                        Ok(chat) => chat,
                        Err(e) => return Err(e),
                    };
                    target
                        .join(&recorder, "join", &chat, &format!("u{n}"))
                        .await;
                }
                Ok::<(), anyhow::Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let joined = recorder.ok_count("join");
    // The instance measured takes every join only without --also.
    let commits = match (batches_before, commit_batches(target).await) {
        (Some((n0, s0)), Some((n1, s1))) if target.others.is_empty() && n1 > n0 => {
            let n = n1 - n0;
            json!({
                "transactions": n,
                "joinsPerTransaction": joined as f64 / n,
                "meanTransactionMs": (s1 - s0) * 1000.0 / n,
            })
        }
        _ => Value::Null,
    };
    let cpu = match (cpu_before, service_pid.and_then(process_usage)) {
        (Some((_, a)), Some((_, b))) if joined > 0 => json!({
            "serviceCores": (b - a) / duration.as_secs_f64(),
            "serviceCpuMicrosPerJoin": (b - a) * 1e6 / joined as f64,
        }),
        _ => Value::Null,
    };
    Ok(json!({
        "name": "join-spike",
        "cpu": cpu,
        "commits": commits,
        "clients": clients,
        "instances": target.others.len() + 1,
        "durationSeconds": duration.as_secs_f64(),
        "joinThrottle": if target.admin_token.is_some() { json!(throttle) } else { json!("as configured") },
        "chats": chats.created().await,
    }))
}

/// The group-commit transactions the instance has run (`commit_batch`
/// operations that reached a shard) and their total seconds, from its
/// `/metrics`.
async fn commit_batches(target: &Target) -> Option<(f64, f64)> {
    let text = target.metrics_text().await?;
    let sum_of = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains("operation=\"commit_batch\""))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    Some((
        sum_of("chatshard_shard_operation_duration_seconds_count{"),
        sum_of("chatshard_shard_operation_duration_seconds_sum{"),
    ))
}

/// The chats of a spike: a fresh one every [`MEMBERS_PER_CHAT`] members.
struct ChatRotation {
    target: Target,
    run: String,
    chats: Mutex<Vec<String>>,
}

impl ChatRotation {
    fn new(target: Target, run: String) -> Self {
        Self {
            target,
            run,
            chats: Mutex::new(Vec::new()),
        }
    }

    async fn current(&self) -> anyhow::Result<String> {
        self.for_member(0, true).await
    }

    async fn for_member(&self, n: u64, throttle: bool) -> anyhow::Result<String> {
        let index = (n / MEMBERS_PER_CHAT) as usize;
        let mut chats = self.chats.lock().await;
        while chats.len() <= index {
            let chat = format!("{}-{}", self.run, chats.len());
            self.target.create_chat(&chat).await?;
            if !chats.is_empty() && self.target.admin_token.is_some() {
                self.target.set_join_throttle(&chat, throttle).await?;
            }
            chats.push(chat);
        }
        Ok(chats[index].clone())
    }

    async fn created(&self) -> usize {
        self.chats.lock().await.len()
    }
}
