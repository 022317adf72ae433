//! Local, throw-away or dev-mode Redis servers (`redis-server` child processes), single
//! or as a cluster ([`LocalRedisCluster`]), kept the way the parent module keeps `mariadbd`.
//!
//! Invariants (those of [`super`], adapted):
//! * every server has its **own dir and 127.0.0.1 port** (a cluster node also its bus port,
//!   port + 10000), and every setting is passed on the command line: no config file is
//!   read, so `/etc/redis` and the system server (port 6379) never interfere; the readiness
//!   probe checks that the `process_id` behind the port is *our* child;
//! * a dir is either absent, empty or one of ours from an earlier run (it holds
//!   `redis.log`); anything else is refused, so Drop can never remove someone's files;
//! * nothing is persisted (`--save ""`, `--appendonly no`): only the log and, for cluster
//!   nodes, `nodes.conf` live in the dir;
//! * a server never outlives its owner: the same `sh` watchdog as for `mariadbd` applies
//!   [`OnExit`] when our process dies, and is disarmed as soon as we reap the server;
//! * a TLS server ([`LocalRedisTls`]) is TLS-only (`--port 0 --tls-port P`, and
//!   `--tls-cluster yes` for a cluster node, whose bus is then TLS on P + 10000):
//!   our probes and `redis-cli` speak TLS to it, trusting its CA;
//! * all waits are bounded polls on an observable condition (a `PING` answered `+PONG`,
//!   `cluster_state:ok`), never fixed sleeps; signals are sent with the `kill` command.

use std::ffi::OsString;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite,
    AsyncWriteExt as _,
};
use tracing::{info, warn};

use super::cluster::Location;
use super::tls::CertifiedKey;
use super::{
    LocalServer, OnExit, POLL, ServerProcess, ensure_port_free, find_or_install, find_program,
    free_port, tail,
};

const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Drop cannot report errors, so it waits less; the watchdog finishes the job if needed.
const DROP_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound of one exchange with a server (connect, write, read the replies).
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound of `redis-cli --cluster create`, and of waiting for `cluster_state:ok`.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(60);
/// A cluster node listens for its peers on its port + 10000 (the Redis default).
const CLUSTER_BUS_OFFSET: u16 = 10000;
const LOG: &str = "redis.log";
const NODES_CONF: &str = "nodes.conf";
const INSTALL_HINT: &str =
    "install the redis-server package, e.g. `sudo apt-get install -y redis-server`";

#[derive(Debug, Clone)]
pub struct LocalRedisOptions {
    pub dir: PathBuf,
    /// 0 = pick a free 127.0.0.1 port (kept across [`LocalRedis::restart`]); for a
    /// cluster node, one whose bus port (port + 10000) is free too.
    pub port: u16,
    pub on_exit: OnExit,
    /// Appended to the `redis-server` command line (`--name value` pairs, as separate
    /// arguments); they win over the defaults.
    pub extra_args: Vec<String>,
    /// Start as a cluster node (`--cluster-enabled yes`, `DIR/nodes.conf`).
    pub cluster: bool,
    /// Serve TLS only, with these certificates.
    pub tls: Option<LocalRedisTls>,
}

/// The certificates of a TLS-only local server (PEM files, e.g. made by
/// [`super::tls::TestCertificates`]).
#[derive(Debug, Clone)]
pub struct LocalRedisTls {
    /// The server's certificate and key (valid for 127.0.0.1).
    pub server: CertifiedKey,
    /// The CA that signed it, and that client certificates must be signed by.
    pub ca: PathBuf,
    /// `--tls-auth-clients yes`: every client must present a certificate.
    pub auth_clients: bool,
    /// The certificate our own probes and `redis-cli` present (needed when
    /// `auth_clients`; a cluster's nodes also present it to each other).
    pub client: Option<CertifiedKey>,
}

