//! Multiplexed event streams: one connection carries the events of every chat
//! a chat server follows.
//!
//! - `POST /v1/streams` makes a stream, optionally with its first chats and the
//!   revision to follow each from; `DELETE /v1/streams/{streamId}` ends it.
//! - `GET /v1/streams/{streamId}` is the stream itself (`text/event-stream`):
//!   every event of every chat followed, once and in order per chat, each SSE
//!   message carrying the event with its `chatId`.
//! - `PUT /v1/streams/{streamId}/chats/{chatId}` (`{"after": R}`) adds a chat to
//!   a running stream, or restates where it stands; `DELETE` on the same path
//!   removes it.
//!
//! **Resuming.** Messages are numbered per stream (`id: <n>`). The stream keeps
//! every chat's cursor on the server, moved only when a message is handed to
//! the connection, and a log of what the last `streams.resumeMessages`
//! messages moved. A reconnect with `Last-Event-ID: n` winds the cursors back
//! to what the client had received after message `n`, so nothing in flight on
//! the dropped connection is lost or repeated; an id older than the log is
//! refused with 410 `stream_resume_expired` (make a new stream from the
//! revisions the client holds). A stream without a connection is kept
//! `streams.resumeSeconds`, then dropped (404 `stream_not_found`). A second
//! connection to a stream takes it over: the first ends with `replaced`.
//!
//! **Following.** While a connection is attached each chat has a follower: a
//! long-poll of the chat through its in-memory tail (so a stream costs the
//! shard no more than any other subscriber), feeding one bounded queue of the
//! connection. A connection that does not read fills the queue and the
//! followers wait, each holding at most one page: memory stays bounded. A chat
//! more than `streams.resyncRevisions` behind gets one `resync` event with the
//! range to fetch with `GET …/events` instead of its backlog.
//!
//! The engine (cursors, followers, resuming, bounds) is
//! [`crate::service::mux`]; this module only parses the requests, frames what
//! a connection yields as SSE messages (each event's shared JSON, with its
//! `chatId` in front), counts them, and maps refusals to problems.
//!
//! Other messages: `resync`, `removed` (the chat does not exist, or its
//! follower failed), and the final `shutdown`, `replaced` and `closed`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::extract::{ChatPath, JsonBody, OptionalJsonBody, StreamPath};
use super::model::ChatIdParam;
use super::problem::{Code, Problem};
use super::stream::{event_json, last_event_id, refusal, stream_headers};
use crate::domain::{ChatId, Revision};
use crate::service::mux::{Attached, EndReason, Item, MuxError, Output, Removal, Standing};

/// The multiplexed streams of this instance (the engine is the service's).
pub use crate::service::mux::Streams;

/// Path of a stream (documentation only).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Path, names("streamId"))]
#[allow(dead_code)]
pub struct StreamIdParam(
    /// The stream's id, as `POST /v1/streams` gave it.
    #[param(pattern = "^[0-9a-f]{32}$", min_length = 32, max_length = 32)]
    String,
);

/// `POST /v1/streams`: the chats to follow from the start.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(examples(json!({"chats": {"general": 0, "celebrity-42": 1200}})))]
pub struct CreateStreamRequest {
    /// chatId → the revision the client holds (events after it are sent).
    #[serde(default)]
    pub chats: HashMap<String, u64>,
}

/// `PUT /v1/streams/{streamId}/chats/{chatId}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(examples(json!({"after": 1200})))]
pub struct FollowChatRequest {
    /// The revision the client holds: events after it are sent.
    #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
    pub after: u64,
}

/// A stream and where it stands in each chat it follows.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(examples(json!({"streamId": "6f1c0e0f8a7b4c3d9e2f1a0b5c6d7e8f", "lastEventId": 0, "chats": {"general": 0}})))]
pub struct StreamView {
    pub stream_id: String,
    /// The number of the last message handed to a connection.
    pub last_event_id: u64,
    /// chatId → the last revision handed to a connection.
    pub chats: HashMap<String, u64>,
}

impl From<Standing> for StreamView {
    fn from(standing: Standing) -> Self {
        Self {
            stream_id: standing.id,
            last_event_id: standing.last_event_id,
            chats: standing
                .chats
                .into_iter()
                .map(|(chat, after)| (chat.to_string(), after))
                .collect(),
        }
    }
}

