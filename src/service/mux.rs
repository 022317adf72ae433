//! The multiplexed-stream engine: one stream follows many chats and hands
//! their events, merged, to the one connection attached to it.
//!
//! [`Streams`] holds the streams of this instance. Through it a caller makes
//! a stream ([`Streams::create`]), follows or restates a chat on it
//! ([`Streams::follow`]), stops following one ([`Streams::unfollow`]), ends it
//! ([`Streams::delete`]), and attaches a connection ([`Streams::connect`]),
//! which yields [`Output`]s: numbered messages, then one final end.
//!
//! Invariants:
//! - **Cursors.** The stream keeps, per chat, the last revision handed to a
//!   connection, moved only when a message is handed over: every revision of a
//!   chat is handed over once and in order, or covered by a `resync` that
//!   names the range skipped. A chat restated, or removed and followed again,
//!   gets a new generation; deliveries of an older one are dropped as stale.
//! - **Resuming.** Messages are numbered per stream. A log of what the last
//!   `streams.resumeMessages` messages moved lets a reconnect wind the cursors
//!   back to what the client had after message `n` (`Ledger::resume_after`,
//!   pure); an `n` older than the log is refused, never guessed.
//! - **Bounds.** A stream follows at most `streams.maxChatsPerStream` chats,
//!   each holding one subscription place ([`super::subscribers`]). A
//!   connection's followers share one queue of [`QUEUE_DELIVERIES`] deliveries
//!   (one event each, whose size the message limits bound): a connection that
//!   does not read fills it and the followers wait, each holding at most the
//!   one page it is handing over. A chat more than `streams.resyncRevisions`
//!   behind is told `resync` (pure: [`too_far_behind`]) instead of being sent
//!   its backlog. The resume log holds at most `streams.resumeMessages`
//!   entries of fixed size. A stream without a connection is dropped after
//!   `streams.resumeSeconds`.
//! - **No silent loss.** A slow connection makes its followers wait; it is
//!   never skipped past. Followers read through the chat's tail, whose
//!   `watch` never lags; nothing here uses a `broadcast` channel.
//!
//! It must not know HTTP: no status codes, no SSE framing, no JSON, no
//! metrics. The HTTP layer parses requests, frames [`Output`]s and maps
//! [`MuxError`] to its answers.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;

use super::subscribers::{ChatSlot, Limit, StreamSlot, Subscribers};
use super::{ChatService, Event, ServiceError};
use crate::domain::{ChatId, PageLimit, Revision};
use crate::live::StreamsConfig;

/// Deliveries a connection's followers may queue before they wait for it.
pub const QUEUE_DELIVERIES: usize = 64;

/// Why a stream refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    /// No stream has this id on this instance (it ended, or expired).
    #[error("no stream has this id on this instance")]
    NotFound,
    /// The stream was deleted while the request ran.
    #[error("the stream has ended")]
    Ended,
    /// The stream would follow more than `streams.maxChatsPerStream` chats.
    #[error("a stream follows at most {max} chats")]
    TooManyChats { max: u64 },
    /// No subscription place was left.
    #[error("no stream place is left for this {}", .0.as_str())]
    Refused(Limit),
    /// `Last-Event-ID` names a message the stream has not sent.
    #[error("Last-Event-ID {seen} is ahead of the stream (its last message is {last})")]
    ResumeAhead { seen: u64, last: u64 },
    /// `Last-Event-ID` is older than the resume log.
    #[error("the stream can resume after message {floor} at the earliest")]
    ResumeExpired { floor: u64 },
}

/// Where a stream stands: its id, the number of its last message, and the
/// last revision handed over in each chat it follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    pub id: String,
    pub last_event_id: u64,
    pub chats: Vec<(ChatId, u64)>,
}

