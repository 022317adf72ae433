//! Replicated shards, against real replicated `mariadbd` processes (GTID,
//! semi-synchronous) that each test starts for itself: reads from replicas
//! never older than the caller saw, lagging and dead replicas, the writer's
//! fallback share, a primary SIGKILLed and a replica promoted as an
//! orchestrator would, split brain, and acknowledged writes lost to a
//! failover without semi-sync (docs/replicas.md).

#[path = "common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chatshard::config::Settings;
use common::{TestApp, Wait, assert_chat_consistent, eventually};
use reqwest::StatusCode;
use serde_json::Value;

fn fast_monitor(s: &mut Settings) {
    s.admin.token = "replica-tests-admin-token".into();
    s.replicas.monitor_ms = 100;
    s.replicas.confirm_ms = 50;
    s.replicas.max_lag_ms = 600;
    s.breaker.open_ms = 300;
    s.replicas.catch_up_ms = 3000;
}

/// A new chat on shard `shard`.
async fn chat_on(app: &TestApp, shard: usize, prefix: &str) -> String {
    loop {
        let chat = app.new_chat(prefix).await;
        if app.shard_of(&chat).await == shard {
            return chat;
        }
    }
}

/// `GET path` with headers, answering (status, who served it, body).
async fn read(app: &TestApp, path: &str, min: Option<u64>) -> (StatusCode, String, Value) {
    let mut request = app.http.get(app.url(path));
    if let Some(min) = min {
        request = request.header("Chatshard-Min-Revision", min.to_string());
    }
    let r = app.send(request).await;
    let status = r.status();
    let served = r
        .headers()
        .get("chatshard-served-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = r.json().await.unwrap_or(Value::Null);
    (status, served, body)
}

/// The revision a join answered.
async fn join_revision(app: &TestApp, chat: &str, user: &str) -> u64 {
    let r = app.join(chat, user).await;
    assert!(
        r.status().is_success(),
        "join {chat}/{user}: {}",
        r.status()
    );
    r.headers()
        .get("chatshard-revision")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a join answers Chatshard-Revision")
}

/// The admin view of shard `i`.
async fn shard_view(app: &TestApp, i: usize) -> Value {
    app.admin_shards().await[i].clone()
}

async fn member_in_rotation(app: &TestApp, shard: usize, member: &str) -> bool {
    shard_view(app, shard).await["members"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|m| m["address"] == member && m["inRotation"] == true)
}

fn address(server: &chatshard::localdb::LocalMariaDb) -> String {
    format!("127.0.0.1:{}", server.port())
}

#[tokio::test]
async fn replica_reads_follow_min_revision_and_a_lagging_replica_leaves_the_rotation() {
    let mut app = TestApp::builder()
        .replicated_shards(1, 1)
        .configure(fast_monitor)
        .start()
        .await;
    let replica = address(&app.own_shard_servers().replicas(0)[0]);
    eventually(
        Duration::from_secs(20),
        "the replica joins the rotation",
        || member_in_rotation(&app, 0, &replica),
    )
    .await;
    let chat = app.new_chat("rep").await;
    let r1 = join_revision(&app, &chat, "alice").await;
    // Read your write: a replica answers only once it holds r1, else the
    // writer does; either way the join is there.
    let (status, _, body) = read(&app, &format!("/v1/chats/{chat}/member-count"), Some(r1)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["memberCount"], 1);
    // Without a token, the replica in rotation answers.
    Wait::new(Duration::from_secs(10), "a read served by the replica")
        .until_true(|| async {
            read(&app, &format!("/v1/chats/{chat}"), None).await.1 == "replica"
        })
        .await;

    // The replica stops applying: a read of a newer revision goes to the
    // writer and is right; then the replica leaves the rotation.
    app.own_shard_servers().replicas(0)[0]
        .stop_sql_thread()
        .await
        .expect("stop the SQL thread");
    let r2 = join_revision(&app, &chat, "bob").await;
    assert!(r2 > r1);
    let (status, served, body) = read(&app, &format!("/v1/chats/{chat}/members"), Some(r2)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(served, "writer", "a replica behind r2 must not answer");
    assert_eq!(body["members"].as_array().map(Vec::len), Some(2));
    eventually(
        Duration::from_secs(20),
        "the lagging replica leaves the rotation",
        || async { !member_in_rotation(&app, 0, &replica).await },
    )
    .await;
    for _ in 0..5 {
        let (status, served, body) =
            read(&app, &format!("/v1/chats/{chat}/member-count"), None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(served, "writer");
        assert_eq!(body["memberCount"], 2);
    }
    // It catches up and comes back.
    app.own_shard_servers().replicas(0)[0]
        .start_sql_thread()
        .await
        .expect("start the SQL thread");
    eventually(
        Duration::from_secs(20),
        "the replica returns to the rotation",
        || member_in_rotation(&app, 0, &replica),
    )
    .await;
    let (status, _, body) = read(&app, &format!("/v1/chats/{chat}/member-count"), Some(r2)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["memberCount"], 2);

    // A token that is not a revision is a clear 422.
    for bad in ["-1", "x", "99999999999999999999"] {
        let r = app
            .get(&format!("/v1/chats/{chat}/member-count?minRevision={bad}"))
            .await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        let body: Value = r.json().await.expect("problem");
        assert_eq!(body["code"], "invalid_request");
    }
    app.shut_down().await;
}

#[tokio::test]
async fn a_dead_replica_sends_reads_to_the_writer_only_within_its_share() {
    let mut app = TestApp::builder()
        .replicated_shards(1, 1)
        .configure(|s| {
            fast_monitor(s);
            s.pool.max_concurrent = 4;
            s.pool.operation_timeout_ms = 1500;
            s.replicas.primary_fallback_share = 0.25;
        })
        .start()
        .await;
    let chat = app.new_chat("dead").await;
    join_revision(&app, &chat, "alice").await;
    app.own_shard_servers()
        .replica_mut(0, 0)
        .kill()
        .expect("kill the replica");
    // Reads go on, from the writer.
    Wait::new(Duration::from_secs(20), "reads served by the writer")
        .until_true(|| async {
            let (status, served, _) = read(&app, &format!("/v1/chats/{chat}"), None).await;
            status == StatusCode::OK && served == "writer"
        })
        .await;
    let view = shard_view(&app, 0).await;
    let roles: Vec<&str> = view["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["role"].as_str())
        .collect();
    assert!(roles.contains(&"writer"), "{view}");

    // The writer stopped: one fallback slot (a quarter of 4) takes one
    // read, every other is refused at once instead of queueing on it: busy
    // (the share is taken) or, once the monitor saw the writer stop
    // answering, unavailable (no member left to read from).
    app.own_shard_servers()
        .writer(0)
        .suspend()
        .expect("stop the writer");
    let path = format!("/v1/chats/{chat}/member-count");
    let reads = (0..6).map(|_| read(&app, &path, None));
    let answers = futures::future::join_all(reads).await;
    app.own_shard_servers()
        .writer(0)
        .resume()
        .expect("resume the writer");
    let refused = answers
        .iter()
        .filter(|(s, _, b)| {
            *s == StatusCode::SERVICE_UNAVAILABLE
                && (b["code"] == "shard_busy" || b["code"] == "shard_unavailable")
        })
        .count();
    assert!(
        refused >= 5,
        "at most one read may take the writer's fallback share: {:?}",
        answers
            .iter()
            .map(|(s, _, b)| (s.as_u16(), b["code"].clone()))
            .collect::<Vec<_>>()
    );
    for (status, _, _) in &answers {
        assert_ne!(*status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    app.shut_down().await;
}

/// The replica of shard `i` that received the most of the dead primary's
/// log, as an orchestrator picks it (the others can follow it; GTID strict
/// mode refuses the other way round).
async fn most_advanced(servers: &chatshard::localdb::cluster::LocalCluster, i: usize) -> usize {
    let mut best = (0, 0);
    for (j, replica) in servers.replicas(i).iter().enumerate() {
        let status = replica
            .replica_status()
            .await
            .expect("replica status")
            .expect("a replica");
        // `domain-server-seqno`, one domain.
        let seqno = status
            .gtid_io_pos
            .rsplit('-')
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        if seqno > best.1 || j == 0 {
            best = (j, seqno.max(best.1));
        }
    }
    best.0
}

/// Joins `chat` until `stop`, with users `prefix0`, `prefix1`, ...: the users
/// answered 2xx, and the statuses of the others (never a 500).
fn joiner(
    base: String,
    chat: String,
    prefix: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<String>, Vec<u16>)> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client");
        let (mut acked, mut refused) = (Vec::new(), Vec::new());
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let user = format!("{prefix}{n}");
            n += 1;
            let r = http
                .post(format!("{base}/v1/chats/{chat}/members"))
                .json(&serde_json::json!({ "userId": user }))
                .send()
                .await
                .expect("the service answers");
            let status = r.status();
            assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "join {user}");
            if status.is_success() {
                acked.push(user);
            } else {
                refused.push(status.as_u16());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        (acked, refused)
    })
}

#[tokio::test]
async fn a_killed_primary_is_followed_to_the_promoted_replica_without_a_restart() {
    let mut app = TestApp::builder()
        .replicated_shards(2, 2)
        .configure(fast_monitor)
        .start()
        .await;
    for r in 0..2 {
        let replica = address(&app.own_shard_servers().replicas(0)[r]);
        eventually(Duration::from_secs(30), "replicas in rotation", || {
            member_in_rotation(&app, 0, &replica)
        })
        .await;
    }
    let failing = chat_on(&app, 0, "fo").await;
    let other = chat_on(&app, 1, "other").await;
    let base = app.url("");
    let base = base.trim_end_matches('/').to_owned();
    let stop = Arc::new(AtomicBool::new(false));
    let failing_writer = joiner(base.clone(), failing.clone(), "f", stop.clone());
    let other_writer = joiner(base.clone(), other.clone(), "o", stop.clone());
    // A reader of the failing shard's chat, without a token: replicas serve
    // it through the gap.
    let reading = reader(base.clone(), failing.clone(), stop.clone());
    eventually(
        Duration::from_secs(20),
        "writes before the failover",
        || async { app.count(&failing).await >= 30 },
    )
    .await;
    let writer_changes = shard_view(&app, 0).await["writerChanges"].as_u64();
    // The orchestrator: the primary dies, replica 0 is promoted and replica
    // 1 repointed at it.
    let servers = app.own_shard_servers();
    servers.server_mut(0).kill().expect("kill the primary");
    let chosen = most_advanced(servers, 0).await;
    servers
        .promote_replica(0, chosen)
        .await
        .expect("promote the most advanced replica");
    let promoted = address(app.own_shard_servers().writer(0));
    // chatshard follows: writes succeed again, to the promoted member.
    Wait::new(Duration::from_secs(20), "writes go to the promoted replica")
        .until_true(|| async {
            let view = shard_view(&app, 0).await;
            view["writes"] == "open" && view["address"] == promoted.as_str()
        })
        .await;
    let after = app.join(&failing, "after-failover").await;
    assert!(after.status().is_success(), "{}", after.status());
    assert!(shard_view(&app, 0).await["writerChanges"].as_u64() > writer_changes);
    eventually(
        Duration::from_secs(10),
        "writes after the failover",
        || async { app.count(&failing).await >= 40 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let (acked, refused) = failing_writer.await.expect("failing writer");
    let (other_acked, other_refused) = other_writer.await.expect("other writer");
    let reads = reading.await.expect("reader");

    // Every acknowledged join is on the new primary, once; count = rows;
    // revisions gapless.
    let mut db = app
        .own_shard_servers()
        .writer(0)
        .connect(chatshard::localdb::DEFAULT_DATABASE)
        .await
        .expect("connect to the new primary");
    let joined: HashSet<String> = common::joined_users(&mut db, &failing)
        .await
        .into_iter()
        .collect();
    for user in &acked {
        assert!(joined.contains(user), "acknowledged join {user} lost");
    }
    assert_chat_consistent(&mut db, &failing).await;
    // Refusals in the gap were 503s, answered at once.
    assert!(refused.iter().all(|s| *s == 503), "{refused:?}");
    // The other shard saw nothing.
    assert!(other_refused.is_empty(), "{other_refused:?}");
    assert!(!other_acked.is_empty());
    // Reads of the failing shard's chat kept succeeding.
    let failed_reads = reads.iter().filter(|s| **s != 200).count();
    assert_eq!(
        failed_reads, 0,
        "reads failed during the failover: {reads:?}"
    );
    app.shut_down().await;
}

#[tokio::test]
async fn two_writable_members_are_a_split_brain_until_one_is_demoted() {
    let mut app = TestApp::builder()
        .replicated_shards(1, 1)
        .configure(fast_monitor)
        .start()
        .await;
    let chat = app.new_chat("split").await;
    join_revision(&app, &chat, "alice").await;
    app.own_shard_servers().replicas(0)[0]
        .set_read_only(false)
        .await
        .expect("make the replica writable");
    Wait::new(Duration::from_secs(10), "the split brain is seen")
        .until_true(|| async { shard_view(&app, 0).await["writes"] == "split_brain" })
        .await;
    let r = app.join(&chat, "bob").await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.expect("problem");
    assert_eq!(body["code"], "shard_split_brain", "{body}");
    let ready: Value = app.get("/readyz").await.json().await.expect("readyz");
    assert_eq!(ready["shards"][0]["writes"], "split_brain", "{ready}");
    // Reads go on.
    let (status, _, body) = read(&app, &format!("/v1/chats/{chat}/member-count"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["memberCount"], 1);
    // The operator demotes the stray member: writes resume on the writer.
    app.own_shard_servers().replicas(0)[0]
        .set_read_only(true)
        .await
        .expect("demote the replica");
    Wait::new(Duration::from_secs(10), "writes resume")
        .until_true(|| async { app.join(&chat, "carol").await.status().is_success() })
        .await;
    let revision = join_revision(&app, &chat, "carol").await;
    let (status, _, body) = read(
        &app,
        &format!("/v1/chats/{chat}/member-count"),
        Some(revision),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["memberCount"], 2, "bob was refused, carol joined");
    app.shut_down().await;
}

#[tokio::test]
async fn acknowledged_writes_lost_without_semi_sync_are_reported_and_readers_full_sync() {
    let mut app = TestApp::builder()
        .replicated_shards(1, 1)
        .configure(fast_monitor)
        .start()
        .await;
    let chat = app.new_chat("lost").await;
    join_revision(&app, &chat, "alice").await;
    app.own_shard_servers()
        .wait_replicas_caught_up(0, Duration::from_secs(20))
        .await
        .expect("the replica has alice");
    // Semi-sync off and the replica cut off: what follows is acknowledged
    // on the primary only.
    let servers = app.own_shard_servers();
    let mut primary = servers
        .writer(0)
        .connect(chatshard::localdb::DEFAULT_DATABASE)
        .await
        .expect("connect");
    chatshard::storage::replication::set_semi_sync_master(&mut primary, false)
        .await
        .expect("semi-sync off");
    drop(primary);
    let mut replica = servers.replicas(0)[0]
        .connect(chatshard::localdb::DEFAULT_DATABASE)
        .await
        .expect("connect");
    chatshard::storage::replication::stop_replication(&mut replica)
        .await
        .expect("stop replication");
    drop(replica);
    let mut last = 0;
    for user in ["bob", "carol", "dave"] {
        last = join_revision(&app, &chat, user).await;
    }
    // A reader that saw everything.
    let r = app
        .get(&format!("/v1/chats/{chat}/events?after={}", last - 1))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    // The primary dies; the stale replica is promoted.
    let servers = app.own_shard_servers();
    servers.server_mut(0).kill().expect("kill the primary");
    servers
        .promote_replica(0, 0)
        .await
        .expect("promote the replica");
    Wait::new(Duration::from_secs(20), "the loss is reported")
        .until_true(|| async {
            let view = app.admin_get("/v1/admin/shards").await;
            view["lostInFailover"]
                .as_array()
                .is_some_and(|l| l.iter().any(|c| c["chatId"] == chat.as_str()))
        })
        .await;
    let view = app.admin_get("/v1/admin/shards").await;
    let lost = view["lostInFailover"]
        .as_array()
        .and_then(|l| l.iter().find(|c| c["chatId"] == chat.as_str()))
        .cloned()
        .expect("the chat is listed");
    assert_eq!(lost["acknowledged"].as_u64(), Some(last));
    assert!(lost["found"].as_u64() < Some(last), "{lost}");
    assert!(
        app.metric_sum("chatshard_failover_lost_chats_total", &[])
            .await
            >= 1.0
    );
    // The reader ahead of the new log is told to full-sync.
    let r = app
        .get(&format!("/v1/chats/{chat}/events?after={last}"))
        .await;
    assert_eq!(r.status(), StatusCode::GONE);
    let body: Value = r.json().await.expect("problem");
    assert_eq!(body["code"], "revision_purged");
    // And the snapshot it loads is the new writer's state.
    let r = app.get(&format!("/v1/chats/{chat}/snapshot")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let snapshot: Value = r.json().await.expect("snapshot");
    assert_eq!(snapshot["members"].as_array().map(Vec::len), Some(1));
    app.shut_down().await;
}

/// A reader of `chat`'s member count until `stop`: every status.
fn reader(base: String, chat: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<u16>> {
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let mut statuses = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let r = http
                .get(format!("{base}/v1/chats/{chat}/member-count"))
                .send()
                .await
                .expect("the service answers");
            statuses.push(r.status().as_u16());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        statuses
    })
}

fn base_of(app: &TestApp) -> String {
    app.url("").trim_end_matches('/').to_owned()
}

#[tokio::test]
async fn a_planned_switchover_under_load_holds_writes_and_loses_nothing() {
    let mut app = TestApp::builder()
        .replicated_shards(1, 2)
        .configure(fast_monitor)
        .start()
        .await;
    let chat = app.new_chat("sw").await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = joiner(base_of(&app), chat.clone(), "u", stop.clone());
    let reads = reader(base_of(&app), chat.clone(), stop.clone());
    eventually(
        Duration::from_secs(20),
        "writes before the switchover",
        || async { app.count(&chat).await >= 30 },
    )
    .await;
    let target = address(&app.own_shard_servers().replicas(0)[0]);
    let old = address(app.own_shard_servers().writer(0));
    let r = app
        .send(
            app.admin(reqwest::Method::POST, "/v1/admin/shards/shard-0/switchover")
                .json(&serde_json::json!({ "to": target })),
        )
        .await;
    let status = r.status();
    let done: Value = r.json().await.expect("json");
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(done["from"], old.as_str());
    assert_eq!(done["to"], target.as_str());
    assert!(done["writePauseMs"].as_f64().is_some(), "{done}");
    assert_eq!(shard_view(&app, 0).await["address"], target.as_str());
    eventually(
        Duration::from_secs(10),
        "writes after the switchover",
        || async { app.count(&chat).await >= 60 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let (acked, refused) = writer.await.expect("writer");
    let reads = reads.await.expect("reader");
    assert!(refused.iter().all(|s| *s == 503), "{refused:?}");
    assert!(reads.iter().all(|s| *s == 200), "reads failed: {reads:?}");
    // The cluster kit learns the new writer from the test's own promotion
    // only; read the rows where chatshard writes now.
    let mut db = chatshard::localdb::LocalMariaDb::connect(
        &app.own_shard_servers().replicas(0)[0],
        chatshard::localdb::DEFAULT_DATABASE,
    )
    .await
    .expect("connect to the new writer");
    let joined: HashSet<String> = common::joined_users(&mut db, &chat)
        .await
        .into_iter()
        .collect();
    for user in &acked {
        assert!(joined.contains(user), "acknowledged join {user} lost");
    }
    assert_chat_consistent(&mut db, &chat).await;
    // The old writer is a read-only replica of the new one, back in rotation.
    assert!(
        app.own_shard_servers()
            .writer(0)
            .is_read_only()
            .await
            .expect("read_only")
    );
    Wait::new(Duration::from_secs(20), "the old writer serves reads")
        .until(|| async {
            let view = shard_view(&app, 0).await;
            let back = view["members"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["address"] == old.as_str() && m["inRotation"] == true);
            if back {
                Ok(())
            } else {
                Err(view["members"].to_string())
            }
        })
        .await;
    // A switchover to a member that is not a replica is refused clearly.
    let r = app
        .send(
            app.admin(reqwest::Method::POST, "/v1/admin/shards/shard-0/switchover")
                .json(&serde_json::json!({ "to": "127.0.0.1:1" })),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let body: Value = r.json().await.expect("problem");
    assert_eq!(body["code"], "reparent_refused");
    app.shut_down().await;
}

#[tokio::test]
async fn writes_whose_hold_runs_out_during_a_slow_switchover_are_refused_not_lost() {
    let mut app = TestApp::builder()
        .replicated_shards(1, 1)
        .configure(|s| {
            fast_monitor(s);
            s.replicas.hold_writes_ms = 200;
            s.replicas.catch_up_ms = 20_000;
        })
        .start()
        .await;
    let chat = app.new_chat("slow-sw").await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = joiner(base_of(&app), chat.clone(), "u", stop.clone());
    eventually(
        Duration::from_secs(20),
        "writes before the switchover",
        || async { app.count(&chat).await >= 30 },
    )
    .await;
    // The target stops applying: the switchover waits for it well past the
    // hold, while the joins go on.
    app.own_shard_servers().replicas(0)[0]
        .stop_sql_thread()
        .await
        .expect("stop the target's SQL thread");
    let target = address(&app.own_shard_servers().replicas(0)[0]);
    let mut target_db = app.own_shard_servers().replicas(0)[0]
        .connect(chatshard::localdb::DEFAULT_DATABASE)
        .await
        .expect("connect to the target");
    let switch = app.send(
        app.admin(reqwest::Method::POST, "/v1/admin/shards/shard-0/switchover")
            .json(&serde_json::json!({ "to": target })),
    );
    let probes = std::sync::atomic::AtomicUsize::new(0);
    let refused_while_switching = async {
        // Past the hold, a write is refused: never sent to the writer being
        // fenced (the test's account, root, would still commit there).
        Wait::new(Duration::from_secs(20), "a write refused past the hold")
            .until_true(|| async {
                let user = format!("probe{}", probes.fetch_add(1, Ordering::Relaxed));
                let r = app.join(&chat, &user).await;
                let status = r.status();
                let body: Value = r.json().await.unwrap_or_default();
                status == StatusCode::SERVICE_UNAVAILABLE && body["code"] == "shard_unavailable"
            })
            .await;
        chatshard::storage::replication::start_sql_thread(&mut target_db)
            .await
            .expect("start the target's SQL thread");
    };
    let (r, ()) = tokio::join!(switch, refused_while_switching);
    let status = r.status();
    let done: Value = r.json().await.expect("json");
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(shard_view(&app, 0).await["address"], target.as_str());
    eventually(
        Duration::from_secs(10),
        "writes after the switchover",
        || async { app.join(&chat, "after").await.status().is_success() },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let (acked, refused) = writer.await.expect("writer");
    assert!(refused.iter().all(|s| *s == 503), "{refused:?}");
    let mut db = app.own_shard_servers().replicas(0)[0]
        .connect(chatshard::localdb::DEFAULT_DATABASE)
        .await
        .expect("connect to the new writer");
    let joined: HashSet<String> = common::joined_users(&mut db, &chat)
        .await
        .into_iter()
        .collect();
    for user in &acked {
        assert!(joined.contains(user), "acknowledged join {user} lost");
    }
    assert_chat_consistent(&mut db, &chat).await;
    app.shut_down().await;
}

#[tokio::test]
async fn a_switchover_whose_driver_died_is_rolled_back_or_finished_by_a_survivor() {
    let mut app = TestApp::builder()
        .replicated_shards(1, 1)
        .configure(fast_monitor)
        .start()
        .await;
    let chat = app.new_chat("dead-driver").await;
    join_revision(&app, &chat, "alice").await;
    let old = address(app.own_shard_servers().writer(0));
    let target = address(&app.own_shard_servers().replicas(0)[0]);
    // What a driver SIGKILLed after it fenced the writer leaves: its record,
    // lease run out, and the old writer read-only.
    let mut db = app
        .own_shard_servers()
        .writer(0)
        .connect(chatshard::localdb::DEFAULT_DATABASE)
        .await
        .expect("connect");
    chatshard::storage::reparent::start(&mut db, "switchover", &old, &target, "dead", 0)
        .await
        .expect("record")
        .expect("no other reparent");
    chatshard::storage::replication::set_read_only(&mut db, true)
        .await
        .expect("fence");
    // A survivor rolls it back: the old writer takes writes again.
    Wait::new(Duration::from_secs(20), "writes resume on the old writer")
        .until_true(|| async { app.join(&chat, "bob").await.status().is_success() })
        .await;
    assert_eq!(shard_view(&app, 0).await["address"], old.as_str());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while chatshard::storage::reparent::active(&mut db)
        .await
        .expect("read the record")
        .is_some()
    {
        assert!(std::time::Instant::now() < deadline, "the record ends");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Killed after it promoted the target: a survivor finishes it. The
    // lease runs out only after the promotion below (before it, a survivor
    // would rightly roll the record back).
    let lease_until = chrono::Utc::now().timestamp_millis() + 10_000;
    chatshard::storage::reparent::start(&mut db, "switchover", &old, &target, "dead", lease_until)
        .await
        .expect("record")
        .expect("no other reparent");
    chatshard::storage::replication::set_read_only(&mut db, true)
        .await
        .expect("fence");
    app.own_shard_servers()
        .wait_replicas_caught_up(0, Duration::from_secs(20))
        .await
        .expect("caught up");
    let mut replica = app.own_shard_servers().replicas(0)[0]
        .connect(chatshard::localdb::DEFAULT_DATABASE)
        .await
        .expect("connect");
    chatshard::storage::replication::promote(&mut replica)
        .await
        .expect("promote");
    Wait::new(Duration::from_secs(40), "writes go to the promoted member")
        .until_true(|| async {
            shard_view(&app, 0).await["address"] == target.as_str()
                && app.join(&chat, "carol").await.status().is_success()
        })
        .await;
    Wait::new(Duration::from_secs(20), "the old writer replicates from it")
        .until_true(|| async {
            app.shard_servers()
                .writer(0)
                .replica_status()
                .await
                .ok()
                .flatten()
                .is_some_and(|s| s.is_replicating())
        })
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !chatshard::storage::reparent::active(&mut replica)
        .await
        .is_ok_and(|r| r.is_none())
    {
        assert!(std::time::Instant::now() < deadline, "the record ends");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(db);
    app.shut_down().await;
}

#[tokio::test]
async fn an_emergency_failover_promotes_the_most_advanced_replica() {
    let mut app = TestApp::builder()
        .replicated_shards(1, 2)
        .configure(fast_monitor)
        .start()
        .await;
    let chat = app.new_chat("efo").await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = joiner(base_of(&app), chat.clone(), "u", stop.clone());
    eventually(
        Duration::from_secs(20),
        "writes before the failover",
        || async { app.count(&chat).await >= 30 },
    )
    .await;
    // Refused while the writer lives.
    let base = base_of(&app);
    let failover = || {
        reqwest::Client::new()
            .post(format!("{base}/v1/admin/shards/shard-0/failover"))
            .bearer_auth("replica-tests-admin-token")
            .json(&serde_json::json!({ "force": false }))
    };
    let r = app.send(failover()).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    app.own_shard_servers()
        .server_mut(0)
        .kill()
        .expect("kill the primary");
    let r = app.send(failover()).await;
    let status = r.status();
    let done: Value = r.json().await.expect("json");
    assert_eq!(status, StatusCode::OK, "{done}");
    let promoted = done["to"].as_str().expect("to").to_owned();
    assert_ne!(done["from"], done["to"]);
    Wait::new(Duration::from_secs(20), "writes go to the promoted replica")
        .until_true(|| async {
            let view = shard_view(&app, 0).await;
            view["writes"] == "open" && view["address"] == promoted.as_str()
        })
        .await;
    eventually(
        Duration::from_secs(20),
        "writes after the failover",
        || async { app.join(&chat, "after").await.status().is_success() },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let (acked, _) = writer.await.expect("writer");
    assert_promoted_holds(&mut app, &promoted, &chat, &acked).await;
    app.shut_down().await;
}

fn promoted_port(address: &str) -> u16 {
    address
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port")
}

#[tokio::test]
async fn with_auto_failover_a_dead_primary_is_replaced_without_an_operator() {
    let mut app = TestApp::builder()
        .replicated_shards(1, 2)
        .configure(|s| {
            fast_monitor(s);
            s.replicas.auto_failover = true;
            s.replicas.auto_failover_after_ms = 800;
        })
        .start()
        .await;
    let first = shard_view(&app, 0).await["address"]
        .as_str()
        .expect("address")
        .to_owned();
    let chat = app.new_chat("auto").await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = joiner(base_of(&app), chat.clone(), "u", stop.clone());
    eventually(
        Duration::from_secs(20),
        "writes before the failover",
        || async { app.count(&chat).await >= 30 },
    )
    .await;
    app.own_shard_servers()
        .server_mut(0)
        .kill()
        .expect("kill the primary");
    // Nobody calls the failover route: the instance promotes a replica.
    Wait::new(Duration::from_secs(30), "a replica promoted by chatshard")
        .until_true(|| async {
            let view = shard_view(&app, 0).await;
            view["writes"] == "open" && view["address"] != first.as_str()
        })
        .await;
    eventually(
        Duration::from_secs(20),
        "writes after the failover",
        || async { app.join(&chat, "after").await.status().is_success() },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let (acked, statuses) = writer.await.expect("writer");
    assert!(
        !statuses.contains(&500),
        "no write may fail with a 500: {statuses:?}"
    );
    let promoted = shard_view(&app, 0).await["address"]
        .as_str()
        .expect("address")
        .to_owned();
    assert_promoted_holds(&mut app, &promoted, &chat, &acked).await;
    app.shut_down().await;
}

/// The replica `promoted` of shard 0 holds every acknowledged join of
/// `chat`, once, with a count equal to its rows, and the other replica
/// replicates from it.
async fn assert_promoted_holds(app: &mut TestApp, promoted: &str, chat: &str, acked: &[String]) {
    let j = app
        .own_shard_servers()
        .replicas(0)
        .iter()
        .position(|r| address(r) == promoted)
        .expect("a replica was promoted");
    let mut db = app.own_shard_servers().replicas(0)[j]
        .connect(chatshard::localdb::DEFAULT_DATABASE)
        .await
        .expect("connect");
    let joined: HashSet<String> = common::joined_users(&mut db, chat)
        .await
        .into_iter()
        .collect();
    for user in acked {
        assert!(joined.contains(user), "acknowledged join {user} lost");
    }
    assert_chat_consistent(&mut db, chat).await;
    let other = &app.own_shard_servers().replicas(0)[1 - j];
    Wait::new(Duration::from_secs(20), "the other replica follows")
        .until_true(|| async {
            other
                .replica_status()
                .await
                .ok()
                .flatten()
                .is_some_and(|s| s.is_replicating() && s.source_port == promoted_port(promoted))
        })
        .await;
}
