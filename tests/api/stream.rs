//! Server-sent events of one chat: every revision once and in order under
//! concurrent writers, `Last-Event-ID` resume, the limits, and a final event
//! at shutdown.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{SseReader, Wait, eventually};
use crate::helpers::{TestApp, assert_problem};

const TOKEN: &str = "stream-tests-admin-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_carries_every_revision_once_in_order_and_resumes_after_last_event_id() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("sse").await;
    const WRITERS: usize = 3;
    const POSTS: usize = 20;
    let total = app.join_writers(&chat, WRITERS, POSTS).await;
    let mut reader = SseReader::open(
        &app.http,
        &app.base,
        &format!("/v1/chats/{chat}/events/stream?after=0"),
        None,
    )
    .await
    .unwrap_or_else(|r| panic!("stream opened: {}", r.status()));
    app.post_concurrently(&chat, WRITERS, POSTS).await;
    let mut seen = Vec::new();
    while (seen.len() as u64) < total {
        let event = reader
            .next(Duration::from_secs(20))
            .await
            .expect("stream open");
        let id: u64 = event.id.expect("id").parse().expect("numeric id");
        let data: Value = serde_json::from_str(&event.data).expect("json data");
        assert_eq!(data["revision"], id);
        seen.push(id);
    }
    assert_eq!(seen, (1..=total).collect::<Vec<_>>());

    // A reconnect with Last-Event-ID resumes exactly after it.
    let mut reader = SseReader::open(
        &app.http,
        &app.base,
        &format!("/v1/chats/{chat}/events/stream?after=0"),
        Some(40),
    )
    .await
    .unwrap_or_else(|r| panic!("stream reopened: {}", r.status()));
    let first = reader.next(Duration::from_secs(10)).await.expect("event");
    assert_eq!(first.id.as_deref(), Some("41"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_limited_per_chat_and_a_missing_chat_is_404() {
    let app = TestApp::spawn_with(|s| s.admin.token = TOKEN.to_owned()).await;
    let chat = app.new_chat("sse-limit").await;
    let r = app
        .admin(Method::PATCH, "/v1/admin/config")
        .header("content-type", "application/merge-patch+json")
        .body(json!({"streams": {"maxPerChat": 1}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let path = format!("/v1/chats/{chat}/events/stream");
    let first = SseReader::open(&app.http, &app.base, &path, None)
        .await
        .unwrap_or_else(|r| panic!("first stream: {}", r.status()));
    let r = SseReader::open(&app.http, &app.base, &path, None)
        .await
        .err()
        .expect("a refusal");
    assert!(r.headers().contains_key("retry-after"));
    assert_problem(r, 503, "too_many_subscribers").await;
    drop(first);
    // The place is freed when the client goes away.
    Wait::new(Duration::from_secs(10), "the place freed")
        .until(|| async {
            match SseReader::open(&app.http, &app.base, &path, None).await {
                Ok(_) => Ok(()),
                Err(r) => {
                    assert_eq!(r.status(), 503);
                    Err(503)
                }
            }
        })
        .await;
    let r = SseReader::open(
        &app.http,
        &app.base,
        "/v1/chats/no-such-chat-x/events/stream",
        None,
    )
    .await
    .err()
    .expect("a refusal");
    assert_problem(r, 404, "chat_not_found").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_every_stream_with_a_final_event() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("sse-stop").await;
    assert_eq!(app.join(&chat, "ann").await.status(), StatusCode::CREATED);
    let mut readers = Vec::new();
    for _ in 0..5 {
        let r = SseReader::open(
            &app.http,
            &app.base,
            &format!("/v1/chats/{chat}/events/stream"),
            None,
        )
        .await;
        readers.push(r.unwrap_or_else(|r| panic!("stream refused: {}", r.status())));
    }
    for r in &mut readers {
        assert_eq!(
            r.next(Duration::from_secs(10))
                .await
                .expect("event")
                .id
                .as_deref(),
            Some("1")
        );
    }
    let started = Instant::now();
    let stopping = tokio::spawn(app.shut_down());
    for r in &mut readers {
        let last = r
            .next(Duration::from_secs(10))
            .await
            .expect("a final event");
        assert_eq!(last.event.as_deref(), Some("shutdown"));
        let data: Value = serde_json::from_str(&last.data).expect("json");
        assert_eq!(data["lastEventId"], 1);
        assert!(
            r.next(Duration::from_secs(10)).await.is_none(),
            "the stream ended"
        );
    }
    stopping.await.expect("stopped");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_slows_nobody_and_is_disconnected() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let app = TestApp::spawn_with(|s| {
        s.http.write_stall_timeout_ms = 1_000;
        s.http.socket_send_buffer_bytes = 32 * 1024;
    })
    .await;
    let chat = app.new_chat("sse-slow").await;
    assert_eq!(app.join(&chat, "w0").await.status(), StatusCode::CREATED);
    let path = format!("/v1/chats/{chat}/events/stream?after=1");
    let mut reader = SseReader::open(&app.http, &app.base, &path, None)
        .await
        .unwrap_or_else(|r| panic!("stream opened: {}", r.status()));
    // A client with a small receive window that never reads.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("buffer size");
    let address = app
        .base
        .trim_start_matches("http://")
        .parse()
        .expect("address");
    let mut slow = socket.connect(address).await.expect("connect");
    slow.write_all(format!("GET {path} HTTP/1.1\r\nhost: chatshard\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let stalled = || async {
        let samples = crate::common::metric_samples(
            &app.http,
            &app.base,
            "chatshard_http_stalled_connections_total",
        )
        .await;
        crate::common::sum_where(&samples, &[])
    };
    let before = stalled().await;
    // 200 events of 4 KB: far more than the slow client's window and the
    // server's send buffer. The reading subscriber reads as they come (one
    // that waited for the last post to read would stall, and be cut, too),
    // and gets every one, in order.
    const POSTS: u64 = 200;
    let reading = tokio::spawn(async move {
        for revision in 2..=POSTS + 1 {
            let event = reader.next(Duration::from_secs(20)).await.expect("open");
            assert_eq!(event.id, Some(revision.to_string()));
        }
    });
    let text = "x".repeat(4000);
    for i in 0..POSTS {
        let r = app.post(&chat, "w0", &format!("k{i}"), &text).await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    reading.await.expect("the reading subscriber");
    // The one that stopped reading is closed once its writes stall.
    eventually(
        Duration::from_secs(20),
        "the stalled connection closed",
        || async { stalled().await > before },
    )
    .await;
    // What it can still read ends: the server closed it.
    let mut sink = vec![0; 64 * 1024];
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match slow.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the slow connection stayed open");
}

/// The answer of `path` to `Last-Event-ID: value`.
pub(crate) async fn with_last_event_id(
    app: &TestApp,
    method: Method,
    path: &str,
    value: &[u8],
) -> reqwest::Response {
    let header = reqwest::header::HeaderValue::from_bytes(value).expect("a header value");
    app.http
        .request(method, app.url(path))
        .header("last-event-id", header)
        .send()
        .await
        .expect("request")
}

/// `Last-Event-ID` values that are not ids: both streams refuse them (422).
pub(crate) const NOT_IDS: [&[u8]; 6] = [
    b"\xc2\x84",
    b"null",
    b"-1",
    b"+5",
    b"1e3",
    b"1234567890123456789",
];

/// Every value of [`NOT_IDS`] as `Last-Event-ID` of a GET of `path` is
/// answered 422 `invalid_request`, naming the header.
pub async fn refuses_every_bad_last_event_id(app: &TestApp, path: &str) {
    for value in NOT_IDS {
        let r = with_last_event_id(app, Method::GET, path, value).await;
        let p = assert_problem(r, 422, "invalid_request").await;
        assert!(
            p["detail"]
                .as_str()
                .is_some_and(|d| d.contains("Last-Event-ID")),
            "{value:?}: {p}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_event_id_that_is_not_a_revision_is_refused_with_422() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("sse-id").await;
    let path = format!("/v1/chats/{chat}/events/stream?after=0");
    // The rule of the multiplexed stream too (tests/api/mux.rs): 1 to 18
    // digits, or empty for none.
    refuses_every_bad_last_event_id(&app, &path).await;
    // Empty is no id at all (the SSE spec resets to it): `after` applies.
    for value in [&b""[..], b"0"] {
        let r = with_last_event_id(&app, Method::GET, &path, value).await;
        assert_eq!(r.status(), StatusCode::OK, "{value:?}");
    }
    app.shut_down().await;
}