/// What a connection yields.
#[derive(Debug)]
pub enum Output {
    /// Message number `seq` of chat `chat`, whose cursor stood at `before`.
    Message {
        seq: u64,
        chat: ChatId,
        before: u64,
        item: Item,
    },
    /// The connection's final message; nothing follows it.
    End {
        reason: EndReason,
        /// The number of the last message handed to a connection.
        last_event_id: u64,
    },
}

/// What one message of a chat carries.
#[derive(Debug)]
pub enum Item {
    Event(Event),
    /// The chat was too far behind: the events up to `latest` are to be
    /// fetched; the stream goes on after it.
    Resync {
        latest: u64,
    },
    /// The stream no longer follows the chat.
    Removed(Removal),
}

/// Why a stream stopped following a chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The chat does not exist.
    ChatNotFound,
    /// The events after the cursor are purged: the client full-syncs.
    RevisionPurged,
    /// The follower failed.
    Failed,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The instance is shutting down.
    Shutdown,
    /// Another connection took the stream over.
    Replaced,
    /// The stream was deleted.
    Closed,
}

/// What a failed read means for whoever follows a chat (the followers here
/// and the per-chat stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setback {
    /// The chat does not exist.
    Gone,
    /// The events after the cursor are purged (the first stored is given).
    Purged { first_revision: u64 },
    /// The shard is broken or busy: stay, try again shortly.
    Retry,
    /// Anything else: stop following.
    Failed,
}

/// What a failed read of a chat's events means for a follower (pure).
pub fn setback(error: &ServiceError) -> Setback {
    match error {
        ServiceError::ChatNotFound => Setback::Gone,
        ServiceError::RevisionPurged { first_revision } => Setback::Purged {
            first_revision: *first_revision,
        },
        ServiceError::ShardUnavailable { .. }
        | ServiceError::ShardBusy { .. }
        | ServiceError::ShardTimeout { .. }
        | ServiceError::ChatBusy { .. }
        | ServiceError::FetchThrottled { .. } => Setback::Retry,
        _ => Setback::Failed,
    }
}

/// Whether a follower at `after` of a chat at `latest` is told `resync`
/// instead of being sent its backlog (pure; `resync_revisions` 0: never).
pub fn too_far_behind(after: u64, latest: u64, resync_revisions: u64) -> bool {
    resync_revisions > 0 && latest.saturating_sub(after) > resync_revisions
}

/// The multiplexed streams of this instance.
#[derive(Default)]
pub struct Streams {
    streams: DashMap<String, Arc<MuxStream>>,
}

