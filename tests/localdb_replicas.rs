//! Replicated local shards (`LocalCluster::start_replicated`) against real
//! `mariadbd` processes: the replicas get the schema and the rows by
//! replication, are read-only while the primary is a semi-sync source; a
//! replica falls behind with its SQL thread stopped and catches up; a
//! promoted replica takes writes and the other replica follows it; and
//! persistent replicas are seeded from a primary that had data, and
//! replicate again after the dev cluster is stopped and started.
//!
//! The starter itself is what is tested here, so this file calls it directly
//! rather than through the test kit's `servers`.

#[path = "common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chatshard::localdb::LocalMariaDb;
use chatshard::localdb::cluster::{LocalCluster, Location};
use chatshard::storage::replication;
use common::Wait;
use sqlx::Connection as _;
use sqlx::mysql::MySqlConnection;

const WITHIN: Duration = Duration::from_secs(30);

async fn connect(server: &LocalMariaDb) -> MySqlConnection {
    MySqlConnection::connect(&server.url("chatshard"))
        .await
        .unwrap()
}

/// The versions in `_sqlx_migrations` and the tables of `chatshard`.
async fn schema(server: &LocalMariaDb) -> (Vec<i64>, Vec<String>) {
    let mut conn = connect(server).await;
    let versions = sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let tables = chatshard::storage::server::tables(&mut conn).await.unwrap();
    (versions, tables)
}

async fn write(server: &LocalMariaDb, value: &str) {
    let mut conn = connect(server).await;
    sqlx::query("CREATE TABLE IF NOT EXISTS probe (v VARCHAR(32) PRIMARY KEY) ENGINE=InnoDB")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("INSERT INTO probe (v) VALUES (?)")
        .bind(value)
        .execute(&mut conn)
        .await
        .unwrap();
}

/// Whether `value` is in `probe` on `server` (`false` while the table is not there).
async fn has(server: &LocalMariaDb, value: &str) -> bool {
    let mut conn = connect(server).await;
    let n: Result<i64, _> = sqlx::query_scalar("SELECT COUNT(*) FROM probe WHERE v = ?")
        .bind(value)
        .fetch_one(&mut conn)
        .await;
    n.is_ok_and(|n| n == 1)
}

async fn wait_for_row(server: &LocalMariaDb, value: &str) {
    let what = format!("row {value} on port {}", server.port());
    Wait::new(WITHIN, what)
        .until_true(|| has(server, value))
        .await;
}

