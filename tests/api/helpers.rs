//! The api binary's view of the test kit (`tests/common`): apps on three
//! shared shards, each test with its own chat ids, and the checks of answers
//! that only the API tests make.

use reqwest::Response;
use serde_json::Value;
use sqlx::{Connection, MySqlConnection};

pub use crate::common::TestApp;
pub use crate::common::unique;

pub const SHARDS: usize = crate::common::app::DEFAULT_SHARDS;

/// Settings for the shared shards, with every other value at its default.
pub fn settings() -> chatshard::config::Settings {
    crate::common::app::shared_settings(SHARDS)
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
pub async fn isolated_settings(tag: &str) -> chatshard::config::Settings {
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
