//! Request bodies are checked against the OpenAPI document before they are
//! deserialized, so the document says exactly what the server accepts.
//!
//! serde's derived `Deserialize` is more lenient than the document: it takes a
//! JSON array for a struct (`["x"]` joins user `x`), snake_case aliases meant
//! for the TOML file, and any integer that fits the Rust type. The check walks
//! the body beside the schema of its type (the subset of JSON Schema that
//! utoipa emits: `$ref`, `type`, `properties`, `required`,
//! `additionalProperties`, `propertyNames`, `items`, `enum`,
//! `minimum`/`maximum`, `minLength`/`maxLength`, `pattern`,
//! `oneOf`/`anyOf`/`allOf`) and lists every place that does not fit. Messages
//! name the place and what the document expects there, never the value sent.
//! As in JSON Schema, `5.0` is an integer; such numbers are stored as integers
//! before deserialization, so serde agrees.

use std::collections::HashMap;

use regex::Regex;
use serde_json::{Map, Value};

/// The component schemas of the served document, with their patterns compiled.
#[derive(Debug, Clone, Default)]
pub struct Schemas {
    schemas: Map<String, Value>,
    patterns: HashMap<String, Regex>,
}

impl Schemas {
    /// The `components.schemas` of an OpenAPI document.
    pub fn from_document(document: &Value) -> Self {
        let schemas = document
            .pointer("/components/schemas")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let mut patterns = HashMap::new();
        let mut todo: Vec<&Value> = schemas.values().collect();
        while let Some(v) = todo.pop() {
            match v {
                Value::Object(o) => {
                    if let Some(Value::String(p)) = o.get("pattern") {
                        match Regex::new(p) {
                            Ok(re) => {
                                patterns.insert(p.clone(), re);
                            }
                            Err(e) => {
                                tracing::warn!(pattern = %p, error = %e, "a pattern of the OpenAPI document does not compile; it is not checked");
                            }
                        }
                    }
                    todo.extend(o.values());
                }
                Value::Array(a) => todo.extend(a),
                _ => {}
            }
        }
        Self { schemas, patterns }
    }

    /// Stores every number with no fractional part as an integer (JSON Schema
    /// counts `5.0` as an integer; serde's integer types do not).
    pub fn normalize(value: &mut Value) {
        match value {
            Value::Number(n) if !n.is_i64() && !n.is_u64() => {
                if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15) {
                    *value = if f < 0.0 {
                        Value::from(f as i64)
                    } else {
                        Value::from(f as u64)
                    };
                }
            }
            Value::Array(items) => items.iter_mut().for_each(Self::normalize),
            Value::Object(fields) => fields.values_mut().for_each(Self::normalize),
            _ => {}
        }
    }

    /// Every place where `value` does not fit the component schema `name`
    /// (nothing when the document has no such schema).
    pub fn check(&self, name: &str, value: &Value) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(schema) = self.schemas.get(name) {
            Walk { schemas: self }.walk(schema, value, "", &mut problems, 0);
        }
        problems
    }
}

/// A variant of a component schema, added to the document beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `{name}Document`: every field required, and so are the fields of every
    /// object it nests through its properties. Map entries
    /// (`additionalProperties`) keep their own schemas: partial by design. A
    /// body that replaces a whole document is checked against it, so leaving
    /// a field out is an error instead of a silent reset.
    Complete,
    /// `{name}Patch`: an RFC 7396 merge patch of it: no field required, and a
    /// map entry may be `null` (which removes it).
    Patch,
}

impl Variant {
    fn suffix(self) -> &'static str {
        match self {
            Self::Complete => "Document",
            Self::Patch => "Patch",
        }
    }
}

/// Adds to `document` the `variant` of the component schema `name` (and of
/// every schema it nests through its properties, through `$ref`s); returns
/// the new schema's name.
pub fn add_variant(document: &mut Value, name: &str, variant: Variant) -> String {
    let new_name = format!("{name}{}", variant.suffix());
    let Some(components) = document
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    else {
        return new_name;
    };
    let mut todo = vec![name.to_owned()];
    let mut done = Vec::new();
    while let Some(current) = todo.pop() {
        let Some(mut schema) = components.get(&current).cloned() else {
            continue;
        };
        rewrite(&mut schema, variant, &mut todo, &done);
        components.insert(format!("{current}{}", variant.suffix()), schema);
        done.push(current);
    }
    new_name
}

