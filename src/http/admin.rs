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
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use super::AppState;
use super::auth::bearer_token;
use super::extract::{JsonValue, needs_body, shaped_as};
use super::model::BreakerStateView;
use super::move_views::{BucketMoveView, BucketTableView, MoveView, MovedChat};
use super::problem::{Code, Problem};
use super::shape::Schemas;
use crate::live::{LiveConfig, Snapshot};
use crate::service::live_config::ConfigChangeError;
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
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        // A client of [[api.clients]] with the admin scope (by its token, or
        // its certificate when no header is sent), beside the token.
        let certificate = parts.extensions.get::<super::tls::ClientCertificate>();
        if state
            .callers
            .authorize(header, certificate, crate::config::Scope::Admin)
            .is_ok()
        {
            return Ok(Admin);
        }
        let Some(expected) = state.admin_token.as_deref() else {
            return Err(Problem::new(
                Code::AdminDisabled,
                "the admin API is off: configure admin.token or CHATSHARD_ADMIN_TOKEN",
            ));
        };
        let given = header.and_then(bearer_token).unwrap_or("");
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
    /// The p99 of those calls in milliseconds, a move's own calls left out
    /// (null without calls).
    pub call_p99_ms: Option<f64>,
    /// Requests of the shard's chats this instance answered (streams and
    /// long-polls not counted).
    pub requests: u64,
    /// Their p99 in milliseconds, from arrival to answer (null without
    /// requests). A move's pacer watches this and `callP99Ms`.
    pub request_p99_ms: Option<f64>,
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
    /// Where writes go: `open` (to the writer, the member at `address`),
    /// `confirming` (a new writer awaits its confirmation), `no_writer`, or
    /// `split_brain` (docs/replicas.md).
    pub writes: String,
    /// Times the writes went to another member since start.
    pub writer_changes: u64,
    /// Every member of a replicated shard (empty without replicas).
    pub members: Vec<MemberView>,
}

/// One member of a replicated shard.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberView {
    /// `host:port`.
    pub address: String,
    /// The URL without secrets.
    pub url: String,
    /// `writer`, `candidate`, `writable` (split brain), `replica`, `down` or
    /// `unknown` (not read yet).
    pub role: String,
    /// Behind the writer by this much, by the heartbeat (null: unknown).
    pub lag_ms: Option<u64>,
    /// Whether it serves reads now.
    pub in_rotation: bool,
    pub breaker: BreakerStateView,
    pub in_flight: usize,
    pub pool_size: usize,
    /// Why it did not answer the monitor's last round.
    pub last_error: Option<String>,
}

/// A chat found, after a change of writer, below a revision this instance
/// acknowledged.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LostChatView {
    pub chat_id: String,
    pub shard: String,
    /// The highest revision this instance acknowledged.
    pub acknowledged: u64,
    /// The chat's revision on the new writer.
    pub found: u64,
    pub at: DateTime<Utc>,
}

/// `GET /v1/admin/shards`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardsView {
    pub shards: Vec<ShardView>,
    /// Chats whose acknowledged writes a failover lost (the newest 100
    /// this instance found; docs/replicas.md).
    pub lost_in_failover: Vec<LostChatView>,
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
                call_p99_ms: None,
                requests: 0,
                request_p99_ms: None,
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
            writes: s.gate.as_str().to_owned(),
            writer_changes: s.role_changes,
            members: s
                .members
                .into_iter()
                .map(|m| MemberView {
                    address: m.address,
                    url: m.url,
                    role: m.role.as_str().to_owned(),
                    lag_ms: m.lag_ms,
                    in_rotation: m.in_rotation,
                    breaker: m.breaker.into(),
                    in_flight: m.in_flight,
                    pool_size: m.pool_size,
                    last_error: m.last_error,
                })
                .collect(),
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
            .shard_loads()
            .into_iter()
            .map(|load| {
                let mut view = ShardView::from(load.status);
                let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
                view.recent.call_p99_ms = load.call_p99.map(ms);
                view.recent.requests = load.requests;
                view.recent.request_p99_ms = load.request_p99.map(ms);
                view
            })
            .collect(),
        lost_in_failover: state
            .service
            .acked()
            .lost()
            .into_iter()
            .map(|l| LostChatView {
                chat_id: l.chat_id,
                shard: l.shard,
                acknowledged: l.acknowledged,
                found: l.found,
                at: l.at,
            })
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

