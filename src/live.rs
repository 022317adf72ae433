//! Live configuration: the settings that change without a restart.
//!
//! The live section (`hot_chat`, `join_throttle`) is validated as a whole and
//! swapped atomically: the request path reads the current snapshot with one
//! atomic load and never takes a lock, and a rejected update (through
//! `PUT /v1/admin/config` or an edited file) leaves the previous snapshot in
//! place. Every accepted change increments the version.
//!
//! Field names are camelCase in JSON; the TOML file also accepts snake_case.
//! Per-chat overrides replace any subset of a section's fields for one chat.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::ChatId;

/// Hot-chat detection and event-fetch throttling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HotChatConfig {
    /// Detect hot chats at all.
    pub enabled: bool,
    /// Record throttling decisions (log, counters) but serve every fetch.
    #[serde(alias = "dry_run")]
    pub dry_run: bool,
    /// The bucket refills `threshold` tokens every `durationSeconds`.
    #[serde(alias = "duration_seconds")]
    #[schema(minimum = 1, maximum = 3600)]
    pub duration_seconds: u64,
    /// Events (messages, joins, leaves) per `durationSeconds` before a chat is hot.
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    pub threshold: u64,
    /// How long a chat stays hot once marked.
    #[serde(alias = "expire_seconds")]
    #[schema(minimum = 1, maximum = 86_400)]
    pub expire_seconds: u64,
    /// Fraction (0..=1) of a hot chat's event fetches answered 429 `fetch_throttled`.
    #[serde(alias = "throttle_rate")]
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub throttle_rate: f64,
    /// How long a hot chat's fetched pages are kept (0 = coalescing only).
    #[serde(alias = "cache_millis")]
    #[schema(minimum = 0, maximum = 60_000)]
    pub cache_millis: u64,
    /// Per-chat replacements of any of the fields above, by chatId.
    pub overrides: HashMap<String, HotChatOverride>,
}

impl Default for HotChatConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dry_run: false,
            duration_seconds: 10,
            threshold: 1000,
            expire_seconds: 60,
            throttle_rate: 0.5,
            cache_millis: 500,
            overrides: HashMap::new(),
        }
    }
}

/// Per-chat replacement of hot-chat fields.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HotChatOverride {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(alias = "dry_run", skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
    #[serde(alias = "duration_seconds", skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 3600)]
    pub duration_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    pub threshold: Option<u64>,
    #[serde(alias = "expire_seconds", skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 86_400)]
    pub expire_seconds: Option<u64>,
    #[serde(alias = "throttle_rate", skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub throttle_rate: Option<f64>,
    #[serde(alias = "cache_millis", skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 60_000)]
    pub cache_millis: Option<u64>,
}

/// Join throttling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct JoinThrottleConfig {
    pub enabled: bool,
    /// Record throttling decisions but admit every join.
    #[serde(alias = "dry_run")]
    pub dry_run: bool,
    /// Joins accepted per chat per window, on this instance.
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    pub limit: u64,
    #[serde(alias = "window_seconds")]
    #[schema(minimum = 1, maximum = 3600)]
    pub window_seconds: u64,
    /// Per-chat replacements of any of the fields above, by chatId.
    pub overrides: HashMap<String, JoinThrottleOverride>,
}

impl Default for JoinThrottleConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dry_run: false,
            limit: 500,
            window_seconds: 1,
            overrides: HashMap::new(),
        }
    }
}

/// Per-chat replacement of join-throttle fields.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinThrottleOverride {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(alias = "dry_run", skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    pub limit: Option<u64>,
    #[serde(alias = "window_seconds", skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 3600)]
    pub window_seconds: Option<u64>,
}

