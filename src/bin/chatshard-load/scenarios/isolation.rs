//! `isolation`: steady traffic on a chat of one shard, alone and then during
//! a join spike on another shard: how much the spike costs the bystander,
//! end to end and, from the service's per-shard request histograms, split
//! between chatshard's own part (with its waits) and the database's.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::client::{MEMBERS_PER_CHAT, Target, run_id};
use crate::procfs::scheduler_times;
use crate::prom::Buckets;
use crate::report::Recorder;

/// `isolation`: steady traffic on a chat of shard B, first alone, then while
/// `clients` clients spike joins on a chat of another shard A (its join
/// throttle off). Reports B's p50 and p99 during the spike over alone, end
/// to end, and the same for the parts of B's requests in the service
/// ([`PARTS`]), read from `/metrics` at the start and end of each half.
///
/// With `service_pid` (same machine), also how long the service's threads
/// waited for a CPU in each half: what its own part of a request can grow
/// by without any queue of chatshard's.
pub async fn isolation(
    target: &Target,
    recorder: &Recorder,
    clients: usize,
    steady_clients: usize,
    duration: Duration,
    service_pid: Option<u32>,
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
        let shard = target.chat_with_poster(&chat, "poster").await?;
        if shard != shard_a {
            steady_chat = Some((chat, shard));
            break;
        }
    }
    let Some((steady_chat, shard_b)) = steady_chat else {
        anyhow::bail!("isolation needs a service with at least two shards");
    };
    target.set_join_throttle(&steady_chat, false).await?;
    let half = duration / 2;
    let parts_now = || async { target.metrics_text().await.map(|t| parts(&t, &shard_b)) };
    let scheduler = || {
        service_pid
            .and_then(scheduler_times)
            .map(|times| (Instant::now(), times))
    };
    // Alone.
    let at_start = parts_now().await;
    let sched_start = scheduler();
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
    let at_spike = parts_now().await;
    let sched_spike = scheduler();
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
    // B's own requests end first: the reading is taken before the spike's
    // last answers come in, and B's series hold only B's traffic.
    for t in b {
        let _ = t.await;
    }
    let at_end = parts_now().await;
    let sched_end = scheduler();
    for t in spike {
        let _ = t.await;
    }
    let ratio = |q: f64| match (
        recorder.quantile_ms("b_during_spike", q),
        recorder.quantile_ms("b_alone", q),
    ) {
        (Some(during), Some(alone)) if alone > 0.0 => json!(during / alone),
        _ => Value::Null,
    };
    let split = match (at_start, at_spike, at_end) {
        (Some(start), Some(spike), Some(end)) => split_of(&start, &spike, &end),
        _ => Value::Null,
    };
    Ok(json!({
        "name": "isolation",
        "spikeClients": clients,
        "steadyClients": steady_clients,
        "shardA": shard_a,
        "shardB": shard_b,
        "shardBP50Ratio": ratio(0.5),
        "shardBP99Ratio": ratio(0.99),
        "shardBInService": split,
        "serviceThreads": {
            "alone": cpu_and_waits(sched_start, sched_spike),
            "duringSpike": cpu_and_waits(sched_spike, sched_end),
        },
    }))
}

type SchedulerReading = Option<(Instant, (f64, f64))>;

/// The service's cores used and its threads' wait for a CPU (seconds per
/// second of the phase) between two readings.
fn cpu_and_waits(from: SchedulerReading, to: SchedulerReading) -> Value {
    match (from, to) {
        (Some((t0, (ran0, waited0))), Some((t1, (ran1, waited1)))) => {
            let seconds = t1.duration_since(t0).as_secs_f64().max(1e-9);
            json!({
                "cores": (ran1 - ran0) / seconds,
                "waitingForCpuPerSecond": (waited1 - waited0) / seconds,
            })
        }
        _ => Value::Null,
    }
}

/// The parts of a request of shard B that the service measures: the key in
/// the report, the histogram, and the series of it that make the part.
const PARTS: [(&str, &str, &str); 4] = [
    ("own", "chatshard_shard_request_own_duration_seconds", ""),
    (
        "database",
        "chatshard_shard_request_database_duration_seconds",
        "",
    ),
    (
        "bulkheadWait",
        "chatshard_shard_request_wait_duration_seconds",
        "stage=\"bulkhead\"",
    ),
    (
        "groupCommitWait",
        "chatshard_shard_request_wait_duration_seconds",
        "stage=\"group_commit\"",
    ),
];

/// The buckets of each of [`PARTS`] for `shard`, from a `/metrics` text.
fn parts(text: &str, shard: &str) -> Vec<Buckets> {
    let shard = format!("shard=\"{shard}\"");
    PARTS
        .iter()
        .map(|(_, name, stage)| {
            let labels: Vec<&str> = [shard.as_str(), stage]
                .into_iter()
                .filter(|l| !l.is_empty())
                .collect();
            Buckets::read(text, name, &labels)
        })
        .collect()
}

/// Each part's p50 and p99 (ms) alone and during the spike, and their
/// ratios, from the readings at the start, at the spike and at the end.
fn split_of(start: &[Buckets], spike: &[Buckets], end: &[Buckets]) -> Value {
    let mut out = serde_json::Map::new();
    for (i, (key, _, _)) in PARTS.iter().enumerate() {
        let (Some(s), Some(k), Some(e)) = (start.get(i), spike.get(i), end.get(i)) else {
            continue;
        };
        let (alone, during) = (k.since(s), e.since(k));
        let ms = |b: &Buckets, q: f64| b.quantile(q).map(|v| v * 1000.0);
        let ratio = |q: f64| match (ms(&during, q), ms(&alone, q)) {
            (Some(d), Some(a)) if a > 0.0 => json!(d / a),
            _ => Value::Null,
        };
        out.insert(
            (*key).to_owned(),
            json!({
                "requestsAlone": alone.count(),
                "requestsDuringSpike": during.count(),
                "aloneMs": {"p50": ms(&alone, 0.5), "p99": ms(&alone, 0.99)},
                "duringSpikeMs": {"p50": ms(&during, 0.5), "p99": ms(&during, 0.99)},
                "p50Ratio": ratio(0.5),
                "p99Ratio": ratio(0.99),
            }),
        );
    }
    Value::Object(out)
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
