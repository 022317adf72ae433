//! `GET /v1/chats/{chatId}/events/stream`: a chat's events as server-sent
//! events.
//!
//! Each event is one SSE message with `id: <revision>`, so a reconnect with
//! `Last-Event-ID` resumes exactly after the last one received (it wins over
//! `?after=`). The stream follows the chat through the same path as a
//! long-poll (the chat's in-memory tail; one shared read per refresh however
//! many subscribers), one page at a time: a subscriber that does not read
//! holds one page, never more, and when it reads again it is caught up from
//! the tail, or from the log if it fell behind the tail. It never skips a
//! revision.
//!
//! - Idle streams get a keep-alive comment every `streams.keepAliveSeconds`.
//! - While the chat's shard is broken the stream stays open and delivers again
//!   when the shard is back.
//! - On shutdown every stream ends with a `shutdown` event (reconnect with
//!   `Last-Event-ID` to another instance); a chat that does not exist ends it
//!   with an `error` event.
//! - At most `streams.maxSubscribers` streams per instance and
//!   `streams.maxPerChat` per chat; past them 503 `too_many_subscribers`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;

use super::AppState;
use super::extract::{ChatPath, PageQuery};
use super::model::{ChatIdParam, EventStreamParams};
use super::problem::{Code, Problem};
use crate::domain::{ChatId, PageLimit, Revision};
use crate::service::mux::{Setback, setback};
use crate::service::{Event, ServiceError};

/// The places of the open streams (kept by the service).
pub use crate::service::subscribers::{ChatSlot, Limit, StreamSlot, Subscribers};

impl crate::metrics::StreamCounts for Subscribers {
    fn open(&self) -> u64 {
        Subscribers::open(self)
    }

    fn subscriptions(&self) -> u64 {
        Subscribers::subscriptions(self)
    }
}

/// The 503 answer of a refusal for want of a place (counted).
pub(super) fn refusal(limit: Limit, metrics: &crate::metrics::Metrics) -> Problem {
    metrics.stream_refused(limit.as_str());
    Problem::new(
        Code::TooManySubscribers,
        format!(
            "this instance holds its maximum of streams for this {}; retry shortly or long-poll",
            limit.as_str()
        ),
    )
}

/// The events of one chat as server-sent events.
#[utoipa::path(
    get, path = "/v1/chats/{chatId}/events/stream", tag = "events",
    params(ChatIdParam, EventStreamParams,
        ("Last-Event-ID" = Option<String>, Header, pattern = "^[0-9]{0,18}$", description = "The revision last received: the stream resumes after it (wins over `after`; empty means none; any other value is refused with 422 invalid_request)")),
    responses(
        (status = 200, description = "The stream: one message per event, `id` = its revision, data = the Event as JSON; `shutdown` and `error` events end it", content_type = "text/event-stream", body = String),
        (status = 404, description = "chat_not_found", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "revision_purged: the events after the revision asked for are no longer stored; full-sync from the snapshot", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid_request: invalid id or revision, or a Last-Event-ID that is not 1 to 18 digits", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "too_many_subscribers, or the shard is unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn chat_stream(
    State(state): State<AppState>,
    ChatPath(chat): ChatPath,
    headers: HeaderMap,
    query: PageQuery,
) -> Result<Response, Problem> {
    let after = match last_event_id(&headers, "a revision")? {
        Some(id) => Revision(id),
        None => Revision::parse_after(query.after.as_deref()).map_err(|e| Problem::invalid(e.0))?,
    };
    let config = state.service.live().load().config.streams.clone();
    let subscription = (
        state
            .subscribers
            .take_stream(config.max_subscribers)
            .map_err(|limit| refusal(limit, &state.metrics))?,
        state
            .subscribers
            .take_chat(&chat, config.max_per_chat)
            .map_err(|limit| refusal(limit, &state.metrics))?,
    );
    // The chat must exist before the stream opens; the answer also seeds the
    // tail for what follows.
    let first = state
        .service
        .events(&chat, after, PageLimit::largest(), Duration::ZERO)
        .await
        .map_err(|e| match e {
            ServiceError::RevisionPurged { .. } => Problem::from(e).with_snapshot(&chat),
            e => Problem::from(e),
        })?;
    let follow = Follow {
        state: state.clone(),
        chat,
        after,
        pending: first.events.iter().cloned().collect(),
        closing: state.closing.clone(),
        finished: false,
        _subscription: subscription,
        keep_alive: Duration::from_secs(config.keep_alive_seconds),
    };
    let stream = futures_util::stream::unfold(follow, next);
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(config.keep_alive_seconds)))
        .into_response();
    stream_headers(&mut response);
    Ok(response)
}

/// Where one stream is.
struct Follow {
    state: AppState,
    chat: ChatId,
    after: Revision,
    pending: VecDeque<Event>,
    closing: watch::Receiver<bool>,
    finished: bool,
    keep_alive: Duration,
    _subscription: (StreamSlot, ChatSlot),
}

