//! Group commit: the writes of one chat are folded into one transaction.
//!
//! Each chat with writes in flight has a queue. The first write to find the queue
//! idle starts a flusher task; every write then waits for its own answer. The
//! flusher takes everything queued (up to `max_batch`), commits it in one
//! transaction ([`write::commit_batch`]), answers each write, and repeats while
//! writes keep arriving; so under a spike of 2,000 joins/s a chat costs its
//! shard a few transactions per second instead of 2,000, and with no spike a
//! lone write is committed at once, with no added delay.
//!
//! Invariants:
//! - at most one flusher per queue, so one chat holds at most one connection of
//!   its shard for writes on this instance (a hot chat cannot drain the
//!   bulkhead with writes);
//! - the queue of a chat is bounded (`max_pending_per_chat`); one more write is
//!   refused at once with `chat_queue_full`;
//! - the flusher is a spawned task: a caller that goes away does not cancel a
//!   batch other callers wait on (its own write may still commit; every write is
//!   idempotent, so a retry is safe);
//! - a batch that hits a deadlock is rolled back whole and run again; one that
//!   keeps hitting them is answered `chat_contended` (the chat's trouble, never
//!   counted against the shard);
//! - a failed batch answers all its writes with one shared error, which is
//!   therefore logged once, not once per write.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::oneshot;
use tracing::Instrument as _;

use super::ServiceError;
use super::plan::WriteOp;
use super::tail::Tails;
use super::write::{self, Committed, WriteOutcome};
use crate::config::GroupCommitSettings;
use crate::domain::ChatId;
use crate::shard::{Shard, ShardError, Spent, is_deadlock};

/// Attempts of a batch that keeps hitting deadlocks.
const DEADLOCK_ATTEMPTS: usize = 3;

type Reply = oneshot::Sender<Result<WriteOutcome, ServiceError>>;

/// A queued write: what to do, whom to answer, the span of the request that
/// asked (a batch's database span hangs under its first request), the shard
/// its writer routed it to (a chat that moves changes shard between two
/// writes), and its request's tally with the moment it was queued.
struct Queued {
    op: WriteOp,
    reply: Reply,
    span: tracing::Span,
    shard: Arc<Shard>,
    tally: Option<(Arc<Spent>, Instant)>,
}

#[derive(Default)]
struct ChatQueue {
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    pending: VecDeque<Queued>,
    flushing: bool,
}

impl ChatQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // A panic while holding this lock cannot leave the queue inconsistent
        // (every mutation is a single push/drain), so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_idle(&self) -> bool {
        let state = self.lock();
        state.pending.is_empty() && !state.flushing
    }
}

/// Per-chat write queues.
pub struct GroupCommit {
    queues: DashMap<ChatId, Arc<ChatQueue>>,
    settings: GroupCommitSettings,
    /// Told of every committed batch's events, so readers on this instance
    /// learn of them without a read.
    tails: Arc<Tails>,
    /// Told too, to tell the other instances of the fleet (if any).
    fleet: Option<Arc<crate::fleet::Fleet>>,
}

