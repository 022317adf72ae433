//! The scenarios. Each is bounded by a duration (and the clients it runs),
//! sends traffic only to the addresses it is given, and records into a
//! [`Recorder`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chatshard::domain::{EventType, MemberState};
use chatshard::service::now;
use chatshard::storage::{chats, events, members};
use serde_json::{Value, json};
use sqlx::{Connection, MySqlConnection};
use tokio::sync::Mutex;

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
const MEMBERS_PER_CHAT: u64 = 90_000;

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

    async fn fetch_queries_here(&self) -> anyhow::Result<u64> {
        let Some(token) = &self.admin_token else {
            anyhow::bail!("--admin-token is needed to read the shard queries");
        };
        let v: Value = self
            .http
            .get(format!("{}/v1/admin/hot-chats", self.base))
            .bearer_auth(token)
            .send()
            .await?
            .json()
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

    /// Joins `user` to `chat`, timed and recorded under `kind`.
    async fn join(&self, recorder: &Recorder, kind: &'static str, chat: &str, user: &str) {
        let started = Instant::now();
        let request = self
            .http
            .post(format!("{}/v1/chats/{chat}/members", self.base))
            .json(&json!({ "userId": user }));
        let (answer, ok) = self.call(request).await;
        recorder.record(kind, started.elapsed(), &answer, ok);
    }

    /// Posts one message; its answer.
    async fn post(&self, chat: &str, poster: &str, key: &str) -> (String, bool) {
        let request = self
            .http
            .post(format!("{}/v1/chats/{chat}/messages", self.base))
            .json(&json!({"senderId": poster, "clientMessageId": key, "text": "load"}));
        self.call(request).await
    }

    /// The sum of a metric's samples on `/metrics`, if it can be read.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        self.metric_where(name, &[]).await
    }

    /// The sum of the samples of `name` whose labels hold every one of
    /// `labels` (each `key="value"`).
    pub async fn metric_where(&self, name: &str, labels: &[&str]) -> Option<f64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
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

    /// The shard a chat is on, as `GET /v1/chats/{chatId}` names it.
    pub async fn shard_of(&self, chat: &str) -> anyhow::Result<String> {
        let info: Value = self
            .http
            .get(format!("{}/v1/chats/{chat}", self.base))
            .send()
            .await?
            .json()
            .await?;
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
    async fn call(&self, request: reqwest::RequestBuilder) -> (String, bool) {
        match request.send().await {
            Ok(r) => {
                let status = r.status();
                if status.is_success() {
                    // Read the body: the request is done when its answer is.
                    let _ = r.bytes().await;
                    (status.as_u16().to_string(), true)
                } else {
                    let code = r
                        .json::<Value>()
                        .await
                        .ok()
                        .and_then(|v| v["code"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    (format!("{}/{code}", status.as_u16()), false)
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

/// `join-spike`: `clients` clients join new users to one chat as fast as they
/// are admitted, for `duration`.
pub async fn join_spike(
    target: &Target,
    recorder: &Recorder,
    clients: usize,
    duration: Duration,
    throttle: bool,
    service_pid: Option<u32>,
) -> anyhow::Result<Value> {
    let run = run_id("spike");
    let chats = Arc::new(ChatRotation::new(target.clone(), run.clone()));
    let first = chats.current().await?;
    if target.admin_token.is_some() {
        target.set_join_throttle(&first, throttle).await?;
    }
    let users = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let cpu_before = service_pid.and_then(process_usage);
    recorder.mark("spike start");
    // With --also, the clients are spread over the fleet's instances.
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let (target, recorder, chats, users) = (
                target.instance(i),
                recorder.clone(),
                chats.clone(),
                users.clone(),
            );
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let n = users.fetch_add(1, Ordering::Relaxed);
                    let chat = match chats.for_member(n, throttle).await {
                        Ok(chat) => chat,
                        Err(e) => return Err(e),
                    };
                    target
                        .join(&recorder, "join", &chat, &format!("u{n}"))
                        .await;
                }
                Ok::<(), anyhow::Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let joined = recorder.ok_count("join");
    let cpu = match (cpu_before, service_pid.and_then(process_usage)) {
        (Some((_, a)), Some((_, b))) if joined > 0 => json!({
            "serviceCores": (b - a) / duration.as_secs_f64(),
            "serviceCpuMicrosPerJoin": (b - a) * 1e6 / joined as f64,
        }),
        _ => Value::Null,
    };
    Ok(json!({
        "name": "join-spike",
        "cpu": cpu,
        "clients": clients,
        "instances": target.others.len() + 1,
        "durationSeconds": duration.as_secs_f64(),
        "joinThrottle": if target.admin_token.is_some() { json!(throttle) } else { json!("as configured") },
        "chats": chats.created().await,
    }))
}

/// The chats of a spike: a fresh one every [`MEMBERS_PER_CHAT`] members.
struct ChatRotation {
    target: Target,
    run: String,
    chats: Mutex<Vec<String>>,
}

impl ChatRotation {
    fn new(target: Target, run: String) -> Self {
        Self {
            target,
            run,
            chats: Mutex::new(Vec::new()),
        }
    }

    async fn current(&self) -> anyhow::Result<String> {
        self.for_member(0, true).await
    }

    async fn for_member(&self, n: u64, throttle: bool) -> anyhow::Result<String> {
        let index = (n / MEMBERS_PER_CHAT) as usize;
        let mut chats = self.chats.lock().await;
        while chats.len() <= index {
            let chat = format!("{}-{}", self.run, chats.len());
            self.target.create_chat(&chat).await?;
            if !chats.is_empty() && self.target.admin_token.is_some() {
                self.target.set_join_throttle(&chat, throttle).await?;
            }
            chats.push(chat);
        }
        Ok(chats[index].clone())
    }

    async fn created(&self) -> usize {
        self.chats.lock().await.len()
    }
}

/// `direct-sql`: what the shard itself sustains for one chat without
/// chatshard: `clients` connections, each committing one transaction per
/// join with the same statements a group-commit batch of one runs (lock the
/// chat row, insert the member, append the event, bump revision and count),
/// and then the batched ceiling: `batch` joins per transaction.
pub async fn direct_sql(
    shard_url: &str,
    recorder: &Recorder,
    clients: usize,
    duration: Duration,
    batch: usize,
) -> anyhow::Result<Value> {
    let mut setup = MySqlConnection::connect(shard_url).await?;
    let mut results = Vec::new();
    for (kind, per_txn) in [("direct_join", 1), ("direct_batched", batch.max(1))] {
        let run = run_id(kind);
        let chat = run.clone();
        chats::insert(&mut setup, &chat, 1_000_000, now()).await?;
        let users = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + duration;
        recorder.mark(&format!("{kind} start"));
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let (recorder, users, chat, url) = (
                    recorder.clone(),
                    users.clone(),
                    chat.clone(),
                    shard_url.to_owned(),
                );
                tokio::spawn(async move {
                    let mut conn = MySqlConnection::connect(&url).await?;
                    sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                        .execute(&mut conn)
                        .await?;
                    while Instant::now() < deadline {
                        let first = users.fetch_add(per_txn as u64, Ordering::Relaxed);
                        let names: Vec<String> = (first..first + per_txn as u64)
                            .map(|n| format!("u{n}"))
                            .collect();
                        let started = Instant::now();
                        let result = join_in_one_transaction(&mut conn, &chat, &names).await;
                        let took = started.elapsed();
                        match result {
                            Ok(()) => {
                                for _ in &names {
                                    recorder.record(kind, took, "committed", true);
                                }
                            }
                            Err(e) => recorder.record(kind, took, &sql_answer(&e), false),
                        }
                    }
                    Ok::<(), anyhow::Error>(())
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        results.push(json!({"kind": kind, "chat": chat, "joinsPerTransaction": per_txn}));
    }
    Ok(json!({
        "name": "direct-sql",
        "clients": clients,
        "durationSeconds": duration.as_secs_f64(),
        "runs": results,
    }))
}

fn sql_answer(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => format!("sql/{}", db.code().unwrap_or_default()),
        _ => "sql/error".to_owned(),
    }
}

/// Joins `users` to `chat` in one transaction, with chatshard's own
/// statements (one multi-row insert per table, one revision bump, one count
/// adjustment).
async fn join_in_one_transaction(
    conn: &mut MySqlConnection,
    chat: &str,
    users: &[String],
) -> sqlx::Result<()> {
    let mut tx = conn.begin().await?;
    let row = chats::lock(&mut tx, chat)
        .await?
        .ok_or(sqlx::Error::RowNotFound)?;
    let at = now();
    let new: Vec<members::NewMember<'_>> = users
        .iter()
        .map(|u| members::NewMember {
            user_id: u,
            state: MemberState::Joined.code(),
            joined_at: at,
            left_at: None,
        })
        .collect();
    members::insert_many(&mut tx, chat, &new, at).await?;
    let appended: Vec<events::NewEvent<'_>> = users
        .iter()
        .enumerate()
        .map(|(i, u)| events::NewEvent {
            revision: row.revision + 1 + i as u64,
            event_type: EventType::MemberJoined.code(),
            user_id: u,
            message_id: None,
        })
        .collect();
    events::append(&mut tx, chat, &appended, at).await?;
    chats::advance_revision(&mut tx, chat, users.len() as u64).await?;
    chats::adjust_member_count(&mut tx, chat, users.len() as i64).await?;
    tx.commit().await
}

/// `quiet`: one client, sequential joins and count reads on quiet chats
/// through chatshard, then the same operations done directly with sqlx in one
/// transaction (what a chat server would do without chatshard), for
/// `duration` each.
pub async fn quiet(
    target: &Target,
    shard_url: Option<&str>,
    recorder: &Recorder,
    duration: Duration,
) -> anyhow::Result<Value> {
    let run = run_id("quiet");
    let chats: Vec<String> = (0..20).map(|i| format!("{run}-{i}")).collect();
    for chat in &chats {
        target.create_chat(chat).await?;
    }
    recorder.mark("through chatshard");
    let deadline = Instant::now() + duration;
    let mut n = 0u64;
    while Instant::now() < deadline {
        let chat = &chats[(n % chats.len() as u64) as usize];
        target
            .join(recorder, "quiet_join", chat, &format!("q{n}"))
            .await;
        let started = Instant::now();
        let request = target
            .http
            .get(format!("{}/v1/chats/{chat}/member-count", target.base));
        let (answer, ok) = target.call(request).await;
        recorder.record("quiet_count", started.elapsed(), &answer, ok);
        n += 1;
    }
    if let Some(url) = shard_url {
        let mut conn = MySqlConnection::connect(url).await?;
        sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut conn)
            .await?;
        let direct: Vec<String> = (0..20).map(|i| format!("{run}-direct-{i}")).collect();
        for chat in &direct {
            chats::insert(&mut conn, chat, 100_000, now()).await?;
        }
        recorder.mark("direct sqlx");
        let deadline = Instant::now() + duration;
        let mut n = 0u64;
        while Instant::now() < deadline {
            let chat = &direct[(n % direct.len() as u64) as usize];
            let started = Instant::now();
            let result = join_in_one_transaction(&mut conn, chat, &[format!("q{n}")]).await;
            let answer = result
                .as_ref()
                .map_or_else(sql_answer, |()| "committed".to_owned());
            recorder.record("direct_join", started.elapsed(), &answer, result.is_ok());
            let started = Instant::now();
            let result = chats::member_count(&mut conn, chat).await;
            let answer = result
                .as_ref()
                .map_or_else(sql_answer, |_| "read".to_owned());
            recorder.record("direct_count", started.elapsed(), &answer, result.is_ok());
            n += 1;
        }
    }
    Ok(json!({
        "name": "quiet",
        "durationSeconds": duration.as_secs_f64(),
        "direct": shard_url.is_some(),
    }))
}

/// What `/proc` says of a process: resident memory and CPU time used.
fn process_usage(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces): utime is the 14th
    // field of the line, stime the 15th, in clock ticks (100 per second).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((rss_kb * 1024, ticks as f64 / 100.0))
}

/// Makes a multiplexed stream following `chat` after revision 1 and the
/// `quiet` chats from the start (in requests of at most 1,000 chats); its
/// path, or the answer that refused it.
async fn open_mux(
    http: &reqwest::Client,
    base: &str,
    chat: &str,
    quiet: &[String],
) -> Result<String, String> {
    let mut chats = serde_json::Map::new();
    chats.insert(chat.to_owned(), json!(1));
    let answer = |r: reqwest::Response| r.status().as_u16().to_string();
    let mut rest = quiet.chunks(1000);
    for id in rest.next().unwrap_or_default() {
        chats.insert(id.clone(), json!(0));
    }
    let r = http
        .post(format!("{base}/v1/streams"))
        .json(&json!({ "chats": chats }))
        .send()
        .await
        .map_err(|_| "error/connect".to_owned())?;
    if !r.status().is_success() {
        return Err(answer(r));
    }
    let view: Value = r.json().await.map_err(|_| "error/body".to_owned())?;
    let id = view["streamId"].as_str().ok_or("error/body")?.to_owned();
    for ids in rest {
        for id_chat in ids {
            let r = http
                .put(format!("{base}/v1/streams/{id}/chats/{id_chat}"))
                .json(&json!({"after": 0}))
                .send()
                .await
                .map_err(|_| "error/connect".to_owned())?;
            if !r.status().is_success() {
                return Err(answer(r));
            }
        }
    }
    Ok(format!("/v1/streams/{id}"))
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The `createdAt` of one SSE message carrying an event.
fn commit_time(message: &[u8]) -> Option<chrono::DateTime<chrono::Utc>> {
    const KEY: &[u8] = b"\"createdAt\":\"";
    let rest = &message[find(message, KEY)? + KEY.len()..];
    let value = std::str::from_utf8(&rest[..rest.iter().position(|&b| b == b'"')?]).ok()?;
    chrono::DateTime::parse_from_rfc3339(value)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// `fanout`: `subscribers` SSE streams of one chat on one instance while
/// messages are posted at `rate` per second for `duration`. Reports the
/// delivery lag (commit to received), the event reads the chat's shard saw
/// per published event (from the admin view's `fetchQueries`), and, given the
/// service's pid, its memory per subscriber and its CPU.
pub async fn fanout(
    target: &Target,
    recorder: &Recorder,
    subscribers: usize,
    mux_chats: usize,
    rate: f64,
    duration: Duration,
    service_pid: Option<u32>,
) -> anyhow::Result<Value> {
    anyhow::ensure!(
        target.admin_token.is_some(),
        "fanout needs --admin-token (it reads the shard reads from the admin view)"
    );
    let queries = || target.fetch_queries();
    let chat = run_id("fanout");
    target.chat_with_poster(&chat, "poster").await?;
    // With --mux-chats, the quiet chats every multiplexed stream follows too.
    let mut quiet = Vec::new();
    for i in 1..mux_chats {
        let id = format!("{chat}-q{i}");
        target.create_chat(&id).await?;
        quiet.push(id);
    }
    let quiet = Arc::new(quiet);
    let before_usage = service_pid.and_then(process_usage);
    // A client per subscriber: every stream its own connection.
    let opened = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());
    // With --also, the streams are opened on the other instances (spread
    // over them) while the posts go through --url: the lag is then the
    // fleet's, from a commit on one instance to delivery by another.
    let stream_base = |i: usize| match target.others.len() {
        0 => target.base.clone(),
        n => target.others[i % n].clone(),
    };
    let streams: Vec<_> = (0..subscribers)
        .map(|i| {
            let (base, chat, recorder, opened, received, stop, quiet) = (
                stream_base(i),
                chat.clone(),
                recorder.clone(),
                opened.clone(),
                received.clone(),
                stop.clone(),
                quiet.clone(),
            );
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let path = if mux_chats == 0 {
                    format!("/v1/chats/{chat}/events/stream?after=1")
                } else {
                    match open_mux(&http, &base, &chat, &quiet).await {
                        Ok(path) => path,
                        Err(answer) => {
                            recorder.record("stream_open", Duration::ZERO, &answer, false);
                            return;
                        }
                    }
                };
                let response = http.get(format!("{base}{path}")).send().await;
                let mut response = match response {
                    Ok(r) if r.status().is_success() => r,
                    Ok(r) => {
                        recorder.record(
                            "stream_open",
                            Duration::ZERO,
                            &r.status().as_u16().to_string(),
                            false,
                        );
                        return;
                    }
                    Err(_) => {
                        recorder.record("stream_open", Duration::ZERO, "error/connect", false);
                        return;
                    }
                };
                opened.fetch_add(1, Ordering::Relaxed);
                // Only what the figures need is read from each message (its
                // commit time): the tool's CPU is shared with the service.
                let mut buffer: Vec<u8> = Vec::new();
                let mut lags = Vec::new();
                loop {
                    let chunk = tokio::select! {
                        chunk = response.chunk() => chunk,
                        () = stop.notified() => return,
                    };
                    let Ok(Some(chunk)) = chunk else { return };
                    buffer.extend_from_slice(&chunk);
                    let mut start = 0;
                    while let Some(end) = find(&buffer[start..], b"\n\n") {
                        let block = &buffer[start..start + end];
                        start += end + 2;
                        if let Some(at) = commit_time(block) {
                            lags.push((chrono::Utc::now() - at).to_std().unwrap_or_default());
                        }
                    }
                    buffer.drain(..start);
                    if !lags.is_empty() {
                        received.fetch_add(lags.len() as u64, Ordering::Relaxed);
                        recorder.record_all("delivery_lag", &lags, "received");
                        lags.clear();
                    }
                }
            })
        })
        .collect();
    // Every stream open before the first message.
    let deadline = Instant::now() + Duration::from_secs(120);
    while (opened.load(Ordering::Relaxed) as usize) < subscribers && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open = opened.load(Ordering::Relaxed);
    let open_usage = service_pid.and_then(process_usage);
    let tool_open = process_usage(std::process::id());
    let queries_before = queries().await?;
    recorder.mark("posting starts");
    let every = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let posting_until = Instant::now() + duration;
    let mut posted = 0u64;
    while Instant::now() < posting_until {
        tick.tick().await;
        let started = Instant::now();
        let request = target
            .http
            .post(format!("{}/v1/chats/{chat}/messages", target.base))
            .json(&json!({"senderId": "poster", "clientMessageId": format!("f{posted}"), "text": "fan-out"}));
        let (answer, ok) = target.call(request).await;
        recorder.record("post", started.elapsed(), &answer, ok);
        posted += u64::from(ok);
    }
    // Until every open stream has every message (or 30 s).
    let want = posted * open;
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.load(Ordering::Relaxed) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reads = queries().await? - queries_before;
    let end_usage = service_pid.and_then(process_usage);
    let tool_end = process_usage(std::process::id());
    stop.notify_waiters();
    for s in streams {
        s.abort();
    }
    let memory = match (before_usage, open_usage) {
        (Some((before, _)), Some((with_streams, _))) if open > 0 => json!({
            "serviceRssBeforeBytes": before,
            "serviceRssWithStreamsBytes": with_streams,
            "bytesPerSubscriber": with_streams.saturating_sub(before) / open,
        }),
        _ => Value::Null,
    };
    let cpu = match (open_usage, end_usage) {
        (Some((_, a)), Some((_, b))) => {
            json!({"serviceCpuSecondsWhilePosting": b - a, "cores": (b - a) / duration.as_secs_f64()})
        }
        _ => Value::Null,
    };
    let tool_cores = match (tool_open, tool_end) {
        (Some((_, a)), Some((_, b))) => json!((b - a) / duration.as_secs_f64()),
        _ => Value::Null,
    };
    let polls = target.metric("chatshard_tail_revision_polls_total").await;
    Ok(json!({
        "name": "fanout",
        "subscribers": subscribers,
        "crossInstance": !target.others.is_empty(),
        "muxChatsPerStream": mux_chats,
        "tailRevisionPollsTotal": polls,
        "streamsOpen": open,
        "messagesPerSecond": rate,
        "posted": posted,
        "delivered": received.load(Ordering::Relaxed),
        "expected": want,
        "eventReads": reads,
        "eventReadsPerPublishedEvent": if posted > 0 { reads as f64 / posted as f64 } else { 0.0 },
        "memory": memory,
        "cpu": cpu,
        "loadToolCores": tool_cores,
    }))
}

/// Posts to `chat` at `rate` per second until `until`; the messages stored.
async fn post_at(
    target: &Target,
    recorder: &Recorder,
    chat: &str,
    rate: f64,
    until: Instant,
) -> u64 {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut posted = 0u64;
    let mut n = 0u64;
    while Instant::now() < until {
        tick.tick().await;
        n += 1;
        let started = Instant::now();
        let (answer, ok) = target.post(chat, "poster", &format!("p{n}")).await;
        recorder.record("post", started.elapsed(), &answer, ok);
        posted += u64::from(ok);
    }
    posted
}

/// `fetch-spike`: `pollers` clients poll one chat's events as fast as they
/// are answered (a plain poll, `waitMs=0`, ignoring `Retry-After`, as the
/// reference incident's clients did; or long-polls with `wait_ms` > 0) while
/// messages are posted at `rate`. Reports the event queries the shard saw per
/// published event, and how the polls were answered.
pub async fn fetch_spike(
    target: &Target,
    recorder: &Recorder,
    pollers: usize,
    rate: f64,
    wait_ms: u64,
    duration: Duration,
) -> anyhow::Result<Value> {
    let chat = run_id("fetch");
    target.chat_with_poster(&chat, "poster").await?;
    let queries_before = target.fetch_queries().await?;
    let until = Instant::now() + duration;
    recorder.mark("polling starts");
    let polls: Vec<_> = (0..pollers)
        .map(|_| {
            let (target, recorder, chat) = (target.clone(), recorder.clone(), chat.clone());
            tokio::spawn(async move {
                let mut after = 0u64;
                while Instant::now() < until {
                    let started = Instant::now();
                    let request = target.http.get(format!(
                        "{}/v1/chats/{chat}/events?after={after}&limit=100&waitMs={wait_ms}",
                        target.base
                    ));
                    let answer = request.send().await;
                    let (answer, ok) = match answer {
                        Ok(r) if r.status().is_success() => {
                            if let Ok(page) = r.json::<Value>().await
                                && let Some(last) = page["events"]
                                    .as_array()
                                    .and_then(|e| e.last())
                                    .and_then(|e| e["revision"].as_u64())
                            {
                                after = last;
                            }
                            ("200".to_owned(), true)
                        }
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let code = r
                                .json::<Value>()
                                .await
                                .ok()
                                .and_then(|v| v["code"].as_str().map(str::to_owned))
                                .unwrap_or_default();
                            (format!("{status}/{code}"), false)
                        }
                        Err(_) => ("error/other".to_owned(), false),
                    };
                    recorder.record("poll", started.elapsed(), &answer, ok);
                }
            })
        })
        .collect();
    let posted = post_at(target, recorder, &chat, rate, until).await;
    for p in polls {
        let _ = p.await;
    }
    let queries = target.fetch_queries().await? - queries_before;
    Ok(json!({
        "name": "fetch-spike",
        "pollers": pollers,
        "waitMs": wait_ms,
        "messagesPerSecond": rate,
        "posted": posted,
        "eventQueries": queries,
        "eventQueriesPerPublishedEvent": if posted > 0 { queries as f64 / posted as f64 } else { 0.0 },
    }))
}

/// Steady traffic on one chat: `clients` clients, each a join of a new user
/// then a member-count read every 20 ms (100 requests/s per client),
/// recorded under `kind`, until `until`.
fn steady(
    target: &Target,
    recorder: &Recorder,
    chat: &str,
    clients: usize,
    kind: &'static str,
    until: Instant,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|c| {
            let (target, recorder, chat) = (target.clone(), recorder.clone(), chat.to_owned());
            tokio::spawn(async move {
                let mut n = 0u64;
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while Instant::now() < until {
                    tick.tick().await;
                    n += 1;
                    target
                        .join(&recorder, kind, &chat, &format!("{kind}-{c}-{n}"))
                        .await;
                    let started = Instant::now();
                    let request = target
                        .http
                        .get(format!("{}/v1/chats/{chat}/member-count", target.base));
                    let (answer, ok) = target.call(request).await;
                    recorder.record(kind, started.elapsed(), &answer, ok);
                }
            })
        })
        .collect()
}

/// `isolation`: steady traffic on a chat of shard B, first alone, then while
/// `clients` clients spike joins on a chat of another shard A (its join
/// throttle off). Reports B's p50 and p99 during the spike over alone.
pub async fn isolation(
    target: &Target,
    recorder: &Recorder,
    clients: usize,
    steady_clients: usize,
    duration: Duration,
) -> anyhow::Result<Value> {
    let run = run_id("iso");
    let spike_chat = format!("{run}-a0");
    let shard_a = target.chat_with_poster(&spike_chat, "poster").await?;
    // The spike's chats, all on shard A: a fresh one every 90,000 members.
    let mut spike_chats = vec![spike_chat];
    for i in 1..256 {
        if spike_chats.len() == 8 {
            break;
        }
        let chat = format!("{run}-a{i}");
        if target.chat_with_poster(&chat, "poster").await? == shard_a {
            spike_chats.push(chat);
        }
    }
    for chat in &spike_chats {
        target.set_join_throttle(chat, false).await?;
    }
    let spike_chats = Arc::new(spike_chats);
    let mut steady_chat = None;
    for i in 0..64 {
        let chat = format!("{run}-b{i}");
        if target.chat_with_poster(&chat, "poster").await? != shard_a {
            steady_chat = Some(chat);
            break;
        }
    }
    let Some(steady_chat) = steady_chat else {
        anyhow::bail!("isolation needs a service with at least two shards");
    };
    target.set_join_throttle(&steady_chat, false).await?;
    let half = duration / 2;
    // Alone.
    let until = Instant::now() + half;
    for t in steady(
        target,
        recorder,
        &steady_chat,
        steady_clients,
        "b_alone",
        until,
    ) {
        let _ = t.await;
    }
    // With the spike on shard A.
    recorder.mark("spike on shard A");
    let until = Instant::now() + half;
    let b = steady(
        target,
        recorder,
        &steady_chat,
        steady_clients,
        "b_during_spike",
        until,
    );
    let users = Arc::new(AtomicU64::new(0));
    let spike: Vec<_> = (0..clients)
        .map(|_| {
            let (target, recorder, chats, users) = (
                target.clone(),
                recorder.clone(),
                spike_chats.clone(),
                users.clone(),
            );
            tokio::spawn(async move {
                while Instant::now() < until {
                    let n = users.fetch_add(1, Ordering::Relaxed);
                    let Some(chat) = chats.get((n / MEMBERS_PER_CHAT) as usize) else {
                        return;
                    };
                    target
                        .join(&recorder, "a_spike_join", chat, &format!("s{n}"))
                        .await;
                }
            })
        })
        .collect();
    for t in b.into_iter().chain(spike) {
        let _ = t.await;
    }
    let ratio = |q: f64| match (
        recorder.quantile_ms("b_during_spike", q),
        recorder.quantile_ms("b_alone", q),
    ) {
        (Some(during), Some(alone)) if alone > 0.0 => json!(during / alone),
        _ => Value::Null,
    };
    Ok(json!({
        "name": "isolation",
        "spikeClients": clients,
        "steadyClients": steady_clients,
        "shardA": shard_a,
        "shardBP50Ratio": ratio(0.5),
        "shardBP99Ratio": ratio(0.99),
    }))
}

/// `refusals`: how fast refused requests are answered while the refusing
/// condition holds: joins past a join limit of one per minute
/// (`join_throttled`) and plain polls of a hot chat throttled at rate 1
/// (`fetch_throttled`), each by `clients` clients. Needs the admin token.
pub async fn refusals(
    target: &Target,
    recorder: &Recorder,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<Value> {
    let chat = run_id("refuse");
    target.chat_with_poster(&chat, "poster").await?;
    target
        .set_override(
            "joinThrottle",
            &chat,
            json!({"enabled": true, "limit": 1, "windowSeconds": 60}),
        )
        .await?;
    target
        .set_override(
            "hotChat",
            &chat,
            json!({"enabled": true, "threshold": 1, "durationSeconds": 60, "expireSeconds": 600, "throttleRate": 1.0}),
        )
        .await?;
    // Two events within the window make the chat hot.
    for key in ["h1", "h2"] {
        let _ = target.post(&chat, "poster", key).await;
    }
    let until = Instant::now() + duration;
    recorder.mark("refusing");
    let users = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (target, recorder, chat, users) = (
                target.clone(),
                recorder.clone(),
                chat.clone(),
                users.clone(),
            );
            tokio::spawn(async move {
                while Instant::now() < until {
                    let started = Instant::now();
                    let (kind, request) = if c % 2 == 0 {
                        let n = users.fetch_add(1, Ordering::Relaxed);
                        (
                            "refused_join",
                            target
                                .http
                                .post(format!("{}/v1/chats/{chat}/members", target.base))
                                .json(&json!({"userId": format!("r{n}")})),
                        )
                    } else {
                        (
                            "refused_fetch",
                            target
                                .http
                                .get(format!("{}/v1/chats/{chat}/events?after=0", target.base)),
                        )
                    };
                    let (answer, _) = target.call(request).await;
                    // Refusals are what is measured here: every answer counts.
                    recorder.record(kind, started.elapsed(), &answer, true);
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    // The service's own view: the share of its 429 answers (this run's and
    // any before) that took at most 1 ms, from its request histogram.
    let within = |le: &'static str| async move {
        target
            .metric_where(
                "http_server_request_duration_seconds_bucket",
                &["http_response_status_code=\"429\"", le],
            )
            .await
    };
    let server_share = match (within("le=\"0.001\"").await, within("le=\"+Inf\"").await) {
        (Some(fast), Some(all)) if all > 0.0 => json!(fast / all),
        _ => Value::Null,
    };
    Ok(json!({
        "name": "refusals",
        "clients": clients,
        "serverShareOf429WithinOneMs": server_share,
        "refusedJoinP99Ms": recorder.quantile_ms("refused_join", 0.99),
        "refusedFetchP99Ms": recorder.quantile_ms("refused_fetch", 0.99),
    }))
}

/// The statement OpenChat's join spike serialised on under
/// `innodb_autoinc_lock_mode=1`: an `INSERT ... SELECT`, a "bulk insert" whose
/// row count InnoDB cannot know in advance, so it holds the table-level
/// AUTO-INC lock to the end of the statement. chatshard itself never runs it
/// (its inserts are plain `INSERT ... VALUES`, `storage::members`); it is here
/// only to reproduce the lesson.
const INSERT_SELECT: &str = "INSERT INTO chat_member \
     (chat_id, user_id, state, joined_at, left_at, created_at, updated_at) \
     SELECT chat_id, ?, 1, ?, NULL, ?, ? FROM chat WHERE chat_id = ?";

/// `autoinc`: the incident's database lesson. Starts a local shard with
/// `innodb_autoinc_lock_mode=1` and one with `=2`, and on each runs `writers`
/// connections, each inserting members of its own chat one autocommit
/// statement at a time, first with plain `INSERT ... VALUES` (chatshard's
/// statement), then with `INSERT ... SELECT`, for `duration` each.
pub async fn autoinc(
    recorder: &Recorder,
    writers: usize,
    duration: Duration,
) -> anyhow::Result<Value> {
    use chatshard::localdb::cluster::{LocalCluster, Location};
    let mut runs = Vec::new();
    for mode in [1u8, 2] {
        let args = [format!("--innodb-autoinc-lock-mode={mode}")];
        let mut cluster = LocalCluster::start_with_args(1, Location::Temp, &args).await?;
        let url = cluster.settings()?.shards[0].url.clone();
        for (statement, kind) in [
            (
                "values",
                if mode == 1 {
                    "mode1_insert_values"
                } else {
                    "mode2_insert_values"
                },
            ),
            (
                "select",
                if mode == 1 {
                    "mode1_insert_select"
                } else {
                    "mode2_insert_select"
                },
            ),
        ] {
            let run = run_id(kind);
            let deadline = Instant::now() + duration;
            recorder.mark(&format!("{kind} start"));
            let tasks: Vec<_> = (0..writers)
                .map(|w| {
                    let (recorder, url, chat) =
                        (recorder.clone(), url.clone(), format!("{run}-{w}"));
                    tokio::spawn(async move {
                        let mut conn = MySqlConnection::connect(&url).await?;
                        chats::insert(&mut conn, &chat, 1_000_000, now()).await?;
                        let mut n = 0u64;
                        while Instant::now() < deadline {
                            n += 1;
                            let user = format!("u{n}");
                            let at = now();
                            let started = Instant::now();
                            let result = if statement == "values" {
                                let row = members::NewMember {
                                    user_id: &user,
                                    state: MemberState::Joined.code(),
                                    joined_at: at,
                                    left_at: None,
                                };
                                members::insert_many(&mut conn, &chat, &[row], at).await
                            } else {
                                sqlx::query(INSERT_SELECT)
                                    .bind(&user)
                                    .bind(at)
                                    .bind(at)
                                    .bind(at)
                                    .bind(&chat)
                                    .execute(&mut conn)
                                    .await
                                    .map(|_| ())
                            };
                            match result {
                                Ok(()) => {
                                    recorder.record(kind, started.elapsed(), "inserted", true)
                                }
                                Err(e) => {
                                    recorder.record(kind, started.elapsed(), &sql_answer(&e), false)
                                }
                            }
                        }
                        Ok::<(), anyhow::Error>(())
                    })
                })
                .collect();
            for task in tasks {
                task.await??;
            }
            runs.push(json!({
                "autoincLockMode": mode,
                "statement": statement,
                "kind": kind,
                "insertsPerSecond": recorder.ok_count(kind) as f64 / duration.as_secs_f64(),
                "p50Ms": recorder.quantile_ms(kind, 0.5),
                "p99Ms": recorder.quantile_ms(kind, 0.99),
            }));
        }
        cluster.stop().await;
    }
    Ok(json!({"name": "autoinc", "writers": writers, "runs": runs}))
}

/// Picks chat indexes by a Zipf law (exponent 1) over `n` chats: chat `i` is
/// drawn with weight 1/(i+1).
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(n: usize) -> Self {
        let mut total = 0.0;
        let cumulative = (0..n)
            .map(|i| {
                total += 1.0 / (i as f64 + 1.0);
                total
            })
            .collect();
        Self { cumulative }
    }

    fn pick(&self) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let x = rand::random::<f64>() * total;
        self.cumulative
            .partition_point(|c| *c < x)
            .min(self.cumulative.len().saturating_sub(1))
    }
}

/// Calls `step` at `tasks` x `per_task` calls per second until `until`, open
/// loop: each call runs on its own task, so a slow answer does not lower the
/// offered rate (at most 4,096 calls in flight; a call past that is counted
/// under `kind` as `not_sent`).
fn paced<F, Fut>(
    recorder: &Recorder,
    kind: &'static str,
    tasks: usize,
    per_task: f64,
    until: Instant,
    step: F,
) -> Vec<tokio::task::JoinHandle<()>>
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let in_flight = Arc::new(tokio::sync::Semaphore::new(4096));
    (0..tasks)
        .map(|t| {
            let (step, recorder, in_flight) = (step.clone(), recorder.clone(), in_flight.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_task));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut calls = tokio::task::JoinSet::new();
                let mut n = 0u64;
                while Instant::now() < until {
                    tick.tick().await;
                    n += 1;
                    let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                        recorder.record(kind, Duration::ZERO, "not_sent", false);
                        continue;
                    };
                    let call = step(t, n);
                    calls.spawn(async move {
                        call.await;
                        drop(permit);
                    });
                    while calls.try_join_next().is_some() {}
                }
                while calls.join_next().await.is_some() {}
            })
        })
        .collect()
}

