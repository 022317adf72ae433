//! [`TestApp`]: chatshard in-process on port 0, its servers, and a typed
//! client of it.
//!
//! [`TestApp::builder`] picks the shards (shared by the binary, or the test's
//! own, to kill, stop or slow), Redis (none, a server, a cluster, or one the
//! test owns and several instances share) and changes to the settings; it
//! starts what it needs through [`super::servers`]. [`TestApp::spawn`] and
//! friends are the common cases.
//!
//! Invariants:
//! * the servers a `TestApp` owns die with it: dropped after a panic, they are
//!   killed and their directories removed;
//! * the server task's own end is never discarded: an error or a panic of
//!   `App::run`, or an end nobody asked for, fails the test, in
//!   [`TestApp::shut_down`], in a request that could not be sent, or when the
//!   `TestApp` is dropped.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chatshard::app::App;
use chatshard::config::Settings;
use chatshard::live::Live;
use chatshard::localdb::cluster::{LocalCluster, Location};
use chatshard::localdb::redis::{LocalRedis, LocalRedisCluster};
use futures::FutureExt as _;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{Value, json};
use sqlx::{Connection as _, MySqlConnection};

use super::sse::SseReader;
use super::{metrics, rows, servers, unique};

/// Shards of [`TestApp::spawn`] and of a builder told nothing else.
pub const DEFAULT_SHARDS: usize = 3;
/// How long [`TestApp::shut_down`] waits for the server task to end.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings for `n` shards shared by the binary, every other value at its
/// default (listening on 127.0.0.1:0).
pub fn shared_settings(n: usize) -> Settings {
    servers::shared_cluster(n)
        .settings()
        .expect("settings of the shared shards")
}

/// Which shards an app runs on.
enum ShardChoice {
    Shared(usize),
    Own(usize, Location),
    /// `n` shards of the app's own, each with this many replicas.
    OwnReplicated(usize, usize),
}

/// Which Redis an app's fleet uses.
enum RedisChoice {
    None,
    Own,
    OwnCluster(usize),
    At(String),
}

/// The shard servers behind an app.
enum ShardServers {
    Shared(&'static LocalCluster),
    Own(LocalCluster),
    /// Named by settings the test gave (another app's, or its own databases).
    Given,
}

/// The Redis servers an app owns.
enum RedisServers {
    None,
    Own(LocalRedis),
    OwnCluster(LocalRedisCluster),
}

type Configure<'a> = Box<dyn FnOnce(&mut Settings) + Send + 'a>;

/// What a [`TestApp`] runs on; see [`TestApp::builder`].
pub struct Builder<'a> {
    shards: ShardChoice,
    redis: RedisChoice,
    settings: Option<Settings>,
    /// The given settings name the shared shards of `shards`.
    settings_name_shared: bool,
    configure: Vec<Configure<'a>>,
    watch: Option<PathBuf>,
    client_timeout: Option<Duration>,
}

impl<'a> Builder<'a> {
    /// `n` shards shared by every test of the binary (the default: 3).
    pub fn shared_shards(mut self, n: usize) -> Self {
        self.shards = ShardChoice::Shared(n);
        self
    }

    /// `n` shards of this app's own, killed when it is dropped.
    pub fn own_shards(mut self, n: usize, location: Location) -> Self {
        self.shards = ShardChoice::Own(n, location);
        self
    }

    /// `n` shards of this app's own, each a primary with `replicas`
    /// replicas, named in `[[shards]] replicas`; killed when it is dropped.
    pub fn replicated_shards(mut self, n: usize, replicas: usize) -> Self {
        self.shards = ShardChoice::OwnReplicated(n, replicas);
        self
    }

    /// A `redis-server` of this app's own.
    pub fn redis(mut self) -> Self {
        self.redis = RedisChoice::Own;
        self
    }

    /// A Redis Cluster of `masters` nodes of this app's own.
    pub fn redis_cluster(mut self, masters: usize) -> Self {
        self.redis = RedisChoice::OwnCluster(masters);
        self
    }

    /// The Redis at `url` (a fleet's, which the test owns).
    pub fn redis_at(mut self, url: impl Into<String>) -> Self {
        self.redis = RedisChoice::At(url.into());
        self
    }

