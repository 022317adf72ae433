//! `fetch-spike`: pollers of one chat (plain polls or long-polls) while
//! messages are posted at a fixed rate: shard event queries per published
//! event, how the polls were answered, and (given the service's pid) its
//! CPU per answered poll.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::client::{Target, problem_code, run_id};
use crate::procfs::process_usage;
use crate::report::Recorder;

/// `fetch-spike`: `pollers` clients poll one chat's events as fast as they
/// are answered (a plain poll, `waitMs=0`, ignoring `Retry-After`, as the
/// reference incident's clients did; or long-polls with `wait_ms` > 0) while
/// messages are posted at `rate`. Reports the event queries the shard saw per
/// published event, and how the polls were answered; with `service_pid`
/// (same machine), the service's CPU per answered poll (the posts' share of
/// it included: a few per second against thousands of polls).
pub async fn fetch_spike(
    target: &Target,
    recorder: &Recorder,
    pollers: usize,
    rate: f64,
    wait_ms: u64,
    duration: Duration,
    service_pid: Option<u32>,
) -> anyhow::Result<Value> {
    let chat = run_id("fetch");
    target.chat_with_poster(&chat, "poster").await?;
    let queries_before = target.fetch_queries().await?;
    let cpu_before = service_pid.and_then(process_usage);
    let until = Instant::now() + duration;
    recorder.mark("polling starts");
    let polls: Vec<_> = (0..pollers)
        .map(|_| {
            let (target, recorder, chat) = (target.clone(), recorder.clone(), chat.clone());
            tokio::spawn(async move {
                let mut after = 0u64;
                while Instant::now() < until {
                    let started = Instant::now();
                    let request = target.http.get(format!(
                        "{}/v1/chats/{chat}/events?after={after}&limit=100&waitMs={wait_ms}",
                        target.base
                    ));
                    let answer = request.send().await;
                    let (answer, ok) = match answer {
                        Ok(r) if r.status().is_success() => {
                            if let Ok(page) = r.json::<Value>().await
                                && let Some(last) = page["events"]
                                    .as_array()
                                    .and_then(|e| e.last())
                                    .and_then(|e| e["revision"].as_u64())
                            {
                                after = last;
                            }
                            ("200".to_owned(), true)
                        }
                        Ok(r) => {
                            let status = r.status().as_u16();
                            (format!("{status}/{}", problem_code(r).await), false)
                        }
                        Err(_) => ("error/other".to_owned(), false),
                    };
                    recorder.record("poll", started.elapsed(), &answer, ok);
                }
            })
        })
        .collect();
    let posted = post_at(target, recorder, &chat, rate, until).await;
    for p in polls {
        let _ = p.await;
    }
    let answered = recorder.ok_count("poll");
    let cpu = match (cpu_before, service_pid.and_then(process_usage)) {
        (Some((_, a)), Some((_, b))) if answered > 0 => json!({
            "serviceCores": (b - a) / duration.as_secs_f64(),
            "serviceCpuMicrosPerPoll": (b - a) * 1e6 / answered as f64,
        }),
        _ => Value::Null,
    };
    let queries = target.fetch_queries().await? - queries_before;
    Ok(json!({
        "name": "fetch-spike",
        "pollers": pollers,
        "waitMs": wait_ms,
        "messagesPerSecond": rate,
        "posted": posted,
        "eventQueries": queries,
        "eventQueriesPerPublishedEvent": if posted > 0 { queries as f64 / posted as f64 } else { 0.0 },
        "cpu": cpu,
    }))
}

/// Posts to `chat` at `rate` per second until `until`; the messages stored.
async fn post_at(
    target: &Target,
    recorder: &Recorder,
    chat: &str,
    rate: f64,
    until: Instant,
) -> u64 {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut posted = 0u64;
    let mut n = 0u64;
    while Instant::now() < until {
        tick.tick().await;
        n += 1;
        let started = Instant::now();
        let (answer, ok) = target.post(chat, "poster", &format!("p{n}")).await;
        recorder.record("post", started.elapsed(), &answer, ok);
        posted += u64::from(ok);
    }
    posted
}
