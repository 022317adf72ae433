//! Server-sent events as the fan-out reads them: whole messages taken off a
//! byte buffer, and the commit time of the event a message carries. Only
//! what the figures need is parsed (the tool's CPU is shared with the
//! service).

use chrono::{DateTime, Utc};

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Calls `each` with every whole message (ended by a blank line) at the
/// front of `buffer` and takes them off it; a partial message stays.
pub fn drain_messages(buffer: &mut Vec<u8>, mut each: impl FnMut(&[u8])) {
    let mut start = 0;
    while let Some(end) = find(&buffer[start..], b"\n\n") {
        each(&buffer[start..start + end]);
        start += end + 2;
    }
    buffer.drain(..start);
}

/// The `createdAt` of one SSE message carrying an event.
pub fn commit_time(message: &[u8]) -> Option<DateTime<Utc>> {
    const KEY: &[u8] = b"\"createdAt\":\"";
    let rest = &message[find(message, KEY)? + KEY.len()..];
    let value = std::str::from_utf8(&rest[..rest.iter().position(|&b| b == b'"')?]).ok()?;
    DateTime::parse_from_rfc3339(value)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_messages_are_taken_and_a_partial_one_stays() {
        let mut buffer = b"event: a\ndata: 1\n\n: keep-alive\n\nevent: b\ndata:".to_vec();
        let mut seen = Vec::new();
        drain_messages(&mut buffer, |m| seen.push(m.to_vec()));
        assert_eq!(
            seen,
            vec![b"event: a\ndata: 1".to_vec(), b": keep-alive".to_vec()]
        );
        assert_eq!(buffer, b"event: b\ndata:");
        buffer.extend_from_slice(b" 2\n\n");
        seen.clear();
        drain_messages(&mut buffer, |m| seen.push(m.to_vec()));
        assert_eq!(seen, vec![b"event: b\ndata: 2".to_vec()]);
        assert!(buffer.is_empty());
    }

    #[test]
    fn the_commit_time_of_an_event() {
        let message = br#"id: 7
data: {"revision":7,"type":"message_posted","createdAt":"2024-05-01T12:00:00.250Z"}"#;
        let at = commit_time(message).map(|t| t.to_rfc3339());
        assert_eq!(at.as_deref(), Some("2024-05-01T12:00:00.250+00:00"));
        assert_eq!(commit_time(b": keep-alive"), None);
        assert_eq!(commit_time(br#"data: {"createdAt":"later"}"#), None);
    }
}
