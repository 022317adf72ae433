//! Who is calling: the bearer tokens of `[[api.clients]]` and the scope each
//! route needs (docs/operations.md, "Securing a deployment").
//!
//! With no client configured the data API is open, as it always was (`serve`
//! says so once at start). With clients, every `/v1/` route but the admin
//! API's needs a token whose SHA-256 is a client's, or (over mutual TLS) a
//! verified client certificate whose common name is a client's
//! `cert_common_name`, with the scope the route needs. A request that sends
//! an `Authorization` header is judged by its token alone; one that sends
//! none, by its connection's certificate. Without either: 401 `unauthenticated` without one, 403 `forbidden` without the
//! scope. The admin API keeps its own token ([`super::admin::Admin`]), and
//! also lets in a client with the `admin` scope. `/healthz`, `/readyz`,
//! `/openapi.json` and `/metrics` stay open.
//!
//! Tokens are never kept, logged or shown: only their digests are held, and
//! a given token's digest is compared with every client's in constant time.
//! The caller's name goes on the request's span.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use super::problem::{Code, Problem};
use super::tls::ClientCertificate;
use crate::config::{ApiClient, Scope};

/// The configured callers.
#[derive(Debug, Default)]
pub struct Callers {
    /// The clients with a token.
    clients: Vec<Caller>,
    /// The clients with a certificate, by its common name.
    by_certificate: std::collections::HashMap<Arc<str>, Authenticated>,
}

#[derive(Debug)]
struct Caller {
    name: Arc<str>,
    digest: [u8; 32],
    scopes: Vec<Scope>,
}

/// The caller a request proved to be, kept in its extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub name: Arc<str>,
    pub scopes: Vec<Scope>,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No token (nor a client's certificate), or one no client has.
    Unauthenticated,
    /// A client's token, without the scope the route needs.
    Forbidden { client: Arc<str>, needs: Scope },
}

impl Refusal {
    /// The metric's `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::Forbidden { .. } => "forbidden",
        }
    }
}

impl From<Refusal> for Problem {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Unauthenticated => Problem::new(
                Code::Unauthenticated,
                "send a client's token as Authorization: Bearer <token>",
            ),
            Refusal::Forbidden { client, needs } => Problem::new(
                Code::Forbidden,
                format!("client {client} lacks the {} scope", needs.as_str()),
            ),
        }
    }
}

impl Callers {
    /// The callers of `[[api.clients]]` (validated: every digest is 64 hex
    /// digits; one that is not is left out, as is an empty one).
    pub fn new(clients: &[ApiClient]) -> Self {
        let by_certificate = clients
            .iter()
            .filter(|c| !c.cert_common_name.is_empty())
            .map(|c| {
                (
                    Arc::from(c.cert_common_name.as_str()),
                    Authenticated {
                        name: Arc::from(c.name.as_str()),
                        scopes: c.scopes.clone(),
                    },
                )
            })
            .collect();
        let clients = clients
            .iter()
            .filter_map(|c| {
                Some(Caller {
                    name: Arc::from(c.name.as_str()),
                    digest: c.digest()?,
                    scopes: c.scopes.clone(),
                })
            })
            .collect();
        Self {
            clients,
            by_certificate,
        }
    }

    /// No client is configured: the data API is open.
    pub fn is_open(&self) -> bool {
        self.clients.is_empty() && self.by_certificate.is_empty()
    }

    /// The client whose token an `Authorization` header carries.
    pub fn identify(&self, authorization: Option<&str>) -> Option<Authenticated> {
        let token = authorization.and_then(bearer_token)?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Every client is compared, so the time taken says nothing of which
        // (if any) matched.
        let mut found = None;
        for c in &self.clients {
            if bool::from(c.digest.ct_eq(&digest)) {
                found = Some(c);
            }
        }
        found.map(|c| Authenticated {
            name: c.name.clone(),
            scopes: c.scopes.clone(),
        })
    }

