//! Property-based API testing with schemathesis (PyPI) against `/openapi.json`:
//! every check schemathesis has, in every phase (examples, coverage, fuzzing,
//! stateful), on every route (the admin ones with the token). Only the two
//! documented business rules are exempt, in `schemathesis.toml` beside this
//! file: a member who left reads back as `LEFT`, and a `clientMessageId` reused
//! for another text is 422 `idempotency_key_reused`.
//!
//! schemathesis is installed on first use into a virtualenv under the cargo
//! target dir (kept between runs); `CHATSHARD_SCHEMATHESIS` may name an
//! existing executable instead.

use std::path::PathBuf;
use std::process::Command;

use crate::helpers::TestApp;

const VERSION: &str = "4.32.5";

fn schemathesis() -> PathBuf {
    if let Ok(path) = std::env::var("CHATSHARD_SCHEMATHESIS") {
        return PathBuf::from(path);
    }
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("schemathesis-{VERSION}"));
    let exe = venv.join("bin").join("schemathesis");
    if exe.exists() {
        return exe;
    }
    let status = Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg(&venv)
        .status()
        .expect("python3 -m venv");
    assert!(
        status.success(),
        "python3 -m venv failed: install python3-venv"
    );
    let status = Command::new(venv.join("bin").join("pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            &format!("schemathesis=={VERSION}"),
        ])
        .status()
        .expect("pip install schemathesis");
    assert!(status.success(), "pip install schemathesis failed");
    exe
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_errors_and_no_schema_violations() {
    let exe = tokio::task::spawn_blocking(schemathesis).await.unwrap();
    const TOKEN: &str = "schemathesis-admin-token";
    // Shards of its own: generated admin calls move chats and bucket ranges,
    // which must not move the other tests' chats.
    let settings = crate::helpers::isolated_settings("schemathesis").await;
    let app = TestApp::spawn_on(settings, |s| s.admin.token = TOKEN.to_owned()).await;
    // Some real data, so that generated requests also hit existing chats.
    for chat in ["a", "b", "0", "A", "_", "-"] {
        app.put_chat(chat, None).await;
        app.join(chat, "a").await;
    }
    let schema = app.url("/openapi.json");
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/api/schemathesis.toml");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(exe)
            // schemathesis keeps a cache in its working directory.
            .current_dir(env!("CARGO_TARGET_TMPDIR"))
            .args([
                "--config-file",
                config,
                "run",
                &schema,
                "--header",
                &format!("Authorization: Bearer {TOKEN}"),
                "--phases",
                "examples,coverage,fuzzing,stateful",
                "--max-examples",
                "40",
                "--seed",
                "1",
                // One worker: hypothesis' source inspection is not thread-safe on
                // CPython 3.11 ("AST constructor recursion depth mismatch").
                "--workers",
                "1",
                "--no-color",
            ])
            .output()
            .expect("run schemathesis")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schemathesis failed:\n{stdout}\n{stderr}"
    );
}
