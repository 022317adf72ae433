//! Hot-chat detection: a token bucket per chat, fed by every appended event.
//!
//! The bucket holds `threshold` tokens and refills `threshold` tokens per
//! `durationSeconds`, continuously. Every event appended to the chat on this
//! instance (a message, a join, a leave) takes a token; when the bucket is
//! empty the chat is marked hot for `expireSeconds` (an empty bucket while hot
//! extends it). A hot chat's event fetches may be throttled and its pages
//! cached (see `service`); every write also advances the chat's generation,
//! which retires its cached pages.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use moka::sync::Cache;

use super::{Clock, Decisions};
use crate::domain::ChatId;
use crate::live::HotChatRule;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled_ms: u64,
    hot_until_ms: u64,
    /// When the chat's current hot stretch began.
    hot_since_ms: u64,
    /// Events in the current rate window, and when it started.
    rate_start_ms: u64,
    rate_events: u64,
    /// Events per second of the last complete rate window.
    last_rate: f64,
    /// Writes seen on this instance (and of others, by their notices); a
    /// cached page names the generation it was read at.
    generation: u64,
    /// The mark's end as last told to (or by) the fleet.
    announced_until_ms: u64,
}

impl Bucket {
    fn new(tokens: f64, now: u64) -> Self {
        Self {
            tokens,
            refilled_ms: now,
            hot_until_ms: 0,
            hot_since_ms: 0,
            rate_start_ms: now,
            rate_events: 0,
            last_rate: 0.0,
            generation: 0,
            announced_until_ms: 0,
        }
    }
}

/// A hot chat, as the admin view lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct HotChat {
    pub chat: ChatId,
    /// Milliseconds (on the detector's clock) until the mark expires.
    pub expires_in_ms: u64,
    /// Milliseconds the chat has been hot without a break.
    pub hot_for_ms: u64,
    /// Recent events per second on this instance.
    pub events_per_second: f64,
}

/// What a fetch needs to know about its chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChatHeat {
    pub hot: bool,
    pub generation: u64,
}

pub struct HotChats {
    clock: Arc<dyn Clock>,
    buckets: Cache<ChatId, Arc<Mutex<Bucket>>>,
}

impl HotChats {
    pub fn new(clock: Arc<dyn Clock>, tracked_chats: u64) -> Self {
        Self {
            clock,
            buckets: Cache::builder()
                .max_capacity(tracked_chats)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
        }
    }

    /// Records `events` appended to `chat` (and a write: the generation moves
    /// even when `events` is 0). Returns how long the chat's mark lasts when
    /// it was made, or extended by a second or more since the fleet was last
    /// told (so the other instances can be told).
    pub fn record_write(
        &self,
        chat: &ChatId,
        events: u64,
        rule: HotChatRule,
        decisions: &Decisions,
    ) -> Option<u64> {
        let now = self.clock.now_ms();
        let entry = self.buckets.get_with_by_ref(chat, || {
            Arc::new(Mutex::new(Bucket::new(rule.threshold as f64, now)))
        });
        let mut b = entry.lock().unwrap_or_else(PoisonError::into_inner);
        b.generation += 1;
        if !rule.enabled || events == 0 {
            return None;
        }
        let duration_ms = rule.duration_seconds.max(1) * 1000;
        let elapsed = now.saturating_sub(b.refilled_ms);
        let capacity = rule.threshold as f64;
        b.tokens = (b.tokens + elapsed as f64 * capacity / duration_ms as f64).min(capacity);
        b.refilled_ms = now;
        if now.saturating_sub(b.rate_start_ms) >= duration_ms {
            b.last_rate =
                b.rate_events as f64 * 1000.0 / now.saturating_sub(b.rate_start_ms).max(1) as f64;
            b.rate_start_ms = now;
            b.rate_events = 0;
        }
        b.rate_events += events;
        b.tokens -= events as f64;
        let mut announce = None;
        if b.tokens <= 0.0 {
            b.tokens = 0.0;
            let was_hot = b.hot_until_ms > now;
            if !was_hot {
                b.hot_since_ms = now;
            }
            b.hot_until_ms = now + rule.expire_seconds * 1000;
            if !rule.dry_run && b.hot_until_ms >= b.announced_until_ms + 1000 {
                b.announced_until_ms = b.hot_until_ms;
                announce = Some(rule.expire_seconds * 1000);
            }
            if !was_hot {
                Decisions::bump(if rule.dry_run {
                    &decisions.hot_chats_marked_dry_run
                } else {
                    &decisions.hot_chats_marked
                });
                // In the span of the write that emptied the bucket, which names
                // the chat; the admin view lists it.
                let (threshold, duration, expire) =
                    (rule.threshold, rule.duration_seconds, rule.expire_seconds);
                if rule.dry_run {
                    tracing::info!(
                        threshold,
                        duration_seconds = duration,
                        expire_seconds = expire,
                        "hot_chat_marked_dry_run"
                    );
                } else {
                    tracing::info!(
                        threshold,
                        duration_seconds = duration,
                        expire_seconds = expire,
                        "hot_chat_marked"
                    );
                }
            }
        }
        announce
    }

