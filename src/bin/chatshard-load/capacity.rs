//! `capacity`: what a deployment needs for a stated workload, from the
//! per-unit costs the load tool measured (its JSON reports). docs/capacity.md
//! explains every formula; this file is its only implementation.
//!
//! Pure code: [`Costs::from_reports`] reads the costs out of report JSON
//! (the median when several reports measure the same one), [`size`] turns a
//! [`Workload`] and the costs into a [`Sizing`], and [`Sizing::markdown`]
//! writes it as tables. Nothing here reads files or the clock.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What the deployment must carry, and the hardware and headroom it is
/// sized with. The defaults are docs/capacity.md's reference workload; a
/// TOML or JSON file and `--set key=value` change any field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Workload {
    /// Chats stored.
    pub chats: f64,
    /// Memberships stored (member rows).
    pub memberships: f64,
    /// Share of the chats with at least one request in a given minute.
    pub active_share_per_minute: f64,
    /// Requests an active chat gets in that minute.
    pub requests_per_active_chat_per_minute: f64,
    /// Share of those requests that write (joins, leaves, messages; one
    /// event each); the rest read (member counts, polls).
    pub write_share: f64,
    /// Share of the writes that are messages (a message row each).
    pub message_share_of_writes: f64,
    /// Bytes of a message row with its text (not measured: depends on the
    /// chat servers' messages).
    pub message_bytes: f64,
    /// Days events are kept (`retention.min_days`).
    pub retention_days: f64,
    /// The celebrity chat's joins per second during its spike.
    pub celebrity_joins_per_second: f64,
    /// The celebrity chat's reads per minute during its spike.
    pub celebrity_reads_per_minute: f64,
    /// Streams following the celebrity chat (chat servers with one of its
    /// members online).
    pub celebrity_followers: f64,
    /// Multiplexed event streams (one per chat server).
    pub streams: f64,
    /// Chat subscriptions of those streams, per membership (the share of
    /// members online, each making their chat server follow the chat).
    pub subscriptions_per_membership: f64,
    /// Cores of one chatshard instance.
    pub instance_cores: f64,
    /// Memory of one chatshard instance, GiB.
    pub instance_memory_gib: f64,
    /// Client connections one instance takes (`http.max_connections`).
    pub instance_connections: f64,
    /// Chats whose join window and hot-chat bucket one instance keeps
    /// (`throttle.tracked_chats`); tails are bounded below it.
    pub tracked_chats_per_instance: f64,
    /// Connections one instance may hold to each shard
    /// (`pool.max_concurrent`).
    pub pool_connections_per_shard: f64,
    /// Connections a shard's server takes (its `max_connections`).
    pub shard_max_connections: f64,
    /// Disk of one shard's server for chatshard's tables, GiB.
    pub shard_storage_gib: f64,
    /// Replicas of each shard (`[[shards]] replicas`).
    pub replicas_per_shard: f64,
    /// Cores one Redis node uses for commands (Redis runs them on one).
    pub redis_node_cores: f64,
    /// Replicas of each Redis primary.
    pub redis_replicas_per_primary: f64,
    /// Use of CPU (instances, shards' commits, Redis) planned at peak: the
    /// rest is headroom.
    pub cpu_target: f64,
    /// Use of memory, connections and disk planned at peak.
    pub memory_target: f64,
    /// How much faster the production cores are than the machine that
    /// measured the costs (1: as fast): divides every CPU cost.
    pub speedup: f64,
    /// How many more commits a second a production shard's server takes
    /// than the measuring machine's (disk and cores; 1: as many).
    pub shard_speedup: f64,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            chats: 10_000_000.0,
            memberships: 100_000_000.0,
            active_share_per_minute: 0.01,
            requests_per_active_chat_per_minute: 10.0,
            write_share: 0.3,
            message_share_of_writes: 1.0 / 3.0,
            message_bytes: 300.0,
            retention_days: 30.0,
            celebrity_joins_per_second: 2000.0,
            celebrity_reads_per_minute: 200_000.0,
            celebrity_followers: 10_000.0,
            streams: 50_000.0,
            subscriptions_per_membership: 0.1,
            instance_cores: 8.0,
            instance_memory_gib: 16.0,
            instance_connections: 10_000.0,
            tracked_chats_per_instance: 100_000.0,
            pool_connections_per_shard: 16.0,
            shard_max_connections: 1000.0,
            shard_storage_gib: 1000.0,
            replicas_per_shard: 1.0,
            redis_node_cores: 1.0,
            redis_replicas_per_primary: 1.0,
            cpu_target: 0.5,
            memory_target: 0.7,
            speedup: 1.0,
            shard_speedup: 1.0,
        }
    }
}

