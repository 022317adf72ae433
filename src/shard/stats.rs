//! What the admin view and the metrics see of a shard: in-flight work, recent
//! failure rate, the last failure, and refusals by reason, counted here and
//! read through one [`ShardStatus`] snapshot, so nothing outside `shard` reads
//! its counters or its pool.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

/// Seconds the recent failure rate looks back.
pub const RECENT_SECS: u64 = 10;

/// Latency classes per doubling: 8 gives classes about 9 % wide.
const PER_OCTAVE: f64 = 8.0;
/// Classes from 1 µs to about 70 s; slower calls fall in the last.
const CLASSES: usize = 26 * PER_OCTAVE as usize;

/// The latencies of one second's calls, in logarithmic classes.
#[derive(Debug, Clone, Copy)]
struct Latencies {
    second: u64,
    count: u32,
    classes: [u32; CLASSES],
}

impl Default for Latencies {
    fn default() -> Self {
        Self {
            second: 0,
            count: 0,
            classes: [0; CLASSES],
        }
    }
}

fn class_of(took: Duration) -> usize {
    let micros = took.as_secs_f64() * 1e6;
    if micros <= 1.0 {
        return 0;
    }
    ((micros.log2() * PER_OCTAVE) as usize).min(CLASSES - 1)
}

/// The upper bound of a class.
fn class_bound(class: usize) -> Duration {
    Duration::from_secs_f64(((class + 1) as f64 / PER_OCTAVE).exp2() / 1e6)
}

/// The requests kept at most (the oldest go first): about 1 MiB a shard,
/// 10 s of a shard at 6,500 requests a second.
const MAX_REQUESTS: usize = 1 << 16;

/// One request of a chat of the shard, end to end, as the instance answered
/// it.
#[derive(Debug, Clone, Copy)]
struct Request {
    /// Milliseconds since the stats' epoch (wrapping: only ages of seconds
    /// are ever asked).
    at_ms: u32,
    micros: u32,
    /// The chat's key (its routing hash), so a reader can leave chats out.
    chat: u64,
}

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
    latencies: Mutex<Box<[Latencies; RECENT_SECS as usize]>>,
    requests: Mutex<VecDeque<Request>>,
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
    /// Where writes go (always the one member of a shard without replicas).
    pub gate: super::topology::Gate,
    /// Times writes went to another member since start.
    pub role_changes: u64,
    /// Every member of a replicated shard; empty without replicas.
    pub members: Vec<super::MemberStatus>,
}

impl Default for ShardStats {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            buckets: Mutex::new([Bucket::default(); RECENT_SECS as usize]),
            latencies: Mutex::new(Box::new([Latencies::default(); RECENT_SECS as usize])),
            requests: Mutex::new(VecDeque::new()),
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

    /// Counts how long one call took (admission, pool wait and database
    /// work): what the shard's callers feel.
    pub fn record_latency(&self, took: Duration) {
        let second = self.epoch.elapsed().as_secs();
        let class = class_of(took);
        let mut all = self
            .latencies
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let l = &mut all[(second % RECENT_SECS) as usize];
        if l.second != second || l.count == 0 {
            *l = Latencies {
                second,
                ..Latencies::default()
            };
        }
        l.count += 1;
        l.classes[class] += 1;
    }

