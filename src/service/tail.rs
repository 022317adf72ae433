//! The tail of a chat's event log, kept in memory on this instance for the
//! chats that have readers, so that polls and long-polls of a hot chat cost
//! its shard a bounded number of reads instead of one per poll.
//!
//! - A tail holds the chat's most recent events, contiguous in revision, up to
//!   `tail.events_per_chat` of them, and the latest revision known.
//! - A batch this instance commits appends its events straight from the
//!   batch's outcome: no read. A batch that does not follow on from the tail
//!   (another instance wrote in between) restarts the tail at that batch, so
//!   the tail never has a gap.
//! - What the tail cannot vouch for (writes of other instances, before any
//!   notice of them exists) is refreshed by one read of what follows the tail,
//!   shared by every caller of the chat, at most once per `tail.refresh_ms`.
//! - Tails with waiters (long-polls, streams) are kept fresh by the service's
//!   tail refresher: every `tail.refresh_ms` one query per shard reads the
//!   latest revision of all of them, and only a chat whose revision moved
//!   costs a read of its events. A quiet chat followed by many streams costs
//!   its shard nothing but its share of that one query.
//! - Waiters are woken when the latest known revision moves.
//! - A tail knows its chat's floor, the first revision the purge kept (from
//!   the purge itself on this instance, from another instance's purge notice,
//!   and from every read that refreshes it): the events below it are dropped,
//!   and a read below it is answered [`Answer::Purged`], as the log answers
//!   it, so no instance serves from memory what the log no longer holds.
//! - Tails are created by readers and dropped when nobody read them for a
//!   minute, and their number is bounded (`tail.chats`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use moka::sync::Cache;
use tokio::sync::watch;

use super::Event;
use crate::domain::ChatId;

/// How many chats keep a tail, and how much of it.
#[derive(Debug, Clone)]
pub struct TailSettings {
    /// Chats with a tail at once.
    pub chats: u64,
    /// Events kept per chat.
    pub events_per_chat: usize,
    /// Bytes all tails may hold together (estimated, see [`weight`]).
    pub max_bytes: u64,
    /// How long what the tail knows is trusted before one read refreshes it
    /// (the longest a write of another instance stays unseen here).
    pub refresh: Duration,
}

/// Told when a chat gains or loses its tail here (the fleet follows the
/// notices of exactly those chats); defined where the fleet is, which the
/// service depends on.
pub use crate::fleet::TailObserver;

/// The tails of this instance.
pub struct Tails {
    cache: Cache<ChatId, Arc<Tail>>,
    observer: Option<Arc<dyn TailObserver>>,
    settings: TailSettings,
    /// The bytes all tails hold together.
    budget: Arc<Budget>,
}

/// The bytes held by every tail, against their limit.
#[derive(Debug)]
struct Budget {
    used: AtomicU64,
    max: u64,
}

/// What an event held in a tail costs, estimated: the event with its strings,
/// and its JSON for streams once made.
fn weight(event: &Event) -> u64 {
    let strings = event.user_id.len() + event.text.as_ref().map_or(0, |t| t.len());
    (160 + 2 * strings) as u64
}

impl Tails {
    pub fn new(settings: TailSettings) -> Self {
        Self::observed(settings, None)
    }

    /// [`Tails::new`], telling `observer` of every tail made and dropped.
    pub fn observed(settings: TailSettings, observer: Option<Arc<dyn TailObserver>>) -> Self {
        let budget = Arc::new(Budget {
            used: AtomicU64::new(0),
            max: settings.max_bytes,
        });
        let released = budget.clone();
        let told = observer.clone();
        Self {
            cache: Cache::builder()
                .max_capacity(settings.chats)
                .time_to_idle(Duration::from_secs(60))
                // An evicted tail gives its bytes back (readers that still
                // hold it finish with it; it takes no more appends).
                .eviction_listener(move |chat: Arc<ChatId>, tail: Arc<Tail>, _| {
                    tail.release(&released);
                    if let Some(observer) = &told {
                        observer.closed(&chat);
                    }
                })
                .build(),
            observer,
            settings,
            budget,
        }
    }

    /// The bytes all tails hold now (estimated).
    pub fn bytes(&self) -> u64 {
        self.budget.used.load(Ordering::Relaxed)
    }

    /// The chat's tail, created empty if it has none.
    pub fn get(&self, chat: &ChatId) -> Arc<Tail> {
        self.cache.get_with_by_ref(chat, || {
            if let Some(observer) = &self.observer {
                observer.opened(chat);
            }
            Arc::new(Tail::new(
                self.settings.events_per_chat,
                self.settings.refresh,
                self.budget.clone(),
            ))
        })
    }

