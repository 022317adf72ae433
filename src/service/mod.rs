//! The use cases: create and read chats, join, leave, list members, count,
//! post messages, fetch events.
//!
//! Reads go straight to the chat's shard ([`read`], [`events`]). Writes to a
//! chat (join, leave, post) go through the chat's [`group_commit`] queue, which
//! folds concurrent writes into one transaction ([`write`], planned by the pure
//! [`plan`]). Every write is idempotent by a unique key (a member row per
//! `(chat, user)`, a message per `(chat, sender, clientMessageId)`), so a caller
//! may retry any write whose answer it did not get.
//!
//! - [`error`]: [`ServiceError`], one variant per answer a caller can act on.
//! - [`model`]: what the use cases return.
//! - [`repair`]: finding and repairing drift (the digest check and the
//!   `repair-counts` command).
//! - [`lifecycle`]: the purge of old events and the periodic digest check.
//! - [`live_config`]: changing the live configuration (replace or merge
//!   patch, checked, then shared with the fleet).
//! - [`shards`]: what callers may know of the shards (names, a chat's shard,
//!   health and load snapshots), never a shard itself.
//! - [`moves`], [`buckets`]: chat and bucket-range moves, reported as plain
//!   records ([`moves::MoveStatus`], [`buckets::BucketMoveStatus`]); their
//!   JSON views are the caller's.
//! - [`mux`]: the multiplexed-stream engine (which chats a stream follows,
//!   its cursors, resuming, resync); [`subscribers`]: the places every event
//!   stream holds. The HTTP layer only frames what they yield.

pub mod buckets;
mod chat_move;
pub mod error;
pub mod events;
pub mod failover;
mod group_commit;
mod isolation;
pub mod lifecycle;
pub mod live_config;
pub mod model;
mod move_driver;
pub mod move_plan;
pub mod moves;
pub mod mux;
mod pacer;
pub mod plan;
mod range_copy;
pub mod range_diff;
mod range_move;
pub mod read;
pub mod repair;
pub mod replay;
pub mod shards;
pub mod subscribers;
pub mod tail;
mod write;

use std::sync::Arc;

use crate::config::GroupCommitSettings;
use crate::domain::{ChatId, ClientMessageId, MaxMembers, MessageText, UserId};
use crate::live::Live;
pub use crate::shard::Served;
use crate::shard::{OpError, Shard, ShardSet};
use crate::storage::{self, chats};
use crate::throttle::join::JoinDecision;
use crate::throttle::pages::Pages;
use crate::throttle::{Decisions, Throttle};

pub use error::{Fault, ServiceError};
pub use group_commit::GroupCommit;
pub use model::{Chat, Created, Event, EventPage, Member, MemberPage, Message, SnapshotPage, now};
pub use plan::{Rejection, WriteOp};
pub use write::WriteOutcome;

/// The chat store: routes each chat to its shard and runs the use cases.
pub struct ChatService {
    shards: Arc<ShardSet>,
    commits: Arc<GroupCommit>,
    default_max_members: MaxMembers,
    live: Arc<Live>,
    throttle: Arc<Throttle>,
    /// Event pages being loaded (coalesced) or kept for hot chats.
    pages: Pages<EventPage>,
    /// The recent events of chats with readers.
    tails: Arc<tail::Tails>,
    /// The other instances, when there is a fleet.
    fleet: Option<Arc<crate::fleet::Fleet>>,
    /// How chat moves copy and fence.
    move_settings: moves::MoveSettings,
    /// What the purge and the digest check did.
    lifecycle: lifecycle::LifecycleStats,
    /// Wakes the bucket table's poller: a shard named another owner.
    map_nudge: Arc<tokio::sync::Notify>,
    /// The revisions this instance acknowledged, checked after a failover.
    acked: failover::Acked,
}

/// How the service is sized (fixed at start).
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    pub group_commit: GroupCommitSettings,
    /// `maxMembers` of a chat created without one.
    pub default_max_members: MaxMembers,
    /// Bytes of event pages kept for hot chats.
    pub page_cache_bytes: u64,
    /// The in-memory tails of chats with readers.
    pub tail: tail::TailSettings,
    /// How chat moves copy and fence.
    pub moves: moves::MoveSettings,
    /// Replicated shards: how long acknowledged revisions are kept.
    pub replicas: crate::config::ReplicaSettings,
}