impl LocalRedisTls {
    /// The connector of our probes: trusts `ca`, presents `client` if any.
    fn connector(&self) -> Result<tokio_rustls::TlsConnector> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = |path: &Path| -> Result<Vec<CertificateDer<'static>>> {
            CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow!("{}: {e}", path.display()))
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in certs(&self.ca)? {
            roots.add(cert)?;
        }
        // ring, as the rest of the tree (see `crate::http::tls`).
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let config = match &self.client {
            Some(client) => {
                let key = PrivateKeyDer::from_pem_file(&client.key)
                    .map_err(|e| anyhow!("{}: {e}", client.key.display()))?;
                builder.with_client_auth_cert(certs(&client.cert)?, key)?
            }
            None if self.auth_clients => {
                bail!("a local Redis with --tls-auth-clients yes needs a client certificate")
            }
            None => builder.with_no_client_auth(),
        };
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }

    /// `redis-cli` arguments to reach the server.
    fn cli_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--tls".into(), "--cacert".into(), (&self.ca).into()];
        if let Some(client) = &self.client {
            args.extend([
                "--cert".into(),
                (&client.cert).into(),
                "--key".into(),
                (&client.key).into(),
            ]);
        }
        args
    }
}

/// How to reach a local server: its port, over TLS or not.
#[derive(Clone)]
struct Dial {
    port: u16,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for Dial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dial")
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl LocalRedisOptions {
    /// Persistent dev-mode server in `dir`, on `port` (0 = any).
    pub fn dev(dir: impl Into<PathBuf>, port: u16) -> Self {
        Self {
            dir: dir.into(),
            port,
            on_exit: OnExit::Shutdown,
            extra_args: vec![],
            cluster: false,
            tls: None,
        }
    }

    /// Test server in a fresh `$TMPDIR/chatshard-redis-test-<pid>-<n>`, removed on exit.
    pub fn temp() -> Self {
        Self::temp_in(&std::env::temp_dir())
    }

    /// Test server in a fresh `<base>/chatshard-redis-test-<pid>-<n>`, removed on exit.
    pub fn temp_in(base: &Path) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("chatshard-redis-test-{}-{n}", std::process::id()));
        Self {
            dir,
            port: 0,
            on_exit: OnExit::KillAndRemove,
            extra_args: vec![],
            cluster: false,
            tls: None,
        }
    }
}

/// Paths of the Redis programs we run.
#[derive(Debug, Clone)]
pub struct RedisBinaries {
    pub redis_server: PathBuf,
    /// Needed to create clusters (`redis-cli --cluster create`).
    pub redis_cli: PathBuf,
}

/// Finds `redis-server`; installs `redis-server` with apt-get if missing and we are root.
pub fn ensure_redis_server() -> Result<PathBuf> {
    Ok(ensure_redis_binaries()?.redis_server)
}

/// Like [`ensure_redis_server`], also locating `redis-cli` (installed with it).
pub fn ensure_redis_binaries() -> Result<RedisBinaries> {
    find_or_install(find_redis_binaries, "redis-server")?
        .ok_or_else(|| anyhow!("redis-server / redis-cli not found: {INSTALL_HINT}"))
}

fn find_redis_binaries() -> Option<RedisBinaries> {
    Some(RedisBinaries {
        redis_server: find_program(&["redis-server"])?,
        redis_cli: find_program(&["redis-cli"])?,
    })
}

/// A running (or stopped/killed, restartable) local `redis-server`.
pub struct LocalRedis {
    dir: PathBuf,
    port: u16,
    on_exit: OnExit,
    extra_args: Vec<String>,
    cluster: bool,
    /// Boxed: most servers have none.
    tls: Option<Box<LocalRedisTls>>,
    /// The probes' TLS connector, made from `tls` at start.
    connector: Option<tokio_rustls::TlsConnector>,
    redis_server: PathBuf,
    process: ServerProcess,
    /// Set once `dir` is known to be ours (created, empty, or holding our `redis.log`):
    /// only then may Drop remove it.
    owns_dir: bool,
}

impl std::fmt::Debug for LocalRedis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRedis")
            .field("dir", &self.dir)
            .field("port", &self.port)
            .field("cluster", &self.cluster)
            .field("tls", &self.tls)
            .field("pid", &self.process.pid)
            .finish_non_exhaustive()
    }
}

