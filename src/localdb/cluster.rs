//! A set of local MariaDB shards and the settings that reach them: the one kit
//! with which `serve --dev`, the test suites and the benchmarks start shards.
//!
//! Shards start in parallel, are migrated, and get the buckets split evenly
//! (`shard-0`, `shard-1`, ...). They connect over TCP on 127.0.0.1, as
//! production shards do, so a regression of the TCP path (such as Nagle's
//! algorithm left on) shows in the tests. What happens to each server when the
//! cluster is dropped, or the process dies, follows its [`Location`]:
//! persistent dev shards shut down cleanly and keep their data, temporary ones
//! are killed and removed.
//!
//! A persistent root is locked for the life of the cluster, so a second
//! `serve --dev` on the same directory stops at once with the holder's pid
//! instead of fighting over the data dirs.
//!
//! # Replicated shards
//!
//! [`LocalCluster::start_replicated`] gives each shard replicas: MariaDB GTID
//! replication, semi-synchronous (see [`super::Replication`]). The replicas
//! start beside the primaries, are pointed at them before the migrations
//! run (on the primary only: they reach the replicas by replication), and
//! the start returns once every replica has applied the migrated schema.
//! A shard's settings list the replicas' URLs after its `url`. Persistent
//! replicas live in `<root>/dev/shard-N-replica-M`; a replica that is new
//! beside a primary that already has data starts from a copy of the
//! primary's data dir (taken while it is stopped). The test kit acts on the
//! members as an orchestrator would ([`LocalCluster::promote_replica`],
//! [`LocalMariaDb::stop_sql_thread`], [`LocalMariaDb::set_read_only`]).

use std::fs::{self, File, TryLockError};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use super::{
    DEFAULT_DATABASE, LocalMariaDb, LocalMariaDbOptions, REPLICATION_TIMEOUT, Replication, Role,
};
use crate::config::{Settings, ShardSettings};
use crate::migrate::{self, ShardSchema};
use crate::routing::BucketRange;
use crate::storage::replication;

/// Where the shards keep their data.
#[derive(Debug, Clone)]
pub enum Location {
    /// `<root>/dev/shard-N`, kept between runs (`serve --dev`).
    Persistent(PathBuf),
    /// Fresh directories under the system's temp dir, removed at exit.
    Temp,
    /// Fresh directories in memory (`/dev/shm`) where the machine has it,
    /// removed at exit: for tests that measure latency, so that fsync stalls
    /// caused by other processes on a shared disk stay out of the measurement.
    TempInMemory,
}

/// The most replicas a shard may have here.
pub const MAX_REPLICAS: usize = 8;

/// The running shards.
pub struct LocalCluster {
    /// The replicas of each shard (empty without replication). Declared
    /// before `servers` so that they are dropped, and stopped, first.
    replicas: Vec<Vec<LocalMariaDb>>,
    /// The primary each shard started with.
    servers: Vec<LocalMariaDb>,
    /// Which member of each shard is its writer: `None` the server it started
    /// with, `Some(j)` its replica `j` since [`LocalCluster::promote_replica`].
    writers: Vec<Option<usize>>,
    shards: Vec<ShardSettings>,
    schemas: Vec<ShardSchema>,
    /// Held while the cluster lives (persistent roots only).
    _lock: Option<File>,
}