impl Streams {
    /// Drops, every second, the streams that have had no connection for
    /// longer than `streams.resumeSeconds`; ends with the registry.
    pub fn sweep_every_second(this: &Arc<Self>, live: Arc<crate::live::Live>) {
        let registry: Weak<Self> = Arc::downgrade(this);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(streams) = registry.upgrade() else {
                    return;
                };
                let keep = Duration::from_secs(live.load().config.streams.resume_seconds);
                streams.sweep(keep);
            }
        });
    }

    fn sweep(&self, keep: Duration) {
        self.streams.retain(|_, stream| {
            let inner = stream.lock();
            inner.connection.is_some() || inner.detached_at.elapsed() < keep
        });
    }

    fn get(&self, id: &str) -> Result<Arc<MuxStream>, MuxError> {
        self.streams
            .get(id)
            .map(|s| s.clone())
            .ok_or(MuxError::NotFound)
    }

    /// Makes a stream following `chats` from the revisions given; all or
    /// none (a refusal frees the places already taken).
    pub fn create(
        &self,
        subscribers: &Arc<Subscribers>,
        config: &StreamsConfig,
        chats: Vec<(ChatId, u64)>,
    ) -> Result<Standing, MuxError> {
        if chats.len() as u64 > config.max_chats_per_stream {
            return Err(MuxError::TooManyChats {
                max: config.max_chats_per_stream,
            });
        }
        let slot = subscribers
            .take_stream(config.max_subscribers)
            .map_err(MuxError::Refused)?;
        let chats = chats
            .into_iter()
            .map(|(chat, after)| {
                let slot = subscribers
                    .take_chat(&chat, config.max_per_chat)
                    .map_err(MuxError::Refused)?;
                Ok((chat, after, slot))
            })
            .collect::<Result<Vec<_>, MuxError>>()?;
        let id = format!("{:032x}", rand::random::<u128>());
        let mut ledger = Ledger::default();
        for (chat, after, slot) in chats {
            ledger.add(chat, after, slot);
        }
        let standing = ledger.standing(&id);
        let inner = Inner {
            ledger,
            connection: None,
            detached_at: Instant::now(),
            epochs: 0,
            closed: false,
        };
        self.streams.insert(
            id.clone(),
            Arc::new(MuxStream {
                id,
                inner: Mutex::new(inner),
                _slot: slot,
            }),
        );
        Ok(standing)
    }

    /// Ends a stream; its connection ends with [`EndReason::Closed`].
    pub fn delete(&self, id: &str) -> Result<(), MuxError> {
        let (_, stream) = self.streams.remove(id).ok_or(MuxError::NotFound)?;
        let mut inner = stream.lock();
        inner.closed = true;
        inner.detach(Some(End::Closed));
        inner.ledger.chats.clear();
        Ok(())
    }

    /// Follows `chat` on a stream from revision `after`, or restates where
    /// the client stands in it; its follower (if connected) starts again
    /// from there.
    pub fn follow(
        &self,
        id: &str,
        chat: ChatId,
        after: u64,
        service: &Arc<ChatService>,
        subscribers: &Arc<Subscribers>,
        config: &StreamsConfig,
    ) -> Result<Standing, MuxError> {
        let stream = self.get(id)?;
        let mut inner = stream.lock();
        if !inner.ledger.restate(&chat, after) {
            if inner.ledger.chats.len() as u64 >= config.max_chats_per_stream {
                return Err(MuxError::TooManyChats {
                    max: config.max_chats_per_stream,
                });
            }
            let slot = subscribers
                .take_chat(&chat, config.max_per_chat)
                .map_err(MuxError::Refused)?;
            inner.ledger.add(chat.clone(), after, slot);
        }
        inner.follow(&chat, service);
        Ok(inner.ledger.standing(&stream.id))
    }

    /// Stops following `chat` (nothing happens if the stream does not).
    pub fn unfollow(&self, id: &str, chat: &ChatId) -> Result<(), MuxError> {
        let stream = self.get(id)?;
        let mut inner = stream.lock();
        inner.ledger.chats.remove(chat);
        if let Some(follower) = inner
            .connection
            .as_mut()
            .and_then(|c| c.followers.remove(chat))
        {
            follower.abort();
        }
        Ok(())
    }

    /// Attaches a connection to a stream, resuming after message `seen` if
    /// given; the connection it had ends with [`EndReason::Replaced`]. The
    /// connection ends with [`EndReason::Shutdown`] once `closing` is true.
    pub fn connect(
        &self,
        id: &str,
        seen: Option<u64>,
        service: &Arc<ChatService>,
        config: &StreamsConfig,
        closing: watch::Receiver<bool>,
    ) -> Result<Attached, MuxError> {
        let stream = self.get(id)?;
        let (deliveries, queue) = mpsc::channel(QUEUE_DELIVERIES);
        let (end_tx, end) = oneshot::channel();
        let epoch = {
            let mut inner = stream.lock();
            if inner.closed {
                return Err(MuxError::Ended);
            }
            inner.detach(Some(End::Replaced));
            if let Some(seen) = seen {
                inner.ledger.resume_after(seen)?;
            }
            inner.epochs += 1;
            let epoch = inner.epochs;
            inner.connection = Some(Attachment {
                epoch,
                deliveries,
                followers: HashMap::new(),
                end: Some(end_tx),
            });
            let chats: Vec<ChatId> = inner.ledger.chats.keys().cloned().collect();
            for chat in &chats {
                inner.follow(chat, service);
            }
            epoch
        };
        Ok(Attached {
            stream,
            epoch,
            queue,
            end,
            closing,
            finished: false,
            window: config.resume_messages,
        })
    }
}

