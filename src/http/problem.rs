//! RFC 9457 problem details: the one place errors become HTTP responses.
//!
//! Every error answer is `application/problem+json` with `type`, `title`,
//! `status`, `detail` and a stable machine-readable `code` from [`Code`]. The
//! mapping from [`ServiceError`] matches every variant explicitly, so a new
//! variant cannot compile without a status. Throttling and unavailability
//! answers carry `Retry-After`. Internal errors are logged here, once, with
//! their cause; their `detail` never contains SQL or driver text.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::service::ServiceError;

/// The media type of every error answer.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Declares [`Code`] with its wire name, and [`Code::ALL`] from the same list,
/// so a new code cannot be left out of the catalogue (or its test).
macro_rules! codes {
    ($($variant:ident => $name:literal,)+) => {
        /// The catalogue of error codes (docs/api.md lists the same table).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Code {
            $($variant,)+
        }

        impl Code {
            /// Every code, in declaration order.
            pub const ALL: &'static [Code] = &[$(Code::$variant,)+];

            /// The stable machine-readable name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)+
                }
            }
        }
    };
}

codes! {
    InvalidRequest => "invalid_request",
    MalformedJson => "malformed_json",
    UnsupportedMediaType => "unsupported_media_type",
    PayloadTooLarge => "payload_too_large",
    UriTooLong => "uri_too_long",
    RequestTimeout => "request_timeout",
    TooManyConnections => "too_many_connections",
    TooManySubscribers => "too_many_subscribers",
    TooManyChatsInStream => "too_many_chats_in_stream",
    StreamNotFound => "stream_not_found",
    StreamResumeExpired => "stream_resume_expired",
    RevisionPurged => "revision_purged",
    NotFound => "not_found",
    MethodNotAllowed => "method_not_allowed",
    Unauthorized => "unauthorized",
    Unauthenticated => "unauthenticated",
    Forbidden => "forbidden",
    AdminDisabled => "admin_disabled",
    ChatNotFound => "chat_not_found",
    MemberNotFound => "member_not_found",
    ChatFull => "chat_full",
    NotAMember => "not_a_member",
    IdempotencyKeyReused => "idempotency_key_reused",
    ChatBusy => "chat_busy",
    ChatQueueFull => "chat_queue_full",
    ChatContended => "chat_contended",
    JoinThrottled => "join_throttled",
    FetchThrottled => "fetch_throttled",
    InvalidConfig => "invalid_config",
    ShardBusy => "shard_busy",
    ShardTimeout => "shard_timeout",
    ShardUnavailable => "shard_unavailable",
    ShardReadOnly => "shard_read_only",
    ShardSplitBrain => "shard_split_brain",
    OutcomeUnknown => "outcome_unknown",
    ChatMoving => "chat_moving",
    UnknownShard => "unknown_shard",
    MoveRefused => "move_refused",
    ReparentRefused => "reparent_refused",
    Internal => "internal",
}

impl Code {
    pub fn status(self) -> StatusCode {
        match self {
            Self::InvalidRequest
            | Self::IdempotencyKeyReused
            | Self::InvalidConfig
            | Self::UnknownShard => StatusCode::UNPROCESSABLE_ENTITY,
            Self::JoinThrottled | Self::FetchThrottled | Self::TooManyChatsInStream => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::StreamResumeExpired | Self::RevisionPurged => StatusCode::GONE,
            Self::MalformedJson => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UriTooLong => StatusCode::URI_TOO_LONG,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::NotFound | Self::ChatNotFound | Self::MemberNotFound | Self::StreamNotFound => {
                StatusCode::NOT_FOUND
            }
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unauthorized | Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::AdminDisabled => StatusCode::FORBIDDEN,
            Self::ChatFull | Self::MoveRefused | Self::ReparentRefused => StatusCode::CONFLICT,
            Self::NotAMember => StatusCode::FORBIDDEN,
            Self::ChatBusy
            | Self::ChatQueueFull
            | Self::ChatContended
            | Self::TooManyConnections
            | Self::TooManySubscribers
            | Self::ShardBusy
            | Self::ShardTimeout
            | Self::ShardUnavailable
            | Self::ShardReadOnly
            | Self::ShardSplitBrain
            | Self::OutcomeUnknown
            | Self::ChatMoving => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Self::InvalidRequest => "The request is not valid",
            Self::MalformedJson => "The body is not well-formed JSON",
            Self::UnsupportedMediaType => "The body must be application/json",
            Self::PayloadTooLarge => "The body is too large",
            Self::UriTooLong => "The request target is too long",
            Self::RequestTimeout => "The request was not received in time",
            Self::TooManyConnections => "This instance holds its maximum of connections",
            Self::TooManySubscribers => "This instance holds its maximum of event streams",
            Self::TooManyChatsInStream => "The stream follows its maximum of chats",
            Self::StreamNotFound => "Stream not found",
            Self::StreamResumeExpired => "The stream cannot resume that far back",
            Self::RevisionPurged => "The events after this revision were purged",
            Self::NotFound => "No such resource",
            Self::MethodNotAllowed => "Method not allowed on this resource",
            Self::Unauthorized => "Missing or wrong admin token",
            Self::Unauthenticated => "Missing or unknown client token",
            Self::Forbidden => "The client lacks the scope this route needs",
            Self::AdminDisabled => "The admin API is off",
            Self::ChatNotFound => "Chat not found",
            Self::MemberNotFound => "Member not found",
            Self::ChatFull => "The chat is full",
            Self::NotAMember => "The sender is not a member of the chat",
            Self::IdempotencyKeyReused => "The idempotency key was used for a different request",
            Self::ChatBusy => "This chat holds its whole share of its shard",
            Self::ChatQueueFull => "Too many writes to this chat are queued",
            Self::ChatMoving => "The chat is moving to another shard",
            Self::UnknownShard => "No shard has this name",
            Self::MoveRefused => "The move cannot start",
            Self::ReparentRefused => "The switchover or failover cannot run",
            Self::ChatContended => "Writes to this chat are waiting for each other",
            Self::JoinThrottled => "Too many joins to this chat",
            Self::FetchThrottled => "This chat is hot: event fetches are throttled",
            Self::InvalidConfig => "The configuration is not valid",
            Self::ShardBusy => "The chat's shard is busy",
            Self::ShardTimeout => "The chat's shard did not answer in time",
            Self::ShardUnavailable => "The chat's shard is unavailable",
            Self::ShardReadOnly => "The chat's shard accepts no writes",
            Self::ShardSplitBrain => "The chat's shard has several writable servers",
            Self::OutcomeUnknown => "The outcome of the write is unknown",
            Self::Internal => "Internal error",
        }
    }

