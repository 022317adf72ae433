//! Schema migrations: the SQL files in `migrations/`, applied to every shard,
//! and the tools a DBA works with (docs/operations.md, "Schema changes").
//!
//! The files are compiled into the binary, so `chatshard migrate` applies exactly
//! the schema this build expects. sqlx's migrator records each applied version
//! in `_sqlx_migrations` on each shard, takes a lock while it runs, and checks the
//! checksums of versions already applied; a rerun is a no-op.
//!
//! Beside applying them:
//! - [`shard_status`] reads a shard's table without creating it and says what
//!   is applied (and whether by hand), pending, dirty (a run that failed
//!   part-way), changed since it was applied, or unknown to this build;
//! - [`pending`] hands out the pending migrations' SQL, to print and apply
//!   with the DBA's own tools, and changes nothing;
//! - [`mark_applied`] records versions applied by hand, with the checksum
//!   sqlx expects, so later runs and `chatshard check` take them as applied;
//! - [`repair_dirty`] clears a failed run once the DBA has undone it.
//!
//! Every command that writes the table takes the migrator's lock first, and
//! renames rows of the renumbered versions ([`renumber`]) before anything else.
//! What a shard's rows mean against this build is decided by pure code
//! ([`SchemaState::of`]); the SQL is in `crate::storage::migrations`.

pub mod renumber;

use sqlx::migrate::{Migrate, Migration, Migrator};
use sqlx::mysql::MySqlConnectOptions;
use sqlx::{ConnectOptions, MySqlConnection};

use crate::config::ShardSettings;
use crate::storage::migrations::{self as table, AppliedRow};

/// The migrations of this build.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// A shard's migration table read against this build.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchemaState {
    /// Versions applied successfully with the checksum of this build's file,
    /// ascending.
    pub applied: Vec<i64>,
    /// Those of `applied` that were recorded by `--mark-applied`, not run.
    pub by_hand: Vec<i64>,
    /// Versions of this build not applied, ascending.
    pub pending: Vec<i64>,
    /// Versions whose run failed part-way (`success = FALSE`).
    pub dirty: Vec<i64>,
    /// Versions applied with another checksum than this build's file.
    pub mismatched: Vec<i64>,
    /// Versions applied that this build has no file for (a newer build's).
    pub unknown: Vec<i64>,
    /// Rows still under a number that changed ([`renumber::RENUMBERED`]),
    /// renamed by the next command that writes the table.
    pub renumber: Vec<renumber::Rename>,
}

impl SchemaState {
    /// Decides what `rows` mean against the migrations `build` (version and
    /// checksum), counting rows of renumbered versions under their new number.
    pub fn of(build: &[(i64, &[u8])], rows: &[AppliedRow]) -> Self {
        let keyed: Vec<(i64, &[u8])> = rows
            .iter()
            .map(|r| (r.version, r.checksum.as_slice()))
            .collect();
        let renames = renumber::plan(&keyed, build);
        let version_of = |v: i64| renames.iter().find(|r| r.from == v).map_or(v, |r| r.to);
        let mut state = Self {
            renumber: renames.clone(),
            ..Self::default()
        };
        let mut seen = Vec::new();
        for row in rows {
            let version = version_of(row.version);
            seen.push(version);
            match build.iter().find(|(v, _)| *v == version) {
                None => state.unknown.push(version),
                Some(_) if !row.success => state.dirty.push(version),
                Some((_, sum)) if *sum != row.checksum.as_slice() => {
                    state.mismatched.push(version);
                }
                Some(_) => {
                    state.applied.push(version);
                    if row.execution_time == -1 {
                        state.by_hand.push(version);
                    }
                }
            }
        }
        state.pending = build
            .iter()
            .map(|(v, _)| *v)
            .filter(|v| !seen.contains(v))
            .collect();
        for list in [
            &mut state.applied,
            &mut state.by_hand,
            &mut state.pending,
            &mut state.dirty,
            &mut state.mismatched,
            &mut state.unknown,
        ] {
            list.sort_unstable();
        }
        state
    }

    /// Whether the shard has exactly what this build needs: nothing pending,
    /// failed or changed.
    pub fn is_current(&self) -> bool {
        self.pending.is_empty() && self.dirty.is_empty() && self.mismatched.is_empty()
    }
}