impl LocalRedis {
    /// Prepares `dir`, starts `redis-server` and waits until it answers `PING`.
    pub async fn start(opts: LocalRedisOptions) -> Result<Self> {
        let redis_server = tokio::task::spawn_blocking(ensure_redis_server).await??;
        let dir = std::path::absolute(&opts.dir)?;
        let connector = opts
            .tls
            .as_ref()
            .map(LocalRedisTls::connector)
            .transpose()?;
        let mut redis = Self {
            dir,
            port: opts.port,
            on_exit: opts.on_exit,
            extra_args: opts.extra_args,
            cluster: opts.cluster,
            tls: opts.tls.map(Box::new),
            connector,
            redis_server,
            process: ServerProcess::new("redis-server"),
            owns_dir: false,
        };
        // From here on, an error drops `redis`, which cleans up according to `on_exit`.
        redis.prepare_dir()?;
        // A picked bus port can be taken too (start_on retries on another port then).
        let cluster = opts.cluster;
        redis.start_on(opts.port, move || pick_port(cluster)).await
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Pid of the current (or last) `redis-server` process.
    pub fn pid(&self) -> u32 {
        self.process.pid
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `redis://127.0.0.1:{port}/`, or `rediss://...` over TLS (no password).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/", self.port)
    }

    /// How to reach this server now.
    fn dial(&self) -> Dial {
        Dial {
            port: self.port,
            tls: self.connector.clone(),
        }
    }

    /// One `PING` over a fresh TCP (or TLS) connection, answered `+PONG` within 5 s.
    pub async fn ping(&self) -> Result<()> {
        match command(&self.dial(), &[&["PING"]]).await?.as_slice() {
            [Reply::Simple(pong)] if pong == "PONG" => Ok(()),
            other => bail!("PING on port {} answered {other:?}", self.port),
        }
    }

    /// SIGTERM (resuming it if suspended) and wait for it to exit; keeps the dir.
    pub async fn stop(&mut self) -> Result<()> {
        self.process.stop(STOP_TIMEOUT, self.port).await
    }

    /// SIGKILL (works on suspended processes too) and reap it; the dir stays.
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

    /// Start again on the same port and dir after [`Self::stop`], [`Self::kill`] or a
    /// crash (a cluster node keeps its `nodes.conf`, so it rejoins its cluster); waits
    /// until it answers `PING`.
    pub async fn restart(&mut self) -> Result<()> {
        self.respawn().await
    }

    /// `CLUSTER INFO` of this node (`cluster_state:ok`, ...).
    async fn cluster_info(&self) -> Result<String> {
        match command(&self.dial(), &[&["CLUSTER", "INFO"]])
            .await?
            .as_slice()
        {
            [Reply::Bulk(Some(info))] => Ok(String::from_utf8_lossy(info).into_owned()),
            other => bail!("CLUSTER INFO on port {} answered {other:?}", self.port),
        }
    }

    /// Creates `dir`, or accepts it if empty or ours from an earlier run.
    fn prepare_dir(&mut self) -> Result<()> {
        let dir = &self.dir;
        if dir.join(LOG).is_file() {
            self.owns_dir = true;
            return Ok(());
        }
        match fs::read_dir(dir) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    bail!(
                        "{} exists but is neither empty nor a local Redis dir (no {LOG})",
                        dir.display()
                    );
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        }
        self.owns_dir = true;
        Ok(())
    }