impl Workload {
    /// The defaults, then `file` (a TOML or JSON object of fields), then
    /// each `key=value` of `sets`, in that order; every problem listed.
    pub fn build(file: Option<&Value>, sets: &[String]) -> Result<Self, String> {
        let mut merged = serde_json::to_value(Self::default()).map_err(|e| e.to_string())?;
        let mut problems = Vec::new();
        let fields = merged
            .as_object_mut()
            .ok_or("the workload is not an object")?;
        if let Some(file) = file {
            match file.as_object() {
                Some(given) => {
                    for (k, v) in given {
                        fields.insert(k.clone(), v.clone());
                    }
                }
                None => problems.push("the workload file is not a table of fields".to_owned()),
            }
        }
        for set in sets {
            match set.split_once('=') {
                Some((k, v)) => match v.trim().parse::<f64>() {
                    Ok(n) => {
                        fields.insert(k.trim().to_owned(), serde_json::json!(n));
                    }
                    Err(_) => problems.push(format!("--set {set}: the value is not a number")),
                },
                None => problems.push(format!("--set {set}: expected key=value")),
            }
        }
        let workload: Self = match serde_json::from_value(merged) {
            Ok(w) => w,
            Err(e) => {
                problems.push(format!("workload: {e}"));
                return Err(problems.join("; "));
            }
        };
        problems.extend(workload.problems());
        if problems.is_empty() {
            Ok(workload)
        } else {
            Err(problems.join("; "))
        }
    }

    /// Fields out of their range.
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, v) in [
            ("active_share_per_minute", self.active_share_per_minute),
            ("write_share", self.write_share),
            ("message_share_of_writes", self.message_share_of_writes),
        ] {
            if !(0.0..=1.0).contains(&v) {
                out.push(format!("{name} must be 0 to 1"));
            }
        }
        for (name, v) in [
            ("cpu_target", self.cpu_target),
            ("memory_target", self.memory_target),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                out.push(format!("{name} must be above 0 and at most 1"));
            }
        }
        for (name, v) in [
            ("instance_cores", self.instance_cores),
            ("instance_memory_gib", self.instance_memory_gib),
            ("instance_connections", self.instance_connections),
            ("shard_max_connections", self.shard_max_connections),
            ("shard_storage_gib", self.shard_storage_gib),
            ("redis_node_cores", self.redis_node_cores),
            ("speedup", self.speedup),
            ("shard_speedup", self.shard_speedup),
        ] {
            if v.is_nan() || v <= 0.0 {
                out.push(format!("{name} must be above 0"));
            }
        }
        out
    }
}

/// One per-unit cost and the runs it was read from.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    pub value: f64,
    /// The reports it came from (their file names), and how many.
    pub source: String,
}

/// The per-unit costs the model needs, each read from the reports that
/// measure it ([`COSTS`] says which).
#[derive(Debug, Clone, PartialEq)]
pub struct Costs {
    pub cpu_us_per_request: Measured,
    pub cpu_us_per_join: Measured,
    pub cpu_us_per_read: Measured,
    pub cpu_us_per_delivery: Measured,
    pub bytes_per_stream: Measured,
    pub bytes_per_subscription: Measured,
    pub bytes_per_tracked_chat: Measured,
    pub commit_ms: Measured,
    pub shard_commits_per_second: Measured,
    pub chat_commits_per_second: Measured,
    pub member_bytes_per_row: Measured,
    pub event_bytes_per_row: Measured,
    pub redis_cpu_us_per_notice: Measured,
    pub redis_cpu_us_per_subscriber: Measured,
}

/// Each cost: its name, what it is, and the command whose report holds it.
pub const COSTS: [(&str, &str, &str); 14] = [
    (
        "cpu_us_per_request",
        "service CPU per request of many chats' mix (µs)",
        "mixed --service-pid",
    ),
    (
        "cpu_us_per_join",
        "service CPU per join of one chat's spike (µs)",
        "join-spike --service-pid",
    ),
    (
        "cpu_us_per_read",
        "service CPU per poll of one hot chat (µs)",
        "fetch-spike --service-pid",
    ),
    (
        "cpu_us_per_delivery",
        "service CPU per event delivered to a stream (µs)",
        "fanout --service-pid (--mux-chats 0 or 1)",
    ),
    (
        "bytes_per_stream",
        "service memory per open stream (bytes)",
        "fanout --service-pid (--mux-chats 0 or 1)",
    ),
    (
        "bytes_per_subscription",
        "service memory per chat subscription of a multiplexed stream (bytes)",
        "fanout --service-pid --mux-chats N (N > 1)",
    ),
    (
        "bytes_per_tracked_chat",
        "service memory per chat in use (bytes)",
        "mixed --service-pid",
    ),
    (
        "commit_ms",
        "mean group-commit transaction (ms)",
        "join-spike (one instance)",
    ),
    (
        "shard_commits_per_second",
        "a shard's join transactions per second over many chats",
        "direct-sql --chats N (N > 1)",
    ),
    (
        "chat_commits_per_second",
        "one chat's join transactions per second (its row lock)",
        "direct-sql --chats 1",
    ),
    (
        "member_bytes_per_row",
        "disk per member row, indexes included (bytes)",
        "direct-sql",
    ),
    (
        "event_bytes_per_row",
        "disk per event row, indexes included (bytes)",
        "direct-sql",
    ),
    (
        "redis_cpu_us_per_notice",
        "Redis CPU per notice published, before its subscribers (µs)",
        "fanout --redis-pid, streams on 1 instance and on several (--also)",
    ),
    (
        "redis_cpu_us_per_subscriber",
        "Redis CPU per instance a notice is delivered to (µs)",
        "fanout --redis-pid, streams on 1 instance and on several (--also)",
    ),
];

