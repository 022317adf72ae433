//! The REST API: router, handlers, extractors, problem+json.
//!
//! The only place that knows status codes. Handlers parse input into domain types
//! (through [`extract`]), call one use case of [`crate::service`], and map the
//! result; errors become [`problem::Problem`] answers in one place. The OpenAPI
//! 3.1 document is generated from the handlers' annotations and served at
//! `/openapi.json`.

pub mod admin;
pub mod auth;
pub mod chats;
mod document;
pub mod extract;
pub mod members;
pub mod messages;
pub mod model;
pub mod move_views;
pub mod mux;
pub mod problem;
pub mod serve;
pub mod shape;
mod sse;
pub mod stream;
pub mod tls;
pub mod trace;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use self::model::{Health, Readiness, ShardReadiness};
use self::problem::{Code, Problem};
use crate::service::{ChatService, Created};

/// What every handler can reach. Extractors clone it once or more per
/// request, so it is one shared allocation: a clone is one reference count,
/// not one per field.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The contents of [`AppState`].
pub struct Shared {
    pub service: Arc<ChatService>,
    /// The admin bearer token; `None` turns the admin API off.
    pub admin_token: Option<Arc<str>>,
    /// The callers of `[[api.clients]]` (none: the data API is open).
    pub callers: Arc<auth::Callers>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub chat_id_in_telemetry: crate::telemetry::ChatIdInTelemetry,
    /// Connection and request limits (body read timeout, longest URI).
    pub http: crate::config::HttpSettings,
    /// The schemas of the served OpenAPI document, which request bodies are
    /// checked against (set by [`router`]).
    pub schemas: Arc<shape::Schemas>,
    /// The open event streams and chat subscriptions.
    pub subscribers: Arc<stream::Subscribers>,
    /// The multiplexed streams.
    pub streams: Arc<mux::Streams>,
    /// Becomes true when the instance starts shutting down: streams end.
    pub closing: tokio::sync::watch::Receiver<bool>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "chatshard",
        description = "Chat membership, member counts, messages and per-chat event logs over sharded MySQL. \
                       Errors are RFC 9457 application/problem+json with a stable `code`."
    ),
    servers((url = "/", description = "The chatshard instance that serves this document")),
    tags(
        (name = "chats"), (name = "members"), (name = "messages"), (name = "events"), (name = "operations"),
        (name = "admin")
    ),
    modifiers(&AdminSecurity)
)]
struct ApiDoc;

/// Declares the admin bearer token in the OpenAPI document.
struct AdminSecurity;

impl utoipa::Modify for AdminSecurity {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The routes, with the OpenAPI document their annotations describe.
/// `shards`: the configured shards' names (none: the document does not
/// list them).
fn routes(shards: &[String]) -> (Router<AppState>, serde_json::Value) {
    let (router, api) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(chats::put_chat, chats::get_chat))
        .routes(routes!(chats::get_member_count))
        .routes(routes!(chats::get_snapshot))
        .routes(routes!(members::join, members::list_members))
        .routes(routes!(members::get_member, members::leave))
        .routes(routes!(messages::post_message))
        .routes(routes!(messages::get_events))
        .routes(routes!(stream::chat_stream))
        .routes(routes!(mux::create_stream))
        .routes(routes!(mux::connect_stream, mux::delete_stream))
        .routes(routes!(mux::follow_chat, mux::unfollow_chat))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(admin::shards))
        .routes(routes!(admin::switchover))
        .routes(routes!(admin::failover))
        .routes(routes!(
            admin::get_config,
            admin::put_config,
            admin::patch_config
        ))
        .routes(routes!(admin::hot_chats))
        .routes(routes!(admin::fleet))
        .routes(routes!(admin::move_chat))
        .routes(routes!(admin::moves))
        .routes(routes!(admin::moved_chats))
        .routes(routes!(admin::get_move, admin::cancel_move))
        .routes(routes!(admin::buckets))
        .routes(routes!(admin::move_buckets, admin::bucket_moves))
        .routes(routes!(admin::get_bucket_move, admin::cancel_bucket_move))
        .split_for_parts();
    (router, document::finish(api, shards))
}

/// The OpenAPI document served at `/openapi.json`.
pub fn openapi_document() -> serde_json::Value {
    routes(&[]).1
}

/// The application's router and its OpenAPI document.
pub fn router(mut shared: Shared) -> Router {
    let shards = shared.service.shard_names();
    let (router, mut document) = routes(&shards);
    if !shared.callers.is_open() {
        auth::declare(&mut document);
    }
    let document = Arc::new(document);
    shared.schemas = Arc::new(shape::Schemas::from_document(&document));
    let state = AppState(Arc::new(shared));
    let traced = || axum::middleware::from_fn_with_state(state.clone(), trace::trace_request);
    router
        // Inside the request's span: a refusal has a span and a request id.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require,
        ))
        .route(
            "/openapi.json",
            get(move || async move { Json(document.as_ref().clone()) }),
        )
        .route("/metrics", get(metrics))
        .route_layer(traced())
        // Unmatched paths and methods get a span and a request id too.
        .fallback(axum::handler::Handler::layer(not_found, traced()))
        .method_not_allowed_fallback(axum::handler::Handler::layer(method_not_allowed, traced()))
        .layer(DefaultBodyLimit::max(extract::MAX_BODY_BYTES))
        .with_state(state)
}

/// 201 for something made by this request, 200 for something already there.
fn status_for(created: Created) -> StatusCode {
    match created {
        Created::New => StatusCode::CREATED,
        Created::Existing => StatusCode::OK,
    }
}

/// Prometheus text exposition of every metric.
async fn metrics(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let expected = state.http.metrics_token.as_bytes();
    if !expected.is_empty() {
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(auth::bearer_token)
            .unwrap_or("");
        if !bool::from(subtle::ConstantTimeEq::ct_eq(given.as_bytes(), expected)) {
            state.metrics.auth_refused("unauthenticated");
            return Problem::new(
                Code::Unauthenticated,
                "send http.metrics_token as Authorization: Bearer <token>",
            )
            .into_response();
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

async fn not_found() -> Problem {
    Problem::new(Code::NotFound, "no route matches this path")
}

async fn method_not_allowed() -> Problem {
    Problem::new(
        Code::MethodNotAllowed,
        "this path does not support this method",
    )
}

/// The process is up.
#[utoipa::path(
    get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process serves", body = Health))
)]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".to_owned(),
    })
}

/// Ready while at least one shard answers; lists every shard.
#[utoipa::path(
    get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "At least one shard serves", body = Readiness),
        (status = 503, description = "No shard serves", body = Readiness),
    )
)]
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let shards: Vec<ShardReadiness> = state
        .service
        .shard_health()
        .await
        .into_iter()
        .map(|health| ShardReadiness {
            ready: health.ready(),
            breaker: health.breaker.into(),
            name: health.name,
            address: health.address,
            error: health.error,
            writes: health.writes.to_owned(),
            members: health
                .members
                .into_iter()
                .map(|m| model::MemberReadiness {
                    address: m.address,
                    role: m.role.as_str().to_owned(),
                    lag_ms: m.lag_ms,
                    in_rotation: m.in_rotation,
                })
                .collect(),
        })
        .collect();
    let up = shards.iter().filter(|s| s.ready).count();
    let (status, word) = match up {
        0 => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        n if n == shards.len() => (StatusCode::OK, "ready"),
        _ => (StatusCode::OK, "degraded"),
    };
    (
        status,
        Json(Readiness {
            status: word.to_owned(),
            shards,
        }),
    )
}
