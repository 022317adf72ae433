//! Join throttling: at most `limit` accepted joins per chat per window, on this
//! instance, decided before any database work.
//!
//! The window of a chat starts with its first join and lasts `windowSeconds`;
//! the next join after it starts a new one. Only admitted joins count, in
//! dry-run too (so a dry run reports exactly what enforcement would refuse).
//! Joins of users already in the chat and re-joins count like joins: the
//! decision is made before the database says which they are. Leaves are never
//! throttled.
//!
//! The state of a chat is one small mutex-protected window inside a moka entry:
//! moka creates one entry per chat even under concurrent first joins, and the
//! mutex makes admission exact (1,000 concurrent joins against a limit of 100
//! admit exactly 100). Entries expire after an hour idle (longer than any
//! window) and the cache is bounded by `throttle.tracked_chats`; a chat evicted
//! under that pressure starts a fresh window.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use moka::sync::Cache;

use super::{Clock, Decisions};
use crate::domain::ChatId;
use crate::live::JoinRule;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinDecision {
    Admit,
    /// Refused: `retry_after_secs` until the window frees capacity.
    Throttle {
        retry_after_secs: u64,
    },
    /// Would be refused; admitted because the rule is a dry run.
    DryRunThrottle {
        retry_after_secs: u64,
    },
}

#[derive(Debug)]
struct Window {
    start_ms: u64,
    admitted: u64,
}

pub struct JoinThrottle {
    clock: Arc<dyn Clock>,
    windows: Cache<ChatId, Arc<Mutex<Window>>>,
}

impl JoinThrottle {
    pub fn new(clock: Arc<dyn Clock>, tracked_chats: u64) -> Self {
        Self {
            clock,
            windows: Cache::builder()
                .max_capacity(tracked_chats)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
        }
    }

    /// Decides one join of `chat` under `rule`, recording the decision.
    pub fn check(&self, chat: &ChatId, rule: JoinRule, decisions: &Decisions) -> JoinDecision {
        if !rule.enabled {
            return JoinDecision::Admit;
        }
        let now = self.clock.now_ms();
        let window_ms = rule.window_seconds.saturating_mul(1000);
        let entry = self.windows.get_with_by_ref(chat, || {
            Arc::new(Mutex::new(Window {
                start_ms: now,
                admitted: 0,
            }))
        });
        let mut w = entry.lock().unwrap_or_else(PoisonError::into_inner);
        if now >= w.start_ms.saturating_add(window_ms) {
            *w = Window {
                start_ms: now,
                admitted: 0,
            };
        }
        if w.admitted < rule.limit {
            w.admitted += 1;
            return JoinDecision::Admit;
        }
        let left_ms = w.start_ms.saturating_add(window_ms).saturating_sub(now);
        let retry_after_secs = left_ms.div_ceil(1000).max(1);
        drop(w);
        if rule.dry_run {
            Decisions::bump(&decisions.joins_throttled_dry_run);
            tracing::debug!(
                limit = rule.limit,
                window_seconds = rule.window_seconds,
                "join_throttled_dry_run"
            );
            JoinDecision::DryRunThrottle { retry_after_secs }
        } else {
            Decisions::bump(&decisions.joins_throttled);
            tracing::debug!(
                limit = rule.limit,
                window_seconds = rule.window_seconds,
                retry_after_secs,
                "join_throttled"
            );
            JoinDecision::Throttle { retry_after_secs }
        }
    }

    /// Chats with a tracked window (after pending maintenance).
    pub fn tracked(&self) -> u64 {
        self.windows.run_pending_tasks();
        self.windows.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::throttle::ManualClock;

    fn rule(limit: u64, window_seconds: u64) -> JoinRule {
        JoinRule {
            enabled: true,
            dry_run: false,
            limit,
            window_seconds,
        }
    }

    fn setup() -> (Arc<ManualClock>, JoinThrottle, Decisions) {
        let clock = Arc::new(ManualClock::default());
        let t = JoinThrottle::new(clock.clone(), 1000);
        (clock, t, Decisions::default())
    }

    #[test]
    fn admits_the_limit_then_refuses_until_the_window_ends() -> crate::TestResult {
        let (clock, t, d) = setup();
        let chat = ChatId::parse("c")?;
        for _ in 0..3 {
            assert_eq!(t.check(&chat, rule(3, 10), &d), JoinDecision::Admit);
        }
        assert_eq!(
            t.check(&chat, rule(3, 10), &d),
            JoinDecision::Throttle {
                retry_after_secs: 10
            }
        );
        clock.advance_ms(8_500);
        assert_eq!(
            t.check(&chat, rule(3, 10), &d),
            JoinDecision::Throttle {
                retry_after_secs: 2
            }
        );
        clock.advance_ms(1_499);
        assert_eq!(
            t.check(&chat, rule(3, 10), &d),
            JoinDecision::Throttle {
                retry_after_secs: 1
            }
        );
        // The window's last millisecond is over: a new window.
        clock.advance_ms(1);
        assert_eq!(t.check(&chat, rule(3, 10), &d), JoinDecision::Admit);
        assert_eq!(Decisions::get(&d.joins_throttled), 3);
        Ok(())
    }

    #[test]
    fn chats_and_rules_are_independent() -> crate::TestResult {
        let (_clock, t, d) = setup();
        let (a, b) = (ChatId::parse("a")?, ChatId::parse("b")?);
        assert_eq!(t.check(&a, rule(1, 10), &d), JoinDecision::Admit);
        assert!(matches!(
            t.check(&a, rule(1, 10), &d),
            JoinDecision::Throttle { .. }
        ));
        assert_eq!(t.check(&b, rule(1, 10), &d), JoinDecision::Admit);
        // A larger limit for `a` (an override) admits more at once.
        assert_eq!(t.check(&a, rule(5, 10), &d), JoinDecision::Admit);
        let off = JoinRule {
            enabled: false,
            ..rule(1, 10)
        };
        assert_eq!(t.check(&b, off, &d), JoinDecision::Admit);
        Ok(())
    }

    #[test]
    fn dry_run_admits_but_reports_exactly_what_would_be_refused() -> crate::TestResult {
        let (_clock, t, d) = setup();
        let chat = ChatId::parse("c")?;
        let dry = JoinRule {
            dry_run: true,
            ..rule(2, 10)
        };
        let decisions: Vec<_> = (0..5).map(|_| t.check(&chat, dry, &d)).collect();
        assert_eq!(decisions[..2], [JoinDecision::Admit, JoinDecision::Admit]);
        assert!(
            decisions[2..]
                .iter()
                .all(|x| matches!(x, JoinDecision::DryRunThrottle { .. }))
        );
        assert_eq!(Decisions::get(&d.joins_throttled_dry_run), 3);
        assert_eq!(Decisions::get(&d.joins_throttled), 0);
        Ok(())
    }

    #[test]
    fn admission_is_exact_under_concurrency() -> crate::TestResult {
        let (_clock, t, d) = setup();
        let (t, d) = (Arc::new(t), Arc::new(d));
        let chat = ChatId::parse("celebrity")?;
        let admitted = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..125 {
                        if t.check(&chat, rule(100, 1), &d) == JoinDecision::Admit {
                            admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.into_inner(), 100);
        assert_eq!(Decisions::get(&d.joins_throttled), 900);
        Ok(())
    }
}
