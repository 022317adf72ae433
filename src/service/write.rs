//! One group-commit transaction: lock, read, plan, write, commit.
//!
//! The transaction always starts by locking the chat row (and its count row), so
//! the writers of one chat are serialised across all chatshard instances, and
//! every read after it sees the latest committed state. It then reads the rows of
//! the users and idempotency keys involved, lets [`plan`] decide everything in
//! memory, and issues a fixed number of statements however many writes the batch
//! holds: multi-row inserts for members, messages and events, one `UPDATE` per
//! target state, one revision bump and one count adjustment.

use std::collections::HashMap;

use chrono::NaiveDateTime;
use sqlx::{Connection, MySqlConnection};

use super::plan::{self, ChatBefore, MemberBefore, MessageBefore, Planned, Rejection, WriteOp};
use super::{Event, Member, Message};
use crate::domain::{ChatId, ClientMessageId, MemberState, UserId};
use crate::shard::OpError;
use crate::storage::{self, UnreadableRow, chats, events, members, messages};

/// The answer to one write of a batch.
#[derive(Debug, Clone)]
pub enum WriteOutcome {
    /// `revision`: the chat's revision once the batch committed, the
    /// consistency token of the answer (`minRevision`, docs/replicas.md).
    Joined {
        member: Member,
        created: bool,
        revision: u64,
    },
    /// `now` when this write made the user leave (an event was appended).
    Left {
        now: bool,
        revision: u64,
    },
    Posted {
        message: Message,
        created: bool,
    },
    Rejected(Rejection),
    /// Not applied: a move's fence holds the chat's writes (for at most a
    /// few seconds).
    Fenced,
    /// Not applied: the chat is held by the shard named (its row here is a
    /// marker, docs/moving-chats.md); the write is to be sent there.
    Moved(std::sync::Arc<str>),
}

/// What one committed batch did: each write's answer (in the order of the
/// batch) and the events it appended (in revision order), as the log now holds
/// them, so that readers on this instance learn of them without a read.
#[derive(Debug, Clone, Default)]
pub struct Committed {
    pub outcomes: Vec<WriteOutcome>,
    pub events: Vec<Event>,
}

