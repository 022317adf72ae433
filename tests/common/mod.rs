//! What every test binary shares: local shards started once per binary, admin
//! requests, `/metrics` samples, and the checks of stored rows (count equals
//! JOINED rows, revisions gapless). Each binary includes it with
//! `#[path = "../common/mod.rs"] mod common;` and uses what it needs.
#![allow(dead_code)]

use std::sync::OnceLock;

use chatshard::localdb::cluster::LocalCluster;
use serde_json::Value;
use sqlx::MySqlConnection;

/// Shards started once for the whole test binary (temporary data dirs, killed
/// and removed when the process exits, even after a panic).
pub fn shared_cluster(shards: usize) -> &'static LocalCluster {
    static CLUSTER: OnceLock<LocalCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        // Started on a runtime of its own: each test has its own runtime, and
        // the servers outlive every one of them.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(LocalCluster::start_temp(shards))
                .expect("start test shards")
        })
        .join()
        .expect("cluster start thread")
    })
}

/// A request to the admin API with `token`.
pub fn admin(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    method: reqwest::Method,
    path: &str,
) -> reqwest::RequestBuilder {
    http.request(method, format!("{base}{path}"))
        .bearer_auth(token)
}

/// `GET` of an admin route, asserting 200; the JSON body.
pub async fn admin_get(http: &reqwest::Client, base: &str, token: &str, path: &str) -> Value {
    let r = admin(http, base, token, reqwest::Method::GET, path)
        .send()
        .await
        .expect("admin request");
    assert_eq!(r.status(), 200, "GET {path}");
    r.json().await.expect("admin json")
}

/// Prometheus samples of `/metrics` named `metric`: labels and value.
pub async fn metric_samples(
    http: &reqwest::Client,
    base: &str,
    metric: &str,
) -> Vec<(String, f64)> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(metric)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            Some((labels.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// The sum of the samples whose labels contain every one of `labels`
/// (each `key="value"`).
pub fn sum_where(samples: &[(String, f64)], labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(l, _)| labels.iter().all(|want| l.contains(want)))
        .map(|(_, v)| v)
        .sum()
}

/// (member_count, JOINED rows) of a chat, read from its shard.
pub async fn count_and_rows(db: &mut MySqlConnection, chat: &str) -> (i64, i64) {
    let count: i64 = sqlx::query_scalar(
        "SELECT CAST(member_count AS SIGNED) FROM chat_member_count WHERE chat_id = ?",
    )
    .bind(chat)
    .fetch_one(&mut *db)
    .await
    .expect("count");
    let rows: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM chat_member WHERE chat_id = ? AND state = 1")
            .bind(chat)
            .fetch_one(&mut *db)
            .await
            .expect("rows");
    (count, rows)
}

/// The users JOINED to a chat, from its shard.
pub async fn joined_users(db: &mut MySqlConnection, chat: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT user_id FROM chat_member WHERE chat_id = ? AND state = 1")
        .bind(chat)
        .fetch_all(&mut *db)
        .await
        .expect("members")
}

/// Asserts that a chat's stored count equals its JOINED rows and that its
/// event revisions are 1, 2, ... up to the chat's revision, with no gap.
pub async fn assert_chat_consistent(db: &mut MySqlConnection, chat: &str) {
    let (count, rows) = count_and_rows(db, chat).await;
    assert_eq!(count, rows, "count of {chat}");
    let revisions: Vec<i64> = sqlx::query_scalar(
        "SELECT CAST(e.revision AS SIGNED) FROM chat_event e JOIN chat c ON c.chat_id = e.chat_id \
         WHERE e.chat_id = ? AND e.revision >= c.first_revision ORDER BY e.revision",
    )
    .bind(chat)
    .fetch_all(&mut *db)
    .await
    .expect("events");
    // Gapless from the first revision still stored (1 until a purge).
    let (latest, first): (i64, i64) = sqlx::query_as(
        "SELECT CAST(revision AS SIGNED), CAST(first_revision AS SIGNED) FROM chat WHERE chat_id = ?",
    )
    .bind(chat)
    .fetch_one(&mut *db)
    .await
    .expect("chat");
    assert_eq!(
        revisions,
        (first..=latest).collect::<Vec<_>>(),
        "gap in {chat} (revision {latest}, first stored {first})"
    );
}

/// One server-sent event.
#[derive(Debug, Default, Clone)]
pub struct Sse {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// Reads the server-sent events of a stream.
pub struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    /// Opens `base` + `path` as a stream (resuming after `last_event_id`), or
    /// gives back the refusal when it did not open. Checks the stream's
    /// headers.
    pub async fn open(
        http: &reqwest::Client,
        base: &str,
        path: &str,
        last_event_id: Option<u64>,
    ) -> Result<Self, reqwest::Response> {
        let mut request = http.get(format!("{base}{path}"));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let r = request.send().await.expect("stream request");
        if r.status() != reqwest::StatusCode::OK {
            return Err(r);
        }
        let headers = r.headers();
        assert_eq!(headers["content-type"], "text/event-stream");
        assert_eq!(headers["cache-control"], "no-cache");
        assert_eq!(headers["x-accel-buffering"], "no");
        Ok(Self {
            response: r,
            buffer: String::new(),
        })
    }

    /// The next event (comments skipped): `Ok(None)` when the stream ended,
    /// `Err(())` when nothing came within `within`.
    pub async fn next_within(&mut self, within: std::time::Duration) -> Result<Option<Sse>, ()> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut sse = Sse::default();
                let mut any = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        sse.id = Some(v.trim().to_owned());
                        any = true;
                    } else if let Some(v) = line.strip_prefix("event:") {
                        sse.event = Some(v.trim().to_owned());
                        any = true;
                    } else if let Some(v) = line.strip_prefix("data:") {
                        sse.data.push_str(v.trim_start());
                        any = true;
                    }
                }
                if any {
                    return Ok(Some(sse));
                }
                continue;
            }
            let left = deadline
                .checked_duration_since(std::time::Instant::now())
                .ok_or(())?;
            match tokio::time::timeout(left, self.response.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(Ok(None)) | Ok(Err(_)) => return Ok(None),
                Err(_) => return Err(()),
            }
        }
    }

    /// The next event, or `None` when the stream ended; fails when nothing
    /// came within `within`.
    pub async fn next(&mut self, within: std::time::Duration) -> Option<Sse> {
        self.next_within(within)
            .await
            .unwrap_or_else(|()| panic!("no event within {within:?}"))
    }
}

/// Polls `check` every 20 ms until it holds, or fails after `within`.
pub async fn eventually<F, Fut>(within: std::time::Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
