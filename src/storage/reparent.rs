//! The record of a reparent run by chatshard (`shard_reparent`, migration
//! `20261207000012`; docs/replicas.md, "Reparents").

use sqlx::MySqlConnection;

/// A reparent, as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ReparentRow {
    pub id: u64,
    pub kind: String,
    pub from_member: String,
    pub to_member: String,
    pub state: String,
    pub driver: String,
    pub lease_until_ms: i64,
}

/// Records a reparent that starts; `None` when another one runs (the unique
/// `active` key: one at a time per shard).
pub async fn start(
    conn: &mut MySqlConnection,
    kind: &str,
    from: &str,
    to: &str,
    driver: &str,
    lease_until_ms: i64,
) -> sqlx::Result<Option<u64>> {
    let inserted = sqlx::query(
        "INSERT INTO shard_reparent \
         (kind, from_member, to_member, state, active, driver, lease_until_ms, started_at) \
         VALUES (?, ?, ?, 'fencing', 1, ?, ?, NOW(6))",
    )
    .bind(kind)
    .bind(from)
    .bind(to)
    .bind(driver)
    .bind(lease_until_ms)
    .execute(conn)
    .await;
    match inserted {
        Ok(done) => Ok(Some(done.last_insert_id())),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(None),
        Err(e) => Err(e),
    }
}

/// The reparent that runs, if any.
pub async fn active(conn: &mut MySqlConnection) -> sqlx::Result<Option<ReparentRow>> {
    sqlx::query_as(
        "SELECT id, kind, from_member, to_member, state, driver, lease_until_ms \
         FROM shard_reparent WHERE active = 1",
    )
    .fetch_optional(conn)
    .await
}

/// Ends reparent `id` with `state` (`done`, `rolled_back`, `failed`) and
/// why; only while it is still active, so that two instances ending it
/// after a takeover do not both write (`false`: it had ended).
pub async fn finish(
    conn: &mut MySqlConnection,
    id: u64,
    state: &str,
    detail: &str,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE shard_reparent SET state = ?, active = NULL, finished_at = NOW(6), detail = ? \
         WHERE id = ? AND active = 1",
    )
    .bind(state)
    .bind(detail)
    .bind(id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}
