//! Shard access: the only place that knows there are N databases.
//!
//! A [`Shard`] is one MySQL server behind its own protections. The order, in
//! [`Shard::run`], each step cheaper than the next and each refusing at once
//! rather than queueing without bound:
//!
//! 1. the circuit breaker ([`breaker`]): while the shard is known broken, refuse
//!    without touching the network or taking any slot (`ShardError::Open`);
//! 2. the chat's share ([`share`]): one chat holds at most `chat_share` of the
//!    shard's slots, so a hot chat cannot starve the shard's other chats
//!    (`ShardError::ChatBusy`);
//! 3. admission: at most `max_concurrent + max_waiting` callers in flight or
//!    waiting; one more is refused at once (`ShardError::Busy`) since deadpool
//!    does not bound its waiters;
//! 4. the pool (deadpool, the bulkhead): a connection within what is left of
//!    `max_wait`, or `ShardError::Busy`;
//! 5. the deadline around the database work: a hung server costs a caller at
//!    most `operation_timeout`, and the connection, whose state is then unknown,
//!    is discarded rather than returned to the pool.
//!
//! The outcome then feeds the breaker: see [`breaker`] for what counts.
//! Bound each queue in exactly one place: there is no other pool beneath this one.

pub mod breaker;
mod manager;
pub mod share;
pub mod stats;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use deadpool::managed::{Object, Pool, PoolError, TimeoutType, Timeouts};
use sqlx::MySqlConnection;
use sqlx::mysql::MySqlConnectOptions;
use tokio::sync::Semaphore;
use tracing::Instrument as _;

use crate::config::{BreakerSettings, PoolSettings, ShardSettings};
use crate::domain::ChatId;
use crate::routing::Router;

pub use breaker::{Breaker, BreakerState};
pub use manager::MySqlManager;
use share::ChatShares;
use stats::ShardStats;

/// A future borrowing a connection, as handed to [`Shard::read`] / [`Shard::write`].
pub type BoxFuture<'c, T> = Pin<Box<dyn Future<Output = T> + Send + 'c>>;

/// Why a shard operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// The circuit breaker is open: the shard is known broken.
    #[error("shard {shard} is unavailable (circuit breaker open)")]
    Open {
        shard: String,
        retry_after_secs: u64,
    },
    /// The chat already holds its share of the shard.
    #[error("chat holds its whole share of shard {shard}")]
    ChatBusy { shard: String },
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
            Self::Open { shard, .. }
            | Self::ChatBusy { shard }
            | Self::Busy { shard }
            | Self::Timeout { shard, .. }
            | Self::Unavailable { shard, .. }
            | Self::ReadOnly { shard, .. }
            | Self::OutcomeUnknown { shard, .. }
            | Self::Database { shard, .. } => shard,
        }
    }

    /// A stable name of the error, for telemetry.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Open { .. } => "breaker_open",
            Self::ChatBusy { .. } => "chat_busy",
            Self::Busy { .. } => "shard_busy",
            Self::Timeout { .. } => "timeout",
            Self::Unavailable { .. } => "unavailable",
            Self::ReadOnly { .. } => "read_only",
            Self::OutcomeUnknown { .. } => "outcome_unknown",
            Self::Database { .. } => "database",
        }
    }

    /// Whether the breaker counts this as a failure of the shard (connection
    /// class, deadline overrun, unknown outcome); see [`breaker`].
    pub fn counts_against_shard(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::Unavailable { .. } | Self::OutcomeUnknown { .. } => true,
            Self::Open { .. }
            | Self::ChatBusy { .. }
            | Self::Busy { .. }
            | Self::ReadOnly { .. }
            | Self::Database { .. } => false,
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

/// The InnoDB settings chatshard relies on, as read from a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InnodbSettings {
    pub autoinc_lock_mode: i64,
    pub flush_log_at_trx_commit: i64,
}

impl InnodbSettings {
    pub fn is_safe(self) -> bool {
        self.autoinc_lock_mode == 2 && self.flush_log_at_trx_commit == 1
    }
}

