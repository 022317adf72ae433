//! Row-lock contention on one chat is that chat's trouble: writers that time
//! out waiting for its row lock (MySQL error 1205) are answered 503
//! `chat_contended`, the shard's breaker stays closed, and the shard's other
//! chats keep working.

use reqwest::StatusCode;
use sqlx::Connection;

use crate::common;
use crate::helpers::{TestApp, assert_problem};

const TOKEN: &str = "contention-tests-admin-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_wait_timeouts_on_one_chat_never_open_the_shards_breaker() {
    let app = TestApp::spawn_with(|s| {
        s.admin.token = TOKEN.to_owned();
        s.pool.lock_wait_timeout_secs = 1;
        s.pool.operation_timeout_ms = 5000;
        // Two counted failures would open it: the three timeouts below must
        // not count.
        s.breaker.consecutive_failures = 2;
        s.breaker.open_ms = 60_000;
    })
    .await;
    let hot = app.new_chat("locked").await;
    let shard = app.shard_of(&hot).await;
    let neighbour = loop {
        let chat = app.new_chat("neighbour").await;
        if app.shard_of(&chat).await == shard {
            break chat;
        }
    };

    // Another client holds the hot chat's row lock, as a writer on another
    // instance would.
    let mut holder = app.db(shard).await;
    let mut tx = holder.begin().await.expect("begin");
    sqlx::query("SELECT chat_id FROM chat WHERE chat_id = ? FOR UPDATE")
        .bind(&hot)
        .fetch_one(&mut *tx)
        .await
        .expect("lock the chat row");

    for i in 0..3 {
        let r = app.join(&hot, &format!("waiting-{i}")).await;
        let body = assert_problem(r, 503, "chat_contended").await;
        assert!(
            body["detail"]
                .as_str()
                .unwrap_or("")
                .contains(&format!("shard-{shard}"))
        );
    }
    // The shard is healthy for everyone else, reads of the hot chat included.
    assert_eq!(
        app.join(&neighbour, "free").await.status(),
        StatusCode::CREATED
    );
    assert_eq!(app.count(&hot).await, 0);
    let view = app.admin_get("/v1/admin/shards").await;
    assert_eq!(
        view["shards"][shard]["breaker"]["state"], "CLOSED",
        "{view}"
    );
    let contended = common::sum_where(
        &common::metric_samples(&app.http, &app.base, "chatshard_shard_operations_total").await,
        &[
            &format!("shard=\"shard-{shard}\""),
            "outcome=\"chat_contended\"",
        ],
    );
    assert_eq!(contended, 3.0);

    tx.rollback().await.expect("release");
    assert_eq!(app.join(&hot, "after").await.status(), StatusCode::CREATED);
    let (count, rows) = app.count_and_rows(&hot).await;
    assert_eq!(
        (count, rows),
        (1, 1),
        "nothing of the refused joins was applied"
    );
}
