//! Hot-chat protection through the API: join throttling, hot marking, fetch
//! throttling, coalescing, and live configuration.

use std::time::Duration;

use futures::future::join_all;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem};

const TOKEN: &str = "hot-chat-tests-admin-token";

async fn app() -> TestApp {
    TestApp::spawn_with(|s| s.admin.token = TOKEN.to_owned()).await
}

/// A merge patch of the live config.
async fn patch_config(app: &TestApp, patch: Value) -> reqwest::Response {
    app.admin(Method::PATCH, "/v1/admin/config")
        .header("content-type", "application/merge-patch+json")
        .body(patch.to_string())
        .send()
        .await
        .unwrap()
}

/// A whole new live config.
async fn put_config(app: &TestApp, config: Value) -> reqwest::Response {
    app.admin(Method::PUT, "/v1/admin/config")
        .json(&config)
        .send()
        .await
        .unwrap()
}

/// Patches the live config and asserts it was accepted.
async fn set_config(app: &TestApp, config: Value) {
    let r = patch_config(app, config).await;
    let status = r.status();
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        r.text().await.unwrap_or_default()
    );
}

async fn get_config(app: &TestApp) -> Value {
    app.admin_get("/v1/admin/config").await
}

async fn hot_view(app: &TestApp) -> Value {
    app.admin_get("/v1/admin/hot-chats").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_past_a_chats_limit_are_throttled_and_leaves_never() {
    let app = app().await;
    let chat = app.new_chat("jt").await;
    let other = app.new_chat("jt-other").await;
    set_config(
        &app,
        json!({"joinThrottle": {"overrides": {chat.clone(): {"limit": 3, "windowSeconds": 60}}}}),
    )
    .await;
    for u in ["a", "b", "c"] {
        assert_eq!(app.join(&chat, u).await.status(), StatusCode::CREATED);
    }
    let r = app.join(&chat, "d").await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_problem(r, 429, "join_throttled").await;
    // Already-joined users count like joins: decided before the database.
    assert_problem(app.join(&chat, "a").await, 429, "join_throttled").await;
    assert_eq!(app.leave(&chat, "a").await.status(), StatusCode::NO_CONTENT);
    // Other chats keep the default limit.
    for u in ["a", "b", "c", "d", "e"] {
        assert_eq!(app.join(&other, u).await.status(), StatusCode::CREATED);
    }
    assert_eq!(hot_view(&app).await["decisions"]["joinsThrottled"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_limit_is_admitted_under_concurrency() {
    let app = app().await;
    let chat = app.new_chat("jt-many").await;
    set_config(&app, json!({"joinThrottle": {"overrides": {chat.clone(): {"limit": 100, "windowSeconds": 3600}}}})).await;
    let statuses = app.join_many(&chat, 1000).await;
    let created = statuses
        .iter()
        .filter(|s| **s == StatusCode::CREATED)
        .count();
    let throttled = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!((created, throttled), (100, 900));
    assert_eq!(app.count_and_rows(&chat).await, (100, 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_admits_and_counts() {
    let app = app().await;
    let chat = app.new_chat("jt-dry").await;
    set_config(&app, json!({"joinThrottle": {"overrides": {chat.clone(): {"limit": 2, "windowSeconds": 3600, "dryRun": true}}}})).await;
    for i in 0..5 {
        assert_eq!(
            app.join(&chat, &format!("u{i}")).await.status(),
            StatusCode::CREATED
        );
    }
    let d = &hot_view(&app).await["decisions"];
    assert_eq!(
        (
            d["joinsThrottled"].as_u64(),
            d["joinsThrottledDryRun"].as_u64()
        ),
        (Some(0), Some(3))
    );
}

/// Makes `chat` hot on `app` with the given rule, through its own writes.
async fn make_hot(app: &TestApp, chat: &str, rule: Value) {
    set_config(app, json!({"hotChat": {"overrides": {chat: rule}}})).await;
    assert_eq!(app.join(chat, "star").await.status(), StatusCode::CREATED);
    for i in 0..5 {
        let r = app.post(chat, "star", &format!("warm-{i}"), "hello").await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_chat_is_marked_hot_and_its_fetches_throttled_at_the_rate() {
    let app = app().await;
    let chat = app.new_chat("hot").await;
    let calm = app.new_chat("calm").await;
    make_hot(&app, &chat, json!({"threshold": 5, "durationSeconds": 60, "expireSeconds": 60, "throttleRate": 0.3, "cacheMillis": 0})).await;
    let view = hot_view(&app).await;
    let listed = view["hotChats"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{view}");
    assert_eq!(listed[0]["chatId"], chat.as_str());
    assert!(listed[0]["hotUntil"].is_string());
    assert_eq!(view["decisions"]["hotChatsMarked"], 1);

    let mut throttled = 0;
    for _ in 0..400 {
        let r = app.get(&format!("/v1/chats/{chat}/events")).await;
        match r.status().as_u16() {
            200 => {}
            429 => {
                let retry: u64 = r.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!((1..=3).contains(&retry));
                let problem = assert_problem(r, 429, "fetch_throttled").await;
                assert_eq!(
                    problem["stream"],
                    format!("/v1/chats/{chat}/events/stream"),
                    "the problem names the stream to follow instead"
                );
                throttled += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    // 30% of 400 = 120; a binomial spread of +-4.5 sigma is about +-41.
    assert!(
        (79..=161).contains(&throttled),
        "{throttled} of 400 throttled"
    );
    // A calm chat is never throttled.
    for _ in 0..50 {
        assert_eq!(
            app.get(&format!("/v1/chats/{calm}/events")).await.status(),
            200
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_hot_chat_serves_every_fetch() {
    let app = app().await;
    let chat = app.new_chat("hot-dry").await;
    make_hot(
        &app,
        &chat,
        json!({"threshold": 5, "throttleRate": 1.0, "dryRun": true, "cacheMillis": 0}),
    )
    .await;
    for _ in 0..20 {
        assert_eq!(
            app.get(&format!("/v1/chats/{chat}/events")).await.status(),
            200
        );
    }
    let d = &hot_view(&app).await["decisions"];
    assert_eq!(d["fetchesThrottled"], 0);
    assert_eq!(d["fetchesThrottledDryRun"], 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_identical_fetches_of_a_hot_chat_cost_at_most_two_queries() {
    let app = app().await;
    let chat = app.new_chat("coalesce").await;
    make_hot(
        &app,
        &chat,
        json!({"threshold": 5, "throttleRate": 0.0, "cacheMillis": 10000}),
    )
    .await;
    // One new message, then every member fetches what follows their last revision.
    let before: Value = app
        .get(&format!("/v1/chats/{chat}/events"))
        .await
        .json()
        .await
        .unwrap();
    let last = before["latestRevision"].as_u64().unwrap();
    app.post(&chat, "star", "news", "breaking").await;
    let queries_before = hot_view(&app).await["decisions"]["fetchQueries"]
        .as_u64()
        .unwrap();
    let pages = join_all((0..1000).map(|_| {
        let (app, chat) = (&app, &chat);
        async move {
            let r = app
                .get(&format!("/v1/chats/{chat}/events?after={last}"))
                .await;
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    }))
    .await;
    let queries = hot_view(&app).await["decisions"]["fetchQueries"]
        .as_u64()
        .unwrap()
        - queries_before;
    assert!(queries <= 2, "{queries} queries for 1000 identical fetches");
    for page in &pages {
        let events = page["events"].as_array().unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["revision"].as_u64(), Some(last + 1));
        assert_eq!(events[0]["text"], "breaking");
    }
    // A write on this instance retires the kept page: the next fetch sees it.
    app.post(&chat, "star", "more", "more news").await;
    let page: Value = app
        .get(&format!("/v1/chats/{chat}/events?after={last}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 2);
    eprintln!("coalescing: 1000 concurrent identical fetches cost {queries} query(ies)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_config_through_the_api_rejects_invalid_input_and_keeps_the_old() {
    let app = app().await;
    let v1 = get_config(&app).await;
    assert_eq!(v1["version"], 1);
    assert_eq!(
        v1["config"]["joinThrottle"]["limit"],
        app.settings.join_throttle.limit
    );

    let r = patch_config(
        &app,
        json!({"hotChat": {"throttleRate": 2.0, "threshold": 0}, "joinThrottle": {"limit": 0}}),
    )
    .await;
    let body = assert_problem(r, 422, "invalid_config").await;
    assert_eq!(body["errors"].as_array().unwrap().len(), 3, "{body}");
    let now = get_config(&app).await;
    assert_eq!(now, v1);

    let r = patch_config(&app, json!({"hotChat": {"dryRun": true}})).await;
    let v2: Value = r.json().await.unwrap();
    assert_eq!(v2["version"], 2);
    assert_eq!(v2["config"]["hotChat"]["dryRun"], true);
    // The patch changed one field: the others kept their values.
    assert_eq!(
        v2["config"]["joinThrottle"], v1["config"]["joinThrottle"],
        "{v2}"
    );
    for bad in [
        json!({"hotChat": {"colour": 1}}),
        // snake_case is the TOML file's spelling, not the API's.
        json!({"hotChat": {"dry_run": true}}),
        json!({"joinThrottle": {"limit": 9223372036854775808_u64}}),
    ] {
        assert_problem(patch_config(&app, bad).await, 422, "invalid_config").await;
    }
    // A JSON array is not a configuration, nor a patch of one.
    for body in [json!([]), json!(["x"])] {
        assert_problem(put_config(&app, body.clone()).await, 422, "invalid_config").await;
        assert_problem(patch_config(&app, body).await, 422, "invalid_config").await;
    }
    // PUT replaces the whole document: a section left out is an error, not
    // a reset to defaults.
    let r = put_config(&app, json!({"hotChat": v2["config"]["hotChat"].clone()})).await;
    let body = assert_problem(r, 422, "invalid_config").await;
    assert_eq!(
        body["errors"],
        json!([
            "the body lacks the required field `isolation`",
            "the body lacks the required field `joinThrottle`",
            "the body lacks the required field `retention`",
            "the body lacks the required field `streams`"
        ])
    );
    assert_eq!(get_config(&app).await["version"], 2);
    // The whole document, as GET returns it, is accepted back.
    let mut whole = v2["config"].clone();
    whole["hotChat"]["dryRun"] = json!(false);
    let r = put_config(&app, whole).await;
    assert_eq!(r.status(), 200);
    let v3: Value = r.json().await.unwrap();
    assert_eq!(v3["version"], 3);
    assert_eq!(v3["config"], v1["config"]);
    let r = app
        .http
        .put(app.url("/v1/admin/config"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 401, "unauthorized").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_config_follows_the_file_and_ignores_an_invalid_one() {
    let dir = RemovedOnDrop(std::env::temp_dir().join(crate::helpers::unique("chatshard-live")));
    std::fs::create_dir_all(&dir.0).unwrap();
    let path = dir.0.join("chatshard.toml");
    std::fs::write(&path, "[join_throttle]\nlimit = 500\n").unwrap();
    let app = TestApp::spawn_watching(path.clone(), |s| s.admin.token = TOKEN.to_owned()).await;
    let version = || get_config(&app);
    // An edit is noticed (polled with a deadline).
    std::fs::write(&path, "[join_throttle]\nlimit = 7\ndry_run = true\n").unwrap();
    let v = crate::common::Wait::new(Duration::from_secs(10), "the file change applied")
        .until(|| async {
            let v = version().await;
            if v["config"]["joinThrottle"]["limit"] == 7 {
                Ok(v)
            } else {
                Err(v)
            }
        })
        .await;
    assert!(v["version"].as_u64().unwrap() >= 2);
    assert_eq!(v["config"]["joinThrottle"]["dryRun"], true);
    // An invalid file is logged and ignored: the live config stays.
    std::fs::write(&path, "[join_throttle]\nlimit = 0\n").unwrap();
    chatshard::app::reload_live(&app.live, &path);
    std::fs::write(&path, "this is not toml [").unwrap();
    chatshard::app::reload_live(&app.live, &path);
    let after = version().await;
    assert_eq!(after["version"], v["version"]);
    assert_eq!(after["config"]["joinThrottle"]["limit"], 7);
    app.shut_down().await;
}

/// A directory removed when dropped, after a panic too.
struct RemovedOnDrop(std::path::PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("removing {}: {e}", self.0.display());
        }
    }
}
