//! Event fetches: `GET /v1/chats/{chatId}/events`.
//!
//! A hot chat's fetches may be throttled (the decision is the throttle's, see
//! `throttle::fetch`); concurrent identical fetches share one query, and a hot
//! chat's pages are kept for `cacheMillis` or until this instance writes to the
//! chat.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{ChatService, Event, EventPage, ServiceError};
use crate::domain::{ChatId, PageLimit, Revision};
use crate::storage::{chats, events};
use crate::throttle::Decisions;
use crate::throttle::fetch::FetchDecision;
use crate::throttle::pages::PageKey;

impl ChatService {
    /// Events after `after`, oldest first, with the chat's latest revision.
    pub async fn events(
        &self,
        chat: &ChatId,
        after: Revision,
        limit: PageLimit,
    ) -> Result<Arc<EventPage>, ServiceError> {
        let rule = self.live.load().config.hot_chat_rule(chat);
        let (keep, generation) = match self.throttle.check_fetch(chat, rule) {
            FetchDecision::Throttle { retry_after_secs } => {
                return Err(ServiceError::FetchThrottled { retry_after_secs });
            }
            FetchDecision::Serve { keep, generation } => (keep, generation),
        };
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
                    .map(|e| 64 + e.text.as_ref().map_or(0, String::len))
                    .sum::<usize>();
                Ok((page, u32::try_from(weight).unwrap_or(u32::MAX)))
            })
            .await?;
        if !queried.load(Ordering::Relaxed) {
            Decisions::bump(&self.throttle.decisions.fetches_coalesced);
        }
        Ok(page)
    }

    async fn load_events(
        &self,
        chat: &ChatId,
        after: Revision,
        limit: PageLimit,
    ) -> Result<EventPage, ServiceError> {
        let (id, owner) = (chat.to_string(), chat.clone());
        let n = limit.get();
        self.shard(chat)
            .read(Some(chat), "fetch_events", move |conn| {
                Box::pin(async move {
                    // Events first, then the revision: the revision read is never
                    // below the last event returned.
                    let rows = events::page(conn, &id, after.0, n).await?;
                    let Some(latest_revision) = chats::revision(conn, &id).await? else {
                        return Ok(None);
                    };
                    let events = rows
                        .into_iter()
                        .map(|r| Event::from_row(&owner, r))
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(Some(EventPage {
                        events,
                        latest_revision,
                    }))
                })
            })
            .await?
            .ok_or(ServiceError::ChatNotFound)
    }
}
