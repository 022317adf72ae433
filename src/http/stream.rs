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
//! - Each event's message is encoded once and its bytes shared by every
//!   subscriber; the events waiting for a subscriber when it is written to
//!   go out as one frame (one write), however many there are. A stream
//!   writes at most once per `streams.batchMs`: on a busy chat an event that
//!   comes sooner waits for the rest of it, and what comes meanwhile shares
//!   its write; a quiet chat's event goes out at once.
//! - Idle streams get a keep-alive comment every `streams.keepAliveSeconds`.
//! - While the chat's shard is broken the stream stays open and delivers again
//!   when the shard is back.
//! - On shutdown every stream ends with a `shutdown` event (reconnect with
//!   `Last-Event-ID` to another instance); a chat that does not exist ends it
//!   with an `error` event.
//! - At most `streams.maxSubscribers` streams per instance and
//!   `streams.maxPerChat` per chat; past them 503 `too_many_subscribers`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use tokio::sync::watch;
use tokio::time::Instant;

use super::AppState;
use super::extract::{ChatPath, PageQuery};
use super::model::{ChatIdParam, EventStreamParams};
use super::problem::{Code, Problem};
use crate::domain::{ChatId, EncodedEvent, PageLimit, Revision};
use crate::service::mux::{Setback, setback};
use crate::service::{Event, EventPage, ServiceError};

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
        batch: Duration::from_millis(config.batch_ms),
        written: Instant::now(),
    };
    let stream = futures_util::stream::unfold(follow, next);
    let mut response = super::sse::response(stream, Duration::from_secs(config.keep_alive_seconds));
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
    /// At most one frame per `batch` (`streams.batchMs`).
    batch: Duration,
    /// When the last frame was handed to the connection.
    written: Instant,
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

/// The next frame of a stream (every event waiting, or its end), or
/// nothing once it has ended.
async fn next(mut f: Follow) -> Option<(Bytes, Follow)> {
    loop {
        if !f.pending.is_empty() {
            f.written = Instant::now();
            return Some((frame(&mut f), f));
        }
        if f.finished {
            return None;
        }
        if *f.closing.borrow() {
            return Some((
                end(
                    &mut f,
                    "shutdown",
                    "the instance is shutting down: reconnect with Last-Event-ID",
                ),
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
            Ok(page) => {
                take(&mut f.pending, page);
                batch(&mut f).await;
            }
            Err(e) => match setback(&e) {
                Setback::Gone => {
                    return Some((end(&mut f, "chat_not_found", "the chat does not exist"), f));
                }
                Setback::Purged { first_revision } => {
                    let detail = format!(
                        "the events after lastEventId are no longer stored (the first stored is \
                         {first_revision}): load GET /v1/chats/{}/snapshot, then follow again \
                         after its revision",
                        f.chat
                    );
                    return Some((end(&mut f, "revision_purged", &detail), f));
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
                        end(
                            &mut f,
                            "error",
                            "an internal error ended the stream: reconnect with Last-Event-ID",
                        ),
                        f,
                    ));
                }
            },
        }
    }
}

/// The events of a page, after those already waiting.
fn take(pending: &mut VecDeque<Event>, page: Arc<EventPage>) {
    match Arc::try_unwrap(page) {
        // A page made for this call alone is taken as is, not copied.
        Ok(page) => pending.extend(page.events),
        Err(page) => pending.extend(page.events.iter().cloned()),
    }
}

/// On a busy stream (its last write less than `streams.batchMs` ago), waits
/// out the rest of the batch and takes what was published meanwhile, so that
/// it goes out in the same write. A quiet stream wrote long ago and does not
/// wait: only events that come faster than one per batch are delayed.
async fn batch(f: &mut Follow) {
    let due = f.written + f.batch;
    let Some(last) = f.pending.back().map(|e| Revision(e.revision)) else {
        return;
    };
    if due <= Instant::now() {
        return;
    }
    let mut closing = f.closing.clone();
    tokio::select! {
        () = tokio::time::sleep_until(due) => {}
        // Shutdown: what is waiting goes out now, then the end.
        _ = closing.changed() => return,
    }
    // Whatever the tail holds now; waits (briefly) only if nothing came.
    let more = f
        .state
        .service
        .events(&f.chat, last, PageLimit::largest(), BATCH_READ_WAIT)
        .await;
    if let Ok(page) = more {
        take(&mut f.pending, page);
    }
}