impl From<&Snapshot> for ConfigView {
    fn from(snapshot: &Snapshot) -> Self {
        Self {
            version: snapshot.version,
            config: snapshot.config.clone(),
        }
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
    Json(ConfigView::from(state.service.live_config().as_ref()))
}

/// Replaces the whole live configuration: every section and field is
/// required (the body is what `GET` returns under `config`), so leaving one out
/// is an error rather than a silent reset. To change some fields only, `PATCH`.
#[utoipa::path(
    put, path = "/v1/admin/config", tag = "admin",
    security(("admin_token" = [])),
    request_body(content = LiveConfig, content_type = "application/json",
        description = "The whole live configuration (every field; see LiveConfigDocument)"),
    responses(
        (status = 200, description = "Accepted (the version grows when anything changed)", body = ConfigView),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "admin_disabled", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid_config: every problem in `errors`; the old config stays", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn put_config(
    _: Admin,
    State(state): State<AppState>,
    JsonValue(body): JsonValue,
) -> Result<Json<ConfigView>, Problem> {
    let body = body.ok_or_else(needs_body)?;
    let config = shaped_as::<LiveConfig>(&state.schemas, "LiveConfigDocument", body)
        .map_err(unshaped_config)?;
    let snapshot = state
        .service
        .replace_live_config(config, ADMIN_API)
        .await
        .map_err(invalid_config)?;
    Ok(Json(ConfigView::from(snapshot.as_ref())))
}

/// Changes some fields of the live configuration: an RFC 7396 JSON merge
/// patch (`application/merge-patch+json`) applied to the current one; `null`
/// removes a per-chat override. The result must be a valid configuration.
#[utoipa::path(
    patch, path = "/v1/admin/config", tag = "admin",
    security(("admin_token" = [])),
    request_body(content = LiveConfig, content_type = "application/merge-patch+json",
        description = "The fields to change, shaped like the configuration; null removes an override"),
    responses(
        (status = 200, description = "Applied (the version grows when anything changed)", body = ConfigView),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "admin_disabled", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid_config: every problem of the patched configuration in `errors`; the old config stays", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn patch_config(
    _: Admin,
    State(state): State<AppState>,
    JsonValue(patch): JsonValue,
) -> Result<Json<ConfigView>, Problem> {
    let mut patch = patch.ok_or_else(needs_body)?;
    Schemas::normalize(&mut patch);
    let problems = state.schemas.check("LiveConfigPatch", &patch);
    if !problems.is_empty() {
        return Err(invalid_config(problems));
    }
    let snapshot = state
        .service
        .patch_live_config(patch, ADMIN_API, |document| {
            shaped_as::<LiveConfig>(&state.schemas, "LiveConfigDocument", document)
        })
        .await
        .map_err(|e| match e {
            ConfigChangeError::Shape(p) => unshaped_config(p),
            ConfigChangeError::Invalid(problems) => invalid_config(problems),
            ConfigChangeError::Internal(e) => Problem::from(e),
        })?;
    Ok(Json(ConfigView::from(snapshot.as_ref())))
}

/// How the live configuration's changes are named in the logs.
const ADMIN_API: &str = "admin API";

/// A body that does not fit the configuration's schema is an invalid
/// configuration too: every problem is listed the same way.
fn unshaped_config(p: Problem) -> Problem {
    if p.code != Code::InvalidRequest.as_str() {
        return p;
    }
    let problems = if p.errors.is_empty() {
        vec![p.detail.into()]
    } else {
        p.errors
    };
    invalid_config(problems)
}

fn invalid_config(problems: Vec<String>) -> Problem {
    Problem::new(
        Code::InvalidConfig,
        "the configuration was rejected; the previous one stays",
    )
    .with_errors(problems)
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
    /// Isolation moves this instance started, chats a dry run would have
    /// moved, and rounds where a due isolation waited (a move running on its
    /// source shard, or its hourly budget spent).
    pub chats_isolated: u64,
    pub chats_isolated_dry_run: u64,
    pub isolations_deferred: u64,
    /// Event fetches asked for, and the queries they cost (the rest were
    /// coalesced or served from a kept page).
    pub fetches: u64,
    pub fetch_queries: u64,
    /// Fetches served by another's query or a kept page.
    pub fetches_coalesced: u64,
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
            chats_isolated: Decisions::get(&d.chats_isolated),
            chats_isolated_dry_run: Decisions::get(&d.chats_isolated_dry_run),
            isolations_deferred: Decisions::get(&d.isolations_deferred),
            fetches: Decisions::get(&d.fetches),
            fetch_queries: Decisions::get(&d.fetch_queries),
            fetches_coalesced: Decisions::get(&d.fetches_coalesced),
        },
    })
}

