//! The body of a chat's event stream: whole SSE messages as shared bytes,
//! and a keep-alive comment when nothing was sent for a while. Its answer is
//! marked `AfterHead`: on HTTP/1 the serving loop writes it on the
//! connection without hyper once the head is out.
//!
//! What it must keep cheap, since one published event is written to every
//! subscriber: a frame is bytes made elsewhere (an event's message is encoded
//! once and shared, see `Event::encoded`), never copied here; the keep-alive
//! timer is not touched per message (axum's resets it on every one, a timer
//! wheel removal and insertion per delivery): it fires once per interval and
//! sends a comment only if nothing went out since `interval` ago.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use bytes::Bytes;
use futures_util::Stream;
use futures_util::stream::BoxStream;
use hyper::body::Frame;
use tokio::time::{Instant, Sleep};

/// Set on an event stream's answer: on HTTP/1 its body may be written on the
/// connection itself once hyper has written its head (see
/// `serve::answer_head_alone`), which frees hyper's buffers for the stream's
/// lifetime.
#[derive(Debug, Clone, Copy)]
pub(super) struct AfterHead;

/// The comment an idle stream sends to keep its connection (and the
/// proxies on the way) from timing out: the same as axum's.
const KEEP_ALIVE: &[u8] = b":\n\n";

/// An event stream's answer: `frames` (each one or more whole SSE messages)
/// as the body, with a keep-alive comment after `keep_alive` without one.
pub fn response(
    frames: impl Stream<Item = Bytes> + Send + 'static,
    keep_alive: Duration,
) -> Response {
    let body = SseBody {
        frames: Box::pin(frames),
        keep_alive,
        timer: Box::pin(tokio::time::sleep(keep_alive)),
        last_sent: Instant::now(),
    };
    let mut response = Response::new(Body::new(body));
    response.extensions_mut().insert(AfterHead);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    response
}

/// See the module's doc.
struct SseBody {
    frames: BoxStream<'static, Bytes>,
    keep_alive: Duration,
    /// Fires at the earliest moment a keep-alive may be due.
    timer: Pin<Box<Sleep>>,
    /// When the last frame (or keep-alive) was handed out.
    last_sent: Instant,
}

impl hyper::body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.frames.as_mut().poll_next(cx) {
            Poll::Ready(Some(frame)) => {
                self.last_sent = Instant::now();
                return Poll::Ready(Some(Ok(Frame::data(frame))));
            }
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        loop {
            ready!(self.timer.as_mut().poll(cx));
            let due = self.last_sent + self.keep_alive;
            let now = Instant::now();
            if due > now {
                // Something was sent since the timer was set: wait for the
                // rest of the interval after it.
                self.timer.as_mut().reset(due);
                continue;
            }
            self.last_sent = now;
            let next = now + self.keep_alive;
            self.timer.as_mut().reset(next);
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(KEEP_ALIVE)))));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt as _;

    async fn next_frame(body: &mut axum::body::BodyDataStream) -> Bytes {
        body.next().await.and_then(|f| f.ok()).unwrap_or_default()
    }

    #[tokio::test(start_paused = true)]
    async fn frames_pass_as_they_are_and_idle_streams_are_kept_alive() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let frames = tokio_stream_from(rx);
        let response = response(frames, Duration::from_secs(10));
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        let mut body = response.into_body().into_data_stream();
        let message = Bytes::from_static(b"id: 1\ndata: {}\n\n");
        let _ = tx.send(message.clone());
        assert_eq!(next_frame(&mut body).await, message);
        // Idle: a comment one interval after the last message.
        let start = Instant::now();
        assert_eq!(next_frame(&mut body).await, Bytes::from_static(KEEP_ALIVE));
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        // A message half-way through the interval puts the next comment one
        // interval after it.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let _ = tx.send(message.clone());
        assert_eq!(next_frame(&mut body).await, message);
        let sent = Instant::now();
        assert_eq!(next_frame(&mut body).await, Bytes::from_static(KEEP_ALIVE));
        assert_eq!(sent.elapsed(), Duration::from_secs(10));
        drop(tx);
        assert!(body.next().await.is_none());
    }

    /// The receiver as a stream.
    fn tokio_stream_from(
        rx: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
    ) -> impl Stream<Item = Bytes> + Send + 'static {
        futures_util::stream::unfold(rx, |mut rx| async move {
            let next = rx.recv().await?;
            Some((next, rx))
        })
    }
}
