//! Smoke test of `chatshard::localdb::redis` against a real `redis-server`: PING, the
//! settings, SIGKILL + restart on the same port, SIGSTOP/SIGCONT, clean stop, cleanup on
//! drop and by the watchdog when the owner dies, and a 3-node cluster.
//!
//! Every server gets a free port: none of this touches the system redis on 6379.
//! The starter itself is what is tested here, so this file calls it directly
//! rather than through the test kit's `servers`.

#[path = "common/mod.rs"]
mod common;

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chatshard::localdb::cluster::Location;
use chatshard::localdb::redis::{
    LocalRedis, LocalRedisCluster, LocalRedisOptions, LocalRedisTls, ensure_redis_binaries,
};

const SYSTEM_PORT: u16 = 6379;
/// Set in the environment of the child process of the watchdog test.
const OWNER_ENV: &str = "CHATSHARD_TEST_LOCALREDIS_OWNER";

fn redis_cli(port: u16, args: &[&str]) -> String {
    assert_ne!(
        port, SYSTEM_PORT,
        "the tests must not talk to the system redis"
    );
    let cli = ensure_redis_binaries().unwrap().redis_cli;
    let out = Command::new(cli)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Gone, or a zombie nobody has reaped yet (its sockets and files are closed).
fn is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Err(_) => true,
        Ok(status) => status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z')),
    }
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    common::Wait::new(timeout, what).until_blocking(|| if done() { Ok(()) } else { Err("") });
}

#[tokio::test(flavor = "multi_thread")]
async fn start_ping_kill_restart_suspend_stop_drop() {
    let t0 = Instant::now();
    let mut redis = LocalRedis::start(LocalRedisOptions::temp()).await.unwrap();
    let (dir, port, pid) = (redis.dir().to_owned(), redis.port(), redis.pid());
    eprintln!(
        "started pid {pid} port {port} in {:?} ({})",
        t0.elapsed(),
        dir.display()
    );
    assert_ne!(port, SYSTEM_PORT);
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}/"));
    redis.ping().await.unwrap();
    assert_eq!(redis_cli(port, &["PING"]), "PONG\n");
    // Every setting from the command line, none from /etc/redis.
    assert_eq!(redis_cli(port, &["CONFIG", "GET", "save"]), "save\n\n");
    assert_eq!(
        redis_cli(port, &["CONFIG", "GET", "appendonly"]),
        "appendonly\nno\n"
    );
    assert_eq!(
        redis_cli(port, &["CONFIG", "GET", "dir"]),
        format!("dir\n{}\n", dir.display())
    );
    assert!(dir.join("redis.log").is_file());

    // SIGKILL + restart on the same port and dir.
    let t = Instant::now();
    redis.kill().unwrap();
    assert!(is_gone(pid), "killed server not reaped");
    redis.restart().await.unwrap();
    eprintln!("kill + restart took {:?}", t.elapsed());
    assert_eq!(redis.port(), port);
    assert_ne!(redis.pid(), pid);
    assert_eq!(redis_cli(port, &["PING"]), "PONG\n");

    // SIGSTOP: PING hangs; SIGCONT: it answers again.
    redis.suspend().unwrap();
    let hung = tokio::time::timeout(Duration::from_millis(500), redis.ping()).await;
    assert!(
        hung.is_err(),
        "PING of a SIGSTOPped server answered: {hung:?}"
    );
    redis.resume().unwrap();
    redis.ping().await.unwrap();

    // A clean stop (of a suspended server: stop() must SIGCONT it) keeps the dir.
    redis.suspend().unwrap();
    let pid = redis.pid();
    redis.stop().await.unwrap();
    assert!(is_gone(pid));
    assert!(dir.join("redis.log").is_file());
    assert!(
        redis.suspend().is_err(),
        "suspend of a stopped server must fail"
    );
    redis.restart().await.unwrap();
    assert!(
        redis.restart().await.is_err(),
        "restart of a running server must fail"
    );

    // Drop (KillAndRemove) of a suspended server: SIGKILL still works, dir removed.
    redis.suspend().unwrap();
    let pid = redis.pid();
    drop(redis);
    wait_until(
        "redis-server still running",
        Duration::from_secs(10),
        || is_gone(pid),
    );
    assert!(!dir.exists(), "dir {} not removed", dir.display());
    eprintln!("smoke test took {:?}", t0.elapsed());
}

