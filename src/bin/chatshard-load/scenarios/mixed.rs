//! `mixed`: a day in a minute. Zipf-popular background traffic over many
//! chats, and a celebrity chat spiking to the reference incident's load in
//! the middle third of the run, offered open loop. Given the service's pid,
//! its memory per chat in use and its CPU per background request (over the
//! first third, before the celebrity); given Redis's, Redis's CPU per notice
//! published.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::client::{Target, run_id};
use crate::procfs::process_usage;
use crate::report::Recorder;
use crate::scenarios::Pids;
use crate::scenarios::fanout::notices_sent;
use crate::zipf::Zipf;

/// `mixed`: a day in a minute. `clients` clients make background traffic
/// over `chats` chats whose popularity follows a Zipf law (member-count
/// reads, event polls, joins, messages, leaves; a chat is created on its first
/// use), while one celebrity chat goes from quiet to `celebrity` = (joins/s,
/// reads/s) for the middle third of the run, then back.
/// `pids` are the service's and Redis's (same machine), for the memory the
/// service holds per chat in use and the CPU Redis spends per notice.
pub async fn mixed(
    target: &Target,
    recorder: &Recorder,
    chats: usize,
    clients: usize,
    celebrity: (f64, f64),
    duration: Duration,
    pids: Pids,
) -> anyhow::Result<Value> {
    let (celebrity_joins, celebrity_reads) = celebrity;
    let run = run_id("mixed");
    let service_at_start = pids.service.and_then(process_usage);
    let redis_at_start = pids.redis.and_then(process_usage);
    let notices_at_start = notices_sent(target).await;
    let zipf = Arc::new(Zipf::new(chats));
    let created: Arc<dashmap::DashSet<usize>> = Arc::new(dashmap::DashSet::new());
    let start = Instant::now();
    let until = start + duration;
    let background: Vec<_> = (0..clients)
        .map(|c| {
            let (target, recorder, zipf, created, run) = (
                target.clone(),
                recorder.clone(),
                zipf.clone(),
                created.clone(),
                run.clone(),
            );
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < until {
                    n += 1;
                    let i = zipf.pick();
                    let chat = format!("{run}-{i}");
                    if created.insert(i) && target.chat_with_poster(&chat, "host").await.is_err() {
                        created.remove(&i);
                        continue;
                    }
                    let roll = rand::random::<f64>();
                    let base = &target.base;
                    let (kind, request) = if roll < 0.40 {
                        ("bg_count", target.http.get(format!("{base}/v1/chats/{chat}/member-count")))
                    } else if roll < 0.70 {
                        ("bg_poll", target.http.get(format!("{base}/v1/chats/{chat}/events?after=0&limit=50")))
                    } else if roll < 0.85 {
                        (
                            "bg_join",
                            target
                                .http
                                .post(format!("{base}/v1/chats/{chat}/members"))
                                .json(&json!({"userId": format!("b{c}-{}", n % 64)})),
                        )
                    } else if roll < 0.95 {
                        (
                            "bg_post",
                            target
                                .http
                                .post(format!("{base}/v1/chats/{chat}/messages"))
                                .json(&json!({"senderId": "host", "clientMessageId": format!("m{c}-{n}"), "text": "hi"})),
                        )
                    } else {
                        (
                            "bg_leave",
                            target
                                .http
                                .delete(format!("{base}/v1/chats/{chat}/members/b{c}-{}", n % 64)),
                        )
                    };
                    let started = Instant::now();
                    let (answer, ok) = target.call(request).await;
                    // A leave of someone who never joined is a 404 by design.
                    let ok = ok || answer == "404/member_not_found";
                    recorder.record(kind, started.elapsed(), &answer, ok);
                }
            })
        })
        .collect();
    // The celebrity: quiet, then the spike in the middle third, then quiet.
    let celebrity = format!("{run}-celebrity");
    target.chat_with_poster(&celebrity, "host").await?;
    target.set_join_throttle(&celebrity, false).await?;
    let spike_from = start + duration / 3;
    tokio::time::sleep_until(spike_from.into()).await;
    let service_before_spike = pids.service.and_then(process_usage);
    let chats_before_spike = created.len();
    let requests_before_spike: u64 = BACKGROUND.iter().map(|kind| recorder.ok_count(kind)).sum();
    recorder.mark("celebrity spike");
    let spike_until = start + duration * 2 / 3;
    let joiners = (celebrity_joins / 100.0).ceil().max(1.0) as usize;
    let readers = (celebrity_reads / 100.0).ceil().max(1.0) as usize;
    let mut spike = paced(
        recorder,
        "celebrity_join",
        joiners,
        celebrity_joins / joiners as f64,
        spike_until,
        {
            let (target, recorder, chat) = (target.clone(), recorder.clone(), celebrity.clone());
            move |t, n| {
                let (target, recorder, chat) = (target.clone(), recorder.clone(), chat.clone());
                async move {
                    target
                        .join(&recorder, "celebrity_join", &chat, &format!("fan{t}-{n}"))
                        .await;
                }
            }
        },
    );
    spike.extend(paced(
        recorder,
        "celebrity_read",
        readers,
        celebrity_reads / readers as f64,
        spike_until,
        {
            let (target, recorder, chat) = (target.clone(), recorder.clone(), celebrity.clone());
            move |_, n| {
                let (target, recorder, chat) = (target.clone(), recorder.clone(), chat.clone());
                async move {
                    let path = if n % 2 == 0 {
                        format!("{}/v1/chats/{chat}/member-count", target.base)
                    } else {
                        format!("{}/v1/chats/{chat}/events?after=0&limit=50", target.base)
                    };
                    let started = Instant::now();
                    let (answer, ok) = target.call(target.http.get(path)).await;
                    recorder.record("celebrity_read", started.elapsed(), &answer, ok);
                }
            }
        },
    ));
    for t in spike {
        let _ = t.await;
    }
    recorder.mark("spike ends");
    for t in background {
        let _ = t.await;
    }
    // What one more chat in use costs the instance (its tail, its join
    // window and hot-chat bucket, its queue while written), over the first
    // third: the growth of the resident memory by the chats used by then.
    let memory = match (service_at_start, service_before_spike) {
        (Some((before, _)), Some((after, _))) if chats_before_spike > 0 => json!({
            "serviceRssAtStartBytes": before,
            "serviceRssBeforeSpikeBytes": after,
            "chatsUsedBeforeSpike": chats_before_spike,
            "bytesPerTrackedChat": after.saturating_sub(before) / chats_before_spike as u64,
        }),
        _ => Value::Null,
    };
    // The service's CPU per request of the background mix over the same
    // third, each chat's creation counted as its two requests (the chat,
    // its first member).
    let requests = requests_before_spike + 2 * chats_before_spike as u64;
    let cpu = match (service_at_start, service_before_spike) {
        (Some((_, a)), Some((_, b))) if requests > 0 => json!({
            "backgroundRequestsBeforeSpike": requests,
            "serviceCpuMicrosPerBackgroundRequest": (b - a) * 1e6 / requests as f64,
        }),
        _ => Value::Null,
    };
    let notices = match (notices_at_start, notices_sent(target).await) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let redis = match (redis_at_start, pids.redis.and_then(process_usage), notices) {
        (Some((_, a)), Some((_, b)), Some(n)) if n > 0.0 => json!({
            "cpuSeconds": b - a,
            "noticesSent": n,
            "cpuMicrosPerNotice": (b - a) * 1e6 / n,
        }),
        _ => Value::Null,
    };
    Ok(json!({
        "name": "mixed",
        "chats": chats,
        "chatsUsed": created.len(),
        "clients": clients,
        "celebrityJoinsPerSecond": celebrity_joins,
        "celebrityReadsPerSecond": celebrity_reads,
        "celebrityJoined": recorder.ok_count("celebrity_join"),
        "memory": memory,
        "cpu": cpu,
        "redis": redis,
    }))
}

