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
//! * all waits are bounded polls on an observable condition (a `PING` answered `+PONG`,
//!   `cluster_state:ok`), never fixed sleeps; signals are sent with the `kill` command.

use std::ffi::OsString;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tracing::{info, warn};

use super::cluster::Location;
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
#[derive(Debug)]
pub struct LocalRedis {
    dir: PathBuf,
    port: u16,
    on_exit: OnExit,
    extra_args: Vec<String>,
    cluster: bool,
    redis_server: PathBuf,
    process: ServerProcess,
    /// Set once `dir` is known to be ours (created, empty, or holding our `redis.log`):
    /// only then may Drop remove it.
    owns_dir: bool,
}

impl LocalRedis {
    /// Prepares `dir`, starts `redis-server` and waits until it answers `PING`.
    pub async fn start(opts: LocalRedisOptions) -> Result<Self> {
        let redis_server = tokio::task::spawn_blocking(ensure_redis_server).await??;
        let dir = std::path::absolute(&opts.dir)?;
        let mut redis = Self {
            dir,
            port: opts.port,
            on_exit: opts.on_exit,
            extra_args: opts.extra_args,
            cluster: opts.cluster,
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

    /// `redis://127.0.0.1:{port}/` (no password).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// One `PING` over a fresh TCP connection, answered `+PONG` within 5 s.
    pub async fn ping(&self) -> Result<()> {
        match command(self.port, &[&["PING"]]).await?.as_slice() {
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
        match command(self.port, &[&["CLUSTER", "INFO"]])
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
        let mut args: Vec<OsString> = vec![
            "--port".into(),
            self.port.to_string().into(),
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
        ];
        if self.cluster {
            args.extend(["--cluster-enabled".into(), "yes".into()]);
            args.extend(["--cluster-config-file".into(), d.join(NODES_CONF).into()]);
            args.extend(["--cluster-node-timeout".into(), "2000".into()]);
        }
        args.extend(self.extra_args.iter().map(OsString::from));
        args
    }

    /// `PING` answered `+PONG`, by *our* server (`process_id` of `INFO server`).
    async fn probe(&self) -> Result<()> {
        let replies = command(self.port, &[&["PING"], &["INFO", "server"]]).await?;
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
        if !(3..=64).contains(&n_masters) {
            bail!("a local Redis cluster has 3 to 64 masters, not {n_masters}");
        }
        let bins = tokio::task::spawn_blocking(ensure_redis_binaries).await??;
        let mut starts = Vec::with_capacity(n_masters);
        for i in 0..n_masters {
            let options = cluster_options(&location, i)?;
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

    /// `redis://127.0.0.1:PORT/` of every node.
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

/// Sends `commands` pipelined over a fresh connection to 127.0.0.1:`port` and reads one
/// reply each, all within [`STEP_TIMEOUT`].
async fn command(port: u16, commands: &[&[&str]]) -> Result<Vec<Reply>> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let request: Vec<u8> = commands.iter().flat_map(|c| encode(c)).collect();
        stream.write_all(&request).await?;
        let mut reader = tokio::io::BufReader::new(stream);
        let mut replies = Vec::with_capacity(commands.len());
        for _ in commands {
            replies.push(read_reply(&mut reader).await?);
        }
        anyhow::Ok(replies)
    };
    match tokio::time::timeout(STEP_TIMEOUT, exchange).await {
        Ok(replies) => replies.with_context(|| format!("talking to 127.0.0.1:{port}")),
        Err(_) => bail!("127.0.0.1:{port} did not answer within {STEP_TIMEOUT:?}"),
    }
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