impl Drop for Follow {
    fn drop(&mut self) {
        if !self.finished {
            // Dropped by the connection: the client went away.
            self.state.metrics.stream_ended("client");
        }
    }
}

/// The next message of a stream, or its end.
async fn next(mut f: Follow) -> Option<(Result<SseEvent, Infallible>, Follow)> {
    loop {
        if let Some(event) = f.pending.pop_front() {
            f.after = Revision(event.revision);
            let lag = (chrono::Utc::now() - event.created_at).as_seconds_f64();
            f.state.metrics.stream_event(lag);
            return Some((Ok(message(event)), f));
        }
        if f.finished {
            return None;
        }
        if *f.closing.borrow() {
            return Some((
                Ok(end(
                    &mut f,
                    "shutdown",
                    "the instance is shutting down: reconnect with Last-Event-ID",
                )),
                f,
            ));
        }
        let service = f.state.service.clone();
        let (chat, after, wait) = (f.chat.clone(), f.after, f.keep_alive);
        let mut closing = f.closing.clone();
        let page = tokio::select! {
            page = service.events(&chat, after, PageLimit::largest(), wait) => page,
            _ = closing.changed() => continue,
        };
        match page {
            // A page made for this call alone is taken as is, not copied.
            Ok(page) => match Arc::try_unwrap(page) {
                Ok(page) => f.pending.extend(page.events),
                Err(page) => f.pending.extend(page.events.iter().cloned()),
            },
            Err(e) => match setback(&e) {
                Setback::Gone => {
                    return Some((
                        Ok(end(&mut f, "chat_not_found", "the chat does not exist")),
                        f,
                    ));
                }
                Setback::Purged { first_revision } => {
                    let detail = format!(
                        "the events after lastEventId are no longer stored (the first stored is \
                         {first_revision}): load GET /v1/chats/{}/snapshot, then follow again \
                         after its revision",
                        f.chat
                    );
                    return Some((Ok(end(&mut f, "revision_purged", &detail)), f));
                }
                Setback::Retry => {
                    // The shard is broken or busy: stay open, try again shortly.
                    let mut closing = f.closing.clone();
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = closing.changed() => {}
                    }
                }
                Setback::Failed => {
                    tracing::warn!(error = %crate::error::chain(&e), "event stream ended by an error");
                    return Some((
                        Ok(end(
                            &mut f,
                            "error",
                            "an internal error ended the stream: reconnect with Last-Event-ID",
                        )),
                        f,
                    ));
                }
            },
        }
    }
}

/// One event as an SSE message.
fn message(event: Event) -> SseEvent {
    SseEvent::default()
        .id(event.revision.to_string())
        .data(event_json(&event).as_ref())
}

/// An event's JSON for streams. It is made once per event, by the first
/// subscriber to send it, and shared by the others (see `Event::encoded`).
pub(super) fn event_json(event: &Event) -> Arc<str> {
    event
        .encoded
        .get_or_init(|| {
            let body = super::model::Event::from(event.clone());
            serde_json::to_string(&body)
                .unwrap_or_else(|_| "{}".to_owned())
                .into()
        })
        .clone()
}

/// The `Last-Event-ID` header of a reconnect, the same on both streams: an
/// absent or empty one is no id at all (the SSE spec resets to it); anything
/// else must be 1 to 18 digits (the documented pattern), or the request is
/// refused with 422 `invalid_request` naming `what` the id is.
pub(super) fn last_event_id(headers: &HeaderMap, what: &str) -> Result<Option<u64>, Problem> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let invalid = || Problem::invalid(format!("Last-Event-ID must be {what} (1 to 18 digits)"));
    let id = value.to_str().map_err(|_| invalid())?.trim();
    if id.is_empty() {
        return Ok(None);
    }
    if id.len() > LAST_EVENT_ID_DIGITS || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    id.parse().map(Some).map_err(|_| invalid())
}

/// The most digits a `Last-Event-ID` has (below `i64::MAX`).
const LAST_EVENT_ID_DIGITS: usize = 18;

/// The answer headers of every event stream (no caching, no proxy buffering).
pub(super) fn stream_headers(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(
        "cache-control",
        axum::http::HeaderValue::from_static("no-cache"),
    );
    headers.insert(
        "x-accel-buffering",
        axum::http::HeaderValue::from_static("no"),
    );
}

/// The final event of a stream.
fn end(f: &mut Follow, reason: &'static str, detail: &str) -> SseEvent {
    f.finished = true;
    f.state.metrics.stream_ended(reason);
    let event = if reason == "shutdown" {
        "shutdown"
    } else {
        "error"
    };
    SseEvent::default()
        .event(event)
        .json_data(
            serde_json::json!({"reason": reason, "detail": detail, "lastEventId": f.after.0}),
        )
        .unwrap_or_default()
}