/// The kinds of the background traffic.
const BACKGROUND: [&str; 5] = ["bg_count", "bg_poll", "bg_join", "bg_post", "bg_leave"];

/// Calls `step` at `tasks` x `per_task` calls per second until `until`, open
/// loop: each call runs on its own task, so a slow answer does not lower the
/// offered rate (at most 4,096 calls in flight; a call past that is counted
/// under `kind` as `not_sent`).
pub(super) fn paced<F, Fut>(
    recorder: &Recorder,
    kind: &'static str,
    tasks: usize,
    per_task: f64,
    until: Instant,
    step: F,
) -> Vec<tokio::task::JoinHandle<()>>
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let in_flight = Arc::new(tokio::sync::Semaphore::new(4096));
    (0..tasks)
        .map(|t| {
            let (step, recorder, in_flight) = (step.clone(), recorder.clone(), in_flight.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_task));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut calls = tokio::task::JoinSet::new();
                let mut n = 0u64;
                while Instant::now() < until {
                    tick.tick().await;
                    n += 1;
                    let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                        recorder.record(kind, Duration::ZERO, "not_sent", false);
                        continue;
                    };
                    let call = step(t, n);
                    calls.spawn(async move {
                        call.await;
                        drop(permit);
                    });
                    while calls.try_join_next().is_some() {}
                }
                while calls.join_next().await.is_some() {}
            })
        })
        .collect()
}
