//! TLS to the shards, against real `mariadbd` servers that take only TLS
//! (`--require-secure-transport=ON`) with certificates of a throw-away CA
//! (`chatshard::localdb::tls`, made with the `openssl` command).
//!
//! Each test owns its server and its certificates: both are removed when
//! the test ends, after a failure too.

#[path = "common/mod.rs"]
mod common;

use chatshard::app::App;
use chatshard::config::{Settings, ShardSettings};
use chatshard::localdb::tls::{CertifiedKey, TestCertificates};
use chatshard::localdb::{LocalMariaDb, LocalMariaDbOptions, LocalTls};
use reqwest::StatusCode;
use serde_json::Value;
use sqlx::Row as _;

use common::TestApp;

/// A server that takes only TLS, with `cert`.
async fn tls_only_server(pki: &TestCertificates, cert: &CertifiedKey) -> LocalMariaDb {
    let mut options = LocalMariaDbOptions::temp();
    options.tls = Some(LocalTls {
        ca: pki.ca().to_owned(),
        cert: cert.cert.clone(),
        key: cert.key.clone(),
        require_secure_transport: true,
    });
    LocalMariaDb::start(options)
        .await
        .unwrap_or_else(|e| panic!("starting a TLS-only mariadbd: {e:#}"))
}

/// A CA and a server certificate for `names`.
fn certificates(names: &[&str]) -> (TestCertificates, CertifiedKey) {
    let pki = TestCertificates::temp().unwrap_or_else(|e| panic!("making a CA: {e:#}"));
    let cert = pki
        .server("server", names)
        .unwrap_or_else(|e| panic!("making a server certificate: {e:#}"));
    (pki, cert)
}

/// One shard, `tls-shard`, on `server` with the URL options `options`.
fn shard(server: &LocalMariaDb, options: &str) -> ShardSettings {
    ShardSettings {
        name: "tls-shard".into(),
        url: format!("{}?{options}", server.plain_url("chatshard")),
        buckets: vec!["0-1023".into()],
        id_block: None,
        replicas: vec![],
    }
}

fn settings(shard: ShardSettings) -> Settings {
    let mut settings =
        Settings::from_toml_unvalidated("listen = \"127.0.0.1:0\"", []).expect("default settings");
    settings.shards = vec![shard];
    settings
}

/// The TLS version of a session opened the way `migrate` opens them; empty
/// when the session is not encrypted.
async fn session_tls_version(shard: &ShardSettings) -> String {
    let mut conn = chatshard::migrate::connect(shard)
        .await
        .unwrap_or_else(|e| panic!("connecting: {e:#}"));
    let row = sqlx::query("SHOW SESSION STATUS LIKE 'Ssl_version'")
        .fetch_one(&mut conn)
        .await
        .expect("Ssl_version");
    row.try_get::<String, _>(1).expect("Ssl_version value")
}

/// `App::build`'s error, which must exist.
async fn start_error(settings: &Settings) -> String {
    match App::build(settings).await {
        Ok(_) => panic!("the app started on {:?}", settings.shards),
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_identity_migrates_then_serves_a_join_and_a_read() {
    let (pki, cert) = certificates(&["localhost", "127.0.0.1"]);
    let server = tls_only_server(&pki, &cert).await;
    let shard = shard(
        &server,
        &format!("ssl-mode=VERIFY_IDENTITY&ssl-ca={}", pki.ca().display()),
    );

    let schema = chatshard::migrate::migrate_shard(&shard)
        .await
        .unwrap_or_else(|e| panic!("migrate over TLS: {e:#}"));
    assert_eq!(schema.shard, "tls-shard");
    // The options of the URL reached the connection: it is encrypted.
    let version = session_tls_version(&shard).await;
    assert!(version.starts_with("TLS"), "Ssl_version {version:?}");

    let app = TestApp::builder().settings(settings(shard)).start().await;
    let chat = app.new_chat("tls").await;
    assert_eq!(app.join(&chat, "u1").await.status(), StatusCode::CREATED);
    let r = app.get(&format!("/v1/chats/{chat}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.expect("the chat");
    assert_eq!(body["memberCount"], 1, "{body}");
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_mode_disabled_against_a_tls_only_server_fails_the_start_naming_the_shard() {
    let (pki, cert) = certificates(&["localhost", "127.0.0.1"]);
    let server = tls_only_server(&pki, &cert).await;
    let shard = shard(&server, "ssl-mode=DISABLED");

    let e = match chatshard::migrate::migrate_shard(&shard).await {
        Ok(_) => panic!("migrate without TLS reached a TLS-only server"),
        Err(e) => format!("{e:#}"),
    };
    // MariaDB refuses the login (MySQL 8 would name the secure transport):
    // the error says both.
    let start = start_error(&settings(shard)).await;
    assert!(
        start.starts_with("refusing to start: shard tls-shard"),
        "{start}"
    );
    for e in [e, start] {
        assert!(e.contains("shard tls-shard"), "{e}");
        assert!(e.contains("ssl-mode=DISABLED"), "{e}");
        assert!(e.contains("require_secure_transport=ON"), "{e}");
        assert!(e.contains("Access denied"), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_fails_verify_identity_and_passes_verify_ca() {
    let (pki, cert) = certificates(&["not-this-host.example"]);
    let server = tls_only_server(&pki, &cert).await;
    let ca = pki.ca().display().to_string();

    let strict = shard(&server, &format!("ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}"));
    let e = match chatshard::migrate::migrate_shard(&strict).await {
        Ok(_) => panic!("VERIFY_IDENTITY accepted a certificate for another name"),
        Err(e) => format!("{e:#}"),
    };
    let start = start_error(&settings(strict)).await;
    assert!(
        start.starts_with("refusing to start: shard tls-shard"),
        "{start}"
    );
    for e in [e, start] {
        assert!(e.contains("shard tls-shard"), "{e}");
        assert!(e.contains("ssl-mode=VERIFY_IDENTITY"), "{e}");
        assert!(e.contains("the TLS connection failed"), "{e}");
        assert!(e.contains("not valid for name"), "{e}");
    }

    let lenient = shard(&server, &format!("ssl-mode=VERIFY_CA&ssl-ca={ca}"));
    chatshard::migrate::migrate_shard(&lenient)
        .await
        .unwrap_or_else(|e| panic!("migrate with VERIFY_CA: {e:#}"));
    let app = TestApp::builder().settings(settings(lenient)).start().await;
    let chat = app.new_chat("tls-ca").await;
    assert_eq!(app.join(&chat, "u1").await.status(), StatusCode::CREATED);
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_did_not_sign_the_server_fails_verify_ca() {
    let (pki, cert) = certificates(&["localhost", "127.0.0.1"]);
    let other = TestCertificates::temp().unwrap_or_else(|e| panic!("making a CA: {e:#}"));
    let server = tls_only_server(&pki, &cert).await;
    let shard = shard(
        &server,
        &format!("ssl-mode=VERIFY_CA&ssl-ca={}", other.ca().display()),
    );
    let e = start_error(&settings(shard)).await;
    assert!(e.starts_with("refusing to start: shard tls-shard"), "{e}");
    assert!(e.contains("the TLS connection failed"), "{e}");
    assert!(e.contains("invalid peer certificate"), "{e}");
}
