//! Statements about the server and the session rather than a table.

use sqlx::MySqlConnection;

pub use crate::domain::ID_SERIES;

/// Sets up a new connection:
///
/// - READ COMMITTED (see `shard::manager` for why);
/// - the shard's own series of auto-increment ids
///   (`auto_increment_increment` = [`ID_SERIES`], `auto_increment_offset` =
///   `id_block + 1`), so ids made on different shards never meet and a
///   moved chat's rows keep theirs on the target (docs/moving-chats.md). A
///   row copied in with a higher id of another series moves the table's
///   counter past it, and the next id is still the next of this shard's
///   series;
/// - when `lock_wait_timeout_secs` is not 0, the session's
///   `innodb_lock_wait_timeout`, so that a writer stuck behind another's row
///   lock gives up with error 1205 (one chat's contention) before the
///   operation deadline would count it against the whole shard.
pub async fn prepare_session(
    conn: &mut MySqlConnection,
    lock_wait_timeout_secs: u64,
    id_block: u16,
) -> sqlx::Result<()> {
    sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .execute(&mut *conn)
        .await?;
    let offset = u64::from(id_block % ID_SERIES) + 1;
    if lock_wait_timeout_secs > 0 {
        sqlx::query(
            "SET SESSION auto_increment_increment = ?, SESSION auto_increment_offset = ?, \
             SESSION innodb_lock_wait_timeout = ?",
        )
        .bind(ID_SERIES)
        .bind(offset)
        .bind(lock_wait_timeout_secs)
        .execute(&mut *conn)
        .await?;
    } else {
        sqlx::query("SET SESSION auto_increment_increment = ?, SESSION auto_increment_offset = ?")
            .bind(ID_SERIES)
            .bind(offset)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Makes the session's next transaction (only the next one) REPEATABLE
/// READ, so that its statements all read the same snapshot; the session
/// stays READ COMMITTED otherwise. Sent before the transaction begins.
pub async fn repeatable_read_next(conn: &mut MySqlConnection) -> sqlx::Result<()> {
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(conn)
        .await?;
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

/// The server variables `chatshard check` reads, by name: those of `names`
/// the server has (MariaDB 10.11 has `tx_isolation`, MySQL 8 only
/// `transaction_isolation`, so some are absent). Values as the server shows
/// them (`ON`/`OFF`, numbers as text).
pub async fn global_variables(conn: &mut MySqlConnection) -> sqlx::Result<Vec<(String, String)>> {
    // The text protocol: `SHOW` is not preparable on every server.
    let rows = sqlx::raw_sql(
        "SHOW GLOBAL VARIABLES WHERE Variable_name IN ('version', 'version_comment', \
         'innodb_autoinc_lock_mode', 'log_bin', 'binlog_format', \
         'innodb_flush_log_at_trx_commit', 'sync_binlog', 'transaction_isolation', \
         'tx_isolation', 'sql_mode', 'time_zone', 'system_time_zone', 'max_connections', \
         'max_user_connections', 'read_only', 'super_read_only', 'require_secure_transport')",
    )
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| Ok((text(row, 0)?, text(row, 1)?)))
        .collect()
}

/// The account the server authenticated (`CURRENT_USER()`), the
/// connection's database, and `SHOW GRANTS` for that account.
pub async fn account(
    conn: &mut MySqlConnection,
) -> sqlx::Result<(String, Option<String>, Vec<String>)> {
    let (user, database): (String, Option<String>) =
        sqlx::query_as("SELECT CAST(CURRENT_USER() AS CHAR), CAST(DATABASE() AS CHAR)")
            .fetch_one(&mut *conn)
            .await?;
    let rows = sqlx::raw_sql("SHOW GRANTS").fetch_all(&mut *conn).await?;
    let grants = rows
        .iter()
        .map(|row| text(row, 0))
        .collect::<sqlx::Result<_>>()?;
    Ok((user, database, grants))
}

/// The base tables of the connection's database.
pub async fn tables(conn: &mut MySqlConnection) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT CAST(TABLE_NAME AS CHAR) FROM information_schema.TABLES \
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_TYPE = 'BASE TABLE' ORDER BY TABLE_NAME",
    )
    .fetch_all(conn)
    .await
}

/// What the member monitor reads of a member in one round: whether it is
/// read-only, and its heartbeat (`None` before the first beat reached it).
pub async fn member_probe(conn: &mut MySqlConnection) -> sqlx::Result<(bool, Option<i64>)> {
    let (read_only, beat): (i64, Option<i64>) = sqlx::query_as(
        "SELECT CAST(@@global.read_only AS SIGNED), \
         (SELECT beat_ms FROM shard_heartbeat WHERE id = 1)",
    )
    .fetch_one(conn)
    .await?;
    Ok((read_only != 0, beat))
}

/// Moves the writer's heartbeat forward to `now_ms` (never back), only
/// while the member is writable: the check is in the statement, so an
/// account that may write past `read_only` adds nothing to a fenced writer.
/// An UPDATE that changes no row writes nothing to the binary log.
pub async fn beat(conn: &mut MySqlConnection, now_ms: i64) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE shard_heartbeat SET beat_ms = GREATEST(beat_ms, ?) \
         WHERE id = 1 AND @@global.read_only = 0",
    )
    .bind(now_ms)
    .execute(conn)
    .await?;
    Ok(())
}

/// A text column that a server may send as a string or as bytes.
fn text(row: &sqlx::mysql::MySqlRow, i: usize) -> sqlx::Result<String> {
    use sqlx::Row as _;
    match row.try_get::<String, _>(i) {
        Ok(s) => Ok(s),
        Err(_) => row
            .try_get::<Vec<u8>, _>(i)
            .map(|b| String::from_utf8_lossy(&b).into_owned()),
    }
}