    /// The tails that have waiters now.
    pub fn watched(&self) -> Vec<(ChatId, Arc<Tail>)> {
        self.cache
            .iter()
            .filter(|(_, tail)| tail.waiting.load(Ordering::Acquire) > 0)
            .map(|(chat, tail)| (ChatId::clone(&chat), tail))
            .collect()
    }

    /// Feeds a committed batch to the chat's tail, if it has one: a batch this
    /// instance committed, or one another instance's notice carried (a batch
    /// that does not follow on restarts the tail).
    pub fn committed(&self, chat: &ChatId, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        if let Some(tail) = self.cache.get(chat) {
            tail.append(events, None);
        }
    }

    /// Told by a notice without its events that the chat reached `last`: see
    /// [`Tail::learn`].
    pub fn learn(&self, chat: &ChatId, last: u64) {
        if let Some(tail) = self.cache.get(chat) {
            tail.learn(last);
        }
    }

    /// Told that the chat's events below `first_revision` were purged (by
    /// this instance, or by another one's notice): see [`Tail::floor`].
    pub fn purged(&self, chat: &ChatId, first_revision: u64) {
        if let Some(tail) = self.cache.get(chat) {
            tail.floor(first_revision);
        }
    }

    /// Drops the chat's tail (its log lost revisions in a failover): its
    /// waiters are woken and read a new one.
    pub fn forget(&self, chat: &ChatId) {
        if let Some(tail) = self.cache.get(chat) {
            self.cache.invalidate(chat);
            tail.latest.send_modify(|_| {});
        }
    }

    /// Distrusts every tail: after notices may have been lost (Redis was
    /// away), each tail is read again before it answers, and its waiters are
    /// woken to read it now (one read per tail, shared by its waiters).
    pub fn distrust_all(&self) {
        for (_, tail) in self.cache.iter() {
            tail.state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .refreshed = None;
            tail.latest.send_modify(|_| {});
        }
    }

    /// How long a tail is trusted before it is refreshed.
    pub fn refresh(&self) -> Duration {
        self.settings.refresh
    }

    /// Chats with a tail now.
    pub fn len(&self) -> u64 {
        self.cache.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One chat's tail.
pub struct Tail {
    state: Mutex<State>,
    /// The latest revision known; waiters watch it.
    latest: watch::Sender<u64>,
    /// Held by the one caller that refreshes the tail; the others wait for it
    /// and then find the tail fresh.
    fill: tokio::sync::Mutex<()>,
    capacity: usize,
    refresh: Duration,
    /// Callers waiting for the tail to move.
    waiting: AtomicUsize,
    /// The bytes of every tail, this one's included.
    budget: Arc<Budget>,
}

/// One caller waiting on a tail; dropping it ends the wait.
pub struct Waiting<'a>(&'a Tail);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Default)]
struct State {
    /// Contiguous revisions, oldest first.
    events: VecDeque<Event>,
    /// The revision the ring starts after: it holds `(base, base + len]`.
    base: u64,
    /// Whether `base` is known at all (a fresh tail knows nothing).
    known: bool,
    /// When the tail last matched the log (a read, or a local commit seen
    /// while fresh).
    refreshed: Option<Instant>,
    /// The bytes of `events` (see [`weight`]).
    bytes: u64,
    /// Evicted from the cache: its bytes were given back.
    released: bool,
    /// The chat's first stored revision as last known (0 or 1: nothing
    /// purged): the events below it are purged, and never served.
    first: u64,
}

/// What a tail can say about the events after a revision.
#[derive(Debug)]
pub enum Answer {
    /// The events after it (at most the limit asked), and the latest revision.
    Events { events: Vec<Event>, latest: u64 },
    /// The revision is older than what the tail holds: read the log.
    TooOld,
    /// The events after the revision were purged: the chat's first stored
    /// revision is given (the reader must full-sync, 410 `revision_purged`).
    Purged { first_revision: u64 },
    /// The tail knows nothing recent enough to vouch for: refresh it first.
    Stale,
}

impl Tail {
    fn new(capacity: usize, refresh: Duration, budget: Arc<Budget>) -> Self {
        Self {
            state: Mutex::new(State::default()),
            latest: watch::channel(0).0,
            fill: tokio::sync::Mutex::new(()),
            capacity,
            refresh,
            waiting: AtomicUsize::new(0),
            budget,
        }
    }

