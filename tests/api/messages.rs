use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{TestApp, assert_problem};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_is_idempotent_by_client_message_id() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("msg").await;
    assert_problem(
        app.post(&chat, "alice", "m1", "hello").await,
        403,
        "not_a_member",
    )
    .await;
    app.join(&chat, "alice").await;

    let r = app.post(&chat, "alice", "m1", "hello ✓").await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let msg: Value = r.json().await.unwrap();
    assert_eq!(msg["text"], "hello ✓");
    assert_eq!(msg["revision"], 2);
    assert_eq!(msg["senderId"], "alice");
    assert_eq!(msg["clientMessageId"], "m1");

    let r = app.post(&chat, "alice", "m1", "hello ✓").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), msg);
    assert_problem(
        app.post(&chat, "alice", "m1", "changed").await,
        422,
        "idempotency_key_reused",
    )
    .await;

    // Another sender may use the same key.
    app.join(&chat, "bob").await;
    assert_eq!(
        app.post(&chat, "bob", "m1", "hi").await.status(),
        StatusCode::CREATED
    );

    // A replay still answers after the sender left; a new message does not.
    app.leave(&chat, "alice").await;
    assert_eq!(
        app.post(&chat, "alice", "m1", "hello ✓").await.status(),
        StatusCode::OK
    );
    assert_problem(
        app.post(&chat, "alice", "m2", "new").await,
        403,
        "not_a_member",
    )
    .await;

    let events = app.all_events(&chat).await;
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "MEMBER_JOINED",
            "MESSAGE_SENT",
            "MEMBER_JOINED",
            "MESSAGE_SENT",
            "MEMBER_LEFT"
        ]
    );
    let sent = &events[1];
    assert_eq!(sent["messageId"], msg["messageId"]);
    assert_eq!(sent["text"], "hello ✓");
    assert_eq!(sent["createdAt"], msg["createdAt"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_page_with_after_and_limit() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("events").await;
    app.join(&chat, "u").await;
    for i in 0..9 {
        app.post(&chat, "u", &format!("k{i}"), &format!("t{i}"))
            .await;
    }
    let page: Value = app
        .get(&format!("/v1/chats/{chat}/events?after=3&limit=4"))
        .await
        .json()
        .await
        .unwrap();
    let revs: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(revs, [4, 5, 6, 7]);
    assert_eq!(page["latestRevision"], 10);
    let page: Value = app
        .get(&format!("/v1/chats/{chat}/events?after=10"))
        .await
        .json()
        .await
        .unwrap();
    assert!(page["events"].as_array().unwrap().is_empty());
    assert_eq!(page["latestRevision"], 10);
    let page: Value = app
        .get(&format!("/v1/chats/{chat}/events"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 10);
}
