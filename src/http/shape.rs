//! Request bodies are checked against the OpenAPI document before they are
//! deserialized, so the document says exactly what the server accepts.
//!
//! serde's derived `Deserialize` is more lenient than the document: it takes a
//! JSON array for a struct (`["x"]` joins user `x`), snake_case aliases meant
//! for the TOML file, and any integer that fits the Rust type. The check walks
//! the body beside the schema of its type (the subset of JSON Schema that
//! utoipa emits: `$ref`, `type`, `properties`, `required`,
//! `additionalProperties`, `items`, `enum`, `minimum`/`maximum`,
//! `minLength`/`maxLength`, `oneOf`/`anyOf`/`allOf`) and lists every place that
//! does not fit. Messages name the place and what the document expects there,
//! never the value sent.

use serde_json::{Map, Value};

/// The component schemas of the served document.
#[derive(Debug, Clone, Default)]
pub struct Schemas(Map<String, Value>);

impl Schemas {
    /// The `components.schemas` of an OpenAPI document.
    pub fn from_document(document: &Value) -> Self {
        Self(
            document
                .pointer("/components/schemas")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
        )
    }

    /// Every place where `value` does not fit the component schema `name`
    /// (nothing when the document has no such schema).
    pub fn check(&self, name: &str, value: &Value) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(schema) = self.0.get(name) {
            Walk { schemas: self }.walk(schema, value, "", &mut problems, 0);
        }
        problems
    }
}

/// Adds to `document` a copy of the component schema `name`, named
/// `{name}Document`, in which every field is required, and so are the fields
/// of every object it nests through its properties (through `$ref`s, which
/// get `Document` copies of their own). Map entries (`additionalProperties`)
/// keep their own schemas: they are partial by design. Returns the new name.
/// A body that replaces a whole document is checked against this copy, so
/// that leaving a field out is an error instead of a silent reset.
pub fn add_complete_variant(document: &mut Value, name: &str) -> String {
    let Some(components) = document
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    else {
        return name.to_owned();
    };
    let mut todo = vec![name.to_owned()];
    let mut done = Vec::new();
    while let Some(current) = todo.pop() {
        let Some(mut schema) = components.get(&current).cloned() else {
            continue;
        };
        require_all(&mut schema, &mut todo, &done);
        components.insert(format!("{current}Document"), schema);
        done.push(current);
    }
    format!("{name}Document")
}

fn require_all(schema: &mut Value, todo: &mut Vec<String>, done: &[String]) {
    for key in ["allOf", "oneOf", "anyOf"] {
        if let Some(parts) = schema.get_mut(key).and_then(Value::as_array_mut) {
            for part in parts {
                require_all(part, todo, done);
            }
        }
    }
    if let Some(target) = schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/components/schemas/"))
        .map(str::to_owned)
    {
        if !done.contains(&target) && !todo.contains(&target) {
            todo.push(target.clone());
        }
        schema["$ref"] = Value::String(format!("#/components/schemas/{target}Document"));
        return;
    }
    let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
        return;
    };
    let names: Vec<Value> = properties.keys().cloned().map(Value::String).collect();
    for property in properties.values_mut() {
        require_all(property, todo, done);
    }
    schema["required"] = Value::Array(names);
}

struct Walk<'s> {
    schemas: &'s Schemas,
}

