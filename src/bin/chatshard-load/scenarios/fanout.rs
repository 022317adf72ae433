//! `fanout`: SSE subscribers of one chat (plain streams or multiplexed ones)
//! while messages are posted at a fixed rate: delivery lag, shard reads per
//! published event, and the service's memory and CPU (per delivery, apart
//! from this tool's own).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::client::{Target, run_id};
use crate::procfs::{process_usage, process_writes};
use crate::report::Recorder;
use crate::scenarios::Pids;
use crate::sse;

/// How the subscribers reach the service.
#[derive(Debug, Clone, Copy)]
pub enum StreamProtocol {
    /// HTTP/1.1: a connection per stream.
    Http1,
    /// HTTP/2 with prior knowledge: `per_connection` streams share each
    /// connection (1: a connection per stream, as a browser tab's).
    Http2 { per_connection: usize },
}

/// Stream requests in flight at once while the streams open: a burst of
/// thousands of connects starves the requests of the ones already accepted
/// (this tool shares the cores), and the service closes a connection whose
/// request does not arrive within its header-read timeout.
const OPENING_AT_ONCE: usize = 256;

/// What a `fanout` run does.
#[derive(Debug, Clone, Copy)]
pub struct Fanout {
    /// Streams of the posted chat.
    pub subscribers: usize,
    /// Above 0: each stream is a multiplexed one following the posted chat
    /// and this many chats in all (the others quiet).
    pub mux_chats: usize,
    /// Messages posted per second.
    pub rate: f64,
    /// How long messages are posted.
    pub duration: Duration,
    /// The service's pid, for its memory and CPU, and its Redis's, for
    /// Redis's CPU per notice (same machine).
    pub pids: Pids,
    pub protocol: StreamProtocol,
    /// Posts outstanding at most (1: each waits for the previous answer).
    pub posts_in_flight: usize,
}

