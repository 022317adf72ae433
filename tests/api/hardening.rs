//! What outside testing found: bodies that are not objects, made-up methods
//! growing the metrics, a lower-case bearer scheme, and framework answers that
//! were not problem+json.

use reqwest::Method;
use serde_json::json;

use crate::common;
use crate::helpers::{TestApp, assert_problem};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_array_is_never_taken_for_an_object() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("strict").await;
    let send = |method: Method, path: String, body: &'static str| {
        app.http
            .request(method, app.url(&path))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let members = format!("/v1/chats/{chat}/members");
    let r = send(Method::POST, members.clone(), r#"["x"]"#)
        .await
        .unwrap();
    let body = assert_problem(r, 422, "invalid_request").await;
    assert_eq!(body["detail"], "the body must be an object");
    let r = send(Method::PUT, format!("/v1/chats/{chat}"), "[1]")
        .await
        .unwrap();
    assert_problem(r, 422, "invalid_request").await;
    let r = send(
        Method::POST,
        format!("/v1/chats/{chat}/messages"),
        r#"["a","b","c"]"#,
    )
    .await
    .unwrap();
    assert_problem(r, 422, "invalid_request").await;
    // Nothing was written: no member, the limit unchanged.
    assert_eq!(app.count(&chat).await, 0);
    let got: serde_json::Value = app
        .get(&format!("/v1/chats/{chat}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got["maxMembers"], app.settings.defaults.max_members);
    // An optional body may be absent, or empty even with a JSON content type.
    let r = send(Method::PUT, format!("/v1/chats/{chat}"), "")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_methods_do_not_grow_the_metrics() {
    let app = TestApp::spawn().await;
    for i in 0..50 {
        let method = Method::from_bytes(format!("ZZZ{i}").as_bytes()).unwrap();
        let r = app
            .http
            .request(method, app.url("/healthz"))
            .send()
            .await
            .unwrap();
        assert_problem(r, 405, "method_not_allowed").await;
    }
    let samples = common::metric_samples(
        &app.http,
        &app.base,
        "http_server_request_duration_seconds_count",
    )
    .await;
    assert!(
        samples.iter().all(|(labels, _)| !labels.contains("ZZZ")),
        "{samples:?}"
    );
    let other = common::sum_where(&samples, &["http_request_method=\"_OTHER\""]);
    assert_eq!(other, 50.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive() {
    let token = "hardening-tests-admin-token";
    let app = TestApp::spawn_with(|s| s.admin.token = token.to_owned()).await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let r = app
            .http
            .get(app.url("/v1/admin/shards"))
            .header("authorization", format!("{scheme} {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_targets_and_repeated_parameters_get_problem_answers() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("long").await;
    let long = format!("/v1/chats/{chat}/events?pad={}", "a".repeat(20_000));
    let body = assert_problem(app.get(&long).await, 414, "uri_too_long").await;
    assert!(body["detail"].as_str().unwrap().contains("8192"), "{body}");
    let r = app
        .get(&format!("/v1/chats/{chat}/events?after=1&after=2"))
        .await;
    let body = assert_problem(r, 422, "invalid_request").await;
    assert_eq!(
        body["detail"],
        "the query parameter `after` is given more than once"
    );
    let r = app.get(&format!("/v1/chats/{chat}/events?after=%ZZ")).await;
    assert_problem(r, 422, "invalid_request").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_config_array_bodies_never_reset_the_config() {
    let token = "hardening-tests-admin-token";
    let app = TestApp::spawn_with(|s| s.admin.token = token.to_owned()).await;
    let before = app.admin_get("/v1/admin/config").await;
    let r = app
        .admin(Method::PUT, "/v1/admin/config")
        .json(&json!([]))
        .send()
        .await
        .unwrap();
    assert_problem(r, 422, "invalid_config").await;
    assert_eq!(app.admin_get("/v1/admin/config").await, before);
}