/// One MySQL shard behind its breaker and bulkhead.
pub struct Shard {
    name: String,
    address: String,
    host: String,
    port: u16,
    database: String,
    operation_seconds: opentelemetry::metrics::Histogram<f64>,
    pool: Pool<MySqlManager>,
    breaker: Breaker,
    shares: Arc<ChatShares>,
    admission: Arc<Semaphore>,
    settings: PoolSettings,
    stats: ShardStats,
    innodb: Mutex<Option<InnodbSettings>>,
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
    pub fn new(
        settings: &ShardSettings,
        pool: &PoolSettings,
        breaker: &BreakerSettings,
        operation_seconds: opentelemetry::metrics::Histogram<f64>,
    ) -> anyhow::Result<Self> {
        let options: MySqlConnectOptions = settings
            .url
            .parse()
            .map_err(|e| anyhow::anyhow!("shard {}: invalid url: {e}", settings.name))?;
        let (host, port) = (options.get_host().to_owned(), options.get_port());
        let database = options.get_database().unwrap_or_default().to_owned();
        let address = format!("{host}:{port}");
        let built = Pool::builder(MySqlManager::new(options))
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
            host,
            port,
            database,
            operation_seconds,
            pool: built,
            breaker: Breaker::new(&settings.name, breaker),
            shares: ChatShares::new(pool.per_chat_concurrent(), pool.per_chat_waiting()),
            admission: Arc::new(Semaphore::new(pool.max_concurrent + pool.max_waiting)),
            settings: pool.clone(),
            stats: ShardStats::default(),
            innodb: Mutex::new(None),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `host:port` of the server.
    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    pub fn stats(&self) -> &ShardStats {
        &self.stats
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    /// Callers holding an admission permit: in flight plus waiting.
    pub fn admitted(&self) -> usize {
        (self.settings.max_concurrent + self.settings.max_waiting)
            - self.admission.available_permits()
    }

    /// The InnoDB settings last read from the shard.
    pub fn innodb(&self) -> Option<InnodbSettings> {
        *self.innodb.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn set_innodb(&self, settings: InnodbSettings) {
        *self.innodb.lock().unwrap_or_else(PoisonError::into_inner) = Some(settings);
    }

    /// Runs a read for `chat` (or for the shard itself when `None`). A timeout
    /// or lost connection means nothing was changed.
    pub async fn read<T, F>(
        &self,
        chat: Option<&ChatId>,
        name: &'static str,
        op: F,
    ) -> Result<T, ShardError>
    where
        F: for<'c> FnOnce(&'c mut MySqlConnection) -> BoxFuture<'c, Result<T, OpError>>,
    {
        self.run(Access::Read, chat, name, op).await
    }

    /// Runs a write transaction. A timeout, or a lost connection during COMMIT,
    /// is reported as [`ShardError::OutcomeUnknown`]: every write of chatshard is
    /// idempotent by a unique key, so the caller may retry it safely.
    pub async fn write<T, F>(
        &self,
        chat: Option<&ChatId>,
        name: &'static str,
        op: F,
    ) -> Result<T, ShardError>
    where
        F: for<'c> FnOnce(&'c mut MySqlConnection) -> BoxFuture<'c, Result<T, OpError>>,
    {
        self.run(Access::Write, chat, name, op).await
    }

    /// One client span per operation, following the database semantic
    /// conventions, around the protections.
    async fn run<T, F>(
        &self,
        access: Access,
        chat: Option<&ChatId>,
        name: &'static str,
        op: F,
    ) -> Result<T, ShardError>
    where
        F: for<'c> FnOnce(&'c mut MySqlConnection) -> BoxFuture<'c, Result<T, OpError>>,
    {
        let span = tracing::info_span!(
            "db",
            otel.name = %format_args!("{name} {}", self.database),
            otel.kind = "client",
            db.system.name = "mysql",
            db.namespace = %self.database,
            db.operation.name = name,
            server.address = %self.host,
            server.port = self.port,
            chatshard.shard = %self.name,
            chatshard.breaker.state = self.breaker.state().as_str(),
            chatshard.bulkhead.wait_ms = tracing::field::Empty,
            chatshard.bulkhead.in_flight = tracing::field::Empty,
            db.operation.batch.size = tracing::field::Empty,
            error.type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let started = Instant::now();
        let result = self
            .protected(access, chat, op)
            .instrument(span.clone())
            .await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => {
                span.record("error.type", e.code());
                if e.counts_against_shard() || matches!(e, ShardError::Database { .. }) {
                    span.record("otel.status_code", "ERROR");
                }
                e.code()
            }
        };
        self.operation_seconds.record(
            started.elapsed().as_secs_f64(),
            &[
                opentelemetry::KeyValue::new("shard", self.name.clone()),
                opentelemetry::KeyValue::new("operation", name),
                opentelemetry::KeyValue::new("outcome", outcome),
            ],
        );
        result
    }