/// Event streams (SSE) of this instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct StreamsConfig {
    /// Open streams at most on this instance; one more is refused with 503
    /// `too_many_subscribers`.
    #[serde(alias = "max_subscribers")]
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub max_subscribers: u64,
    /// Open streams of one chat at most on this instance.
    #[serde(alias = "max_per_chat")]
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub max_per_chat: u64,
    /// Seconds between keep-alive comments on an idle stream.
    #[serde(alias = "keep_alive_seconds")]
    #[schema(minimum = 1, maximum = 300)]
    pub keep_alive_seconds: u64,
    /// A chat's event stream writes to its connection at most once per this
    /// many milliseconds: the events published meanwhile go out together, in
    /// one write. Fewer writes per delivered event on a busy chat, for up to
    /// this much more delay; a quiet chat's event goes out at once. 0: every
    /// event as soon as it is read. Multiplexed streams do not batch.
    #[serde(alias = "batch_ms")]
    #[schema(minimum = 0, maximum = 1000)]
    pub batch_ms: u64,
    /// Chats one multiplexed stream may follow at most; one more is refused
    /// with 429 `too_many_chats_in_stream`.
    #[serde(alias = "max_chats_per_stream")]
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub max_chats_per_stream: u64,
    /// A chat of a multiplexed stream more than this many revisions behind
    /// gets a `resync` event (fetch the gap with `GET …/events`) instead of
    /// the backlog; 0 = always send the backlog.
    #[serde(alias = "resync_revisions")]
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub resync_revisions: u64,
    /// How long a multiplexed stream with no connection is kept for a
    /// reconnect to resume it.
    #[serde(alias = "resume_seconds")]
    #[schema(minimum = 1, maximum = 86_400)]
    pub resume_seconds: u64,
    /// How many recent messages of a multiplexed stream a reconnect can
    /// resume after (`Last-Event-ID`); older ids are refused with 410.
    #[serde(alias = "resume_messages")]
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub resume_messages: u64,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        Self {
            max_subscribers: 20_000,
            max_per_chat: 10_000,
            keep_alive_seconds: 15,
            batch_ms: 50,
            max_chats_per_stream: 10_000,
            resync_revisions: 1_000,
            resume_seconds: 120,
            resume_messages: 10_000,
        }
    }
}

/// How long the event log keeps each chat's events (docs/event-log.md). An
/// event is purged only when it is older than `minDays` days **and** not
/// among the chat's last `minRevisions` revisions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Whether the background purge runs.
    pub enabled: bool,
    /// Events younger than this many days are kept (0 = no age floor).
    #[serde(alias = "min_days")]
    #[schema(minimum = 0, maximum = 36500)]
    pub min_days: u64,
    /// Each chat's last this many revisions are kept, however old.
    #[serde(alias = "min_revisions")]
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub min_revisions: u64,
    /// Per-chat replacements of any of the fields above, by chatId.
    pub overrides: HashMap<String, RetentionOverride>,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            min_days: 30,
            min_revisions: 10_000,
            overrides: HashMap::new(),
        }
    }
}

/// Per-chat replacement of retention fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetentionOverride {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(alias = "min_days", skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 36500)]
    pub min_days: Option<u64>,
    #[serde(alias = "min_revisions", skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub min_revisions: Option<u64>,
}

/// The effective retention of one chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionRule {
    pub enabled: bool,
    pub min_days: u64,
    pub min_revisions: u64,
}

/// Automatic isolation (docs/moving-chats.md): a chat hot for
/// `afterSeconds` is moved to `shard`, at most one move at a time per source
/// shard and `movesPerHour` per source shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct IsolationConfig {
    /// Whether hot chats are moved (or, with `dryRun`, counted).
    pub enabled: bool,
    /// Only log and count the moves it would start.
    #[serde(alias = "dry_run")]
    pub dry_run: bool,
    /// The shard hot chats move to (a configured shard's name; empty:
    /// nothing is isolated).
    pub shard: String,
    /// How long a chat must have stayed hot.
    #[serde(alias = "after_seconds")]
    #[schema(minimum = 1, maximum = 86_400)]
    pub after_seconds: u64,
    /// At most this many isolation moves start per source shard per hour.
    #[serde(alias = "moves_per_hour")]
    #[schema(minimum = 1, maximum = 3600)]
    pub moves_per_hour: u32,
}

impl Default for IsolationConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            dry_run: false,
            shard: String::new(),
            after_seconds: 300,
            moves_per_hour: 4,
        }
    }
}

/// The live section as a whole.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LiveConfig {
    #[serde(alias = "hot_chat")]
    pub hot_chat: HotChatConfig,
    #[serde(alias = "join_throttle")]
    pub join_throttle: JoinThrottleConfig,
    pub streams: StreamsConfig,
    pub retention: RetentionConfig,
    pub isolation: IsolationConfig,
}

/// The effective hot-chat settings of one chat.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HotChatRule {
    pub enabled: bool,
    pub dry_run: bool,
    pub duration_seconds: u64,
    pub threshold: u64,
    pub expire_seconds: u64,
    pub throttle_rate: f64,
    pub cache_millis: u64,
}

/// The effective join-throttle settings of one chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinRule {
    pub enabled: bool,
    pub dry_run: bool,
    pub limit: u64,
    pub window_seconds: u64,
}

