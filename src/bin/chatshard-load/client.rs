//! The HTTP side of a run: [`Target`], a chatshard instance (and the other
//! instances of its fleet) with the requests the scenarios make of it, each
//! answer reduced to `status` or `status/code`; and [`run_id`], the unique
//! names of a run's chats.

use std::time::Instant;

use serde_json::{Value, json};

use crate::report::Recorder;

/// A chatshard instance over HTTP.
#[derive(Clone)]
pub struct Target {
    pub http: reqwest::Client,
    pub base: String,
    pub admin_token: Option<String>,
    /// Other instances of the same fleet (`--also`).
    pub others: Vec<String>,
}

/// Members a chat of a run takes before the run moves to a fresh chat (below
/// chatshard's largest `maxMembers`, 100,000).
pub const MEMBERS_PER_CHAT: u64 = 90_000;

/// A unique name for this run.
pub fn run_id(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1_000_000_000_000)
        .unwrap_or(0);
    format!("{prefix}-{nanos}")
}

impl Target {
    /// The same target at the `i`-th instance of the fleet (this one and
    /// `--also`, in turn).
    pub fn instance(&self, i: usize) -> Target {
        let n = self.others.len() + 1;
        let base = match i % n {
            0 => self.base.clone(),
            k => self.others[k - 1].clone(),
        };
        Target {
            base,
            ..self.clone()
        }
    }

    /// Every instance: this one, then `--also`.
    pub fn instances(&self) -> Vec<Target> {
        (0..=self.others.len()).map(|i| self.instance(i)).collect()
    }

    /// Sets one chat's overrides of a live section (`hotChat`,
    /// `joinThrottle`, `retention`); needs the admin token.
    pub async fn set_override(
        &self,
        section: &str,
        chat: &str,
        fields: Value,
    ) -> anyhow::Result<()> {
        let Some(token) = &self.admin_token else {
            anyhow::bail!("--admin-token is needed to change the live configuration");
        };
        let patch = json!({ section: {"overrides": {chat: fields}} });
        let request = self
            .http
            .patch(format!("{}/v1/admin/config", self.base))
            .bearer_auth(token)
            .header("content-type", "application/merge-patch+json")
            .body(patch.to_string());
        expect_success(request, "changing the live configuration").await
    }

    /// Event-page queries the instances (this one and `--also`) have sent
    /// to their shards (admin view).
    pub async fn fetch_queries(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        for instance in self.instances() {
            total += instance.fetch_queries_here().await?;
        }
        Ok(total)
    }

    /// `GET` of an admin route on this instance, as JSON (`what` says why
    /// the token is needed when it is missing).
    pub async fn admin_json(&self, path: &str, what: &str) -> anyhow::Result<Value> {
        let Some(token) = &self.admin_token else {
            anyhow::bail!("--admin-token is needed to read {what}");
        };
        Ok(self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?)
    }

    async fn fetch_queries_here(&self) -> anyhow::Result<u64> {
        let v = self
            .admin_json("/v1/admin/hot-chats", "the shard queries")
            .await?;
        Ok(v["decisions"]["fetchQueries"].as_u64().unwrap_or(0))
    }

    /// Makes a chat with the poster `poster` joined; the shard it is on.
    pub async fn chat_with_poster(&self, chat: &str, poster: &str) -> anyhow::Result<String> {
        let r = self
            .http
            .put(format!("{}/v1/chats/{chat}", self.base))
            .json(&json!({"maxMembers": 100_000}))
            .send()
            .await?;
        anyhow::ensure!(
            r.status().is_success(),
            "creating chat {chat}: {}",
            r.status()
        );
        let shard = r.json::<Value>().await?["shard"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let join = self
            .http
            .post(format!("{}/v1/chats/{chat}/members", self.base))
            .json(&json!({ "userId": poster }));
        expect_success(join, "joining the poster").await?;
        Ok(shard)
    }

    /// Joins `user` to `chat`, timed and recorded under `kind`; its answer.
    pub async fn join(
        &self,
        recorder: &Recorder,
        kind: &'static str,
        chat: &str,
        user: &str,
    ) -> (String, bool) {
        let started = Instant::now();
        let request = self
            .http
            .post(format!("{}/v1/chats/{chat}/members", self.base))
            .json(&json!({ "userId": user }));
        let (answer, ok) = self.call(request).await;
        recorder.record(kind, started.elapsed(), &answer, ok);
        (answer, ok)
    }

    /// Reads the member count of `chat`, timed and recorded under `kind`.
    pub async fn read_count(&self, recorder: &Recorder, kind: &'static str, chat: &str) {
        let started = Instant::now();
        let request = self
            .http
            .get(format!("{}/v1/chats/{chat}/member-count", self.base));
        let (answer, ok) = self.call(request).await;
        recorder.record(kind, started.elapsed(), &answer, ok);
    }

    /// Posts one message; its answer.
    pub async fn post(&self, chat: &str, poster: &str, key: &str) -> (String, bool) {
        let request = self
            .http
            .post(format!("{}/v1/chats/{chat}/messages", self.base))
            .json(&json!({"senderId": poster, "clientMessageId": key, "text": "load"}));
        self.call(request).await
    }

    /// The text of `/metrics`, if it can be read.
    pub async fn metrics_text(&self) -> Option<String> {
        self.http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()
    }

    /// The sum of a metric's samples on `/metrics`, if it can be read.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        self.metric_where(name, &[]).await
    }