impl Costs {
    /// The costs measured in `reports` (file name and JSON of each); the
    /// median of every report that measures a cost. Lists every cost no
    /// report holds, with the command that measures it.
    pub fn from_reports(reports: &[(String, Value)]) -> Result<Self, String> {
        let mut found: Vec<(&str, f64, &str)> = Vec::new();
        for (file, report) in reports {
            for (cost, value) in costs_in(report) {
                found.push((cost, value, file));
            }
        }
        let pick = |cost: &str| -> Option<Measured> {
            let mut values: Vec<(f64, &str)> = found
                .iter()
                .filter(|(c, v, _)| *c == cost && v.is_finite())
                .map(|(_, v, f)| (*v, *f))
                .collect();
            if values.is_empty() {
                return None;
            }
            values.sort_by(|a, b| a.0.total_cmp(&b.0));
            let value = median(&values.iter().map(|v| v.0).collect::<Vec<_>>());
            let files = runs_of(values.iter().map(|v| v.1));
            let source = if values.len() == 1 {
                files
            } else {
                format!("median of {}: {files}", values.len())
            };
            Some(Measured { value, source })
        };
        let redis = redis_fit(reports);
        let mut missing = Vec::new();
        let mut get = |cost: &str| {
            pick(cost).unwrap_or_else(|| {
                let how = COSTS.iter().find(|c| c.0 == cost).map_or("", |c| c.2);
                missing.push(format!("{cost} (from `{how}`)"));
                unmeasured()
            })
        };
        let costs = Self {
            cpu_us_per_request: get("cpu_us_per_request"),
            cpu_us_per_join: get("cpu_us_per_join"),
            cpu_us_per_read: get("cpu_us_per_read"),
            cpu_us_per_delivery: get("cpu_us_per_delivery"),
            bytes_per_stream: get("bytes_per_stream"),
            bytes_per_subscription: get("bytes_per_subscription"),
            bytes_per_tracked_chat: get("bytes_per_tracked_chat"),
            commit_ms: get("commit_ms"),
            shard_commits_per_second: get("shard_commits_per_second"),
            chat_commits_per_second: get("chat_commits_per_second"),
            member_bytes_per_row: get("member_bytes_per_row"),
            event_bytes_per_row: get("event_bytes_per_row"),
            redis_cpu_us_per_notice: redis.as_ref().map_or_else(unmeasured, |r| r.0.clone()),
            redis_cpu_us_per_subscriber: redis.as_ref().map_or_else(unmeasured, |r| r.1.clone()),
        };
        if redis.is_none() {
            missing.push(format!(
                "redis_cpu_us_per_notice and redis_cpu_us_per_subscriber (from `{}`)",
                COSTS[COSTS.len() - 1].2
            ));
        }
        if missing.is_empty() {
            Ok(costs)
        } else {
            Err(format!("no report measures: {}", missing.join(", ")))
        }
    }