/// The answer to a refused request (refusals for want of a place are
/// counted). `gone`: the detail of a stream that is not there.
fn problem(state: &AppState, error: MuxError, gone: &str) -> Problem {
    match error {
        MuxError::NotFound => Problem::new(Code::StreamNotFound, gone.to_owned()),
        MuxError::Ended => Problem::new(Code::StreamNotFound, "the stream has ended"),
        MuxError::TooManyChats { max } => {
            state.metrics.stream_refused("stream");
            Problem::new(
                Code::TooManyChatsInStream,
                format!(
                    "a stream follows at most {max} chats (streams.maxChatsPerStream): open another stream"
                ),
            )
        }
        MuxError::Refused(limit) => refusal(limit, &state.metrics),
        MuxError::ResumeAhead { seen, last } => Problem::invalid(format!(
            "Last-Event-ID {seen} is ahead of the stream (its last message is {last})"
        )),
        MuxError::ResumeExpired { floor } => Problem::new(
            Code::StreamResumeExpired,
            format!(
                "the stream can resume after message {floor} at the earliest: make a new stream \
                 with the revisions you hold"
            ),
        ),
    }
}

/// The detail of a stream that is not there, for a request to use it.
const NOT_FOUND: &str = "no stream has this id on this instance (it ended, or expired without a connection): make a new one";

