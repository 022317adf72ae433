//! The server span of every request, and its metrics.
//!
//! An incoming W3C `traceparent` / `tracestate` makes the span a child of the
//! caller's span. Every response carries `x-request-id` with the request's trace
//! id (the caller's when it sent one), so a chat server can log it and find the
//! trace; with export on, a W3C `traceresponse` names the server span too. The
//! same id is the span's `trace_id` field, so every log line of the request
//! carries it. With export off and no caller trace, the id is random: it still
//! ties the response to the request's log lines.
//!
//! A short request of one chat (not a stream nor a long-poll) is also timed
//! for the chat's shard, and carries a tally of its waits and database work
//! ([`Spent`]): the metrics split its time between chatshard and the database.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::AppState;
use super::problem::{Code, Problem};
use crate::shard::Spent;
use axum::response::IntoResponse as _;

/// The chat of a request, set by the extractor that reads it from the path.
#[derive(Clone, Default)]
pub struct RequestChat(pub Arc<std::sync::OnceLock<crate::domain::ChatId>>);

pub async fn trace_request(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = req.method().clone();
    let method_label = crate::metrics::method_label(&method);
    // W3C trace context, whatever global propagator is (or is not) installed.
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(req.headers()));
    let span = tracing::info_span!(
        "http",
        otel.name = %format_args!("{method_label} {route}"),
        otel.kind = "server",
        http.request.method = method_label,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        chatshard.chat_id = tracing::field::Empty,
        chatshard.shard = tracing::field::Empty,
        chatshard.client = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        error.type = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    let caller = parent.span().span_context().clone();
    // Without the OpenTelemetry layer (export off) there is nothing to link.
    let _ = span.set_parent(parent);
    let own = span.context().span().span_context().clone();
    let trace_id = if own.is_valid() {
        own.trace_id().to_string()
    } else if caller.is_valid() {
        caller.trace_id().to_string()
    } else {
        format!("{:032x}", rand::random::<u128>())
    };
    span.record("trace_id", trace_id.as_str());
    let started = Instant::now();
    // A short request of one chat is timed for its shard (a move's pacer
    // watches it); a stream or a long-poll waits by design, so it is not.
    let timed = (route.starts_with("/v1/chats/")
        && !route.ends_with("/stream")
        && !req.uri().query().is_some_and(|q| q.contains("waitMs=")))
    .then(RequestChat::default);
    if let Some(slot) = &timed {
        req.extensions_mut().insert(slot.clone());
    }
    // Its shard operations tell it where its time went.
    let tally = timed.as_ref().map(|_| Arc::new(Spent::default()));
    let mut response = if too_long(&req, state.http.max_uri_bytes) {
        let _in_span = span.enter();
        Problem::new(
            Code::UriTooLong,
            format!(
                "the request target must be at most {} bytes",
                state.http.max_uri_bytes
            ),
        )
        .into_response()
    } else {
        let run = next.run(req).instrument(span.clone());
        match &tally {
            Some(tally) => Spent::scope(tally.clone(), run).await,
            None => run.await,
        }
    };
    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
    let took = started.elapsed();
    state
        .metrics
        .record_http(took.as_secs_f64(), route, &method, status);
    if let (Some(chat), Some(tally)) = (timed.as_ref().and_then(|slot| slot.0.get()), &tally) {
        let shard = state.service.record_request(chat, took);
        state.metrics.record_shard_request(shard, took, tally);
    }
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&trace_id) {
        headers.insert("x-request-id", v);
    }
    if own.is_valid() {
        let traceresponse = format!(
            "00-{}-{}-{:02x}",
            own.trace_id(),
            own.span_id(),
            own.trace_flags().to_u8()
        );
        if let Ok(v) = HeaderValue::from_str(&traceresponse) {
            headers.insert("traceresponse", v);
        }
    }
    response
}

/// Whether the request target (path and query) is over `limit` bytes.
fn too_long(req: &Request, limit: usize) -> bool {
    req.uri().path_and_query().map_or(0, |pq| pq.as_str().len()) > limit
}
