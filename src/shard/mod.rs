//! Shard access: the only place that knows there are N databases.
//!
//! A [`Shard`] is one MySQL server reached through its own bulkhead: a deadpool
//! pool of at most `max_concurrent` connections, in front of which an admission
//! semaphore of `max_concurrent + max_waiting` permits bounds the callers that may
//! wait (deadpool itself does not bound its waiters). Every operation runs under a
//! deadline. The order of protections, in [`Shard::run`]:
//!
//! 1. admission: a caller that finds `max_waiting` others already waiting is
//!    refused at once (`ShardError::Busy`): nothing queues without bound;
//! 2. the pool: a connection within `max_wait`, or `ShardError::Busy`;
//! 3. the deadline around the database work: a hung server costs a caller at
//!    most `operation_timeout`, and the connection, whose state is then unknown,
//!    is discarded rather than returned to the pool.
//!
//! Bound each queue in exactly one place: there is no other pool beneath this one.

mod manager;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use deadpool::managed::{Object, Pool, PoolError, TimeoutType};
use sqlx::MySqlConnection;
use sqlx::mysql::MySqlConnectOptions;
use tokio::sync::Semaphore;

use crate::config::{PoolSettings, ShardSettings};
use crate::domain::ChatId;
use crate::routing::Router;

pub use manager::MySqlManager;

/// A future borrowing a connection, as handed to [`Shard::read`] / [`Shard::write`].
pub type BoxFuture<'c, T> = Pin<Box<dyn Future<Output = T> + Send + 'c>>;

/// Why a shard operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// The bulkhead is full: too many callers in flight and waiting.
    #[error("shard {shard} is busy")]
    Busy { shard: String },
    /// The shard did not answer within the operation deadline.
    #[error("shard {shard} did not answer within {deadline:?}")]
    Timeout { shard: String, deadline: Duration },
    /// No connection to the shard could be made or kept.
    #[error("shard {shard} is unavailable")]
    Unavailable {
        shard: String,
        #[source]
        source: sqlx::Error,
    },
    /// The shard refuses writes (`read_only`).
    #[error("shard {shard} is read-only")]
    ReadOnly {
        shard: String,
        #[source]
        source: sqlx::Error,
    },
    /// A write's outcome is unknown: the connection failed while committing.
    #[error("the outcome of a write on shard {shard} is unknown")]
    OutcomeUnknown { shard: String, cause: String },
    /// Any other database error (a bug, or a schema that does not match).
    #[error("database error on shard {shard}")]
    Database {
        shard: String,
        #[source]
        source: sqlx::Error,
    },
}

impl ShardError {
    /// The shard the error came from.
    pub fn shard(&self) -> &str {
        match self {
            Self::Busy { shard }
            | Self::Timeout { shard, .. }
            | Self::Unavailable { shard, .. }
            | Self::ReadOnly { shard, .. }
            | Self::OutcomeUnknown { shard, .. }
            | Self::Database { shard, .. } => shard,
        }
    }
}

/// An error raised inside an operation.
#[derive(Debug)]
pub enum OpError {
    /// A statement failed.
    Sql(sqlx::Error),
    /// COMMIT itself failed: the transaction may or may not have been applied.
    Commit(sqlx::Error),
}

impl From<sqlx::Error> for OpError {
    fn from(e: sqlx::Error) -> Self {
        Self::Sql(e)
    }
}

/// Whether an operation changes data; decides what a timeout means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

/// One MySQL shard behind its bulkhead.
pub struct Shard {
    name: String,
    address: String,
    pool: Pool<MySqlManager>,
    admission: Arc<Semaphore>,
    deadline: Duration,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("name", &self.name)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Shard {
    /// Builds the shard's pool; connects lazily.
    pub fn new(settings: &ShardSettings, pool: &PoolSettings) -> anyhow::Result<Self> {
        let options: MySqlConnectOptions = settings
            .url
            .parse()
            .map_err(|e| anyhow::anyhow!("shard {}: invalid url: {e}", settings.name))?;
        let address = format!("{}:{}", options.get_host(), options.get_port());
        let manager = MySqlManager::new(options);
        let built = Pool::builder(manager)
            .max_size(pool.max_concurrent)
            .wait_timeout(Some(pool.max_wait()))
            .create_timeout(Some(pool.connect_timeout()))
            .recycle_timeout(Some(pool.connect_timeout()))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| anyhow::anyhow!("shard {}: {e}", settings.name))?;
        Ok(Self {
            name: settings.name.clone(),
            address,
            pool: built,
            admission: Arc::new(Semaphore::new(pool.max_concurrent + pool.max_waiting)),
            deadline: pool.operation_timeout(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `host:port` of the server.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Runs a read. A timeout or lost connection means nothing was changed.
    pub async fn read<T, F>(&self, op: F) -> Result<T, ShardError>
    where
        F: for<'c> FnOnce(&'c mut MySqlConnection) -> BoxFuture<'c, Result<T, OpError>>,
    {
        self.run(Access::Read, op).await
    }

    /// Runs a write transaction. A timeout, or a lost connection during COMMIT,
    /// is reported as [`ShardError::OutcomeUnknown`]: every write of chatshard is
    /// idempotent by a unique key, so the caller may retry it safely.
    pub async fn write<T, F>(&self, op: F) -> Result<T, ShardError>
    where
        F: for<'c> FnOnce(&'c mut MySqlConnection) -> BoxFuture<'c, Result<T, OpError>>,
    {
        self.run(Access::Write, op).await
    }

    /// The order of protections; see the module docs.
    async fn run<T, F>(&self, access: Access, op: F) -> Result<T, ShardError>
    where
        F: for<'c> FnOnce(&'c mut MySqlConnection) -> BoxFuture<'c, Result<T, OpError>>,
    {
        // 1. Admission: refuse at once rather than queue without bound.
        let _permit = self
            .admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| self.busy())?;
        // 2. The pool: a connection within `max_wait`.
        let mut conn = self.pool.get().await.map_err(|e| self.pool_error(e))?;
        // 3. The deadline around the database work.
        match tokio::time::timeout(self.deadline, op(&mut conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                let err = self.classify(err);
                if !matches!(
                    err,
                    ShardError::Database { .. } | ShardError::ReadOnly { .. }
                ) {
                    discard(conn);
                }
                Err(err)
            }
            Err(_elapsed) => {
                // The connection is mid-protocol: never reuse it.
                discard(conn);
                Err(match access {
                    Access::Read => ShardError::Timeout {
                        shard: self.name.clone(),
                        deadline: self.deadline,
                    },
                    Access::Write => ShardError::OutcomeUnknown {
                        shard: self.name.clone(),
                        cause: format!("no answer within {:?}", self.deadline),
                    },
                })
            }
        }
    }

