//! The JSON shapes of the API (camelCase, RFC 3339 UTC timestamps) and their
//! OpenAPI schemas.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::service;

/// Body of `PUT /v1/chats/{chatId}`; the body itself may be omitted.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(examples(json!({"maxMembers": 5000})))]
pub struct CreateChatRequest {
    /// Most members the chat may hold (1..100000); the configured default when
    /// absent. Given for an existing chat, it replaces the current limit.
    #[schema(minimum = 1, maximum = 100000)]
    pub max_members: Option<u32>,
}

/// Body of `POST /v1/chats/{chatId}/members`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(examples(json!({"userId": "alice"})))]
pub struct JoinRequest {
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$", min_length = 1, max_length = 64)]
    pub user_id: String,
}

/// Body of `POST /v1/chats/{chatId}/messages`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(examples(json!({"senderId": "alice", "clientMessageId": "m-1", "text": "hello"})))]
pub struct PostMessageRequest {
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$", min_length = 1, max_length = 64)]
    pub sender_id: String,
    /// The sender's idempotency key for this message.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$", min_length = 1, max_length = 64)]
    pub client_message_id: String,
    #[schema(min_length = 1, max_length = 4000)]
    pub text: String,
}

/// A chat.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(examples(json!({"chatId": "general", "shard": "shard-3", "memberCount": 1, "maxMembers": 5000, "revision": 2, "firstRevision": 1, "createdAt": "2026-11-30T12:00:00.000000Z"})))]
pub struct Chat {
    pub chat_id: String,
    /// The shard that stores the chat.
    pub shard: String,
    pub member_count: u32,
    pub max_members: u32,
    /// The chat's latest event revision (0 before the first event).
    pub revision: u64,
    /// The lowest revision still stored (1 until the first purge): events
    /// can be fetched after `firstRevision - 1` and later; a reader behind it
    /// gets 410 `revision_purged` and full-syncs from the snapshot.
    pub first_revision: u64,
    pub created_at: DateTime<Utc>,
}

impl From<service::Chat> for Chat {
    fn from(c: service::Chat) -> Self {
        Self {
            chat_id: c.chat_id.to_string(),
            shard: c.shard,
            member_count: c.member_count,
            max_members: c.max_members,
            revision: c.revision,
            first_revision: c.first_revision,
            created_at: c.created_at,
        }
    }
}

/// Membership state.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MemberState {
    Joined,
    Left,
}

/// A chat member.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(examples(json!({"chatId": "general", "userId": "alice", "memberId": 1, "state": "JOINED", "joinedAt": "2026-11-30T12:00:01.000000Z"})))]
pub struct Member {
    pub chat_id: String,
    pub user_id: String,
    /// Stable id of the membership; kept across leave and re-join.
    pub member_id: u64,
    pub state: MemberState,
    /// When the member last joined.
    pub joined_at: DateTime<Utc>,
}

impl From<service::Member> for Member {
    fn from(m: service::Member) -> Self {
        Self {
            chat_id: m.chat_id.to_string(),
            user_id: m.user_id,
            member_id: m.member_id,
            state: match m.state {
                crate::domain::MemberState::Joined => MemberState::Joined,
                crate::domain::MemberState::Left => MemberState::Left,
            },
            joined_at: m.joined_at,
        }
    }
}

