//! Extractors whose every rejection is a [`Problem`].
//!
//! Path segments are parsed into domain ids here, JSON bodies are checked for
//! their media type, size and shape here, so handlers only ever see valid input.

use axum::body::Bytes;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Query, RawPathParams, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::AppState;
use super::problem::{Code, Problem};
use crate::domain::{ChatId, UserId};

/// The most a request body may hold.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A JSON body: `application/json`, at most [`MAX_BODY_BYTES`], of shape `T`.
pub struct JsonBody<T>(pub T);

/// A JSON body that may be absent (no body at all); present, it is checked like
/// [`JsonBody`].
pub struct OptionalJsonBody<T>(pub Option<T>);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        match OptionalJsonBody::<T>::from_request(req, state).await? {
            OptionalJsonBody(Some(value)) => Ok(Self(value)),
            OptionalJsonBody(None) => Err(Problem::new(
                Code::UnsupportedMediaType,
                "this request needs a JSON body with Content-Type: application/json",
            )),
        }
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("").to_owned());
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                Problem::new(
                    Code::PayloadTooLarge,
                    format!("the body must be at most {MAX_BODY_BYTES} bytes"),
                )
            } else {
                Problem::invalid("the body could not be read")
            }
        })?;
        let Some(content_type) = content_type else {
            if bytes.is_empty() {
                return Ok(Self(None));
            }
            return Err(Problem::new(
                Code::UnsupportedMediaType,
                "the body must be sent with Content-Type: application/json",
            ));
        };
        if !is_json(&content_type) {
            return Err(Problem::new(
                Code::UnsupportedMediaType,
                "the body must be sent with Content-Type: application/json",
            ));
        }
        serde_json::from_slice(&bytes)
            .map(|v| Self(Some(v)))
            .map_err(json_problem)
    }
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

fn json_problem(e: serde_json::Error) -> Problem {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => Problem::new(
            Code::MalformedJson,
            format!("the body is not valid JSON: {e}"),
        ),
        Category::Data => {
            Problem::invalid(format!("the body does not have the expected shape: {e}"))
        }
    }
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
fn record_chat<S>(state: &S, chat: &ChatId)
where
    AppState: FromRef<S>,
{
    let state = AppState::from_ref(state);
    let span = tracing::Span::current();
    span.record(
        "chatshard.chat_id",
        crate::telemetry::chat_id_attribute(chat.as_str(), state.chat_id_in_telemetry),
    );
    span.record(
        "chatshard.shard",
        state.service.shards().for_chat(chat).name(),
    );
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
        record_chat(state, &chat);
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
        record_chat(state, &chat);
        let user =
            UserId::parse(path_param(&params, "userId")?).map_err(|e| Problem::invalid(e.0))?;
        Ok(Self(chat, user))
    }
}

/// `?after=&limit=` as raw strings; each use case parses them into its types.
#[derive(Debug, Default, Deserialize)]
pub struct PageQuery {
    pub after: Option<String>,
    pub limit: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for PageQuery {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        Query::<PageQuery>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| q)
            .map_err(|e| {
                Problem::invalid(format!("the query string is not valid: {}", e.body_text()))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