impl ChatService {
    pub fn new(
        shards: Arc<ShardSet>,
        settings: ServiceSettings,
        live: Arc<Live>,
        throttle: Arc<Throttle>,
        fleet: Option<Arc<crate::fleet::Fleet>>,
    ) -> Self {
        let observer = fleet.clone().map(|f| f as Arc<dyn tail::TailObserver>);
        let tails = Arc::new(tail::Tails::observed(settings.tail, observer));
        if let Some(fleet) = &fleet {
            fleet.attach_tails(tails.clone());
            let named = shards.clone();
            fleet.attach_writers(Arc::new(move |shard: &str| {
                if let Some(shard) = named.by_name(shard) {
                    shard.nudge();
                }
            }));
        }
        Self {
            shards,
            commits: GroupCommit::new(settings.group_commit, tails.clone(), fleet.clone()),
            default_max_members: settings.default_max_members,
            live,
            throttle,
            pages: Pages::new(settings.page_cache_bytes),
            tails,
            fleet,
            move_settings: settings.moves,
            lifecycle: lifecycle::LifecycleStats::default(),
            map_nudge: Arc::new(tokio::sync::Notify::new()),
            acked: failover::Acked::new(&settings.replicas),
        }
    }

    /// The fleet this instance belongs to, if any.
    pub fn fleet(&self) -> Option<&Arc<crate::fleet::Fleet>> {
        self.fleet.as_ref()
    }

    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }

    pub fn throttle(&self) -> &Arc<Throttle> {
        &self.throttle
    }

    /// Chats with an in-memory tail on this instance.
    /// Chats with an in-memory tail now.
    pub fn tails(&self) -> u64 {
        self.tails.len()
    }

    /// The bytes the tails hold together (estimated).
    pub fn tail_bytes(&self) -> u64 {
        self.tails.bytes()
    }

    pub(super) fn shard(&self, chat: &ChatId) -> &Arc<Shard> {
        self.shards.for_chat(chat)
    }

    /// Counts one request of `chat` on its shard, from its arrival to its
    /// answer (see [`Shard::request_latency`]); the shard's name.
    pub fn record_request(&self, chat: &ChatId, took: std::time::Duration) -> &str {
        let shard = self.shard(chat);
        shard.record_request(crate::routing::chat_key(chat), took);
        shard.name()
    }

    /// Creates a chat, or returns the existing one. A given `max_members` is
    /// applied to an existing chat too (PUT sets the value).
    pub async fn create_chat(
        &self,
        chat: &ChatId,
        max_members: Option<MaxMembers>,
    ) -> Result<(Chat, Created), ServiceError> {
        // A shard whose row of the chat is a marker sends the request on: a
        // chat that moved away is never created again where it was.
        let (held, mut hops) = (std::time::Instant::now(), 0);
        while hops < MAX_HOPS {
            let shard = self.shard(chat);
            let (id, max, default) = (chat.to_string(), max_members, self.default_max_members);
            let here = (crate::routing::bucket_of(chat), shard.name().to_owned());
            let located = shard
                .write(Some(chat), "create_chat", move |conn| {
                    Box::pin(create_or_update(conn, id, here, max, default))
                })
                .await?;
            // A range move's last pass holds the creation of its chats: the
            // creation waits a moment, like a write at a fence, then is
            // refused (retryable).
            let Some(located) = located else {
                if held.elapsed() < self.move_settings.hold_writes {
                    tokio::time::sleep(FENCE_RECHECK).await;
                    continue;
                }
                return Err(ServiceError::ChatMoving {
                    retry_after_secs: 1,
                });
            };
            match located {
                Located::Here((row, created)) => return Ok((self.to_chat(chat, row), created)),
                Located::Moved(to) => {
                    hops += 1;
                    self.follow(chat, shard.name(), &to)?;
                }
                Located::Missing => {
                    return Err(ServiceError::internal(
                        "a chat written in this transaction cannot be read back",
                    ));
                }
            }
        }
        Err(self.unsettled(chat))
    }

    pub(super) fn to_chat(&self, chat: &ChatId, row: chats::ChatRow) -> Chat {
        Chat {
            chat_id: chat.clone(),
            shard: self.shard(chat).name().to_owned(),
            member_count: row.member_count,
            max_members: row.max_members,
            revision: row.revision,
            first_revision: row.first_revision,
            created_at: storage::utc(row.created_at),
        }
    }

    async fn write(&self, chat: &ChatId, op: WriteOp) -> Result<WriteOutcome, ServiceError> {
        // The shard that holds the chat; a marker there says where else it
        // is, and the write follows it (never applied where the marker is).
        let mut hops = 0;
        let held = std::time::Instant::now();
        let result = loop {
            let shard = self.shard(chat);
            let result = self.commits.submit(shard, chat, op.clone()).await;
            match &result {
                Ok(WriteOutcome::Moved(to)) if hops < MAX_HOPS => {
                    hops += 1;
                    self.follow(chat, shard.name(), to)?;
                }
                // A move's fence (nothing was applied): the write waits for
                // the switch, a moment, rather than being refused; then it
                // follows the chat to its new shard.
                Ok(WriteOutcome::Fenced) if held.elapsed() < self.move_settings.hold_writes => {
                    tokio::time::sleep(FENCE_RECHECK).await;
                }
                // The markers point at each other: a switch is between its
                // steps (the source's tombstone is in, the target not live
                // yet). Held the same way, then refused (retryable).
                Ok(WriteOutcome::Moved(_)) if held.elapsed() < self.move_settings.hold_writes => {
                    hops = 0;
                    tokio::time::sleep(FENCE_RECHECK).await;
                }
                Ok(WriteOutcome::Moved(_)) => break Err(self.unsettled(chat)),
                _ => break result,
            }
        };
        // Kept only where a failover can happen: a shard with replicas.
        if self.shard(chat).is_replicated() {
            match &result {
                Ok(WriteOutcome::Joined { revision, .. } | WriteOutcome::Left { revision, .. }) => {
                    self.acked.record(chat, *revision);
                }
                Ok(WriteOutcome::Posted { message, .. }) => {
                    self.acked.record(chat, message.revision);
                }
                _ => {}
            }
        }
        // Feeds the hot-chat detector (in this request's span, so a chat marked
        // hot shows on the request that tipped it) and retires the chat's kept
        // pages; a failed write may still have been applied, so it retires them too.
        let events = result.as_ref().map_or(0, WriteOutcome::events);
        let rule = self.live.load().config.hot_chat_rule(chat);
        let marked = self
            .throttle
            .hot
            .record_write(chat, events, rule, &self.throttle.decisions);
        if let (Some(expires_in_ms), Some(fleet)) = (marked, &self.fleet) {
            fleet.marked_hot(chat, expires_in_ms);
        }
        match result? {
            WriteOutcome::Rejected(r) => Err(r.into()),
            WriteOutcome::Fenced => Err(ServiceError::ChatMoving {
                retry_after_secs: 1,
            }),
            other => Ok(other),
        }
    }

    /// Joins a user: `New` for a new or returning member, `Existing` when the
    /// user was already JOINED (nothing changes).
    pub async fn join(
        &self,
        chat: &ChatId,
        user: &UserId,
    ) -> Result<(Member, Created, u64), ServiceError> {
        // Decided before any database work: no network hop, no delay.
        // In a fleet, the local window holds this instance's share (the whole
        // limit while Redis holds the global one), and a chat's joins are also
        // charged to its global limit, from a local lease.
        let rule = self.live.load().config.join_rule(chat);
        let local = self
            .fleet
            .as_ref()
            .map_or(rule, |f| f.local_join_rule(rule));
        let decision = self
            .throttle
            .joins
            .check(chat, local, &self.throttle.decisions);
        if let JoinDecision::Throttle { retry_after_secs } = decision {
            return Err(ServiceError::JoinThrottled { retry_after_secs });
        }
        let global = self
            .fleet
            .as_ref()
            .map_or(JoinDecision::Admit, |f| f.admit_join(chat, rule));
        match global {
            JoinDecision::Admit => {}
            JoinDecision::DryRunThrottle { .. } => {
                Decisions::bump(&self.throttle.decisions.joins_throttled_dry_run);
            }
            JoinDecision::Throttle { retry_after_secs } => {
                Decisions::bump(&self.throttle.decisions.joins_throttled);
                return Err(ServiceError::JoinThrottled { retry_after_secs });
            }
        }
        match self
            .write(chat, WriteOp::Join { user: user.clone() })
            .await?
        {
            WriteOutcome::Joined {
                member,
                created,
                revision,
            } => Ok((member, Created::from_bool(created), revision)),
            other => Err(unexpected(other)),
        }
    }

    /// Leaves: succeeds when the user left now or had already left. Returns
    /// the chat's revision after the write (its consistency token).
    pub async fn leave(&self, chat: &ChatId, user: &UserId) -> Result<u64, ServiceError> {
        match self
            .write(chat, WriteOp::Leave { user: user.clone() })
            .await?
        {
            WriteOutcome::Left { revision, .. } => Ok(revision),
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
}

/// What an operation on a chat found on the shard it asked
/// (docs/moving-chats.md).
pub(crate) enum Located<T> {
    Here(T),
    /// The chat is not on that shard.
    Missing,
    /// The chat is held by the shard named.
    Moved(String),
}

impl<T> Located<T> {
    /// `Here(value)` unless the chat's row says it moved.
    pub(crate) fn unless_moved(moved_to: Option<String>, value: T) -> Self {
        match moved_to {
            Some(to) => Self::Moved(to),
            None => Self::Here(value),
        }
    }
}

/// `op`, run only when the chat on this connection is at `min_revision` at
/// least (or has moved: `op` then says where); `None` when it is behind or
/// not there yet.
fn at_least<T, F>(
    chat: &ChatId,
    min_revision: Option<u64>,
    op: F,
) -> impl for<'c> FnOnce(
    &'c mut sqlx::MySqlConnection,
) -> crate::shard::BoxFuture<'c, Result<Option<Located<T>>, OpError>>
+ Send
+ 'static
where
    F: for<'c> FnOnce(
            &'c mut sqlx::MySqlConnection,
        ) -> crate::shard::BoxFuture<'c, Result<Located<T>, OpError>>
        + Send
        + 'static,
    T: Send + 'static,
{
    let id = chat.to_string();
    move |conn| {
        Box::pin(async move {
            if let Some(min) = min_revision {
                match chats::revision(conn, &id).await? {
                    Some((_, Some(_))) => {}
                    Some((revision, None)) if revision >= min => {}
                    _ => return Ok(None),
                }
            }
            op(conn).await.map(Some)
        })
    }
}

