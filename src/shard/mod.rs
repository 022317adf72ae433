//! Shard access: the only place that knows there are N databases.
//!
//! A [`Shard`] is one MySQL server behind its own protections. The order, in
//! [`Shard::run`], each step cheaper than the next and each refusing at once
//! rather than queueing without bound:
//!
//! 1. the circuit breaker ([`breaker`]): while the shard is known broken, refuse
//!    without touching the network or taking any slot (`ShardError::Open`);
//! 2. the chat's share ([`share`]): one chat holds at most `chat_share` of the
//!    shard's slots and waiting places, so a hot chat cannot starve the
//!    shard's other chats (`ShardError::ChatBusy`);
//! 3. admission: at most `max_concurrent + max_waiting` callers in flight or
//!    waiting; one more is refused at once (`ShardError::Busy`) since deadpool
//!    does not bound its waiters;
//! 4. the pool (deadpool, the bulkhead): a connection within what is left of
//!    `max_wait`, or `ShardError::Busy`;
//! 5. the deadline around the database work: a hung server costs a caller at
//!    most `operation_timeout`, and the connection, whose state is then unknown,
//!    is discarded rather than returned to the pool.
//!
//! The outcome then feeds the breaker: see [`breaker`] for what counts, and
//! [`error`] for how a driver error is classified (the shard's failure, one
//! chat's contention, or neither). Bound each queue in exactly one place: there
//! is no other pool beneath this one.
//!
//! Outside this module the shard is seen through [`ShardStatus`] snapshots and
//! the [`Instruments`] it records into; its counters and pool stay private.

mod breaker;
pub mod error;
mod manager;
mod set;
mod share;
mod stats;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use deadpool::managed::{Object, Pool, PoolError, TimeoutType, Timeouts};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use sqlx::MySqlConnection;
use sqlx::mysql::MySqlConnectOptions;
use tokio::sync::Semaphore;
use tracing::Instrument as _;

use crate::config::{BreakerSettings, PoolSettings, ShardSettings};
use crate::domain::ChatId;

pub use breaker::{Breaker, BreakerState};
pub use error::{
    BadData, OUTCOMES, OpError, OutcomeCause, ShardError, is_connection_error, is_deadlock,
    is_lock_contention, is_read_only_error,
};
use manager::MySqlManager;
pub use set::ShardSet;
use share::ChatShares;
pub use stats::{RECENT_SECS, Rejections, ShardStatus};
use stats::{Refusal, ShardStats};

/// A future borrowing a connection, as handed to [`Shard::read`] / [`Shard::write`].
pub type BoxFuture<'c, T> = Pin<Box<dyn Future<Output = T> + Send + 'c>>;

/// What every shard records its operations into.
#[derive(Debug, Clone)]
pub struct Instruments {
    /// Duration of the operations that reached the database, by shard,
    /// operation and outcome. Refusals are not in it: a refused call's
    /// sub-millisecond answer would hide a hung shard's latency.
    pub operation_seconds: Histogram<f64>,
    /// Every operation by shard and outcome (one of [`OUTCOMES`]), refusals
    /// included; each series exists from the start, at zero.
    pub operations: Counter<u64>,
}

