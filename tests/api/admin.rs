use serde_json::Value;

use crate::helpers::{SHARDS, TestApp, assert_problem};

const TOKEN: &str = "test-admin-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_is_off_without_a_token() {
    let app = TestApp::spawn().await;
    let r = app
        .http
        .get(app.url("/v1/admin/shards"))
        .bearer_auth("anything")
        .send()
        .await
        .unwrap();
    assert_problem(r, 403, "admin_disabled").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_shards_needs_the_token_and_shows_every_shard() {
    let app = TestApp::spawn_with(|s| s.admin.token = TOKEN.to_owned()).await;
    let url = app.url("/v1/admin/shards");
    let r = app.http.get(&url).send().await.unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_problem(r, 401, "unauthorized").await;
    let r = app
        .http
        .get(&url)
        .bearer_auth("test-admin-token-012345678X")
        .send()
        .await
        .unwrap();
    assert_problem(r, 401, "unauthorized").await;

    // Some traffic first, so the counters have something to show.
    let chat = app.new_chat("admin").await;
    app.join(&chat, "u").await;

    let r = app.http.get(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    let shards = body["shards"].as_array().unwrap();
    assert_eq!(shards.len(), SHARDS);
    for s in shards {
        assert_eq!(s["breaker"]["state"], "CLOSED", "{s}");
        assert!(s["breaker"]["since"].is_string());
        assert_eq!(s["capacity"], app.settings.pool.max_concurrent);
        assert_eq!(s["waitingCapacity"], app.settings.pool.max_waiting);
        assert_eq!(
            s["perChatCapacity"],
            app.settings.pool.per_chat_concurrent()
        );
        assert_eq!(s["autoincLockMode"], 2);
        assert_eq!(s["flushLogAtTrxCommit"], 1);
        assert_eq!(s["inFlight"], 0);
        assert!(s["address"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(s["recent"]["failureRate"].is_number());
        assert!(s["rejected"]["breakerOpen"].is_number());
    }
    let home = app.shard_of(&chat).await;
    assert!(shards[home]["recent"]["calls"].as_u64().unwrap() >= 2);
    assert!(shards[home]["recent"]["callP99Ms"].as_f64().unwrap() > 0.0);
    assert!(shards[home]["poolSize"].as_u64().unwrap() >= 1);
    // The chat's requests (its creation and the join) are timed for its
    // shard, the other shards have none.
    assert_eq!(shards[home]["recent"]["requests"], 2, "{}", shards[home]);
    assert!(shards[home]["recent"]["requestP99Ms"].as_f64().unwrap() > 0.0);
    for (i, s) in shards.iter().enumerate().filter(|(i, _)| *i != home) {
        assert_eq!(s["recent"]["requests"], 0, "shard {i}: {s}");
        assert!(s["recent"]["requestP99Ms"].is_null(), "shard {i}: {s}");
    }
    // A long-poll waits by design: not timed. The read of the chat (from
    // `shard_of`) is.
    let r = app
        .get(&format!("/v1/chats/{chat}/events?after=1&waitMs=50"))
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = app.admin_get("/v1/admin/shards").await;
    assert_eq!(body["shards"][home]["recent"]["requests"], 3, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_in_prometheus_text() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("metrics").await;
    app.join(&chat, "u").await;
    app.get(&format!("/v1/chats/{chat}/events")).await;
    let r = app.get("/metrics").await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = r.text().await.unwrap();
    for shard in 0..SHARDS {
        for series in [
            "chatshard_shard_breaker_state{",
            "chatshard_shard_in_flight{",
            "chatshard_shard_waiting{",
        ] {
            let line = text
                .lines()
                .find(|l| l.starts_with(series) && l.contains(&format!("shard=\"shard-{shard}\"")));
            assert!(line.is_some(), "no {series} for shard-{shard} in\n{text}");
        }
        assert!(text.contains("chatshard_shard_rejections_total{"), "{text}");
    }
    for name in [
        "chatshard_shard_operation_duration_seconds_bucket{",
        "http_server_request_duration_seconds_bucket{",
        "chatshard_throttle_decisions_total{",
        "chatshard_hot_chats",
        "chatshard_fetches_coalesced_total",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
    assert!(
        text.contains("http_route=\"/v1/chats/{chatId}/members\""),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chats_requests_are_split_between_chatshard_and_its_shard() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("split").await;
    let shard = format!("shard=\"{}\"", app.shard_name_of(&chat).await);
    let read = || async {
        let mut out = Vec::new();
        for (metric, stage) in [
            ("chatshard_shard_request_own_duration_seconds_count", ""),
            (
                "chatshard_shard_request_database_duration_seconds_count",
                "",
            ),
            ("chatshard_shard_request_database_duration_seconds_sum", ""),
            (
                "chatshard_shard_request_wait_duration_seconds_count",
                "stage=\"bulkhead\"",
            ),
            (
                "chatshard_shard_request_wait_duration_seconds_count",
                "stage=\"group_commit\"",
            ),
        ] {
            out.push(app.metric_sum(metric, &[&shard, stage]).await);
        }
        out
    };
    let before = read().await;
    // A write (through the group commit) and a read.
    assert_eq!(app.join(&chat, "u").await.status(), 201);
    assert_eq!(app.count(&chat).await, 1);
    let after = read().await;
    let added: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(added[0], 2.0, "own: {added:?}");
    assert_eq!(added[1], 2.0, "database: {added:?}");
    assert!(added[2] > 0.0, "the database took no time: {added:?}");
    assert_eq!(added[3], 2.0, "bulkhead waits: {added:?}");
    assert_eq!(
        added[4], 1.0,
        "only the join went through the group commit: {added:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_carries_the_request_trace_id() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("reqid").await;
    // No caller trace, no export: a fresh random id per request.
    let a = app.get(&format!("/v1/chats/{chat}")).await;
    let b = app.get(&format!("/v1/chats/{chat}/nope")).await;
    let c = reqwest::Client::new()
        .delete(app.url(&format!("/v1/chats/{chat}")))
        .send()
        .await
        .unwrap();
    assert_eq!((b.status().as_u16(), c.status().as_u16()), (404, 405));
    let ids: Vec<String> = [&a, &b, &c]
        .iter()
        .map(|r| match r.headers().get("x-request-id") {
            Some(v) => v.to_str().unwrap().to_owned(),
            None => panic!("no x-request-id on a {} answer", r.status()),
        })
        .collect();
    for id in &ids {
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
    }
    assert_ne!(ids[0], ids[1]);
    assert_ne!(ids[1], ids[2]);
    // Without export there is no server span id to name.
    assert!(a.headers().get("traceresponse").is_none());
    // A caller's trace id comes back, on errors too.
    let trace = "0af7651916cd43dd8448eb211c80319c";
    for path in [format!("/v1/chats/{chat}"), "/v1/chats/bad%20id".to_owned()] {
        let r = reqwest::Client::new()
            .get(app.url(&path))
            .header("traceparent", format!("00-{trace}-b7ad6b7169203331-01"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-request-id"], trace, "{path}");
    }
}