impl GroupCommit {
    pub fn new(
        settings: GroupCommitSettings,
        tails: Arc<Tails>,
        fleet: Option<Arc<crate::fleet::Fleet>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            queues: DashMap::new(),
            settings,
            tails,
            fleet,
        })
    }

    /// Queues a write of `chat` and waits for the batch that commits it.
    pub async fn submit(
        self: &Arc<Self>,
        shard: &Arc<Shard>,
        chat: &ChatId,
        op: WriteOp,
    ) -> Result<WriteOutcome, ServiceError> {
        let (reply, answer) = oneshot::channel();
        let queue = self.queues.entry(chat.clone()).or_default().clone();
        let start_flusher = {
            let mut state = queue.lock();
            if state.pending.len() >= self.settings.max_pending_per_chat {
                return Err(ServiceError::ChatQueueFull);
            }
            state.pending.push_back(Queued {
                op,
                reply,
                span: tracing::Span::current(),
                shard: shard.clone(),
                tally: Spent::current().map(|t| (t, Instant::now())),
            });
            !std::mem::replace(&mut state.flushing, true)
        };
        if start_flusher {
            // Not instrumented: the flusher outlives the request that started
            // it, and each batch names its own parent below.
            tokio::spawn(self.clone().flush(chat.clone(), queue));
        }
        answer
            .await
            .map_err(|_| ServiceError::internal("the write was dropped before it was answered"))?
    }

    /// Commits batches until the queue is empty, then retires the queue.
    async fn flush(self: Arc<Self>, chat: ChatId, queue: Arc<ChatQueue>) {
        // When the last batch came back from the shard: a write queued
        // before then waited that long behind it (see `Spent`).
        let mut last_back: Option<Instant> = None;
        loop {
            // A batch goes to one shard: the writes queued for the first
            // one's shard, in order.
            let (shard, batch): (Arc<Shard>, Vec<Queued>) = {
                let mut state = queue.lock();
                let Some(first) = state.pending.front() else {
                    state.flushing = false;
                    break;
                };
                let shard = first.shard.clone();
                let n = state
                    .pending
                    .iter()
                    .take(self.settings.max_batch)
                    .take_while(|q| Arc::ptr_eq(&q.shard, &shard))
                    .count();
                (shard, state.pending.drain(..n).collect())
            };
            // The batch's database span is a child of its first request; the
            // others are linked to it, so each request's trace shows the
            // transaction that committed it.
            let parent = batch[0].span.clone();
            for queued in &batch[1..] {
                queued.span.follows_from(&parent);
            }
            let mut ops = Vec::with_capacity(batch.len());
            let mut replies = Vec::with_capacity(batch.len());
            let mut tallies = Vec::new();
            for Queued {
                op, reply, tally, ..
            } in batch
            {
                ops.push(op);
                replies.push(reply);
                tallies.extend(tally);
            }
            // The batch keeps its own tally, added to each of its writes'
            // with how long that write waited for the batch to start.
            let spent = Arc::new(Spent::default());
            let started = Instant::now();
            let committed = Spent::scope(spent.clone(), commit(&shard, &chat, ops))
                .instrument(parent)
                .await;
            for (tally, queued_at) in tallies {
                let behind = last_back.map_or(Duration::ZERO, |back| {
                    back.saturating_duration_since(queued_at)
                });
                let waited = started.saturating_duration_since(queued_at);
                tally.add_batch(waited.saturating_sub(behind), behind, &spent);
            }
            last_back = Some(Instant::now());
            match committed {
                Ok(Committed { outcomes, events }) => {
                    // Before the answers: a writer that then reads finds its
                    // own events in the tail.
                    self.tails.committed(&chat, &events);
                    if let Some(fleet) = &self.fleet {
                        fleet.committed(&chat, &events);
                    }
                    for (reply, outcome) in replies.into_iter().zip(outcomes) {
                        let _ = reply.send(Ok(outcome));
                    }
                }
                Err(err) => {
                    let err = ServiceError::from(err);
                    for reply in replies {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
            }
        }
        // Drop the queue only if no writer slipped in meanwhile; one that holds a
        // clone of a retired queue starts its own flusher, and the chat row lock
        // still serialises the two.
        self.queues
            .remove_if(&chat, |_, q| Arc::ptr_eq(q, &queue) && q.is_idle());
    }

    /// Chats with writes queued or in flight (for tests and the admin view).
    pub fn active_chats(&self) -> usize {
        self.queues.len()
    }
}

async fn commit(shard: &Shard, chat: &ChatId, ops: Vec<WriteOp>) -> Result<Committed, ShardError> {
    let ops: Arc<[WriteOp]> = ops.into();
    let mut attempt = 1;
    loop {
        let (chat_for_op, ops_for_op) = (chat.clone(), ops.clone());
        let now = super::now();
        let result = shard
            .write(Some(chat), "commit_batch", move |conn| {
                Box::pin(async move {
                    // Runs inside the operation's database span.
                    tracing::Span::current().record("db.operation.batch.size", ops_for_op.len());
                    write::commit_batch(conn, &chat_for_op, &ops_for_op, now).await
                })
            })
            .await;
        match result {
            Err(ShardError::Contended { ref source, .. })
                if is_deadlock(source) && attempt < DEADLOCK_ATTEMPTS =>
            {
                attempt += 1;
            }
            other => return other,
        }
    }
}