/// Where a read may be served (docs/replicas.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReadAt {
    /// On the writer: the service's own reads, and event pages (which the
    /// instance's tails already serve from memory).
    #[default]
    Writer,
    /// On a replica in rotation, if it holds the chat at `min_revision` at
    /// least (the revision a write answered the caller); on the writer
    /// otherwise.
    Replica { min_revision: Option<u64> },
}

/// A read's value and where it was served.
#[derive(Debug, Clone)]
pub struct Read<T> {
    pub value: T,
    pub served: Served,
}

/// How often a write held by a move's fence checks again.
const FENCE_RECHECK: std::time::Duration = std::time::Duration::from_millis(20);

/// Shards one request follows a chat's markers through, at most.
const MAX_HOPS: usize = 3;

impl ChatService {
    /// Runs a read of `chat` where it is: on its shard, following the
    /// shards' markers (at most [`MAX_HOPS`]) when it moved. On the writer
    /// unless `at` lets a replica serve it (docs/replicas.md).
    pub(super) async fn read_located<T, M, F>(
        &self,
        chat: &ChatId,
        name: &'static str,
        at: ReadAt,
        make: M,
    ) -> Result<Read<T>, ServiceError>
    where
        M: Fn() -> F,
        F: for<'c> FnOnce(
                &'c mut sqlx::MySqlConnection,
            ) -> crate::shard::BoxFuture<'c, Result<Located<T>, OpError>>
            + Send
            + 'static,
        T: Send + 'static,
    {
        for _ in 0..MAX_HOPS {
            let shard = self.shard(chat);
            let (located, served) = self.read_on(shard, chat, name, at, &make).await?;
            match located {
                Located::Here(value) => return Ok(Read { value, served }),
                Located::Missing => return Err(ServiceError::ChatNotFound),
                Located::Moved(to) => self.follow(chat, shard.name(), &to)?,
            }
        }
        Err(self.unsettled(chat))
    }

    /// One read on one shard: on a replica in rotation when `at` allows and
    /// the replica holds the chat at `min_revision` at least; otherwise on
    /// the writer. A read meant for a replica that none could serve (none in
    /// rotation, or the one asked failed) takes a slot of the writer's
    /// fallback share, or is refused when that share is full. A replica
    /// behind the caller's revision hands the read to the writer as any
    /// read of the writer: that is the normal cost of reading one's writes.
    async fn read_on<T, M, F>(
        &self,
        shard: &Shard,
        chat: &ChatId,
        name: &'static str,
        at: ReadAt,
        make: &M,
    ) -> Result<(Located<T>, Served), ServiceError>
    where
        M: Fn() -> F,
        F: for<'c> FnOnce(
                &'c mut sqlx::MySqlConnection,
            ) -> crate::shard::BoxFuture<'c, Result<Located<T>, OpError>>
            + Send
            + 'static,
        T: Send + 'static,
    {
        let ReadAt::Replica { min_revision } = at else {
            let value = shard.read(Some(chat), name, make()).await?;
            return Ok((value, shard.served_by_writer()));
        };
        if !shard.is_replicated() {
            let value = shard.read(Some(chat), name, make()).await?;
            return Ok((value, shard.served_by_writer()));
        }
        let mut _fallback = None;
        match shard.pick_replica() {
            Some(i) => {
                match shard
                    .read_member(i, Some(chat), name, at_least(chat, min_revision, make()))
                    .await
                {
                    // The replica may not have the chat yet: the writer says.
                    Ok(Some(Located::Missing)) | Ok(None) => {}
                    Ok(Some(value)) => return Ok((value, shard.served(i))),
                    Err(e) => {
                        tracing::debug!(shard = %shard.name(), error = %e, "replica_read_failed");
                        _fallback =
                            Some(shard.fallback_slot().ok_or_else(|| ServiceError::from(e))?);
                    }
                }
            }
            None => {
                _fallback = Some(
                    shard
                        .fallback_slot()
                        .ok_or_else(|| ServiceError::ShardBusy {
                            shard: shard.name().to_owned(),
                        })?,
                );
            }
        }
        if shard.has_writer() {
            let value = shard.read(Some(chat), name, make()).await?;
            return Ok((value, shard.served_by_writer()));
        }
        // No writer: the freshest replica serves it, if it holds the
        // caller's revision.
        match shard
            .read(Some(chat), name, at_least(chat, min_revision, make()))
            .await?
        {
            Some(value) => Ok((value, shard.served_by_writer())),
            None => Err(ServiceError::ShardUnavailable {
                shard: shard.name().to_owned(),
                retry_after_secs: 1,
            }),
        }
    }

    /// Learns that `chat` is on the shard named `to` (said by `from`).
    pub(super) fn follow(&self, chat: &ChatId, from: &str, to: &str) -> Result<(), ServiceError> {
        if !self.shards.relocate(chat, to) {
            return Err(ServiceError::internal(format!(
                "shard {from} says chat {chat} is on shard {to}, which is not configured"
            )));
        }
        tracing::info!(from, to, "chat_relocated");
        // The bucket table may have changed too (a range moved).
        self.map_nudge.notify_one();
        Ok(())
    }

    /// The chat's markers did not settle within [`MAX_HOPS`] shards: a move
    /// is switching it (or the markers disagree). Retryable.
    fn unsettled(&self, chat: &ChatId) -> ServiceError {
        let shard = self.shard(chat).name().to_owned();
        tracing::warn!(shard = %shard, "the chat's location markers did not settle");
        ServiceError::ShardUnavailable {
            shard,
            retry_after_secs: 1,
        }
    }
}

