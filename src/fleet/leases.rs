//! The global join limit of a chat, shared by every instance: a GCRA (generic
//! cell rate algorithm) bucket per chat in Redis, drawn on in leases.
//!
//! The bucket allows `limit` joins per `windowSeconds` fleet-wide, `limit` of
//! them at once after a quiet spell. An instance never asks Redis about a
//! single join: it admits from a local lease of tokens and asks for the next
//! lease in the background when half of it is gone, so a join waits for no
//! network hop. An ordinary chat never holds a lease: its first admissions on
//! an instance are free, and only charged to the bucket with the next lease
//! request, once they reach half a lease. So an instance admits at most one
//! lease beyond what the bucket granted it, and the fleet at most one lease per
//! instance beyond the limit.
//!
//! The bucket's time is Redis's (`TIME`), so instance clocks do not matter.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use moka::sync::Cache;

use crate::domain::ChatId;

/// `KEYS[1]` the chat's bucket; `ARGV`: emission interval (µs per join),
/// burst tolerance (µs), joins to charge unconditionally (already admitted),
/// joins wanted. Returns `{granted, milliseconds until one more is free}`.
pub const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local charge = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
tat = tat + charge * interval
local room = math.floor((now + tau - tat) / interval)
local grant = math.max(0, math.min(want, room))
tat = tat + grant * interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
local wait = 0
if grant < want then wait = math.max(0, tat + interval - tau - now) end
return {grant, math.floor(wait / 1000) + 1}
";

/// One chat's lease on this instance.
#[derive(Debug, Default)]
struct Lease {
    /// Joins granted by the bucket and not used yet.
    tokens: u64,
    /// Joins admitted without a token (free), not charged yet.
    uncharged: u64,
    /// Free joins being charged by the request in flight.
    charging: u64,
    /// A lease request is in flight.
    asking: bool,
    /// The bucket said no: nothing until then.
    denied_until: Option<Instant>,
}

/// What to do with one join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    Admit,
    Refuse { retry_after_secs: u64 },
}

/// A lease request to send: charge `charge` joins already admitted and ask
/// for `want` more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    pub charge: u64,
    pub want: u64,
}

/// The leases of this instance, one per chat that joins through it.
pub struct Leases {
    cache: Cache<ChatId, Arc<Mutex<Lease>>>,
}

impl Leases {
    pub fn new(chats: u64) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(chats)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
        }
    }

    /// Decides one join with leases of `batch` joins; a returned [`Ask`] must
    /// be sent, and its answer given to [`Self::granted`] or [`Self::failed`].
    pub fn take(&self, chat: &ChatId, batch: u64, now: Instant) -> (Take, Option<Ask>) {
        let batch = batch.max(1);
        let entry = self.cache.get_with_by_ref(chat, Arc::default);
        let mut l = entry.lock().unwrap_or_else(PoisonError::into_inner);
        if l.denied_until.is_some_and(|until| until <= now) {
            l.denied_until = None;
        }
        let take = if l.tokens > 0 {
            l.tokens -= 1;
            Take::Admit
        } else if l.denied_until.is_none() && l.uncharged + l.charging < batch {
            l.uncharged += 1;
            Take::Admit
        } else {
            let left = l
                .denied_until
                .map_or(Duration::from_secs(1), |until| until - now);
            Take::Refuse {
                retry_after_secs: left.as_secs_f64().ceil().max(1.0) as u64,
            }
        };
        let low = l.tokens * 2 < batch;
        let due = l.uncharged * 2 >= batch || (l.tokens == 0 && take != Take::Admit);
        let ask = (!l.asking && l.denied_until.is_none() && low && due).then(|| {
            l.asking = true;
            l.charging = l.uncharged;
            l.uncharged = 0;
            Ask {
                charge: l.charging,
                want: batch,
            }
        });
        (take, ask)
    }

    /// The bucket's answer: `granted` joins, or none before `wait`.
    pub fn granted(&self, chat: &ChatId, granted: u64, wait: Duration, now: Instant) {
        let entry = self.cache.get_with_by_ref(chat, Arc::default);
        let mut l = entry.lock().unwrap_or_else(PoisonError::into_inner);
        l.asking = false;
        l.charging = 0;
        l.tokens += granted;
        if granted == 0 {
            l.denied_until = Some(now + wait);
        }
    }

    /// The request failed (Redis down or slow): the joins it was to charge
    /// are charged with a later one.
    pub fn failed(&self, chat: &ChatId) {
        let entry = self.cache.get_with_by_ref(chat, Arc::default);
        let mut l = entry.lock().unwrap_or_else(PoisonError::into_inner);
        l.asking = false;
        l.uncharged += std::mem::take(&mut l.charging);
    }
}

