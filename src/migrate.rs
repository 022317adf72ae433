//! Schema migrations: the SQL files in `migrations/`, applied to every shard.
//!
//! The files are compiled into the binary, so `chatshard migrate` applies exactly
//! the schema this build expects. sqlx's migrator records each applied version
//! in `_sqlx_migrations` on each shard, takes a lock while it runs, and checks the
//! checksums of versions already applied; a rerun is a no-op.

use sqlx::migrate::{Migrate, Migrator};
use sqlx::mysql::MySqlConnectOptions;
use sqlx::{ConnectOptions, MySqlConnection};

use crate::config::ShardSettings;

/// The migrations of this build.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// One shard's schema state.
#[derive(Debug, Clone)]
pub struct ShardSchema {
    pub shard: String,
    pub address: String,
    /// Versions applied on the shard, ascending.
    pub applied: Vec<i64>,
    /// Versions of this build not yet applied.
    pub pending: Vec<i64>,
}

impl std::fmt::Display for ShardSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let latest = self
            .applied
            .last()
            .map_or("none".to_owned(), i64::to_string);
        write!(
            f,
            "{} ({}): version {latest}, {} applied, {} pending",
            self.shard,
            self.address,
            self.applied.len(),
            self.pending.len()
        )?;
        if !self.pending.is_empty() {
            write!(f, " {:?}", self.pending)?;
        }
        Ok(())
    }
}

async fn connect(shard: &ShardSettings) -> anyhow::Result<MySqlConnection> {
    let options: MySqlConnectOptions = shard
        .url
        .parse()
        .map_err(|e| anyhow::anyhow!("shard {}: invalid url: {e}", shard.name))?;
    options.connect().await.map_err(|e| {
        anyhow::anyhow!(
            "shard {} ({}): cannot connect: {e}",
            shard.name,
            shard.redacted_url()
        )
    })
}

/// Applies pending migrations to one shard.
pub async fn migrate_shard(shard: &ShardSettings) -> anyhow::Result<ShardSchema> {
    let mut conn = connect(shard).await?;
    MIGRATOR
        .run(&mut conn)
        .await
        .map_err(|e| anyhow::anyhow!("shard {}: migration failed: {e}", shard.name))?;
    status_on(shard, &mut conn).await
}

/// Reads one shard's applied versions.
pub async fn shard_status(shard: &ShardSettings) -> anyhow::Result<ShardSchema> {
    let mut conn = connect(shard).await?;
    status_on(shard, &mut conn).await
}

async fn status_on(
    shard: &ShardSettings,
    conn: &mut MySqlConnection,
) -> anyhow::Result<ShardSchema> {
    conn.ensure_migrations_table(&MIGRATOR.table_name)
        .await
        .map_err(|e| anyhow::anyhow!("shard {}: {e}", shard.name))?;
    let applied: Vec<i64> = conn
        .list_applied_migrations(&MIGRATOR.table_name)
        .await
        .map_err(|e| anyhow::anyhow!("shard {}: {e}", shard.name))?
        .into_iter()
        .map(|m| m.version)
        .collect();
    let pending = MIGRATOR
        .iter()
        .map(|m| m.version)
        .filter(|v| !applied.contains(v))
        .collect();
    Ok(ShardSchema {
        shard: shard.name.clone(),
        address: shard.redacted_url(),
        applied,
        pending,
    })
}
