//! A move's pacer: how fast a move copies and cleans on a shard, from the
//! p99s of the shard's other work before and during the move.
//!
//! It only times the move's batches (the pause after each, the batch's
//! size); it never decides a step of the move (`move_plan.rs` does) nor
//! touches a shard.

use std::sync::Arc;
use std::time::Duration;

use super::moves::MoveSettings;
use crate::domain::ChatId;
use crate::routing::BucketRange;
use crate::shard::Shard;

/// Calls the throttle needs in its window before it trusts a p99.
const PACER_MIN_CALLS: u64 = 50;
/// The window of the p99 the throttle compares with its baseline.
const PACER_WINDOW: Duration = Duration::from_secs(2);
/// A baseline p99 below this counts as this: under it, the p99 of a quiet
/// shard is noise.
const PACER_FLOOR: Duration = Duration::from_millis(1);

/// The throttle halves the copy's batch down to this share of
/// `moves.batch_revisions`.
const PACER_MIN_BATCH_SHARE: u32 = 8;
/// Pauses at `max_pause` adding up to this long, the others still slow: the
/// move is not what slows them, and what they see becomes the baseline (see
/// [`Pacer::next`]). Two p99 windows: the last holds no batch of the move's
/// beyond one longest pause apart.
const PACER_HELD: Duration = Duration::from_secs(4);

/// What a move's pacer watches on a shard, leaving out what the move moves.
///
/// Two p99s: the shard's calls as chatshard makes them (a move's own
/// `move_*` calls not counted), and this instance's requests of the shard's
/// other chats, from arrival to answer. The second also feels what the
/// shard's calls do not: the instance's and the machine's load, which a
/// move adds to when the shards share a host.
#[derive(Debug, Clone)]
pub(super) struct Watch {
    shard: Arc<Shard>,
    moving: Moving,
}

/// The chats a move moves, left out of what its pacer watches.
#[derive(Debug, Clone, Copy)]
enum Moving {
    /// One chat, by its key ([`crate::routing::chat_key`]).
    Chat(u64),
    Buckets(BucketRange),
}

impl Moving {
    fn covers(self, key: u64) -> bool {
        match self {
            Self::Chat(chat) => key == chat,
            Self::Buckets(range) => {
                let b = crate::routing::bucket_of_key(key);
                b >= range.first && b <= range.last
            }
        }
    }
}

impl Watch {
    /// A move of `chat` from `shard`.
    pub(super) fn chat(shard: &Arc<Shard>, chat: &ChatId) -> Self {
        Self {
            shard: shard.clone(),
            moving: Moving::Chat(crate::routing::chat_key(chat)),
        }
    }

    /// A move of every chat of `range` from `shard`.
    pub(super) fn buckets(shard: &Arc<Shard>, range: BucketRange) -> Self {
        Self {
            shard: shard.clone(),
            moving: Moving::Buckets(range),
        }
    }

    /// Both p99s over the last `window`.
    pub(super) fn now(&self, window: Duration) -> Signals {
        let moving = self.moving;
        Signals {
            calls: self.shard.recent_latency(0.99, window),
            requests: self
                .shard
                .request_latency(0.99, window, |key| !moving.covers(key)),
        }
    }

    /// Both p99s over the last 10 s: a move's baseline.
    pub(super) fn baseline(&self) -> Signals {
        self.now(Duration::from_secs(10))
    }
}

/// A p99 of the shard's calls and one of its other chats' requests, each
/// with the number it comes from (`None`: nothing seen).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Signals {
    pub calls: Option<(Duration, u64)>,
    pub requests: Option<(Duration, u64)>,
}

