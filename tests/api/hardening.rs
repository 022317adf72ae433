//! What outside testing found: bodies that are not objects, made-up methods
//! growing the metrics, a lower-case bearer scheme, framework answers that
//! were not problem+json, and connections that held their place without ever
//! being used (HTTP/2 prefaces, silent sockets, idle HTTP/2 connections).

use std::pin::Pin;
use std::time::{Duration, Instant};

use hyper::body::{Body as _, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use reqwest::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::common;
use crate::helpers::{TestApp, assert_problem};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_array_is_never_taken_for_an_object() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("strict").await;
    let send = |method: Method, path: String, body: &'static str| {
        app.http
            .request(method, app.url(&path))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let members = format!("/v1/chats/{chat}/members");
    let r = send(Method::POST, members.clone(), r#"["x"]"#)
        .await
        .unwrap();
    let body = assert_problem(r, 422, "invalid_request").await;
    assert_eq!(body["detail"], "the body must be an object");
    let r = send(Method::PUT, format!("/v1/chats/{chat}"), "[1]")
        .await
        .unwrap();
    assert_problem(r, 422, "invalid_request").await;
    let r = send(
        Method::POST,
        format!("/v1/chats/{chat}/messages"),
        r#"["a","b","c"]"#,
    )
    .await
    .unwrap();
    assert_problem(r, 422, "invalid_request").await;
    // Nothing was written: no member, the limit unchanged.
    assert_eq!(app.count(&chat).await, 0);
    let got: serde_json::Value = app
        .get(&format!("/v1/chats/{chat}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got["maxMembers"], app.settings.defaults.max_members);
    // An optional body may be absent, or empty even with a JSON content type.
    let r = send(Method::PUT, format!("/v1/chats/{chat}"), "")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_methods_do_not_grow_the_metrics() {
    let app = TestApp::spawn().await;
    for i in 0..50 {
        let method = Method::from_bytes(format!("ZZZ{i}").as_bytes()).unwrap();
        let r = app
            .http
            .request(method, app.url("/healthz"))
            .send()
            .await
            .unwrap();
        assert_problem(r, 405, "method_not_allowed").await;
    }
    let samples = common::metric_samples(
        &app.http,
        &app.base,
        "http_server_request_duration_seconds_count",
    )
    .await;
    assert!(
        samples.iter().all(|(labels, _)| !labels.contains("ZZZ")),
        "{samples:?}"
    );
    let other = common::sum_where(&samples, &["http_request_method=\"_OTHER\""]);
    assert_eq!(other, 50.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive() {
    let token = "hardening-tests-admin-token";
    let app = TestApp::spawn_with(|s| s.admin.token = token.to_owned()).await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let r = app
            .http
            .get(app.url("/v1/admin/shards"))
            .header("authorization", format!("{scheme} {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_targets_and_repeated_parameters_get_problem_answers() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("long").await;
    let long = format!("/v1/chats/{chat}/events?pad={}", "a".repeat(20_000));
    let body = assert_problem(app.get(&long).await, 414, "uri_too_long").await;
    assert!(body["detail"].as_str().unwrap().contains("8192"), "{body}");
    let r = app
        .get(&format!("/v1/chats/{chat}/events?after=1&after=2"))
        .await;
    let body = assert_problem(r, 422, "invalid_request").await;
    assert_eq!(
        body["detail"],
        "the query parameter `after` is given more than once"
    );
    let r = app.get(&format!("/v1/chats/{chat}/events?after=%ZZ")).await;
    assert_problem(r, 422, "invalid_request").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_config_array_bodies_never_reset_the_config() {
    let token = "hardening-tests-admin-token";
    let app = TestApp::spawn_with(|s| s.admin.token = token.to_owned()).await;
    let before = app.admin_get("/v1/admin/config").await;
    let r = app
        .admin(Method::PUT, "/v1/admin/config")
        .json(&json!([]))
        .send()
        .await
        .unwrap();
    assert_problem(r, 422, "invalid_config").await;
    assert_eq!(app.admin_get("/v1/admin/config").await, before);
}

/// The HTTP/2 client preface (prior knowledge) and an empty SETTINGS frame.
const H2_GREETING: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
const GOAWAY: u8 = 0x7;
/// A connection's first request (or its idle time) and its close, in ms.
const TIMEOUT_MS: u64 = 1_000;
const CLOSE_MS: u64 = 500;
/// Scheduling slack on a loaded machine, on top of what the server allows.
const SLACK: Duration = Duration::from_secs(5);

/// Settings where unused connections are short-lived: `places` connections
/// at most, HTTP/2 PINGs every `ping_ms` (0: none, so that only the
/// connection loop's own timeouts close a client that answers nothing).
fn short_lived(s: &mut chatshard::config::Settings, places: usize, ping_ms: u64) {
    s.http.max_connections = places;
    s.http.header_read_timeout_ms = TIMEOUT_MS;
    s.http.idle_timeout_ms = TIMEOUT_MS;
    s.http.ping_interval_ms = ping_ms;
    s.http.ping_timeout_ms = CLOSE_MS;
}

/// Reads `stream` until the server closes it (EOF or reset), failing at
/// `deadline`; what was read.
async fn read_until_closed(stream: &mut TcpStream, deadline: Instant) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline.into(), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("still open at the deadline; read {got:?}"),
        }
    }
}

/// The types of the HTTP/2 frames in `bytes` (whole frames only).
fn frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        types.push(bytes[3]);
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    types
}

/// Fills every place of `app` (`places`) with connections that send
/// `greeting` and then nothing; checks that one more is refused, that the
/// server closes each of them no sooner than the first-request timeout and
/// within it plus the close time (and slack), and that a new client is then
/// served. What each one received.
async fn unused_connections_are_closed(
    app: &TestApp,
    places: usize,
    greeting: &[u8],
) -> Vec<Vec<u8>> {
    let addr = app.base.trim_start_matches("http://").to_owned();
    let started = Instant::now();
    let mut held = Vec::new();
    for _ in 0..places {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream.write_all(greeting).await.unwrap();
        held.push(stream);
    }
    // Every place is taken.
    let mut extra = TcpStream::connect(&addr).await.unwrap();
    let refusal = read_until_closed(&mut extra, Instant::now() + SLACK).await;
    let refusal = String::from_utf8_lossy(&refusal);
    assert!(refusal.starts_with("HTTP/1.1 503"), "{refusal}");
    assert!(refusal.contains("too_many_connections"), "{refusal}");
    let timeout = Duration::from_millis(TIMEOUT_MS);
    let deadline = started + timeout + Duration::from_millis(CLOSE_MS) + SLACK;
    let mut received = Vec::new();
    for stream in &mut held {
        received.push(read_until_closed(stream, deadline).await);
        assert!(
            started.elapsed() >= timeout,
            "closed after {:?}",
            started.elapsed()
        );
    }
    eprintln!(
        "{places} unused connections closed within {:?}",
        started.elapsed()
    );
    // Their places are free again.
    let r = app.get("/healthz").await;
    assert_eq!(r.status(), 200);
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prefaces_without_a_request_are_closed_with_goaway_and_free_their_places() {
    let app = TestApp::spawn_with(|s| short_lived(s, 20, 0)).await;
    let received = unused_connections_are_closed(&app, 20, H2_GREETING).await;
    for bytes in received {
        assert!(frame_types(&bytes).contains(&GOAWAY), "{bytes:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_free_their_places() {
    // Nothing at all, or too little to tell HTTP/1 from HTTP/2; an app each,
    // as the check that places are free again keeps a connection open.
    for greeting in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
        let app = TestApp::spawn_with(|s| short_lived(s, 20, 0)).await;
        let received = unused_connections_are_closed(&app, 20, greeting).await;
        assert!(received.iter().all(Vec::is_empty), "{received:?}");
    }
}

/// An HTTP/2 (prior knowledge) client connection of hyper's, which answers
/// the server's PINGs.
struct H2 {
    send: hyper::client::conn::http2::SendRequest<String>,
    /// Ends when the connection is closed.
    closed: tokio::task::JoinHandle<Result<(), hyper::Error>>,
    base: String,
}

impl H2 {
    async fn connect(app: &TestApp) -> Self {
        let tcp = TcpStream::connect(app.base.trim_start_matches("http://"))
            .await
            .unwrap();
        let (send, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        Self {
            send,
            closed: tokio::spawn(connection),
            base: app.base.clone(),
        }
    }

    async fn get(&mut self, path: &str) -> hyper::Response<Incoming> {
        self.send.ready().await.unwrap();
        let request = hyper::Request::get(format!("{}{path}", self.base))
            .body(String::new())
            .unwrap();
        let response = self.send.send_request(request).await.unwrap();
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        response
    }

    /// Waits until the server closed the connection, at most `within`.
    async fn wait_closed(&mut self, within: Duration) {
        let ended = tokio::time::timeout(within, &mut self.closed)
            .await
            .unwrap_or_else(|_| panic!("the connection is still open after {within:?}"));
        ended.unwrap().unwrap();
    }
}

/// The next data of `body` (trailers skipped); `None` at its end.
async fn next_data(body: &mut Incoming) -> Option<Vec<u8>> {
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await?;
        if let Ok(data) = frame.unwrap().into_data() {
            return Some(data.to_vec());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let app = TestApp::spawn_with(|s| short_lived(s, 20, 200)).await;
    let mut h2 = H2::connect(&app).await;
    let asked = Instant::now();
    let mut r = h2.get("/healthz").await;
    assert_eq!(r.status(), 200);
    while next_data(r.body_mut()).await.is_some() {}
    // Answering the server's PINGs does not keep it open.
    h2.wait_closed(Duration::from_millis(TIMEOUT_MS) + SLACK)
        .await;
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_millis(TIMEOUT_MS),
        "closed after {took:?}"
    );
    eprintln!("an idle HTTP/2 connection closed {took:?} after its request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_event_stream_is_not_idle() {
    let app = TestApp::spawn_with(|s| short_lived(s, 20, 200)).await;
    let chat = app.new_chat("h2-idle").await;
    let mut streaming = H2::connect(&app).await;
    let mut stream = streaming
        .get(&format!("/v1/chats/{chat}/events/stream?after=0"))
        .await;
    assert_eq!(stream.status(), 200);
    // Another connection, idle since after the stream opened, is closed: the
    // idle timeout has passed for the stream's connection too.
    let mut idle = H2::connect(&app).await;
    let mut r = idle.get("/healthz").await;
    while next_data(r.body_mut()).await.is_some() {}
    idle.wait_closed(Duration::from_millis(TIMEOUT_MS) + SLACK)
        .await;
    assert!(
        !streaming.closed.is_finished(),
        "the stream's connection was closed"
    );
    // The stream still delivers what is written now.
    assert_eq!(app.join(&chat, "u").await.status(), 201);
    let text = "written-after-the-idle-timeout";
    assert_eq!(app.post(&chat, "u", "k1", text).await.status(), 201);
    let mut seen = String::new();
    let deadline = Instant::now() + SLACK;
    while !seen.contains(text) {
        let data = tokio::time::timeout_at(deadline.into(), next_data(stream.body_mut()))
            .await
            .unwrap_or_else(|_| panic!("no event within {SLACK:?}; saw {seen}"))
            .unwrap_or_else(|| panic!("the stream ended; saw {seen}"));
        seen.push_str(&String::from_utf8_lossy(&data));
    }
    assert!(!streaming.closed.is_finished());
}
