//! Every local server the tests and benches run, started in this one place
//! through the project's own `chatshard::localdb`: real `mariadbd` and
//! `redis-server` processes on free 127.0.0.1 ports, in fresh temporary
//! directories, never the system's servers (3306, 6379) and never mocks.
//!
//! A server is killed and its directory removed when its owner drops it (so
//! after a test's panic too), and by the localdb watchdog when the process
//! dies without unwinding. Shards shared by a binary live until the process
//! exits. Self-contained, so that a bench can include this file alone.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};

use chatshard::localdb::cluster::{LocalCluster, Location};
use chatshard::localdb::redis::{LocalRedis, LocalRedisCluster, LocalRedisOptions, LocalRedisTls};
use chatshard::localdb::tls::{CertifiedKey, TestCertificates};
use chatshard::localdb::{LocalMariaDb, LocalMariaDbOptions};

/// `n` migrated shards started once for the whole test binary, whichever test
/// asks first; every test gives its own chat ids (or databases) on them.
pub fn shared_cluster(n: usize) -> &'static LocalCluster {
    static CLUSTERS: OnceLock<Mutex<HashMap<usize, &'static LocalCluster>>> = OnceLock::new();
    let clusters = CLUSTERS.get_or_init(Mutex::default);
    // Held while a set starts: a second test asking for it waits for it.
    let mut clusters = clusters.lock().unwrap_or_else(PoisonError::into_inner);
    clusters.entry(n).or_insert_with(|| {
        // Started on a runtime of its own: each test has its own runtime,
        // and these servers outlive every one of them.
        let cluster = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(LocalCluster::start_temp(n))
        })
        .join()
        .expect("shard start thread")
        .unwrap_or_else(|e| panic!("starting {n} shared shards: {e:#}"));
        Box::leak(Box::new(cluster))
    })
}

/// `n` migrated shards of the caller's own, to kill, stop or slow.
pub async fn cluster(n: usize, location: Location) -> LocalCluster {
    LocalCluster::start(n, location)
        .await
        .unwrap_or_else(|e| panic!("starting {n} shards: {e:#}"))
}

/// `n` shards of the caller's own, each a primary with `replicas` replicas
/// (GTID, semi-synchronous), in temporary directories.
pub async fn replicated_cluster(n: usize, replicas: usize) -> LocalCluster {
    LocalCluster::start_replicated(n, replicas, Location::Temp, &[])
        .await
        .unwrap_or_else(|e| panic!("starting {n} shards with {replicas} replicas each: {e:#}"))
}

/// One bare `mariadbd` of the caller's own (no schema), with `extra_args` on
/// its command line.
pub async fn mariadb(extra_args: &[&str]) -> LocalMariaDb {
    let mut options = LocalMariaDbOptions::temp();
    options
        .extra_args
        .extend(extra_args.iter().map(|a| (*a).to_owned()));
    LocalMariaDb::start(options)
        .await
        .unwrap_or_else(|e| panic!("starting mariadbd {extra_args:?}: {e:#}"))
}

/// A `redis-server` of the caller's own.
pub async fn redis() -> LocalRedis {
    LocalRedis::start(LocalRedisOptions::temp())
        .await
        .unwrap_or_else(|e| panic!("starting redis-server: {e:#}"))
}

/// A Redis Cluster of `masters` nodes (no replicas) of the caller's own.
pub async fn redis_cluster(masters: usize) -> LocalRedisCluster {
    LocalRedisCluster::start(masters, Location::Temp)
        .await
        .unwrap_or_else(|e| panic!("starting a Redis Cluster of {masters}: {e:#}"))
}

/// A test CA with a server certificate for 127.0.0.1 and a client
/// certificate, for TLS-only Redis servers; removed when dropped.
pub struct RedisPki {
    pub pki: TestCertificates,
    pub server: CertifiedKey,
    pub client: CertifiedKey,
}

impl RedisPki {
    pub fn new() -> Self {
        let pki = TestCertificates::temp().unwrap_or_else(|e| panic!("test CA: {e:#}"));
        let server = pki
            .server("redis", &["localhost", "127.0.0.1"])
            .unwrap_or_else(|e| panic!("Redis server certificate: {e:#}"));
        let client = pki
            .client("instance", "chatshard-instance")
            .unwrap_or_else(|e| panic!("client certificate: {e:#}"));
        Self {
            pki,
            server,
            client,
        }
    }

    /// The TLS of a server signed by this CA; `auth_clients`: clients must
    /// present a certificate of this CA (our probes present `client`).
    pub fn tls(&self, auth_clients: bool) -> LocalRedisTls {
        LocalRedisTls {
            server: self.server.clone(),
            ca: self.pki.ca().to_path_buf(),
            auth_clients,
            client: Some(self.client.clone()),
        }
    }

    /// `redis.tls.ca_file`, as a setting.
    pub fn ca_file(&self) -> String {
        self.pki.ca().display().to_string()
    }
}

/// A TLS-only `redis-server` of the caller's own (`rediss://` URL).
pub async fn tls_redis(pki: &RedisPki, auth_clients: bool) -> LocalRedis {
    let mut options = LocalRedisOptions::temp();
    options.tls = Some(pki.tls(auth_clients));
    LocalRedis::start(options)
        .await
        .unwrap_or_else(|e| panic!("starting a TLS redis-server: {e:#}"))
}

/// A TLS-only Redis Cluster (`--tls-cluster yes`) of the caller's own.
pub async fn tls_redis_cluster(masters: usize, pki: &RedisPki) -> LocalRedisCluster {
    LocalRedisCluster::start_with(masters, Location::Temp, Some(pki.tls(false)))
        .await
        .unwrap_or_else(|e| panic!("starting a TLS Redis Cluster of {masters}: {e:#}"))
}