    /// The order of protections; see the module docs.
    async fn protected<T, F>(
        &self,
        access: Access,
        chat: Option<&ChatId>,
        op: F,
    ) -> Result<T, ShardError>
    where
        F: for<'c> FnOnce(&'c mut MySqlConnection) -> BoxFuture<'c, Result<T, OpError>>,
    {
        let start = Instant::now();
        let wait_until = start + self.settings.max_wait();
        // 1. The breaker: a broken shard costs its callers nothing.
        let Some(_probe) = self.breaker.admit() else {
            self.stats
                .rejected_open
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(reason = "breaker_open", "bulkhead_rejected");
            return Err(ShardError::Open {
                shard: self.name.clone(),
                retry_after_secs: self.breaker.retry_after_secs(),
            });
        };
        // 2. The chat's share of the shard.
        let _chat_slot = match chat {
            Some(chat) => Some(
                self.shares
                    .acquire(chat, self.settings.max_wait())
                    .await
                    .map_err(|_| {
                        self.stats
                            .rejected_chat_busy
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::debug!(reason = "chat_busy", "bulkhead_rejected");
                        ShardError::ChatBusy {
                            shard: self.name.clone(),
                        }
                    })?,
            ),
            None => None,
        };
        let result = self.run_admitted(access, start, wait_until, op).await;
        self.record(&result);
        result
    }

    /// Steps 3 to 5, once the breaker and the chat's share let the caller in.
    async fn run_admitted<T, F>(
        &self,
        access: Access,
        start: Instant,
        wait_until: Instant,
        op: F,
    ) -> Result<T, ShardError>
    where
        F: for<'c> FnOnce(&'c mut MySqlConnection) -> BoxFuture<'c, Result<T, OpError>>,
    {
        // 3. Admission: refuse at once rather than queue without bound.
        let _permit = self
            .admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| self.busy())?;
        // 4. The pool, within what is left of the caller's bounded wait.
        let timeouts = Timeouts {
            wait: Some(wait_until.saturating_duration_since(Instant::now())),
            create: Some(self.settings.connect_timeout()),
            recycle: Some(self.settings.connect_timeout()),
        };
        let mut conn = self
            .pool
            .timeout_get(&timeouts)
            .await
            .map_err(|e| self.pool_error(e))?;
        let _in_flight = self.stats.start();
        let span = tracing::Span::current();
        span.record(
            "chatshard.bulkhead.wait_ms",
            start.elapsed().as_secs_f64() * 1000.0,
        );
        span.record(
            "chatshard.bulkhead.in_flight",
            self.stats.in_flight() as u64,
        );
        // 5. The deadline around the database work.
        let deadline = self.settings.operation_timeout();
        match tokio::time::timeout(deadline, op(&mut conn)).await {
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
                        deadline,
                    },
                    Access::Write => ShardError::OutcomeUnknown {
                        shard: self.name.clone(),
                        cause: format!("no answer within {deadline:?}"),
                    },
                })
            }
        }
    }

    /// Feeds an outcome to the breaker and the stats.
    fn record<T>(&self, result: &Result<T, ShardError>) {
        match result {
            Ok(_) => {
                self.breaker.record_success();
                self.stats.record_ok();
            }
            Err(e) if e.counts_against_shard() => {
                let reason = crate::service::error_chain(e);
                self.breaker.record_failure(&reason);
                self.stats.record_failure(reason);
            }
            Err(e @ (ShardError::ReadOnly { .. } | ShardError::Database { .. })) => {
                // The shard answered: not its outage, but worth showing.
                self.stats.record_failure(crate::service::error_chain(e));
            }
            Err(_) => {}
        }
    }

    fn busy(&self) -> ShardError {
        self.stats
            .rejected_busy
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(reason = "shard_busy", "bulkhead_rejected");
        ShardError::Busy {
            shard: self.name.clone(),
        }
    }

    fn pool_error(&self, e: PoolError<sqlx::Error>) -> ShardError {
        match e {
            PoolError::Timeout(TimeoutType::Wait) => self.busy(),
            PoolError::Timeout(_) => ShardError::Timeout {
                shard: self.name.clone(),
                deadline: self.settings.connect_timeout(),
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

    /// Checks that the shard answers, through the breaker and the bulkhead.
    pub async fn ping(&self) -> Result<(), ShardError> {
        self.read(None, "ping", |c| {
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
