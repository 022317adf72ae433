//! The fleet: what the instances of one deployment share through Redis, so
//! that several instances behind a load balancer behave as one service.
//!
//! - **Event notices.** After each commit an instance publishes a notice on
//!   the chat's channel (its revisions, and its events when small). Only the
//!   instances with a tail of that chat subscribe to it; they feed the tail,
//!   wake its readers and retire the chat's kept pages. Notices are hints: the
//!   log in the shard stays the truth, a missed notice is made up by the next
//!   one, by the tail refresher or by a read. A purge sends a notice of its
//!   own on the same channel (the chat's new first revision), so that every
//!   instance's tail drops the purged events at once; without it, the next
//!   refresh of each tail learns the new floor.
//! - **Hot marks.** A chat marked hot on one instance is marked on every
//!   instance, with the same expiry (one message on the fleet channel).
//! - **The global join limit** of a chat ([`leases`]).
//! - **Live instances.** Each instance says it is alive every
//!   `redis.heartbeat_ms`; the ones heard of within `redis.instance_ttl_ms` are
//!   listed in the admin view, and their number sizes each instance's local
//!   share of a join limit while Redis is away.
//! - **The live configuration.** A change on any instance is stored in Redis
//!   with the next fleet-wide version and applied by every instance.
//!
//! Redis is protected like a shard: every call has a deadline
//! (`redis.timeout_ms`) and goes through Redis's own breaker. No request ever
//! waits for Redis: publishing goes through a bounded queue, lease requests run
//! in the background, and the admin configuration change waits at most one
//! deadline. Without Redis (down, slow, breaker open) each feature falls back
//! to what one instance does alone, the admin view and a metric say so, and
//! when Redis answers again the instance resubscribes, distrusts its tails
//! and reconciles the configuration.

mod conn;
pub mod leases;
pub mod wire;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use conn::Conn;
pub use conn::Target;
pub use wire::InstanceInfo;
use wire::{Bus, Names, Notice, Purge};

use crate::config::RedisSettings;
use crate::domain::ChatId;
use crate::domain::Event;
use crate::live::{JoinRule, Live, LiveConfig};
use crate::shard::Breaker;
use crate::throttle::Throttle;
use crate::throttle::join::JoinDecision;

/// Tries of a failed publish after the first, while Redis counts as up, and
/// the pause before the first of them (tripled before each next one): about
/// 0.6 s in all, the time a cluster client takes to reconnect to a node.
const PUBLISH_RETRIES: u32 = 3;
const PUBLISH_RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Heartbeats after Redis came back before every channel is subscribed once
/// more ([`Fleet::resubscribe_when_due`]).
const RESUBSCRIBE_AFTER_HEARTBEATS: u64 = 3;

/// Registers the instance and returns the live ones: `KEYS` the registry and
/// the info hash; `ARGV` id, ttl (ms), info JSON.
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(gone) do redis.call('HDEL', KEYS[2], id) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], 10 * tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[2], 10 * tonumber(ARGV[2]))
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
return redis.call('HMGET', KEYS[2], unpack(live))
";

/// Stores a configuration with the next fleet-wide version: `KEYS` the config
/// key; `ARGV` the version the change was based on, the config JSON. Returns
/// the version given to it.
const SHARE_CONFIG: &str = r"
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local version = math.max(stored, tonumber(ARGV[1])) + 1
redis.call('HSET', KEYS[1], 'version', version, 'config', ARGV[2])
return version
";

/// How Redis looks from this instance.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FleetView {
    /// This instance.
    pub instance: InstanceInfo,
    /// `single` or `cluster`.
    pub redis_mode: &'static str,
    /// Whether Redis answers: `false` means this instance acts alone (local
    /// join limits, local hot marks, no notices) until it does.
    pub redis_up: bool,
    /// Since when `redisUp` has had its value.
    pub since: DateTime<Utc>,
    /// Why Redis was last given up on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Instances heard of recently (this one included), by id.
    pub instances: Vec<InstanceInfo>,
    /// The number of instances each local share is sized by.
    pub counted_instances: u64,
    /// Chats whose notices this instance follows (a chat with a tail here).
    pub followed_chats: u64,
    /// Of those, the ones Redis confirmed the subscription of.
    pub subscribed_chats: u64,
    pub counters: FleetCounters,
}

