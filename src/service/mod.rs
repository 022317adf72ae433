//! The use cases: create and read chats, join, leave, list members, count,
//! post messages, fetch events.
//!
//! Reads go straight to the chat's shard. Writes to a chat (join, leave, post)
//! go through the chat's [`group_commit`] queue, which folds concurrent writes
//! into one transaction. Every write is idempotent by a unique key (a member row
//! per `(chat, user)`, a message per `(chat, sender, clientMessageId)`), so a
//! caller may retry any write whose answer it did not get.

pub mod group_commit;
pub mod plan;
pub mod repair;
pub mod write;

use std::sync::Arc;

use chrono::{DateTime, NaiveDateTime, SubsecRound, Utc};

use crate::domain::{
    ChatId, ClientMessageId, EventType, MaxMembers, MemberCursor, MemberState, MessageText,
    PageLimit, Revision, UserId,
};
use crate::shard::{OpError, Shard, ShardError, ShardSet};
use crate::storage::{self, chats, events, members, messages};

pub use group_commit::GroupCommit;

use std::time::Duration;

use crate::config::GroupCommitSettings;
use crate::live::Live;
use crate::throttle::join::JoinDecision;
use crate::throttle::pages::PageKey;
use crate::throttle::{Decisions, Throttle};
pub use plan::{Rejection, WriteOp};
pub use write::WriteOutcome;