/// This build's migrations as `(version, checksum)`.
fn build() -> Vec<(i64, &'static [u8])> {
    MIGRATOR
        .iter()
        .map(|m| (m.version, m.checksum.as_ref()))
        .collect()
}

/// One shard's schema state.
#[derive(Debug, Clone)]
pub struct ShardSchema {
    pub shard: String,
    pub address: String,
    pub state: SchemaState,
}

impl ShardSchema {
    /// Versions applied on the shard, ascending.
    pub fn applied(&self) -> &[i64] {
        &self.state.applied
    }

    /// Versions of this build not yet applied.
    pub fn pending(&self) -> &[i64] {
        &self.state.pending
    }
}

impl std::fmt::Display for ShardSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.state;
        let latest = s.applied.last().map_or("none".to_owned(), i64::to_string);
        write!(
            f,
            "{} ({}): version {latest}, {} applied",
            self.shard,
            self.address,
            s.applied.len()
        )?;
        if !s.by_hand.is_empty() {
            write!(f, " ({} by hand)", s.by_hand.len())?;
        }
        write!(f, ", {} pending", s.pending.len())?;
        if !s.pending.is_empty() {
            write!(f, " {:?}", s.pending)?;
        }
        if !s.dirty.is_empty() {
            write!(
                f,
                "; DIRTY {:?}: a run failed part-way (docs/operations.md, \"A failed migration\")",
                s.dirty
            )?;
        }
        if !s.mismatched.is_empty() {
            write!(
                f,
                "; CHECKSUM MISMATCH {:?}: applied with other SQL than this build's file",
                s.mismatched
            )?;
        }
        if !s.unknown.is_empty() {
            write!(f, "; unknown to this build {:?}", s.unknown)?;
        }
        if !s.renumber.is_empty() {
            let pairs: Vec<String> = s
                .renumber
                .iter()
                .map(|r| format!("{}->{}", r.from, r.to))
                .collect();
            write!(f, "; renumbered at the next migrate: {}", pairs.join(", "))?;
        }
        Ok(())
    }
}

/// Opens one connection to a shard.
pub async fn connect(shard: &ShardSettings) -> anyhow::Result<MySqlConnection> {
    let options: MySqlConnectOptions = shard
        .url
        .parse()
        .map_err(|e| anyhow::anyhow!("shard {}: invalid url: {e}", shard.name))?;
    options.connect().await.map_err(|e| {
        let why = crate::error::connect_refusal(&e)
            .map(|why| format!("{why}: "))
            .unwrap_or_default();
        anyhow::anyhow!(
            "shard {} ({}): cannot connect: {why}{e}",
            shard.name,
            shard.redacted_url(),
        )
    })
}

/// Applies pending migrations to one shard.
pub async fn migrate_shard(shard: &ShardSettings) -> anyhow::Result<ShardSchema> {
    let mut conn = connect(shard).await?;
    // Renumbered rows first, under the migrator's lock, which sqlx's own run
    // then takes again.
    locked(shard, &mut conn, |_| Ok(())).await?;
    conn.unlock()
        .await
        .map_err(|e| anyhow::anyhow!("shard {}: {e}", shard.name))?;
    MIGRATOR
        .run(&mut conn)
        .await
        .map_err(|e| anyhow::anyhow!("shard {}: migration failed: {e}", shard.name))?;
    fill_buckets(shard, &mut conn).await?;
    status_on(shard, &mut conn).await
}

/// Fills the bucket of every chat row made before the column existed
/// (migration `20261207000010`), a page of 1,000 rows per statement.
pub async fn fill_buckets(
    shard: &ShardSettings,
    conn: &mut MySqlConnection,
) -> anyhow::Result<u64> {
    let mut filled = 0;
    loop {
        let n = crate::storage::chats::fill_buckets(conn, 1000)
            .await
            .map_err(|e| anyhow::anyhow!("shard {}: filling chat buckets: {e}", shard.name))?;
        if n == 0 {
            return Ok(filled);
        }
        filled += n;
    }
}

/// Reads one shard's migration table; creates nothing.
pub async fn shard_status(shard: &ShardSettings) -> anyhow::Result<ShardSchema> {
    let mut conn = connect(shard).await?;
    status_on(shard, &mut conn).await
}