    /// Whether the caller may do what `needs` names: the client of the
    /// `Authorization` header if one is sent, else the client whose
    /// `cert_common_name` the connection's verified certificate bears.
    pub fn authorize(
        &self,
        authorization: Option<&str>,
        certificate: Option<&ClientCertificate>,
        needs: Scope,
    ) -> Result<Authenticated, Refusal> {
        let caller = match authorization {
            Some(header) => self.identify(Some(header)),
            None => certificate
                .and_then(|c| c.common_name.as_deref())
                .and_then(|cn| self.by_certificate.get(cn))
                .cloned(),
        }
        .ok_or(Refusal::Unauthenticated)?;
        if caller.scopes.contains(&needs) {
            Ok(caller)
        } else {
            Err(Refusal::Forbidden {
                client: caller.name,
                needs,
            })
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header; the scheme is
/// case-insensitive (RFC 9110, section 11.1).
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
        .filter(|t| !t.is_empty())
}

/// The scope a request needs (`None`: a route open to all, or the admin
/// API, which checks its own). Reads, and following chats in a stream, need
/// `read`; every other `/v1/` request `write`.
pub fn scope_for(method: &Method, path: &str) -> Option<Scope> {
    if !path.starts_with("/v1/") || path.starts_with("/v1/admin/") || path == "/v1/admin" {
        return None;
    }
    let reading = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
        || path == "/v1/streams"
        || path.starts_with("/v1/streams/");
    Some(if reading { Scope::Read } else { Scope::Write })
}

/// The middleware: refuses a request whose caller lacks the scope its route
/// needs, and names the caller on the request's span.
pub async fn require(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    if state.callers.is_open() {
        return next.run(req).await;
    }
    let Some(needs) = scope_for(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let header = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let certificate = req.extensions().get::<ClientCertificate>();
    match state.callers.authorize(header, certificate, needs) {
        Ok(caller) => {
            tracing::Span::current().record("chatshard.client", &*caller.name);
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(refusal) => {
            state.metrics.auth_refused(refusal.reason());
            if let Refusal::Forbidden { client, .. } = &refusal {
                tracing::Span::current().record("chatshard.client", &**client);
            }
            Problem::from(refusal).into_response()
        }
    }
}

/// Declares the client token in an OpenAPI document: the bearer scheme
/// `client_token`, required by every data operation (the admin API keeps
/// `admin_token`). Only for an instance with clients configured.
pub fn declare(document: &mut serde_json::Value) {
    use serde_json::json;
    if let Some(paths) = document.get_mut("paths").and_then(|p| p.as_object_mut()) {
        for (path, item) in paths.iter_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for (method, op) in item.iter_mut() {
                let Ok(method) = method.to_ascii_uppercase().parse::<Method>() else {
                    continue;
                };
                if let (Some(_), Some(op)) = (scope_for(&method, path), op.as_object_mut()) {
                    op.insert("security".to_owned(), json!([{ "client_token": [] }]));
                }
            }
        }
    }
    let schemes = document
        .as_object_mut()
        .map(|d| d.entry("components").or_insert_with(|| json!({})))
        .and_then(|c| c.as_object_mut())
        .map(|c| c.entry("securitySchemes").or_insert_with(|| json!({})));
    if let Some(serde_json::Value::Object(schemes)) = schemes {
        schemes.insert(
            "client_token".to_owned(),
            json!({"type": "http", "scheme": "bearer", "description": "A token of [[api.clients]]"}),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(name: &str, token: &str, scopes: &[Scope]) -> ApiClient {
        let digest = Sha256::digest(token.as_bytes());
        ApiClient {
            name: name.to_owned(),
            token_sha256: digest.iter().map(|b| format!("{b:02x}")).collect(),
            scopes: scopes.to_vec(),
            ..ApiClient::default()
        }
    }

    #[test]
    fn a_token_is_known_by_its_digest_and_needs_the_routes_scope() {
        let callers = Callers::new(&[
            client("reader", "r-token", &[Scope::Read]),
            client("writer", "w-token", &[Scope::Read, Scope::Write]),
        ]);
        assert!(!callers.is_open());
        let ok = callers.authorize(Some("Bearer w-token"), None, Scope::Write);
        assert_eq!(ok.map(|c| c.name.to_string()), Ok("writer".to_owned()));
        assert_eq!(
            callers.authorize(Some("bearer r-token"), None, Scope::Write),
            Err(Refusal::Forbidden {
                client: Arc::from("reader"),
                needs: Scope::Write
            })
        );
        for bad in [
            None,
            Some("Bearer"),
            Some("Bearer "),
            Some("Basic r-token"),
            Some("Bearer R-TOKEN"),
        ] {
            assert_eq!(
                callers.authorize(bad, None, Scope::Read).map(|_| ()),
                Err(Refusal::Unauthenticated),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn two_tokens_of_one_client_both_work_during_a_rotation() {
        let callers = Callers::new(&[
            client("app", "old", &[Scope::Read]),
            client("app", "new", &[Scope::Read]),
        ]);
        for token in ["Bearer old", "Bearer new"] {
            assert!(callers.authorize(Some(token), None, Scope::Read).is_ok());
        }
    }

    #[test]
    fn a_certificates_common_name_stands_for_its_client_unless_a_token_is_sent() {
        let mut by_cert = client("chat-server-1", "t1", &[Scope::Read, Scope::Write]);
        by_cert.cert_common_name = "chat-server-1.example".to_owned();
        let cert_only = ApiClient {
            name: "reader".to_owned(),
            cert_common_name: "reader.example".to_owned(),
            scopes: vec![Scope::Read],
            ..ApiClient::default()
        };
        let callers = Callers::new(&[by_cert, cert_only]);
        let cert = |cn: &str| ClientCertificate {
            common_name: Some(Arc::from(cn)),
        };
        let name = |r: Result<Authenticated, Refusal>| r.map(|c| c.name.to_string());
        assert_eq!(
            name(callers.authorize(None, Some(&cert("chat-server-1.example")), Scope::Write)),
            Ok("chat-server-1".to_owned())
        );
        assert_eq!(
            callers.authorize(None, Some(&cert("reader.example")), Scope::Write),
            Err(Refusal::Forbidden {
                client: Arc::from("reader"),
                needs: Scope::Write
            })
        );
        // Names are compared exactly.
        for other in ["Reader.example", "reader", "reader.example "] {
            assert_eq!(
                callers
                    .authorize(None, Some(&cert(other)), Scope::Read)
                    .map(|_| ()),
                Err(Refusal::Unauthenticated),
                "{other:?}"
            );
        }
        let no_name = ClientCertificate { common_name: None };
        assert_eq!(
            callers
                .authorize(None, Some(&no_name), Scope::Read)
                .map(|_| ()),
            Err(Refusal::Unauthenticated)
        );
        // A sent token decides, even a wrong one over a known certificate.
        assert_eq!(
            name(callers.authorize(
                Some("Bearer t1"),
                Some(&cert("reader.example")),
                Scope::Write
            )),
            Ok("chat-server-1".to_owned())
        );
        assert_eq!(
            callers
                .authorize(
                    Some("Bearer wrong"),
                    Some(&cert("reader.example")),
                    Scope::Read
                )
                .map(|_| ()),
            Err(Refusal::Unauthenticated)
        );
    }

    #[test]
    fn reads_and_stream_follows_need_read_writes_need_write_and_the_rest_is_open() {
        let cases = [
            (Method::GET, "/v1/chats/c1", Some(Scope::Read)),
            (Method::GET, "/v1/chats/c1/events/stream", Some(Scope::Read)),
            (Method::POST, "/v1/streams", Some(Scope::Read)),
            (Method::PUT, "/v1/streams/s1/chats/c1", Some(Scope::Read)),
            (Method::DELETE, "/v1/streams/s1", Some(Scope::Read)),
            (Method::PUT, "/v1/chats/c1", Some(Scope::Write)),
            (Method::POST, "/v1/chats/c1/members", Some(Scope::Write)),
            (
                Method::DELETE,
                "/v1/chats/c1/members/u1",
                Some(Scope::Write),
            ),
            (Method::POST, "/v1/chats/c1/messages", Some(Scope::Write)),
            (Method::GET, "/v1/admin/shards", None),
            (Method::GET, "/healthz", None),
            (Method::GET, "/readyz", None),
            (Method::GET, "/openapi.json", None),
            (Method::GET, "/metrics", None),
        ];
        for (method, path, needs) in cases {
            assert_eq!(scope_for(&method, path), needs, "{method} {path}");
        }
    }
}
