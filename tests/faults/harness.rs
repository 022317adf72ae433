//! A cluster per scenario: three real `mariadbd` shards of its own (the kit's
//! [`TestApp`] owns them), each behind a proxy, chatshard connecting as a
//! non-SUPER user (so `read_only` applies to it), a steady mixed load over
//! chats on every shard whose answers the scenario can count while it runs,
//! and the checks every scenario shares.
//!
//! No check here times a request: what isolation means is asserted as counts,
//! states and order (a refusal counted by the breaker while it stayed open, a
//! healthy request answered while a call to the broken shard was held). How
//! fast is the load tool's business (docs/benchmarks.md).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chatshard::config::{Settings, ShardSettings};
use chatshard::localdb::DEFAULT_DATABASE;
use chatshard::localdb::cluster::{LocalCluster, Location};
use serde_json::{Value, json};
use sqlx::{Connection, MySqlConnection};

use crate::common::{self, TestApp, Wait};
use crate::proxy::Proxy;

pub const SHARDS: usize = 3;
pub const CHATS_PER_SHARD: usize = 3;
pub const ADMIN_TOKEN: &str = "fault-tests-admin-token";
const APP_PASSWORD: &str = "chatshard-app";
/// Concurrent requests of a refusal check.
const REFUSALS: usize = 20;

/// Scenarios change servers under each other's feet: they run one at a time.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub struct Cluster {
    pub app: TestApp,
    pub proxies: Vec<Proxy>,
    /// Chat ids by shard index.
    pub chats: Vec<Vec<String>>,
}

/// The app's client, settings and URLs.
impl std::ops::Deref for Cluster {
    type Target = TestApp;

    fn deref(&self) -> &TestApp {
        &self.app
    }
}

/// A shard's breaker and bulkhead, as the admin view shows them.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerView {
    pub state: String,
    /// When the breaker last changed state.
    pub since: String,
    /// Calls refused by the open breaker since start.
    pub refused: u64,
    /// Callers waiting for one of the shard's connections now.
    pub waiting: u64,
}

