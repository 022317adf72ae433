//! Integration tests: one binary, real MariaDB shards started once for it.

#[path = "../common/mod.rs"]
mod common;

mod admin;
mod auth;
mod chats;
mod concurrency;
mod contention;
mod deploy;
mod hardening;
mod helpers;
mod hot;
mod image;
mod lifecycle;
mod longpoll;
mod members;
mod messages;
mod move_buckets;
mod move_cancel;
mod move_fence;
mod move_isolation;
mod move_killed_mover;
mod move_kit;
mod move_online;
mod move_takeover;
mod moved_markers;
mod mux;
mod openapi;
mod repair;
mod routing;
mod schemathesis;
mod stream;
mod tls;
mod unreadable;
mod validation;