impl Walk<'_> {
    fn resolve<'v>(&'v self, schema: &'v Value) -> &'v Value {
        schema
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("#/components/schemas/"))
            .and_then(|name| self.schemas.0.get(name))
            .unwrap_or(schema)
    }

    fn walk(&self, schema: &Value, value: &Value, at: &str, out: &mut Vec<String>, depth: u8) {
        // The document has no recursive types; the bound keeps a malformed one
        // from recursing forever.
        if depth > 32 {
            return;
        }
        let schema = self.resolve(schema);
        if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
            for s in all {
                self.walk(s, value, at, out, depth + 1);
            }
        }
        for key in ["oneOf", "anyOf"] {
            if let Some(any) = schema.get(key).and_then(Value::as_array) {
                let fits = |s: &Value| {
                    let mut p = Vec::new();
                    self.walk(s, value, at, &mut p, depth + 1);
                    p
                };
                let tries: Vec<Vec<String>> = any.iter().map(fits).collect();
                if !tries.iter().any(Vec::is_empty) {
                    // The closest branch explains best what was expected.
                    if let Some(best) = tries.into_iter().min_by_key(Vec::len) {
                        out.extend(best);
                    }
                }
            }
        }
        if let Some(types) = schema.get("type") {
            let allowed: Vec<&str> = match types {
                Value::String(t) => vec![t.as_str()],
                Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            if !allowed.is_empty() && !allowed.iter().any(|t| is_type(value, t)) {
                out.push(format!("{} must be {}", place(at), expected(&allowed)));
                return;
            }
        }
        if let Some(options) = schema.get("enum").and_then(Value::as_array)
            && !options.contains(value)
        {
            let names: Vec<String> = options.iter().map(Value::to_string).collect();
            out.push(format!("{} must be one of {}", place(at), names.join(", ")));
        }
        match value {
            Value::Object(fields) => self.walk_object(schema, fields, at, out, depth),
            Value::Array(items) => {
                if let Some(item) = schema.get("items") {
                    for (i, v) in items.iter().enumerate() {
                        self.walk(item, v, &format!("{at}[{i}]"), out, depth + 1);
                    }
                }
            }
            Value::Number(n) => check_range(schema, n, at, out),
            Value::String(s) => check_length(schema, s, at, out),
            Value::Null | Value::Bool(_) => {}
        }
    }

    fn walk_object(
        &self,
        schema: &Value,
        fields: &Map<String, Value>,
        at: &str,
        out: &mut Vec<String>,
        depth: u8,
    ) {
        let properties = schema.get("properties").and_then(Value::as_object);
        for name in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !fields.contains_key(name) {
                out.push(format!("{} lacks the required field `{name}`", place(at)));
            }
        }
        let additional = schema.get("additionalProperties");
        let mut unknown = false;
        for (name, v) in fields {
            match properties.and_then(|p| p.get(name)) {
                Some(s) => self.walk(s, v, &join(at, name), out, depth + 1),
                None => match additional {
                    // A map: its keys are data (chat ids), not field names.
                    Some(s @ Value::Object(_)) => self.walk(s, v, &join(at, "*"), out, depth + 1),
                    Some(Value::Bool(false)) => unknown = true,
                    _ => {}
                },
            }
        }
        if unknown {
            let known: Vec<&str> = properties
                .map(|p| p.keys().map(String::as_str).collect())
                .unwrap_or_default();
            out.push(format!(
                "{} has a field the API does not define (it takes {})",
                place(at),
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ));
        }
    }
}

fn is_type(value: &Value, t: &str) -> bool {
    match t {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        "number" => value.is_number(),
        "integer" => value.is_i64() || value.is_u64(),
        _ => true,
    }
}

fn expected(types: &[&str]) -> String {
    let names: Vec<&str> = types
        .iter()
        .map(|t| match *t {
            "object" => "an object",
            "array" => "an array",
            "string" => "a string",
            "boolean" => "true or false",
            "null" => "null",
            "number" => "a number",
            "integer" => "a whole number",
            other => other,
        })
        .collect();
    names.join(" or ")
}

