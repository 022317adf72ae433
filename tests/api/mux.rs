//! Multiplexed streams: one connection carrying many chats, every revision of
//! each once and in order under concurrent writers, chats added and removed on
//! a running stream, resuming after a dropped connection without loss or
//! repeat, resync of a chat far behind, takeover, and the limits.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{Sse, SseReader};
use crate::helpers::{TestApp, assert_problem};

const TOKEN: &str = "mux-tests-admin-token";
const WAIT: Duration = Duration::from_secs(20);

/// `{chatId: after}` for a request body.
fn cursors(chats: &[(&str, u64)]) -> Value {
    Value::Object(
        chats
            .iter()
            .map(|(chat, after)| ((*chat).to_owned(), json!(after)))
            .collect(),
    )
}

/// Makes a stream following `chats` (chatId → after); its id.
async fn create(app: &TestApp, chats: Value) -> String {
    let r = app
        .http
        .post(app.url("/v1/streams"))
        .json(&json!({ "chats": chats }))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::CREATED);
    let location = r.headers()["location"].to_str().expect("ascii").to_owned();
    let body: Value = r.json().await.expect("json");
    let id = body["streamId"].as_str().expect("streamId").to_owned();
    assert_eq!(location, format!("/v1/streams/{id}"));
    id
}

async fn put_chat(app: &TestApp, stream: &str, chat: &str, after: u64) -> reqwest::Response {
    app.http
        .put(app.url(&format!("/v1/streams/{stream}/chats/{chat}")))
        .json(&json!({ "after": after }))
        .send()
        .await
        .expect("request")
}

async fn connect(app: &TestApp, stream: &str, last_event_id: Option<u64>) -> SseReader {
    SseReader::open(
        &app.http,
        &app.base,
        &format!("/v1/streams/{stream}"),
        last_event_id,
    )
    .await
    .unwrap_or_else(|r| panic!("stream refused: {}", r.status()))
}

/// An event message: (message number, chatId, revision).
fn event_of(sse: &Sse) -> (u64, String, u64) {
    assert_eq!(sse.event, None, "an event message: {sse:?}");
    let data: Value = serde_json::from_str(&sse.data).expect("json data");
    (
        sse.id.as_deref().expect("id").parse().expect("numeric id"),
        data["chatId"].as_str().expect("chatId").to_owned(),
        data["revision"].as_u64().expect("revision"),
    )
}

