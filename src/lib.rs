//! chatshard: a storage-resilience layer for group-chat servers.
//!
//! Chat servers call chatshard over REST for chat membership, member counts,
//! messages and per-chat event logs. Every request is routed by `chatId` to one
//! of several MySQL shards, and every shard is reached only through its own
//! bounded pool, so that one hot chat or one slow shard cannot take the service
//! down.
//!
//! # Layout
//!
//! - [`cli`]: the command line (`serve`, `migrate`, `check`, `repair-counts`,
//!   `purge`, `move-chat`, `cancel-move`, `move-buckets`,
//!   `cancel-move-buckets`); parses arguments and dispatches, nothing else.
//! - [`app`]: builds the application from [`config::Settings`], starts the
//!   service's background tasks, binds and runs until stopped; the only place
//!   (with `cli`) that reads the configuration and hands typed settings down.
//! - [`config`]: the TOML file (`settings/`), the environment overlay
//!   (`env.rs`) and validation (`validate.rs`).
//! - [`live`]: the live section (hot chats, join and fetch throttling, stream
//!   limits, retention, isolation), swapped atomically without a restart.
//! - [`domain`]: newtypes parsed once at the edge (`ChatId`, `UserId`, ...),
//!   and the event log's entry (`Event`, `EventType`, `MemberState`).
//! - [`error`]: error helpers any layer may use (it depends on nothing).
//! - [`crypto`]: the process's rustls provider (ring) and PEM files read
//!   with the setting that names them.
//! - [`routing`]: `chatId -> bucket -> shard`, a frozen hash, and the
//!   versioned bucket table.
//! - [`shard`]: one [`shard::Shard`] = circuit breaker + per-chat share +
//!   bulkhead (admission and a bounded pool) + a deadline per operation, per
//!   member (its writer and, when replicated, its replicas); the member
//!   monitor and the pure [`shard::topology`] decide where writes go. The
//!   only place that knows there are N databases. Seen from outside through
//!   [`shard::ShardStatus`] snapshots.
//! - [`storage`]: the SQL, one function per statement; the only place SQL
//!   lives. It runs the statements it is given and decides nothing.
//! - [`service`]: the use cases: writes through the per-chat group commit
//!   (`plan.rs` decides a batch, `write.rs` runs it), reads, polls and the
//!   in-memory tails; chat and bucket-range moves (`move_plan.rs` decides
//!   every step, `move_driver.rs` runs them over `chat_move.rs` and
//!   `range_move.rs`; `replay.rs` decides what a copied batch writes);
//!   the engine of the multiplexed event streams (`mux.rs`); hot-chat
//!   isolation, the event log's lifecycle, and repair.
//! - [`throttle`]: join throttling, hot-chat detection, the fetch-throttling
//!   decision, and generic coalescing caches; local, in-process, bounded.
//! - [`fleet`]: what the instances of a deployment share through Redis (event
//!   notices, hot marks, the global join limit, live instances, the live
//!   configuration); absent Redis, an instance acts alone.
//! - [`telemetry`], [`metrics`]: logs, OpenTelemetry traces over OTLP, and
//!   metrics (Prometheus text on `/metrics`, OTLP when configured).
//! - [`http`]: the axum router, handlers, extractors and the
//!   `application/problem+json` mapping; the only place that knows status
//!   codes. Also the connection loop, the admin API and the event streams
//!   (per chat, multiplexed),
//!   framed as server-sent events from what the service yields.
//! - [`migrate`]: applies `migrations/` to every shard, and the DBA's tools:
//!   status, the SQL to apply by hand, recording it, repairing a failed run,
//!   renaming renumbered versions.
//! - [`check`]: `chatshard check`, a shard's settings, grants and schema
//!   judged (in pure code) against what chatshard needs.
//! - [`localdb`]: local `mariadbd` and `redis-server` processes, and
//!   [`localdb::cluster`], the one kit that starts local shards for `serve --dev`,
//!   the tests and the benches ([`localdb::redis`] for Redis and Redis Cluster).
//!
//! Dependencies point one way. A module imports only modules of the layers
//! below its own; layers, lowest first (`tests/layers.rs` reads this line and
//! fails on an import against it):
//!
//! Layers: domain error crypto | telemetry | routing live | config | storage | shard migrate | throttle check localdb | fleet | service | metrics | http | app | cli
//!
//! So `http -> service -> {fleet, throttle, shard} -> storage`. `fleet`
//! feeds the service's tails through `fleet::NoticeSink`, and hears of them
//! through `fleet::TailObserver`, both implemented above it; `metrics` reads
//! stream gauges through `metrics::StreamCounts`. `config` holds typed
//! settings any layer may take, and only `app` and `cli` load it.
//! docs/architecture.md shows the request path end to end.
#![forbid(unsafe_code)]

pub mod app;
pub mod check;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod error;
pub mod fleet;
pub mod http;
pub mod live;
pub mod localdb;
pub mod metrics;
pub mod migrate;
pub mod routing;
pub mod service;
pub mod shard;
pub mod storage;
pub mod telemetry;
pub mod throttle;

/// What unit tests return, so that they can use `?`.
#[cfg(test)]
pub(crate) type TestResult = Result<(), Box<dyn std::error::Error>>;
