//! The SQL: one function per statement, each taking a connection (inside a
//! transaction where the caller needs one). The only place SQL lives.
//!
//! Rules every statement here follows (see docs/schema.md):
//! - auto-increment tables are written only with plain single- or multi-row
//!   `INSERT ... VALUES`, never `INSERT ... SELECT`, `REPLACE ... SELECT` or
//!   `LOAD DATA`, so `innodb_autoinc_lock_mode=2` never takes the table-level
//!   AUTO-INC lock; ids of a multi-row insert are read back by their unique key,
//!   never computed from `LAST_INSERT_ID()` (mode 2 does not promise them
//!   consecutive);
//! - counters and revisions change only by `UPDATE ... SET x = x + ?` on a row the
//!   transaction has locked, never by writing back a value read without a lock;
//! - nothing here is MySQL- or MariaDB-only: no `RETURNING`, no `ON CONFLICT`.

pub mod buckets;
pub mod chats;
pub mod events;
pub mod members;
pub mod messages;
pub mod migrations;
pub mod move_snapshot;
pub mod moves;
pub mod range_copy;
pub mod repair;
pub mod reparent;
pub mod replication;
pub mod server;

use chrono::{DateTime, NaiveDateTime, Utc};

/// A stored row this version cannot read: a code it does not know, or an id
/// that does not parse. Reported as an error naming the row, never skipped:
/// skipping one would show a client a gap in revisions or a member who is not
/// there.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "{table} row {key} of chat {chat_id}: {column} = {value} is not a value this version knows"
)]
pub struct UnreadableRow {
    pub table: &'static str,
    pub chat_id: String,
    /// The row's key within the chat (a revision, a user id, a member id).
    pub key: String,
    pub column: &'static str,
    pub value: String,
}

/// Converts a stored `DATETIME(6)` (always UTC) back to a timestamp.
pub fn utc(t: NaiveDateTime) -> DateTime<Utc> {
    t.and_utc()
}

/// Appends `?, ?, ?` (n placeholders) to a statement.
fn placeholders(sql: &mut String, n: usize) {
    for i in 0..n {
        sql.push_str(if i == 0 { "?" } else { ", ?" });
    }
}