impl LiveConfig {
    pub fn hot_chat_rule(&self, chat: &ChatId) -> HotChatRule {
        let c = &self.hot_chat;
        let o = c.overrides.get(chat.as_str()).cloned().unwrap_or_default();
        HotChatRule {
            enabled: o.enabled.unwrap_or(c.enabled),
            dry_run: o.dry_run.unwrap_or(c.dry_run),
            duration_seconds: o.duration_seconds.unwrap_or(c.duration_seconds),
            threshold: o.threshold.unwrap_or(c.threshold),
            expire_seconds: o.expire_seconds.unwrap_or(c.expire_seconds),
            throttle_rate: o.throttle_rate.unwrap_or(c.throttle_rate),
            cache_millis: o.cache_millis.unwrap_or(c.cache_millis),
        }
    }

    pub fn join_rule(&self, chat: &ChatId) -> JoinRule {
        let c = &self.join_throttle;
        let o = c.overrides.get(chat.as_str()).cloned().unwrap_or_default();
        JoinRule {
            enabled: o.enabled.unwrap_or(c.enabled),
            dry_run: o.dry_run.unwrap_or(c.dry_run),
            limit: o.limit.unwrap_or(c.limit),
            window_seconds: o.window_seconds.unwrap_or(c.window_seconds),
        }
    }

    pub fn retention_rule(&self, chat: &str) -> RetentionRule {
        let c = &self.retention;
        let o = c.overrides.get(chat).cloned().unwrap_or_default();
        RetentionRule {
            enabled: o.enabled.unwrap_or(c.enabled),
            min_days: o.min_days.unwrap_or(c.min_days),
            min_revisions: o.min_revisions.unwrap_or(c.min_revisions),
        }
    }

    /// Every problem of the section, each naming its field (an override is
    /// checked for the fields it sets).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let r = &self.retention;
        check_retention("retention", Some(r.min_days), Some(r.min_revisions), &mut p);
        for (chat, o) in &r.overrides {
            let at = format!("retention.overrides.{chat}");
            if ChatId::parse(chat).is_err() {
                p.push(format!("{at}: not a valid chatId"));
            }
            check_retention(&at, o.min_days, o.min_revisions, &mut p);
        }
        let st = &self.streams;
        for (name, value, max) in [
            ("streams.maxSubscribers", st.max_subscribers, 1_000_000),
            ("streams.maxPerChat", st.max_per_chat, 1_000_000),
            ("streams.keepAliveSeconds", st.keep_alive_seconds, 300),
            (
                "streams.maxChatsPerStream",
                st.max_chats_per_stream,
                1_000_000,
            ),
            ("streams.resumeSeconds", st.resume_seconds, 86_400),
            ("streams.resumeMessages", st.resume_messages, 1_000_000),
        ] {
            if !(1..=max).contains(&value) {
                p.push(format!("{name} must be between 1 and {max}"));
            }
        }
        if st.batch_ms > 1000 {
            p.push("streams.batchMs must be between 0 and 1000".to_owned());
        }
        if st.resync_revisions > 1_000_000_000 {
            p.push("streams.resyncRevisions must be between 0 and 1000000000".to_owned());
        }
        let i = &self.isolation;
        if !(1..=86_400).contains(&i.after_seconds) {
            p.push("isolation.afterSeconds must be between 1 and 86400".to_owned());
        }
        if !(1..=3600).contains(&i.moves_per_hour) {
            p.push("isolation.movesPerHour must be between 1 and 3600".to_owned());
        }
        let h = &self.hot_chat;
        check_hot_chat(
            "hotChat",
            &HotChatOverride {
                enabled: None,
                dry_run: None,
                duration_seconds: Some(h.duration_seconds),
                threshold: Some(h.threshold),
                expire_seconds: Some(h.expire_seconds),
                throttle_rate: Some(h.throttle_rate),
                cache_millis: Some(h.cache_millis),
            },
            &mut p,
        );
        for (chat, o) in &h.overrides {
            let at = format!("hotChat.overrides.{chat}");
            if ChatId::parse(chat).is_err() {
                p.push(format!("{at}: not a valid chatId"));
            }
            check_hot_chat(&at, o, &mut p);
        }
        let j = &self.join_throttle;
        check_join(
            "joinThrottle",
            Some(j.limit),
            Some(j.window_seconds),
            &mut p,
        );
        for (chat, o) in &j.overrides {
            let at = format!("joinThrottle.overrides.{chat}");
            if ChatId::parse(chat).is_err() {
                p.push(format!("{at}: not a valid chatId"));
            }
            check_join(&at, o.limit, o.window_seconds, &mut p);
        }
        p
    }
}

/// The largest `threshold` and `limit`: far above any real rate, and within
/// what every JSON client can represent exactly.
const MAX_COUNT: u64 = 1_000_000_000;

