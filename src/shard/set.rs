//! Every configured shard plus the routing table.

use std::sync::Arc;

use super::Shard;
use crate::domain::ChatId;
use crate::routing::{BucketMap, Router};

/// Every configured shard plus the routing table, and the chats known to be
/// held elsewhere than their bucket says (moved, docs/moving-chats.md).
pub struct ShardSet {
    shards: Vec<Arc<Shard>>,
    /// The bucket table this instance routes by, and its version (1: the
    /// configuration's; later ones are read from the shards,
    /// docs/moving-chats.md).
    router: arc_swap::ArcSwap<(u64, Router)>,
    /// Chat -> index of the shard that holds it, learnt from the shards'
    /// markers; bounded, and a chat forgotten here is found again through its
    /// home shard's marker.
    moved: moka::sync::Cache<ChatId, usize>,
}

impl std::fmt::Debug for ShardSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardSet")
            .field("shards", &self.shards)
            .field("bucket_map_version", &self.map_version())
            .field("moved", &self.moved.entry_count())
            .finish()
    }
}

/// Moved chats remembered at once.
const MOVED_CHATS: u64 = 100_000;

impl ShardSet {
    /// Refuses a router that sends a bucket to a shard the list does not have,
    /// so that [`Self::for_chat`] can never index out of bounds later.
    pub fn new(shards: Vec<Arc<Shard>>, router: Router) -> anyhow::Result<Self> {
        if router.highest_shard() >= shards.len() {
            anyhow::bail!(
                "the routing table names shard #{} but only {} shard(s) are configured",
                router.highest_shard(),
                shards.len()
            );
        }
        Ok(Self {
            shards,
            router: arc_swap::ArcSwap::from_pointee((1, router)),
            moved: moka::sync::Cache::new(MOVED_CHATS),
        })
    }

    /// The shard that holds a chat: where it moved to, if known, else the
    /// owner of its bucket.
    pub fn for_chat(&self, chat: &ChatId) -> &Arc<Shard> {
        let i = self
            .moved
            .get(chat)
            .unwrap_or_else(|| self.router.load().1.shard_of(chat));
        &self.shards[i]
    }

    /// The version of the bucket table this instance routes by.
    pub fn map_version(&self) -> u64 {
        self.router.load().0
    }

    /// The bucket table this instance routes by, with its version.
    pub fn router(&self) -> Arc<(u64, Router)> {
        self.router.load_full()
    }

    /// The configured shards' names, in their order.
    pub fn names(&self) -> Vec<&str> {
        self.shards.iter().map(|s| s.name()).collect()
    }

    /// Routes by `map` from now on, if `version` is newer than the table in
    /// use; `Ok(false)` when it is not. Refused (and the table in use kept)
    /// when the map names a shard that is not configured or does not cover
    /// every bucket once.
    pub fn adopt_map(&self, version: u64, map: &BucketMap) -> Result<bool, String> {
        if version <= self.map_version() {
            return Ok(false);
        }
        let router = map.router(&self.names()).map_err(|p| {
            format!(
                "bucket map version {version} cannot be followed: {}",
                p.join("; ")
            )
        })?;
        let mut adopted = false;
        self.router.rcu(|current| {
            adopted = version > current.0;
            if adopted {
                Arc::new((version, router.clone()))
            } else {
                current.clone()
            }
        });
        Ok(adopted)
    }

    /// The configured shard named `name`.
    pub fn by_name(&self, name: &str) -> Option<&Arc<Shard>> {
        self.index_of(name).map(|i| &self.shards[i])
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.shards.iter().position(|s| s.name() == name)
    }

    /// The shard that owns the chat's bucket (its home, where its marker is
    /// when it moved away).
    pub fn home_of(&self, chat: &ChatId) -> &Arc<Shard> {
        &self.shards[self.router.load().1.shard_of(chat)]
    }

    /// Records that `chat` is held by the shard named `to` (a shard's marker
    /// said so); `false` when no configured shard has that name.
    pub fn relocate(&self, chat: &ChatId, to: &str) -> bool {
        let Some(i) = self.index_of(to) else {
            return false;
        };
        if i == self.router.load().1.shard_of(chat) {
            // Back home: the bucket says it.
            self.moved.invalidate(chat);
        } else {
            self.moved.insert(chat.clone(), i);
        }
        true
    }

    pub fn all(&self) -> &[Arc<Shard>] {
        &self.shards
    }
}
