//! The per-chat share of a shard's bulkhead.
//!
//! No chat may hold more than `per_chat_concurrent` of its shard's in-flight
//! slots, nor more than `per_chat_waiting` of its waiting places: a hot chat's
//! excess callers wait for one of the chat's own slots (within the same bounded
//! wait as everyone else) and are refused with `chat_busy` past it, while the
//! other chats of the shard keep the rest of the capacity. Shard-wide pools
//! (Vitess, ProxySQL, resilience4j, Envoy) have no such per-key bound; without
//! it, one celebrity chat fills the pool and every other chat of its shard
//! times out, which is the reference incident.
//!
//! A chat's entry exists only while it has callers: the last one out removes
//! it, so millions of quiet chats cost nothing.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::domain::ChatId;

struct Slots {
    /// Callers of the chat past the share check: in flight plus waiting.
    admitted: Arc<Semaphore>,
    /// Callers of the chat in flight on the shard.
    running: Arc<Semaphore>,
}

/// Per-chat slot accounting of one shard.
pub struct ChatShares {
    per_chat: usize,
    per_chat_admitted: usize,
    chats: DashMap<ChatId, Arc<Slots>>,
}

/// Why a chat's caller was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChatBusy;

/// A chat's slot, held for the duration of one operation.
pub struct ChatSlot {
    owner: Arc<ChatShares>,
    chat: ChatId,
    slots: Option<Arc<Slots>>,
    admitted: Option<OwnedSemaphorePermit>,
    running: Option<OwnedSemaphorePermit>,
}

impl Drop for ChatSlot {
    fn drop(&mut self) {
        self.running.take();
        self.admitted.take();
        self.slots.take();
        // The map holds the only other reference while no caller of the chat is
        // left; `remove_if` runs under the map's lock, so no caller can pick the
        // entry up meanwhile.
        self.owner
            .chats
            .remove_if(&self.chat, |_, slots| Arc::strong_count(slots) == 1);
    }
}

impl ChatShares {
    pub fn new(per_chat: usize, per_chat_waiting: usize) -> Arc<Self> {
        Arc::new(Self {
            per_chat,
            per_chat_admitted: per_chat + per_chat_waiting,
            chats: DashMap::new(),
        })
    }

    /// Takes one of the chat's slots, waiting at most `wait`.
    pub async fn acquire(
        self: &Arc<Self>,
        chat: &ChatId,
        wait: Duration,
    ) -> Result<ChatSlot, ChatBusy> {
        let slots = self
            .chats
            .entry(chat.clone())
            .or_insert_with(|| {
                Arc::new(Slots {
                    admitted: Arc::new(Semaphore::new(self.per_chat_admitted)),
                    running: Arc::new(Semaphore::new(self.per_chat)),
                })
            })
            .clone();
        // The guard exists from here on, so every exit path cleans the entry up.
        let mut slot = ChatSlot {
            owner: self.clone(),
            chat: chat.clone(),
            slots: Some(slots.clone()),
            admitted: None,
            running: None,
        };
        slot.admitted = Some(
            slots
                .admitted
                .clone()
                .try_acquire_owned()
                .map_err(|_| ChatBusy)?,
        );
        let running = tokio::time::timeout(wait, slots.running.clone().acquire_owned())
            .await
            .map_err(|_| ChatBusy)?
            .map_err(|_| ChatBusy)?;
        slot.running = Some(running);
        Ok(slot)
    }

    /// Chats with callers right now.
    #[cfg(test)]
    fn active_chats(&self) -> usize {
        self.chats.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(s: &str) -> ChatId {
        ChatId::parse(s).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_chat_gets_its_share_then_waits_then_is_refused() {
        let shares = ChatShares::new(2, 1);
        let hot = chat("hot");
        let a = shares
            .acquire(&hot, Duration::from_millis(50))
            .await
            .unwrap();
        let _b = shares
            .acquire(&hot, Duration::from_millis(50))
            .await
            .unwrap();
        // Third caller: admitted (one waiting place) but no slot within the wait.
        assert!(
            shares
                .acquire(&hot, Duration::from_millis(50))
                .await
                .is_err()
        );
        // A waiter takes the slot freed during its wait.
        let waiter = tokio::spawn({
            let (shares, hot) = (shares.clone(), hot.clone());
            async move { shares.acquire(&hot, Duration::from_secs(1)).await.is_ok() }
        });
        tokio::task::yield_now().await;
        // With the waiter waiting, the waiting place is full: refused at once.
        assert!(shares.acquire(&hot, Duration::from_secs(1)).await.is_err());
        drop(a);
        assert!(waiter.await.unwrap());
        // Another chat is not affected at all.
        assert!(shares.acquire(&chat("other"), Duration::ZERO).await.is_ok());
    }

    #[tokio::test]
    async fn entries_go_away_with_their_last_caller() {
        let shares = ChatShares::new(1, 0);
        for i in 0..100 {
            let _slot = shares
                .acquire(&chat(&format!("c{i}")), Duration::ZERO)
                .await
                .unwrap();
        }
        assert_eq!(shares.active_chats(), 0);
        let held = shares.acquire(&chat("x"), Duration::ZERO).await.unwrap();
        assert!(shares.acquire(&chat("x"), Duration::ZERO).await.is_err());
        assert_eq!(shares.active_chats(), 1);
        drop(held);
        assert_eq!(shares.active_chats(), 0);
    }
}
