//! The served OpenAPI document: what utoipa generates from the handlers'
//! annotations, finished with what is the same on every operation.
//!
//! - every response carries `x-request-id` and may carry `traceresponse`;
//!   429 and 503 answers carry `Retry-After`; every operation takes an
//!   optional W3C `traceparent` / `tracestate`;
//! - operations without the admin token declare `security: []`;
//! - `PUT /v1/chats/{chatId}` and `POST /v1/streams` take an optional body
//!   that is never `null` (utoipa writes an optional body as `oneOf [T,
//!   null]`, which a generated client cannot omit, and the server refuses a
//!   JSON `null` body);
//! - the `Last-Event-ID` header of both streams is an optional string of the
//!   documented pattern, not a nullable one;
//! - the events of both streams: the JSON `data` of each kind of event is a
//!   named component schema, listed in the 200 answer's description and in
//!   its `x-sse-events` (event name → schema);
//! - `PUT /v1/admin/config` replaces the whole live configuration, so its body
//!   is `LiveConfigDocument`: `LiveConfig` with every field required;
//!   `PATCH` takes `LiveConfigPatch`, a merge patch of it (the server checks
//!   bodies against this same document, see `shape`);
//! - override maps and the chats of a multiplexed stream are keyed by chat id
//!   (`propertyNames` with its pattern).

use serde_json::{Value, json};

use super::shape;

/// The finished document, as served at `/openapi.json`.
/// `shards` are the names `isolation.shard` may take (besides empty).
pub fn finish(api: utoipa::openapi::OpenApi, shards: &[String]) -> Value {
    let mut document = serde_json::to_value(api).unwrap_or_else(|e| {
        tracing::error!(error = %e, "the OpenAPI document cannot be serialized");
        Value::Null
    });
    // Overrides are keyed by chat id.
    for config in ["HotChatConfig", "JoinThrottleConfig", "RetentionConfig"] {
        if let Some(overrides) = document.pointer_mut(&format!(
            "/components/schemas/{config}/properties/overrides"
        )) {
            overrides["propertyNames"] =
                json!({"type": "string", "pattern": crate::domain::ID_PATTERN});
        }
    }
    // So are the chats of a multiplexed stream.
    for schema in ["CreateStreamRequest", "StreamView"] {
        if let Some(chats) =
            document.pointer_mut(&format!("/components/schemas/{schema}/properties/chats"))
        {
            chats["propertyNames"] =
                json!({"type": "string", "pattern": crate::domain::ID_PATTERN});
        }
    }
    if !shards.is_empty()
        && let Some(shard) =
            document.pointer_mut("/components/schemas/IsolationConfig/properties/shard")
    {
        let names = std::iter::once("").chain(shards.iter().map(String::as_str));
        shard["enum"] = names.map(|n| Value::String(n.to_owned())).collect();
    }
    let complete = shape::add_variant(&mut document, "LiveConfig", shape::Variant::Complete);
    let patch = shape::add_variant(&mut document, "LiveConfig", shape::Variant::Patch);
    for (method, media, schema) in [
        ("put", "application~1json", &complete),
        ("patch", "application~1merge-patch+json", &patch),
    ] {
        if let Some(body) = document.pointer_mut(&format!(
            "/paths/~1v1~1admin~1config/{method}/requestBody/content/{media}"
        )) {
            body["schema"] = json!({ "$ref": format!("#/components/schemas/{schema}") });
        }
    }
    for (path, schema) in [
        ("~1v1~1chats~1{chatId}/put", "CreateChatRequest"),
        ("~1v1~1streams/post", "CreateStreamRequest"),
    ] {
        if let Some(body) = document.pointer_mut(&format!("/paths/{path}/requestBody")) {
            body["required"] = Value::Bool(false);
            body["content"]["application/json"]["schema"] =
                json!({ "$ref": format!("#/components/schemas/{schema}") });
        }
    }
    stream_events(&mut document);
    let Some(paths) = document.get_mut("paths").and_then(Value::as_object_mut) else {
        return document;
    };
    for item in paths.values_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, operation) in item.iter_mut() {
            if !matches!(
                method.as_str(),
                "get" | "put" | "post" | "delete" | "patch" | "head" | "options"
            ) {
                continue;
            }
            finish_operation(operation);
        }
    }
    document
}