/// The fleet as this instance sees it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FleetAdminView {
    /// `false`: no Redis is configured, and this instance works alone.
    pub enabled: bool,
    /// Present when `enabled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<crate::fleet::FleetView>,
}

/// The live instances of the fleet, and whether Redis answers.
#[utoipa::path(
    get, path = "/v1/admin/fleet", tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The fleet", body = FleetAdminView),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "admin_disabled", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn fleet(_: Admin, State(state): State<AppState>) -> Json<FleetAdminView> {
    let fleet = state.service.fleet().map(|f| f.view());
    Json(FleetAdminView {
        enabled: fleet.is_some(),
        fleet,
    })
}

/// `POST /v1/admin/chats/{chatId}/move`.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(examples(json!({"to": "shard-3"})))]
pub struct MoveRequest {
    /// The shard to move the chat to, by its configured name.
    #[schema(min_length = 1, max_length = 64)]
    pub to: String,
}

/// Starts moving a chat to another shard, online (docs/moving-chats.md): the
/// move runs in the background; follow it with `GET /v1/admin/moves/{moveId}`.
#[utoipa::path(
    post, path = "/v1/admin/chats/{chatId}/move", tag = "admin", params(super::model::ChatIdParam),
    security(("admin_token" = [])),
    request_body(content = MoveRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "The move, started", body = MoveView),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "admin_disabled", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "chat_not_found", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "move_refused: the chat is on that shard already, or has a move running", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "unknown_shard, or an invalid chat id", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "A shard involved is unavailable or busy", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn move_chat(
    _: Admin,
    State(state): State<AppState>,
    super::extract::ChatPath(chat): super::extract::ChatPath,
    super::extract::JsonBody(body): super::extract::JsonBody<MoveRequest>,
) -> Result<(axum::http::StatusCode, Json<MoveView>), Problem> {
    let view = state.service.start_move(&chat, &body.to).await?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(view.into())))
}

/// Every chat move recorded on the shards, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct MovesView {
    pub moves: Vec<MoveView>,
}

/// The chat moves, running and ended.
#[utoipa::path(
    get, path = "/v1/admin/moves", tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Every move recorded (a shard that cannot answer is left out)", body = MovesView),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "admin_disabled", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn moves(_: Admin, State(state): State<AppState>) -> Json<MovesView> {
    Json(MovesView {
        moves: state
            .service
            .moves()
            .await
            .into_iter()
            .map(MoveView::from)
            .collect(),
    })
}

/// The chats that live away from their home shard.
#[derive(Debug, Serialize, ToSchema)]
pub struct MovedChatsView {
    /// By chat id.
    pub chats: Vec<MovedChat>,
    /// A shard had more than 1,000 moved chats (only its first 1,000 are
    /// listed), or could not answer.
    pub partial: bool,
}

/// The chats moved off their home shard (the shard their bucket gives
/// them), and where each lives now: an override on top of the bucket table.
#[utoipa::path(
    get, path = "/v1/admin/moved-chats", tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Every chat whose home shard holds a marker", body = MovedChatsView),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "admin_disabled", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn moved_chats(_: Admin, State(state): State<AppState>) -> Json<MovedChatsView> {
    let (chats, partial) = state.service.moved_chats(1000).await;
    Json(MovedChatsView {
        chats: chats.into_iter().map(MovedChat::from).collect(),
        partial,
    })
}

/// One chat move (`moveId` is `<source shard>:<number>`): its phase, how far
/// its copy is, and its error.
#[utoipa::path(
    get, path = "/v1/admin/moves/{moveId}", tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The move", body = MoveView),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "admin_disabled", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "not_found", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_move(
    _: Admin,
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<MoveView>, Problem> {
    state
        .service
        .get_move(&id)
        .await
        .map(|m| Json(m.into()))
        .ok_or_else(|| Problem::new(Code::NotFound, format!("no move has the id {id:?}")))
}

