//! Extractors whose every rejection is a [`Problem`].
//!
//! Path segments are parsed into domain ids here, JSON bodies are checked for
//! their media type, size and shape here, so handlers only ever see valid input.

use axum::body::Bytes;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Query, RawPathParams, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use serde_json::Value;
use utoipa::ToSchema;

use super::AppState;
use super::problem::{Code, Problem};
use super::shape::Schemas;
use crate::domain::{ChatId, UserId};
use crate::service::ReadAt;

/// The most a request body may hold.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A JSON body: `application/json`, at most [`MAX_BODY_BYTES`], read within
/// `http.body_read_timeout_ms`, fitting the documented schema of `T` (see
/// [`super::shape`]), then deserialized.
pub struct JsonBody<T>(pub T);

/// A JSON body that may be absent (no body at all, or an empty one); present,
/// it is checked like [`JsonBody`].
pub struct OptionalJsonBody<T>(pub Option<T>);

/// A syntactically valid JSON body, not yet checked against any schema (for
/// handlers that check it themselves, such as a merge patch).
pub struct JsonValue(pub Option<Value>);

impl<S: Send + Sync, T: DeserializeOwned + ToSchema> FromRequest<S> for JsonBody<T>
where
    AppState: FromRef<S>,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        match OptionalJsonBody::<T>::from_request(req, state).await? {
            OptionalJsonBody(Some(value)) => Ok(Self(value)),
            OptionalJsonBody(None) => Err(needs_body()),
        }
    }
}

/// The refusal of a request whose JSON body is missing.
pub fn needs_body() -> Problem {
    Problem::new(
        Code::UnsupportedMediaType,
        "this request needs a JSON body with Content-Type: application/json",
    )
}

impl<S: Send + Sync, T: DeserializeOwned + ToSchema> FromRequest<S> for OptionalJsonBody<T>
where
    AppState: FromRef<S>,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        let app = AppState::from_ref(state);
        let JsonValue(value) = JsonValue::from_request(req, state).await?;
        value.map(|v| shaped(&app.schemas, v)).transpose().map(Self)
    }
}

impl<S: Send + Sync> FromRequest<S> for JsonValue
where
    AppState: FromRef<S>,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("").to_owned());
        // The whole body within one deadline: a client that sends half a body
        // and stops holds nothing for longer.
        let deadline = AppState::from_ref(state).http.body_read_timeout();
        let read = tokio::time::timeout(deadline, Bytes::from_request(req, state))
            .await
            .map_err(|_| {
                Problem::new(
                    Code::RequestTimeout,
                    format!("the body did not arrive within {} ms", deadline.as_millis()),
                )
            })?;
        let bytes = read.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                Problem::new(
                    Code::PayloadTooLarge,
                    format!("the body must be at most {MAX_BODY_BYTES} bytes"),
                )
            } else {
                Problem::invalid("the body could not be read")
            }
        })?;
        if bytes.is_empty() {
            // No body, whatever the Content-Type says: an optional body that a
            // client sends empty is absent.
            return Ok(Self(None));
        }
        if !content_type.as_deref().is_some_and(is_json) {
            return Err(Problem::new(
                Code::UnsupportedMediaType,
                "the body must be sent with Content-Type: application/json",
            ));
        }
        serde_json::from_slice(&bytes)
            .map(|v| Self(Some(v)))
            .map_err(syntax_problem)
    }
}

/// Checks `value` against the documented schema of `T`, then deserializes it.
/// Every misfit is listed (the first in `detail`, all in `errors`); a value of
/// the wrong shape is described by the place it is at and what was expected
/// there, never by quoting what the caller sent.
pub fn shaped<T: DeserializeOwned + ToSchema>(
    schemas: &Schemas,
    value: Value,
) -> Result<T, Problem> {
    shaped_as(schemas, &T::name(), value)
}

/// [`shaped`] against the component schema `schema` (a variant of `T`'s).
pub fn shaped_as<T: DeserializeOwned>(
    schemas: &Schemas,
    schema: &str,
    mut value: Value,
) -> Result<T, Problem> {
    Schemas::normalize(&mut value);
    let problems = schemas.check(schema, &value);
    if let Some(first) = problems.first() {
        return Err(Problem::invalid(first.clone()).with_errors(problems));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            "the body".to_owned()
        } else {
            format!("`{path}`")
        };
        Problem::invalid(shape_problem(&at, e.inner()))
    })
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