/// One shard's state and the migrations it lacks, in the order they apply;
/// creates nothing.
pub async fn pending(
    shard: &ShardSettings,
) -> anyhow::Result<(ShardSchema, Vec<&'static Migration>)> {
    let schema = shard_status(shard).await?;
    let pending = MIGRATOR
        .iter()
        .filter(|m| schema.state.pending.contains(&m.version))
        .collect();
    Ok((schema, pending))
}

/// The SQL of `migrations` as a script for the `mysql`/`mariadb` client: each
/// one headed by its version, description and checksum.
pub fn script(schema: &ShardSchema, migrations: &[&Migration]) -> String {
    let mut out = format!(
        "-- shard {} ({}): {} pending migration(s); this script changes nothing by itself.\n",
        schema.shard,
        schema.address,
        migrations.len()
    );
    if let Some(last) = migrations.last() {
        out.push_str(&format!(
            "-- Once applied: chatshard migrate --shard {} --mark-applied-through {}\n",
            schema.shard, last.version
        ));
    }
    for m in migrations {
        out.push_str(&format!(
            "\n-- version {} ({}), checksum sha384:{}\n",
            m.version,
            m.description,
            hex(&m.checksum)
        ));
        out.push_str(m.sql.as_str().trim_end());
        out.push('\n');
    }
    out
}

/// Which versions `mark_applied` records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// This one version; every earlier one must be applied already.
    One(i64),
    /// Every pending version up to and including this one.
    Through(i64),
}

/// Records versions a DBA applied by hand as applied, with the checksum of
/// this build's file and `execution_time = -1`; a version whose run failed
/// part-way and that the DBA then finished is recorded the same way. Returns
/// the versions it recorded.
pub async fn mark_applied(
    shard: &ShardSettings,
    mark: Mark,
) -> anyhow::Result<(ShardSchema, Vec<i64>)> {
    let (Mark::One(last) | Mark::Through(last)) = mark;
    if !MIGRATOR.version_exists(last) {
        anyhow::bail!(
            "this build has no migration {last} (its versions: {:?})",
            MIGRATOR.iter().map(|m| m.version).collect::<Vec<_>>()
        );
    }
    let mut conn = connect(shard).await?;
    conn.ensure_migrations_table(table::TABLE)
        .await
        .map_err(|e| anyhow::anyhow!("shard {}: {e}", shard.name))?;
    let marked = locked(shard, &mut conn, |state| match mark {
        Mark::One(v) => {
            if let Some(earlier) = state.pending.iter().find(|p| **p < v) {
                anyhow::bail!(
                    "version {earlier} comes before {v} and is not applied: apply and mark it \
                     first, or use --mark-applied-through {v}"
                );
            }
            Ok(vec![v])
        }
        Mark::Through(v) => Ok(state
            .pending
            .iter()
            .chain(&state.dirty)
            .copied()
            .filter(|p| *p <= v)
            .collect()),
    })
    .await?;
    let mut recorded = Vec::new();
    let current = table::applied(&mut conn)
        .await
        .map_err(|e| anyhow::anyhow!("shard {}: {e}", shard.name))?;
    for version in marked {
        let Some(migration) = MIGRATOR.iter().find(|m| m.version == version) else {
            continue;
        };
        let row = current.iter().find(|r| r.version == version);
        let fail = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!("shard {}: recording {version}: {e}", shard.name)
        };
        match row {
            Some(r) if r.success => continue,
            Some(_) => {
                table::settle_dirty(&mut conn, version, &migration.checksum)
                    .await
                    .map_err(|e| fail(&e))?;
            }
            None => conn
                .skip(table::TABLE, migration)
                .await
                .map_err(|e| fail(&e))?,
        }
        recorded.push(version);
    }
    conn.unlock()
        .await
        .map_err(|e| anyhow::anyhow!("shard {}: {e}", shard.name))?;
    Ok((status_on(shard, &mut conn).await?, recorded))
}

