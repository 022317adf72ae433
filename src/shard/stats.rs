//! What the admin view and the metrics see of a shard: in-flight work, recent
//! failure rate, the last failure, and refusals by reason, counted here and
//! read through one [`ShardStatus`] snapshot, so nothing outside `shard` reads
//! its counters or its pool.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use chrono::{DateTime, Utc};

/// Seconds the recent failure rate looks back.
pub const RECENT_SECS: u64 = 10;

#[derive(Debug, Default, Clone, Copy)]
struct Bucket {
    second: u64,
    ok: u64,
    failed: u64,
}

/// Counters of one shard.
#[derive(Debug)]
pub(crate) struct ShardStats {
    epoch: Instant,
    in_flight: AtomicUsize,
    buckets: Mutex<[Bucket; RECENT_SECS as usize]>,
    last_failure: Mutex<Option<(DateTime<Utc>, String)>>,
    rejected_open: AtomicU64,
    rejected_busy: AtomicU64,
    rejected_chat_busy: AtomicU64,
}

/// Calls refused by each protection since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rejections {
    pub breaker_open: u64,
    pub shard_busy: u64,
    pub chat_busy: u64,
}

/// A refusal by one of the protections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    BreakerOpen,
    ShardBusy,
    ChatBusy,
}

/// A shard as the admin view and the metrics see it, read at one moment.
#[derive(Debug, Clone)]
pub struct ShardStatus {
    pub name: String,
    /// `host:port`.
    pub address: String,
    pub breaker: super::BreakerState,
    /// When the breaker last changed state.
    pub breaker_since: DateTime<Utc>,
    /// Operations running on the shard now.
    pub in_flight: usize,
    /// Callers admitted and waiting for a connection now.
    pub waiting: usize,
    /// `pool.max_concurrent`.
    pub capacity: usize,
    /// `pool.max_waiting`.
    pub waiting_capacity: usize,
    /// Slots one chat may hold.
    pub per_chat_capacity: usize,
    /// Open connections, and those of them not in use.
    pub pool_size: usize,
    pub pool_idle: usize,
    /// Calls over the last [`RECENT_SECS`] seconds and the share that failed.
    pub recent_calls: u64,
    pub recent_failure_rate: f64,
    /// The last failure (counted by the breaker or not), with its cause chain.
    pub last_failure: Option<(DateTime<Utc>, String)>,
    pub rejected: Rejections,
    /// The InnoDB settings read at start-up, if the shard answered then.
    pub innodb: Option<super::InnodbSettings>,
}

impl Default for ShardStats {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            buckets: Mutex::new([Bucket::default(); RECENT_SECS as usize]),
            last_failure: Mutex::new(None),
            rejected_open: AtomicU64::new(0),
            rejected_busy: AtomicU64::new(0),
            rejected_chat_busy: AtomicU64::new(0),
        }
    }
}

/// Counts one operation in flight while alive.
pub(crate) struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ShardStats {
    pub fn refused(&self, why: Refusal) {
        let counter = match why {
            Refusal::BreakerOpen => &self.rejected_open,
            Refusal::ShardBusy => &self.rejected_busy,
            Refusal::ChatBusy => &self.rejected_chat_busy,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn rejections(&self) -> Rejections {
        Rejections {
            breaker_open: self.rejected_open.load(Ordering::Relaxed),
            shard_busy: self.rejected_busy.load(Ordering::Relaxed),
            chat_busy: self.rejected_chat_busy.load(Ordering::Relaxed),
        }
    }

    pub fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(&self.in_flight)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    fn record(&self, failed: bool) {
        let second = self.epoch.elapsed().as_secs();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let b = &mut buckets[(second % RECENT_SECS) as usize];
        if b.second != second {
            *b = Bucket {
                second,
                ..Bucket::default()
            };
        }
        if failed {
            b.failed += 1;
        } else {
            b.ok += 1;
        }
    }

    pub fn record_ok(&self) {
        self.record(false);
    }

    pub fn record_failure(&self, what: String) {
        self.record(true);
        *self
            .last_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((Utc::now(), what));
    }

    /// (calls, failure rate) over the last [`RECENT_SECS`] seconds.
    pub fn recent(&self) -> (u64, f64) {
        let now = self.epoch.elapsed().as_secs();
        let buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let (ok, failed) = buckets
            .iter()
            .filter(|b| now.saturating_sub(b.second) < RECENT_SECS && (b.ok + b.failed) > 0)
            .fold((0, 0), |(o, f), b| (o + b.ok, f + b.failed));
        let total = ok + failed;
        (
            total,
            if total == 0 {
                0.0
            } else {
                failed as f64 / total as f64
            },
        )
    }

    pub fn last_failure(&self) -> Option<(DateTime<Utc>, String)> {
        self.last_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_failure_rate_and_in_flight() {
        let s = ShardStats::default();
        for _ in 0..3 {
            s.record_ok();
        }
        s.record_failure("connection refused".into());
        assert_eq!(s.recent(), (4, 0.25));
        assert_eq!(s.last_failure().unwrap().1, "connection refused");
        let a = s.start();
        let b = s.start();
        assert_eq!(s.in_flight(), 2);
        drop((a, b));
        assert_eq!(s.in_flight(), 0);
    }
}