    fn server_args(&self) -> Vec<OsString> {
        let d = &self.dir;
        // Separate `--name value` arguments; the first must start with `--`, or
        // redis-server would take it for a config file.
        let mut args: Vec<OsString> = match self.tls.as_deref() {
            None => vec!["--port".into(), self.port.to_string().into()],
            Some(tls) => vec![
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                self.port.to_string().into(),
                "--tls-cert-file".into(),
                (&tls.server.cert).into(),
                "--tls-key-file".into(),
                (&tls.server.key).into(),
                "--tls-ca-cert-file".into(),
                (&tls.ca).into(),
                "--tls-auth-clients".into(),
                if tls.auth_clients { "yes" } else { "no" }.into(),
            ],
        };
        args.extend::<[OsString; 14]>([
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            d.into(),
            "--save".into(),
            "".into(), // no snapshots (an empty argument: redis 7 reads it as "")
            "--appendonly".into(),
            "no".into(),
            "--protected-mode".into(),
            "no".into(),
            "--daemonize".into(),
            "no".into(),
            "--logfile".into(),
            d.join(LOG).into(),
        ]);
        if self.cluster {
            args.extend(["--cluster-enabled".into(), "yes".into()]);
            if let Some(tls) = self.tls.as_deref() {
                // The bus is TLS too; nodes present the client certificate
                // to each other (the server's, by default, lacks clientAuth).
                args.extend(["--tls-cluster".into(), "yes".into()]);
                args.extend(["--tls-replication".into(), "yes".into()]);
                if let Some(client) = &tls.client {
                    args.extend(["--tls-client-cert-file".into(), (&client.cert).into()]);
                    args.extend(["--tls-client-key-file".into(), (&client.key).into()]);
                }
            }
            args.extend(["--cluster-config-file".into(), d.join(NODES_CONF).into()]);
            args.extend(["--cluster-node-timeout".into(), "2000".into()]);
        }
        args.extend(self.extra_args.iter().map(OsString::from));
        args
    }

    /// `PING` answered `+PONG`, by *our* server (`process_id` of `INFO server`).
    async fn probe(&self) -> Result<()> {
        let replies = command(&self.dial(), &[&["PING"], &["INFO", "server"]]).await?;
        let [Reply::Simple(pong), Reply::Bulk(Some(info))] = replies.as_slice() else {
            bail!("PING / INFO on port {} answered {replies:?}", self.port);
        };
        if pong != "PONG" {
            bail!("PING on port {} answered {pong:?}", self.port);
        }
        let info = String::from_utf8_lossy(info);
        let pid = info
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .map(str::trim);
        if pid != Some(self.process.pid.to_string().as_str()) {
            bail!(
                "port {} is served by another redis-server (process_id {})",
                self.port,
                pid.unwrap_or("unknown")
            );
        }
        Ok(())
    }
}

impl LocalServer for LocalRedis {
    fn process(&mut self) -> &mut ServerProcess {
        &mut self.process
    }

    fn set_port(&mut self, port: u16) {
        self.port = port;
    }

    /// Spawns redis-server plus its watchdog; returns the log offset of this run.
    fn spawn_server(&mut self) -> Result<u64> {
        ensure_port_free(self.port)?;
        if self.cluster {
            ensure_port_free(bus_port(self.port)?)?;
        }
        fs::create_dir_all(&self.dir)?;
        let mut cmd = Command::new(&self.redis_server);
        cmd.args(self.server_args());
        // Early failures (bad arguments) go to the log before --logfile takes over: same file.
        let offset = self.process.spawn(&mut cmd, &self.dir.join(LOG))?;
        info!(pid = self.process.pid, port = self.port, dir = %self.dir.display(), "redis-server spawned");
        self.process.arm_watchdog(self.on_exit, &[&self.dir])?;
        Ok(offset)
    }

    async fn wait_ready(&mut self, log_offset: u64) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last_err = String::from("not reachable yet");
        loop {
            if self.process.poll_exit()? {
                bail!(
                    "redis-server (pid {}, port {}) exited during startup; {LOG}:\n{}",
                    self.process.pid,
                    self.port,
                    tail(&self.log_since(log_offset), 30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "redis-server on port {} not ready after {START_TIMEOUT:?}: {last_err}",
                    self.port
                );
            }
            match self.probe().await {
                Ok(()) => break,
                Err(e) => last_err = format!("{e:#}"),
            }
            tokio::time::sleep(POLL).await;
        }
        info!(
            pid = self.process.pid,
            port = self.port,
            "redis-server ready"
        );
        Ok(())
    }

