//! A cluster per scenario: three real `mariadbd` shards, each behind a proxy,
//! chatshard connecting as a non-SUPER user (so `read_only` applies to it), a
//! steady mixed load over chats on every shard, and the checks every scenario
//! shares.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chatshard::app::App;
use chatshard::config::{Settings, ShardSettings};
use chatshard::localdb::DEFAULT_DATABASE;
use chatshard::localdb::cluster::{LocalCluster, Location};
use serde_json::{Value, json};
use sqlx::{Connection, MySqlConnection};

use crate::common;
use crate::proxy::Proxy;

pub const SHARDS: usize = 3;
pub const CHATS_PER_SHARD: usize = 3;
pub const ADMIN_TOKEN: &str = "fault-tests-admin-token";
const APP_PASSWORD: &str = "chatshard-app";

/// Scenarios change servers under each other's feet and measure latencies:
/// they run one at a time.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub struct Cluster {
    pub shards: LocalCluster,
    pub proxies: Vec<Proxy>,
    pub base: String,
    pub http: reqwest::Client,
    pub settings: Settings,
    /// Chat ids by shard index.
    pub chats: Vec<Vec<String>>,
    _app: tokio::task::JoinHandle<()>,
}

impl Cluster {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// [`Self::start`], with the service's settings changed by `configure`
    /// (after the harness's own).
    pub async fn start_with(configure: impl FnOnce(&mut Settings)) -> Self {
        // In memory: these tests measure isolation, and fsync stalls caused by
        // other processes on a shared disk would blur it. A SIGKILLed server
        // still finds its files on restart.
        let local = LocalCluster::start(SHARDS, Location::TempInMemory)
            .await
            .expect("start shards");
        let mut proxies = Vec::new();
        let mut shards = Vec::new();
        for (server, root) in local.servers().iter().zip(local.shard_settings()) {
            let mut db = MySqlConnection::connect(&root.url).await.expect("root");
            for sql in [
                format!(
                    "CREATE USER IF NOT EXISTS 'chatshard'@'127.0.0.1' IDENTIFIED BY '{APP_PASSWORD}'"
                ),
                "GRANT ALL PRIVILEGES ON chatshard.* TO 'chatshard'@'127.0.0.1'".to_owned(),
            ] {
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&mut db)
                    .await
                    .expect("app user");
            }
            let proxy = Proxy::start(server.port()).await;
            shards.push(ShardSettings {
                url: format!(
                    "mysql://chatshard:{APP_PASSWORD}@127.0.0.1:{}/{DEFAULT_DATABASE}",
                    proxy.port
                ),
                ..root.clone()
            });
            proxies.push(proxy);
        }
        let mut settings = local.settings().expect("settings");
        settings.shards = shards;
        settings.admin.token = ADMIN_TOKEN.to_owned();
        // Short deadlines and a short open state keep every scenario quick.
        settings.pool.operation_timeout_ms = 500;
        settings.pool.connect_timeout_ms = 500;
        settings.pool.max_wait_ms = 100;
        settings.breaker.consecutive_failures = 3;
        settings.breaker.open_ms = 500;
        configure(&mut settings);
        let app = App::build(&settings).await.expect("build app");
        let addr = app.local_addr().expect("addr");
        let handle = tokio::spawn(async move {
            let _ = app.run(std::future::pending()).await;
        });
        let mut cluster = Self {
            shards: local,
            proxies,
            base: format!("http://{addr}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client"),
            settings,
            chats: vec![Vec::new(); SHARDS],
            _app: handle,
        };
        cluster.create_chats().await;
        cluster
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The name of the shard at `index`.
    pub fn shard_name(&self, index: usize) -> String {
        self.settings.shards[index].name.clone()
    }

    /// Each shard's URL, straight to its server (not through its proxy).
    pub fn shard_urls(&self) -> Vec<String> {
        self.shards
            .shard_settings()
            .iter()
            .map(|s| s.url.clone())
            .collect()
    }