impl Cluster {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// [`Self::start`], with the service's settings changed by `configure`
    /// (after the harness's own).
    pub async fn start_with(configure: impl FnOnce(&mut Settings) + Send) -> Self {
        // In memory, so that fsync stalls caused by other processes on a
        // shared disk stay out of the scenarios. A SIGKILLed server still
        // finds its files on restart.
        let mut prepared = TestApp::builder()
            .own_shards(SHARDS, Location::TempInMemory)
            .client_timeout(Duration::from_secs(10))
            .configure(|s| {
                s.admin.token = ADMIN_TOKEN.to_owned();
                // Short deadlines and a short open state keep every scenario
                // quick.
                s.pool.operation_timeout_ms = 500;
                s.pool.connect_timeout_ms = 500;
                s.pool.max_wait_ms = 100;
                s.breaker.consecutive_failures = 3;
                s.breaker.open_ms = 500;
            })
            .configure(configure)
            .prepare()
            .await;
        let mut proxies = Vec::new();
        let mut shards = Vec::new();
        let servers = prepared.shard_servers();
        for (server, root) in servers.servers().iter().zip(servers.shard_settings()) {
            create_app_user(&root.url).await;
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
        prepared.settings.shards = shards;
        let mut cluster = Self {
            app: prepared.start().await,
            proxies,
            chats: vec![Vec::new(); SHARDS],
        };
        cluster.create_chats().await;
        cluster
    }

    /// The shard servers, to kill, stop or restart one.
    pub fn shards(&mut self) -> &mut LocalCluster {
        self.app.own_shard_servers()
    }

    /// The name of the shard at `index`.
    pub fn shard_name(&self, index: usize) -> String {
        self.settings.shards[index].name.clone()
    }

    /// Each shard's URL, straight to its server as root (not through its
    /// proxy).
    pub fn shard_urls(&self) -> Vec<String> {
        self.shard_servers()
            .shard_settings()
            .iter()
            .map(|s| s.url.clone())
            .collect()
    }

    /// Creates chats until every shard has [`CHATS_PER_SHARD`].
    async fn create_chats(&mut self) {
        let mut i = 0;
        while self.chats.iter().any(|c| c.len() < CHATS_PER_SHARD) {
            let chat = format!("chat-{i}");
            i += 1;
            let r = self.app.put_chat(&chat, None).await;
            assert!(r.status().is_success(), "PUT {chat}: {}", r.status());
            let body: Value = r.json().await.expect("json");
            let shard = self.shard_index(body["shard"].as_str().expect("shard"));
            if self.chats[shard].len() < CHATS_PER_SHARD {
                self.chats[shard].push(chat);
            }
        }
    }

    /// The breaker and bulkhead of `shard`, from the admin view.
    pub async fn breaker_view(&self, shard: usize) -> BreakerView {
        let view = &self.admin_shards().await[shard];
        BreakerView {
            state: view["breaker"]["state"].as_str().unwrap_or("?").to_owned(),
            since: view["breaker"]["since"].as_str().unwrap_or("?").to_owned(),
            refused: view["rejected"]["breakerOpen"]
                .as_u64()
                .expect("breakerOpen"),
            waiting: view["waiting"].as_u64().expect("waiting"),
        }
    }

    pub async fn breaker(&self, shard: usize) -> String {
        self.breaker_view(shard).await.state
    }

    /// Polls the admin view until the shard's breaker is in `state`; how long
    /// that took (reported, not asserted).
    pub async fn wait_breaker(&self, shard: usize, state: &str, within: Duration) -> Duration {
        let start = Instant::now();
        Wait::new(within, format!("breaker of shard {shard} {state}"))
            .until(|| async {
                let now = self.breaker(shard).await;
                if now == state { Ok(()) } else { Err(now) }
            })
            .await;
        start.elapsed()
    }

    /// Polls until a write to a chat of `shard` succeeds (the breaker needs a
    /// probe to close); how long that took (reported, not asserted).
    pub async fn wait_write_ok(&self, shard: usize, within: Duration) -> Duration {
        let start = Instant::now();
        let chat = &self.chats[shard][0];
        let n = AtomicU64::new(0);
        Wait::new(within, format!("a write on shard {shard}"))
            .until(|| async {
                let user = format!("after-fault-{}", n.fetch_add(1, Ordering::Relaxed));
                let status = self.app.join(chat, &user).await.status();
                if status.is_success() {
                    Ok(())
                } else {
                    Err(status)
                }
            })
            .await;
        start.elapsed()
    }

    /// Calls to a shard whose breaker is open are refused by the breaker
    /// itself, before they take a slot, a place in a queue or a connection:
    /// [`REFUSALS`] concurrent requests are all answered 503
    /// `shard_unavailable` with a Retry-After while the breaker stays open
    /// across them (the same `since`: no probe went through meanwhile), the
    /// breaker's refusals grow by at least as many, and nobody waits for the
    /// shard's connections. A probe falling among them (the breaker half-open
    /// after `open_ms`) makes the check start again; how many tries it took.
    pub async fn assert_refused_by_breaker(&self, shard: usize) -> u32 {
        let chat = &self.chats[shard][0];
        let mut tries = 0;
        Wait::new(
            Duration::from_secs(15),
            format!("{REFUSALS} requests within one open period of shard {shard}'s breaker"),
        )
        .until(|| {
            tries += 1;
            self.refusal_round(shard, chat)
        })
        .await;
        tries
    }

    /// One round of [`Self::assert_refused_by_breaker`]: `Err` when the
    /// breaker was not open throughout.
    async fn refusal_round(&self, shard: usize, chat: &str) -> Result<(), String> {
        let before = self.breaker_view(shard).await;
        if before.state != "OPEN" || before.waiting != 0 {
            return Err(format!("{before:?}"));
        }
        let path = format!("/v1/chats/{chat}/member-count");
        let requests = (0..REFUSALS).map(|_| self.app.get(&path));
        let mut answers = Vec::new();
        for r in futures::future::join_all(requests).await {
            let status = r.status().as_u16();
            let retry_after = r.headers().contains_key("retry-after");
            let body: Value = r.json().await.expect("json");
            answers.push((status, retry_after, body["code"].clone()));
        }
        let after = self.breaker_view(shard).await;
        if after.state != "OPEN" || after.since != before.since {
            return Err(format!("the breaker moved: {before:?} -> {after:?}"));
        }
        for answer in &answers {
            assert_eq!(
                *answer,
                (503, true, json!("shard_unavailable")),
                "a request of shard {shard} with its breaker open"
            );
        }
        assert!(
            after.refused >= before.refused + REFUSALS as u64,
            "{REFUSALS} requests, breaker refusals {} -> {}",
            before.refused,
            after.refused
        );
        assert_eq!(after.waiting, 0, "callers wait for the broken shard");
        Ok(())
    }

    /// Every acknowledged write is stored; counts equal rows; revisions gapless.
    pub async fn assert_consistent(&self, acked: &Acked) {
        for (i, url) in self.shard_urls().iter().enumerate() {
            let mut db = MySqlConnection::connect(url).await.expect("root");
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

/// chatshard's own user on a shard: all rights on its database, no SUPER.
async fn create_app_user(root_url: &str) {
    let mut db = MySqlConnection::connect(root_url).await.expect("root");
    for sql in [
        format!("CREATE USER IF NOT EXISTS 'chatshard'@'127.0.0.1' IDENTIFIED BY '{APP_PASSWORD}'"),
        "GRANT ALL PRIVILEGES ON chatshard.* TO 'chatshard'@'127.0.0.1'".to_owned(),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut db)
            .await
            .expect("app user");
    }
}

/// One request of the load, from its start to its answer.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    pub done: Instant,
    pub shard: usize,
    pub chat: String,
    /// 0 when no answer came (a transport error or the client's time-out).
    pub status: u16,
    /// The problem's code, or what went wrong with the transport.
    pub code: String,
    pub write: bool,
}

impl Sample {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Held by the shard until its deadline: a read that timed out, or a
    /// write whose outcome is unknown.
    pub fn held(&self) -> bool {
        matches!(self.code.as_str(), "shard_timeout" | "outcome_unknown")
    }

    /// Started at or after `t`.
    pub fn since(&self, t: Instant) -> bool {
        self.at >= t
    }

    /// Started after `outer` started and answered before `outer` was.
    pub fn within(&self, outer: &Sample) -> bool {
        outer.at <= self.at && self.done <= outer.done
    }
}

/// Writes answered 2xx, to check afterwards.
#[derive(Debug, Default)]
pub struct Acked {
    pub joins: HashMap<String, Vec<String>>,
    pub posts: HashMap<String, Vec<(String, String)>>,
}

/// A steady mixed load over every chat of every shard; its answers can be
/// counted while it runs.
pub struct Load {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    workers: Vec<tokio::task::JoinHandle<Acked>>,
}

pub const WORKERS: usize = 6;

impl Load {
    pub fn start(cluster: &Cluster) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let seq = Arc::new(AtomicU64::new(0));
        let chats: Vec<(usize, String)> = cluster
            .chats
            .iter()
            .enumerate()
            .flat_map(|(s, cs)| cs.iter().map(move |c| (s, c.clone())))
            .collect();
        let workers = (0..WORKERS)
            .map(|w| {
                let worker = Worker {
                    w,
                    stop: stop.clone(),
                    seq: seq.clone(),
                    samples: samples.clone(),
                    chats: chats.clone(),
                    http: cluster.http.clone(),
                    base: cluster.base.clone(),
                };
                tokio::spawn(worker.run())
            })
            .collect();
        Self {
            stop,
            samples,
            workers,
        }
    }

    /// The answers so far for which `which` holds.
    pub fn count(&self, which: impl Fn(&Sample) -> bool) -> usize {
        self.samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|s| which(s))
            .count()
    }

