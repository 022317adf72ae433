//! What the admin view shows of a shard: in-flight work, recent failure rate,
//! the last counted failure, and refusals by reason.

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
pub struct ShardStats {
    epoch: Instant,
    in_flight: AtomicUsize,
    buckets: Mutex<[Bucket; RECENT_SECS as usize]>,
    last_failure: Mutex<Option<(DateTime<Utc>, String)>>,
    pub rejected_open: AtomicU64,
    pub rejected_busy: AtomicU64,
    pub rejected_chat_busy: AtomicU64,
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
pub struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ShardStats {
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
