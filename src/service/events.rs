//! Event fetches: `GET /v1/chats/{chatId}/events`, polls and long-polls.
//!
//! A fetch is answered from the chat's in-memory [`tail`](super::tail) when
//! the tail covers it: the events this instance committed are there without a
//! read, and what other instances wrote is picked up by one shared refresh of
//! the tail at most every `tail.refresh_ms`. A long-poll (`wait` > 0) with
//! nothing to return waits for the tail to move (a commit here, or a refresh
//! that found new events) until `wait` passes, then answers an empty page with
//! the latest revision. A fetch older than the tail reads the log, with the
//! coalescing and short-lived pages of hot chats. A fetch below the chat's
//! first stored revision is answered 410 `revision_purged` whether the tail
//! or the log answers it: the tail knows the floor (see [`super::tail`]).
//!
//! A plain poll of a hot chat may be throttled (the decision is the
//! throttle's, see `throttle::fetch`); a long-poll is a subscriber and never
//! is: waiting is what it is told to do instead of polling.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::tail::{Answer, Tail};
use super::{ChatService, Event, EventPage, Located, ServiceError};
use crate::domain::{ChatId, PageLimit, Revision};
use crate::storage::{chats, events};
use crate::throttle::Decisions;
use crate::throttle::fetch::FetchDecision;
use crate::throttle::pages::PageKey;

/// The longest a long-poll may wait.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// A waiter checks its tail itself at least every this many refresh periods
/// (between half of it and all of it, at random).
const SAFETY_NAPS: f64 = 10.0;

/// Chats whose revisions the tail refresher reads in one query.
const REFRESH_CHUNK: usize = 500;

impl ChatService {
    /// Events after `after`, oldest first, with the chat's latest revision;
    /// with `wait` > 0, waits up to `wait` for one when there is none yet.
    pub async fn events(
        &self,
        chat: &ChatId,
        after: Revision,
        limit: PageLimit,
        wait: Duration,
    ) -> Result<Arc<EventPage>, ServiceError> {
        let rule = self.live.load().config.hot_chat_rule(chat);
        let decision = if wait.is_zero() {
            self.throttle.check_fetch(chat, rule)
        } else {
            Decisions::bump(&self.throttle.decisions.fetches);
            FetchDecision::Serve {
                keep: Duration::ZERO,
                generation: self.throttle.hot.heat(chat).generation,
            }
        };
        let (keep, generation) = match decision {
            FetchDecision::Throttle { retry_after_secs } => {
                return Err(ServiceError::FetchThrottled { retry_after_secs });
            }
            FetchDecision::Serve { keep, generation } => (keep, generation),
        };
        let deadline = Instant::now() + wait.min(MAX_WAIT);
        let mut refreshed = false;
        let mut missed = false;
        let decisions = &self.throttle.decisions;
        loop {
            // Taken again on every round, so a chat with waiters is never idle
            // in the cache of tails.
            let tail = self.tails.get(chat);
            // Subscribed before reading, so a commit between the read and the
            // wait still wakes this caller.
            let mut moved = tail.subscribe();
            moved.borrow_and_update();
            match tail.read(after.0, limit.get() as usize) {
                // A reader ahead of a log that lost revisions in a
                // failover saw events the writer no longer has: it
                // full-syncs (docs/replicas.md).
                Answer::Events { latest, .. } if after.0 > latest && self.acked.was_reset(chat) => {
                    return Err(ServiceError::RevisionPurged {
                        first_revision: latest + 1,
                    });
                }
                Answer::Events { events, latest } => {
                    let now = Instant::now();
                    if !events.is_empty() || now >= deadline {
                        if !refreshed {
                            Decisions::bump(&decisions.fetches_coalesced);
                        }
                        Decisions::bump(if missed {
                            &decisions.tail_misses
                        } else {
                            &decisions.tail_hits
                        });
                        return Ok(Arc::new(EventPage {
                            events,
                            latest_revision: latest,
                        }));
                    }
                    // Nothing yet: wait for the tail to move (a commit here,
                    // or the refresher finding writes of other instances), or
                    // for the deadline. The refresher keeps a waited-on tail
                    // fresh; waking every few refresh periods is the safety
                    // net for when it cannot (its shard is down). Spread, so
                    // that the waiters of a stream's thousands of chats do
                    // not all wake in the same instant.
                    let safety = self
                        .tails
                        .refresh()
                        .mul_f64(rand::random_range(SAFETY_NAPS / 2.0..SAFETY_NAPS));
                    let nap = (deadline - now).min(safety);
                    {
                        let _waiting = tail.waiting();
                        let _ = tokio::time::timeout(nap, moved.changed()).await;
                    }
                    refreshed = false;
                }
                // The read paths below are boxed: inline, the shard's read
                // machinery would make every waiting caller's future (every
                // stream and long-poll) tens of KiB, waiting or not.
                Answer::Purged { first_revision } => {
                    return Err(ServiceError::RevisionPurged { first_revision });
                }
                Answer::TooOld => {
                    Decisions::bump(&decisions.tail_behind);
                    return Box::pin(self.events_from_log(chat, after, limit, keep, generation))
                        .await;
                }
                Answer::Stale if refreshed => {
                    // Even a refresh cannot vouch: this caller is further
                    // behind than one page.
                    Decisions::bump(&decisions.tail_behind);
                    return Box::pin(self.events_from_log(chat, after, limit, keep, generation))
                        .await;
                }
                Answer::Stale => {
                    Box::pin(tail.refresh(after.0, |from| self.tail_page(chat, from))).await?;
                    refreshed = true;
                    missed = true;
                }
            }
        }
    }