/// Paces a move's work on its source (the copy, then the clean-up): while
/// either p99 its [`Watch`] sees is above `max_p99_ratio` times its value
/// before the move, the pause after each batch doubles (up to `max_pause`)
/// and the batch halves (down to an eighth); once neither is, both go back
/// step by step. Held at `max_pause` for [`PACER_HELD`] with the others
/// still slow, it takes what they see as its new baseline. The copy also
/// keeps under `revisions_per_second`.
pub(super) struct Pacer {
    watch: Option<Watch>,
    /// Each p99 before the copy (`None`: too few to tell, or the throttle
    /// gave way so the copy converges; then only the cap and `pause` apply).
    baseline: [Option<Duration>; 2],
    pause: Duration,
    /// Revisions per copy batch now.
    pub(super) batch: u32,
    started: std::time::Instant,
    copied: u64,
    /// Time spent in throttled pauses (beyond `pause`), for the log.
    throttled: Duration,
    /// The pauses handed out in a row at `max_pause` while the others were
    /// slow, added up.
    held: Duration,
}

impl Pacer {
    /// Paced against what `watch` sees now and saw before (`before`).
    pub(super) fn watching(watch: Watch, before: Signals, settings: &MoveSettings) -> Self {
        Self {
            watch: Some(watch),
            ..Self::new(before, settings)
        }
    }

    /// Paced against `before`, with the p99s of each step given to
    /// [`Self::next`].
    pub(super) fn new(before: Signals, settings: &MoveSettings) -> Self {
        let trusted = |s: Option<(Duration, u64)>| {
            s.filter(|(_, n)| *n >= PACER_MIN_CALLS)
                .map(|(p99, _)| p99.max(PACER_FLOOR))
        };
        let baseline = [trusted(before.calls), trusted(before.requests)];
        tracing::info!(
            calls_p99_ms = baseline[0].map(|b| b.as_secs_f64() * 1e3),
            requests_p99_ms = baseline[1].map(|b| b.as_secs_f64() * 1e3),
            "a move's copy starts"
        );
        Self {
            watch: None,
            baseline,
            pause: settings.pause,
            batch: settings.batch,
            started: std::time::Instant::now(),
            copied: 0,
            throttled: Duration::ZERO,
            held: Duration::ZERO,
        }
    }

    /// The p99s paced against, as trusted signals (what a range move
    /// reports as the other chats' p99 before it).
    pub(super) fn baseline(&self) -> Signals {
        let signal = |b: Option<Duration>| b.map(|p99| (p99, PACER_MIN_CALLS));
        Signals {
            calls: signal(self.baseline[0]),
            requests: signal(self.baseline[1]),
        }
    }

    /// The pause after a batch of `revisions`, from what the watch sees now
    /// (nothing without one).
    pub(super) fn pace(&mut self, settings: &MoveSettings, revisions: u64) -> Duration {
        let recent = self
            .watch
            .as_ref()
            .map(|w| w.now(PACER_WINDOW))
            .unwrap_or_default();
        self.next(recent, settings, revisions)
    }

