//! The circuit breaker of one shard: failsafe's state machine, wrapped.
//!
//! What counts as a failure (and only this): connection-class errors (refused,
//! reset, "server has gone away", "too many connections", a lost connection,
//! a failed connect), deadline overruns, and writes whose outcome is unknown.
//! What never counts, neither as a failure nor as a success: a full bulkhead
//! (`shard_busy`, `chat_busy`: local back-pressure, not the shard's health), a
//! read-only shard (reads still work; opening would refuse them too), and any
//! other database error (a bug is not an outage). Business outcomes (chat full,
//! not a member, duplicates) are not errors at all at this level: they are
//! answers of a healthy shard, and count as successes.
//!
//! The breaker opens when either policy trips: `consecutive_failures` failures
//! in a row, or a success rate below `1 - failure_rate` over `window_secs` once
//! `min_requests` calls were seen. While open it refuses every call without
//! touching the network. After `open_ms` it lets at most `half_open_probes`
//! calls through at a time; the first success closes it, a failure re-opens it.
//! It is consulted once, before an operation starts: a transaction that has
//! started always runs to its COMMIT or ROLLBACK.
//!
//! failsafe keeps its state private and lets every caller through while half
//! open; both gaps are closed here, not re-implemented: the state is mirrored
//! from failsafe's instrument callbacks into an atomic, and probes take a
//! permit from a small semaphore.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use failsafe::backoff::Constant;
use failsafe::failure_policy::{ConsecutiveFailures, OrElse, SuccessRateOverTimeWindow};
use failsafe::{FailurePolicy, Instrument, StateMachine};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::BreakerSettings;

/// The breaker's state as shown to operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Open,
            2 => Self::HalfOpen,
            _ => Self::Closed,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// failsafe's state, mirrored from its callbacks, plus why it last changed.
#[derive(Debug)]
struct Mirror {
    shard: String,
    state: AtomicU8,
    since: Mutex<DateTime<Utc>>,
    last_failure: Mutex<String>,
}

impl Mirror {
    fn transit(&self, to: BreakerState) {
        let from = BreakerState::from_u8(self.state.swap(to.as_u8(), Ordering::AcqRel));
        if from == to {
            return;
        }
        *self.since.lock().unwrap_or_else(PoisonError::into_inner) = Utc::now();
        let reason = self
            .last_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match to {
            BreakerState::Open => tracing::warn!(
                shard = %self.shard, from = from.as_str(), to = to.as_str(), reason = %reason,
                detail = "calls to this shard are refused at once",
                "breaker_opened"
            ),
            BreakerState::HalfOpen => tracing::info!(
                shard = %self.shard, from = from.as_str(), to = to.as_str(),
                detail = "probing the shard",
                "breaker_half_open"
            ),
            BreakerState::Closed => tracing::info!(
                shard = %self.shard, from = from.as_str(), to = to.as_str(),
                detail = "the shard answers again",
                "breaker_closed"
            ),
        }
    }
}

#[derive(Debug, Clone)]
struct Callbacks(Arc<Mirror>);

impl Instrument for Callbacks {
    fn on_call_rejected(&self) {}

    fn on_open(&self) {
        self.0.transit(BreakerState::Open);
    }

    fn on_half_open(&self) {
        self.0.transit(BreakerState::HalfOpen);
    }

    fn on_closed(&self) {
        self.0.transit(BreakerState::Closed);
    }
}

type Policy = OrElse<SuccessRateOverTimeWindow<Constant>, ConsecutiveFailures<Constant>>;

/// Permission to call the shard; a half-open probe holds its permit until the
/// call ends (a cancelled probe frees it without recording anything).
#[derive(Debug)]
pub struct Admission {
    _probe: Option<OwnedSemaphorePermit>,
}

/// One shard's circuit breaker.
pub struct Breaker {
    machine: StateMachine<Policy, Callbacks>,
    mirror: Arc<Mirror>,
    probes: Arc<Semaphore>,
    open_for: Duration,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("state", &self.state())
            .finish()
    }
}

impl Breaker {
    pub fn new(shard: &str, settings: &BreakerSettings) -> Self {
        let open_for = Duration::from_millis(settings.open_ms);
        // Only `constant` accepts sub-second delays in failsafe.
        let backoff = failsafe::backoff::constant(open_for);
        let policy = failsafe::failure_policy::success_rate_over_time_window(
            1.0 - settings.failure_rate,
            settings.min_requests,
            Duration::from_secs(settings.window_secs),
            backoff.clone(),
        )
        .or_else(failsafe::failure_policy::consecutive_failures(
            settings.consecutive_failures,
            backoff,
        ));
        let mirror = Arc::new(Mirror {
            shard: shard.to_owned(),
            state: AtomicU8::new(BreakerState::Closed.as_u8()),
            since: Mutex::new(Utc::now()),
            last_failure: Mutex::new(String::new()),
        });
        Self {
            machine: StateMachine::new(policy, Callbacks(mirror.clone())),
            mirror,
            probes: Arc::new(Semaphore::new(settings.half_open_probes.max(1))),
            open_for,
        }
    }

