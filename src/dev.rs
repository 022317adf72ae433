//! `chatshard serve --dev`: local MariaDB shards, started and stopped with the
//! service.
//!
//! Each shard is a `mariadbd` with its own data dir under `<root>/dev/shard-N`
//! (kept between runs, so a second run finds its chats again) and its own
//! 127.0.0.1 port, configured with `innodb_autoinc_lock_mode=2` and
//! `innodb_flush_log_at_trx_commit=1` like a production shard should be. The
//! shards are shut down cleanly with the service; if the service dies
//! without that, a watchdog per server still shuts it down.

use std::path::Path;

use crate::config::ShardSettings;
use crate::localdb::{DEFAULT_DATABASE, LocalMariaDb, LocalMariaDbOptions};
use crate::routing::BucketRange;

/// The running local shards.
pub struct DevShards {
    servers: Vec<LocalMariaDb>,
}

impl DevShards {
    /// Starts `n` shards under `root` (in parallel) and returns their settings,
    /// with the buckets split evenly.
    pub async fn start(root: &Path, n: usize) -> anyhow::Result<(Self, Vec<ShardSettings>)> {
        let n = n.clamp(1, 64);
        let starts = (0..n).map(|i| {
            let dir = root.join("dev").join(format!("shard-{i}"));
            LocalMariaDb::start(LocalMariaDbOptions::dev(dir, 0))
        });
        let mut servers = Vec::with_capacity(n);
        let mut failures = Vec::new();
        for result in futures_util::future::join_all(starts).await {
            match result {
                Ok(server) => servers.push(server),
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        if !failures.is_empty() {
            let mut started = Self { servers };
            started.stop().await;
            anyhow::bail!(
                "could not start the local shards:\n  - {}",
                failures.join("\n  - ")
            );
        }
        let settings = servers
            .iter()
            .zip(BucketRange::even_split(n))
            .enumerate()
            .map(|(i, (server, range))| ShardSettings {
                name: format!("shard-{i}"),
                url: server.url(DEFAULT_DATABASE),
                buckets: vec![range.to_string()],
            })
            .collect();
        Ok((Self { servers }, settings))
    }

    /// Shuts every shard down cleanly, logging failures.
    pub async fn stop(&mut self) {
        for server in &mut self.servers {
            if let Err(e) = server.stop().await {
                tracing::warn!(data_dir = %server.data_dir().display(), error = %format!("{e:#}"), "local shard did not stop cleanly");
            }
        }
    }
}