/// What crossed Redis, counted since start.
#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FleetCounters {
    pub notices_sent: u64,
    pub notices_received: u64,
    /// Not sent: Redis away, or the queue full.
    pub notices_dropped: u64,
    pub hot_marks_sent: u64,
    pub hot_marks_received: u64,
    pub config_changes_received: u64,
    pub lease_requests: u64,
    /// Times Redis was given up on.
    pub outages: u64,
}

#[derive(Default)]
struct Counters {
    notices_sent: AtomicU64,
    notices_received: AtomicU64,
    notices_dropped: AtomicU64,
    hot_marks_sent: AtomicU64,
    hot_marks_received: AtomicU64,
    config_changes_received: AtomicU64,
    lease_requests: AtomicU64,
    outages: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug)]
struct Health {
    since: DateTime<Utc>,
    last_error: Option<String>,
}

/// Something to publish.
struct Outgoing {
    /// The channel or key the command names: commands of one key keep their
    /// order (and share a slot in a cluster).
    key: String,
    /// A `PUBLISH` (or `SPUBLISH`), or another command sent in the same order.
    cmd: redis::Cmd,
    /// Counted as a notice (else a fleet message).
    notice: bool,
}

/// A change of the chats whose notices this instance follows.
enum Follow {
    Start(ChatId),
    Stop(ChatId),
}

/// This instance's membership of the fleet.
pub struct Fleet {
    names: Names,
    info: InstanceInfo,
    settings: RedisSettings,
    cluster: bool,
    conn: Conn,
    breaker: Breaker,
    up: AtomicBool,
    health: Mutex<Health>,
    instances: ArcSwap<Vec<InstanceInfo>>,
    /// The last number of live instances seen (1 before any).
    counted: AtomicU64,
    outbox: mpsc::Sender<Outgoing>,
    follow: mpsc::UnboundedSender<Follow>,
    /// Chats followed (or about to be), for the view and resubscription.
    followed: Mutex<HashSet<ChatId>>,
    /// Chat channels Redis confirmed.
    subscribed: AtomicU64,
    /// Heartbeats left before the channels are subscribed once more after
    /// Redis came back (see [`Fleet::resubscribe_when_due`]).
    resubscribe_in: AtomicU64,
    leases: leases::Leases,
    gcra: redis::Script,
    live: Arc<Live>,
    throttle: Arc<Throttle>,
    tails: OnceLock<Arc<dyn NoticeSink>>,
    /// Told the name of a replicated shard whose writer another instance
    /// saw change (set once, by the service).
    writers: OnceLock<WriterSink>,
    counters: Counters,
}

