//! The places of the event streams open on this instance: one per stream
//! (per-chat or multiplexed) and one per chat subscription a stream holds.
//!
//! - A place is an RAII token ([`StreamSlot`], [`ChatSlot`]): whoever holds it
//!   holds the place, and dropping it frees the place. The counts never drift,
//!   whatever way a stream ends.
//! - Past `streams.maxSubscribers` streams on the instance or
//!   `streams.maxPerChat` subscriptions of one chat, a place is refused with
//!   the [`Limit`] that refused it; nothing is taken then.
//! - It knows no status codes and counts no metrics: the HTTP layer turns a
//!   refusal into its answer and reads the counts for the gauges.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

use crate::domain::ChatId;

/// The open streams of this instance, in total, and the chat subscriptions
/// they hold (a per-chat stream holds one; a multiplexed stream one per chat).
#[derive(Debug, Default)]
pub struct Subscribers {
    total: AtomicU64,
    subscriptions: AtomicU64,
    per_chat: DashMap<ChatId, u64>,
}

/// One open stream's place; dropping it frees the place.
pub struct StreamSlot {
    registry: Arc<Subscribers>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.registry.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One chat subscription's place; dropping it frees the place.
pub struct ChatSlot {
    registry: Arc<Subscribers>,
    chat: ChatId,
}

impl Drop for ChatSlot {
    fn drop(&mut self) {
        self.registry.subscriptions.fetch_sub(1, Ordering::AcqRel);
        self.registry.per_chat.remove_if_mut(&self.chat, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

/// Which limit refused a stream or a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Instance,
    Chat,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Instance => "instance",
            Self::Chat => "chat",
        }
    }
}

impl Subscribers {
    /// Open streams now.
    pub fn open(&self) -> u64 {
        self.total.load(Ordering::Acquire)
    }

    /// Chat subscriptions now.
    pub fn subscriptions(&self) -> u64 {
        self.subscriptions.load(Ordering::Acquire)
    }

    /// Takes a place for one more stream, at most `max_total` on the instance.
    pub fn take_stream(self: &Arc<Self>, max_total: u64) -> Result<StreamSlot, Limit> {
        let total = self.total.fetch_add(1, Ordering::AcqRel) + 1;
        if total > max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Limit::Instance);
        }
        Ok(StreamSlot {
            registry: self.clone(),
        })
    }

    /// Takes a place for one more subscription of `chat`, at most
    /// `max_per_chat` on the instance.
    pub fn take_chat(
        self: &Arc<Self>,
        chat: &ChatId,
        max_per_chat: u64,
    ) -> Result<ChatSlot, Limit> {
        let mut n = self.per_chat.entry(chat.clone()).or_insert(0);
        if *n >= max_per_chat {
            drop(n);
            // Do not leave an entry behind for a chat nobody holds.
            self.per_chat.remove_if(chat, |_, n| *n == 0);
            return Err(Limit::Chat);
        }
        *n += 1;
        self.subscriptions.fetch_add(1, Ordering::AcqRel);
        Ok(ChatSlot {
            registry: self.clone(),
            chat: chat.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_bounded_and_freed_by_dropping_them() -> crate::TestResult {
        let registry = Arc::new(Subscribers::default());
        let chat = ChatId::parse("general")?;
        let one = registry.take_stream(2).map_err(Limit::as_str)?;
        let _two = registry.take_stream(2).map_err(Limit::as_str)?;
        assert_eq!(registry.take_stream(2).err(), Some(Limit::Instance));
        drop(one);
        assert_eq!(registry.open(), 1);
        let a = registry.take_chat(&chat, 1).map_err(Limit::as_str)?;
        assert_eq!(registry.take_chat(&chat, 1).err(), Some(Limit::Chat));
        assert_eq!(registry.subscriptions(), 1);
        drop(a);
        assert_eq!(registry.subscriptions(), 0);
        assert!(registry.per_chat.is_empty(), "no entry is left behind");
        Ok(())
    }
}
