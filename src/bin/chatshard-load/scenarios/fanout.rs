//! `fanout`: SSE subscribers of one chat (plain streams or multiplexed ones)
//! while messages are posted at a fixed rate: delivery lag, shard reads per
//! published event, and the service's memory and CPU.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::client::{Target, run_id};
use crate::procfs::process_usage;
use crate::report::Recorder;
use crate::scenarios::Pids;
use crate::sse;

/// `fanout`: `subscribers` SSE streams of one chat on one instance while
/// messages are posted at `rate` per second for `duration`. Reports the
/// delivery lag (commit to received), the event reads the chat's shard saw
/// per published event (from the admin view's `fetchQueries`), and, given the
/// service's pid, its memory per subscriber (per chat subscription with
/// `mux_chats`) and its CPU (per delivery too); given its Redis's, Redis's
/// CPU per notice with every instance that holds streams subscribed.
pub async fn fanout(
    target: &Target,
    recorder: &Recorder,
    subscribers: usize,
    mux_chats: usize,
    rate: f64,
    duration: Duration,
    pids: Pids,
) -> anyhow::Result<Value> {
    let service_pid = pids.service;
    anyhow::ensure!(
        target.admin_token.is_some(),
        "fanout needs --admin-token (it reads the shard reads from the admin view)"
    );
    let queries = || target.fetch_queries();
    let chat = run_id("fanout");
    target.chat_with_poster(&chat, "poster").await?;
    // With --mux-chats, the quiet chats every multiplexed stream follows too.
    let mut quiet = Vec::new();
    for i in 1..mux_chats {
        let id = format!("{chat}-q{i}");
        target.create_chat(&id).await?;
        quiet.push(id);
    }
    let quiet = Arc::new(quiet);
    let before_usage = service_pid.and_then(process_usage);
    // A client per subscriber: every stream its own connection.
    let opened = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());
    // With --also, the streams are opened on the other instances (spread
    // over them) while the posts go through --url: the lag is then the
    // fleet's, from a commit on one instance to delivery by another.
    let stream_base = |i: usize| match target.others.len() {
        0 => target.base.clone(),
        n => target.others[i % n].clone(),
    };
    let streams: Vec<_> = (0..subscribers)
        .map(|i| {
            let (base, chat, recorder, opened, received, stop, quiet) = (
                stream_base(i),
                chat.clone(),
                recorder.clone(),
                opened.clone(),
                received.clone(),
                stop.clone(),
                quiet.clone(),
            );
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let path = if mux_chats == 0 {
                    format!("/v1/chats/{chat}/events/stream?after=1")
                } else {
                    match open_mux(&http, &base, &chat, &quiet).await {
                        Ok(path) => path,
                        Err(answer) => {
                            recorder.record("stream_open", Duration::ZERO, &answer, false);
                            return;
                        }
                    }
                };
                let response = http.get(format!("{base}{path}")).send().await;
                let mut response = match response {
                    Ok(r) if r.status().is_success() => r,
                    Ok(r) => {
                        recorder.record(
                            "stream_open",
                            Duration::ZERO,
                            &r.status().as_u16().to_string(),
                            false,
                        );
                        return;
                    }
                    Err(_) => {
                        recorder.record("stream_open", Duration::ZERO, "error/connect", false);
                        return;
                    }
                };
                opened.fetch_add(1, Ordering::Relaxed);
                // Only what the figures need is read from each message (its
                // commit time): the tool's CPU is shared with the service.
                let mut buffer: Vec<u8> = Vec::new();
                let mut lags = Vec::new();
                loop {
                    let chunk = tokio::select! {
                        chunk = response.chunk() => chunk,
                        () = stop.notified() => return,
                    };
                    let Ok(Some(chunk)) = chunk else { return };
                    buffer.extend_from_slice(&chunk);
                    sse::drain_messages(&mut buffer, |message| {
                        if let Some(at) = sse::commit_time(message) {
                            lags.push((chrono::Utc::now() - at).to_std().unwrap_or_default());
                        }
                    });
                    if !lags.is_empty() {
                        received.fetch_add(lags.len() as u64, Ordering::Relaxed);
                        recorder.record_all("delivery_lag", &lags, "received");
                        lags.clear();
                    }
                }
            })
        })
        .collect();
    // Every stream open before the first message.
    let deadline = Instant::now() + Duration::from_secs(120);
    while (opened.load(Ordering::Relaxed) as usize) < subscribers && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open = opened.load(Ordering::Relaxed);
    let received_at_open = received.load(Ordering::Relaxed);
    let open_usage = service_pid.and_then(process_usage);
    let tool_open = process_usage(std::process::id());
    let redis_open = pids.redis.and_then(process_usage);
    let notices_open = notices_sent(target).await;
    let queries_before = queries().await?;
    recorder.mark("posting starts");
    let every = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let posting_until = Instant::now() + duration;
    let mut posted = 0u64;
    while Instant::now() < posting_until {
        tick.tick().await;
        let started = Instant::now();
        let request = target
            .http
            .post(format!("{}/v1/chats/{chat}/messages", target.base))
            .json(&json!({"senderId": "poster", "clientMessageId": format!("f{posted}"), "text": "fan-out"}));
        let (answer, ok) = target.call(request).await;
        recorder.record("post", started.elapsed(), &answer, ok);
        posted += u64::from(ok);
    }
    // Until every open stream has every message (or 30 s).
    let want = posted * open;
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.load(Ordering::Relaxed) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reads = queries().await? - queries_before;
    let end_usage = service_pid.and_then(process_usage);
    let redis_end = pids.redis.and_then(process_usage);
    let notices = match (notices_open, notices_sent(target).await) {
        (Some(a), Some(b)) => b - a,
        _ => 0.0,
    };
    let delivered = received.load(Ordering::Relaxed) - received_at_open;
    let tool_end = process_usage(std::process::id());
    stop.notify_waiters();
    for s in streams {
        s.abort();
    }
    let memory = match (before_usage, open_usage) {
        (Some((before, _)), Some((with_streams, _))) if open > 0 => {
            let grown = with_streams.saturating_sub(before);
            // A multiplexed stream's growth spread over its chats: its
            // subscriptions' cost, the stream's own share included.
            let per_subscription = (mux_chats > 0).then(|| grown / (open * mux_chats as u64));
            json!({
                "serviceRssBeforeBytes": before,
                "serviceRssWithStreamsBytes": with_streams,
                "bytesPerSubscriber": grown / open,
                "bytesPerChatSubscription": per_subscription,
            })
        }
        _ => Value::Null,
    };
    // Every delivery in the window, the posts' own share of the CPU included
    // (tens a second against tens of thousands of deliveries); only when the
    // streams are on the instance measured.
    let local = target.others.is_empty() && delivered > 0;
    let cpu = match (open_usage, end_usage) {
        (Some((_, a)), Some((_, b))) => json!({
            "serviceCpuSecondsWhilePosting": b - a,
            "cores": (b - a) / duration.as_secs_f64(),
            "serviceCpuMicrosPerDelivery": local.then(|| (b - a) * 1e6 / delivered as f64),
        }),
        _ => Value::Null,
    };
    let tool_cores = match (tool_open, tool_end) {
        (Some((_, a)), Some((_, b))) => json!((b - a) / duration.as_secs_f64()),
        _ => Value::Null,
    };
    let polls = target.metric("chatshard_tail_revision_polls_total").await;
    // Redis's CPU per notice while every instance with streams follows the
    // chat: the posting instance alone, or each of --also.
    let redis = match (redis_open, redis_end) {
        (Some((_, a)), Some((_, b))) if notices > 0.0 => json!({
            "cpuSeconds": b - a,
            "noticesSent": notices,
            "subscribedInstances": target.others.len().max(1),
            "cpuMicrosPerNotice": (b - a) * 1e6 / notices,
        }),
        _ => Value::Null,
    };
    Ok(json!({
        "name": "fanout",
        "subscribers": subscribers,
        "crossInstance": !target.others.is_empty(),
        "muxChatsPerStream": mux_chats,
        "tailRevisionPollsTotal": polls,
        "streamsOpen": open,
        "messagesPerSecond": rate,
        "posted": posted,
        "delivered": received.load(Ordering::Relaxed),
        "expected": want,
        "eventReads": reads,
        "eventReadsPerPublishedEvent": if posted > 0 { reads as f64 / posted as f64 } else { 0.0 },
        "memory": memory,
        "cpu": cpu,
        "loadToolCores": tool_cores,
        "redis": redis,
    }))
}