    /// The pause after a batch of `revisions`; `recent`: both p99s over
    /// [`PACER_WINDOW`].
    pub(super) fn next(
        &mut self,
        recent: Signals,
        settings: &MoveSettings,
        revisions: u64,
    ) -> Duration {
        self.copied += revisions;
        let over = |baseline: Option<Duration>, now: Option<(Duration, u64)>| match baseline {
            Some(baseline) if settings.max_p99_ratio > 0.0 => now.is_some_and(|(p99, n)| {
                n >= PACER_MIN_CALLS
                    && p99.as_secs_f64() > baseline.as_secs_f64() * settings.max_p99_ratio
            }),
            _ => false,
        };
        let seen = [recent.calls, recent.requests];
        let slow = [
            over(self.baseline[0], seen[0]),
            over(self.baseline[1], seen[1]),
        ];
        let mut hurt = slow.iter().any(|s| *s);
        // Held at the longest pause for two windows and the others are still
        // slow: the move, which has barely run, is not what slows them (a
        // range's chats now served by another shard on the same host, other
        // load). What they see now becomes the baseline, so the move is
        // paced against its own cost from here on, not held at a crawl.
        if hurt && self.pause >= settings.max_pause {
            self.held += self.pause;
            if self.held >= PACER_HELD {
                for ((baseline, slow), seen) in self.baseline.iter_mut().zip(slow).zip(seen) {
                    if let (true, Some((p99, _))) = (slow, seen) {
                        *baseline = Some(p99.max(PACER_FLOOR));
                    }
                }
                tracing::warn!(
                    calls_p99_ms = self.baseline[0].map(|b| b.as_secs_f64() * 1e3),
                    requests_p99_ms = self.baseline[1].map(|b| b.as_secs_f64() * 1e3),
                    "the other chats stay slow while a move waits at its longest pause; what they see now is its new baseline"
                );
                self.held = Duration::ZERO;
                hurt = false;
            }
        } else {
            self.held = Duration::ZERO;
        }
        let least = (settings.batch / PACER_MIN_BATCH_SHARE).max(1);
        (self.pause, self.batch) = if hurt {
            (
                (self.pause.max(Duration::from_millis(5)) * 2).min(settings.max_pause),
                (self.batch / 2).max(least),
            )
        } else {
            (
                (self.pause / 2).max(settings.pause),
                self.batch.saturating_mul(2).min(settings.batch),
            )
        };
        self.throttled += self.pause.saturating_sub(settings.pause);
        // The cap: no faster than `revisions_per_second` since the start.
        let due = if settings.revisions_per_second > 0 {
            Duration::from_secs_f64(self.copied as f64 / f64::from(settings.revisions_per_second))
                .saturating_sub(self.started.elapsed())
        } else {
            Duration::ZERO
        };
        self.pause.max(due)
    }

    /// The clean-up's batch: `clean_batch` scaled like the copy's batch.
    pub(super) fn clean_batch(&self, settings: &MoveSettings) -> u32 {
        let scaled = u64::from(settings.clean_batch) * u64::from(self.batch)
            / u64::from(settings.batch.max(1));
        u32::try_from(scaled).unwrap_or(settings.clean_batch).max(1)
    }

    /// Batches in flight at once, out of `most`: cut with the batch (half
    /// the batch, half the lanes; one at a quarter), so a throttled copy
    /// sends one small batch at a time instead of bursts of several.
    pub(super) fn lanes(&self, settings: &MoveSettings, most: usize) -> usize {
        let most = most.max(1);
        let scaled =
            (most as u64 * u64::from(self.batch)).div_ceil(u64::from(settings.batch.max(1)));
        usize::try_from(scaled).unwrap_or(most).clamp(1, most)
    }

    /// Whether it still paces against a baseline (it has not given way).
    pub(super) fn throttling(&self) -> bool {
        self.baseline.iter().any(Option::is_some)
    }

    /// The copy does not catch up while throttled (the chat is written
    /// faster than the throttled copy goes): the p99 throttle gives way for
    /// the rest of the move, since a move that never converges holds its
    /// cost forever.
    pub(super) fn give_way(&mut self, settings: &MoveSettings) {
        if std::mem::take(&mut self.baseline)
            .iter()
            .any(Option::is_some)
        {
            tracing::warn!(
                "a move's copy does not catch up while throttled; it goes on unthrottled"
            );
        }
        self.pause = settings.pause;
        self.batch = settings.batch;
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        if self.copied > 0 {
            tracing::info!(
                revisions = self.copied,
                seconds = self.started.elapsed().as_secs_f64(),
                throttled_ms = self.throttled.as_millis() as u64,
                "a move's copy paced"
            );
        }
    }
}

/// How a range move's failed work runs again. A refusal by a busy bulkhead
/// (nothing was sent: the shard sheds load) is back-pressure, not a fault:
/// wait, longer each time (250 ms doubling to 2 s), and run again, up to
/// [`Self::BUSY`] times in a row (about two minutes). Any other failure (a
/// deadline, a lost connection) runs again [`Self::FAILURES`] times in a row
/// at most, 200 ms more apart each time. A success starts both counts again.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(super) struct Retries {
    failed: u32,
    busy: u32,
}

