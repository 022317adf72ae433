//! The served OpenAPI document, as its users consume it: checked by
//! openapi-spec-validator (PyPI), turned into a Python client by
//! openapi-python-client (PyPI), and the README's curl session replayed through
//! that generated client (tests/openapi/readme_session.py) against a real app,
//! open and with a client's bearer token (`[[api.clients]]`).
//!
//! Both tools are installed on first use into one virtualenv under the cargo
//! target dir (kept between runs); each run writes the document and the
//! generated client into a fresh directory, removed when the test passes and
//! kept (its path is in the failure message) when it fails.

use std::path::{Path, PathBuf};
use std::process::Output;

use tokio::process::Command;

use crate::helpers::{TestApp, unique};

const SPEC_VALIDATOR: &str = "0.9.0";
const PYTHON_CLIENT: &str = "0.29.1";
/// The generated package's name: the directory it is written to.
const PACKAGE: &str = "chatshard_client";

/// The virtualenv with both tools; created and filled once. Tests that
/// need it at the same time (in this process or another) take a file lock
/// first: on a machine without it, two of them creating it at once failed
/// (`File exists`).
async fn tools() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("openapi-tools-{SPEC_VALIDATOR}-{PYTHON_CLIENT}"));
    let installed = venv.join(".installed");
    if installed.exists() {
        return venv;
    }
    let mut lock_path = venv.clone().into_os_string();
    lock_path.push(".lock");
    let lock = std::fs::File::create(lock_path).expect("create the tools' lock");
    // Held until this function returns (dropped with `lock`).
    lock.lock().expect("take the tools' lock");
    if installed.exists() {
        return venv;
    }
    // Left half-made by a run that stopped while installing.
    let _ = std::fs::remove_dir_all(&venv);
    let out = run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).await;
    assert!(
        out.status.success(),
        "python3 -m venv failed (install python3-venv):\n{}",
        text(&out)
    );
    let out = run(Command::new(venv.join("bin").join("pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("openapi-spec-validator=={SPEC_VALIDATOR}"),
        &format!("openapi-python-client=={PYTHON_CLIENT}"),
    ]))
    .await;
    assert!(
        out.status.success(),
        "pip install openapi-spec-validator openapi-python-client failed:\n{}",
        text(&out)
    );
    std::fs::write(&installed, "").expect("mark the virtualenv as installed");
    venv
}

