//! A chat moves online, with nothing lost: under writes from two instances
//! (and back home), from a snapshot of its rows when its log was purged,
//! keeping its member and message ids (new ones only where the target's
//! rows already hold them), rolled back when the copy does not verify, and
//! followed by a stream on an instance that never wrote to it.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common;
use crate::helpers::{TestApp, assert_problem, isolated_settings, unique};
use crate::move_kit::{
    TOKEN, all_rows_of, drift_count, go_on_then_stop, home_and_next, join_each, left_rows,
    marker_of, member_by_id, member_rows, message_by_id, messages_of, move_to_end, moved_away,
    request_move, revision_of, squat_member_id, squat_message_id, start_writers, started_id,
    wait_move, whole_with,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_moves_online_under_writes_from_two_instances_with_nothing_lost() {
    use std::sync::Arc;
    // A, which drives the move, copies in batches of 10 revisions: the
    // chat's 70 and more take several transactions before the switch (under
    // the fence, which stops the writes, so the copy always catches up), and
    // the move is still running when it is asked for again.
    let a = Arc::new(
        TestApp::spawn_with(|s| {
            s.admin.token = TOKEN.to_owned();
            s.moves.batch_revisions = 10;
        })
        .await,
    );
    let b = Arc::new(TestApp::spawn_with(|s| s.admin.token = TOKEN.to_owned()).await);
    let chat = unique("moving");
    let r = a.put_chat(&chat, Some(json!({"maxMembers": 100000}))).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    join_each(&a, &chat, "early-", 50).await;
    let (home, target) = home_and_next(&a, &chat).await;
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
    let id = started_id(request_move(&a, &chat, &target_name).await).await;
    // A second move of the same chat is refused while it runs: its record
    // cannot be made beside the running one's.
    let again = request_move(&a, &chat, &target_name).await;
    let refused = assert_problem(again, 409, "move_refused").await;
    assert!(
        refused["detail"]
            .as_str()
            .is_some_and(|d| d.contains("has a move running")),
        "{refused}"
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
    assert_eq!(
        messages_of(&mut new, &chat).await as usize,
        pa.len() + pb.len()
    );
    assert_eq!(
        member_rows(&mut old, &chat).await,
        0,
        "the source's rows are cleaned"
    );
    assert_eq!(
        marker_of(&mut old, &chat).await.as_deref(),
        Some(target_name.as_str()),
        "the source's tombstone"
    );

    // The stream on B saw every revision once, in order, across the move.
    let revision = revision_of(&mut new, &chat).await;
    let mut seen = 0;
    while seen < revision {
        let event = stream
            .next(Duration::from_secs(10))
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
    assert_eq!(
        marker_of(&mut old, &chat).await,
        None,
        "home again: no marker"
    );
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
    let chat = unique("purgedmove");
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
    join_each(&a, &chat, "early-", 50).await;
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
    common::eventually(Duration::from_secs(20), "the purge", || async {
        let c: Value = a.chat_body(&chat).await;
        c["firstRevision"].as_u64().zip(c["revision"].as_u64()) == Some((66, 85))
    })
    .await;
    let (home, target) = home_and_next(&a, &chat).await;
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
    assert_eq!(
        left_rows(&mut new, &chat).await,
        5,
        "the members who left stay left"
    );
    assert_eq!(
        messages_of(&mut new, &chat).await as usize,
        30 + pa.len() + pb.len()
    );
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
    assert_eq!(
        member_rows(&mut old, &chat).await,
        0,
        "the source's rows are cleaned"
    );
    if let (Ok(a), Ok(b)) = (Arc::try_unwrap(a), Arc::try_unwrap(b)) {
        a.shut_down().await;
        b.shut_down().await;
    }
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
    squat_member_id(&mut db, before["u-3"], &squatter).await;
    squat_message_id(&mut db, sent[4], &squatter).await;

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
    assert_eq!(
        member_by_id(&mut db, before["u-3"]).await,
        (squatter.clone(), "squatter".to_owned())
    );
    assert_eq!(
        message_by_id(&mut db, sent[4]).await,
        (squatter, "mine".to_owned())
    );
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
    let replayed = unique("keepids");
    let purged = unique("keepidsp");
    let purging = purged.clone();
    // Fresh shards: no other test's rows hold ids in the way.
    let settings = isolated_settings("ids").await;
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
    join_each(&app, &chat, "u", 5).await;
    let (home, target) = home_and_next(&app, &chat).await;
    let mut old = app.db(home).await;
    // The source's count drifted from its rows behind chatshard's back: the
    // replayed copy cannot match it, and the move must not switch.
    drift_count(&mut old, &chat, 3).await;
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
    assert_eq!(
        all_rows_of(&mut new, &chat).await,
        0,
        "the copy was dropped"
    );
    // Unknown shards and moves to where the chat is are refused clearly.
    for (to, status, code) in [
        ("shard-nowhere", 422, "unknown_shard"),
        (app.settings.shards[home].name.as_str(), 409, "move_refused"),
    ] {
        let r = request_move(&app, &chat, to).await;
        assert_problem(r, status, code).await;
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
    let first = stream.next(Duration::from_secs(10)).await.expect("event 1");
    assert_eq!(first.id.as_deref(), Some("1"));
    let (_, target) = home_and_next(&a, &chat).await;
    let moved = move_to_end(&a, &chat, &a.settings.shards[target].name).await;
    assert_eq!(moved["phase"], "done", "{moved}");
    // Written through A on the new shard; B, which only reads, hears of it
    // through its tail refresher following the old shard's marker.
    assert_eq!(
        a.post(&chat, "u1", "k1", "on the new shard").await.status(),
        StatusCode::CREATED
    );
    let next = stream.next(Duration::from_secs(10)).await.expect("event 2");
    assert_eq!(next.id.as_deref(), Some("2"));
    assert!(next.data.contains("on the new shard"), "{}", next.data);
    drop(stream);
    a.shut_down().await;
    b.shut_down().await;
}