impl Retries {
    pub(super) const FAILURES: u32 = 5;
    pub(super) const BUSY: u32 = 64;

    /// The wait before running again after a failure (`busy`: refused by a
    /// busy bulkhead), or `None`: give up.
    pub(super) fn after_failure(&mut self, busy: bool) -> Option<Duration> {
        if busy {
            if self.busy >= Self::BUSY {
                return None;
            }
            self.busy += 1;
            Some(Duration::from_millis(250) * 2u32.pow((self.busy - 1).min(3)))
        } else {
            if self.failed >= Self::FAILURES {
                return None;
            }
            self.failed += 1;
            Some(Duration::from_millis(200) * self.failed)
        }
    }

    pub(super) fn succeeded(&mut self) {
        *self = Self::default();
    }
}

/// Sizes a range move's batches by how long they take, so that one batch
/// stays well inside the shard's operation deadline whatever the load: a
/// batch that took longer than `aim` makes the next one smaller in
/// proportion (a quarter at most), one that took under half of it makes the
/// next a quarter larger, and a failed one (a deadline overrun) makes it a
/// quarter. The scale multiplies the batch sizes the settings give.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Sizer {
    scale: f64,
}

impl Default for Sizer {
    fn default() -> Self {
        Self { scale: 1.0 }
    }
}

impl Sizer {
    /// The smallest and largest scale.
    pub(super) const MIN: f64 = 1.0 / 32.0;
    pub(super) const MAX: f64 = 4.0;

    pub(super) fn scale(&self) -> f64 {
        self.scale
    }

    /// A batch of the current size took `took`; one should take `aim`.
    pub(super) fn took(&mut self, took: Duration, aim: Duration) {
        // The comparisons on the durations themselves, so a batch exactly at
        // a bound is not moved by floating-point rounding.
        let aim = aim.max(Duration::from_millis(1));
        if took > aim {
            self.scale *= (aim.as_secs_f64() / took.as_secs_f64()).max(0.25);
        } else if took * 2 < aim {
            self.scale *= 1.25;
        }
        self.scale = self.scale.clamp(Self::MIN, Self::MAX);
    }

    /// The batches in flight at once rise from `from` to `to` (a pacer
    /// that throttled less, see [`Pacer::lanes`]): the scale shrinks by as
    /// much, so the batches at once take together what they took before
    /// instead of each taking its old share of the shards at once, and the
    /// times of the next ones regrow it.
    pub(super) fn spread(&mut self, from: usize, to: usize) {
        if to > from && from > 0 {
            self.scale = (self.scale * from as f64 / to as f64).clamp(Self::MIN, Self::MAX);
        }
    }