impl Fleet {
    /// Joins the fleet described by `settings` (which must name Redis): the
    /// connection is made in the background, and the instance works alone
    /// until it is.
    pub async fn start(
        settings: &RedisSettings,
        listen: std::net::SocketAddr,
        live: Arc<Live>,
        throttle: Arc<Throttle>,
        tracked_chats: u64,
    ) -> anyhow::Result<Arc<Self>> {
        let target = Target::from_settings(settings)?
            .ok_or_else(|| anyhow::anyhow!("redis.url is not set"))?;
        let (push_tx, push_rx) = mpsc::unbounded_channel();
        let conn = match Conn::open(&target, push_tx.clone()).await {
            Ok(conn) => conn,
            // A cluster needs its first contact to learn its slots; wait for
            // it in the background rather than refuse to start.
            Err(e) if target.cluster => {
                tracing::warn!(error = %e, "Redis Cluster unreachable at start; retrying");
                let mut delay = Duration::from_millis(200);
                loop {
                    tokio::time::sleep(delay).await;
                    match Conn::open(&target, push_tx.clone()).await {
                        Ok(conn) => break conn,
                        Err(e) if delay < Duration::from_secs(5) => {
                            tracing::warn!(error = %e, "Redis Cluster still unreachable");
                            delay *= 2;
                        }
                        Err(e) => return Err(anyhow::anyhow!("Redis Cluster unreachable: {e}")),
                    }
                }
            }
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "cannot use Redis at {}: {e}",
                    settings.redacted_url()
                ));
            }
        };
        let (outbox, outbox_rx) = mpsc::channel(settings.publish_queue.max(1));
        let (follow, follow_rx) = mpsc::unbounded_channel();
        let info = InstanceInfo {
            id: format!("{:016x}", rand::random::<u64>()),
            listen: listen.to_string(),
            started_at: Utc::now(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let fleet = Arc::new(Self {
            names: Names::new(&settings.key_prefix),
            instances: ArcSwap::from_pointee(vec![info.clone()]),
            info,
            settings: settings.clone(),
            cluster: target.cluster,
            conn,
            breaker: Breaker::new("redis", &settings.breaker),
            up: AtomicBool::new(false),
            health: Mutex::new(Health {
                since: Utc::now(),
                last_error: Some("not connected yet".to_owned()),
            }),
            counted: AtomicU64::new(1),
            outbox,
            follow,
            followed: Mutex::new(HashSet::new()),
            subscribed: AtomicU64::new(0),
            resubscribe_in: AtomicU64::new(0),
            leases: leases::Leases::new(tracked_chats),
            gcra: redis::Script::new(leases::GCRA),
            live,
            throttle,
            tails: OnceLock::new(),
            writers: OnceLock::new(),
            counters: Counters::default(),
        });
        tokio::spawn(Self::receive(Arc::downgrade(&fleet), push_rx));
        tokio::spawn(Self::publish(Arc::downgrade(&fleet), outbox_rx));
        tokio::spawn(Self::follow_chats(Arc::downgrade(&fleet), follow_rx));
        tokio::spawn(Self::heartbeat(Arc::downgrade(&fleet)));
        Ok(fleet)
    }

    /// The tails notices feed (set once, by the service).
    pub fn attach_tails(&self, tails: Arc<dyn NoticeSink>) {
        let _ = self.tails.set(tails);
    }

    /// What is told when another instance saw a shard's writer change (set
    /// once, by the service).
    pub fn attach_writers(&self, sink: WriterSink) {
        let _ = self.writers.set(sink);
    }

    /// This instance saw the writer of `shard` change: tell the others, so
    /// that every instance switches within one round trip rather than at
    /// its next monitor round.
    pub fn announce_writer(&self, shard: &str) {
        if !self.is_up() {
            return;
        }
        let message = Bus::Writer {
            origin: self.info.id.clone(),
            shard: shard.to_owned(),
        };
        if let Ok(payload) = serde_json::to_vec(&message) {
            self.send(Outgoing {
                cmd: self.conn.publish_cmd(&self.names.bus(), &payload),
                key: self.names.bus(),
                notice: false,
            });
        }
    }

    /// Whether Redis answers now.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// The number of instances local shares are sized by: the live ones when
    /// last heard, at least one.
    pub fn counted_instances(&self) -> u64 {
        self.counted.load(Ordering::Relaxed).max(1)
    }

    pub fn view(&self) -> FleetView {
        let health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FleetView {
            instance: self.info.clone(),
            redis_mode: if self.cluster { "cluster" } else { "single" },
            redis_up: self.is_up(),
            since: health.since,
            last_error: health.last_error.clone(),
            instances: self.instances.load().as_ref().clone(),
            counted_instances: self.counted_instances(),
            followed_chats: self
                .followed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len() as u64,
            subscribed_chats: self.subscribed.load(Ordering::Relaxed),
            counters: FleetCounters {
                notices_sent: get(&c.notices_sent),
                notices_received: get(&c.notices_received),
                notices_dropped: get(&c.notices_dropped),
                hot_marks_sent: get(&c.hot_marks_sent),
                hot_marks_received: get(&c.hot_marks_received),
                config_changes_received: get(&c.config_changes_received),
                lease_requests: get(&c.lease_requests),
                outages: get(&c.outages),
            },
        }
    }

    // ---- what the service tells the fleet ----

    /// After a commit: queue the chat's notice (never waits).
    pub fn committed(&self, chat: &ChatId, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        if !self.is_up() {
            bump(&self.counters.notices_dropped);
            return;
        }
        let Some(payload) = Notice::encode(&self.info.id, events, self.settings.notice_max_bytes)
        else {
            return;
        };
        let channel = self.names.chat_channel(chat);
        self.send(Outgoing {
            cmd: self.conn.publish_cmd(&channel, &payload),
            key: channel,
            notice: true,
        });
    }

    /// After a purge of the chat's events below `first_revision`: queue its
    /// notice (never waits).
    pub fn purged(&self, chat: &ChatId, first_revision: u64) {
        if !self.is_up() {
            bump(&self.counters.notices_dropped);
            return;
        }
        let Some(payload) = Purge::encode(&self.info.id, first_revision) else {
            return;
        };
        let channel = self.names.chat_channel(chat);
        self.send(Outgoing {
            cmd: self.conn.publish_cmd(&channel, &payload),
            key: channel,
            notice: true,
        });
    }

    /// A chat was marked hot here (or its mark extended): tell the others.
    pub fn marked_hot(&self, chat: &ChatId, expires_in_ms: u64) {
        if !self.is_up() {
            return;
        }
        let message = Bus::Hot {
            origin: self.info.id.clone(),
            chat: chat.to_string(),
            expires_in_ms,
        };
        if let Ok(payload) = serde_json::to_vec(&message) {
            bump(&self.counters.hot_marks_sent);
            // Kept too, for the instances that start while it lasts.
            let until = Utc::now().timestamp_millis() + i64::try_from(expires_in_ms).unwrap_or(0);
            let mut keep = redis::cmd("ZADD");
            keep.arg(self.names.hot())
                .arg("GT")
                .arg(until)
                .arg(chat.as_str());
            // Both under the `{fleet}` tag: one slot, one order.
            self.send(Outgoing {
                cmd: keep,
                key: self.names.bus(),
                notice: false,
            });
            self.send(Outgoing {
                cmd: self.conn.publish_cmd(&self.names.bus(), &payload),
                key: self.names.bus(),
                notice: false,
            });
        }
    }

    /// Marks the chats the fleet holds hot (this instance was away, or just
    /// started); forgets the expired ones.
    async fn load_hot_marks(&self) {
        let now = Utc::now().timestamp_millis();
        let mut prune = redis::cmd("ZREMRANGEBYSCORE");
        prune.arg(self.names.hot()).arg("-inf").arg(now);
        let mut conn = self.conn.clone();
        let _: Option<u64> = self
            .call("prune hot marks", prune.query_async(&mut conn))
            .await;
        let mut read = redis::cmd("ZRANGE");
        read.arg(self.names.hot()).arg(0).arg(-1).arg("WITHSCORES");
        let mut conn = self.conn.clone();
        let Some(marks) = self
            .call::<Vec<(String, f64)>>("read hot marks", read.query_async(&mut conn))
            .await
        else {
            return;
        };
        for (chat, until) in marks {
            let left = until as i64 - now;
            if let (Ok(chat), Ok(left)) = (ChatId::parse(&chat), u64::try_from(left))
                && left > 0
            {
                self.throttle.hot.mark(&chat, left);
            }
        }
    }

    fn send(&self, out: Outgoing) {
        let notice = out.notice;
        if self.outbox.try_send(out).is_err() && notice {
            bump(&self.counters.notices_dropped);
        }
    }

    /// The join rule this instance enforces locally: the whole limit while
    /// Redis holds the global one, an even share of it (by the instances last
    /// seen alive) while it does not.
    pub fn local_join_rule(&self, rule: JoinRule) -> JoinRule {
        if !rule.enabled || self.is_up() {
            return rule;
        }
        JoinRule {
            limit: rule.limit.div_ceil(self.counted_instances()).max(1),
            ..rule
        }
    }

    /// Charges one join (admitted locally) to the chat's global limit: from
    /// this instance's lease, never waiting for Redis.
    pub fn admit_join(self: &Arc<Self>, chat: &ChatId, rule: JoinRule) -> JoinDecision {
        if !rule.enabled || !self.is_up() {
            return JoinDecision::Admit;
        }
        let batch = leases::batch(
            rule.limit,
            self.counted_instances(),
            self.settings.join_lease_max,
        );
        let (take, ask) = self.leases.take(chat, batch, Instant::now());
        if let Some(ask) = ask {
            let fleet = self.clone();
            let chat = chat.clone();
            tokio::spawn(async move { fleet.ask_lease(chat, rule, ask).await });
        }
        match take {
            leases::Take::Admit => JoinDecision::Admit,
            leases::Take::Refuse { retry_after_secs } if rule.dry_run => {
                JoinDecision::DryRunThrottle { retry_after_secs }
            }
            leases::Take::Refuse { retry_after_secs } => {
                JoinDecision::Throttle { retry_after_secs }
            }
        }
    }

    async fn ask_lease(&self, chat: ChatId, rule: JoinRule, ask: leases::Ask) {
        bump(&self.counters.lease_requests);
        let window_us = rule.window_seconds.max(1) as f64 * 1e6;
        let interval = window_us / rule.limit.max(1) as f64;
        let mut invocation = self.gcra.key(self.names.join_key(&chat));
        invocation
            .arg(interval)
            .arg(window_us)
            .arg(ask.charge)
            .arg(ask.want);
        let mut conn = self.conn.clone();
        let answer: Option<(u64, u64)> = self
            .call("join lease", invocation.invoke_async(&mut conn))
            .await;
        match answer {
            Some((granted, wait_ms)) => self.leases.granted(
                &chat,
                granted,
                Duration::from_millis(wait_ms),
                Instant::now(),
            ),
            None => self.leases.failed(&chat),
        }
    }

    /// Stores a configuration change made here under the next fleet-wide
    /// version and tells every instance; returns that version (`None`: Redis
    /// away, the change stays local and is shared when Redis is back).
    pub async fn share_config(&self, based_on: u64, config: &LiveConfig) -> Option<u64> {
        if !self.is_up() {
            return None;
        }
        let json = serde_json::to_string(config).ok()?;
        let script = redis::Script::new(SHARE_CONFIG);
        let mut invocation = script.key(self.names.config());
        invocation.arg(based_on).arg(json);
        let mut conn = self.conn.clone();
        let version: u64 = self
            .call("share config", invocation.invoke_async(&mut conn))
            .await?;
        let message = Bus::Config {
            origin: self.info.id.clone(),
            version,
        };
        let payload = serde_json::to_vec(&message).ok()?;
        let cmd = self.conn.publish_cmd(&self.names.bus(), &payload);
        let mut conn = self.conn.clone();
        let _: Option<Value> = self
            .call("publish config", cmd.query_async(&mut conn))
            .await;
        Some(version)
    }

    /// Reads the fleet's configuration and applies it if newer; shares ours
    /// if it is newer (changed while Redis was away).
    async fn reconcile_config(&self) {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.names.config()).arg("version").arg("config");
        let Some((version, json)) = self
            .call::<(Option<u64>, Option<String>)>("read config", cmd.query_async(&mut conn))
            .await
        else {
            return;
        };
        let local = self.live.load();
        match (version, json) {
            (Some(version), Some(json)) if version > local.version => {
                self.install_config(version, &json);
            }
            (stored, _) if local.version > stored.unwrap_or(0) && local.version > 1 => {
                // Changed here while Redis was away (or first in the fleet).
                if let Some(version) = self.share_config(local.version - 1, &local.config).await {
                    self.live.install(version, local.config.clone(), "fleet");
                }
            }
            _ => {}
        }
    }

    fn install_config(&self, version: u64, json: &str) {
        match serde_json::from_str::<LiveConfig>(json) {
            Ok(config) => {
                if self.live.install(version, config, "fleet") {
                    bump(&self.counters.config_changes_received);
                }
            }
            Err(e) => {
                tracing::warn!(version, error = %e, "the fleet's live configuration does not parse; kept ours")
            }
        }
    }

    // ---- calls to Redis ----

    /// One call to Redis through its breaker and deadline; `None` if refused
    /// or failed (the failure is recorded and the fleet marked down).
    async fn call<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        let _admission = self.breaker.admit()?;
        let deadline = Duration::from_millis(self.settings.timeout_ms);
        match tokio::time::timeout(deadline, call).await {
            Ok(Ok(value)) => {
                self.breaker.record_success();
                Some(value)
            }
            Ok(Err(e)) => {
                self.failed(format!("{what}: {e}"));
                None
            }
            Err(_) => {
                self.failed(format!(
                    "{what}: no answer within {} ms",
                    deadline.as_millis()
                ));
                None
            }
        }
    }

    /// A failed call counts against Redis's breaker; the instance acts alone
    /// once the breaker opens (one failure, such as the first command over a
    /// connection to a cluster node that restarted, is not an outage).
    fn failed(&self, reason: String) {
        self.breaker.record_failure(&reason);
        if self.breaker.state() == crate::shard::BreakerState::Closed {
            self.health
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .last_error = Some(reason);
        } else {
            self.down(reason);
        }
    }

    fn down(&self, reason: String) {
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        if self.up.swap(false, Ordering::AcqRel) {
            bump(&self.counters.outages);
            self.subscribed.store(0, Ordering::Relaxed);
            health.since = Utc::now();
            tracing::warn!(reason = %reason, "Redis unavailable: this instance acts alone until it answers");
        }
        health.last_error = Some(reason);
    }

    /// Redis answered: if it had been away, subscribe again, distrust the
    /// tails (notices may have been missed) and reconcile the configuration.
    async fn answered(&self) {
        if self.up.load(Ordering::Acquire) {
            return;
        }
        // Subscribed first, and up only once every channel followed so far
        // is: an instance that says it is part of the fleet hears of every
        // write of its chats. A call that fails marks the fleet down again,
        // and the next heartbeat retries.
        let channels = self.all_channels();
        if !self.subscribe_all(&channels).await {
            return;
        }
        {
            let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
            health.since = Utc::now();
            health.last_error = None;
        }
        self.up.store(true, Ordering::Release);
        // Chats followed while this ran (`follow_chats` left them to us while
        // down; from now on it subscribes them itself).
        let late: Vec<String> = self
            .followed_channels()
            .into_iter()
            .filter(|c| !channels.contains(c))
            .collect();
        if !late.is_empty() {
            let mut conn = self.conn.clone();
            if self
                .call("subscribe", async move { conn.subscribe(&late).await })
                .await
                .is_none()
            {
                return;
            }
        }
        let chats = self.followed_channels().len() as u64;
        self.subscribed.store(chats, Ordering::Relaxed);
        self.resubscribe_in
            .store(RESUBSCRIBE_AFTER_HEARTBEATS, Ordering::Relaxed);
        // Notices may have been missed while Redis was away: every tail is
        // read again before it answers, and its waiters read it now.
        if let Some(tails) = self.tails.get() {
            tails.distrust_all();
        }
        tracing::info!(chats, "Redis answers: this instance is part of the fleet");
        self.load_hot_marks().await;
        self.reconcile_config().await;
    }

    /// A few heartbeats after Redis came back, subscribes every channel once
    /// more. The client repairs its connections in the background: a
    /// subscription confirmed on a connection to a node that had just
    /// restarted can be lost when that connection is replaced, and a lost
    /// subscription would leave this instance's readers of those chats to
    /// their tail refresh. Subscribing a channel twice changes nothing.
    async fn resubscribe_when_due(&self) {
        let due = self
            .resubscribe_in
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok_and(|left| left == 1);
        if !due || !self.is_up() {
            return;
        }
        self.subscribe_all(&self.all_channels()).await;
    }

    /// The fleet's bus and every followed chat's channel.
    fn all_channels(&self) -> Vec<String> {
        let mut channels = vec![self.names.bus()];
        channels.extend(self.followed_channels());
        channels
    }

    /// Subscribes `channels`, 500 at a time; `false` once a call failed
    /// (which counts against Redis's breaker).
    async fn subscribe_all(&self, channels: &[String]) -> bool {
        for chunk in channels.chunks(500) {
            let mut conn = self.conn.clone();
            if self
                .call("subscribe", async move { conn.subscribe(chunk).await })
                .await
                .is_none()
            {
                return false;
            }
        }
        true
    }

    fn followed_channels(&self) -> Vec<String> {
        self.followed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|chat| self.names.chat_channel(chat))
            .collect()
    }

    // ---- background tasks ----

    async fn heartbeat(fleet: std::sync::Weak<Self>) {
        let every = match fleet.upgrade() {
            Some(f) => Duration::from_millis(f.settings.heartbeat_ms),
            None => return,
        };
        let script = redis::Script::new(HEARTBEAT);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(f) = fleet.upgrade() else { return };
            let Ok(info) = serde_json::to_string(&f.info) else {
                return;
            };
            let mut invocation = script.key(f.names.instances());
            invocation
                .key(f.names.instance_info())
                .arg(&f.info.id)
                .arg(f.settings.instance_ttl_ms)
                .arg(info);
            let mut conn = f.conn.clone();
            let live: Option<Vec<Option<String>>> = f
                .call("heartbeat", invocation.invoke_async(&mut conn))
                .await;
            if let Some(live) = live {
                let mut instances: Vec<InstanceInfo> = live
                    .iter()
                    .flatten()
                    .filter_map(|json| serde_json::from_str(json).ok())
                    .collect();
                instances.sort_by(|a, b| a.id.cmp(&b.id));
                f.counted
                    .store(instances.len().max(1) as u64, Ordering::Relaxed);
                f.instances.store(Arc::new(instances));
                f.answered().await;
                f.resubscribe_when_due().await;
            }
        }
    }

    /// Sends queued notices and messages, pipelined, in order per key. A
    /// cluster takes a pipeline only within one slot, so there each key's
    /// commands are a pipeline of their own, 64 keys at a time.
    async fn publish(fleet: std::sync::Weak<Self>, mut rx: mpsc::Receiver<Outgoing>) {
        use futures_util::StreamExt;
        let mut batch = Vec::with_capacity(256);
        while rx.recv_many(&mut batch, 256).await > 0 {
            let Some(f) = fleet.upgrade() else { return };
            if !f.is_up() {
                let notices = batch.iter().filter(|o| o.notice).count() as u64;
                f.counters
                    .notices_dropped
                    .fetch_add(notices, Ordering::Relaxed);
                batch.clear();
                continue;
            }
            let mut groups: Vec<(u64, redis::Pipeline)> = Vec::new();
            if f.cluster {
                let mut by_key: std::collections::HashMap<String, usize> =
                    std::collections::HashMap::new();
                for out in batch.drain(..) {
                    let i = *by_key.entry(out.key).or_insert_with(|| {
                        groups.push((0, redis::pipe()));
                        groups.len() - 1
                    });
                    groups[i].0 += u64::from(out.notice);
                    groups[i].1.add_command(out.cmd).ignore();
                }
            } else {
                let mut pipe = redis::pipe();
                let mut notices = 0;
                for out in batch.drain(..) {
                    notices += u64::from(out.notice);
                    pipe.add_command(out.cmd).ignore();
                }
                groups.push((notices, pipe));
            }
            let sends = groups.into_iter().map(|(notices, pipe)| {
                let f = f.clone();
                async move {
                    let mut conn = f.conn.clone();
                    let mut sent: Option<()> = f.call("publish", pipe.exec_async(&mut conn)).await;
                    // A few more tries, further apart, while Redis counts as
                    // up: a connection that failed is made anew in the
                    // background (a cluster node that just restarted), and a
                    // notice dropped here leaves readers elsewhere waiting for
                    // their tail refresh.
                    let mut pause = PUBLISH_RETRY_PAUSE;
                    for _ in 0..PUBLISH_RETRIES {
                        if sent.is_some() || !f.is_up() {
                            break;
                        }
                        tokio::time::sleep(pause).await;
                        pause *= 3;
                        sent = f.call("publish", pipe.exec_async(&mut conn)).await;
                    }
                    let counter = if sent.is_some() {
                        &f.counters.notices_sent
                    } else {
                        &f.counters.notices_dropped
                    };
                    counter.fetch_add(notices, Ordering::Relaxed);
                }
            });
            futures_util::stream::iter(sends)
                .buffer_unordered(64)
                .collect::<Vec<()>>()
                .await;
        }
    }

    /// Subscribes to the notices of chats that gained a tail here, and
    /// unsubscribes from those that lost it, a batch at a time.
    async fn follow_chats(fleet: std::sync::Weak<Self>, mut rx: mpsc::UnboundedReceiver<Follow>) {
        let mut batch = Vec::with_capacity(512);
        while rx.recv_many(&mut batch, 512).await > 0 {
            let Some(f) = fleet.upgrade() else { return };
            let (mut start, mut stop) = (Vec::new(), Vec::new());
            {
                let mut followed = f.followed.lock().unwrap_or_else(PoisonError::into_inner);
                for change in batch.drain(..) {
                    match change {
                        Follow::Start(chat) => {
                            if followed.insert(chat.clone()) {
                                start.push(f.names.chat_channel(&chat));
                            }
                        }
                        Follow::Stop(chat) => {
                            if followed.remove(&chat) {
                                stop.push(f.names.chat_channel(&chat));
                            }
                        }
                    }
                }
            }
            // While Redis is away, the set is kept and subscribed to whole
            // when it is back.
            if !f.is_up() {
                continue;
            }
            if !start.is_empty() {
                let n = start.len() as u64;
                let mut conn = f.conn.clone();
                if f.call("subscribe", async move { conn.subscribe(&start).await })
                    .await
                    .is_some()
                {
                    f.subscribed.fetch_add(n, Ordering::Relaxed);
                }
            }
            if !stop.is_empty() {
                let n = stop.len() as u64;
                let mut conn = f.conn.clone();
                if f.call("unsubscribe", async move { conn.unsubscribe(&stop).await })
                    .await
                    .is_some()
                {
                    let _ = f
                        .subscribed
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                            Some(s.saturating_sub(n))
                        });
                }
            }
        }
    }

    /// Handles what Redis pushes: messages of followed chats and of the
    /// fleet channel, and disconnections.
    async fn receive(fleet: std::sync::Weak<Self>, mut rx: mpsc::UnboundedReceiver<PushInfo>) {
        while let Some(push) = rx.recv().await {
            let Some(f) = fleet.upgrade() else { return };
            match push.kind {
                PushKind::Message | PushKind::SMessage => {
                    let mut data = push.data.into_iter();
                    let (Some(channel), Some(payload)) = (data.next(), data.next()) else {
                        continue;
                    };
                    let (Ok(channel), Ok(payload)) = (
                        redis::from_redis_value::<String>(channel),
                        redis::from_redis_value::<Vec<u8>>(payload),
                    ) else {
                        continue;
                    };
                    f.on_message(&channel, &payload);
                }
                PushKind::Disconnection => f.down("connection to Redis lost".to_owned()),
                _ => {}
            }
        }
    }

    fn on_message(self: &Arc<Self>, channel: &str, payload: &[u8]) {
        if let Some(chat) = self.names.chat_of_channel(channel) {
            let Some(notice) = Notice::decode(payload) else {
                if let Some(purge) = Purge::decode(payload).filter(|p| p.o != self.info.id) {
                    bump(&self.counters.notices_received);
                    // Pages kept by this instance may hold purged events.
                    self.throttle.hot.retire(&chat);
                    if let Some(tails) = self.tails.get() {
                        tails.purged(&chat, purge.purged);
                    }
                }
                return;
            };
            if notice.o == self.info.id {
                return;
            }
            bump(&self.counters.notices_received);
            // Pages kept by this instance predate the write.
            self.throttle.hot.retire(&chat);
            if let Some(tails) = self.tails.get() {
                match notice.events() {
                    Some(events) => tails.committed(&chat, &events),
                    None => tails.learn(&chat, notice.last),
                }
            }
            return;
        }
        if channel != self.names.bus() {
            return;
        }
        match serde_json::from_slice::<Bus>(payload) {
            Ok(Bus::Hot {
                origin,
                chat,
                expires_in_ms,
            }) if origin != self.info.id => {
                if let Ok(chat) = ChatId::parse(&chat) {
                    bump(&self.counters.hot_marks_received);
                    self.throttle.hot.mark(&chat, expires_in_ms);
                }
            }
            Ok(Bus::Writer { origin, shard }) if origin != self.info.id => {
                if let Some(sink) = self.writers.get() {
                    sink(&shard);
                }
            }
            // Read in the background: the receive loop never waits.
            Ok(Bus::Config { origin, version })
                if origin != self.info.id && version > self.live.load().version =>
            {
                let fleet = self.clone();
                tokio::spawn(async move { fleet.reconcile_config().await });
            }
            _ => {}
        }
    }
}

