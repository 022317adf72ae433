//! Domain types, parsed once at the edge.
//!
//! Everything that reaches the service layer has already been validated here:
//! a [`ChatId`] is always 1–64 characters of `[A-Za-z0-9_-]`, a [`MessageText`]
//! always 1–4000 characters, and so on. Parsing returns a [`DomainError`] whose
//! text is safe to show to the caller (it never echoes user content back).

use std::fmt;

/// A validation failure, phrased for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DomainError(pub String);

/// How many id series the shards share: a shard's `memberId`s and
/// `messageId`s are those of its series, `id_block + 1` modulo this.
pub const ID_SERIES: u16 = 1024;

/// The largest length of any identifier.
pub const MAX_ID_LEN: usize = 64;

/// What every identifier matches, as the OpenAPI document writes it.
pub const ID_PATTERN: &str = "^[A-Za-z0-9_-]{1,64}$";

fn parse_id(kind: &str, raw: &str) -> Result<String, DomainError> {
    if raw.is_empty() || raw.len() > MAX_ID_LEN {
        return Err(DomainError(format!(
            "{kind} must be 1 to {MAX_ID_LEN} characters long (got {})",
            raw.chars().count()
        )));
    }
    if let Some(bad) = raw
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        // Describe the character class rather than echoing the input.
        let what = if bad.is_ascii_whitespace() {
            "whitespace"
        } else if bad.is_ascii() {
            "punctuation"
        } else {
            "non-ASCII characters"
        };
        return Err(DomainError(format!(
            "{kind} may contain only A-Z, a-z, 0-9, '_' and '-' (found {what})"
        )));
    }
    Ok(raw.to_owned())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Parses an identifier matching `^[A-Za-z0-9_-]{1,64}$`.
            pub fn parse(raw: &str) -> Result<Self, DomainError> {
                parse_id($kind, raw).map(Self)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A chat's identifier; also the routing key.
    ChatId,
    "chatId"
);
id_type!(
    /// A user's identifier.
    UserId,
    "userId"
);
id_type!(
    /// The caller's idempotency key for a message, unique per sender and chat.
    ClientMessageId,
    "clientMessageId"
);

/// The text of a message: 1 to [`MessageText::MAX_CHARS`] characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageText(String);

impl MessageText {
    pub const MAX_CHARS: usize = 4000;

