//! Multiplexed event streams: one connection carries the events of every chat
//! a chat server follows.
//!
//! - `POST /v1/streams` makes a stream, optionally with its first chats and the
//!   revision to follow each from; `DELETE /v1/streams/{streamId}` ends it.
//! - `GET /v1/streams/{streamId}` is the stream itself (`text/event-stream`):
//!   every event of every chat followed, once and in order per chat, each SSE
//!   message carrying the event with its `chatId`.
//! - `PUT /v1/streams/{streamId}/chats/{chatId}` (`{"after": R}`) adds a chat to
//!   a running stream, or restates where it stands; `DELETE` on the same path
//!   removes it.
//!
//! **Resuming.** Messages are numbered per stream (`id: <n>`). The stream keeps
//! every chat's cursor on the server, moved only when a message is handed to
//! the connection, and a log of what the last `streams.resumeMessages`
//! messages moved. A reconnect with `Last-Event-ID: n` winds the cursors back
//! to what the client had received after message `n`, so nothing in flight on
//! the dropped connection is lost or repeated; an id older than the log is
//! refused with 410 `stream_resume_expired` (make a new stream from the
//! revisions the client holds). A stream without a connection is kept
//! `streams.resumeSeconds`, then dropped (404 `stream_not_found`). A second
//! connection to a stream takes it over: the first ends with `replaced`.
//!
//! **Following.** While a connection is attached each chat has a follower: a
//! long-poll of the chat through its in-memory tail (so a stream costs the
//! shard no more than any other subscriber), feeding one bounded queue of the
//! connection. A connection that does not read fills the queue and the
//! followers wait, each holding at most one page: memory stays bounded. A chat
//! more than `streams.resyncRevisions` behind gets one `resync` event with the
//! range to fetch with `GET …/events` instead of its backlog.
//!
//! Other messages: `resync`, `removed` (the chat does not exist, or its
//! follower failed), and the final `shutdown`, `replaced` and `closed`.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::extract::{ChatPath, JsonBody, OptionalJsonBody, StreamPath};
use super::model::ChatIdParam;
use super::problem::{Code, Problem};
use super::stream::{ChatSlot, StreamSlot, event_json, last_event_id, stream_headers};
use crate::domain::{ChatId, PageLimit, Revision};
use crate::live::StreamsConfig;
use crate::service::{ChatService, Event, ServiceError};

/// Pages a connection's followers may queue before they wait for it.
const QUEUE_PAGES: usize = 64;

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

    fn get(&self, id: &str) -> Result<Arc<MuxStream>, Problem> {
        self.streams.get(id).map(|s| s.clone()).ok_or_else(|| {
            Problem::new(
                Code::StreamNotFound,
                "no stream has this id on this instance (it ended, or expired without a connection): make a new one",
            )
        })
    }
}

/// One multiplexed stream.
struct MuxStream {
    id: String,
    inner: Mutex<Inner>,
    _slot: StreamSlot,
}