fn syntax_problem(e: serde_json::Error) -> Problem {
    Problem::new(
        Code::MalformedJson,
        format!(
            "the body is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        ),
    )
}

/// What is wrong with a value of the wrong shape, in words that repeat only
/// the API's own names (field names, expected types), never the caller's input.
fn shape_problem(at: &str, e: &serde_json::Error) -> String {
    let message = e.to_string();
    let expected = message
        .rsplit_once(", expected ")
        .map(|(_, rest)| strip_position(rest));
    if let Some(field) = backticked(&message, "missing field `") {
        format!("{at} lacks the required field `{field}`")
    } else if message.starts_with("unknown field") {
        format!("{} has a field the API does not define", parent(at))
    } else if let Some(field) = backticked(&message, "duplicate field `") {
        format!("{at} has the field `{field}` twice")
    } else if message.starts_with("invalid type") {
        format!(
            "{at} has the wrong type; expected {}",
            expected.unwrap_or("another type")
        )
    } else if message.starts_with("invalid value") || message.starts_with("invalid length") {
        format!(
            "{at} is out of range; expected {}",
            expected.unwrap_or("another value")
        )
    } else {
        format!("{at} is not valid")
    }
}

/// The place holding an unknown field: the path names the unknown field itself
/// last, and that name is the caller's input.
fn parent(at: &str) -> String {
    match at.trim_matches('`').rsplit_once('.') {
        Some((parent, _)) => format!("`{parent}`"),
        None => "the body".to_owned(),
    }
}

fn backticked<'m>(message: &'m str, prefix: &str) -> Option<&'m str> {
    message.strip_prefix(prefix)?.split('`').next()
}

fn strip_position(s: &str) -> &str {
    s.rsplit_once(" at line ").map_or(s, |(head, _)| head)
}

/// `{chatId}` from the path, validated.
pub struct ChatPath(pub ChatId);

/// `{chatId}` and `{userId}` from the path, validated.
pub struct MemberPath(pub ChatId, pub UserId);

fn path_param<'a>(params: &'a RawPathParams, name: &str) -> Result<&'a str, Problem> {
    params
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .ok_or_else(|| Problem::invalid(format!("missing path parameter {name}")))
}

async fn raw_params<S: Send + Sync>(
    parts: &mut Parts,
    state: &S,
) -> Result<RawPathParams, Problem> {
    RawPathParams::from_request_parts(parts, state)
        .await
        .map_err(|_| Problem::invalid("the path is not valid UTF-8 once percent-decoded"))
}

/// Puts the chat (hashed unless configured raw) and the shard it routes to on
/// the request's server span, before anything can refuse the request.
/// It also tells the request's timing which chat it was for.
fn record_chat<S>(state: &S, parts: &Parts, chat: &ChatId)
where
    AppState: FromRef<S>,
{
    if let Some(slot) = parts.extensions.get::<super::trace::RequestChat>() {
        let _ = slot.0.set(chat.clone());
    }
    let state = AppState::from_ref(state);
    let span = tracing::Span::current();
    span.record(
        "chatshard.chat_id",
        crate::telemetry::chat_id_attribute(chat.as_str(), state.chat_id_in_telemetry),
    );
    span.record("chatshard.shard", state.service.shard_of(chat));
}

impl<S: Send + Sync> FromRequestParts<S> for ChatPath
where
    AppState: FromRef<S>,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        let params = raw_params(parts, state).await?;
        let chat =
            ChatId::parse(path_param(&params, "chatId")?).map_err(|e| Problem::invalid(e.0))?;
        record_chat(state, parts, &chat);
        Ok(Self(chat))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for MemberPath
where
    AppState: FromRef<S>,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        let params = raw_params(parts, state).await?;
        let chat =
            ChatId::parse(path_param(&params, "chatId")?).map_err(|e| Problem::invalid(e.0))?;
        record_chat(state, parts, &chat);
        let user =
            UserId::parse(path_param(&params, "userId")?).map_err(|e| Problem::invalid(e.0))?;
        Ok(Self(chat, user))
    }
}

/// `{streamId}` from the path: 32 lowercase hexadecimal characters.
pub struct StreamPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for StreamPath
where
    AppState: FromRef<S>,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        let params = raw_params(parts, state).await?;
        let id = path_param(&params, "streamId")?;
        if id.len() != 32 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(Problem::invalid(
                "streamId must be 32 lowercase hexadecimal characters",
            ));
        }
        Ok(Self(id.to_owned()))
    }
}