/// One multiplexed stream.
struct MuxStream {
    id: String,
    inner: Mutex<Inner>,
    _slot: StreamSlot,
}

impl MuxStream {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Inner {
    ledger: Ledger,
    connection: Option<Attachment>,
    /// When the last connection left.
    detached_at: Instant,
    /// Epochs tell the attached connection from one it replaced.
    epochs: u64,
    closed: bool,
}

/// The connection attached to a stream, and its followers.
struct Attachment {
    epoch: u64,
    deliveries: mpsc::Sender<Delivery>,
    followers: HashMap<ChatId, AbortHandle>,
    end: Option<oneshot::Sender<End>>,
}

/// Why a connection ends while its stream goes on (or not).
#[derive(Debug, Clone, Copy)]
enum End {
    Replaced,
    Closed,
}

/// What a follower hands to its connection.
#[derive(Debug)]
struct Delivery {
    chat: ChatId,
    generation: u64,
    item: Item,
}

impl Inner {
    /// Starts the follower of `chat` from its cursor on the attached
    /// connection, replacing the one it had.
    fn follow(&mut self, chat: &ChatId, service: &Arc<ChatService>) {
        let (Some(connection), Some(cursor)) =
            (self.connection.as_mut(), self.ledger.chats.get(chat))
        else {
            return;
        };
        let task = tokio::spawn(follow(
            service.clone(),
            chat.clone(),
            cursor.after,
            cursor.generation,
            connection.deliveries.clone(),
        ));
        if let Some(old) = connection
            .followers
            .insert(chat.clone(), task.abort_handle())
        {
            old.abort();
        }
    }

    /// Ends the attached connection's followers, and the connection with
    /// `end` if given.
    fn detach(&mut self, end: Option<End>) {
        if let Some(mut connection) = self.connection.take() {
            for follower in connection.followers.values() {
                follower.abort();
            }
            if let (Some(end), Some(tx)) = (end, connection.end.take()) {
                let _ = tx.send(end);
            }
            self.detached_at = Instant::now();
        }
    }

    /// Hands one delivery to the connection (see [`Ledger::hand_over`]); a
    /// removal also forgets the chat's follower.
    fn hand_over(&mut self, delivery: &Delivery, window: u64) -> Option<(u64, u64)> {
        let handed = self.ledger.hand_over(delivery, window)?;
        if matches!(delivery.item, Item::Removed(_))
            && let Some(connection) = self.connection.as_mut()
        {
            connection.followers.remove(&delivery.chat);
        }
        Some(handed)
    }
}

/// Where a stream stands in each chat, and what its recent messages moved:
/// pure bookkeeping, no IO.
#[derive(Default)]
struct Ledger {
    chats: HashMap<ChatId, Cursor>,
    /// The number of the last message handed to a connection.
    seq: u64,
    /// What the recent messages moved, oldest first.
    log: VecDeque<Moved>,
    /// The oldest `Last-Event-ID` the log can resume after.
    floor: u64,
    /// Generations tell a chat's current follower from one it replaced.
    generations: u64,
}

/// Where a stream stands in one chat.
struct Cursor {
    /// The last revision handed to a connection.
    after: u64,
    generation: u64,
    _slot: ChatSlot,
}

/// What one message moved.
struct Moved {
    seq: u64,
    chat: ChatId,
    generation: u64,
    before: u64,
}

impl Ledger {
    /// Follows a chat the stream did not follow, from `after`.
    fn add(&mut self, chat: ChatId, after: u64, slot: ChatSlot) {
        self.generations += 1;
        self.chats.insert(
            chat,
            Cursor {
                after,
                generation: self.generations,
                _slot: slot,
            },
        );
    }

