//! What a shard operation can fail with, and how a driver error is classified.
//!
//! The classification decides who is to blame, and so what the breaker sees
//! (see [`super::breaker`]): the shard (connection class, deadlines, unknown
//! outcomes), the chat (row-lock contention on one chat's rows), or nobody's
//! health (bulkhead refusals, read-only, any other database error).

use std::time::Duration;

/// Why a shard operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// The circuit breaker is open: the shard is known broken.
    #[error("shard {shard} is unavailable (circuit breaker open)")]
    Open {
        shard: String,
        retry_after_secs: u64,
    },
    /// The chat already holds its whole share of the shard's slots and waiting
    /// places (the per-chat share).
    #[error("chat holds its whole share of shard {shard}")]
    ChatBusy { shard: String },
    /// The bulkhead is full: too many callers in flight and waiting.
    #[error("shard {shard} is busy")]
    Busy { shard: String },
    /// The shard did not answer within the operation deadline.
    #[error("shard {shard} did not answer within {deadline:?}")]
    Timeout { shard: String, deadline: Duration },
    /// No connection to the shard could be made or kept.
    #[error("shard {shard} is unavailable")]
    Unavailable {
        shard: String,
        #[source]
        source: sqlx::Error,
    },
    /// The replicated shard has no writer now: its writer died or was made
    /// read-only and no other member is writable yet (or one is, and waits
    /// for its confirmation). Nothing was sent.
    #[error("shard {shard} has no writer now")]
    NoWriter { shard: String },
    /// Several members of the replicated shard are writable: writes are
    /// refused until one is demoted. Nothing was sent.
    #[error("shard {shard} has several writable members (split brain)")]
    SplitBrain { shard: String },
    /// The shard refuses writes (`read_only`).
    #[error("shard {shard} is read-only")]
    ReadOnly {
        shard: String,
        #[source]
        source: sqlx::Error,
    },
    /// A write's outcome is unknown: the connection failed while committing, or
    /// the deadline passed before the shard answered.
    #[error("the outcome of a write on shard {shard} is unknown")]
    OutcomeUnknown {
        shard: String,
        #[source]
        cause: OutcomeCause,
    },
    /// Writers of one chat waited too long for each other's row locks (lock
    /// wait timeout, or deadlocks that kept coming back): the chat's trouble,
    /// not the shard's. Nothing was applied.
    #[error("writes to one chat on shard {shard} contend for its row locks")]
    Contended {
        shard: String,
        #[source]
        source: sqlx::Error,
    },
    /// Any other database error (a bug, or a schema that does not match).
    #[error("database error on shard {shard}")]
    Database {
        shard: String,
        #[source]
        source: sqlx::Error,
    },
    /// The shard's rows are not what this version expects: a row it cannot
    /// read, or an invariant the rows break. The transaction was rolled back.
    #[error("unexpected data on shard {shard}")]
    BadData {
        shard: String,
        #[source]
        source: BadData,
    },
}

/// Rows that contradict what the code relies on.
#[derive(Debug, thiserror::Error)]
pub enum BadData {
    #[error(transparent)]
    Unreadable(#[from] crate::storage::UnreadableRow),
    /// An invariant of the stored rows does not hold.
    #[error("{0}")]
    Invariant(String),
}

/// Why a write's outcome is unknown.
#[derive(Debug, thiserror::Error)]
pub enum OutcomeCause {
    #[error("no answer within {0:?}")]
    Deadline(Duration),
    #[error("the connection failed during COMMIT")]
    Connection(#[source] sqlx::Error),
}

/// Every outcome of a shard operation, as telemetry names them; `ok` first.
pub const OUTCOMES: [&str; 13] = [
    "ok",
    "breaker_open",
    "chat_busy",
    "shard_busy",
    "timeout",
    "unavailable",
    "read_only",
    "outcome_unknown",
    "chat_contended",
    "database",
    "bad_data",
    "no_writer",
    "split_brain",
];

impl ShardError {
    /// The shard the error came from.
    /// The driver's error and what it means when the shard answered and
    /// refused the connection (see [`crate::error::connect_refusal`]).
    pub fn connect_refusal(&self) -> Option<(crate::error::ConnectRefusal, &sqlx::Error)> {
        match self {
            Self::Unavailable { source, .. } | Self::Database { source, .. } => {
                crate::error::connect_refusal(source).map(|why| (why, source))
            }
            _ => None,
        }
    }

