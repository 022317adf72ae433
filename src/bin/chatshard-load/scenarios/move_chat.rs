//! `move`: one chat under posts, joins and long-polls is moved to another
//! shard mid-run: the move's time, the longest pause a client saw, any
//! revision a reader missed, and the p99 of the source's other chats.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::client::{Target, run_id};
use crate::report::Recorder;
use crate::traffic;

/// Clients that share a `move` run's joins.
const JOINERS: u64 = 32;

/// What reaches the moving chat besides its posters: new users joining at
/// `join_rate` a second, and `pollers` long-polling readers; with `purged`,
/// its log is purged down to that many revisions before the run.
#[derive(Debug, Clone, Copy)]
pub struct MoveLoad {
    pub join_rate: u32,
    pub pollers: usize,
    pub purged: Option<u64>,
}

/// A chat under writes is moved to another shard: C clients, each a member,
/// post messages to it throughout (each retried with the same key on 503
/// `chat_moving`, as a client would), new users join it at a steady rate
/// (each join retried on a 503), readers long-poll it, the move is started
/// after a quarter of the run, and the figures are the move's time, the
/// longest pause any poster or joiner saw, the longest wait of a reader and
/// any revision it missed, and the answers around the switch.
pub async fn move_chat(
    target: &Target,
    recorder: &Recorder,
    (clients, others): (usize, usize),
    members: u64,
    to: Option<String>,
    duration: Duration,
    load: MoveLoad,
) -> anyhow::Result<Value> {
    let Some(token) = target.admin_token.clone() else {
        anyhow::bail!("move needs --admin-token (it starts the move through the admin API)");
    };
    let chat = run_id("move");
    target.create_chat(&chat).await?;
    target.set_join_throttle(&chat, false).await?;
    // The chat's members before the move, joined 64 at a time.
    let mut n = 0;
    while n < members {
        let batch: Vec<_> = (n..(n + 64).min(members))
            .map(|i| {
                let chat = &chat;
                async move {
                    target.join(recorder, "fill", chat, &format!("f{i}")).await;
                }
            })
            .collect();
        futures_util::future::join_all(batch).await;
        n += 64;
    }
    // The log purged (the shard's purge round, at its pace), so the move
    // copies a snapshot of the rows rather than replaying the log.
    let mut purge_seconds = None;
    if let Some(keep) = load.purged {
        let started = Instant::now();
        target.purge_down_to(&chat, keep).await?;
        loop {
            let c = target.chat_view(&chat).await?;
            let (first, revision) = (
                c["firstRevision"].as_u64().unwrap_or(1),
                c["revision"].as_u64().unwrap_or(0),
            );
            if first > 1 && revision + 1 - first <= keep {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(600),
                "the purge did not reach chat {chat} within 10 minutes (is purge.interval_ms short?)"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        purge_seconds = Some(started.elapsed().as_secs_f64());
    }
    let from = target.shard_of(&chat).await?;
    let to = match to {
        Some(to) => to,
        None => {
            let shards: Value = target
                .http
                .get(format!("{}/v1/admin/shards", target.base))
                .bearer_auth(&token)
                .send()
                .await?
                .json()
                .await?;
            shards["shards"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["name"].as_str())
                .find(|name| *name != from)
                .map(str::to_owned)
                .ok_or_else(|| anyhow::anyhow!("move needs a second shard"))?
        }
    };
    // Other chats of the source shard, read and joined throughout: their
    // p99 before the move and during it.
    let mut quiet = Vec::new();
    for i in 0..256 {
        if quiet.len() >= 16 || others == 0 {
            break;
        }
        let other = format!("{chat}-o{i}");
        target.create_chat(&other).await?;
        if target.shard_of(&other).await? == from {
            quiet.push(other);
        }
    }
    let phase = Arc::new(AtomicU8::new(0));
    let traffic = traffic::others(target, recorder, &quiet, others, &phase);
    let deadline = Instant::now() + duration;
    let users = Arc::new(AtomicU64::new(0));
    let longest_pause_us = Arc::new(AtomicU64::new(0));
    let longest_join_us = Arc::new(AtomicU64::new(0));
    let joiners = move_joiners(
        target,
        recorder,
        &chat,
        load.join_rate,
        deadline,
        &longest_join_us,
    );
    let start_revision = target.chat_view(&chat).await?["revision"]
        .as_u64()
        .unwrap_or_default();
    let missed = Arc::new(AtomicU64::new(0));
    let longest_poll_us = Arc::new(AtomicU64::new(0));
    let pollers = move_pollers(
        target,
        recorder,
        &chat,
        (load.pollers, start_revision),
        deadline,
        (&missed, &longest_poll_us),
    );
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let (target, recorder, chat, users, longest) = (
                target.instance(i),
                recorder.clone(),
                chat.clone(),
                users.clone(),
                longest_pause_us.clone(),
            );
            tokio::spawn(async move {
                let writer = format!("w{i}");
                target.join(&recorder, "fill", &chat, &writer).await;
                let mut last_ok = Instant::now();
                while Instant::now() < deadline {
                    let key = format!("k{}", users.fetch_add(1, Ordering::Relaxed));
                    loop {
                        let started = Instant::now();
                        let (answer, ok) = target.post(&chat, &writer, &key).await;
                        recorder.record("post", started.elapsed(), &answer, ok);
                        if ok {
                            let pause = last_ok.elapsed().as_micros() as u64;
                            longest.fetch_max(pause, Ordering::Relaxed);
                            last_ok = Instant::now();
                            break;
                        }
                        if answer != "503/chat_moving" || Instant::now() >= deadline {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(duration / 4).await;
    recorder.mark("move starts");
    phase.store(1, Ordering::Relaxed);
    let started = Instant::now();
    let r = target
        .http
        .post(format!("{}/v1/admin/chats/{chat}/move", target.base))
        .bearer_auth(&token)
        .json(&json!({ "to": to }))
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "starting the move: {}", r.status());
    let id = r.json::<Value>().await?["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let ended = loop {
        let m: Value = target
            .http
            .get(format!("{}/v1/admin/moves/{id}", target.base))
            .bearer_auth(&token)
            .send()
            .await?
            .json()
            .await?;
        if m["phase"] == "done" || m["phase"] == "rolled_back" || m["phase"] == "cancelled" {
            break m;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the move did not end within 10 minutes: {m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let move_seconds = started.elapsed().as_secs_f64();
    // The others go on while the writers do (to the end of the run), with
    // the chat on its new shard: what that placement costs them.
    phase.store(2, Ordering::Relaxed);
    recorder.mark("move ended");
    for task in tasks.into_iter().chain(joiners).chain(pollers) {
        task.await?;
    }
    phase.store(3, Ordering::Relaxed);
    for task in traffic {
        task.await?;
    }
    let [before, during, after] = traffic::others_p99(recorder);
    Ok(json!({
        "name": "move",
        "clients": clients,
        "membersBefore": members,
        "from": from,
        "to": to,
        "phase": ended["phase"],
        "error": ended["error"],
        "revisionsCopied": ended["copiedRevision"],
        "moveSeconds": move_seconds,
        "longestPauseMs": longest_pause_us.load(Ordering::Relaxed) as f64 / 1000.0,
        "otherChats": quiet.len(),
        "otherP99BeforeMs": before,
        "otherP99DuringMs": during,
        "otherP99Ratio": if before > 0.0 { during / before } else { 0.0 },
        "otherP50BeforeMs": recorder.quantile_ms("other_before", 0.5),
        "otherP50DuringMs": recorder.quantile_ms("other_during", 0.5),
        "otherP99AfterMs": after,
        "otherP99AfterRatio": if before > 0.0 { after / before } else { 0.0 },
        "purgedTo": load.purged,
        "purgeSeconds": purge_seconds,
        "joinRate": load.join_rate,
        "joinsPerSecond": recorder.ok_count("join") as f64 / duration.as_secs_f64(),
        "longestJoinPauseMs": longest_join_us.load(Ordering::Relaxed) as f64 / 1000.0,
        "pollers": load.pollers,
        "pollsAnswered": recorder.ok_count("poll"),
        "longestPollWaitMs": longest_poll_us.load(Ordering::Relaxed) as f64 / 1000.0,
        "revisionsMissedByPollers": missed.load(Ordering::Relaxed),
    }))
}

/// [`JOINERS`] clients that join new users to `chat` at `rate` a second in
/// all until `deadline`, each join retried with the same user on a 503 (a
/// join is idempotent); the longest time a join took to succeed goes to
/// `longest`.
fn move_joiners(
    target: &Target,
    recorder: &Recorder,
    chat: &str,
    rate: u32,
    deadline: Instant,
    longest: &Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    if rate == 0 {
        return Vec::new();
    }
    let every = Duration::from_secs_f64(JOINERS as f64 / f64::from(rate));
    (0..JOINERS)
        .map(|j| {
            let (target, recorder, chat, longest) = (
                target.instance(j as usize),
                recorder.clone(),
                chat.to_owned(),
                longest.clone(),
            );
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut n = 0u64;
                while Instant::now() < deadline {
                    tick.tick().await;
                    n += 1;
                    let user = format!("j{j}-{n}");
                    let first = Instant::now();
                    loop {
                        let (answer, ok) = target.join(&recorder, "join", &chat, &user).await;
                        if ok {
                            longest
                                .fetch_max(first.elapsed().as_micros() as u64, Ordering::Relaxed);
                            break;
                        }
                        if !answer.starts_with("503") || Instant::now() >= deadline {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            })
        })
        .collect()
}

/// `pollers` readers that long-poll `chat` from `after` until `deadline`
/// (`waitMs=2000`, 500 events a page), each checking that the revisions it
/// gets follow on from the last one: revisions skipped go to `missed`, and
/// the longest time between two answered polls to `longest`.
fn move_pollers(
    target: &Target,
    recorder: &Recorder,
    chat: &str,
    (pollers, after): (usize, u64),
    deadline: Instant,
    (missed, longest): (&Arc<AtomicU64>, &Arc<AtomicU64>),
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..pollers)
        .map(|p| {
            let (target, recorder, chat, missed, longest) = (
                target.instance(p),
                recorder.clone(),
                chat.to_owned(),
                missed.clone(),
                longest.clone(),
            );
            tokio::spawn(async move {
                let mut after = after;
                let mut answered = Instant::now();
                while Instant::now() < deadline {
                    let started = Instant::now();
                    let r = target
                        .http
                        .get(format!(
                            "{}/v1/chats/{chat}/events?after={after}&limit=500&waitMs=2000",
                            target.base
                        ))
                        .send()
                        .await;
                    let page = match r {
                        Ok(r) if r.status().is_success() => r.json::<Value>().await.ok(),
                        Ok(r) => {
                            let status = r.status().as_str().to_owned();
                            recorder.record("poll", started.elapsed(), &status, false);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                        Err(_) => None,
                    };
                    let Some(page) = page else {
                        recorder.record("poll", started.elapsed(), "error", false);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    recorder.record("poll", started.elapsed(), "200", true);
                    longest.fetch_max(answered.elapsed().as_micros() as u64, Ordering::Relaxed);
                    answered = Instant::now();
                    for event in page["events"].as_array().into_iter().flatten() {
                        let revision = event["revision"].as_u64().unwrap_or_default();
                        if revision > after + 1 {
                            missed.fetch_add(revision - after - 1, Ordering::Relaxed);
                        }
                        after = after.max(revision);
                    }
                }
            })
        })
        .collect()
}