/// How long the read at the end of a batch waits when nothing was published
/// during it (a read without a wait would be a plain poll, subject to the
/// hot-chat throttle).
const BATCH_READ_WAIT: Duration = Duration::from_millis(1);

/// Every event waiting for the stream, as one frame: a single event's shared
/// message as it is (no copy), several copied into one buffer, so that they
/// cost the connection one write, not one each.
fn frame(f: &mut Follow) -> Bytes {
    let now = chrono::Utc::now();
    if f.pending.len() == 1
        && let Some(event) = f.pending.pop_front()
    {
        return sent(f, &event, now).clone();
    }
    let mut frame = BytesMut::new();
    while let Some(event) = f.pending.pop_front() {
        frame.extend_from_slice(sent(f, &event, now));
    }
    frame.freeze()
}

/// Counts `event` as sent on the stream at `now`; its message.
fn sent<'e>(f: &mut Follow, event: &'e Event, now: chrono::DateTime<chrono::Utc>) -> &'e Bytes {
    f.after = Revision(event.revision);
    let lag = (now - event.created_at).as_seconds_f64();
    f.state.metrics.stream_event(lag);
    &event_message(event).message
}

/// An event as streams send it: made once per event, by the first subscriber
/// to send it, and shared by the others (see `Event::encoded`).
pub(super) fn event_message(event: &Event) -> &EncodedEvent {
    event.encoded.get_or_init(|| encode(event))
}

/// An event's JSON for streams (within its shared message).
pub(super) fn event_json(event: &Event) -> &str {
    let encoded = event_message(event);
    std::str::from_utf8(&encoded.message[encoded.json.clone()]).unwrap_or("{}")
}

/// An event's SSE message on its chat's stream: `id: <revision>`, then its
/// JSON as `data` (one line: JSON as serde writes it has no line breaks).
fn encode(event: &Event) -> EncodedEvent {
    let body = super::model::Event::from(event.clone());
    let json = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
    let id = event.revision.to_string();
    let mut message = BytesMut::with_capacity(json.len() + id.len() + 13);
    message.extend_from_slice(b"id: ");
    message.extend_from_slice(id.as_bytes());
    message.extend_from_slice(b"\ndata: ");
    let start = message.len();
    message.extend_from_slice(&json);
    let json = start..message.len();
    message.extend_from_slice(b"\n\n");
    EncodedEvent {
        message: message.freeze(),
        json,
    }
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
fn end(f: &mut Follow, reason: &'static str, detail: &str) -> Bytes {
    f.finished = true;
    f.state.metrics.stream_ended(reason);
    let event = if reason == "shutdown" {
        "shutdown"
    } else {
        "error"
    };
    let data = serde_json::json!({"reason": reason, "detail": detail, "lastEventId": f.after.0});
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(revision: u64, text: &str) -> Event {
        Event {
            revision,
            kind: crate::domain::EventType::MessageSent,
            user_id: "u-1".into(),
            message_id: Some(revision),
            text: Some(text.into()),
            created_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
            encoded: Default::default(),
        }
    }

    #[test]
    fn an_event_is_one_sse_message_made_once() {
        let e = event(7, "line one\nline \"two\"");
        let json = serde_json::to_string(&super::super::model::Event::from(e.clone())).unwrap();
        let expected = format!("id: 7\ndata: {json}\n\n");
        let encoded = event_message(&e);
        assert_eq!(encoded.message, expected.as_bytes());
        assert_eq!(event_json(&e), json);
        // A copy of the event (the tail hands out copies) shares the bytes.
        let copy = e.clone();
        assert_eq!(
            event_message(&copy).message.as_ptr(),
            event_message(&e).message.as_ptr()
        );
    }
}