    /// Marks the chat hot for `expires_in_ms` from now, as another instance
    /// did (a mark already lasting longer stays).
    pub fn mark(&self, chat: &ChatId, expires_in_ms: u64) {
        let now = self.clock.now_ms();
        let entry = self
            .buckets
            .get_with_by_ref(chat, || Arc::new(Mutex::new(Bucket::new(0.0, now))));
        let mut b = entry.lock().unwrap_or_else(PoisonError::into_inner);
        let until = now + expires_in_ms;
        if b.hot_until_ms <= now {
            b.hot_since_ms = now;
        }
        if until > b.hot_until_ms {
            b.hot_until_ms = until;
        }
        b.announced_until_ms = b.announced_until_ms.max(until);
    }

    /// Another instance wrote to the chat: pages kept here are out of date.
    pub fn retire(&self, chat: &ChatId) {
        if let Some(entry) = self.buckets.get(chat) {
            entry
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .generation += 1;
        }
    }

    /// Whether the chat is hot now, and its generation.
    pub fn heat(&self, chat: &ChatId) -> ChatHeat {
        match self.buckets.get(chat) {
            Some(entry) => {
                let b = entry.lock().unwrap_or_else(PoisonError::into_inner);
                ChatHeat {
                    hot: b.hot_until_ms > self.clock.now_ms(),
                    generation: b.generation,
                }
            }
            None => ChatHeat {
                hot: false,
                generation: 0,
            },
        }
    }

    /// Every chat hot now.
    pub fn hot_chats(&self) -> Vec<HotChat> {
        let now = self.clock.now_ms();
        let mut out: Vec<HotChat> = self
            .buckets
            .iter()
            .filter_map(|(chat, entry)| {
                let b = entry.lock().unwrap_or_else(PoisonError::into_inner);
                (b.hot_until_ms > now).then(|| {
                    let window = now.saturating_sub(b.rate_start_ms);
                    let current = if window > 0 {
                        b.rate_events as f64 * 1000.0 / window as f64
                    } else {
                        0.0
                    };
                    HotChat {
                        chat: (*chat).clone(),
                        expires_in_ms: b.hot_until_ms - now,
                        hot_for_ms: now.saturating_sub(b.hot_since_ms),
                        events_per_second: if window >= 1000 {
                            current
                        } else {
                            b.last_rate.max(current)
                        },
                    }
                })
            })
            .collect();
        out.sort_by(|a, b| b.events_per_second.total_cmp(&a.events_per_second));
        out
    }

    /// Chats tracked (after pending maintenance).
    pub fn tracked(&self) -> u64 {
        self.buckets.run_pending_tasks();
        self.buckets.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::throttle::ManualClock;

    fn rule() -> HotChatRule {
        HotChatRule {
            enabled: true,
            dry_run: false,
            duration_seconds: 10,
            threshold: 100,
            expire_seconds: 30,
            throttle_rate: 0.5,
            cache_millis: 500,
        }
    }

    #[test]
    fn a_chat_is_hot_when_its_bucket_empties_and_cools_after_expiry() -> crate::TestResult {
        let clock = Arc::new(ManualClock::default());
        let hot = HotChats::new(clock.clone(), 1000);
        let d = Decisions::default();
        let chat = ChatId::parse("c")?;
        for _ in 0..99 {
            hot.record_write(&chat, 1, rule(), &d);
        }
        assert!(!hot.heat(&chat).hot);
        hot.record_write(&chat, 1, rule(), &d);
        assert!(hot.heat(&chat).hot);
        assert_eq!(Decisions::get(&d.hot_chats_marked), 1);
        let listed = hot.hot_chats();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].expires_in_ms, 30_000);
        assert_eq!(listed[0].hot_for_ms, 0);
        // Kept hot by more writes: the stretch goes on from its start.
        clock.advance_ms(20_000);
        hot.record_write(&chat, 100, rule(), &d);
        assert_eq!(hot.hot_chats()[0].hot_for_ms, 20_000);
        clock.advance_ms(29_999);
        assert!(hot.heat(&chat).hot);
        clock.advance_ms(1);
        assert!(!hot.heat(&chat).hot);
        assert!(hot.hot_chats().is_empty());
        // Hot again later (as told by another instance): a new stretch.
        clock.advance_ms(5_000);
        hot.mark(&chat, 10_000);
        clock.advance_ms(1_000);
        assert_eq!(hot.hot_chats()[0].hot_for_ms, 1_000);
        Ok(())
    }

    #[test]
    fn a_steady_rate_below_the_threshold_never_marks() -> crate::TestResult {
        let clock = Arc::new(ManualClock::default());
        let hot = HotChats::new(clock.clone(), 1000);
        let d = Decisions::default();
        let chat = ChatId::parse("c")?;
        // 9 events per second against 100 per 10 s: the bucket refills faster.
        for _ in 0..600 {
            clock.advance_ms(111);
            hot.record_write(&chat, 1, rule(), &d);
        }
        assert!(!hot.heat(&chat).hot);
        // A burst of 200 at once empties it.
        hot.record_write(&chat, 200, rule(), &d);
        assert!(hot.heat(&chat).hot);
        Ok(())
    }

    #[test]
    fn writes_advance_the_generation_and_disabled_rules_never_mark() -> crate::TestResult {
        let clock = Arc::new(ManualClock::default());
        let hot = HotChats::new(clock, 1000);
        let d = Decisions::default();
        let chat = ChatId::parse("c")?;
        let off = HotChatRule {
            enabled: false,
            ..rule()
        };
        hot.record_write(&chat, 1000, off, &d);
        let heat = hot.heat(&chat);
        assert!(!heat.hot);
        assert_eq!(heat.generation, 1);
        hot.record_write(&chat, 0, rule(), &d);
        assert_eq!(hot.heat(&chat).generation, 2);
        Ok(())
    }
}