struct Inner {
    chats: HashMap<ChatId, Cursor>,
    /// The number of the last message handed to a connection.
    seq: u64,
    /// What the recent messages moved, oldest first.
    log: VecDeque<Moved>,
    /// The oldest `Last-Event-ID` the log can resume after.
    floor: u64,
    connection: Option<Connection>,
    /// When the last connection left.
    detached_at: Instant,
    /// Generations tell a chat's current follower from one it replaced.
    generations: u64,
    epochs: u64,
    closed: bool,
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

/// The connection attached to a stream, and its followers.
struct Connection {
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
struct Delivery {
    chat: ChatId,
    generation: u64,
    item: Item,
}

enum Item {
    Event(Event),
    Resync { latest: u64 },
    Removed(&'static str),
}

impl MuxStream {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    /// Starts the follower of `chat` from its cursor on the attached
    /// connection, replacing the one it had.
    fn follow(&mut self, chat: &ChatId, service: &Arc<ChatService>) {
        let (Some(connection), Some(cursor)) = (self.connection.as_mut(), self.chats.get(chat))
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

    /// Winds the cursors back to what the client had after message `seen`.
    fn resume_after(&mut self, seen: u64) -> Result<(), Problem> {
        if seen > self.seq {
            return Err(Problem::invalid(format!(
                "Last-Event-ID {seen} is ahead of the stream (its last message is {})",
                self.seq
            )));
        }
        if seen < self.floor {
            return Err(Problem::new(
                Code::StreamResumeExpired,
                format!(
                    "the stream can resume after message {} at the earliest: make a new stream \
                     with the revisions you hold",
                    self.floor
                ),
            ));
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

    /// Hands one delivery to the connection: numbers it and moves the chat's
    /// cursor, or says it is stale (the chat was removed or restated, or the
    /// event was already handed over).
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
                if let Some(connection) = self.connection.as_mut() {
                    connection.followers.remove(&delivery.chat);
                }
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

    fn view(&self, id: &str) -> StreamView {
        StreamView {
            stream_id: id.to_owned(),
            last_event_id: self.seq,
            chats: self
                .chats
                .iter()
                .map(|(chat, cursor)| (chat.to_string(), cursor.after))
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
        let resync_after = service.live().load().config.streams.resync_revisions;
        let page = service
            .events(
                &chat,
                Revision(after),
                PageLimit::largest(),
                crate::service::events::MAX_WAIT,
            )
            .await;
        match page {
            Ok(page)
                if resync_after > 0
                    && page.latest_revision.saturating_sub(after) > resync_after =>
            {
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
            Err(ServiceError::ChatNotFound) => {
                let _ = send(Item::Removed("chat_not_found")).await;
                return;
            }
            Err(ServiceError::RevisionPurged { .. }) => {
                // The stream cannot go on from where the client stands: it
                // full-syncs (the chat's snapshot) and follows the chat again.
                let _ = send(Item::Removed("revision_purged")).await;
                return;
            }
            Err(
                ServiceError::ShardUnavailable { .. }
                | ServiceError::ShardBusy { .. }
                | ServiceError::ShardTimeout { .. }
                | ServiceError::ChatBusy { .. }
                | ServiceError::FetchThrottled { .. },
            ) => {
                // The shard is broken or busy: the chat stays followed.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                tracing::warn!(chat = %chat, error = %crate::error::chain(&e), "a stream stopped following a chat");
                let _ = send(Item::Removed("error")).await;
                return;
            }
        }
    }
}

/// Path of a stream (documentation only).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Path, names("streamId"))]
#[allow(dead_code)]
pub struct StreamIdParam(
    /// The stream's id, as `POST /v1/streams` gave it.
    #[param(pattern = "^[0-9a-f]{32}$", min_length = 32, max_length = 32)]
    String,
);

/// `POST /v1/streams`: the chats to follow from the start.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(examples(json!({"chats": {"general": 0, "celebrity-42": 1200}})))]
pub struct CreateStreamRequest {
    /// chatId → the revision the client holds (events after it are sent).
    #[serde(default)]
    pub chats: HashMap<String, u64>,
}

/// `PUT /v1/streams/{streamId}/chats/{chatId}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(examples(json!({"after": 1200})))]
pub struct FollowChatRequest {
    /// The revision the client holds: events after it are sent.
    #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
    pub after: u64,
}

/// A stream and where it stands in each chat it follows.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(examples(json!({"streamId": "6f1c0e0f8a7b4c3d9e2f1a0b5c6d7e8f", "lastEventId": 0, "chats": {"general": 0}})))]
pub struct StreamView {
    pub stream_id: String,
    /// The number of the last message handed to a connection.
    pub last_event_id: u64,
    /// chatId → the last revision handed to a connection.
    pub chats: HashMap<String, u64>,
}

/// Takes a subscription place of `chat`, or the refusal.
fn take_chat(state: &AppState, config: &StreamsConfig, chat: &ChatId) -> Result<ChatSlot, Problem> {
    state
        .subscribers
        .take_chat(chat, config.max_per_chat)
        .map_err(|limit| limit.refusal(&state.metrics))
}

fn too_many_chats(state: &AppState, max: u64) -> Problem {
    state.metrics.stream_refused("stream");
    Problem::new(
        Code::TooManyChatsInStream,
        format!(
            "a stream follows at most {max} chats (streams.maxChatsPerStream): open another stream"
        ),
    )
}

/// Make a multiplexed stream, optionally following its first chats.
#[utoipa::path(
    post, path = "/v1/streams", tag = "events",
    request_body(content = Option<CreateStreamRequest>, content_type = "application/json"),
    responses(
        (status = 201, description = "Made: connect to `GET /v1/streams/{streamId}`", body = StreamView,
            headers(("location" = String, description = "The stream's path"))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid chat id or revision", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "too_many_chats_in_stream", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "too_many_subscribers", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create_stream(
    State(state): State<AppState>,
    OptionalJsonBody(body): OptionalJsonBody<CreateStreamRequest>,
) -> Result<Response, Problem> {
    let config = state.service.live().load().config.streams.clone();
    let chats = body
        .map(|b| b.chats)
        .unwrap_or_default()
        .into_iter()
        .map(|(chat, after)| {
            let chat = ChatId::parse(&chat).map_err(|e| Problem::invalid(e.0))?;
            let after = Revision::parse_after(Some(&after.to_string()))
                .map_err(|e| Problem::invalid(e.0))?;
            Ok((chat, after.0))
        })
        .collect::<Result<Vec<_>, Problem>>()?;
    if chats.len() as u64 > config.max_chats_per_stream {
        return Err(too_many_chats(&state, config.max_chats_per_stream));
    }
    let slot = state
        .subscribers
        .take_stream(config.max_subscribers)
        .map_err(|limit| limit.refusal(&state.metrics))?;
    // All or none: a refusal drops the places already taken.
    let chats = chats
        .into_iter()
        .map(|(chat, after)| take_chat(&state, &config, &chat).map(|slot| (chat, after, slot)))
        .collect::<Result<Vec<_>, _>>()?;
    let id = format!("{:032x}", rand::random::<u128>());
    let mut inner = Inner {
        chats: HashMap::new(),
        seq: 0,
        log: VecDeque::new(),
        floor: 0,
        connection: None,
        detached_at: Instant::now(),
        generations: 0,
        epochs: 0,
        closed: false,
    };
    for (chat, after, slot) in chats {
        inner.generations += 1;
        inner.chats.insert(
            chat,
            Cursor {
                after,
                generation: inner.generations,
                _slot: slot,
            },
        );
    }
    let view = inner.view(&id);
    state.streams.streams.insert(
        id.clone(),
        Arc::new(MuxStream {
            id: id.clone(),
            inner: Mutex::new(inner),
            _slot: slot,
        }),
    );
    let location = format!("/v1/streams/{id}");
    Ok((
        StatusCode::CREATED,
        [(axum::http::header::LOCATION, location)],
        Json(view),
    )
        .into_response())
}

/// End a multiplexed stream; its connection gets a final `closed` event.
#[utoipa::path(
    delete, path = "/v1/streams/{streamId}", tag = "events", params(StreamIdParam),
    responses(
        (status = 204, description = "Ended"),
        (status = 404, description = "stream_not_found", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid stream id", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn delete_stream(
    State(state): State<AppState>,
    StreamPath(id): StreamPath,
) -> Result<StatusCode, Problem> {
    let (_, stream) = state.streams.streams.remove(&id).ok_or_else(|| {
        Problem::new(
            Code::StreamNotFound,
            "no stream has this id on this instance",
        )
    })?;
    let mut inner = stream.lock();
    inner.closed = true;
    inner.detach(Some(End::Closed));
    inner.chats.clear();
    Ok(StatusCode::NO_CONTENT)
}

/// Follow a chat on a running stream, or restate the revision the client
/// holds for it.
#[utoipa::path(
    put, path = "/v1/streams/{streamId}/chats/{chatId}", tag = "events", params(StreamIdParam, ChatIdParam),
    request_body(content = FollowChatRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Followed from the revision given", body = StreamView),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "stream_not_found", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid id or revision", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "too_many_chats_in_stream", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "too_many_subscribers", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn follow_chat(
    State(state): State<AppState>,
    StreamPath(id): StreamPath,
    ChatPath(chat): ChatPath,
    JsonBody(body): JsonBody<FollowChatRequest>,
) -> Result<Json<StreamView>, Problem> {
    let after = Revision::parse_after(Some(&body.after.to_string()))
        .map_err(|e| Problem::invalid(e.0))?
        .0;
    let config = state.service.live().load().config.streams.clone();
    let stream = state.streams.get(&id)?;
    let mut inner = stream.lock();
    inner.generations += 1;
    let generation = inner.generations;
    if let Some(cursor) = inner.chats.get_mut(&chat) {
        cursor.after = after;
        cursor.generation = generation;
    } else {
        if inner.chats.len() as u64 >= config.max_chats_per_stream {
            return Err(too_many_chats(&state, config.max_chats_per_stream));
        }
        let slot = take_chat(&state, &config, &chat)?;
        inner.chats.insert(
            chat.clone(),
            Cursor {
                after,
                generation,
                _slot: slot,
            },
        );
    }
    inner.follow(&chat, &state.service);
    Ok(Json(inner.view(&stream.id)))
}

/// Stop following a chat (nothing happens if the stream does not follow it).
#[utoipa::path(
    delete, path = "/v1/streams/{streamId}/chats/{chatId}", tag = "events", params(StreamIdParam, ChatIdParam),
    responses(
        (status = 204, description = "Not followed any more"),
        (status = 404, description = "stream_not_found", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid id", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn unfollow_chat(
    State(state): State<AppState>,
    StreamPath(id): StreamPath,
    ChatPath(chat): ChatPath,
) -> Result<StatusCode, Problem> {
    let stream = state.streams.get(&id)?;
    let mut inner = stream.lock();
    inner.chats.remove(&chat);
    if let Some(follower) = inner
        .connection
        .as_mut()
        .and_then(|c| c.followers.remove(&chat))
    {
        follower.abort();
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The stream: every event of every chat it follows, as server-sent events.
#[utoipa::path(
    get, path = "/v1/streams/{streamId}", tag = "events", params(StreamIdParam,
        ("Last-Event-ID" = Option<String>, Header, pattern = "^[0-9]{0,18}$", description = "The number of the last message received: the stream resumes after it")),
    responses(
        (status = 200, description = "The stream: `id` = the message's number; data of an event = the Event with its `chatId`; `resync`, `removed`, and the final `shutdown`, `replaced` and `closed` events", content_type = "text/event-stream", body = String),
        (status = 404, description = "stream_not_found", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "stream_resume_expired", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid id, or Last-Event-ID ahead of the stream", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn connect_stream(
    State(state): State<AppState>,
    StreamPath(id): StreamPath,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let seen = last_event_id(&headers)
        .map(|id| {
            Revision::parse_after(Some(id))
                .map(|r| r.0)
                .map_err(|_| Problem::invalid("Last-Event-ID must be a message number"))
        })
        .transpose()?;
    let config = state.service.live().load().config.streams.clone();
    let stream = state.streams.get(&id)?;
    let (deliveries, queue) = mpsc::channel(QUEUE_PAGES);
    let (end_tx, end) = oneshot::channel();
    let epoch = {
        let mut inner = stream.lock();
        if inner.closed {
            return Err(Problem::new(Code::StreamNotFound, "the stream has ended"));
        }
        inner.detach(Some(End::Replaced));
        if let Some(seen) = seen {
            inner.resume_after(seen)?;
        }
        inner.epochs += 1;
        let epoch = inner.epochs;
        inner.connection = Some(Connection {
            epoch,
            deliveries,
            followers: HashMap::new(),
            end: Some(end_tx),
        });
        let chats: Vec<ChatId> = inner.chats.keys().cloned().collect();
        for chat in &chats {
            inner.follow(chat, &state.service);
        }
        epoch
    };
    let attached = Attached {
        state: state.clone(),
        stream,
        epoch,
        queue,
        end,
        closing: state.closing.clone(),
        pending: VecDeque::new(),
        finished: false,
        window: config.resume_messages,
    };
    let mut response = Sse::new(futures_util::stream::unfold(attached, next))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(config.keep_alive_seconds)))
        .into_response();
    stream_headers(&mut response);
    Ok(response)
}

/// One connection of a stream.
struct Attached {
    state: AppState,
    stream: Arc<MuxStream>,
    epoch: u64,
    queue: mpsc::Receiver<Delivery>,
    end: oneshot::Receiver<End>,
    closing: watch::Receiver<bool>,
    pending: VecDeque<Delivery>,
    finished: bool,
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
        drop(inner);
        if !self.finished {
            self.state.metrics.stream_ended("client");
        }
    }
}

/// The next message of a connection, or its end.
async fn next(mut a: Attached) -> Option<(Result<SseEvent, Infallible>, Attached)> {
    loop {
        if a.finished {
            return None;
        }
        while let Some(delivery) = a.pending.pop_front() {
            let seq = a.stream.lock().hand_over(&delivery, a.window);
            if let Some((seq, before)) = seq {
                return Some((Ok(message(&a.state, seq, before, delivery)), a));
            }
        }
        if *a.closing.borrow() {
            let event = end(
                &mut a,
                "shutdown",
                "the instance is shutting down: reconnect with Last-Event-ID",
            );
            return Some((Ok(event), a));
        }
        let mut closing = a.closing.clone();
        let ended = tokio::select! {
            biased;
            ended = &mut a.end => ended.ok(),
            delivery = a.queue.recv() => match delivery {
                Some(delivery) => {
                    a.pending.push_back(delivery);
                    continue;
                }
                // Every sender is gone: the connection was detached, and
                // why was sent just before.
                None => a.end.try_recv().ok(),
            },
            _ = closing.changed() => continue,
        };
        let event = match ended {
            Some(End::Closed) => end(&mut a, "closed", "the stream was deleted"),
            Some(End::Replaced) | None => end(
                &mut a,
                "replaced",
                "another connection took this stream over",
            ),
        };
        return Some((Ok(event), a));
    }
}

/// One delivery as an SSE message numbered `seq` (`before`: the chat's
/// cursor before it).
fn message(state: &AppState, seq: u64, before: u64, delivery: Delivery) -> SseEvent {
    let message = SseEvent::default().id(seq.to_string());
    let chat = delivery.chat.as_str();
    match delivery.item {
        Item::Event(event) => {
            let lag = (chrono::Utc::now() - event.created_at).as_seconds_f64();
            state.metrics.stream_event(lag);
            let json = event_json(&event);
            // The chat's id in front of the event's shared JSON (ids need no
            // escaping: they are [A-Za-z0-9_-]).
            let body = json.strip_prefix('{').unwrap_or("}");
            message.data(format!("{{\"chatId\":\"{chat}\",{body}"))
        }
        Item::Resync { latest } => {
            state.metrics.stream_resync();
            message.event("resync").data(
                serde_json::json!({
                    "chatId": chat,
                    "after": before,
                    "latestRevision": latest,
                    "detail": "the chat was too far behind: fetch the events after `after` up to latestRevision with GET /v1/chats/{chatId}/events; the stream goes on after latestRevision",
                })
                .to_string(),
            )
        }
        Item::Removed(reason) if reason == "revision_purged" => message.event("removed").data(
            serde_json::json!({
                "chatId": chat,
                "reason": reason,
                "after": before,
                "snapshot": format!("/v1/chats/{chat}/snapshot"),
                "detail": "the events after `after` are no longer stored: load the chat's snapshot, then follow the chat again (PUT …/chats/{chatId}) after the snapshot's revision",
            })
            .to_string(),
        ),
        Item::Removed(reason) => message
            .event("removed")
            .data(serde_json::json!({"chatId": chat, "reason": reason}).to_string()),
    }
}

/// The final event of a connection.
fn end(a: &mut Attached, reason: &'static str, detail: &str) -> SseEvent {
    a.finished = true;
    a.state.metrics.stream_ended(reason);
    let seq = a.stream.lock().seq;
    SseEvent::default().event(reason).data(
        serde_json::json!({"reason": reason, "detail": detail, "lastEventId": seq}).to_string(),
    )
}
