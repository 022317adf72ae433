//! `/v1/chats/{chatId}/members`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;

use super::extract::{ChatPath, Consistency, JsonBody, MemberPath, PageQuery};
use super::model::{
    ChatIdParam, ConsistencyParams, JoinRequest, Member, MemberIdParams, MemberPage,
    MemberPageParams, revision_header, served_headers,
};
use super::problem::Problem;
use super::{AppState, status_for};
use crate::domain::{MemberCursor, PageLimit, UserId};

/// Join a chat (or re-join after leaving).
#[utoipa::path(
    post, path = "/v1/chats/{chatId}/members", tag = "members", params(ChatIdParam),
    request_body(content = JoinRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Joined now (new or returning member)", body = Member, headers(("Chatshard-Revision" = u64, description = "The chat's revision once this write committed: send it as `minRevision` to read your write from a replica"))),
        (status = 200, description = "Already joined; nothing changed", body = Member, headers(("Chatshard-Revision" = u64, description = "The chat's revision once this write committed: send it as `minRevision` to read your write from a replica"))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "chat_not_found", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "chat_full", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid input", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "join_throttled", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Busy, unavailable or outcome unknown", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn join(
    State(state): State<AppState>,
    ChatPath(chat): ChatPath,
    JsonBody(body): JsonBody<JoinRequest>,
) -> Result<impl IntoResponse, Problem> {
    let user = UserId::parse(&body.user_id).map_err(|e| Problem::invalid(e.0))?;
    let (member, created, revision) = state.service.join(&chat, &user).await?;
    Ok((
        status_for(created),
        [revision_header(revision)],
        Json(Member::from(member)),
    ))
}

/// Get one member (JOINED or LEFT).
#[utoipa::path(
    get, path = "/v1/chats/{chatId}/members/{userId}", tag = "members", params(MemberIdParams, ConsistencyParams),
    responses(
        (status = 200, description = "The member", body = Member, headers(
            ("Chatshard-Served-By" = String, description = "`writer` or `replica`: which member of the shard answered"),
            ("Chatshard-Member" = String, description = "The `host:port` of the member that answered"),
            ("Chatshard-Staleness-Ms" = u64, description = "How stale the answer may be, in milliseconds (0 from the writer)"),
        )),
        (status = 404, description = "chat_not_found or member_not_found", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Shard busy or unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_member(
    State(state): State<AppState>,
    MemberPath(chat, user): MemberPath,
    Consistency(at): Consistency,
) -> Result<impl IntoResponse, Problem> {
    let read = state.service.get_member(&chat, &user, at).await?;
    Ok((served_headers(&read.served), Json(Member::from(read.value))))
}

/// Leave a chat. Leaving twice is not an error.
#[utoipa::path(
    delete, path = "/v1/chats/{chatId}/members/{userId}", tag = "members", params(MemberIdParams),
    responses(
        (status = 204, description = "Left now, or had already left", headers(("Chatshard-Revision" = u64, description = "The chat's revision once this write committed: send it as `minRevision` to read your write from a replica"))),
        (status = 404, description = "chat_not_found, or member_not_found (never a member)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Busy, unavailable or outcome unknown", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn leave(
    State(state): State<AppState>,
    MemberPath(chat, user): MemberPath,
) -> Result<impl IntoResponse, Problem> {
    let revision = state.service.leave(&chat, &user).await?;
    Ok((StatusCode::NO_CONTENT, [revision_header(revision)]))
}

/// List JOINED members, a page at a time, in a stable order.
#[utoipa::path(
    get, path = "/v1/chats/{chatId}/members", tag = "members", params(ChatIdParam, MemberPageParams, ConsistencyParams),
    responses(
        (status = 200, description = "A page of members", body = MemberPage, headers(
            ("Chatshard-Served-By" = String, description = "`writer` or `replica`: which member of the shard answered"),
            ("Chatshard-Member" = String, description = "The `host:port` of the member that answered"),
            ("Chatshard-Staleness-Ms" = u64, description = "How stale the answer may be, in milliseconds (0 from the writer)"),
        )),
        (status = 400, description = "Undecodable query string", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "chat_not_found", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid id, cursor or limit", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Shard busy or unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_members(
    State(state): State<AppState>,
    ChatPath(chat): ChatPath,
    query: PageQuery,
    Consistency(at): Consistency,
) -> Result<impl IntoResponse, Problem> {
    let after = MemberCursor::parse(query.after.as_deref()).map_err(|e| Problem::invalid(e.0))?;
    let limit = PageLimit::parse(query.limit.as_deref()).map_err(|e| Problem::invalid(e.0))?;
    let read = state.service.list_members(&chat, after, limit, at).await?;
    let page = read.value;
    Ok((
        served_headers(&read.served),
        Json(MemberPage {
            members: page.members.into_iter().map(Into::into).collect(),
            next_cursor: page.next_cursor.map(MemberCursor::encode),
        }),
    ))
}
