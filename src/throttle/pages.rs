//! Fetch coalescing: concurrent identical event fetches share one query.
//!
//! A fetch is identified by `(chat, after, limit)` plus the chat's write
//! generation on this instance. Concurrent fetches with the same key wait for
//! one load (moka's `try_get_with`); its result is kept for the `ttl` the caller
//! gives: nothing for an ordinary chat, `cacheMillis` for a hot one. A write on
//! this instance advances the chat's generation, so a kept page is never
//! served after a write this instance made; a page is one query's result, so it
//! never has a gap, and a client that polls with its last revision gets what a
//! kept page missed on its next poll.
//!
//! Bounded by bytes (`throttle.page_cache_bytes`): a 500-event page of long
//! texts is megabytes.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;

use crate::domain::ChatId;

/// What identifies a fetch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PageKey {
    pub chat: ChatId,
    pub after: u64,
    pub limit: u32,
    pub generation: u64,
}

#[derive(Debug)]
struct Entry<V> {
    value: Arc<V>,
    ttl: Duration,
    weight: u32,
}

impl<V> Clone for Entry<V> {
    fn clone(&self) -> Self {
        Self {
            value: self.value.clone(),
            ttl: self.ttl,
            weight: self.weight,
        }
    }
}

struct PerEntryTtl;

impl<V> Expiry<PageKey, Entry<V>> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &PageKey,
        value: &Entry<V>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// Coalesced (and, for hot chats, briefly kept) pages.
pub struct Pages<V> {
    cache: Cache<PageKey, Entry<V>>,
}

impl<V: Send + Sync + 'static> Pages<V> {
    pub fn new(max_bytes: u64) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_k, e: &Entry<V>| e.weight)
                .expire_after(PerEntryTtl)
                .build(),
        }
    }

    /// The page for `key`: a kept one, the one a concurrent caller is loading,
    /// or a new load. `load` returns the page and its approximate size.
    pub async fn get_or_load<E, F>(&self, key: PageKey, ttl: Duration, load: F) -> Result<Arc<V>, E>
    where
        F: Future<Output = Result<(V, u32), E>>,
        E: Clone + Send + Sync + 'static,
    {
        self.cache
            .try_get_with(key, async {
                load.await.map(|(value, weight)| Entry {
                    value: Arc::new(value),
                    ttl,
                    weight,
                })
            })
            .await
            .map(|e| e.value)
            .map_err(|e| (*e).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn key(generation: u64) -> PageKey {
        PageKey {
            chat: ChatId::parse("c").unwrap(),
            after: 0,
            limit: 100,
            generation,
        }
    }

    /// On a paused clock the runtime moves time only once every task waits:
    /// the load's one-second query ends after all 100 callers have asked.
    #[tokio::test(start_paused = true)]
    async fn concurrent_identical_fetches_share_one_load() {
        let pages: Arc<Pages<u64>> = Arc::new(Pages::new(1 << 20));
        let loads = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let (pages, loads) = (pages.clone(), loads.clone());
                tokio::spawn(async move {
                    pages
                        .get_or_load(key(0), Duration::ZERO, async {
                            loads.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            Ok::<_, ()>((7, 1))
                        })
                        .await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(*t.await.unwrap().unwrap(), 7);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn kept_pages_serve_until_the_generation_moves() {
        let pages: Pages<u64> = Pages::new(1 << 20);
        let loads = AtomicU64::new(0);
        let load = || async {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>((1, 1))
        };
        let ttl = Duration::from_secs(60);
        pages.get_or_load(key(0), ttl, load()).await.unwrap();
        pages.get_or_load(key(0), ttl, load()).await.unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        pages.get_or_load(key(1), ttl, load()).await.unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 2);
        // Without a ttl nothing is kept.
        pages
            .get_or_load(key(2), Duration::ZERO, load())
            .await
            .unwrap();
        pages
            .get_or_load(key(2), Duration::ZERO, load())
            .await
            .unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 4);
    }
}
