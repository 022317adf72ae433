//! `chatshard check`: connects to every configured shard and says, one line
//! per finding, whether it is fit for chatshard (docs/operations.md,
//! "Checking a shard before use").
//!
//! [`gather`] reads the facts (server variables, the account's grants, the
//! database's tables, the migration table) and changes nothing; [`evaluate`]
//! decides, in pure code, what each fact means. An [`Level::Error`] is a
//! setting under which chatshard breaks or loses its guarantees (the check
//! exits non-zero); a [`Level::Warn`] is one that weakens durability or
//! leaves little headroom.

pub mod grants;

use std::collections::BTreeMap;

use sqlx::MySqlConnection;

use crate::config::ShardSettings;
use crate::migrate::SchemaState;
use grants::Grants;

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Error,
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ok => "ok",
            Self::Warn => "WARN",
            Self::Error => "ERROR",
        })
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    /// The setting, grant or state it is about (`innodb_autoinc_lock_mode`).
    pub subject: String,
    pub detail: String,
}

impl Finding {
    fn new(level: Level, subject: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            level,
            subject: subject.into(),
            detail: detail.into(),
        }
    }
}

/// What was read from one shard.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// Global variables by lower-case name.
    pub variables: BTreeMap<String, String>,
    /// `CURRENT_USER()`.
    pub account: String,
    /// The connection's database.
    pub database: String,
    pub grants: Grants,
    /// The database's tables.
    pub tables: Vec<String>,
    pub schema: SchemaState,
}

/// What the deployment will ask of each shard.
#[derive(Debug, Clone, Copy)]
pub struct Needs {
    /// Instances of `chatshard serve` that will run against the shard.
    pub instances: usize,
    /// Connections one instance opens to one shard (`pool.max_concurrent`).
    pub pool_size: usize,
    /// Also check what `chatshard migrate` needs (DDL grants), and take
    /// pending migrations as expected.
    pub for_migrate: bool,
}

impl Needs {
    /// Connections the shard must accept: every instance's pool, one more
    /// pool for a command run beside them (`move-chat`, `purge`,
    /// `repair-counts` build their own), and one for `migrate`.
    pub fn connections(&self) -> usize {
        (self.instances + 1) * self.pool_size + 1
    }
}

/// Privileges `serve` uses on the shard's tables.
pub const SERVE_PRIVILEGES: [&str; 4] = ["SELECT", "INSERT", "UPDATE", "DELETE"];
/// Privileges `migrate` adds (the migrations create tables and indexes and
/// alter tables).
pub const MIGRATE_PRIVILEGES: [&str; 3] = ["CREATE", "ALTER", "INDEX"];

/// Decides what the facts of one shard mean.
pub fn evaluate(facts: &Facts, needs: &Needs) -> Vec<Finding> {
    let var = |name: &str| facts.variables.get(name).map(String::as_str);
    let on = |name: &str| var(name).is_some_and(|v| v.eq_ignore_ascii_case("ON") || v == "1");
    let mut out = Vec::new();

    out.push(server(var("version"), var("version_comment")));

    out.push(match var("innodb_autoinc_lock_mode") {
        Some("2") => Finding::new(Level::Ok, "innodb_autoinc_lock_mode", "2"),
        other => Finding::new(
            Level::Error,
            "innodb_autoinc_lock_mode",
            format!(
                "{}: must be 2 (interleaved), or every multi-row INSERT of a group commit \
                 takes the table's AUTO-INC lock (docs/schema.md)",
                other.unwrap_or("unknown")
            ),
        ),
    });

    let binlog = on("log_bin");
    out.push(match (binlog, var("binlog_format")) {
        (false, _) => Finding::new(
            Level::Ok,
            "log_bin",
            "OFF (no replica and no point-in-time recovery from this server)",
        ),
        (true, Some(f)) if f.eq_ignore_ascii_case("ROW") => {
            Finding::new(Level::Ok, "binlog_format", "ROW")
        }
        (true, Some(f)) if f.eq_ignore_ascii_case("MIXED") => Finding::new(
            Level::Warn,
            "binlog_format",
            "MIXED: chatshard's DELETE ... LIMIT is logged as rows anyway; ROW is what replicas \
             and moves are tested with",
        ),
        (true, f) => Finding::new(
            Level::Error,
            "binlog_format",
            format!(
                "{}: must be ROW when the binlog is on; the purge's DELETE ... LIMIT is unsafe \
                 for statement-based replication",
                f.unwrap_or("unknown")
            ),
        ),
    });

    out.push(must_be_one(
        "innodb_flush_log_at_trx_commit",
        var("innodb_flush_log_at_trx_commit"),
        "a crash can lose writes chatshard acknowledged",
    ));
    if binlog {
        out.push(must_be_one(
            "sync_binlog",
            var("sync_binlog"),
            "a crash can lose binlog events a replica never gets",
        ));
    }

    let isolation = var("transaction_isolation").or(var("tx_isolation"));
    out.push(Finding::new(
        Level::Ok,
        "transaction_isolation",
        format!(
            "{} (chatshard's sessions use READ-COMMITTED)",
            isolation.unwrap_or("unknown")
        ),
    ));

    let sql_mode = var("sql_mode").unwrap_or_default();
    out.push(
        if sql_mode.contains("STRICT_TRANS_TABLES") || sql_mode.contains("STRICT_ALL_TABLES") {
            Finding::new(Level::Ok, "sql_mode", "strict")
        } else {
            Finding::new(
                Level::Warn,
                "sql_mode",
                format!(
                    "{sql_mode:?} is not strict: a value out of range would be stored cut \
                     instead of refused (add STRICT_TRANS_TABLES)"
                ),
            )
        },
    );

    out.push(Finding::new(
        Level::Ok,
        "time_zone",
        format!(
            "{} (chatshard's sessions set +00:00 and store UTC)",
            var("time_zone").unwrap_or("unknown")
        ),
    ));

    if on("read_only") || on("super_read_only") {
        out.push(Finding::new(
            Level::Error,
            "read_only",
            "ON: chatshard writes to every shard; point it at the primary",
        ));
    }

    out.push(connections(
        var("max_connections"),
        var("max_user_connections"),
        needs,
    ));
    out.extend(privileges(facts, needs));
    out.extend(schema(&facts.schema, needs));
    out
}