fn rewrite(schema: &mut Value, variant: Variant, todo: &mut Vec<String>, done: &[String]) {
    for key in ["allOf", "oneOf", "anyOf"] {
        if let Some(parts) = schema.get_mut(key).and_then(Value::as_array_mut) {
            for part in parts {
                rewrite(part, variant, todo, done);
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
        schema["$ref"] =
            Value::String(format!("#/components/schemas/{target}{}", variant.suffix()));
        return;
    }
    if variant == Variant::Patch
        && let Some(entry) = schema.get_mut("additionalProperties")
        && entry.is_object()
    {
        *entry = serde_json::json!({"anyOf": [entry.take(), {"type": "null"}]});
    }
    let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
        return;
    };
    let names: Vec<Value> = properties.keys().cloned().map(Value::String).collect();
    for property in properties.values_mut() {
        rewrite(property, variant, todo, done);
    }
    match variant {
        Variant::Complete => schema["required"] = Value::Array(names),
        Variant::Patch => {
            if let Some(o) = schema.as_object_mut() {
                o.remove("required");
            }
        }
    }
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
            .and_then(|name| self.schemas.schemas.get(name))
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
            Value::String(s) => {
                check_length(schema, s, at, out);
                self.check_pattern(schema, s, at, out);
            }
            Value::Null | Value::Bool(_) => {}
        }
    }

    fn check_pattern(&self, schema: &Value, s: &str, at: &str, out: &mut Vec<String>) {
        if let Some(pattern) = schema.get("pattern").and_then(Value::as_str)
            && let Some(re) = self.schemas.patterns.get(pattern)
            && !re.is_match(s)
        {
            out.push(format!("{} must match {pattern}", place(at)));
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
        let key_pattern = schema
            .get("propertyNames")
            .and_then(|n| n.get("pattern"))
            .and_then(Value::as_str);
        let mut unknown = false;
        for (name, v) in fields {
            if let Some(pattern) = key_pattern
                && properties.is_none_or(|p| !p.contains_key(name))
                && self
                    .schemas
                    .patterns
                    .get(pattern)
                    .is_some_and(|re| !re.is_match(name))
            {
                out.push(format!(
                    "{} has a key that does not match {pattern}",
                    place(at)
                ));
            }
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
        let name = add_variant(&mut document, "Outer", Variant::Complete);
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
        let patch = add_variant(&mut document, "Outer", Variant::Patch);
        let s = Schemas::from_document(&document);
        assert!(s.check(&patch, &json!({"map": {"k": null}})).is_empty());
        let removal = json!({"inner": {"a": 1, "b": 2}, "map": {"k": null}});
        assert_eq!(s.check(&name, &removal).len(), 1);
    }

    #[test]
    fn integral_floats_are_integers_and_patterns_are_checked() {
        let s = Schemas::from_document(&json!({"components": {"schemas": {
            "Obj": {"type": "object", "properties": {
                "n": {"type": "integer"},
                "id": {"type": "string", "pattern": "^[a-z]{1,3}$"},
                "m": {"type": "object", "propertyNames": {"type": "string", "pattern": "^[a-z]{1,3}$"},
                      "additionalProperties": {"type": "integer"}}
            }}
        }}}));
        let mut v = json!({"n": 65.0, "id": "abc", "m": {"ok": 1}});
        Schemas::normalize(&mut v);
        assert_eq!(v["n"], json!(65));
        assert!(s.check("Obj", &v).is_empty());
        let bad = json!({"id": "ABCD", "m": {"SECRET": 1}});
        let p = s.check("Obj", &bad);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p.iter()
                .all(|m| !m.contains("SECRET") && !m.contains("ABCD")),
            "{p:?}"
        );
    }
}
