//! `/v1/chats/{chatId}` and its member count.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;

use super::extract::PageQuery;
use super::extract::{ChatPath, Consistency, OptionalJsonBody};
use super::model::{
    Chat, ChatIdParam, ChatSnapshot, ConsistencyParams, CreateChatRequest, MemberCount,
    SnapshotPageParams, served_headers,
};
use super::problem::Problem;
use super::{AppState, status_for};
use crate::domain::{MaxMembers, PageLimit, SnapshotCursor};
use crate::service::ServiceError;

/// Create a chat, or get the existing one.
#[utoipa::path(
    put, path = "/v1/chats/{chatId}", tag = "chats", params(ChatIdParam),
    request_body(content = Option<CreateChatRequest>, content_type = "application/json"),
    responses(
        (status = 201, description = "Created", body = Chat),
        (status = 200, description = "The chat existed (maxMembers is applied when given)", body = Chat),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid input", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Shard busy or unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn put_chat(
    State(state): State<AppState>,
    ChatPath(chat): ChatPath,
    OptionalJsonBody(body): OptionalJsonBody<CreateChatRequest>,
) -> Result<(StatusCode, Json<Chat>), Problem> {
    let max_members = body
        .and_then(|b| b.max_members)
        .map(|m| MaxMembers::parse(i64::from(m)))
        .transpose()
        .map_err(|e| Problem::invalid(e.0))?;
    let (chat, created) = state.service.create_chat(&chat, max_members).await?;
    Ok((status_for(created), Json(chat.into())))
}

/// Get a chat.
#[utoipa::path(
    get, path = "/v1/chats/{chatId}", tag = "chats", params(ChatIdParam, ConsistencyParams),
    responses(
        (status = 200, description = "The chat", body = Chat, headers(
            ("Chatshard-Served-By" = String, description = "`writer` or `replica`: which member of the shard answered"),
            ("Chatshard-Member" = String, description = "The `host:port` of the member that answered"),
            ("Chatshard-Staleness-Ms" = u64, description = "How stale the answer may be, in milliseconds (0 from the writer)"),
        )),
        (status = 404, description = "chat_not_found", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid chatId", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Shard busy or unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_chat(
    State(state): State<AppState>,
    ChatPath(chat): ChatPath,
    Consistency(at): Consistency,
) -> Result<impl IntoResponse, Problem> {
    let read = state.service.get_chat(&chat, at).await?;
    Ok((served_headers(&read.served), Json(Chat::from(read.value))))
}

/// Get a chat's member count (one key lookup, never a scan).
#[utoipa::path(
    get, path = "/v1/chats/{chatId}/member-count", tag = "members", params(ChatIdParam, ConsistencyParams),
    responses(
        (status = 200, description = "The count", body = MemberCount, headers(
            ("Chatshard-Served-By" = String, description = "`writer` or `replica`: which member of the shard answered"),
            ("Chatshard-Member" = String, description = "The `host:port` of the member that answered"),
            ("Chatshard-Staleness-Ms" = u64, description = "How stale the answer may be, in milliseconds (0 from the writer)"),
        )),
        (status = 404, description = "chat_not_found", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid chatId", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Shard busy or unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_member_count(
    State(state): State<AppState>,
    ChatPath(chat): ChatPath,
    Consistency(at): Consistency,
) -> Result<impl IntoResponse, Problem> {
    let read = state.service.member_count(&chat, at).await?;
    Ok((
        served_headers(&read.served),
        Json(MemberCount {
            chat_id: chat.to_string(),
            member_count: read.value,
        }),
    ))
}

/// A page of the chat's snapshot: the chat and its JOINED members, with the
/// revision the snapshot is taken at. A reader left behind by the purge
/// (410 `revision_purged`) loads every page, then fetches the events after
/// `revision`: every join or leave since is among them.
#[utoipa::path(
    get, path = "/v1/chats/{chatId}/snapshot", tag = "chats", params(ChatIdParam, SnapshotPageParams, ConsistencyParams),
    responses(
        (status = 200, description = "A page of the snapshot", body = ChatSnapshot, headers(
            ("Chatshard-Served-By" = String, description = "`writer` or `replica`: which member of the shard answered"),
            ("Chatshard-Member" = String, description = "The `host:port` of the member that answered"),
            ("Chatshard-Staleness-Ms" = u64, description = "How stale the answer may be, in milliseconds (0 from the writer)"),
        )),
        (status = 400, description = "Undecodable query string", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "chat_not_found", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "revision_purged: the events after this snapshot's revision were purged while it was paged; start again", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid id, cursor or limit", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Shard busy or unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_snapshot(
    State(state): State<AppState>,
    ChatPath(chat): ChatPath,
    query: PageQuery,
    Consistency(at): Consistency,
) -> Result<impl IntoResponse, Problem> {
    let cursor = query
        .after
        .as_deref()
        .map(SnapshotCursor::parse)
        .transpose()
        .map_err(|e| Problem::invalid(e.0))?;
    let limit = PageLimit::parse(query.limit.as_deref()).map_err(|e| Problem::invalid(e.0))?;
    let page = state
        .service
        .snapshot(&chat, cursor, limit, at)
        .await
        .map_err(|e| match e {
            ServiceError::RevisionPurged { .. } => Problem::from(e).with_snapshot(&chat),
            e => Problem::from(e),
        })?;
    Ok((
        served_headers(&page.served),
        Json(ChatSnapshot::from(page.value)),
    ))
}
