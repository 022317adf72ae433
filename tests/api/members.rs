use std::collections::HashSet;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem, unique};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_leave_rejoin_with_counts_and_events() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("members").await;

    let r = app.join(&chat, "alice").await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let first: Value = r.json().await.unwrap();
    assert_eq!(first["state"], "JOINED");
    assert_eq!(first["userId"], "alice");
    let member_id = first["memberId"].as_u64().unwrap();

    // Joining again changes nothing.
    let r = app.join(&chat, "alice").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), first);
    assert_eq!(app.count(&chat).await, 1);

    let r = app.get(&format!("/v1/chats/{chat}/members/alice")).await;
    assert_eq!(r.json::<Value>().await.unwrap(), first);

    assert_eq!(
        app.leave(&chat, "alice").await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.leave(&chat, "alice").await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.count(&chat).await, 0);
    let r = app.get(&format!("/v1/chats/{chat}/members/alice")).await;
    assert_eq!(r.json::<Value>().await.unwrap()["state"], "LEFT");

    // Re-joining is a new join (201) of the same membership.
    let r = app.join(&chat, "alice").await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        r.json::<Value>().await.unwrap()["memberId"].as_u64(),
        Some(member_id)
    );
    assert_eq!(app.count(&chat).await, 1);

    assert_problem(app.leave(&chat, "bob").await, 404, "member_not_found").await;
    assert_problem(
        app.get(&format!("/v1/chats/{chat}/members/bob")).await,
        404,
        "member_not_found",
    )
    .await;

    let events = app.all_events(&chat).await;
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["MEMBER_JOINED", "MEMBER_LEFT", "MEMBER_JOINED"]);
    let revs: Vec<u64> = events
        .iter()
        .map(|e| e["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(revs, [1, 2, 3]);
    assert!(
        events
            .iter()
            .all(|e| e["userId"] == "alice" && e.get("text").is_none())
    );
    let chat_body: Value = app
        .get(&format!("/v1/chats/{chat}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(chat_body["revision"], 3);
    assert_eq!(chat_body["memberCount"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_members_is_enforced() {
    let app = TestApp::spawn().await;
    let chat = unique("full");
    app.put_chat(&chat, Some(json!({ "maxMembers": 2 }))).await;
    assert_eq!(app.join(&chat, "a").await.status(), StatusCode::CREATED);
    assert_eq!(app.join(&chat, "b").await.status(), StatusCode::CREATED);
    let body = assert_problem(app.join(&chat, "c").await, 409, "chat_full").await;
    assert!(body["detail"].as_str().unwrap().contains('2'));
    // An existing member joining again is not refused.
    assert_eq!(app.join(&chat, "a").await.status(), StatusCode::OK);
    app.leave(&chat, "a").await;
    assert_eq!(app.join(&chat, "c").await.status(), StatusCode::CREATED);
    assert_eq!(app.count(&chat).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_lists_each_joined_member_once_while_others_join() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("paging").await;
    let mut expected = HashSet::new();
    for i in 0..25 {
        let user = format!("u{i:02}");
        app.join(&chat, &user).await;
        expected.insert(user);
    }
    app.leave(&chat, "u03").await;
    expected.remove("u03");

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut extra = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/chats/{chat}/members?limit=7&after={c}"),
            None => format!("/v1/chats/{chat}/members?limit=7"),
        };
        let page: Value = app.get(&path).await.json().await.unwrap();
        for m in page["members"].as_array().unwrap() {
            assert_eq!(m["state"], "JOINED");
            seen.push(m["userId"].as_str().unwrap().to_owned());
        }
        // Others join between pages.
        app.join(&chat, &format!("late{extra}")).await;
        extra += 1;
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let unique_seen: HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique_seen.len(), seen.len(), "a member appeared twice");
    assert!(
        expected.is_subset(&unique_seen),
        "a member joined all along was missed"
    );
    assert!(!unique_seen.contains("u03"));
}