/// `?after=&limit=&waitMs=` as raw strings; each use case parses them into its types.
/// Other parameters are ignored; one given twice is refused.
#[derive(Debug, Default)]
pub struct PageQuery {
    pub after: Option<String>,
    pub limit: Option<String>,
    pub wait_ms: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for PageQuery {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        let Query(pairs) = Query::<Vec<(String, String)>>::from_request_parts(parts, state)
            .await
            .map_err(|_| Problem::invalid("the query string cannot be decoded"))?;
        let mut query = Self::default();
        for (name, value) in pairs {
            let (slot, name) = match name.as_str() {
                "after" => (&mut query.after, "after"),
                "limit" => (&mut query.limit, "limit"),
                "waitMs" => (&mut query.wait_ms, "waitMs"),
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(Problem::invalid(format!(
                    "the query parameter `{name}` is given more than once"
                )));
            }
        }
        Ok(query)
    }
}

/// Where a read may be served (docs/replicas.md): `minRevision` as a query
/// parameter or the `Chatshard-Min-Revision` header (the larger wins when
/// both are sent). A read with it is answered from a replica only once that
/// replica holds the chat at that revision; without it, any replica within
/// `replicas.max_lag_ms` may answer.
#[derive(Debug, Clone, Copy)]
pub struct Consistency(pub ReadAt);

/// The header form of `minRevision`.
pub const MIN_REVISION_HEADER: &str = "chatshard-min-revision";

fn parse_revision(value: &str, name: &str) -> Result<u64, Problem> {
    value
        .parse::<u64>()
        .ok()
        .filter(|r| i64::try_from(*r).is_ok())
        .ok_or_else(|| {
            Problem::invalid(format!(
                "`{name}` must be a revision: a whole number from 0 to 9223372036854775807"
            ))
        })
}

impl<S: Send + Sync> FromRequestParts<S> for Consistency {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        let Query(pairs) = Query::<Vec<(String, String)>>::from_request_parts(parts, state)
            .await
            .map_err(|_| Problem::invalid("the query string cannot be decoded"))?;
        let mut min: Option<u64> = None;
        let mut seen = false;
        for (name, value) in pairs {
            if name == "minRevision" {
                if seen {
                    return Err(Problem::invalid(
                        "the query parameter `minRevision` is given more than once",
                    ));
                }
                seen = true;
                min = Some(parse_revision(&value, "minRevision")?);
            }
        }
        let mut headers = parts.headers.get_all(MIN_REVISION_HEADER).iter();
        if let Some(value) = headers.next() {
            if headers.next().is_some() {
                return Err(Problem::invalid(
                    "the header `Chatshard-Min-Revision` is given more than once",
                ));
            }
            let text = value
                .to_str()
                .map_err(|_| Problem::invalid("`Chatshard-Min-Revision` must be a revision"))?;
            let header = parse_revision(text.trim(), "Chatshard-Min-Revision")?;
            min = Some(min.map_or(header, |m| m.max(header)));
        }
        Ok(Self(ReadAt::Replica { min_revision: min }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, ToSchema)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    #[allow(dead_code)]
    struct Body {
        user_id: String,
        #[schema(minimum = 1, maximum = 100)]
        max_members: Option<u32>,
    }

    #[derive(utoipa::OpenApi)]
    #[openapi(components(schemas(Body)))]
    struct Doc;

    fn detail(body: &str) -> String {
        use utoipa::OpenApi as _;
        let document = serde_json::to_value(Doc::openapi()).unwrap_or_default();
        let schemas = Schemas::from_document(&document);
        let value: Value = match serde_json::from_str(body) {
            Ok(v) => v,
            Err(e) => return syntax_problem(e).detail.into(),
        };
        match shaped::<Body>(&schemas, value) {
            Ok(b) => panic!("accepted {b:?}"),
            Err(p) => p.detail.into(),
        }
    }

    #[test]
    fn shape_errors_never_quote_the_input() {
        for (body, says) in [
            (
                r#"{"userId": "a", "maxMembers": "SECRET-1"}"#,
                "`maxMembers` must be a whole number or null",
            ),
            (
                r#"{"userId": "a", "SECRET-2": 1}"#,
                "the body has a field the API does not define",
            ),
            (
                r#"{"userId": "a", "maxMembers": -7}"#,
                "`maxMembers` must be at least 1",
            ),
            (
                r#"{"maxMembers": 1}"#,
                "the body lacks the required field `userId`",
            ),
            (r#"["SECRET-3"]"#, "the body must be an object"),
            (r#"{"userId": "SECRET-4"} SECRET-5"#, "not valid JSON"),
        ] {
            let d = detail(body);
            assert!(d.contains(says), "{body}: {d}");
            assert!(!d.contains("SECRET") && !d.contains("-7"), "{body}: {d}");
        }
    }

    #[test]
    fn json_media_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(is_json("application/merge-patch+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json("application/jsonp"));
        assert!(!is_json(""));
    }
}