    /// Moves a followed chat's cursor to `after`, as a new generation (what
    /// its old follower still delivers is stale); `false` if the stream does
    /// not follow the chat.
    fn restate(&mut self, chat: &ChatId, after: u64) -> bool {
        let Some(cursor) = self.chats.get_mut(chat) else {
            return false;
        };
        self.generations += 1;
        cursor.after = after;
        cursor.generation = self.generations;
        true
    }

    /// Winds the cursors back to what the client had after message `seen`.
    fn resume_after(&mut self, seen: u64) -> Result<(), MuxError> {
        if seen > self.seq {
            return Err(MuxError::ResumeAhead {
                seen,
                last: self.seq,
            });
        }
        if seen < self.floor {
            return Err(MuxError::ResumeExpired { floor: self.floor });
        }
        while self.log.back().is_some_and(|m| m.seq > seen) {
            let Some(moved) = self.log.pop_back() else {
                break;
            };
            if let Some(cursor) = self.chats.get_mut(&moved.chat)
                && cursor.generation == moved.generation
            {
                cursor.after = moved.before;
            }
        }
        self.seq = seen;
        Ok(())
    }

    /// Hands one delivery over: numbers it and moves the chat's cursor, and
    /// keeps at most `window` messages in the log; `None` if it is stale (the
    /// chat was removed or restated, or the event was already handed over).
    /// Returns the message's number and the chat's cursor before it.
    fn hand_over(&mut self, delivery: &Delivery, window: u64) -> Option<(u64, u64)> {
        let cursor = self.chats.get_mut(&delivery.chat)?;
        if cursor.generation != delivery.generation {
            return None;
        }
        let before = cursor.after;
        match &delivery.item {
            Item::Event(event) if event.revision == before + 1 => cursor.after = event.revision,
            Item::Event(_) => return None,
            Item::Resync { latest } if *latest > before => cursor.after = *latest,
            Item::Resync { .. } => return None,
            Item::Removed(_) => {
                self.chats.remove(&delivery.chat);
            }
        }
        self.seq += 1;
        if !matches!(delivery.item, Item::Removed(_)) {
            self.log.push_back(Moved {
                seq: self.seq,
                chat: delivery.chat.clone(),
                generation: delivery.generation,
                before,
            });
        }
        while self.log.len() as u64 > window {
            if let Some(oldest) = self.log.pop_front() {
                self.floor = oldest.seq;
            }
        }
        Some((self.seq, before))
    }