    pub fn shard_index(&self, name: &str) -> usize {
        self.settings
            .shards
            .iter()
            .position(|s| s.name == name)
            .expect("shard name")
    }

    /// Creates chats until every shard has [`CHATS_PER_SHARD`].
    async fn create_chats(&mut self) {
        let mut i = 0;
        while self.chats.iter().any(|c| c.len() < CHATS_PER_SHARD) {
            let chat = format!("chat-{i}");
            i += 1;
            let r = self
                .http
                .put(self.url(&format!("/v1/chats/{chat}")))
                .send()
                .await
                .expect("put");
            assert!(r.status().is_success());
            let body: Value = r.json().await.expect("json");
            let shard = self.shard_index(body["shard"].as_str().expect("shard"));
            if self.chats[shard].len() < CHATS_PER_SHARD {
                self.chats[shard].push(chat);
            }
        }
    }

    pub async fn admin_shards(&self) -> Vec<Value> {
        common::admin_get(&self.http, &self.base, ADMIN_TOKEN, "/v1/admin/shards").await["shards"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The sum of `metric` over the samples whose labels contain every one of
    /// `labels` (each `key="value"`).
    pub async fn metric_sum(&self, metric: &str, labels: &[&str]) -> f64 {
        common::sum_where(
            &common::metric_samples(&self.http, &self.base, metric).await,
            labels,
        )
    }

    /// Prometheus samples of `/metrics` whose name is `metric`.
    pub async fn metric(&self, metric: &str) -> Vec<(String, f64)> {
        common::metric_samples(&self.http, &self.base, metric).await
    }

    pub async fn breaker(&self, shard: usize) -> String {
        self.admin_shards().await[shard]["breaker"]["state"]
            .as_str()
            .unwrap_or("?")
            .to_owned()
    }

    /// Polls the admin view until the shard's breaker is in `state`.
    pub async fn wait_breaker(&self, shard: usize, state: &str, within: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if self.breaker(shard).await == state {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "breaker of shard {shard} not {state} within {within:?}"
            );
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(20)).await; // poll interval, not synchronisation
        }
    }

    /// Polls until a write to a chat of `shard` succeeds (the breaker needs a
    /// probe to close).
    pub async fn wait_write_ok(&self, shard: usize, within: Duration) -> Duration {
        let start = Instant::now();
        let chat = &self.chats[shard][0];
        let mut n = 0;
        loop {
            n += 1;
            let r = self
                .http
                .post(self.url(&format!("/v1/chats/{chat}/members")))
                .json(&json!({ "userId": format!("after-fault-{n}") }))
                .send()
                .await
                .expect("join");
            if r.status().is_success() {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "no write succeeded on shard {shard} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await; // poll interval
        }
    }

    /// Asserts requests to a broken shard are refused at once: 503 in < 10 ms.
    pub async fn assert_fail_fast(&self, shard: usize) -> Duration {
        let chat = &self.chats[shard][0];
        let mut worst = Duration::ZERO;
        for _ in 0..20 {
            let t = Instant::now();
            let r = self
                .http
                .get(self.url(&format!("/v1/chats/{chat}/member-count")))
                .send()
                .await
                .expect("get");
            let took = t.elapsed();
            assert_eq!(r.status().as_u16(), 503);
            assert!(r.headers().contains_key("retry-after"));
            let body: Value = r.json().await.expect("json");
            assert_eq!(body["code"], "shard_unavailable");
            worst = worst.max(took);
        }
        assert!(
            worst < Duration::from_millis(10),
            "fail-fast answer took {worst:?}"
        );
        worst
    }

    /// Every acknowledged write is stored; counts equal rows; revisions gapless.
    pub async fn assert_consistent(&self, acked: &Acked) {
        for (i, server) in self.shards.servers().iter().enumerate() {
            let mut db = MySqlConnection::connect(&server.url(DEFAULT_DATABASE))
                .await
                .expect("root");
            for chat in &self.chats[i] {
                common::assert_chat_consistent(&mut db, chat).await;
                let joined = common::joined_users(&mut db, chat).await;
                for user in acked.joins.get(chat).into_iter().flatten() {
                    assert!(
                        joined.contains(user),
                        "acknowledged join {chat}/{user} lost"
                    );
                }
                let keys: Vec<(String, String)> = sqlx::query_as(
                    "SELECT sender_id, client_message_id FROM chat_message WHERE chat_id = ?",
                )
                .bind(chat)
                .fetch_all(&mut db)
                .await
                .expect("messages");
                for key in acked.posts.get(chat).into_iter().flatten() {
                    assert!(
                        keys.contains(key),
                        "acknowledged message {chat}/{key:?} lost"
                    );
                }
            }
        }
    }
}

/// One request of the load.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    pub shard: usize,
    pub chat: String,
    pub status: u16,
    pub code: String,
    pub latency: Duration,
    pub write: bool,
}