    fn busy(&self) -> ShardError {
        ShardError::Busy {
            shard: self.name.clone(),
        }
    }

    fn pool_error(&self, e: PoolError<sqlx::Error>) -> ShardError {
        match e {
            PoolError::Timeout(TimeoutType::Wait) => self.busy(),
            PoolError::Timeout(_) => ShardError::Timeout {
                shard: self.name.clone(),
                deadline: self.deadline,
            },
            PoolError::Backend(source) => ShardError::Unavailable {
                shard: self.name.clone(),
                source,
            },
            PoolError::Closed | PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => {
                ShardError::Unavailable {
                    shard: self.name.clone(),
                    source: sqlx::Error::PoolClosed,
                }
            }
        }
    }

    fn classify(&self, err: OpError) -> ShardError {
        let shard = self.name.clone();
        match err {
            OpError::Commit(e) if is_connection_error(&e) => ShardError::OutcomeUnknown {
                shard,
                cause: e.to_string(),
            },
            OpError::Commit(e) | OpError::Sql(e) => {
                if is_read_only_error(&e) {
                    ShardError::ReadOnly { shard, source: e }
                } else if is_connection_error(&e) {
                    // Before COMMIT was sent, a lost connection rolls the
                    // transaction back: nothing was applied.
                    ShardError::Unavailable { shard, source: e }
                } else {
                    ShardError::Database { shard, source: e }
                }
            }
        }
    }

    /// Pool occupancy, for the readiness and admin views.
    pub fn status(&self) -> deadpool::Status {
        self.pool.status()
    }

    /// Checks that the shard answers, through the bulkhead.
    pub async fn ping(&self) -> Result<(), ShardError> {
        self.read(|c| {
            Box::pin(async move {
                sqlx::Connection::ping(c).await?;
                Ok(())
            })
        })
        .await
    }
}

/// Removes a connection from the pool; dropping it closes the socket.
fn discard(conn: Object<MySqlManager>) {
    drop(Object::take(conn));
}

/// Connection-class failures: the server or the network, not the request.
pub fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        // Too many connections, server shutdown, lock wait timeout, query
        // interrupted, connection killed (MariaDB), statement time exceeded (MySQL).
        sqlx::Error::Database(db) => db_error_number(db.as_ref())
            .is_some_and(|n| matches!(n, 1040 | 1053 | 1205 | 1317 | 1927 | 3024)),
        _ => false,
    }
}

/// `ER_OPTION_PREVENTS_STATEMENT` (1290) and `ER_READ_ONLY_MODE` (1836).
pub fn is_read_only_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            db_error_number(db.as_ref()).is_some_and(|n| matches!(n, 1290 | 1836))
        }
        _ => false,
    }
}

/// `ER_LOCK_DEADLOCK` (1213): the whole transaction was rolled back and may be
/// run again.
pub fn is_deadlock(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db_error_number(db.as_ref()) == Some(1213),
        _ => false,
    }
}

fn db_error_number(db: &dyn sqlx::error::DatabaseError) -> Option<u16> {
    db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
        .map(|e| e.number())
}

/// Every configured shard plus the routing table.
#[derive(Debug)]
pub struct ShardSet {
    shards: Vec<Arc<Shard>>,
    router: Router,
}

impl ShardSet {
    pub fn new(shards: Vec<Arc<Shard>>, router: Router) -> Self {
        Self { shards, router }
    }

    /// The shard that owns a chat.
    pub fn for_chat(&self, chat: &ChatId) -> &Arc<Shard> {
        &self.shards[self.router.shard_of(chat)]
    }

    pub fn all(&self) -> &[Arc<Shard>] {
        &self.shards
    }
}
