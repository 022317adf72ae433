//! The server span of every request, and its metrics.
//!
//! An incoming W3C `traceparent` / `tracestate` makes the span a child of the
//! caller's span. Every response carries `x-request-id`: the caller's trace id
//! when it sent one, so a chat server can log the id and find the trace; a
//! random id otherwise. (The span's own context is not read back here: with
//! tracing-opentelemetry 0.34 doing so lost spans from the export.)

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry::KeyValue;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_http::HeaderExtractor;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::AppState;

pub async fn trace_request(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = req.method().clone();
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&HeaderExtractor(req.headers()))
    });
    let span = tracing::info_span!(
        "http",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        chatshard.chat_id = tracing::field::Empty,
        chatshard.shard = tracing::field::Empty,
        error.type = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    let parent_trace = parent.span().span_context().clone();
    // Without the OpenTelemetry layer (export off) there is nothing to link.
    let _ = span.set_parent(parent);
    let started = Instant::now();
    let mut response = next.run(req).instrument(span.clone()).await;
    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
    state.metrics.http_request.record(
        started.elapsed().as_secs_f64(),
        &[
            KeyValue::new("http.route", route),
            KeyValue::new("http.request.method", method.to_string()),
            KeyValue::new("http.response.status_code", i64::from(status)),
        ],
    );
    let headers = response.headers_mut();
    let trace_id = if parent_trace.is_valid() {
        parent_trace.trace_id().to_string()
    } else {
        format!("{:032x}", rand::random::<u128>())
    };
    if let Ok(v) = HeaderValue::from_str(&trace_id) {
        headers.insert("x-request-id", v);
    }
    response
}
