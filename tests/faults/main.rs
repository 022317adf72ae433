//! Fault injection against real MariaDB processes: each scenario runs a steady
//! mixed load over chats on every shard, breaks one shard (or floods one chat),
//! repairs it, and asserts that the other shards never noticed, that callers of
//! the broken shard were answered fast, that the breaker closed again, and that
//! nothing acknowledged was lost.

#[path = "../common/mod.rs"]
mod common;
mod harness;
mod proxy;

use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::{Connection, MySqlConnection};

use harness::{Cluster, Load, SERIAL, assert_healthy};
use proxy::Mode;

/// The shard every scenario breaks.
const BROKEN: usize = 1;
/// How long the load runs before, during and after a fault: measurement
/// windows, not synchronisation.
const WINDOW: Duration = Duration::from_millis(2500);

/// A fault that the breaker must see: open, fail fast, close after repair.
/// `outcomes`: the failure outcomes the broken shard's operations must show
/// in the metrics (any of them), as docs/observability.md tells an SRE.
async fn breaker_scenario<I, R>(name: &str, outcomes: &[&str], inject: I, remove: R)
where
    I: AsyncFnOnce(&mut Cluster),
    R: AsyncFnOnce(&mut Cluster),
{
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start().await;
    let load = Load::start(&cluster);
    tokio::time::sleep(WINDOW).await;

    let fault_start = Instant::now();
    inject(&mut cluster).await;
    let opened_after = cluster
        .wait_breaker(BROKEN, "OPEN", Duration::from_secs(10))
        .await;
    let fail_fast = cluster.assert_fail_fast(BROKEN).await;
    assert_telemetry_tells(&cluster, outcomes).await;
    tokio::time::sleep(WINDOW).await;
    remove(&mut cluster).await;
    let fault_end = Instant::now();

    let closed_after = cluster
        .wait_breaker(BROKEN, "CLOSED", Duration::from_secs(15))
        .await;
    let write_ok_after = cluster.wait_write_ok(BROKEN, Duration::from_secs(10)).await;
    tokio::time::sleep(WINDOW).await;
    let (samples, acked) = load.stop().await;

    let report = assert_healthy(&samples, |s| s.shard == BROKEN, (fault_start, fault_end));
    cluster.assert_consistent(&acked).await;
    eprintln!(
        "[{name}] healthy p99 before {:?}, during {:?} (ratio {:.2}) over {} requests; \
         breaker open after {opened_after:?}; fail-fast worst {fail_fast:?}; \
         closed {closed_after:?} and a write succeeded {write_ok_after:?} after repair",
        report.baseline_p99,
        report.fault_p99,
        report.fault_p99.as_secs_f64() / report.baseline_p99.as_secs_f64().max(1e-9),
        report.healthy_requests,
    );
}

