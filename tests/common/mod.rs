//! The test kit every integration test binary shares. Each binary includes it
//! with `#[path = "../common/mod.rs"] mod common;` (or `"common/mod.rs"` from a
//! file directly in `tests/`) and uses what it needs:
//!
//! - [`servers`]: every local `mariadbd` and `redis-server` the tests run, all
//!   started through the project's own `chatshard::localdb`: shards shared by
//!   the binary, or a test's own (to kill, stop or slow them), and Redis
//!   servers and clusters. Real servers on free ports and fresh directories;
//!   never the system's, never a mock.
//! - [`app`]: [`TestApp`], chatshard in-process on port 0 with a typed client:
//!   so many shared or own shards, Redis or a Redis Cluster or none, settings
//!   changed by the test. It kills the servers it owns when dropped (after a
//!   panic too) and fails the test with the server task's own error or panic.
//! - [`wait`]: [`eventually`] and [`Wait`], the one bounded poll: a deadline,
//!   a message, and the last thing seen when it fails.
//! - [`sse`]: server-sent events read from a stream; a connection that breaks
//!   is a failure, never the end of the stream.
//! - [`rows`] and [`metrics`]: what the shards store (count equals JOINED
//!   rows, revisions gapless) and what `/metrics` and the admin API say.
//!
//! What it must not do: sleep for a fixed time as synchronisation (every wait
//! is a [`Wait`]), share a chat id or a directory between tests ([`unique`],
//! fresh temp dirs), or let a server outlive the test process (the localdb
//! watchdogs see to that even after SIGKILL).
#![allow(dead_code, unused_imports)]

pub mod app;
pub mod metrics;
pub mod rows;
pub mod servers;
pub mod sse;
pub mod wait;

use std::sync::atomic::{AtomicU64, Ordering};

pub use app::TestApp;
pub use metrics::{admin, admin_get, metric_samples, sum_where};
pub use rows::{assert_chat_consistent, count_and_rows, joined_users, page_revisions};
pub use servers::shared_cluster;
pub use sse::{Sse, SseReader};
pub use wait::{Wait, eventually};

/// An id unique to this process and call (the shared shards outlive tests,
/// and earlier runs' rows may still be on a reused server).
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