/// The lease size for a chat allowed `limit` joins per window across `instances`:
/// a quarter of an even share, at least one, at most `max`.
pub fn batch(limit: u64, instances: u64, max: u64) -> u64 {
    (limit / (4 * instances.max(1))).clamp(1, max.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_joins_are_charged_with_the_first_lease_and_a_denial_refuses() -> crate::TestResult {
        let leases = Leases::new(100);
        let chat = ChatId::parse("c")?;
        let t0 = Instant::now();
        // Batch 4: two free joins, the second asks for a lease charging both.
        assert_eq!(leases.take(&chat, 4, t0), (Take::Admit, None));
        let (take, ask) = leases.take(&chat, 4, t0);
        assert_eq!(take, Take::Admit);
        assert_eq!(ask, Some(Ask { charge: 2, want: 4 }));
        // While it is in flight, two more free joins fill the batch; the next
        // is refused.
        assert_eq!(leases.take(&chat, 4, t0).0, Take::Admit);
        assert_eq!(leases.take(&chat, 4, t0).0, Take::Admit);
        assert!(matches!(leases.take(&chat, 4, t0).0, Take::Refuse { .. }));
        // Granted 4: they are used first; once half are gone the next lease
        // is asked for, charging the two free joins made meanwhile.
        leases.granted(&chat, 4, Duration::ZERO, t0);
        let mut asks = Vec::new();
        for _ in 0..4 {
            let (take, ask) = leases.take(&chat, 4, t0);
            assert_eq!(take, Take::Admit);
            asks.extend(ask);
        }
        assert_eq!(asks, vec![Ask { charge: 2, want: 4 }]);
        // While it is in flight: free joins up to the batch (2 charging + 2).
        assert_eq!(leases.take(&chat, 4, t0).0, Take::Admit);
        assert_eq!(leases.take(&chat, 4, t0).0, Take::Admit);
        assert!(matches!(leases.take(&chat, 4, t0).0, Take::Refuse { .. }));
        // The bucket is empty: refused until its wait is over, no free joins
        // meanwhile, and no request either.
        leases.granted(&chat, 0, Duration::from_millis(2500), t0);
        assert_eq!(
            leases.take(&chat, 4, t0),
            (
                Take::Refuse {
                    retry_after_secs: 3
                },
                None
            )
        );
        // After it, the two free joins still owed are charged with the next
        // request, which the next join makes.
        let later = t0 + Duration::from_millis(2500);
        let (take, ask) = leases.take(&chat, 4, later);
        assert_eq!(take, Take::Admit);
        assert_eq!(ask, Some(Ask { charge: 3, want: 4 }));
        Ok(())
    }

    #[test]
    fn a_failed_request_keeps_its_charge_for_the_next() -> crate::TestResult {
        let leases = Leases::new(100);
        let chat = ChatId::parse("c")?;
        let t0 = Instant::now();
        let (take, ask) = leases.take(&chat, 2, t0);
        assert_eq!(take, Take::Admit);
        assert_eq!(ask, Some(Ask { charge: 1, want: 2 }));
        leases.failed(&chat);
        // The failed charge is owed: the next join asks again, charging both.
        let (take, ask) = leases.take(&chat, 2, t0);
        assert_eq!(take, Take::Admit);
        assert_eq!(ask, Some(Ask { charge: 2, want: 2 }));
        leases.failed(&chat);
        assert!(matches!(leases.take(&chat, 2, t0).0, Take::Refuse { .. }));
        Ok(())
    }

    #[test]
    fn the_batch_is_a_quarter_of_an_even_share() {
        assert_eq!(batch(2000, 3, 64), 64);
        assert_eq!(batch(60, 3, 64), 5);
        assert_eq!(batch(3, 3, 64), 1);
        assert_eq!(batch(100, 0, 64), 25);
    }
}
