//! `/v1/admin/...`: the operator's view, behind a bearer token.
//!
//! With no token configured the admin API is off (403 `admin_disabled`), never
//! open. The token is compared in constant time. Nothing here shows user
//! content.

use axum::Json;
use axum::extract::{FromRef, FromRequestParts, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use chrono::{DateTime, Utc};
use serde::Serialize;
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use super::AppState;
use super::extract::JsonBody;
use super::model::BreakerStateView;
use super::problem::{Code, Problem};
use crate::live::LiveConfig;
use crate::shard::{RECENT_SECS, ShardStatus};
use crate::throttle::Decisions;

/// Proof that the request carried the admin token.
pub struct Admin;

impl<S> FromRequestParts<S> for Admin
where
    AppState: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        let state = AppState::from_ref(state);
        let Some(expected) = state.admin_token.as_deref() else {
            return Err(Problem::new(
                Code::AdminDisabled,
                "the admin API is off: configure admin.token or CHATSHARD_ADMIN_TOKEN",
            ));
        };
        let given = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
            Ok(Admin)
        } else {
            Err(Problem::new(
                Code::Unauthorized,
                "send the admin token as Authorization: Bearer <token>",
            ))
        }
    }
}

/// The circuit breaker of a shard.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BreakerView {
    pub state: BreakerStateView,
    pub since: DateTime<Utc>,
}

/// Calls over the last seconds.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecentView {
    pub window_secs: u64,
    pub calls: u64,
    /// Failed calls / calls (counted failures, read-only, contention and
    /// database errors).
    pub failure_rate: f64,
}

/// The last failure seen on a shard, with its cause chain.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastError {
    pub at: DateTime<Utc>,
    pub message: String,
}

/// Calls refused by each protection since start.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RejectedView {
    pub breaker_open: u64,
    pub shard_busy: u64,
    pub chat_busy: u64,
}

/// One shard as the operator sees it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardView {
    pub name: String,
    pub address: String,
    pub breaker: BreakerView,
    /// Operations running on the shard now.
    pub in_flight: usize,
    /// Callers waiting for a connection now.
    pub waiting: usize,
    /// `pool.max_concurrent`.
    pub capacity: usize,
    /// `pool.max_waiting`.
    pub waiting_capacity: usize,
    /// Slots one chat may hold.
    pub per_chat_capacity: usize,
    /// Open connections.
    pub pool_size: usize,
    /// Open connections not in use.
    pub pool_idle: usize,
    pub recent: RecentView,
    pub last_error: Option<LastError>,
    pub rejected: RejectedView,
    /// `@@innodb_autoinc_lock_mode` as read at start-up (null if unknown).
    pub autoinc_lock_mode: Option<i64>,
    /// `@@innodb_flush_log_at_trx_commit` as read at start-up (null if unknown).
    pub flush_log_at_trx_commit: Option<i64>,
}

/// `GET /v1/admin/shards`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ShardsView {
    pub shards: Vec<ShardView>,
}

impl From<ShardStatus> for ShardView {
    fn from(s: ShardStatus) -> Self {
        Self {
            name: s.name,
            address: s.address,
            breaker: BreakerView {
                state: s.breaker.into(),
                since: s.breaker_since,
            },
            in_flight: s.in_flight,
            waiting: s.waiting,
            capacity: s.capacity,
            waiting_capacity: s.waiting_capacity,
            per_chat_capacity: s.per_chat_capacity,
            pool_size: s.pool_size,
            pool_idle: s.pool_idle,
            recent: RecentView {
                window_secs: RECENT_SECS,
                calls: s.recent_calls,
                failure_rate: s.recent_failure_rate,
            },
            last_error: s
                .last_failure
                .map(|(at, message)| LastError { at, message }),
            rejected: RejectedView {
                breaker_open: s.rejected.breaker_open,
                shard_busy: s.rejected.shard_busy,
                chat_busy: s.rejected.chat_busy,
            },
            autoinc_lock_mode: s.innodb.map(|i| i.autoinc_lock_mode),
            flush_log_at_trx_commit: s.innodb.map(|i| i.flush_log_at_trx_commit),
        }
    }
}