/// Runs one batch in one transaction. Business refusals are per-operation
/// outcomes; an `Err` means the whole batch was not applied (or, for
/// [`OpError::Commit`], may have been).
pub async fn commit_batch(
    conn: &mut MySqlConnection,
    chat: &ChatId,
    ops: &[WriteOp],
    now: NaiveDateTime,
) -> Result<Committed, OpError> {
    let mut tx = conn.begin().await?;
    let chat_id = chat.as_str();
    let Some(row) = chats::lock(&mut tx, chat_id).await? else {
        tx.rollback().await?;
        return Ok(Committed {
            outcomes: vec![WriteOutcome::Rejected(Rejection::ChatNotFound); ops.len()],
            events: Vec::new(),
        });
    };
    if let Some(to) = row.moved_to {
        tx.rollback().await?;
        let to: std::sync::Arc<str> = to.into();
        return Ok(Committed {
            outcomes: vec![WriteOutcome::Moved(to); ops.len()],
            events: Vec::new(),
        });
    }
    if row.fenced != 0 {
        tx.rollback().await?;
        return Ok(Committed {
            outcomes: vec![WriteOutcome::Fenced; ops.len()],
            events: Vec::new(),
        });
    }
    let before = ChatBefore {
        revision: row.revision,
        max_members: row.max_members,
        member_count: row.member_count,
    };

    let mut users: Vec<&str> = ops.iter().map(|op| op.user().as_str()).collect();
    users.sort_unstable();
    users.dedup();
    let member_rows = members::lock_many(&mut tx, chat_id, &users).await?;
    let members_before = member_map(chat_id, &member_rows)?;

    let mut keys: Vec<(&str, &str)> = ops
        .iter()
        .filter_map(|op| match op {
            WriteOp::Post {
                sender,
                client_message_id,
                ..
            } => Some((sender.as_str(), client_message_id.as_str())),
            _ => None,
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let existing = messages::find_by_keys(&mut tx, chat_id, &keys).await?;
    let messages_before: HashMap<(UserId, ClientMessageId), MessageBefore> = existing
        .iter()
        .map(|m| {
            Ok((
                message_key(chat_id, m)?,
                MessageBefore {
                    text: m.body.clone(),
                },
            ))
        })
        .collect::<Result<_, UnreadableRow>>()?;

    let plan = plan::plan(Some(&before), &members_before, &messages_before, ops, now);

    let new_members: Vec<members::NewMember<'_>> = plan
        .new_members
        .iter()
        .map(|m| members::NewMember {
            user_id: m.user.as_str(),
            state: m.state.code(),
            joined_at: m.joined_at,
            left_at: (m.state == MemberState::Left).then_some(now),
        })
        .collect();
    members::insert_many(&mut tx, chat_id, &new_members, now).await?;
    members::mark_joined(&mut tx, &plan.to_joined, now).await?;
    members::mark_left(&mut tx, &plan.to_left, now).await?;

    let new_messages: Vec<messages::NewMessage<'_>> = plan
        .new_messages
        .iter()
        .map(|m| messages::NewMessage {
            sender_id: m.sender.as_str(),
            client_message_id: m.client_message_id.as_str(),
            revision: m.revision,
            body: &m.text,
        })
        .collect();
    messages::insert_many(&mut tx, chat_id, &new_messages, now).await?;
    // Ids of a multi-row insert are read back by key: with
    // innodb_autoinc_lock_mode=2 they need not be consecutive.
    let all_messages = if new_messages.is_empty() {
        existing
    } else {
        messages::find_by_keys(&mut tx, chat_id, &keys).await?
    };
    let message_rows: HashMap<(&str, &str), &messages::MessageRow> = all_messages
        .iter()
        .map(|m| ((m.sender_id.as_str(), m.client_message_id.as_str()), m))
        .collect();

    let new_events: Vec<events::NewEvent<'_>> = plan
        .events
        .iter()
        .map(|e| events::NewEvent {
            revision: e.revision,
            event_type: e.kind.code(),
            user_id: e.user.as_str(),
            message_id: e
                .message
                .as_ref()
                .and_then(|(s, k)| message_rows.get(&(s.as_str(), k.as_str())))
                .map(|m| m.id),
        })
        .collect();
    events::append(&mut tx, chat_id, &new_events, now).await?;
    let appended: Vec<Event> = plan
        .events
        .iter()
        .zip(&new_events)
        .map(|(planned, stored)| Event {
            revision: planned.revision,
            kind: planned.kind,
            user_id: planned.user.as_str().into(),
            message_id: stored.message_id,
            text: planned
                .message
                .as_ref()
                .and_then(|(s, k)| message_rows.get(&(s.as_str(), k.as_str())))
                .map(|m| m.body.as_str().into()),
            created_at: storage::utc(now),
            encoded: Default::default(),
        })
        .collect();
    if !new_events.is_empty() {
        chats::advance_revision(&mut tx, chat_id, new_events.len() as u64).await?;
    }
    if plan.count_delta != 0 {
        let changed = chats::adjust_member_count(&mut tx, chat_id, plan.count_delta).await?;
        if changed != 1 {
            // Only possible if the stored count was already wrong; refuse to
            // make it worse. `chatshard repair-counts` fixes the row.
            return Err(OpError::invariant(format!(
                "member count of chat {chat_id} could not be adjusted by {}",
                plan.count_delta
            )));
        }
    }
    let ids_after: HashMap<String, u64> = if plan.new_members.is_empty() {
        member_rows
            .iter()
            .map(|m| (m.user_id.clone(), m.id))
            .collect()
    } else {
        members::lock_many(&mut tx, chat_id, &users)
            .await?
            .into_iter()
            .map(|m| (m.user_id, m.id))
            .collect()
    };
    // Answers are built before COMMIT: a row the plan relies on that cannot be
    // read back is a bug, and must roll the batch back rather than commit it
    // with a wrong answer.
    let outcomes = plan
        .outcomes
        .into_iter()
        .map(|planned| {
            outcome(
                chat,
                planned,
                before.revision + new_events.len() as u64,
                &ids_after,
                &message_rows,
            )
        })
        .collect::<Result<Vec<_>, OpError>>()?;
    tx.commit().await.map_err(OpError::Commit)?;
    Ok(Committed {
        outcomes,
        events: appended,
    })
}

impl WriteOutcome {
    /// Events this write appended to the chat's log.
    pub fn events(&self) -> u64 {
        match self {
            Self::Joined { created, .. } | Self::Posted { created, .. } => u64::from(*created),
            Self::Left { now, .. } => u64::from(*now),
            Self::Rejected(_) | Self::Moved(_) | Self::Fenced => 0,
        }
    }
}

/// The member rows as the planner sees them; a row this version cannot read
/// fails the batch rather than being taken for a user who never joined.
fn member_map(
    chat_id: &str,
    rows: &[members::MemberRow],
) -> Result<HashMap<UserId, MemberBefore>, UnreadableRow> {
    rows.iter()
        .map(|m| {
            let unreadable = |column: &'static str, value: String| UnreadableRow {
                table: "chat_member",
                chat_id: chat_id.to_owned(),
                key: format!("id {}", m.id),
                column,
                value,
            };
            let user = UserId::parse(&m.user_id)
                .map_err(|_| unreadable("user_id", "(not a valid userId)".to_owned()))?;
            let state = MemberState::from_code(m.state)
                .ok_or_else(|| unreadable("state", m.state.to_string()))?;
            Ok((
                user,
                MemberBefore {
                    id: m.id,
                    state,
                    joined_at: m.joined_at,
                },
            ))
        })
        .collect()
}

fn message_key(
    chat_id: &str,
    m: &messages::MessageRow,
) -> Result<(UserId, ClientMessageId), UnreadableRow> {
    let unreadable = |column: &'static str| UnreadableRow {
        table: "chat_message",
        chat_id: chat_id.to_owned(),
        key: format!("id {}", m.id),
        column,
        value: "(not a valid identifier)".to_owned(),
    };
    Ok((
        UserId::parse(&m.sender_id).map_err(|_| unreadable("sender_id"))?,
        ClientMessageId::parse(&m.client_message_id)
            .map_err(|_| unreadable("client_message_id"))?,
    ))
}

