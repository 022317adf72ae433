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
//! - a connection whose client takes none of the bytes written to it for
//!   `write_stall_timeout_ms` is closed ([`StallGuard`]): a stream subscriber
//!   that stopped reading holds its socket's send buffer (the kernel's, or
//!   `socket_send_buffer_bytes`), the server's `send_buffer_bytes` and one
//!   page of events, and then nothing;
//! - on shutdown the listener closes, connections are asked to finish their
//!   request in flight, and whatever is still open after `shutdown_grace_ms`
//!   is closed.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::problem::{Code, Problem};
use crate::config::HttpSettings;
use crate::metrics::Metrics;

/// Serves `router` on `listener` until `shutdown` completes, then drains.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    settings: HttpSettings,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout())
        .max_buf_size(settings.send_buffer_bytes);
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
        if settings.socket_send_buffer_bytes > 0
            && let Err(e) = socket2::SockRef::from(&stream)
                .set_send_buffer_size(settings.socket_send_buffer_bytes)
        {
            tracing::debug!(error = %e, "cannot set SO_SNDBUF on a client connection");
        }
        let guarded = StallGuard {
            stream,
            limit: settings.write_stall_timeout(),
            stalled: None,
        };
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(guarded), service.clone())
            .into_owned();
        let metrics = metrics.clone();
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            let _slot = slot;
            if let Err(e) = connection.await {
                // Timeouts, resets and protocol errors of one client.
                let stalled = crate::error::chain(&*e).contains(STALLED);
                if stalled {
                    metrics.connection_stalled();
                }
                tracing::debug!(error = %e, stalled, "client connection ended with an error");
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

/// The error a stalled connection ends with.
const STALLED: &str = "the client took no bytes within http.write_stall_timeout_ms";

/// A client connection that fails its writes once the client has taken none
/// of them for `limit`, so hyper closes it.
struct StallGuard {
    stream: TcpStream,
    limit: Duration,
    /// Runs while writes are blocked.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl StallGuard {
    /// Passes on a write's answer; while it is blocked, fails it once blocked
    /// for `limit`.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, STALLED))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for StallGuard {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for StallGuard {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.stream).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