    /// Gives the tail's bytes back to the budget (on eviction).
    fn release(&self, budget: &Budget) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if !state.released {
            budget.used.fetch_sub(state.bytes, Ordering::Relaxed);
            state.bytes = 0;
            state.released = true;
        }
    }

    /// Whether what the tail learnt at `at` is still trusted: for one refresh
    /// period, and half of one more so that a refresher round that runs late
    /// does not send readers to the shard.
    fn trusted(&self, at: Instant) -> bool {
        at.elapsed() < self.refresh + self.refresh / 2
    }

    /// Counts the caller as a waiter until the guard is dropped (waited-on
    /// tails are kept fresh by the refresher).
    pub fn waiting(&self) -> Waiting<'_> {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        Waiting(self)
    }

    /// Told that the chat's events below `first_revision` are purged: the tail
    /// drops the ones it holds and answers reads below the floor with
    /// [`Answer::Purged`]. The floor only rises.
    pub fn floor(&self, first_revision: u64) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if first_revision <= state.first {
            return;
        }
        state.first = first_revision;
        if !state.known {
            return;
        }
        let end = state.base + state.events.len() as u64;
        let mut freed = 0;
        while state.base + 1 < first_revision {
            let Some(oldest) = state.events.pop_front() else {
                break;
            };
            state.base += 1;
            freed += weight(&oldest);
        }
        if state.base + 1 < first_revision {
            // The tail ended below the floor: it was behind, and what it
            // lacks up to the floor is gone. It starts at the floor, stale.
            state.base = first_revision - 1;
            if state.base > end {
                state.refreshed = None;
            }
        }
        if !state.released {
            state.bytes -= freed;
            self.budget.used.fetch_sub(freed, Ordering::Relaxed);
        }
    }

    /// Told by the refresher that the chat's latest revision was `latest`
    /// when it looked: if the tail holds up to it (or beyond: commits of this
    /// instance since), it is fresh again and `true` is returned; otherwise it
    /// is stale (a refresh reads what it lacks).
    pub fn vouch(&self, latest: u64) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let end = state.base + state.events.len() as u64;
        if state.known && end >= latest {
            state.refreshed = Some(Instant::now());
            true
        } else {
            state.refreshed = None;
            false
        }
    }

    /// Told (by another instance's notice) that the chat's log reached
    /// `last`: a tail that holds it stays as it is; one that does not is
    /// stale, and its waiters are woken to read what it lacks (one read,
    /// shared).
    pub fn learn(&self, last: u64) {
        {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let end = state.base + state.events.len() as u64;
            if state.known && end >= last {
                return;
            }
            state.refreshed = None;
        }
        self.latest.send_if_modified(|latest| {
            let moved = last > *latest;
            *latest = (*latest).max(last);
            moved
        });
    }

    /// The revision the tail holds up to, if it knows one.
    pub fn end(&self) -> Option<u64> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.known.then(|| state.base + state.events.len() as u64)
    }

    /// The events after `after`, if the tail can vouch for them.
    pub fn read(&self, after: u64, limit: usize) -> Answer {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = state.refreshed.is_some_and(|at| self.trusted(at));
        if !state.known || !fresh {
            return Answer::Stale;
        }
        let end = state.base + state.events.len() as u64;
        if after + 1 < state.first {
            return Answer::Purged {
                first_revision: state.first,
            };
        }
        if after < state.base {
            return Answer::TooOld;
        }
        let skip = (after.min(end) - state.base) as usize;
        Answer::Events {
            events: state
                .events
                .iter()
                .skip(skip)
                .take(limit)
                .cloned()
                .collect(),
            latest: end,
        }
    }

    /// A receiver that changes when the latest known revision moves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }

    /// Appends events that follow on from what the tail holds; a batch that
    /// does not restarts the tail at it. `read` says whether the events come
    /// from a read of the log that reached its end at `latest` (which makes the
    /// tail fresh); a local commit only keeps an already fresh tail fresh.
    fn append(&self, events: &[Event], read: Option<u64>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let end = state.base + state.events.len() as u64;
        let bytes = |events: &[Event]| events.iter().map(weight).sum::<u64>();
        // The bytes the ring holds once the events are in.
        let held = match events.first() {
            Some(first) if !state.known || first.revision != end + 1 => {
                if first.revision <= end && state.known {
                    // Already held (a read that overlaps a local commit).
                    let skip = (end + 1 - first.revision) as usize;
                    let rest = events.get(skip..).unwrap_or_default();
                    state.events.extend(rest.iter().cloned());
                    state.bytes + bytes(rest)
                } else {
                    // A gap: another instance wrote in between. Restart here.
                    state.events.clear();
                    state.events.extend(events.iter().cloned());
                    state.base = first.revision - 1;
                    state.known = true;
                    if read.is_none() {
                        // The tail no longer matches the log before this batch.
                        state.refreshed = None;
                    }
                    bytes(events)
                }
            }
            Some(_) => {
                state.events.extend(events.iter().cloned());
                state.bytes + bytes(events)
            }
            None => state.bytes,
        };
        if let Some(latest) = read {
            if events.is_empty() && !state.known {
                // A fresh tail, and nothing after what its reader has.
                state.base = latest;
                state.known = true;
            }
            state.refreshed = Some(Instant::now());
        }
        // What the ring holds now, against the budget shared by every tail:
        // over it, this (appending) tail drops its oldest events first, down
        // to one.
        if !state.released {
            let before = state.bytes;
            state.bytes = held;
            if held >= before {
                self.budget.used.fetch_add(held - before, Ordering::Relaxed);
            } else {
                self.budget.used.fetch_sub(before - held, Ordering::Relaxed);
            }
        }
        while state.events.len() > self.capacity
            || (state.events.len() > 1
                && !state.released
                && self.budget.used.load(Ordering::Relaxed) > self.budget.max)
        {
            let Some(oldest) = state.events.pop_front() else {
                break;
            };
            state.base += 1;
            if !state.released {
                let w = weight(&oldest);
                state.bytes -= w;
                self.budget.used.fetch_sub(w, Ordering::Relaxed);
            }
        }
        let end = state.base + state.events.len() as u64;
        drop(state);
        self.latest.send_if_modified(|latest| {
            let moved = end > *latest;
            *latest = (*latest).max(end);
            moved
        });
    }

    /// Refreshes the tail with one `read(after)` of what follows it (or of
    /// what follows `from` when the tail knows nothing), unless another caller
    /// refreshed it meanwhile. `read` returns the events after a revision
    /// (oldest first, one page; none below the floor), the chat's latest
    /// revision and its first stored revision (the floor). A page that
    /// does not reach the latest revision leaves the tail stale: its readers
    /// are too far behind for it and read the log.
    pub async fn refresh<F, Fut, E>(&self, from: u64, read: F) -> Result<(), E>
    where
        F: FnOnce(u64) -> Fut,
        Fut: std::future::Future<Output = Result<(Vec<Event>, u64, u64), E>>,
    {
        let _one = self.fill.lock().await;
        let after = {
            let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let fresh = state.refreshed.is_some_and(|at| self.trusted(at));
            if state.known && fresh {
                return Ok(());
            }
            if state.known {
                state.base + state.events.len() as u64
            } else {
                from
            }
        };
        let (events, latest, first_revision) = read(after).await?;
        self.floor(first_revision);
        if events.last().map_or(after, |e| e.revision) >= latest {
            self.append(&events, Some(latest));
        }
        Ok(())
    }
}

