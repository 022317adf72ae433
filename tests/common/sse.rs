//! Server-sent events read from a stream, as a browser's `EventSource` reads
//! them. A stream ends when the server ends its body; a connection that
//! breaks (reset, cut mid-chunk) fails the test instead: it is what a stream
//! must not do, and taking it for an end would let such a test pass.

use std::time::Duration;

/// One server-sent event.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sse {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// Nothing came within the time asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Silent;

/// Reads the server-sent events of a stream.
pub struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    /// Opens `base` + `path` as a stream (resuming after `last_event_id`), or
    /// gives back the refusal when it did not open. Checks the stream's
    /// headers.
    pub async fn open(
        http: &reqwest::Client,
        base: &str,
        path: &str,
        last_event_id: Option<u64>,
    ) -> Result<Self, reqwest::Response> {
        let mut request = http.get(format!("{base}{path}"));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let r = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("stream request {path}: {e}"));
        if r.status() != reqwest::StatusCode::OK {
            return Err(r);
        }
        let headers = r.headers();
        assert_eq!(headers["content-type"], "text/event-stream");
        assert_eq!(headers["cache-control"], "no-cache");
        assert_eq!(headers["x-accel-buffering"], "no");
        Ok(Self {
            response: r,
            buffer: String::new(),
        })
    }

    /// The next event (comments skipped): `Ok(None)` when the server ended
    /// the stream, `Err(Silent)` when nothing came within `within`. Fails the
    /// test when the connection broke.
    pub async fn next_within(&mut self, within: Duration) -> Result<Option<Sse>, Silent> {
        tokio::time::timeout(within, self.read_event())
            .await
            .map_err(|_| Silent)
    }

    /// The next event, or `None` when the stream ended; fails when nothing
    /// came within `within`, or when the connection broke.
    pub async fn next(&mut self, within: Duration) -> Option<Sse> {
        self.next_within(within)
            .await
            .unwrap_or_else(|Silent| panic!("no event within {within:?}"))
    }

    /// Reads until a whole event is buffered; cancellation-safe (what was
    /// read stays in the buffer).
    async fn read_event(&mut self) -> Option<Sse> {
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(sse) = parse(&block) {
                    return Some(sse);
                }
            }
            match self.response.chunk().await {
                Ok(Some(chunk)) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(None) => return None,
                Err(e) => panic!("the stream broke instead of ending: {e}"),
            }
        }
    }
}

/// One block of lines; `None` for a comment or keep-alive.
fn parse(block: &str) -> Option<Sse> {
    let mut sse = Sse::default();
    let mut any = false;
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("id:") {
            sse.id = Some(v.trim().to_owned());
            any = true;
        } else if let Some(v) = line.strip_prefix("event:") {
            sse.event = Some(v.trim().to_owned());
            any = true;
        } else if let Some(v) = line.strip_prefix("data:") {
            sse.data.push_str(v.trim_start());
            any = true;
        }
    }
    any.then_some(sse)
}
