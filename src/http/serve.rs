//! The connection loop: what a client may hold and for how long.
//!
//! `axum::serve` keeps a connection for as long as the client likes: a client
//! that never finishes its headers (or its body) holds a socket forever, and a
//! graceful stop waits for it. Here every connection is bounded, whichever
//! protocol it speaks (HTTP/1 or HTTP/2 with prior knowledge, or either over
//! TLS when `http.tls` is set, chosen by ALPN):
//!
//! - over TLS, a connection that has not completed its handshake within
//!   `tls.handshake_timeout_ms` of its accept is closed, its slot freed; the
//!   rules below then count from the handshake's end, and the [`StallGuard`]
//!   sits under TLS (it sees what the client takes of the encrypted bytes);
//! - a connection on which no request has started (headers received) within
//!   `header_read_timeout_ms` of its accept is closed, by this loop: hyper's
//!   own header-read timeout covers HTTP/1 only, and not a connection that
//!   has not sent enough to tell its protocol;
//! - an HTTP/1 request's headers must arrive within `header_read_timeout_ms`;
//!   the same timer runs while a keep-alive connection waits for its next
//!   request, so an idle HTTP/1 connection is closed after it too (hyper's
//!   header-read timeout);
//! - a connection with no request open (no response still being sent, so an
//!   event stream or a long-poll is never idle) for `idle_timeout_ms` is
//!   closed, by this loop: HTTP/2 gracefully, with GOAWAY;
//! - an HTTP/2 connection is sent a PING every `ping_interval_ms` and is
//!   closed when the client does not answer within `ping_timeout_ms`
//!   (hyper's keep-alive);
//! - a connection asked to close (the two rules above, or shutdown) that has
//!   not closed `ping_timeout_ms` after its last request ended, or after it
//!   was asked if that is later, is closed outright: HTTP/2's graceful close
//!   waits for the client to answer a PING, which a client that sends nothing
//!   never does;
//! - a request body must arrive within `body_read_timeout_ms` (the JSON
//!   extractor, 408 `request_timeout`);
//! - at most `max_connections` connections are open (a TLS one from its
//!   accept, handshake included); one more is answered at once with 503
//!   `too_many_connections` (problem+json, `Retry-After`) and closed, before
//!   anything of it is read; over TLS it is closed at once, before its
//!   handshake, unanswered (an answer would need a handshake);
//! - a connection whose client takes none of the bytes written to it for
//!   `write_stall_timeout_ms` is closed ([`StallGuard`]): a stream subscriber
//!   that stopped reading holds its socket's send buffer (the kernel's, or
//!   `socket_send_buffer_bytes`), the server's `send_buffer_bytes` (HTTP/2;
//!   on HTTP/1 the frame being written) and one page of events, and then
//!   nothing;
//! - on shutdown the listener closes, connections still in their TLS
//!   handshake are closed, connections are asked to finish their request in
//!   flight, and whatever is still open after `shutdown_grace_ms` is closed.
//!
//! Each connection is watched by its own task ([`supervise`]); its service
//! ([`Tracked`]) counts the requests open on it, a request being open from
//! its headers until its response body is dropped (sent, or the stream reset).
//!
//! The loop tells HTTP/2 from HTTP/1 by the first bytes (`sniff`) and
//! serves each with hyper's own connection for it. An event stream on
//! HTTP/1 is answered in two parts (`answer_head_alone`): hyper writes its
//! head, as HTTP/1.0 with `Connection: close` and no length, then the
//! connection is taken back from hyper and the stream written to it directly,
//! so hyper's buffers for the connection are not held for the stream's
//! lifetime (hyper gives a connection back only once it has served its last
//! request, or after an upgrade, which a stream is not).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::problem::{Code, Problem};
use super::sse::AfterHead;
use super::tls::{ClientCertificate, Tls};
use crate::config::HttpSettings;
use crate::metrics::Metrics;