/// The owner of the server is SIGKILLed, so no Drop runs: the watchdog must kill the
/// server and remove its dir.
#[test]
fn watchdog_kills_the_server_when_its_owner_dies() {
    let exe = std::env::current_exe().unwrap();
    let mut owner = Command::new(exe)
        .args([
            "owner_of_a_server_until_killed",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(OWNER_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = owner.stdout.take().unwrap();
    // The owner prints its line once the server is ready, or exits (EOF) on failure.
    // libtest may have written "test NAME ... " on the same line first.
    let line = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| Some(l.split_once("LOCALREDIS ")?.1.to_owned()));
    let Some(line) = line else {
        let _ = owner.kill();
        panic!(
            "the owner process exited without starting its server: {:?}",
            owner.wait()
        );
    };
    let mut fields = line.split(' ');
    let pid: u32 = fields.next().unwrap().parse().unwrap();
    let dir = PathBuf::from(fields.next().unwrap());
    assert!(!is_gone(pid) && dir.is_dir(), "{line}");

    owner.kill().unwrap(); // SIGKILL
    owner.wait().unwrap();
    wait_until(
        "the watchdog did not kill redis-server",
        Duration::from_secs(10),
        || is_gone(pid),
    );
    wait_until(
        "the watchdog did not remove the dir",
        Duration::from_secs(10),
        || !dir.exists(),
    );
}

/// Run by [`watchdog_kills_the_server_when_its_owner_dies`] in a child process.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "the child process of watchdog_kills_the_server_when_its_owner_dies"]
async fn owner_of_a_server_until_killed() {
    if std::env::var_os(OWNER_ENV).is_none() {
        return;
    }
    let redis = LocalRedis::start(LocalRedisOptions::temp()).await.unwrap();
    println!("LOCALREDIS {} {}", redis.pid(), redis.dir().display());
    // Killed long before; the bound only keeps a forgotten owner from living forever.
    tokio::time::sleep(Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_of_three_masters() {
    let t0 = Instant::now();
    let mut cluster = LocalRedisCluster::start(3, Location::Temp).await.unwrap();
    eprintln!("cluster ready in {:?}", t0.elapsed());
    let ports: Vec<u16> = cluster.nodes().iter().map(LocalRedis::port).collect();
    let dirs: Vec<PathBuf> = cluster.nodes().iter().map(|n| n.dir().to_owned()).collect();
    assert_eq!(cluster.urls().len(), 3);
    for &port in &ports {
        assert_ne!(port, SYSTEM_PORT);
        let info = redis_cli(port, &["CLUSTER", "INFO"]);
        for want in [
            "cluster_state:ok",
            "cluster_slots_assigned:16384",
            "cluster_known_nodes:3",
        ] {
            assert!(info.contains(want), "port {port}: {info}");
        }
    }
    // A key written through one node is read through another (-c follows MOVED).
    assert_eq!(redis_cli(ports[0], &["-c", "SET", "chat:1", "v"]), "OK\n");
    assert_eq!(redis_cli(ports[2], &["-c", "GET", "chat:1"]), "v\n");

    // Killing one node: its process is gone, and the others see the cluster fail.
    let pid = cluster.nodes()[1].pid();
    cluster.node_mut(1).kill().unwrap();
    assert!(is_gone(pid));
    let t = Instant::now();
    wait_until(
        "the other nodes did not notice the killed one",
        Duration::from_secs(30),
        || redis_cli(ports[0], &["CLUSTER", "INFO"]).contains("cluster_state:fail"),
    );
    eprintln!("failure seen after {:?}", t.elapsed());

    // Restarted on its port with its nodes.conf, it rejoins.
    let t = Instant::now();
    cluster.node_mut(1).restart().await.unwrap();
    assert_eq!(cluster.nodes()[1].port(), ports[1]);
    cluster.wait_ok().await.unwrap();
    eprintln!("rejoined after {:?}", t.elapsed());

    let pids: Vec<u32> = cluster.nodes().iter().map(LocalRedis::pid).collect();
    drop(cluster);
    for (pid, dir) in pids.into_iter().zip(&dirs) {
        assert!(is_gone(pid), "node pid {pid} still running");
        assert!(!Path::new(dir).exists(), "{} not removed", dir.display());
    }
    eprintln!("cluster test took {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tls_only_server_answers_over_tls_and_comes_back_after_a_kill() {
    let pki = chatshard::localdb::tls::TestCertificates::temp().unwrap();
    let server = pki.server("redis", &["127.0.0.1"]).unwrap();
    let client = pki.client("client", "probe").unwrap();
    let mut options = LocalRedisOptions::temp();
    options.tls = Some(LocalRedisTls {
        server,
        ca: pki.ca().to_path_buf(),
        auth_clients: true,
        client: Some(client.clone()),
    });
    let mut redis = LocalRedis::start(options).await.unwrap();
    let port = redis.port();
    assert_eq!(redis.url(), format!("rediss://127.0.0.1:{port}/"));
    redis.ping().await.unwrap();

    let cli = ensure_redis_binaries().unwrap().redis_cli;
    let cli = |with_cert: bool| {
        let mut cmd = Command::new(&cli);
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--tls",
            "--cacert",
        ])
        .arg(pki.ca());
        if with_cert {
            cmd.arg("--cert")
                .arg(&client.cert)
                .arg("--key")
                .arg(&client.key);
        }
        let out = cmd.arg("PING").stdin(Stdio::null()).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(cli(true), "PONG");
    assert_ne!(
        cli(false),
        "PONG",
        "a client without a certificate was served"
    );
    // No plain-TCP listener: the port speaks TLS only.
    let plain = Command::new(ensure_redis_binaries().unwrap().redis_cli)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "PING"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&plain.stdout).trim(), "PONG");

    redis.kill().unwrap();
    redis.restart().await.unwrap();
    assert_eq!(redis.port(), port);
    assert_eq!(cli(true), "PONG");
    redis.stop().await.unwrap();
}
