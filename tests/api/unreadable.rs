//! A stored row the code does not understand fails loudly: the request gets a
//! 500 `internal` (the log names the row), the shard's `bad_data` outcome
//! counts it, and nothing is skipped silently (no gap in revisions, no member
//! taken for someone who left).

use crate::common;
use crate::helpers::{TestApp, assert_problem};

async fn bad_data(app: &TestApp, shard: usize) -> f64 {
    common::sum_where(
        &common::metric_samples(&app.http, &app.base, "chatshard_shard_operations_total").await,
        &[&format!("shard=\"shard-{shard}\""), "outcome=\"bad_data\""],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_member_states_and_event_types_are_errors_not_gaps() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("unreadable").await;
    for user in ["ann", "bob"] {
        assert_eq!(app.join(&chat, user).await.status(), 201);
    }
    assert_eq!(app.post(&chat, "ann", "m1", "hi").await.status(), 201);
    let shard = app.shard_of(&chat).await;
    let mut db = app.db(shard).await;
    // As a newer version would (after its own migration): past the CHECK
    // constraints this version's schema has.
    sqlx::query("SET SESSION check_constraint_checks = 0")
        .execute(&mut db)
        .await
        .expect("session");
    let before = bad_data(&app, shard).await;

    // A member state this version does not know (a newer version wrote it).
    sqlx::query("UPDATE chat_member SET state = 9 WHERE chat_id = ? AND user_id = 'bob'")
        .bind(&chat)
        .execute(&mut db)
        .await
        .expect("corrupt state");
    assert_problem(
        app.get(&format!("/v1/chats/{chat}/members/bob")).await,
        500,
        "internal",
    )
    .await;
    // The write path refuses to plan around it, rather than insert bob again.
    assert_problem(app.join(&chat, "bob").await, 500, "internal").await;
    assert_eq!(bad_data(&app, shard).await, before + 2.0);

    // An event type this version does not know, in the middle of the log.
    sqlx::query("UPDATE chat_event SET event_type = 77 WHERE chat_id = ? AND revision = 2")
        .bind(&chat)
        .execute(&mut db)
        .await
        .expect("corrupt event");
    let r = app.get(&format!("/v1/chats/{chat}/events?after=0")).await;
    assert_problem(r, 500, "internal").await;
    // A page that starts after the bad row is still served.
    let r = app.get(&format!("/v1/chats/{chat}/events?after=2")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(bad_data(&app, shard).await, before + 3.0);
}