fn check_hot_chat(at: &str, v: &HotChatOverride, p: &mut Vec<String>) {
    if v.duration_seconds.is_some_and(|d| !(1..=3600).contains(&d)) {
        p.push(format!("{at}.durationSeconds must be between 1 and 3600"));
    }
    if v.threshold.is_some_and(|t| !(1..=MAX_COUNT).contains(&t)) {
        p.push(format!("{at}.threshold must be between 1 and {MAX_COUNT}"));
    }
    if v.expire_seconds.is_some_and(|e| !(1..=86_400).contains(&e)) {
        p.push(format!("{at}.expireSeconds must be between 1 and 86400"));
    }
    if v.throttle_rate.is_some_and(|r| !(0.0..=1.0).contains(&r)) {
        p.push(format!("{at}.throttleRate must be between 0 and 1"));
    }
    if v.cache_millis.is_some_and(|c| c > 60_000) {
        p.push(format!("{at}.cacheMillis must be at most 60000"));
    }
}

fn check_retention(at: &str, days: Option<u64>, revisions: Option<u64>, p: &mut Vec<String>) {
    if days.is_some_and(|d| d > 36_500) {
        p.push(format!("{at}.minDays must be between 0 and 36500"));
    }
    if revisions.is_some_and(|r| r > MAX_COUNT) {
        p.push(format!(
            "{at}.minRevisions must be between 0 and {MAX_COUNT}"
        ));
    }
}

fn check_join(at: &str, limit: Option<u64>, window: Option<u64>, p: &mut Vec<String>) {
    if limit.is_some_and(|l| !(1..=MAX_COUNT).contains(&l)) {
        p.push(format!("{at}.limit must be between 1 and {MAX_COUNT}"));
    }
    if window.is_some_and(|w| !(1..=3600).contains(&w)) {
        p.push(format!("{at}.windowSeconds must be between 1 and 3600"));
    }
}

/// Why an update was not applied.
#[derive(Debug)]
pub enum UpdateError<E> {
    /// The next config could not be built.
    Build(E),
    /// It was built, and breaks these rules.
    Invalid(Vec<String>),
}

/// A live snapshot and its version.
#[derive(Debug)]
pub struct Snapshot {
    pub version: u64,
    pub config: LiveConfig,
}

/// The live configuration of this instance.
#[derive(Debug)]
pub struct Live {
    current: ArcSwap<Snapshot>,
    /// Serialises writers, so versions and contents only move forward; readers
    /// never take it.
    writer: Mutex<()>,
}

