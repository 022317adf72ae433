//! Consistency under concurrency, against real shards.

use std::collections::HashMap;

use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, unique};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_distinct_joins_are_all_counted() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("c-joins").await;
    let statuses = app.join_many(&chat, 200).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::CREATED),
        "{statuses:?}"
    );
    assert_eq!(app.count_and_rows(&chat).await, (200, 200));
    assert_eq!(app.count(&chat).await, 200);
    let events = app.all_events(&chat).await;
    let revs: Vec<u64> = events
        .iter()
        .map(|e| e["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(revs, (1..=200).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicate_joins_make_one_member() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("c-dup").await;
    let statuses = join_all((0..50).map(|_| app.join(&chat, "same-user"))).await;
    let created = statuses
        .iter()
        .filter(|r| r.status() == StatusCode::CREATED)
        .count();
    let ok = statuses
        .iter()
        .filter(|r| r.status() == StatusCode::OK)
        .count();
    assert_eq!((created, ok), (1, 49));
    assert_eq!(app.count_and_rows(&chat).await, (1, 1));
    let mut db = app.db(app.shard_of(&chat).await).await;
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM chat_member WHERE chat_id = ?")
        .bind(&chat)
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_leave_storm_keeps_count_equal_to_rows() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("c-storm").await;
    let ops = (0..300).map(|i| {
        let (app, chat) = (&app, &chat);
        async move {
            let user = format!("u{}", i % 20);
            let status = if i % 3 == 0 {
                app.leave(chat, &user).await.status()
            } else {
                app.join(chat, &user).await.status()
            };
            assert!(
                [
                    StatusCode::CREATED,
                    StatusCode::OK,
                    StatusCode::NO_CONTENT,
                    StatusCode::NOT_FOUND
                ]
                .contains(&status),
                "{status}"
            );
        }
    });
    join_all(ops).await;
    let (count, rows) = app.count_and_rows(&chat).await;
    assert_eq!(count, rows);
    assert!((0..=20).contains(&count));
    // Every transition has an event, gapless; replaying them gives the same set.
    let events = app.all_events(&chat).await;
    let mut joined: HashMap<String, bool> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["revision"].as_u64(), Some(i as u64 + 1));
        joined.insert(
            e["userId"].as_str().unwrap().to_owned(),
            e["type"] == "MEMBER_JOINED",
        );
    }
    assert_eq!(joined.values().filter(|j| **j).count() as i64, count);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_get_gapless_revisions_and_no_event_is_missed() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("c-msgs").await;
    for w in 0..20 {
        app.join(&chat, &format!("w{w}")).await;
    }
    // A reader polls with its last revision while the writers run.
    let reader = async {
        let mut last = 0u64;
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while last < 520 && std::time::Instant::now() < deadline {
            let page: Value = app
                .get(&format!("/v1/chats/{chat}/events?after={last}&limit=37"))
                .await
                .json()
                .await
                .unwrap();
            for e in page["events"].as_array().unwrap() {
                let rev = e["revision"].as_u64().unwrap();
                assert_eq!(rev, last + 1, "reader saw a gap");
                last = rev;
                seen.push(rev);
            }
        }
        seen
    };
    let writers = join_all((0..20).map(|w| {
        let (app, chat) = (&app, &chat);
        async move {
            for i in 0..25 {
                let r = app
                    .post(
                        chat,
                        &format!("w{w}"),
                        &format!("m{i}"),
                        &format!("w{w} says {i}"),
                    )
                    .await;
                assert_eq!(r.status(), StatusCode::CREATED);
            }
        }
    }));
    let (seen, _) = tokio::join!(reader, writers);
    assert_eq!(seen, (1..=520).collect::<Vec<_>>());
    let events = app.all_events(&chat).await;
    assert_eq!(events.len(), 520);
    let messages = events
        .iter()
        .filter(|e| e["type"] == "MESSAGE_SENT")
        .count();
    assert_eq!(messages, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_of_one_message_store_it_once() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("c-retry").await;
    app.join(&chat, "u").await;
    let answers = join_all((0..40).map(|_| app.post(&chat, "u", "the-key", "once"))).await;
    let mut ids = Vec::new();
    let mut created = 0;
    for r in answers {
        if r.status() == StatusCode::CREATED {
            created += 1;
        } else {
            assert_eq!(r.status(), StatusCode::OK);
        }
        ids.push(
            r.json::<Value>().await.unwrap()["messageId"]
                .as_u64()
                .unwrap(),
        );
    }
    assert_eq!(created, 1);
    ids.dedup();
    assert_eq!(ids.len(), 1);
    assert_eq!(app.all_events(&chat).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_members_holds_under_concurrent_joins() {
    let app = TestApp::spawn().await;
    let chat = unique("c-max");
    app.put_chat(&chat, Some(json!({ "maxMembers": 50 }))).await;
    let statuses = app.join_many(&chat, 200).await;
    let created = statuses
        .iter()
        .filter(|s| **s == StatusCode::CREATED)
        .count();
    let full = statuses
        .iter()
        .filter(|s| **s == StatusCode::CONFLICT)
        .count();
    assert_eq!((created, full), (50, 150));
    assert_eq!(app.count_and_rows(&chat).await, (50, 50));
}