    /// The `q` quantile of the calls of the last `window` (whole seconds, at
    /// most [`RECENT_SECS`], the current one included) and how many calls it
    /// is taken from; `None` without calls. The value is its class's upper
    /// bound, so at most about 9 % high.
    pub fn recent_latency(&self, q: f64, window: Duration) -> Option<(Duration, u64)> {
        let secs = window.as_secs().clamp(1, RECENT_SECS);
        let now = self.epoch.elapsed().as_secs();
        let mut merged = [0u64; CLASSES];
        let mut total = 0u64;
        {
            let all = self
                .latencies
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for l in all
                .iter()
                .filter(|l| l.count > 0 && now.saturating_sub(l.second) < secs)
            {
                total += u64::from(l.count);
                for (m, c) in merged.iter_mut().zip(l.classes.iter()) {
                    *m += u64::from(*c);
                }
            }
        }
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (class, n) in merged.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some((class_bound(class), total));
            }
        }
        Some((class_bound(CLASSES - 1), total))
    }

    /// Counts one request of a chat of this shard (`chat`: its key), from
    /// its arrival to its answer.
    pub fn record_request(&self, chat: u64, took: Duration) {
        let at_ms = self.epoch.elapsed().as_millis() as u32;
        let micros = u32::try_from(took.as_micros()).unwrap_or(u32::MAX);
        let mut all = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        if all.len() >= MAX_REQUESTS {
            all.pop_front();
        }
        all.push_back(Request {
            at_ms,
            micros,
            chat,
        });
    }

    /// The `q` quantile of the requests of the last `window` whose chat key
    /// `keep` accepts, and how many it is taken from; `None` without any.
    pub fn request_latency(
        &self,
        q: f64,
        window: Duration,
        keep: impl Fn(u64) -> bool,
    ) -> Option<(Duration, u64)> {
        let now = self.epoch.elapsed().as_millis() as u32;
        let window = u32::try_from(window.as_millis()).unwrap_or(u32::MAX);
        let mut took: Vec<u32> = {
            let all = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
            all.iter()
                .rev()
                .take_while(|r| now.wrapping_sub(r.at_ms) <= window)
                .filter(|r| keep(r.chat))
                .map(|r| r.micros)
                .collect()
        };
        if took.is_empty() {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * took.len() as f64).ceil() as usize).clamp(1, took.len());
        let (_, at, _) = took.select_nth_unstable(rank - 1);
        Some((Duration::from_micros(u64::from(*at)), took.len() as u64))
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

    #[test]
    fn request_latency_leaves_out_the_chats_asked_and_keeps_a_bounded_window() {
        let s = ShardStats::default();
        assert_eq!(
            s.request_latency(0.99, Duration::from_secs(2), |_| true),
            None
        );
        for i in 0..100u64 {
            s.record_request(1, Duration::from_millis(i + 1));
        }
        s.record_request(2, Duration::from_secs(3));
        // Every request: the slow one of chat 2 is the p99's top.
        let (p100, n) = s
            .request_latency(1.0, Duration::from_secs(2), |_| true)
            .unwrap();
        assert_eq!((p100, n), (Duration::from_secs(3), 101));
        // Chat 2 left out: the p99 of 1..=100 ms is 99 ms.
        let (p99, n) = s
            .request_latency(0.99, Duration::from_secs(2), |c| c != 2)
            .unwrap();
        assert_eq!((p99, n), (Duration::from_millis(99), 100));
        assert_eq!(
            s.request_latency(0.99, Duration::from_secs(2), |c| c == 3),
            None
        );
        // The oldest go once the ring is full.
        for _ in 0..MAX_REQUESTS {
            s.record_request(4, Duration::from_micros(10));
        }
        assert_eq!(
            s.request_latency(0.99, Duration::from_secs(2), |c| c != 4),
            None
        );
    }

    #[test]
    fn recent_latency_quantiles_within_a_class() {
        let s = ShardStats::default();
        assert_eq!(s.recent_latency(0.99, Duration::from_secs(5)), None);
        for _ in 0..990 {
            s.record_latency(Duration::from_millis(2));
        }
        for _ in 0..10 {
            s.record_latency(Duration::from_millis(40));
        }
        let (p50, n) = s.recent_latency(0.5, Duration::from_secs(5)).unwrap();
        assert_eq!(n, 1000);
        assert!(
            p50 >= Duration::from_millis(2) && p50 < Duration::from_micros(2200),
            "{p50:?}"
        );
        let (p99, _) = s.recent_latency(0.99, Duration::from_secs(5)).unwrap();
        assert!(
            p99 >= Duration::from_millis(2) && p99 < Duration::from_micros(2200),
            "{p99:?}"
        );
        let (p999, _) = s.recent_latency(0.999, Duration::from_secs(5)).unwrap();
        assert!(
            p999 >= Duration::from_millis(40) && p999 < Duration::from_millis(44),
            "{p999:?}"
        );
        // Past the last class, and below the first.
        s.record_latency(Duration::from_secs(600));
        s.record_latency(Duration::ZERO);
        let (max, _) = s.recent_latency(1.0, Duration::from_secs(5)).unwrap();
        assert!(max > Duration::from_secs(60), "{max:?}");
    }
}
