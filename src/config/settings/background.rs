//! Work that runs beside requests: online chat moves (`[moves]`), the purge
//! of old events (`[purge]`) and the digest check that repairs drift
//! (`[digest]`).
//!
//! Invariants: the defaults here are the documented ones (a change is a
//! behaviour change); plain data, no helpers that could disagree with the
//! code that runs the work.
//!
//! Must not: import `crate::service` (it takes these structs), or check
//! values (`config::validate` does).

use serde::{Deserialize, Serialize};

/// How chat moves copy, fence and recover (see `docs/moving-chats.md`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MovesSettings {
    /// Revisions replayed on the target per transaction (at most 5,000).
    pub batch_revisions: u32,
    /// The copy fences the source once it is at most this many revisions
    /// behind.
    pub fence_lag: u64,
    /// How long the fence holds the chat's writes at most (503 `chat_moving`).
    pub fence_ms: u64,
    /// A pause between two copy or clean-up batches.
    pub pause_ms: u64,
    /// The copy slows down (its pause doubles, up to `max_pause_ms`) while the
    /// p99 latency of the source's calls, or of this instance's requests of
    /// the source's other chats, is above this many times what it was before
    /// the copy started; 0 turns that off.
    pub max_p99_ratio: f64,
    /// The longest pause the p99 throttle lets the copy take between batches
    /// (cut to a quarter of `lease_ms`, so a paused copy keeps its lease).
    pub max_pause_ms: u64,
    /// At most this many revisions copied per second (0: no cap).
    pub revisions_per_second: u32,
    /// Rows deleted per statement when the source is cleaned.
    pub clean_batch: u32,
    /// A running move whose record has not changed for this long is taken
    /// for abandoned and finished or rolled back by any instance.
    pub lease_ms: u64,
    /// A write that meets a move's fence waits up to this long for the
    /// switch (checking again every 20 ms) before it is answered 503
    /// `chat_moving`; 0 answers at once.
    pub hold_writes_ms: u64,
    /// A bucket-range move's copy batches in flight at once (each batch
    /// many chats); the name is from when a range moved chat by chat.
    pub concurrent_chats: u32,
    /// How often every instance reads the newest version of the bucket
    /// table from the shards (and at once when a shard names another owner).
    pub map_poll_ms: u64,
}

impl Default for MovesSettings {
    fn default() -> Self {
        Self {
            batch_revisions: 1000,
            fence_lag: 500,
            fence_ms: 2000,
            pause_ms: 5,
            max_p99_ratio: 1.2,
            max_pause_ms: 1000,
            revisions_per_second: 20_000,
            clean_batch: 1000,
            lease_ms: 30_000,
            hold_writes_ms: 800,
            concurrent_chats: 4,
            map_poll_ms: 1000,
        }
    }
}

/// How the background purge deletes old events (the policy itself is the
/// live `retention` section). Each shard is purged by its own task, through
/// its bulkhead like any other work, at most `rows_per_second` rows a
/// second, `batch_rows` per statement; a shard whose breaker is open is
/// skipped until the next round.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PurgeSettings {
    /// Time between two purge rounds of a shard.
    pub interval_ms: u64,
    /// Events deleted per statement at most.
    pub batch_rows: u32,
    /// Events deleted per second per shard at most.
    pub rows_per_second: u32,
}

impl Default for PurgeSettings {
    fn default() -> Self {
        Self {
            interval_ms: 300_000,
            batch_rows: 1000,
            rows_per_second: 5000,
        }
    }
}

/// The periodic digest check (docs/event-log.md): every `interval_ms`, each
/// shard's chats that changed since they were last checked have their
/// member count compared with their JOINED rows and their revision with
/// their stored events, and a mismatch is repaired under the chat's lock.
/// Every `full_sweep_rounds` rounds every chat is checked, changed or not.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DigestSettings {
    /// Whether the check runs.
    pub enabled: bool,
    /// Time between two rounds of a shard.
    pub interval_ms: u64,
    /// Chats checked per second per shard at most.
    pub chats_per_second: u32,
    /// Every this many rounds, a round checks every chat (1 = every round).
    pub full_sweep_rounds: u32,
}

impl Default for DigestSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_ms: 60_000,
            chats_per_second: 500,
            full_sweep_rounds: 1440,
        }
    }
}
