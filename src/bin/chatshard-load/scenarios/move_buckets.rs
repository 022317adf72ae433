//! `move-buckets`: a bucket range and its chats move to another shard under
//! posts into them and creations of new chats in the range: the move's
//! time and its own figures (rows and chats copied a second, the catch-up
//! passes, the fence), the longest pauses, the p99 of the source's other
//! chats (before, during, after, and in each step of the move: the bulk
//! copy, the catch-up, the clean-up), and a count of every acknowledged write against the chats'
//! revisions afterwards (nothing lost, nothing doubled).

use std::collections::HashMap;
use std::sync::Mutex;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chatshard::routing::{BucketRange, bucket_of};
use serde_json::{Value, json};

use crate::client::{Target, problem_code, run_id};
use crate::report::Recorder;
use crate::traffic;

/// The events each chat of the run must hold: one per acknowledged new
/// join and one per acknowledged message key.
/// Per chat: the writes acknowledged (each one revision), and those whose
/// outcome the service could not know (`503 outcome_unknown`: applied or
/// not, never twice).
type Expected = Arc<Mutex<HashMap<String, (u64, u64)>>>;

fn expect(expected: &Expected, chat: &str) {
    if let Ok(mut e) = expected.lock() {
        e.entry(chat.to_owned()).or_default().0 += 1;
    }
}

/// Counts `answer` to a write of `chat`: acknowledged, or of unknown
/// outcome.
fn answered(expected: &Expected, chat: &str, answer: &str) {
    if answer == "201" {
        expect(expected, chat);
    } else if answer == "503/outcome_unknown"
        && let Ok(mut e) = expected.lock()
    {
        e.entry(chat.to_owned()).or_default().1 += 1;
    }
}

