//! Local, throw-away or dev-mode MariaDB servers (`mariadbd` child processes), and in
//! [`redis`] local `redis-server` processes (single servers and clusters) kept the same way.
//!
//! Started through [`cluster::LocalCluster`] by `chatshard serve --dev` (persistent data dirs under `.chatshard/`, clean
//! SIGTERM shutdown) and by integration / fault-injection tests (temp data dirs that are
//! SIGKILLed and removed when the test process exits, even on panic or SIGKILL).
//!
//! Invariants:
//! * every server has its **own data dir, tmpdir (`DIR.tmpdir`) and 127.0.0.1 port**, and is started with
//!   `--no-defaults`, so `/etc/mysql` configs and the system server (port 3306, its socket,
//!   its data dir) never interfere; after connecting we check `@@datadir` to be sure the
//!   port is served by *our* server;
//! * a data dir is either absent, empty or fully initialised: `mariadb-install-db` runs into
//!   `DIR.tmp-init` which is renamed to `DIR` only on success;
//! * a server never outlives its owner: a tiny `sh` watchdog holds the read end of a pipe
//!   whose write end only we hold; when our process dies for any reason the pipe closes and
//!   the watchdog applies [`OnExit`]. The watchdog is disarmed as soon as we reap the server
//!   ourselves, so it can never signal a reused pid;
//! * a member of a replicated shard ([`Replication`]) writes nothing of its own to its binary
//!   log (its database and accounts are made with `sql_log_bin=0`): with `gtid_strict_mode`
//!   such a transaction would stop replication. The replication SQL itself lives in
//!   [`crate::storage::replication`].
//!
//! What it must not do: touch the system server or its files, use `unsafe`/libc (signals
//! are sent with the `kill` command), or sleep for a fixed time as synchronisation (all
//! waits are bounded polls on an observable condition).
#![forbid(unsafe_code)]

pub mod cluster;
pub mod redis;
pub mod tls;

use std::ffi::OsString;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlDatabaseError};
use sqlx::{Connection as _, Row as _};
use tracing::{info, warn};

use crate::storage::replication::{self, GtidPositions, ReplicaStatus};

/// Database created (if missing) on every start (the literal is repeated in `wait_ready`
/// because `sqlx::query` wants a `&'static str` literal, not built SQL).
pub const DEFAULT_DATABASE: &str = "chatshard";
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Drop cannot report errors, so it waits less; the watchdog finishes the job if needed.
const DROP_STOP_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(25);
/// The account replicas log in to their source with (`'chatshard_repl'@'127.0.0.1'`),
/// made on every member of a replicated shard with the binary log off.
pub const REPLICATION_USER: &str = "chatshard_repl";
/// Its password: these servers listen on 127.0.0.1 only, and root has none.
pub const REPLICATION_PASSWORD: &str = "chatshard-repl-local";
/// `--rpl-semi-sync-master-timeout` of a replicated shard's members, in ms.
///
/// With semi-sync (wait point `AFTER_SYNC`) a commit on the primary returns
/// only once a replica has the transaction in its relay log, so a write the
/// client saw acknowledged survives the loss of the primary. A commit that
/// waits longer than this goes through anyway and the primary falls back to
/// asynchronous replication (`Rpl_semi_sync_master_status` OFF) until a
/// replica catches up, silently dropping that guarantee: 5 s is long enough
/// that a replica that is merely busy (catching up, or on a loaded test
/// machine) acknowledges in time, and short enough that a shard whose
/// replicas are all gone stalls its writes for 5 s once, not for good.
pub const SEMI_SYNC_TIMEOUT_MS: u64 = 5000;
/// How long a replication step (connecting, catching up, applying what was
/// received before a promotion) may take before it is reported as failed.
pub const REPLICATION_TIMEOUT: Duration = Duration::from_secs(60);
const INSTALL_HINT: &str =
    "install the mariadb-server package, e.g. `sudo apt-get install -y mariadb-server`";

/// What happens to the server when the [`LocalMariaDb`] is dropped or our process dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExit {
    /// SIGTERM (clean InnoDB shutdown), keep the data dir (dev mode).
    Shutdown,
    /// SIGKILL and `rm -rf` the data dir (tests).
    KillAndRemove,
}

#[derive(Debug, Clone)]
pub struct LocalMariaDbOptions {
    pub data_dir: PathBuf,
    /// 0 = pick a free 127.0.0.1 port (kept across [`LocalMariaDb::restart`]).
    pub port: u16,
    pub on_exit: OnExit,
    /// Appended to the `mariadbd` command line (not passed to `mariadb-install-db`).
    pub extra_args: Vec<String>,
    /// TLS of the server; `None`: plain TCP only.
    pub tls: Option<LocalTls>,
    /// Its part in a replicated shard; `None`: a lone server, without a
    /// binary log.
    pub replication: Option<Replication>,
}

/// The part a member plays in a replicated shard, which decides its
/// replication flags (see [`Replication`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Writable, and semi-sync source: `--rpl-semi-sync-master-enabled=ON`.
    Primary,
    /// `--read-only=ON`; replicates once pointed at its source
    /// ([`LocalMariaDb::replicate_from`]).
    Replica,
}

