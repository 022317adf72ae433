//! The connection loop: what a client may hold and for how long.
//!
//! `axum::serve` keeps a connection for as long as the client likes: a client
//! that never finishes its headers (or its body) holds a socket forever, and a
//! graceful stop waits for it. Here every connection is bounded:
//!
//! - headers must arrive within `header_read_timeout_ms`; the same timer runs
//!   while a keep-alive connection waits for its next request, so an idle
//!   connection is closed after it too (hyper's header-read timeout);
//! - a request body must arrive within `body_read_timeout_ms` (the JSON
//!   extractor, 408 `request_timeout`);
//! - at most `max_connections` connections are open; one more is answered at
//!   once with 503 `too_many_connections` (problem+json, `Retry-After`) and
//!   closed, before anything of it is read;
//! - on shutdown the listener closes, connections are asked to finish their
//!   request in flight, and whatever is still open after `shutdown_grace_ms`
//!   is closed.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::problem::{Code, Problem};
use crate::config::HttpSettings;

/// Serves `router` on `listener` until `shutdown` completes, then drains.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    settings: HttpSettings,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout());
    builder.http2().timer(TokioTimer::new());
    let service = TowerToHyperService::new(router);
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly
                    // rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Reap finished connection tasks so the set does not grow.
        while connections.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, settings.max_connections));
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on a client connection");
        }
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service.clone())
            .into_owned();
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            let _slot = slot;
            if let Err(e) = connection.await {
                // Timeouts, resets and protocol errors of one client.
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        });
    }
    drop(listener);
    let open = graceful.count();
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(settings.shutdown_grace()) => {
            tracing::warn!(
                open,
                grace_ms = settings.shutdown_grace_ms,
                "connections still open after the shutdown grace period are closed"
            );
        }
    }
    connections.shutdown().await;
}

/// Answers a connection over the limit and closes it, without reading it.
async fn refuse(mut stream: TcpStream, limit: usize) {
    let problem = Problem::new(
        Code::TooManyConnections,
        format!("this instance holds its maximum of {limit} connections; retry shortly"),
    );
    let body = serde_json::to_vec(&problem).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: {}\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n",
        super::problem::PROBLEM_JSON,
        body.len()
    );
    let answer = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.shutdown().await
    };
    // A client that does not read its refusal is not waited for.
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}
