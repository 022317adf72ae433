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

use std::fs::{self, File, TryLockError};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use super::{DEFAULT_DATABASE, LocalMariaDb, LocalMariaDbOptions};
use crate::config::{Settings, ShardSettings};
use crate::migrate::{self, ShardSchema};
use crate::routing::BucketRange;

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

/// The running shards.
pub struct LocalCluster {
    servers: Vec<LocalMariaDb>,
    shards: Vec<ShardSettings>,
    schemas: Vec<ShardSchema>,
    /// Held while the cluster lives (persistent roots only).
    _lock: Option<File>,
}

impl std::fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCluster")
            .field("shards", &self.shards.len())
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
        let n = n.clamp(1, 64);
        let lock = match &location {
            Location::Persistent(root) => Some(lock_root(root)?),
            Location::Temp | Location::TempInMemory => None,
        };
        let starts = (0..n).map(|i| {
            let mut options = options(&location, i);
            options.extra_args.extend_from_slice(extra_args);
            LocalMariaDb::start(options)
        });
        let mut servers = Vec::with_capacity(n);
        let mut failures = Vec::new();
        for result in futures_util::future::join_all(starts).await {
            match result {
                Ok(server) => servers.push(server),
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        let mut cluster = Self {
            shards: shard_settings(&servers),
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
        Ok(cluster)
    }

    /// Each shard's settings: name, `mysql://root@127.0.0.1:PORT/chatshard`
    /// and its even share of the buckets.
    pub fn shard_settings(&self) -> &[ShardSettings] {
        &self.shards
    }

    /// Every setting at its default, listening on `127.0.0.1:0`, with these
    /// shards.
    pub fn settings(&self) -> Result<Settings> {
        let mut settings = Settings::from_toml_unvalidated("listen = \"127.0.0.1:0\"", [])?;
        settings.shards = self.shards.clone();
        Ok(settings)
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

    /// Shuts every shard down cleanly, logging failures (dropping the cluster
    /// does the same for persistent shards, and kills temporary ones).
    pub async fn stop(&mut self) {
        for server in &mut self.servers {
            if let Err(e) = server.stop().await {
                tracing::warn!(data_dir = %server.data_dir().display(), error = %format!("{e:#}"), "local shard did not stop cleanly");
            }
        }
    }
}

fn options(location: &Location, i: usize) -> LocalMariaDbOptions {
    match location {
        Location::Persistent(root) => {
            LocalMariaDbOptions::dev(root.join("dev").join(format!("shard-{i}")), 0)
        }
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

fn shard_settings(servers: &[LocalMariaDb]) -> Vec<ShardSettings> {
    servers
        .iter()
        .zip(BucketRange::even_split(servers.len()))
        .enumerate()
        .map(|(i, (server, range))| ShardSettings {
            name: format!("shard-{i}"),
            url: server.url(DEFAULT_DATABASE),
            buckets: vec![range.to_string()],
            id_block: None,
            replicas: vec![],
        })
        .collect()
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