/// The fleet's notices reach the tails through this trait, so the fleet
/// does not depend on the service.
impl crate::fleet::NoticeSink for Tails {
    fn committed(&self, chat: &ChatId, events: &[Event]) {
        Tails::committed(self, chat, events);
    }

    fn learn(&self, chat: &ChatId, last: u64) {
        Tails::learn(self, chat, last);
    }

    fn purged(&self, chat: &ChatId, first_revision: u64) {
        Tails::purged(self, chat, first_revision);
    }

    fn distrust_all(&self) {
        Tails::distrust_all(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::EventType;

    fn ev(revision: u64) -> Event {
        Event {
            revision,
            kind: EventType::MemberJoined,
            user_id: format!("u{revision}").into(),
            message_id: None,
            text: None,
            created_at: chrono::Utc::now(),
            encoded: Default::default(),
        }
    }

    fn tail(capacity: usize) -> Tail {
        Tail::new(capacity, Duration::from_secs(60), budget(u64::MAX))
    }

    fn budget(max: u64) -> Arc<Budget> {
        Arc::new(Budget {
            used: AtomicU64::new(0),
            max,
        })
    }

    #[test]
    fn the_tails_share_a_byte_budget_and_the_appending_one_gives_way() {
        let shared = budget(10 * weight(&ev(1)));
        let quiet = Tail::new(100, Duration::from_secs(60), shared.clone());
        let hot = Tail::new(100, Duration::from_secs(60), shared.clone());
        quiet.append(&(1..=6).map(ev).collect::<Vec<_>>(), Some(6));
        hot.append(&(1..=6).map(ev).collect::<Vec<_>>(), Some(6));
        // Twelve events for a budget of ten: the tail that appended last
        // dropped its two oldest; the other kept all of its.
        assert_eq!(shared.used.load(Ordering::Relaxed), 10 * weight(&ev(1)));
        assert!(matches!(hot.read(0, 100), Answer::TooOld));
        assert_eq!(revisions(hot.read(2, 100)), [3, 4, 5, 6]);
        assert_eq!(revisions(quiet.read(0, 100)).len(), 6);
        // An evicted tail gives its bytes back.
        quiet.release(&shared);
        assert_eq!(shared.used.load(Ordering::Relaxed), 4 * weight(&ev(1)));
    }

    fn revisions(answer: Answer) -> Vec<u64> {
        match answer {
            Answer::Events { events, .. } => events.iter().map(|e| e.revision).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_fresh_tail_is_filled_once_then_fed_by_commits() -> crate::TestResult {
        let t = tail(4);
        assert!(matches!(t.read(0, 10), Answer::Stale));
        t.refresh(0, |after| async move {
            assert_eq!(after, 0);
            Ok::<_, ()>(((1..=2).map(ev).collect(), 2, 1))
        })
        .await
        .map_err(|()| "read")?;
        assert_eq!(revisions(t.read(0, 10)), [1, 2]);
        t.append(&[ev(3), ev(4), ev(5)], None);
        // Bounded: the oldest fell out, and asking for it means the log.
        assert_eq!(revisions(t.read(1, 10)), [2, 3, 4, 5]);
        assert!(matches!(t.read(0, 10), Answer::TooOld));
        assert_eq!(revisions(t.read(5, 10)), Vec::<u64>::new());
        assert_eq!(*t.subscribe().borrow(), 5);
        Ok(())
    }

    #[test]
    fn the_refresher_vouches_for_a_tail_that_holds_the_latest_revision() {
        let t = tail(10);
        assert!(
            !t.vouch(0),
            "a tail that knows nothing cannot be vouched for"
        );
        t.append(&[ev(1), ev(2)], Some(2));
        assert!(t.vouch(2));
        assert!(matches!(t.read(2, 10), Answer::Events { .. }));
        // Looked before a commit of this instance landed in the tail.
        assert!(t.vouch(1));
        // Another instance wrote revision 3: stale until read.
        assert!(!t.vouch(3));
        assert!(matches!(t.read(2, 10), Answer::Stale));
        assert_eq!(t.end(), Some(2));
    }

    #[test]
    fn a_purge_raises_the_floor_and_reads_below_it_are_purged() {
        let shared = budget(u64::MAX);
        let t = Tail::new(100, Duration::from_secs(60), shared.clone());
        t.append(&(1..=10).map(ev).collect::<Vec<_>>(), Some(10));
        assert_eq!(revisions(t.read(0, 100)).len(), 10);
        t.floor(7);
        // Below the floor: purged, as the log says; from it on: served.
        assert!(matches!(
            t.read(0, 100),
            Answer::Purged { first_revision: 7 }
        ));
        assert!(matches!(
            t.read(5, 100),
            Answer::Purged { first_revision: 7 }
        ));
        assert_eq!(revisions(t.read(6, 100)), [7, 8, 9, 10]);
        let kept: u64 = (7..=10).map(|r| weight(&ev(r))).sum();
        assert_eq!(shared.used.load(Ordering::Relaxed), kept);
        // The floor never goes down.
        t.floor(3);
        assert!(matches!(
            t.read(4, 100),
            Answer::Purged { first_revision: 7 }
        ));
        // A tail behind the floor starts at it, and is stale.
        let behind = tail(100);
        behind.append(&[ev(1), ev(2)], Some(2));
        behind.floor(6);
        assert_eq!(behind.end(), Some(5));
        assert!(matches!(behind.read(5, 100), Answer::Stale));
    }

    #[tokio::test]
    async fn a_refresh_learns_the_floor() -> crate::TestResult {
        let t = tail(10);
        t.refresh(0, |_| async move {
            Ok::<_, ()>(((4..=6).map(ev).collect(), 6, 4))
        })
        .await
        .map_err(|()| "read")?;
        assert!(matches!(
            t.read(0, 10),
            Answer::Purged { first_revision: 4 }
        ));
        assert_eq!(revisions(t.read(3, 10)), [4, 5, 6]);
        Ok(())
    }

    #[test]
    fn a_batch_after_a_gap_restarts_the_tail_and_makes_it_stale() {
        let t = tail(10);
        t.append(&[ev(1), ev(2)], Some(2));
        // Revisions 3..=4 were written elsewhere.
        t.append(&[ev(5)], None);
        assert!(matches!(t.read(2, 10), Answer::Stale));
    }
}