/// `fanout`: `subscribers` SSE streams of one chat on one instance while
/// messages are posted at `rate` per second for `duration`. Reports the
/// delivery lag (commit to received), the event reads the chat's shard saw
/// per published event (from the admin view's `fetchQueries`), and, given the
/// service's pid, its memory per subscriber and its CPU per delivery (this
/// tool's own apart).
pub async fn fanout(target: &Target, recorder: &Recorder, run: Fanout) -> anyhow::Result<Value> {
    let Fanout {
        subscribers,
        mux_chats,
        rate,
        duration,
        pids,
        protocol,
        posts_in_flight,
    } = run;
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
    // Over HTTP/1 one client opens a connection per stream (a stream holds
    // its connection); over HTTP/2 a client per `per_connection` streams.
    let clients = stream_clients(protocol, subscribers)?;
    let opening = Arc::new(tokio::sync::Semaphore::new(OPENING_AT_ONCE));
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
            let http = match protocol {
                StreamProtocol::Http1 => clients[0].clone(),
                StreamProtocol::Http2 { per_connection } => clients[i / per_connection].clone(),
            };
            let opening = opening.clone();
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
                // Held until the stream's answer (or refusal) has arrived.
                let Ok(_opening) = opening.acquire_owned().await else {
                    return;
                };
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
                drop(_opening);
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
    let open_usage = service_pid.and_then(process_usage);
    let open_writes = service_pid.and_then(process_writes);
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
    // Each post on its own task, at most `posts_in_flight` at once: with 1,
    // a post waits for the previous answer (the rate then depends on the
    // service's answer time); with more, a slow answer does not delay the
    // next tick until that many are outstanding.
    let mut in_flight = tokio::task::JoinSet::new();
    let mut sent = 0u64;
    while Instant::now() < posting_until {
        tick.tick().await;
        while in_flight.len() >= posts_in_flight.max(1) {
            if let Some(Ok(ok)) = in_flight.join_next().await {
                posted += u64::from(ok);
            }
        }
        let (target, recorder) = (target.clone(), recorder.clone());
        let request = target
            .http
            .post(format!("{}/v1/chats/{chat}/messages", target.base))
            .json(&json!({"senderId": "poster", "clientMessageId": format!("f{sent}"), "text": "fan-out"}));
        sent += 1;
        in_flight.spawn(async move {
            let started = Instant::now();
            let (answer, ok) = target.call(request).await;
            recorder.record("post", started.elapsed(), &answer, ok);
            ok
        });
    }
    while let Some(done) = in_flight.join_next().await {
        posted += u64::from(done.unwrap_or(false));
    }
    // Until every open stream has every message (or 30 s).
    let want = posted * open;
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.load(Ordering::Relaxed) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reads = queries().await? - queries_before;
    let end_usage = service_pid.and_then(process_usage);
    let end_writes = service_pid.and_then(process_writes);
    let tool_end = process_usage(std::process::id());
    let redis_end = pids.redis.and_then(process_usage);
    let notices = match (notices_open, notices_sent(target).await) {
        (Some(a), Some(b)) => b - a,
        _ => 0.0,
    };
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
    let delivered = received.load(Ordering::Relaxed);
    // From the first post until every message was delivered (or the wait
    // above gave up): the service's CPU per delivery, this tool's apart;
    // only when the streams are on the instance measured.
    let local = target.others.is_empty();
    let cpu = match (open_usage, end_usage) {
        (Some((_, a)), Some((_, b))) => json!({
            "serviceCpuSecondsWhilePosting": b - a,
            "cores": (b - a) / duration.as_secs_f64(),
            "serviceCpuMicrosPerDelivery": if local { per_delivery(b - a, delivered) } else { Value::Null },
            "serviceWritesPerDelivery": match (open_writes, end_writes) {
                (Some(a), Some(b)) if delivered > 0 => json!(b.saturating_sub(a) as f64 / delivered as f64),
                _ => Value::Null,
            },
        }),
        _ => Value::Null,
    };
    let (tool_cores, tool_per_delivery) = match (tool_open, tool_end) {
        (Some((_, a)), Some((_, b))) => (
            json!((b - a) / duration.as_secs_f64()),
            per_delivery(b - a, delivered),
        ),
        _ => (Value::Null, Value::Null),
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
        "protocol": match protocol {
            StreamProtocol::Http1 => json!("http1"),
            StreamProtocol::Http2 { per_connection } => json!({"http2": {"streamsPerConnection": per_connection}}),
        },
        "crossInstance": !target.others.is_empty(),
        "muxChatsPerStream": mux_chats,
        "tailRevisionPollsTotal": polls,
        "streamsOpen": open,
        "messagesPerSecond": rate,
        "postsInFlight": posts_in_flight,
        "posted": posted,
        "delivered": delivered,
        "expected": want,
        "eventReads": reads,
        "eventReadsPerPublishedEvent": if posted > 0 { reads as f64 / posted as f64 } else { 0.0 },
        "memory": memory,
        "cpu": cpu,
        "loadToolCores": tool_cores,
        "loadToolMicrosPerDelivery": tool_per_delivery,
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

/// CPU seconds spent per delivery, in microseconds.
fn per_delivery(cpu_seconds: f64, deliveries: u64) -> Value {
    if deliveries == 0 {
        return Value::Null;
    }
    json!(cpu_seconds * 1e6 / deliveries as f64)
}

/// The clients the streams are opened with: one for every stream over
/// HTTP/1, one per `per_connection` streams over HTTP/2 (each holds one
/// connection). No timeout: a stream lasts the run.
fn stream_clients(
    protocol: StreamProtocol,
    subscribers: usize,
) -> anyhow::Result<Vec<reqwest::Client>> {
    let count = match protocol {
        StreamProtocol::Http1 => 1,
        StreamProtocol::Http2 { per_connection } => subscribers.div_ceil(per_connection.max(1)),
    };
    (0..count)
        .map(|_| {
            let builder = reqwest::Client::builder();
            let builder = match protocol {
                StreamProtocol::Http1 => builder.http1_only(),
                StreamProtocol::Http2 { .. } => builder.http2_prior_knowledge(),
            };
            Ok(builder.build()?)
        })
        .collect()
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