async fn read_only(server: &LocalMariaDb) -> bool {
    server.is_read_only().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_follow_fall_behind_catch_up_and_follow_a_promoted_replica() {
    let t0 = Instant::now();
    let mut cluster = LocalCluster::start_replicated(1, 2, Location::Temp, &[])
        .await
        .unwrap();
    eprintln!("1 shard + 2 replicas started in {:?}", t0.elapsed());
    let primary = cluster.server(0);

    // Settings: the replicas' URLs after the primary's, in order.
    let shard = &cluster.shard_settings()[0];
    assert_eq!(shard.url, primary.url("chatshard"));
    let urls: Vec<String> = cluster
        .replicas(0)
        .iter()
        .map(|r| r.url("chatshard"))
        .collect();
    assert_eq!(shard.replicas, urls);

    // The schema reached the replicas by replication.
    let want = schema(primary).await;
    assert!(!want.0.is_empty() && !want.1.is_empty(), "{want:?}");
    for replica in cluster.replicas(0) {
        assert_eq!(schema(replica).await, want, "port {}", replica.port());
    }

    // Roles: a writable semi-sync primary, read-only replicas replicating from it.
    assert!(!read_only(primary).await);
    let mut conn = connect(primary).await;
    let semi = replication::semi_sync_master_status(&mut conn)
        .await
        .unwrap();
    assert!(semi.active, "{semi:?}");
    assert_eq!(semi.clients, 2, "{semi:?}");
    assert!(
        semi.acknowledged > 0,
        "the migrations were acknowledged: {semi:?}"
    );
    assert_eq!(semi.unacknowledged, 0, "no commit timed out: {semi:?}");
    drop(conn);
    for replica in cluster.replicas(0) {
        assert!(read_only(replica).await, "port {}", replica.port());
        let status = replica.replica_status().await.unwrap().unwrap();
        assert!(status.is_replicating(), "{status:?}");
        assert_eq!(status.source_port, primary.port());
        assert_eq!(status.using_gtid, "Slave_Pos");
    }

    // A row written on the primary reaches both replicas.
    write(primary, "one").await;
    for replica in cluster.replicas(0) {
        wait_for_row(replica, "one").await;
    }

    // SQL thread stopped: replica 1 receives (and acknowledges) but does not apply.
    let lagging = &cluster.replicas(0)[1];
    lagging.stop_sql_thread().await.unwrap();
    let t = Instant::now();
    write(primary, "two").await;
    let took = t.elapsed();
    let pos = primary.gtid_positions().await.unwrap().binlog;
    Wait::new(WITHIN, "replica 1 received the write")
        .until(|| async {
            let status = lagging.replica_status().await.unwrap().unwrap();
            if status.gtid_io_pos == pos {
                Ok(status)
            } else {
                Err(format!("{status:?}"))
            }
        })
        .await;
    let status = lagging.replica_status().await.unwrap().unwrap();
    assert_eq!(status.sql_running, "No", "{status:?}");
    assert!(!status.applied_all_received(), "{status:?}");
    assert_eq!(status.seconds_behind_source, None, "{status:?}");
    assert!(
        !has(lagging, "two").await,
        "applied with its SQL thread stopped"
    );
    let mut conn = connect(primary).await;
    let semi = replication::semi_sync_master_status(&mut conn)
        .await
        .unwrap();
    assert!(
        semi.active && semi.unacknowledged == 0,
        "a replica that only lags still acknowledges ({semi:?}, commit took {took:?})"
    );
    drop(conn);
    wait_for_row(&cluster.replicas(0)[0], "two").await;
    // And catches up once it applies again.
    lagging.start_sql_thread().await.unwrap();
    wait_for_row(lagging, "two").await;
    cluster.wait_replicas_caught_up(0, WITHIN).await.unwrap();

    // Failover: fence the old primary, promote replica 0; replica 1 follows it.
    cluster.server(0).set_read_only(true).await.unwrap();
    let t = Instant::now();
    cluster.promote_replica(0, 0).await.unwrap();
    eprintln!("promotion took {:?}", t.elapsed());
    let new_primary = &cluster.replicas(0)[0];
    assert_eq!(cluster.writer(0).port(), new_primary.port());
    assert!(!read_only(new_primary).await);
    assert!(new_primary.replica_status().await.unwrap().is_none());
    let mut conn = connect(new_primary).await;
    let semi = replication::semi_sync_master_status(&mut conn)
        .await
        .unwrap();
    assert!(semi.active && semi.clients == 1, "{semi:?}");
    drop(conn);
    let follower = &cluster.replicas(0)[1];
    assert!(read_only(follower).await);
    let status = follower.replica_status().await.unwrap().unwrap();
    assert!(status.is_replicating(), "{status:?}");
    assert_eq!(status.source_port, new_primary.port());

    write(new_primary, "three").await;
    wait_for_row(follower, "three").await;
    cluster.wait_replicas_caught_up(0, WITHIN).await.unwrap();
    assert!(
        !has(cluster.server(0), "three").await,
        "the old primary is no replica of the new one"
    );
    eprintln!("replication test took {:?}", t0.elapsed());
}

/// A fresh dir under the temp dir, removed when dropped.
struct TempRoot(PathBuf);

impl Drop for TempRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn persistent_replicas_are_seeded_and_replicate_again_after_a_restart() {
    let t0 = Instant::now();
    let root = TempRoot(std::env::temp_dir().join(common::unique("chatshard-replicas")));
    let location = || Location::Persistent(root.0.clone());

    // A dev root used without replicas has data...
    let mut cluster = LocalCluster::start_replicated(1, 0, location(), &[])
        .await
        .unwrap();
    assert!(cluster.replicas(0).is_empty());
    assert!(cluster.shard_settings()[0].replicas.is_empty());
    write(cluster.server(0), "before").await;
    cluster.stop().await;
    drop(cluster);

    // ...which a new replica gets by a copy, then the rest by replication.
    let mut cluster = LocalCluster::start_replicated(1, 1, location(), &[])
        .await
        .unwrap();
    let replica = &cluster.replicas(0)[0];
    assert_eq!(replica.data_dir(), root.0.join("dev/shard-0-replica-0"));
    assert!(
        has(replica, "before").await,
        "the copy has the primary's rows"
    );
    assert!(read_only(replica).await);
    write(cluster.server(0), "during").await;
    wait_for_row(replica, "during").await;
    let first_port = cluster.server(0).port();
    cluster.stop().await;
    drop(cluster);

    // Stopped and started again, with a second replica: the primary is on
    // another port, and the first replica replicates from it, read-only; the
    // second is a copy of a primary that has a binary log now, and
    // replicates from the GTID position of the copy.
    let mut cluster = LocalCluster::start_replicated(1, 2, location(), &[])
        .await
        .unwrap();
    let primary = cluster.server(0);
    eprintln!("primary on port {} (was {first_port})", primary.port());
    let copied_at = primary.gtid_positions().await.unwrap().binlog;
    assert!(!copied_at.is_empty(), "the primary logged the rows since");
    for replica in cluster.replicas(0) {
        assert!(read_only(replica).await);
        let status = replica.replica_status().await.unwrap().unwrap();
        assert!(status.is_replicating(), "{status:?}");
        assert_eq!(status.source_port, primary.port());
        assert!(has(replica, "before").await && has(replica, "during").await);
    }
    let second = &cluster.replicas(0)[1];
    assert_eq!(second.gtid_positions().await.unwrap().slave, copied_at);
    write(primary, "after").await;
    for replica in cluster.replicas(0) {
        wait_for_row(replica, "after").await;
    }
    let mut conn = connect(primary).await;
    let semi = replication::semi_sync_master_status(&mut conn)
        .await
        .unwrap();
    assert!(
        semi.active && semi.clients == 2 && semi.unacknowledged == 0,
        "{semi:?}"
    );
    drop(conn);

    // A replica restarted on its own replicates again too.
    let replica = cluster.replica_mut(0, 0);
    replica.stop().await.unwrap();
    replica.restart().await.unwrap();
    let replica = &cluster.replicas(0)[0];
    assert!(read_only(replica).await);
    replica.wait_replicating(WITHIN).await.unwrap();
    write(cluster.server(0), "after a restart").await;
    wait_for_row(replica, "after a restart").await;
    cluster.stop().await;
    eprintln!("persistent replicas test took {:?}", t0.elapsed());
}