    /// Waits until `n` answers satisfy `which`: a measurement window,
    /// measured in answers rather than in time.
    pub async fn wait_for(&self, n: usize, what: &str, which: impl Fn(&Sample) -> bool) {
        Wait::new(Duration::from_secs(30), format!("{n} {what}"))
            .until(|| async {
                let got = self.count(&which);
                if got >= n { Ok(()) } else { Err(got) }
            })
            .await
    }

    /// [`Self::wait_for`] on every shard.
    pub async fn wait_for_each_shard(&self, n: usize, what: &str, which: impl Fn(&Sample) -> bool) {
        for shard in 0..SHARDS {
            self.wait_for(n, &format!("{what} of shard {shard}"), |s| {
                s.shard == shard && which(s)
            })
            .await;
        }
    }

    /// Waits until some request of the healthy shards, started after
    /// `start`, was answered while a call to `broken` was held by it.
    pub async fn wait_answered_while_held(&self, broken: usize, start: Instant) {
        Wait::new(
            Duration::from_secs(30),
            "a healthy request answered while a call to the broken shard was held",
        )
        .until(|| async {
            let samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
            let held = held_calls(&samples, broken, start);
            if answered_while_held(&samples, broken, &held) > 0 {
                Ok(())
            } else {
                Err(format!("{} held calls", held.len()))
            }
        })
        .await
    }

    pub async fn stop(self) -> (Vec<Sample>, Acked) {
        self.stop.store(true, Ordering::Release);
        let mut acked = Acked::default();
        for w in self.workers {
            let a = w.await.expect("worker");
            for (k, v) in a.joins {
                acked.joins.entry(k).or_default().extend(v);
            }
            for (k, v) in a.posts {
                acked.posts.entry(k).or_default().extend(v);
            }
        }
        let samples =
            std::mem::take(&mut *self.samples.lock().unwrap_or_else(PoisonError::into_inner));
        (samples, acked)
    }
}

