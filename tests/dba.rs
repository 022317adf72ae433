//! The DBA's tools from outside, the built `chatshard` binary against real
//! `mariadbd` servers: `migrate --print-sql` applied with the `mariadb` client
//! and recorded with `--mark-applied-through`, a failed migration reported
//! dirty and repaired, the renumbered versions renamed on a shard that applied
//! the old numbers, and `chatshard check` naming a bad setting and a missing
//! grant. Plus the guard that keeps migration versions in commit order.
//!
//! Two servers for the whole binary (one correct, one with
//! `innodb_autoinc_lock_mode=1`); every test has its own database on them.

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use chatshard::localdb::LocalMariaDb;
use common::{Wait, servers};
use sqlx::{Connection, MySqlConnection};

struct Servers {
    good: LocalMariaDb,
    lock_mode_1: LocalMariaDb,
}

/// Started once, in parallel, on a runtime of their own (each test has its
/// own runtime); killed and removed when the test process exits.
fn servers() -> &'static Servers {
    static SERVERS: OnceLock<Servers> = OnceLock::new();
    SERVERS.get_or_init(|| {
        std::thread::spawn(|| {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(async {
                let (good, lock_mode_1) = tokio::join!(
                    servers::mariadb(&[]),
                    servers::mariadb(&["--innodb-autoinc-lock-mode=1"])
                );
                Servers { good, lock_mode_1 }
            })
        })
        .join()
        .expect("server start thread")
    })
}

/// A fresh database `name` on `server`, and a configuration naming it as the
/// only shard, connecting as `user` (`root` when `None`).
struct Shard {
    dir: PathBuf,
    config: PathBuf,
    port: u16,
    database: String,
}

