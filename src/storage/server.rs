//! Statements about the server and the session rather than a table.

use sqlx::MySqlConnection;

/// Sets up a new connection: READ COMMITTED (see `shard::manager` for why) and,
/// when `lock_wait_timeout_secs` is not 0, the session's
/// `innodb_lock_wait_timeout`, so that a writer stuck behind another's row lock
/// gives up with error 1205 (one chat's contention) before the operation
/// deadline would count it against the whole shard.
pub async fn prepare_session(
    conn: &mut MySqlConnection,
    lock_wait_timeout_secs: u64,
) -> sqlx::Result<()> {
    sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .execute(&mut *conn)
        .await?;
    if lock_wait_timeout_secs > 0 {
        sqlx::query("SET SESSION innodb_lock_wait_timeout = ?")
            .bind(lock_wait_timeout_secs)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// `@@innodb_autoinc_lock_mode` and `@@innodb_flush_log_at_trx_commit`.
pub async fn innodb_settings(conn: &mut MySqlConnection) -> sqlx::Result<(i64, i64)> {
    sqlx::query_as(
        "SELECT CAST(@@innodb_autoinc_lock_mode AS SIGNED), \
         CAST(@@innodb_flush_log_at_trx_commit AS SIGNED)",
    )
    .fetch_one(conn)
    .await
}
