//! Smoke test of `chatshard::localdb` against a real `mariadbd`: settings, durability
//! across SIGKILL + restart, SIGSTOP/SIGCONT, clean stop, and cleanup on drop.
//!
//! The starter itself is what is tested here, so this file calls it directly
//! rather than through the test kit's `servers`.

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chatshard::localdb::{LocalMariaDb, LocalMariaDbOptions};
use common::Wait;
use sqlx::mysql::MySqlConnection;
use sqlx::{Connection, Row};

/// Server variables are BIGINT UNSIGNED in MariaDB and sqlx decodes strictly: cast to SIGNED.
async fn scalar_i64(conn: &mut MySqlConnection, sql: &'static str) -> i64 {
    sqlx::query(sql)
        .fetch_one(conn)
        .await
        .unwrap()
        .try_get::<i64, _>(0)
        .unwrap()
}

fn wait_gone(pid: u32) {
    let proc_dir = format!("/proc/{pid}");
    Wait::new(Duration::from_secs(10), format!("mariadbd pid {pid} gone")).until_blocking(|| {
        if Path::new(&proc_dir).exists() {
            Err("it still exists")
        } else {
            Ok(())
        }
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn start_kill_restart_suspend_drop() {
    let t0 = Instant::now();
    let mut db = LocalMariaDb::start(LocalMariaDbOptions::temp())
        .await
        .unwrap();
    let (dir, port, pid) = (db.data_dir().to_owned(), db.port(), db.pid());
    eprintln!(
        "started pid {pid} port {port} in {:?} ({})",
        t0.elapsed(),
        dir.display()
    );

    let mut conn = MySqlConnection::connect(&db.url("chatshard"))
        .await
        .unwrap();
    assert_eq!(
        scalar_i64(
            &mut conn,
            "SELECT CAST(@@innodb_autoinc_lock_mode AS SIGNED)"
        )
        .await,
        2
    );
    assert_eq!(
        scalar_i64(
            &mut conn,
            "SELECT CAST(@@innodb_flush_log_at_trx_commit AS SIGNED)"
        )
        .await,
        1
    );
    // Its own tmpdir: a server starting in a shared /tmp deletes other servers' temp tables.
    let tmpdir: String = sqlx::query_scalar("SELECT @@tmpdir")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(tmpdir, format!("{}.tmpdir", dir.display()));
    let sql = "SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name = 'chatshard'";
    assert_eq!(scalar_i64(&mut conn, sql).await, 1);
    sqlx::query("CREATE TABLE t (id BIGINT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(32) NOT NULL)")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("INSERT INTO t (v) VALUES ('durable')")
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);

    // SIGKILL + restart on the same port: the committed row survives crash recovery.
    let t = Instant::now();
    db.kill().unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "killed server not reaped"
    );
    db.restart().await.unwrap();
    eprintln!("kill + restart took {:?}", t.elapsed());
    assert_eq!(db.port(), port);
    assert_ne!(db.pid(), pid);
    let mut conn = db.connect("chatshard").await.unwrap();
    let v: String = sqlx::query("SELECT v FROM t")
        .fetch_one(&mut conn)
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "durable");

    // SIGSTOP: queries hang (a fault-injection building block); SIGCONT: they work again.
    db.suspend().unwrap();
    let hung = tokio::time::timeout(
        Duration::from_secs(1),
        sqlx::query("SELECT 1").execute(&mut conn),
    )
    .await;
    assert!(
        hung.is_err(),
        "query on a SIGSTOPped server should time out, but it answered: {:?}",
        hung.map(|r| r.map(|_| ()))
    );
    db.resume().unwrap();
    drop(conn); // its cancelled query left it mid-protocol
    let mut conn = db.connect("chatshard").await.unwrap();
    assert_eq!(scalar_i64(&mut conn, "SELECT COUNT(*) FROM t").await, 1);
    drop(conn);

    // Drop (KillAndRemove) of a suspended server: SIGKILL still works, data dir removed.
    db.suspend().unwrap();
    let pid = db.pid();
    drop(db);
    wait_gone(pid);
    assert!(!dir.exists(), "data dir {} not removed", dir.display());
    let scratch = PathBuf::from(format!("{}.tmpdir", dir.display()));
    assert!(
        !scratch.exists(),
        "tmpdir {} not removed",
        scratch.display()
    );
    eprintln!("smoke test took {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_restart_and_root_tcp_fix() {
    let mut db = LocalMariaDb::start(LocalMariaDbOptions::temp())
        .await
        .unwrap();
    let dir = db.data_dir().to_owned();

    // Remove root@127.0.0.1 so the next start must repair TCP login via the unix socket.
    let mut conn = db.connect("").await.unwrap();
    sqlx::query("DROP USER 'root'@'127.0.0.1'")
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);

    let pid = db.pid();
    db.suspend().unwrap(); // stop() must SIGCONT it, or SIGTERM would never be handled
    db.stop().await.unwrap(); // clean SIGTERM shutdown keeps the data dir
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(dir.join("mysql").is_dir());
    assert!(
        db.suspend().is_err(),
        "suspend of a stopped server must fail"
    );

    db.restart().await.unwrap();
    let mut conn = db.connect("chatshard").await.unwrap();
    let sql = "SELECT COUNT(*) FROM mysql.user WHERE user = 'root' AND host = '127.0.0.1'";
    assert_eq!(scalar_i64(&mut conn, sql).await, 1);
    assert!(
        db.restart().await.is_err(),
        "restart of a running server must fail"
    );
}
