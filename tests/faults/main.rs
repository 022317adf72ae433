//! Fault injection against real MariaDB processes: each scenario runs a steady
//! mixed load over chats on every shard, breaks one shard (or floods one chat),
//! repairs it, and asserts that the other shards never noticed, that callers of
//! the broken shard were refused by its breaker without waiting for it, that
//! the breaker closed again, and that nothing acknowledged was lost.
//!
//! Every phase lasts until the load has given the answers the phase is about
//! (counted while it runs), never a fixed time.

#[path = "../common/mod.rs"]
mod common;
mod harness;
mod proxy;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::{Connection, MySqlConnection};

use common::Wait;
use common::sse::Silent;
use harness::{Cluster, Load, SERIAL, Symptom, assert_healthy};
use proxy::Mode;

/// The shard every scenario breaks.
const BROKEN: usize = 1;
/// Answers each phase waits for (per shard before a fault).
const ANSWERS: usize = 20;

/// A fault that the breaker must see: open, refuse without waiting, close
/// after repair. `outcomes`: the failure outcomes the broken shard's
/// operations must show in the metrics (any of them), as
/// docs/observability.md tells an SRE.
async fn breaker_scenario<I, R>(
    name: &str,
    symptom: Symptom,
    outcomes: &[&str],
    inject: I,
    remove: R,
) where
    I: AsyncFnOnce(&mut Cluster),
    R: AsyncFnOnce(&mut Cluster),
{
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start().await;
    let load = Load::start(&cluster);
    load.wait_for_each_shard(ANSWERS, "answers before the fault", |s| s.ok())
        .await;

    let fault_start = Instant::now();
    inject(&mut cluster).await;
    let opened_after = cluster
        .wait_breaker(BROKEN, "OPEN", Duration::from_secs(10))
        .await;
    let tries = cluster.assert_refused_by_breaker(BROKEN).await;
    assert_telemetry_tells(&cluster, outcomes).await;
    // The fault's window: the healthy shards answer the load meanwhile and,
    // where calls hang, while one of them is held.
    load.wait_for(2 * ANSWERS, "healthy answers during the fault", |s| {
        s.shard != BROKEN && s.since(fault_start) && s.ok()
    })
    .await;
    if symptom == Symptom::Hangs {
        load.wait_answered_while_held(BROKEN, fault_start).await;
    }
    remove(&mut cluster).await;
    let fault_end = Instant::now();

    let closed_after = cluster
        .wait_breaker(BROKEN, "CLOSED", Duration::from_secs(15))
        .await;
    let write_ok_after = cluster.wait_write_ok(BROKEN, Duration::from_secs(10)).await;
    load.wait_for(ANSWERS, "answers of the repaired shard", |s| {
        s.shard == BROKEN && s.since(fault_end) && s.ok()
    })
    .await;
    let (samples, acked) = load.stop().await;

    let report = assert_healthy(&samples, BROKEN, (fault_start, fault_end), symptom);
    cluster.assert_consistent(&acked).await;
    eprintln!(
        "[{name}] {} healthy requests, all 2xx, {} of them while the shard was broken, \
         {} while one of its {} held calls waited; breaker open after {opened_after:?}; \
         refusals by the open breaker checked in {tries} round(s); closed {closed_after:?} \
         and a write succeeded {write_ok_after:?} after repair",
        report.healthy_requests, report.during_fault, report.answered_while_held, report.held_calls,
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
        Symptom::Fails,
        &["unavailable", "outcome_unknown"],
        async |c| c.shards().server_mut(BROKEN).kill().expect("SIGKILL"),
        async |c| {
            c.shards()
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
        Symptom::Hangs,
        &["timeout", "outcome_unknown"],
        async |c| c.shards().server(BROKEN).suspend().expect("SIGSTOP"),
        async |c| c.shards().server(BROKEN).resume().expect("SIGCONT"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_shard_slower_than_the_deadline() {
    breaker_scenario(
        "slow",
        Symptom::Hangs,
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
        Symptom::Fails,
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
        Symptom::Hangs,
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
        Symptom::Fails,
        &["unavailable"],
        async |c| {
            let server = c.shards().server(BROKEN);
            let mut root = server.connect("chatshard").await.expect("root");
            sqlx::query("CREATE USER IF NOT EXISTS 'hog'@'127.0.0.1'")
                .execute(&mut root)
                .await
                .expect("setup");
            // Another client holds many connections, and the limit then drops
            // below what is open: no new connection can get in, even in slots
            // that chatshard's killed connections free (a race otherwise won
            // by chatshard's reconnects).
            let url = format!("mysql://hog@127.0.0.1:{}/", server.port());
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
                // A connection that ended meanwhile is gone already.
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!("KILL CONNECTION {id}")))
                    .execute(&mut root)
                    .await;
            }
            HOGS.with_hogs(hogs, root);
        },
        async |_| {
            let (hogs, mut root) = HOGS.take();
            drop(hogs);
            sqlx::query("SET GLOBAL max_connections = 500")
                .execute(&mut root)
                .await
                .expect("restore");
        },
    )
    .await;
}

/// Holds scenario 6's hog connections between its inject and remove steps.
struct Hogs(Mutex<Option<(Vec<MySqlConnection>, MySqlConnection)>>);

static HOGS: Hogs = Hogs(Mutex::new(None));

impl Hogs {
    fn with_hogs(&self, hogs: Vec<MySqlConnection>, root: MySqlConnection) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some((hogs, root));
    }

    fn take(&self) -> (Vec<MySqlConnection>, MySqlConnection) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .expect("hogs were set")
    }
}