/// A member of a replicated shard (MariaDB GTID replication, semi-sync).
///
/// Every member gets `--server-id`, a binary log (`--log-bin`,
/// `--binlog-format=ROW`, `--log-slave-updates`, so that any replica can be
/// promoted and the others follow it), `--gtid-strict-mode=ON`,
/// `--skip-slave-start` (a restarted replica reconnects only once it is
/// pointed at its source again: a dev cluster's ports change between runs),
/// semi-sync as a replica, and semi-sync's wait point (`AFTER_SYNC`) and
/// timeout ([`SEMI_SYNC_TIMEOUT_MS`]) for when it is a source. Then per
/// [`Role`]: a primary is a semi-sync source and writable, a replica is
/// read-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replication {
    /// `--server-id`: unique among the members; kept across restarts
    /// (GTIDs carry it).
    pub server_id: u32,
    pub role: Role,
}

/// A server's TLS: `--ssl-ca`, `--ssl-cert`, `--ssl-key` and, when
/// `require_secure_transport` is set, `--require-secure-transport=ON` (TCP
/// clients without TLS are refused; the Unix socket still counts as
/// secure). [`tls::TestCertificates`] makes throw-away ones.
#[derive(Debug, Clone)]
pub struct LocalTls {
    /// The CA that signed `cert` (clients verify against it).
    pub ca: PathBuf,
    /// The server's certificate (PEM).
    pub cert: PathBuf,
    /// The server's private key (PEM).
    pub key: PathBuf,
    pub require_secure_transport: bool,
}

impl LocalMariaDbOptions {
    /// Persistent dev-mode server in `data_dir`, on `port` (0 = any).
    pub fn dev(data_dir: impl Into<PathBuf>, port: u16) -> Self {
        Self {
            data_dir: data_dir.into(),
            port,
            on_exit: OnExit::Shutdown,
            extra_args: vec![],
            tls: None,
            replication: None,
        }
    }

    /// Test server in a fresh `$TMPDIR/chatshard-test-<pid>-<n>`, removed on exit.
    pub fn temp() -> Self {
        Self::temp_in(&std::env::temp_dir())
    }

    /// Test server in a fresh `<base>/chatshard-test-<pid>-<n>`, removed on exit.
    pub fn temp_in(base: &Path) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("chatshard-test-{}-{n}", std::process::id()));
        Self {
            data_dir: dir,
            port: 0,
            on_exit: OnExit::KillAndRemove,
            extra_args: vec![],
            tls: None,
            replication: None,
        }
    }
}

/// Paths of the MariaDB programs we run.
#[derive(Debug, Clone)]
pub struct MariaDbBinaries {
    pub mariadbd: PathBuf,
    pub install_db: PathBuf,
}

/// A running (or stopped/killed, restartable) local `mariadbd`.
#[derive(Debug)]
pub struct LocalMariaDb {
    data_dir: PathBuf,
    socket: PathBuf,
    port: u16,
    on_exit: OnExit,
    extra_args: Vec<String>,
    tls: Option<LocalTls>,
    replication: Option<Replication>,
    /// The port of the source it replicates from, once pointed at one: a
    /// restart points it there again.
    source_port: Option<u16>,
    mariadbd: PathBuf,
    process: ServerProcess,
    /// Set once `data_dir` is known to be a MariaDB data dir: only then may Drop remove it
    /// (never a pre-existing non-empty dir that init refused to touch).
    owns_dir: bool,
}