/// `mixed`: a day in a minute. `clients` clients make background traffic
/// over `chats` chats whose popularity follows a Zipf law (member-count
/// reads, event polls, joins, messages, leaves; a chat is created on its first
/// use), while one celebrity chat goes from quiet to `celebrity_joins` joins/s
/// and `celebrity_reads` reads/s for the middle third of the run, then back.
pub async fn mixed(
    target: &Target,
    recorder: &Recorder,
    chats: usize,
    clients: usize,
    celebrity_joins: f64,
    celebrity_reads: f64,
    duration: Duration,
) -> anyhow::Result<Value> {
    let run = run_id("mixed");
    let zipf = Arc::new(Zipf::new(chats));
    let created: Arc<dashmap::DashSet<usize>> = Arc::new(dashmap::DashSet::new());
    let start = Instant::now();
    let until = start + duration;
    let background: Vec<_> = (0..clients)
        .map(|c| {
            let (target, recorder, zipf, created, run) = (
                target.clone(),
                recorder.clone(),
                zipf.clone(),
                created.clone(),
                run.clone(),
            );
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < until {
                    n += 1;
                    let i = zipf.pick();
                    let chat = format!("{run}-{i}");
                    if created.insert(i) && target.chat_with_poster(&chat, "host").await.is_err() {
                        created.remove(&i);
                        continue;
                    }
                    let roll = rand::random::<f64>();
                    let base = &target.base;
                    let (kind, request) = if roll < 0.40 {
                        ("bg_count", target.http.get(format!("{base}/v1/chats/{chat}/member-count")))
                    } else if roll < 0.70 {
                        ("bg_poll", target.http.get(format!("{base}/v1/chats/{chat}/events?after=0&limit=50")))
                    } else if roll < 0.85 {
                        (
                            "bg_join",
                            target
                                .http
                                .post(format!("{base}/v1/chats/{chat}/members"))
                                .json(&json!({"userId": format!("b{c}-{}", n % 64)})),
                        )
                    } else if roll < 0.95 {
                        (
                            "bg_post",
                            target
                                .http
                                .post(format!("{base}/v1/chats/{chat}/messages"))
                                .json(&json!({"senderId": "host", "clientMessageId": format!("m{c}-{n}"), "text": "hi"})),
                        )
                    } else {
                        (
                            "bg_leave",
                            target
                                .http
                                .delete(format!("{base}/v1/chats/{chat}/members/b{c}-{}", n % 64)),
                        )
                    };
                    let started = Instant::now();
                    let (answer, ok) = target.call(request).await;
                    // A leave of someone who never joined is a 404 by design.
                    let ok = ok || answer == "404/member_not_found";
                    recorder.record(kind, started.elapsed(), &answer, ok);
                }
            })
        })
        .collect();
    // The celebrity: quiet, then the spike in the middle third, then quiet.
    let celebrity = format!("{run}-celebrity");
    target.chat_with_poster(&celebrity, "host").await?;
    target.set_join_throttle(&celebrity, false).await?;
    let spike_from = start + duration / 3;
    tokio::time::sleep_until(spike_from.into()).await;
    recorder.mark("celebrity spike");
    let spike_until = start + duration * 2 / 3;
    let joiners = (celebrity_joins / 100.0).ceil().max(1.0) as usize;
    let readers = (celebrity_reads / 100.0).ceil().max(1.0) as usize;
    let mut spike = paced(
        recorder,
        "celebrity_join",
        joiners,
        celebrity_joins / joiners as f64,
        spike_until,
        {
            let (target, recorder, chat) = (target.clone(), recorder.clone(), celebrity.clone());
            move |t, n| {
                let (target, recorder, chat) = (target.clone(), recorder.clone(), chat.clone());
                async move {
                    target
                        .join(&recorder, "celebrity_join", &chat, &format!("fan{t}-{n}"))
                        .await;
                }
            }
        },
    );
    spike.extend(paced(
        recorder,
        "celebrity_read",
        readers,
        celebrity_reads / readers as f64,
        spike_until,
        {
            let (target, recorder, chat) = (target.clone(), recorder.clone(), celebrity.clone());
            move |_, n| {
                let (target, recorder, chat) = (target.clone(), recorder.clone(), chat.clone());
                async move {
                    let path = if n % 2 == 0 {
                        format!("{}/v1/chats/{chat}/member-count", target.base)
                    } else {
                        format!("{}/v1/chats/{chat}/events?after=0&limit=50", target.base)
                    };
                    let started = Instant::now();
                    let (answer, ok) = target.call(target.http.get(path)).await;
                    recorder.record("celebrity_read", started.elapsed(), &answer, ok);
                }
            }
        },
    ));
    for t in spike {
        let _ = t.await;
    }
    recorder.mark("spike ends");
    for t in background {
        let _ = t.await;
    }
    Ok(json!({
        "name": "mixed",
        "chats": chats,
        "chatsUsed": created.len(),
        "clients": clients,
        "celebrityJoinsPerSecond": celebrity_joins,
        "celebrityReadsPerSecond": celebrity_reads,
        "celebrityJoined": recorder.ok_count("celebrity_join"),
    }))
}

