use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem, unique};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_creates_then_returns_the_existing_chat() {
    let app = TestApp::spawn().await;
    let chat = unique("chat");
    let r = app
        .put_chat(&chat, Some(json!({ "maxMembers": 5000 })))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let created: Value = r.json().await.unwrap();
    assert_eq!(created["chatId"], chat.as_str());
    assert_eq!(created["maxMembers"], 5000);
    assert_eq!(created["memberCount"], 0);
    assert_eq!(created["revision"], 0);
    assert!(created["shard"].as_str().unwrap().starts_with("shard-"));
    assert!(created["createdAt"].as_str().unwrap().ends_with('Z'));

    let r = app.put_chat(&chat, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let again: Value = r.json().await.unwrap();
    assert_eq!(again, created);

    let r = app.get(&format!("/v1/chats/{chat}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_without_body_uses_the_default_and_put_with_max_updates_it() {
    let app = TestApp::spawn().await;
    let chat = unique("chat");
    let r = app.put_chat(&chat, None).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["maxMembers"], app.settings.defaults.max_members);

    let r = app.put_chat(&chat, Some(json!({ "maxMembers": 7 }))).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["maxMembers"], 7);
    let r = app.put_chat(&chat, Some(json!({}))).await;
    assert_eq!(r.json::<Value>().await.unwrap()["maxMembers"], 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_chats_are_404_on_every_route() {
    let app = TestApp::spawn().await;
    let chat = unique("nochat");
    for path in [
        format!("/v1/chats/{chat}"),
        format!("/v1/chats/{chat}/member-count"),
        format!("/v1/chats/{chat}/members"),
        format!("/v1/chats/{chat}/members/u1"),
        format!("/v1/chats/{chat}/events"),
    ] {
        assert_problem(app.get(&path).await, 404, "chat_not_found").await;
    }
    assert_problem(app.join(&chat, "u1").await, 404, "chat_not_found").await;
    assert_problem(app.leave(&chat, "u1").await, 404, "chat_not_found").await;
    assert_problem(
        app.post(&chat, "u1", "k1", "hi").await,
        404,
        "chat_not_found",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_openapi() {
    let app = TestApp::spawn().await;
    let r = app.get("/healthz").await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app.get("/readyz").await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    assert_eq!(
        body["shards"].as_array().unwrap().len(),
        crate::helpers::SHARDS
    );
    assert!(
        body["shards"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["ready"] == true)
    );

    let r = app.get("/openapi.json").await;
    assert_eq!(r.status(), StatusCode::OK);
    let doc: Value = r.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    for (path, methods) in [
        ("/v1/chats/{chatId}", &["put", "get"][..]),
        ("/v1/chats/{chatId}/member-count", &["get"]),
        ("/v1/chats/{chatId}/members", &["post", "get"]),
        ("/v1/chats/{chatId}/members/{userId}", &["get", "delete"]),
        ("/v1/chats/{chatId}/messages", &["post"]),
        ("/v1/chats/{chatId}/events", &["get"]),
        ("/healthz", &["get"]),
        ("/readyz", &["get"]),
    ] {
        for m in methods {
            assert!(
                paths[path][m].is_object(),
                "{m} {path} missing from OpenAPI"
            );
        }
    }
}
