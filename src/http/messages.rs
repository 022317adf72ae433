//! `/v1/chats/{chatId}/messages` and `/v1/chats/{chatId}/events`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use super::extract::{ChatPath, JsonBody, PageQuery};
use super::model::{ChatIdParam, EventPage, EventPageParams, Message, PostMessageRequest};
use super::problem::Problem;
use super::{AppState, status_for};
use crate::domain::{ClientMessageId, MessageText, PageLimit, Revision, UserId, Wait};
use crate::service::ServiceError;

/// Post a message; idempotent by `(senderId, clientMessageId)`.
#[utoipa::path(
    post, path = "/v1/chats/{chatId}/messages", tag = "messages", params(ChatIdParam),
    request_body(content = PostMessageRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Stored", body = Message),
        (status = 200, description = "Already stored with this key and text: the original", body = Message),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "not_a_member", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "chat_not_found", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid input, or idempotency_key_reused", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Busy, unavailable or outcome unknown", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn post_message(
    State(state): State<AppState>,
    ChatPath(chat): ChatPath,
    JsonBody(body): JsonBody<PostMessageRequest>,
) -> Result<(StatusCode, Json<Message>), Problem> {
    let sender = UserId::parse(&body.sender_id).map_err(|e| Problem::invalid(e.0))?;
    let key = ClientMessageId::parse(&body.client_message_id).map_err(|e| Problem::invalid(e.0))?;
    let text = MessageText::parse(body.text).map_err(|e| Problem::invalid(e.0))?;
    let (message, created) = state
        .service
        .post_message(&chat, &sender, &key, text)
        .await?;
    Ok((status_for(created), Json(message.into())))
}

/// Fetch the chat's events after a revision, oldest first; with `waitMs`, wait
/// up to that long for one (long-poll).
#[utoipa::path(
    get, path = "/v1/chats/{chatId}/events", tag = "events", params(ChatIdParam, EventPageParams),
    responses(
        (status = 200, description = "A page of events", body = EventPage),
        (status = 400, description = "Undecodable query string", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "chat_not_found", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "revision_purged: the events after `after` are no longer stored; full-sync from the snapshot", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid id, revision or limit", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "fetch_throttled (the chat is hot)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Shard busy or unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_events(
    State(state): State<AppState>,
    ChatPath(chat): ChatPath,
    query: PageQuery,
) -> Result<Json<EventPage>, Problem> {
    let after = Revision::parse_after(query.after.as_deref()).map_err(|e| Problem::invalid(e.0))?;
    let limit = PageLimit::parse(query.limit.as_deref()).map_err(|e| Problem::invalid(e.0))?;
    let Wait(wait) = Wait::parse(query.wait_ms.as_deref()).map_err(|e| Problem::invalid(e.0))?;
    let page = state
        .service
        .events(&chat, after, limit, wait)
        .await
        .map_err(|e| match e {
            ServiceError::FetchThrottled { .. } => Problem::from(e).with_stream(&chat),
            ServiceError::RevisionPurged { .. } => Problem::from(e).with_snapshot(&chat),
            e => Problem::from(e),
        })?;
    Ok(Json(EventPage {
        events: page.events.iter().cloned().map(Into::into).collect(),
        latest_revision: page.latest_revision,
    }))
}