/// Serves `router` on `listener` until `shutdown` completes, then drains.
/// With `tls`, every connection is a TLS one.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    settings: HttpSettings,
    tls: Option<Arc<Tls>>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let (stop, stopped) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout())
        .max_buf_size(settings.send_buffer_bytes);
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2.timer(TokioTimer::new());
    if settings.ping_interval_ms > 0 {
        http2
            .keep_alive_interval(settings.ping_interval())
            .keep_alive_timeout(settings.ping_timeout());
    }
    let limits = Limits {
        first_request: settings.header_read_timeout(),
        idle: settings.idle_timeout(),
        close: settings.ping_timeout(),
    };
    let builders = Arc::new((http1, http2));
    let handshake = settings.tls.handshake_timeout();
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
            if tls.is_some() {
                // No answer without a handshake, and none is spent on a
                // connection that cannot be served: closed at once.
                tracing::debug!(
                    limit = settings.max_connections,
                    "a TLS connection over http.max_connections is closed before its handshake"
                );
            } else {
                tokio::spawn(refuse(stream, settings.max_connections));
            }
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
        let service = service.clone();
        let builders = builders.clone();
        let acceptor = tls.as_ref().map(|tls| tls.acceptor());
        let metrics = metrics.clone();
        let mut stopped = stopped.clone();
        connections.spawn(async move {
            let _slot = slot;
            let (io, certificate) = match acceptor {
                None => (Io::Plain(guarded), None),
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(handshake, acceptor.accept(guarded));
                    tokio::select! {
                        done = handshake => match done {
                            Ok(Ok(stream)) => {
                                let certificate = ClientCertificate::of(stream.get_ref().1);
                                (Io::Tls(Box::new(stream)), certificate)
                            }
                            Ok(Err(e)) => {
                                let reason = handshake_failure(&e);
                                metrics.tls_handshake_failed(reason);
                                tracing::debug!(error = %e, reason, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                metrics.tls_handshake_failed("timeout");
                                tracing::debug!(
                                    "no TLS handshake within http.tls.handshake_timeout_ms; \
                                     the connection is closed"
                                );
                                return;
                            }
                        },
                        // Shutdown: a connection not yet serving has nothing to finish.
                        _ = stopped.changed() => return,
                    }
                }
            };
            // The first request is due within its limit of now (of the
            // handshake's end, over TLS), telling the protocol included.
            let serving = Instant::now();
            // HTTP/1 or HTTP/2 (prior knowledge, or ALPN's choice: the
            // client then starts with the preface all the same).
            let sniffed = tokio::select! {
                sniffed = tokio::time::timeout(limits.first_request, sniff(io)) => sniffed,
                _ = stopped.changed() => return,
            };
            let (protocol, io) = match sniffed {
                Ok(Ok(sniffed)) => sniffed,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "client connection ended before its first request");
                    return;
                }
                Err(_) => {
                    tracing::debug!(
                        why = Why::NoRequest.as_str(),
                        "a client connection is closed"
                    );
                    return;
                }
            };
            let load = Arc::new(watch::Sender::new(Load {
                open: 0,
                started: false,
                since: serving,
            }));
            let after_head = Arc::new(std::sync::Mutex::new(None));
            let tracked = Tracked {
                inner: service,
                load: load.clone(),
                certificate,
                after_head: (protocol == Protocol::Http1).then(|| after_head.clone()),
            };
            // On the heap, and only there: moved by value into `supervise`,
            // hyper's connection (1.5 KiB and more) would take its room twice
            // in this task's future, for as long as the connection lives.
            let io = TokioIo::new(io);
            let mut connection = match protocol {
                Protocol::Http1 => {
                    Served::Http1(Box::new(builders.0.serve_connection(io, tracked)))
                }
                Protocol::Http2 => {
                    Served::Http2(Box::pin(builders.1.serve_connection(io, tracked)))
                }
            };
            let ended = supervise(&mut connection, &load, stopped, limits).await;
            let ended = match (ended, connection) {
                // An HTTP/1 connection that served its last request: its
                // stream goes on here, without hyper, or it is closed.
                (Ended::Closed(Ok(())), Served::Http1(connection)) => {
                    let io = connection.into_parts().io.into_inner();
                    let taken = after_head.lock().ok().and_then(|mut slot| slot.take());
                    Ended::Closed(match taken {
                        Some(stream) => stream.send(io).await.map_err(Into::into),
                        None => close(io).await.map_err(Into::into),
                    })
                }
                (ended, _) => ended,
            };
            match ended {
                Ended::Closed(Ok(())) => {}
                Ended::Closed(Err(e)) => {
                    // Timeouts, resets and protocol errors of one client.
                    let stalled = crate::error::chain(&*e).contains(STALLED);
                    if stalled {
                        metrics.connection_stalled();
                    }
                    tracing::debug!(error = %e, stalled, "client connection ended with an error");
                }
                Ended::Dropped(why) => {
                    tracing::debug!(
                        why = why.as_str(),
                        "a client connection asked to close did not; it is closed outright"
                    );
                }
            }
        });
    }
    drop(listener);
    stop.send_replace(true);
    let drained = tokio::time::timeout(settings.shutdown_grace(), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            grace_ms = settings.shutdown_grace_ms,
            "connections still open after the shutdown grace period are closed"
        );
    }
    connections.shutdown().await;
}

