//! One server of a shard behind its own protections: see the parent module
//! for their order. A shard without replicas is one member; a replicated one
//! has its writer and replicas, each with its own breaker, bulkhead, per-chat
//! share and deadline, so a sick replica never takes a slot of the writer.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use deadpool::managed::{Object, Pool, PoolError, TimeoutType, Timeouts};
use opentelemetry::KeyValue;
use sqlx::MySqlConnection;
use sqlx::mysql::MySqlConnectOptions;
use tokio::sync::Semaphore;
use tracing::Instrument as _;

use super::error::{self, OUTCOMES, OpError, OutcomeCause, ShardError};
use super::manager::MySqlManager;
use super::share::ChatShares;
use super::spent::Spent;
use super::stats::{Refusal, ShardStats};
use super::{Access, BoxFuture, Breaker, BreakerState, InnodbSettings, Instruments, ShardStatus};
use crate::config::{BreakerSettings, PoolSettings};
use crate::domain::ChatId;

/// One server of a shard (its writer, or one of its replicas) behind its own
/// breaker and bulkhead.
pub(crate) struct Member {
    /// The shard's name.
    shard: String,
    /// `host:port`: the member's name in views, metrics and spans.
    address: String,
    /// The connect options, for the monitor's own connection.
    options: MySqlConnectOptions,
    /// Whether writes go to this member now (spans say which role served).
    writer: std::sync::atomic::AtomicBool,
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

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("shard", &self.shard)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Member {
    /// Builds the member's pool; connects lazily. `id_block` picks the
    /// shard's series of auto-increment ids (see [`Settings::id_blocks`]);
    /// a member of a replicated shard names its breaker `shard/host:port`
    /// in log lines.
    ///
    /// [`Settings::id_blocks`]: crate::config::Settings::id_blocks
    pub(crate) fn new(
        shard: &str,
        url: &str,
        replicated: bool,
        id_block: u16,
        pool: &PoolSettings,
        breaker: &BreakerSettings,
        instruments: Instruments,
    ) -> anyhow::Result<Self> {
        let options: MySqlConnectOptions = url
            .parse()
            .map_err(|e| anyhow::anyhow!("shard {shard}: invalid url: {e}"))?;
        let (host, port) = (options.get_host().to_owned(), options.get_port());
        let database = options.get_database().unwrap_or_default().to_owned();
        let address = format!("{host}:{port}");
        let built = Pool::builder(MySqlManager::new(
            options.clone(),
            pool.lock_wait_timeout_secs,
            id_block,
        ))
        .max_size(pool.max_concurrent)
        .wait_timeout(Some(pool.max_wait()))
        .create_timeout(Some(pool.connect_timeout()))
        .recycle_timeout(Some(pool.connect_timeout()))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .map_err(|e| anyhow::anyhow!("shard {shard}: {e}"))?;
        // Every outcome series exists from the start, so a rate over it sees
        // its first increment.
        for outcome in OUTCOMES {
            instruments.operations.add(
                0,
                &[
                    KeyValue::new("shard", shard.to_owned()),
                    KeyValue::new("member", address.clone()),
                    KeyValue::new("outcome", outcome),
                ],
            );
        }
        Ok(Self {
            shard: shard.to_owned(),
            address: address.clone(),
            options,
            url: crate::config::redact_url(url),
            host,
            port,
            database,
            instruments,
            pool: built,
            breaker: Breaker::new(
                &if replicated {
                    format!("{shard}/{address}")
                } else {
                    shard.to_owned()
                },
                breaker,
            ),
            shares: ChatShares::new(pool.per_chat_concurrent(), pool.per_chat_waiting()),
            admission: Arc::new(Semaphore::new(pool.max_concurrent + pool.max_waiting)),
            settings: pool.clone(),
            stats: ShardStats::default(),
            innodb: Mutex::new(None),
            writer: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// `host:port` of the server: the member's name.
    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    /// The member's URL without its password nor its key path, with its
    /// `ssl-mode`: for messages about how the shard is reached.
    pub(crate) fn redacted_url(&self) -> &str {
        &self.url
    }

    /// How long one operation may take before its caller stops waiting.
    pub(crate) fn operation_timeout(&self) -> std::time::Duration {
        self.settings.operation_timeout()
    }

    /// How long making a connection may take.
    pub(crate) fn connect_timeout(&self) -> std::time::Duration {
        self.settings.connect_timeout()
    }

    /// Marks the member as the shard's writer (or not), for its spans.
    pub(crate) fn set_writer(&self, writer: bool) {
        self.writer
            .store(writer, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn is_writer(&self) -> bool {
        self.writer.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The options the member is reached with (for the monitor's own
    /// connection, which stays out of the bulkhead).
    pub(crate) fn options(&self) -> &MySqlConnectOptions {
        &self.options
    }

    /// The breaker's state now.
    pub(crate) fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// The `q` quantile of the latency its callers saw over the last
    /// `window` (at most 10 s), with the number of calls it comes from; a
    /// move's own calls (`move_*`) are not counted.
    pub(crate) fn recent_latency(
        &self,
        q: f64,
        window: std::time::Duration,
    ) -> Option<(std::time::Duration, u64)> {
        self.stats.recent_latency(q, window)
    }

    /// Everything the admin view and the metrics show of the member, now.
    pub(crate) fn status(&self) -> ShardStatus {
        let pool = self.pool.status();
        let in_flight = self.stats.in_flight();
        let admitted = (self.settings.max_concurrent + self.settings.max_waiting)
            - self.admission.available_permits();
        let (recent_calls, recent_failure_rate) = self.stats.recent();
        ShardStatus {
            name: self.shard.clone(),
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
            gate: super::topology::Gate::Writer(0),
            role_changes: 0,
            members: Vec::new(),
        }
    }

    /// Reads the shard's InnoDB settings (through the protections) and keeps
    /// them for [`Self::status`].
    pub(crate) async fn read_innodb(&self) -> Result<InnodbSettings, ShardError> {
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
    pub(crate) async fn read<T, F>(
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
    pub(crate) async fn write<T, F>(
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
            chatshard.shard = %self.shard,
            chatshard.member = %self.address,
            chatshard.member.role = if self.is_writer() { "writer" } else { "replica" },
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
        let shard = KeyValue::new("shard", self.shard.clone());
        let member = KeyValue::new("member", self.address.clone());
        if !result.as_ref().is_err_and(ShardError::is_refusal) {
            let took = started.elapsed();
            if !name.starts_with("move_") {
                self.stats.record_latency(took);
            }
            self.instruments.operation_seconds.record(
                took.as_secs_f64(),
                &[
                    shard.clone(),
                    member.clone(),
                    KeyValue::new("operation", name),
                    KeyValue::new("outcome", outcome),
                ],
            );
        }
        self.instruments
            .operations
            .add(1, &[shard, member, KeyValue::new("outcome", outcome)]);
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
                shard: self.shard.clone(),
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
                        Spent::note_bulkhead(start.elapsed());
                        self.stats.refused(Refusal::ChatBusy);
                        tracing::debug!(reason = "chat_busy", "bulkhead_rejected");
                        ShardError::ChatBusy {
                            shard: self.shard.clone(),
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
        let _permit = self.admission.clone().try_acquire_owned().map_err(|_| {
            Spent::note_bulkhead(start.elapsed());
            self.busy()
        })?;
        // 4. The pool, within what is left of the caller's bounded wait.
        let timeouts = Timeouts {
            wait: Some(wait_until.saturating_duration_since(Instant::now())),
            create: Some(self.settings.connect_timeout()),
            recycle: Some(self.settings.connect_timeout()),
        };
        let pooled = self.pool.timeout_get(&timeouts).await;
        Spent::note_bulkhead(start.elapsed());
        let mut conn = InUse(Some(pooled.map_err(|e| self.pool_error(e))?));
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
        let working = Instant::now();
        let worked = tokio::time::timeout(deadline, op(connection)).await;
        Spent::note_database(working.elapsed());
        match worked {
            Ok(Ok(value)) => {
                conn.release();
                Ok(value)
            }
            Ok(Err(err)) => {
                let err = error::classify(&self.shard, err);
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
                        shard: self.shard.clone(),
                        deadline,
                    },
                    Access::Write => ShardError::OutcomeUnknown {
                        shard: self.shard.clone(),
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
            shard: self.shard.clone(),
        }
    }

    fn pool_error(&self, e: PoolError<sqlx::Error>) -> ShardError {
        match e {
            PoolError::Timeout(TimeoutType::Wait) => self.busy(),
            PoolError::Timeout(_) => ShardError::Timeout {
                shard: self.shard.clone(),
                deadline: self.settings.connect_timeout(),
            },
            PoolError::Backend(source) => ShardError::Unavailable {
                shard: self.shard.clone(),
                source,
            },
            PoolError::Closed | PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => {
                ShardError::Unavailable {
                    shard: self.shard.clone(),
                    source: sqlx::Error::PoolClosed,
                }
            }
        }
    }

    /// Checks that the shard answers, through the breaker and the bulkhead.
    pub(crate) async fn ping(&self) -> Result<(), ShardError> {
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
