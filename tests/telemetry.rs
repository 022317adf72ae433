//! Traces as an SRE receives them: an OTLP/HTTP receiver runs inside this test,
//! decodes what chatshard exports, and the test checks the spans.
//!
//! Its own test binary: the tracing subscriber is global to the process.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use chatshard::app::App;
use chatshard::config::{Settings, ShardSettings};
use chatshard::localdb::{DEFAULT_DATABASE, LocalMariaDb, LocalMariaDbOptions};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const SECRET: &str = "SECRET-MESSAGE-TEXT-7f3a";
const TOKEN: &str = "telemetry-test-admin-token";

#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    raw: Vec<u8>,
}

async fn receiver() -> (String, Arc<Mutex<Received>>) {
    let received = Arc::new(Mutex::new(Received::default()));
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                let request =
                    ExportTraceServiceRequest::decode(body.as_ref()).expect("OTLP protobuf");
                let mut r = sink.lock().unwrap();
                r.raw.extend_from_slice(&body);
                for rs in request.resource_spans {
                    for ss in rs.scope_spans {
                        r.spans.extend(ss.spans);
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), received)
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a any_value::Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn attr_str(span: &Span, key: &str) -> Option<String> {
    match attr(span, key)? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Not yet passing: some server spans never reach the exporter, and the
/// `hot_chat_marked` event is missing from the tipping join's span (see
/// docs/observability.md, "Known gaps"). Run with `cargo test --test telemetry
/// -- --ignored` while fixing it.
#[ignore = "known gap: some spans and events are not exported yet"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_the_collector_with_parents_attributes_and_events() {
    let (endpoint, received) = receiver().await;
    let mut settings = Settings::from_toml_unvalidated("listen = \"127.0.0.1:0\"", []).unwrap();
    settings.telemetry.otlp_endpoint = endpoint;
    let tracing = chatshard::telemetry::init(&settings.telemetry).unwrap();
    assert!(tracing.exporting());

    // One real shard, and one whose port answers nothing (connections refused).
    let server = LocalMariaDb::start(LocalMariaDbOptions::temp())
        .await
        .unwrap();
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    settings.shards = vec![
        ShardSettings {
            name: "shard-0".into(),
            url: server.url(DEFAULT_DATABASE),
            buckets: vec!["0-511".into()],
        },
        ShardSettings {
            name: "shard-dead".into(),
            url: format!("mysql://root@127.0.0.1:{dead_port}/chatshard"),
            buckets: vec!["512-1023".into()],
        },
    ];
    chatshard::migrate::migrate_shard(&settings.shards[0])
        .await
        .unwrap();
    settings.admin.token = TOKEN.into();
    settings.breaker.consecutive_failures = 2;
    settings.breaker.open_ms = 60_000;
    let app = App::build(&settings).await.unwrap();
    let base = format!("http://{}", app.local_addr().unwrap());
    tokio::spawn(async move { app.run(std::future::pending()).await.unwrap() });
    let http = reqwest::Client::new();
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");

    // A chat on the live shard and one on the dead shard.
    let (mut live_chat, mut dead_chat) = (None, None);
    for i in 0..50 {
        let chat = format!("t-{i}");
        let bucket =
            chatshard::routing::bucket_of(&chatshard::domain::ChatId::parse(&chat).unwrap());
        if bucket < 512 && live_chat.is_none() {
            live_chat = Some(chat);
        } else if bucket >= 512 && dead_chat.is_none() {
            dead_chat = Some(chat);
        }
    }
    let (chat, dead) = (live_chat.unwrap(), dead_chat.unwrap());
    http.put(format!("{base}/v1/admin/config"))
        .bearer_auth(TOKEN)
        .json(&json!({
            "joinThrottle": {"overrides": {chat.clone(): {"limit": 1, "windowSeconds": 3600}}},
            "hotChat": {"overrides": {chat.clone(): {"threshold": 1, "throttleRate": 0.0}}}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        http.put(format!("{base}/v1/chats/{chat}"))
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    let joined = http
        .post(format!("{base}/v1/chats/{chat}/members"))
        .header("traceparent", &traceparent)
        .json(&json!({"userId": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(joined.status(), 201);
    assert_eq!(joined.headers()["x-request-id"], TRACE_ID);
    if let Some(tr) = joined.headers().get("traceresponse") {
        assert!(
            tr.to_str().unwrap().starts_with(&format!("00-{TRACE_ID}-")),
            "{tr:?}"
        );
    }
    let posted = http
        .post(format!("{base}/v1/chats/{chat}/messages"))
        .header("traceparent", &traceparent)
        .json(&json!({"senderId": "alice", "clientMessageId": "m1", "text": SECRET}))
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 201);
    let throttled = http
        .post(format!("{base}/v1/chats/{chat}/members"))
        .header("traceparent", &traceparent)
        .json(&json!({"userId": "bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(throttled.status(), 429);
    let events = http
        .get(format!("{base}/v1/chats/{chat}/events"))
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    for _ in 0..4 {
        let r = http
            .get(format!("{base}/v1/chats/{dead}"))
            .header("traceparent", &traceparent)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
    }

    // Everything above is exported: poll the receiver with a deadline.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        tracing.flush().await;
        let done = {
            let r = received.lock().unwrap();
            let names: Vec<&str> = r
                .spans
                .iter()
                .flat_map(|s| s.events.iter().map(|e| e.name.as_str()))
                .collect();
            [
                "join_throttled",
                "hot_chat_marked",
                "breaker_opened",
                "bulkhead_rejected",
            ]
            .iter()
            .all(|n| names.contains(n))
                && r.spans.iter().filter(|s| s.kind == 2).count() >= 8
        };
        if done {
            break;
        }
        if Instant::now() >= deadline {
            let r = received.lock().unwrap();
            for s in &r.spans {
                eprintln!(
                    "span {} kind {} events {:?}",
                    s.name,
                    s.kind,
                    s.events.iter().map(|e| e.name.clone()).collect::<Vec<_>>()
                );
            }
            panic!("the expected spans were not exported");
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval
    }

    let r = std::mem::take(&mut *received.lock().unwrap());
    // Server spans are children of the caller's span, in the caller's trace.
    let servers: Vec<&Span> = r
        .spans
        .iter()
        .filter(|s| s.kind == 2 && hex(&s.trace_id) == TRACE_ID)
        .collect();
    assert!(servers.len() >= 8, "{} server spans", servers.len());
    for s in &servers {
        assert_eq!(hex(&s.parent_span_id), CALLER_SPAN);
        assert!(attr_str(s, "http.request.method").is_some());
        assert!(
            attr_str(s, "http.route")
                .unwrap()
                .starts_with("/v1/chats/{chatId}")
        );
        assert!(attr_str(s, "http.response.status_code").is_some());
        let chat_attr = attr_str(s, "chatshard.chat_id").unwrap();
        assert_eq!(chat_attr.len(), 16, "chat ids are hashed by default");
        assert!(!chat_attr.contains("t-"));
        assert!(attr_str(s, "chatshard.shard").is_some());
    }
    let join = servers
        .iter()
        .find(|s| {
            attr_str(s, "http.route").as_deref() == Some("/v1/chats/{chatId}/members")
                && attr_str(s, "http.response.status_code").as_deref() == Some("201")
        })
        .expect("the join's server span");
    assert_eq!(
        attr_str(join, "chatshard.shard").as_deref(),
        Some("shard-0")
    );
    // Its database work is a client span below it.
    let db = r
        .spans
        .iter()
        .find(|s| s.kind == 3 && s.parent_span_id == join.span_id)
        .expect("a database span under the join");
    assert_eq!(attr_str(db, "db.system.name").as_deref(), Some("mysql"));
    assert_eq!(attr_str(db, "db.namespace").as_deref(), Some("chatshard"));
    assert_eq!(
        attr_str(db, "db.operation.name").as_deref(),
        Some("commit_batch")
    );
    assert_eq!(attr_str(db, "server.address").as_deref(), Some("127.0.0.1"));
    assert_eq!(attr_str(db, "server.port"), Some(server.port().to_string()));
    assert_eq!(
        attr_str(db, "chatshard.breaker.state").as_deref(),
        Some("closed")
    );
    assert!(attr_str(db, "chatshard.bulkhead.wait_ms").is_some());
    assert!(attr_str(db, "chatshard.bulkhead.in_flight").is_some());
    // The throttled join carries its decision and its error code.
    let throttled = servers
        .iter()
        .find(|s| attr_str(s, "http.response.status_code").as_deref() == Some("429"))
        .expect("the throttled join");
    assert_eq!(
        attr_str(throttled, "error.type").as_deref(),
        Some("join_throttled")
    );
    assert!(throttled.events.iter().any(|e| e.name == "join_throttled"));
    // The dead shard: failed database spans with error status, the breaker
    // opening, then refusals without touching the network.
    let failed: Vec<&Span> = r
        .spans
        .iter()
        .filter(|s| s.kind == 3 && attr_str(s, "chatshard.shard").as_deref() == Some("shard-dead"))
        .collect();
    assert!(
        failed
            .iter()
            .all(|s| s.status.as_ref().is_some_and(|st| st.code == 2)
                || attr_str(s, "error.type").as_deref() == Some("breaker_open"))
    );
    assert!(
        failed
            .iter()
            .any(|s| s.events.iter().any(|e| e.name == "breaker_opened"))
    );
    assert!(
        failed
            .iter()
            .any(|s| s.events.iter().any(|e| e.name == "bulkhead_rejected"))
    );
    let unavailable = servers
        .iter()
        .find(|s| attr_str(s, "chatshard.shard").as_deref() == Some("shard-dead"))
        .unwrap();
    assert_eq!(unavailable.status.as_ref().map(|s| s.code), Some(2));
    // No message text anywhere in what was exported.
    let raw = String::from_utf8_lossy(&r.raw);
    assert!(!raw.contains(SECRET), "message text leaked into telemetry");
    tracing.shutdown().await;
}