/// Why a TLS handshake failed, as the metric names it (one of
/// [`crate::metrics::TLS_HANDSHAKE_FAILURE_REASONS`] but `timeout`).
fn handshake_failure(e: &io::Error) -> &'static str {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::NoCertificatesPresented) => "no_client_cert",
        // On a server, the certificate that did not verify is the client's.
        Some(rustls::Error::InvalidCertificate(_)) => "bad_client_cert",
        Some(rustls::Error::AlertReceived(_)) => "client_refused",
        Some(_) => "protocol",
        None => match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => "closed",
            _ => "protocol",
        },
    }
}

/// A client connection as the loop serves it. An HTTP/1 connection is
/// polled without hyper closing its socket at the end, so that an event
/// stream can go on on it once hyper has written the stream's head (see
/// [`AfterHead`]).
enum Served {
    Http1(Box<http1::Connection<TokioIo<Rewound>, Tracked>>),
    Http2(Pin<Box<http2::Connection<TokioIo<Rewound>, Tracked, TokioExecutor>>>),
}

impl Served {
    fn poll_served(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        match self {
            Self::Http1(c) => c.poll_without_shutdown(cx),
            Self::Http2(c) => c.as_mut().poll(cx),
        }
    }

    fn graceful_shutdown(&mut self) {
        match self {
            Self::Http1(c) => Pin::new(&mut **c).graceful_shutdown(),
            Self::Http2(c) => c.as_mut().graceful_shutdown(),
        }
    }
}

/// The protocol a client speaks, told by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// What an HTTP/2 client sends first (RFC 9113, 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads a connection's first bytes until they are, or cannot be, HTTP/2's
/// preface (as hyper-util's HTTP/1-or-2 builder does); the protocol, and the
/// connection with those bytes put back.
async fn sniff(mut io: Io) -> io::Result<(Protocol, Rewound)> {
    use tokio::io::AsyncReadExt as _;
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    while filled < buf.len() {
        let n = io.read(&mut buf[filled..]).await?;
        if n == 0 || buf[..filled + n] != H2_PREFACE[..filled + n] {
            filled += n;
            break;
        }
        filled += n;
    }
    let protocol = if buf[..filled] == *H2_PREFACE {
        Protocol::Http2
    } else {
        Protocol::Http1
    };
    let prefix = Bytes::copy_from_slice(&buf[..filled]);
    Ok((protocol, Rewound { prefix, io }))
}