/// Told the name of a replicated shard whose writer another instance saw
/// change.
pub type WriterSink = Arc<dyn Fn(&str) + Send + Sync>;

/// Told when a chat gains or loses its tail on this instance: the fleet
/// follows the notices of exactly those chats.
pub trait TailObserver: Send + Sync {
    fn opened(&self, chat: &ChatId);
    fn closed(&self, chat: &ChatId);
}

/// Where the notices of other instances go: the service's tails. A trait so
/// that the fleet, below the service, does not depend on it.
pub trait NoticeSink: Send + Sync {
    /// A committed batch another instance's notice carried.
    fn committed(&self, chat: &ChatId, events: &[Event]);
    /// A notice without its events: the chat reached `last`.
    fn learn(&self, chat: &ChatId, last: u64);
    /// A purge notice: the chat's events below `first_revision` are gone.
    fn purged(&self, chat: &ChatId, first_revision: u64);
    /// Notices may have been lost: every tail reads its chat again.
    fn distrust_all(&self);
}

impl TailObserver for Fleet {
    fn opened(&self, chat: &ChatId) {
        let _ = self.follow.send(Follow::Start(chat.clone()));
    }

    fn closed(&self, chat: &ChatId) {
        let _ = self.follow.send(Follow::Stop(chat.clone()));
    }
}