/// Make a multiplexed stream, optionally following its first chats.
#[utoipa::path(
    post, path = "/v1/streams", tag = "events",
    request_body(content = Option<CreateStreamRequest>, content_type = "application/json"),
    responses(
        (status = 201, description = "Made: connect to `GET /v1/streams/{streamId}`", body = StreamView,
            headers(("location" = String, description = "The stream's path"))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid chat id or revision", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "too_many_chats_in_stream", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "too_many_subscribers", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create_stream(
    State(state): State<AppState>,
    OptionalJsonBody(body): OptionalJsonBody<CreateStreamRequest>,
) -> Result<Response, Problem> {
    let config = state.service.live().load().config.streams.clone();
    let chats = body
        .map(|b| b.chats)
        .unwrap_or_default()
        .into_iter()
        .map(|(chat, after)| {
            let chat = ChatId::parse(&chat).map_err(|e| Problem::invalid(e.0))?;
            let after = Revision::parse_after(Some(&after.to_string()))
                .map_err(|e| Problem::invalid(e.0))?;
            Ok((chat, after.0))
        })
        .collect::<Result<Vec<_>, Problem>>()?;
    let standing = state
        .streams
        .create(&state.subscribers, &config, chats)
        .map_err(|e| problem(&state, e, NOT_FOUND))?;
    let location = format!("/v1/streams/{}", standing.id);
    Ok((
        StatusCode::CREATED,
        [(axum::http::header::LOCATION, location)],
        Json(StreamView::from(standing)),
    )
        .into_response())
}

/// End a multiplexed stream; its connection gets a final `closed` event.
#[utoipa::path(
    delete, path = "/v1/streams/{streamId}", tag = "events", params(StreamIdParam),
    responses(
        (status = 204, description = "Ended"),
        (status = 404, description = "stream_not_found", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid stream id", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn delete_stream(
    State(state): State<AppState>,
    StreamPath(id): StreamPath,
) -> Result<StatusCode, Problem> {
    state
        .streams
        .delete(&id)
        .map_err(|e| problem(&state, e, "no stream has this id on this instance"))?;
    Ok(StatusCode::NO_CONTENT)
}

/// Follow a chat on a running stream, or restate the revision the client
/// holds for it.
#[utoipa::path(
    put, path = "/v1/streams/{streamId}/chats/{chatId}", tag = "events", params(StreamIdParam, ChatIdParam),
    request_body(content = FollowChatRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Followed from the revision given", body = StreamView),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "stream_not_found", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid id or revision", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "too_many_chats_in_stream", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "too_many_subscribers", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn follow_chat(
    State(state): State<AppState>,
    StreamPath(id): StreamPath,
    ChatPath(chat): ChatPath,
    JsonBody(body): JsonBody<FollowChatRequest>,
) -> Result<Json<StreamView>, Problem> {
    let after = Revision::parse_after(Some(&body.after.to_string()))
        .map_err(|e| Problem::invalid(e.0))?
        .0;
    let config = state.service.live().load().config.streams.clone();
    let standing = state
        .streams
        .follow(
            &id,
            chat,
            after,
            &state.service,
            &state.subscribers,
            &config,
        )
        .map_err(|e| problem(&state, e, NOT_FOUND))?;
    Ok(Json(standing.into()))
}

/// Stop following a chat (nothing happens if the stream does not follow it).
#[utoipa::path(
    delete, path = "/v1/streams/{streamId}/chats/{chatId}", tag = "events", params(StreamIdParam, ChatIdParam),
    responses(
        (status = 204, description = "Not followed any more"),
        (status = 404, description = "stream_not_found", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid id", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn unfollow_chat(
    State(state): State<AppState>,
    StreamPath(id): StreamPath,
    ChatPath(chat): ChatPath,
) -> Result<StatusCode, Problem> {
    state
        .streams
        .unfollow(&id, &chat)
        .map_err(|e| problem(&state, e, NOT_FOUND))?;
    Ok(StatusCode::NO_CONTENT)
}

/// The stream: every event of every chat it follows, as server-sent events.
#[utoipa::path(
    get, path = "/v1/streams/{streamId}", tag = "events", params(StreamIdParam,
        ("Last-Event-ID" = Option<String>, Header, pattern = "^[0-9]{0,18}$", description = "The number of the last message received: the stream resumes after it (empty means none; any other value is refused with 422 invalid_request)")),
    responses(
        (status = 200, description = "The stream: `id` = the message's number; data of an event = the Event with its `chatId`; `resync`, `removed`, and the final `shutdown`, `replaced` and `closed` events", content_type = "text/event-stream", body = String),
        (status = 404, description = "stream_not_found", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "stream_resume_expired", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid_request: invalid id, a Last-Event-ID that is not 1 to 18 digits, or one ahead of the stream", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn connect_stream(
    State(state): State<AppState>,
    StreamPath(id): StreamPath,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let seen = last_event_id(&headers, "a message number")?;
    let config = state.service.live().load().config.streams.clone();
    let attached = state
        .streams
        .connect(&id, seen, &state.service, &config, state.closing.clone())
        .map_err(|e| problem(&state, e, NOT_FOUND))?;
    let connection = Connection { state, attached };
    let mut response = Sse::new(futures_util::stream::unfold(connection, next))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(config.keep_alive_seconds)))
        .into_response();
    // On HTTP/1, written on the connection without hyper once the head is
    // out (as a chat's stream: see `serve::answer_head_alone`).
    response.extensions_mut().insert(super::sse::AfterHead);
    stream_headers(&mut response);
    Ok(response)
}

/// One connection of a stream, as the SSE body holds it.
struct Connection {
    state: AppState,
    attached: Attached,
}

impl Drop for Connection {
    fn drop(&mut self) {
        if !self.attached.finished() {
            // Dropped by the connection: the client went away.
            self.state.metrics.stream_ended("client");
        }
    }
}

/// The next message of a connection as an SSE message, or its end.
async fn next(mut c: Connection) -> Option<(Result<SseEvent, Infallible>, Connection)> {
    let frame = match c.attached.next().await? {
        Output::Message {
            seq,
            chat,
            before,
            item,
        } => message(&c.state, seq, &chat, before, item),
        Output::End {
            reason,
            last_event_id,
        } => end(&c.state, reason, last_event_id),
    };
    Some((Ok(frame), c))
}

/// One message numbered `seq` of `chat` (`before`: the chat's cursor before
/// it).
fn message(state: &AppState, seq: u64, chat: &ChatId, before: u64, item: Item) -> SseEvent {
    let message = SseEvent::default().id(seq.to_string());
    let chat = chat.as_str();
    match item {
        Item::Event(event) => {
            let lag = (chrono::Utc::now() - event.created_at).as_seconds_f64();
            state.metrics.stream_event(lag);
            let json = event_json(&event);
            // The chat's id in front of the event's shared JSON (ids need no
            // escaping: they are [A-Za-z0-9_-]).
            let body = json.strip_prefix('{').unwrap_or("}");
            message.data(format!("{{\"chatId\":\"{chat}\",{body}"))
        }
        Item::Resync { latest } => {
            state.metrics.stream_resync();
            message.event("resync").data(
                serde_json::json!({
                    "chatId": chat,
                    "after": before,
                    "latestRevision": latest,
                    "detail": "the chat was too far behind: fetch the events after `after` up to latestRevision with GET /v1/chats/{chatId}/events; the stream goes on after latestRevision",
                })
                .to_string(),
            )
        }
        Item::Removed(Removal::RevisionPurged) => message.event("removed").data(
            serde_json::json!({
                "chatId": chat,
                "reason": "revision_purged",
                "after": before,
                "snapshot": format!("/v1/chats/{chat}/snapshot"),
                "detail": "the events after `after` are no longer stored: load the chat's snapshot, then follow the chat again (PUT …/chats/{chatId}) after the snapshot's revision",
            })
            .to_string(),
        ),
        Item::Removed(removal) => {
            let reason = match removal {
                Removal::ChatNotFound => "chat_not_found",
                Removal::RevisionPurged => "revision_purged",
                Removal::Failed => "error",
            };
            message
                .event("removed")
                .data(serde_json::json!({"chatId": chat, "reason": reason}).to_string())
        }
    }
}

/// The final event of a connection (counted).
fn end(state: &AppState, reason: EndReason, last_event_id: u64) -> SseEvent {
    let (reason, detail) = match reason {
        EndReason::Shutdown => (
            "shutdown",
            "the instance is shutting down: reconnect with Last-Event-ID",
        ),
        EndReason::Closed => ("closed", "the stream was deleted"),
        EndReason::Replaced => ("replaced", "another connection took this stream over"),
    };
    state.metrics.stream_ended(reason);
    SseEvent::default().event(reason).data(
        serde_json::json!({"reason": reason, "detail": detail, "lastEventId": last_event_id})
            .to_string(),
    )
}