/// Writes answered 2xx, to check afterwards.
#[derive(Debug, Default)]
pub struct Acked {
    pub joins: HashMap<String, Vec<String>>,
    pub posts: HashMap<String, Vec<(String, String)>>,
}

/// A steady mixed load over every chat of every shard.
pub struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<(Vec<Sample>, Acked)>>,
}

pub const WORKERS: usize = 6;

impl Load {
    pub fn start(cluster: &Cluster) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seq = Arc::new(AtomicU64::new(0));
        let chats: Vec<(usize, String)> = cluster
            .chats
            .iter()
            .enumerate()
            .flat_map(|(s, cs)| cs.iter().map(move |c| (s, c.clone())))
            .collect();
        let workers = (0..WORKERS)
            .map(|w| {
                let (stop, seq, chats, http, base) = (
                    stop.clone(),
                    seq.clone(),
                    chats.clone(),
                    cluster.http.clone(),
                    cluster.base.clone(),
                );
                tokio::spawn(async move { worker(w, stop, seq, chats, http, base).await })
            })
            .collect();
        Self { stop, workers }
    }

    pub async fn stop(self) -> (Vec<Sample>, Acked) {
        self.stop.store(true, Ordering::Release);
        let mut samples = Vec::new();
        let mut acked = Acked::default();
        for w in self.workers {
            let (s, a) = w.await.expect("worker");
            samples.extend(s);
            for (k, v) in a.joins {
                acked.joins.entry(k).or_default().extend(v);
            }
            for (k, v) in a.posts {
                acked.posts.entry(k).or_default().extend(v);
            }
        }
        (samples, acked)
    }
}

async fn worker(
    w: usize,
    stop: Arc<AtomicBool>,
    seq: Arc<AtomicU64>,
    chats: Vec<(usize, String)>,
    http: reqwest::Client,
    base: String,
) -> (Vec<Sample>, Acked) {
    let mut samples = Vec::new();
    let mut acked = Acked::default();
    // The user this worker posts as, per chat, once its join was acknowledged.
    let mut member: HashMap<String, String> = HashMap::new();
    let mut pace = tokio::time::interval(Duration::from_millis(10));
    // A worker held up by a hung shard must not catch up in a burst afterwards:
    // that would be a load spike of the generator's own making.
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut i = w;
    while !stop.load(Ordering::Acquire) {
        pace.tick().await;
        let (shard, chat) = &chats[i % chats.len()];
        i += 1;
        let n = seq.fetch_add(1, Ordering::Relaxed);
        let (req, write, kind) = match n % 4 {
            0 => {
                let user = format!("w{w}-u{n}");
                let req = http
                    .post(format!("{base}/v1/chats/{chat}/members"))
                    .json(&json!({ "userId": user }));
                (req, true, Some(("join", user)))
            }
            1 if member.contains_key(chat) => {
                let key = format!("m{n}");
                let req = http.post(format!("{base}/v1/chats/{chat}/messages")).json(&json!({
                    "senderId": member[chat], "clientMessageId": key, "text": format!("message {n}")
                }));
                (req, true, Some(("post", key)))
            }
            2 => (
                http.get(format!("{base}/v1/chats/{chat}/events?after=0&limit=50")),
                false,
                None,
            ),
            _ => (
                http.get(format!("{base}/v1/chats/{chat}/member-count")),
                false,
                None,
            ),
        };
        let t = Instant::now();
        let (status, code) = match req.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                (status, body["code"].as_str().unwrap_or("").to_owned())
            }
            Err(_) => (0, "transport".to_owned()),
        };
        samples.push(Sample {
            at: t,
            shard: *shard,
            chat: chat.clone(),
            status,
            code,
            latency: t.elapsed(),
            write,
        });
        if (200..300).contains(&status) {
            match kind {
                Some(("join", user)) => {
                    member.entry(chat.clone()).or_insert_with(|| user.clone());
                    acked.joins.entry(chat.clone()).or_default().push(user);
                }
                Some((_, key)) => {
                    acked
                        .posts
                        .entry(chat.clone())
                        .or_default()
                        .push((member[chat].clone(), key));
                }
                None => {}
            }
        }
    }
    (samples, acked)
}