    pub fn parse(raw: String) -> Result<Self, DomainError> {
        let chars = raw.chars().count();
        if chars == 0 || chars > Self::MAX_CHARS {
            return Err(DomainError(format!(
                "text must be 1 to {} characters long (got {chars})",
                Self::MAX_CHARS
            )));
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// The member limit of a chat: 1 to [`MaxMembers::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxMembers(u32);

impl MaxMembers {
    pub const MAX: u32 = 100_000;

    pub fn parse(raw: i64) -> Result<Self, DomainError> {
        if (1..=i64::from(Self::MAX)).contains(&raw) {
            Ok(Self(raw as u32))
        } else {
            Err(DomainError(format!(
                "maxMembers must be between 1 and {} (got {raw})",
                Self::MAX
            )))
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

/// A page size: 1 to [`PageLimit::MAX`], [`PageLimit::DEFAULT`] when absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLimit(u32);

impl PageLimit {
    pub const MAX: u32 = 500;
    pub const DEFAULT: u32 = 100;

    /// Parses the raw query value; `None` means the default.
    pub fn parse(raw: Option<&str>) -> Result<Self, DomainError> {
        let Some(raw) = raw else {
            return Ok(Self(Self::DEFAULT));
        };
        match raw.parse::<i64>() {
            Ok(n) if (1..=i64::from(Self::MAX)).contains(&n) => Ok(Self(n as u32)),
            _ => Err(DomainError(format!(
                "limit must be an integer between 1 and {}",
                Self::MAX
            ))),
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }

    /// The largest page.
    pub fn largest() -> Self {
        Self(Self::MAX)
    }
}

/// How long a long-poll may wait: `waitMs`, 0 to 30,000 (0 answers at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait(pub std::time::Duration);

impl Wait {
    pub const MAX_MS: u64 = 30_000;

    /// Parses the raw query value; `None` means 0.
    pub fn parse(raw: Option<&str>) -> Result<Self, DomainError> {
        let Some(raw) = raw else {
            return Ok(Self(std::time::Duration::ZERO));
        };
        match raw.parse::<u64>() {
            Ok(ms) if ms <= Self::MAX_MS => Ok(Self(std::time::Duration::from_millis(ms))),
            _ => Err(DomainError(format!(
                "waitMs must be an integer between 0 and {}",
                Self::MAX_MS
            ))),
        }
    }
}

/// An event revision: 0 means "before the first event".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Revision(pub u64);

impl Revision {
    /// Parses the `after` query value; `None` means 0.
    pub fn parse_after(raw: Option<&str>) -> Result<Self, DomainError> {
        let Some(raw) = raw else {
            return Ok(Self(0));
        };
        // Revisions are stored as signed BIGINT-compatible values; cap there so the
        // value always binds cleanly.
        match raw.parse::<u64>() {
            Ok(n) if n <= i64::MAX as u64 => Ok(Self(n)),
            _ => Err(DomainError(
                "after must be a non-negative integer revision".to_owned(),
            )),
        }
    }
}

/// An opaque paging cursor over a chat's members (the last member id seen).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberCursor(pub u64);

impl MemberCursor {
    pub fn parse(raw: Option<&str>) -> Result<Self, DomainError> {
        let Some(raw) = raw else {
            return Ok(Self(0));
        };
        match raw.parse::<u64>() {
            Ok(n) if !raw.starts_with('+') && n <= i64::MAX as u64 => Ok(Self(n)),
            _ => Err(DomainError(
                "after must be a cursor returned as nextCursor by a previous page".to_owned(),
            )),
        }
    }

    pub fn encode(self) -> String {
        self.0.to_string()
    }
}

/// Where a snapshot's paging stands: the revision the snapshot is taken at
/// (its first page's) and the last member id seen. Encoded `R.id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotCursor {
    pub revision: u64,
    pub after: u64,
}

impl SnapshotCursor {
    pub fn parse(raw: &str) -> Result<Self, DomainError> {
        let bad = || {
            DomainError(
                "after must be a cursor returned as nextCursor by a previous snapshot page"
                    .to_owned(),
            )
        };
        let (revision, after) = raw.split_once('.').ok_or_else(bad)?;
        let number = |s: &str| match s.parse::<u64>() {
            Ok(n) if !s.starts_with('+') && n <= i64::MAX as u64 => Ok(n),
            _ => Err(bad()),
        };
        Ok(Self {
            revision: number(revision)?,
            after: number(after)?,
        })
    }

    pub fn encode(self) -> String {
        format!("{}.{}", self.revision, self.after)
    }
}

/// Whether a member is currently in the chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemberState {
    Joined,
    Left,
}

impl MemberState {
    /// The value stored in `chat_member.state`.
    pub const fn code(self) -> u8 {
        match self {
            Self::Joined => 1,
            Self::Left => 2,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Joined),
            2 => Some(Self::Left),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Joined => "JOINED",
            Self::Left => "LEFT",
        }
    }
}

/// What an event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    MessageSent,
    MemberJoined,
    MemberLeft,
}

impl EventType {
    /// The value stored in `chat_event.event_type`.
    pub const fn code(self) -> u8 {
        match self {
            Self::MessageSent => 1,
            Self::MemberJoined => 2,
            Self::MemberLeft => 3,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::MessageSent),
            2 => Some(Self::MemberJoined),
            3 => Some(Self::MemberLeft),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MessageSent => "MESSAGE_SENT",
            Self::MemberJoined => "MEMBER_JOINED",
            Self::MemberLeft => "MEMBER_LEFT",
        }
    }
}

/// One entry of a chat's event log.
#[derive(Debug, Clone)]
pub struct Event {
    pub revision: u64,
    pub kind: EventType,
    /// Shared, like the text: the tail hands out a copy of an event to every
    /// reader, and a copy must not copy the strings.
    pub user_id: std::sync::Arc<str>,
    pub message_id: Option<u64>,
    pub text: Option<std::sync::Arc<str>>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// The event as a stream sends it, made once by the first subscriber that
    /// needs it and shared by every copy of the event (the tail hands out
    /// copies), so a thousand subscribers cost one encoding, not a thousand.
    pub encoded: std::sync::Arc<std::sync::OnceLock<EncodedEvent>>,
}

/// An event as the streams send it: its whole SSE message on the chat's own
/// stream (`id: <revision>`, then its JSON as `data`), and where the JSON is
/// in it (a multiplexed stream numbers its messages itself and sends the JSON
/// in its own message). Cloning it shares the bytes.
#[derive(Debug, Clone)]
pub struct EncodedEvent {
    pub message: bytes::Bytes,
    pub json: std::ops::Range<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_the_documented_alphabet() {
        for ok in ["a", "A-z_09", &"x".repeat(64)] {
            assert!(ChatId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn ids_reject_everything_else() {
        for bad in [
            "",
            "a b",
            "a'b",
            "a\"b",
            "1;DROP TABLE chat",
            "é",
            "a/b",
            "%00",
            &"x".repeat(65),
        ] {
            let err = UserId::parse(bad).unwrap_err();
            assert!(err.0.starts_with("userId"), "{err}");
        }
    }

    #[test]
    fn text_counts_characters_not_bytes() {
        assert!(MessageText::parse("é".repeat(4000)).is_ok());
        assert!(MessageText::parse("é".repeat(4001)).is_err());
        assert!(MessageText::parse(String::new()).is_err());
    }

    #[test]
    fn limits_and_revisions_are_range_checked() {
        assert_eq!(PageLimit::parse(None).unwrap().get(), 100);
        assert_eq!(PageLimit::parse(Some("500")).unwrap().get(), 500);
        for bad in ["0", "-1", "501", "1e3", "", "99999999999999999999"] {
            assert!(PageLimit::parse(Some(bad)).is_err(), "{bad}");
        }
        assert!(Revision::parse_after(Some("-1")).is_err());
        assert_eq!(Revision::parse_after(Some("7")).unwrap(), Revision(7));
        assert!(MaxMembers::parse(0).is_err());
        assert!(MaxMembers::parse(100_001).is_err());
        assert_eq!(MaxMembers::parse(5000).unwrap().get(), 5000);
    }

    #[test]
    fn state_and_event_codes_round_trip() {
        for s in [MemberState::Joined, MemberState::Left] {
            assert_eq!(MemberState::from_code(s.code()), Some(s));
        }
        for e in [
            EventType::MessageSent,
            EventType::MemberJoined,
            EventType::MemberLeft,
        ] {
            assert_eq!(EventType::from_code(e.code()), Some(e));
        }
    }
}
