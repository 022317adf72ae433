//! The environment overlay: `CHATSHARD_*` variables that override the file.
//!
//! - `CHATSHARD__<SECTION>__<KEY>=value` sets any key, e.g.
//!   `CHATSHARD__POOL__MAX_WAIT_MS=100`, `CHATSHARD__POOL__CHAT_SHARE=0.25` or
//!   `CHATSHARD__LISTEN=0.0.0.0:8080`; the value takes the type of the field it
//!   sets (integer, float, bool, string, or a TOML array such as `["0-511"]`).
//!   These apply to the parsed TOML table, before it becomes [`Settings`], so
//!   an overridden key is checked like one written in the file.
//! - `CHATSHARD_SHARD_<NAME>_URL` replaces the URL of the shard named `<name>`
//!   (upper-cased, `-` as `_`), and `CHATSHARD_ADMIN_TOKEN` the admin token,
//!   so credentials need not live in the file. These apply to the typed
//!   settings, after the file's shards are known.
//!
//! Invariants: the environment is passed in as pairs (never read here), so
//! loading is testable; every bad variable is reported, each message starting
//! `environment variable <NAME>:`, and none stops the others from being
//! checked; a variable that matches no rule above is ignored.
//!
//! Must not: read the process environment itself, or judge the values it
//! sets (`super::validate` does, after the overlay); a credential variable's
//! value is never put in a message.

use super::{ConfigError, Settings};