fn unexpected(outcome: WriteOutcome) -> ServiceError {
    ServiceError::internal(format!("unexpected write outcome {outcome:?}"))
}

/// PUT /chats/{id}: insert, or lock and (when asked) update the existing chat.
/// A new chat is inserted only where the shard's newest bucket table puts its
/// bucket (`here`: the bucket and this shard's name), otherwise the answer
/// names the owner; `None` while a range move fences the bucket.
async fn create_or_update(
    conn: &mut sqlx::MySqlConnection,
    chat_id: String,
    (bucket, this_shard): (u16, String),
    max_members: Option<MaxMembers>,
    default: MaxMembers,
) -> Result<Option<Located<(chats::ChatRow, Created)>>, OpError> {
    use sqlx::Connection;
    // Two rounds at most: a concurrent PUT that inserts the chat between our
    // lookup and our insert makes the second round find it.
    for _ in 0..2 {
        let mut tx = conn.begin().await?;
        let created = match chats::lock(&mut tx, &chat_id).await? {
            Some(chats::ChatRow {
                moved_to: Some(to), ..
            }) => {
                tx.rollback().await?;
                return Ok(Some(Located::Moved(to)));
            }
            Some(row) => {
                if let Some(max) = max_members.filter(|m| m.get() != row.max_members) {
                    chats::set_max_members(&mut tx, &chat_id, max.get()).await?;
                }
                Created::Existing
            }
            None => {
                match storage::buckets::check_create(&mut tx, bucket, &this_shard).await? {
                    storage::buckets::CreateCheck::Allowed => {}
                    storage::buckets::CreateCheck::Fenced => {
                        tx.rollback().await?;
                        return Ok(None);
                    }
                    storage::buckets::CreateCheck::Owner(to) => {
                        tx.rollback().await?;
                        return Ok(Some(Located::Moved(to)));
                    }
                }
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
        let row = chats::get(&mut tx, &chat_id).await?.ok_or_else(|| {
            OpError::invariant("a chat written in this transaction cannot be read back")
        })?;
        tx.commit().await.map_err(OpError::Commit)?;
        return Ok(Some(Located::Here((row, created))));
    }
    Err(OpError::invariant(
        "a chat that failed to insert as a duplicate cannot be found",
    ))
}