/// The notices this instance has published through Redis, from its
/// `/metrics` (`None` without a fleet).
pub async fn notices_sent(target: &Target) -> Option<f64> {
    target
        .metric_where(
            "chatshard_fleet_messages_total",
            &["kind=\"notice\"", "direction=\"sent\""],
        )
        .await
}

/// Makes a multiplexed stream following `chat` after revision 1 and the
/// `quiet` chats from the start (in requests of at most 1,000 chats); its
/// path, or the answer that refused it.
async fn open_mux(
    http: &reqwest::Client,
    base: &str,
    chat: &str,
    quiet: &[String],
) -> Result<String, String> {
    let mut chats = serde_json::Map::new();
    chats.insert(chat.to_owned(), json!(1));
    let answer = |r: reqwest::Response| r.status().as_u16().to_string();
    let mut rest = quiet.chunks(1000);
    for id in rest.next().unwrap_or_default() {
        chats.insert(id.clone(), json!(0));
    }
    let r = http
        .post(format!("{base}/v1/streams"))
        .json(&json!({ "chats": chats }))
        .send()
        .await
        .map_err(|_| "error/connect".to_owned())?;
    if !r.status().is_success() {
        return Err(answer(r));
    }
    let view: Value = r.json().await.map_err(|_| "error/body".to_owned())?;
    let id = view["streamId"].as_str().ok_or("error/body")?.to_owned();
    for ids in rest {
        for id_chat in ids {
            let r = http
                .put(format!("{base}/v1/streams/{id}/chats/{id_chat}"))
                .json(&json!({"after": 0}))
                .send()
                .await
                .map_err(|_| "error/connect".to_owned())?;
            if !r.status().is_success() {
                return Err(answer(r));
            }
        }
    }
    Ok(format!("/v1/streams/{id}"))
}
