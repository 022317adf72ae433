//! Integration tests: one binary, real MariaDB shards started once for it.

#[path = "../common/mod.rs"]
mod common;

mod admin;
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
mod moved;
mod mux;
mod openapi;
mod repair;
mod routing;
mod schemathesis;
mod stream;
mod unreadable;
mod validation;