async fn shard(server: &LocalMariaDb, name: &str, user: Option<(&str, &str)>) -> Shard {
    let mut root = server.connect("").await.expect("connect as root");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS `{name}`; CREATE DATABASE `{name}`"
    )))
    .execute(&mut root)
    .await
    .expect("create database");
    let dir = std::env::temp_dir().join(format!("chatshard-dba-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let credentials = match user {
        Some((u, p)) => format!("{u}:{p}"),
        None => "root".to_owned(),
    };
    let config = dir.join("chatshard.toml");
    std::fs::write(
        &config,
        format!(
            "[[shards]]\nname = \"shard-0\"\nurl = \"mysql://{credentials}@127.0.0.1:{}/{name}\"\nbuckets = [\"0-1023\"]\n",
            server.port()
        ),
    )
    .expect("write config");
    Shard {
        dir,
        config,
        port: server.port(),
        database: name.to_owned(),
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Shard {
    /// Runs `chatshard ARGS --config FILE`.
    fn chatshard(&self, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_chatshard"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env_remove("CHATSHARD_CONFIG")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .expect("run chatshard");
        eprintln!(
            "$ chatshard {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `chatshard ARGS`, which must succeed; its standard output.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.chatshard(args);
        assert!(out.status.success(), "chatshard {args:?} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `chatshard ARGS`, which must fail; its standard output and error.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.chatshard(args);
        assert!(!out.status.success(), "chatshard {args:?} succeeded");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    async fn connect(&self) -> MySqlConnection {
        MySqlConnection::connect(&format!(
            "mysql://root@127.0.0.1:{}/{}",
            self.port, self.database
        ))
        .await
        .expect("connect")
    }

    /// Applies a script with the `mariadb` command-line client, as a DBA
    /// would.
    fn apply_with_client(&self, script: &str) {
        let client = client_binary();
        let mut child = Command::new(&client)
            .args(["--protocol=TCP", "-h", "127.0.0.1", "-u", "root"])
            .arg(format!("-P{}", self.port))
            .arg(&self.database)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", client.display()));
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(script.as_bytes()).expect("write script");
        }
        let out = child.wait_with_output().expect("client");
        assert!(
            out.status.success(),
            "the client refused the script: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The `mariadb` client (or `mysql` on older packages) beside `mariadbd`.
fn client_binary() -> PathBuf {
    for name in ["mariadb", "mysql"] {
        for dir in ["/usr/bin", "/usr/local/bin", "/usr/local/mysql/bin"] {
            let path = Path::new(dir).join(name);
            if path.exists() {
                return path;
            }
        }
    }
    panic!("no mariadb or mysql client installed beside mariadbd");
}

/// This build's migration versions, from `migrations/`.
fn versions() -> Vec<i64> {
    let mut v: Vec<i64> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations"))
            .expect("migrations/")
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.split('_').next()?.parse().ok()
            })
            .collect();
    v.sort_unstable();
    v
}

async fn applied_versions(db: &mut MySqlConnection) -> Vec<(i64, bool)> {
    sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
        .fetch_all(db)
        .await
        .expect("read _sqlx_migrations")
}

/// Every version of this build, applied successfully.
fn all_applied() -> Vec<(i64, bool)> {
    versions().into_iter().map(|v| (v, true)).collect()
}

/// Columns and indexes of a database, to compare two of them.
async fn shape(db: &mut MySqlConnection) -> Vec<String> {
    let columns: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT CAST(TABLE_NAME AS CHAR), CAST(COLUMN_NAME AS CHAR), CAST(COLUMN_TYPE AS CHAR), \
         CAST(IS_NULLABLE AS CHAR) FROM information_schema.COLUMNS \
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME <> '_sqlx_migrations' \
         ORDER BY TABLE_NAME, ORDINAL_POSITION",
    )
    .fetch_all(&mut *db)
    .await
    .expect("columns");
    let indexes: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT CAST(TABLE_NAME AS CHAR), CAST(INDEX_NAME AS CHAR), CAST(COLUMN_NAME AS CHAR), \
         CAST(SEQ_IN_INDEX AS SIGNED) FROM information_schema.STATISTICS \
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME <> '_sqlx_migrations' \
         ORDER BY TABLE_NAME, INDEX_NAME, SEQ_IN_INDEX",
    )
    .fetch_all(&mut *db)
    .await
    .expect("indexes");
    columns
        .into_iter()
        .map(|c| format!("{c:?}"))
        .chain(indexes.into_iter().map(|i| format!("{i:?}")))
        .collect()
}

async fn table_count(db: &mut MySqlConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()",
    )
    .fetch_one(db)
    .await
    .expect("count tables")
}

/// The script's sections, one per version, as `--print-sql` heads them.
fn sections(script: &str) -> Vec<(i64, String)> {
    let mut out: Vec<(i64, String)> = Vec::new();
    for line in script.lines() {
        if let Some(rest) = line.strip_prefix("-- version ") {
            let v = rest
                .split(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .expect("version");
            out.push((v, String::new()));
        }
        if let Some((_, body)) = out.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn sql_printed_applied_by_hand_and_marked_is_what_migrate_makes_and_serve_runs_on_it() {
    let servers = servers();
    let by_hand = shard(&servers.good, "dba_by_hand", None).await;
    let mut db = by_hand.connect().await;

    let script = by_hand.ok(&["migrate", "--shard", "shard-0", "--print-sql"]);
    assert_eq!(table_count(&mut db).await, 0, "--print-sql changed nothing");
    let printed: Vec<i64> = sections(&script).iter().map(|(v, _)| *v).collect();
    assert_eq!(printed, versions(), "every pending version, in order");
    assert!(script.contains("checksum sha384:"), "{script}");
    let last = *versions().last().expect("a migration");
    assert!(script.contains(&format!("--mark-applied-through {last}")));

    by_hand.apply_with_client(&script);
    let status = by_hand.ok(&["migrate", "--status"]);
    assert!(
        status.contains(&format!("{} pending", versions().len())),
        "{status}"
    );
    let marked = by_hand.ok(&["migrate", "--mark-applied-through", &last.to_string()]);
    assert!(marked.contains("0 pending"), "{marked}");
    let status = by_hand.ok(&["migrate", "--status"]);
    assert!(
        status.contains(&format!(
            "{} applied ({} by hand), 0 pending",
            versions().len(),
            versions().len()
        )),
        "{status}"
    );
    assert_eq!(applied_versions(&mut db).await, all_applied());
    // sqlx's own migrator accepts the recorded checksums: a rerun is a no-op.
    by_hand.ok(&["migrate"]);

    // The schema is the one `migrate` makes.
    let by_migrate = shard(&servers.good, "dba_by_migrate", None).await;
    by_migrate.ok(&["migrate"]);
    assert_eq!(
        shape(&mut db).await,
        shape(&mut by_migrate.connect().await).await
    );

    // `check` on a correct shard: exit 0.
    let report = by_hand.ok(&["check", "--instances", "4"]);
    assert!(report.contains("every shard suits chatshard"), "{report}");
    assert!(!report.contains("ERROR"), "{report}");

    // And `serve` runs on it: a chat created, a member joined.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_chatshard"))
        .args(["serve", "--config"])
        .arg(&by_hand.config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env_remove("CHATSHARD_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn serve");
    let base = format!("http://127.0.0.1:{port}");
    // reqwest's TLS takes the process's default provider.
    chatshard::crypto::install_default_provider();
    let http = reqwest::Client::new();
    let created = Wait::new(Duration::from_secs(60), "serve answering")
        .every(Duration::from_millis(50))
        .until(|| async {
            http.put(format!("{base}/v1/chats/dba-chat"))
                .json(&serde_json::json!({"maxMembers": 10}))
                .send()
                .await
                .map(|r| r.status())
        })
        .await;
    let joined = http
        .post(format!("{base}/v1/chats/dba-chat/members"))
        .json(&serde_json::json!({"userId": "alice"}))
        .send()
        .await
        .expect("join");
    let _ = serve.kill();
    let _ = serve.wait();
    assert!(created.is_success(), "create: {created}");
    assert!(joined.status().is_success(), "join: {}", joined.status());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_migration_is_reported_dirty_and_repaired_step_by_step() {
    let servers = servers();
    let s = shard(&servers.good, "dba_dirty", None).await;
    let mut db = s.connect().await;
    let all = versions();
    let (last, before_last) = (all[all.len() - 1], all[all.len() - 2]);

    // Everything but the last migration, by hand.
    let script = s.ok(&["migrate", "--print-sql"]);
    let but_last: String = sections(&script)
        .into_iter()
        .filter(|(v, _)| *v != last)
        .map(|(_, body)| body)
        .collect();
    s.apply_with_client(&but_last);
    let refused = s.fails(&["migrate", "--mark-applied", &before_last.to_string()]);
    assert!(
        refused.contains("is not applied"),
        "earlier versions pending: {refused}"
    );
    s.ok(&[
        "migrate",
        "--mark-applied-through",
        &before_last.to_string(),
    ]);
    let unknown = s.fails(&["migrate", "--mark-applied", "20990101000001"]);
    assert!(
        unknown.contains("has no migration 20990101000001"),
        "{unknown}"
    );

    // The last migration creates shard_reparent; a table of that name made
    // by hand makes it fail after its row was written.
    sqlx::query("CREATE TABLE shard_reparent (other INT)")
        .execute(&mut db)
        .await
        .expect("conflicting table");
    let failed = s.fails(&["migrate"]);
    assert!(failed.contains(&last.to_string()), "{failed}");
    assert_eq!(applied_versions(&mut db).await.last(), Some(&(last, false)));

    let status = s.fails(&["migrate", "--status"]);
    assert!(status.contains(&format!("DIRTY [{last}]")), "{status}");
    let check = s.fails(&["check"]);
    assert!(check.contains("failed part-way"), "{check}");
    s.fails(&["migrate"]); // still dirty: sqlx refuses to go on

    // The DBA's steps (docs/operations.md): undo what ran, clear, rerun.
    let not_dirty = s.fails(&["migrate", "--repair-dirty", &before_last.to_string()]);
    assert!(not_dirty.contains("is not dirty"), "{not_dirty}");
    sqlx::query("DROP TABLE shard_reparent")
        .execute(&mut db)
        .await
        .expect("drop the conflicting table");
    s.ok(&["migrate", "--repair-dirty", &last.to_string()]);
    let done = s.ok(&["migrate"]);
    assert!(done.contains("0 pending"), "{done}");
    assert_eq!(applied_versions(&mut db).await.last(), Some(&(last, true)));
    let columns: Vec<(String,)> = sqlx::query_as(
        "SELECT CAST(COLUMN_NAME AS CHAR) FROM information_schema.COLUMNS \
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'shard_reparent' \
         ORDER BY ORDINAL_POSITION",
    )
    .fetch_all(&mut db)
    .await
    .expect("columns");
    assert_eq!(columns.first(), Some(&("id".to_owned(),)));
    assert!(
        columns.contains(&("lease_until_ms".to_owned(),)),
        "{columns:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shard_that_applied_the_old_numbers_is_renumbered_by_migrate() {
    let servers = servers();
    let s = shard(&servers.good, "dba_renumber", None).await;
    s.ok(&["migrate"]);
    let mut db = s.connect().await;
    // Put the rows back under the numbers an earlier build used, last first
    // so that no two rows meet on one number.
    for (old, new) in chatshard::migrate::renumber::RENUMBERED.iter().rev() {
        sqlx::query("UPDATE _sqlx_migrations SET version = ? WHERE version = ?")
            .bind(old)
            .bind(new)
            .execute(&mut db)
            .await
            .expect("old number");
    }
    let status = s.ok(&["migrate", "--status"]);
    assert!(status.contains("0 pending"), "{status}");
    assert!(
        status.contains("renumbered at the next migrate"),
        "{status}"
    );
    s.ok(&["migrate"]);
    assert_eq!(applied_versions(&mut db).await, all_applied());
    let status = s.ok(&["migrate", "--status"]);
    assert!(!status.contains("renumbered"), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_names_a_bad_setting_and_a_missing_grant() {
    let servers = servers();
    let s = shard(&servers.lock_mode_1, "dba_lock_mode", None).await;
    s.ok(&["migrate"]);
    let report = s.fails(&["check"]);
    assert!(
        report.lines().any(|l| l.contains("ERROR")
            && l.contains("innodb_autoinc_lock_mode")
            && l.contains("must be 2")),
        "{report}"
    );

    let migrated = shard(&servers.good, "dba_grants", None).await;
    migrated.ok(&["migrate"]);
    let mut root = servers.good.connect("").await.expect("root");
    sqlx::raw_sql(
        "DROP USER IF EXISTS 'nodelete'@'%'; CREATE USER 'nodelete'@'%' IDENTIFIED BY 'pw'; \
         GRANT SELECT, INSERT, UPDATE ON `dba_grants`.* TO 'nodelete'@'%'",
    )
    .execute(&mut root)
    .await
    .expect("user without DELETE");
    let app = shard(&servers.good, "dba_grants_app", Some(("nodelete", "pw"))).await;
    // Point the app's configuration at the migrated database.
    std::fs::write(
        &app.config,
        std::fs::read_to_string(&app.config)
            .expect("config")
            .replace("/dba_grants_app", "/dba_grants"),
    )
    .expect("config");
    let report = app.fails(&["check"]);
    let delete: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("grant DELETE"))
        .collect();
    assert_eq!(delete.len(), 1, "{report}");
    assert!(
        delete[0].contains("ERROR") && delete[0].contains("nodelete"),
        "{report}"
    );
    assert!(!report.contains("grant SELECT"), "{report}");
    let report = app.fails(&["check", "--for-migrate"]);
    assert!(report.contains("grant CREATE"), "{report}");
}

/// No migration version is dated after the day its file was committed, and a
/// file committed later never sorts before one committed earlier (sqlx would
/// apply it in a different order on existing and on new shards). Files not
/// committed yet count as committed today, after every other.
#[test]
fn migration_versions_follow_their_commits() {
    let root = env!("CARGO_MANIFEST_DIR");
    let log = Command::new("git")
        .args([
            "log",
            "--reverse",
            "--no-renames",
            "--diff-filter=A",
            "--format=@%cs",
            "--name-only",
            "--",
            "migrations/",
        ])
        .current_dir(root)
        .output()
        .expect("git (the migration order is checked against the repository's history)");
    assert!(
        log.status.success(),
        "git log: {}",
        String::from_utf8_lossy(&log.stderr)
    );
    let today = chrono::Utc::now().format("%Y%m%d").to_string();
    let mut added: Vec<(String, usize, String)> = Vec::new(); // (file, commit index, day)
    let (mut index, mut day) = (0, String::new());
    for line in String::from_utf8_lossy(&log.stdout).lines() {
        if let Some(d) = line.strip_prefix('@') {
            index += 1;
            day = d.replace('-', "");
        } else if let Some(file) = line.strip_prefix("migrations/") {
            added.retain(|(f, _, _)| f != file);
            added.push((file.to_owned(), index, day.clone()));
        }
    }
    let mut files: Vec<(i64, usize, String, String)> = Vec::new();
    for entry in std::fs::read_dir(Path::new(root).join("migrations")).expect("migrations/") {
        let name = entry
            .expect("entry")
            .file_name()
            .into_string()
            .expect("utf-8 name");
        let version: i64 = name
            .split('_')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("version prefix");
        let (commit, day) = added
            .iter()
            .find(|(f, _, _)| *f == name)
            .map_or((usize::MAX, today.clone()), |(_, i, d)| (*i, d.clone()));
        assert!(
            version.to_string()[..8] <= *day,
            "{name}: version dated after {day}, the day it was committed"
        );
        files.push((version, commit, day, name));
    }
    for a in &files {
        for b in &files {
            assert!(
                !(a.1 < b.1 && a.0 > b.0),
                "{} was committed after {} but sorts before it: give it a version after every existing one",
                b.3,
                a.3
            );
        }
    }
}

/// SQL string literals of `src/storage/` (with `\` line continuations
/// joined) that are whole statements; those built with `format!` holes are
/// left out.
fn storage_statements() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/storage");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("src/storage") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let mut rest = text.as_str();
        while let Some(start) = rest.find('"') {
            let after = &rest[start + 1..];
            let Some(end) = after.find('"') else { break };
            let literal = &after[..end];
            rest = &after[end + 1..];
            let sql = literal
                .split("\\\n")
                .map(str::trim_start)
                .collect::<Vec<_>>()
                .join("");
            let head = sql.split_whitespace().next().unwrap_or_default();
            let statement = ["SELECT", "INSERT", "UPDATE", "DELETE", "SET"].contains(&head);
            if statement && !sql.contains('{') && !sql.ends_with(' ') && !sql.ends_with('(') {
                out.push((name.clone(), sql));
            }
        }
    }
    out
}

/// Every migration, and every whole statement of the storage layer, parses
/// as MySQL (sqlparser's MySQL dialect), and none uses a form only MariaDB
/// has (`RETURNING`) or only MySQL has (`INSERT ... AS alias`): the schema
/// and the queries run on MySQL 8.0/8.4 as well as on the MariaDB the tests
/// use (docs/schema.md, "Statement forms").
#[test]
fn migrations_and_statements_parse_as_mysql() {
    use sqlparser::dialect::MySqlDialect;
    use sqlparser::parser::Parser;
    let mut checked = 0;
    let migrations = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    for entry in std::fs::read_dir(migrations).expect("migrations/") {
        let path = entry.expect("entry").path();
        let sql = std::fs::read_to_string(&path).expect("read");
        let parsed = Parser::parse_sql(&MySqlDialect {}, &sql)
            .unwrap_or_else(|e| panic!("{}: not MySQL: {e}", path.display()));
        assert!(!parsed.is_empty(), "{}: no statement", path.display());
        checked += parsed.len();
    }
    let statements = storage_statements();
    assert!(
        statements.len() >= 40,
        "only {} statements found",
        statements.len()
    );
    let mut refused = Vec::new();
    for (file, sql) in &statements {
        // `LOCK IN SHARE MODE` is MySQL 8's alias of `FOR SHARE` (and the
        // only spelling MariaDB 10.11 has); sqlparser knows only the latter.
        let as_parsed = sql.replace(" LOCK IN SHARE MODE", " FOR SHARE");
        if let Err(e) = Parser::parse_sql(&MySqlDialect {}, &as_parsed) {
            refused.push(format!("src/storage/{file}: {sql}\n    {e}"));
        }
        let upper = sql.to_ascii_uppercase();
        assert!(
            !upper.contains(" RETURNING "),
            "src/storage/{file}: RETURNING is MariaDB-only: {sql}"
        );
        assert!(!upper.contains(" ON CONFLICT"), "src/storage/{file}: {sql}");
        checked += 1;
    }
    assert!(refused.is_empty(), "not MySQL:\n{}", refused.join("\n"));
    // The parser does refuse what MySQL refuses.
    assert!(Parser::parse_sql(&MySqlDialect {}, "SELECT * FORM chat").is_err());
    assert!(checked > 50, "{checked}");
}