fn server(version: Option<&str>, comment: Option<&str>) -> Finding {
    let version = version.unwrap_or("unknown");
    let mariadb = version.to_ascii_lowercase().contains("mariadb")
        || comment.is_some_and(|c| c.to_ascii_lowercase().contains("mariadb"));
    let numbers: Vec<u32> = version
        .split(|c: char| !c.is_ascii_digit())
        .take(2)
        .filter_map(|n| n.parse().ok())
        .collect();
    let at_least = |major: u32, minor: u32| numbers.as_slice() >= [major, minor].as_slice();
    let (flavour, supported) = if mariadb {
        ("MariaDB", at_least(10, 11))
    } else {
        ("MySQL", at_least(8, 0))
    };
    let detail = format!("{flavour} {version}");
    if supported {
        Finding::new(Level::Ok, "server", detail)
    } else {
        Finding::new(
            Level::Warn,
            "server",
            format!("{detail}: chatshard is built for MariaDB 10.11+ and MySQL 8.0/8.4"),
        )
    }
}

fn must_be_one(name: &str, value: Option<&str>, why: &str) -> Finding {
    match value {
        Some("1") => Finding::new(Level::Ok, name, "1"),
        other => Finding::new(
            Level::Warn,
            name,
            format!("{}: not 1, {why}", other.unwrap_or("unknown")),
        ),
    }
}

fn connections(max: Option<&str>, per_user: Option<&str>, needs: &Needs) -> Finding {
    let want = needs.connections();
    let how = format!(
        "{want} needed: ({} instance(s) + 1 command) x pool.max_concurrent {} + 1 for migrate",
        needs.instances, needs.pool_size
    );
    let Some(max) = max.and_then(|v| v.parse::<usize>().ok()) else {
        return Finding::new(Level::Warn, "max_connections", format!("unknown; {how}"));
    };
    if let Some(user) = per_user.and_then(|v| v.parse::<usize>().ok())
        && user > 0
        && user < want
    {
        return Finding::new(
            Level::Error,
            "max_user_connections",
            format!("{user}, below the {how}"),
        );
    }
    if max < want {
        Finding::new(
            Level::Error,
            "max_connections",
            format!("{max}, below the {how}"),
        )
    } else if want * 5 > max * 4 {
        Finding::new(
            Level::Warn,
            "max_connections",
            format!("{max}: under 20% headroom over the {how}"),
        )
    } else {
        Finding::new(Level::Ok, "max_connections", format!("{max} ({how})"))
    }
}