/// Reads events until every chat of `want` reached its revision, checking
/// message numbers follow on from `last` and every chat's revisions follow on
/// from `seen`; the last message number.
async fn read_until(
    reader: &mut SseReader,
    mut last: u64,
    seen: &mut HashMap<String, u64>,
    want: &HashMap<String, u64>,
) -> u64 {
    while want
        .iter()
        .any(|(chat, &r)| seen.get(chat).copied().unwrap_or(0) < r)
    {
        let sse = reader.next(WAIT).await.expect("stream open");
        let (n, chat, revision) = event_of(&sse);
        assert_eq!(n, last + 1, "message numbers follow on");
        last = n;
        let before = seen.entry(chat.clone()).or_insert(0);
        assert_eq!(revision, *before + 1, "chat {chat}: revisions follow on");
        *before = revision;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stream_carries_many_chats_gapless_and_a_chat_can_join_it_running() {
    let app = TestApp::spawn().await;
    const WRITERS: usize = 3;
    const POSTS: usize = 10;
    let chats: Vec<String> = futures::future::join_all((0..3).map(|_| app.new_chat("mux")))
        .await
        .into_iter()
        .collect();
    let mut want = HashMap::new();
    for chat in &chats {
        want.insert(chat.clone(), app.join_writers(chat, WRITERS, POSTS).await);
    }
    // Follows two chats from the start; the third joins the running stream.
    let stream = create(&app, cursors(&[(&chats[0], 0), (&chats[1], 0)])).await;
    let mut reader = connect(&app, &stream, None).await;
    let r = put_chat(&app, &stream, &chats[2], 0).await;
    assert_eq!(r.status(), StatusCode::OK);
    let view: Value = r.json().await.expect("json");
    assert_eq!(view["chats"].as_object().expect("chats").len(), 3);
    futures::future::join_all(
        chats
            .iter()
            .map(|chat| app.post_concurrently(chat, WRITERS, POSTS)),
    )
    .await;
    let mut seen = HashMap::new();
    let last = read_until(&mut reader, 0, &mut seen, &want).await;
    assert_eq!(seen, want);
    assert_eq!(last, want.values().sum::<u64>());

    // A removed chat is not followed any more.
    let r = app
        .http
        .delete(app.url(&format!("/v1/streams/{stream}/chats/{}", chats[0])))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        app.post(&chats[0], "w0", "after-removal", "x")
            .await
            .status(),
        201
    );
    assert_eq!(
        app.post(&chats[1], "w0", "after-removal", "x")
            .await
            .status(),
        201
    );
    let (_, chat, revision) = event_of(&reader.next(WAIT).await.expect("open"));
    assert_eq!(
        (chat.as_str(), revision),
        (chats[1].as_str(), want[&chats[1]] + 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_with_last_event_id_loses_and_repeats_nothing() {
    let app = TestApp::spawn().await;
    let a = app.new_chat("mux-resume").await;
    let b = app.new_chat("mux-resume").await;
    let stream = create(&app, cursors(&[(&a, 0), (&b, 0)])).await;
    let mut want = HashMap::new();
    want.insert(a.clone(), app.join_writers(&a, 2, 15).await);
    want.insert(b.clone(), app.join_writers(&b, 2, 15).await);
    let mut reader = connect(&app, &stream, None).await;
    let writing = futures::future::join(
        app.post_concurrently(&a, 2, 15),
        app.post_concurrently(&b, 2, 15),
    );
    // Read a few messages while the writers go on, then drop the connection
    // with whatever is in flight.
    let mut seen = HashMap::new();
    let (last, ()) = futures::future::join(
        async {
            let mut last = 0;
            for _ in 0..7 {
                let (n, chat, revision) = event_of(&reader.next(WAIT).await.expect("open"));
                assert_eq!(n, last + 1);
                last = n;
                let before = seen.entry(chat).or_insert(0);
                assert_eq!(revision, *before + 1);
                *before = revision;
            }
            last
        },
        async {
            writing.await;
        },
    )
    .await;
    drop(reader);
    let mut reader = connect(&app, &stream, Some(last)).await;
    let end = read_until(&mut reader, last, &mut seen, &want).await;
    assert_eq!(seen, want);
    assert_eq!(end, want.values().sum::<u64>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_far_behind_gets_a_resync_and_a_missing_chat_is_removed() {
    let app = TestApp::spawn_with(|s| s.admin.token = TOKEN.to_owned()).await;
    set_streams(&app, json!({"resyncRevisions": 5})).await;
    let chat = app.new_chat("mux-resync").await;
    let total = app.join_writers(&chat, 1, 19).await;
    app.post_concurrently(&chat, 1, 19).await;
    let stream = create(&app, cursors(&[(&chat, 0), ("no-such-chat-mux", 0)])).await;
    let mut reader = connect(&app, &stream, None).await;
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(reader.next(WAIT).await.expect("open"));
    }
    got.sort_by_key(|s| s.event.clone());
    assert_eq!(got[0].event.as_deref(), Some("removed"));
    let removed: Value = serde_json::from_str(&got[0].data).expect("json");
    assert_eq!(removed["chatId"], "no-such-chat-mux");
    assert_eq!(removed["reason"], "chat_not_found");
    assert_eq!(got[1].event.as_deref(), Some("resync"));
    let resync: Value = serde_json::from_str(&got[1].data).expect("json");
    assert_eq!(resync["chatId"], chat.as_str());
    assert_eq!(resync["after"], 0);
    assert_eq!(resync["latestRevision"], total);
    // The stream goes on after the resync.
    assert_eq!(app.post(&chat, "w0", "next", "x").await.status(), 201);
    let (_, c, revision) = event_of(&reader.next(WAIT).await.expect("open"));
    assert_eq!((c, revision), (chat.clone(), total + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_takes_the_stream_over_and_delete_ends_it() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("mux-take").await;
    assert_eq!(app.join(&chat, "ann").await.status(), StatusCode::CREATED);
    let stream = create(&app, cursors(&[(&chat, 0)])).await;
    let mut first = connect(&app, &stream, None).await;
    assert_eq!(event_of(&first.next(WAIT).await.expect("open")).0, 1);
    let mut second = connect(&app, &stream, Some(1)).await;
    let end = first.next(WAIT).await.expect("a final event");
    assert_eq!(end.event.as_deref(), Some("replaced"));
    assert!(
        first.next(WAIT).await.is_none(),
        "the first connection ended"
    );
    let r = app
        .http
        .delete(app.url(&format!("/v1/streams/{stream}")))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let end = second.next(WAIT).await.expect("a final event");
    assert_eq!(end.event.as_deref(), Some("closed"));
    let r = SseReader::open(&app.http, &app.base, &format!("/v1/streams/{stream}"), None)
        .await
        .err()
        .expect("refused");
    assert_problem(r, 404, "stream_not_found").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_refuse_bad_ids_too_many_chats_and_resumes_too_old() {
    let app = TestApp::spawn_with(|s| s.admin.token = TOKEN.to_owned()).await;
    set_streams(&app, json!({"maxChatsPerStream": 2, "resumeMessages": 2})).await;
    let chat = app.new_chat("mux-limits").await;
    for user in ["a", "b", "c", "d", "e"] {
        assert_eq!(app.join(&chat, user).await.status(), StatusCode::CREATED);
    }
    let quiet = app.new_chat("mux-limits").await;
    let stream = create(&app, cursors(&[(&chat, 0)])).await;
    assert_eq!(put_chat(&app, &stream, &quiet, 0).await.status(), 200);
    let r = put_chat(&app, &stream, "other-chat-2", 0).await;
    assert!(r.headers().contains_key("retry-after"));
    assert_problem(r, 429, "too_many_chats_in_stream").await;
    let r = app
        .http
        .post(app.url("/v1/streams"))
        .json(&json!({"chats": {"x1": 0, "x2": 0, "x3": 0}}))
        .send()
        .await
        .expect("request");
    assert_problem(r, 429, "too_many_chats_in_stream").await;
    for (path, status, code) in [
        ("/v1/streams/not-an-id", 422, "invalid_request"),
        (
            "/v1/streams/0123456789abcdef0123456789abcdef",
            404,
            "stream_not_found",
        ),
    ] {
        let r = SseReader::open(&app.http, &app.base, path, None)
            .await
            .err()
            .expect("refused");
        assert_problem(r, status, code).await;
    }
    let r = app
        .http
        .post(app.url("/v1/streams"))
        .json(&json!({"chats": {"bad id!": 0}}))
        .send()
        .await
        .expect("request");
    assert_problem(r, 422, "invalid_request").await;
    // Five messages handed over; the log keeps the last two.
    let mut reader = connect(&app, &stream, None).await;
    for n in 1..=5 {
        assert_eq!(event_of(&reader.next(WAIT).await.expect("open")).0, n);
    }
    drop(reader);
    let path = format!("/v1/streams/{stream}");
    let r = SseReader::open(&app.http, &app.base, &path, Some(9))
        .await
        .err()
        .expect("refused");
    assert_problem(r, 422, "invalid_request").await;
    let r = SseReader::open(&app.http, &app.base, &path, Some(1))
        .await
        .err()
        .expect("refused");
    assert_problem(r, 410, "stream_resume_expired").await;
    // Within the log: message 4 and 5 again.
    let mut reader = connect(&app, &stream, Some(3)).await;
    let (n, _, revision) = event_of(&reader.next(WAIT).await.expect("open"));
    assert_eq!((n, revision), (4, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_a_multiplexed_stream_with_a_final_event() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("mux-stop").await;
    assert_eq!(app.join(&chat, "ann").await.status(), StatusCode::CREATED);
    let stream = create(&app, cursors(&[(&chat, 0)])).await;
    let mut reader = connect(&app, &stream, None).await;
    assert_eq!(event_of(&reader.next(WAIT).await.expect("open")).0, 1);
    let started = Instant::now();
    let stopping = tokio::spawn(app.shut_down());
    let last = reader.next(WAIT).await.expect("a final event");
    assert_eq!(last.event.as_deref(), Some("shutdown"));
    let data: Value = serde_json::from_str(&last.data).expect("json");
    assert_eq!(data["lastEventId"], 1);
    assert!(reader.next(WAIT).await.is_none(), "the stream ended");
    stopping.await.expect("stopped");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

async fn set_streams(app: &TestApp, streams: Value) {
    let r = app
        .admin(Method::PATCH, "/v1/admin/config")
        .header("content-type", "application/merge-patch+json")
        .body(json!({ "streams": streams }).to_string())
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_event_id_that_is_not_a_message_number_is_refused_like_the_chat_streams() {
    use crate::stream::{refuses_every_bad_last_event_id, with_last_event_id};
    let app = TestApp::spawn().await;
    let chat = app.new_chat("mux-id").await;
    let stream = create(&app, cursors(&[(&chat, 0)])).await;
    let path = format!("/v1/streams/{stream}");
    refuses_every_bad_last_event_id(&app, &path).await;
    // Empty is no id at all: the stream starts from its cursors.
    let r = with_last_event_id(&app, Method::GET, &path, b"").await;
    assert_eq!(r.status(), StatusCode::OK);
    drop(r);
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_made_without_a_body_and_a_null_body_is_refused_as_documented() {
    let app = TestApp::spawn().await;
    // The document declares the body optional and never null.
    let document: Value = app.get("/openapi.json").await.json().await.expect("json");
    let body = &document["paths"]["/v1/streams"]["post"]["requestBody"];
    assert_eq!(body["required"], json!(false));
    assert_eq!(
        body["content"]["application/json"]["schema"],
        json!({"$ref": "#/components/schemas/CreateStreamRequest"})
    );
    let r = app
        .http
        .post(app.url("/v1/streams"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = app
        .http
        .post(app.url("/v1/streams"))
        .header("content-type", "application/json")
        .body("null")
        .send()
        .await
        .expect("request");
    assert_problem(r, 422, "invalid_request").await;
    app.shut_down().await;
}