    pub fn shard(&self) -> &str {
        match self {
            Self::Open { shard, .. }
            | Self::ChatBusy { shard }
            | Self::Busy { shard }
            | Self::Timeout { shard, .. }
            | Self::Unavailable { shard, .. }
            | Self::ReadOnly { shard, .. }
            | Self::OutcomeUnknown { shard, .. }
            | Self::Contended { shard, .. }
            | Self::Database { shard, .. }
            | Self::BadData { shard, .. }
            | Self::NoWriter { shard }
            | Self::SplitBrain { shard } => shard,
        }
    }

    /// A stable name of the error, for telemetry (one of [`OUTCOMES`]).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Open { .. } => "breaker_open",
            Self::ChatBusy { .. } => "chat_busy",
            Self::Busy { .. } => "shard_busy",
            Self::Timeout { .. } => "timeout",
            Self::Unavailable { .. } => "unavailable",
            Self::ReadOnly { .. } => "read_only",
            Self::OutcomeUnknown { .. } => "outcome_unknown",
            Self::Contended { .. } => "chat_contended",
            Self::Database { .. } => "database",
            Self::BadData { .. } => "bad_data",
            Self::NoWriter { .. } => "no_writer",
            Self::SplitBrain { .. } => "split_brain",
        }
    }

    /// Whether the call was refused by a protection before it reached the
    /// database (its duration says nothing about the shard's latency).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::Open { .. }
                | Self::ChatBusy { .. }
                | Self::Busy { .. }
                | Self::NoWriter { .. }
                | Self::SplitBrain { .. }
        )
    }

    /// Whether the breaker counts this as a failure of the shard (connection
    /// class, deadline overrun, unknown outcome); see [`super::breaker`].
    pub fn counts_against_shard(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::Unavailable { .. } | Self::OutcomeUnknown { .. } => true,
            Self::Open { .. }
            | Self::ChatBusy { .. }
            | Self::Busy { .. }
            | Self::ReadOnly { .. }
            | Self::Contended { .. }
            | Self::Database { .. }
            | Self::BadData { .. }
            | Self::NoWriter { .. }
            | Self::SplitBrain { .. } => false,
        }
    }
}

/// An error raised inside an operation.
#[derive(Debug)]
pub enum OpError {
    /// A statement failed.
    Sql(sqlx::Error),
    /// COMMIT itself failed: the transaction may or may not have been applied.
    Commit(sqlx::Error),
    /// The rows contradict the code (see [`BadData`]); nothing was committed.
    BadData(BadData),
}

impl OpError {
    /// A stored invariant that does not hold.
    pub fn invariant(what: impl Into<String>) -> Self {
        Self::BadData(BadData::Invariant(what.into()))
    }
}

impl From<crate::storage::UnreadableRow> for OpError {
    fn from(e: crate::storage::UnreadableRow) -> Self {
        Self::BadData(BadData::Unreadable(e))
    }
}

impl From<sqlx::Error> for OpError {
    fn from(e: sqlx::Error) -> Self {
        Self::Sql(e)
    }
}

/// Classifies an operation's error for the shard named `shard`.
pub(crate) fn classify(shard: &str, err: OpError) -> ShardError {
    let shard = shard.to_owned();
    match err {
        OpError::BadData(source) => ShardError::BadData { shard, source },
        OpError::Commit(e) if is_connection_error(&e) => ShardError::OutcomeUnknown {
            shard,
            cause: OutcomeCause::Connection(e),
        },
        OpError::Commit(e) | OpError::Sql(e) => {
            if is_read_only_error(&e) {
                ShardError::ReadOnly { shard, source: e }
            } else if is_lock_contention(&e) {
                ShardError::Contended { shard, source: e }
            } else if is_connection_error(&e) {
                // Before COMMIT was sent, a lost connection rolls the
                // transaction back: nothing was applied.
                ShardError::Unavailable { shard, source: e }
            } else {
                ShardError::Database { shard, source: e }
            }
        }
    }
}

/// Connection-class failures: the server or the network, not the request.
pub fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            db_error_number(db.as_ref()).and_then(class_of) == Some(ErrorClass::Connection)
        }
        _ => false,
    }
}

