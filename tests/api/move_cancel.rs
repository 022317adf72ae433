//! A chat move cancelled before its switch rolls back: the chat never
//! leaves its source, every write made meanwhile is there once, and the
//! target keeps nothing of the copy. A second move of a chat that is moving
//! is refused; an ended move cannot be cancelled, an unknown one is not
//! found, and the chat can move to the end afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common;
use crate::helpers::{TestApp, assert_problem, unique};
use crate::move_kit::{
    TOKEN, all_rows_of, fill, home_and_next, messages_of, move_to_end, request_move, started_id,
    wait_move, writer,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_cancelled_before_its_switch_rolls_back_and_the_chat_stays_whole() {
    let app = Arc::new(
        TestApp::spawn_with(|s| {
            s.admin.token = TOKEN.to_owned();
            // A slow copy: 20 revisions per batch, 50 ms apart, paced
            // until it is within 10 revisions (the default 500 would fence
            // after one batch, and copy the rest under the fence unpaced).
            s.moves.batch_revisions = 20;
            s.moves.pause_ms = 50;
            s.moves.fence_lag = 10;
            s.join_throttle.enabled = false;
        })
        .await,
    );
    let chat = unique("cancel");
    let r = app
        .put_chat(&chat, Some(json!({"maxMembers": 100000})))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    fill(&app, &chat, 10, 50).await;
    let (home, target) = home_and_next(&app, &chat).await;
    let target_name = app.settings.shards[target].name.clone();
    // Writes go on throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = tokio::spawn(writer(app.clone(), chat.clone(), "cw", stop.clone()));
    let id = started_id(request_move(&app, &chat, &target_name).await).await;
    // A second move of the same chat is refused while this one runs.
    let again = request_move(&app, &chat, &target_name).await;
    let refused = assert_problem(again, 409, "move_refused").await;
    assert!(
        refused["detail"]
            .as_str()
            .is_some_and(|d| d.contains("has a move running")),
        "{refused}"
    );
    // Cancelled once some of the log is on the target.
    common::eventually(Duration::from_secs(30), "the copy is under way", || {
        let app = app.clone();
        let (id, chat) = (id.clone(), chat.clone());
        async move {
            let m = app.admin_get(&format!("/v1/admin/moves/{id}")).await;
            let ended = ["done", "rolled_back", "cancelled"];
            assert!(
                !ended.iter().any(|p| m["phase"] == *p),
                "the move ended before its copy was seen: {m}"
            );
            let copied = m["copiedRevision"].as_u64().unwrap_or(0);
            if m["phase"] != "copying" || copied == 0 {
                return false;
            }
            // A running move shows how far its target is behind.
            let lag = m["lagRevisions"].as_u64().expect("lagRevisions");
            let now = app.chat_body(&chat).await["revision"]
                .as_u64()
                .expect("revision");
            assert!(copied + lag <= now, "{m} (the source at {now})");
            // Each copied revision wrote its event and at least one row.
            assert!(m["rowsCopied"].as_u64() >= Some(2 * copied), "{m}");
            true
        }
    })
    .await;
    let r = app
        .admin(Method::DELETE, &format!("/v1/admin/moves/{id}"))
        .send()
        .await
        .expect("cancel");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let asked: Value = r.json().await.expect("json");
    assert_eq!(asked["cancelRequested"], true, "{asked}");
    let ended = wait_move(&app, &id).await;
    assert_eq!(ended["phase"], "cancelled", "{ended}");
    assert!(ended.get("lagRevisions").is_none(), "{ended}");
    stop.store(true, Ordering::Relaxed);
    let (joined, posted, _) = writes.await.expect("writer");
    assert!(!joined.is_empty() && !posted.is_empty());
    // The chat never left its source: every write is there once, and the
    // target keeps nothing of the copy.
    assert_eq!(app.shard_of(&chat).await, home);
    let mut old = app.db(home).await;
    common::assert_chat_consistent(&mut old, &chat).await;
    let members = 500 + joined.len() as i64;
    assert_eq!(
        common::count_and_rows(&mut old, &chat).await,
        (members, members)
    );
    assert_eq!(messages_of(&mut old, &chat).await, posted.len() as i64);
    let mut new = app.db(target).await;
    assert_eq!(
        all_rows_of(&mut new, &chat).await,
        0,
        "the copy was dropped"
    );
    // An ended move cannot be cancelled; an unknown one is not found.
    for (path, status, code) in [
        (format!("/v1/admin/moves/{id}"), 409, "move_refused"),
        (
            format!("/v1/admin/moves/{}:999999", app.settings.shards[home].name),
            404,
            "not_found",
        ),
        ("/v1/admin/moves/nowhere:1".to_owned(), 404, "not_found"),
    ] {
        let r = app
            .admin(Method::DELETE, &path)
            .send()
            .await
            .expect("cancel");
        assert_problem(r, status, code).await;
    }
    // The chat can then move to the end, and that move cannot be cancelled.
    let moved = move_to_end(&app, &chat, &target_name).await;
    assert_eq!(moved["phase"], "done", "{moved}");
    let r = app
        .admin(
            Method::DELETE,
            &format!("/v1/admin/moves/{}", moved["id"].as_str().expect("id")),
        )
        .send()
        .await
        .expect("cancel");
    assert_eq!(r.status(), StatusCode::CONFLICT);
    common::assert_chat_consistent(&mut new, &chat).await;
    assert_eq!(
        common::count_and_rows(&mut new, &chat).await,
        (members, members)
    );
    if let Ok(app) = Arc::try_unwrap(app) {
        app.shut_down().await;
    }
}
