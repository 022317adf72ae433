//! The api binary's harness: three real `mariadbd` shards started once per test
//! binary (`common::shared_cluster`), and a typed client of an app that every
//! test builds on port 0; each test uses its own chat ids.

use std::sync::atomic::{AtomicU64, Ordering};

use chatshard::app::App;
use chatshard::config::Settings;
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};
use sqlx::{Connection, MySqlConnection};

use crate::common;

pub const SHARDS: usize = 3;

/// Settings for the shared shards, with every other value at its default.
pub fn settings() -> Settings {
    common::shared_cluster(SHARDS).settings().expect("settings")
}

/// A unique id for this process (tests share the shards).
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub settings: Settings,
    pub live: std::sync::Arc<chatshard::live::Live>,
    server: tokio::task::JoinHandle<()>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(configure: impl FnOnce(&mut Settings)) -> Self {
        Self::start(configure, None).await
    }

    /// An app whose live section follows `path` (checked every 20 ms).
    pub async fn spawn_watching(
        path: std::path::PathBuf,
        configure: impl FnOnce(&mut Settings),
    ) -> Self {
        Self::start(configure, Some(path)).await
    }

    /// An app on the given settings (e.g. [`isolated_settings`]).
    pub async fn spawn_on(mut settings: Settings, configure: impl FnOnce(&mut Settings)) -> Self {
        configure(&mut settings);
        Self::start_from(settings, None).await
    }

    async fn start(
        configure: impl FnOnce(&mut Settings),
        watch: Option<std::path::PathBuf>,
    ) -> Self {
        let mut settings = settings();
        configure(&mut settings);
        Self::start_from(settings, watch).await
    }

    async fn start_from(settings: Settings, watch: Option<std::path::PathBuf>) -> Self {
        let app = App::build(&settings).await.expect("build app");
        let addr = app.local_addr().expect("addr");
        let live = app.live().clone();
        if let Some(path) = watch {
            app.watch_config(path, std::time::Duration::from_millis(20));
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = app
                .run(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Self {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            settings,
            live,
            server,
            stop: Some(stop),
        }
    }

    /// Shuts the app down as Ctrl-C would and waits until it stopped.
    pub async fn shut_down(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.server).await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.http.get(self.url(path)).send().await.expect("request")
    }

    pub async fn put_chat(&self, chat: &str, body: Option<Value>) -> Response {
        let mut req = self.http.put(self.url(&format!("/v1/chats/{chat}")));
        if let Some(body) = body {
            req = req.json(&body);
        }
        req.send().await.expect("request")
    }

    /// Creates a chat and asserts 201.
    pub async fn new_chat(&self, prefix: &str) -> String {
        let chat = unique(prefix);
        let r = self.put_chat(&chat, None).await;
        assert_eq!(r.status(), StatusCode::CREATED, "create {chat}");
        chat
    }

    /// A request with the admin token (tests that use it set `admin.token`).
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        common::admin(
            &self.http,
            &self.base,
            &self.settings.admin.token,
            method,
            path,
        )
    }

    /// `GET` of an admin route, asserting 200.
    pub async fn admin_get(&self, path: &str) -> Value {
        common::admin_get(&self.http, &self.base, &self.settings.admin.token, path).await
    }

    pub async fn join(&self, chat: &str, user: &str) -> Response {
        self.http
            .post(self.url(&format!("/v1/chats/{chat}/members")))
            .json(&json!({ "userId": user }))
            .send()
            .await
            .expect("request")
    }

    /// Joins users `u0`..`u{n-1}` to `chat` all at once; the answers' statuses.
    pub async fn join_many(&self, chat: &str, n: usize) -> Vec<reqwest::StatusCode> {
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
        self.http
            .delete(self.url(&format!("/v1/chats/{chat}/members/{user}")))
            .send()
            .await
            .expect("request")
    }

    pub async fn post(&self, chat: &str, sender: &str, key: &str, text: &str) -> Response {
        self.http
            .post(self.url(&format!("/v1/chats/{chat}/messages")))
            .json(&json!({ "senderId": sender, "clientMessageId": key, "text": text }))
            .send()
            .await
            .expect("request")
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

    /// `GET /v1/chats/{chat}`, asserting 200: the chat as the API shows it.
    pub async fn chat_body(&self, chat: &str) -> Value {
        let r = self.get(&format!("/v1/chats/{chat}")).await;
        assert_eq!(r.status(), StatusCode::OK, "reading chat {chat}");
        r.json().await.expect("json")
    }

    /// The index of the shard that stores a chat, from the API.
    pub async fn shard_of(&self, chat: &str) -> usize {
        let body = self.chat_body(chat).await;
        let name = body["shard"].as_str().expect("shard").to_owned();
        self.settings
            .shards
            .iter()
            .position(|s| s.name == name)
            .expect("known shard")
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
        common::count_and_rows(&mut db, chat).await
    }
}

/// Asserts a problem+json answer with the given status and code.
pub async fn assert_problem(r: Response, status: u16, code: &str) -> Value {
    assert_eq!(r.status().as_u16(), status, "status");
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert_eq!(ct, "application/problem+json", "content type");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status, "{body}");
    assert!(
        body["type"].as_str().is_some_and(|t| t.ends_with(code)),
        "{body}"
    );
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "{body}"
    );
    body
}

/// Settings whose shards are fresh databases of their own on the shared
/// servers (`chatshard_<tag>_<n>`, migrated): for tests of work that walks
/// whole shards (the purge, the digest check), so that no other test's chats
/// are in their way, nor theirs in others'.
pub async fn isolated_settings(tag: &str) -> Settings {
    let mut settings = settings();
    for (i, shard) in settings.shards.iter_mut().enumerate() {
        let (server, _) = shard.url.rsplit_once('/').expect("url with a database");
        let database = format!("chatshard_{tag}_{}_{i}", std::process::id());
        let mut admin = MySqlConnection::connect(&format!("{server}/mysql"))
            .await
            .expect("connect");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {database}"
        )))
        .execute(&mut admin)
        .await
        .expect("drop database");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
            .execute(&mut admin)
            .await
            .expect("create database");
        shard.url = format!("{server}/{database}");
        chatshard::migrate::migrate_shard(shard)
            .await
            .expect("migrate");
    }
    settings
}