async fn run(command: &mut Command) -> Output {
    command
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "exit: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A directory for one run: removed on drop unless the test is failing.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// `PATH` with the virtualenv's `bin` first: openapi-python-client runs the
/// `ruff` installed beside it on the generated code, and warns without it.
fn path_with(bin: &Path) -> std::ffi::OsString {
    let mut paths = vec![bin.to_path_buf()];
    if let Some(path) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(paths).expect("PATH")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_is_valid_and_a_generated_client_runs_the_readme_session() {
    let app = TestApp::spawn().await;
    readme_session_through_a_generated_client(&app, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_client_runs_the_readme_session_with_a_clients_token() {
    use chatshard::config::{ApiClient, Scope};
    use sha2::Digest as _;
    const TOKEN: &str = "openapi-readme-session-client-token";
    let app = TestApp::builder()
        .configure(|s| {
            s.api.clients = vec![ApiClient {
                name: "readme".to_owned(),
                token_sha256: sha2::Sha256::digest(TOKEN.as_bytes())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect(),
                scopes: vec![Scope::Read, Scope::Write],
                ..ApiClient::default()
            }];
        })
        .start()
        .await;
    // The document says so: the bearer scheme, on every data route the
    // session calls, and not on the open ones.
    let document: serde_json::Value = app.get("/openapi.json").await.json().await.expect("json");
    assert_eq!(
        document["components"]["securitySchemes"]["client_token"],
        serde_json::json!({"type": "http", "scheme": "bearer", "description": "A token of [[api.clients]]"})
    );
    let bearer = serde_json::json!([{ "client_token": [] }]);
    for (path, method) in [
        ("/v1/chats/{chatId}", "put"),
        ("/v1/chats/{chatId}/members", "post"),
        ("/v1/chats/{chatId}/member-count", "get"),
        ("/v1/chats/{chatId}/messages", "post"),
        ("/v1/chats/{chatId}/events", "get"),
        ("/v1/streams", "post"),
    ] {
        assert_eq!(
            document["paths"][path][method]["security"], bearer,
            "{method} {path}"
        );
    }
    let open = &document["paths"]["/healthz"]["get"]["security"];
    assert!(
        !open.to_string().contains("client_token"),
        "/healthz: {open}"
    );
    // Without the token the session's first step is refused.
    let refused = app.put_chat(&unique("readme"), None).await;
    assert_eq!(refused.status().as_u16(), 401);
    readme_session_through_a_generated_client(&app, Some(TOKEN)).await;
}

/// Validates the app's document, generates a Python client from it and runs
/// the README session through that client (with `token` as a client's bearer
/// token, if given).
async fn readme_session_through_a_generated_client(app: &TestApp, token: Option<&str>) {
    let venv = tools().await;
    let bin = venv.join("bin");

    let dir = RunDir(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("openapi-run")));
    std::fs::create_dir_all(&dir.0).expect("create run dir");
    let r = app.get("/openapi.json").await;
    assert_eq!(r.status().as_u16(), 200, "GET /openapi.json");
    let spec = dir.0.join("openapi.json");
    std::fs::write(&spec, r.bytes().await.expect("body")).expect("write openapi.json");
    let kept = format!("(document and client kept in {})", dir.0.display());

    // 1. The document is valid OpenAPI (the version is detected from `openapi`: 3.1).
    let out = run(Command::new(bin.join("openapi-spec-validator"))
        .args(["--validation-errors", "all"])
        .arg(&spec))
    .await;
    assert!(
        out.status.success(),
        "openapi-spec-validator {SPEC_VALIDATOR} rejects /openapi.json {kept}:\n{}",
        text(&out)
    );

    // 2. A client is generated from it, with no warning (a warning means
    //    "some pieces may be missing" from the client).
    let package = dir.0.join(PACKAGE);
    let out = run(Command::new(bin.join("openapi-python-client"))
        .env("PATH", path_with(&bin))
        .current_dir(&dir.0)
        .args(["generate", "--meta", "none", "--fail-on-warning", "--path"])
        .arg(&spec)
        .arg("--output-path")
        .arg(&package))
    .await;
    assert!(
        out.status.success() && package.join("__init__.py").exists(),
        "openapi-python-client {PYTHON_CLIENT} cannot generate a client from /openapi.json {kept}:\n{}",
        text(&out)
    );

    // 3. The README's curl session through the generated client.
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/openapi/readme_session.py"
    );
    let mut session = Command::new(bin.join("python"));
    session
        .env("PYTHONPATH", &dir.0)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .arg(script)
        .args(["--base-url", &app.base])
        .args(["--chat-id", &unique("readme")])
        .args(["--missing-chat-id", &unique("readme-missing")]);
    if let Some(token) = token {
        session.args(["--token", token]);
    }
    let out = run(&mut session).await;
    assert!(
        out.status.success(),
        "the README session through the generated client failed {kept}:\n{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_streams_document_their_events_data_and_the_same_last_event_id() {
    let app = TestApp::spawn().await;
    let document: serde_json::Value = app.get("/openapi.json").await.json().await.expect("json");
    let schemas = &document["components"]["schemas"];
    for (path, events) in [
        (
            "/v1/chats/{chatId}/events/stream",
            &["message", "shutdown", "error"][..],
        ),
        (
            "/v1/streams/{streamId}",
            &[
                "message", "resync", "removed", "shutdown", "replaced", "closed",
            ][..],
        ),
    ] {
        let operation = &document["paths"][path]["get"];
        let ok = &operation["responses"]["200"];
        let described = ok["description"].as_str().expect("description");
        for event in events {
            let reference = ok["x-sse-events"][event]["$ref"]
                .as_str()
                .unwrap_or_else(|| panic!("{path}: no schema for `{event}`"));
            let name = reference
                .strip_prefix("#/components/schemas/")
                .expect("a component schema");
            assert!(schemas[name].is_object(), "{path}: {name} is not defined");
            assert!(
                described.contains(&format!("`{event}`: [{name}]")),
                "{path}: {described}"
            );
        }
        let header = operation["parameters"]
            .as_array()
            .expect("parameters")
            .iter()
            .find(|p| p["name"] == "Last-Event-ID")
            .expect("Last-Event-ID");
        assert_eq!(header["required"], serde_json::json!(false), "{path}");
        assert_eq!(
            header["schema"],
            serde_json::json!({"type": "string", "pattern": "^[0-9]{0,18}$"}),
            "{path}"
        );
        let refused = operation["responses"]["422"]["description"]
            .as_str()
            .expect("422");
        assert!(refused.contains("Last-Event-ID"), "{path}: {refused}");
    }
    app.shut_down().await;
}