impl LocalMariaDb {
    /// Initialises `data_dir` if needed, starts `mariadbd` and waits until root can log in
    /// over TCP, then ensures the `chatshard` database exists.
    pub async fn start(opts: LocalMariaDbOptions) -> Result<Self> {
        let bins = tokio::task::spawn_blocking(ensure_binaries).await??;
        let data_dir = std::path::absolute(&opts.data_dir)?;
        let mut db = Self {
            socket: socket_path(&data_dir),
            data_dir,
            port: opts.port,
            on_exit: opts.on_exit,
            extra_args: opts.extra_args,
            tls: opts.tls,
            replication: opts.replication,
            source_port: None,
            mariadbd: bins.mariadbd,
            process: ServerProcess::new("mariadbd"),
            owns_dir: false,
        };
        // From here on, an error drops `db`, which cleans up according to `on_exit`.
        db.init_data_dir(&bins.install_db).await?;
        db.start_on(opts.port, free_port).await
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Pid of the current (or last) `mariadbd` process.
    pub fn pid(&self) -> u32 {
        self.process.pid
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Unix socket of the server (inside the data dir unless that path is too long).
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// `mysql://root@127.0.0.1:{port}/{database}` (root has no password);
    /// on a server with TLS, `?ssl-mode=VERIFY_CA&ssl-ca={ca}`: encrypted and
    /// checked against the server's CA, whatever name its certificate holds.
    pub fn url(&self, database: &str) -> String {
        let url = self.plain_url(database);
        match &self.tls {
            Some(tls) => format!("{url}?ssl-mode=VERIFY_CA&ssl-ca={}", tls.ca.display()),
            None => url,
        }
    }

    /// `mysql://root@127.0.0.1:{port}/{database}`, without TLS options: a
    /// caller adds its own (`?ssl-mode=...`).
    pub fn plain_url(&self, database: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{database}", self.port)
    }

    /// The server's TLS, if it has any.
    pub fn tls(&self) -> Option<&LocalTls> {
        self.tls.as_ref()
    }

    /// Convenience: a fresh TCP connection as root to `database`.
    pub async fn connect(&self, database: &str) -> Result<MySqlConnection> {
        Ok(MySqlConnection::connect(&self.url(database)).await?)
    }

    /// SIGTERM (resuming it if suspended) and wait for a clean exit; keeps the data.
    pub async fn stop(&mut self) -> Result<()> {
        self.process.stop(STOP_TIMEOUT, self.port).await
    }

    /// SIGKILL (works on suspended processes too) and reap it; the data dir stays.
    pub fn kill(&mut self) -> Result<()> {
        self.process.kill()
    }

    /// SIGSTOP: the server keeps its sockets open but answers nothing.
    pub fn suspend(&self) -> Result<()> {
        self.process.suspend()
    }

    /// SIGCONT after [`Self::suspend`].
    pub fn resume(&self) -> Result<()> {
        self.process.resume()
    }

    /// Start again on the same port and data dir after [`Self::stop`], [`Self::kill`] or a
    /// crash; waits until it accepts connections (InnoDB crash recovery included). A
    /// replica that was pointed at a source ([`Self::replicate_from`]) is pointed at it
    /// again and replicates (it starts with `--skip-slave-start`).
    pub async fn restart(&mut self) -> Result<()> {
        self.respawn().await?;
        if let (
            Some(Replication {
                role: Role::Replica,
                ..
            }),
            Some(port),
        ) = (self.replication, self.source_port)
        {
            self.point_at(port).await?;
        }
        Ok(())
    }

    /// Its part in a replicated shard (`None`: a lone server without a binary log).
    pub fn replication(&self) -> Option<Replication> {
        self.replication
    }

    /// The port of the source it replicates from (`None`: none, or promoted).
    pub fn source_port(&self) -> Option<u16> {
        self.source_port
    }

    /// Whether its `mariadbd` runs (not stopped, killed nor crashed).
    pub fn is_running(&mut self) -> bool {
        !matches!(self.process.poll_exit(), Ok(true))
    }

    /// `SHOW SLAVE STATUS` (`None`: it replicates from nothing).
    pub async fn replica_status(&self) -> Result<Option<ReplicaStatus>> {
        let mut conn = self.connect("").await?;
        Ok(replication::replica_status(&mut conn).await?)
    }

    /// Its GTID positions (binlog, slave, current).
    pub async fn gtid_positions(&self) -> Result<GtidPositions> {
        let mut conn = self.connect("").await?;
        Ok(replication::gtid_positions(&mut conn).await?)
    }

    /// `@@read_only`.
    pub async fn is_read_only(&self) -> Result<bool> {
        let mut conn = self.connect("").await?;
        Ok(replication::is_read_only(&mut conn).await?)
    }

    /// Makes it read-only (`true`) or writable (`false`), as an orchestrator fences an
    /// old primary. Root, which the local URLs log in as, writes either way
    /// (`READ_ONLY ADMIN`).
    pub async fn set_read_only(&self, read_only: bool) -> Result<()> {
        let mut conn = self.connect("").await?;
        Ok(replication::set_read_only(&mut conn, read_only).await?)
    }

    /// Stops applying what it receives (`STOP SLAVE SQL_THREAD`): it falls behind.
    pub async fn stop_sql_thread(&self) -> Result<()> {
        let mut conn = self.connect("").await?;
        Ok(replication::stop_sql_thread(&mut conn).await?)
    }

    /// Applies again what it received (`START SLAVE SQL_THREAD`): it catches up.
    pub async fn start_sql_thread(&self) -> Result<()> {
        let mut conn = self.connect("").await?;
        Ok(replication::start_sql_thread(&mut conn).await?)
    }

    /// Makes it a replica of the local server on `source_port` (which must have a
    /// binary log and [`REPLICATION_USER`]): read-only, no longer a semi-sync source,
    /// replicating from what it has applied (GTID `slave_pos`). Returns once pointed;
    /// [`Self::wait_replicating`] waits until it runs. Also repoints a replica after a
    /// failover, or demotes an old primary (whose GTIDs the new source must hold).
    pub async fn replicate_from(&mut self, source_port: u16) -> Result<()> {
        let mut conn = self.connect("").await?;
        replication::set_read_only(&mut conn, true).await?;
        if self.replication.is_some() {
            replication::set_semi_sync_master(&mut conn, false).await?;
        }
        drop(conn);
        self.point_at(source_port).await?;
        if let Some(r) = &mut self.replication {
            r.role = Role::Replica;
        }
        self.source_port = Some(source_port);
        Ok(())
    }

    /// Promotes this replica to a writable primary, as an orchestrator would: stops
    /// receiving (`STOP SLAVE IO_THREAD`), applies to the end what it received
    /// (starting the SQL thread if it was stopped; at most `timeout`), then `STOP
    /// SLAVE; RESET SLAVE ALL; SET GLOBAL read_only=OFF` and makes it a semi-sync
    /// source. It does not touch the old primary: fence it first (read-only, or kill
    /// it) when it still runs.
    pub async fn promote(&mut self, timeout: Duration) -> Result<()> {
        let mut conn = self.connect("").await?;
        replication::stop_io_thread(&mut conn).await?;
        replication::start_sql_thread(&mut conn).await?;
        let deadline = Instant::now() + timeout;
        loop {
            let Some(status) = replication::replica_status(&mut conn).await? else {
                bail!("port {}: not a replica, nothing to promote", self.port);
            };
            if status.applied_all_received() {
                break;
            }
            if status.sql_running != "Yes" && status.last_sql_errno != 0 {
                bail!(
                    "port {}: the SQL thread stopped before applying what it received: {} {}",
                    self.port,
                    status.last_sql_errno,
                    status.last_sql_error
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "port {}: has not applied what it received within {timeout:?} ({status:?})",
                    self.port
                );
            }
            tokio::time::sleep(POLL).await;
        }
        replication::promote(&mut conn).await?;
        if self.replication.is_some() {
            replication::set_semi_sync_master(&mut conn, true).await?;
        }
        if let Some(r) = &mut self.replication {
            r.role = Role::Primary;
        }
        self.source_port = None;
        info!(port = self.port, "promoted to primary");
        Ok(())
    }

    /// Waits (at most `timeout`) until both replication threads run; fails early with
    /// the replica's last error when a thread stopped on one.
    pub async fn wait_replicating(&self, timeout: Duration) -> Result<ReplicaStatus> {
        let mut conn = self.connect("").await?;
        let deadline = Instant::now() + timeout;
        loop {
            let status = replication::replica_status(&mut conn).await?;
            match status {
                Some(s) if s.is_replicating() => return Ok(s),
                Some(s) if s.io_running == "No" && s.last_io_errno != 0 => bail!(
                    "port {}: replication from port {} failed: I/O error {}: {}",
                    self.port,
                    s.source_port,
                    s.last_io_errno,
                    s.last_io_error
                ),
                Some(s) if s.sql_running == "No" && s.last_sql_errno != 0 => bail!(
                    "port {}: replication from port {} failed: SQL error {}: {}",
                    self.port,
                    s.source_port,
                    s.last_sql_errno,
                    s.last_sql_error
                ),
                s if Instant::now() > deadline => bail!(
                    "port {}: not replicating after {timeout:?}: {s:?}",
                    self.port
                ),
                _ => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// Waits (at most `timeout`) until it has applied the GTID position `pos` (e.g. its
    /// source's `@@gtid_binlog_pos`); fails early when its SQL thread stopped on an
    /// error.
    pub async fn wait_applied(&self, pos: &str, timeout: Duration) -> Result<()> {
        let mut conn = self.connect("").await?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Short waits, so that a replication error is seen between them.
            let step = left.min(Duration::from_millis(500));
            if replication::wait_for_gtid(&mut conn, pos, step).await? {
                return Ok(());
            }
            let status = replication::replica_status(&mut conn).await?;
            if let Some(s) = &status
                && s.last_sql_errno != 0
            {
                bail!(
                    "port {}: stopped applying before {pos}: SQL error {}: {}",
                    self.port,
                    s.last_sql_errno,
                    s.last_sql_error
                );
            }
            if left.is_zero() {
                let have = replication::gtid_positions(&mut conn).await?;
                bail!(
                    "port {}: has not applied {pos} after {timeout:?} (it has {}; {status:?})",
                    self.port,
                    have.slave
                );
            }
        }
    }

    /// Creates [`REPLICATION_USER`] (binary log off, so on every member).
    async fn create_replication_user(&self) -> Result<()> {
        let mut conn = self.connect("").await?;
        replication::create_replication_user(
            &mut conn,
            REPLICATION_USER,
            "127.0.0.1",
            REPLICATION_PASSWORD,
        )
        .await?;
        Ok(())
    }

    /// `CHANGE MASTER` to the local server on `port` and `START SLAVE`.
    async fn point_at(&self, port: u16) -> Result<()> {
        let mut conn = self.connect("").await?;
        replication::point_at(
            &mut conn,
            "127.0.0.1",
            port,
            REPLICATION_USER,
            REPLICATION_PASSWORD,
        )
        .await
        .with_context(|| format!("pointing port {} at port {port}", self.port))
    }

    async fn init_data_dir(&mut self, install_db: &Path) -> Result<()> {
        let dir = &self.data_dir;
        if dir.join("mysql").is_dir() {
            self.owns_dir = true;
            return Ok(());
        }
        if dir.exists() {
            // Only an empty dir may be initialised; anything else is someone's data.
            fs::remove_dir(dir).with_context(|| {
                format!(
                    "{} exists but is neither empty nor a MariaDB data dir",
                    dir.display()
                )
            })?;
        }
        let tmp = tmp_init_path(dir);
        let _ = fs::remove_dir_all(&tmp); // leftover of an interrupted init
        if let Some(parent) = dir.parent() {
            fs::create_dir_all(parent)?;
        }
        let scratch = scratch_path(dir);
        fs::create_dir_all(&scratch)?;
        let mut cmd = tokio::process::Command::new(install_db);
        cmd.arg("--no-defaults")
            .arg(flag("--datadir=", &tmp))
            .arg(flag("--tmpdir=", &scratch))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            // Same InnoDB sizes as the server, so the first start need not resize the redo log.
            .args([
                "--innodb-log-file-size=48M",
                "--innodb-buffer-pool-size=64M",
            ])
            .args(root_user_arg())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        info!(dir = %dir.display(), "initialising MariaDB data dir");
        let out = cmd
            .output()
            .await
            .with_context(|| format!("running {}", install_db.display()))?;
        if !out.status.success() {
            let _ = fs::remove_dir_all(&tmp);
            bail!(
                "{} failed ({}):\n{}{}",
                install_db.display(),
                out.status,
                tail(&String::from_utf8_lossy(&out.stdout), 20),
                tail(&String::from_utf8_lossy(&out.stderr), 20)
            );
        }
        fs::rename(&tmp, dir)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
        self.owns_dir = true;
        Ok(())
    }

    fn server_args(&self) -> Vec<OsString> {
        let d = &self.data_dir;
        let mut args: Vec<OsString> = vec![
            "--no-defaults".into(), // must be first
            flag("--datadir=", d),
            format!("--port={}", self.port).into(),
            "--bind-address=127.0.0.1".into(),
            flag("--socket=", &self.socket),
            flag("--tmpdir=", &scratch_path(d)),
            flag("--pid-file=", &d.join("mariadbd.pid")),
            flag("--log-error=", &d.join("error.log")),
        ];
        args.extend(
            [
                "--innodb-autoinc-lock-mode=2",
                "--innodb-flush-log-at-trx-commit=1",
                "--skip-name-resolve",
                "--max-connections=500",
                "--innodb-buffer-pool-size=64M",
                "--innodb-log-file-size=48M",
                "--character-set-server=utf8mb4",
                "--collation-server=utf8mb4_bin",
                "--default-time-zone=+00:00",
            ]
            .map(OsString::from),
        );
        args.extend(root_user_arg().map(OsString::from));
        args.extend(self.replication_args());
        if let Some(tls) = &self.tls {
            args.extend([
                flag("--ssl-ca=", &tls.ca),
                flag("--ssl-cert=", &tls.cert),
                flag("--ssl-key=", &tls.key),
            ]);
            if tls.require_secure_transport {
                args.push("--require-secure-transport=ON".into());
            }
        }
        args.extend(self.extra_args.iter().map(OsString::from));
        args
    }

    /// The binary log and replication flags (see [`Replication`]); `--skip-log-bin`
    /// for a lone server.
    fn replication_args(&self) -> Vec<OsString> {
        let Some(replication) = self.replication else {
            return vec!["--skip-log-bin".into()];
        };
        let mut args: Vec<String> = [
            "--log-bin=mariadb-bin",
            "--relay-log=relay-bin",
            "--binlog-format=ROW",
            "--gtid-strict-mode=ON",
            "--log-slave-updates",
            "--skip-slave-start",
            "--rpl-semi-sync-master-wait-point=AFTER_SYNC",
            "--rpl-semi-sync-slave-enabled=ON",
            "--report-host=127.0.0.1",
        ]
        .map(String::from)
        .into();
        args.push(format!("--server-id={}", replication.server_id));
        args.push(format!(
            "--rpl-semi-sync-master-timeout={SEMI_SYNC_TIMEOUT_MS}"
        ));
        args.push(format!("--report-port={}", self.port));
        args.extend(
            match replication.role {
                Role::Primary => ["--rpl-semi-sync-master-enabled=ON", "--read-only=OFF"],
                Role::Replica => ["--rpl-semi-sync-master-enabled=OFF", "--read-only=ON"],
            }
            .map(String::from),
        );
        args.into_iter().map(OsString::from).collect()
    }

    /// TCP connect (cheap) then a real login + ping, then check it is *our* server.
    async fn probe(&self, want_dir: &Path) -> Result<()> {
        let step = Duration::from_secs(5);
        tokio::time::timeout(
            step,
            tokio::net::TcpStream::connect(("127.0.0.1", self.port)),
        )
        .await??;
        let mut conn = tokio::time::timeout(step, self.connect("")).await??;
        tokio::time::timeout(step, conn.ping()).await??;
        let row = sqlx::query("SELECT @@datadir").fetch_one(&mut conn).await?;
        let dir: String = row.try_get(0)?;
        if Path::new(dir.trim_end_matches('/')) != want_dir {
            bail!(
                "port {} is served by another MariaDB (datadir {dir})",
                self.port
            );
        }
        Ok(())
    }

    async fn allow_root_over_tcp(&self) -> Result<()> {
        let opts = MySqlConnectOptions::new()
            .socket(&self.socket)
            .username("root");
        let mut conn = MySqlConnection::connect_with(&opts).await?;
        // Each member makes its own accounts: none in the binary log (see below).
        replication::set_session_binlog(&mut conn, false).await?;
        for sql in [
            "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'",
            "ALTER USER 'root'@'127.0.0.1' IDENTIFIED BY ''",
            "GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION",
        ] {
            sqlx::query(sql).execute(&mut conn).await?;
        }
        warn!(
            port = self.port,
            "re-created root@127.0.0.1 with an empty password"
        );
        Ok(())
    }
}

impl LocalServer for LocalMariaDb {
    fn process(&mut self) -> &mut ServerProcess {
        &mut self.process
    }

    fn set_port(&mut self, port: u16) {
        self.port = port;
    }

    /// Spawns mariadbd plus its watchdog; returns the error-log offset of this run.
    fn spawn_server(&mut self) -> Result<u64> {
        ensure_port_free(self.port)?;
        fs::create_dir_all(scratch_path(&self.data_dir))?;
        let mut cmd = Command::new(&self.mariadbd);
        cmd.args(self.server_args());
        // Early failures (bad flags) go to the log before --log-error takes over: same file.
        let log = self.data_dir.join("error.log");
        let offset = self.process.spawn(&mut cmd, &log)?;
        info!(pid = self.process.pid, port = self.port, dir = %self.data_dir.display(), "mariadbd spawned");
        self.process.arm_watchdog(
            self.on_exit,
            &[&self.data_dir, &self.socket, &scratch_path(&self.data_dir)],
        )?;
        Ok(offset)
    }

    async fn wait_ready(&mut self, log_offset: u64) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let want_dir = fs::canonicalize(&self.data_dir)?;
        let mut last_err = String::from("not reachable yet");
        loop {
            if self.process.poll_exit()? {
                bail!(
                    "mariadbd (pid {}, port {}) exited during startup; error.log:\n{}",
                    self.process.pid,
                    self.port,
                    tail(&self.log_since(log_offset), 30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "mariadbd on port {} not ready after {START_TIMEOUT:?}: {last_err}",
                    self.port
                );
            }
            match self.probe(&want_dir).await {
                Ok(()) => break,
                Err(e) if is_access_denied(&e) => {
                    // install-db normally creates root@127.0.0.1 without password; if not,
                    // fix it through the unix socket (root@localhost) and try again.
                    last_err = format!("{e:#}");
                    if let Err(fix) = self.allow_root_over_tcp().await {
                        last_err = format!("{last_err}; fixing via socket: {fix:#}");
                    }
                }
                Err(e) => last_err = format!("{e:#}"),
            }
            tokio::time::sleep(POLL).await;
        }
        let mut conn = self.connect("").await?;
        // Every member of a replicated shard makes the database for itself, unlogged:
        // with gtid_strict_mode, a transaction of a replica's own in its binary log
        // would stop replication (and it would reach the others after a promotion).
        replication::set_session_binlog(&mut conn, false).await?;
        sqlx::query("CREATE DATABASE IF NOT EXISTS `chatshard`")
            .execute(&mut conn)
            .await?;
        info!(pid = self.process.pid, port = self.port, "mariadbd ready");
        Ok(())
    }

    fn log_since(&self, offset: u64) -> String {
        let log = fs::read(self.data_dir.join("error.log")).unwrap_or_default();
        String::from_utf8_lossy(log.get(offset as usize..).unwrap_or_default()).into_owned()
    }
}

impl Drop for LocalMariaDb {
    fn drop(&mut self) {
        self.process.finish(self.on_exit, DROP_STOP_TIMEOUT);
        if self.on_exit == OnExit::KillAndRemove {
            if self.owns_dir {
                let _ = fs::remove_dir_all(&self.data_dir);
            }
            let _ = fs::remove_dir_all(tmp_init_path(&self.data_dir));
            let _ = fs::remove_dir_all(scratch_path(&self.data_dir));
            let _ = fs::remove_file(&self.socket);
        }
    }
}

/// What [`LocalMariaDb`] and [`redis::LocalRedis`] provide so that starting (with its
/// port-race retries) and restarting are written once.
trait LocalServer: Sized {
    fn process(&mut self) -> &mut ServerProcess;

    /// Sets the port the next [`Self::spawn_server`] uses.
    fn set_port(&mut self, port: u16);

    /// Spawns the server plus its watchdog; returns the log offset of this run.
    fn spawn_server(&mut self) -> Result<u64>;

    /// Waits (bounded) until the server just spawned answers, and is ours.
    async fn wait_ready(&mut self, log_offset: u64) -> Result<()>;

    /// The server's log from `offset` on.
    fn log_since(&self, offset: u64) -> String;

    /// Spawns the server on `port` (0 = one from `pick`) and waits until it is ready.
    /// A picked port can be grabbed by someone else (or by a server starting beside
    /// ours) before the server binds it, or before the check just ahead of the
    /// spawn: then it retries on another, 3 attempts in all.
    /// An error drops `self`, which cleans up according to its [`OnExit`].
    async fn start_on(mut self, port: u16, pick: impl Fn() -> Result<u16>) -> Result<Self> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let this_port = if port == 0 { pick()? } else { port };
            self.set_port(this_port);
            let log_offset = match self.spawn_server() {
                Ok(offset) => offset,
                Err(e) if port == 0 && attempt < 3 && e.downcast_ref::<PortTaken>().is_some() => {
                    warn!(port = this_port, error = %e, "a picked port was taken, retrying");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let res = self.wait_ready(log_offset).await;
            let port_race = res.is_err()
                && port == 0
                && attempt < 3
                && self.process().child.is_none()
                && self
                    .log_since(log_offset)
                    .contains("Address already in use");
            if !port_race {
                return res.map(|()| self);
            }
            warn!(
                port = this_port,
                "port taken before {} bound it, retrying",
                self.process().program
            );
        }
    }

    /// Starts the server again (same port and dir) once its last process has exited.
    async fn respawn(&mut self) -> Result<()> {
        let process = self.process();
        if !process.poll_exit()? {
            bail!(
                "{} (pid {}) is still running; stop() or kill() it first",
                process.program,
                process.pid
            );
        }
        let log_offset = self.spawn_server()?;
        self.wait_ready(log_offset).await
    }
}

/// One server process (`mariadbd` or `redis-server`) and its watchdog, kept as the
/// module docs say: the watchdog is armed right after the spawn and disarmed as soon as
/// we reap the server. Dropping it while the server runs triggers the watchdog.
#[derive(Debug)]
struct ServerProcess {
    /// Names the program in logs and errors.
    program: &'static str,
    /// `None` once the process has been reaped (after stop/kill or a crash).
    child: Option<Child>,
    /// Holds the write end of the watchdog's stdin; armed iff `child` is `Some`.
    watchdog: Option<Child>,
    /// Pid of the current (or last) process.
    pid: u32,
}

impl ServerProcess {
    fn new(program: &'static str) -> Self {
        Self {
            program,
            child: None,
            watchdog: None,
            pid: 0,
        }
    }

    /// Spawns `cmd` with stdin closed and stdout and stderr appended to `log`; returns
    /// the length `log` had before, where the output of this run starts. Call
    /// [`Self::arm_watchdog`] next.
    fn spawn(&mut self, cmd: &mut Command, log: &Path) -> Result<u64> {
        let offset = fs::metadata(log).map(|m| m.len()).unwrap_or(0);
        let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            // Own process group: a terminal Ctrl-C reaches only us; we decide how it stops.
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawning {}", Path::new(cmd.get_program()).display()))?;
        self.pid = child.id();
        self.child = Some(child);
        Ok(offset)
    }

    /// Spawns the watchdog of the process just spawned (see [`spawn_watchdog`]).
    fn arm_watchdog(&mut self, on_exit: OnExit, remove: &[&Path]) -> Result<()> {
        self.watchdog = Some(spawn_watchdog(self.program, self.pid, on_exit, remove)?);
        Ok(())
    }

    /// SIGTERM (resuming it if suspended) and wait at most `timeout` for it to exit
    /// (`port` is only logged).
    async fn stop(&mut self, timeout: Duration, port: u16) -> Result<()> {
        if self.poll_exit()? {
            return Ok(());
        }
        signal(self.pid, "TERM")?;
        signal(self.pid, "CONT")?; // a SIGSTOPped server would never see the SIGTERM
        let deadline = Instant::now() + timeout;
        while !self.poll_exit()? {
            if Instant::now() > deadline {
                bail!(
                    "{} (pid {}) did not exit within {timeout:?} of SIGTERM",
                    self.program,
                    self.pid
                );
            }
            tokio::time::sleep(POLL).await;
        }
        info!(pid = self.pid, port, "{} stopped", self.program);
        Ok(())
    }

    /// SIGKILL (works on suspended processes too) and reap it.
    fn kill(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if signal(self.pid, "KILL").is_err() {
            child.kill()?; // fallback so that the wait below cannot hang
        }
        let waited = child.wait();
        self.disarm_watchdog();
        waited
            .map(drop)
            .with_context(|| format!("waiting for the killed {}", self.program))
    }

    /// SIGSTOP: the server keeps its sockets open but answers nothing.
    fn suspend(&self) -> Result<()> {
        self.running()?;
        signal(self.pid, "STOP")
    }

    /// SIGCONT after [`Self::suspend`].
    fn resume(&self) -> Result<()> {
        self.running()?;
        signal(self.pid, "CONT")
    }

    fn running(&self) -> Result<()> {
        match self.child {
            Some(_) => Ok(()),
            None => bail!("{} is not running", self.program),
        }
    }

    /// Reaps the server if it has exited (then disarms the watchdog): `true` = not running.
    fn poll_exit(&mut self) -> Result<bool> {
        let Some(child) = self.child.as_mut() else {
            return Ok(true);
        };
        let Some(status) = child.try_wait()? else {
            return Ok(false);
        };
        info!(pid = self.pid, %status, "{} exited", self.program);
        self.child = None;
        self.disarm_watchdog();
        Ok(true)
    }

    /// For the owner's Drop, which cannot report errors: applies `on_exit` now, as the
    /// watchdog would, but waits at most `timeout` for a clean shutdown.
    fn finish(&mut self, on_exit: OnExit, timeout: Duration) {
        match on_exit {
            OnExit::KillAndRemove => {
                if let Err(e) = self.kill() {
                    warn!(pid = self.pid, "killing {}: {e:#}", self.program);
                }
            }
            OnExit::Shutdown => self.shutdown_within(timeout),
        }
    }

    /// SIGTERM (and SIGCONT) and wait at most `timeout` for the exit; if it has not
    /// exited by then, the watchdog finishes the job once we are gone.
    fn shutdown_within(&mut self, timeout: Duration) {
        if matches!(self.poll_exit(), Ok(true)) {
            return;
        }
        let _ = signal(self.pid, "TERM");
        let _ = signal(self.pid, "CONT");
        let deadline = Instant::now() + timeout;
        while !matches!(self.poll_exit(), Ok(true) | Err(_)) && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        if self.child.is_some() {
            // Still shutting down: dropping the watchdog closes its pipe, and it
            // keeps waiting for the server after we are gone.
            warn!(
                pid = self.pid,
                "{} still shutting down; leaving it to the watchdog", self.program
            );
        }
    }

    /// Kills the watchdog *before* its stdin closes (which would trigger it), then reaps
    /// it: called as soon as we have reaped its server, so it can never signal a reused pid.
    fn disarm_watchdog(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// Spawns the watchdog of server `pid` (called `name` in errors): it applies `on_exit` to
/// the server when our process is gone, and with [`OnExit::KillAndRemove`] then removes
/// the `remove` paths (`rm -rf`). `read` returns when the pipe closes, i.e. when our
/// process is gone (std pipes are close-on-exec, so no other child holds the write end).
fn spawn_watchdog(name: &str, pid: u32, on_exit: OnExit, remove: &[&Path]) -> Result<Child> {
    // A zombie counts as gone (its files are closed; PID 1 may reap it only seconds
    // later), and waits are bounded in case nobody reaps it at all.
    let gone = r#"gone() { i=0; while kill -0 "$1" 2>/dev/null && [ $i -lt $2 ] && ! grep -qs '^State:.*Z' /proc/$1/status; do sleep 0.05; i=$((i+1)); done; }"#;
    let action = match on_exit {
        OnExit::KillAndRemove => r#"kill -KILL "$1"; gone "$1" 100; shift; rm -rf "$@""#,
        OnExit::Shutdown => r#"kill -TERM "$1"; kill -CONT "$1"; gone "$1" 1200"#,
    };
    let script = format!("{gone}; read _; {action}");
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script, "sh", &pid.to_string()])
        .args(remove)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    cmd.spawn()
        .with_context(|| format!("spawning the {name} watchdog (sh)"))
}

/// Finds `mariadbd`; installs `mariadb-server` with apt-get if missing and we are root.
pub fn ensure_mariadbd() -> Result<PathBuf> {
    Ok(ensure_binaries()?.mariadbd)
}

/// Like [`ensure_mariadbd`], also locating `mariadb-install-db` (or `mysql_install_db`).
pub fn ensure_binaries() -> Result<MariaDbBinaries> {
    find_or_install(find_binaries, "mariadb-server")?
        .ok_or_else(|| anyhow!("mariadbd / mariadb-install-db not found: {INSTALL_HINT}"))
}

/// `find()`, or else, when we are root and have apt-get, `apt-get install -y package`
/// and `find()` again (`None`: still not found).
pub(crate) fn find_or_install<T>(find: impl Fn() -> Option<T>, package: &str) -> Result<Option<T>> {
    if let Some(found) = find() {
        return Ok(Some(found));
    }
    // Parallel tests must not run apt-get concurrently, not even for two packages
    // (MariaDB and Redis): dpkg takes one lock.
    static INSTALL: Mutex<()> = Mutex::new(());
    let _guard = INSTALL.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(found) = find() {
        return Ok(Some(found));
    }
    if is_root() && find_program(&["apt-get"]).is_some() {
        warn!("programs of {package} not found; installing {package} with apt-get");
        let run = |args: &[&str]| -> Result<()> {
            let status = Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()?;
            if !status.success() {
                bail!("`apt-get {}` failed ({status})", args.join(" "));
            }
            Ok(())
        };
        run(&["update"])?;
        run(&["install", "-y", package])?;
    }
    Ok(find())
}

fn find_binaries() -> Option<MariaDbBinaries> {
    Some(MariaDbBinaries {
        mariadbd: find_program(&["mariadbd"])?,
        install_db: find_program(&["mariadb-install-db", "mysql_install_db"])?,
    })
}

pub(crate) fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = [
        "/usr/sbin",
        "/usr/libexec",
        "/usr/local/mysql/bin",
        "/usr/local/mysql/scripts",
        "/usr/bin",
    ];
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .collect();
    names
        .iter()
        .flat_map(|n| dirs.iter().map(move |d| d.join(n)))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// mariadbd refuses to run as root without `--user=root`.
fn root_user_arg() -> Option<&'static str> {
    is_root().then_some("--user=root")
}

fn is_root() -> bool {
    // Effective uid is the 2nd field of "Uid:" in /proc/self/status; `id -u` as fallback.
    let from_proc = fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("Uid:"))?;
        line.split_whitespace().nth(2).map(|uid| uid == "0")
    });
    from_proc.unwrap_or_else(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
    })
}

