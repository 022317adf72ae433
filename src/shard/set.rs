//! Every configured shard plus the routing table.

use std::sync::Arc;

use super::Shard;
use crate::domain::ChatId;
use crate::routing::Router;

/// Every configured shard plus the routing table.
#[derive(Debug)]
pub struct ShardSet {
    shards: Vec<Arc<Shard>>,
    router: Router,
}

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
        Ok(Self { shards, router })
    }

    /// The shard that owns a chat.
    pub fn for_chat(&self, chat: &ChatId) -> &Arc<Shard> {
        &self.shards[self.router.shard_of(chat)]
    }

    pub fn all(&self) -> &[Arc<Shard>] {
        &self.shards
    }
}