    /// Starts from these settings instead of the shards' (which they name).
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = Some(settings);
        self
    }

    /// Changes the settings, after the kit has set the servers' addresses.
    pub fn configure(mut self, configure: impl FnOnce(&mut Settings) + Send + 'a) -> Self {
        self.configure.push(Box::new(configure));
        self
    }

    /// Reloads the live section whenever the file at `path` changes (checked
    /// every 20 ms).
    pub fn watch_config(mut self, path: PathBuf) -> Self {
        self.watch = Some(path);
        self
    }

    /// A client whose every request must be answered within `timeout`.
    pub fn client_timeout(mut self, timeout: Duration) -> Self {
        self.client_timeout = Some(timeout);
        self
    }

    /// Starts the servers and computes the settings, without the app: for a
    /// test that puts something between them (a proxy) first.
    pub async fn prepare(self) -> Prepared {
        let shards = match (self.shards, self.settings.is_some()) {
            (ShardChoice::Shared(n), false) => ShardServers::Shared(servers::shared_cluster(n)),
            (ShardChoice::Shared(n), true) if self.settings_name_shared => {
                ShardServers::Shared(servers::shared_cluster(n))
            }
            (_, true) => ShardServers::Given,
            (ShardChoice::Own(n, location), false) => {
                ShardServers::Own(servers::cluster(n, location).await)
            }
            (ShardChoice::OwnReplicated(n, replicas), false) => {
                ShardServers::Own(servers::replicated_cluster(n, replicas).await)
            }
        };
        let mut settings = match (self.settings, &shards) {
            (Some(settings), _) => settings,
            (None, ShardServers::Shared(c)) => c.settings().expect("settings"),
            (None, ShardServers::Own(c)) => c.settings().expect("settings"),
            (None, ShardServers::Given) => unreachable!("given shards come with settings"),
        };
        let redis = match self.redis {
            RedisChoice::None => RedisServers::None,
            RedisChoice::At(url) => {
                settings.redis.url = url;
                RedisServers::None
            }
            RedisChoice::Own => {
                let redis = servers::redis().await;
                settings.redis.url = redis.url();
                RedisServers::Own(redis)
            }
            RedisChoice::OwnCluster(masters) => {
                let cluster = servers::redis_cluster(masters).await;
                settings.redis.url = cluster.urls().join(",");
                settings.redis.cluster = true;
                RedisServers::OwnCluster(cluster)
            }
        };
        for configure in self.configure {
            configure(&mut settings);
        }
        Prepared {
            settings,
            shards,
            redis,
            watch: self.watch,
            client_timeout: self.client_timeout,
        }
    }

    pub async fn start(self) -> TestApp {
        self.prepare().await.start().await
    }
}

/// Servers started and settings computed; the app not yet built.
pub struct Prepared {
    /// What the app will be built from; the test may still change it.
    pub settings: Settings,
    shards: ShardServers,
    redis: RedisServers,
    watch: Option<PathBuf>,
    client_timeout: Option<Duration>,
}

impl Prepared {
    /// The shard servers (shared or own).
    pub fn shard_servers(&self) -> &LocalCluster {
        shard_servers(&self.shards)
    }

    /// Builds the app from [`Self::settings`] and serves it.
    pub async fn start(self) -> TestApp {
        let app = App::build(&self.settings)
            .await
            .unwrap_or_else(|e| panic!("building the app: {e:#}"));
        let addr = app.local_addr().expect("the app's address");
        let live = app.live().clone();
        if let Some(path) = self.watch {
            app.watch_config(path, Duration::from_millis(20));
        }
        // reqwest's TLS takes the process's default provider.
        chatshard::crypto::install_default_provider();
        let mut http = reqwest::Client::builder();
        if let Some(timeout) = self.client_timeout {
            http = http.timeout(timeout);
        }
        TestApp {
            base: format!("http://{addr}"),
            http: http.build().expect("client"),
            settings: self.settings,
            live,
            server: Server::spawn(app),
            shards: self.shards,
            redis: self.redis,
        }
    }
}

fn shard_servers(shards: &ShardServers) -> &LocalCluster {
    match shards {
        ShardServers::Shared(cluster) => cluster,
        ShardServers::Own(cluster) => cluster,
        ShardServers::Given => panic!("this app runs on shards its settings named"),
    }
}

