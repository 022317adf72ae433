//! Static configuration: a TOML file plus environment overrides, validated on load.
//!
//! Loading lists every problem at once (not just the first) so an operator can fix
//! a file in one pass. Environment overrides:
//!
//! - `CHATSHARD__<SECTION>__<KEY>=value` sets any key, e.g.
//!   `CHATSHARD__POOL__MAX_WAIT_MS=100`, `CHATSHARD__POOL__CHAT_SHARE=0.25` or
//!   `CHATSHARD__LISTEN=0.0.0.0:8080`; the value takes the type of the field it
//!   sets (integer, float, bool, string, or a TOML array such as `["0-511"]`);
//! - `CHATSHARD_SHARD_<NAME>_URL` replaces the URL of the shard named `<name>`
//!   (upper-cased, `-` as `_`), so credentials need not live in the file.
//!
//! Only `app` and `cli` read this module's types; lower layers receive the typed
//! pieces they need (`PoolSettings` for a shard, and so on).
//!
//! This file holds loading only: read the text, parse it into a table, lay the
//! environment over it (`env`), type it ([`Settings`] and its sections live in
//! `settings`), validate it (`validate`). Each of those steps is its own file;
//! every public type is re-exported here, so `crate::config::X` is the one
//! path the rest of the crate uses.
//!
//! Invariants: the steps run in that order, so an environment override is
//! typed and checked exactly like the key written in the file; a failure at
//! any step is one [`ConfigError`] listing every problem found by that step.
//!
//! Must not: import the layers that take the typed settings (`crate::shard`,
//! `crate::service`, `crate::fleet`, `crate::http`, ...); they receive their
//! piece from `app`, which keeps dependencies pointing one way.

mod env;
mod settings;
mod validate;

use std::path::Path;

pub use settings::{
    AdminSettings, ApiClient, ApiSettings, BreakerSettings, ChatDefaults, DigestSettings,
    GroupCommitSettings, HttpSettings, HttpTlsSettings, MovesSettings, PoolSettings, PurgeSettings,
    RedisSettings, RedisTlsSettings, ReplicaSettings, Scope, Settings, ShardSettings,
    StartupSettings, TailSettings, ThrottleSettings, redact_url,
};

/// A configuration that failed to load or validate; lists every problem.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

impl Settings {
    /// Reads a TOML file, applies the process environment, validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(vec![format!("cannot read {}: {e}", path.display())]))?;
        Self::from_toml(&text, std::env::vars())
    }

    /// Parses TOML text, applies the given environment, validates.
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let settings = Self::from_toml_unvalidated(text, env)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Parses TOML text and applies the environment, without the checks that
    /// need shards (for `serve --dev`, which adds its own shards).
    pub fn from_toml_unvalidated(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e| ConfigError(vec![format!("not valid TOML: {e}")]))?;
        let env: Vec<(String, String)> = env.into_iter().collect();
        env::apply_key_overrides(&mut table, &env)?;
        let mut settings: Settings = table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError(vec![e.message().to_owned()]))?;
        env::apply_credential_overrides(&mut settings, &env);
        Ok(settings)
    }

    /// Reads a file for `serve --dev`: its shards are replaced by local ones.
    pub fn load_without_shards(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(vec![format!("cannot read {}: {e}", path.display())]))?;
        let mut settings = Self::from_toml_unvalidated(&text, std::env::vars())?;
        settings.shards.clear();
        Ok(settings)
    }
}

/// Two valid shards, for the tests of every file of this module.
#[cfg(test)]
const TWO_SHARDS: &str = r#"
        [[shards]]
        name = "a"
        url = "mysql://root:secret@127.0.0.1:3307/chatshard"
        buckets = ["0-511"]

        [[shards]]
        name = "b-2"
        url = "mysql://root@127.0.0.1:3308/chatshard"
        buckets = ["512-1023"]
    "#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_config_loads() -> crate::TestResult {
        let text = include_str!("../../config/chatshard.example.toml");
        let settings = Settings::from_toml(text, [])?;
        assert!(!settings.shards.is_empty());
        Ok(())
    }
}
