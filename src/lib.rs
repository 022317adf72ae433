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
//! - [`cli`]: the command line (`serve`, `migrate`, `repair-counts`); parses
//!   arguments and dispatches, nothing else.
//! - [`app`]: builds the application from [`config::Settings`], binds and runs
//!   until stopped.
//! - [`config`]: the TOML file plus environment overrides, validated on load.
//! - [`live`]: the live section (hot chats, join throttle), swapped atomically
//!   without a restart.
//! - [`domain`]: newtypes parsed once at the edge (`ChatId`, `UserId`, ...).
//! - [`routing`]: `chatId -> bucket -> shard`, a frozen hash.
//! - [`shard`]: one [`shard::Shard`] = a bounded pool (the bulkhead) plus a
//!   deadline per operation; the only place that knows there are N databases.
//! - [`storage`]: the SQL, one function per statement; the only place SQL lives.
//! - [`service`]: the use cases (join, leave, post, fetch...), including the
//!   per-chat group commit that folds many writes into one transaction.
//! - [`throttle`]: join throttling, hot-chat detection, fetch coalescing; local,
//!   in-process, bounded caches.
//! - [`telemetry`], [`metrics`]: logs, OpenTelemetry traces over OTLP, and
//!   metrics (Prometheus text on `/metrics`, OTLP when configured).
//! - [`http`]: the axum router, handlers, extractors and the
//!   `application/problem+json` mapping; the only place that knows status codes.
//! - [`migrate`]: applies `migrations/` to every shard and reports versions.
//! - [`localdb`]: starts and stops local `mariadbd` processes for `serve --dev`
//!   and for the test suite.
//! - [`dev`]: `serve --dev`: local shards, settings for them.
//!
//! Dependencies point one way: `http -> service -> shard -> storage`; `domain` is
//! shared; only `app` and `cli` read configuration and hand typed settings down.
#![forbid(unsafe_code)]

pub mod app;
pub mod cli;
pub mod config;
pub mod dev;
pub mod domain;
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