    /// Asks to call the shard; `None` means refused (open, or every probe slot
    /// of a half-open breaker taken).
    pub fn admit(&self) -> Option<Admission> {
        if !self.machine.is_call_permitted() {
            return None;
        }
        match self.state() {
            BreakerState::HalfOpen => {
                let probe = self.probes.clone().try_acquire_owned().ok()?;
                Some(Admission {
                    _probe: Some(probe),
                })
            }
            BreakerState::Closed | BreakerState::Open => Some(Admission { _probe: None }),
        }
    }

    /// A call the shard answered (whatever the business outcome).
    pub fn record_success(&self) {
        self.machine.on_success();
    }

    /// A call that failed for a reason that counts (see the module docs).
    pub fn record_failure(&self, reason: &str) {
        *self
            .mirror
            .last_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = reason.to_owned();
        self.machine.on_error();
    }

    pub fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.mirror.state.load(Ordering::Acquire))
    }

    /// When the breaker entered its current state.
    pub fn since(&self) -> DateTime<Utc> {
        *self
            .mirror
            .since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Seconds a caller should wait before retrying a refused call.
    pub fn retry_after_secs(&self) -> u64 {
        let open_since = Utc::now() - self.since();
        let left = self
            .open_for
            .saturating_sub(open_since.to_std().unwrap_or_default());
        left.as_secs_f64().ceil().max(1.0) as u64
    }
}

#[cfg(test)]
mod tests {
    //! failsafe reads its clock through `failsafe::clock`, which a test can
    //! freeze and advance: no sleeps, no polling.

    use super::*;
    use failsafe::clock;

    fn settings(open_ms: u64) -> BreakerSettings {
        BreakerSettings {
            consecutive_failures: 3,
            failure_rate: 0.5,
            min_requests: 1000,
            window_secs: 10,
            open_ms,
            half_open_probes: 1,
        }
    }

    fn open(b: &Breaker) {
        for _ in 0..3 {
            b.record_failure("timeout");
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn opens_after_consecutive_failures_and_refuses() {
        clock::freeze(|_| {
            let b = Breaker::new("s", &settings(60_000));
            for _ in 0..2 {
                assert!(b.admit().is_some());
                b.record_failure("connection refused");
            }
            assert_eq!(b.state(), BreakerState::Closed);
            b.record_failure("connection refused");
            assert_eq!(b.state(), BreakerState::Open);
            assert!(b.admit().is_none());
            assert!(b.retry_after_secs() >= 59);
        });
    }

    #[test]
    fn successes_reset_the_run_of_failures() {
        clock::freeze(|_| {
            let b = Breaker::new("s", &settings(60_000));
            for _ in 0..10 {
                b.record_failure("x");
                b.record_failure("x");
                b.record_success();
            }
            assert_eq!(b.state(), BreakerState::Closed);
        });
    }

    #[test]
    fn stays_open_until_the_delay_then_one_probe_and_a_success_closes() {
        clock::freeze(|clock| {
            let b = Breaker::new("s", &settings(500));
            open(&b);
            clock.advance(Duration::from_millis(499));
            assert!(b.admit().is_none());
            clock.advance(Duration::from_millis(2));
            let probe = b.admit();
            assert!(probe.is_some());
            assert_eq!(b.state(), BreakerState::HalfOpen);
            // The single probe slot is taken: others are still refused.
            assert!(b.admit().is_none());
            b.record_success();
            drop(probe);
            assert_eq!(b.state(), BreakerState::Closed);
            assert!(b.admit().is_some());
        });
    }

    #[test]
    fn a_failed_probe_reopens_and_a_cancelled_one_frees_its_slot() {
        clock::freeze(|clock| {
            let b = Breaker::new("s", &settings(500));
            open(&b);
            clock.advance(Duration::from_millis(501));
            let cancelled = b.admit();
            assert!(cancelled.is_some());
            drop(cancelled); // records nothing
            assert_eq!(b.state(), BreakerState::HalfOpen);
            let probe = b.admit();
            assert!(probe.is_some());
            b.record_failure("timeout");
            drop(probe);
            assert_eq!(b.state(), BreakerState::Open);
            assert!(b.admit().is_none());
        });
    }

    #[test]
    fn a_low_success_rate_opens_without_a_run_of_failures() {
        clock::freeze(|clock| {
            let mut s = settings(60_000);
            s.consecutive_failures = 1000;
            s.min_requests = 10;
            let b = Breaker::new("s", &s);
            // The rate policy (a moving average over time) judges only once a
            // whole window has been seen: one success, two failures, every 100 ms.
            for i in 0..300 {
                clock.advance(Duration::from_millis(100));
                if i % 3 == 0 {
                    b.record_success();
                } else {
                    b.record_failure("reset");
                }
                if b.state() == BreakerState::Open {
                    break;
                }
            }
            assert_eq!(b.state(), BreakerState::Open);
        });
    }
}