/// `move-buckets`: a bucket range of `chats` chats (`members` members and
/// `messages` messages each) moves to another shard while `clients`
/// clients post into its chats, new chats of the range are created
/// `create_rate` a second (each joined by one member), and `others` clients
/// read and join chats of the source outside the range. Reports the move's
/// time and figures, the longest pause a poster and a creation saw, every
/// answer, the others' p99 before, during and after the move, and how many
/// chats hold fewer or more events than were acknowledged.
pub async fn move_buckets(
    target: &Target,
    recorder: &Recorder,
    (clients, others): (usize, usize),
    (chats, members, messages): (usize, u64, u64),
    (to, create_rate): (Option<String>, f64),
) -> anyhow::Result<Value> {
    let Some(token) = target.admin_token.clone() else {
        anyhow::bail!(
            "move-buckets needs --admin-token (it moves the range through the admin API)"
        );
    };
    let table: Value = target
        .http
        .get(format!("{}/v1/admin/buckets", target.base))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    let shards = table["shards"].as_array().cloned().unwrap_or_default();
    // The source: the first shard with buckets; the range: the upper half of
    // its first range; the target: --to, else a shard with no buckets, else
    // the next one.
    let (from, owned) = shards
        .iter()
        .find_map(|s| {
            let first = s["buckets"].as_array()?.first()?.as_str()?;
            Some((
                s["shard"].as_str()?.to_owned(),
                BucketRange::parse(first).ok()?,
            ))
        })
        .ok_or_else(|| anyhow::anyhow!("no shard owns buckets"))?;
    anyhow::ensure!(
        owned.last > owned.first,
        "the source's first range is one bucket"
    );
    let half = owned.first + (owned.last - owned.first).div_ceil(2);
    let range = BucketRange {
        first: half,
        last: owned.last,
    };
    let stays = BucketRange {
        first: owned.first,
        last: half - 1,
    };
    let names: Vec<&str> = shards.iter().filter_map(|s| s["shard"].as_str()).collect();
    let to = match to {
        Some(to) => to,
        None => shards
            .iter()
            .find(|s| s["buckets"].as_array().is_some_and(Vec::is_empty))
            .and_then(|s| s["shard"].as_str())
            .or_else(|| names.iter().copied().find(|n| *n != from))
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("move-buckets needs a second shard"))?,
    };
    // The range's chats, their members and messages, 128 requests at a time.
    let expected: Expected = Arc::default();
    let moving = chats_in("mb", range, chats);
    let never = AtomicBool::new(false);
    for batch in moving.chunks(64) {
        let made = batch
            .iter()
            .map(|chat| create_until_done(target, recorder, chat, &never));
        let made = futures_util::future::join_all(made).await;
        anyhow::ensure!(made.iter().all(|m| *m), "creating the range's chats failed");
    }
    let joins: Vec<(String, String)> = moving
        .iter()
        .flat_map(|chat| (0..members).map(move |i| (chat.clone(), format!("f{i}"))))
        .collect();
    for batch in joins.chunks(64) {
        let joined = batch.iter().map(|(chat, user)| async {
            // A busy shard's 503 is retried: the fill is the same every run.
            for _ in 0..100 {
                let (answer, _) = target.join(recorder, "fill", chat, user).await;
                answered(&expected, chat, &answer);
                if !answer.starts_with("503") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        futures_util::future::join_all(joined).await;
    }
    let posts: Vec<(String, u64)> = moving
        .iter()
        .flat_map(|chat| (0..messages).map(move |i| (chat.clone(), i)))
        .collect();
    for batch in posts.chunks(64) {
        let expected = &expected;
        let posted = batch.iter().map(|(chat, i)| async move {
            for _ in 0..100 {
                let (answer, ok) = target
                    .post(chat, &format!("f{i}"), &format!("fill-{i}"))
                    .await;
                if ok {
                    expect(expected, chat);
                }
                if !answer.starts_with("503") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        futures_util::future::join_all(posted).await;
    }
    let quiet = chats_in("mq", stays, if others == 0 { 0 } else { 16 });
    for chat in &quiet {
        target.create_chat(chat).await?;
    }
    let phase = Arc::new(AtomicU8::new(0));
    let traffic = traffic::others(target, recorder, &quiet, others, &phase);
    let stop = Arc::new(AtomicBool::new(false));
    let longest_pause_us = Arc::new(AtomicU64::new(0));
    let moving = Arc::new(moving);
    let mut tasks: Vec<_> = (0..clients)
        .map(|i| {
            let (target, recorder, chats, stop, longest, expected) = (
                target.instance(i),
                recorder.clone(),
                moving.clone(),
                stop.clone(),
                longest_pause_us.clone(),
                expected.clone(),
            );
            tokio::spawn(async move {
                let writer = format!("w{i}");
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let chat = &chats[(i * 7919 + n) % chats.len()];
                    n += 1;
                    let (answer, _) = target.join(&recorder, "join", chat, &writer).await;
                    answered(&expected, chat, &answer);
                    let key = format!("k{i}-{n}");
                    let first = Instant::now();
                    loop {
                        let started = Instant::now();
                        let (answer, ok) = target.post(chat, &writer, &key).await;
                        recorder.record("post", started.elapsed(), &answer, ok);
                        if ok {
                            expect(&expected, chat);
                            let pause = first.elapsed().as_micros() as u64;
                            longest.fetch_max(pause, Ordering::Relaxed);
                            break;
                        }
                        if !answer.starts_with("503") || stop.load(Ordering::Relaxed) {
                            answered(&expected, chat, &answer);
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            })
        })
        .collect();
    // New chats of the range, created throughout, `create_rate` a second,
    // each joined by one member.
    let longest_create_us = Arc::new(AtomicU64::new(0));
    let created = Arc::new(AtomicU64::new(0));
    let fresh_chats: Arc<Mutex<Vec<String>>> = Arc::default();
    if create_rate > 0.0 {
        let (target, recorder, stop, longest, created, expected, fresh_chats) = (
            target.clone(),
            recorder.clone(),
            stop.clone(),
            longest_create_us.clone(),
            created.clone(),
            expected.clone(),
            fresh_chats.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let fresh = chats_in("mc", range, 1_000_000);
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / create_rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut making = Vec::new();
            for chat in fresh {
                tick.tick().await;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let (target, recorder, longest, created, expected, fresh_chats, stop) = (
                    target.clone(),
                    recorder.clone(),
                    longest.clone(),
                    created.clone(),
                    expected.clone(),
                    fresh_chats.clone(),
                    stop.clone(),
                );
                making.push(tokio::spawn(async move {
                    let first = Instant::now();
                    if create_until_done(&target, &recorder, &chat, &stop).await {
                        longest.fetch_max(first.elapsed().as_micros() as u64, Ordering::Relaxed);
                        created.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut f) = fresh_chats.lock() {
                            f.push(chat.clone());
                        }
                        let (answer, _) = target.join(&recorder, "join", &chat, "founder").await;
                        answered(&expected, &chat, &answer);
                    }
                }));
            }
            for m in making {
                let _ = m.await;
            }
        }));
    }
    // The others' baseline, then the move.
    tokio::time::sleep(Duration::from_secs(5)).await;
    recorder.mark("range move starts");
    phase.store(1, Ordering::Relaxed);
    let started = Instant::now();
    let r = target
        .http
        .post(format!("{}/v1/admin/bucket-moves", target.base))
        .bearer_auth(&token)
        .json(&json!({ "buckets": range.to_string(), "to": to }))
        .send()
        .await?;
    anyhow::ensure!(
        r.status().is_success(),
        "starting the range move: {} {}",
        r.status(),
        r.text().await.unwrap_or_default()
    );
    let id = r.json::<Value>().await?["id"].as_u64().unwrap_or_default();
    // When the bulk copy ended (the view shows it as a pass) and when the
    // range flipped, on the recorder's clock: the others' p99 per step.
    let move_began = recorder.elapsed().as_secs_f64();
    let (mut bulk_ended, mut flipped) = (None, None);
    // Once flipped: how long each instance (this one, then `--also`) takes
    // to route by the new bucket table.
    let mut seen_by: Vec<tokio::task::JoinHandle<Option<f64>>> = Vec::new();
    let ended = loop {
        let m: Value = target
            .http
            .get(format!("{}/v1/admin/bucket-moves/{id}", target.base))
            .bearer_auth(&token)
            .send()
            .await?
            .json()
            .await?;
        let now = recorder.elapsed().as_secs_f64();
        if bulk_ended.is_none() && !m["stats"]["bulk"].is_null() {
            bulk_ended = Some(now);
        }
        if flipped.is_none() && matches!(m["phase"].as_str(), Some("flipped" | "done")) {
            flipped = Some(now);
            if let Some(version) = m["version"].as_u64() {
                seen_by = target
                    .instances()
                    .into_iter()
                    .map(|instance| tokio::spawn(table_seen(instance, token.clone(), version)))
                    .collect();
            }
        }
        if m["phase"] == "done" || m["phase"] == "failed" {
            break m;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(3600),
            "the range move did not end within an hour: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let move_seconds = started.elapsed().as_secs_f64();
    // The same traffic for 10 s more with the range on its new shard: what
    // the new placement costs the others, apart from what the move did.
    phase.store(2, Ordering::Relaxed);
    recorder.mark("range move ended");
    let move_ended = recorder.elapsed().as_secs_f64();
    let bulk_ended = bulk_ended.unwrap_or(move_ended);
    let flipped = flipped.unwrap_or(move_ended);
    // The others' p99 in each step: the bulk copy, the catch-up (its passes,
    // the digest check beside them, the fence), the clean-up.
    let steps = [
        (move_began, bulk_ended),
        (bulk_ended, flipped),
        (flipped, move_ended),
    ]
    .map(|(from, to)| {
        recorder
            .quantile_ms_between("other_during", 0.99, from, to)
            .unwrap_or(0.0)
    });
    tokio::time::sleep(Duration::from_secs(10)).await;
    phase.store(3, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for task in tasks.into_iter().chain(traffic) {
        task.await?;
    }
    let [before, during, after] = traffic::others_p99(recorder);
    // Every chat of the run against what was acknowledged in it.
    let expected: HashMap<String, (u64, u64)> =
        expected.lock().map(|e| e.clone()).unwrap_or_default();
    let mut all: Vec<String> = moving.iter().cloned().collect();
    all.extend(fresh_chats.lock().map(|f| f.clone()).unwrap_or_default());
    let (mut lost, mut doubled, mut unread, mut unknown_applied) = (0u64, 0u64, 0u64, 0u64);
    for batch in all.chunks(32) {
        let read = batch.iter().map(|chat| async move {
            let mut revision = None;
            for _ in 0..100 {
                let r = target
                    .http
                    .get(format!("{}/v1/chats/{chat}", target.base))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        revision = r
                            .json::<Value>()
                            .await
                            .ok()
                            .and_then(|v| v["revision"].as_u64());
                        break;
                    }
                    Ok(r) if r.status().as_u16() == 503 => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ => break,
                }
            }
            (chat, revision)
        });
        for (chat, revision) in futures_util::future::join_all(read).await {
            let (want, unsure) = expected.get(chat.as_str()).copied().unwrap_or((0, 0));
            match revision {
                None => unread += 1,
                Some(r) if r < want => lost += 1,
                Some(r) if r > want + unsure => doubled += 1,
                Some(r) if r > want => unknown_applied += 1,
                Some(_) => {}
            }
        }
    }
    let stats = &ended["stats"];
    let mut report = json!({
        "name": "move-buckets",
        "buckets": range.to_string(),
        "from": from,
        "to": to,
        "chats": chats,
        "membersPerChat": members,
        "clients": clients,
        "phase": ended["phase"],
        "error": ended["error"],
        "chatsTotal": ended["chatsTotal"],
        "chatsMoved": ended["chatsMoved"],
        "version": ended["version"],
        "moveSeconds": move_seconds,
        "chatsPerSecond": ended["chatsMoved"].as_f64().unwrap_or(0.0) / move_seconds,
        "messagesPerChat": messages,
        "createRate": create_rate,
        "rowsCopied": stats["rowsCopied"],
        "copySeconds": stats["copySeconds"],
        "copyRowsPerSecond": stats["rowsPerSecond"],
        "copyChatsPerSecond": stats["chatsPerSecond"],
        "catchUpPasses": stats["passCount"],
        "catchUpPassSizes": stats["passes"],
        "converging": stats["converging"],
        "fences": stats["fences"],
        "fenceMs": stats["fenceMs"],
        "viewP99BeforeMs": stats["p99BeforeMs"],
        "viewP99DuringMs": stats["p99DuringMs"],
        "viewP99AfterMs": stats["p99AfterMs"],
        "chatsChecked": all.len(),
        "chatsWithLostWrites": lost,
        "chatsWithDoubledWrites": doubled,
        "chatsUnreadable": unread,
        "longestPostPauseMs": longest_pause_us.load(Ordering::Relaxed) as f64 / 1000.0,
        "chatsCreatedDuring": created.load(Ordering::Relaxed),
        "longestCreatePauseMs": longest_create_us.load(Ordering::Relaxed) as f64 / 1000.0,
        "otherChats": quiet.len(),
        "otherP99BeforeMs": before,
        "otherP99DuringMs": during,
        "otherP99Ratio": if before > 0.0 { during / before } else { 0.0 },
        "otherP99AfterMs": after,
        "otherP99AfterRatio": if before > 0.0 { after / before } else { 0.0 },
    });
    for (name, p99) in ["Copy", "CatchUp", "Clean"].into_iter().zip(steps) {
        report[format!("otherP99{name}Ms")] = json!(p99);
        report[format!("otherP99{name}Ratio")] =
            json!(if before > 0.0 { p99 / before } else { 0.0 });
    }
    report["chatsWithUnknownOutcomesApplied"] = json!(unknown_applied);
    let mut table_seen_ms = Vec::new();
    for task in seen_by {
        table_seen_ms.push(task.await.ok().flatten());
    }
    report["flipSeenByInstancesMs"] = json!(table_seen_ms);
    report["verifyMs"] = stats["verifyMs"].clone();
    report["chatsVerified"] = stats["chatsVerified"].clone();
    report["bulkCopy"] = stats["bulk"].clone();
    report["fenceSteps"] = stats["fenceSteps"].clone();
    report["flipSeconds"] = stats["flipSeconds"].clone();
    report["cleanSeconds"] = stats["cleanSeconds"].clone();
    Ok(report)
}

/// Chat ids of this run whose bucket is within `range`, `n` of them.
fn chats_in(prefix: &str, range: BucketRange, n: usize) -> Vec<String> {
    let run = run_id(prefix);
    (0..)
        .map(|i| format!("{run}-{i}"))
        .filter(|id| {
            chatshard::domain::ChatId::parse(id).is_ok_and(|c| {
                let b = bucket_of(&c);
                range.first <= b && b <= range.last
            })
        })
        .take(n)
        .collect()
}

/// Creates `chat`, retrying on a 503 until `stop`; whether it was created.
async fn create_until_done(
    target: &Target,
    recorder: &Recorder,
    chat: &str,
    stop: &AtomicBool,
) -> bool {
    loop {
        let started = Instant::now();
        let r = target
            .http
            .put(format!("{}/v1/chats/{chat}", target.base))
            .json(&json!({}))
            .send()
            .await;
        let (answer, ok) = match r {
            Ok(r) if r.status().is_success() => (r.status().as_str().to_owned(), true),
            Ok(r) => {
                let status = r.status();
                (
                    format!("{}/{}", status.as_str(), problem_code(r).await),
                    false,
                )
            }
            Err(_) => ("error".to_owned(), false),
        };
        recorder.record("create", started.elapsed(), &answer, ok);
        if ok {
            return true;
        }
        if !answer.starts_with("503") || stop.load(Ordering::Relaxed) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How long after it is called `instance` routes by bucket table `version`
/// or a later one (its `GET /v1/admin/buckets`, every 10 ms), in ms; `None`
/// if not within 60 s.
async fn table_seen(instance: Target, token: String, version: u64) -> Option<f64> {
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(60) {
        let seen = instance
            .http
            .get(format!("{}/v1/admin/buckets", instance.base))
            .bearer_auth(&token)
            .send()
            .await;
        if let Ok(r) = seen
            && let Ok(v) = r.json::<Value>().await
            && v["version"].as_u64().is_some_and(|v| v >= version)
        {
            return Some(began.elapsed().as_secs_f64() * 1e3);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}