/// A connection whose first bytes, read to tell its protocol, are read again.
struct Rewound {
    prefix: Bytes,
    io: Io,
}

impl Rewound {
    /// The connection (whatever of the prefix was not read again is dropped:
    /// only hyper reads it, and it has by then).
    fn into_io(self) -> Io {
        self.io
    }
}

impl AsyncRead for Rewound {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewound {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Closes a connection hyper has finished with (it leaves the socket open
/// when polled without shutdown); a client that does not take the close is
/// not waited for.
async fn close(io: Rewound) -> io::Result<()> {
    let mut io = io.into_io();
    match tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await {
        Ok(done) => done,
        Err(_) => Ok(()),
    }
}

/// How long a connection may go without a request.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// From the accept to the first request's headers.
    first_request: Duration,
    /// With no request open, after the first.
    idle: Duration,
    /// From being asked to close (or the end of its last request, if later)
    /// to being closed outright.
    close: Duration,
}

/// Why the loop asked a connection to close.
#[derive(Debug, Clone, Copy)]
enum Why {
    NoRequest,
    Idle,
    Shutdown,
}

impl Why {
    fn as_str(self) -> &'static str {
        match self {
            Self::NoRequest => "no request within http.header_read_timeout_ms",
            Self::Idle => "idle for http.idle_timeout_ms",
            Self::Shutdown => "shutdown",
        }
    }
}

/// How a connection's task ended.
enum Ended {
    /// The connection finished (closed by either side, or failed).
    Closed(Result<(), Box<dyn std::error::Error + Send + Sync>>),
    /// Asked to close, it did not within [`Limits::close`], and was dropped.
    Dropped(Why),
}

/// The requests open on one connection, as its [`Tracked`] service sees
/// them.
#[derive(Debug, Clone, Copy)]
struct Load {
    /// Requests whose headers arrived and whose response is not yet dropped.
    open: usize,
    /// Whether any request has started.
    started: bool,
    /// When `open` last became 0 (the accept, until a request starts).
    since: Instant,
}

impl Limits {
    /// When the connection is next due to be asked to close (`closing` is
    /// `None`) or to be dropped (`closing` is when it was asked); `None`
    /// while a request is open.
    fn due(self, load: Load, closing: Option<Instant>) -> Option<Instant> {
        if load.open > 0 {
            return None;
        }
        Some(match closing {
            // Not before its last response had the time to leave.
            Some(asked) => asked.max(load.since) + self.close,
            None if !load.started => load.since + self.first_request,
            None => load.since + self.idle,
        })
    }
}

/// Serves one connection until it ends, asking it to close once it has gone
/// without a request for its limit or on shutdown (`stop`), and dropping it
/// if it then does not close.
async fn supervise(
    connection: &mut Served,
    load: &watch::Sender<Load>,
    mut stop: watch::Receiver<bool>,
    limits: Limits,
) -> Ended {
    // Never fails while `load` (the sender) lives, which it does here.
    let mut changes = load.subscribe();
    let mut closing: Option<(Instant, Why)> = None;
    loop {
        let due = limits.due(*changes.borrow_and_update(), closing.map(|(at, _)| at));
        let timer = async move {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            served = std::future::poll_fn(|cx| connection.poll_served(cx)) => {
                return Ended::Closed(served.map_err(Into::into));
            }
            _ = changes.changed() => {}
            // A closed channel (the loop is gone) means stop too.
            _ = stop.changed(), if closing.is_none() => {
                connection.graceful_shutdown();
                closing = Some((Instant::now(), Why::Shutdown));
            }
            () = timer => {
                // A request may have started since the timer was set.
                let now = *changes.borrow_and_update();
                let still_due = limits
                    .due(now, closing.map(|(at, _)| at))
                    .is_some_and(|at| at <= Instant::now());
                if !still_due {
                    continue;
                }
                if let Some((_, why)) = closing {
                    return Ended::Dropped(why);
                }
                let why = if now.started { Why::Idle } else { Why::NoRequest };
                tracing::debug!(why = why.as_str(), "asking a client connection to close");
                connection.graceful_shutdown();
                closing = Some((Instant::now(), why));
            }
        }
    }
}

/// The router, counting the requests open on its connection in `load`, and
/// giving each request the connection's verified client certificate. On an
/// HTTP/1 connection, an event stream's body is put in `after_head` and its
/// head answered alone (see [`AfterHead`]).
struct Tracked {
    inner: TowerToHyperService<axum::Router>,
    load: Arc<watch::Sender<Load>>,
    certificate: Option<ClientCertificate>,
    after_head: Option<Arc<std::sync::Mutex<Option<AfterHeadStream>>>>,
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        let open = Open::start(self.load.clone());
        if let Some(certificate) = &self.certificate {
            request.extensions_mut().insert(certificate.clone());
        }
        let after_head = self
            .after_head
            .clone()
            .filter(|_| request.method() == hyper::Method::GET);
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            if let Some(slot) = after_head
                && response.extensions().get::<AfterHead>().is_some()
            {
                return Ok(answer_head_alone(response, &slot, open));
            }
            Ok(response.map(|body| TrackedBody {
                body,
                _open: Some(open),
            }))
        })
    }
}

