//! A chat whose row on a shard says it moved (`chat.moved_to`,
//! docs/moving-chats.md) is read and written where it moved to, by every
//! instance, even one that routes it to its old shard; it is never written or
//! created again where the marker stands. The move itself is done here by
//! hand, in SQL, the way the mover will do it: copy the rows, then mark the
//! old row.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::{Connection, MySqlConnection};

use crate::common;
use crate::helpers::{TestApp, settings};

/// Copies a chat's rows from `from` to `to` (member and message ids given
/// anew by the target; events point at the new message ids), as a finished
/// copy would leave them.
async fn copy_chat(from: &mut MySqlConnection, to: &mut MySqlConnection, chat: &str) {
    let mut tx = to.begin().await.expect("tx");
    let (max, revision, created): (u32, u64, chrono::NaiveDateTime) =
        sqlx::query_as("SELECT max_members, revision, created_at FROM chat WHERE chat_id = ?")
            .bind(chat)
            .fetch_one(&mut *from)
            .await
            .expect("chat");
    sqlx::query(
        "INSERT INTO chat (chat_id, max_members, revision, created_at) VALUES (?, ?, ?, ?)",
    )
    .bind(chat)
    .bind(max)
    .bind(revision)
    .bind(created)
    .execute(&mut *tx)
    .await
    .expect("chat row");
    let count: u32 =
        sqlx::query_scalar("SELECT member_count FROM chat_member_count WHERE chat_id = ?")
            .bind(chat)
            .fetch_one(&mut *from)
            .await
            .expect("count");
    sqlx::query("INSERT INTO chat_member_count (chat_id, member_count) VALUES (?, ?)")
        .bind(chat)
        .bind(count)
        .execute(&mut *tx)
        .await
        .expect("count row");
    type Member = (
        String,
        u8,
        chrono::NaiveDateTime,
        Option<chrono::NaiveDateTime>,
        chrono::NaiveDateTime,
        chrono::NaiveDateTime,
    );
    let members: Vec<Member> = sqlx::query_as(
        "SELECT user_id, state, joined_at, left_at, created_at, updated_at FROM chat_member WHERE chat_id = ?",
    )
    .bind(chat)
    .fetch_all(&mut *from)
    .await
    .expect("members");
    for (user, state, joined, left, created, updated) in members {
        sqlx::query(
            "INSERT INTO chat_member (chat_id, user_id, state, joined_at, left_at, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(chat)
        .bind(user)
        .bind(state)
        .bind(joined)
        .bind(left)
        .bind(created)
        .bind(updated)
        .execute(&mut *tx)
        .await
        .expect("member row");
    }
    type Event = (u64, u8, String, Option<u64>, chrono::NaiveDateTime);
    let events: Vec<Event> = sqlx::query_as(
        "SELECT revision, event_type, user_id, message_id, created_at FROM chat_event \
         WHERE chat_id = ? ORDER BY revision",
    )
    .bind(chat)
    .fetch_all(&mut *from)
    .await
    .expect("events");
    for (rev, kind, user, message_id, at) in events {
        let new_id = match message_id {
            Some(id) => {
                let (sender, key, body, created): (String, String, String, chrono::NaiveDateTime) =
                    sqlx::query_as(
                        "SELECT sender_id, client_message_id, body, created_at FROM chat_message WHERE id = ?",
                    )
                    .bind(id)
                    .fetch_one(&mut *from)
                    .await
                    .expect("message");
                let done = sqlx::query(
                    "INSERT INTO chat_message (chat_id, sender_id, client_message_id, revision, body, created_at) \
                     VALUES (?, ?, ?, ?, ?, ?)",
                )
                .bind(chat)
                .bind(sender)
                .bind(key)
                .bind(rev)
                .bind(body)
                .bind(created)
                .execute(&mut *tx)
                .await
                .expect("message row");
                Some(done.last_insert_id())
            }
            None => None,
        };
        sqlx::query(
            "INSERT INTO chat_event (chat_id, revision, event_type, user_id, message_id, created_at) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(chat)
        .bind(rev)
        .bind(kind)
        .bind(user)
        .bind(new_id)
        .bind(at)
        .execute(&mut *tx)
        .await
        .expect("event row");
    }
    tx.commit().await.expect("commit");
}

async fn mark(db: &mut MySqlConnection, chat: &str, to: Option<&str>) {
    sqlx::query("UPDATE chat SET moved_to = ? WHERE chat_id = ?")
        .bind(to)
        .bind(chat)
        .execute(db)
        .await
        .expect("marker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_chat_is_followed_by_every_instance_and_never_written_where_it_was() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("moved").await;
    assert_eq!(app.join(&chat, "u1").await.status(), StatusCode::CREATED);
    assert_eq!(
        app.post(&chat, "u1", "k1", "before").await.status(),
        StatusCode::CREATED
    );
    let home = app.shard_of(&chat).await;
    let target = (home + 1) % app.settings.shards.len();
    let target_name = app.settings.shards[target].name.clone();
    let mut old = app.db(home).await;
    let mut new = app.db(target).await;
    // A stream opened before the move keeps its cursor across it.
    let mut stream = common::SseReader::open(
        &app.http,
        &app.base,
        &format!("/v1/chats/{chat}/events/stream?after=2"),
        None,
    )
    .await
    .unwrap_or_else(|r| panic!("stream refused: {}", r.status()));

    copy_chat(&mut old, &mut new, &chat).await;
    mark(&mut old, &chat, Some(&target_name)).await;

    // The instance learns the location from the old shard's marker.
    let r = app.get(&format!("/v1/chats/{chat}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["shard"], json!(target_name));
    assert_eq!(body["revision"], 2);
    // Writes land on the new shard, revisions going on from the copy.
    assert_eq!(app.join(&chat, "u2").await.status(), StatusCode::CREATED);
    assert_eq!(
        app.post(&chat, "u2", "k2", "after").await.status(),
        StatusCode::CREATED
    );
    // The same idempotency key, retried after the move, is applied once.
    let again = app.post(&chat, "u1", "k1", "before").await;
    assert_eq!(again.status(), StatusCode::OK);
    let event = stream
        .next(std::time::Duration::from_secs(10))
        .await
        .expect("an event");
    assert_eq!(event.id.as_deref(), Some("3"));

    // A second instance, which knows nothing of the move, reads and writes
    // through the old shard's marker too, and every read path follows it.
    // Its first request is a write: the old shard's marker refuses it there.
    let other = TestApp::spawn().await;
    assert_eq!(other.join(&chat, "u3").await.status(), StatusCode::CREATED);
    assert_eq!(other.count(&chat).await, 3);
    let r = other.get(&format!("/v1/chats/{chat}/members/u2")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = other
        .get(&format!("/v1/chats/{chat}/members?limit=10"))
        .await;
    let page: Value = r.json().await.expect("json");
    assert_eq!(page["members"].as_array().map(Vec::len), Some(3));
    let other_stream = other.get(&format!("/v1/chats/{chat}/events?after=0")).await;
    let events: Value = other_stream.json().await.expect("json");
    assert_eq!(events["latestRevision"], 5);
    // A PUT through yet another instance, as its first request, updates the
    // chat where it is: it is never created again where it was.
    let third = TestApp::spawn().await;
    let r = third.put_chat(&chat, Some(json!({"maxMembers": 77}))).await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["shard"], json!(target_name));
    assert_eq!(body["maxMembers"], 77);

    // Nothing was written where the marker stands; the new shard holds it all.
    let (revision, max): (u64, u32) =
        sqlx::query_as("SELECT revision, max_members FROM chat WHERE chat_id = ?")
            .bind(&chat)
            .fetch_one(&mut old)
            .await
            .expect("old row");
    assert_eq!(revision, 2);
    assert_ne!(max, 77);
    assert_eq!(common::count_and_rows(&mut old, &chat).await, (1, 1));
    whole_with(&mut new, &chat, 3).await;
    let on_new: u64 = sqlx::query_scalar("SELECT revision FROM chat WHERE chat_id = ?")
        .bind(&chat)
        .fetch_one(&mut new)
        .await
        .expect("new row");
    assert_eq!(on_new, 5);
    drop(stream);
    app.shut_down().await;
    other.shut_down().await;
    third.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markers_that_point_at_each_other_answer_a_retryable_503() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("loop").await;
    let home = app.shard_of(&chat).await;
    let target = (home + 1) % app.settings.shards.len();
    let (home_name, target_name) = (
        app.settings.shards[home].name.clone(),
        app.settings.shards[target].name.clone(),
    );
    let mut old = app.db(home).await;
    let mut new = app.db(target).await;
    copy_chat(&mut old, &mut new, &chat).await;
    // The moment between two steps of a switch: each says the other.
    mark(&mut new, &chat, Some(&home_name)).await;
    mark(&mut old, &chat, Some(&target_name)).await;
    for r in [
        app.get(&format!("/v1/chats/{chat}")).await,
        app.join(&chat, "u1").await,
    ] {
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().contains_key("retry-after"));
        let body: Value = r.json().await.expect("problem");
        assert_eq!(body["code"], "shard_unavailable");
    }
    // A marker naming a shard this instance does not know is an error of
    // the deployment, said as such.
    mark(&mut old, &chat, Some("shard-nowhere")).await;
    let fresh = TestApp::spawn_with(|s| *s = settings()).await;
    let r = fresh.get(&format!("/v1/chats/{chat}")).await;
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    // Settled again: the chat is home.
    mark(&mut old, &chat, None).await;
    let back = TestApp::spawn().await;
    assert_eq!(back.join(&chat, "u1").await.status(), StatusCode::CREATED);
    common::assert_chat_consistent(&mut old, &chat).await;
    app.shut_down().await;
    fresh.shut_down().await;
    back.shut_down().await;
}

const TOKEN: &str = "moved-test-admin-token";

/// `POST /v1/admin/chats/{chat}/move` to `to`: the answer.
async fn request_move(app: &TestApp, chat: &str, to: &str) -> reqwest::Response {
    app.admin(
        reqwest::Method::POST,
        &format!("/v1/admin/chats/{chat}/move"),
    )
    .json(&json!({ "to": to }))
    .send()
    .await
    .expect("move")
}

/// `chat` as `GET /v1/admin/moved-chats` lists it, if it does.
async fn moved_away(app: &TestApp, chat: &str) -> Option<Value> {
    let view = app.admin_get("/v1/admin/moved-chats").await;
    assert_eq!(view["partial"], false, "{view}");
    view["chats"]
        .as_array()
        .expect("chats")
        .iter()
        .find(|c| c["chatId"] == chat)
        .cloned()
}

/// Starts a move and waits until it ends; the move as it ended.
async fn move_to_end(app: &TestApp, chat: &str, to: &str) -> Value {
    let r = request_move(app, chat, to).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let id: String = r.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    wait_move(app, &id).await
}

/// Polls a move until it is `done`, `rolled_back` or `cancelled`.
async fn wait_move(app: &TestApp, id: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let m = app.admin_get(&format!("/v1/admin/moves/{id}")).await;
        if m["phase"] == "done" || m["phase"] == "rolled_back" || m["phase"] == "cancelled" {
            return m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the move did not end: {m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Writes through `app` until `stop`: joins of new users and posts of one
/// member, each retried with the same key until it is answered 2xx (a fence
/// answers 503 `chat_moving` for a moment). The users joined and the keys posted.
async fn writer(
    app: std::sync::Arc<TestApp>,
    chat: String,
    name: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Written {
    let (mut joined, mut posted, mut moving) = (Vec::new(), Vec::new(), 0u64);
    let mut n = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let user = format!("{name}-{n}");
        loop {
            let r = app.join(&chat, &user).await;
            match r.status() {
                StatusCode::CREATED | StatusCode::OK => break,
                StatusCode::SERVICE_UNAVAILABLE => {
                    // `chat_moving` from the fence; on a loaded machine also
                    // `outcome_unknown` (a batch outlived its deadline),
                    // `shard_busy` or `chat_busy`: every 503 is retryable,
                    // and the client retries it unchanged.
                    let body: Value = r.json().await.expect("problem");
                    assert!(body["code"].is_string(), "{body}");
                    moving += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                other => panic!("join {user}: {other}"),
            }
        }
        joined.push(user.clone());
        let key = format!("{name}-k{n}");
        loop {
            let r = app.post(&chat, &user, &key, "during the move").await;
            match r.status() {
                StatusCode::CREATED | StatusCode::OK => break,
                StatusCode::SERVICE_UNAVAILABLE => {
                    moving += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                other => panic!("post {key}: {other}"),
            }
        }
        posted.push(key);
        n += 1;
    }
    (joined, posted, moving)
}

/// What one [`writer`] wrote.
type Written = (Vec<String>, Vec<String>, u64);

/// A [`writer`] through each of `a` and `b`, once the chat has `members`
/// members; the flag that stops them.
async fn start_writers(
    a: &std::sync::Arc<TestApp>,
    b: &std::sync::Arc<TestApp>,
    chat: &str,
    members: u64,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    [tokio::task::JoinHandle<Written>; 2],
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let wa = tokio::spawn(writer(a.clone(), chat.to_owned(), "a", stop.clone()));
    let wb = tokio::spawn(writer(b.clone(), chat.to_owned(), "b", stop.clone()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while a.count(chat).await < members {
        assert!(std::time::Instant::now() < deadline, "writers stalled");
    }
    (stop, [wa, wb])
}

/// Waits until `more` members more have joined through `app` (the writers
/// go on after a switch), then stops `writers`; what each wrote.
async fn go_on_then_stop(
    app: &TestApp,
    chat: &str,
    more: u64,
    stop: &std::sync::atomic::AtomicBool,
    writers: [tokio::task::JoinHandle<Written>; 2],
) -> [Written; 2] {
    let after = app.count(chat).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while app.count(chat).await < after + more {
        assert!(
            std::time::Instant::now() < deadline,
            "writers stalled after the switch"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let [a, b] = writers;
    [a.await.expect("writer a"), b.await.expect("writer b")]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_moves_online_under_writes_from_two_instances_with_nothing_lost() {
    use std::sync::Arc;
    let a = Arc::new(TestApp::spawn_with(|s| s.admin.token = TOKEN.to_owned()).await);
    let b = Arc::new(TestApp::spawn_with(|s| s.admin.token = TOKEN.to_owned()).await);
    let chat = crate::helpers::unique("moving");
    let r = a.put_chat(&chat, Some(json!({"maxMembers": 100000}))).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    for i in 0..50 {
        assert_eq!(
            a.join(&chat, &format!("early-{i}")).await.status(),
            StatusCode::CREATED
        );
    }
    let home = a.shard_of(&chat).await;
    let target = (home + 1) % a.settings.shards.len();
    let target_name = a.settings.shards[target].name.clone();
    // A stream on B follows the chat throughout.
    let mut stream = common::SseReader::open(
        &b.http,
        &b.base,
        &format!("/v1/chats/{chat}/events/stream?after=0"),
        None,
    )
    .await
    .unwrap_or_else(|r| panic!("stream refused: {}", r.status()));

    // Writes under way before the move starts.
    let (stop, [wa, wb]) = start_writers(&a, &b, &chat, 60).await;
    let r = request_move(&a, &chat, &target_name).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let started: Value = r.json().await.expect("json");
    let id = started["id"].as_str().expect("id").to_owned();
    // A second move of the same chat is refused while it runs.
    let again = request_move(&a, &chat, &target_name).await;
    assert!(
        again.status() == StatusCode::CONFLICT || again.status() == StatusCode::ACCEPTED,
        "{}",
        again.status()
    );
    let done = wait_move(&a, &id).await;
    assert_eq!(done["phase"], "done", "{done}");
    // The admin view lists the chat as living away from its home.
    let home_name = a.settings.shards[home].name.clone();
    assert_eq!(
        moved_away(&b, &chat).await,
        Some(json!({"chatId": chat, "home": home_name, "shard": target_name}))
    );
    // Writes go on after the switch, through both instances.
    let [(ja, pa, ma), (jb, pb, mb)] = go_on_then_stop(&a, &chat, 10, &stop, [wa, wb]).await;
    println!(
        "moved with {} + {} joins, {ma} + {mb} answers chat_moving",
        ja.len(),
        jb.len()
    );

    // Everything acknowledged is on the target, once; the source keeps only
    // its tombstone.
    let body = a.chat_body(&chat).await;
    assert_eq!(body["shard"], json!(target_name));
    let mut new = a.db(target).await;
    let mut old = a.db(home).await;
    common::assert_chat_consistent(&mut new, &chat).await;
    let expected_members = 50 + ja.len() + jb.len();
    assert_eq!(
        common::count_and_rows(&mut new, &chat).await,
        (expected_members as i64, expected_members as i64)
    );
    let mut users = common::joined_users(&mut new, &chat).await;
    users.sort();
    let mut acknowledged: Vec<String> = ja.iter().chain(&jb).cloned().collect();
    acknowledged.extend((0..50).map(|i| format!("early-{i}")));
    acknowledged.sort();
    assert_eq!(users, acknowledged);
    let messages: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM chat_message WHERE chat_id = ?")
        .bind(&chat)
        .fetch_one(&mut new)
        .await
        .expect("messages");
    assert_eq!(messages as usize, pa.len() + pb.len());
    let left = member_rows(&mut old, &chat).await;
    assert_eq!(left, 0, "the source's rows are cleaned");
    let marker: Option<String> = sqlx::query_scalar("SELECT moved_to FROM chat WHERE chat_id = ?")
        .bind(&chat)
        .fetch_one(&mut old)
        .await
        .expect("tombstone");
    assert_eq!(marker.as_deref(), Some(target_name.as_str()));

    // The stream on B saw every revision once, in order, across the move.
    let revision: u64 = sqlx::query_scalar("SELECT revision FROM chat WHERE chat_id = ?")
        .bind(&chat)
        .fetch_one(&mut new)
        .await
        .expect("revision");
    let mut seen = 0;
    while seen < revision {
        let event = stream
            .next(std::time::Duration::from_secs(10))
            .await
            .expect("the stream ended");
        let v: Value = serde_json::from_str(&event.data).expect("event");
        assert_eq!(v["revision"].as_u64(), Some(seen + 1));
        seen += 1;
    }
    drop(stream);

    // And back home, with the old source's tombstone turned into the copy's
    // target: the chat is whole there again, and the tombstone moves.
    let back = move_to_end(&b, &chat, &a.settings.shards[home].name).await;
    assert_eq!(back["phase"], "done", "{back}");
    assert_eq!(
        a.join(&chat, "back-home").await.status(),
        StatusCode::CREATED
    );
    let body: Value = a.chat_body(&chat).await;
    assert_eq!(body["shard"], json!(a.settings.shards[home].name));
    common::assert_chat_consistent(&mut old, &chat).await;
    assert_eq!(
        common::count_and_rows(&mut old, &chat).await,
        (expected_members as i64 + 1, expected_members as i64 + 1)
    );
    let marker: Option<String> = sqlx::query_scalar("SELECT moved_to FROM chat WHERE chat_id = ?")
        .bind(&chat)
        .fetch_one(&mut old)
        .await
        .expect("home row");
    assert_eq!(marker, None, "home again: no marker");
    assert_eq!(moved_away(&a, &chat).await, None, "home again");
    if let (Ok(a), Ok(b)) = (Arc::try_unwrap(a), Arc::try_unwrap(b)) {
        a.shut_down().await;
        b.shut_down().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_whose_log_was_purged_moves_from_a_snapshot_under_writes() {
    use std::sync::Arc;
    // The purge runs on this chat only, down to its last 20 revisions.
    let chat = crate::helpers::unique("purgedmove");
    let purging = chat.clone();
    let a = Arc::new(
        TestApp::spawn_with(move |s| {
            s.admin.token = TOKEN.to_owned();
            s.retention.enabled = false;
            s.retention.overrides.insert(
                purging,
                serde_json::from_value(
                    json!({ "enabled": true, "minDays": 0, "minRevisions": 20 }),
                )
                .expect("override"),
            );
            s.purge.interval_ms = 50;
            // Small pages: the snapshot takes many, with writes in between.
            s.moves.batch_revisions = 7;
            s.moves.fence_lag = 5;
        })
        .await,
    );
    let b = Arc::new(TestApp::spawn_with(|s| s.admin.token = TOKEN.to_owned()).await);
    let r = a.put_chat(&chat, Some(json!({"maxMembers": 100000}))).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    for i in 0..50 {
        assert_eq!(
            a.join(&chat, &format!("early-{i}")).await.status(),
            StatusCode::CREATED
        );
    }
    for i in 0..5 {
        assert_eq!(
            a.leave(&chat, &format!("early-{i}")).await.status(),
            StatusCode::NO_CONTENT
        );
    }
    let mut originals = Vec::new();
    for i in 0..30 {
        let r = a
            .post(&chat, "early-9", &format!("old-{i}"), "before the purge")
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
        originals.push(r.json::<Value>().await.expect("json"));
    }
    // Revisions 1..=85; the purge keeps the last 20.
    common::eventually(std::time::Duration::from_secs(20), "the purge", || async {
        let c: Value = a.chat_body(&chat).await;
        c["firstRevision"].as_u64().zip(c["revision"].as_u64()) == Some((66, 85))
    })
    .await;
    let home = a.shard_of(&chat).await;
    let target = (home + 1) % a.settings.shards.len();
    let target_name = a.settings.shards[target].name.clone();

    let (stop, [wa, wb]) = start_writers(&a, &b, &chat, 55).await;
    let done = move_to_end(&b, &chat, &target_name).await;
    assert_eq!(done["phase"], "done", "{done}");
    // The snapshot's 50 member rows and 30 messages at least.
    assert!(done["rowsCopied"].as_u64() >= Some(80), "{done}");
    let [(ja, pa, _), (jb, pb, _)] = go_on_then_stop(&a, &chat, 5, &stop, [wa, wb]).await;

    // On the target: every member (those whose joins were purged too),
    // every message, the log gapless from its first stored revision, and
    // the count equal to the rows.
    let body: Value = a.chat_body(&chat).await;
    assert_eq!(body["shard"], json!(target_name));
    assert!(
        body["firstRevision"].as_u64().expect("first") >= 66,
        "{body}"
    );
    let mut new = a.db(target).await;
    common::assert_chat_consistent(&mut new, &chat).await;
    let mut users = common::joined_users(&mut new, &chat).await;
    users.sort();
    let mut acknowledged: Vec<String> = ja.iter().chain(&jb).cloned().collect();
    acknowledged.extend((5..50).map(|i| format!("early-{i}")));
    acknowledged.sort();
    assert_eq!(users, acknowledged);
    let left: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM chat_member WHERE chat_id = ? AND state = 2")
            .bind(&chat)
            .fetch_one(&mut new)
            .await
            .expect("left");
    assert_eq!(left, 5, "the members who left stay left");
    let messages: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM chat_message WHERE chat_id = ?")
        .bind(&chat)
        .fetch_one(&mut new)
        .await
        .expect("messages");
    assert_eq!(messages as usize, 30 + pa.len() + pb.len());
    // A post retried with a key from before the purge is answered with the
    // original, not applied again.
    for (i, original) in originals.iter().enumerate().step_by(7) {
        let r = b
            .post(&chat, "early-9", &format!("old-{i}"), "before the purge")
            .await;
        assert_eq!(r.status(), StatusCode::OK, "old-{i}");
        let again: Value = r.json().await.expect("json");
        assert_eq!(again["revision"], original["revision"], "old-{i}");
    }
    common::assert_chat_consistent(&mut new, &chat).await;
    // The source keeps only its tombstone.
    let mut old = a.db(home).await;
    let rows = member_rows(&mut old, &chat).await;
    assert_eq!(rows, 0, "the source's rows are cleaned");
    if let (Ok(a), Ok(b)) = (Arc::try_unwrap(a), Arc::try_unwrap(b)) {
        a.shut_down().await;
        b.shut_down().await;
    }
}

/// How many member rows (JOINED or LEFT) `db` holds for `chat`.
async fn member_rows(db: &mut MySqlConnection, chat: &str) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM chat_member WHERE chat_id = ?")
        .bind(chat)
        .fetch_one(db)
        .await
        .expect("member rows")
}

/// `userId` to `memberId` of a chat's JOINED members, as the API lists them.
async fn member_ids(app: &TestApp, chat: &str) -> std::collections::BTreeMap<String, u64> {
    let r = app
        .get(&format!("/v1/chats/{chat}/members?limit=100"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let page: Value = r.json().await.expect("json");
    assert!(page["nextCursor"].is_null(), "{page}");
    page["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            (
                m["userId"].as_str().expect("user").to_owned(),
                m["memberId"].as_u64().expect("memberId"),
            )
        })
        .collect()
}

/// Moves a chat of 20 members and 10 messages (its log purged first when
/// `purged`, so that its rows are copied as they stand) to a shard where
/// another chat's rows already hold one member's id and one message's id.
/// Every other member and message keeps its id; the two that collide get
/// new ids of the target's series, the squatters keep theirs, and retried
/// keys answer the ids the rows now have.
async fn ids_survive_a_move(app: &TestApp, chat: &str, purged: bool) {
    let series = u64::from(chatshard::storage::server::ID_SERIES);
    let blocks = app.settings.id_blocks();
    let r = app.put_chat(chat, None).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    for i in 0..20 {
        assert_eq!(
            app.join(chat, &format!("u-{i}")).await.status(),
            StatusCode::CREATED
        );
    }
    let mut sent = Vec::new();
    for i in 0..10 {
        let r = app.post(chat, "u-0", &format!("k-{i}"), "hello").await;
        assert_eq!(r.status(), StatusCode::CREATED);
        let v: Value = r.json().await.expect("json");
        sent.push(v["messageId"].as_u64().expect("messageId"));
    }
    if purged {
        common::eventually(Duration::from_secs(20), "the purge", || async {
            app.chat_body(chat).await["firstRevision"].as_u64() > Some(1)
        })
        .await;
    }
    let home = app.shard_of(chat).await;
    let target = (home + 1) % app.settings.shards.len();
    let before = member_ids(app, chat).await;
    assert_eq!(before.len(), 20);
    // Ids made on a shard are of its series.
    for id in before.values().chain(&sent) {
        assert_eq!(id % series, (u64::from(blocks[home]) + 1) % series, "{id}");
    }
    // Another chat's rows on the target hold u-3's id and k-4's id.
    let squatter = format!("{chat}-squatter");
    let mut db = app.db(target).await;
    sqlx::query(
        "INSERT INTO chat_member (id, chat_id, user_id, state, joined_at, created_at, updated_at) \
         VALUES (?, ?, 'squatter', 1, NOW(6), NOW(6), NOW(6))",
    )
    .bind(before["u-3"])
    .bind(&squatter)
    .execute(&mut db)
    .await
    .expect("squat a member id");
    sqlx::query(
        "INSERT INTO chat_message (id, chat_id, sender_id, client_message_id, revision, body, created_at) \
         VALUES (?, ?, 'squatter', 'q', 1, 'mine', NOW(6))",
    )
    .bind(sent[4])
    .bind(&squatter)
    .execute(&mut db)
    .await
    .expect("squat a message id");

    let done = move_to_end(app, chat, &app.settings.shards[target].name).await;
    assert_eq!(done["phase"], "done", "{done}");
    assert_eq!(app.shard_of(chat).await, target);

    let target_series = (u64::from(blocks[target]) + 1) % series;
    let after = member_ids(app, chat).await;
    assert_eq!(after.len(), 20);
    for (user, id) in &after {
        if user == "u-3" {
            assert_ne!(*id, before["u-3"], "a colliding id is given anew");
            assert_eq!(id % series, target_series, "{id}");
        } else {
            assert_eq!(*id, before[user], "{user} keeps its memberId");
        }
    }
    let mut now = Vec::new();
    for (i, id) in sent.iter().enumerate() {
        let r = app.post(chat, "u-0", &format!("k-{i}"), "hello").await;
        assert_eq!(r.status(), StatusCode::OK, "k-{i} is applied once");
        let v: Value = r.json().await.expect("json");
        let again = v["messageId"].as_u64().expect("messageId");
        if i == 4 {
            assert_ne!(again, *id, "a colliding id is given anew");
            assert_eq!(again % series, target_series, "{again}");
        } else {
            assert_eq!(again, *id, "k-{i} keeps its messageId");
        }
        now.push((v["revision"].as_u64().expect("revision"), again));
    }
    // Each stored MESSAGE_SENT names its message's id as it stands now.
    let first = app.chat_body(chat).await["firstRevision"]
        .as_u64()
        .expect("firstRevision");
    let r = app
        .get(&format!(
            "/v1/chats/{chat}/events?after={}&limit=500",
            first - 1
        ))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let page: Value = r.json().await.expect("json");
    let events = page["events"].as_array().expect("events");
    assert_eq!(events.len() as u64, 30 - first + 1, "{page}");
    for e in events {
        if e["type"] == "MESSAGE_SENT" {
            let revision = e["revision"].as_u64().expect("revision");
            let (_, id) = now
                .iter()
                .find(|(r, _)| *r == revision)
                .expect("a message of the chat");
            assert_eq!(e["messageId"].as_u64(), Some(*id), "{e}");
        }
    }
    // The squatters are untouched.
    let held: (String, String) =
        sqlx::query_as("SELECT chat_id, user_id FROM chat_member WHERE id = ?")
            .bind(before["u-3"])
            .fetch_one(&mut db)
            .await
            .expect("squatting member");
    assert_eq!(held, (squatter.clone(), "squatter".to_owned()));
    let held: (String, String) =
        sqlx::query_as("SELECT chat_id, body FROM chat_message WHERE id = ?")
            .bind(sent[4])
            .fetch_one(&mut db)
            .await
            .expect("squatting message");
    assert_eq!(held, (squatter, "mine".to_owned()));
    // A member joined on the target gets an id of its series, above the ids
    // the copy brought in.
    let r = app.join(chat, "newcomer").await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let newcomer = member_ids(app, chat).await["newcomer"];
    assert_eq!(newcomer % series, target_series, "{newcomer}");
    assert!(before.values().all(|id| *id != newcomer));
    whole_with(&mut db, chat, 21).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_chat_keeps_its_ids_and_one_that_collides_gets_a_new_one() {
    let replayed = crate::helpers::unique("keepids");
    let purged = crate::helpers::unique("keepidsp");
    let purging = purged.clone();
    // Fresh shards: no other test's rows hold ids in the way.
    let settings = crate::helpers::isolated_settings("ids").await;
    let app = TestApp::spawn_on(settings, move |s| {
        s.admin.token = TOKEN.to_owned();
        s.retention.enabled = false;
        s.retention.overrides.insert(
            purging,
            serde_json::from_value(json!({ "enabled": true, "minDays": 0, "minRevisions": 5 }))
                .expect("override"),
        );
        s.purge.interval_ms = 50;
        s.moves.batch_revisions = 7;
    })
    .await;
    ids_survive_a_move(&app, &replayed, false).await;
    ids_survive_a_move(&app, &purged, true).await;
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_does_not_verify_is_rolled_back_and_the_chat_stays() {
    let app = TestApp::spawn_with(|s| s.admin.token = TOKEN.to_owned()).await;
    let chat = app.new_chat("drift").await;
    for i in 0..5 {
        assert_eq!(
            app.join(&chat, &format!("u{i}")).await.status(),
            StatusCode::CREATED
        );
    }
    let home = app.shard_of(&chat).await;
    let target = (home + 1) % app.settings.shards.len();
    let mut old = app.db(home).await;
    // The source's count drifted from its rows behind chatshard's back: the
    // replayed copy cannot match it, and the move must not switch.
    sqlx::query("UPDATE chat_member_count SET member_count = member_count + 3 WHERE chat_id = ?")
        .bind(&chat)
        .execute(&mut old)
        .await
        .expect("drift");
    let ended = move_to_end(&app, &chat, &app.settings.shards[target].name).await;
    assert_eq!(ended["phase"], "rolled_back", "{ended}");
    assert!(
        ended["error"]
            .as_str()
            .is_some_and(|e| e.contains("differ")),
        "{ended}"
    );
    // The chat stays home, takes writes, and the target keeps nothing of it.
    assert_eq!(app.join(&chat, "after").await.status(), StatusCode::CREATED);
    assert_eq!(app.shard_of(&chat).await, home);
    let mut new = app.db(target).await;
    let rows: i64 = sqlx::query_scalar(
        "SELECT (SELECT COUNT(*) FROM chat WHERE chat_id = ?) + (SELECT COUNT(*) FROM chat_member WHERE chat_id = ?) \
         + (SELECT COUNT(*) FROM chat_event WHERE chat_id = ?)",
    )
    .bind(&chat)
    .bind(&chat)
    .bind(&chat)
    .fetch_one(&mut new)
    .await
    .expect("target rows");
    assert_eq!(rows, 0, "the copy was dropped");
    // Unknown shards and moves to where the chat is are refused clearly.
    for (to, status, code) in [
        (
            "shard-nowhere",
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_shard",
        ),
        (
            app.settings.shards[home].name.as_str(),
            StatusCode::CONFLICT,
            "move_refused",
        ),
    ] {
        let r = request_move(&app, &chat, to).await;
        assert_eq!(r.status(), status);
        let body: Value = r.json().await.expect("problem");
        assert_eq!(body["code"], code);
    }
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_an_instance_that_never_wrote_follows_the_chat_to_its_new_shard() {
    let a = TestApp::spawn_with(|s| s.admin.token = TOKEN.to_owned()).await;
    let b = TestApp::spawn().await;
    let chat = a.new_chat("follow").await;
    assert_eq!(a.join(&chat, "u1").await.status(), StatusCode::CREATED);
    let mut stream = common::SseReader::open(
        &b.http,
        &b.base,
        &format!("/v1/chats/{chat}/events/stream?after=0"),
        None,
    )
    .await
    .unwrap_or_else(|r| panic!("stream refused: {}", r.status()));
    let first = stream
        .next(std::time::Duration::from_secs(10))
        .await
        .expect("event 1");
    assert_eq!(first.id.as_deref(), Some("1"));
    let home = a.shard_of(&chat).await;
    let target = (home + 1) % a.settings.shards.len();
    let moved = move_to_end(&a, &chat, &a.settings.shards[target].name).await;
    assert_eq!(moved["phase"], "done", "{moved}");
    // Written through A on the new shard; B, which only reads, hears of it
    // through its tail refresher following the old shard's marker.
    assert_eq!(
        a.post(&chat, "u1", "k1", "on the new shard").await.status(),
        StatusCode::CREATED
    );
    let next = stream
        .next(std::time::Duration::from_secs(10))
        .await
        .expect("event 2");
    assert_eq!(next.id.as_deref(), Some("2"));
    assert!(next.data.contains("on the new shard"), "{}", next.data);
    drop(stream);
    a.shut_down().await;
    b.shut_down().await;
}

/// Records a move by hand as a driver that died would have left it: in
/// `phase`, last touched a minute ago.
async fn abandoned_move(
    db: &mut MySqlConnection,
    chat: &str,
    source: &str,
    target: &str,
    phase: &str,
) {
    sqlx::query(
        "INSERT INTO chat_move (chat_id, source, target, phase, active, copied_revision, created_at, updated_at) \
         VALUES (?, ?, ?, ?, 1, 0, DATE_SUB(NOW(6), INTERVAL 60 SECOND), DATE_SUB(NOW(6), INTERVAL 60 SECOND))",
    )
    .bind(chat)
    .bind(source)
    .bind(target)
    .bind(phase)
    .execute(db)
    .await
    .expect("move record");
}

/// Waits until the chat's move has ended; the move.
async fn ended_move_of(app: &TestApp, chat: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let all = app.admin_get("/v1/admin/moves").await;
        let found = all["moves"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["chatId"] == json!(chat)).cloned());
        if let Some(m) = found.filter(|m| m["phase"] == "done" || m["phase"] == "rolled_back") {
            return m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no ended move of {chat}: {all}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A chat of 5 members copied to the next shard, the copy still marked as
/// held by the source: what a move's driver leaves when it dies after its
/// copy; on an instance that takes abandoned moves over after 1 s.
struct Copied {
    app: TestApp,
    chat: String,
    home: usize,
    home_name: String,
    target_name: String,
    old: MySqlConnection,
    new: MySqlConnection,
}

async fn copied_by_a_dead_driver(prefix: &str) -> Copied {
    let app = TestApp::spawn_with(|s| {
        s.admin.token = TOKEN.to_owned();
        s.moves.lease_ms = 1000;
        // A fenced write is answered at once: the takeover (after 1 s) must
        // not lift the fence while a held write waits.
        s.moves.hold_writes_ms = 0;
        s.moves.fence_ms = 200;
    })
    .await;
    let chat = app.new_chat(prefix).await;
    for i in 0..5 {
        assert_eq!(
            app.join(&chat, &format!("u{i}")).await.status(),
            StatusCode::CREATED
        );
    }
    let home = app.shard_of(&chat).await;
    let target = (home + 1) % app.settings.shards.len();
    let (home_name, target_name) = (
        app.settings.shards[home].name.clone(),
        app.settings.shards[target].name.clone(),
    );
    let mut old = app.db(home).await;
    let mut new = app.db(target).await;
    copy_chat(&mut old, &mut new, &chat).await;
    mark(&mut new, &chat, Some(&home_name)).await;
    Copied {
        app,
        chat,
        home,
        home_name,
        target_name,
        old,
        new,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_abandoned_before_its_switch_is_resumed_and_ends_on_its_target() {
    let Copied {
        app,
        chat,
        home,
        home_name,
        target_name,
        mut old,
        mut new,
    } = copied_by_a_dead_driver("abandoned").await;
    let target = app
        .settings
        .shards
        .iter()
        .position(|s| s.name == target_name)
        .expect("target");
    // Its driver died fenced, with the copy made: the source's fence holds
    // for a minute, longer than the move's lease.
    sqlx::query(
        "UPDATE chat SET fenced_until = DATE_ADD(NOW(6), INTERVAL 60 SECOND) WHERE chat_id = ?",
    )
    .bind(&chat)
    .execute(&mut old)
    .await
    .expect("fence");
    abandoned_move(&mut old, &chat, &home_name, &target_name, "fenced").await;
    let r = app.join(&chat, "while-fenced").await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = r.json().await.expect("problem");
    assert_eq!(body["code"], "chat_moving");
    assert!(body["detail"].is_string());

    // The instance takes the move over and resumes it from the target's
    // copy: fenced again (its own, shorter fence), verified and switched.
    let ended = ended_move_of(&app, &chat).await;
    assert_eq!(ended["phase"], "done", "{ended}");
    assert_eq!(ended["cancelRequested"], false, "{ended}");
    let driver: u32 = sqlx::query_scalar("SELECT driver FROM chat_move WHERE chat_id = ?")
        .bind(&chat)
        .fetch_one(&mut old)
        .await
        .expect("move record");
    assert_eq!(
        driver, 1,
        "driven to its end by the instance that took it over"
    );
    assert_eq!(app.join(&chat, "after").await.status(), StatusCode::CREATED);
    assert_eq!(app.shard_of(&chat).await, target);
    whole_with(&mut new, &chat, 6).await;
    let left = member_rows(&mut old, &chat).await;
    assert_eq!(left, 0, "the source is cleaned");
    assert_ne!(home, target);
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_taken_over_cannot_switch_for_its_old_driver_even_with_its_fence_live() {
    use chatshard::storage::moves::{Standing, SwitchStep, claim, set_phase, switch_source};
    // A driver that was only slow comes back at its switch after another
    // instance took its move over: the takeover made the record name the
    // next driver, which stops the old one where a live fence and the
    // verified revision would have let it through. The new driver's switch
    // goes through.
    let app = TestApp::spawn_with(|s| {
        s.admin.token = TOKEN.to_owned();
        s.moves.lease_ms = 600_000;
    })
    .await;
    let chat = app.new_chat("takenover").await;
    assert_eq!(app.join(&chat, "u").await.status(), StatusCode::CREATED);
    let home = app.shard_of(&chat).await;
    let shards = &app.settings.shards;
    let (home_name, to) = (
        shards[home].name.clone(),
        shards[(home + 1) % shards.len()].name.clone(),
    );
    let mut db = app.db(home).await;
    sqlx::query(
        "UPDATE chat SET fenced_until = DATE_ADD(NOW(6), INTERVAL 60 SECOND) WHERE chat_id = ?",
    )
    .bind(&chat)
    .execute(&mut db)
    .await
    .expect("fence");
    let id: u64 = sqlx::query(
        "INSERT INTO chat_move (chat_id, source, target, phase, active, copied_revision, created_at, updated_at) \
         VALUES (?, ?, ?, 'verified', 1, 1, NOW(6), NOW(6))",
    )
    .bind(&chat)
    .bind(&home_name)
    .bind(&to)
    .execute(&mut db)
    .await
    .expect("move record")
    .last_insert_id();
    let seen: chrono::NaiveDateTime =
        sqlx::query_scalar("SELECT updated_at FROM chat_move WHERE id = ?")
            .bind(id)
            .fetch_one(&mut db)
            .await
            .expect("record");
    let now = chrono::Utc::now().naive_utc();
    let driver = claim(&mut db, id, seen, now).await.expect("claim");
    assert_eq!(driver, Some(1), "the takeover is the move's second driver");
    assert_eq!(
        claim(&mut db, id, seen, now).await.expect("claim"),
        None,
        "one instance takes a move over"
    );
    // The old driver: its switch and its record writes are refused.
    let mut tx = db.begin().await.expect("tx");
    let step = switch_source(&mut tx, (id, 0), &chat, &to, 1, now)
        .await
        .expect("switch");
    tx.commit().await.expect("commit");
    assert_eq!(step, SwitchStep::Superseded);
    let marker: Option<String> = sqlx::query_scalar("SELECT moved_to FROM chat WHERE chat_id = ?")
        .bind(&chat)
        .fetch_one(&mut db)
        .await
        .expect("row");
    assert_eq!(marker, None, "no tombstone");
    let standing = set_phase(&mut db, (id, 0), "copying", (7, 7), None, false, now)
        .await
        .expect("record");
    assert_eq!(standing, Standing::Superseded);
    let view = app
        .admin_get(&format!("/v1/admin/moves/{home_name}:{id}"))
        .await;
    assert_eq!(view["phase"], "verified", "{view}");
    assert_eq!(view["rowsCopied"], 0, "{view}");
    assert_eq!(view["cancelRequested"], false, "{view}");
    // The new driver's switch goes through.
    let mut tx = db.begin().await.expect("tx");
    let step = switch_source(&mut tx, (id, 1), &chat, &to, 1, now)
        .await
        .expect("switch");
    tx.rollback().await.expect("rollback");
    assert_eq!(step, SwitchStep::Done);
    sqlx::query("UPDATE chat SET fenced_until = NULL WHERE chat_id = ?")
        .bind(&chat)
        .execute(&mut db)
        .await
        .expect("unfence");
    sqlx::query("UPDATE chat_move SET active = NULL, phase = 'rolled_back' WHERE id = ?")
        .bind(id)
        .execute(&mut db)
        .await
        .expect("end the record");
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_abandoned_inside_its_switch_is_finished_by_another_instance() {
    let Copied {
        app,
        chat,
        home_name,
        target_name,
        mut old,
        mut new,
        ..
    } = copied_by_a_dead_driver("half-switched").await;
    // Its driver died between the switch's first step (the tombstone at the
    // source) and its second (the target made live): each marker names the
    // other, and the chat answers 503 until the move is finished.
    mark(&mut old, &chat, Some(&target_name)).await;
    abandoned_move(&mut old, &chat, &home_name, &target_name, "verified").await;

    let ended = ended_move_of(&app, &chat).await;
    assert_eq!(ended["phase"], "done", "{ended}");
    assert_eq!(app.join(&chat, "after").await.status(), StatusCode::CREATED);
    let body: Value = app.chat_body(&chat).await;
    assert_eq!(body["shard"], json!(target_name));
    whole_with(&mut new, &chat, 6).await;
    let left = member_rows(&mut old, &chat).await;
    assert_eq!(left, 0, "the source is cleaned");
    app.shut_down().await;
}

/// Runs `chatshard ARGS --config` (on `settings`) and SIGKILLs it once a
/// line of its output satisfies `when`.
fn kill_cli_when(
    settings: &chatshard::config::Settings,
    args: &[&str],
    when: impl Fn(&str) -> bool,
) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = std::env::temp_dir().join(crate::helpers::unique("mover"));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("chatshard.toml");
    std::fs::write(&config, toml::to_string(settings).expect("toml")).expect("config");
    let mut mover = Command::new(env!("CARGO_BIN_EXE_chatshard"))
        .args(args)
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("stderr")).expect("stderr"))
        .spawn()
        .expect("start the mover");
    let stdout = mover.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    loop {
        match lines.next() {
            Some(Ok(line)) if when(&line) => break,
            Some(Ok(line)) => seen.push(line),
            other => panic!(
                "the mover ended first ({other:?}); it printed {seen:#?}, and on stderr:\n{}",
                std::fs::read_to_string(dir.join("stderr")).unwrap_or_default()
            ),
        }
    }
    mover.kill().expect("SIGKILL the mover");
    let _ = mover.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `chatshard move-chat CHAT --to SHARD` on the shared shards' settings
/// as `configure` leaves them, and SIGKILLs it once it prints `phase`.
fn kill_mover_in(
    chat: &str,
    to: &str,
    phase: &str,
    configure: impl FnOnce(&mut chatshard::config::MovesSettings),
) {
    let mut settings = settings();
    configure(&mut settings.moves);
    kill_cli_when(&settings, &["move-chat", chat, "--to", to], |line| {
        line.contains(phase)
    });
}

/// Asserts `chat` is whole on `db` with `members` members == rows.
async fn whole_with(db: &mut MySqlConnection, chat: &str, members: i64) {
    common::assert_chat_consistent(db, chat).await;
    assert_eq!(common::count_and_rows(db, chat).await, (members, members));
}

/// Waits for the instance to take the dead mover's move over and resume it
/// to its end; then the chat is whole on `target` (3,001 members == rows,
/// the last one joined after the move) and nothing is left on `home`.
async fn resumed_and_whole(app: &TestApp, chat: &str, home: usize, target: usize) {
    let ended = ended_move_of(app, chat).await;
    assert_eq!(ended["phase"], "done", "{ended}");
    assert_eq!(app.join(chat, "after").await.status(), StatusCode::CREATED);
    assert_eq!(app.shard_of(chat).await, target);
    let mut new = app.db(target).await;
    whole_with(&mut new, chat, 3001).await;
    let mut old = app.db(home).await;
    let driver: u32 = sqlx::query_scalar(
        "SELECT driver FROM chat_move WHERE chat_id = ? ORDER BY id DESC LIMIT 1",
    )
    .bind(chat)
    .fetch_one(&mut old)
    .await
    .expect("move record");
    assert!(driver >= 1, "taken over");
    let left = member_rows(&mut old, chat).await;
    assert_eq!(left, 0, "the source is cleaned");
}

/// The instance that takes a dead mover's move over (a 1 s lease, fenced
/// writes held for `hold_writes_ms`), and a chat on it with 3,000 members:
/// enough revisions for a copy in small batches to take a while. The chat,
/// its shard and the next one.
async fn chat_for_a_killed_mover(
    prefix: &str,
    hold_writes_ms: u64,
) -> (TestApp, String, usize, usize) {
    let app = TestApp::spawn_with(|s| {
        s.admin.token = TOKEN.to_owned();
        s.moves.lease_ms = 1000;
        s.moves.fence_ms = 500;
        s.moves.hold_writes_ms = hold_writes_ms;
        s.join_throttle.enabled = false;
    })
    .await;
    let chat = crate::helpers::unique(prefix);
    let r = app
        .put_chat(&chat, Some(json!({"maxMembers": 100000})))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    fill(&app, &chat, 30, 100).await;
    let home = app.shard_of(&chat).await;
    let target = (home + 1) % app.settings.shards.len();
    (app, chat, home, target)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mover_process_killed_mid_copy_is_resumed_by_the_instance() {
    let (app, chat, home, target) = chat_for_a_killed_mover("killed", 800).await;
    let target_name = app.settings.shards[target].name.clone();
    kill_mover_in(&chat, &target_name, "copying", |m| {
        m.batch_revisions = 50;
        m.pause_ms = 20;
    });
    // Killed inside its copy: the chat takes writes at its source meanwhile.
    assert_eq!(
        app.join(&chat, "meanwhile").await.status(),
        StatusCode::CREATED
    );

    // The instance takes the abandoned move over and resumes the copy where
    // the target stands, to the end.
    let ended = ended_move_of(&app, &chat).await;
    assert_eq!(ended["phase"], "done", "{ended}");
    assert_eq!(app.shard_of(&chat).await, target);
    let mut new = app.db(target).await;
    whole_with(&mut new, &chat, 3001).await;
    // And it moves back home.
    let back = move_to_end(&app, &chat, &app.settings.shards[home].name).await;
    assert_eq!(back["phase"], "done", "{back}");
    let mut old = app.db(home).await;
    whole_with(&mut old, &chat, 3001).await;
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mover_process_killed_while_fenced_is_resumed_and_the_chat_ends_on_its_target() {
    // A fenced write is answered at once.
    let (app, chat, home, target) = chat_for_a_killed_mover("fencekill", 0).await;
    let target_name = app.settings.shards[target].name.clone();
    // The mover fences at once and copies the whole log under its fence in
    // small batches (a long fenced phase); the fence outlasts the copy.
    kill_mover_in(&chat, &target_name, "fenced", |m| {
        m.fence_lag = 1_000_000;
        m.batch_revisions = 10;
        m.fence_ms = 30_000;
        m.lease_ms = 60_000;
    });
    // Killed inside its fence: the chat's writes are refused, not lost.
    let r = app.join(&chat, "while-fenced").await;
    crate::helpers::assert_problem(r, 503, "chat_moving").await;

    // The instance takes the move over once its lease ran out (1 s), and
    // resumes it: the rest of the copy, its own fence, the switch.
    resumed_and_whole(&app, &chat, home, target).await;
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mover_process_killed_inside_its_switch_is_finished_by_the_instance() {
    let (app, chat, home, first) = chat_for_a_killed_mover("switchkill", 800).await;
    // The chat lives on a shard that is not its home: a move from there has
    // a third switch step, the marker at its home.
    let moved = move_to_end(&app, &chat, &app.settings.shards[first].name).await;
    assert_eq!(moved["phase"], "done", "{moved}");
    let target = (0..app.settings.shards.len())
        .find(|i| *i != home && *i != first)
        .expect("a third shard");
    let target_name = app.settings.shards[target].name.clone();
    // The home's chat row held locked from outside: the switch's last step
    // waits on it, so the mover is killed inside its switch, with the
    // tombstone at the source and the target live.
    let mut at_home = app.db(home).await;
    let mut lock = at_home.begin().await.expect("tx");
    sqlx::query("SELECT moved_to FROM chat WHERE chat_id = ? FOR UPDATE")
        .bind(&chat)
        .fetch_one(&mut *lock)
        .await
        .expect("lock the home row");
    kill_mover_in(&chat, &target_name, "switching", |_| {});
    // Meanwhile the chat is read and written where it now is: its old shard's
    // tombstone leads there.
    assert_eq!(
        app.join(&chat, "inside-the-switch").await.status(),
        StatusCode::CREATED
    );
    lock.rollback().await.expect("release");
    // The instance takes the move over after its lease and finishes the
    // switch (the home's marker) and the clean-up.
    let ended = ended_move_of(&app, &chat).await;
    assert_eq!(ended["phase"], "done", "{ended}");
    assert_eq!(ended["target"], json!(target_name), "{ended}");
    let marker: Option<String> = sqlx::query_scalar("SELECT moved_to FROM chat WHERE chat_id = ?")
        .bind(&chat)
        .fetch_one(&mut at_home)
        .await
        .expect("home row");
    assert_eq!(marker.as_deref(), Some(target_name.as_str()));
    assert_eq!(app.shard_of(&chat).await, target);
    let mut new = app.db(target).await;
    whole_with(&mut new, &chat, 3001).await;
    let mut old = app.db(first).await;
    let left = member_rows(&mut old, &chat).await;
    assert_eq!(left, 0, "the source is cleaned");
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_whose_last_step_fails_is_retried_to_the_end_not_rolled_back() {
    // A write stuck behind a row lock gives up after 1 s (error 1205).
    let app = TestApp::spawn_with(|s| {
        s.admin.token = TOKEN.to_owned();
        s.pool.lock_wait_timeout_secs = 1;
        s.pool.operation_timeout_ms = 3000;
    })
    .await;
    let chat = app.new_chat("switchretry").await;
    for i in 0..5 {
        assert_eq!(
            app.join(&chat, &format!("u{i}")).await.status(),
            StatusCode::CREATED
        );
    }
    let home = app.shard_of(&chat).await;
    let first = (home + 1) % app.settings.shards.len();
    let target = (home + 2) % app.settings.shards.len();
    let moved = move_to_end(&app, &chat, &app.settings.shards[first].name).await;
    assert_eq!(moved["phase"], "done", "{moved}");
    // The home's row locked from outside: the switch's last step (the
    // home's marker) fails, after its first two went in.
    let mut at_home = app.db(home).await;
    let mut lock = at_home.begin().await.expect("tx");
    sqlx::query("SELECT moved_to FROM chat WHERE chat_id = ? FOR UPDATE")
        .bind(&chat)
        .fetch_one(&mut *lock)
        .await
        .expect("lock the home row");
    let home_label = format!("shard=\"{}\"", app.settings.shards[home].name);
    let contended = || async {
        common::sum_where(
            &common::metric_samples(&app.http, &app.base, "chatshard_shard_operations_total").await,
            &[&home_label, "outcome=\"chat_contended\""],
        )
    };
    let r = request_move(&app, &chat, &app.settings.shards[target].name).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let id = r.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    common::eventually(
        Duration::from_secs(20),
        "the home's marker refused",
        || async { contended().await >= 1.0 },
    )
    .await;
    lock.rollback().await.expect("release");
    // Retried until done: the chat's only live copy is not dropped.
    let ended = wait_move(&app, &id).await;
    assert_eq!(ended["phase"], "done", "{ended}");
    let marker: Option<String> = sqlx::query_scalar("SELECT moved_to FROM chat WHERE chat_id = ?")
        .bind(&chat)
        .fetch_one(&mut at_home)
        .await
        .expect("home row");
    assert_eq!(marker, Some(app.settings.shards[target].name.clone()));
    assert_eq!(app.join(&chat, "after").await.status(), StatusCode::CREATED);
    let mut new = app.db(target).await;
    whole_with(&mut new, &chat, 6).await;
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mover_process_killed_while_cleaning_is_finished_by_the_instance() {
    let (app, chat, home, target) = chat_for_a_killed_mover("cleankill", 800).await;
    let target_name = app.settings.shards[target].name.clone();
    // The clean-up of the source in small, paced deletes (seconds for the
    // 3,000 members and their events), so the kill lands inside it.
    kill_mover_in(&chat, &target_name, "cleaning", |m| {
        m.clean_batch = 10;
        m.pause_ms = 20;
        m.max_p99_ratio = 0.0;
    });
    // Killed inside the clean-up (the takeover waits for the 1 s lease).
    let mut old = app.db(home).await;
    let behind: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM chat_event WHERE chat_id = ?")
        .bind(&chat)
        .fetch_one(&mut old)
        .await
        .expect("source");
    assert!(behind > 0, "the clean-up had ended before the kill");
    // Switched before it died: the chat already lives on the target.
    assert_eq!(app.join(&chat, "after").await.status(), StatusCode::CREATED);
    assert_eq!(app.shard_of(&chat).await, target);
    // The instance takes the move over after its lease and finishes it.
    let ended = ended_move_of(&app, &chat).await;
    assert_eq!(ended["phase"], "done", "{ended}");
    let mut new = app.db(target).await;
    whole_with(&mut new, &chat, 3001).await;
    for table in ["chat_member", "chat_message", "chat_event"] {
        let left: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM {table} WHERE chat_id = ?"
        )))
        .bind(&chat)
        .fetch_one(&mut old)
        .await
        .expect("source");
        assert_eq!(left, 0, "{table} is cleaned at the source");
    }
    let marker: Option<String> = sqlx::query_scalar("SELECT moved_to FROM chat WHERE chat_id = ?")
        .bind(&chat)
        .fetch_one(&mut old)
        .await
        .expect("tombstone");
    assert_eq!(marker, Some(target_name));
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_cancelled_before_its_switch_rolls_back_and_the_chat_stays_whole() {
    let app = std::sync::Arc::new(
        TestApp::spawn_with(|s| {
            s.admin.token = TOKEN.to_owned();
            // A slow copy: 20 revisions per batch, 50 ms apart, paced
            // until it is within 10 revisions (the default 500 would fence
            // after one batch, and copy the rest under the fence unpaced).
            s.moves.batch_revisions = 20;
            s.moves.pause_ms = 50;
            s.moves.fence_lag = 10;
            s.join_throttle.enabled = false;
        })
        .await,
    );
    let chat = crate::helpers::unique("cancel");
    let r = app
        .put_chat(&chat, Some(json!({"maxMembers": 100000})))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    fill(&app, &chat, 10, 50).await;
    let home = app.shard_of(&chat).await;
    let target = (home + 1) % app.settings.shards.len();
    let target_name = app.settings.shards[target].name.clone();
    // Writes go on throughout.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writes = tokio::spawn(writer(app.clone(), chat.clone(), "cw", stop.clone()));
    let r = request_move(&app, &chat, &target_name).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let id = r.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    // A second move of the same chat is refused while this one runs.
    let again = request_move(&app, &chat, &target_name).await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    // Cancelled once some of the log is on the target.
    common::eventually(
        std::time::Duration::from_secs(30),
        "the copy is under way",
        || {
            let app = app.clone();
            let (id, chat) = (id.clone(), chat.clone());
            async move {
                let m = app.admin_get(&format!("/v1/admin/moves/{id}")).await;
                let ended = ["done", "rolled_back", "cancelled"];
                assert!(
                    !ended.iter().any(|p| m["phase"] == *p),
                    "the move ended before its copy was seen: {m}"
                );
                let copied = m["copiedRevision"].as_u64().unwrap_or(0);
                if m["phase"] != "copying" || copied == 0 {
                    return false;
                }
                // A running move shows how far its target is behind.
                let lag = m["lagRevisions"].as_u64().expect("lagRevisions");
                let now = app.chat_body(&chat).await["revision"]
                    .as_u64()
                    .expect("revision");
                assert!(copied + lag <= now, "{m} (the source at {now})");
                // Each copied revision wrote its event and at least one row.
                assert!(m["rowsCopied"].as_u64() >= Some(2 * copied), "{m}");
                true
            }
        },
    )
    .await;
    let r = app
        .admin(reqwest::Method::DELETE, &format!("/v1/admin/moves/{id}"))
        .send()
        .await
        .expect("cancel");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let asked: Value = r.json().await.expect("json");
    assert_eq!(asked["cancelRequested"], true, "{asked}");
    let ended = wait_move(&app, &id).await;
    assert_eq!(ended["phase"], "cancelled", "{ended}");
    assert!(ended.get("lagRevisions").is_none(), "{ended}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (joined, posted, _) = writes.await.expect("writer");
    assert!(!joined.is_empty() && !posted.is_empty());
    // The chat never left its source: every write is there once, and the
    // target keeps nothing of the copy.
    assert_eq!(app.shard_of(&chat).await, home);
    let mut old = app.db(home).await;
    common::assert_chat_consistent(&mut old, &chat).await;
    let members = 500 + joined.len() as i64;
    assert_eq!(
        common::count_and_rows(&mut old, &chat).await,
        (members, members)
    );
    let messages: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM chat_message WHERE chat_id = ?")
        .bind(&chat)
        .fetch_one(&mut old)
        .await
        .expect("messages");
    assert_eq!(messages, posted.len() as i64);
    let mut new = app.db(target).await;
    let rows: i64 = sqlx::query_scalar(
        "SELECT (SELECT COUNT(*) FROM chat WHERE chat_id = ?) + (SELECT COUNT(*) FROM chat_member WHERE chat_id = ?) \
         + (SELECT COUNT(*) FROM chat_event WHERE chat_id = ?) + (SELECT COUNT(*) FROM chat_message WHERE chat_id = ?)",
    )
    .bind(&chat)
    .bind(&chat)
    .bind(&chat)
    .bind(&chat)
    .fetch_one(&mut new)
    .await
    .expect("target rows");
    assert_eq!(rows, 0, "the copy was dropped");
    // An ended move cannot be cancelled; an unknown one is not found.
    for (path, status, code) in [
        (
            format!("/v1/admin/moves/{id}"),
            StatusCode::CONFLICT,
            "move_refused",
        ),
        (
            format!("/v1/admin/moves/{}:999999", app.settings.shards[home].name),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "/v1/admin/moves/nowhere:1".to_owned(),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ] {
        let r = app
            .admin(reqwest::Method::DELETE, &path)
            .send()
            .await
            .expect("cancel");
        assert_eq!(r.status(), status, "{path}");
        let body: Value = r.json().await.expect("problem");
        assert_eq!(body["code"], code, "{path}: {body}");
    }
    // The chat can then move to the end, and that move cannot be cancelled.
    let moved = move_to_end(&app, &chat, &target_name).await;
    assert_eq!(moved["phase"], "done", "{moved}");
    let r = app
        .admin(
            reqwest::Method::DELETE,
            &format!("/v1/admin/moves/{}", moved["id"].as_str().expect("id")),
        )
        .send()
        .await
        .expect("cancel");
    assert_eq!(r.status(), StatusCode::CONFLICT);
    common::assert_chat_consistent(&mut new, &chat).await;
    assert_eq!(
        common::count_and_rows(&mut new, &chat).await,
        (members, members)
    );
    if let Ok(app) = std::sync::Arc::try_unwrap(app) {
        app.shut_down().await;
    }
}

/// Joins `batches` × `per` members (`m<batch>-<i>`), `per` at a time.
async fn fill(app: &TestApp, chat: &str, batches: usize, per: usize) {
    for batch in 0..batches {
        let joins = (0..per)
            .map(|i| async move { app.join(chat, &format!("m{batch}-{i}")).await.status() });
        let statuses = futures::future::join_all(joins).await;
        assert!(
            statuses.iter().all(|s| *s == StatusCode::CREATED),
            "{statuses:?}"
        );
    }
}

/// Patches the live config through the admin API; asserts it was taken.
async fn patch_live(app: &TestApp, patch: Value) {
    let r = app
        .admin(Method::PATCH, "/v1/admin/config")
        .header("content-type", "application/merge-patch+json")
        .body(patch.to_string())
        .send()
        .await
        .expect("patch");
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "{}",
        r.text().await.unwrap_or_default()
    );
}

/// The moves of `chat` the admin view lists.
async fn moves_of(app: &TestApp, chat: &str) -> Vec<Value> {
    let all = app.admin_get("/v1/admin/moves").await;
    all["moves"]
        .as_array()
        .expect("moves")
        .iter()
        .filter(|m| m["chatId"] == chat)
        .cloned()
        .collect()
}

async fn decision(app: &TestApp, name: &str) -> u64 {
    app.admin_get("/v1/admin/hot-chats").await["decisions"][name]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_that_stays_hot_is_isolated_and_a_dry_run_only_counts_it() {
    let app = TestApp::spawn_with(|s| {
        s.admin.token = TOKEN.to_owned();
        s.join_throttle.enabled = false;
    })
    .await;
    // Two chats of one shard; the isolation shard is the next one.
    let hot = crate::helpers::unique("isolated");
    app.put_chat(&hot, None).await;
    let home = app.shard_of(&hot).await;
    let second = loop {
        let c = crate::helpers::unique("isolated");
        app.put_chat(&c, None).await;
        if app.shard_of(&c).await == home {
            break c;
        }
    };
    let target = (home + 1) % app.settings.shards.len();
    let target_name = app.settings.shards[target].name.clone();
    // Bad input: an unknown shard is refused, the config stays.
    let r = app
        .admin(Method::PATCH, "/v1/admin/config")
        .header("content-type", "application/merge-patch+json")
        .body(json!({"isolation": {"enabled": true, "shard": "nowhere"}}).to_string())
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = r.json().await.expect("problem");
    assert_eq!(problem["code"], "invalid_config", "{problem}");
    // Hot after 20 events in 10 s, for a minute; isolated after 1 s hot, one
    // move per source shard per hour; first as a dry run.
    let rule = json!({"threshold": 20, "durationSeconds": 10, "expireSeconds": 60});
    patch_live(
        &app,
        json!({
            "hotChat": {"overrides": {&hot: rule.clone(), &second: rule}},
            "isolation": {"enabled": true, "dryRun": true, "shard": &target_name,
                          "afterSeconds": 1, "movesPerHour": 1},
        }),
    )
    .await;
    fill(&app, &hot, 1, 30).await;
    common::eventually(
        Duration::from_secs(20),
        "the dry run counts the chat",
        || {
            let app = &app;
            async move { decision(app, "chatsIsolatedDryRun").await >= 1 }
        },
    )
    .await;
    assert_eq!(app.shard_of(&hot).await, home, "a dry run moves nothing");
    assert!(moves_of(&app, &hot).await.is_empty());
    // For real: the chat moves, recorded as the isolation's move.
    patch_live(&app, json!({"isolation": {"dryRun": false}})).await;
    common::eventually(Duration::from_secs(60), "the hot chat is isolated", || {
        let app = &app;
        let hot = &hot;
        async move {
            moves_of(app, hot)
                .await
                .first()
                .is_some_and(|m| m["phase"] == "done")
        }
    })
    .await;
    let moved = moves_of(&app, &hot).await;
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(moved[0]["startedBy"], "isolation");
    assert_eq!(moved[0]["target"], target_name.as_str());
    assert_eq!(app.shard_of(&hot).await, target);
    assert!(decision(&app, "chatsIsolated").await >= 1);
    let mut new = app.db(target).await;
    assert_eq!(common::count_and_rows(&mut new, &hot).await, (30, 30));
    common::assert_chat_consistent(&mut new, &hot).await;
    // A second hot chat of the same shard waits: its hourly budget is spent.
    let deferred = decision(&app, "isolationsDeferred").await;
    fill(&app, &second, 1, 30).await;
    common::eventually(
        Duration::from_secs(20),
        "the second isolation waits",
        || {
            let app = &app;
            async move { decision(app, "isolationsDeferred").await > deferred + 1 }
        },
    )
    .await;
    assert_eq!(app.shard_of(&second).await, home);
    assert!(moves_of(&app, &second).await.is_empty());
    // The chat keeps working where it is isolated.
    assert_eq!(app.join(&hot, "after").await.status(), StatusCode::CREATED);
    patch_live(&app, json!({"isolation": {"enabled": false}})).await;
}

/// Chat ids of this test process whose bucket is within `first..=last`, `n`
/// of them.
fn chats_in_buckets(prefix: &str, first: u16, last: u16, n: usize) -> Vec<String> {
    let mut found = Vec::new();
    let mut i = 0;
    while found.len() < n {
        let id = crate::helpers::unique(&format!("{prefix}{i}"));
        let bucket = chatshard::routing::bucket_of(&chatshard::domain::ChatId::parse(&id).unwrap());
        if (first..=last).contains(&bucket) {
            found.push(id);
        }
        i += 1;
    }
    found
}

/// `n` chats of buckets 256-511, made and filled with `batches` of `per`
/// joins each.
async fn range_chats(
    app: &TestApp,
    prefix: &str,
    n: usize,
    (batches, per): (usize, usize),
) -> Vec<String> {
    let chats = chats_in_buckets(prefix, 256, 511, n);
    for chat in &chats {
        assert!(app.put_chat(chat, None).await.status().is_success());
        fill(app, chat, batches, per).await;
    }
    chats
}

/// Shards of a test's own (the bucket table they store is the test's),
/// three of them: the first owns `0-511`, the second `512-1023`, the third
/// nothing yet.
async fn range_settings(tag: &str) -> chatshard::config::Settings {
    let mut base = crate::helpers::isolated_settings(tag).await;
    base.shards[0].buckets = vec!["0-511".to_owned()];
    base.shards[1].buckets = vec!["512-1023".to_owned()];
    base.shards[2].buckets = vec![];
    base
}

/// Polls a bucket-range move until it is `done`, `failed` or `cancelled`.
async fn wait_bucket_move(app: &TestApp, id: u64) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let m = app.admin_get(&format!("/v1/admin/bucket-moves/{id}")).await;
        if m["phase"] == "done" || m["phase"] == "failed" || m["phase"] == "cancelled" {
            return m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the range move did not end: {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The row of a chat on one shard: (revision, moved_to, JOINED rows).
async fn row_on(db: &mut MySqlConnection, chat: &str) -> Option<(u64, Option<String>, i64)> {
    let row: Option<(u64, Option<String>)> =
        sqlx::query_as("SELECT revision, moved_to FROM chat WHERE chat_id = ?")
            .bind(chat)
            .fetch_optional(&mut *db)
            .await
            .expect("chat row");
    let joined: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM chat_member WHERE chat_id = ? AND state = 1")
            .bind(chat)
            .fetch_one(&mut *db)
            .await
            .expect("members");
    row.map(|(r, m)| (r, m, joined))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_range_moves_to_a_new_shard_online_and_every_instance_follows() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    // Shards of their own: the bucket table they store is this test's.
    let base = range_settings("buckets").await;
    let names: Vec<String> = base.shards.iter().map(|s| s.name.clone()).collect();
    let (old, other, new) = (names[0].clone(), names[1].clone(), names[2].clone());
    let app = Arc::new(
        TestApp::spawn_on(base.clone(), |s| {
            s.admin.token = TOKEN.to_owned();
            s.moves.map_poll_ms = 200;
        })
        .await,
    );
    // An instance that routes by version 1 until a shard tells it otherwise.
    let stale = Arc::new(
        TestApp::spawn_on(base.clone(), |s| {
            s.admin.token = TOKEN.to_owned();
            s.moves.map_poll_ms = 60_000;
        })
        .await,
    );
    // And one that reads nothing until after the move: its first requests
    // meet the old shard's answers.
    let sleeper = TestApp::spawn_on(base.clone(), |s| {
        s.admin.token = TOKEN.to_owned();
        s.moves.map_poll_ms = 3_600_000;
    })
    .await;
    assert_eq!(app.admin_get("/v1/admin/buckets").await["version"], 1);

    // The range's chats, with members and messages; two of them are written
    // to throughout the move, one was moved to a third shard before.
    let moving = chats_in_buckets("bm", 256, 511, 10);
    let staying = chats_in_buckets("bs", 0, 255, 3);
    for chat in moving.iter().chain(&staying) {
        assert!(app.put_chat(chat, None).await.status().is_success());
        fill(&app, chat, 2, 10).await;
        assert_eq!(
            app.post(chat, "m0-0", "before", "before the move")
                .await
                .status(),
            StatusCode::CREATED
        );
    }
    let elsewhere = &moving[9];
    assert_eq!(move_to_end(&app, elsewhere, &other).await["phase"], "done");

    // Bad requests first.
    let post = |body: Value| {
        app.admin(Method::POST, "/v1/admin/bucket-moves")
            .json(&body)
            .send()
    };
    let r = post(json!({"buckets": "511-256", "to": new}))
        .await
        .unwrap();
    crate::helpers::assert_problem(r, 422, "invalid_request").await;
    let r = post(json!({"buckets": "256-511", "to": "no-such-shard"}))
        .await
        .unwrap();
    crate::helpers::assert_problem(r, 422, "unknown_shard").await;
    let r = post(json!({"buckets": "500-600", "to": new}))
        .await
        .unwrap();
    crate::helpers::assert_problem(r, 409, "move_refused").await;
    let r = post(json!({"buckets": "256-511", "to": old}))
        .await
        .unwrap();
    crate::helpers::assert_problem(r, 409, "move_refused").await;

    let stop = Arc::new(AtomicBool::new(false));
    let writers = [
        tokio::spawn(writer(app.clone(), moving[0].clone(), "wa", stop.clone())),
        tokio::spawn(writer(stale.clone(), moving[1].clone(), "wb", stop.clone())),
    ];
    // New chats of the range keep being created through the stale instance
    // (a fenced range answers 503 chat_moving: retried).
    let creator = {
        let (stale, stop) = (stale.clone(), stop.clone());
        tokio::spawn(async move {
            let mut created = Vec::new();
            let mut candidates = chats_in_buckets("bn", 256, 511, 400).into_iter();
            while !stop.load(Ordering::Relaxed) {
                let Some(chat) = candidates.next() else { break };
                loop {
                    let r = stale.put_chat(&chat, None).await;
                    match r.status().as_u16() {
                        200 | 201 => break,
                        503 => tokio::time::sleep(Duration::from_millis(20)).await,
                        other => panic!("PUT {chat}: {other}"),
                    }
                }
                created.push(chat);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            created
        })
    };
    let r = post(json!({"buckets": "256-511", "to": new}))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let started: Value = r.json().await.unwrap();
    assert_eq!(started["source"], old.as_str());
    // One range move at a time.
    let r = post(json!({"buckets": "300-301", "to": other}))
        .await
        .unwrap();
    crate::helpers::assert_problem(r, 409, "move_refused").await;
    let ended = wait_bucket_move(&app, started["id"].as_u64().unwrap()).await;
    stop.store(true, Ordering::Relaxed);
    assert_eq!(ended["phase"], "done", "{ended}");
    assert_eq!(ended["version"], 2, "{ended}");
    let mut acknowledged = Vec::new();
    for w in writers {
        acknowledged.push(w.await.unwrap());
    }
    let created = creator.await.unwrap();
    assert!(!created.is_empty());

    // The new table, on the mover and, after its first answer from a shard
    // that names the new owner, on the stale instance.
    let table = app.admin_get("/v1/admin/buckets").await;
    assert_eq!(table["version"], 2, "{table}");
    let owned = |shard: &str| {
        table["shards"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["shard"] == shard)
            .unwrap()["buckets"]
            .clone()
    };
    assert_eq!(owned(&old), json!(["0-255"]));
    assert_eq!(owned(&new), json!(["256-511"]));
    assert_eq!(sleeper.admin_get("/v1/admin/buckets").await["version"], 1);
    // Through the sleeper: a moved chat is found through its tombstone, and
    // a new chat of the range is created on the new shard, never the old.
    let got: Value = sleeper
        .get(&format!("/v1/chats/{}", moving[2]))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got["shard"], new.as_str(), "{got}");
    let late = chats_in_buckets("bl", 256, 511, 1).remove(0);
    assert_eq!(
        sleeper.put_chat(&late, None).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(sleeper.join(&late, "u").await.status(), StatusCode::CREATED);
    common::eventually(
        Duration::from_secs(10),
        "the sleeper follows version 2",
        || {
            let sleeper = &sleeper;
            async move { sleeper.admin_get("/v1/admin/buckets").await["version"] == 2 }
        },
    )
    .await;
    // A new instance follows the newest version from its first poll.
    let fresh = TestApp::spawn_on(base.clone(), |s| {
        s.admin.token = TOKEN.to_owned();
        s.moves.map_poll_ms = 100;
    })
    .await;
    common::eventually(
        Duration::from_secs(10),
        "a new instance follows version 2",
        || {
            let fresh = &fresh;
            async move { fresh.admin_get("/v1/admin/buckets").await["version"] == 2 }
        },
    )
    .await;

    // Every chat of the range is whole on the new shard; the old one holds
    // only tombstones; nothing of the writers' is lost.
    let (mut old_db, mut new_db) = (app.db(0).await, app.db(2).await);
    for chat in moving[..9].iter().chain(&created).chain([&late]) {
        assert_eq!(
            fresh
                .get(&format!("/v1/chats/{chat}"))
                .await
                .json::<Value>()
                .await
                .unwrap()["shard"],
            new.as_str(),
            "{chat}"
        );
        let (_, marker, _) = row_on(&mut new_db, chat).await.expect("on the new shard");
        assert_eq!(marker, None, "{chat} is live on the new shard");
        common::assert_chat_consistent(&mut new_db, chat).await;
        match row_on(&mut old_db, chat).await {
            None => {}
            Some((_, marker, joined)) => {
                assert_eq!(marker.as_deref(), Some(new.as_str()), "{chat}");
                assert_eq!(joined, 0, "{chat}'s rows are cleaned from the old shard");
            }
        }
    }
    for (i, (joined, posted, _)) in acknowledged.iter().enumerate() {
        let members = common::joined_users(&mut new_db, &moving[i]).await;
        for user in joined {
            assert!(members.contains(user), "{user} of {} lost", moving[i]);
        }
        let messages: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM chat_message WHERE chat_id = ?")
                .bind(&moving[i])
                .fetch_one(&mut new_db)
                .await
                .unwrap();
        assert_eq!(messages as usize, posted.len() + 1, "{}", moving[i]);
    }
    // The chat that lived on a third shard is found from its new home.
    let (_, marker, _) = row_on(&mut new_db, elsewhere).await.expect("a marker");
    assert_eq!(marker.as_deref(), Some(other.as_str()));
    let got: Value = fresh
        .get(&format!("/v1/chats/{elsewhere}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got["shard"], other.as_str());
    assert_eq!(got["memberCount"], 20);
    // The chats outside the range did not move.
    for chat in &staying {
        let (_, marker, joined) = row_on(&mut old_db, chat).await.expect("stays");
        assert_eq!((marker, joined), (None, 20), "{chat}");
    }
    // The list shows the move.
    let list = app.admin_get("/v1/admin/bucket-moves").await;
    assert_eq!(list["moves"][0]["id"], started["id"]);
    assert!(ended["chatsMoved"].as_u64().unwrap() >= 9, "{ended}");
    fresh.shut_down().await;
    sleeper.shut_down().await;
}

/// Waits for range move `id` to end `cancelled` with every chat back: the
/// table still at version 1, and each of `chats` (5 members) whole on the
/// first shard, taking a join there. The move.
async fn cancelled_and_back(app: &TestApp, id: u64, chats: &[String]) -> Value {
    let ended = wait_bucket_move(app, id).await;
    assert_eq!(ended["phase"], "cancelled", "{ended}");
    assert!(
        ended.get("error").is_none(),
        "every chat came back: {ended}"
    );
    assert_eq!(app.admin_get("/v1/admin/buckets").await["version"], 1);
    let mut db = app.db(0).await;
    for chat in chats {
        assert_eq!(app.shard_of(chat).await, 0, "{chat}");
        let (_, moved_to, joined) = row_on(&mut db, chat).await.expect("row on the source");
        assert_eq!((moved_to, joined), (None, 5), "{chat}");
        common::assert_chat_consistent(&mut db, chat).await;
        assert_eq!(app.join(chat, "after").await.status(), StatusCode::CREATED);
        assert_eq!(common::count_and_rows(&mut db, chat).await, (6, 6));
    }
    ended
}

/// A range move of `256-511` to the third shard, run by a `chatshard
/// move-buckets` process (slow chat moves, one at a time) that is SIGKILLed
/// once it moved `moved` chats; the instance that takes it over (1 s lease).
async fn range_move_killed_after(
    tag: &str,
    moved: u64,
    fill: (usize, usize),
) -> (TestApp, Vec<String>, String) {
    let base = range_settings(tag).await;
    let app = TestApp::spawn_on(base.clone(), |s| {
        s.admin.token = TOKEN.to_owned();
        s.moves.lease_ms = 1000;
        s.moves.fence_ms = 500;
        s.moves.map_poll_ms = 100;
    })
    .await;
    let chats = range_chats(&app, tag, 8, fill).await;
    let mut settings = base.clone();
    settings.moves.batch_revisions = 5;
    settings.moves.pause_ms = 30;
    settings.moves.concurrent_chats = 1;
    settings.moves.lease_ms = 1000;
    settings.moves.fence_ms = 500;
    let new = base.shards[2].name.clone();
    kill_cli_when(
        &settings,
        &["move-buckets", "256-511", "--to", &new],
        |line| {
            // "  copying (N of M chat(s) moved)", or "fenced (...", N at
            // least `moved`: the range move is under way.
            let line = line.trim_start();
            line.strip_prefix("copying (")
                .or_else(|| line.strip_prefix("fenced ("))
                .and_then(|rest| rest.split(' ').next())
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n >= moved)
        },
    );
    (app, chats, new)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_range_move_whose_mover_died_is_rolled_back_by_another_instance() {
    let (app, chats, _) = range_move_killed_after("bucketcancelkill", 2, (1, 5)).await;
    // The cancel reaches the dead mover's record; the instance that takes
    // the move over finds it and moves the chats back.
    let r = app
        .admin(Method::DELETE, "/v1/admin/bucket-moves/1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    cancelled_and_back(&app, 1, &chats).await;
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_move_buckets_process_is_taken_over_and_the_range_moves_to_the_end() {
    // Killed once it moved a chat of the range.
    let (app, chats, new) = range_move_killed_after("bucketkill", 1, (4, 10)).await;

    // The instance takes the range move over and runs it to its end.
    let ended = wait_bucket_move(&app, 1).await;
    assert_eq!(ended["phase"], "done", "{ended}");
    assert_eq!(app.admin_get("/v1/admin/buckets").await["version"], 2);
    let mut new_db = app.db(2).await;
    let mut old_db = app.db(0).await;
    for chat in &chats {
        assert_eq!(
            app.get(&format!("/v1/chats/{chat}"))
                .await
                .json::<Value>()
                .await
                .unwrap()["shard"],
            new.as_str()
        );
        common::assert_chat_consistent(&mut new_db, chat).await;
        assert_eq!(
            common::count_and_rows(&mut new_db, chat).await,
            (40, 40),
            "{chat}"
        );
        let (_, marker, joined) = row_on(&mut old_db, chat).await.expect("tombstone");
        assert_eq!(
            (marker.as_deref(), joined),
            (Some(new.as_str()), 0),
            "{chat}"
        );
    }
    // The chat move the kill cut short was rolled back, then moved again.
    let moves = app.admin_get("/v1/admin/moves").await;
    let phases: Vec<&str> = moves["moves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["phase"].as_str().unwrap())
        .collect();
    assert!(
        phases.iter().all(|p| *p == "done" || *p == "rolled_back"),
        "{phases:?}"
    );
    assert_eq!(
        phases.iter().filter(|p| **p == "done").count(),
        chats.len(),
        "{phases:?}"
    );
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_batches_that_meet_a_short_fence_are_held_and_applied_not_refused() {
    let app = TestApp::spawn().await;
    let chat = crate::helpers::unique("held");
    assert_eq!(
        app.put_chat(&chat, None).await.status(),
        StatusCode::CREATED
    );
    let mut db = app.db(app.shard_of(&chat).await).await;
    let fence = |ms: u64| {
        sqlx::query(
            "UPDATE chat SET fenced_until = DATE_ADD(NOW(6), INTERVAL ? MICROSECOND) WHERE chat_id = ?",
        )
        .bind(ms * 1000)
        .bind(chat.clone())
    };
    // A fence shorter than moves.hold_writes_ms (800): the join waits it out.
    fence(200).execute(&mut db).await.expect("fence");
    assert_eq!(app.join(&chat, "held").await.status(), StatusCode::CREATED);
    // A group-commit batch caught by a short fence: 30 joins at once, held
    // together, then applied, each once.
    fence(300).execute(&mut db).await.expect("fence");
    let users: Vec<String> = (0..30).map(|i| format!("batched-{i}")).collect();
    let joins = users.iter().map(|user| app.join(&chat, user));
    for r in futures_util::future::join_all(joins).await {
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    // With the hold off, a fence is answered at once, and nothing is applied:
    // a single write, and batches of writes (30 joins at once take fewer
    // shard operations than 30).
    let off = TestApp::spawn_with(|s| s.moves.hold_writes_ms = 0).await;
    let shard = format!(
        "shard=\"{}\"",
        app.settings.shards[app.shard_of(&chat).await].name
    );
    let operations = || async {
        common::sum_where(
            &common::metric_samples(&off.http, &off.base, "chatshard_shard_operations_total").await,
            &[&shard],
        )
    };
    fence(60_000).execute(&mut db).await.expect("fence");
    let r = off.join(&chat, "refused").await;
    crate::helpers::assert_problem(r, 503, "chat_moving").await;
    let before = operations().await;
    let users: Vec<String> = (0..30).map(|i| format!("refused-{i}")).collect();
    let joins = users.iter().map(|user| off.join(&chat, user));
    for r in futures_util::future::join_all(joins).await {
        crate::helpers::assert_problem(r, 503, "chat_moving").await;
    }
    let batches = operations().await - before;
    println!("30 fenced joins took {batches} shard operations");
    assert!(batches < 30.0, "{batches} operations for 30 joins");
    sqlx::query("UPDATE chat SET fenced_until = NULL WHERE chat_id = ?")
        .bind(&chat)
        .execute(&mut db)
        .await
        .expect("unfence");
    let mut expected: Vec<String> = (0..30).map(|i| format!("batched-{i}")).collect();
    expected.push("held".to_owned());
    expected.sort();
    let mut joined = common::joined_users(&mut db, &chat).await;
    joined.sort();
    assert_eq!(joined, expected);
    whole_with(&mut db, &chat, 31).await;
    off.shut_down().await;
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_move_cancelled_midway_moves_its_chats_back_and_the_table_stays() {
    let base = range_settings("bucketcancel").await;
    let new = base.shards[2].name.clone();
    // One chat at a time, a third of a second apart: the cancel lands
    // with some of the range's chats moved and most not.
    let app = TestApp::spawn_on(base, |s| {
        s.admin.token = TOKEN.to_owned();
        s.moves.map_poll_ms = 200;
        s.moves.concurrent_chats = 1;
        s.moves.pause_ms = 300;
    })
    .await;
    let chats = range_chats(&app, "bc", 12, (1, 5)).await;
    let start = || async {
        let r = app
            .admin(Method::POST, "/v1/admin/bucket-moves")
            .json(&json!({"buckets": "256-511", "to": new}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        r.json::<Value>().await.unwrap()["id"].as_u64().expect("id")
    };
    let id = start().await;
    let path = format!("/v1/admin/bucket-moves/{id}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let m = app.admin_get(&path).await;
        if m["chatsMoved"].as_u64() >= Some(2) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no chat moved: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = app.admin(Method::DELETE, &path).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let asked: Value = r.json().await.unwrap();
    assert_eq!(asked["cancelRequested"], true, "{asked}");
    // Asking again while it winds down is answered the same.
    let again = app.admin(Method::DELETE, &path).send().await.unwrap();
    assert!(
        again.status() == StatusCode::ACCEPTED || again.status() == StatusCode::CONFLICT,
        "{}",
        again.status()
    );

    let ended = cancelled_and_back(&app, id, &chats).await;
    assert!(ended["chatsMoved"].as_u64() < Some(12), "{ended}");
    // An ended move cannot be cancelled; an unknown one is not found.
    let r = app.admin(Method::DELETE, &path).send().await.unwrap();
    crate::helpers::assert_problem(r, 409, "move_refused").await;
    let r = app
        .admin(Method::DELETE, "/v1/admin/bucket-moves/987654321")
        .send()
        .await
        .unwrap();
    crate::helpers::assert_problem(r, 404, "not_found").await;
    // And the range can move again, to the end this time.
    let done = wait_bucket_move(&app, start().await).await;
    assert_eq!(done["phase"], "done", "{done}");
    assert_eq!(app.shard_of(&chats[0]).await, 2);
    app.shut_down().await;
}
