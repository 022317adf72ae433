//! What instances say to each other, as JSON, and the names of the keys and
//! channels they say it on.
//!
//! Every key and channel of one chat carries the chat in a hash tag
//! (`{c:<chatId>}`), so in a Redis Cluster the chat's notice channel and its
//! join-limit key live in the chat's slot; the fleet's own keys and channel
//! share the `{fleet}` tag, so each script touches one slot.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::Event;
use crate::domain::{ChatId, EventType};

/// Names under one prefix (`redis.key_prefix`), so deployments can share a Redis.
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// The channel of one chat's event notices.
    pub fn chat_channel(&self, chat: &ChatId) -> String {
        format!("{}:{{c:{chat}}}:events", self.prefix)
    }

    /// The chat a notice channel belongs to.
    pub fn chat_of_channel(&self, channel: &str) -> Option<ChatId> {
        let rest = channel.strip_prefix(&self.prefix)?.strip_prefix(":{c:")?;
        let id = rest.strip_suffix("}:events")?;
        ChatId::parse(id).ok()
    }

    /// The GCRA state of one chat's global join limit.
    pub fn join_key(&self, chat: &ChatId) -> String {
        format!("{}:{{c:{chat}}}:joins", self.prefix)
    }

    /// The channel of fleet-wide messages (hot marks, configuration changes).
    pub fn bus(&self) -> String {
        format!("{}:{{fleet}}:bus", self.prefix)
    }

    /// Live instances: a sorted set scored by when each one's heartbeat expires.
    pub fn instances(&self) -> String {
        format!("{}:{{fleet}}:instances", self.prefix)
    }

    /// What each live instance says about itself (a hash: id → JSON).
    pub fn instance_info(&self) -> String {
        format!("{}:{{fleet}}:instance-info", self.prefix)
    }

    /// Hot marks: a sorted set of chats scored by when their mark ends
    /// (milliseconds since the epoch), for instances that start meanwhile.
    pub fn hot(&self) -> String {
        format!("{}:{{fleet}}:hot", self.prefix)
    }

    /// The fleet's live configuration and its version.
    pub fn config(&self) -> String {
        format!("{}:{{fleet}}:config", self.prefix)
    }
}

/// An event as a notice carries it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WireEvent {
    r: u64,
    k: u8,
    u: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    m: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    t: Option<String>,
    at: DateTime<Utc>,
}

/// "Chat `chat` has committed revisions `first..=last`", sent after each
/// commit, with the events themselves when they are small.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Notice {
    /// The instance that committed them.
    pub o: String,
    pub first: u64,
    pub last: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    e: Option<Vec<WireEvent>>,
}

impl Notice {
    /// The notice of a committed batch; its events ride along while their
    /// encoding stays within `max_bytes`.
    pub fn encode(origin: &str, events: &[Event], max_bytes: usize) -> Option<Vec<u8>> {
        let (first, last) = (events.first()?.revision, events.last()?.revision);
        let size: usize = events
            .iter()
            .map(|e| 64 + e.user_id.len() + e.text.as_ref().map_or(0, |t| t.len()))
            .sum();
        let e = (size <= max_bytes).then(|| {
            events
                .iter()
                .map(|e| WireEvent {
                    r: e.revision,
                    k: e.kind.code(),
                    u: e.user_id.to_string(),
                    m: e.message_id,
                    t: e.text.as_deref().map(str::to_owned),
                    at: e.created_at,
                })
                .collect()
        });
        serde_json::to_vec(&Notice {
            o: origin.to_owned(),
            first,
            last,
            e,
        })
        .ok()
    }

    pub fn decode(payload: &[u8]) -> Option<Self> {
        let notice: Self = serde_json::from_slice(payload).ok()?;
        (notice.first >= 1 && notice.first <= notice.last).then_some(notice)
    }

