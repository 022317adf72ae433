//! Event-fetch throttling of hot chats, decided before any database work.
//!
//! A fetch of a chat that is hot (and whose rule is enabled) is refused with
//! probability `throttleRate`, with a jittered `Retry-After` of 1 to 3 seconds
//! so the refused clients do not all come back at once; in dry run the
//! decision is only counted and logged. A served fetch of a hot chat may be
//! kept for `cacheMillis`; an ordinary chat's is only coalesced. The decision
//! is pure given its random draw, so it is tested without chance.

use std::time::Duration;

use super::Decisions;
use super::hot::ChatHeat;
use crate::live::HotChatRule;

/// What to do with one event fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchDecision {
    /// Serve it; the page may be kept for `keep`, under `generation` (the
    /// chat's write generation on this instance).
    Serve { keep: Duration, generation: u64 },
    /// Refuse it with 429 `fetch_throttled`.
    Throttle { retry_after_secs: u64 },
}

/// The chance taken by one decision.
#[derive(Debug, Clone, Copy)]
pub struct Draw {
    /// Uniform in `0..1`: the fetch is throttled when below `throttleRate`.
    pub throttle: f64,
    /// The `Retry-After` given if it is.
    pub retry_after_secs: u64,
}

/// Decides one fetch, counting it (and a throttling decision) in `decisions`.
pub fn decide(
    rule: HotChatRule,
    heat: ChatHeat,
    draw: Draw,
    decisions: &Decisions,
) -> FetchDecision {
    Decisions::bump(&decisions.fetches);
    let hot = rule.enabled && heat.hot;
    if hot && rule.throttle_rate > 0.0 && draw.throttle < rule.throttle_rate {
        let retry_after_secs = draw.retry_after_secs;
        if rule.dry_run {
            Decisions::bump(&decisions.fetches_throttled_dry_run);
            tracing::debug!(
                throttle_rate = rule.throttle_rate,
                "fetch_throttled_dry_run"
            );
        } else {
            Decisions::bump(&decisions.fetches_throttled);
            tracing::debug!(
                throttle_rate = rule.throttle_rate,
                retry_after_secs,
                "fetch_throttled"
            );
            return FetchDecision::Throttle { retry_after_secs };
        }
    }
    let keep = if hot {
        Duration::from_millis(rule.cache_millis)
    } else {
        Duration::ZERO
    };
    FetchDecision::Serve {
        keep,
        generation: heat.generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::LiveConfig;

    fn rule() -> HotChatRule {
        let chat = crate::domain::ChatId::parse("c").map_err(|e| e.0);
        LiveConfig::default().hot_chat_rule(&chat.unwrap_or_else(|e| panic!("{e}")))
    }

    const HOT: ChatHeat = ChatHeat {
        hot: true,
        generation: 7,
    };
    const COLD: ChatHeat = ChatHeat {
        hot: false,
        generation: 7,
    };

    fn draw(throttle: f64) -> Draw {
        Draw {
            throttle,
            retry_after_secs: 2,
        }
    }

    #[test]
    fn a_hot_chat_is_throttled_at_its_rate_and_its_pages_kept() {
        let d = Decisions::default();
        let r = HotChatRule {
            throttle_rate: 0.5,
            ..rule()
        };
        assert_eq!(
            decide(r, HOT, draw(0.49), &d),
            FetchDecision::Throttle {
                retry_after_secs: 2
            }
        );
        assert_eq!(
            decide(r, HOT, draw(0.5), &d),
            FetchDecision::Serve {
                keep: Duration::from_millis(r.cache_millis),
                generation: 7
            }
        );
        assert_eq!(Decisions::get(&d.fetches), 2);
        assert_eq!(Decisions::get(&d.fetches_throttled), 1);
    }

    #[test]
    fn cold_chats_dry_runs_and_disabled_rules_are_served() {
        let d = Decisions::default();
        let r = HotChatRule {
            throttle_rate: 1.0,
            ..rule()
        };
        let served = |decision| matches!(decision, FetchDecision::Serve { .. });
        assert_eq!(
            decide(r, COLD, draw(0.0), &d),
            FetchDecision::Serve {
                keep: Duration::ZERO,
                generation: 7
            }
        );
        assert!(served(decide(
            HotChatRule { dry_run: true, ..r },
            HOT,
            draw(0.0),
            &d
        )));
        assert!(served(decide(
            HotChatRule {
                enabled: false,
                ..r
            },
            HOT,
            draw(0.0),
            &d
        )));
        assert_eq!(Decisions::get(&d.fetches_throttled), 0);
        assert_eq!(Decisions::get(&d.fetches_throttled_dry_run), 1);
    }
}