/// How the server task ended.
#[derive(Debug, Clone)]
enum Ended {
    Stopped,
    Failed(String),
}

/// The task that runs `App::run`, and what became of it.
struct Server {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    ended: Arc<Mutex<Option<Ended>>>,
}

impl Server {
    fn spawn(app: App) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let ended = Arc::new(Mutex::new(None));
        let record = ended.clone();
        let task = tokio::spawn(async move {
            // A dropped sender (the TestApp dropped) stops it too.
            let run = app.run(async {
                let _ = stopped.await;
            });
            let outcome = match AssertUnwindSafe(run).catch_unwind().await {
                Ok(Ok(())) => Ended::Stopped,
                Ok(Err(e)) => Ended::Failed(format!("returned an error: {e:#}")),
                Err(panic) => Ended::Failed(format!("panicked: {}", panic_message(&*panic))),
            };
            *record.lock().unwrap_or_else(PoisonError::into_inner) = Some(outcome);
        });
        Self {
            stop: Some(stop),
            task: Some(task),
            ended,
        }
    }

    fn ended(&self) -> Option<Ended> {
        self.ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// What went wrong with the server, if it ended while nobody asked.
    fn unasked_end(&self) -> Option<String> {
        match (self.ended(), self.stop.is_some()) {
            (Some(Ended::Failed(why)), _) => Some(format!("the server {why}")),
            (Some(Ended::Stopped), true) => Some("the server stopped on its own".to_owned()),
            _ => None,
        }
    }

    /// Asks the server to stop as Ctrl-C would, waits for its task, and fails
    /// with its error or panic.
    async fn stop_and_wait(&mut self) {
        if let Some(why) = self.unasked_end() {
            panic!("{why}");
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(STOP_TIMEOUT, task)
                .await
                .unwrap_or_else(|_| panic!("the server did not stop within {STOP_TIMEOUT:?}"))
                .expect("the server task");
        }
        if let Some(Ended::Failed(why)) = self.ended() {
            panic!("the server {why}");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.task.is_none() {
            return;
        }
        let unasked = self.unasked_end();
        // Stops it (the receiver sees the sender dropped).
        self.stop.take();
        if let Some(why) = unasked
            && !std::thread::panicking()
        {
            panic!("{why}");
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".to_owned()
    }
}

/// A running chatshard, its servers, and a client of it.
pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub settings: Settings,
    pub live: Arc<Live>,
    server: Server,
    shards: ShardServers,
    redis: RedisServers,
}

impl TestApp {
    /// An app on [`DEFAULT_SHARDS`] shared shards, no Redis, settings left
    /// at their defaults; see [`Builder`] for the rest.
    pub fn builder<'a>() -> Builder<'a> {
        Builder {
            shards: ShardChoice::Shared(DEFAULT_SHARDS),
            redis: RedisChoice::None,
            settings: None,
            settings_name_shared: false,
            configure: Vec::new(),
            watch: None,
            client_timeout: None,
        }
    }

    /// A builder starting from the default shared shards' settings changed
    /// by `configure` (which, unlike [`Builder::configure`], need not be
    /// `Send`).
    fn shared_with<'a>(configure: impl FnOnce(&mut Settings)) -> Builder<'a> {
        let mut settings = shared_settings(DEFAULT_SHARDS);
        configure(&mut settings);
        let mut builder = Self::builder().settings(settings);
        builder.settings_name_shared = true;
        builder
    }

    pub async fn spawn() -> Self {
        Self::builder().start().await
    }

    pub async fn spawn_with(configure: impl FnOnce(&mut Settings)) -> Self {
        Self::shared_with(configure).start().await
    }

    /// An app whose live section follows `path` (checked every 20 ms).
    pub async fn spawn_watching(path: PathBuf, configure: impl FnOnce(&mut Settings)) -> Self {
        Self::shared_with(configure)
            .watch_config(path)
            .start()
            .await
    }

    /// An app on the given settings (another app's, or fresh databases).
    pub async fn spawn_on(mut settings: Settings, configure: impl FnOnce(&mut Settings)) -> Self {
        configure(&mut settings);
        Self::builder().settings(settings).start().await
    }

    /// Shuts the app down as Ctrl-C would and waits until it stopped;
    /// fails with the server's error or panic, if it had one.
    pub async fn shut_down(mut self) {
        self.server.stop_and_wait().await;
    }

    /// The shard servers (shared or own).
    pub fn shard_servers(&self) -> &LocalCluster {
        shard_servers(&self.shards)
    }

    /// This app's own shard servers, to kill, stop or restart one.
    pub fn own_shard_servers(&mut self) -> &mut LocalCluster {
        match &mut self.shards {
            ShardServers::Own(cluster) => cluster,
            _ => panic!("this app does not own its shards"),
        }
    }

    /// This app's own `redis-server`.
    pub fn own_redis(&mut self) -> &mut LocalRedis {
        match &mut self.redis {
            RedisServers::Own(redis) => redis,
            _ => panic!("this app does not own a redis-server"),
        }
    }

    /// This app's own Redis Cluster.
    pub fn own_redis_cluster(&mut self) -> &mut LocalRedisCluster {
        match &mut self.redis {
            RedisServers::OwnCluster(cluster) => cluster,
            _ => panic!("this app does not own a Redis Cluster"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request; a transport failure fails the test, with the
    /// server's own error if it is gone.
    pub async fn send(&self, request: RequestBuilder) -> Response {
        match request.send().await {
            Ok(r) => r,
            Err(e) => match self.server.unasked_end() {
                Some(why) => panic!("request failed ({e}): {why}"),
                None => panic!("request failed: {e}"),
            },
        }
    }

    pub async fn get(&self, path: &str) -> Response {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn put_chat(&self, chat: &str, body: Option<Value>) -> Response {
        let mut req = self.http.put(self.url(&format!("/v1/chats/{chat}")));
        if let Some(body) = body {
            req = req.json(&body);
        }
        self.send(req).await
    }

    /// Creates a chat and asserts 201.
    pub async fn new_chat(&self, prefix: &str) -> String {
        let chat = unique(prefix);
        let r = self.put_chat(&chat, None).await;
        assert_eq!(r.status(), StatusCode::CREATED, "create {chat}");
        chat
    }

    /// A request with the admin token (tests that use it set `admin.token`).
    pub fn admin(&self, method: Method, path: &str) -> RequestBuilder {
        metrics::admin(
            &self.http,
            &self.base,
            &self.settings.admin.token,
            method,
            path,
        )
    }

    /// `GET` of an admin route, asserting 200.
    pub async fn admin_get(&self, path: &str) -> Value {
        metrics::admin_get(&self.http, &self.base, &self.settings.admin.token, path).await
    }

    /// A merge patch of the live configuration, asserting 200; the answer.
    pub async fn patch_config(&self, patch: &str) -> Value {
        let r = self
            .send(
                self.admin(Method::PATCH, "/v1/admin/config")
                    .header("content-type", "application/merge-patch+json")
                    .body(patch.to_owned()),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK, "PATCH /v1/admin/config");
        r.json().await.expect("json")
    }

    /// `/v1/admin/shards`: each shard's breaker, bulkhead and refusals.
    pub async fn admin_shards(&self) -> Vec<Value> {
        self.admin_get("/v1/admin/shards").await["shards"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// `/v1/admin/fleet`.
    pub async fn fleet(&self) -> Value {
        self.admin_get("/v1/admin/fleet").await
    }

    /// Prometheus samples of `/metrics` named `metric`.
    pub async fn metric(&self, metric: &str) -> Vec<(String, f64)> {
        metrics::metric_samples(&self.http, &self.base, metric).await
    }

    /// The sum of `metric` over the samples whose labels contain every one of
    /// `labels` (each `key="value"`).
    pub async fn metric_sum(&self, metric: &str, labels: &[&str]) -> f64 {
        metrics::sum_where(&self.metric(metric).await, labels)
    }

    pub async fn join(&self, chat: &str, user: &str) -> Response {
        self.send(
            self.http
                .post(self.url(&format!("/v1/chats/{chat}/members")))
                .json(&json!({ "userId": user })),
        )
        .await
    }

    /// Joins users `u0`..`u{n-1}` to `chat` all at once; the answers' statuses.
    pub async fn join_many(&self, chat: &str, n: usize) -> Vec<StatusCode> {
        futures::future::join_all(
            (0..n).map(|i| async move { self.join(chat, &format!("u{i}")).await.status() }),
        )
        .await
    }

    /// Joins `writers` users `w0`.. to `chat`; the revisions they will have
    /// written once [`Self::post_concurrently`] is done.
    pub async fn join_writers(&self, chat: &str, writers: usize, posts: usize) -> u64 {
        for w in 0..writers {
            assert_eq!(
                self.join(chat, &format!("w{w}")).await.status(),
                StatusCode::CREATED
            );
        }
        (writers * (posts + 1)) as u64
    }

    /// `writers` concurrent writers each post `posts` messages to `chat`.
    pub async fn post_concurrently(&self, chat: &str, writers: usize, posts: usize) {
        futures::future::join_all((0..writers).map(|w| async move {
            for i in 0..posts {
                let r = self
                    .post(chat, &format!("w{w}"), &format!("k{i}"), "x")
                    .await;
                assert_eq!(r.status(), StatusCode::CREATED);
            }
        }))
        .await;
    }

    pub async fn leave(&self, chat: &str, user: &str) -> Response {
        self.send(
            self.http
                .delete(self.url(&format!("/v1/chats/{chat}/members/{user}"))),
        )
        .await
    }

    pub async fn post(&self, chat: &str, sender: &str, key: &str, text: &str) -> Response {
        self.send(
            self.http
                .post(self.url(&format!("/v1/chats/{chat}/messages")))
                .json(&json!({ "senderId": sender, "clientMessageId": key, "text": text })),
        )
        .await
    }

    pub async fn count(&self, chat: &str) -> u64 {
        let r = self.get(&format!("/v1/chats/{chat}/member-count")).await;
        assert_eq!(r.status(), StatusCode::OK);
        r.json::<Value>().await.expect("json")["memberCount"]
            .as_u64()
            .expect("count")
    }

    /// All events of a chat, following pages.
    pub async fn all_events(&self, chat: &str) -> Vec<Value> {
        let mut after = 0;
        let mut out = Vec::new();
        loop {
            let r = self
                .get(&format!("/v1/chats/{chat}/events?after={after}&limit=500"))
                .await;
            assert_eq!(r.status(), StatusCode::OK);
            let page: Value = r.json().await.expect("json");
            let events = page["events"].as_array().cloned().unwrap_or_default();
            if events.is_empty() {
                return out;
            }
            after = events
                .last()
                .and_then(|e| e["revision"].as_u64())
                .expect("revision");
            out.extend(events);
        }
    }

    /// The chat's event stream at `path`, which must open.
    pub async fn open_stream(&self, path: &str) -> SseReader {
        SseReader::open(&self.http, &self.base, path, None)
            .await
            .unwrap_or_else(|r| panic!("stream {path} refused: {}", r.status()))
    }

    /// `GET /v1/chats/{chat}`, asserting 200: the chat as the API shows it.
    pub async fn chat_body(&self, chat: &str) -> Value {
        let r = self.get(&format!("/v1/chats/{chat}")).await;
        assert_eq!(r.status(), StatusCode::OK, "reading chat {chat}");
        r.json().await.expect("json")
    }

    /// The name of the shard that stores a chat, from the API.
    pub async fn shard_name_of(&self, chat: &str) -> String {
        self.chat_body(chat).await["shard"]
            .as_str()
            .expect("shard")
            .to_owned()
    }

    /// The index of the shard named `name` in the settings.
    pub fn shard_index(&self, name: &str) -> usize {
        self.settings
            .shards
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("no shard {name}"))
    }

    /// The index of the shard that stores a chat, from the API.
    pub async fn shard_of(&self, chat: &str) -> usize {
        self.shard_index(&self.shard_name_of(chat).await)
    }

    /// A direct connection to a shard, for asserting on rows.
    pub async fn db(&self, shard: usize) -> MySqlConnection {
        MySqlConnection::connect(&self.settings.shards[shard].url)
            .await
            .expect("connect")
    }

    /// (member_count, JOINED rows) of a chat, read from its shard.
    pub async fn count_and_rows(&self, chat: &str) -> (i64, i64) {
        let mut db = self.db(self.shard_of(chat).await).await;
        rows::count_and_rows(&mut db, chat).await
    }
}
