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
    assert!(shards[home]["poolSize"].as_u64().unwrap() >= 1);
}
