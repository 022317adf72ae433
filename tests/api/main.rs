//! Integration tests: one binary, real MariaDB shards started once for it.

mod admin;
mod chats;
mod concurrency;
mod deploy;
mod helpers;
mod hot;
mod members;
mod messages;
mod repair;
mod routing;
mod schemathesis;
mod validation;
