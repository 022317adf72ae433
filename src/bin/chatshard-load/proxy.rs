//! A TCP proxy that delays what it forwards: a slow dependency (Redis, say)
//! for the measurements of what a slow dependency costs a request. Every
//! chunk read in either direction is written out `delay` after it was read,
//! in order; the proxy stops after its duration.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

pub async fn run(
    listen: SocketAddr,
    to: SocketAddr,
    delay: Duration,
    duration: Duration,
) -> anyhow::Result<Value> {
    let listener = TcpListener::bind(listen).await?;
    eprintln!("proxy {listen} -> {to}, {} ms each way", delay.as_millis());
    let until = Instant::now() + duration;
    let mut connections = 0u64;
    loop {
        let accepted = tokio::time::timeout_at(until.into(), listener.accept()).await;
        let Ok(accepted) = accepted else { break };
        let (client, _) = accepted?;
        connections += 1;
        tokio::spawn(async move {
            let Ok(upstream) = TcpStream::connect(to).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (ur, uw) = upstream.into_split();
            tokio::join!(pipe(cr, uw, delay, until), pipe(ur, cw, delay, until));
        });
    }
    Ok(json!({
        "name": "proxy",
        "listen": listen.to_string(),
        "to": to.to_string(),
        "delayMs": delay.as_millis() as u64,
        "connections": connections,
    }))
}

/// Copies `from` to `to`, each chunk `delay` after it was read.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    until: Instant,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until((at + delay).into()).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let read = tokio::time::timeout_at(until.into(), from.read(&mut buf)).await;
            match read {
                Ok(Ok(n)) if n > 0 => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    };
    tokio::join!(reader, writer);
}
