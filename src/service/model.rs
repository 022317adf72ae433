//! What the use cases return: chats, members, messages, events, pages.

use std::sync::Arc;

use chrono::{DateTime, NaiveDateTime, SubsecRound, Utc};

use crate::domain::{ChatId, EventType, MemberCursor, MemberState};
use crate::storage::{self, UnreadableRow, events, members, messages};

/// The current time at the precision stored (`DATETIME(6)`), so an answer shows
/// exactly what a later read returns.
pub fn now() -> NaiveDateTime {
    Utc::now().trunc_subsecs(6).naive_utc()
}

/// A chat as the API shows it.
#[derive(Debug, Clone)]
pub struct Chat {
    pub chat_id: ChatId,
    pub shard: String,
    pub member_count: u32,
    pub max_members: u32,
    pub revision: u64,
    /// The lowest revision still stored; the events below it were purged.
    pub first_revision: u64,
    pub created_at: DateTime<Utc>,
}

/// A membership.
#[derive(Debug, Clone)]
pub struct Member {
    pub chat_id: ChatId,
    pub user_id: String,
    pub member_id: u64,
    pub state: MemberState,
    pub joined_at: DateTime<Utc>,
}

impl Member {
    /// A stored member row; an unknown state is an error naming the row.
    pub(crate) fn from_row(chat: &ChatId, row: members::MemberRow) -> Result<Self, UnreadableRow> {
        let state = MemberState::from_code(row.state).ok_or_else(|| UnreadableRow {
            table: "chat_member",
            chat_id: chat.to_string(),
            key: format!("id {}", row.id),
            column: "state",
            value: row.state.to_string(),
        })?;
        Ok(Self {
            chat_id: chat.clone(),
            user_id: row.user_id,
            member_id: row.id,
            state,
            joined_at: storage::utc(row.joined_at),
        })
    }
}

/// A stored message.
#[derive(Debug, Clone)]
pub struct Message {
    pub chat_id: ChatId,
    pub message_id: u64,
    pub revision: u64,
    pub sender_id: String,
    pub client_message_id: String,
    pub text: String,
    pub created_at: DateTime<Utc>,
}

impl Message {
    pub(crate) fn from_row(chat: &ChatId, row: &messages::MessageRow) -> Self {
        Self {
            chat_id: chat.clone(),
            message_id: row.id,
            revision: row.revision,
            sender_id: row.sender_id.clone(),
            client_message_id: row.client_message_id.clone(),
            text: row.body.clone(),
            created_at: storage::utc(row.created_at),
        }
    }
}

/// One entry of a chat's event log (defined in `domain`, so the fleet can
/// carry events without depending on the service).
pub use crate::domain::Event;

impl Event {
    /// A stored event; an unknown type is an error naming the row, never a
    /// silent gap in the revisions a client sees.
    pub(crate) fn from_row(chat: &ChatId, row: events::EventRow) -> Result<Self, UnreadableRow> {
        let kind = EventType::from_code(row.event_type).ok_or_else(|| UnreadableRow {
            table: "chat_event",
            chat_id: chat.to_string(),
            key: format!("revision {}", row.revision),
            column: "event_type",
            value: row.event_type.to_string(),
        })?;
        Ok(Self {
            revision: row.revision,
            kind,
            user_id: row.user_id.into(),
            message_id: row.message_id,
            text: row.body.map(Into::into),
            created_at: storage::utc(row.created_at),
            encoded: Arc::default(),
        })
    }
}

/// A page of JOINED members.
#[derive(Debug, Clone)]
pub struct MemberPage {
    pub members: Vec<Member>,
    pub next_cursor: Option<MemberCursor>,
}

/// A page of a chat's snapshot: the chat, the revision the snapshot is taken
/// at, and JOINED members in id order.
#[derive(Debug, Clone)]
pub struct SnapshotPage {
    pub chat: Chat,
    pub revision: u64,
    pub members: Vec<Member>,
    pub next_cursor: Option<crate::domain::SnapshotCursor>,
}

/// A page of events.
#[derive(Debug, Clone)]
pub struct EventPage {
    pub events: Vec<Event>,
    pub latest_revision: u64,
}

/// Whether a write created something or found it already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    New,
    Existing,
}

impl Created {
    pub(crate) fn from_bool(created: bool) -> Self {
        if created { Self::New } else { Self::Existing }
    }
}