/// An event stream on HTTP/1, answered in two parts: hyper writes its head,
/// as HTTP/1.0 with `Connection: close` and no length, so that its body is
/// the bytes that follow until the connection closes; then the connection
/// is taken back from hyper and the body written straight to it. hyper's
/// buffers for the connection (its read buffer, the one for response heads,
/// its state) are freed for the stream's lifetime: an open stream then costs
/// its own state and the socket (docs/benchmarks.md).
///
/// HTTP/1.1 clients read such an answer as they read any other without a
/// length; an HTTP/2 stream is answered by hyper as every other response.
fn answer_head_alone(
    response: Response<Body>,
    slot: &std::sync::Mutex<Option<AfterHeadStream>>,
    open: Open,
) -> Response<TrackedBody> {
    let (mut head, body) = response.into_parts();
    // Never poisoned (nothing panics while holding it); if it were, the
    // stream would end after its head.
    if let Ok(mut slot) = slot.lock() {
        *slot = Some(AfterHeadStream { body, _open: open });
    }
    head.version = hyper::Version::HTTP_10;
    head.headers.insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    Response::from_parts(
        head,
        TrackedBody {
            body: Body::new(HeadOnly),
            _open: None,
        },
    )
}

/// An event stream's body waiting for its connection to be taken back from
/// hyper, with its request counted open until it ends.
struct AfterHeadStream {
    body: Body,
    _open: Open,
}

impl AfterHeadStream {
    /// Writes the body to `io` frame by frame until it ends (then closes the
    /// connection), the client closes it, or a write fails (a stalled client:
    /// [`StallGuard`]). Bytes the client sends meanwhile are read and
    /// dropped: a request sent behind a stream is not answered.
    async fn send(self, io: Rewound) -> io::Result<()> {
        use futures_util::StreamExt as _;
        use tokio::io::AsyncReadExt as _;
        let (mut reader, mut writer) = tokio::io::split(io.into_io());
        let mut frames = self.body.into_data_stream();
        let mut scratch = [0u8; 64];
        loop {
            tokio::select! {
                frame = frames.next() => match frame {
                    Some(Ok(frame)) => {
                        write_frame(&mut writer, &frame).await?;
                        writer.flush().await?;
                    }
                    Some(Err(e)) => return Err(io::Error::other(e)),
                    None => break,
                },
                read = reader.read(&mut scratch) => match read {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e),
                },
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), writer.shutdown()).await;
        Ok(())
    }
}