/// Cancels a chat move before its switch: the move rolls back at its next
/// batch (the fence lifted, the target's copy dropped) and ends `cancelled`;
/// the chat stays on its source. Answers the move with `cancelRequested`.
#[utoipa::path(
    delete, path = "/v1/admin/moves/{moveId}", tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 202, description = "The cancel is recorded; the move ends `cancelled` shortly", body = MoveView),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "admin_disabled", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "not_found: no move has this id", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "move_refused: the move reached its switch or ended", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The move's source shard is unavailable or busy", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn cancel_move(
    _: Admin,
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<(axum::http::StatusCode, Json<MoveView>), Problem> {
    let view = state.service.cancel_move(&id).await?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(view.into())))
}

/// The bucket table this instance routes by (docs/routing.md): version 1 is
/// the configuration's `buckets`, later versions were written by range moves.
#[utoipa::path(
    get, path = "/v1/admin/buckets", tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The bucket table in use", body = BucketTableView),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "admin_disabled", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn buckets(_: Admin, State(state): State<AppState>) -> Json<BucketTableView> {
    Json(state.service.bucket_table().into())
}

/// `POST /v1/admin/bucket-moves`.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(examples(json!({"buckets": "256-383", "to": "shard-3"})))]
pub struct BucketMoveRequest {
    /// The range, `first-last` (or one bucket), within 0..1023, owned by one
    /// shard.
    #[schema(min_length = 1, max_length = 9, pattern = "^[0-9]{1,4}(-[0-9]{1,4})?$")]
    pub buckets: String,
    /// The shard to give the range to, by its configured name.
    #[schema(min_length = 1, max_length = 64)]
    pub to: String,
}

/// Starts moving a bucket range to another shard, online
/// (docs/moving-chats.md): every chat of the range moves like a single chat,
/// then the range itself is given to the target in a new version of the
/// bucket table. Follow it with `GET /v1/admin/bucket-moves/{moveId}`.
#[utoipa::path(
    post, path = "/v1/admin/bucket-moves", tag = "admin",
    security(("admin_token" = [])),
    request_body(content = BucketMoveRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "The range move, started", body = BucketMoveView),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "admin_disabled", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "move_refused: the range is on that shard already, spans several shards, a range move is running, or a shard cannot be read", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid_request (the range), or unknown_shard", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The first shard, which records range moves, is unavailable or busy", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn move_buckets(
    _: Admin,
    State(state): State<AppState>,
    super::extract::JsonBody(body): super::extract::JsonBody<BucketMoveRequest>,
) -> Result<(axum::http::StatusCode, Json<BucketMoveView>), Problem> {
    let range = crate::routing::BucketRange::parse(&body.buckets)
        .map_err(|e| Problem::new(Code::InvalidRequest, format!("buckets: {e}")))?;
    let view = state.service.start_bucket_move(range, &body.to).await?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(view.into())))
}

/// Every bucket-range move, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct BucketMovesView {
    pub moves: Vec<BucketMoveView>,
}

/// The bucket-range moves, running and ended.
#[utoipa::path(
    get, path = "/v1/admin/bucket-moves", tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Every range move recorded (empty when the first shard cannot answer)", body = BucketMovesView),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "admin_disabled", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn bucket_moves(_: Admin, State(state): State<AppState>) -> Json<BucketMovesView> {
    Json(BucketMovesView {
        moves: state
            .service
            .bucket_moves()
            .await
            .into_iter()
            .map(BucketMoveView::from)
            .collect(),
    })
}