fn outcome(
    chat: &ChatId,
    planned: Planned,
    revision: u64,
    ids: &HashMap<String, u64>,
    messages: &HashMap<(&str, &str), &messages::MessageRow>,
) -> Result<WriteOutcome, OpError> {
    let missing = |what: &str| {
        OpError::invariant(format!("{what} written in this batch cannot be read back"))
    };
    Ok(match planned {
        Planned::Joined {
            user,
            created,
            joined_at,
        } => match ids.get(user.as_str()) {
            Some(id) => WriteOutcome::Joined {
                member: Member {
                    chat_id: chat.clone(),
                    member_id: *id,
                    user_id: user.to_string(),
                    state: MemberState::Joined,
                    joined_at: storage::utc(joined_at),
                },
                created,
                revision,
            },
            None => return Err(missing("a member row")),
        },
        Planned::Left { now } => WriteOutcome::Left { now, revision },
        Planned::Posted {
            sender,
            client_message_id,
            created,
        } => match messages.get(&(sender.as_str(), client_message_id.as_str())) {
            Some(row) => WriteOutcome::Posted {
                message: Message::from_row(chat, row),
                created,
            },
            None => return Err(missing("a message")),
        },
        Planned::Rejected(r) => WriteOutcome::Rejected(r),
    })
}
