//! The image's `HEALTHCHECK` (docker/Dockerfile): `GET` one path of chatshard's
//! listener and exit 0 on a `200`, 1 on anything else (no answer, a refused
//! connection, another status). Standard library only, built with `rustc` in the
//! build stage, so the runtime image needs neither a shell nor curl.
//!
//! Usage: `chatshard-healthcheck [ADDRESS] [PATH]`, by default
//! `127.0.0.1:8080 /healthz`. tests/api/image.rs builds it as the Dockerfile
//! does and runs it against a serving instance.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

/// Connect, write and read timeouts, each; under the HEALTHCHECK's `--timeout`.
const TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let address = args.next().unwrap_or_else(|| "127.0.0.1:8080".to_owned());
    let path = args.next().unwrap_or_else(|| "/healthz".to_owned());
    match check(&address, &path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("unhealthy: GET {path} on {address}: {why}");
            ExitCode::from(1)
        }
    }
}

fn check(address: &str, path: &str) -> Result<(), String> {
    let socket = address
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("the address resolves to nothing")?;
    let mut stream = TcpStream::connect_timeout(&socket, TIMEOUT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    // The status line is all that is read: `HTTP/1.1 200 OK`.
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let n = stream.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let line = text.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(version), Some("200")) if version.starts_with("HTTP/1.") => Ok(()),
        _ => Err(format!("answered {line:?}")),
    }
}