    fn standing(&self, id: &str) -> Standing {
        Standing {
            id: id.to_owned(),
            last_event_id: self.seq,
            chats: self
                .chats
                .iter()
                .map(|(chat, cursor)| (chat.clone(), cursor.after))
                .collect(),
        }
    }
}

/// Follows one chat for a connection: long-polls it through its tail and
/// queues what it finds, until aborted.
async fn follow(
    service: Arc<ChatService>,
    chat: ChatId,
    mut after: u64,
    generation: u64,
    deliveries: mpsc::Sender<Delivery>,
) {
    let send = |item| {
        deliveries.send(Delivery {
            chat: chat.clone(),
            generation,
            item,
        })
    };
    loop {
        let resync_revisions = service.live().load().config.streams.resync_revisions;
        let page = service
            .events(
                &chat,
                Revision(after),
                PageLimit::largest(),
                super::events::MAX_WAIT,
            )
            .await;
        match page {
            Ok(page) if too_far_behind(after, page.latest_revision, resync_revisions) => {
                let latest = page.latest_revision;
                if send(Item::Resync { latest }).await.is_err() {
                    return;
                }
                after = latest;
            }
            Ok(page) => {
                for event in page.events.iter() {
                    after = event.revision;
                    if send(Item::Event(event.clone())).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => match setback(&e) {
                Setback::Gone => {
                    let _ = send(Item::Removed(Removal::ChatNotFound)).await;
                    return;
                }
                Setback::Purged { .. } => {
                    // The stream cannot go on from where the client stands:
                    // it full-syncs (the chat's snapshot) and follows the
                    // chat again.
                    let _ = send(Item::Removed(Removal::RevisionPurged)).await;
                    return;
                }
                Setback::Retry => {
                    // The shard is broken or busy: the chat stays followed.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Setback::Failed => {
                    tracing::warn!(chat = %chat, error = %crate::error::chain(&e), "a stream stopped following a chat");
                    let _ = send(Item::Removed(Removal::Failed)).await;
                    return;
                }
            },
        }
    }
}

/// One connection of a stream; dropping it detaches it (unless another
/// connection took the stream over meanwhile).
pub struct Attached {
    stream: Arc<MuxStream>,
    epoch: u64,
    queue: mpsc::Receiver<Delivery>,
    end: oneshot::Receiver<End>,
    closing: watch::Receiver<bool>,
    finished: bool,
    /// Messages the resume log keeps.
    window: u64,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let mut inner = self.stream.lock();
        if inner
            .connection
            .as_ref()
            .is_some_and(|c| c.epoch == self.epoch)
        {
            inner.detach(None);
        }
    }
}

/// What woke a waiting connection.
enum Woken {
    Delivery(Delivery),
    Ended(Option<End>),
    Closing,
}

impl Attached {
    /// Whether the connection yielded its final [`Output::End`].
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// The connection's next message, its end, or `None` after the end.
    pub async fn next(&mut self) -> Option<Output> {
        loop {
            if self.finished {
                return None;
            }
            if *self.closing.borrow() {
                return Some(self.end(EndReason::Shutdown));
            }
            let mut closing = self.closing.clone();
            let woken = tokio::select! {
                biased;
                ended = &mut self.end => Woken::Ended(ended.ok()),
                delivery = self.queue.recv() => match delivery {
                    Some(delivery) => Woken::Delivery(delivery),
                    // Every sender is gone: the connection was detached, and
                    // why was sent just before.
                    None => Woken::Ended(self.end.try_recv().ok()),
                },
                _ = closing.changed() => Woken::Closing,
            };
            match woken {
                Woken::Delivery(delivery) => {
                    let handed = self.stream.lock().hand_over(&delivery, self.window);
                    if let Some((seq, before)) = handed {
                        return Some(Output::Message {
                            seq,
                            chat: delivery.chat,
                            before,
                            item: delivery.item,
                        });
                    }
                }
                Woken::Closing => {}
                Woken::Ended(Some(End::Closed)) => return Some(self.end(EndReason::Closed)),
                Woken::Ended(Some(End::Replaced) | None) => {
                    return Some(self.end(EndReason::Replaced));
                }
            }
        }
    }

    fn end(&mut self, reason: EndReason) -> Output {
        self.finished = true;
        Output::End {
            reason,
            last_event_id: self.stream.lock().ledger.seq,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::EventType;

    fn chat(name: &str) -> ChatId {
        ChatId::parse(name).unwrap_or_else(|e| panic!("{name}: {}", e.0))
    }

    fn slot(registry: &Arc<Subscribers>, name: &str) -> ChatSlot {
        registry
            .take_chat(&chat(name), u64::MAX)
            .unwrap_or_else(|l| panic!("{}", l.as_str()))
    }

    fn event(name: &str, generation: u64, revision: u64) -> Delivery {
        Delivery {
            chat: chat(name),
            generation,
            item: Item::Event(Event {
                revision,
                kind: EventType::MemberJoined,
                user_id: format!("u{revision}").into(),
                message_id: None,
                text: None,
                created_at: chrono::Utc::now(),
                encoded: Default::default(),
            }),
        }
    }

    fn cursor(ledger: &Ledger, name: &str) -> Option<u64> {
        ledger.chats.get(&chat(name)).map(|c| c.after)
    }

    #[test]
    fn a_chat_is_resynced_only_past_the_limit_and_never_when_it_is_off() {
        assert!(
            !too_far_behind(10, 20, 10),
            "exactly at the limit: its events"
        );
        assert!(too_far_behind(10, 21, 10));
        assert!(!too_far_behind(10, 1_000_000, 0), "0 turns resync off");
        assert!(
            !too_far_behind(30, 20, 1),
            "ahead of the chat: nothing to skip"
        );
    }

    #[test]
    fn a_broken_shard_is_waited_out_and_anything_else_ends_the_follower() {
        assert_eq!(setback(&ServiceError::ChatNotFound), Setback::Gone);
        assert_eq!(
            setback(&ServiceError::RevisionPurged { first_revision: 7 }),
            Setback::Purged { first_revision: 7 }
        );
        let shard = || "s1".to_owned();
        for transient in [
            ServiceError::ShardUnavailable {
                shard: shard(),
                retry_after_secs: 1,
            },
            ServiceError::ShardBusy { shard: shard() },
            ServiceError::ShardTimeout { shard: shard() },
            ServiceError::ChatBusy { shard: shard() },
            ServiceError::FetchThrottled {
                retry_after_secs: 1,
            },
        ] {
            assert_eq!(setback(&transient), Setback::Retry, "{transient}");
        }
        assert_eq!(
            setback(&ServiceError::ShardReadOnly { shard: shard() }),
            Setback::Failed
        );
    }

    #[test]
    fn events_are_handed_over_once_in_order_and_stale_ones_dropped() {
        let registry = Arc::new(Subscribers::default());
        let mut ledger = Ledger::default();
        ledger.add(chat("a"), 0, slot(&registry, "a"));
        ledger.add(chat("b"), 5, slot(&registry, "b"));
        assert_eq!(ledger.hand_over(&event("a", 1, 1), 10), Some((1, 0)));
        assert_eq!(ledger.hand_over(&event("b", 2, 6), 10), Some((2, 5)));
        // Already handed over, or not the next revision: not numbered.
        assert_eq!(ledger.hand_over(&event("a", 1, 1), 10), None);
        assert_eq!(ledger.hand_over(&event("a", 1, 3), 10), None);
        // A follower of a generation the chat left behind is stale.
        assert!(ledger.restate(&chat("a"), 10));
        assert_eq!(ledger.hand_over(&event("a", 1, 2), 10), None);
        assert_eq!(ledger.hand_over(&event("a", 3, 11), 10), Some((3, 10)));
        // Not followed at all.
        assert!(!ledger.restate(&chat("c"), 1));
        assert_eq!(ledger.hand_over(&event("c", 1, 1), 10), None);
        assert_eq!(ledger.seq, 3);
    }

    #[test]
    fn a_resync_moves_the_cursor_forward_only_and_a_removal_frees_the_place() {
        let registry = Arc::new(Subscribers::default());
        let mut ledger = Ledger::default();
        ledger.add(chat("a"), 50, slot(&registry, "a"));
        let resync = |latest| Delivery {
            chat: chat("a"),
            generation: 1,
            item: Item::Resync { latest },
        };
        assert_eq!(ledger.hand_over(&resync(40), 10), None);
        assert_eq!(ledger.hand_over(&resync(90), 10), Some((1, 50)));
        assert_eq!(cursor(&ledger, "a"), Some(90));
        let removed = Delivery {
            chat: chat("a"),
            generation: 1,
            item: Item::Removed(Removal::ChatNotFound),
        };
        assert_eq!(ledger.hand_over(&removed, 10), Some((2, 90)));
        assert_eq!(cursor(&ledger, "a"), None);
        assert_eq!(registry.subscriptions(), 0);
        // A removal is numbered but not logged: nothing to wind back.
        assert_eq!(ledger.log.len(), 1);
    }

    #[test]
    fn a_resume_winds_the_cursors_back_to_what_the_client_had() -> crate::TestResult {
        let registry = Arc::new(Subscribers::default());
        let mut ledger = Ledger::default();
        ledger.add(chat("a"), 0, slot(&registry, "a"));
        ledger.add(chat("b"), 0, slot(&registry, "b"));
        for (name, generation, revision) in [("a", 1, 1), ("b", 2, 1), ("a", 1, 2), ("b", 2, 2)] {
            ledger.hand_over(&event(name, generation, revision), 10);
        }
        assert_eq!(
            ledger.resume_after(5),
            Err(MuxError::ResumeAhead { seen: 5, last: 4 })
        );
        ledger.resume_after(2)?;
        assert_eq!(
            (cursor(&ledger, "a"), cursor(&ledger, "b")),
            (Some(1), Some(1))
        );
        assert_eq!(ledger.seq, 2);
        // The next message follows on from the one the client had.
        assert_eq!(ledger.hand_over(&event("a", 1, 2), 10), Some((3, 1)));
        Ok(())
    }

    #[test]
    fn a_restated_chat_is_not_wound_back_by_a_resume() -> crate::TestResult {
        let registry = Arc::new(Subscribers::default());
        let mut ledger = Ledger::default();
        ledger.add(chat("a"), 0, slot(&registry, "a"));
        ledger.hand_over(&event("a", 1, 1), 10);
        assert!(ledger.restate(&chat("a"), 100));
        ledger.resume_after(0)?;
        assert_eq!(
            cursor(&ledger, "a"),
            Some(100),
            "the client said where it stands"
        );
        Ok(())
    }

    #[test]
    fn the_resume_log_is_bounded_and_an_older_id_is_refused() -> crate::TestResult {
        let registry = Arc::new(Subscribers::default());
        let mut ledger = Ledger::default();
        ledger.add(chat("a"), 0, slot(&registry, "a"));
        for revision in 1..=5 {
            ledger.hand_over(&event("a", 1, revision), 2);
        }
        assert_eq!(ledger.log.len(), 2);
        assert_eq!(ledger.floor, 3);
        assert_eq!(
            ledger.resume_after(2),
            Err(MuxError::ResumeExpired { floor: 3 })
        );
        ledger.resume_after(3)?;
        assert_eq!(cursor(&ledger, "a"), Some(3));
        Ok(())
    }

    #[test]
    fn a_stream_takes_its_places_all_or_none_and_is_swept_once_unattached() -> crate::TestResult {
        let registry = Arc::new(Subscribers::default());
        let streams = Streams::default();
        let config = StreamsConfig {
            max_per_chat: 1,
            max_chats_per_stream: 2,
            ..StreamsConfig::default()
        };
        let two = vec![(chat("a"), 0), (chat("b"), 3)];
        let made = streams.create(&registry, &config, two)?;
        assert_eq!(made.last_event_id, 0);
        assert_eq!(made.chats.len(), 2);
        let three = vec![(chat("c"), 0), (chat("d"), 0), (chat("e"), 0)];
        assert_eq!(
            streams.create(&registry, &config, three),
            Err(MuxError::TooManyChats { max: 2 })
        );
        // "a" is held: the refusal gives back the stream and "c".
        let taken = vec![(chat("c"), 0), (chat("a"), 0)];
        assert_eq!(
            streams.create(&registry, &config, taken),
            Err(MuxError::Refused(Limit::Chat))
        );
        assert_eq!((registry.open(), registry.subscriptions()), (1, 2));
        streams.unfollow(&made.id, &chat("a"))?;
        assert_eq!(registry.subscriptions(), 1);
        streams.sweep(Duration::from_secs(60));
        assert_eq!(registry.open(), 1, "kept while it may be resumed");
        streams.sweep(Duration::ZERO);
        assert_eq!((registry.open(), registry.subscriptions()), (0, 0));
        assert_eq!(streams.delete(&made.id), Err(MuxError::NotFound));
        Ok(())
    }
}