/// Every shard's breaker, bulkhead and recent health.
#[utoipa::path(
    get, path = "/v1/admin/shards", tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Every shard", body = ShardsView),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "admin_disabled", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn shards(_: Admin, State(state): State<AppState>) -> Json<ShardsView> {
    Json(ShardsView {
        shards: state
            .service
            .shards()
            .all()
            .iter()
            .map(|s| s.status().into())
            .collect(),
    })
}

/// The live configuration and its version.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConfigView {
    /// Grows with every accepted change.
    pub version: u64,
    pub config: LiveConfig,
}

fn config_view(state: &AppState) -> ConfigView {
    let snapshot = state.service.live().load();
    ConfigView {
        version: snapshot.version,
        config: snapshot.config.clone(),
    }
}

/// The live configuration.
#[utoipa::path(
    get, path = "/v1/admin/config", tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The live configuration", body = ConfigView),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "admin_disabled", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_config(_: Admin, State(state): State<AppState>) -> Json<ConfigView> {
    Json(config_view(&state))
}

/// Replaces the live configuration (fields left out take their defaults).
#[utoipa::path(
    put, path = "/v1/admin/config", tag = "admin",
    security(("admin_token" = [])),
    request_body(content = LiveConfig, content_type = "application/json"),
    responses(
        (status = 200, description = "Accepted (the version grows when anything changed)", body = ConfigView),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "admin_disabled", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid_config (every problem in `errors`; the old config stays) or invalid_request", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn put_config(
    _: Admin,
    State(state): State<AppState>,
    JsonBody(config): JsonBody<LiveConfig>,
) -> Result<Json<ConfigView>, Problem> {
    state
        .service
        .live()
        .update(config, "admin API")
        .map_err(|errors| {
            Problem::new(
                Code::InvalidConfig,
                "the configuration was rejected; the previous one stays",
            )
            .with_errors(errors)
        })?;
    Ok(Json(config_view(&state)))
}

/// A hot chat.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HotChatView {
    pub chat_id: String,
    /// When the mark expires unless the chat stays hot.
    pub hot_until: DateTime<Utc>,
    /// Recent events per second on this instance.
    pub events_per_second: f64,
}

/// Throttling decisions since start, by kind.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DecisionsView {
    pub joins_throttled: u64,
    pub joins_throttled_dry_run: u64,
    pub fetches_throttled: u64,
    pub fetches_throttled_dry_run: u64,
    pub hot_chats_marked: u64,
    pub hot_chats_marked_dry_run: u64,
    /// Event fetches asked for, and the queries they cost (the rest were
    /// coalesced or served from a kept page).
    pub fetches: u64,
    pub fetch_queries: u64,
}

/// `GET /v1/admin/hot-chats`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HotChatsView {
    pub hot_chats: Vec<HotChatView>,
    pub decisions: DecisionsView,
}

/// Chats hot now on this instance, and the throttling decisions so far.
#[utoipa::path(
    get, path = "/v1/admin/hot-chats", tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Hot chats", body = HotChatsView),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "admin_disabled", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn hot_chats(_: Admin, State(state): State<AppState>) -> Json<HotChatsView> {
    let throttle = state.service.throttle();
    let now = Utc::now();
    let d = &throttle.decisions;
    Json(HotChatsView {
        hot_chats: throttle
            .hot
            .hot_chats()
            .into_iter()
            .map(|h| HotChatView {
                chat_id: h.chat.to_string(),
                hot_until: now
                    + chrono::Duration::milliseconds(
                        i64::try_from(h.expires_in_ms).unwrap_or(i64::MAX),
                    ),
                events_per_second: h.events_per_second,
            })
            .collect(),
        decisions: DecisionsView {
            joins_throttled: Decisions::get(&d.joins_throttled),
            joins_throttled_dry_run: Decisions::get(&d.joins_throttled_dry_run),
            fetches_throttled: Decisions::get(&d.fetches_throttled),
            fetches_throttled_dry_run: Decisions::get(&d.fetches_throttled_dry_run),
            hot_chats_marked: Decisions::get(&d.hot_chats_marked),
            hot_chats_marked_dry_run: Decisions::get(&d.hot_chats_marked_dry_run),
            fetches: Decisions::get(&d.fetches),
            fetch_queries: Decisions::get(&d.fetch_queries),
        },
    })
}
