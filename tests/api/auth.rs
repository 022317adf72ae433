//! Authenticated callers (`[[api.clients]]`): with clients configured, every
//! data route needs a client's token with the route's scope (401
//! `unauthenticated`, 403 `forbidden`), the admin API also lets in a client
//! with the `admin` scope, health, the document and metrics stay open, the
//! document declares the token, and refusals are counted by reason.

use chatshard::config::{ApiClient, Scope};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::common;
use crate::helpers::{TestApp, assert_problem, unique};

fn client(name: &str, token: &str, scopes: &[Scope]) -> ApiClient {
    ApiClient {
        name: name.to_owned(),
        token_sha256: Sha256::digest(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        scopes: scopes.to_vec(),
        ..ApiClient::default()
    }
}

async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> reqwest::Response {
    let mut req = app.http.request(method, app.url(path));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    req.send().await.expect("request")
}

async fn refusals(app: &TestApp, reason: &str) -> f64 {
    let label = format!("reason=\"{reason}\"");
    common::sum_where(
        &common::metric_samples(&app.http, &app.base, "chatshard_http_auth_refusals_total").await,
        &[label.as_str()],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_class_needs_a_token_with_its_scope() {
    let app = TestApp::spawn_with(|s| {
        s.api.clients = vec![
            client("reader", "reader-token", &[Scope::Read]),
            client("writer", "writer-token", &[Scope::Read, Scope::Write]),
            client("writer", "writer-token-next", &[Scope::Read, Scope::Write]),
            client("operator", "operator-token", &[Scope::Admin]),
        ];
    })
    .await;
    let chat = unique("auth");
    let chat_path = format!("/v1/chats/{chat}");
    let members = format!("{chat_path}/members");
    let messages = format!("{chat_path}/messages");

    // No token, or one no client has: 401, and nothing is written.
    for token in [None, Some("not-a-client")] {
        let r = call(&app, Method::PUT, &chat_path, token, None).await;
        assert_problem(r, 401, "unauthenticated").await;
        let r = call(&app, Method::GET, &chat_path, token, None).await;
        assert_problem(r, 401, "unauthenticated").await;
    }
    // A reader may read but not write.
    let r = call(&app, Method::PUT, &chat_path, Some("reader-token"), None).await;
    let body = assert_problem(r, 403, "forbidden").await;
    assert!(
        body["detail"].as_str().is_some_and(|d| d.contains("write")),
        "{body}"
    );
    let r = call(&app, Method::GET, &chat_path, Some("reader-token"), None).await;
    assert_problem(r, 404, "chat_not_found").await;

    // A writer writes, with either of its two tokens (a rotation).
    let r = call(&app, Method::PUT, &chat_path, Some("writer-token"), None).await;
    assert_eq!(r.status(), 201);
    let r = call(
        &app,
        Method::POST,
        &members,
        Some("writer-token-next"),
        Some(json!({ "userId": "u1" })),
    )
    .await;
    assert_eq!(r.status(), 201);
    let r = call(
        &app,
        Method::POST,
        &messages,
        Some("writer-token"),
        Some(json!({ "senderId": "u1", "clientMessageId": "m1", "text": "hi" })),
    )
    .await;
    assert_eq!(r.status(), 201);
    let r = call(
        &app,
        Method::POST,
        &members,
        Some("reader-token"),
        Some(json!({ "userId": "u2" })),
    )
    .await;
    assert_problem(r, 403, "forbidden").await;

    // Reads, the events and a multiplexed stream are the reader's.
    let r = call(
        &app,
        Method::GET,
        &format!("{chat_path}/member-count"),
        Some("reader-token"),
        None,
    )
    .await;
    let count: Value = r.json().await.expect("json");
    assert_eq!(count["memberCount"], 1, "{count}");
    let r = call(
        &app,
        Method::GET,
        &format!("{chat_path}/events?after=0"),
        Some("reader-token"),
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    let r = call(
        &app,
        Method::POST,
        "/v1/streams",
        Some("reader-token"),
        None,
    )
    .await;
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let r = call(&app, Method::POST, "/v1/streams", None, None).await;
    assert_problem(r, 401, "unauthenticated").await;

    // The admin API: a client with the admin scope, not a reader.
    let r = call(
        &app,
        Method::GET,
        "/v1/admin/shards",
        Some("operator-token"),
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    let r = call(
        &app,
        Method::GET,
        "/v1/admin/shards",
        Some("reader-token"),
        None,
    )
    .await;
    assert!(matches!(r.status().as_u16(), 401 | 403), "{}", r.status());
    // The operator holds no data scope.
    let r = call(&app, Method::GET, &chat_path, Some("operator-token"), None).await;
    assert_problem(r, 403, "forbidden").await;

    // Open without a token.
    for path in ["/healthz", "/readyz", "/openapi.json", "/metrics"] {
        let r = call(&app, Method::GET, path, None, None).await;
        assert_eq!(r.status(), 200, "{path}");
    }

    // Counted by reason: the five refusals without a client's token, the
    // four with a token that lacks the scope (the reader's admin call is the
    // admin API's own 401, not counted here).
    assert_eq!(refusals(&app, "unauthenticated").await, 5.0);
    assert_eq!(refusals(&app, "forbidden").await, 3.0);
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_declares_the_client_token_on_data_routes_only_when_clients_exist() {
    let open = TestApp::spawn().await;
    let doc: Value = open.get("/openapi.json").await.json().await.expect("json");
    assert!(doc["components"]["securitySchemes"]["client_token"].is_null());
    // Declared open: no requirement.
    assert_eq!(
        doc["paths"]["/v1/chats/{chatId}"]["get"]["security"],
        json!([])
    );
    open.shut_down().await;

    let app = TestApp::spawn_with(|s| {
        s.api.clients = vec![client("reader", "t", &[Scope::Read])];
    })
    .await;
    let doc: Value = app.get("/openapi.json").await.json().await.expect("json");
    assert_eq!(
        doc["components"]["securitySchemes"]["client_token"]["scheme"],
        "bearer"
    );
    assert_eq!(
        doc["paths"]["/v1/chats/{chatId}"]["get"]["security"],
        json!([{ "client_token": [] }])
    );
    assert_eq!(
        doc["paths"]["/v1/chats/{chatId}/members"]["post"]["security"],
        json!([{ "client_token": [] }])
    );
    // The admin API keeps its own token; health stays open.
    assert_ne!(
        doc["paths"]["/v1/admin/shards"]["get"]["security"],
        json!([{ "client_token": [] }])
    );
    assert_eq!(doc["paths"]["/healthz"]["get"]["security"], json!([]));
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_entry_that_is_not_a_digest_is_refused_at_start() {
    let mut settings = crate::helpers::settings();
    settings.api.clients = vec![ApiClient {
        name: "app".to_owned(),
        token_sha256: "the-token-in-clear".to_owned(),
        scopes: vec![Scope::Read],
        ..ApiClient::default()
    }];
    let err = settings.validate().expect_err("a clear token is refused");
    let text = err.to_string();
    assert!(
        text.contains("token_sha256") && text.contains("64 hex"),
        "{text}"
    );
    assert!(
        !text.contains("the-token-in-clear"),
        "the value is not repeated: {text}"
    );
}

#[test]
fn a_client_known_by_certificate_needs_mutual_tls_and_a_name_of_its_own() {
    let by_cert = |name: &str, cn: &str| ApiClient {
        name: name.to_owned(),
        cert_common_name: cn.to_owned(),
        scopes: vec![Scope::Read],
        ..ApiClient::default()
    };
    let mut settings = crate::helpers::settings();
    settings.api.clients = vec![by_cert("a", "a.internal")];
    let text = settings
        .validate()
        .expect_err("no client CA configured")
        .to_string();
    assert!(
        text.contains("cert_common_name needs mutual TLS (http.tls.client_ca_file)"),
        "{text}"
    );
    settings.http.tls.cert_file = "/etc/chatshard/api.pem".to_owned();
    settings.http.tls.key_file = "/etc/chatshard/api.key".to_owned();
    settings.http.tls.client_ca_file = "/etc/chatshard/clients-ca.pem".to_owned();
    settings
        .validate()
        .expect("a client known by its certificate");
    settings.api.clients = vec![by_cert("a", "same.internal"), by_cert("b", "same.internal")];
    let text = settings
        .validate()
        .expect_err("one name, two clients")
        .to_string();
    assert!(text.contains("is given to client \"a\" too"), "{text}");
    settings.api.clients = vec![ApiClient {
        name: "nobody".to_owned(),
        scopes: vec![Scope::Read],
        ..ApiClient::default()
    }];
    let text = settings.validate().expect_err("neither").to_string();
    assert!(
        text.contains("token_sha256, a cert_common_name, or both"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_ask_for_their_token_once_one_is_set() {
    let app = TestApp::spawn_with(|s| s.http.metrics_token = "scrape-token".to_owned()).await;
    for token in [None, Some("wrong")] {
        let r = call(&app, Method::GET, "/metrics", token, None).await;
        assert_problem(r, 401, "unauthenticated").await;
    }
    let r = call(&app, Method::GET, "/metrics", Some("scrape-token"), None).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("text");
    let refused: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("chatshard_http_auth_refusals_total{")
                && l.contains("reason=\"unauthenticated\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(refused, 2.0, "the two refusals are counted");
    // The data API stays open: no client is configured.
    let r = call(&app, Method::GET, "/v1/chats/none-such", None, None).await;
    assert_problem(r, 404, "chat_not_found").await;
    app.shut_down().await;
}