    /// Seconds a client should wait before retrying, for retryable codes.
    pub fn retry_after(self) -> Option<u32> {
        match self.status() {
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => Some(1),
            _ => None,
        }
    }
}

/// An RFC 9457 problem details body.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(examples(json!({"type": "urn:chatshard:problem:chat_not_found", "title": "Chat not found", "status": 404, "detail": "no chat has this chatId", "code": "chat_not_found"})))]
pub struct Problem {
    /// A URI naming the problem type: `urn:chatshard:problem:<code>`.
    #[serde(rename = "type")]
    pub type_: Box<str>,
    /// A short summary of the problem type.
    pub title: &'static str,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: Box<str>,
    /// A stable machine-readable code (see the error catalogue).
    pub code: &'static str,
    /// Every problem found, for `invalid_config`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// For `fetch_throttled`: the chat's event stream, which is never
    /// throttled (follow it instead of polling).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<Box<str>>,
    /// For `revision_purged`: the lowest revision still stored.
    #[serde(rename = "firstRevision", skip_serializing_if = "Option::is_none")]
    pub first_revision: Option<u64>,
    /// For `revision_purged`: where to full-sync from (the chat's snapshot).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<Box<str>>,
    #[serde(skip)]
    #[schema(ignore)]
    retry_after: Option<u32>,
}

impl Problem {
    pub fn new(code: Code, detail: impl Into<String>) -> Self {
        Self {
            type_: format!("urn:chatshard:problem:{}", code.as_str()).into(),
            title: code.title(),
            status: code.status().as_u16(),
            detail: detail.into().into_boxed_str(),
            code: code.as_str(),
            errors: Vec::new(),
            stream: None,
            first_revision: None,
            snapshot: None,
            retry_after: code.retry_after(),
        }
    }

    /// Lists every problem found (RFC 9457 extension member `errors`).
    pub fn with_errors(mut self, errors: Vec<String>) -> Self {
        self.errors = errors;
        self
    }

    /// Names the chat's event stream (for `fetch_throttled`).
    pub fn with_stream(mut self, chat: &crate::domain::ChatId) -> Self {
        self.stream = Some(format!("/v1/chats/{chat}/events/stream").into());
        self
    }

    /// Names the chat's snapshot (for `revision_purged`).
    pub fn with_snapshot(mut self, chat: &crate::domain::ChatId) -> Self {
        self.snapshot = Some(format!("/v1/chats/{chat}/snapshot").into());
        self
    }

