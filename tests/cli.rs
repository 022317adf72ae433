//! `chatshard serve --dev` from outside, as an operator and a misbehaving
//! client meet it: the real binary, its own local shard, raw sockets.
//!
//! - a configured admin token is never printed; a generated one is;
//! - `--shard-buffer-pool` reaches the local `mariadbd`;
//! - a second `serve --dev` on the same directory stops at once, in one line,
//!   naming the process that holds it;
//! - a client that never finishes its headers, sits idle after a request, or
//!   sends half a body is cut off after the configured timeouts;
//! - past `http.max_connections`, a connection is answered 503 at once;
//! - SIGTERM stops the service within the shutdown grace period even while a
//!   request waits for a body that never comes.
//!
//! Its own test binary: it runs the built `chatshard` binary.

#[path = "common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::Wait;

const TOKEN: &str = "cli-tests-configured-admin-token";

/// A running `serve --dev`, killed if the test fails before stopping it.
struct Serve {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    addr: SocketAddr,
}

impl Serve {
    fn start(dir: &Path, env: &[(&str, &str)]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_chatshard"))
            .args([
                "serve",
                "--dev",
                "--shards",
                "1",
                "--shard-buffer-pool",
                "32M",
            ])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(dir)
            .envs(env.iter().copied())
            .env_remove("CHATSHARD_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chatshard");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut serve = Self {
            child,
            lines,
            seen: Vec::new(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        serve.wait_for_line("chatshard listening on", Duration::from_secs(180));
        serve
    }

    fn wait_for_line(&mut self, needle: &str, within: Duration) -> String {
        Wait::new(within, format!("a line with {needle:?}")).until_blocking(|| {
            while let Ok(line) = self.lines.try_recv() {
                self.seen.push(line.clone());
                if line.contains(needle) {
                    return Ok(line);
                }
            }
            Err(format!("{:?}", self.seen))
        })
    }

    /// SIGTERM, then the time until the process exited.
    fn terminate(&mut self) -> Duration {
        let started = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let status = Wait::new(Duration::from_secs(60), "serve --dev stopped after SIGTERM")
            .until_blocking(|| self.child.try_wait().expect("try_wait").ok_or("running"));
        assert!(status.success(), "serve --dev exited with {status}");
        started.elapsed()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("chatshard-cli-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Reads until the server closes the connection (or `within` passes); what
/// was read, and how long it took.
fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (String, Duration) {
    let started = Instant::now();
    stream.set_read_timeout(Some(within)).expect("read timeout");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server kept the connection open for {within:?}: {e}"),
        }
    }
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

/// `n` bytes read from `stream` (within 15 s).
fn read_exactly(stream: &mut TcpStream, n: usize) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("read timeout");
    let mut buf = vec![0; n];
    stream.read_exact(&mut buf).expect("read");
    String::from_utf8_lossy(&buf).into_owned()
}

/// Whether the server still holds `conn` open and has sent nothing on it.
fn is_open_and_silent(conn: &TcpStream) -> bool {
    conn.set_nonblocking(true).expect("non-blocking");
    let mut byte = [0u8; 1];
    let open = matches!(conn.peek(&mut byte), Err(e) if e.kind() == ErrorKind::WouldBlock);
    conn.set_nonblocking(false).expect("blocking");
    open
}

#[test]
fn serve_dev_from_outside() {
    let dir = temp_dir();
    let mut serve = Serve::start(
        &dir,
        &[
            ("CHATSHARD_ADMIN_TOKEN", TOKEN),
            ("CHATSHARD__HTTP__HEADER_READ_TIMEOUT_MS", "1000"),
            ("CHATSHARD__HTTP__BODY_READ_TIMEOUT_MS", "1000"),
            ("CHATSHARD__HTTP__MAX_CONNECTIONS", "4"),
        ],
    );
    assert!(
        serve.seen.iter().all(|l| !l.contains(TOKEN)),
        "a configured token was printed: {:?}",
        serve.seen
    );

    // The buffer pool asked for is the local server's.
    let url = serve
        .seen
        .iter()
        .find_map(|l| Some(l.trim().strip_prefix("shard-0 (")?.split_once(')')?.0))
        .unwrap_or_else(|| panic!("no line names shard-0's URL: {:?}", serve.seen))
        .to_owned();
    let pool: u64 = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            use sqlx::Connection;
            let mut conn = sqlx::MySqlConnection::connect(&url)
                .await
                .expect("connect to the local shard");
            sqlx::query_scalar("SELECT @@innodb_buffer_pool_size")
                .fetch_one(&mut conn)
                .await
                .expect("read the buffer pool size")
        });
    assert_eq!(pool, 32 << 20, "the local shard's buffer pool");

    // A second serve --dev on the same directory: at once, one line.
    let started = Instant::now();
    let second = Command::new(env!("CARGO_BIN_EXE_chatshard"))
        .args([
            "serve",
            "--dev",
            "--shards",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("second serve --dev");
    assert!(!second.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let stderr = String::from_utf8_lossy(&second.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("in use"), "{stderr}");
    assert!(
        errors[0].contains(&serve.child.id().to_string()),
        "{stderr}"
    );
    assert!(!stderr.contains("mariadbd"), "{stderr}");

    // Headers that never end: closed after the header timeout.
    let mut slow = TcpStream::connect(serve.addr).expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    let (_, took) = read_until_closed(&mut slow, Duration::from_secs(15));
    assert!(
        took < Duration::from_secs(10),
        "half a header held {took:?}"
    );

    // Idle after a complete request: closed after the same timeout.
    let mut idle = TcpStream::connect(serve.addr).expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let (answer, took) = read_until_closed(&mut idle, Duration::from_secs(15));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        took < Duration::from_secs(10),
        "an idle connection was held {took:?}"
    );

    // Half a body: 408 problem+json after the body timeout.
    let mut half = TcpStream::connect(serve.addr).expect("connect");
    half.write_all(
        b"POST /v1/chats/cli/members HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"userId\":",
    )
    .expect("write");
    let (answer, _) = read_until_closed(&mut half, Duration::from_secs(15));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");

    // Past max_connections: a refusal at once, before anything is read. The
    // extra connection sends nothing, so its answer cannot come from reading
    // a request; and it comes while the four held connections are all still
    // open, so it did not wait for a place that the header timeout frees.
    let held: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(serve.addr).expect("connect"))
        .collect();
    let mut extra = TcpStream::connect(serve.addr).expect("connect");
    let (answer, _) = read_until_closed(&mut extra, Duration::from_secs(5));
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too_many_connections"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    for (i, conn) in held.iter().enumerate() {
        assert!(
            is_open_and_silent(conn),
            "held connection {i} was closed before the refusal came"
        );
    }
    drop(held);

    let stopped = serve.terminate();
    eprintln!("first serve --dev stopped {stopped:?} after SIGTERM");
    drop(serve);

    // Without a configured token one is generated, and printed.
    let mut serve = Serve::start(
        &dir,
        &[
            ("CHATSHARD__HTTP__BODY_READ_TIMEOUT_MS", "60000"),
            ("CHATSHARD__HTTP__SHUTDOWN_GRACE_MS", "1000"),
        ],
    );
    let line = serve
        .seen
        .iter()
        .find(|l| l.starts_with("admin token (Authorization: Bearer ...): "))
        .cloned()
        .unwrap_or_else(|| panic!("no generated token printed: {:?}", serve.seen));
    assert_eq!(line.rsplit(' ').next().map(str::len), Some(32), "{line}");

    // A request waiting for a body that never comes does not hold up SIGTERM
    // beyond the grace period (plus the local shard's own clean stop). It
    // asks for `100 Continue`, which the server sends only once the handler
    // reads the body: with it, the request is in its handler.
    let mut waiting = TcpStream::connect(serve.addr).expect("connect");
    waiting
        .write_all(
            b"POST /v1/chats/cli/members HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\nexpect: 100-continue\r\n\r\n",
        )
        .expect("write");
    let continued = read_exactly(&mut waiting, "HTTP/1.1 100 Continue\r\n\r\n".len());
    assert_eq!(continued, "HTTP/1.1 100 Continue\r\n\r\n");
    waiting.write_all(b"{").expect("write half a body");
    let stopped = serve.terminate();
    eprintln!("second serve --dev stopped {stopped:?} after SIGTERM with a request in flight");
    assert!(
        stopped < Duration::from_secs(30),
        "SIGTERM took {stopped:?}"
    );
    drop(waiting);
    let _ = std::fs::remove_dir_all(&dir);
}