impl std::fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCluster")
            .field("shards", &self.shards.len())
            .field(
                "replicas",
                &self.replicas.iter().map(Vec::len).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl LocalCluster {
    /// `n` temporary shards, migrated.
    pub async fn start_temp(n: usize) -> Result<Self> {
        Self::start(n, Location::Temp).await
    }

    /// Starts `n` shards (1 to 64) in parallel and migrates them. If any fails,
    /// the ones that started are stopped and every failure is reported.
    pub async fn start(n: usize, location: Location) -> Result<Self> {
        Self::start_with_args(n, location, &[]).await
    }

    /// [`Self::start`], with `extra_args` on every `mariadbd` command line
    /// (they win over the defaults, e.g. `--innodb-autoinc-lock-mode=1` for
    /// the load tool's comparison).
    pub async fn start_with_args(
        n: usize,
        location: Location,
        extra_args: &[String],
    ) -> Result<Self> {
        Self::start_replicated(n, 0, location, extra_args).await
    }

    /// Starts `n` shards (1 to 64), each with `r` replicas (0 to
    /// [`MAX_REPLICAS`]), all in parallel, with `extra_args` on every
    /// `mariadbd` command line. With replicas, each member gets its
    /// replication flags ([`super::Replication`]), the replicas are pointed
    /// at their primary, the primaries are migrated, and it returns once
    /// every replica has applied what its primary holds. `r = 0` is
    /// [`Self::start_with_args`]: lone servers without a binary log. If
    /// anything fails, the servers that started are stopped and every
    /// failure is reported.
    pub async fn start_replicated(
        n: usize,
        r: usize,
        location: Location,
        extra_args: &[String],
    ) -> Result<Self> {
        let n = n.clamp(1, 64);
        let r = r.min(MAX_REPLICAS);
        let lock = match &location {
            Location::Persistent(root) => Some(lock_root(root)?),
            Location::Temp | Location::TempInMemory => None,
        };
        // Replicas new beside a primary with data start from a copy of it;
        // those this run leaves out go, as they would miss what it writes.
        let seeded = match &location {
            Location::Persistent(root) => {
                let root = root.clone();
                tokio::task::spawn_blocking(move || prepare_replica_dirs(&root, n, r)).await??
            }
            Location::Temp | Location::TempInMemory => vec![vec![false; r]; n],
        };
        let member = |i: usize, j: Option<usize>| {
            let mut options = options(&location, i, j);
            options.extra_args.extend_from_slice(extra_args);
            if r > 0 {
                options.replication = Some(Replication {
                    server_id: server_id(i, j),
                    role: if j.is_some() {
                        Role::Replica
                    } else {
                        Role::Primary
                    },
                });
            }
            LocalMariaDb::start(options)
        };
        let primaries = futures_util::future::join_all((0..n).map(|i| member(i, None)));
        let replicas = futures_util::future::join_all(
            (0..n)
                .flat_map(|i| (0..r).map(move |j| (i, j)))
                .map(|(i, j)| member(i, Some(j))),
        );
        let (primaries, replicas) = futures_util::future::join(primaries, replicas).await;
        let mut failures = Vec::new();
        let mut servers = Vec::with_capacity(n);
        for result in primaries {
            match result {
                Ok(server) => servers.push(server),
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        let mut replica_sets: Vec<Vec<LocalMariaDb>> = (0..n).map(|_| Vec::new()).collect();
        for (k, result) in replicas.into_iter().enumerate() {
            match result {
                Ok(server) => replica_sets[k / r.max(1)].push(server),
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        let mut cluster = Self {
            shards: shard_settings(&servers, &replica_sets),
            writers: vec![None; servers.len()],
            replicas: replica_sets,
            servers,
            schemas: Vec::new(),
            _lock: lock,
        };
        if !failures.is_empty() {
            cluster.stop().await;
            bail!(
                "could not start the local shards:\n  - {}",
                failures.join("\n  - ")
            );
        }
        if r > 0
            && let Err(e) = cluster.connect_replicas(&seeded).await
        {
            cluster.stop().await;
            return Err(e.context("setting up replication"));
        }
        for i in 0..cluster.shards.len() {
            match migrate::migrate_shard(&cluster.shards[i]).await {
                Ok(schema) => cluster.schemas.push(schema),
                Err(e) => {
                    let name = cluster.shards[i].name.clone();
                    cluster.stop().await;
                    return Err(e.context(format!("migrating {name}")));
                }
            }
        }
        for i in (0..cluster.shards.len()).filter(|_| r > 0) {
            if let Err(e) = cluster
                .wait_replicas_caught_up(i, REPLICATION_TIMEOUT)
                .await
            {
                let name = cluster.shards[i].name.clone();
                cluster.stop().await;
                return Err(e.context(format!("replicating the schema of {name}")));
            }
        }
        Ok(cluster)
    }

    /// Makes the replication account on every member, points each replica at
    /// its primary (a seeded one from where its copy was taken), and waits
    /// until every replica replicates and every primary counts its replicas
    /// as semi-sync clients: until then its commits would wait for the
    /// semi-sync timeout.
    async fn connect_replicas(&mut self, seeded: &[Vec<bool>]) -> Result<()> {
        for i in 0..self.servers.len() {
            let primary = &self.servers[i];
            primary.create_replication_user().await?;
            let port = primary.port();
            let primary_pos = primary.gtid_positions().await?.binlog;
            for (j, replica) in self.replicas[i].iter_mut().enumerate() {
                replica.create_replication_user().await?;
                if seeded.get(i).and_then(|s| s.get(j)).copied() == Some(true) {
                    let mut conn = replica.connect("").await?;
                    replication::set_gtid_slave_pos(&mut conn, &primary_pos).await?;
                }
                replica.replicate_from(port).await?;
            }
        }
        let deadline = std::time::Instant::now() + REPLICATION_TIMEOUT;
        for i in 0..self.servers.len() {
            for replica in &self.replicas[i] {
                replica.wait_replicating(REPLICATION_TIMEOUT).await?;
            }
            wait_semi_sync_clients(&self.servers[i], self.replicas[i].len(), deadline).await?;
        }
        Ok(())
    }

    /// Each shard's settings: name, `mysql://root@127.0.0.1:PORT/chatshard`
    /// (the primary it started with), its even share of the buckets, and its
    /// replicas' URLs (of the same form) in order.
    pub fn shard_settings(&self) -> &[ShardSettings] {
        &self.shards
    }

    /// Every setting at its default, listening on `127.0.0.1:0`, with these
    /// shards.
    pub fn settings(&self) -> Result<Settings> {
        let mut settings = Settings::from_toml_unvalidated("listen = \"127.0.0.1:0\"", [])?;
        settings.shards = self.shards.clone();
        self.fill_replication(&mut settings);
        Ok(settings)
    }

    /// Gives `settings` the account replicas log in with, when the cluster
    /// has replicas (reparents run by chatshard repoint them with it).
    pub fn fill_replication(&self, settings: &mut Settings) {
        if self.replicas.iter().any(|r| !r.is_empty())
            && settings.replicas.replication_user.is_empty()
        {
            settings.replicas.replication_user = super::REPLICATION_USER.to_owned();
            settings.replicas.replication_password = super::REPLICATION_PASSWORD.to_owned();
        }
    }

    /// The schema of each shard after migration.
    pub fn schemas(&self) -> &[ShardSchema] {
        &self.schemas
    }

    pub fn server(&self, i: usize) -> &LocalMariaDb {
        &self.servers[i]
    }

    /// The server of shard `i`, to stop, kill, suspend or restart it.
    pub fn server_mut(&mut self, i: usize) -> &mut LocalMariaDb {
        &mut self.servers[i]
    }

    pub fn servers(&self) -> &[LocalMariaDb] {
        &self.servers
    }

    /// The replicas of shard `i`, in the order of its settings' `replicas`
    /// (empty without replication).
    pub fn replicas(&self, i: usize) -> &[LocalMariaDb] {
        &self.replicas[i]
    }

    /// Replica `j` of shard `i`, to stop, kill, suspend or restart it, or to
    /// act on its replication.
    pub fn replica_mut(&mut self, i: usize, j: usize) -> &mut LocalMariaDb {
        &mut self.replicas[i][j]
    }

    /// The member of shard `i` that takes writes: the server it started
    /// with, or the replica last promoted by [`Self::promote_replica`].
    pub fn writer(&self, i: usize) -> &LocalMariaDb {
        match self.writers[i] {
            Some(j) => &self.replicas[i][j],
            None => &self.servers[i],
        }
    }

    /// Promotes replica `j` of shard `i` to primary, as an orchestrator
    /// would ([`LocalMariaDb::promote`]: it first applies what it received),
    /// then points the shard's other replicas at it, and returns once they
    /// replicate from it as its semi-sync clients. A replica that is not
    /// running is only told its new source, and replicates from it once
    /// restarted.
    ///
    /// The old writer is left as it is: fence it (read-only, stopped,
    /// killed) before, when it runs, and use
    /// [`LocalMariaDb::replicate_from`] to make it a replica of the new one.
    /// A replica that had applied more than replica `j` cannot follow it
    /// (GTID strict mode): promote the most advanced one.
    pub async fn promote_replica(&mut self, i: usize, j: usize) -> Result<()> {
        let replicas = &mut self.replicas[i];
        if j >= replicas.len() {
            bail!("shard {i} has no replica {j}");
        }
        replicas[j].promote(REPLICATION_TIMEOUT).await?;
        let port = replicas[j].port();
        let mut followers = 0;
        for (k, replica) in replicas.iter_mut().enumerate() {
            if k == j {
                continue;
            }
            if replica.is_running() {
                replica.replicate_from(port).await?;
                followers += 1;
            } else {
                replica.source_port = Some(port);
            }
        }
        self.writers[i] = Some(j);
        let deadline = std::time::Instant::now() + REPLICATION_TIMEOUT;
        let replicas = &self.replicas[i];
        for (k, replica) in replicas.iter().enumerate() {
            if k != j && replica.source_port == Some(port) && replica.process.child.is_some() {
                replica.wait_replicating(REPLICATION_TIMEOUT).await?;
            }
        }
        wait_semi_sync_clients(&replicas[j], followers, deadline).await
    }

    /// Waits (at most `timeout`) until every running replica of shard `i`
    /// that replicates from its writer has applied all the writer holds
    /// (its `@@gtid_binlog_pos` now).
    pub async fn wait_replicas_caught_up(&self, i: usize, timeout: Duration) -> Result<()> {
        let writer = self.writer(i);
        let pos = writer.gtid_positions().await?.binlog;
        for (j, replica) in self.replicas[i].iter().enumerate() {
            if self.writers[i] == Some(j)
                || replica.source_port != Some(writer.port())
                || replica.process.child.is_none()
            {
                continue;
            }
            replica
                .wait_applied(&pos, timeout)
                .await
                .with_context(|| format!("replica {j} of shard-{i}"))?;
        }
        Ok(())
    }

    /// Shuts every shard down cleanly, replicas first, logging failures
    /// (dropping the cluster does the same for persistent shards, and kills
    /// temporary ones).
    pub async fn stop(&mut self) {
        for server in self.replicas.iter_mut().flatten().chain(&mut self.servers) {
            if let Err(e) = server.stop().await {
                tracing::warn!(data_dir = %server.data_dir().display(), error = %format!("{e:#}"), "local shard did not stop cleanly");
            }
        }
    }
}

/// Where member `replica` (`None`: the primary) of shard `i` lives.
fn options(location: &Location, i: usize, replica: Option<usize>) -> LocalMariaDbOptions {
    match location {
        Location::Persistent(root) => LocalMariaDbOptions::dev(member_dir(root, i, replica), 0),
        Location::Temp => LocalMariaDbOptions::temp(),
        Location::TempInMemory => {
            let shm = Path::new("/dev/shm");
            if shm.is_dir() {
                LocalMariaDbOptions::temp_in(shm)
            } else {
                LocalMariaDbOptions::temp()
            }
        }
    }
}

/// `<root>/dev/shard-N`, and `<root>/dev/shard-N-replica-M` for its replicas.
fn member_dir(root: &Path, i: usize, replica: Option<usize>) -> PathBuf {
    let name = match replica {
        Some(j) => format!("shard-{i}-replica-{j}"),
        None => format!("shard-{i}"),
    };
    root.join("dev").join(name)
}

/// `--server-id` of a member: unique in the cluster, and the same for a
/// persistent member on every run (its GTIDs carry it).
fn server_id(i: usize, replica: Option<usize>) -> u32 {
    let member = replica.map_or(0, |j| j + 1);
    // i < 64 and j < MAX_REPLICAS: far below u32::MAX.
    u32::try_from(i * 100 + member + 1).unwrap_or(u32::MAX)
}

fn shard_settings(servers: &[LocalMariaDb], replicas: &[Vec<LocalMariaDb>]) -> Vec<ShardSettings> {
    servers
        .iter()
        .zip(BucketRange::even_split(servers.len()))
        .enumerate()
        .map(|(i, (server, range))| ShardSettings {
            name: format!("shard-{i}"),
            url: server.url(DEFAULT_DATABASE),
            buckets: vec![range.to_string()],
            id_block: None,
            replicas: replicas
                .get(i)
                .into_iter()
                .flatten()
                .map(|replica| replica.url(DEFAULT_DATABASE))
                .collect(),
        })
        .collect()
}

/// Waits until `primary` counts at least `clients` semi-sync replicas.
async fn wait_semi_sync_clients(
    primary: &LocalMariaDb,
    clients: usize,
    deadline: std::time::Instant,
) -> Result<()> {
    if clients == 0 {
        return Ok(());
    }
    let mut conn = primary.connect("").await?;
    loop {
        let status = replication::semi_sync_master_status(&mut conn).await?;
        if status.clients >= clients as u64 {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "port {}: {} of {clients} replicas connected as semi-sync clients",
                primary.port(),
                status.clients
            );
        }
        tokio::time::sleep(super::POLL).await;
    }
}

/// Readies the replicas' dirs of a persistent root before any server
/// starts (so every primary is stopped, and a copy of it consistent):
///
/// - for each shard whose primary has a data dir already, copies it into
///   the dirs of its replicas that have none yet (a replica new beside a
///   primary that has data, e.g. the first `--replicas 1` on a root used
///   without): replicating from the primary's binary log would miss what
///   was written before it had one. The copy leaves out the primary's
///   binary logs and replication state. Says which replicas were seeded:
///   they start replicating from the primary's GTID position at the copy;
/// - removes the dirs of replicas `r` and up of the shards that start: this
///   run writes to their primary without them (without a binary log at
///   all when `r` is 0), so they would silently lack those writes when
///   started again; a later run that wants them copies the primary anew.
fn prepare_replica_dirs(root: &Path, n: usize, r: usize) -> Result<Vec<Vec<bool>>> {
    let initialised = |dir: &Path| dir.join("mysql").is_dir();
    for i in 0..n {
        for j in r..MAX_REPLICAS {
            let stale = member_dir(root, i, Some(j));
            if !initialised(&stale) {
                continue;
            }
            if let Some(pid) = running_pid(&stale) {
                bail!(
                    "{} is still in use by mariadbd pid {pid}; wait until it exits",
                    stale.display()
                );
            }
            tracing::warn!(dir = %stale.display(), "removing a replica this run does not start: it would miss what this run writes (a later run with it copies its primary again)");
            fs::remove_dir_all(&stale).with_context(|| format!("removing {}", stale.display()))?;
            let _ = fs::remove_dir_all(super::scratch_path(&stale));
        }
    }
    let mut seeded = vec![vec![false; r]; n];
    for (i, shard) in seeded.iter_mut().enumerate() {
        let primary = member_dir(root, i, None);
        for (j, seeded) in shard.iter_mut().enumerate() {
            let replica = member_dir(root, i, Some(j));
            match (initialised(&primary), initialised(&replica)) {
                (true, false) => {}
                (false, true) => bail!(
                    "{} has data but its primary {} has none; remove the replica's dir",
                    replica.display(),
                    primary.display()
                ),
                _ => continue,
            }
            if let Some(pid) = running_pid(&primary) {
                bail!(
                    "{} is still in use by mariadbd pid {pid}; wait until it exits",
                    primary.display()
                );
            }
            if replica.exists() {
                // Only an empty dir may be filled; anything else is someone's data.
                fs::remove_dir(&replica).with_context(|| {
                    format!(
                        "{} exists but is neither empty nor a MariaDB data dir",
                        replica.display()
                    )
                })?;
            }
            let tmp = super::tmp_init_path(&replica);
            let _ = fs::remove_dir_all(&tmp);
            tracing::info!(from = %primary.display(), to = %replica.display(), "seeding a new replica with a copy of its primary");
            copy_dir(&primary, &tmp, true)
                .with_context(|| format!("copying {} to {}", primary.display(), tmp.display()))?;
            fs::rename(&tmp, &replica)
                .with_context(|| format!("renaming {} to {}", tmp.display(), replica.display()))?;
            *seeded = true;
        }
    }
    Ok(seeded)
}

/// The pid in `dir/mariadbd.pid` if that process is a running `mariadbd`.
fn running_pid(dir: &Path) -> Option<u32> {
    let pid: u32 = fs::read_to_string(dir.join("mariadbd.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "mariadbd").then_some(pid)
}

/// What a copy of a primary's data dir leaves out (top level only): its
/// binary logs and replication state, which belong to the primary, and the
/// files of its last run.
fn left_out_of_seed(name: &str) -> bool {
    name.starts_with("mariadb-bin.")
        || name.starts_with("relay-bin.")
        || matches!(
            name,
            "master.info" | "relay-log.info" | "multi-master.info" | "mariadbd.pid" | "error.log"
        )
        || name.ends_with(".sock")
}

fn copy_dir(from: &Path, to: &Path, top: bool) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if top && left_out_of_seed(&name.to_string_lossy()) {
            continue;
        }
        let kind = entry.file_type()?;
        let target = to.join(&name);
        if kind.is_dir() {
            copy_dir(&entry.path(), &target, false)?;
        } else if kind.is_file() {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Locks `<root>/dev.lock` for this process, or says at once who holds it.
fn lock_root(root: &Path) -> Result<File> {
    fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let path = root.join("dev.lock");
    let mut file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let holder = fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            bail!(
                "{} is in use by another chatshard serve --dev{}; stop it, or pass another --data-dir",
                root.display(),
                if holder.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {holder})")
                }
            );
        }
        Err(TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    file.set_len(0)?;
    write!(file, "{}", std::process::id())?;
    file.flush()?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_root(name: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!(
            "chatshard-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        ));
        let _ = fs::remove_dir_all(&root);
        root
    }

    /// A fake initialised data dir holding the files a copy keeps or leaves out.
    fn fake_data_dir(dir: &Path) -> crate::TestResult {
        fs::create_dir_all(dir.join("mysql"))?;
        fs::create_dir_all(dir.join("chatshard"))?;
        fs::write(dir.join("mysql/user.MAI"), "users")?;
        fs::write(dir.join("chatshard/chats.ibd"), "rows")?;
        fs::write(dir.join("ibdata1"), "system")?;
        for left_out in [
            "mariadb-bin.000001",
            "mariadb-bin.index",
            "relay-bin.000002",
            "master.info",
            "relay-log.info",
            "mariadbd.pid",
            "error.log",
            "mysqld.sock",
        ] {
            fs::write(dir.join(left_out), "primary's own")?;
        }
        Ok(())
    }

    #[test]
    fn members_have_their_own_dirs_and_server_ids() {
        let root = Path::new("/r");
        assert_eq!(member_dir(root, 3, None), Path::new("/r/dev/shard-3"));
        assert_eq!(
            member_dir(root, 3, Some(1)),
            Path::new("/r/dev/shard-3-replica-1")
        );
        let mut ids: Vec<u32> = (0..64)
            .flat_map(|i| {
                std::iter::once(server_id(i, None))
                    .chain((0..MAX_REPLICAS).map(move |j| server_id(i, Some(j))))
            })
            .collect();
        let all = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), all, "server ids are unique");
        assert!(!ids.contains(&0), "0 is no valid server id for a source");
    }

    #[test]
    fn a_new_replica_is_a_copy_of_its_primary_without_its_binary_logs() -> crate::TestResult {
        let root = temp_root("seed-test");
        let primary = member_dir(&root, 0, None);
        fake_data_dir(&primary)?;
        // Shard 1 is new: nothing to copy.
        let seeded = prepare_replica_dirs(&root, 2, 2)?;
        assert_eq!(seeded, vec![vec![true, true], vec![false, false]]);
        for j in 0..2 {
            let replica = member_dir(&root, 0, Some(j));
            assert_eq!(
                fs::read_to_string(replica.join("chatshard/chats.ibd"))?,
                "rows"
            );
            assert_eq!(fs::read_to_string(replica.join("mysql/user.MAI"))?, "users");
            assert!(replica.join("ibdata1").is_file());
            for left_out in [
                "mariadb-bin.000001",
                "mariadb-bin.index",
                "relay-bin.000002",
                "master.info",
                "relay-log.info",
                "mariadbd.pid",
                "error.log",
                "mysqld.sock",
            ] {
                assert!(!replica.join(left_out).exists(), "{left_out} copied");
            }
            assert!(!tmp_init(&replica).exists());
        }
        assert!(!member_dir(&root, 1, Some(0)).exists());

        // Again: replica 0 is there already and is kept; replica 1 is left out
        // of this run, so it goes.
        fs::write(member_dir(&root, 0, Some(0)).join("mine"), "replica's own")?;
        let seeded = prepare_replica_dirs(&root, 1, 1)?;
        assert_eq!(seeded, vec![vec![false]]);
        assert!(member_dir(&root, 0, Some(0)).join("mine").is_file());
        assert!(!member_dir(&root, 0, Some(1)).exists());

        // Without replicas, none is kept.
        assert_eq!(prepare_replica_dirs(&root, 1, 0)?, vec![Vec::<bool>::new()]);
        assert!(!member_dir(&root, 0, Some(0)).exists());
        assert!(
            primary.join("ibdata1").is_file(),
            "the primary is untouched"
        );
        fs::remove_dir_all(&root)?;
        Ok(())
    }

    #[test]
    fn a_replica_with_data_beside_a_primary_without_is_refused() -> crate::TestResult {
        let root = temp_root("orphan-test");
        fake_data_dir(&member_dir(&root, 0, Some(0)))?;
        let err = prepare_replica_dirs(&root, 1, 1).unwrap_err().to_string();
        assert!(err.contains("its primary"), "{err}");
        fs::remove_dir_all(&root)?;
        Ok(())
    }

    fn tmp_init(dir: &Path) -> PathBuf {
        super::super::tmp_init_path(dir)
    }

    #[test]
    fn a_locked_root_is_refused_at_once_naming_the_holder() -> crate::TestResult {
        let root = std::env::temp_dir().join(format!("chatshard-lock-test-{}", std::process::id()));
        let held = lock_root(&root)?;
        let err = lock_root(&root).unwrap_err().to_string();
        assert!(err.contains("in use"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(held);
        let again = lock_root(&root);
        assert!(again.is_ok(), "released lock is taken again");
        drop(again);
        fs::remove_dir_all(&root)?;
        Ok(())
    }
}