    /// Replaces the default `Retry-After` of the code.
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(u32::try_from(secs.max(1)).unwrap_or(u32::MAX));
        self
    }

    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(Code::InvalidRequest, detail)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        // The request's server span carries the stable code of its error.
        tracing::Span::current().record("error.type", self.code);
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = self.retry_after;
        let mut response = (status, axum::Json(self)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(secs) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<ServiceError> for Problem {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::ChatNotFound => Self::new(Code::ChatNotFound, "no chat has this chatId"),
            ServiceError::MemberNotFound => Self::new(
                Code::MemberNotFound,
                "this user has never been a member of the chat",
            ),
            ServiceError::ChatFull { max_members } => Self::new(
                Code::ChatFull,
                format!("the chat already has its maximum of {max_members} members"),
            ),
            ServiceError::NotAMember => Self::new(
                Code::NotAMember,
                "the sender must be a JOINED member of the chat",
            ),
            ServiceError::IdempotencyKeyReused => Self::new(
                Code::IdempotencyKeyReused,
                "this clientMessageId was already used by this sender for a different text",
            ),
            ServiceError::ChatBusy { shard } => Self::new(
                Code::ChatBusy,
                format!(
                    "this chat holds its whole share of shard {shard}'s connections and waiting \
                     places; retry after the delay given"
                ),
            ),
            ServiceError::ChatQueueFull => Self::new(
                Code::ChatQueueFull,
                "too many writes to this chat are queued on this instance; retry after the delay given",
            ),
            ServiceError::ChatContended { shard } => Self::new(
                Code::ChatContended,
                format!(
                    "writes to this chat on shard {shard} waited too long for each other's row \
                     locks; nothing was applied: retry after the delay given"
                ),
            ),
            ServiceError::ChatMoving { retry_after_secs } => Self::new(
                Code::ChatMoving,
                "the chat is being switched to another shard and takes no writes for a moment; \
                 nothing was applied: retry after the delay given",
            )
            .with_retry_after(retry_after_secs),
            ServiceError::RevisionPurged { first_revision } => {
                let mut p = Self::new(
                    Code::RevisionPurged,
                    format!(
                        "the events after this revision are no longer stored (the first stored is \
                         {first_revision}): load the chat's snapshot, then fetch the events after \
                         the snapshot's revision"
                    ),
                );
                p.first_revision = Some(first_revision);
                p
            }
            ServiceError::UnknownShard { shard } => Self::new(
                Code::UnknownShard,
                format!("no configured shard is named {shard:?}"),
            ),
            ServiceError::MoveRefused { reason } => Self::new(Code::MoveRefused, reason),
            ServiceError::ReparentRefused { reason } => Self::new(Code::ReparentRefused, reason),
            ServiceError::MoveNotFound { id } => {
                Self::new(Code::NotFound, format!("no move has the id {id:?}"))
            }
            ServiceError::JoinThrottled { retry_after_secs } => Self::new(
                Code::JoinThrottled,
                "this chat accepts no more joins in the current window; retry after the delay given",
            )
            .with_retry_after(retry_after_secs),
            ServiceError::FetchThrottled { retry_after_secs } => Self::new(
                Code::FetchThrottled,
                "this chat is hot and its event polls are throttled; retry after the delay given, \
                 or follow the chat without polling: long-poll with waitMs, or subscribe to \
                 GET /v1/chats/{chatId}/events/stream (never throttled)",
            )
            .with_retry_after(retry_after_secs),
            ServiceError::ShardBusy { shard } => Self::new(
                Code::ShardBusy,
                format!("shard {shard} has no free capacity; retry shortly"),
            ),
            ServiceError::ShardTimeout { shard } => Self::new(
                Code::ShardTimeout,
                format!("shard {shard} did not answer within its deadline"),
            ),
            ServiceError::ShardUnavailable {
                shard,
                retry_after_secs,
            } => Self::new(
                Code::ShardUnavailable,
                format!(
                    "shard {shard} cannot be reached, or is known broken (circuit breaker open)"
                ),
            )
            .with_retry_after(retry_after_secs),
            ServiceError::ShardReadOnly { shard } => Self::new(
                Code::ShardReadOnly,
                format!("shard {shard} is read-only; reads still work, writes do not"),
            ),
            ServiceError::ShardSplitBrain { shard } => Self::new(
                Code::ShardSplitBrain,
                format!(
                    "several servers of shard {shard} accept writes; writes wait until an \
                     operator makes all but one read-only (reads still work)"
                ),
            )
            .with_retry_after(1),
            ServiceError::OutcomeUnknown { shard, cause } => Self::new(
                Code::OutcomeUnknown,
                format!(
                    "a write on shard {shard} ended without an answer ({cause}); \
                     it may or may not be applied: retry it unchanged, it will not apply twice"
                ),
            ),
            ServiceError::Internal(fault) => {
                // One fault can answer a whole batch of requests: log it once.
                if fault.first_report() {
                    tracing::error!(error = %crate::error::chain(&fault), "internal error");
                }
                Self::new(
                    Code::Internal,
                    "an internal error occurred; it has been logged",
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_distinct_name_and_an_error_status() {
        let mut names = std::collections::HashSet::new();
        for &code in Code::ALL {
            assert!(names.insert(code.as_str()));
            assert!(code.status().is_client_error() || code.status().is_server_error());
            assert_eq!(
                code.retry_after().is_some(),
                code.status() == StatusCode::SERVICE_UNAVAILABLE
                    || code.status() == StatusCode::TOO_MANY_REQUESTS
            );
        }
    }

    #[test]
    fn the_catalogue_in_the_docs_lists_every_code() {
        let docs = include_str!("../../docs/api.md");
        for &code in Code::ALL {
            assert!(
                docs.contains(&format!("`{}`", code.as_str())),
                "docs/api.md lacks {}",
                code.as_str()
            );
        }
    }

    #[test]
    fn internal_errors_hide_their_cause() {
        let p = Problem::from(ServiceError::Internal(crate::service::Fault::new(
            "SELECT secret FROM x: syntax",
        )));
        assert_eq!(p.status, 500);
        assert!(!p.detail.contains("SELECT"));
    }
}