/// Writes one frame with `writev`, as hyper writes (a plain `write` of a
/// socket is a `send`, which `/proc/PID/io` does not count among writes).
async fn write_frame(writer: &mut (impl AsyncWrite + Unpin), frame: &[u8]) -> io::Result<()> {
    let mut rest = frame;
    while !rest.is_empty() {
        let n = writer.write_vectored(&[io::IoSlice::new(rest)]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        rest = &rest[n..];
    }
    Ok(())
}

/// The body of a head answered alone: ends at once, of no stated length (so
/// hyper writes no `Content-Length`).
struct HeadOnly;

impl hyper::body::Body for HeadOnly {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(None)
    }
}

/// One open request: counted from its headers until dropped, with its
/// response's body (or with the handler's future, if it never answered).
struct Open(Arc<watch::Sender<Load>>);

impl Open {
    fn start(load: Arc<watch::Sender<Load>>) -> Self {
        // The loop only cares when the connection becomes busy or idle.
        load.send_if_modified(|l| {
            l.open += 1;
            l.started = true;
            l.open == 1
        });
        Self(load)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.send_if_modified(|l| {
            l.open = l.open.saturating_sub(1);
            if l.open == 0 {
                l.since = Instant::now();
            }
            l.open == 0
        });
    }
}

/// A response body that keeps its request counted as open until it is
/// dropped: an event stream is a request open for as long as it streams.
struct TrackedBody {
    body: Body,
    _open: Option<Open>,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
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

/// A client connection's bytes: the socket itself, or TLS over it; the
/// [`StallGuard`] is under TLS, so it sees what the client takes of the
/// encrypted stream.
enum Io {
    Plain(StallGuard),
    Tls(Box<tokio_rustls::server::TlsStream<StallGuard>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_failures_are_named_by_what_the_client_did() {
        let tls = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        let cases = [
            (
                tls(rustls::Error::NoCertificatesPresented),
                "no_client_cert",
            ),
            (
                tls(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer,
                )),
                "bad_client_cert",
            ),
            (
                tls(rustls::Error::AlertReceived(
                    rustls::AlertDescription::UnknownCA,
                )),
                "client_refused",
            ),
            (
                tls(rustls::Error::InvalidMessage(
                    rustls::InvalidMessage::InvalidContentType,
                )),
                "protocol",
            ),
            (io::Error::from(io::ErrorKind::UnexpectedEof), "closed"),
            (io::Error::from(io::ErrorKind::ConnectionReset), "closed"),
            (io::Error::other("something else"), "protocol"),
        ];
        for (e, reason) in cases {
            assert_eq!(handshake_failure(&e), reason, "{e}");
            assert!(crate::metrics::TLS_HANDSHAKE_FAILURE_REASONS.contains(&reason));
        }
    }

    const LIMITS: Limits = Limits {
        first_request: Duration::from_secs(10),
        idle: Duration::from_secs(30),
        close: Duration::from_secs(5),
    };

    fn load(open: usize, started: bool, since: Instant) -> Load {
        Load {
            open,
            started,
            since,
        }
    }

    #[test]
    fn a_connection_is_due_to_close_only_while_no_request_is_open() {
        let t = Instant::now();
        let s = Duration::from_secs;
        // No request yet: the first-request timeout from the accept.
        assert_eq!(LIMITS.due(load(0, false, t), None), Some(t + s(10)));
        // Between requests: the idle timeout from the last one's end.
        assert_eq!(LIMITS.due(load(0, true, t), None), Some(t + s(30)));
        // A request open (an event stream): never, asked to close or not.
        assert_eq!(LIMITS.due(load(1, true, t), None), None);
        assert_eq!(LIMITS.due(load(2, true, t), Some(t)), None);
        // Asked to close: dropped after the close time, counted from the
        // later of the ask and the last request's end.
        assert_eq!(LIMITS.due(load(0, true, t), Some(t + s(1))), Some(t + s(6)));
        assert_eq!(
            LIMITS.due(load(0, true, t + s(3)), Some(t + s(1))),
            Some(t + s(8))
        );
    }
}