impl Live {
    /// Starts at version 1; the initial config must already be valid.
    pub fn new(config: LiveConfig) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(Snapshot { version: 1, config }),
            writer: Mutex::new(()),
        })
    }

    /// The current snapshot: one atomic load, no lock.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Validates and swaps in a new config; on error the old one stays.
    pub fn update(&self, config: LiveConfig, source: &str) -> Result<Arc<Snapshot>, Vec<String>> {
        self.update_with(source, |_| Ok::<_, std::convert::Infallible>(config))
            .map_err(|e| match e {
                UpdateError::Invalid(problems) => problems,
                UpdateError::Build(never) => match never {},
            })
    }

    /// Builds the next config from the current one (a merge patch, say) and
    /// swaps it in if valid; on any error the current one stays.
    ///
    /// Writers take turns: each reads the current snapshot, builds and stores
    /// its successor under the writer lock, so the stored version is always
    /// the highest ever returned and carries the content returned with it, and
    /// no concurrent change is lost between reading and writing.
    pub fn update_with<E>(
        &self,
        source: &str,
        build: impl FnOnce(&LiveConfig) -> Result<LiveConfig, E>,
    ) -> Result<Arc<Snapshot>, UpdateError<E>> {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.current.load_full();
        let config = build(&current.config).map_err(UpdateError::Build)?;
        let problems = config.problems();
        if !problems.is_empty() {
            tracing::warn!(source, problems = ?problems, "live configuration rejected; the previous one stays");
            return Err(UpdateError::Invalid(problems));
        }
        if current.config == config {
            return Ok(current);
        }
        let version = current.version + 1;
        let next = Arc::new(Snapshot { version, config });
        // Tests widen the window between choosing a version and publishing it,
        // where unserialised writers used to overtake each other.
        #[cfg(test)]
        std::thread::yield_now();
        self.current.store(next.clone());
        tracing::info!(source, version, "live configuration changed");
        Ok(next)
    }

    /// Installs a configuration under a version decided elsewhere (the
    /// fleet's), if that version is newer than the current one and the
    /// configuration is valid; returns whether it was installed.
    pub fn install(&self, version: u64, config: LiveConfig, source: &str) -> bool {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.current.load_full();
        if version <= current.version {
            return false;
        }
        let problems = config.problems();
        if !problems.is_empty() {
            tracing::warn!(source, version, problems = ?problems, "live configuration rejected; the previous one stays");
            return false;
        }
        self.current.store(Arc::new(Snapshot { version, config }));
        tracing::info!(source, version, "live configuration changed");
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_overrides_apply_per_chat() -> crate::TestResult {
        let mut c = LiveConfig::default();
        assert!(c.problems().is_empty());
        c.join_throttle.overrides.insert(
            "vip".into(),
            JoinThrottleOverride {
                limit: Some(5),
                ..Default::default()
            },
        );
        let vip = ChatId::parse("vip")?;
        let other = ChatId::parse("other")?;
        assert_eq!(c.join_rule(&vip).limit, 5);
        assert_eq!(
            c.join_rule(&vip).window_seconds,
            c.join_throttle.window_seconds
        );
        assert_eq!(c.join_rule(&other).limit, c.join_throttle.limit);
        Ok(())
    }

    #[test]
    fn every_problem_is_listed_and_the_old_config_stays() -> crate::TestResult {
        let live = Live::new(LiveConfig::default());
        let mut bad = LiveConfig::default();
        bad.hot_chat.throttle_rate = 1.5;
        bad.hot_chat.threshold = 0;
        bad.join_throttle.limit = 0;
        bad.join_throttle
            .overrides
            .insert("bad id!".into(), JoinThrottleOverride::default());
        let problems = live.update(bad, "test").unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert_eq!(live.load().version, 1);
        assert_eq!(live.load().config, LiveConfig::default());

        let mut good = LiveConfig::default();
        good.hot_chat.dry_run = true;
        assert_eq!(
            live.update(good.clone(), "test")
                .map_err(|p| p.join("; "))?
                .version,
            2
        );
        // The same config again is no change.
        assert_eq!(
            live.update(good, "test").map_err(|p| p.join("; "))?.version,
            2
        );
        Ok(())
    }

    /// Many writers at once: whatever order they finish in, the snapshot left
    /// current is the one with the highest version any of them was given, and
    /// a reader never sees the version go backwards.
    #[test]
    fn concurrent_updates_never_move_the_version_backwards() -> crate::TestResult {
        const WRITERS: u64 = 4;
        const UPDATES: u64 = 2000;
        let live = Live::new(LiveConfig::default());
        let done = std::sync::atomic::AtomicBool::new(false);
        let returned = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut last = 0;
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    let v = live.load().version;
                    assert!(v >= last, "version went back from {last} to {v}");
                    last = v;
                }
            });
            let writers: Vec<_> = (0..WRITERS)
                .map(|w| {
                    let live = &live;
                    s.spawn(move || {
                        (0..UPDATES)
                            .map(|i| {
                                let mut c = LiveConfig::default();
                                c.join_throttle.limit = 1 + w * UPDATES + i;
                                live.update(c, "test")
                                    .map(|s| (s.version, s.config.join_throttle.limit))
                            })
                            .collect::<Result<Vec<_>, _>>()
                    })
                })
                .collect();
            let all: Vec<_> = writers.into_iter().map(|w| w.join()).collect();
            done.store(true, std::sync::atomic::Ordering::Release);
            reader.join().map_err(|_| "reader panicked")?;
            Ok::<_, Box<dyn std::error::Error>>(all)
        })?;
        let mut highest = (0, 0);
        for writer in returned {
            for (version, limit) in writer
                .map_err(|_| "writer panicked")?
                .map_err(|p| p.join("; "))?
            {
                highest = highest.max((version, limit));
            }
        }
        let current = live.load();
        assert_eq!(current.version, 1 + WRITERS * UPDATES);
        assert_eq!(
            (current.version, current.config.join_throttle.limit),
            highest
        );
        Ok(())
    }

    #[test]
    fn toml_takes_snake_case_and_json_camel_case() -> crate::TestResult {
        let from_toml: LiveConfig =
            toml::from_str("[hot_chat]\ndry_run = true\n[join_throttle]\nwindow_seconds = 5\n")?;
        assert!(from_toml.hot_chat.dry_run);
        assert_eq!(from_toml.join_throttle.window_seconds, 5);
        let from_json: LiveConfig = serde_json::from_str(
            r#"{"hotChat":{"dryRun":true},"joinThrottle":{"windowSeconds":5}}"#,
        )?;
        assert_eq!(from_json, from_toml);
        assert!(serde_json::from_str::<LiveConfig>(r#"{"hotChat":{"colour":1}}"#).is_err());
        Ok(())
    }
}