    fn log_since(&self, offset: u64) -> String {
        let log = fs::read(self.dir.join(LOG)).unwrap_or_default();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        String::from_utf8_lossy(log.get(start..).unwrap_or_default()).into_owned()
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        self.process.finish(self.on_exit, DROP_STOP_TIMEOUT);
        if self.on_exit == OnExit::KillAndRemove && self.owns_dir {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A local Redis cluster: `n` masters, no replicas, every slot assigned.
#[derive(Debug)]
pub struct LocalRedisCluster {
    nodes: Vec<LocalRedis>,
}

impl LocalRedisCluster {
    /// Starts `n_masters` (3 to 64) cluster-enabled servers in parallel, joins them with
    /// `redis-cli --cluster create`, and waits until every node reports
    /// `cluster_state:ok`. Nothing is persisted, so a persistent location only keeps
    /// the logs: its stale `nodes.conf` files are removed and the cluster created anew.
    /// If anything fails, the started servers are stopped and every failure reported.
    pub async fn start(n_masters: usize, location: Location) -> Result<Self> {
        Self::start_with(n_masters, location, None).await
    }

    /// Like [`Self::start`], every node TLS-only with `tls` (`--tls-cluster yes`).
    pub async fn start_with(
        n_masters: usize,
        location: Location,
        tls: Option<LocalRedisTls>,
    ) -> Result<Self> {
        if !(3..=64).contains(&n_masters) {
            bail!("a local Redis cluster has 3 to 64 masters, not {n_masters}");
        }
        let bins = tokio::task::spawn_blocking(ensure_redis_binaries).await??;
        let mut starts = Vec::with_capacity(n_masters);
        for i in 0..n_masters {
            let mut options = cluster_options(&location, i)?;
            options.tls.clone_from(&tls);
            starts.push(LocalRedis::start(options));
        }
        let mut nodes = Vec::with_capacity(n_masters);
        let mut failures = Vec::new();
        for result in futures_util::future::join_all(starts).await {
            match result {
                Ok(node) => nodes.push(node),
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        let mut cluster = Self { nodes };
        if !failures.is_empty() {
            cluster.stop().await;
            bail!(
                "could not start the local Redis nodes:\n  - {}",
                failures.join("\n  - ")
            );
        }
        let created = async {
            cluster.create(&bins.redis_cli).await?;
            cluster.wait_ok().await
        };
        if let Err(e) = created.await {
            cluster.stop().await;
            return Err(e);
        }
        info!(ports = ?cluster.nodes.iter().map(LocalRedis::port).collect::<Vec<_>>(), "local Redis cluster ready");
        Ok(cluster)
    }

    pub fn nodes(&self) -> &[LocalRedis] {
        &self.nodes
    }

    /// Node `i`, to stop, kill, suspend or restart it.
    pub fn node_mut(&mut self, i: usize) -> &mut LocalRedis {
        &mut self.nodes[i]
    }

    /// `redis://127.0.0.1:PORT/` (`rediss://` over TLS) of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(LocalRedis::url).collect()
    }

    /// Waits (at most 60 s) until every node reports `cluster_state:ok`, e.g. after a
    /// node was restarted.
    pub async fn wait_ok(&self) -> Result<()> {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        for node in &self.nodes {
            loop {
                let last = match node.cluster_info().await {
                    Ok(info) if info.lines().any(|l| l.trim() == "cluster_state:ok") => break,
                    Ok(info) => info
                        .lines()
                        .find(|l| l.starts_with("cluster_state:"))
                        .unwrap_or("no cluster_state")
                        .trim()
                        .to_owned(),
                    Err(e) => format!("{e:#}"),
                };
                if Instant::now() > deadline {
                    bail!(
                        "Redis node on port {} not cluster_state:ok after {CLUSTER_TIMEOUT:?}: {last}",
                        node.port()
                    );
                }
                tokio::time::sleep(POLL).await;
            }
        }
        Ok(())
    }

    /// Stops every node, logging failures (dropping the cluster does the same for
    /// persistent nodes, and kills temporary ones).
    pub async fn stop(&mut self) {
        for node in &mut self.nodes {
            if let Err(e) = node.stop().await {
                warn!(dir = %node.dir().display(), error = %format!("{e:#}"), "local Redis node did not stop cleanly");
            }
        }
    }

    /// `redis-cli --cluster create 127.0.0.1:P1 ... --cluster-replicas 0 --cluster-yes`.
    async fn create(&self, redis_cli: &Path) -> Result<()> {
        let mut cmd = tokio::process::Command::new(redis_cli);
        if let Some(tls) = self.nodes.first().and_then(|n| n.tls.as_ref()) {
            cmd.args(tls.cli_args());
        }
        cmd.args(["--cluster", "create"])
            .args(self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(CLUSTER_TIMEOUT, cmd.output())
            .await
            .map_err(|_| anyhow!("redis-cli --cluster create took over {CLUSTER_TIMEOUT:?}"))?
            .with_context(|| format!("running {}", redis_cli.display()))?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed ({}):\n{}{}",
                out.status,
                tail(&String::from_utf8_lossy(&out.stdout), 20),
                tail(&String::from_utf8_lossy(&out.stderr), 20)
            );
        }
        Ok(())
    }
}

fn cluster_options(location: &Location, i: usize) -> Result<LocalRedisOptions> {
    let mut options = match location {
        Location::Persistent(root) => {
            let dir = root.join("dev").join(format!("redis-{i}"));
            // The nodes get new ports: the old cluster's nodes.conf would point at them.
            match fs::remove_file(dir.join(NODES_CONF)) {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    return Err(e)
                        .with_context(|| format!("removing {}", dir.join(NODES_CONF).display()));
                }
                _ => {}
            }
            LocalRedisOptions::dev(dir, 0)
        }
        Location::Temp => LocalRedisOptions::temp(),
        Location::TempInMemory => {
            let shm = Path::new("/dev/shm");
            if shm.is_dir() {
                LocalRedisOptions::temp_in(shm)
            } else {
                LocalRedisOptions::temp()
            }
        }
    };
    options.cluster = true;
    Ok(options)
}

fn bus_port(port: u16) -> Result<u16> {
    port.checked_add(CLUSTER_BUS_OFFSET).ok_or_else(|| {
        anyhow!("port {port} leaves no cluster bus port (port + {CLUSTER_BUS_OFFSET} > 65535)")
    })
}

/// A free 127.0.0.1 port; for a cluster node one whose bus port is free as well.
fn pick_port(cluster: bool) -> Result<u16> {
    if !cluster {
        return free_port();
    }
    // Most ephemeral ports the kernel hands out leave room for the bus port.
    for _ in 0..64 {
        let port = free_port()?;
        if bus_port(port).is_ok_and(|bus| ensure_port_free(bus).is_ok()) {
            return Ok(port);
        }
    }
    // An unusual ephemeral range (all above 55535): scan below it.
    static N: AtomicUsize = AtomicUsize::new(0);
    let lo = 20_000_usize;
    let span = usize::from(u16::MAX - CLUSTER_BUS_OFFSET) + 1 - lo;
    let start =
        (std::process::id() as usize).wrapping_mul(7919) + N.fetch_add(997, Ordering::Relaxed);
    for k in 0..2_000 {
        let Ok(port) = u16::try_from(lo + (start + k) % span) else {
            continue;
        };
        if ensure_port_free(port).is_ok()
            && bus_port(port).is_ok_and(|b| ensure_port_free(b).is_ok())
        {
            return Ok(port);
        }
    }
    bail!("found no free 127.0.0.1 port P with P + {CLUSTER_BUS_OFFSET} free too (cluster bus)")
}

/// A RESP reply (arrays are not needed here).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
}

/// Sends `commands` pipelined over a fresh connection (TLS if the server is) to
/// 127.0.0.1:`port` and reads one reply each, all within [`STEP_TIMEOUT`].
async fn command(dial: &Dial, commands: &[&[&str]]) -> Result<Vec<Reply>> {
    let port = dial.port;
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        match &dial.tls {
            None => exchange(stream, commands).await,
            Some(tls) => {
                let name = rustls::pki_types::ServerName::from(std::net::IpAddr::from(
                    std::net::Ipv4Addr::LOCALHOST,
                ));
                exchange(tls.connect(name, stream).await?, commands).await
            }
        }
    };
    match tokio::time::timeout(STEP_TIMEOUT, exchange).await {
        Ok(replies) => replies.with_context(|| format!("talking to 127.0.0.1:{port}")),
        Err(_) => bail!("127.0.0.1:{port} did not answer within {STEP_TIMEOUT:?}"),
    }
}

