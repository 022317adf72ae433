//! `refusals`: how fast refused requests (`join_throttled`,
//! `fetch_throttled`) are answered while the refusing condition holds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::client::{Target, run_id};
use crate::report::Recorder;

/// `refusals`: how fast refused requests are answered while the refusing
/// condition holds: joins past a join limit of one per minute
/// (`join_throttled`) and plain polls of a hot chat throttled at rate 1
/// (`fetch_throttled`), each by `clients` clients. Needs the admin token.
pub async fn refusals(
    target: &Target,
    recorder: &Recorder,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<Value> {
    let chat = run_id("refuse");
    target.chat_with_poster(&chat, "poster").await?;
    target
        .set_override(
            "joinThrottle",
            &chat,
            json!({"enabled": true, "limit": 1, "windowSeconds": 60}),
        )
        .await?;
    target
        .set_override(
            "hotChat",
            &chat,
            json!({"enabled": true, "threshold": 1, "durationSeconds": 60, "expireSeconds": 600, "throttleRate": 1.0}),
        )
        .await?;
    // Two events within the window make the chat hot.
    for key in ["h1", "h2"] {
        let _ = target.post(&chat, "poster", key).await;
    }
    let until = Instant::now() + duration;
    recorder.mark("refusing");
    let users = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (target, recorder, chat, users) = (
                target.clone(),
                recorder.clone(),
                chat.clone(),
                users.clone(),
            );
            tokio::spawn(async move {
                while Instant::now() < until {
                    let started = Instant::now();
                    let (kind, request) = if c % 2 == 0 {
                        let n = users.fetch_add(1, Ordering::Relaxed);
                        (
                            "refused_join",
                            target
                                .http
                                .post(format!("{}/v1/chats/{chat}/members", target.base))
                                .json(&json!({"userId": format!("r{n}")})),
                        )
                    } else {
                        (
                            "refused_fetch",
                            target
                                .http
                                .get(format!("{}/v1/chats/{chat}/events?after=0", target.base)),
                        )
                    };
                    let (answer, _) = target.call(request).await;
                    // Refusals are what is measured here: every answer counts.
                    recorder.record(kind, started.elapsed(), &answer, true);
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    // The service's own view: the share of its 429 answers (this run's and
    // any before) that took at most 1 ms, from its request histogram.
    let within = |le: &'static str| async move {
        target
            .metric_where(
                "http_server_request_duration_seconds_bucket",
                &["http_response_status_code=\"429\"", le],
            )
            .await
    };
    let server_share = match (within("le=\"0.001\"").await, within("le=\"+Inf\"").await) {
        (Some(fast), Some(all)) if all > 0.0 => json!(fast / all),
        _ => Value::Null,
    };
    Ok(json!({
        "name": "refusals",
        "clients": clients,
        "serverShareOf429WithinOneMs": server_share,
        "refusedJoinP99Ms": recorder.quantile_ms("refused_join", 0.99),
        "refusedFetchP99Ms": recorder.quantile_ms("refused_fetch", 0.99),
    }))
}