/// `ER_LOCK_WAIT_TIMEOUT` (1205) and `ER_LOCK_DEADLOCK` (1213): writers of the
/// same rows waited for each other. The shard answered; the statement (1205) or
/// the whole transaction (1213) was rolled back.
pub fn is_lock_contention(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            db_error_number(db.as_ref()).and_then(class_of) == Some(ErrorClass::Contention)
        }
        _ => false,
    }
}

/// The server is read-only (`read_only`, MySQL's `super_read_only`).
pub fn is_read_only_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            db_error_number(db.as_ref()).and_then(class_of) == Some(ErrorClass::ReadOnly)
        }
        _ => false,
    }
}

/// `ER_LOCK_DEADLOCK` (1213): the whole transaction was rolled back and may be
/// run again.
pub fn is_deadlock(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db_error_number(db.as_ref()) == Some(1213),
        _ => false,
    }
}

/// What a server error number says, for MariaDB's and MySQL 8's numbers
/// alike; `None` for an error of the request itself (a duplicate key, a
/// syntax error), which never counts against the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The server or the connection, not the request.
    Connection,
    /// Writers of the same rows waited for each other; the shard answered.
    Contention,
    /// The server refuses writes.
    ReadOnly,
}

/// Classifies a server error number.
pub fn class_of(number: u16) -> Option<ErrorClass> {
    match number {
        // Too many connections (1040), per account (1203); server shutdown
        // (1053); net read/write errors (1158-1161); query interrupted
        // (1317); connection killed (MariaDB 1927); statement time exceeded
        // (MariaDB's max_statement_time 1969, MySQL's max_execution_time
        // 3024); server in offline_mode (MySQL 3032); disconnected after
        // wait_timeout (MySQL 8.0.24+ 4031).
        1040 | 1203 | 1053 | 1158..=1161 | 1317 | 1927 | 1969 | 3024 | 3032 | 4031 => {
            Some(ErrorClass::Connection)
        }
        // Lock wait timeout (1205: the statement rolled back) and deadlock
        // (1213: the transaction rolled back). Not connection-class: that is
        // one chat's rows.
        1205 | 1213 => Some(ErrorClass::Contention),
        // ER_OPTION_PREVENTS_STATEMENT (1290: --read-only, or MySQL's
        // --super-read-only) and ER_READ_ONLY_MODE (1836).
        1290 | 1836 => Some(ErrorClass::ReadOnly),
        _ => None,
    }
}

fn db_error_number(db: &dyn sqlx::error::DatabaseError) -> Option<u16> {
    db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
        .map(|e| e.number())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mariadb_and_mysql_numbers_are_classified_alike() {
        use ErrorClass::*;
        for (number, class) in [
            (1040, Some(Connection)),
            (1203, Some(Connection)),
            (1053, Some(Connection)),
            (1159, Some(Connection)),
            (1317, Some(Connection)),
            (1927, Some(Connection)), // MariaDB: connection killed
            (1969, Some(Connection)), // MariaDB: max_statement_time
            (3024, Some(Connection)), // MySQL: max_execution_time
            (3032, Some(Connection)), // MySQL: offline_mode
            (4031, Some(Connection)), // MySQL 8: idle disconnect
            (1205, Some(Contention)),
            (1213, Some(Contention)),
            (1290, Some(ReadOnly)),
            (1836, Some(ReadOnly)),
            (1062, None), // duplicate key: the request's own
            (1064, None), // syntax
            (1146, None), // no such table
        ] {
            assert_eq!(class_of(number), class, "{number}");
        }
    }

    #[test]
    fn refusals_are_not_failures_of_the_shard() {
        let shard = "s".to_owned();
        let refusals = [
            ShardError::Open {
                shard: shard.clone(),
                retry_after_secs: 1,
            },
            ShardError::ChatBusy {
                shard: shard.clone(),
            },
            ShardError::Busy { shard },
        ];
        for e in refusals {
            assert!(e.is_refusal() && !e.counts_against_shard(), "{e}");
            assert!(OUTCOMES.contains(&e.code()));
        }
    }

    #[test]
    fn an_unknown_outcome_names_its_cause() {
        let e = ShardError::OutcomeUnknown {
            shard: "s".into(),
            cause: OutcomeCause::Deadline(Duration::from_millis(500)),
        };
        assert_eq!(
            crate::error::chain(&e),
            "the outcome of a write on shard s is unknown: no answer within 500ms"
        );
    }
}