/// Why a use case failed. Cloneable: one batch failure answers many callers.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServiceError {
    #[error("chat not found")]
    ChatNotFound,
    #[error("member not found")]
    MemberNotFound,
    #[error("chat is full ({max_members} members)")]
    ChatFull { max_members: u32 },
    #[error("sender is not a member of the chat")]
    NotAMember,
    #[error("clientMessageId was already used for a different text")]
    IdempotencyKeyReused,
    #[error("too many writes are queued for this chat")]
    ChatBusy,
    #[error("too many joins to this chat")]
    JoinThrottled { retry_after_secs: u64 },
    #[error("this chat is hot: event fetches are throttled")]
    FetchThrottled { retry_after_secs: u64 },
    #[error("shard {shard} is busy")]
    ShardBusy { shard: String },
    #[error("shard {shard} did not answer in time")]
    ShardTimeout { shard: String },
    #[error("shard {shard} is unavailable")]
    ShardUnavailable {
        shard: String,
        retry_after_secs: u64,
    },
    #[error("shard {shard} is read-only")]
    ShardReadOnly { shard: String },
    #[error("the outcome of the write on shard {shard} is unknown")]
    OutcomeUnknown { shard: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<ShardError> for ServiceError {
    fn from(e: ShardError) -> Self {
        let shard = e.shard().to_owned();
        match e {
            ShardError::Open {
                retry_after_secs, ..
            } => Self::ShardUnavailable {
                shard,
                retry_after_secs,
            },
            ShardError::ChatBusy { .. } => Self::ChatBusy,
            ShardError::Busy { .. } => Self::ShardBusy { shard },
            ShardError::Timeout { .. } => Self::ShardTimeout { shard },
            ShardError::Unavailable { .. } => Self::ShardUnavailable {
                shard,
                retry_after_secs: 1,
            },
            ShardError::ReadOnly { .. } => Self::ShardReadOnly { shard },
            ShardError::OutcomeUnknown { .. } => Self::OutcomeUnknown { shard },
            ShardError::Database { source, .. } => Self::Internal(format!(
                "database error on shard {shard}: {}",
                error_chain(&source)
            )),
        }
    }
}

impl From<Rejection> for ServiceError {
    fn from(r: Rejection) -> Self {
        match r {
            Rejection::ChatNotFound => Self::ChatNotFound,
            Rejection::MemberNotFound => Self::MemberNotFound,
            Rejection::ChatFull { max_members } => Self::ChatFull { max_members },
            Rejection::NotAMember => Self::NotAMember,
            Rejection::IdempotencyKeyReused => Self::IdempotencyKeyReused,
        }
    }
}

/// An error and its sources, on one line, for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

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
    fn from_row(chat: &ChatId, row: &messages::MessageRow) -> Self {
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

/// One entry of a chat's event log.
#[derive(Debug, Clone)]
pub struct Event {
    pub revision: u64,
    pub kind: EventType,
    pub user_id: String,
    pub message_id: Option<u64>,
    pub text: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A page of JOINED members.
#[derive(Debug, Clone)]
pub struct MemberPage {
    pub members: Vec<Member>,
    pub next_cursor: Option<MemberCursor>,
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
    fn from_bool(created: bool) -> Self {
        if created { Self::New } else { Self::Existing }
    }
}

/// The chat store: routes each chat to its shard and runs the use cases.
pub struct ChatService {
    shards: Arc<ShardSet>,
    commits: Arc<GroupCommit>,
    default_max_members: MaxMembers,
    live: Arc<Live>,
    throttle: Arc<Throttle>,
}

impl ChatService {
    pub fn new(
        shards: Arc<ShardSet>,
        group_commit: GroupCommitSettings,
        default_max_members: MaxMembers,
        live: Arc<Live>,
        throttle: Arc<Throttle>,
    ) -> Self {
        Self {
            shards,
            commits: GroupCommit::new(group_commit),
            default_max_members,
            live,
            throttle,
        }
    }

    pub fn shards(&self) -> &Arc<ShardSet> {
        &self.shards
    }

    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }

    pub fn throttle(&self) -> &Arc<Throttle> {
        &self.throttle
    }

    fn shard(&self, chat: &ChatId) -> &Arc<Shard> {
        self.shards.for_chat(chat)
    }

    /// Creates a chat, or returns the existing one. A given `max_members` is
    /// applied to an existing chat too (PUT sets the value).
    pub async fn create_chat(
        &self,
        chat: &ChatId,
        max_members: Option<MaxMembers>,
    ) -> Result<(Chat, Created), ServiceError> {
        let shard = self.shard(chat);
        let (id, max, default) = (chat.to_string(), max_members, self.default_max_members);
        let (row, created) = shard
            .write(Some(chat), "create_chat", move |conn| {
                Box::pin(create_or_update(conn, id, max, default))
            })
            .await?;
        Ok((self.to_chat(chat, row), created))
    }

    pub async fn get_chat(&self, chat: &ChatId) -> Result<Chat, ServiceError> {
        let id = chat.to_string();
        let row = self
            .shard(chat)
            .read(Some(chat), "get_chat", move |conn| {
                Box::pin(async move { Ok(chats::get(conn, &id).await?) })
            })
            .await?
            .ok_or(ServiceError::ChatNotFound)?;
        Ok(self.to_chat(chat, row))
    }

    fn to_chat(&self, chat: &ChatId, row: chats::ChatRow) -> Chat {
        Chat {
            chat_id: chat.clone(),
            shard: self.shard(chat).name().to_owned(),
            member_count: row.member_count,
            max_members: row.max_members,
            revision: row.revision,
            created_at: storage::utc(row.created_at),
        }
    }

    async fn write(&self, chat: &ChatId, op: WriteOp) -> Result<WriteOutcome, ServiceError> {
        let result = self.commits.submit(self.shard(chat), chat, op).await;
        // Feeds the hot-chat detector (in this request's span, so a chat marked
        // hot shows on the request that tipped it) and retires the chat's kept
        // pages; a failed write may still have been applied, so it retires them too.
        let events = result.as_ref().map_or(0, WriteOutcome::events);
        let rule = self.live.load().config.hot_chat_rule(chat);
        self.throttle
            .hot
            .record_write(chat, events, rule, &self.throttle.decisions);
        match result? {
            WriteOutcome::Rejected(r) => Err(r.into()),
            other => Ok(other),
        }
    }

    /// Joins a user: `New` for a new or returning member, `Existing` when the
    /// user was already JOINED (nothing changes).
    pub async fn join(
        &self,
        chat: &ChatId,
        user: &UserId,
    ) -> Result<(Member, Created), ServiceError> {
        // Decided before any database work: no network hop, no delay.
        let rule = self.live.load().config.join_rule(chat);
        let decision = self
            .throttle
            .joins
            .check(chat, rule, &self.throttle.decisions);
        if let JoinDecision::Throttle { retry_after_secs } = decision {
            return Err(ServiceError::JoinThrottled { retry_after_secs });
        }
        match self
            .write(chat, WriteOp::Join { user: user.clone() })
            .await?
        {
            WriteOutcome::Joined { member, created } => Ok((member, Created::from_bool(created))),
            other => Err(unexpected(other)),
        }
    }

    /// Leaves: succeeds when the user left now or had already left.
    pub async fn leave(&self, chat: &ChatId, user: &UserId) -> Result<(), ServiceError> {
        match self
            .write(chat, WriteOp::Leave { user: user.clone() })
            .await?
        {
            WriteOutcome::Left { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Posts a message; `Existing` when the idempotency key was already used for
    /// the same text (the original message is returned).
    pub async fn post_message(
        &self,
        chat: &ChatId,
        sender: &UserId,
        client_message_id: &ClientMessageId,
        text: MessageText,
    ) -> Result<(Message, Created), ServiceError> {
        let op = WriteOp::Post {
            sender: sender.clone(),
            client_message_id: client_message_id.clone(),
            text,
        };
        match self.write(chat, op).await? {
            WriteOutcome::Posted { message, created } => Ok((message, Created::from_bool(created))),
            other => Err(unexpected(other)),
        }
    }

    pub async fn get_member(&self, chat: &ChatId, user: &UserId) -> Result<Member, ServiceError> {
        let (id, uid) = (chat.to_string(), user.to_string());
        let found = self
            .shard(chat)
            .read(Some(chat), "get_member", move |conn| {
                Box::pin(async move {
                    match members::get(conn, &id, &uid).await? {
                        Some(row) => Ok(Ok(row)),
                        None => Ok(Err(chat_exists(conn, &id).await?)),
                    }
                })
            })
            .await?;
        match found {
            Ok(row) => Ok(member(chat, row)),
            Err(true) => Err(ServiceError::MemberNotFound),
            Err(false) => Err(ServiceError::ChatNotFound),
        }
    }

    /// A page of JOINED members in id order; `after` is the previous page's
    /// cursor. A member joined for the whole paging appears exactly once.
    pub async fn list_members(
        &self,
        chat: &ChatId,
        after: MemberCursor,
        limit: PageLimit,
    ) -> Result<MemberPage, ServiceError> {
        let id = chat.to_string();
        let n = limit.get();
        let rows = self
            .shard(chat)
            .read(Some(chat), "list_members", move |conn| {
                Box::pin(async move {
                    // One row more than asked tells whether another page exists.
                    let rows = members::page_joined(conn, &id, after.0, n + 1).await?;
                    if rows.is_empty() && !chat_exists(conn, &id).await? {
                        return Ok(None);
                    }
                    Ok(Some(rows))
                })
            })
            .await?
            .ok_or(ServiceError::ChatNotFound)?;
        let more = rows.len() > n as usize;
        let members: Vec<Member> = rows
            .into_iter()
            .take(n as usize)
            .map(|r| member(chat, r))
            .collect();
        let next_cursor = if more {
            members.last().map(|m| MemberCursor(m.member_id))
        } else {
            None
        };
        Ok(MemberPage {
            members,
            next_cursor,
        })
    }

    /// The member count: one primary-key read of `chat_member_count`.
    pub async fn member_count(&self, chat: &ChatId) -> Result<u32, ServiceError> {
        let id = chat.to_string();
        self.shard(chat)
            .read(Some(chat), "member_count", move |conn| {
                Box::pin(async move { Ok(chats::member_count(conn, &id).await?) })
            })
            .await?
            .ok_or(ServiceError::ChatNotFound)
    }

    /// Events after `after`, oldest first, with the chat's latest revision.
    ///
    /// A hot chat's fetches may be throttled (`throttleRate` of them, unless
    /// the rule is a dry run); concurrent identical fetches share one query, and
    /// a hot chat's pages are kept for `cacheMillis` or until this instance
    /// writes to the chat.
    pub async fn events(
        &self,
        chat: &ChatId,
        after: Revision,
        limit: PageLimit,
    ) -> Result<Arc<EventPage>, ServiceError> {
        let decisions = &self.throttle.decisions;
        Decisions::bump(&decisions.fetches);
        let rule = self.live.load().config.hot_chat_rule(chat);
        let heat = self.throttle.hot.heat(chat);
        let hot = rule.enabled && heat.hot;
        if hot && rule.throttle_rate > 0.0 && rand::random::<f64>() < rule.throttle_rate {
            // Jittered, so throttled clients do not all come back at once.
            let retry_after_secs = rand::random_range(1..=3);
            if rule.dry_run {
                Decisions::bump(&decisions.fetches_throttled_dry_run);
                tracing::debug!(
                    throttle_rate = rule.throttle_rate,
                    "fetch_throttled_dry_run"
                );
            } else {
                Decisions::bump(&decisions.fetches_throttled);
                tracing::debug!(
                    throttle_rate = rule.throttle_rate,
                    retry_after_secs,
                    "fetch_throttled"
                );
                return Err(ServiceError::FetchThrottled { retry_after_secs });
            }
        }
        let key = PageKey {
            chat: chat.clone(),
            after: after.0,
            limit: limit.get(),
            generation: heat.generation,
        };
        let ttl = if hot {
            Duration::from_millis(rule.cache_millis)
        } else {
            Duration::ZERO
        };
        self.throttle
            .pages
            .get_or_load(key, ttl, async {
                Decisions::bump(&decisions.fetch_queries);
                let page = self.load_events(chat, after, limit).await?;
                let weight = page
                    .events
                    .iter()
                    .map(|e| 64 + e.text.as_ref().map_or(0, String::len))
                    .sum::<usize>();
                Ok((page, u32::try_from(weight).unwrap_or(u32::MAX)))
            })
            .await
    }

    async fn load_events(
        &self,
        chat: &ChatId,
        after: Revision,
        limit: PageLimit,
    ) -> Result<EventPage, ServiceError> {
        let id = chat.to_string();
        let n = limit.get();
        let (rows, latest) = self
            .shard(chat)
            .read(Some(chat), "fetch_events", move |conn| {
                Box::pin(async move {
                    // Events first, then the revision: the revision read is never
                    // below the last event returned.
                    let rows = events::page(conn, &id, after.0, n).await?;
                    let latest = chats::revision(conn, &id).await?;
                    Ok((rows, latest))
                })
            })
            .await?;
        let latest_revision = latest.ok_or(ServiceError::ChatNotFound)?;
        let events = rows
            .into_iter()
            .filter_map(|r| {
                Some(Event {
                    revision: r.revision,
                    kind: EventType::from_code(r.event_type)?,
                    user_id: r.user_id,
                    message_id: r.message_id,
                    text: r.body,
                    created_at: storage::utc(r.created_at),
                })
            })
            .collect();
        Ok(EventPage {
            events,
            latest_revision,
        })
    }
}

fn unexpected(outcome: WriteOutcome) -> ServiceError {
    ServiceError::Internal(format!("unexpected write outcome {outcome:?}"))
}

fn member(chat: &ChatId, row: members::MemberRow) -> Member {
    Member {
        chat_id: chat.clone(),
        user_id: row.user_id,
        member_id: row.id,
        state: MemberState::from_code(row.state).unwrap_or(MemberState::Left),
        joined_at: storage::utc(row.joined_at),
    }
}

async fn chat_exists(conn: &mut sqlx::MySqlConnection, chat_id: &str) -> sqlx::Result<bool> {
    Ok(chats::revision(conn, chat_id).await?.is_some())
}

/// PUT /chats/{id}: insert, or lock and (when asked) update the existing chat.
async fn create_or_update(
    conn: &mut sqlx::MySqlConnection,
    chat_id: String,
    max_members: Option<MaxMembers>,
    default: MaxMembers,
) -> Result<(chats::ChatRow, Created), OpError> {
    use sqlx::Connection;
    // Two rounds at most: a concurrent PUT that inserts the chat between our
    // lookup and our insert makes the second round find it.
    for _ in 0..2 {
        let mut tx = conn.begin().await?;
        let created = match chats::lock(&mut tx, &chat_id).await? {
            Some(row) => {
                if let Some(max) = max_members.filter(|m| m.get() != row.max_members) {
                    chats::set_max_members(&mut tx, &chat_id, max.get()).await?;
                }
                Created::Existing
            }
            None => {
                let max = max_members.unwrap_or(default).get();
                match chats::insert(&mut tx, &chat_id, max, now()).await {
                    Ok(()) => Created::New,
                    Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                        tx.rollback().await?;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let row = chats::get(&mut tx, &chat_id)
            .await?
            .ok_or(OpError::Sql(sqlx::Error::RowNotFound))?;
        tx.commit().await.map_err(OpError::Commit)?;
        return Ok((row, created));
    }
    Err(OpError::Sql(sqlx::Error::RowNotFound))
}
