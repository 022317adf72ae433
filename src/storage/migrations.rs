//! Statements on sqlx's migration table, `_sqlx_migrations`, beyond what
//! sqlx's own migrator runs: reading it without creating it, renumbering a
//! version, and clearing a failed run. `crate::migrate` decides when each runs.
//!
//! The table (created by sqlx): `version BIGINT PRIMARY KEY, description TEXT,
//! installed_on TIMESTAMP, success BOOLEAN, checksum BLOB, execution_time
//! BIGINT`. sqlx inserts a row with `success = FALSE` before a migration's SQL
//! and sets it TRUE after; MySQL commits DDL at once, so a migration that fails
//! part-way leaves that row behind (a "dirty" version). `execution_time = -1`
//! marks a version recorded without running its SQL (`migrate --mark-applied`).

use sqlx::MySqlConnection;

/// The table sqlx's migrator keeps, on every shard.
pub const TABLE: &str = "_sqlx_migrations";

/// One row of the migration table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedRow {
    pub version: i64,
    pub description: String,
    pub success: bool,
    pub checksum: Vec<u8>,
    /// Nanoseconds the SQL took; -1 when the version was recorded, not run.
    pub execution_time: i64,
}

/// Whether the migration table exists in the connection's database (reading
/// it must not create it: `migrate --print-sql` and `check` change nothing).
pub async fn table_exists(conn: &mut MySqlConnection) -> sqlx::Result<bool> {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.TABLES \
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = '_sqlx_migrations'",
    )
    .fetch_one(conn)
    .await?;
    Ok(n > 0)
}

/// Every row of the migration table, by version; none when it does not exist.
pub async fn applied(conn: &mut MySqlConnection) -> sqlx::Result<Vec<AppliedRow>> {
    if !table_exists(&mut *conn).await? {
        return Ok(Vec::new());
    }
    let rows: Vec<(i64, String, bool, Vec<u8>, i64)> = sqlx::query_as(
        "SELECT version, description, success, checksum, execution_time \
         FROM _sqlx_migrations ORDER BY version",
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(version, description, success, checksum, execution_time)| AppliedRow {
                version,
                description,
                success,
                checksum,
                execution_time,
            },
        )
        .collect())
}

/// Gives the row of version `from` the number `to`; only a row whose checksum
/// is `checksum`, so a row with other content is never renamed. Returns
/// whether a row changed.
pub async fn renumber(
    conn: &mut MySqlConnection,
    from: i64,
    to: i64,
    checksum: &[u8],
) -> sqlx::Result<bool> {
    let done =
        sqlx::query("UPDATE _sqlx_migrations SET version = ? WHERE version = ? AND checksum = ?")
            .bind(to)
            .bind(from)
            .bind(checksum)
            .execute(conn)
            .await?;
    Ok(done.rows_affected() == 1)
}

/// Records a version that failed part-way (`success = FALSE`) as applied,
/// with the checksum of this build's file: the DBA finished it by hand.
/// Returns whether such a row was there.
pub async fn settle_dirty(
    conn: &mut MySqlConnection,
    version: i64,
    checksum: &[u8],
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE _sqlx_migrations SET success = TRUE, checksum = ?, execution_time = -1 \
         WHERE version = ? AND success = FALSE",
    )
    .bind(checksum)
    .bind(version)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Deletes the row of a version that failed part-way, so that the next
/// `migrate` runs it again. Only a failed row: returns whether one was there.
pub async fn delete_dirty(conn: &mut MySqlConnection, version: i64) -> sqlx::Result<bool> {
    let done = sqlx::query("DELETE FROM _sqlx_migrations WHERE version = ? AND success = FALSE")
        .bind(version)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}
