//! A write that meets a move's fence is held (up to `moves.hold_writes_ms`)
//! and applied once the fence is gone, not refused; a group-commit batch
//! caught by a fence is held and applied the same way, each of its writes
//! once. With the hold off, a fenced write, alone or in a batch, is answered
//! 503 `chat_moving` at once and nothing is applied.

use std::time::Duration;

use reqwest::StatusCode;
use sqlx::MySqlConnection;

use crate::common;
use crate::helpers::{TestApp, assert_problem, unique};
use crate::move_kit::{fence, unfence, whole_with};

/// The write batches (`commit_batch` operations) `app` sent to the shard
/// labelled `shard`: every attempt of a fenced write is one.
async fn write_batches(app: &TestApp, shard: &str) -> f64 {
    common::sum_where(
        &common::metric_samples(
            &app.http,
            &app.base,
            "chatshard_shard_operation_duration_seconds_count",
        )
        .await,
        &[shard, "operation=\"commit_batch\""],
    )
}

/// Joins `users` to `chat` all at once through `app` while the chat is
/// fenced for a minute (longer than any hold), and lifts the fence only
/// once the joins are seen held: their batches were tried at least twice,
/// and none of them is applied. Then every join is answered 201.
async fn joins_held_by_a_fence(
    app: &TestApp,
    db: &mut MySqlConnection,
    shard: &str,
    chat: &str,
    users: &[String],
) {
    fence(db, chat, 60_000).await;
    let before = write_batches(app, shard).await;
    let joins = futures::future::join_all(users.iter().map(|user| app.join(chat, user)));
    let lift = async {
        // Within the hold (5 s): a join held longer would be refused.
        common::eventually(
            Duration::from_secs(4),
            "the fenced joins are tried again",
            || async { write_batches(app, shard).await >= before + 2.0 },
        )
        .await;
        let applied = common::joined_users(db, chat).await;
        assert!(
            users.iter().all(|user| !applied.contains(user)),
            "applied under the fence: {applied:?}"
        );
        unfence(db, chat).await;
    };
    let (answers, ()) = tokio::join!(joins, lift);
    for (user, r) in users.iter().zip(answers) {
        assert_eq!(r.status(), StatusCode::CREATED, "{user}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_batches_that_meet_a_short_fence_are_held_and_applied_not_refused() {
    // Fenced writes are held up to 5 s, the most the setting allows; each
    // fence here is lifted well within that.
    let app = TestApp::spawn_with(|s| s.moves.hold_writes_ms = 5000).await;
    let chat = unique("held");
    assert_eq!(
        app.put_chat(&chat, None).await.status(),
        StatusCode::CREATED
    );
    let home = app.shard_of(&chat).await;
    let shard = format!("shard=\"{}\"", app.settings.shards[home].name);
    let mut db = app.db(home).await;
    // A join that meets a fence waits it out, then is applied.
    joins_held_by_a_fence(&app, &mut db, &shard, &chat, &["held".to_owned()]).await;
    // A group-commit batch caught by a fence: 30 joins at once, held
    // together, then applied, each once.
    let users: Vec<String> = (0..30).map(|i| format!("batched-{i}")).collect();
    joins_held_by_a_fence(&app, &mut db, &shard, &chat, &users).await;

    // With the hold off, a fence is answered at once, and nothing is applied:
    // a single write, and batches of writes (30 joins at once take fewer
    // write batches than 30).
    let off = TestApp::spawn_with(|s| s.moves.hold_writes_ms = 0).await;
    fence(&mut db, &chat, 60_000).await;
    let r = off.join(&chat, "refused").await;
    assert_problem(r, 503, "chat_moving").await;
    let before = write_batches(&off, &shard).await;
    let users: Vec<String> = (0..30).map(|i| format!("refused-{i}")).collect();
    let joins = users.iter().map(|user| off.join(&chat, user));
    for r in futures::future::join_all(joins).await {
        assert_problem(r, 503, "chat_moving").await;
    }
    let batches = write_batches(&off, &shard).await - before;
    println!("30 fenced joins took {batches} write batches");
    assert!(
        (1.0..30.0).contains(&batches),
        "{batches} write batches for 30 joins"
    );
    unfence(&mut db, &chat).await;
    let mut expected: Vec<String> = (0..30).map(|i| format!("batched-{i}")).collect();
    expected.push("held".to_owned());
    expected.sort();
    let mut joined = common::joined_users(&mut db, &chat).await;
    joined.sort();
    assert_eq!(joined, expected);
    whole_with(&mut db, &chat, 31).await;
    off.shut_down().await;
    app.shut_down().await;
}