    /// Keeps the tails that have waiters fresh, every `tail.refresh_ms`, until
    /// the service is dropped.
    pub fn spawn_tail_refresher(self: &Arc<Self>) {
        let service = Arc::downgrade(self);
        let every = self.tails.refresh();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(service) = service.upgrade() else {
                    return;
                };
                service.refresh_watched_tails().await;
            }
        });
    }

    /// One round of the tail refresher: per shard, one query reads the latest
    /// revision of every waited-on chat (in chunks of [`REFRESH_CHUNK`]); a
    /// tail that holds it is vouched for, and only a chat whose revision moved
    /// costs a read of its events (shared with its waiters). A shard that
    /// cannot answer is skipped: its waiters check for themselves.
    pub async fn refresh_watched_tails(&self) {
        let mut by_shard: HashMap<&str, Vec<(ChatId, Arc<Tail>)>> = HashMap::new();
        for (chat, tail) in self.tails.watched() {
            by_shard
                .entry(self.shard(&chat).name())
                .or_default()
                .push((chat, tail));
        }
        let rounds = by_shard.into_values().flat_map(|chats| {
            let mut chats = chats;
            let mut chunks = Vec::new();
            while !chats.is_empty() {
                let rest = chats.split_off(chats.len().min(REFRESH_CHUNK));
                chunks.push(std::mem::replace(&mut chats, rest));
            }
            chunks
        });
        futures_util::future::join_all(rounds.map(|chunk| self.refresh_chunk(chunk))).await;
    }

    async fn refresh_chunk(&self, chunk: Vec<(ChatId, Arc<Tail>)>) {
        let Some((first, _)) = chunk.first() else {
            return;
        };
        let ids: Vec<String> = chunk.iter().map(|(chat, _)| chat.to_string()).collect();
        Decisions::bump(&self.throttle.decisions.tail_revision_polls);
        let revisions = self
            .shard(first)
            .read(None, "tail_revisions", move |conn| {
                Box::pin(async move { Ok(chats::revisions(conn, &ids).await?) })
            })
            .await;
        let revisions: HashMap<String, (u64, u64)> = match revisions {
            Ok(r) => r
                .into_iter()
                .map(|(chat, latest, first)| (chat, (latest, first)))
                .collect(),
            Err(e) => {
                tracing::debug!(error = %crate::error::chain(&e), "the tail refresher skipped a shard");
                return;
            }
        };
        // A chat the shard did not list has moved away (its row there is a
        // marker): its tail is refreshed like a moved one, which follows the
        // marker, so its waiters hear of the chat's new writes within a round.
        // The floor is learnt on the way: a purge elsewhere reaches the
        // tails within a round even without its notice.
        let moved = chunk.iter().filter(|(chat, tail)| {
            let Some(&(latest, first)) = revisions.get(chat.as_str()) else {
                return !tail.vouch(u64::MAX);
            };
            tail.floor(first);
            !tail.vouch(latest)
        });
        futures_util::future::join_all(moved.map(|(chat, tail)| async move {
            let from = tail.end().unwrap_or(0);
            let filled = tail.refresh(from, |from| self.tail_page(chat, from)).await;
            if let Err(e) = filled {
                tracing::debug!(error = %crate::error::chain(&e), "the tail refresher could not fill a tail");
            }
        }))
        .await;
    }

    /// A page read from the log: concurrent identical fetches share one query,
    /// and a hot chat's page is kept for `keep` under the chat's generation.
    async fn events_from_log(
        &self,
        chat: &ChatId,
        after: Revision,
        limit: PageLimit,
        keep: Duration,
        generation: u64,
    ) -> Result<Arc<EventPage>, ServiceError> {
        let key = PageKey {
            chat: chat.clone(),
            after: after.0,
            limit: limit.get(),
            generation,
        };
        // Whether this call ran the query, or was served by another's (a
        // concurrent identical fetch, or a kept page).
        let queried = AtomicBool::new(false);
        let page = self
            .pages
            .get_or_load::<ServiceError, _>(key, keep, async {
                queried.store(true, Ordering::Relaxed);
                Decisions::bump(&self.throttle.decisions.fetch_queries);
                let page = self.load_events(chat, after, limit).await?;
                let weight = page
                    .events
                    .iter()
                    .map(|e| 64 + e.text.as_ref().map_or(0, |t| t.len()))
                    .sum::<usize>();
                Ok((page, u32::try_from(weight).unwrap_or(u32::MAX)))
            })
            .await?;
        if !queried.load(Ordering::Relaxed) {
            Decisions::bump(&self.throttle.decisions.fetches_coalesced);
        }
        Ok(page)
    }

    /// What a tail refresh reads: the events after `from` that the purge
    /// kept (a tail behind the floor restarts at it), the latest revision and
    /// the first stored one.
    async fn tail_page(
        &self,
        chat: &ChatId,
        from: u64,
    ) -> Result<(Vec<Event>, u64, u64), ServiceError> {
        Decisions::bump(&self.throttle.decisions.fetch_queries);
        let (page, first_revision) = self
            .read_log(chat, Revision(from), PageLimit::largest())
            .await?;
        let mut events = page.events;
        events.retain(|e| e.revision >= first_revision);
        Ok((events, page.latest_revision, first_revision))
    }

    async fn load_events(
        &self,
        chat: &ChatId,
        after: Revision,
        limit: PageLimit,
    ) -> Result<EventPage, ServiceError> {
        let (page, first_revision) = self.read_log(chat, after, limit).await?;
        // Events below the first stored revision are purged (or going): the
        // reader must full-sync. The purge raises first_revision before it
        // deletes, and the bound is read after the page, so a page read
        // before the raise is refused too, never holed.
        if after.0 + 1 < first_revision {
            return Err(ServiceError::RevisionPurged { first_revision });
        }
        Ok(page)
    }

    /// A page of the log after `after` and the chat's first stored revision
    /// (read after the page). The page may hold events below it (purged, not
    /// yet deleted): the caller decides.
    async fn read_log(
        &self,
        chat: &ChatId,
        after: Revision,
        limit: PageLimit,
    ) -> Result<(EventPage, u64), ServiceError> {
        let n = limit.get();
        self.read_located(chat, "fetch_events", super::ReadAt::Writer, || {
            let (id, owner) = (chat.to_string(), chat.clone());
            move |conn| {
                Box::pin(async move {
                    // Events first, then the revision: the revision read is never
                    // below the last event returned.
                    let rows = events::page(conn, &id, after.0, n).await?;
                    let Some(bounds) = chats::log_bounds(conn, &id).await? else {
                        return Ok(Located::Missing);
                    };
                    if let Some(to) = bounds.moved_to {
                        return Ok(Located::Moved(to));
                    }
                    let latest_revision = bounds.revision;
                    let events = rows
                        .into_iter()
                        .map(|r| Event::from_row(&owner, r))
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(Located::Here((
                        EventPage {
                            events,
                            latest_revision,
                        },
                        bounds.first_revision,
                    )))
                })
            }
        })
        .await
        .map(|read| read.value)
    }
}