/// The calls of `broken`, started at or after `start`, that it held until
/// their deadline.
fn held_calls(samples: &[Sample], broken: usize, start: Instant) -> Vec<&Sample> {
    samples
        .iter()
        .filter(|s| s.shard == broken && s.since(start) && s.held())
        .collect()
}

/// Healthy requests answered, 2xx, within one of the `held` calls.
fn answered_while_held(samples: &[Sample], broken: usize, held: &[&Sample]) -> usize {
    samples
        .iter()
        .filter(|h| h.shard != broken && h.ok() && held.iter().any(|b| h.within(b)))
        .count()
}

struct Worker {
    w: usize,
    stop: Arc<AtomicBool>,
    seq: Arc<AtomicU64>,
    samples: Arc<Mutex<Vec<Sample>>>,
    chats: Vec<(usize, String)>,
    http: reqwest::Client,
    base: String,
}

impl Worker {
    async fn run(self) -> Acked {
        let Self {
            w,
            stop,
            seq,
            samples,
            chats,
            http,
            base,
        } = self;
        let mut acked = Acked::default();
        // The user this worker posts as, per chat, once its join was acknowledged.
        let mut member: HashMap<String, String> = HashMap::new();
        let mut pace = tokio::time::interval(Duration::from_millis(10));
        // A worker held up by a hung shard must not catch up in a burst
        // afterwards: that would be a load spike of the generator's own making.
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
            let at = Instant::now();
            let (status, code) = match req.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    match r.json::<Value>().await {
                        Ok(body) => (status, body["code"].as_str().unwrap_or("").to_owned()),
                        Err(e) => (0, format!("body: {e}")),
                    }
                }
                Err(e) => (0, format!("transport: {e}")),
            };
            let sample = Sample {
                at,
                done: Instant::now(),
                shard: *shard,
                chat: chat.clone(),
                status,
                code,
                write,
            };
            if sample.ok() {
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
            samples
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(sample);
        }
        acked
    }
}

/// What a scenario reports about the healthy shards.
#[derive(Debug)]
pub struct Report {
    pub healthy_requests: usize,
    /// Healthy requests started and answered while the shard was broken.
    pub during_fault: usize,
    /// Calls the broken shard held until their deadline.
    pub held_calls: usize,
    /// Healthy requests answered while one of those was held.
    pub answered_while_held: usize,
}

/// How a fault shows to callers of the broken shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Symptom {
    /// Calls hang until their deadline (a stopped, slowed or silent server).
    Hangs,
    /// Calls fail at once (a dead, resetting or full server).
    Fails,
}

/// The load was answered, every request of it; the healthy shards (those
/// `broken` is not) answered every request 2xx, also while the broken shard
/// was broken (`fault`: from its injection to its repair); and, where the
/// fault hangs calls, a healthy request was answered while a call to the
/// broken shard was held: it did not wait for it.
pub fn assert_healthy(
    samples: &[Sample],
    broken: usize,
    fault: (Instant, Instant),
    symptom: Symptom,
) -> Report {
    let unanswered: Vec<&Sample> = samples.iter().filter(|s| s.status == 0).collect();
    assert!(
        unanswered.is_empty(),
        "{} requests of the load got no answer, e.g. {:?}",
        unanswered.len(),
        unanswered.first()
    );
    let healthy: Vec<&Sample> = samples.iter().filter(|s| s.shard != broken).collect();
    let bad: Vec<&&Sample> = healthy.iter().filter(|s| !s.ok()).collect();
    assert!(
        bad.is_empty(),
        "healthy shards answered {} non-2xx, e.g. {:?}",
        bad.len(),
        bad.first()
    );
    let during_fault = healthy
        .iter()
        .filter(|s| s.at >= fault.0 && s.done <= fault.1)
        .count();
    assert!(
        during_fault >= 20,
        "{during_fault} healthy requests while the shard was broken"
    );
    let held: Vec<&Sample> = held_calls(samples, broken, fault.0)
        .into_iter()
        .filter(|s| s.at < fault.1)
        .collect();
    let answered_while_held = answered_while_held(samples, broken, &held);
    if symptom == Symptom::Hangs {
        assert!(
            answered_while_held > 0,
            "no healthy request answered while one of {} calls was held by the broken shard",
            held.len()
        );
    }
    Report {
        healthy_requests: healthy.len(),
        during_fault,
        held_calls: held.len(),
        answered_while_held,
    }
}