/// A read-only shard: writes fail with a clear code, reads keep working, and
/// the breaker does not open (reads must not be refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_shard_read_only() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await;
    let load = Load::start(&cluster);
    load.wait_for_each_shard(ANSWERS, "answers before the fault", |s| s.ok())
        .await;

    let mut root = cluster
        .shard_servers()
        .server(BROKEN)
        .connect("chatshard")
        .await
        .expect("root");
    let breaker_before = cluster.breaker_view(BROKEN).await;
    let fault_start = Instant::now();
    sqlx::query("SET GLOBAL read_only = 1")
        .execute(&mut root)
        .await
        .expect("read_only");
    // The window: writes refused and reads served on the read-only shard,
    // and the other shards' answers meanwhile.
    let on_broken = |s: &harness::Sample| s.shard == BROKEN && s.since(fault_start);
    load.wait_for(ANSWERS, "writes refused read-only", |s| {
        on_broken(s) && s.code == "shard_read_only"
    })
    .await;
    load.wait_for(ANSWERS, "reads of the read-only shard", |s| {
        on_broken(s) && !s.write && s.ok()
    })
    .await;
    load.wait_for(2 * ANSWERS, "healthy answers during the fault", |s| {
        s.shard != BROKEN && s.since(fault_start) && s.ok()
    })
    .await;
    // Each refusal would count towards opening it (3 in a row) if it counted:
    // closed throughout, never opened and closed again.
    let breaker_during = cluster.breaker_view(BROKEN).await;
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
    load.wait_for(ANSWERS, "writes of the writable shard", |s| {
        s.shard == BROKEN && s.since(fault_end) && s.write && s.ok()
    })
    .await;
    let (samples, acked) = load.stop().await;

    assert_eq!(
        (breaker_during.state.as_str(), &breaker_during.since),
        ("CLOSED", &breaker_before.since),
        "a read-only shard must not open the breaker"
    );
    let during: Vec<_> = samples
        .iter()
        .filter(|s| s.shard == BROKEN && s.at >= fault_start && s.done < fault_end)
        .collect();
    let (writes, reads): (Vec<&harness::Sample>, Vec<&harness::Sample>) =
        during.iter().partition(|s| s.write);
    assert!(
        !reads.is_empty() && reads.iter().all(|s| s.status == 200),
        "reads must keep working"
    );
    // A write racing the switch may still succeed; the others fail clearly.
    let refused: Vec<_> = writes.iter().filter(|s| !s.ok()).collect();
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
    let report = assert_healthy(&samples, BROKEN, (fault_start, fault_end), Symptom::Fails);
    cluster.assert_consistent(&acked).await;
    eprintln!(
        "[read_only] {} healthy requests, all 2xx, {} while the shard was read-only; \
         {} reads ok and {} writes refused with shard_read_only on the read-only shard",
        report.healthy_requests,
        report.during_fault,
        reads.len(),
        refused.len()
    );
}