    /// The events, if the notice carries all of them (contiguous, exactly
    /// `first..=last`, every type known).
    pub fn events(&self) -> Option<Vec<Event>> {
        let wire = self.e.as_ref()?;
        let events = wire
            .iter()
            .map(|w| {
                Some(Event {
                    revision: w.r,
                    kind: EventType::from_code(w.k)?,
                    user_id: Arc::from(w.u.as_str()),
                    message_id: w.m,
                    text: w.t.as_deref().map(Arc::from),
                    created_at: w.at,
                    encoded: Arc::default(),
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let contiguous = events
            .iter()
            .enumerate()
            .all(|(i, e)| e.revision == self.first + i as u64);
        (contiguous && events.len() as u64 == self.last - self.first + 1).then_some(events)
    }
}

/// "Chat `chat` had its events below `purged` purged", sent on the chat's
/// notice channel after a purge, so that the instances holding the chat's
/// tail drop them too. A notice of another shape (an older instance's
/// commit notice) does not decode as one, nor this as a commit notice.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Purge {
    /// The instance that purged them.
    pub o: String,
    /// The chat's first stored revision after the purge.
    pub purged: u64,
}

impl Purge {
    pub fn encode(origin: &str, first_revision: u64) -> Option<Vec<u8>> {
        serde_json::to_vec(&Purge {
            o: origin.to_owned(),
            purged: first_revision,
        })
        .ok()
    }

    pub fn decode(payload: &[u8]) -> Option<Self> {
        let purge: Self = serde_json::from_slice(payload).ok()?;
        (purge.purged >= 1).then_some(purge)
    }
}

/// A fleet-wide message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Bus {
    /// A chat was marked hot (or its mark extended) on `origin`.
    #[serde(rename_all = "camelCase")]
    Hot {
        origin: String,
        chat: String,
        expires_in_ms: u64,
    },
    /// The fleet's live configuration moved to `version` (read it from the
    /// config key).
    #[serde(rename_all = "camelCase")]
    Config { origin: String, version: u64 },
    /// `origin`'s monitor saw the writes of replicated shard `shard` go to
    /// another member: every instance looks at its members now rather than
    /// at its next monitor round (docs/replicas.md).
    #[serde(rename_all = "camelCase")]
    Writer { origin: String, shard: String },
}

/// What an instance says about itself in the instance registry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceInfo {
    /// Random at each start.
    pub id: String,
    /// The address it listens on, as configured.
    pub listen: String,
    pub started_at: DateTime<Utc>,
    /// chatshard's version.
    pub version: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(r: u64, text: Option<&str>) -> Event {
        Event {
            revision: r,
            kind: if text.is_some() {
                EventType::MessageSent
            } else {
                EventType::MemberJoined
            },
            user_id: Arc::from("u1"),
            message_id: text.map(|_| r * 10),
            text: text.map(Arc::from),
            created_at: Utc::now(),
            encoded: Arc::default(),
        }
    }

    #[test]
    fn a_notice_carries_small_batches_and_only_names_large_ones() -> crate::TestResult {
        let events = vec![ev(7, None), ev(8, Some("hello"))];
        let bytes = Notice::encode("a", &events, 4096).ok_or("no notice")?;
        let notice = Notice::decode(&bytes).ok_or("undecodable")?;
        assert_eq!((notice.first, notice.last, notice.o.as_str()), (7, 8, "a"));
        let back = notice.events().ok_or("no events")?;
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].text.as_deref(), Some("hello"));
        assert_eq!(back[1].message_id, Some(80));
        assert_eq!(back[0].kind, EventType::MemberJoined);

        let big = Notice::encode("a", &events, 10).ok_or("no notice")?;
        let notice = Notice::decode(&big).ok_or("undecodable")?;
        assert_eq!((notice.first, notice.last), (7, 8));
        assert!(notice.events().is_none());
        assert!(Notice::decode(b"{\"o\":\"a\",\"first\":3,\"last\":2}").is_none());
        Ok(())
    }

    #[test]
    fn a_purge_notice_and_a_commit_notice_never_pass_for_each_other() -> crate::TestResult {
        let purge = Purge::encode("a", 56).ok_or("no notice")?;
        let back = Purge::decode(&purge).ok_or("undecodable")?;
        assert_eq!((back.o.as_str(), back.purged), ("a", 56));
        assert!(Notice::decode(&purge).is_none());
        let commit = Notice::encode("a", &[ev(7, None)], 4096).ok_or("no notice")?;
        assert!(Purge::decode(&commit).is_none());
        Ok(())
    }

    #[test]
    fn channel_names_round_trip_and_share_the_chat_slot() -> crate::TestResult {
        let names = Names::new("cs");
        let chat = ChatId::parse("room-1")?;
        let channel = names.chat_channel(&chat);
        assert_eq!(channel, "cs:{c:room-1}:events");
        assert_eq!(names.chat_of_channel(&channel), Some(chat.clone()));
        assert!(names.join_key(&chat).contains("{c:room-1}"));
        assert_eq!(names.chat_of_channel("cs:{fleet}:bus"), None);
        Ok(())
    }
}