/// A page of JOINED members.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(examples(json!({"members": [{"chatId": "general", "userId": "alice", "memberId": 1, "state": "JOINED", "joinedAt": "2026-11-30T12:00:01.000000Z"}], "nextCursor": null})))]
pub struct MemberPage {
    pub members: Vec<Member>,
    /// Pass as `after` to get the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// A page of a chat's snapshot (full sync).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(examples(json!({"chat": {"chatId": "general", "shard": "shard-3", "memberCount": 1, "maxMembers": 5000, "revision": 2, "firstRevision": 1, "createdAt": "2026-11-30T12:00:00.000000Z"}, "revision": 2, "members": [{"chatId": "general", "userId": "alice", "memberId": 1, "state": "JOINED", "joinedAt": "2026-11-30T12:00:01.000000Z"}], "nextCursor": null})))]
pub struct ChatSnapshot {
    /// The chat as this page read it.
    pub chat: Chat,
    /// The revision the snapshot is taken at (the first page's, repeated on
    /// every page): after loading every page, fetch the events after it.
    pub revision: u64,
    /// JOINED members, in id order.
    pub members: Vec<Member>,
    /// Pass as `after` to get the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

impl From<service::SnapshotPage> for ChatSnapshot {
    fn from(p: service::SnapshotPage) -> Self {
        Self {
            chat: p.chat.into(),
            revision: p.revision,
            members: p.members.into_iter().map(Into::into).collect(),
            next_cursor: p.next_cursor.map(crate::domain::SnapshotCursor::encode),
        }
    }
}

/// `?after=&limit=` of a snapshot page (documentation only).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct SnapshotPageParams {
    /// `nextCursor` of the previous page (absent for the first page).
    #[param(pattern = "^[0-9]{1,18}\\.[0-9]{1,18}$")]
    after: Option<String>,
    /// Members per page, 1..500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
}

/// The member count of a chat.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(examples(json!({"chatId": "general", "memberCount": 1})))]
pub struct MemberCount {
    pub chat_id: String,
    pub member_count: u32,
}

/// A message.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(examples(json!({"chatId": "general", "messageId": 1, "revision": 2, "senderId": "alice", "clientMessageId": "m-1", "text": "hello", "createdAt": "2026-11-30T12:00:02.000000Z"})))]
pub struct Message {
    pub chat_id: String,
    pub message_id: u64,
    /// The revision of the MESSAGE_SENT event of this message.
    pub revision: u64,
    pub sender_id: String,
    pub client_message_id: String,
    pub text: String,
    pub created_at: DateTime<Utc>,
}

impl From<service::Message> for Message {
    fn from(m: service::Message) -> Self {
        Self {
            chat_id: m.chat_id.to_string(),
            message_id: m.message_id,
            revision: m.revision,
            sender_id: m.sender_id,
            client_message_id: m.client_message_id,
            text: m.text,
            created_at: m.created_at,
        }
    }
}

/// What an event records.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventType {
    MessageSent,
    MemberJoined,
    MemberLeft,
}

/// One entry of a chat's event log.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(examples(json!({"revision": 2, "type": "MESSAGE_SENT", "userId": "alice", "messageId": 1, "text": "hello", "createdAt": "2026-11-30T12:00:02.000000Z"})))]
pub struct Event {
    pub revision: u64,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub user_id: String,
    /// Present on MESSAGE_SENT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<u64>,
    /// Present on MESSAGE_SENT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl From<service::Event> for Event {
    fn from(e: service::Event) -> Self {
        Self {
            revision: e.revision,
            kind: match e.kind {
                crate::domain::EventType::MessageSent => EventType::MessageSent,
                crate::domain::EventType::MemberJoined => EventType::MemberJoined,
                crate::domain::EventType::MemberLeft => EventType::MemberLeft,
            },
            user_id: e.user_id.to_string(),
            message_id: e.message_id,
            text: e.text.map(|t| t.to_string()),
            created_at: e.created_at,
        }
    }
}

/// A page of events, oldest first.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(examples(json!({"events": [{"revision": 1, "type": "MEMBER_JOINED", "userId": "alice", "createdAt": "2026-11-30T12:00:01.000000Z"}, {"revision": 2, "type": "MESSAGE_SENT", "userId": "alice", "messageId": 1, "text": "hello", "createdAt": "2026-11-30T12:00:02.000000Z"}], "latestRevision": 2})))]
pub struct EventPage {
    pub events: Vec<Event>,
    /// The chat's latest revision when the page was read.
    pub latest_revision: u64,
}

/// `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(examples(json!({"status": "ok"})))]
pub struct Health {
    /// Always `ok` while the process serves.
    pub status: String,
}

/// One shard in `GET /readyz`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardReadiness {
    pub name: String,
    pub address: String,
    pub ready: bool,
    /// The shard's circuit breaker.
    pub breaker: BreakerStateView,
    /// Why the shard is not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where writes go: `open`, `confirming`, `no_writer` or `split_brain`
    /// (docs/replicas.md).
    pub writes: String,
    /// The members of a replicated shard (absent without replicas).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberReadiness>,
}