/// Applies `CHATSHARD__A__B=value` overrides to the parsed table.
///
/// An environment value is text; its type comes from the field it sets: the
/// value already in the file, else the field's default. So `0.25` sets a float,
/// `true` a bool, and a string setting keeps its text even when it looks like a
/// number. A key that names no known field is inferred (integer, float, bool,
/// else string) and then refused by the unknown-field check with the others.
pub(super) fn apply_key_overrides(
    table: &mut toml::Table,
    env: &[(String, String)],
) -> Result<(), ConfigError> {
    let defaults = defaults_table();
    let mut problems = Vec::new();
    for (key, raw) in env {
        let Some(path) = key.strip_prefix("CHATSHARD__") else {
            continue;
        };
        let parts: Vec<String> = path.split("__").map(str::to_lowercase).collect();
        if parts.iter().any(String::is_empty) {
            problems.push(format!("environment variable {key}: empty path segment"));
            continue;
        }
        let target = lookup(table, &parts).or_else(|| lookup(&defaults, &parts));
        let value = match typed_env_value(raw, target) {
            Ok(value) => value,
            Err(p) => {
                problems.push(format!("environment variable {key}: {p}"));
                continue;
            }
        };
        if let Err(p) = set_path(table, &parts, value) {
            problems.push(format!("environment variable {key}: {p}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError(problems))
    }
}

/// Applies `CHATSHARD_SHARD_<NAME>_URL` to each shard, then
/// `CHATSHARD_ADMIN_TOKEN`, to settings already typed.
pub(super) fn apply_credential_overrides(settings: &mut Settings, env: &[(String, String)]) {
    for shard in &mut settings.shards {
        let key = format!(
            "CHATSHARD_SHARD_{}_URL",
            shard.name.to_uppercase().replace('-', "_")
        );
        if let Some((_, url)) = env.iter().find(|(k, _)| *k == key) {
            shard.url = url.clone();
        }
    }
    if let Some((_, token)) = env.iter().find(|(k, _)| k == "CHATSHARD_ADMIN_TOKEN") {
        settings.admin.token = token.clone();
    }
}

/// Every setting at its default, as TOML: the types environment values take.
fn defaults_table() -> toml::Table {
    toml::Table::new()
        .try_into::<Settings>()
        .ok()
        .and_then(|defaults| toml::Table::try_from(defaults).ok())
        .unwrap_or_default()
}

/// The value at `path`; a key matches whatever its case and underscores (the
/// live sections are camelCase when serialized, snake_case in files).
fn lookup<'t>(table: &'t toml::Table, path: &[String]) -> Option<&'t toml::Value> {
    let (first, rest) = path.split_first()?;
    let folded = |k: &str| k.replace('_', "").to_lowercase();
    let value = table.get(first).or_else(|| {
        table
            .iter()
            .find(|(k, _)| folded(k) == folded(first))
            .map(|(_, v)| v)
    })?;
    match (rest.is_empty(), value) {
        (true, v) => Some(v),
        (false, toml::Value::Table(inner)) => lookup(inner, rest),
        (false, _) => None,
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    match path {
        [] => Err("empty key".to_owned()),
        [last] => {
            table.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => match table
            .entry(first.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            toml::Value::Table(inner) => set_path(inner, rest, value),
            _ => Err(format!("{first} is not a section")),
        },
    }
}

/// The environment text `raw` as a value of the type of `target`.
fn typed_env_value(raw: &str, target: Option<&toml::Value>) -> Result<toml::Value, String> {
    use toml::Value;
    let trimmed = raw.trim();
    match target {
        Some(Value::String(_)) => Ok(Value::String(raw.to_owned())),
        Some(Value::Integer(_)) => trimmed
            .parse::<i64>()
            .map(Value::Integer)
            .map_err(|_| format!("{raw:?} is not a whole number")),
        Some(Value::Float(_)) => trimmed
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(Value::Float)
            .ok_or_else(|| format!("{raw:?} is not a number")),
        Some(Value::Boolean(_)) => trimmed
            .parse::<bool>()
            .map(Value::Boolean)
            .map_err(|_| format!("{raw:?} is not true or false")),
        Some(Value::Array(_)) => format!("v = {trimmed}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .filter(toml::Value::is_array)
            .ok_or_else(|| format!("{raw:?} is not a TOML array such as [\"0-511\"]")),
        Some(Value::Table(_)) => Err("names a section, not a setting".to_owned()),
        Some(Value::Datetime(_)) | None => Ok(infer_env_value(raw)),
    }
}

fn infer_env_value(raw: &str) -> toml::Value {
    if let Ok(i) = raw.parse::<i64>() {
        toml::Value::Integer(i)
    } else if let Some(f) = raw.parse::<f64>().ok().filter(|f| f.is_finite()) {
        toml::Value::Float(f)
    } else if let Ok(b) = raw.parse::<bool>() {
        toml::Value::Boolean(b)
    } else {
        toml::Value::String(raw.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::super::TWO_SHARDS;
    use super::*;

    #[test]
    fn defaults_apply_and_env_overrides_win() -> crate::TestResult {
        let env = [
            ("CHATSHARD__POOL__MAX_WAIT_MS".to_owned(), "75".to_owned()),
            ("CHATSHARD__LISTEN".to_owned(), "0.0.0.0:9000".to_owned()),
            (
                "CHATSHARD_SHARD_B_2_URL".to_owned(),
                "mysql://u:p@db:3306/x".to_owned(),
            ),
        ];
        let s = Settings::from_toml(TWO_SHARDS, env)?;
        assert_eq!(s.pool.max_wait_ms, 75);
        assert_eq!(s.pool.max_concurrent, 16);
        assert_eq!(s.listen.port(), 9000);
        assert_eq!(s.shards[1].url, "mysql://u:p@db:3306/x");
        assert_eq!(
            s.shards[0].redacted_url(),
            "mysql://root@127.0.0.1:3307/chatshard"
        );
        Ok(())
    }

    #[test]
    fn env_values_take_the_type_of_the_field_they_set() -> crate::TestResult {
        let text = format!("[admin]\ntoken = \"file-token-0123456789\"\n{TWO_SHARDS}");
        let env = [
            ("CHATSHARD__POOL__CHAT_SHARE", "0.25"),
            ("CHATSHARD__BREAKER__FAILURE_RATE", "1"),
            ("CHATSHARD__HOT_CHAT__THROTTLE_RATE", "0.75"),
            ("CHATSHARD__HOT_CHAT__DRY_RUN", "true"),
            // A string setting that looks like a number stays a string.
            ("CHATSHARD__ADMIN__TOKEN", "12345678901234567890"),
            ("CHATSHARD__TELEMETRY__OTLP_ENDPOINT", "4318"),
            ("CHATSHARD__POOL__MAX_WAITING", "7"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let s = Settings::from_toml(&text, env)?;
        assert_eq!(s.pool.chat_share, 0.25);
        assert_eq!(s.breaker.failure_rate, 1.0);
        assert_eq!(s.hot_chat.throttle_rate, 0.75);
        assert!(s.hot_chat.dry_run);
        assert_eq!(s.admin.token, "12345678901234567890");
        assert_eq!(s.telemetry.otlp_endpoint, "4318");
        assert_eq!(s.pool.max_waiting, 7);
        Ok(())
    }

    #[test]
    fn every_default_is_known_to_the_env_typing() {
        let defaults = defaults_table();
        let path = |p: &str| p.split('.').map(str::to_owned).collect::<Vec<_>>();
        for key in [
            "listen",
            "pool.chat_share",
            "hot_chat.dry_run",
            "admin.token",
            "shards",
        ] {
            assert!(lookup(&defaults, &path(key)).is_some(), "{key} missing");
        }
    }

    #[test]
    fn bad_env_values_are_listed_together() {
        let env = [
            ("CHATSHARD__POOL__CHAT_SHARE", "half"),
            ("CHATSHARD__POOL__MAX_WAITING", "1.5"),
            ("CHATSHARD__HOT_CHAT__DRY_RUN", "yes"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let err = Settings::from_toml(TWO_SHARDS, env).unwrap_err();
        assert_eq!(err.0.len(), 3, "{err}");
        assert!(
            err.0
                .iter()
                .all(|p| p.starts_with("environment variable CHATSHARD__"))
        );
        let env = [("CHATSHARD__POOL__COLOUR".to_owned(), "1".to_owned())];
        let err = Settings::from_toml(TWO_SHARDS, env).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }
}
