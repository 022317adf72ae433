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
//! Each operation also adds its wait at steps 1 to 4 and its database work
//! (step 5) to the tally of the request it runs for ([`Spent`]), so a
//! request's time can be split between chatshard and the database.
//!
//! A shard may be replicated (docs/replicas.md): it is then several
//! [`member`]s, each one server behind all of the protections above, its
//! own. Writes go to the member the [`monitor`] found writable
//! ([`topology`] decides from what it saw); reads that may be served by a
//! replica ask for one in rotation ([`Shard::pick_replica`]) and fall back to
//! the writer only within `replicas.primary_fallback_share` of its slots.

mod breaker;
pub mod error;
mod manager;
mod member;
mod monitor;
pub mod reparent;
mod set;
mod share;
mod spent;
mod stats;
pub mod topology;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use opentelemetry::metrics::{Counter, Histogram};
use sqlx::MySqlConnection;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{BreakerSettings, PoolSettings, ReplicaSettings, ShardSettings};
use crate::domain::ChatId;

pub use breaker::{Breaker, BreakerState};
pub use error::{
    BadData, OUTCOMES, OpError, OutcomeCause, ShardError, is_connection_error, is_deadlock,
    is_lock_contention, is_read_only_error,
};
use member::Member;
pub use monitor::{MemberRole, MemberStatus};
pub use set::ShardSet;
pub use spent::Spent;
use stats::ShardStats;
pub use stats::{RECENT_SECS, Rejections, ShardStatus};
use topology::Gate;

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

/// One shard: its writer and its replicas, each behind its own protections.
pub struct Shard {
    name: String,
    members: Vec<Member>,
    /// Where writes go, as [`Gate`] encoded by [`encode`].
    gate: AtomicU64,
    /// The member reads of the writer go to while the gate is not open: the
    /// last writer (split brain, confirmation), or none.
    last_writer: AtomicUsize,
    /// What the monitor last saw of each member.
    seen: Vec<Mutex<monitor::Seen>>,
    /// Reads meant for replicas that the writer takes when none can serve.
    fallback: Arc<Semaphore>,
    next_replica: AtomicUsize,
    settings: ReplicaSettings,
    /// End-to-end requests of the shard's chats (the move pacer's view).
    requests: ShardStats,
    /// Asks the monitor for a round now (a write met a read-only member, or
    /// another instance saw the writer change).
    nudge: Arc<tokio::sync::Notify>,
    /// Bumped each time writes go to another member.
    writer_changes: tokio::sync::watch::Sender<u64>,
    role_changes: AtomicU64,
    /// Until when this instance holds the shard's writes (a switchover).
    hold: tokio::sync::watch::Sender<Option<std::time::Instant>>,
    /// A switchover driven here owns the gate: the monitor leaves it be,
    /// and writes that are not held are refused.
    switching: std::sync::atomic::AtomicBool,
    /// Writes past the hold and on their way to the writer: a switchover
    /// fences the writer only once none is left.
    writes_entered: AtomicU64,
    /// One change of the gate at a time (the monitor or a reparent).
    gate_lock: Mutex<()>,
    /// The heartbeat's connection; a switchover holds it so that no beat
    /// lands on the writer it fences.
    beat: Arc<tokio::sync::Mutex<monitor::Beat>>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("name", &self.name)
            .field("members", &self.members)
            .finish_non_exhaustive()
    }
}

const GATE_WRITER: u64 = 0;
const GATE_PENDING: u64 = 1;
const GATE_NONE: u64 = 2;
const GATE_SPLIT: u64 = 3;

fn encode(gate: Gate) -> u64 {
    match gate {
        Gate::Writer(i) => (GATE_WRITER << 32) | i as u64,
        Gate::Pending(i) => (GATE_PENDING << 32) | i as u64,
        Gate::NoWriter => GATE_NONE << 32,
        Gate::SplitBrain => GATE_SPLIT << 32,
    }
}

fn decode(v: u64) -> Gate {
    let i = (v & 0xffff_ffff) as usize;
    match v >> 32 {
        GATE_WRITER => Gate::Writer(i),
        GATE_PENDING => Gate::Pending(i),
        GATE_NONE => Gate::NoWriter,
        _ => Gate::SplitBrain,
    }
}