    fn rows(&self) -> [(&'static str, &Measured); 14] {
        [
            ("cpu_us_per_request", &self.cpu_us_per_request),
            ("cpu_us_per_join", &self.cpu_us_per_join),
            ("cpu_us_per_read", &self.cpu_us_per_read),
            ("cpu_us_per_delivery", &self.cpu_us_per_delivery),
            ("bytes_per_stream", &self.bytes_per_stream),
            ("bytes_per_subscription", &self.bytes_per_subscription),
            ("bytes_per_tracked_chat", &self.bytes_per_tracked_chat),
            ("commit_ms", &self.commit_ms),
            ("shard_commits_per_second", &self.shard_commits_per_second),
            ("chat_commits_per_second", &self.chat_commits_per_second),
            ("member_bytes_per_row", &self.member_bytes_per_row),
            ("event_bytes_per_row", &self.event_bytes_per_row),
            ("redis_cpu_us_per_notice", &self.redis_cpu_us_per_notice),
            (
                "redis_cpu_us_per_subscriber",
                &self.redis_cpu_us_per_subscriber,
            ),
        ]
    }
}

/// Redis's CPU per notice and per instance it reaches, fitted on the
/// `fanout --redis-pid` reports: the median per notice at each number of
/// subscribed instances, and the line through the fewest and the most
/// (per instance: its slope, at least 0; per notice: the rest at the fewest).
/// `None` without reports at two numbers of instances.
fn redis_fit(reports: &[(String, Value)]) -> Option<(Measured, Measured)> {
    let mut points: Vec<(u64, f64, &str)> = reports
        .iter()
        .filter(|(_, r)| r["scenario"]["name"] == "fanout")
        .filter_map(|(file, r)| {
            let redis = &r["scenario"]["redis"];
            Some((
                redis["subscribedInstances"].as_u64()?,
                redis["cpuMicrosPerNotice"].as_f64()?,
                file.as_str(),
            ))
        })
        .collect();
    points.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let at = |k: u64| {
        let values: Vec<f64> = points.iter().filter(|p| p.0 == k).map(|p| p.1).collect();
        median(&values)
    };
    let (fewest, most) = (points.first()?.0, points.last()?.0);
    if fewest == most {
        return None;
    }
    let per_instance = ((at(most) - at(fewest)) / (most - fewest) as f64).max(0.0);
    let per_notice = (at(fewest) - fewest as f64 * per_instance).max(0.0);
    let source = format!(
        "fit of {} runs at {fewest} and {most} instances: {}",
        points.len(),
        runs_of(points.iter().map(|p| p.2))
    );
    Some((
        Measured {
            value: per_notice,
            source: source.clone(),
        },
        Measured {
            value: per_instance,
            source,
        },
    ))
}

/// The costs one report holds, by the fields its scenario writes.
fn costs_in(report: &Value) -> Vec<(&'static str, f64)> {
    let s = &report["scenario"];
    let mut out = Vec::new();
    let mut take = |cost: &'static str, v: &Value| {
        if let Some(n) = v.as_f64() {
            out.push((cost, n));
        }
    };
    match s["name"].as_str().unwrap_or_default() {
        "join-spike" => {
            take("cpu_us_per_join", &s["cpu"]["serviceCpuMicrosPerJoin"]);
            take("commit_ms", &s["commits"]["meanTransactionMs"]);
        }
        "fetch-spike" => take("cpu_us_per_read", &s["cpu"]["serviceCpuMicrosPerPoll"]),
        "fanout" if s["muxChatsPerStream"].as_u64().unwrap_or(0) <= 1 => {
            take(
                "cpu_us_per_delivery",
                &s["cpu"]["serviceCpuMicrosPerDelivery"],
            );
            take("bytes_per_stream", &s["memory"]["bytesPerSubscriber"]);
        }
        "fanout" => take(
            "bytes_per_subscription",
            &s["memory"]["bytesPerChatSubscription"],
        ),
        "mixed" => {
            take(
                "cpu_us_per_request",
                &s["cpu"]["serviceCpuMicrosPerBackgroundRequest"],
            );
            take(
                "bytes_per_tracked_chat",
                &s["memory"]["bytesPerTrackedChat"],
            );
        }
        "direct-sql" => {
            for run in s["runs"].as_array().into_iter().flatten() {
                if run["kind"] != "direct_join" {
                    continue;
                }
                match run["chats"].as_u64() {
                    Some(1) => take("chat_commits_per_second", &run["commitsPerSecond"]),
                    Some(_) => take("shard_commits_per_second", &run["commitsPerSecond"]),
                    None => {}
                }
            }
            take("member_bytes_per_row", &s["storage"]["memberBytesPerRow"]);
            take("event_bytes_per_row", &s["storage"]["eventBytesPerRow"]);
        }
        _ => {}
    }
    out
}

