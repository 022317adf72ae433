//! The served OpenAPI document: what utoipa generates from the handlers'
//! annotations, finished with what is the same on every operation.
//!
//! - every response carries `x-request-id` and may carry `traceresponse`;
//!   429 and 503 answers carry `Retry-After`; every operation takes an
//!   optional W3C `traceparent` / `tracestate`;
//! - operations without the admin token declare `security: []`;
//! - `PUT /v1/chats/{chatId}` takes an optional body (utoipa writes an
//!   optional body as `oneOf [T, null]`, which a generated client cannot omit);
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
    if let Some(body) = document.pointer_mut("/paths/~1v1~1chats~1{chatId}/put/requestBody") {
        body["required"] = Value::Bool(false);
        body["content"]["application/json"]["schema"] =
            json!({ "$ref": "#/components/schemas/CreateChatRequest" });
    }
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