fn privileges(facts: &Facts, needs: &Needs) -> Vec<Finding> {
    let mut wanted: Vec<(&str, &str)> = SERVE_PRIVILEGES.iter().map(|p| (*p, "serve")).collect();
    if needs.for_migrate {
        wanted.extend(MIGRATE_PRIVILEGES.iter().map(|p| (*p, "migrate")));
    }
    let mut out = Vec::new();
    let mut missing_any = false;
    // `CURRENT_USER()` is `user@host`; a GRANT names `'user'@'host'`.
    let account = match facts.account.rsplit_once('@') {
        Some((user, host)) => format!("'{user}'@'{host}'"),
        None => facts.account.clone(),
    };
    for (privilege, who) in wanted {
        // DDL grants matter for the database as a whole (new tables).
        let tables: &[String] = if who == "migrate" { &[] } else { &facts.tables };
        let missing = facts.grants.missing_on(privilege, &facts.database, tables);
        if !missing.is_empty() {
            missing_any = true;
            out.push(Finding::new(
                Level::Error,
                format!("grant {privilege}"),
                format!(
                    "{account} lacks {privilege} on {} ({who} needs it): GRANT {privilege} ON `{}`.* TO {account};",
                    missing.join(", "),
                    facts.database,
                ),
            ));
        }
    }
    if !missing_any {
        out.push(Finding::new(
            Level::Ok,
            "grants",
            format!(
                "{} holds what {} needs on `{}`",
                facts.account,
                if needs.for_migrate {
                    "serve and migrate"
                } else {
                    "serve"
                },
                facts.database
            ),
        ));
    }
    if !facts.grants.roles.is_empty() && missing_any {
        out.push(Finding::new(
            Level::Warn,
            "roles",
            format!(
                "{} also has role(s) {:?}, whose privileges this check does not read",
                facts.account, facts.grants.roles
            ),
        ));
    }
    out
}

fn schema(s: &SchemaState, needs: &Needs) -> Vec<Finding> {
    let mut out = Vec::new();
    if !s.dirty.is_empty() {
        out.push(Finding::new(
            Level::Error,
            "schema",
            format!(
                "migration(s) {:?} failed part-way: see docs/operations.md, \"A failed migration\"",
                s.dirty
            ),
        ));
    }
    if !s.mismatched.is_empty() {
        out.push(Finding::new(
            Level::Error,
            "schema",
            format!(
                "migration(s) {:?} were applied with other SQL than this build's files",
                s.mismatched
            ),
        ));
    }
    if !s.pending.is_empty() {
        let level = if needs.for_migrate {
            Level::Ok
        } else {
            Level::Error
        };
        out.push(Finding::new(
            level,
            "schema",
            format!(
                "{} migration(s) of this build pending {:?}: run `chatshard migrate` (or apply \
                 `migrate --print-sql` and --mark-applied-through) before `serve`",
                s.pending.len(),
                s.pending
            ),
        ));
    }
    if !s.unknown.is_empty() {
        out.push(Finding::new(
            Level::Warn,
            "schema",
            format!(
                "migration(s) {:?} come from a newer build than this binary",
                s.unknown
            ),
        ));
    }
    if out.is_empty() {
        let latest = s.applied.last().map_or("none".to_owned(), i64::to_string);
        out.push(Finding::new(
            Level::Ok,
            "schema",
            format!("version {latest}, as this build expects"),
        ));
    }
    out
}

/// Reads the facts of one shard; changes nothing.
pub async fn gather(shard: &ShardSettings) -> anyhow::Result<Facts> {
    let mut conn = crate::migrate::connect(shard).await?;
    let fail = |e: sqlx::Error| anyhow::anyhow!("shard {}: {e}", shard.name);
    let facts = read(&mut conn).await.map_err(fail)?;
    Ok(facts)
}