/// What the flood of scenario 7 got back.
#[derive(Debug, Default)]
struct Flood {
    served: usize,
    chat_busy: usize,
    /// Any other answer, and requests that got none: each fails the test.
    other: Vec<String>,
}

/// One chat floods its shard with work: it gets its share and `chat_busy` past
/// it, while the other chats of the same shard, and the other shards, keep
/// succeeding; the shard itself never runs out of room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s7_hot_chat_takes_only_its_share() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await;
    let hot = cluster.chats[BROKEN][0].clone();
    // Enough history that every fetch of the hot chat reads real pages.
    assert!(cluster.join(&hot, "star").await.status().is_success());
    let text = "x".repeat(100);
    for i in 0..200 {
        let r = cluster.post(&hot, "star", &format!("h{i}"), &text).await;
        assert!(r.status().is_success());
    }

    let load = Load::start(&cluster);
    load.wait_for_each_shard(ANSWERS, "answers before the flood", |s| s.ok())
        .await;
    let broken = format!("shard=\"shard-{BROKEN}\"");
    let shard_busy = || async {
        cluster
            .metric_sum(
                "chatshard_shard_rejections_total",
                &[&broken, "reason=\"shard_busy\""],
            )
            .await
    };
    let breaker_before = cluster.breaker_view(BROKEN).await;
    let busy_before = shard_busy().await;
    let fault_start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let flood = Arc::new(Mutex::new(Flood::default()));
    // Member pages, each task its own page size: every one is a read of the
    // shard (event fetches are answered from the chat's in-memory tail, and
    // identical ones would be coalesced), so the flood reaches the chat's share.
    let tasks: Vec<_> = (0..64)
        .map(|task| {
            let (http, url, stop, flood) = (
                cluster.http.clone(),
                cluster.url(&format!("/v1/chats/{hot}/members?limit={}", 10 + task)),
                stop.clone(),
                flood.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Acquire) {
                    // `None`: a page served; else the refusal's code.
                    let answer = match http.get(&url).send().await {
                        Ok(r) if r.status() == 200 => r.bytes().await.map(|_| None),
                        Ok(r) => r
                            .json::<Value>()
                            .await
                            .map(|b| Some(b["code"].as_str().unwrap_or("?").to_owned())),
                        Err(e) => Err(e),
                    };
                    let served = matches!(answer, Ok(None));
                    {
                        let mut f = flood.lock().unwrap_or_else(PoisonError::into_inner);
                        match answer {
                            Ok(None) => f.served += 1,
                            Ok(Some(code)) if code == "chat_busy" => f.chat_busy += 1,
                            Ok(Some(code)) => f.other.push(code),
                            Err(e) => f.other.push(format!("no answer: {e}")),
                        }
                    }
                    // A refused client backs off a little (far less than the
                    // Retry-After it was given) and comes straight back.
                    if !served {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();
    // The window: the hot chat served within its share and refused past it,
    // and the other chats of its shard answered meanwhile.
    Wait::new(Duration::from_secs(30), "the flood served and refused")
        .until(|| async {
            let f = flood.lock().unwrap_or_else(PoisonError::into_inner);
            if f.served >= ANSWERS && f.chat_busy >= ANSWERS {
                Ok(())
            } else {
                Err(format!("{f:?}"))
            }
        })
        .await;
    load.wait_for(ANSWERS, "answers of the hot shard's other chats", |s| {
        s.shard == BROKEN && s.chat != hot && s.since(fault_start)
    })
    .await;
    let breaker_during = cluster.breaker_view(BROKEN).await;
    let busy_during = shard_busy().await;
    stop.store(true, Ordering::Release);
    for task in tasks {
        task.await.expect("flood task");
    }
    let flood = std::mem::take(&mut *flood.lock().unwrap_or_else(PoisonError::into_inner));
    let fault_end = Instant::now();
    load.wait_for(ANSWERS, "answers of the hot shard after the flood", |s| {
        s.shard == BROKEN && s.since(fault_end) && s.ok()
    })
    .await;
    let (samples, acked) = load.stop().await;

    assert_eq!(
        (breaker_during.state.as_str(), &breaker_during.since),
        ("CLOSED", &breaker_before.since),
        "a hot chat must not open its shard's breaker"
    );
    assert!(
        flood.other.is_empty(),
        "the hot chat got other answers than 200 and chat_busy: {} of them, e.g. {:?}",
        flood.other.len(),
        &flood.other[..flood.other.len().min(5)]
    );
    // The hot chat held at most its share: the shard never refused anyone
    // for being full, so nobody queued behind the hot chat for a place.
    assert_eq!(
        busy_during, busy_before,
        "the shard refused callers shard_busy during the flood"
    );
    // Every request of every other chat, including the other chats of the hot
    // chat's own shard, succeeded, during the flood too.
    let others: Vec<_> = samples.iter().filter(|s| s.chat != hot).cloned().collect();
    let report = assert_healthy(
        &others,
        usize::MAX,
        (fault_start, fault_end),
        Symptom::Fails,
    );
    let same_shard = others
        .iter()
        .filter(|s| s.shard == BROKEN && s.at >= fault_start && s.done <= fault_end)
        .count();
    assert!(
        same_shard >= ANSWERS,
        "{same_shard} answers of the hot shard's other chats"
    );
    cluster.assert_consistent(&acked).await;
    eprintln!(
        "[hot_chat] the hot chat: {} fetches served, {} answered chat_busy, no shard_busy; \
         {} requests of other chats, all 2xx, {same_shard} of them on its shard during the flood",
        flood.served, flood.chat_busy, report.healthy_requests,
    );
}

/// A stream of a chat whose shard breaks stays open, and delivers again, from
/// where it was and without a gap, once the shard is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s8_streams_stay_open_across_a_broken_shard() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await;
    let chat = cluster.chats[BROKEN][0].clone();
    assert!(
        cluster
            .join(&chat, "before-fault")
            .await
            .status()
            .is_success()
    );
    // Its own client: the cluster's would end a stream after 10 s.
    // reqwest's TLS takes the process's default provider.
    chatshard::crypto::install_default_provider();
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
    let made: Value = cluster
        .send(
            http.post(cluster.url("/v1/streams"))
                .json(&json!({"chats": {&chat: 1, &healthy: 0}})),
        )
        .await
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
    // Whatever the healthy chat already holds comes first, and only that.
    let held = cluster.chat_body(&healthy).await["revision"]
        .as_u64()
        .expect("revision");
    for revision in 1..=held {
        let (c, r) = mux_event(mux.next(Duration::from_secs(10)).await.expect("open"));
        assert_eq!((c.as_str(), r), (healthy.as_str(), revision));
    }

    cluster.proxies[BROKEN].set(Mode::Reset);
    cluster
        .wait_breaker(BROKEN, "OPEN", Duration::from_secs(10))
        .await;
    // Broken for three rounds of the tail refresher (which looks at both
    // streamed shards each round): the stream neither ends nor gets an event.
    let polls = || async {
        cluster
            .metric_sum("chatshard_tail_revision_polls_total", &[])
            .await
    };
    let before = polls().await;
    Wait::new(Duration::from_secs(30), "three refresher rounds")
        .until(|| async {
            let now = polls().await;
            if now >= before + 6.0 {
                Ok(())
            } else {
                Err(now)
            }
        })
        .await;
    assert_eq!(
        stream.next_within(Duration::ZERO).await,
        Err(Silent),
        "the stream ended or delivered while its shard was broken"
    );
    // The multiplexed stream still carries the healthy chat.
    assert!(
        cluster
            .join(&healthy, "during-fault")
            .await
            .status()
            .is_success()
    );
    let (c, revision) = mux_event(mux.next(Duration::from_secs(10)).await.expect("open"));
    assert_eq!((c.as_str(), revision), (healthy.as_str(), held + 1));

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
        .send(c.admin(reqwest::Method::GET, &format!("/v1/admin/moves/{id}")))
        .await;
    if r.status().is_success() {
        Some(r.json().await.expect("json"))
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
    Wait::new(within, format!("move {id}"))
        .until(|| async {
            match move_of(c, id).await {
                Some(m) if done(&m) => Ok(m),
                Some(m) => Err(m.to_string()),
                None => Err("not readable".to_owned()),
            }
        })
        .await
}

/// Starts the move of `chat` to `to`; its id.
async fn start_move(c: &Cluster, chat: &str, to: &str) -> String {
    let r = c
        .send(
            c.admin(
                reqwest::Method::POST,
                &format!("/v1/admin/chats/{chat}/move"),
            )
            .json(&json!({ "to": to })),
        )
        .await;
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.expect("json");
    body["id"].as_str().expect("id").to_owned()
}

/// A join through the service; its status.
async fn join(c: &Cluster, chat: &str, user: &str) -> u16 {
    c.join(chat, user).await.status().as_u16()
}

/// A new chat `{prefix}-N` stored on the shard named `shard`, with `members`
/// members `m0`, `m1`, ....
async fn chat_on(c: &Cluster, prefix: &str, shard: &str, members: usize) -> String {
    let mut chat = String::new();
    for i in 0.. {
        chat = format!("{prefix}-{i}");
        let r = c
            .put_chat(&chat, Some(json!({ "maxMembers": 100_000 })))
            .await;
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
        for status in futures::future::join_all(joins).await {
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
    c.shards().server_mut(source).kill().expect("SIGKILL");
    c.shards()
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
    c.shards().server_mut(target).kill().expect("SIGKILL");
    // Refused, retryably, while its shard is down: never written on the old
    // one. Five 503s, any other refusal meanwhile within the bound.
    for refused in 0..5 {
        let user = format!("while-down-{refused}");
        Wait::new(Duration::from_secs(10), format!("{user} refused 503"))
            .until(|| async {
                let status = join(&c, &chat, &user).await;
                assert_ne!(
                    status / 100,
                    2,
                    "a join landed while the chat's shard is down"
                );
                if status == 503 { Ok(()) } else { Err(status) }
            })
            .await;
    }
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM chat_member WHERE chat_id = ?")
        .bind(&chat)
        .fetch_one(&mut old)
        .await
        .expect("source rows");
    assert_eq!(left, 0, "nothing on the old shard");
    c.shards()
        .server_mut(target)
        .restart()
        .await
        .expect("restart");
    wait_joined(&c, &chat, "after-restart").await;
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
    // (a fenced write is held, or answered 503), within a bound.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (base, http, chat, stop) = (c.base.clone(), c.http.clone(), chat.clone(), stop.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            // 50 joins a second: a copy against the slowed target keeps up.
            let mut pace = tokio::time::interval(Duration::from_millis(20));
            while !stop.load(Ordering::Relaxed) {
                pace.tick().await;
                let user = format!("w{}", acked.len());
                Wait::new(Duration::from_secs(30), format!("join {user} acknowledged"))
                    .every(Duration::from_millis(10))
                    .until(|| async {
                        let r = http
                            .post(format!("{base}/v1/chats/{chat}/members"))
                            .json(&json!({ "userId": user }))
                            .send()
                            .await
                            .unwrap_or_else(|e| panic!("join {user}: {e}"));
                        match r.status().as_u16() {
                            200 | 201 => Ok(()),
                            503 => Err(503),
                            other => panic!("join {user}: {other}"),
                        }
                    })
                    .await;
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
    stop.store(true, Ordering::Relaxed);
    let acked = writer.await.expect("writer");
    eprintln!("[s10] {} joins acknowledged during the move", acked.len());

    assert_eq!(c.chat_body(&chat).await["shard"], source_name.as_str());
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
    Wait::new(Duration::from_secs(15), format!("{user} joined {chat}"))
        .until(|| async {
            let status = join(c, chat, user).await;
            if status / 100 == 2 {
                Ok(())
            } else {
                Err(status)
            }
        })
        .await;
    user.to_owned()
}