/// One member of a replicated shard in `GET /readyz`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberReadiness {
    pub address: String,
    /// `writer`, `candidate`, `writable`, `replica`, `down` or `unknown`.
    pub role: String,
    /// Behind the writer by this much (null: unknown).
    pub lag_ms: Option<u64>,
    /// Whether it serves reads now.
    pub in_rotation: bool,
}

/// A circuit breaker's state, as `/readyz` and the admin view show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BreakerStateView {
    Closed,
    Open,
    HalfOpen,
}

impl From<crate::shard::BreakerState> for BreakerStateView {
    fn from(s: crate::shard::BreakerState) -> Self {
        use crate::shard::BreakerState;
        match s {
            BreakerState::Closed => Self::Closed,
            BreakerState::Open => Self::Open,
            BreakerState::HalfOpen => Self::HalfOpen,
        }
    }
}

/// `GET /readyz`: ready while at least one shard serves.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(examples(json!({"status": "ready", "shards": [{"name": "shard-0", "address": "127.0.0.1:3307", "ready": true, "breaker": "CLOSED"}]})))]
pub struct Readiness {
    /// `ready`, `degraded` (some shards down) or `unavailable` (all down).
    pub status: String,
    pub shards: Vec<ShardReadiness>,
}

/// Path of the chat routes (documentation only; parsing is in `extract`).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Path, names("chatId"))]
#[allow(dead_code)]
pub struct ChatIdParam(
    /// The chat's id.
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$", min_length = 1, max_length = 64)]
    String,
);

/// Path of the member routes (documentation only).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Path, names("chatId", "userId"))]
#[allow(dead_code)]
pub struct MemberIdParams(
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$", min_length = 1, max_length = 64)] String,
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$", min_length = 1, max_length = 64)] String,
);

/// `Chatshard-Revision`: the chat's revision once a write committed, the
/// token a later read sends as `minRevision` (docs/replicas.md).
pub fn revision_header(revision: u64) -> (axum::http::HeaderName, axum::http::HeaderValue) {
    (
        axum::http::HeaderName::from_static("chatshard-revision"),
        axum::http::HeaderValue::from(revision),
    )
}

/// The headers of an answer a replica may have served: who served it
/// (`writer` or `replica`), the member's `host:port`, and how stale the
/// answer may be in milliseconds (0 from the writer).
pub fn served_headers(
    served: &crate::service::Served,
) -> [(axum::http::HeaderName, axum::http::HeaderValue); 3] {
    use axum::http::{HeaderName, HeaderValue};
    [
        (
            HeaderName::from_static("chatshard-served-by"),
            HeaderValue::from_static(if served.writer { "writer" } else { "replica" }),
        ),
        (
            HeaderName::from_static("chatshard-member"),
            HeaderValue::from_str(&served.member)
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
        ),
        (
            HeaderName::from_static("chatshard-staleness-ms"),
            HeaderValue::from(served.staleness_ms),
        ),
    ]
}

/// `?minRevision=` of the reads a replica may serve (documentation only;
/// parsing is in `extract::Consistency`).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct ConsistencyParams {
    /// The lowest revision of the chat the answer may reflect: the
    /// `revision` of the caller's last write answer. A replica serves the
    /// read only once it holds the chat at this revision; otherwise the
    /// writer does. Also accepted as the `Chatshard-Min-Revision` header.
    /// Without it, a replica at most `replicas.max_lag_ms` behind may answer.
    #[param(rename = "minRevision", minimum = 0, maximum = 9223372036854775807_i64)]
    min_revision: Option<i64>,
}

/// `?after=&limit=` of the members page (documentation only).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct MemberPageParams {
    /// `nextCursor` of the previous page.
    #[param(pattern = "^[0-9]{1,18}$")]
    after: Option<String>,
    /// Page size, 1..500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
}

/// `?after=&limit=` of the events page (documentation only).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct EventPageParams {
    /// Return events with a revision above this one (default 0).
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    after: Option<i64>,
    /// Page size, 1..500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// Long-poll: when no event follows `after`, wait up to this many
    /// milliseconds for one, then answer an empty page (default 0: at once).
    #[param(rename = "waitMs", minimum = 0, maximum = 30000)]
    wait_ms: Option<u32>,
}

/// `?after=` of an event stream (documentation only).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct EventStreamParams {
    /// Stream the events with a revision above this one (default 0);
    /// `Last-Event-ID` wins over it.
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    after: Option<i64>,
}