async fn read(conn: &mut MySqlConnection) -> sqlx::Result<Facts> {
    use crate::storage::{migrations, server};
    let variables = server::global_variables(&mut *conn)
        .await?
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    let (account, database, lines) = server::account(&mut *conn).await?;
    let tables = server::tables(&mut *conn).await?;
    let rows = migrations::applied(&mut *conn).await?;
    let build: Vec<(i64, &[u8])> = crate::migrate::MIGRATOR
        .iter()
        .map(|m| (m.version, m.checksum.as_ref()))
        .collect();
    Ok(Facts {
        variables,
        account,
        database: database.unwrap_or_default(),
        grants: Grants::parse(lines.iter().map(String::as_str)),
        tables,
        schema: SchemaState::of(&build, &rows),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Facts {
        let variables = [
            ("version", "10.11.14-MariaDB-0+deb12u2"),
            ("innodb_autoinc_lock_mode", "2"),
            ("log_bin", "ON"),
            ("binlog_format", "ROW"),
            ("innodb_flush_log_at_trx_commit", "1"),
            ("sync_binlog", "1"),
            ("tx_isolation", "REPEATABLE-READ"),
            ("sql_mode", "STRICT_TRANS_TABLES,ERROR_FOR_DIVISION_BY_ZERO"),
            ("time_zone", "SYSTEM"),
            ("max_connections", "500"),
            ("max_user_connections", "0"),
            ("read_only", "OFF"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        Facts {
            variables,
            account: "app@%".into(),
            database: "chatshard".into(),
            grants: Grants::parse([
                "GRANT SELECT, INSERT, UPDATE, DELETE ON `chatshard`.* TO `app`@`%`",
            ]),
            tables: vec!["chat".into()],
            schema: SchemaState {
                applied: vec![1],
                ..SchemaState::default()
            },
        }
    }

    fn needs() -> Needs {
        Needs {
            instances: 4,
            pool_size: 16,
            for_migrate: false,
        }
    }

    fn worst(findings: &[Finding]) -> Level {
        findings.iter().map(|f| f.level).max().unwrap_or(Level::Ok)
    }

    fn about<'a>(findings: &'a [Finding], subject: &str) -> &'a Finding {
        findings
            .iter()
            .find(|f| f.subject == subject)
            .unwrap_or_else(|| panic!("no finding on {subject}: {findings:?}"))
    }

    #[test]
    fn a_correct_shard_has_no_error_or_warning() {
        let f = evaluate(&good(), &needs());
        assert_eq!(worst(&f), Level::Ok, "{f:#?}");
        assert!(about(&f, "server").detail.starts_with("MariaDB"));
    }

    #[test]
    fn each_setting_that_breaks_chatshard_is_an_error_naming_it() {
        let cases: [(&str, &str, &str); 5] = [
            ("innodb_autoinc_lock_mode", "1", "innodb_autoinc_lock_mode"),
            ("binlog_format", "STATEMENT", "binlog_format"),
            ("read_only", "ON", "read_only"),
            ("max_connections", "60", "max_connections"),
            ("max_user_connections", "20", "max_user_connections"),
        ];
        for (name, value, subject) in cases {
            let mut facts = good();
            facts.variables.insert(name.into(), value.into());
            let f = evaluate(&facts, &needs());
            assert_eq!(
                about(&f, subject).level,
                Level::Error,
                "{name}={value}: {f:#?}"
            );
        }
    }

    #[test]
    fn weakened_durability_and_loose_modes_warn() {
        for (name, value, subject) in [
            (
                "innodb_flush_log_at_trx_commit",
                "2",
                "innodb_flush_log_at_trx_commit",
            ),
            ("sync_binlog", "0", "sync_binlog"),
            ("sql_mode", "NO_ENGINE_SUBSTITUTION", "sql_mode"),
            ("binlog_format", "MIXED", "binlog_format"),
            ("max_connections", "90", "max_connections"),
            ("version", "8.4.3", "server"),
        ] {
            let mut facts = good();
            facts.variables.insert(name.into(), value.into());
            let f = evaluate(&facts, &needs());
            let level = about(&f, subject).level;
            let expect = if name == "version" {
                Level::Ok
            } else {
                Level::Warn
            };
            assert_eq!(level, expect, "{name}={value}: {f:#?}");
        }
        let mut facts = good();
        facts.variables.insert("version".into(), "5.7.44".into());
        assert_eq!(
            about(&evaluate(&facts, &needs()), "server").level,
            Level::Warn
        );
        facts.variables.insert("log_bin".into(), "OFF".into());
        facts.variables.insert("sync_binlog".into(), "0".into());
        let f = evaluate(&facts, &needs());
        assert!(
            f.iter().all(|x| x.subject != "sync_binlog"),
            "no binlog, no sync_binlog"
        );
    }

    #[test]
    fn a_missing_grant_is_named_and_migrate_needs_ddl() {
        let mut facts = good();
        facts.grants =
            Grants::parse(["GRANT SELECT, INSERT, UPDATE ON `chatshard`.* TO `app`@`%`"]);
        let f = evaluate(&facts, &needs());
        let delete = about(&f, "grant DELETE");
        assert_eq!(delete.level, Level::Error);
        assert!(
            delete.detail.contains("GRANT DELETE ON `chatshard`.*"),
            "{delete:?}"
        );
        let f = evaluate(
            &good(),
            &Needs {
                for_migrate: true,
                ..needs()
            },
        );
        assert_eq!(about(&f, "grant CREATE").level, Level::Error);
    }

    #[test]
    fn the_schema_must_match_the_build_except_pending_for_migrate() {
        let mut facts = good();
        facts.schema.pending = vec![2];
        assert_eq!(worst(&evaluate(&facts, &needs())), Level::Error);
        let for_migrate = Needs {
            for_migrate: true,
            ..needs()
        };
        facts.grants = Grants::parse(["GRANT ALL ON `chatshard`.* TO `app`@`%`"]);
        assert_eq!(worst(&evaluate(&facts, &for_migrate)), Level::Ok);
        facts.schema.dirty = vec![3];
        assert_eq!(worst(&evaluate(&facts, &for_migrate)), Level::Error);
    }

    #[test]
    fn connections_count_every_instance_a_command_and_migrate() {
        assert_eq!(needs().connections(), 5 * 16 + 1);
    }
}
