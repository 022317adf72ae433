//! Traces as an SRE receives them: an OTLP/HTTP receiver runs inside this test,
//! decodes what chatshard exports, and the test checks the spans.
//!
//! Its own test binary: the tracing subscriber is global to the process.

#[path = "common/mod.rs"]
mod common;

use common::{TestApp, Wait};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use chatshard::config::ShardSettings;
use chatshard::localdb::cluster::Location;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
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
    /// Metric names with the `shard` attribute values seen on their points.
    metrics: Vec<(String, Vec<String>)>,
}

fn shards_of(metric: &opentelemetry_proto::tonic::metrics::v1::Metric) -> Vec<String> {
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    let attrs: Vec<&Vec<opentelemetry_proto::tonic::common::v1::KeyValue>> =
        match metric.data.as_ref() {
            Some(Data::Gauge(g)) => g.data_points.iter().map(|p| &p.attributes).collect(),
            Some(Data::Sum(s)) => s.data_points.iter().map(|p| &p.attributes).collect(),
            Some(Data::Histogram(h)) => h.data_points.iter().map(|p| &p.attributes).collect(),
            _ => Vec::new(),
        };
    attrs
        .into_iter()
        .flatten()
        .filter(|kv| kv.key == "shard")
        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

async fn receiver() -> (String, Arc<Mutex<Received>>) {
    let received = Arc::new(Mutex::new(Received::default()));
    let sink = received.clone();
    let metrics_sink = received.clone();
    let app = axum::Router::new()
        .route(
            "/v1/metrics",
            axum::routing::post(move |body: Bytes| {
                let sink = metrics_sink.clone();
                async move {
                    let request =
                        ExportMetricsServiceRequest::decode(body.as_ref()).expect("OTLP protobuf");
                    let mut r = sink.lock().unwrap();
                    for rm in request.resource_metrics {
                        for sm in rm.scope_metrics {
                            for m in sm.metrics {
                                let shards = shards_of(&m);
                                r.metrics.push((m.name, shards));
                            }
                        }
                    }
                    (
                        [("content-type", "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }
            }),
        )
        .route(
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

/// JSON log lines, kept in memory (also copied to stderr for a failing run).
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        std::io::stderr().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = Self;
    fn make_writer(&'a self) -> Self {
        self.clone()
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_the_collector_with_parents_attributes_and_events() {
    let (endpoint, received) = receiver().await;
    // One real shard, and one whose port answers nothing (connections refused).
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let prepared = TestApp::builder()
        .own_shards(1, Location::Temp)
        .configure(move |settings| {
            settings.telemetry.otlp_endpoint = endpoint;
            settings.shards[0].buckets = vec!["0-511".into()];
            settings.shards.push(ShardSettings {
                name: "shard-dead".into(),
                url: format!("mysql://root@127.0.0.1:{dead_port}/chatshard"),
                buckets: vec!["512-1023".into()],
                id_block: None,
                replicas: vec![],
            });
            settings.admin.token = TOKEN.into();
            settings.breaker.consecutive_failures = 2;
            settings.breaker.open_ms = 60_000;
        })
        .prepare()
        .await;
    let logs = LogBuffer::default();
    let tracing = chatshard::telemetry::init_with_writer(
        &prepared.settings.telemetry,
        chatshard::telemetry::LogFormat::Json,
        tracing_subscriber::fmt::writer::BoxMakeWriter::new(logs.clone()),
        false,
    )
    .unwrap();
    assert!(tracing.exporting());
    let app = prepared.start().await;
    let (base, http) = (app.base.clone(), app.http.clone());
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");

    // Two chats on the live shard and one on the dead shard.
    let (mut live, mut dead_chat) = (Vec::new(), None);
    for i in 0..100 {
        let chat = format!("t-{i}");
        let bucket =
            chatshard::routing::bucket_of(&chatshard::domain::ChatId::parse(&chat).unwrap());
        if bucket < 512 && live.len() < 3 {
            live.push(chat);
        } else if bucket >= 512 && dead_chat.is_none() {
            dead_chat = Some(chat);
        }
    }
    let (chat, dry, crowd, dead) = (
        live[0].clone(),
        live[1].clone(),
        live[2].clone(),
        dead_chat.unwrap(),
    );
    // `chat` is throttled for real and turns hot at its first write; `dry` is
    // throttled in dry run only.
    let configured = http
        .patch(format!("{base}/v1/admin/config"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/merge-patch+json")
        .body(
            json!({
                "joinThrottle": {"overrides": {
                    chat.clone(): {"limit": 1, "windowSeconds": 3600},
                    dry.clone(): {"limit": 1, "windowSeconds": 3600, "dryRun": true}
                }},
                "hotChat": {"overrides": {chat.clone(): {"threshold": 1, "throttleRate": 1.0}}}
            })
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(configured.status(), 200);
    for c in [&chat, &dry, &crowd] {
        assert_eq!(
            http.put(format!("{base}/v1/chats/{c}"))
                .send()
                .await
                .unwrap()
                .status(),
            201
        );
    }
    for user in ["carol", "dave"] {
        let r = http
            .post(format!("{base}/v1/chats/{dry}/members"))
            .header("traceparent", &traceparent)
            .json(&json!({"userId": user}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "dry run never refuses");
    }
    let joined = http
        .post(format!("{base}/v1/chats/{chat}/members"))
        .header("traceparent", &traceparent)
        .json(&json!({"userId": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(joined.status(), 201);
    assert_eq!(joined.headers()["x-request-id"], TRACE_ID);
    let join_span_id = joined.headers()["traceresponse"]
        .to_str()
        .unwrap()
        .strip_prefix(&format!("00-{TRACE_ID}-"))
        .and_then(|rest| rest.strip_suffix("-01"))
        .expect("traceresponse names the caller's trace and the server span")
        .to_owned();
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
    // Concurrent joins to one chat, committed in group: each request's trace
    // leads to the transaction that committed it.
    const CROWD: usize = 24;
    let crowd_traces: Vec<String> = (0..CROWD)
        .map(|i| format!("{:032x}", 0x00c0_ffee_0000_u128 + i as u128))
        .collect();
    let joins = crowd_traces.iter().enumerate().map(|(i, trace)| {
        let (http, url) = (http.clone(), format!("{base}/v1/chats/{crowd}/members"));
        let traceparent = format!("00-{trace}-{CALLER_SPAN}-01");
        async move {
            http.post(url)
                .header("traceparent", traceparent)
                .json(&json!({"userId": format!("u{i}")}))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    for status in futures::future::join_all(joins).await {
        assert_eq!(status, 201);
    }

    // The chat is hot and its throttle rate is 1: its fetches are refused.
    let events = http
        .get(format!("{base}/v1/chats/{chat}/events"))
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 429);
    for _ in 0..4 {
        let r = http
            .get(format!("{base}/v1/chats/{dead}"))
            .header("traceparent", &traceparent)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
    }

    // A filter pass that every layer refuses (sqlx runs one after each query
    // through `log_enabled!`) must not leak into the next span on the thread.
    // (`log_enabled!` answers true here: the registry only says false when all
    // 64 possible filters refused.)
    let _ = log::log_enabled!(target: "sqlx::query", log::Level::Debug);
    tracing::info_span!("probe_after_refused_log").in_scope(|| {
        tracing::info!("probe_event");
    });

    // Everything above is exported: poll the receiver, within a bound.
    Wait::new(Duration::from_secs(20), "the expected spans exported")
        .every(Duration::from_millis(50))
        .until(|| async {
            tracing.flush().await;
            let r = received.lock().unwrap();
            let names: Vec<&str> = r
                .spans
                .iter()
                .flat_map(|s| s.events.iter().map(|e| e.name.as_str()))
                .collect();
            let done = [
                "join_throttled",
                "join_throttled_dry_run",
                "fetch_throttled",
                "hot_chat_marked",
                "breaker_opened",
                "bulkhead_rejected",
            ]
            .iter()
            .all(|n| names.contains(n))
                && r.spans
                    .iter()
                    .filter(|s| s.kind == 2 && hex(&s.trace_id) == TRACE_ID)
                    .count()
                    >= 10
                && r.spans
                    .iter()
                    .filter(|s| s.kind == 2 && crowd_traces.contains(&hex(&s.trace_id)))
                    .count()
                    >= CROWD
                && r.spans.iter().any(|s| s.name == "probe_after_refused_log");
            if done {
                return Ok(());
            }
            let seen: Vec<String> = r
                .spans
                .iter()
                .map(|s| {
                    let events: Vec<&str> = s.events.iter().map(|e| e.name.as_str()).collect();
                    format!("{} (kind {}, events {events:?})", s.name, s.kind)
                })
                .collect();
            Err(seen.join("; "))
        })
        .await;

    let r = std::mem::take(&mut *received.lock().unwrap());
    // Server spans are children of the caller's span, in the caller's trace.
    let servers: Vec<&Span> = r
        .spans
        .iter()
        .filter(|s| s.kind == 2 && hex(&s.trace_id) == TRACE_ID)
        .collect();
    // Two dry-run joins, the join, the message, the throttled join, the fetch
    // and four calls to the dead shard.
    assert_eq!(servers.len(), 10, "{} server spans", servers.len());
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
        // The id every log line of the request carries.
        assert_eq!(attr_str(s, "trace_id").as_deref(), Some(TRACE_ID));
    }
    let probe = r
        .spans
        .iter()
        .find(|s| s.name == "probe_after_refused_log")
        .unwrap();
    assert!(probe.events.iter().any(|e| e.name == "probe_event"));
    // The span the join's `traceresponse` named.
    let join = servers
        .iter()
        .find(|s| hex(&s.span_id) == join_span_id)
        .expect("the join's server span");
    assert_eq!(
        attr_str(join, "http.route").as_deref(),
        Some("/v1/chats/{chatId}/members")
    );
    assert_eq!(
        attr_str(join, "http.response.status_code").as_deref(),
        Some("201")
    );
    assert_eq!(
        attr_str(join, "chatshard.chat_id"),
        Some(chatshard::telemetry::chat_id_attribute(
            &chat,
            chatshard::telemetry::ChatIdInTelemetry::Hashed
        ))
    );
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
    assert_eq!(
        attr_str(db, "server.port"),
        Some(app.shard_servers().server(0).port().to_string())
    );
    assert_eq!(
        attr_str(db, "chatshard.breaker.state").as_deref(),
        Some("closed")
    );
    assert!(attr_str(db, "chatshard.bulkhead.wait_ms").is_some());
    assert!(attr_str(db, "chatshard.bulkhead.in_flight").is_some());
    assert_eq!(
        attr_str(db, "db.operation.batch.size").as_deref(),
        Some("1")
    );
    // Group commit: every crowd join is either the parent of a batch's
    // database span or linked to such a parent, and the batches add up.
    let crowd_servers: Vec<&Span> = r
        .spans
        .iter()
        .filter(|s| s.kind == 2 && crowd_traces.contains(&hex(&s.trace_id)))
        .collect();
    assert_eq!(crowd_servers.len(), CROWD);
    let batches: Vec<&Span> = r
        .spans
        .iter()
        .filter(|s| {
            s.kind == 3
                && attr_str(s, "db.operation.name").as_deref() == Some("commit_batch")
                && crowd_servers.iter().any(|p| p.span_id == s.parent_span_id)
        })
        .collect();
    let committed: usize = batches
        .iter()
        .map(|b| {
            attr_str(b, "db.operation.batch.size")
                .unwrap()
                .parse::<usize>()
                .unwrap()
        })
        .sum();
    assert_eq!(committed, CROWD);
    for s in &crowd_servers {
        let leads = batches.iter().any(|b| b.parent_span_id == s.span_id);
        let linked = s
            .links
            .iter()
            .any(|l| batches.iter().any(|b| b.parent_span_id == l.span_id));
        assert!(leads || linked, "a join without its transaction");
    }
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
    // The write that made the chat hot carries the mark; the refused fetch
    // carries its decision.
    assert!(
        servers
            .iter()
            .filter(|s| attr_str(s, "http.response.status_code").as_deref() == Some("201"))
            .any(|s| s.events.iter().any(|e| e.name == "hot_chat_marked"))
    );
    let fetch = servers
        .iter()
        .find(|s| attr_str(s, "http.route").as_deref() == Some("/v1/chats/{chatId}/events"))
        .expect("the fetch's server span");
    assert_eq!(
        attr_str(fetch, "error.type").as_deref(),
        Some("fetch_throttled")
    );
    assert!(fetch.events.iter().any(|e| e.name == "fetch_throttled"));
    assert!(servers.iter().any(|s| {
        attr_str(s, "http.response.status_code").as_deref() == Some("201")
            && s.events.iter().any(|e| e.name == "join_throttled_dry_run")
    }));
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

    // Logs are JSON lines, and those of a request carry its trace id: the mark
    // of the hot chat and the breaker opening are found by the caller's id.
    let lines: Vec<serde_json::Value> = String::from_utf8(logs.0.lock().unwrap().clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every log line is JSON"))
        .collect();
    for message in ["hot_chat_marked", "breaker_opened"] {
        let line = lines
            .iter()
            .find(|l| l["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("no log line for {message}"));
        let http = line["spans"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "http")
            .unwrap_or_else(|| panic!("{message} is logged outside its request: {line}"));
        assert_eq!(http["trace_id"], TRACE_ID, "{line}");
    }
    assert!(!String::from_utf8_lossy(&logs.0.lock().unwrap()).contains(SECRET));

    // Metrics go over OTLP too: a graceful stop flushes them.
    app.shut_down().await;
    let metrics = std::mem::take(&mut received.lock().unwrap().metrics);
    for name in [
        "chatshard.shard.breaker.state",
        "chatshard.shard.in_flight",
        "chatshard.shard.waiting",
        "chatshard.shard.rejections",
        "chatshard.shard.operation.duration",
    ] {
        let shards: Vec<&String> = metrics
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, s)| s)
            .collect();
        for shard in ["shard-0", "shard-dead"] {
            assert!(
                shards.iter().any(|s| *s == shard),
                "{name} has no series for {shard}"
            );
        }
    }
    for name in [
        "chatshard.throttle.decisions",
        "chatshard.hot_chats",
        "chatshard.fetches.coalesced",
        "http.server.request.duration",
    ] {
        assert!(
            metrics.iter().any(|(n, _)| n == name),
            "{name} not exported"
        );
    }
    tracing.shutdown().await;
}