    /// The sum of the samples of `name` whose labels hold every one of
    /// `labels` (each `key="value"`).
    pub async fn metric_where(&self, name: &str, labels: &[&str]) -> Option<f64> {
        let text = self.metrics_text().await?;
        Some(
            text.lines()
                .filter(|l| {
                    l.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with([' ', '{']))
                        && labels.iter().all(|want| l.contains(want))
                })
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum(),
        )
    }

    /// What `GET /v1/chats/{chatId}` says of a chat.
    pub async fn chat_view(&self, chat: &str) -> anyhow::Result<Value> {
        let view = self
            .http
            .get(format!("{}/v1/chats/{chat}", self.base))
            .send()
            .await?
            .json()
            .await?;
        Ok(view)
    }

    /// The shard a chat is on, as `GET /v1/chats/{chatId}` names it.
    pub async fn shard_of(&self, chat: &str) -> anyhow::Result<String> {
        let info = self.chat_view(chat).await?;
        Ok(info["shard"].as_str().unwrap_or_default().to_owned())
    }

    pub async fn create_chat(&self, chat: &str) -> anyhow::Result<()> {
        let request = self
            .http
            .put(format!("{}/v1/chats/{chat}", self.base))
            .json(&json!({"maxMembers": 100_000}));
        expect_success(request, &format!("creating chat {chat}")).await
    }

    /// Turns the join throttle of `chat` on or off (needs the admin token).
    pub async fn set_join_throttle(&self, chat: &str, enabled: bool) -> anyhow::Result<()> {
        self.set_override("joinThrottle", chat, json!({ "enabled": enabled }))
            .await
    }

    /// Sets a retention override for `chat`: its events past its last
    /// `min_revisions` go at the shard's next purge round, whatever their age
    /// (needs the admin token).
    pub async fn purge_down_to(&self, chat: &str, min_revisions: u64) -> anyhow::Result<()> {
        let fields = json!({ "enabled": true, "minDays": 0, "minRevisions": min_revisions });
        self.set_override("retention", chat, fields).await
    }

    /// One request; its answer as `status` or `status/code`, and whether it
    /// is a success.
    pub async fn call(&self, request: reqwest::RequestBuilder) -> (String, bool) {
        match request.send().await {
            Ok(r) => {
                let status = r.status();
                if status.is_success() {
                    // Read the body: the request is done when its answer is.
                    let _ = r.bytes().await;
                    (status.as_u16().to_string(), true)
                } else {
                    (
                        format!("{}/{}", status.as_u16(), problem_code(r).await),
                        false,
                    )
                }
            }
            Err(e) if e.is_timeout() => ("error/timeout".to_owned(), false),
            Err(e) if e.is_connect() => ("error/connect".to_owned(), false),
            Err(_) => ("error/other".to_owned(), false),
        }
    }
}

/// Sends a set-up request; an answer that is not 2xx is an error naming `what`.
async fn expect_success(request: reqwest::RequestBuilder, what: &str) -> anyhow::Result<()> {
    let r = request.send().await?;
    anyhow::ensure!(
        r.status().is_success(),
        "{what}: {} {}",
        r.status(),
        r.text().await.unwrap_or_default()
    );
    Ok(())
}

/// The problem `code` of a refusal's body, or nothing.
pub async fn problem_code(r: reqwest::Response) -> String {
    r.json::<Value>()
        .await
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_owned))
        .unwrap_or_default()
}