/// The p99 latency of samples.
pub fn p99(samples: &[&Sample]) -> Duration {
    let mut l: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    l.sort();
    if l.is_empty() {
        return Duration::ZERO;
    }
    l[((l.len() as f64 * 0.99).ceil() as usize).clamp(1, l.len()) - 1]
}

/// What a scenario reports and asserts about the healthy shards.
pub struct Report {
    pub baseline_p99: Duration,
    pub fault_p99: Duration,
    pub healthy_requests: usize,
}

/// Healthy shards: every request 2xx; p99 during the fault at most four times
/// the p99 before it, with a 50 ms floor. The bound separates what isolation
/// is about from noise: a healthy request that waited on the broken shard
/// would take the operation deadline (500 ms) or more, while two cores shared
/// by the servers, the service, the load generator and the fault move a p99 of
/// ~10 ms by tens of milliseconds now and then. The measured ratio is printed;
/// the ratio targets are measured by the load tool, not asserted here.
pub fn assert_healthy(
    samples: &[Sample],
    broken: impl Fn(&Sample) -> bool,
    fault: (Instant, Instant),
) -> Report {
    let healthy: Vec<&Sample> = samples.iter().filter(|s| !broken(s)).collect();
    let bad: Vec<&&Sample> = healthy
        .iter()
        .filter(|s| !(200..300).contains(&s.status))
        .collect();
    assert!(
        bad.is_empty(),
        "healthy shards answered {} non-2xx, e.g. {:?}",
        bad.len(),
        bad.first()
    );
    let before: Vec<&Sample> = healthy.iter().copied().filter(|s| s.at < fault.0).collect();
    let during: Vec<&Sample> = healthy
        .iter()
        .copied()
        .filter(|s| s.at >= fault.0 && s.at < fault.1)
        .collect();
    assert!(
        before.len() >= 20 && during.len() >= 20,
        "too few samples: {} before, {} during",
        before.len(),
        during.len()
    );
    // FAULTS_DEBUG=1 prints the slowest healthy requests of the fault window.
    if std::env::var("FAULTS_DEBUG").is_ok() {
        let mut slow: Vec<&&Sample> = during.iter().collect();
        slow.sort_by_key(|s| std::cmp::Reverse(s.latency));
        for s in slow.iter().take(12) {
            eprintln!(
                "slow: +{:?} shard {} write {} {:?}",
                s.at - fault.0,
                s.shard,
                s.write,
                s.latency
            );
        }
    }
    let baseline_p99 = p99(&before);
    let fault_p99 = p99(&during);
    let limit = (4 * baseline_p99).max(Duration::from_millis(50));
    assert!(
        fault_p99 <= limit,
        "healthy p99 {fault_p99:?} during the fault > {limit:?} (baseline {baseline_p99:?})"
    );
    Report {
        baseline_p99,
        fault_p99,
        healthy_requests: healthy.len(),
    }
}
