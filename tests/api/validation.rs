//! Bad input: always a 4xx problem+json, never a 500 and never a write.

use serde_json::json;

use crate::helpers::{TestApp, assert_problem};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ids_in_paths_and_bodies_are_422() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("val").await;
    let long = "x".repeat(65);
    for bad in [
        "a%20b",
        "a'b",
        "a%22b",
        "x%3BDROP%20TABLE%20chat",
        "%C3%A9",
        long.as_str(),
        "%27%20OR%201%3D1--",
    ] {
        assert_problem(
            app.get(&format!("/v1/chats/{bad}")).await,
            422,
            "invalid_request",
        )
        .await;
        assert_problem(app.put_chat(bad, None).await, 422, "invalid_request").await;
        assert_problem(
            app.get(&format!("/v1/chats/{chat}/members/{bad}")).await,
            422,
            "invalid_request",
        )
        .await;
    }
    for bad in [
        "a b",
        "a'b",
        "\"",
        "1; DROP TABLE chat_member",
        "é",
        "",
        long.as_str(),
    ] {
        assert_problem(app.join(&chat, bad).await, 422, "invalid_request").await;
        assert_problem(app.post(&chat, bad, "k", "t").await, 422, "invalid_request").await;
        assert_problem(app.post(&chat, "u", bad, "t").await, 422, "invalid_request").await;
    }
    assert_eq!(app.count(&chat).await, 0);
    assert!(app.all_events(&chat).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_length_is_checked_in_characters() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("text").await;
    app.join(&chat, "u").await;
    assert_problem(app.post(&chat, "u", "k1", "").await, 422, "invalid_request").await;
    assert_problem(
        app.post(&chat, "u", "k2", &"x".repeat(4001)).await,
        422,
        "invalid_request",
    )
    .await;
    assert_eq!(
        app.post(&chat, "u", "k3", &"é".repeat(4000)).await.status(),
        201
    );
    assert_eq!(app.all_events(&chat).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_and_media_types() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("body").await;
    let members = app.url(&format!("/v1/chats/{chat}/members"));
    let send = |body: &'static str, ct: Option<&'static str>| {
        let mut req = app.http.post(&members).body(body);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        req.send()
    };
    assert_problem(
        send("{\"userId\":", Some("application/json"))
            .await
            .unwrap(),
        400,
        "malformed_json",
    )
    .await;
    assert_problem(
        send("not json", Some("application/json")).await.unwrap(),
        400,
        "malformed_json",
    )
    .await;
    assert_problem(
        send("{\"userId\":\"u\"}", Some("text/plain"))
            .await
            .unwrap(),
        415,
        "unsupported_media_type",
    )
    .await;
    assert_problem(
        send("{\"userId\":\"u\"}", None).await.unwrap(),
        415,
        "unsupported_media_type",
    )
    .await;
    assert_problem(send("", None).await.unwrap(), 415, "unsupported_media_type").await;
    assert_problem(
        send("{\"userId\":5}", Some("application/json"))
            .await
            .unwrap(),
        422,
        "invalid_request",
    )
    .await;
    assert_problem(
        send("{}", Some("application/json")).await.unwrap(),
        422,
        "invalid_request",
    )
    .await;
    assert_problem(
        send("[]", Some("application/json")).await.unwrap(),
        422,
        "invalid_request",
    )
    .await;
    assert_problem(
        send(
            "{\"userId\":\"u\",\"admin\":true}",
            Some("application/json"),
        )
        .await
        .unwrap(),
        422,
        "invalid_request",
    )
    .await;

    let huge = format!("{{\"userId\":\"u\",\"pad\":\"{}\"}}", "x".repeat(70 * 1024));
    let r = app
        .http
        .post(&members)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_problem(r, 413, "payload_too_large").await;

    for body in [
        json!({"maxMembers": 0}),
        json!({"maxMembers": -1}),
        json!({"maxMembers": 100001}),
        json!({"maxMembers": "5"}),
        json!({"maxMembers": 1.5}),
        json!({"maxMembers": 1e30}),
    ] {
        assert_problem(
            app.put_chat(&chat, Some(body)).await,
            422,
            "invalid_request",
        )
        .await;
    }
    assert_eq!(app.count(&chat).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_paging_parameters_and_unknown_routes() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("paging-bad").await;
    for q in [
        "limit=0",
        "limit=-1",
        "limit=501",
        "limit=99999999999999999999",
        "limit=abc",
        "after=-1",
        "after=x",
        "after=1.5",
    ] {
        assert_problem(
            app.get(&format!("/v1/chats/{chat}/events?{q}")).await,
            422,
            "invalid_request",
        )
        .await;
        assert_problem(
            app.get(&format!("/v1/chats/{chat}/members?{q}")).await,
            422,
            "invalid_request",
        )
        .await;
    }
    assert_problem(app.get("/v1/nothing").await, 404, "not_found").await;
    assert_problem(app.get("/").await, 404, "not_found").await;
    let r = app
        .http
        .patch(app.url(&format!("/v1/chats/{chat}")))
        .send()
        .await
        .unwrap();
    assert_problem(r, 405, "method_not_allowed").await;
}
