//! A deadpool manager for sqlx MySQL connections.
//!
//! Every new connection draws auto-increment ids from its shard's own series
//! (see `storage::server::prepare_session`) and runs in READ COMMITTED (and,
//! when configured, with a shorter `innodb_lock_wait_timeout`; see
//! `pool.lock_wait_timeout_secs`):
//! chatshard's write transactions
//! take explicit locks (`SELECT ... FOR UPDATE` on the chat row) and change
//! counters only with atomic `UPDATE ... SET x = x + ?`, so they need no snapshot,
//! and READ COMMITTED avoids the gap locks that REPEATABLE READ would take on the
//! member index (which could make one chat's writers block a neighbour chat's).
//!
//! Recycling rejects a connection left inside a transaction and pings one that
//! sat idle long enough for the server or a proxy to have dropped it; a busy
//! connection is handed out again without an extra round trip.

use std::time::Duration;

use deadpool::managed::{Manager, Metrics, RecycleError, RecycleResult};
use sqlx::mysql::MySqlConnectOptions;
use sqlx::{Connection, MySqlConnection};

/// Idle time after which a connection is pinged before reuse.
const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Creates and checks connections to one shard.
#[derive(Debug)]
pub struct MySqlManager {
    options: MySqlConnectOptions,
    /// `innodb_lock_wait_timeout` of each session; 0 keeps the server's.
    lock_wait_timeout_secs: u64,
    /// The shard's series of auto-increment ids.
    id_block: u16,
}

impl MySqlManager {
    pub fn new(options: MySqlConnectOptions, lock_wait_timeout_secs: u64, id_block: u16) -> Self {
        Self {
            options,
            lock_wait_timeout_secs,
            id_block,
        }
    }
}

impl Manager for MySqlManager {
    type Type = MySqlConnection;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<MySqlConnection, sqlx::Error> {
        let mut conn = MySqlConnection::connect_with(&self.options).await?;
        crate::storage::server::prepare_session(
            &mut conn,
            self.lock_wait_timeout_secs,
            self.id_block,
        )
        .await?;
        Ok(conn)
    }

    async fn recycle(
        &self,
        conn: &mut MySqlConnection,
        metrics: &Metrics,
    ) -> RecycleResult<sqlx::Error> {
        if conn.is_in_transaction() {
            return Err(RecycleError::message(
                "connection was left inside a transaction",
            ));
        }
        if metrics.last_used() >= PING_AFTER_IDLE {
            conn.ping().await?;
        }
        Ok(())
    }
}