/// Where a read was served, for the answer's headers and the span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// The member's `host:port`.
    pub member: String,
    /// Whether it was the writer.
    pub writer: bool,
    /// How stale the answer may be, in milliseconds (0 from the writer).
    pub staleness_ms: u64,
}

impl Shard {
    /// Builds the shard's members (its `url`, then its replicas); connects
    /// lazily. `id_block` picks the shard's series of auto-increment ids
    /// (see [`Settings::id_blocks`]). Writes go to `url` until the monitor
    /// says otherwise.
    ///
    /// [`Settings::id_blocks`]: crate::config::Settings::id_blocks
    pub fn new(
        settings: &ShardSettings,
        id_block: u16,
        pool: &PoolSettings,
        breaker: &BreakerSettings,
        replicas: &ReplicaSettings,
        instruments: Instruments,
    ) -> anyhow::Result<Self> {
        let replicated = !settings.replicas.is_empty();
        let members = settings
            .member_urls()
            .map(|url| {
                let member = Member::new(
                    &settings.name,
                    url,
                    replicated,
                    id_block,
                    pool,
                    breaker,
                    instruments.clone(),
                )?;
                Ok(member)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        members[0].set_writer(true);
        let seen = members
            .iter()
            .map(|_| Mutex::new(monitor::Seen::default()))
            .collect();
        Ok(Self {
            name: settings.name.clone(),
            gate: AtomicU64::new(encode(Gate::Writer(0))),
            last_writer: AtomicUsize::new(0),
            seen,
            fallback: Arc::new(Semaphore::new(replicas.fallback_slots(pool.max_concurrent))),
            next_replica: AtomicUsize::new(0),
            settings: replicas.clone(),
            requests: ShardStats::default(),
            nudge: Arc::new(tokio::sync::Notify::new()),
            writer_changes: tokio::sync::watch::channel(0).0,
            role_changes: AtomicU64::new(0),
            hold: tokio::sync::watch::channel(None).0,
            switching: std::sync::atomic::AtomicBool::new(false),
            writes_entered: AtomicU64::new(0),
            gate_lock: Mutex::new(()),
            beat: Arc::new(tokio::sync::Mutex::new(monitor::Beat::default())),
            members,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the shard has replicas (and so a monitor).
    pub fn is_replicated(&self) -> bool {
        self.members.len() > 1
    }

    /// Whether writes (and the writer's reads) have a member now.
    pub fn has_writer(&self) -> bool {
        !matches!(self.gate(), Gate::NoWriter)
    }

    /// How often the members are read (`replicas.monitor_ms`).
    pub fn monitor_period(&self) -> Duration {
        self.settings.monitor()
    }

    /// Where writes go now.
    pub fn gate(&self) -> Gate {
        decode(self.gate.load(Ordering::Acquire))
    }

    /// The member that serves the writer's reads: the writer, else the last
    /// one while writes wait for a confirmation or a split brain ends.
    fn reader(&self) -> Option<&Member> {
        match self.gate() {
            Gate::Writer(i) => Some(&self.members[i]),
            Gate::Pending(_) | Gate::SplitBrain => {
                Some(&self.members[self.last_writer.load(Ordering::Acquire)])
            }
            Gate::NoWriter => None,
        }
    }

    /// How long one operation on the writer may take (its deadline): what a
    /// move sizes its batches against.
    pub fn operation_timeout(&self) -> std::time::Duration {
        self.primary().operation_timeout()
    }

    /// The writer, or the last one: what views and the pacer describe.
    fn primary(&self) -> &Member {
        &self.members[self.last_writer.load(Ordering::Acquire)]
    }

    /// `host:port` of the writer (or the last one).
    pub fn address(&self) -> &str {
        self.primary().address()
    }

    /// The writer's URL without its password nor its key path, with its
    /// `ssl-mode`: for messages about how the shard is reached.
    pub fn redacted_url(&self) -> &str {
        self.primary().redacted_url()
    }

    /// The writer's breaker state now.
    pub fn breaker_state(&self) -> BreakerState {
        self.primary().breaker_state()
    }

    /// The `q` quantile of the latency the writer's callers saw over the last
    /// `window` (at most 10 s), with the number of calls it comes from; a
    /// move's own calls (`move_*`) are not counted.
    pub fn recent_latency(&self, q: f64, window: Duration) -> Option<(Duration, u64)> {
        self.primary().recent_latency(q, window)
    }

    /// Counts a request of one of the shard's chats (`chat`: its key,
    /// [`crate::routing::chat_key`]), end to end: what a move's pacer watches
    /// besides the shard's own calls.
    pub fn record_request(&self, chat: u64, took: Duration) {
        self.requests.record_request(chat, took);
    }

    /// The `q` quantile of this instance's requests of the shard's chats over
    /// the last `window` (about 10 s at most are kept), leaving out the chats
    /// whose key `keep` refuses, with the number of requests it comes from.
    pub fn request_latency(
        &self,
        q: f64,
        window: Duration,
        keep: impl Fn(u64) -> bool,
    ) -> Option<(Duration, u64)> {
        self.requests.request_latency(q, window, keep)
    }

    /// Everything the admin view and the metrics show of the shard, now: the
    /// writer's protections, and every member when it is replicated.
    pub fn status(&self) -> ShardStatus {
        let mut status = self.primary().status();
        status.gate = self.gate();
        status.role_changes = self.role_changes.load(Ordering::Relaxed);
        if self.is_replicated() {
            status.members = self.member_statuses();
        }
        status
    }

    /// Reads the writer's InnoDB settings (through the protections) and
    /// keeps them for [`Self::status`].
    pub async fn read_innodb(&self) -> Result<InnodbSettings, ShardError> {
        match self.reader() {
            Some(m) => m.read_innodb().await,
            None => Err(self.no_writer()),
        }
    }

    /// Runs a read for `chat` (or for the shard itself when `None`) on the
    /// writer; while the shard has no writer, on the freshest replica that
    /// answers. A timeout or lost connection means nothing was changed.
    pub async fn read<T, F>(
        &self,
        chat: Option<&ChatId>,
        name: &'static str,
        op: F,
    ) -> Result<T, ShardError>
    where
        F: for<'c> FnOnce(&'c mut MySqlConnection) -> BoxFuture<'c, Result<T, OpError>>,
    {
        match self.reader() {
            Some(m) => m.read(chat, name, op).await,
            None => match self.freshest_replica() {
                Some(i) => self.members[i].read(chat, name, op).await,
                None => Err(self.no_writer()),
            },
        }
    }

    /// Runs a write transaction on the writer. A timeout, or a lost
    /// connection during COMMIT, is reported as
    /// [`ShardError::OutcomeUnknown`]: every write of chatshard is idempotent
    /// by a unique key, so the caller may retry it safely. While the shard
    /// has no writer (or a split brain) the write is refused at once.
    pub async fn write<T, F>(
        &self,
        chat: Option<&ChatId>,
        name: &'static str,
        op: F,
    ) -> Result<T, ShardError>
    where
        F: for<'c> FnOnce(&'c mut MySqlConnection) -> BoxFuture<'c, Result<T, OpError>>,
    {
        // A switchover holds the writes for a moment rather than refusing
        // them (docs/replicas.md).
        if self.hold.borrow().is_some() {
            self.wait_for_hold().await;
        }
        // Counted before `switching` is read, as the switchover sets
        // `switching` before it counts (both SeqCst): either it waits for
        // this write, or this write sees it and is refused, never sent to a
        // writer being fenced (an account with `READ_ONLY ADMIN` would still
        // commit there). A write whose hold ran out is refused the same way.
        let _entered = Entered::new(&self.writes_entered);
        if self.switching.load(Ordering::SeqCst) {
            return Err(self.no_writer());
        }
        let writer = match self.gate() {
            Gate::Writer(i) => &self.members[i],
            Gate::SplitBrain => {
                return Err(ShardError::SplitBrain {
                    shard: self.name.clone(),
                });
            }
            Gate::Pending(_) | Gate::NoWriter => return Err(self.no_writer()),
        };
        let result = writer.write(chat, name, op).await;
        if self.is_replicated()
            && let Err(ShardError::ReadOnly { .. }) = &result
        {
            // The writer was demoted under us: look again now, and answer as
            // a shard between writers does.
            self.nudge.notify_one();
            return Err(self.no_writer());
        }
        result
    }

    /// Writes counted by [`Self::write`] that have not ended.
    pub(crate) fn writes_entered(&self) -> u64 {
        self.writes_entered.load(Ordering::SeqCst)
    }

    fn no_writer(&self) -> ShardError {
        ShardError::NoWriter {
            shard: self.name.clone(),
        }
    }

    /// Checks that the shard's writer answers, through the breaker and the
    /// bulkhead.
    pub async fn ping(&self) -> Result<(), ShardError> {
        match self.reader() {
            Some(m) => m.ping().await,
            None => Err(self.no_writer()),
        }
    }

    /// A replica that may serve a read now, taken in turn: read-only,
    /// answering the monitor, its lag within `replicas.max_lag_ms` and its
    /// breaker not open. `None` without replicas or when none qualifies.
    pub fn pick_replica(&self) -> Option<usize> {
        if !self.is_replicated() {
            return None;
        }
        let n = self.members.len();
        let start = self.next_replica.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| self.in_rotation(i))
    }

    /// Whether member `i` may serve replica reads now.
    fn in_rotation(&self, i: usize) -> bool {
        if self.gate().writer() == Some(i) {
            return false;
        }
        let seen = self.seen[i].lock().unwrap_or_else(PoisonError::into_inner);
        seen.in_rotation(self.settings.max_lag())
            && self.members[i].breaker_state() != BreakerState::Open
    }

    /// The replica with the least lag that answered the monitor: where reads
    /// go while the shard has no writer.
    fn freshest_replica(&self) -> Option<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].breaker_state() != BreakerState::Open)
            .filter_map(|i| {
                let seen = self.seen[i].lock().unwrap_or_else(PoisonError::into_inner);
                seen.answering()
                    .then_some((seen.lag_ms.unwrap_or(u64::MAX), i))
            })
            .min()
            .map(|(_, i)| i)
    }

    /// Runs a read on member `i` (from [`Self::pick_replica`]).
    pub async fn read_member<T, F>(
        &self,
        i: usize,
        chat: Option<&ChatId>,
        name: &'static str,
        op: F,
    ) -> Result<T, ShardError>
    where
        F: for<'c> FnOnce(&'c mut MySqlConnection) -> BoxFuture<'c, Result<T, OpError>>,
    {
        self.members[i].read(chat, name, op).await
    }

    /// A slot of the writer's share for reads that no replica could serve;
    /// `None` when that share is taken (the read is then refused, so a
    /// replica outage cannot double the writer's load).
    pub fn fallback_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.fallback.clone().try_acquire_owned().ok()
    }

    /// Where a read on member `i` was served and how stale it may be: the
    /// lag the monitor last measured, the time since, and one monitor period
    /// (the heartbeat's resolution).
    pub fn served(&self, i: usize) -> Served {
        let member = &self.members[i];
        if self.gate().writer() == Some(i) {
            return Served {
                member: member.address().to_owned(),
                writer: true,
                staleness_ms: 0,
            };
        }
        let seen = self.seen[i].lock().unwrap_or_else(PoisonError::into_inner);
        let since = seen.at.map_or(0, |at| at.elapsed().as_millis() as u64);
        Served {
            member: member.address().to_owned(),
            writer: false,
            staleness_ms: seen.lag_ms.unwrap_or(0) + since + self.settings.monitor_ms,
        }
    }

    /// Where a read of the writer was served (for a read that went through
    /// [`Self::read`]).
    pub fn served_by_writer(&self) -> Served {
        let i = self
            .gate()
            .writer()
            .unwrap_or_else(|| self.last_writer.load(Ordering::Acquire));
        self.served(i)
    }

    /// A receiver that changes each time writes go to another member.
    pub fn writer_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.writer_changes.subscribe()
    }

    /// Asks the monitor for a round now.
    pub fn nudge(&self) {
        self.nudge.notify_one();
    }
}

/// One write counted in [`Shard::write`] until it ends.
struct Entered<'a>(&'a AtomicU64);

impl<'a> Entered<'a> {
    fn new(count: &'a AtomicU64) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
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
            &ReplicaSettings::default(),
            Instruments::unmeasured(),
        )?;
        let err = ShardSet::new(vec![Arc::new(shard)], router).unwrap_err();
        assert!(err.to_string().contains("shard #1"), "{err}");
        Ok(())
    }
}
