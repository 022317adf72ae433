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
            status
        }
    });
    let statuses = join_all(ops).await;
    let (count, rows) = app.count_and_rows(&chat).await;
    assert_eq!(count, rows);
    // Every transition has an event, gapless: each 201 is a join that made a
    // member (200: one already); a leave of a member is an event, one of a
    // user who had left is a 204 without one.
    let events = app.all_events(&chat).await;
    let of_type = |t: &str| events.iter().filter(|e| e["type"] == t).count() as i64;
    let created = statuses
        .iter()
        .filter(|s| **s == StatusCode::CREATED)
        .count() as i64;
    assert_eq!(of_type("MEMBER_JOINED"), created, "a join event per 201");
    assert_eq!(
        of_type("MEMBER_JOINED") + of_type("MEMBER_LEFT"),
        events.len() as i64
    );
    assert_eq!(count, of_type("MEMBER_JOINED") - of_type("MEMBER_LEFT"));
    // Replaying the events gives the members, exactly those the API shows.
    let mut replayed: HashMap<String, bool> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["revision"].as_u64(), Some(i as u64 + 1));
        replayed.insert(
            e["userId"].as_str().unwrap().to_owned(),
            e["type"] == "MEMBER_JOINED",
        );
    }
    let mut members = Vec::new();
    for u in 0..20 {
        let user = format!("u{u}");
        let r = app.get(&format!("/v1/chats/{chat}/members/{user}")).await;
        match r.status() {
            StatusCode::OK => {
                let member: Value = r.json().await.expect("json");
                if member["state"] == "JOINED" {
                    members.push(user);
                }
            }
            StatusCode::NOT_FOUND => {}
            other => panic!("member {user}: {other}"),
        }
    }
    let mut from_events: Vec<String> = replayed
        .into_iter()
        .filter_map(|(user, joined)| joined.then_some(user))
        .collect();
    from_events.sort();
    members.sort();
    assert_eq!(from_events, members);
    assert_eq!(members.len() as i64, count);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_get_gapless_revisions_and_no_event_is_missed() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("c-msgs").await;
    for w in 0..20 {
        app.join(&chat, &format!("w{w}")).await;
    }
    // A reader polls with its last revision while the writers run, until it
    // has every revision (within 60 s).
    let reader = async {
        let mut last = 0u64;
        let mut seen = Vec::new();
        let all = async {
            while last < 520 {
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
        };
        if tokio::time::timeout(std::time::Duration::from_secs(60), all)
            .await
            .is_err()
        {
            panic!("the reader got to revision {last} of 520");
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