/// The two event streams: their `Last-Event-ID` header, and the schema of
/// each kind of event's `data`.
fn stream_events(document: &mut Value) {
    let reference = |name: &str| json!({ "$ref": format!("#/components/schemas/{name}") });
    let end = |reasons: &[&str], description: &str| {
        json!({
            "type": "object",
            "description": description,
            "required": ["reason", "detail", "lastEventId"],
            "properties": {
                "reason": {"type": "string", "enum": reasons},
                "detail": {"type": "string"},
                "lastEventId": {"type": "integer", "format": "int64", "minimum": 0,
                    "description": "The id to reconnect with (`Last-Event-ID`)"},
            },
        })
    };
    let schemas = [
        (
            "ChatStreamEnd",
            end(
                &["shutdown", "chat_not_found", "revision_purged", "error"],
                "The data of a per-chat stream's final `shutdown` or `error` event",
            ),
        ),
        (
            "StreamEvent",
            json!({
                "description": "The data of a multiplexed stream's event message (no `event:` field): the Event with its chat's id",
                "allOf": [
                    reference("Event"),
                    {"type": "object", "required": ["chatId"],
                     "properties": {"chatId": {"type": "string", "pattern": crate::domain::ID_PATTERN}}},
                ],
            }),
        ),
        (
            "StreamResync",
            json!({
                "type": "object",
                "description": "The data of a `resync` event: the chat was too far behind; fetch its events after `after` up to `latestRevision` with GET /v1/chats/{chatId}/events, the stream goes on after `latestRevision`",
                "required": ["chatId", "after", "latestRevision", "detail"],
                "properties": {
                    "chatId": {"type": "string"},
                    "after": {"type": "integer", "format": "int64", "minimum": 0},
                    "latestRevision": {"type": "integer", "format": "int64", "minimum": 0},
                    "detail": {"type": "string"},
                },
            }),
        ),
        (
            "StreamRemoved",
            json!({
                "type": "object",
                "description": "The data of a `removed` event: the stream no longer follows the chat (with `revision_purged`: load `snapshot`, then follow the chat again after its revision)",
                "required": ["chatId", "reason"],
                "properties": {
                    "chatId": {"type": "string"},
                    "reason": {"type": "string", "enum": ["chat_not_found", "revision_purged", "error"]},
                    "after": {"type": "integer", "format": "int64", "minimum": 0},
                    "snapshot": {"type": "string"},
                    "detail": {"type": "string"},
                },
            }),
        ),
        (
            "StreamEnd",
            end(
                &["shutdown", "replaced", "closed"],
                "The data of a multiplexed stream's final `shutdown`, `replaced` or `closed` event",
            ),
        ),
    ];
    if let Some(components) = document
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        for (name, schema) in schemas {
            components.insert(name.to_owned(), schema);
        }
    }
    let streams = [
        (
            "~1v1~1chats~1{chatId}~1events~1stream",
            vec![
                ("message", "Event"),
                ("shutdown", "ChatStreamEnd"),
                ("error", "ChatStreamEnd"),
            ],
        ),
        (
            "~1v1~1streams~1{streamId}",
            vec![
                ("message", "StreamEvent"),
                ("resync", "StreamResync"),
                ("removed", "StreamRemoved"),
                ("shutdown", "StreamEnd"),
                ("replaced", "StreamEnd"),
                ("closed", "StreamEnd"),
            ],
        ),
    ];
    for (path, events) in streams {
        let Some(operation) = document.pointer_mut(&format!("/paths/{path}/get")) else {
            continue;
        };
        if let Some(parameters) = operation
            .get_mut("parameters")
            .and_then(Value::as_array_mut)
        {
            for parameter in parameters
                .iter_mut()
                .filter(|p| p["name"] == "Last-Event-ID")
            {
                parameter["required"] = Value::Bool(false);
                parameter["schema"] = json!({"type": "string", "pattern": LAST_EVENT_ID_PATTERN});
            }
        }
        let Some(ok) = operation.pointer_mut("/responses/200") else {
            continue;
        };
        let listed: Vec<String> = events
            .iter()
            .map(|(event, schema)| format!("`{event}`: [{schema}](#/components/schemas/{schema})"))
            .collect();
        let description = ok["description"].as_str().unwrap_or_default().to_owned();
        ok["description"] = Value::String(format!(
            "{description}. Each event's `data` is JSON; its schema by event name (`message` is an event without an `event:` field): {}",
            listed.join(", ")
        ));
        ok["x-sse-events"] = events
            .iter()
            .map(|(event, schema)| ((*event).to_owned(), reference(schema)))
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
}

/// What a `Last-Event-ID` may be: empty (no id), or up to 18 digits.
const LAST_EVENT_ID_PATTERN: &str = "^[0-9]{0,18}$";

fn finish_operation(operation: &mut Value) {
    if operation.get("security").is_none() {
        operation["security"] = json!([]);
    }
    // Answers any operation can get from the connection layer.
    let has_body = operation.get("requestBody").is_some();
    if let Some(responses) = operation
        .get_mut("responses")
        .and_then(Value::as_object_mut)
    {
        let mut add = |status: &str, description: &str| {
            responses.entry(status.to_owned()).or_insert_with(|| {
                json!({
                    "description": description,
                    "content": {"application/problem+json": {
                        "schema": {"$ref": "#/components/schemas/Problem"}
                    }}
                })
            });
        };
        add(
            "414",
            "uri_too_long: the request target is over http.max_uri_bytes",
        );
        add(
            "503",
            "too_many_connections, or the shard's or chat's protections (see the code)",
        );
        if has_body {
            add("408", "request_timeout: the body did not arrive in time");
        }
    }
    let parameters = operation
        .as_object_mut()
        .map(|o| o.entry("parameters").or_insert_with(|| json!([])));
    if let Some(Value::Array(parameters)) = parameters {
        parameters.push(json!({
            "name": "traceparent", "in": "header", "required": false,
            "description": "W3C trace context of the caller: the request's server span becomes its child.",
            "schema": {"type": "string", "example": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
        }));
        parameters.push(json!({
            "name": "tracestate", "in": "header", "required": false,
            "description": "W3C trace state, passed along with traceparent.",
            "schema": {"type": "string"}
        }));
    }
    let Some(responses) = operation
        .get_mut("responses")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    for (status, response) in responses.iter_mut() {
        let Some(response) = response.as_object_mut() else {
            continue;
        };
        let headers = response.entry("headers").or_insert_with(|| json!({}));
        headers["x-request-id"] = json!({
            "description": "The request's trace id (the caller's when it sent a traceparent); every log line of the request carries it.",
            "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}
        });
        headers["traceresponse"] = json!({
            "description": "W3C trace response naming the server span, when traces are exported.",
            "schema": {"type": "string"}
        });
        if status == "429" || status == "503" {
            headers["Retry-After"] = json!({
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "integer", "minimum": 1}
            });
        }
    }
}