/// Writes `commands` to `stream` and reads one reply each.
async fn exchange(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    commands: &[&[&str]],
) -> Result<Vec<Reply>> {
    let request: Vec<u8> = commands.iter().flat_map(|c| encode(c)).collect();
    stream.write_all(&request).await?;
    stream.flush().await?;
    let mut reader = tokio::io::BufReader::new(stream);
    let mut replies = Vec::with_capacity(commands.len());
    for _ in commands {
        replies.push(read_reply(&mut reader).await?);
    }
    Ok(replies)
}

/// A command as a RESP array of bulk strings.
fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

async fn read_reply(reader: &mut (impl AsyncBufRead + Unpin)) -> Result<Reply> {
    /// Larger bulk replies are not from a server of ours.
    const MAX_BULK: usize = 1 << 20;
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).await?;
    let Some(body) = line.strip_suffix(b"\r\n") else {
        bail!(
            "connection closed, or a reply line without CRLF: {:?}",
            String::from_utf8_lossy(&line)
        );
    };
    let Some((kind, rest)) = body.split_first() else {
        bail!("empty reply line");
    };
    let text = String::from_utf8_lossy(rest).into_owned();
    Ok(match kind {
        b'+' => Reply::Simple(text),
        b'-' => Reply::Error(text),
        b':' => Reply::Integer(text.parse().context("RESP integer")?),
        b'$' => {
            let len: i64 = text.parse().context("RESP bulk length")?;
            match usize::try_from(len) {
                Err(_) => Reply::Bulk(None), // $-1: nil
                Ok(len) if len > MAX_BULK => bail!("RESP bulk of {len} bytes"),
                Ok(len) => {
                    let mut buf = vec![0; len + 2];
                    reader.read_exact(&mut buf).await?;
                    if !buf.ends_with(b"\r\n") {
                        bail!("RESP bulk string not followed by CRLF");
                    }
                    buf.truncate(len);
                    Reply::Bulk(Some(buf))
                }
            }
        }
        _ => bail!("unsupported RESP reply type {:?}", char::from(*kind)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        assert_eq!(encode(&["PING"]), b"*1\r\n$4\r\nPING\r\n");
        assert_eq!(
            encode(&["INFO", "server"]),
            b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n"
        );
    }

    #[tokio::test]
    async fn replies_are_read_one_at_a_time() -> crate::TestResult {
        let mut input: &[u8] = b"+PONG\r\n-ERR no\r\n:42\r\n$5\r\na\r\nb!\r\n$-1\r\n$0\r\n\r\n";
        let mut replies = Vec::new();
        for _ in 0..6 {
            replies.push(read_reply(&mut input).await?);
        }
        assert_eq!(
            replies,
            [
                Reply::Simple("PONG".into()),
                Reply::Error("ERR no".into()),
                Reply::Integer(42),
                Reply::Bulk(Some(b"a\r\nb!".to_vec())),
                Reply::Bulk(None),
                Reply::Bulk(Some(vec![])),
            ]
        );
        assert!(read_reply(&mut input).await.is_err(), "end of stream");
        let mut truncated: &[u8] = b"$5\r\nab";
        assert!(read_reply(&mut truncated).await.is_err());
        Ok(())
    }

    #[test]
    fn every_setting_is_on_the_command_line() {
        let mut opts = LocalRedisOptions::temp();
        opts.cluster = true;
        let redis = LocalRedis {
            dir: PathBuf::from("/d"),
            port: 4242,
            on_exit: opts.on_exit,
            extra_args: vec!["--maxmemory".into(), "10mb".into()],
            cluster: opts.cluster,
            tls: None,
            connector: None,
            redis_server: PathBuf::from("redis-server"),
            process: ServerProcess::new("redis-server"),
            owns_dir: false,
        };
        let args: Vec<String> = redis
            .server_args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args[0].starts_with("--"), "a config file would be read");
        let pairs: Vec<(&str, &str)> = args
            .chunks(2)
            .map(|p| (p[0].as_str(), p[1].as_str()))
            .collect();
        for want in [
            ("--port", "4242"),
            ("--bind", "127.0.0.1"),
            ("--dir", "/d"),
            ("--save", ""),
            ("--appendonly", "no"),
            ("--protected-mode", "no"),
            ("--daemonize", "no"),
            ("--logfile", "/d/redis.log"),
            ("--cluster-enabled", "yes"),
            ("--cluster-config-file", "/d/nodes.conf"),
            ("--cluster-node-timeout", "2000"),
        ] {
            assert!(pairs.contains(&want), "{want:?} missing from {args:?}");
        }
        assert_eq!(pairs.last(), Some(&("--maxmemory", "10mb")));
    }

    #[test]
    fn a_tls_server_listens_on_its_tls_port_only() {
        let key = |name: &str| CertifiedKey {
            cert: PathBuf::from(format!("/pki/{name}.pem")),
            key: PathBuf::from(format!("/pki/{name}.key")),
        };
        let redis = LocalRedis {
            dir: PathBuf::from("/d"),
            port: 4243,
            on_exit: OnExit::KillAndRemove,
            extra_args: vec![],
            cluster: true,
            tls: Some(Box::new(LocalRedisTls {
                server: key("server"),
                ca: PathBuf::from("/pki/ca.pem"),
                auth_clients: true,
                client: Some(key("client")),
            })),
            connector: None,
            redis_server: PathBuf::from("redis-server"),
            process: ServerProcess::new("redis-server"),
            owns_dir: false,
        };
        assert_eq!(redis.url(), "rediss://127.0.0.1:4243/");
        let args: Vec<String> = redis
            .server_args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let pairs: Vec<(&str, &str)> = args
            .chunks(2)
            .map(|p| (p[0].as_str(), p[1].as_str()))
            .collect();
        for want in [
            ("--port", "0"),
            ("--tls-port", "4243"),
            ("--tls-cert-file", "/pki/server.pem"),
            ("--tls-key-file", "/pki/server.key"),
            ("--tls-ca-cert-file", "/pki/ca.pem"),
            ("--tls-auth-clients", "yes"),
            ("--tls-cluster", "yes"),
            ("--tls-client-cert-file", "/pki/client.pem"),
            ("--tls-client-key-file", "/pki/client.key"),
        ] {
            assert!(pairs.contains(&want), "{want:?} missing from {args:?}");
        }
        assert!(!pairs.contains(&("--port", "4243")), "{args:?}");
    }

    #[test]
    fn cluster_ports_leave_room_for_the_bus() -> crate::TestResult {
        for _ in 0..20 {
            let port = pick_port(true)?;
            assert!(port <= u16::MAX - CLUSTER_BUS_OFFSET, "{port}");
        }
        assert!(bus_port(60_000).is_err());
        Ok(())
    }

    #[test]
    fn a_foreign_non_empty_dir_is_refused_and_kept() -> crate::TestResult {
        let opts = LocalRedisOptions::temp();
        fs::create_dir_all(&opts.dir)?;
        fs::write(opts.dir.join("precious"), "x")?;
        let mut redis = LocalRedis {
            dir: opts.dir.clone(),
            port: 0,
            on_exit: opts.on_exit,
            extra_args: vec![],
            cluster: false,
            tls: None,
            connector: None,
            redis_server: PathBuf::from("redis-server"),
            process: ServerProcess::new("redis-server"),
            owns_dir: false,
        };
        let err = redis.prepare_dir().unwrap_err().to_string();
        assert!(err.contains("neither empty"), "{err}");
        drop(redis);
        assert!(
            opts.dir.join("precious").is_file(),
            "Drop removed a foreign dir"
        );
        fs::remove_dir_all(&opts.dir)?;
        Ok(())
    }
}
