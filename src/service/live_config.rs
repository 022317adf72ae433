//! Changing the live configuration (`PUT` and `PATCH /v1/admin/config`,
//! docs/fleet.md): the use case behind the admin API's config endpoints.
//!
//! A change replaces the whole configuration or applies an RFC 7396 JSON
//! merge patch to the current one. Either way the result must name only
//! configured shards and pass [`LiveConfig::problems`]; otherwise nothing
//! changes and every problem is returned. A patch is applied under the live
//! configuration's writer lock ([`Live::update_with`]), so two concurrent
//! changes never lose one another. In a fleet, an accepted change is then
//! stored under the next fleet-wide version, which this instance takes too.
//!
//! What the caller's document must look like (its schema) is the caller's
//! business: it hands in the configuration, or a function that shapes one
//! from the patched document. Nothing here knows HTTP or a status code.
//!
//! [`Live::update_with`]: crate::live::Live::update_with

use std::sync::Arc;

use serde_json::Value;

use super::{ChatService, ServiceError};
use crate::live::{LiveConfig, Snapshot, UpdateError};

/// Why a live configuration change was refused; the current one stays.
#[derive(Debug)]
pub enum ConfigChangeError<E> {
    /// The patched document does not shape into a configuration (the
    /// caller's own error).
    Shape(E),
    /// The configuration breaks these rules.
    Invalid(Vec<String>),
    /// The current configuration could not be read as a document.
    Internal(ServiceError),
}

impl ChatService {
    /// The live configuration in use and its version.
    pub fn live_config(&self) -> Arc<Snapshot> {
        self.live.load()
    }

    /// Replaces the whole live configuration (`source` names the change in
    /// the logs); the configuration then in use, or every problem of the
    /// new one.
    pub async fn replace_live_config(
        &self,
        config: LiveConfig,
        source: &str,
    ) -> Result<Arc<Snapshot>, Vec<String>> {
        let result = self.live.update_with(source, |_| self.known_shards(config));
        match result {
            Ok(snapshot) => Ok(self.share_with_fleet(&snapshot, source).await),
            Err(UpdateError::Build(problems) | UpdateError::Invalid(problems)) => Err(problems),
        }
    }

    /// Applies an RFC 7396 JSON merge patch to the current live
    /// configuration: `shape` turns the patched document into a
    /// configuration (checking it against the caller's schema). The
    /// configuration then in use, or why the change was refused.
    pub async fn patch_live_config<E>(
        &self,
        patch: Value,
        source: &str,
        shape: impl FnOnce(Value) -> Result<LiveConfig, E>,
    ) -> Result<Arc<Snapshot>, ConfigChangeError<E>> {
        let result = self.live.update_with(source, |current| {
            let mut document = serde_json::to_value(current)
                .map_err(|e| ConfigChangeError::Internal(ServiceError::internal(e)))?;
            merge_patch(&mut document, patch);
            let config = shape(document).map_err(ConfigChangeError::Shape)?;
            self.known_shards(config)
                .map_err(ConfigChangeError::Invalid)
        });
        match result {
            Ok(snapshot) => Ok(self.share_with_fleet(&snapshot, source).await),
            Err(UpdateError::Build(e)) => Err(e),
            Err(UpdateError::Invalid(problems)) => Err(ConfigChangeError::Invalid(problems)),
        }
    }

    /// A configuration whose `isolation.shard` names no shard of this
    /// instance is refused.
    fn known_shards(&self, config: LiveConfig) -> Result<LiveConfig, Vec<String>> {
        let shard = &config.isolation.shard;
        if shard.is_empty() || self.shards.by_name(shard).is_some() {
            Ok(config)
        } else {
            Err(vec![format!(
                "isolation.shard {shard:?} is not a configured shard"
            )])
        }
    }

    /// In a fleet, a change made here is stored in Redis under the next
    /// fleet-wide version, which every instance then applies (and this one
    /// takes too). Waits at most `redis.timeout_ms`; without Redis the change
    /// stays local until Redis is back (see docs/fleet.md). Returns the
    /// configuration in use afterwards.
    async fn share_with_fleet(&self, snapshot: &Snapshot, source: &str) -> Arc<Snapshot> {
        if let Some(fleet) = &self.fleet
            && let Some(version) = fleet
                .share_config(snapshot.version.saturating_sub(1), &snapshot.config)
                .await
        {
            self.live.install(
                version,
                snapshot.config.clone(),
                &format!("{source} (fleet version)"),
            );
        }
        self.live.load()
    }
}

/// RFC 7396: members of `patch` replace those of `target`, objects merge
/// recursively, and `null` removes a member.
fn merge_patch(target: &mut Value, patch: Value) {
    let Value::Object(patch) = patch else {
        *target = patch;
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(fields) = target {
        for (name, value) in patch {
            if value.is_null() {
                fields.remove(&name);
            } else {
                merge_patch(fields.entry(name).or_insert(Value::Null), value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::merge_patch;

    #[test]
    fn a_merge_patch_replaces_merges_and_removes() {
        let mut target = json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1]});
        merge_patch(
            &mut target,
            json!({"a": null, "b": {"c": 4, "d": null}, "e": {"f": 5}}),
        );
        assert_eq!(target, json!({"b": {"c": 4}, "e": {"f": 5}}));
    }
}