impl Instruments {
    /// Instruments that record nothing (for commands other than `serve`).
    pub fn unmeasured() -> Self {
        let meter = opentelemetry::global::meter("chatshard-unmeasured");
        Self {
            operation_seconds: meter.f64_histogram("unmeasured").build(),
            operations: meter.u64_counter("unmeasured").build(),
        }
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
    /// The URL without its secrets (`ShardSettings::redacted_url`).
    url: String,
    host: String,
    port: u16,
    database: String,
    instruments: Instruments,
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
    /// Builds the shard's pool; connects lazily. `id_block` picks the
    /// shard's series of auto-increment ids (see [`Settings::id_blocks`]).
    ///
    /// [`Settings::id_blocks`]: crate::config::Settings::id_blocks
    pub fn new(
        settings: &ShardSettings,
        id_block: u16,
        pool: &PoolSettings,
        breaker: &BreakerSettings,
        instruments: Instruments,
    ) -> anyhow::Result<Self> {
        let options: MySqlConnectOptions = settings
            .url
            .parse()
            .map_err(|e| anyhow::anyhow!("shard {}: invalid url: {e}", settings.name))?;
        let (host, port) = (options.get_host().to_owned(), options.get_port());
        let database = options.get_database().unwrap_or_default().to_owned();
        let address = format!("{host}:{port}");
        let built = Pool::builder(MySqlManager::new(
            options,
            pool.lock_wait_timeout_secs,
            id_block,
        ))
        .max_size(pool.max_concurrent)
        .wait_timeout(Some(pool.max_wait()))
        .create_timeout(Some(pool.connect_timeout()))
        .recycle_timeout(Some(pool.connect_timeout()))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .map_err(|e| anyhow::anyhow!("shard {}: {e}", settings.name))?;
        // Every outcome series exists from the start, so a rate over it sees
        // its first increment.
        for outcome in OUTCOMES {
            instruments.operations.add(
                0,
                &[
                    KeyValue::new("shard", settings.name.clone()),
                    KeyValue::new("outcome", outcome),
                ],
            );
        }
        Ok(Self {
            name: settings.name.clone(),
            address,
            url: settings.redacted_url(),
            host,
            port,
            database,
            instruments,
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

    /// The shard's URL without its password nor its key path, with its
    /// `ssl-mode`: for messages about how the shard is reached.
    pub fn redacted_url(&self) -> &str {
        &self.url
    }

    /// The breaker's state now.
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// The `q` quantile of the latency its callers saw over the last
    /// `window` (at most 10 s), with the number of calls it comes from; a
    /// move's own calls (`move_*`) are not counted.
    pub fn recent_latency(
        &self,
        q: f64,
        window: std::time::Duration,
    ) -> Option<(std::time::Duration, u64)> {
        self.stats.recent_latency(q, window)
    }

    /// Counts a request of one of the shard's chats (`chat`: its key,
    /// [`crate::routing::chat_key`]), end to end: what a move's pacer watches
    /// besides the shard's own calls.
    pub fn record_request(&self, chat: u64, took: std::time::Duration) {
        self.stats.record_request(chat, took);
    }

    /// The `q` quantile of this instance's requests of the shard's chats over
    /// the last `window` (about 10 s at most are kept), leaving out the chats
    /// whose key `keep` refuses, with the number of requests it comes from.
    pub fn request_latency(
        &self,
        q: f64,
        window: std::time::Duration,
        keep: impl Fn(u64) -> bool,
    ) -> Option<(std::time::Duration, u64)> {
        self.stats.request_latency(q, window, keep)
    }

    /// Everything the admin view and the metrics show of the shard, now.
    pub fn status(&self) -> ShardStatus {
        let pool = self.pool.status();
        let in_flight = self.stats.in_flight();
        let admitted = (self.settings.max_concurrent + self.settings.max_waiting)
            - self.admission.available_permits();
        let (recent_calls, recent_failure_rate) = self.stats.recent();
        ShardStatus {
            name: self.name.clone(),
            address: self.address.clone(),
            breaker: self.breaker.state(),
            breaker_since: self.breaker.since(),
            in_flight,
            waiting: admitted.saturating_sub(in_flight),
            capacity: self.settings.max_concurrent,
            waiting_capacity: self.settings.max_waiting,
            per_chat_capacity: self.settings.per_chat_concurrent(),
            pool_size: pool.size,
            pool_idle: pool.available,
            recent_calls,
            recent_failure_rate,
            last_failure: self.stats.last_failure(),
            rejected: self.stats.rejections(),
            innodb: *self.innodb.lock().unwrap_or_else(PoisonError::into_inner),
        }
    }

    /// Reads the shard's InnoDB settings (through the protections) and keeps
    /// them for [`Self::status`].
    pub async fn read_innodb(&self) -> Result<InnodbSettings, ShardError> {
        let settings = self
            .read(None, "read_innodb_settings", |conn| {
                Box::pin(async move {
                    let (autoinc_lock_mode, flush_log_at_trx_commit) =
                        crate::storage::server::innodb_settings(conn).await?;
                    Ok(InnodbSettings {
                        autoinc_lock_mode,
                        flush_log_at_trx_commit,
                    })
                })
            })
            .await?;
        *self.innodb.lock().unwrap_or_else(PoisonError::into_inner) = Some(settings);
        Ok(settings)
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
                if e.counts_against_shard()
                    || matches!(e, ShardError::Database { .. } | ShardError::BadData { .. })
                {
                    span.record("otel.status_code", "ERROR");
                }
                e.code()
            }
        };
        let shard = KeyValue::new("shard", self.name.clone());
        if !result.as_ref().is_err_and(ShardError::is_refusal) {
            let took = started.elapsed();
            if !name.starts_with("move_") {
                self.stats.record_latency(took);
            }
            self.instruments.operation_seconds.record(
                took.as_secs_f64(),
                &[
                    shard.clone(),
                    KeyValue::new("operation", name),
                    KeyValue::new("outcome", outcome),
                ],
            );
        }
        self.instruments
            .operations
            .add(1, &[shard, KeyValue::new("outcome", outcome)]);
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
            self.stats.refused(Refusal::BreakerOpen);
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
                        self.stats.refused(Refusal::ChatBusy);
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
        let mut conn = InUse(Some(
            self.pool
                .timeout_get(&timeouts)
                .await
                .map_err(|e| self.pool_error(e))?,
        ));
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
        let Some(connection) = conn.0.as_deref_mut() else {
            return Err(self.busy());
        };
        match tokio::time::timeout(deadline, op(connection)).await {
            Ok(Ok(value)) => {
                conn.release();
                Ok(value)
            }
            Ok(Err(err)) => {
                let err = error::classify(&self.name, err);
                // The shard answered these on a healthy connection; any other
                // failure leaves the connection in doubt.
                if matches!(
                    err,
                    ShardError::Database { .. }
                        | ShardError::ReadOnly { .. }
                        | ShardError::Contended { .. }
                        | ShardError::BadData { .. }
                ) {
                    conn.release();
                }
                Err(err)
            }
            Err(_elapsed) => {
                // The connection is mid-protocol: `conn` is dropped, never reused.
                Err(match access {
                    Access::Read => ShardError::Timeout {
                        shard: self.name.clone(),
                        deadline,
                    },
                    Access::Write => ShardError::OutcomeUnknown {
                        shard: self.name.clone(),
                        cause: OutcomeCause::Deadline(deadline),
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
                let reason = crate::error::chain(e);
                self.breaker.record_failure(&reason);
                self.stats.record_failure(reason);
            }
            Err(
                e @ (ShardError::ReadOnly { .. }
                | ShardError::Database { .. }
                | ShardError::Contended { .. }
                | ShardError::BadData { .. }),
            ) => {
                // The shard answered: not its outage, but worth showing.
                self.stats.record_failure(crate::error::chain(e));
            }
            Err(_) => {}
        }
    }

    fn busy(&self) -> ShardError {
        self.stats.refused(Refusal::ShardBusy);
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

/// A connection taken from the pool for one operation. Unless the operation
/// ended in a state the connection can be reused from ([`InUse::release`]),
/// dropping it closes the connection instead of returning it: an operation
/// cut short (its deadline, or its caller went away mid-query) leaves the
/// connection mid-protocol, and the next user would read another's answer.
struct InUse(Option<Object<MySqlManager>>);

impl InUse {
    /// Back to the pool (recycling checks it is not inside a transaction).
    fn release(mut self) {
        drop(self.0.take());
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(Object::take(conn));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_router_naming_a_missing_shard_is_refused() -> crate::TestResult {
        let ranges = crate::routing::BucketRange::even_split(2)
            .into_iter()
            .map(|r| vec![r])
            .collect::<Vec<_>>();
        let router = crate::routing::Router::new(&ranges).map_err(|p| p.join("; "))?;
        let settings = ShardSettings {
            name: "only".into(),
            url: "mysql://root@127.0.0.1:1/x".into(),
            buckets: vec![],
            id_block: None,
            replicas: vec![],
        };
        let shard = Shard::new(
            &settings,
            0,
            &PoolSettings::default(),
            &BreakerSettings::default(),
            Instruments::unmeasured(),
        )?;
        let err = ShardSet::new(vec![Arc::new(shard)], router).unwrap_err();
        assert!(err.to_string().contains("shard #1"), "{err}");
        Ok(())
    }
}
