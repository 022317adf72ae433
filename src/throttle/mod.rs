//! Hot-chat protection, in-process: join throttling, hot-chat detection and
//! event-fetch throttling, and fetch coalescing.
//!
//! Everything here decides locally, before any database work, with no network
//! hop and no delay: a throttle that learns of a spike a second late (one fed
//! by a message queue, say) has already let a 2,000 joins/s spike reach its
//! shard. State lives in bounded moka caches keyed by chat, with idle expiry, so
//! millions of quiet chats cost a bounded amount of memory; the hot path takes
//! no global lock (moka's sharded map, then one small mutex per chat).
//!
//! Time comes from a [`Clock`], so tests run on a manual clock.
//!
//! - [`join`]: at most `limit` accepted joins per chat per window.
//! - [`hot`]: a token bucket per chat fed by every appended event; an empty
//!   bucket marks the chat hot for `expireSeconds`.
//! - [`fetch`]: whether an event fetch of a hot chat is served or throttled,
//!   and how long its page may be kept.
//! - [`pages`]: concurrent identical event fetches share one query; a hot
//!   chat's pages are kept briefly, until the next write on this instance.
//!
//! Nothing here knows what a page holds or where it comes from: the caches are
//! generic, and the service owns the page cache of its event pages.

pub mod clock;
pub mod fetch;
pub mod hot;
pub mod join;
pub mod pages;

use std::sync::atomic::{AtomicU64, Ordering};

pub use clock::{Clock, ManualClock, SystemClock};

/// Decisions made, by kind (dry-run decisions counted apart).
#[derive(Debug, Default)]
pub struct Decisions {
    pub joins_throttled: AtomicU64,
    pub joins_throttled_dry_run: AtomicU64,
    pub fetches_throttled: AtomicU64,
    pub fetches_throttled_dry_run: AtomicU64,
    pub hot_chats_marked: AtomicU64,
    pub hot_chats_marked_dry_run: AtomicU64,
    /// Isolation moves started by this instance, and chats a dry run would
    /// have moved.
    pub chats_isolated: AtomicU64,
    pub chats_isolated_dry_run: AtomicU64,
    /// Rounds where a chat due for isolation waited: its source shard had a
    /// move running, or its hourly budget was spent.
    pub isolations_deferred: AtomicU64,
    /// Event fetches asked for.
    pub fetches: AtomicU64,
    /// Event-page queries sent to the shards.
    pub fetch_queries: AtomicU64,
    /// Event fetches served without a query of their own (a concurrent
    /// identical fetch's, or a kept page).
    pub fetches_coalesced: AtomicU64,
    /// Event fetches answered by the chat's tail as it stood.
    pub tail_hits: AtomicU64,
    /// Event fetches answered by the tail after one refresh of it.
    pub tail_misses: AtomicU64,
    /// Event fetches further behind than the tail: read from the log.
    pub tail_behind: AtomicU64,
    /// Queries of the tail refresher (the latest revisions of up to 500
    /// waited-on chats of one shard each).
    pub tail_revision_polls: AtomicU64,
}

impl Decisions {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// The protection state of this instance.
pub struct Throttle {
    pub joins: join::JoinThrottle,
    pub hot: hot::HotChats,
    pub decisions: Decisions,
}

impl Throttle {
    pub fn new(
        clock: std::sync::Arc<dyn Clock>,
        settings: &crate::config::ThrottleSettings,
    ) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            joins: join::JoinThrottle::new(clock.clone(), settings.tracked_chats),
            hot: hot::HotChats::new(clock, settings.tracked_chats),
            decisions: Decisions::default(),
        })
    }

    /// Decides one event fetch of `chat` under `rule` (see [`fetch`]).
    pub fn check_fetch(
        &self,
        chat: &crate::domain::ChatId,
        rule: crate::live::HotChatRule,
    ) -> fetch::FetchDecision {
        let heat = self.hot.heat(chat);
        fetch::decide(
            rule,
            heat,
            fetch::Draw {
                throttle: rand::random::<f64>(),
                retry_after_secs: rand::random_range(1..=3),
            },
            &self.decisions,
        )
    }
}