    /// A batch failed (its deadline, most likely).
    pub(super) fn failed(&mut self) {
        self.scale = (self.scale / 4.0).clamp(Self::MIN, Self::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_pacer_backs_off_while_the_source_is_slow_and_comes_back_after() {
        let settings = MoveSettings {
            revisions_per_second: 0,
            ..MoveSettings::default()
        };
        let mut pacer = Pacer::new(calls(Some((ms(4), 500))), &settings);
        // Within 1.2 × the baseline: the base pause.
        assert_eq!(
            pacer.next(calls(Some((ms(4), 500))), &settings, 1000),
            ms(5)
        );
        // Above it: doubling up to the cap.
        let mut pauses = Vec::new();
        for _ in 0..10 {
            pauses.push(pacer.next(calls(Some((ms(6), 500))), &settings, 1000));
        }
        assert_eq!(pauses[..3], [ms(10), ms(20), ms(40)]);
        assert_eq!(*pauses.last().unwrap(), settings.max_pause);
        // The batch halved down to an eighth, the clean-up's with it.
        assert_eq!(pacer.batch, 125);
        assert_eq!(pacer.clean_batch(&settings), 125);
        // Too few calls to tell, then healthy again: halving back to the base.
        assert_eq!(
            pacer.next(calls(Some((ms(60), 10))), &settings, 1000),
            ms(500)
        );
        let mut pause = ms(500);
        for _ in 0..10 {
            pause = pacer.next(calls(Some((ms(4), 500))), &settings, 1000);
        }
        assert_eq!(pause, ms(5));
        assert_eq!(pacer.batch, 1000);
        // Giving way: the throttle is off for the rest of the move.
        pacer.next(calls(Some((ms(60), 500))), &settings, 1000);
        assert!(pacer.throttling());
        pacer.give_way(&settings);
        assert_eq!((pacer.pause, pacer.batch), (ms(5), 1000));
        assert_eq!(
            pacer.next(calls(Some((ms(60), 500))), &settings, 1000),
            ms(5)
        );
        assert!(!pacer.throttling());
    }

    #[test]
    fn a_throttled_copy_sends_fewer_batches_at_once() {
        let settings = MoveSettings {
            revisions_per_second: 0,
            ..MoveSettings::default()
        };
        let mut pacer = Pacer::new(calls(Some((ms(4), 500))), &settings);
        assert_eq!(pacer.lanes(&settings, 4), 4);
        assert_eq!(pacer.lanes(&settings, 2), 2);
        let mut lanes = Vec::new();
        for _ in 0..4 {
            pacer.next(calls(Some((ms(60), 500))), &settings, 1000);
            lanes.push((pacer.lanes(&settings, 4), pacer.lanes(&settings, 2)));
        }
        // Half the batch, half the lanes; one from a quarter down.
        assert_eq!(lanes, [(2, 1), (1, 1), (1, 1), (1, 1)]);
        // Back to all of them once the others are fast again.
        for _ in 0..4 {
            pacer.next(calls(Some((ms(4), 500))), &settings, 1000);
        }
        assert_eq!(pacer.lanes(&settings, 4), 4);
        // Never none, whatever is asked for.
        assert_eq!(pacer.lanes(&settings, 0), 1);
    }

    #[test]
    fn more_batches_at_once_make_each_smaller() {
        let mut sizer = Sizer::default();
        sizer.took(ms(10), ms(250));
        assert_eq!(sizer.scale(), 1.25);
        sizer.spread(1, 2);
        assert_eq!(sizer.scale(), 0.625);
        // Fewer at once: the throttle's cut is kept, nothing grows.
        sizer.spread(4, 1);
        assert_eq!(sizer.scale(), 0.625);
        sizer.spread(0, 4);
        assert_eq!(sizer.scale(), 0.625);
        for _ in 0..10 {
            sizer.spread(1, 4);
        }
        assert_eq!(sizer.scale(), Sizer::MIN);
    }

    /// Only the shard's calls seen.
    fn calls(calls: Option<(Duration, u64)>) -> Signals {
        Signals {
            calls,
            requests: None,
        }
    }

    #[test]
    fn the_other_chats_requests_slow_the_pacer_even_when_the_shards_calls_do_not() {
        let settings = MoveSettings {
            revisions_per_second: 0,
            ..MoveSettings::default()
        };
        let seen = |calls: u64, requests: u64| Signals {
            calls: Some((ms(calls), 500)),
            requests: Some((ms(requests), 500)),
        };
        let mut pacer = Pacer::new(seen(4, 20), &settings);
        assert_eq!(pacer.next(seen(4, 24), &settings, 1000), ms(5));
        // The calls as before, the requests 1.5 times slower: it backs off.
        assert_eq!(pacer.next(seen(4, 30), &settings, 1000), ms(10));
        assert_eq!(pacer.next(seen(4, 30), &settings, 1000), ms(20));
        // Both within their ratio: back.
        assert_eq!(pacer.next(seen(4, 22), &settings, 1000), ms(10));
        // Too few requests to trust (as the baseline) counts for nothing.
        let mut pacer = Pacer::new(
            Signals {
                calls: Some((ms(4), 500)),
                requests: Some((ms(20), 10)),
            },
            &settings,
        );
        assert_eq!(pacer.next(seen(4, 900), &settings, 1000), ms(5));
    }

    #[test]
    fn held_at_its_longest_pause_with_the_others_still_slow_the_pacer_takes_a_new_baseline() {
        let settings = MoveSettings {
            revisions_per_second: 0,
            ..MoveSettings::default()
        };
        let seen = |requests: u64| Signals {
            calls: Some((ms(4), 500)),
            requests: Some((ms(requests), 500)),
        };
        let mut pacer = Pacer::new(seen(10), &settings);
        // The others twice as slow whatever the move does: the pause climbs
        // to its longest, stays there for 4 s, then the slow p99 is the
        // baseline and the pause comes down.
        let pauses: Vec<Duration> = (0..12)
            .map(|_| pacer.next(seen(20), &settings, 0))
            .collect();
        assert_eq!(
            pauses,
            [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000, 1000, 500].map(ms),
            "{pauses:?}"
        );
        assert_eq!(pacer.baseline().requests, Some((ms(20), PACER_MIN_CALLS)));
        assert_eq!(pacer.baseline().calls, Some((ms(4), PACER_MIN_CALLS)));
        // Paced against the new baseline from here on.
        assert_eq!(pacer.next(seen(23), &settings, 0), ms(250));
        assert_eq!(pacer.next(seen(30), &settings, 0), ms(500));
        // A p99 that comes back while held resets the count.
        let mut pacer = Pacer::new(seen(10), &settings);
        for _ in 0..10 {
            pacer.next(seen(20), &settings, 0);
        }
        pacer.next(seen(10), &settings, 0);
        let pauses: Vec<Duration> = (0..4).map(|_| pacer.next(seen(20), &settings, 0)).collect();
        assert_eq!(pauses, [1000, 1000, 1000, 1000].map(ms), "{pauses:?}");
        assert_eq!(pacer.baseline().requests, Some((ms(10), PACER_MIN_CALLS)));
    }

    #[test]
    fn without_a_baseline_or_with_the_throttle_off_only_the_base_pause_and_the_cap_apply() {
        let quiet = MoveSettings {
            revisions_per_second: 0,
            ..MoveSettings::default()
        };
        let mut pacer = Pacer::new(calls(Some((ms(4), 3))), &quiet);
        assert_eq!(pacer.next(calls(Some((ms(900), 900))), &quiet, 1000), ms(5));
        let off = MoveSettings {
            max_p99_ratio: 0.0,
            ..quiet.clone()
        };
        let mut pacer = Pacer::new(calls(Some((ms(4), 500))), &off);
        assert_eq!(pacer.next(calls(Some((ms(900), 900))), &off, 1000), ms(5));
        // A sub-millisecond baseline counts as 1 ms.
        let mut pacer = Pacer::new(calls(Some((Duration::from_micros(200), 500))), &quiet);
        assert_eq!(pacer.next(calls(Some((ms(1), 500))), &quiet, 1000), ms(5));
        // The cap: 10,000 revisions at 1,000/s are due in about 10 s.
        let capped = MoveSettings {
            revisions_per_second: 1000,
            ..quiet
        };
        let mut pacer = Pacer::new(calls(None), &capped);
        let pause = pacer.next(calls(None), &capped, 10_000);
        assert!(
            pause > Duration::from_secs(9) && pause <= Duration::from_secs(10),
            "{pause:?}"
        );
    }

    mod retries {
        use super::super::Retries;
        use proptest::prelude::*;
        use std::time::Duration;

        #[test]
        fn a_busy_shard_is_waited_out_longer_than_a_failing_one() {
            let mut r = Retries::default();
            let waits: Vec<_> = (0..6).map(|_| r.after_failure(true)).collect();
            assert_eq!(
                waits,
                [250, 500, 1000, 2000, 2000, 2000].map(|ms| Some(Duration::from_millis(ms)))
            );
            // Other failures counted apart, five at most.
            let waits: Vec<_> = (0..6).map(|_| r.after_failure(false)).collect();
            assert_eq!(
                waits[..5],
                [200, 400, 600, 800, 1000].map(|ms| Some(Duration::from_millis(ms)))
            );
            assert_eq!(waits[5], None);
            r.succeeded();
            assert_eq!(r.after_failure(false), Some(Duration::from_millis(200)));
            // Busy for about two minutes in a row at most.
            let mut r = Retries::default();
            let total: Duration = std::iter::from_fn(|| r.after_failure(true)).sum();
            assert!(
                total > Duration::from_secs(100) && total < Duration::from_secs(150),
                "{total:?}"
            );
        }

        proptest! {
            /// Whatever the failures, a give-up comes only after the most
            /// allowed in a row of its kind since the last success, and
            /// every wait is between 200 ms and 2 s.
            #[test]
            fn gives_up_only_past_its_allowance(steps in prop::collection::vec(0u8..3, 0..400)) {
                let mut r = Retries::default();
                let (mut busy, mut failed) = (0u32, 0u32);
                for step in steps {
                    match step {
                        0 => { r.succeeded(); busy = 0; failed = 0; }
                        kind => {
                            let is_busy = kind == 1;
                            let seen = if is_busy { &mut busy } else { &mut failed };
                            let most = if is_busy { Retries::BUSY } else { Retries::FAILURES };
                            match r.after_failure(is_busy) {
                                Some(wait) => {
                                    prop_assert!(*seen < most);
                                    prop_assert!(wait >= Duration::from_millis(200) && wait <= Duration::from_secs(2));
                                    *seen += 1;
                                }
                                None => prop_assert_eq!(*seen, most),
                            }
                        }
                    }
                }
            }
        }
    }

    mod sizer {
        use super::super::Sizer;
        use proptest::prelude::*;
        use std::time::Duration;

        #[derive(Debug, Clone)]
        enum Step {
            Took(u64),
            Failed,
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![(0u64..5_000).prop_map(Step::Took), Just(Step::Failed)]
        }

        proptest! {
            #[test]
            fn the_scale_follows_the_batches_times_within_its_bounds(
                steps in proptest::collection::vec(step(), 0..200),
                aim_ms in 10u64..2_000,
            ) {
                let aim = Duration::from_millis(aim_ms);
                let mut s = Sizer::default();
                for step in steps {
                    let before = s.scale();
                    match step {
                        Step::Took(ms) => {
                            s.took(Duration::from_millis(ms), aim);
                            if ms > aim_ms {
                                prop_assert!(s.scale() <= before);
                                prop_assert!(s.scale() >= (before / 4.0).max(Sizer::MIN));
                            } else if 2 * ms < aim_ms {
                                prop_assert!(s.scale() >= before);
                            } else {
                                prop_assert_eq!(s.scale(), before);
                            }
                        }
                        Step::Failed => {
                            s.failed();
                            prop_assert!(s.scale() < before || before == Sizer::MIN);
                        }
                    }
                    prop_assert!((Sizer::MIN..=Sizer::MAX).contains(&s.scale()));
                }
            }
        }

        #[test]
        fn slow_batches_shrink_it_to_fit_and_fast_ones_grow_it_back() {
            let aim = Duration::from_millis(250);
            let mut s = Sizer::default();
            // Each batch takes time in proportion to its size: 1 s at scale 1.
            for _ in 0..20 {
                s.took(Duration::from_secs_f64(s.scale()), aim);
            }
            assert!(s.scale() <= 0.25 && s.scale() >= 0.125, "{}", s.scale());
            for _ in 0..40 {
                s.took(Duration::from_millis(10), aim);
            }
            assert_eq!(s.scale(), Sizer::MAX);
        }
    }
}
