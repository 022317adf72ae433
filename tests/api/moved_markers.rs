//! A chat whose row on a shard says it moved (`chat.moved_to`,
//! docs/moving-chats.md) is read and written where it moved to, by every
//! instance, even one that routes it to its old shard; it is never written or
//! created again where the marker stands. Markers that name each other (the
//! moment between two steps of a switch) answer a retryable 503. The move
//! itself is done here by hand, the way the mover does it: copy the rows,
//! then mark the old row.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common;
use crate::helpers::{TestApp, settings};
use crate::move_kit::{copy_chat, home_and_next, mark, revision_and_max, revision_of, whole_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_chat_is_followed_by_every_instance_and_never_written_where_it_was() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("moved").await;
    assert_eq!(app.join(&chat, "u1").await.status(), StatusCode::CREATED);
    assert_eq!(
        app.post(&chat, "u1", "k1", "before").await.status(),
        StatusCode::CREATED
    );
    let (home, target) = home_and_next(&app, &chat).await;
    let target_name = app.settings.shards[target].name.clone();
    let mut old = app.db(home).await;
    let mut new = app.db(target).await;
    // A stream opened before the move keeps its cursor across it.
    let mut stream = common::SseReader::open(
        &app.http,
        &app.base,
        &format!("/v1/chats/{chat}/events/stream?after=2"),
        None,
    )
    .await
    .unwrap_or_else(|r| panic!("stream refused: {}", r.status()));

    copy_chat(&mut old, &mut new, &chat).await;
    mark(&mut old, &chat, Some(&target_name)).await;

    // The instance learns the location from the old shard's marker.
    let r = app.get(&format!("/v1/chats/{chat}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["shard"], json!(target_name));
    assert_eq!(body["revision"], 2);
    // Writes land on the new shard, revisions going on from the copy.
    assert_eq!(app.join(&chat, "u2").await.status(), StatusCode::CREATED);
    assert_eq!(
        app.post(&chat, "u2", "k2", "after").await.status(),
        StatusCode::CREATED
    );
    // The same idempotency key, retried after the move, is applied once.
    let again = app.post(&chat, "u1", "k1", "before").await;
    assert_eq!(again.status(), StatusCode::OK);
    let event = stream
        .next(std::time::Duration::from_secs(10))
        .await
        .expect("an event");
    assert_eq!(event.id.as_deref(), Some("3"));

    // A second instance, which knows nothing of the move, reads and writes
    // through the old shard's marker too, and every read path follows it.
    // Its first request is a write: the old shard's marker refuses it there.
    let other = TestApp::spawn().await;
    assert_eq!(other.join(&chat, "u3").await.status(), StatusCode::CREATED);
    assert_eq!(other.count(&chat).await, 3);
    let r = other.get(&format!("/v1/chats/{chat}/members/u2")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = other
        .get(&format!("/v1/chats/{chat}/members?limit=10"))
        .await;
    let page: Value = r.json().await.expect("json");
    assert_eq!(page["members"].as_array().map(Vec::len), Some(3));
    let other_stream = other.get(&format!("/v1/chats/{chat}/events?after=0")).await;
    let events: Value = other_stream.json().await.expect("json");
    assert_eq!(events["latestRevision"], 5);
    // A PUT through yet another instance, as its first request, updates the
    // chat where it is: it is never created again where it was.
    let third = TestApp::spawn().await;
    let r = third.put_chat(&chat, Some(json!({"maxMembers": 77}))).await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["shard"], json!(target_name));
    assert_eq!(body["maxMembers"], 77);

    // Nothing was written where the marker stands; the new shard holds it all.
    let (revision, max) = revision_and_max(&mut old, &chat).await;
    assert_eq!(revision, 2);
    assert_ne!(max, 77);
    assert_eq!(common::count_and_rows(&mut old, &chat).await, (1, 1));
    whole_with(&mut new, &chat, 3).await;
    assert_eq!(revision_of(&mut new, &chat).await, 5);
    drop(stream);
    app.shut_down().await;
    other.shut_down().await;
    third.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markers_that_point_at_each_other_answer_a_retryable_503() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("loop").await;
    let (home, target) = home_and_next(&app, &chat).await;
    let (home_name, target_name) = (
        app.settings.shards[home].name.clone(),
        app.settings.shards[target].name.clone(),
    );
    let mut old = app.db(home).await;
    let mut new = app.db(target).await;
    copy_chat(&mut old, &mut new, &chat).await;
    // The moment between two steps of a switch: each says the other.
    mark(&mut new, &chat, Some(&home_name)).await;
    mark(&mut old, &chat, Some(&target_name)).await;
    for r in [
        app.get(&format!("/v1/chats/{chat}")).await,
        app.join(&chat, "u1").await,
    ] {
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().contains_key("retry-after"));
        let body: Value = r.json().await.expect("problem");
        assert_eq!(body["code"], "shard_unavailable");
    }
    // A marker naming a shard this instance does not know is an error of
    // the deployment, said as such.
    mark(&mut old, &chat, Some("shard-nowhere")).await;
    let fresh = TestApp::spawn_with(|s| *s = settings()).await;
    let r = fresh.get(&format!("/v1/chats/{chat}")).await;
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    // Settled again: the chat is home.
    mark(&mut old, &chat, None).await;
    let back = TestApp::spawn().await;
    assert_eq!(back.join(&chat, "u1").await.status(), StatusCode::CREATED);
    common::assert_chat_consistent(&mut old, &chat).await;
    app.shut_down().await;
    fresh.shut_down().await;
    back.shut_down().await;
}