/// One bucket-range move: its phase, the chats found and moved, the version
/// of the bucket table it made, and its error.
#[utoipa::path(
    get, path = "/v1/admin/bucket-moves/{moveId}", tag = "admin",
    security(("admin_token" = [])),
    params(("moveId" = u64, Path, description = "The range move's id")),
    responses(
        (status = 200, description = "The range move", body = BucketMoveView),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "admin_disabled", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "not_found", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_bucket_move(
    _: Admin,
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<BucketMoveView>, Problem> {
    let found = match id.parse::<u64>() {
        Ok(n) => state.service.get_bucket_move(n).await,
        Err(_) => None,
    };
    found
        .map(|m| Json(m.into()))
        .ok_or_else(|| no_bucket_move(&id))
}

/// 404 for a range move id that names none.
fn no_bucket_move(id: &str) -> Problem {
    Problem::new(
        Code::NotFound,
        format!("no bucket-range move has the id {id:?}"),
    )
}

/// Cancels a bucket-range move before its flip: its fences are lifted, the
/// copies it made on the target are dropped (nothing was served from them),
/// and it ends `cancelled`; the bucket table and the source do not change. Answers the move
/// with `cancelRequested`.
#[utoipa::path(
    delete, path = "/v1/admin/bucket-moves/{moveId}", tag = "admin",
    security(("admin_token" = [])),
    params(("moveId" = u64, Path, description = "The range move's id")),
    responses(
        (status = 202, description = "The cancel is recorded; the move ends `cancelled` once its copies are dropped", body = BucketMoveView),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "admin_disabled", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "not_found: no range move has this id", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "move_refused: the move began its flip or ended", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The first shard, which records range moves, is unavailable or busy", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn cancel_bucket_move(
    _: Admin,
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<(axum::http::StatusCode, Json<BucketMoveView>), Problem> {
    let n = id.parse::<u64>().map_err(|_| no_bucket_move(&id))?;
    let view = state.service.cancel_bucket_move(n).await?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(view.into())))
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for header in ["Bearer t0k", "bearer t0k", "BEARER  t0k"] {
            assert_eq!(bearer_token(header), Some("t0k"), "{header}");
        }
        assert_eq!(bearer_token("Basic t0k"), None);
        assert_eq!(bearer_token("Bearer"), None);
    }
}

/// `POST /v1/admin/shards/{name}/switchover`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchoverRequest {
    /// The replica to promote, by its `host:port` (as `GET /v1/admin/shards`
    /// lists the members).
    #[schema(min_length = 1, max_length = 255)]
    pub to: String,
}

/// `POST /v1/admin/shards/{name}/failover`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailoverRequest {
    /// Promote the most advanced replica even when it lacks writes this
    /// instance acknowledged (they are then lost, and reported).
    #[serde(default)]
    pub force: bool,
}

/// A reparent that ran.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReparentView {
    pub shard: String,
    /// The writer before.
    pub from: String,
    /// The writer now.
    pub to: String,
    /// How long this instance held the shard's writes (switchover only).
    pub write_pause_ms: Option<f64>,
}

impl From<crate::service::failover::Reparented> for ReparentView {
    fn from(r: crate::service::failover::Reparented) -> Self {
        Self {
            shard: r.shard,
            from: r.from,
            to: r.to,
            write_pause_ms: r.write_pause.map(|d| d.as_secs_f64() * 1e3),
        }
    }
}

/// A planned switchover of a replicated shard to one of its replicas, under
/// load (docs/replicas.md, "Reparents"): writes held (not refused) for the
/// pause, the old writer made read-only, the target caught up, promoted,
/// the other members pointed at it. Answers once it is done.
#[utoipa::path(
    post, path = "/v1/admin/shards/{name}/switchover", tag = "admin", params(("name" = String, Path, description = "The shard's configured name")),
    security(("admin_token" = [])),
    request_body(content = SwitchoverRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Done", body = ReparentView),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "admin_disabled", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "reparent_refused (rolled back when it failed part-way)", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "unknown_shard, or an invalid body", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn switchover(
    _: Admin,
    State(state): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
    super::extract::JsonBody(body): super::extract::JsonBody<SwitchoverRequest>,
) -> Result<Json<ReparentView>, Problem> {
    let done = state.service.switchover(&name, &body.to).await?;
    Ok(Json(done.into()))
}

/// An emergency failover of a replicated shard whose writer is gone: the
/// replica holding everything the others hold is promoted and the others
/// pointed at it; refused while a member is writable, and (unless `force`)
/// when that replica lacks writes this instance acknowledged.
#[utoipa::path(
    post, path = "/v1/admin/shards/{name}/failover", tag = "admin", params(("name" = String, Path, description = "The shard's configured name")),
    security(("admin_token" = [])),
    request_body(content = Option<FailoverRequest>, content_type = "application/json"),
    responses(
        (status = 200, description = "Done", body = ReparentView),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "admin_disabled", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "reparent_refused", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "unknown_shard, or an invalid body", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn failover(
    _: Admin,
    State(state): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
    super::extract::OptionalJsonBody(body): super::extract::OptionalJsonBody<FailoverRequest>,
) -> Result<Json<ReparentView>, Problem> {
    let force = body.unwrap_or_default().force;
    let done = state.service.failover(&name, force).await?;
    Ok(Json(done.into()))
}
