//! Statements about the server and the session rather than a table.

use sqlx::MySqlConnection;

/// How many id series the shards share: a shard's `memberId`s and
/// `messageId`s are those of its series, `id_block + 1` modulo this.
pub const ID_SERIES: u16 = 1024;

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

/// `@@innodb_autoinc_lock_mode` and `@@innodb_flush_log_at_trx_commit`.
pub async fn innodb_settings(conn: &mut MySqlConnection) -> sqlx::Result<(i64, i64)> {
    sqlx::query_as(
        "SELECT CAST(@@innodb_autoinc_lock_mode AS SIGNED), \
         CAST(@@innodb_flush_log_at_trx_commit AS SIGNED)",
    )
    .fetch_one(conn)
    .await
}