fn check_range(schema: &Value, n: &serde_json::Number, at: &str, out: &mut Vec<String>) {
    let Some(v) = n.as_f64() else { return };
    let bound = |k: &str| schema.get(k).and_then(Value::as_f64);
    let show = |k: &str| schema.get(k).map(Value::to_string).unwrap_or_default();
    if bound("minimum").is_some_and(|m| v < m) {
        out.push(format!(
            "{} must be at least {}",
            place(at),
            show("minimum")
        ));
    }
    if bound("maximum").is_some_and(|m| v > m) {
        out.push(format!("{} must be at most {}", place(at), show("maximum")));
    }
    if bound("exclusiveMinimum").is_some_and(|m| v <= m) {
        out.push(format!(
            "{} must be greater than {}",
            place(at),
            show("exclusiveMinimum")
        ));
    }
    if bound("exclusiveMaximum").is_some_and(|m| v >= m) {
        out.push(format!(
            "{} must be less than {}",
            place(at),
            show("exclusiveMaximum")
        ));
    }
}

fn check_length(schema: &Value, s: &str, at: &str, out: &mut Vec<String>) {
    let n = s.chars().count() as u64;
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
        && n < min
    {
        out.push(format!("{} must have at least {min} characters", place(at)));
    }
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
        && n > max
    {
        out.push(format!("{} must have at most {max} characters", place(at)));
    }
}

fn join(at: &str, name: &str) -> String {
    if at.is_empty() {
        name.to_owned()
    } else {
        format!("{at}.{name}")
    }
}

fn place(at: &str) -> String {
    if at.is_empty() {
        "the body".to_owned()
    } else {
        format!("`{at}`")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schemas() -> Schemas {
        Schemas::from_document(&json!({"components": {"schemas": {
            "Join": {"type": "object", "required": ["userId"], "additionalProperties": false,
                     "properties": {"userId": {"type": "string", "minLength": 1, "maxLength": 64}}},
            "Config": {"type": "object", "additionalProperties": false, "properties": {
                "limit": {"type": "integer", "minimum": 1, "maximum": 10},
                "overrides": {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/Join"}},
                "max": {"type": ["integer", "null"], "minimum": 1}
            }}
        }}}))
    }

    #[test]
    fn arrays_and_scalars_are_not_objects() {
        let s = schemas();
        assert_eq!(
            s.check("Join", &json!(["x"])),
            ["the body must be an object"]
        );
        assert_eq!(
            s.check("Config", &json!([])),
            ["the body must be an object"]
        );
        assert_eq!(s.check("Join", &json!(7)), ["the body must be an object"]);
    }

    #[test]
    fn every_problem_is_listed_without_the_values_sent() {
        let s = schemas();
        let p = s.check(
            "Config",
            &json!({"limit": 99, "max": "SECRET", "overrides": {"SECRET-KEY": {"userId": ""}}, "dry_run": true}),
        );
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(
            p.iter()
                .all(|m| !m.contains("SECRET") && !m.contains("dry_run")),
            "{p:?}"
        );
        assert!(
            p.contains(&"`limit` must be at most 10".to_owned()),
            "{p:?}"
        );
        assert!(
            p.contains(&"`max` must be a whole number or null".to_owned()),
            "{p:?}"
        );
        assert!(
            s.check("Config", &json!({"max": null, "limit": 3}))
                .is_empty()
        );
        assert_eq!(
            s.check("Join", &json!({})),
            ["the body lacks the required field `userId`"]
        );
    }

    #[test]
    fn a_complete_variant_requires_every_field_but_not_in_map_entries() {
        let mut document = json!({"components": {"schemas": {
            "Outer": {"type": "object", "properties": {
                "inner": {"$ref": "#/components/schemas/Inner"},
                "map": {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/Entry"}}
            }},
            "Inner": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
            "Entry": {"type": "object", "properties": {"x": {"type": "integer"}}}
        }}});
        let name = add_complete_variant(&mut document, "Outer");
        let s = Schemas::from_document(&document);
        let partial = json!({"inner": {"a": 1}, "map": {"k": {}}});
        assert!(s.check("Outer", &partial).is_empty());
        assert_eq!(
            s.check(&name, &partial),
            ["`inner` lacks the required field `b`"]
        );
        assert!(
            s.check(&name, &json!({"inner": {"a": 1, "b": 2}, "map": {"k": {}}}))
                .is_empty()
        );
    }
}