/// Clients that share a `move` run's joins.
const JOINERS: u64 = 32;

/// What reaches the moving chat besides its posters: new users joining at
/// `join_rate` a second, and `pollers` long-polling readers; with `purged`,
/// its log is purged down to that many revisions before the run.
#[derive(Debug, Clone, Copy)]
pub struct MoveLoad {
    pub join_rate: u32,
    pub pollers: usize,
    pub purged: Option<u64>,
}

/// A chat under writes is moved to another shard: C clients, each a member,
/// post messages to it throughout (each retried with the same key on 503
/// `chat_moving`, as a client would), new users join it at a steady rate
/// (each join retried on a 503), readers long-poll it, the move is started
/// after a quarter of the run, and the figures are the move's time, the
/// longest pause any poster or joiner saw, the longest wait of a reader and
/// any revision it missed, and the answers around the switch.
pub async fn move_chat(
    target: &Target,
    recorder: &Recorder,
    (clients, others): (usize, usize),
    members: u64,
    to: Option<String>,
    duration: Duration,
    load: MoveLoad,
) -> anyhow::Result<Value> {
    let Some(token) = target.admin_token.clone() else {
        anyhow::bail!("move needs --admin-token (it starts the move through the admin API)");
    };
    let chat = run_id("move");
    target.create_chat(&chat).await?;
    target.set_join_throttle(&chat, false).await?;
    // The chat's members before the move, joined 64 at a time.
    let mut n = 0;
    while n < members {
        let batch: Vec<_> = (n..(n + 64).min(members))
            .map(|i| {
                let chat = &chat;
                async move { target.join(recorder, "fill", chat, &format!("f{i}")).await }
            })
            .collect();
        futures_util::future::join_all(batch).await;
        n += 64;
    }
    // The log purged (the shard's purge round, at its pace), so the move
    // copies a snapshot of the rows rather than replaying the log.
    let mut purge_seconds = None;
    if let Some(keep) = load.purged {
        let started = Instant::now();
        target.purge_down_to(&chat, keep).await?;
        loop {
            let c: Value = target
                .http
                .get(format!("{}/v1/chats/{chat}", target.base))
                .send()
                .await?
                .json()
                .await?;
            let (first, revision) = (
                c["firstRevision"].as_u64().unwrap_or(1),
                c["revision"].as_u64().unwrap_or(0),
            );
            if first > 1 && revision + 1 - first <= keep {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(600),
                "the purge did not reach chat {chat} within 10 minutes (is purge.interval_ms short?)"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        purge_seconds = Some(started.elapsed().as_secs_f64());
    }
    let from = target.shard_of(&chat).await?;
    let to = match to {
        Some(to) => to,
        None => {
            let shards: Value = target
                .http
                .get(format!("{}/v1/admin/shards", target.base))
                .bearer_auth(&token)
                .send()
                .await?
                .json()
                .await?;
            shards["shards"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["name"].as_str())
                .find(|name| *name != from)
                .map(str::to_owned)
                .ok_or_else(|| anyhow::anyhow!("move needs a second shard"))?
        }
    };
    // Other chats of the source shard, read and joined throughout: their
    // p99 before the move and during it.
    let mut quiet = Vec::new();
    for i in 0..256 {
        if quiet.len() >= 16 || others == 0 {
            break;
        }
        let other = format!("{chat}-o{i}");
        target.create_chat(&other).await?;
        if target.shard_of(&other).await? == from {
            quiet.push(other);
        }
    }
    let phase = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let traffic = if quiet.is_empty() {
        Vec::new()
    } else {
        quiet_traffic(
            target,
            recorder,
            &quiet,
            others,
            &["other_before", "other_during", "other_after"],
            &phase,
        )
    };
    let deadline = Instant::now() + duration;
    let users = Arc::new(AtomicU64::new(0));
    let longest_pause_us = Arc::new(AtomicU64::new(0));
    let longest_join_us = Arc::new(AtomicU64::new(0));
    let joiners = move_joiners(
        target,
        recorder,
        &chat,
        load.join_rate,
        deadline,
        &longest_join_us,
    );
    let start_revision = target
        .http
        .get(format!("{}/v1/chats/{chat}", target.base))
        .send()
        .await?
        .json::<Value>()
        .await?["revision"]
        .as_u64()
        .unwrap_or_default();
    let missed = Arc::new(AtomicU64::new(0));
    let longest_poll_us = Arc::new(AtomicU64::new(0));
    let pollers = move_pollers(
        target,
        recorder,
        &chat,
        (load.pollers, start_revision),
        deadline,
        (&missed, &longest_poll_us),
    );
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let (target, recorder, chat, users, longest) = (
                target.instance(i),
                recorder.clone(),
                chat.clone(),
                users.clone(),
                longest_pause_us.clone(),
            );
            tokio::spawn(async move {
                let writer = format!("w{i}");
                target.join(&recorder, "fill", &chat, &writer).await;
                let mut last_ok = Instant::now();
                while Instant::now() < deadline {
                    let key = format!("k{}", users.fetch_add(1, Ordering::Relaxed));
                    loop {
                        let started = Instant::now();
                        let (answer, ok) = target.post(&chat, &writer, &key).await;
                        recorder.record("post", started.elapsed(), &answer, ok);
                        if ok {
                            let pause = last_ok.elapsed().as_micros() as u64;
                            longest.fetch_max(pause, Ordering::Relaxed);
                            last_ok = Instant::now();
                            break;
                        }
                        if answer != "503/chat_moving" || Instant::now() >= deadline {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(duration / 4).await;
    recorder.mark("move starts");
    phase.store(1, Ordering::Relaxed);
    let started = Instant::now();
    let r = target
        .http
        .post(format!("{}/v1/admin/chats/{chat}/move", target.base))
        .bearer_auth(&token)
        .json(&json!({ "to": to }))
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "starting the move: {}", r.status());
    let id = r.json::<Value>().await?["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let ended = loop {
        let m: Value = target
            .http
            .get(format!("{}/v1/admin/moves/{id}", target.base))
            .bearer_auth(&token)
            .send()
            .await?
            .json()
            .await?;
        if m["phase"] == "done" || m["phase"] == "rolled_back" || m["phase"] == "cancelled" {
            break m;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the move did not end within 10 minutes: {m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let move_seconds = started.elapsed().as_secs_f64();
    // The others go on while the writers do (to the end of the run), with
    // the chat on its new shard: what that placement costs them.
    phase.store(2, Ordering::Relaxed);
    recorder.mark("move ended");
    for task in tasks.into_iter().chain(joiners).chain(pollers) {
        task.await?;
    }
    phase.store(3, Ordering::Relaxed);
    for task in traffic {
        task.await?;
    }
    let before = recorder.quantile_ms("other_before", 0.99).unwrap_or(0.0);
    let during = recorder.quantile_ms("other_during", 0.99).unwrap_or(0.0);
    let after = recorder.quantile_ms("other_after", 0.99).unwrap_or(0.0);
    Ok(json!({
        "name": "move",
        "clients": clients,
        "membersBefore": members,
        "from": from,
        "to": to,
        "phase": ended["phase"],
        "error": ended["error"],
        "revisionsCopied": ended["copiedRevision"],
        "moveSeconds": move_seconds,
        "longestPauseMs": longest_pause_us.load(Ordering::Relaxed) as f64 / 1000.0,
        "otherChats": quiet.len(),
        "otherP99BeforeMs": before,
        "otherP99DuringMs": during,
        "otherP99Ratio": if before > 0.0 { during / before } else { 0.0 },
        "otherP50BeforeMs": recorder.quantile_ms("other_before", 0.5),
        "otherP50DuringMs": recorder.quantile_ms("other_during", 0.5),
        "otherP99AfterMs": after,
        "otherP99AfterRatio": if before > 0.0 { after / before } else { 0.0 },
        "purgedTo": load.purged,
        "purgeSeconds": purge_seconds,
        "joinRate": load.join_rate,
        "joinsPerSecond": recorder.ok_count("join") as f64 / duration.as_secs_f64(),
        "longestJoinPauseMs": longest_join_us.load(Ordering::Relaxed) as f64 / 1000.0,
        "pollers": load.pollers,
        "pollsAnswered": recorder.ok_count("poll"),
        "longestPollWaitMs": longest_poll_us.load(Ordering::Relaxed) as f64 / 1000.0,
        "revisionsMissedByPollers": missed.load(Ordering::Relaxed),
    }))
}

/// [`JOINERS`] clients that join new users to `chat` at `rate` a second in
/// all until `deadline`, each join retried with the same user on a 503 (a
/// join is idempotent); the longest time a join took to succeed goes to
/// `longest`.
fn move_joiners(
    target: &Target,
    recorder: &Recorder,
    chat: &str,
    rate: u32,
    deadline: Instant,
    longest: &Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    if rate == 0 {
        return Vec::new();
    }
    let every = Duration::from_secs_f64(JOINERS as f64 / f64::from(rate));
    (0..JOINERS)
        .map(|j| {
            let (target, recorder, chat, longest) = (
                target.instance(j as usize),
                recorder.clone(),
                chat.to_owned(),
                longest.clone(),
            );
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut n = 0u64;
                while Instant::now() < deadline {
                    tick.tick().await;
                    n += 1;
                    let user = format!("j{j}-{n}");
                    let first = Instant::now();
                    loop {
                        let started = Instant::now();
                        let request = target
                            .http
                            .post(format!("{}/v1/chats/{chat}/members", target.base))
                            .json(&json!({ "userId": user }));
                        let (answer, ok) = target.call(request).await;
                        recorder.record("join", started.elapsed(), &answer, ok);
                        if ok {
                            longest
                                .fetch_max(first.elapsed().as_micros() as u64, Ordering::Relaxed);
                            break;
                        }
                        if !answer.starts_with("503") || Instant::now() >= deadline {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            })
        })
        .collect()
}

/// `pollers` readers that long-poll `chat` from `after` until `deadline`
/// (`waitMs=2000`, 500 events a page), each checking that the revisions it
/// gets follow on from the last one: revisions skipped go to `missed`, and
/// the longest time between two answered polls to `longest`.
fn move_pollers(
    target: &Target,
    recorder: &Recorder,
    chat: &str,
    (pollers, after): (usize, u64),
    deadline: Instant,
    (missed, longest): (&Arc<AtomicU64>, &Arc<AtomicU64>),
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..pollers)
        .map(|p| {
            let (target, recorder, chat, missed, longest) = (
                target.instance(p),
                recorder.clone(),
                chat.to_owned(),
                missed.clone(),
                longest.clone(),
            );
            tokio::spawn(async move {
                let mut after = after;
                let mut answered = Instant::now();
                while Instant::now() < deadline {
                    let started = Instant::now();
                    let r = target
                        .http
                        .get(format!(
                            "{}/v1/chats/{chat}/events?after={after}&limit=500&waitMs=2000",
                            target.base
                        ))
                        .send()
                        .await;
                    let page = match r {
                        Ok(r) if r.status().is_success() => r.json::<Value>().await.ok(),
                        Ok(r) => {
                            let status = r.status().as_str().to_owned();
                            recorder.record("poll", started.elapsed(), &status, false);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                        Err(_) => None,
                    };
                    let Some(page) = page else {
                        recorder.record("poll", started.elapsed(), "error", false);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    recorder.record("poll", started.elapsed(), "200", true);
                    longest.fetch_max(answered.elapsed().as_micros() as u64, Ordering::Relaxed);
                    answered = Instant::now();
                    for event in page["events"].as_array().into_iter().flatten() {
                        let revision = event["revision"].as_u64().unwrap_or_default();
                        if revision > after + 1 {
                            missed.fetch_add(revision - after - 1, Ordering::Relaxed);
                        }
                        after = after.max(revision);
                    }
                }
            })
        })
        .collect()
}

/// Chat ids of this run whose bucket is within `range`, `n` of them.
fn chats_in(prefix: &str, range: chatshard::routing::BucketRange, n: usize) -> Vec<String> {
    let run = run_id(prefix);
    (0..)
        .map(|i| format!("{run}-{i}"))
        .filter(|id| {
            chatshard::domain::ChatId::parse(id).is_ok_and(|c| {
                let b = chatshard::routing::bucket_of(&c);
                range.first <= b && b <= range.last
            })
        })
        .take(n)
        .collect()
}

/// `move-buckets`: a bucket range of `chats` chats (`members` members each)
/// moves to another shard while `clients` clients post into its chats, one
/// client keeps creating chats of the range, and `others` clients read and
/// join chats of the source outside the range. Reports the move's time, the
/// longest pause a poster and the creator saw, every answer, and the
/// others' p99 before and during the move.
pub async fn move_buckets(
    target: &Target,
    recorder: &Recorder,
    (clients, others): (usize, usize),
    (chats, members): (usize, u64),
    to: Option<String>,
) -> anyhow::Result<Value> {
    use chatshard::routing::BucketRange;
    let Some(token) = target.admin_token.clone() else {
        anyhow::bail!(
            "move-buckets needs --admin-token (it moves the range through the admin API)"
        );
    };
    let table: Value = target
        .http
        .get(format!("{}/v1/admin/buckets", target.base))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    let shards = table["shards"].as_array().cloned().unwrap_or_default();
    // The source: the first shard with buckets; the range: the upper half of
    // its first range; the target: --to, else a shard with no buckets, else
    // the next one.
    let (from, owned) = shards
        .iter()
        .find_map(|s| {
            let first = s["buckets"].as_array()?.first()?.as_str()?;
            Some((
                s["shard"].as_str()?.to_owned(),
                BucketRange::parse(first).ok()?,
            ))
        })
        .ok_or_else(|| anyhow::anyhow!("no shard owns buckets"))?;
    anyhow::ensure!(
        owned.last > owned.first,
        "the source's first range is one bucket"
    );
    let half = owned.first + (owned.last - owned.first).div_ceil(2);
    let range = BucketRange {
        first: half,
        last: owned.last,
    };
    let stays = BucketRange {
        first: owned.first,
        last: half - 1,
    };
    let names: Vec<&str> = shards.iter().filter_map(|s| s["shard"].as_str()).collect();
    let to = match to {
        Some(to) => to,
        None => shards
            .iter()
            .find(|s| s["buckets"].as_array().is_some_and(Vec::is_empty))
            .and_then(|s| s["shard"].as_str())
            .or_else(|| names.iter().copied().find(|n| *n != from))
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("move-buckets needs a second shard"))?,
    };
    // The range's chats and their members, 64 requests at a time.
    let moving = chats_in("mb", range, chats);
    for chat in &moving {
        target.create_chat(chat).await?;
    }
    let joins: Vec<(String, String)> = moving
        .iter()
        .flat_map(|chat| (0..members).map(move |i| (chat.clone(), format!("f{i}"))))
        .collect();
    for batch in joins.chunks(64) {
        let joined = batch
            .iter()
            .map(|(chat, user)| target.join(recorder, "fill", chat, user));
        futures_util::future::join_all(joined).await;
    }
    let quiet = chats_in("mq", stays, if others == 0 { 0 } else { 16 });
    for chat in &quiet {
        target.create_chat(chat).await?;
    }
    let phase = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let traffic = if quiet.is_empty() {
        Vec::new()
    } else {
        quiet_traffic(
            target,
            recorder,
            &quiet,
            others,
            &["other_before", "other_during", "other_after"],
            &phase,
        )
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let longest_pause_us = Arc::new(AtomicU64::new(0));
    let moving = Arc::new(moving);
    let mut tasks: Vec<_> = (0..clients)
        .map(|i| {
            let (target, recorder, chats, stop, longest) = (
                target.instance(i),
                recorder.clone(),
                moving.clone(),
                stop.clone(),
                longest_pause_us.clone(),
            );
            tokio::spawn(async move {
                let writer = format!("w{i}");
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let chat = &chats[(i * 7919 + n) % chats.len()];
                    n += 1;
                    target.join(&recorder, "join", chat, &writer).await;
                    let key = format!("k{i}-{n}");
                    let first = Instant::now();
                    loop {
                        let started = Instant::now();
                        let (answer, ok) = target.post(chat, &writer, &key).await;
                        recorder.record("post", started.elapsed(), &answer, ok);
                        if ok {
                            let pause = first.elapsed().as_micros() as u64;
                            longest.fetch_max(pause, Ordering::Relaxed);
                            break;
                        }
                        if !answer.starts_with("503") || stop.load(Ordering::Relaxed) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            })
        })
        .collect();
    // New chats of the range, created throughout (two a second).
    let longest_create_us = Arc::new(AtomicU64::new(0));
    let created = Arc::new(AtomicU64::new(0));
    {
        let (target, recorder, stop, longest, created) = (
            target.clone(),
            recorder.clone(),
            stop.clone(),
            longest_create_us.clone(),
            created.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let fresh = chats_in("mc", range, 100_000);
            for chat in fresh {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let first = Instant::now();
                loop {
                    let started = Instant::now();
                    let r = target
                        .http
                        .put(format!("{}/v1/chats/{chat}", target.base))
                        .json(&json!({}))
                        .send()
                        .await;
                    let (answer, ok) = match r {
                        Ok(r) if r.status().is_success() => (r.status().as_str().to_owned(), true),
                        Ok(r) => {
                            let status = r.status();
                            let code = r
                                .json::<Value>()
                                .await
                                .ok()
                                .and_then(|b| b["code"].as_str().map(str::to_owned))
                                .unwrap_or_default();
                            (format!("{}/{code}", status.as_str()), false)
                        }
                        Err(_) => ("error".to_owned(), false),
                    };
                    recorder.record("create", started.elapsed(), &answer, ok);
                    if ok {
                        longest.fetch_max(first.elapsed().as_micros() as u64, Ordering::Relaxed);
                        created.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    if !answer.starts_with("503") || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                // About two new chats a second in the range.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }));
    }
    // The others' baseline, then the move.
    tokio::time::sleep(Duration::from_secs(5)).await;
    recorder.mark("range move starts");
    phase.store(1, Ordering::Relaxed);
    let started = Instant::now();
    let r = target
        .http
        .post(format!("{}/v1/admin/bucket-moves", target.base))
        .bearer_auth(&token)
        .json(&json!({ "buckets": range.to_string(), "to": to }))
        .send()
        .await?;
    anyhow::ensure!(
        r.status().is_success(),
        "starting the range move: {} {}",
        r.status(),
        r.text().await.unwrap_or_default()
    );
    let id = r.json::<Value>().await?["id"].as_u64().unwrap_or_default();
    let ended = loop {
        let m: Value = target
            .http
            .get(format!("{}/v1/admin/bucket-moves/{id}", target.base))
            .bearer_auth(&token)
            .send()
            .await?
            .json()
            .await?;
        if m["phase"] == "done" || m["phase"] == "failed" {
            break m;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(3600),
            "the range move did not end within an hour: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let move_seconds = started.elapsed().as_secs_f64();
    // The same traffic for 10 s more with the range on its new shard: what
    // the new placement costs the others, apart from what the move did.
    phase.store(2, Ordering::Relaxed);
    recorder.mark("range move ended");
    tokio::time::sleep(Duration::from_secs(10)).await;
    phase.store(3, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for task in tasks.into_iter().chain(traffic) {
        task.await?;
    }
    let before = recorder.quantile_ms("other_before", 0.99).unwrap_or(0.0);
    let during = recorder.quantile_ms("other_during", 0.99).unwrap_or(0.0);
    let after = recorder.quantile_ms("other_after", 0.99).unwrap_or(0.0);
    Ok(json!({
        "name": "move-buckets",
        "buckets": range.to_string(),
        "from": from,
        "to": to,
        "chats": chats,
        "membersPerChat": members,
        "clients": clients,
        "phase": ended["phase"],
        "error": ended["error"],
        "chatsTotal": ended["chatsTotal"],
        "chatsMoved": ended["chatsMoved"],
        "version": ended["version"],
        "moveSeconds": move_seconds,
        "chatsPerSecond": ended["chatsMoved"].as_f64().unwrap_or(0.0) / move_seconds,
        "longestPostPauseMs": longest_pause_us.load(Ordering::Relaxed) as f64 / 1000.0,
        "chatsCreatedDuring": created.load(Ordering::Relaxed),
        "longestCreatePauseMs": longest_create_us.load(Ordering::Relaxed) as f64 / 1000.0,
        "otherChats": quiet.len(),
        "otherP99BeforeMs": before,
        "otherP99DuringMs": during,
        "otherP99Ratio": if before > 0.0 { during / before } else { 0.0 },
        "otherP99AfterMs": after,
        "otherP99AfterRatio": if before > 0.0 { after / before } else { 0.0 },
    }))
}

/// `clients` clients that read member counts of `chats` and join them (3:1),
/// recording as `kinds[k]` while `phase` is k; they stop once it is past the
/// last kind.
fn quiet_traffic(
    target: &Target,
    recorder: &Recorder,
    chats: &[String],
    clients: usize,
    kinds: &'static [&'static str],
    phase: &Arc<std::sync::atomic::AtomicU8>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|c| {
            let (target, recorder, chats, phase) = (
                target.clone(),
                recorder.clone(),
                chats.to_vec(),
                phase.clone(),
            );
            tokio::spawn(async move {
                let mut n = 0u64;
                loop {
                    let Some(&kind) = kinds.get(usize::from(phase.load(Ordering::Relaxed))) else {
                        return;
                    };
                    n += 1;
                    let chat = &chats[(c + n as usize) % chats.len()];
                    let started = Instant::now();
                    let r = if n.is_multiple_of(4) {
                        target
                            .http
                            .post(format!("{}/v1/chats/{chat}/members", target.base))
                            .json(&json!({ "userId": format!("c{c}-{n}") }))
                            .send()
                            .await
                    } else {
                        target
                            .http
                            .get(format!("{}/v1/chats/{chat}/member-count", target.base))
                            .send()
                            .await
                    };
                    let took = started.elapsed();
                    match r {
                        Ok(r) => {
                            let ok = r.status().is_success();
                            recorder.record(kind, took, r.status().as_str(), ok);
                        }
                        Err(_) => recorder.record(kind, took, "error", false),
                    }
                }
            })
        })
        .collect()
}

/// `lifecycle`: the event log's upkeep, on a local shard the tool starts
/// itself with a chatshard instance in this process.
///
/// 1. **Purge.** A chat with `events` events 40 days old is purged while
///    `clients` clients read and join 16 quiet chats of the same shard:
///    their p99 before the purge and during it, and the purge's rows/s, once
///    at `purge.rows_per_second` = `paced` and once unpaced.
/// 2. **Detect and repair.** A quiet chat's count is corrupted behind the
///    service's back and the chat written once: the time until the digest
///    check (every `digest.interval_ms` = 1000) repaired it, 5 times.
/// 3. **Digest cost.** `digest_chats` chats of 3 members and 3 events each: the
///    time of a full digest round, and of an incremental round with 1 % of
///    the chats changed.
pub async fn lifecycle(
    recorder: &Recorder,
    clients: usize,
    events: u64,
    paced: u32,
    window: Duration,
    digest_chats: u64,
) -> anyhow::Result<Value> {
    use chatshard::localdb::cluster::{LocalCluster, Location};
    let mut cluster = LocalCluster::start(1, Location::Temp).await?;
    let result = lifecycle_on(
        &cluster,
        recorder,
        clients,
        events,
        paced,
        window,
        digest_chats,
    )
    .await;
    cluster.stop().await;
    result
}

async fn lifecycle_on(
    cluster: &chatshard::localdb::cluster::LocalCluster,
    recorder: &Recorder,
    clients: usize,
    events: u64,
    paced: u32,
    window: Duration,
    chats: u64,
) -> anyhow::Result<Value> {
    let mut settings = cluster.settings()?;
    settings.retention.enabled = false;
    settings.purge.interval_ms = 200;
    settings.digest.interval_ms = 1000;
    settings.join_throttle.enabled = false;
    settings.hot_chat.enabled = false;
    let url = settings.shards[0].url.clone();
    let mut db = MySqlConnection::connect(&url).await?;
    let mut purges = Vec::new();
    for rate in [paced, 1_000_000] {
        settings.purge.rows_per_second = rate;
        let app = chatshard::app::App::build(&settings).await?;
        let base = format!("http://{}", app.local_addr()?);
        let live = app.live().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run(async {
            let _ = stopped.await;
        }));
        let target = Target {
            http: reqwest::Client::new(),
            base,
            admin_token: None,
            others: Vec::new(),
        };
        // The chat to purge: its log written straight to the shard, 40 days
        // old (what months of a busy chat leave).
        let big = run_id("purge");
        seed_old_log(&mut db, &big, events).await?;
        let quiet: Vec<String> = (0..16)
            .map(|i| format!("{}-q{i}", run_id("quiet")))
            .collect();
        for chat in &quiet {
            target.create_chat(chat).await?;
        }
        let kinds: &'static [&'static str] = if rate == paced {
            &["paced_before", "paced_during"]
        } else {
            &["unpaced_before", "unpaced_during"]
        };
        let (kind_before, kind_during) = (kinds[0], kinds[1]);
        let phase = Arc::new(std::sync::atomic::AtomicU8::new(0));
        let traffic = quiet_traffic(&target, recorder, &quiet, clients, kinds, &phase);
        recorder.mark(&format!("{kind_before} start"));
        tokio::time::sleep(window).await;
        // The purge: retention on for the big chat only (live).
        let mut config = live.load().config.clone();
        config.retention.overrides.insert(
            big.clone(),
            serde_json::from_value(
                json!({ "enabled": true, "minDays": 30, "minRevisions": 1000 }),
            )?,
        );
        live.update(config, "load tool")
            .map_err(|e| anyhow::anyhow!("retention override refused: {e:?}"))?;
        phase.store(1, Ordering::Relaxed);
        recorder.mark(&format!("{kind_during} start"));
        let goal = events - 1000 + 1;
        let mut started = None;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let first: u64 =
                sqlx::query_scalar("SELECT first_revision FROM chat WHERE chat_id = ?")
                    .bind(&big)
                    .fetch_one(&mut db)
                    .await?;
            if first > 1 && started.is_none() {
                started = Some((Instant::now(), first));
            }
            if first >= goal || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ended = Instant::now();
        phase.store(2, Ordering::Relaxed);
        for t in traffic {
            let _ = t.await;
        }
        let (t0, first0) = started.unwrap_or((ended, 1));
        let seconds = ended.duration_since(t0).as_secs_f64().max(0.001);
        let rows = goal.saturating_sub(first0);
        let before = recorder.quantile_ms(kind_before, 0.99).unwrap_or(0.0);
        let during = recorder.quantile_ms(kind_during, 0.99).unwrap_or(0.0);
        purges.push(json!({
            "rowsPerSecondSetting": rate,
            "eventsPurged": goal - 1,
            "rowsPerSecond": (rows as f64 / seconds).round(),
            "otherRequestsP99BeforeMs": before,
            "otherRequestsP99DuringMs": during,
            "p99Ratio": if before > 0.0 { during / before } else { 0.0 },
            "otherRequestsP50BeforeMs": recorder.quantile_ms(kind_before, 0.5),
            "otherRequestsP50DuringMs": recorder.quantile_ms(kind_during, 0.5),
        }));

        // Detect and repair: a count corrupted behind the service's back,
        // then one write; the time until the digest check repaired it.
        let mut repairs = Vec::new();
        if rate == paced {
            for (i, chat) in quiet.iter().take(5).enumerate() {
                sqlx::query(
                    "UPDATE chat_member_count SET member_count = member_count + 7 WHERE chat_id = ?",
                )
                .bind(chat)
                .execute(&mut db)
                .await?;
                let injected = Instant::now();
                target
                    .http
                    .post(format!("{}/v1/chats/{chat}/members", target.base))
                    .json(&json!({ "userId": format!("repair-{i}") }))
                    .send()
                    .await?;
                loop {
                    let (count, rows): (i64, i64) = sqlx::query_as(
                        "SELECT CAST(n.member_count AS SIGNED), \
                         (SELECT COUNT(*) FROM chat_member m WHERE m.chat_id = n.chat_id AND m.state = 1) \
                         FROM chat_member_count n WHERE n.chat_id = ?",
                    )
                    .bind(chat)
                    .fetch_one(&mut db)
                    .await?;
                    if count == rows {
                        break;
                    }
                    anyhow::ensure!(
                        injected.elapsed() < Duration::from_secs(30),
                        "the digest check did not repair {chat}"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                repairs.push(injected.elapsed().as_secs_f64() * 1000.0);
            }
            purges.push(json!({ "detectAndRepairMs": repairs }));
        }
        let _ = stop.send(());
        let _ = server.await;
    }

    // The digest's cost per 100,000 chats, measured on the shard alone.
    let prefix = run_id("digest");
    seed_small_chats(&mut db, &prefix, chats).await?;
    let shards = chatshard::app::build_shards(&settings)?;
    let shard = shards.all()[0].clone();
    let digest = chatshard::config::DigestSettings {
        chats_per_second: 1_000_000_000,
        ..chatshard::config::DigestSettings::default()
    };
    let started = Instant::now();
    let full = chatshard::service::lifecycle::digest_shard(&shard, &digest, true, None).await;
    let full_seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        full.stopped.is_none(),
        "full round stopped: {:?}",
        full.stopped
    );
    // 1 % changed since their check.
    sqlx::query(
        "UPDATE chat SET checked_revision = revision - 1 WHERE chat_id LIKE ? AND MOD(CRC32(chat_id), 100) = 0",
    )
    .bind(format!("{prefix}-%"))
    .execute(&mut db)
    .await?;
    let started = Instant::now();
    let incremental =
        chatshard::service::lifecycle::digest_shard(&shard, &digest, false, None).await;
    let incremental_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let idle = chatshard::service::lifecycle::digest_shard(&shard, &digest, false, None).await;
    let idle_seconds = started.elapsed().as_secs_f64();
    Ok(json!({
        "purge": purges,
        "digest": {
            "chats": full.checked,
            "fullRoundSeconds": full_seconds,
            "fullRoundSecondsPer100kChats": full_seconds * 100_000.0 / full.checked.max(1) as f64,
            "incrementalRoundChecked": incremental.checked,
            "incrementalRoundSeconds": incremental_seconds,
            "unchangedRoundSeconds": idle_seconds,
            "repairs": full.repairs.len() + incremental.repairs.len() + idle.repairs.len(),
        }
    }))
}

/// A chat with `n` events 40 days old (joins of `n / 2` users and their
/// messages), written straight to the shard in batches.
async fn seed_old_log(db: &mut MySqlConnection, chat: &str, n: u64) -> anyhow::Result<()> {
    let at = now() - chrono::Duration::days(40);
    chats::insert(db, chat, 100_000, at).await?;
    let mut revision = 0u64;
    while revision < n {
        let batch: Vec<u64> = ((revision + 1)..=(revision + 2000).min(n)).collect();
        let mut q = sqlx::QueryBuilder::new(
            "INSERT INTO chat_event (chat_id, revision, event_type, user_id, message_id, created_at) ",
        );
        q.push_values(&batch, |mut b, r| {
            b.push_bind(chat)
                .push_bind(*r)
                .push_bind(EventType::MemberJoined.code())
                .push_bind(format!("u{r}"))
                .push_bind(None::<u64>)
                .push_bind(at);
        });
        q.build().execute(&mut *db).await?;
        revision = batch.last().copied().unwrap_or(n);
    }
    // The member rows the joins left, so the chat is whole for the digest.
    let mut user = 0u64;
    while user < n {
        let batch: Vec<u64> = ((user + 1)..=(user + 2000).min(n)).collect();
        let names: Vec<String> = batch.iter().map(|u| format!("u{u}")).collect();
        let rows: Vec<members::NewMember<'_>> = names
            .iter()
            .map(|u| members::NewMember {
                user_id: u,
                state: MemberState::Joined.code(),
                joined_at: at,
                left_at: None,
            })
            .collect();
        members::insert_many(db, chat, &rows, at).await?;
        user = batch.last().copied().unwrap_or(n);
    }
    sqlx::query("UPDATE chat SET revision = ?, checked_revision = ? WHERE chat_id = ?")
        .bind(n)
        .bind(n)
        .bind(chat)
        .execute(&mut *db)
        .await?;
    sqlx::query("UPDATE chat_member_count SET member_count = ? WHERE chat_id = ?")
        .bind(n)
        .bind(chat)
        .execute(&mut *db)
        .await?;
    Ok(())
}

/// `n` chats of 3 members and 3 events each, written straight to the shard.
async fn seed_small_chats(db: &mut MySqlConnection, prefix: &str, n: u64) -> anyhow::Result<()> {
    let at = now();
    let mut i = 0u64;
    while i < n {
        let ids: Vec<String> = (i..(i + 1000).min(n))
            .map(|k| format!("{prefix}-{k:06}"))
            .collect();
        let mut q = sqlx::QueryBuilder::new(
            "INSERT INTO chat (chat_id, max_members, revision, created_at, checked_revision) ",
        );
        q.push_values(&ids, |mut b, id| {
            b.push_bind(id)
                .push_bind(100u32)
                .push_bind(3u64)
                .push_bind(at)
                .push_bind(3u64);
        });
        q.build().execute(&mut *db).await?;
        let mut q =
            sqlx::QueryBuilder::new("INSERT INTO chat_member_count (chat_id, member_count) ");
        q.push_values(&ids, |mut b, id| {
            b.push_bind(id).push_bind(3u32);
        });
        q.build().execute(&mut *db).await?;
        let rows: Vec<(&String, u64)> = ids
            .iter()
            .flat_map(|id| (1..=3).map(move |r| (id, r)))
            .collect();
        let mut q = sqlx::QueryBuilder::new(
            "INSERT INTO chat_member (chat_id, user_id, state, joined_at, left_at, created_at, updated_at) ",
        );
        q.push_values(&rows, |mut b, (id, r)| {
            b.push_bind(*id)
                .push_bind(format!("u{r}"))
                .push_bind(MemberState::Joined.code())
                .push_bind(at)
                .push_bind(None::<chrono::NaiveDateTime>)
                .push_bind(at)
                .push_bind(at);
        });
        q.build().execute(&mut *db).await?;
        let mut q = sqlx::QueryBuilder::new(
            "INSERT INTO chat_event (chat_id, revision, event_type, user_id, message_id, created_at) ",
        );
        q.push_values(&rows, |mut b, (id, r)| {
            b.push_bind(*id)
                .push_bind(*r)
                .push_bind(EventType::MemberJoined.code())
                .push_bind(format!("u{r}"))
                .push_bind(None::<u64>)
                .push_bind(at);
        });
        q.build().execute(&mut *db).await?;
        i += 1000;
    }
    Ok(())
}