fn signal(pid: u32, sig: &str) -> Result<()> {
    let out = Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .output()
        .context("running kill")?;
    if !out.status.success() {
        bail!(
            "kill -s {sig} {pid} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A port some other listener holds.
#[derive(Debug, thiserror::Error)]
#[error("127.0.0.1:{0} is already in use")]
struct PortTaken(u16);

/// Refuse to start next to another listener (e.g. the system server on 3306).
fn ensure_port_free(port: u16) -> Result<()> {
    TcpListener::bind(("127.0.0.1", port))
        .map(drop)
        .context(PortTaken(port))
}

/// Unix socket paths are limited to ~107 bytes: fall back to a short, unique /tmp path.
fn socket_path(data_dir: &Path) -> PathBuf {
    let p = data_dir.join("mysqld.sock");
    if p.as_os_str().len() <= 100 {
        return p;
    }
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    PathBuf::from(format!("/tmp/chatshard-{}-{n}.sock", std::process::id()))
}

/// The server's own `--tmpdir`, beside its data dir. Never a shared /tmp: a starting
/// mariadbd deletes every `#sql*` file in its tmpdir, including the temporary tables
/// of another server that is bootstrapping there at the same moment. Not inside the
/// data dir either, where every directory is taken for a database.
fn scratch_path(dir: &Path) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(".tmpdir");
    s.into()
}

fn tmp_init_path(dir: &Path) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(".tmp-init");
    s.into()
}

fn flag(name: &str, path: &Path) -> OsString {
    let mut s = OsString::from(name);
    s.push(path);
    s
}

/// 1045 = access denied (wrong password); 1130 = no account matches host 127.0.0.1.
fn is_access_denied(e: &anyhow::Error) -> bool {
    let Some(sqlx::Error::Database(d)) = e.downcast_ref::<sqlx::Error>() else {
        return false;
    };
    d.try_downcast_ref::<MySqlDatabaseError>()
        .is_some_and(|d| matches!(d.number(), 1045 | 1130))
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    let mut out = all[all.len().saturating_sub(lines)..].join("\n");
    out.push('\n');
    out
}
