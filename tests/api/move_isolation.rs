//! A chat that stays hot is isolated: moved by the instance itself to the
//! isolation shard, recorded as the isolation's move, within an hourly
//! budget per source shard (a second hot chat of the same shard waits). A
//! dry run only counts the chat, and an unknown isolation shard is refused.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common;
use crate::helpers::{TestApp, unique};
use crate::move_kit::{TOKEN, fill, moves_of};

/// Patches the live config through the admin API; asserts it was taken.
async fn patch_live(app: &TestApp, patch: Value) {
    let r = app
        .admin(Method::PATCH, "/v1/admin/config")
        .header("content-type", "application/merge-patch+json")
        .body(patch.to_string())
        .send()
        .await
        .expect("patch");
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "{}",
        r.text().await.unwrap_or_default()
    );
}

async fn decision(app: &TestApp, name: &str) -> u64 {
    app.admin_get("/v1/admin/hot-chats").await["decisions"][name]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_that_stays_hot_is_isolated_and_a_dry_run_only_counts_it() {
    let app = TestApp::spawn_with(|s| {
        s.admin.token = TOKEN.to_owned();
        s.join_throttle.enabled = false;
    })
    .await;
    // Two chats of one shard; the isolation shard is the next one.
    let hot = unique("isolated");
    app.put_chat(&hot, None).await;
    let home = app.shard_of(&hot).await;
    let second = loop {
        let c = unique("isolated");
        app.put_chat(&c, None).await;
        if app.shard_of(&c).await == home {
            break c;
        }
    };
    let target = (home + 1) % app.settings.shards.len();
    let target_name = app.settings.shards[target].name.clone();
    // Bad input: an unknown shard is refused, the config stays.
    let r = app
        .admin(Method::PATCH, "/v1/admin/config")
        .header("content-type", "application/merge-patch+json")
        .body(json!({"isolation": {"enabled": true, "shard": "nowhere"}}).to_string())
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = r.json().await.expect("problem");
    assert_eq!(problem["code"], "invalid_config", "{problem}");
    // Hot after 20 events in 10 s, for a minute; isolated after 1 s hot, one
    // move per source shard per hour; first as a dry run.
    let rule = json!({"threshold": 20, "durationSeconds": 10, "expireSeconds": 60});
    patch_live(
        &app,
        json!({
            "hotChat": {"overrides": {&hot: rule.clone(), &second: rule}},
            "isolation": {"enabled": true, "dryRun": true, "shard": &target_name,
                          "afterSeconds": 1, "movesPerHour": 1},
        }),
    )
    .await;
    fill(&app, &hot, 1, 30).await;
    common::eventually(
        Duration::from_secs(20),
        "the dry run counts the chat",
        || {
            let app = &app;
            async move { decision(app, "chatsIsolatedDryRun").await >= 1 }
        },
    )
    .await;
    assert_eq!(app.shard_of(&hot).await, home, "a dry run moves nothing");
    assert!(moves_of(&app, &hot).await.is_empty());
    // For real: the chat moves, recorded as the isolation's move.
    patch_live(&app, json!({"isolation": {"dryRun": false}})).await;
    common::eventually(Duration::from_secs(60), "the hot chat is isolated", || {
        let app = &app;
        let hot = &hot;
        async move {
            moves_of(app, hot)
                .await
                .first()
                .is_some_and(|m| m["phase"] == "done")
        }
    })
    .await;
    let moved = moves_of(&app, &hot).await;
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(moved[0]["startedBy"], "isolation");
    assert_eq!(moved[0]["target"], target_name.as_str());
    assert_eq!(app.shard_of(&hot).await, target);
    assert!(decision(&app, "chatsIsolated").await >= 1);
    let mut new = app.db(target).await;
    assert_eq!(common::count_and_rows(&mut new, &hot).await, (30, 30));
    common::assert_chat_consistent(&mut new, &hot).await;
    // A second hot chat of the same shard waits: its hourly budget is spent.
    let deferred = decision(&app, "isolationsDeferred").await;
    fill(&app, &second, 1, 30).await;
    common::eventually(
        Duration::from_secs(20),
        "the second isolation waits",
        || {
            let app = &app;
            async move { decision(app, "isolationsDeferred").await > deferred + 1 }
        },
    )
    .await;
    assert_eq!(app.shard_of(&second).await, home);
    assert!(moves_of(&app, &second).await.is_empty());
    // The chat keeps working where it is isolated.
    assert_eq!(app.join(&hot, "after").await.status(), StatusCode::CREATED);
    patch_live(&app, json!({"isolation": {"enabled": false}})).await;
}