/// From `/metrics` alone: the broken shard's breaker is open, its operations
/// failed with one of `outcomes` before it opened, calls are now refused with
/// `breaker_open`, and no other shard shows a failure.
async fn assert_telemetry_tells(c: &Cluster, outcomes: &[&str]) {
    let broken = format!("shard=\"shard-{BROKEN}\"");
    let state = c
        .metric_sum("chatshard_shard_breaker_state", &[&broken])
        .await;
    assert_eq!(state, 1.0, "breaker_state of the broken shard");
    let op = "chatshard_shard_operations_total";
    let mut failed = 0.0;
    for outcome in outcomes {
        failed += c
            .metric_sum(op, &[&broken, &format!("outcome=\"{outcome}\"")])
            .await;
    }
    assert!(
        failed > 0.0,
        "no {outcomes:?} operations on the broken shard"
    );
    let refused = c
        .metric_sum(op, &[&broken, "outcome=\"breaker_open\""])
        .await;
    let rejected = c
        .metric_sum(
            "chatshard_shard_rejections_total",
            &[&broken, "reason=\"breaker_open\""],
        )
        .await;
    assert!(refused > 0.0 && rejected > 0.0, "no breaker_open refusals");
    // Refusals are counted, not timed: the latency histogram holds only the
    // calls that reached the database, so a hung shard's p99 shows.
    let timed_refusals = c
        .metric_sum(
            "chatshard_shard_operation_duration_seconds_count",
            &["outcome=\"breaker_open\""],
        )
        .await;
    assert_eq!(timed_refusals, 0.0, "refusals in the latency histogram");
    for (labels, count) in c.metric(op).await {
        if !labels.contains(&broken) && count > 0.0 {
            assert!(
                labels.contains("outcome=\"ok\""),
                "a healthy shard shows a failure: {labels}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_shard_killed_then_restarted() {
    breaker_scenario(
        "kill",
        &["unavailable", "outcome_unknown"],
        async |c| c.shards.server_mut(BROKEN).kill().expect("SIGKILL"),
        async |c| {
            c.shards
                .server_mut(BROKEN)
                .restart()
                .await
                .expect("restart")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_shard_hung_then_resumed() {
    breaker_scenario(
        "stop",
        &["timeout", "outcome_unknown"],
        async |c| c.shards.server(BROKEN).suspend().expect("SIGSTOP"),
        async |c| c.shards.server(BROKEN).resume().expect("SIGCONT"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_shard_slower_than_the_deadline() {
    breaker_scenario(
        "slow",
        &["timeout", "outcome_unknown"],
        async |c| c.proxies[BROKEN].set(Mode::Delay(Duration::from_millis(800))),
        async |c| c.proxies[BROKEN].set(Mode::Pass),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4a_connections_reset() {
    breaker_scenario(
        "reset",
        &["unavailable", "outcome_unknown"],
        async |c| c.proxies[BROKEN].set(Mode::Reset),
        async |c| c.proxies[BROKEN].set(Mode::Pass),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4b_connections_black_holed() {
    breaker_scenario(
        "blackhole",
        &["timeout", "outcome_unknown"],
        async |c| c.proxies[BROKEN].set(Mode::Blackhole),
        async |c| c.proxies[BROKEN].set(Mode::Pass),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s6_shard_out_of_connections() {
    breaker_scenario(
        "max_connections",
        &["unavailable"],
        async |c| {
            let mut root = c.shards.server(BROKEN).connect("chatshard").await.expect("root");
            sqlx::query("CREATE USER IF NOT EXISTS 'hog'@'127.0.0.1'")
                .execute(&mut root)
                .await
                .expect("setup");
            // Another client holds many connections, and the limit then drops
            // below what is open: no new connection can get in, even in slots
            // that chatshard's killed connections free (a race otherwise won
            // by chatshard's reconnects).
            let url = format!("mysql://hog@127.0.0.1:{}/", c.shards.server(BROKEN).port());
            let mut hogs = Vec::new();
            for _ in 0..30 {
                hogs.push(MySqlConnection::connect(&url).await.expect("hog"));
            }
            sqlx::query("SET GLOBAL max_connections = 10")
                .execute(&mut root)
                .await
                .expect("setup");
            let refused = match MySqlConnection::connect(&url).await {
                Ok(_) => panic!("a connection past max_connections was let in"),
                Err(e) => e.to_string(),
            };
            assert!(refused.contains("1040") || refused.to_lowercase().contains("too many"), "{refused}");
            // ...and chatshard's open connections are killed, so it must reconnect.
            let ids: Vec<u64> = sqlx::query_scalar(
                "SELECT CAST(id AS UNSIGNED) FROM information_schema.processlist WHERE user = 'chatshard'",
            )
            .fetch_all(&mut root)
            .await
            .expect("processlist");
            for id in ids {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!("KILL CONNECTION {id}")))
                    .execute(&mut root)
                    .await;
            }
            HOGS.with_hogs(hogs, root);
        },
        async |c| {
            let (hogs, mut root) = HOGS.take();
            drop(hogs);
            sqlx::query("SET GLOBAL max_connections = 500")
                .execute(&mut root)
                .await
                .expect("restore");
            let _ = c;
        },
    )
    .await;
}

/// Holds scenario 6's hog connections between its inject and remove steps.
struct Hogs(std::sync::Mutex<Option<(Vec<MySqlConnection>, MySqlConnection)>>);

static HOGS: Hogs = Hogs(std::sync::Mutex::new(None));

impl Hogs {
    fn with_hogs(&self, hogs: Vec<MySqlConnection>, root: MySqlConnection) {
        *self.0.lock().expect("hogs") = Some((hogs, root));
    }

    fn take(&self) -> (Vec<MySqlConnection>, MySqlConnection) {
        self.0.lock().expect("hogs").take().expect("hogs were set")
    }
}

/// A read-only shard: writes fail with a clear code, reads keep working, and
/// the breaker does not open (reads must not be refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_shard_read_only() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await;
    let load = Load::start(&cluster);
    tokio::time::sleep(WINDOW).await;

    let mut root = cluster
        .shards
        .server(BROKEN)
        .connect("chatshard")
        .await
        .expect("root");
    let fault_start = Instant::now();
    sqlx::query("SET GLOBAL read_only = 1")
        .execute(&mut root)
        .await
        .expect("read_only");
    tokio::time::sleep(2 * WINDOW).await;
    let breaker_during = cluster.breaker(BROKEN).await;
    // In the metrics: writes failed with `read_only`, the breaker stayed closed.
    let broken = format!("shard=\"shard-{BROKEN}\"");
    let read_only = cluster
        .metric_sum(
            "chatshard_shard_operation_duration_seconds_count",
            &[&broken, "outcome=\"read_only\""],
        )
        .await;
    assert!(read_only > 0.0, "no read_only outcome in the metrics");
    let state = cluster
        .metric_sum("chatshard_shard_breaker_state", &[&broken])
        .await;
    assert_eq!(state, 0.0, "breaker_state of the read-only shard");
    sqlx::query("SET GLOBAL read_only = 0")
        .execute(&mut root)
        .await
        .expect("read_write");
    let fault_end = Instant::now();
    cluster.wait_write_ok(BROKEN, Duration::from_secs(5)).await;
    tokio::time::sleep(WINDOW).await;
    let (samples, acked) = load.stop().await;

    assert_eq!(
        breaker_during, "CLOSED",
        "a read-only shard must not open the breaker"
    );
    let during: Vec<_> = samples
        .iter()
        .filter(|s| s.shard == BROKEN && s.at >= fault_start && s.at < fault_end)
        .collect();
    let (writes, reads): (Vec<_>, Vec<_>) = during.iter().partition(|s| s.write);
    assert!(
        !reads.is_empty() && reads.iter().all(|s: &&&harness::Sample| s.status == 200),
        "reads must keep working"
    );
    // A write racing the switch may still succeed; the others fail clearly.
    let refused: Vec<_> = writes
        .iter()
        .filter(|s| s.status != 201 && s.status != 200)
        .collect();
    assert!(!refused.is_empty(), "no write was refused while read-only");
    assert!(
        refused
            .iter()
            .all(|s| s.status == 503 && s.code == "shard_read_only"),
        "{:?}",
        refused
            .iter()
            .map(|s| (&s.status, &s.code))
            .collect::<Vec<_>>()
    );
    let report = assert_healthy(&samples, |s| s.shard == BROKEN, (fault_start, fault_end));
    cluster.assert_consistent(&acked).await;
    eprintln!(
        "[read_only] healthy p99 before {:?}, during {:?}; {} reads ok and {} writes refused with shard_read_only on the read-only shard",
        report.baseline_p99,
        report.fault_p99,
        reads.len(),
        refused.len()
    );
}

/// One chat floods its shard with work: it gets its share and `chat_busy` past
/// it, while the other chats of the same shard, and the other shards, keep
/// succeeding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s7_hot_chat_takes_only_its_share() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await;
    let hot = cluster.chats[BROKEN][0].clone();
    // Enough history that every fetch of the hot chat reads real pages.
    let join = cluster
        .http
        .post(cluster.url(&format!("/v1/chats/{hot}/members")))
        .json(&serde_json::json!({ "userId": "star" }))
        .send()
        .await
        .expect("join");
    assert!(join.status().is_success());
    let text = "x".repeat(100);
    for i in 0..200 {
        let r = cluster
            .http
            .post(cluster.url(&format!("/v1/chats/{hot}/messages")))
            .json(&serde_json::json!({ "senderId": "star", "clientMessageId": format!("h{i}"), "text": text }))
            .send()
            .await
            .expect("post");
        assert!(r.status().is_success());
    }

    let load = Load::start(&cluster);
    tokio::time::sleep(WINDOW).await;
    let fault_start = Instant::now();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Member pages, each task its own page size: every one is a read of the
    // shard (event fetches are answered from the chat's in-memory tail, and
    // identical ones would be coalesced), so the flood reaches the chat's share.
    let flood: Vec<_> = (0..64)
        .map(|task| {
            let (http, url, stop) = (
                cluster.http.clone(),
                cluster.url(&format!("/v1/chats/{hot}/members?limit={}", 10 + task)),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    let Ok(r) = http.get(&url).send().await else {
                        continue;
                    };
                    let status = r.status().as_u16();
                    let code = if status == 200 {
                        // Read the body; the page itself is not needed.
                        let _ = r.bytes().await;
                        String::new()
                    } else {
                        r.json::<Value>()
                            .await
                            .map(|b| b["code"].as_str().unwrap_or("").to_owned())
                            .unwrap_or_default()
                    };
                    if status != 200 {
                        // A refused client backs off a little (far less than
                        // the Retry-After it was given) and comes straight back.
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                    statuses.push((status, code));
                }
                statuses
            })
        })
        .collect();
    tokio::time::sleep(2 * WINDOW).await;
    let breaker_during = cluster.breaker(BROKEN).await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    let mut flood_results = Vec::new();
    for f in flood {
        flood_results.extend(f.await.expect("flood"));
    }
    let fault_end = Instant::now();
    tokio::time::sleep(WINDOW).await;
    let (samples, acked) = load.stop().await;

    assert_eq!(
        breaker_during, "CLOSED",
        "a hot chat must not open its shard's breaker"
    );
    let served = flood_results.iter().filter(|(s, _)| *s == 200).count();
    let chat_busy = flood_results
        .iter()
        .filter(|(_, c)| c == "chat_busy")
        .count();
    assert!(
        served > 0,
        "the hot chat must still be served within its share"
    );
    assert!(
        chat_busy > 0,
        "the hot chat never hit its share: the flood was too small to test it"
    );
    assert!(
        flood_results
            .iter()
            .all(|(s, c)| *s == 200 || c == "chat_busy"),
        "the hot chat got other errors: {:?}",
        flood_results
            .iter()
            .filter(|(s, _)| *s != 200)
            .take(5)
            .collect::<Vec<_>>()
    );
    // Every request of every other chat, including the other chats of the hot
    // chat's own shard, succeeded.
    let others: Vec<_> = samples.iter().filter(|s| s.chat != hot).collect();
    assert!(
        others.iter().all(|s| (200..300).contains(&s.status)),
        "another chat failed during the flood"
    );
    // The flood also loads this process's two cores (client and server share
    // them), which slows every request alike; what the hot chat must not do is
    // take its shard from the other chats there. So the other chats of its shard
    // are compared with the chats of the untouched shards, in the same window.
    let during = |s: &&&harness::Sample| s.at >= fault_start && s.at < fault_end;
    let same_shard: Vec<&harness::Sample> = others
        .iter()
        .filter(during)
        .filter(|s| s.shard == BROKEN)
        .copied()
        .collect();
    let other_shards: Vec<&harness::Sample> = others
        .iter()
        .filter(during)
        .filter(|s| s.shard != BROKEN)
        .copied()
        .collect();
    assert!(same_shard.len() >= 20 && other_shards.len() >= 20);
    let (p_same, p_other) = (harness::p99(&same_shard), harness::p99(&other_shards));
    // The same bound as every scenario (see harness::assert_healthy): queued
    // behind the hot chat, a request would wait out max_wait or more.
    let limit = (4 * p_other).max(std::time::Duration::from_millis(50));
    assert!(
        p_same <= limit,
        "other chats of the hot chat's shard: p99 {p_same:?} > {limit:?} (untouched shards: {p_other:?})"
    );
    let before: Vec<&harness::Sample> = others
        .iter()
        .filter(|s| s.at < fault_start)
        .copied()
        .collect();
    let report = harness::Report {
        baseline_p99: harness::p99(&before),
        fault_p99: p_same,
        healthy_requests: others.len(),
    };
    cluster.assert_consistent(&acked).await;
    eprintln!(
        "[hot_chat] other chats p99 before {:?}; during the flood: other chats of the hot shard {:?}, chats of untouched shards {p_other:?} (ratio {:.2}); \
         the hot chat: {served} fetches served, {chat_busy} answered chat_busy; {} requests of other chats of its shard all succeeded",
        report.baseline_p99,
        report.fault_p99,
        p_same.as_secs_f64() / p_other.as_secs_f64().max(1e-9),
        same_shard.len()
    );
}

/// A stream of a chat whose shard breaks stays open, and delivers again, from
/// where it was and without a gap, once the shard is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s8_streams_stay_open_across_a_broken_shard() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await;
    let chat = cluster.chats[BROKEN][0].clone();
    let join = cluster
        .http
        .post(cluster.url(&format!("/v1/chats/{chat}/members")))
        .json(&serde_json::json!({ "userId": "before-fault" }))
        .send()
        .await
        .expect("join");
    assert!(join.status().is_success());
    let http = reqwest::Client::new();
    let mut stream = common::SseReader::open(
        &http,
        &cluster.base,
        &format!("/v1/chats/{chat}/events/stream?after=0"),
        None,
    )
    .await
    .unwrap_or_else(|r| panic!("stream refused: {}", r.status()));
    let first = stream
        .next(Duration::from_secs(10))
        .await
        .expect("first event");
    assert_eq!(first.id.as_deref(), Some("1"));
    // A multiplexed stream following the same chat and a chat of a healthy
    // shard.
    let healthy = cluster.chats[0][0].clone();
    let made: Value = http
        .post(cluster.url("/v1/streams"))
        .json(&serde_json::json!({"chats": {&chat: 1, &healthy: 0}}))
        .send()
        .await
        .expect("make a stream")
        .json()
        .await
        .expect("json");
    let mux_path = format!(
        "/v1/streams/{}",
        made["streamId"].as_str().expect("streamId")
    );
    let mut mux = common::SseReader::open(&http, &cluster.base, &mux_path, None)
        .await
        .unwrap_or_else(|r| panic!("multiplexed stream refused: {}", r.status()));
    let mux_event = |sse: common::Sse| -> (String, u64) {
        let data: Value = serde_json::from_str(&sse.data).expect("json");
        (
            data["chatId"].as_str().expect("chatId").to_owned(),
            data["revision"].as_u64().expect("revision"),
        )
    };
    // Whatever the healthy chat already holds comes first.
    let mut healthy_seen = 0;
    while let Ok(Some(sse)) = mux.next_within(Duration::from_secs(1)).await {
        let (c, revision) = mux_event(sse);
        assert_eq!(
            c, healthy,
            "only the healthy chat has events after the cursors"
        );
        assert_eq!(revision, healthy_seen + 1);
        healthy_seen = revision;
    }

    cluster.proxies[BROKEN].set(Mode::Reset);
    cluster
        .wait_breaker(BROKEN, "OPEN", Duration::from_secs(10))
        .await;
    // Broken for a few seconds: the stream neither ends nor gets an event.
    assert!(
        stream.next_within(Duration::from_secs(3)).await.is_err(),
        "the stream ended or delivered while its shard was broken"
    );
    // The multiplexed stream still carries the healthy chat.
    let join = cluster
        .http
        .post(cluster.url(&format!("/v1/chats/{healthy}/members")))
        .json(&serde_json::json!({ "userId": "during-fault" }))
        .send()
        .await
        .expect("join");
    assert!(join.status().is_success());
    let (c, revision) = mux_event(mux.next(Duration::from_secs(10)).await.expect("open"));
    assert_eq!((c.as_str(), revision), (healthy.as_str(), healthy_seen + 1));

    cluster.proxies[BROKEN].set(Mode::Pass);
    cluster.wait_write_ok(BROKEN, Duration::from_secs(15)).await;
    // The write that succeeded is the next revision, and the stream brings it.
    let next = stream
        .next(Duration::from_secs(15))
        .await
        .expect("the stream delivered again after the repair");
    assert_eq!(next.id.as_deref(), Some("2"));
    let data: Value = serde_json::from_str(&next.data).expect("json");
    assert_eq!(data["type"], "MEMBER_JOINED");
    let (c, revision) = mux_event(mux.next(Duration::from_secs(15)).await.expect("open"));
    assert_eq!((c.as_str(), revision), (chat.as_str(), 2));
    eprintln!(
        "[stream] open across the fault; delivered revision 2 after the repair; the \
         multiplexed stream carried the healthy chat throughout"
    );
}

/// The chat's move, from the admin view (`None` while its shard cannot
/// answer).
async fn move_of(c: &Cluster, id: &str) -> Option<Value> {
    let r = c
        .http
        .get(c.url(&format!("/v1/admin/moves/{id}")))
        .bearer_auth(harness::ADMIN_TOKEN)
        .send()
        .await
        .ok()?;
    if r.status().is_success() {
        r.json().await.ok()
    } else {
        None
    }
}

/// Polls the move until `done` holds for it.
async fn wait_move(
    c: &Cluster,
    id: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        if let Some(m) = move_of(c, id).await
            && done(&m)
        {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "move {id}: not there within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval
    }
}

/// Starts the move of `chat` to `to`; its id.
async fn start_move(c: &Cluster, chat: &str, to: &str) -> String {
    let r = c
        .http
        .post(c.url(&format!("/v1/admin/chats/{chat}/move")))
        .bearer_auth(harness::ADMIN_TOKEN)
        .json(&serde_json::json!({ "to": to }))
        .send()
        .await
        .expect("move");
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.expect("json");
    body["id"].as_str().expect("id").to_owned()
}

/// A join through the service; its status.
async fn join(c: &Cluster, chat: &str, user: &str) -> u16 {
    c.http
        .post(c.url(&format!("/v1/chats/{chat}/members")))
        .json(&serde_json::json!({ "userId": user }))
        .send()
        .await
        .expect("join")
        .status()
        .as_u16()
}

/// A new chat `{prefix}-N` stored on the shard named `shard`, with `members`
/// members `m0`, `m1`, ....
async fn chat_on(c: &Cluster, prefix: &str, shard: &str, members: usize) -> String {
    let mut chat = String::new();
    for i in 0.. {
        chat = format!("{prefix}-{i}");
        let r = c
            .http
            .put(c.url(&format!("/v1/chats/{chat}")))
            .json(&serde_json::json!({ "maxMembers": 100_000 }))
            .send()
            .await
            .expect("put");
        let body: Value = r.json().await.expect("json");
        if body["shard"] == shard {
            break;
        }
    }
    for n in (0..members).step_by(50) {
        let users: Vec<String> = (n..(n + 50).min(members))
            .map(|i| format!("m{i}"))
            .collect();
        let joins = users.iter().map(|user| join(c, &chat, user));
        for status in futures_util::future::join_all(joins).await {
            assert_eq!(status, 201, "filling {chat}");
        }
    }
    chat
}

/// The source shard killed while a chat is copied off it, then, the chat
/// moved, its new shard killed. The move stops with its source, is taken
/// over once the source is back and resumed to the end: the chat is whole on
/// its new shard. There the chat is down only while that shard is, nothing
/// lands on the old one, and it is whole once the shard is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s9_the_source_dies_mid_copy_and_the_target_after_the_switch() {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start_with(|s| {
        // A slow copy (150 batches, 20 ms apart), so the kill lands in it;
        // a short lease, so the move is taken over soon after the restart.
        s.moves.batch_revisions = 10;
        s.moves.pause_ms = 20;
        s.moves.max_p99_ratio = 0.0;
        s.moves.lease_ms = 1000;
        s.moves.fence_ms = 500;
        // The chat is filled at full speed.
        s.join_throttle.enabled = false;
    })
    .await;
    let source = BROKEN;
    let target = (BROKEN + 1) % c.settings.shards.len();
    let (source_name, target_name) = (c.shard_name(source), c.shard_name(target));
    let chat = chat_on(&c, "moving", &source_name, 1500).await;
    let urls = c.shard_urls();

    // 1. The source dies mid-copy.
    let id = start_move(&c, &chat, &target_name).await;
    wait_move(&c, &id, Duration::from_secs(30), |m| {
        m["phase"] == "copying" && m["copiedRevision"].as_u64().unwrap_or(0) > 0
    })
    .await;
    c.shards.server_mut(source).kill().expect("SIGKILL");
    c.shards
        .server_mut(source)
        .restart()
        .await
        .expect("restart");
    let ended = wait_move(&c, &id, Duration::from_secs(60), |m| {
        m["phase"] == "done" || m["phase"] == "rolled_back"
    })
    .await;
    eprintln!("[s9] the move off a killed source: {ended}");
    assert_eq!(ended["phase"], "done", "resumed after the restart: {ended}");
    let mut old = MySqlConnection::connect(&urls[source])
        .await
        .expect("source");
    let mut new = MySqlConnection::connect(&urls[target])
        .await
        .expect("target");
    common::assert_chat_consistent(&mut new, &chat).await;
    assert_eq!(common::count_and_rows(&mut new, &chat).await, (1500, 1500));
    assert_eq!(join(&c, &chat, "after-resume").await, 201);

    // 2. Its new shard dies.
    c.shards.server_mut(target).kill().expect("SIGKILL");
    // Refused, retryably, while its shard is down: never written on the old one.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut refused = 0;
    while refused < 5 {
        let status = join(&c, &chat, &format!("while-down-{refused}")).await;
        assert_ne!(
            status / 100,
            2,
            "a join landed while the chat's shard is down"
        );
        if status == 503 {
            refused += 1;
        } else {
            assert!(Instant::now() < deadline, "answered {status}, not 503");
        }
    }
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM chat_member WHERE chat_id = ?")
        .bind(&chat)
        .fetch_one(&mut old)
        .await
        .expect("source rows");
    assert_eq!(left, 0, "nothing on the old shard");
    c.shards
        .server_mut(target)
        .restart()
        .await
        .expect("restart");
    let deadline = Instant::now() + Duration::from_secs(15);
    while join(&c, &chat, "after-restart").await / 100 != 2 {
        assert!(Instant::now() < deadline, "the chat did not come back");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval
    }
    let mut new = MySqlConnection::connect(&urls[target])
        .await
        .expect("target");
    common::assert_chat_consistent(&mut new, &chat).await;
    assert_eq!(common::count_and_rows(&mut new, &chat).await, (1502, 1502));
}

/// The target slowed (every packet to and from it held 30 ms) so that no
/// fence of 100 ms can cover the final catch-up: each attempt's fence lapses
/// before the switch, the move rolls back after its third, and the chat
/// keeps working on its source, with every write acknowledged meanwhile
/// there, once, and nothing left on the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s10_a_fence_that_lapses_rolls_the_move_back() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start_with(|s| {
        s.moves.fence_ms = 100;
        // Longer than any step against the slowed target takes, so the move
        // is not taken for abandoned.
        s.moves.lease_ms = 10_000;
        s.moves.max_p99_ratio = 0.0;
        // Slow, not failing: the target's statements stay within deadlines.
        s.pool.operation_timeout_ms = 5000;
        s.pool.connect_timeout_ms = 5000;
        s.join_throttle.enabled = false;
    })
    .await;
    let target = BROKEN;
    let source = (BROKEN + 1) % c.settings.shards.len();
    let (source_name, target_name) = (c.shard_name(source), c.shard_name(target));
    let chat = chat_on(&c, "lapsing", &source_name, 200).await;
    let urls = c.shard_urls();

    c.proxies[target].set(Mode::Delay(Duration::from_millis(30)));
    // A writer joins new members throughout, each retried until acknowledged
    // (a fenced write is held, or answered 503).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (base, http, chat, stop) = (c.base.clone(), c.http.clone(), chat.clone(), stop.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            // 50 joins a second: a copy against the slowed target keeps up.
            let mut pace = tokio::time::interval(Duration::from_millis(20));
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                pace.tick().await;
                let user = format!("w{}", acked.len());
                loop {
                    let r = http
                        .post(format!("{base}/v1/chats/{chat}/members"))
                        .json(&serde_json::json!({ "userId": user }))
                        .send()
                        .await
                        .expect("join");
                    match r.status().as_u16() {
                        200 | 201 => break,
                        503 => tokio::time::sleep(Duration::from_millis(10)).await, // backoff
                        other => panic!("join {user}: {other}"),
                    }
                }
                acked.push(user);
            }
            acked
        })
    };
    let id = start_move(&c, &chat, &target_name).await;
    let ended = wait_move(&c, &id, Duration::from_secs(60), |m| {
        m["phase"] == "rolled_back" || m["phase"] == "done"
    })
    .await;
    eprintln!("[s10] the move to a slow target: {ended}");
    assert_eq!(ended["phase"], "rolled_back", "{ended}");
    assert!(
        ended["error"]
            .as_str()
            .unwrap_or_default()
            .contains("lapsed"),
        "{ended}"
    );
    c.proxies[target].set(Mode::Pass);
    // Writes go on on the source after the roll-back.
    let after = wait_joined(&c, &chat, "after-rollback").await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.await.expect("writer");
    eprintln!("[s10] {} joins acknowledged during the move", acked.len());

    let body: Value = c
        .http
        .get(c.url(&format!("/v1/chats/{chat}")))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(body["shard"], source_name.as_str(), "{body}");
    let mut old = MySqlConnection::connect(&urls[source])
        .await
        .expect("source");
    let mut new = MySqlConnection::connect(&urls[target])
        .await
        .expect("target");
    common::assert_chat_consistent(&mut old, &chat).await;
    let mut users = common::joined_users(&mut old, &chat).await;
    users.sort();
    let mut expected: Vec<String> = (0..200).map(|i| format!("m{i}")).chain(acked).collect();
    expected.push(after);
    expected.sort();
    assert_eq!(users, expected, "every acknowledged join, once");
    let n = expected.len() as i64;
    assert_eq!(common::count_and_rows(&mut old, &chat).await, (n, n));
    for table in ["chat", "chat_member", "chat_event"] {
        let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM {table} WHERE chat_id = ?"
        )))
        .bind(&chat)
        .fetch_one(&mut new)
        .await
        .expect("target");
        assert_eq!(rows, 0, "the target keeps nothing of the chat in {table}");
    }
}

/// Joins `user` once the chat takes writes again; the user.
async fn wait_joined(c: &Cluster, chat: &str, user: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = join(c, chat, user).await;
        if status / 100 == 2 {
            return user.to_owned();
        }
        assert!(Instant::now() < deadline, "join answered {status}");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval
    }
}