/// Clears a version whose run failed part-way, so that the next `migrate`
/// runs it again. Only for a dirty version: the DBA first undoes what of it
/// was applied (MySQL commits each DDL statement at once).
pub async fn repair_dirty(shard: &ShardSettings, version: i64) -> anyhow::Result<ShardSchema> {
    let mut conn = connect(shard).await?;
    locked(shard, &mut conn, |state| {
        if state.dirty.contains(&version) {
            Ok(())
        } else {
            anyhow::bail!(
                "version {version} is not dirty here (dirty: {:?}); nothing to repair",
                state.dirty
            )
        }
    })
    .await?;
    let cleared = table::delete_dirty(&mut conn, version)
        .await
        .map_err(|e| anyhow::anyhow!("shard {}: {e}", shard.name))?;
    conn.unlock()
        .await
        .map_err(|e| anyhow::anyhow!("shard {}: {e}", shard.name))?;
    if !cleared {
        anyhow::bail!("shard {}: version {version} was not dirty", shard.name);
    }
    status_on(shard, &mut conn).await
}

/// Takes the migrator's lock, renames renumbered rows, and lets `decide`
/// look at the state; the lock stays held when `decide` succeeds (the caller
/// unlocks, or a dropped connection releases it), and is released when it
/// fails.
async fn locked<T>(
    shard: &ShardSettings,
    conn: &mut MySqlConnection,
    decide: impl FnOnce(&SchemaState) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("shard {}: {e}", shard.name);
    conn.lock().await.map_err(|e| fail(&e))?;
    let rows = table::applied(conn).await.map_err(|e| fail(&e))?;
    let state = SchemaState::of(&build(), &rows);
    for rename in &state.renumber {
        let sum = MIGRATOR
            .iter()
            .find(|m| m.version == rename.to)
            .map(|m| m.checksum.as_ref())
            .unwrap_or_default();
        table::renumber(conn, rename.from, rename.to, sum)
            .await
            .map_err(|e| fail(&e))?;
        tracing::info!(shard = %shard.name, from = rename.from, to = rename.to, "migration renumbered");
    }
    match decide(&state) {
        Ok(t) => Ok(t),
        Err(e) => {
            conn.unlock().await.map_err(|e| fail(&e))?;
            Err(fail(&e))
        }
    }
}

async fn status_on(
    shard: &ShardSettings,
    conn: &mut MySqlConnection,
) -> anyhow::Result<ShardSchema> {
    let rows = table::applied(conn)
        .await
        .map_err(|e| anyhow::anyhow!("shard {}: {e}", shard.name))?;
    Ok(ShardSchema {
        shard: shard.name.clone(),
        address: shard.redacted_url(),
        state: SchemaState::of(&build(), &rows),
    })
}

/// Lower-case hex of a checksum.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(version: i64, checksum: &[u8], success: bool, execution_time: i64) -> AppliedRow {
        AppliedRow {
            version,
            description: String::new(),
            success,
            checksum: checksum.to_vec(),
            execution_time,
        }
    }

    #[test]
    fn a_shard_is_read_against_the_build() {
        let build: Vec<(i64, &[u8])> = vec![(1, b"a"), (2, b"b"), (3, b"c"), (4, b"d")];
        let rows = [
            row(1, b"a", true, 5),
            row(2, b"x", true, 5),
            row(3, b"c", false, -1),
            row(9, b"z", true, 5),
        ];
        let s = SchemaState::of(&build, &rows);
        assert_eq!(s.applied, vec![1]);
        assert_eq!(s.mismatched, vec![2]);
        assert_eq!(s.dirty, vec![3]);
        assert_eq!(s.pending, vec![4]);
        assert_eq!(s.unknown, vec![9]);
        assert!(!s.is_current());
        let hand = SchemaState::of(&build[..1], &[row(1, b"a", true, -1)]);
        assert_eq!(hand.by_hand, vec![1]);
        assert!(hand.is_current());
    }

    #[test]
    fn old_numbers_count_as_their_new_ones() {
        let (old, new) = renumber::RENUMBERED[0];
        let build: Vec<(i64, &[u8])> = vec![(new, b"lifecycle")];
        let s = SchemaState::of(&build, &[row(old, b"lifecycle", true, 7)]);
        assert_eq!(s.applied, vec![new]);
        assert!(s.unknown.is_empty() && s.pending.is_empty());
        assert_eq!(s.renumber, vec![renumber::Rename { from: old, to: new }]);
    }

    #[test]
    fn the_build_is_in_order_and_has_no_two_files_with_one_version() {
        let versions: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
        for (_, new) in renumber::RENUMBERED {
            assert!(versions.contains(&new), "{new} has no file");
        }
    }
}