/// Report files named for people: the runs of one command (`mixed-1.json`,
/// `mixed-2.json`) as `mixed-*.json`, each name once, in order.
fn runs_of<'a>(files: impl Iterator<Item = &'a str>) -> String {
    let mut names: Vec<String> = Vec::new();
    for file in files {
        let stem = file.strip_suffix(".json").unwrap_or(file);
        let name = match stem.rsplit_once('-') {
            Some((head, run)) if !run.is_empty() && run.bytes().all(|b| b.is_ascii_digit()) => {
                format!("`{head}-*.json`")
            }
            _ => format!("`{file}`"),
        };
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names.join(", ")
}

/// A cost no report holds.
fn unmeasured() -> Measured {
    Measured {
        value: f64::NAN,
        source: String::new(),
    }
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The rates the workload makes, per second unless named otherwise.
#[derive(Debug, Clone, PartialEq)]
pub struct Rates {
    pub active_chats_per_minute: f64,
    pub background_writes: f64,
    pub background_reads: f64,
    pub celebrity_joins: f64,
    pub celebrity_reads: f64,
    pub subscriptions: f64,
    /// Streams following an ordinary chat, on average.
    pub followers_per_chat: f64,
    pub deliveries: f64,
    /// Events and message rows kept (`retention_days` of background writes).
    pub events_kept: f64,
}

/// One limit: what the workload asks of it, what one unit gives at its
/// target, and the units it takes.
#[derive(Debug, Clone, PartialEq)]
pub struct Limit {
    /// The tier it sizes (`instances`, `shards`, `redis`) or `fixed` for one
    /// that no count of units lifts.
    pub tier: &'static str,
    pub name: &'static str,
    pub demand: f64,
    /// Per unit at its target (for a fixed limit: the one unit's).
    pub per_unit: f64,
    pub unit: &'static str,
}

impl Limit {
    /// The units it needs (at least one); `None` when one unit gives it
    /// nothing (no count of units meets it).
    pub fn units(&self) -> Option<f64> {
        (self.per_unit > 0.0).then(|| (self.demand / self.per_unit).ceil().max(1.0))
    }
}

/// What the deployment needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Sizing {
    pub workload: Workload,
    pub costs: Costs,
    pub rates: Rates,
    pub limits: Vec<Limit>,
    pub instances: f64,
    pub shards: f64,
    pub shard_replicas: f64,
    pub redis_primaries: f64,
    pub redis_replicas: f64,
    /// The celebrity's join batch on each instance (joins per transaction).
    pub celebrity_batch: f64,
}

/// Sizes the deployment; docs/capacity.md states each formula.
pub fn size(workload: &Workload, costs: &Costs) -> Sizing {
    let w = workload;
    let active = w.chats * w.active_share_per_minute;
    let requests = active * w.requests_per_active_chat_per_minute / 60.0;
    let writes = requests * w.write_share;
    let reads = requests - writes;
    let celebrity_reads = w.celebrity_reads_per_minute / 60.0;
    let subscriptions = w.memberships * w.subscriptions_per_membership;
    let followers = if w.chats > 0.0 {
        subscriptions / w.chats
    } else {
        0.0
    };
    let deliveries = writes * followers + w.celebrity_joins_per_second * w.celebrity_followers;
    let events_kept = writes * 86_400.0 * w.retention_days;
    let rates = Rates {
        active_chats_per_minute: active,
        background_writes: writes,
        background_reads: reads,
        celebrity_joins: w.celebrity_joins_per_second,
        celebrity_reads,
        subscriptions,
        followers_per_chat: followers,
        deliveries,
        events_kept,
    };
    let gib = 1024.0 * 1024.0 * 1024.0;
    let c = costs;
    // Instances.
    let cpu_seconds = (requests * c.cpu_us_per_request.value
        + w.celebrity_joins_per_second * c.cpu_us_per_join.value
        + celebrity_reads * c.cpu_us_per_read.value
        + deliveries * c.cpu_us_per_delivery.value)
        / 1e6
        / w.speedup;
    let tracked = w.tracked_chats_per_instance.min(active * 60.0).max(0.0);
    let fixed_memory = tracked * c.bytes_per_tracked_chat.value;
    let spread_memory =
        w.streams * c.bytes_per_stream.value + subscriptions * c.bytes_per_subscription.value;
    let mut limits = vec![
        Limit {
            tier: "instances",
            name: "CPU",
            demand: cpu_seconds,
            per_unit: w.instance_cores * w.cpu_target,
            unit: "cores",
        },
        Limit {
            tier: "instances",
            name: "memory (streams, subscriptions)",
            demand: spread_memory / gib,
            per_unit: w.instance_memory_gib * w.memory_target - fixed_memory / gib,
            unit: "GiB",
        },
        Limit {
            tier: "instances",
            name: "client connections (streams)",
            demand: w.streams,
            per_unit: w.instance_connections * w.memory_target,
            unit: "connections",
        },
    ];
    let instances = limits.iter().filter_map(Limit::units).fold(1.0, f64::max);
    // The celebrity's joins reach every instance; each commits what queued
    // while its last transaction ran.
    let per_instance = w.celebrity_joins_per_second / instances;
    let celebrity_batch = 1.0 + per_instance * c.commit_ms.value / 1000.0;
    let celebrity_commits = w.celebrity_joins_per_second / celebrity_batch;
    // Shards.
    let shard_commits = c.shard_commits_per_second.value * w.shard_speedup * w.cpu_target;
    let stored = w.memberships * c.member_bytes_per_row.value
        + events_kept * c.event_bytes_per_row.value
        + events_kept * w.message_share_of_writes * w.message_bytes;
    // The celebrity is moved to a shard of its own (hot-chat isolation,
    // `isolation.shard`); the other chats' commits and rows are spread over
    // the rest, and its commits are bounded by its row lock (below).
    limits.push(Limit {
        tier: "shards",
        name: "commits of the other chats",
        demand: writes,
        per_unit: shard_commits,
        unit: "commits/s",
    });
    limits.push(Limit {
        tier: "shards",
        name: "disk",
        demand: stored / gib,
        per_unit: w.shard_storage_gib * w.memory_target,
        unit: "GiB",
    });
    let shards = limits
        .iter()
        .filter(|l| l.tier == "shards")
        .filter_map(Limit::units)
        .fold(1.0, f64::max)
        + 1.0;
    // Redis: one notice per commit, to every instance with a tail of the
    // chat: those holding a stream that follows it, and those that served
    // one of its reads in the last minute (a tail idles out after 60 s).
    let redis_node = w.redis_node_cores * w.cpu_target;
    let reads_per_chat = w.requests_per_active_chat_per_minute * (1.0 - w.write_share);
    let subscribers = (followers + reads_per_chat).min(instances).max(1.0);
    let per_notice = |reached: f64| {
        c.redis_cpu_us_per_notice.value + reached * c.redis_cpu_us_per_subscriber.value
    };
    let background_redis = writes * per_notice(subscribers) / 1e6;
    // The celebrity is read and followed through every instance.
    let celebrity_redis = celebrity_commits * per_notice(instances) / 1e6;
    limits.push(Limit {
        tier: "redis",
        name: "Redis CPU (notices)",
        demand: (background_redis + celebrity_redis) / w.speedup,
        per_unit: redis_node,
        unit: "cores",
    });
    let redis_primaries = limits
        .iter()
        .filter(|l| l.tier == "redis")
        .filter_map(Limit::units)
        .fold(1.0, f64::max);
    // Limits no count of units lifts: one chat lives on one shard, its
    // channel on one Redis node.
    limits.push(Limit {
        tier: "fixed",
        name: "the celebrity chat's row lock",
        demand: celebrity_commits,
        per_unit: c.chat_commits_per_second.value * w.shard_speedup * w.cpu_target,
        unit: "commits/s",
    });
    limits.push(Limit {
        tier: "fixed",
        name: "the celebrity chat's Redis node",
        demand: celebrity_redis / w.speedup,
        per_unit: redis_node,
        unit: "cores",
    });
    limits.push(Limit {
        tier: "fixed",
        name: "connections to a shard",
        demand: instances * w.pool_connections_per_shard,
        per_unit: w.shard_max_connections * w.memory_target,
        unit: "connections",
    });
    Sizing {
        workload: w.clone(),
        costs: c.clone(),
        rates,
        limits,
        instances,
        shards,
        shard_replicas: shards * w.replicas_per_shard,
        redis_primaries,
        redis_replicas: redis_primaries * w.redis_replicas_per_primary,
        celebrity_batch,
    }
}

impl Sizing {
    /// The limit that runs out first as the workload grows: of the ones
    /// that set a tier's count, and the fixed ones, the one used most at
    /// the sized deployment (its demand over what the units given give at
    /// their target).
    pub fn first_limit(&self) -> Option<&Limit> {
        self.limits
            .iter()
            .max_by(|a, b| self.use_of(a).total_cmp(&self.use_of(b)))
    }

    /// A limit's demand over what the deployment gives it at its target
    /// (above 1: over the target).
    pub fn use_of(&self, limit: &Limit) -> f64 {
        let units = match limit.tier {
            "instances" => self.instances,
            // Less the celebrity's own shard.
            "shards" => self.shards - 1.0,
            "redis" => self.redis_primaries,
            _ => 1.0,
        };
        let given = limit.per_unit * units;
        if given <= 0.0 {
            f64::INFINITY
        } else {
            limit.demand / given
        }
    }

    /// The sizing as markdown: the rates, the costs, the deployment, every
    /// limit, and the first one.
    pub fn markdown(&self) -> String {
        let (w, r) = (&self.workload, &self.rates);
        let mut out = String::new();
        let _ = writeln!(out, "| Workload | Value |\n|---|---|");
        for (what, v) in [
            ("active chats a minute", num(r.active_chats_per_minute)),
            (
                "background writes/s (joins, leaves, messages)",
                num(r.background_writes),
            ),
            (
                "background reads/s (member counts, polls)",
                num(r.background_reads),
            ),
            ("celebrity joins/s", num(r.celebrity_joins)),
            ("celebrity reads/s", num(r.celebrity_reads)),
            ("streams", num(w.streams)),
            ("chat subscriptions", num(r.subscriptions)),
            (
                "streams following an ordinary chat",
                fixed(r.followers_per_chat, 2),
            ),
            (
                "streams following the celebrity",
                num(w.celebrity_followers),
            ),
            ("deliveries/s", num(r.deliveries)),
            ("events kept", num(r.events_kept)),
        ] {
            let _ = writeln!(out, "| {what} | {v} |");
        }
        let _ = writeln!(out, "\n| Per-unit cost | Value | From |\n|---|---|---|");
        for (name, m) in self.costs.rows() {
            let what = COSTS.iter().find(|c| c.0 == name).map_or(name, |c| c.1);
            let _ = writeln!(out, "| {what} | {} | {} |", fixed(m.value, 2), m.source);
        }
        let _ = writeln!(
            out,
            "\n| Deployment | Count | Each |\n|---|---|---|\n\
             | chatshard instances | **{}** | {} cores, {} GiB |\n\
             | shards (primaries), the celebrity's own included | **{}** | {} GiB of disk |\n\
             | shard replicas | {} | as their primary |\n\
             | Redis primaries (sharded pub/sub) | **{}** | {} core |\n\
             | Redis replicas | {} | as their primary |",
            num(self.instances),
            num(w.instance_cores),
            num(w.instance_memory_gib),
            num(self.shards),
            num(w.shard_storage_gib),
            num(self.shard_replicas),
            num(self.redis_primaries),
            num(w.redis_node_cores),
            num(self.redis_replicas),
        );
        let first = self.first_limit().map(|l| l.name);
        let _ = writeln!(
            out,
            "\n| Limit | Sizes | Demand | Per unit at target | Units needed | Use at this deployment |\n\
             |---|---|---|---|---|---|"
        );
        for l in &self.limits {
            let mark = if Some(l.name) == first {
                " **(first)**"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "| {}{mark} | {} | {} {unit} | {} {unit} | {} | {}% of target |",
                l.name,
                l.tier,
                fixed(l.demand, 1),
                fixed(l.per_unit, 1),
                match (l.tier, l.units()) {
                    ("fixed", _) => "-".to_owned(),
                    (_, Some(n)) => num(n),
                    (_, None) => "none fits".to_owned(),
                },
                fixed(self.use_of(l) * 100.0, 0),
                unit = l.unit,
            );
        }
        let _ = writeln!(
            out,
            "\nThe celebrity's joins commit in batches of {} per instance \
             ({} commits/s on its shard).",
            fixed(self.celebrity_batch, 2),
            num(self.rates.celebrity_joins / self.celebrity_batch),
        );
        let mut over: Vec<&Limit> = self
            .limits
            .iter()
            .filter(|l| self.use_of(l) > 1.0)
            .collect();
        over.sort_by(|a, b| self.use_of(b).total_cmp(&self.use_of(a)));
        if !over.is_empty() {
            let named: Vec<String> = over
                .iter()
                .map(|l| format!("{} ({})", l.name, percent(self.use_of(l))))
                .collect();
            let _ = writeln!(
                out,
                "\nOver their target at this deployment (no count of units lifts them): {}.",
                named.join(", ")
            );
        }
        if let Some(l) = self.first_limit() {
            let _ = writeln!(
                out,
                "\nFirst limit: **{}** ({} of target).",
                l.name,
                percent(self.use_of(l)),
            );
        }
        out
    }
}

fn percent(v: f64) -> String {
    format!("{}%", fixed(v * 100.0, 0))
}

/// A whole number with thousands separated by commas.
fn num(v: f64) -> String {
    if !v.is_finite() {
        return "∞".to_owned();
    }
    let digits = format!("{:.0}", v.round().abs());
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    if v < -0.5 { format!("-{out}") } else { out }
}

/// `v` with `decimals` decimals, thousands separated when 1,000 or more.
fn fixed(v: f64, decimals: usize) -> String {
    if !v.is_finite() {
        return "∞".to_owned();
    }
    if v.abs() >= 1000.0 {
        return num(v);
    }
    format!("{v:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn measured(value: f64) -> Measured {
        Measured {
            value,
            source: "test".to_owned(),
        }
    }

    /// Costs of the order docs/benchmarks.md reports.
    fn costs() -> Costs {
        Costs {
            cpu_us_per_request: measured(60.0),
            cpu_us_per_join: measured(30.0),
            cpu_us_per_read: measured(20.0),
            cpu_us_per_delivery: measured(5.0),
            bytes_per_stream: measured(22_000.0),
            bytes_per_subscription: measured(1_300.0),
            bytes_per_tracked_chat: measured(2_000.0),
            commit_ms: measured(5.0),
            shard_commits_per_second: measured(5_000.0),
            chat_commits_per_second: measured(2_000.0),
            member_bytes_per_row: measured(150.0),
            event_bytes_per_row: measured(120.0),
            redis_cpu_us_per_notice: measured(10.0),
            redis_cpu_us_per_subscriber: measured(2.0),
        }
    }

    #[test]
    fn the_reference_workload_is_sized_and_names_its_first_limit() {
        let s = size(&Workload::default(), &costs());
        // 100,000 active chats a minute, 10 requests each, 30 % writes.
        assert!((s.rates.background_writes - 5_000.0).abs() < 1e-6);
        assert!((s.rates.background_reads - 11_666.666).abs() < 0.01);
        // The celebrity's 2,000 joins/s reach 10,000 streams each.
        assert!(s.rates.deliveries > 20_000_000.0);
        assert!(s.instances >= 1.0 && s.shards >= 1.0 && s.redis_primaries >= 1.0);
        // Every limit of a tier fits the count given to that tier.
        for l in s.limits.iter().filter(|l| l.tier != "fixed") {
            assert!(s.use_of(l) <= 1.0 + 1e-9, "{l:?}");
        }
        let first = s.first_limit().map(|l| l.name).unwrap_or_default();
        let table = s.markdown();
        assert!(
            table.contains(&format!("First limit: **{first}**")),
            "{table}"
        );
        assert!(table.contains("| chatshard instances | **"), "{table}");
    }

    #[test]
    fn more_load_never_needs_fewer_units() {
        let base = size(&Workload::default(), &costs());
        for change in [
            |w: &mut Workload| w.chats *= 2.0,
            |w: &mut Workload| w.streams *= 2.0,
            |w: &mut Workload| w.celebrity_followers *= 2.0,
            |w: &mut Workload| w.retention_days *= 2.0,
            |w: &mut Workload| w.requests_per_active_chat_per_minute *= 2.0,
        ] {
            let mut w = Workload::default();
            change(&mut w);
            let more = size(&w, &costs());
            assert!(more.instances >= base.instances);
            assert!(more.shards >= base.shards);
            assert!(more.redis_primaries >= base.redis_primaries);
        }
        // Cheaper deliveries, fewer instances when CPU is what sets them.
        let mut cheaper = costs();
        cheaper.cpu_us_per_delivery.value /= 10.0;
        assert!(size(&Workload::default(), &cheaper).instances <= base.instances);
    }

    #[test]
    fn costs_are_read_from_reports_as_median_of_runs() {
        let spike = |cpu: f64| {
            json!({"scenario": {"name": "join-spike",
                "cpu": {"serviceCpuMicrosPerJoin": cpu}, "commits": {"meanTransactionMs": 4.0}}})
        };
        let reports = vec![
            ("a.json".to_owned(), spike(30.0)),
            ("b.json".to_owned(), spike(20.0)),
            ("c.json".to_owned(), spike(90.0)),
            (
                "f.json".to_owned(),
                json!({"scenario": {"name": "fetch-spike", "cpu": {"serviceCpuMicrosPerPoll": 12.0}}}),
            ),
            (
                "s.json".to_owned(),
                json!({"scenario": {"name": "fanout", "muxChatsPerStream": 0,
                    "cpu": {"serviceCpuMicrosPerDelivery": 4.0},
                    "memory": {"bytesPerSubscriber": 22000}}}),
            ),
            (
                "m.json".to_owned(),
                json!({"scenario": {"name": "fanout", "muxChatsPerStream": 1000,
                    "memory": {"bytesPerSubscriber": 1300000, "bytesPerChatSubscription": 1300}}}),
            ),
            (
                "x.json".to_owned(),
                json!({"scenario": {"name": "mixed", "cpu": {"serviceCpuMicrosPerBackgroundRequest": 70.0},
                    "memory": {"bytesPerTrackedChat": 3000}, "redis": {"cpuMicrosPerNotice": 9.0}}}),
            ),
            (
                "d1.json".to_owned(),
                json!({"scenario": {"name": "direct-sql",
                    "runs": [{"kind": "direct_join", "chats": 1, "commitsPerSecond": 1500.0},
                             {"kind": "direct_batched", "chats": 1, "commitsPerSecond": 200.0}],
                    "storage": {"memberBytesPerRow": 160.0, "eventBytesPerRow": 110.0}}}),
            ),
        ];
        let err = Costs::from_reports(&reports).unwrap_err();
        assert!(err.contains("shard_commits_per_second"), "{err}");
        assert!(!err.contains("cpu_us_per_join"), "{err}");
        assert!(err.contains("redis_cpu_us_per_subscriber"), "{err}");
        let mut all = reports;
        all.push((
            "d16.json".to_owned(),
            json!({"scenario": {"name": "direct-sql",
                "runs": [{"kind": "direct_join", "chats": 16, "commitsPerSecond": 9000.0}]}}),
        ));
        for (file, instances, micros) in [("r1a", 1, 30.0), ("r1b", 1, 34.0), ("r3", 3, 72.0)] {
            all.push((
                file.to_owned(),
                json!({"scenario": {"name": "fanout", "muxChatsPerStream": 0,
                    "redis": {"subscribedInstances": instances, "cpuMicrosPerNotice": micros}}}),
            ));
        }
        let costs = Costs::from_reports(&all).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(costs.cpu_us_per_join.value, 30.0);
        assert!(costs.cpu_us_per_join.source.starts_with("median of 3"));
        assert_eq!(costs.chat_commits_per_second.value, 1500.0);
        assert_eq!(costs.shard_commits_per_second.value, 9000.0);
        assert_eq!(costs.bytes_per_subscription.value, 1300.0);
        assert_eq!(costs.bytes_per_stream.value, 22000.0);
        // 32 µs at one instance (the median), 72 at three: 20 per instance
        // reached, 12 for the notice itself.
        assert_eq!(costs.redis_cpu_us_per_subscriber.value, 20.0);
        assert_eq!(costs.redis_cpu_us_per_notice.value, 12.0);
    }

    #[test]
    fn a_workload_is_the_defaults_then_the_file_then_the_sets() {
        let file = json!({"streams": 1000, "cpu_target": 0.6});
        let w = Workload::build(Some(&file), &["streams=2000".to_owned()])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(w.streams, 2000.0);
        assert_eq!(w.cpu_target, 0.6);
        assert_eq!(w.chats, Workload::default().chats);
        let err = Workload::build(
            Some(&json!({"strems": 1})),
            &["cpu_target=2".to_owned(), "oops".to_owned()],
        )
        .unwrap_err();
        assert!(err.contains("oops") && err.contains("strems"), "{err}");
        let err = Workload::build(None, &["cpu_target=2".to_owned()]).unwrap_err();
        assert!(err.contains("cpu_target"), "{err}");
    }

    #[test]
    fn the_runs_of_one_command_are_named_once() {
        let files = [
            "mixed-2.json",
            "mixed-1.json",
            "x.json",
            "direct-sql-64-chats-3.json",
        ];
        assert_eq!(
            runs_of(files.into_iter()),
            "`mixed-*.json`, `x.json`, `direct-sql-64-chats-*.json`"
        );
    }

    #[test]
    fn numbers_are_written_for_people() {
        assert_eq!(num(1_234_567.4), "1,234,567");
        assert_eq!(num(999.0), "999");
        assert_eq!(fixed(2.345, 2), "2.35");
        assert_eq!(fixed(12_345.6, 2), "12,346");
        assert_eq!(num(f64::INFINITY), "∞");
    }
}
