//! A bucket-range move carried out on its shards: the [`RangeMove`] the
//! move driver (`move_driver.rs`) runs. The range moves as a range, the way
//! a resharding copies a key range: passes of bulk copy and catch-up while
//! writes go on (`range_copy.rs`, deciding each pass in `range_diff.rs`),
//! then one fence over the whole range (its writes and its new chats held),
//! one last pass, and the flip: the new bucket table and every chat's
//! tombstone at the source in one transaction, then the copies made live on
//! the target. Which step comes next is decided in `move_plan.rs`; the
//! bucket table and the range moves' records are `buckets.rs`'s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::Connection;

use super::buckets::{FenceSteps, RangeStats};
use super::move_driver::{self, Outcome};
use super::move_plan::{Act, Phase, Run, Seen, Unit};
use super::pacer::{Pacer, Retries, Signals, Sizer, Watch};
use super::range_copy::{Pass, Verifier};
use super::range_diff::Diff;
use super::{ChatService, ServiceError, now};
use crate::routing::{BucketMap, BucketRange};
use crate::shard::{OpError, Shard};
use crate::storage::buckets::{self, Flip, Progress};
use crate::storage::moves::CleanTable;
use crate::storage::range_copy;

/// Catch-up passes before a range that does not converge is given up.
const MAX_PASSES: usize = 60;
/// Passes in a row that did not go below the smallest pass before them:
/// the view says the move does not converge.
const NOT_SHRINKING: usize = 3;
/// Catch-up passes after which a range's passes have settled at the size
/// the range's writes keep them at (see [`RangeMove::caught_up`]): a
/// converging range's passes shrink about three times each, so six take
/// the first one's thousands of chats down to a few hundred.
const SETTLED_PASSES: usize = 6;
/// Times a step of the fence or the flip runs again when a shard refused
/// it as busy (nothing was sent), 50 ms more apart each time.
const BUSY_RETRIES: u32 = 10;
/// Stretches of the range made live on the target at once after the flip.
const GO_LIVE_SLICES: usize = 4;
/// Tombstoned chats cleaned per round at the source.
const CLEAN_CHATS: u32 = 200;

/// Why a range move stopped.
#[derive(Debug, thiserror::Error)]
pub(super) enum RangeStop {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Failed(String),
}

impl From<crate::shard::ShardError> for RangeStop {
    fn from(e: crate::shard::ShardError) -> Self {
        Self::Service(e.into())
    }
}

impl ChatService {
    /// Runs a recorded range move to its end, recording its phases; its
    /// record is renewed every `lease / 3` meanwhile.
    pub(super) async fn run_bucket_move(
        self: &Arc<Self>,
        id: u64,
        range: BucketRange,
        source: Arc<Shard>,
        target: Arc<Shard>,
    ) {
        let coordinator = self.coordinator().clone();
        let every = (self.move_settings.lease / 3).max(Duration::from_millis(100));
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let _ = coordinator
                    .write(None, "bucket_move_touch", move |conn| {
                        Box::pin(async move { Ok(buckets::touch(conn, id, now()).await?) })
                    })
                    .await;
            }
        });
        let mut mover = RangeMove::new(self, id, range, (source, target));
        let outcome = move_driver::drive(&mut mover, Run::start(Unit::Range)).await;
        heartbeat.abort();
        mover.log(&outcome);
    }

    fn index_of(&self, shard: &Arc<Shard>) -> Result<usize, RangeStop> {
        self.shards
            .all()
            .iter()
            .position(|s| Arc::ptr_eq(s, shard))
            .ok_or_else(|| RangeStop::Failed("the target shard is not configured".to_owned()))
    }

    /// The version of the source's newest bucket table, if that table
    /// already gives the range to the target (the move flipped before its
    /// driver died).
    async fn flipped_at(
        &self,
        range: BucketRange,
        source: &Arc<Shard>,
        target: &Arc<Shard>,
    ) -> Result<Option<u64>, RangeStop> {
        let newest = source
            .read(None, "bucket_map_read", |conn| {
                Box::pin(async move { Ok(buckets::latest(conn).await?) })
            })
            .await?;
        let Some((version, ranges)) = newest else {
            return Ok(None);
        };
        let Ok(map) = serde_json::from_str::<BucketMap>(&ranges) else {
            return Ok(None);
        };
        let Ok(router) = map.router(&self.shards.names()) else {
            return Ok(None);
        };
        let owner = router.owner_of_range(range);
        Ok((owner == Some(self.index_of(target)?)).then_some(version))
    }

    /// Stores the source's newest version on every other shard (each tried
    /// until it answers, while the move's lease is kept).
    async fn tell_every_shard(&self, version: u64, (source, target): (&Arc<Shard>, &Arc<Shard>)) {
        let newest = source
            .read(None, "bucket_map_read", |conn| {
                Box::pin(async move { Ok(buckets::latest(conn).await?) })
            })
            .await;
        let Ok(Some((v, ranges))) = newest else {
            return;
        };
        if v != version {
            return;
        }
        // The target first: until it stores the version, it would send a
        // new chat of the range back to the source.
        let mut shards: Vec<&Arc<Shard>> = self.shards.all().iter().collect();
        shards.sort_by_key(|s| !Arc::ptr_eq(s, target));
        for shard in shards {
            if Arc::ptr_eq(shard, source) {
                continue;
            }
            let mut pause = Duration::from_millis(100);
            loop {
                let r = ranges.clone();
                let stored = shard
                    .write(None, "bucket_map_store", move |conn| {
                        Box::pin(async move { Ok(buckets::store(conn, version, &r, now()).await?) })
                    })
                    .await;
                match stored {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(shard = shard.name(), error = %crate::error::chain(&e), "cannot store the new bucket table there yet; retrying");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }

    /// Whether a cancel was asked for (a record that cannot be read is not
    /// a cancel: the move goes on).
    pub(super) async fn cancel_asked(&self, id: u64) -> bool {
        let asked = self
            .coordinator()
            .read(None, "bucket_move_cancelled", move |conn| {
                Box::pin(async move { Ok(buckets::cancel_requested(conn, id).await?) })
            })
            .await;
        matches!(asked, Ok(true))
    }

    pub(super) async fn record_range(&self, id: u64, p: Progress) {
        let written = self
            .coordinator()
            .write(None, "bucket_move_progress", move |conn| {
                Box::pin(async move { Ok(buckets::set_progress(conn, id, &p, now()).await?) })
            })
            .await;
        if let Err(e) = written {
            tracing::warn!(id, error = %crate::error::chain(&e), "cannot record a bucket-range move's progress");
        }
    }
}

/// The stored name of a range move's phase.
fn range_name(phase: Phase) -> &'static str {
    phase.name(Unit::Range).unwrap_or("")
}

/// The other chats' p99 a move reports, in ms: their requests' where this
/// instance saw enough of them, else the shard's calls'.
fn p99_ms(s: &Signals) -> Option<f64> {
    let trusted = |x: Option<(Duration, u64)>| x.filter(|(_, n)| *n >= 50).map(|(p, _)| p);
    trusted(s.requests)
        .or(trusted(s.calls))
        .map(|p| (p.as_secs_f64() * 1e4).round() / 10.0)
}

/// One range move as the driver sees it ([`move_driver::Mover`]): the acts
/// the machine decides, carried out over the range's chats and the shards'
/// bucket tables.
pub(super) struct RangeMove<'a> {
    pub(super) service: &'a ChatService,
    pub(super) id: u64,
    pub(super) range: BucketRange,
    pub(super) source: Arc<Shard>,
    pub(super) target: Arc<Shard>,
    /// The source, its other chats left out of the range: what the copy is
    /// paced against, and what the view's p99s are.
    watch: Watch,
    pub(super) pacer: Pacer,
    /// Sizes the batches by how long they take (see [`Sizer`]).
    pub(super) sizer: Sizer,
    pub(super) stats: RangeStats,
    /// Rows per chat in the last snapshot batch: how many chats the next
    /// one takes.
    pub(super) rows_per_chat: f64,
    /// The range's chats on the source, at the last pass.
    chats_total: u64,
    pub(super) last_record: Instant,
    /// When the current fence was set, and the chats and revisions it froze.
    fenced: Option<(Instant, Vec<(String, u64)>)>,
    /// How long the current fence's transaction took (the range's writes
    /// already wait on its row locks).
    fence_set: Duration,
    /// When the copy began.
    began: Instant,
    /// The bucket table version the flip made (or found).
    version: Option<u64>,
    /// That version's table, as stored.
    ranges: Option<String>,
    /// This driver made the copies live (a driver that took the move over
    /// after that makes sure of it again before it cleans).
    live: bool,
}

impl<'a> RangeMove<'a> {
    fn new(
        service: &'a ChatService,
        id: u64,
        range: BucketRange,
        (source, target): (Arc<Shard>, Arc<Shard>),
    ) -> Self {
        let watch = Watch::buckets(&source, range);
        let before = watch.baseline();
        let pacer = Pacer::watching(watch.clone(), before, &service.move_settings);
        let stats = RangeStats {
            p99_before_ms: p99_ms(&pacer.baseline()),
            converging: true,
            ..RangeStats::default()
        };
        Self {
            service,
            id,
            range,
            source,
            target,
            watch,
            pacer,
            sizer: Sizer::default(),
            stats,
            rows_per_chat: 50.0,
            chats_total: 0,
            last_record: Instant::now(),
            fenced: None,
            fence_set: Duration::ZERO,
            began: Instant::now(),
            version: None,
            ranges: None,
            live: false,
        }
    }

    fn log(&self, outcome: &Outcome) {
        let (id, range) = (self.id, self.range);
        let (from, to) = (self.source.name(), self.target.name());
        let s = &self.stats;
        match outcome {
            Outcome::Ended {
                phase: Phase::Done, ..
            } => {
                tracing::info!(id, buckets = %range, from, to, version = self.version, chats = s.chats_copied, rows = s.rows_copied, seconds = s.copy_seconds, passes = s.pass_count, fence_ms = s.fence_ms, "bucket_range_moved")
            }
            Outcome::Ended {
                phase: Phase::Cancelled,
                ..
            } => tracing::info!(id, buckets = %range, from, to, "bucket_range_move_cancelled"),
            Outcome::Ended { reason, .. } => {
                tracing::warn!(id, buckets = %range, from, to, error = reason.as_deref().unwrap_or(""), "bucket_range_move_failed")
            }
            Outcome::Left(reason) => {
                tracing::warn!(id, buckets = %range, from, to, error = %reason, "bucket_range_move_left")
            }
        }
    }

    /// What the copy is paced against.
    pub(super) fn watch(&self) -> Watch {
        self.watch.clone()
    }

    /// The highest p99 the other chats saw during the copy, kept.
    pub(super) fn note_p99_during(&mut self) {
        let now = p99_ms(&self.watch.now(Duration::from_secs(2)));
        if let Some(now) = now {
            self.stats.p99_during_ms = Some(self.stats.p99_during_ms.map_or(now, |d| d.max(now)));
        }
    }

    /// Taken over after its flip, only the finishing is left; a cancel
    /// asked before the start is honoured at once.
    async fn open(&mut self) -> Result<Seen, RangeStop> {
        let service = self.service;
        if let Some(version) = service
            .flipped_at(self.range, &self.source, &self.target)
            .await?
        {
            self.version = Some(version);
            return Ok(Seen::AlreadySwitched);
        }
        if service.cancel_asked(self.id).await {
            return Ok(Seen::Cancelled);
        }
        self.fill_buckets().await?;
        self.began = Instant::now();
        Ok(Seen::Opened)
    }

    /// Whether a pass was short enough for the fence (see [`caught_up`]).
    fn caught_up(&self, work: u64, took: Duration, settled: bool) -> bool {
        let settings = &self.service.move_settings;
        caught_up(
            work,
            took,
            settled,
            settings.fence_lag,
            settings.hold_writes,
        )
    }

    /// Copy passes until one is short (see [`Self::caught_up`]) and the
    /// digest check, which starts after the bulk copy and runs beside the
    /// passes, has ended clean. A range whose passes stop shrinking says so
    /// in its view; after [`MAX_PASSES`] it is given up.
    async fn copy(&mut self) -> Result<(), RangeStop> {
        let mut verifier: Option<Verifier> = None;
        let mut verified = false;
        let mut retries = Retries::default();
        let mut verify_failures = 0;
        loop {
            let diffing = Instant::now();
            let attempt = match self.diff(false).await {
                Ok(d) => {
                    let diffed = diffing.elapsed();
                    self.chats_total = d.chats;
                    self.pass(&d, false).await.map(|pass| Pass {
                        diff: diffed,
                        ..pass
                    })
                }
                Err(e) => Err(e),
            };
            let first = self.stats.pass_count == 0;
            let pass = match attempt {
                Ok(pass) => pass,
                // Every step of a pass can run again; a busy bulkhead (the
                // shard shedding load) is waited out (see [`Retries`]).
                Err(RangeStop::Service(e)) => {
                    let busy = matches!(e, ServiceError::ShardBusy { .. });
                    let Some(wait) = retries.after_failure(busy) else {
                        return Err(RangeStop::Service(e));
                    };
                    if !busy {
                        self.sizer.failed();
                    }
                    tracing::warn!(id = self.id, error = %crate::error::chain(&e), busy, wait_ms = wait.as_millis() as u64, "a range pass failed; passing again");
                    tokio::time::sleep(wait).await;
                    // The record is the lease: kept while the pass waits.
                    self.record_now().await;
                    if self.service.cancel_asked(self.id).await {
                        return Err(RangeStop::Cancelled);
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            retries.succeeded();
            self.stats.pass_count += 1;
            if first {
                self.stats.copy_seconds =
                    (self.began.elapsed().as_secs_f64() * 10.0).round() / 10.0;
                let secs = self.began.elapsed().as_secs_f64().max(1e-3);
                self.stats.rows_per_second = (self.stats.rows_copied as f64 / secs).round();
                self.stats.chats_per_second = (self.stats.chats_copied as f64 / secs).round();
                self.stats.bulk = Some(pass.stats());
            } else {
                self.stats.passes.push(pass.stats());
                if self.stats.passes.len() > 20 {
                    self.stats.passes.remove(0);
                }
                let recent: Vec<u64> = self.stats.passes.iter().map(|p| p.revisions).collect();
                self.stats.converging = converging(&recent);
                // Held back by the pacer, the passes no longer shrink: the
                // range is written faster than the paced passes replay it,
                // and a move that never converges holds its cost forever.
                // The passes' pacer gives way for the rest of the move (as a
                // chat's copy does).
                if !self.stats.converging && self.pacer.throttling() {
                    self.pacer.give_way(&self.service.move_settings);
                }
            }
            if !verified && verifier.is_none() {
                verifier = Some(self.start_verify());
            }
            self.record_now().await;
            if self.service.cancel_asked(self.id).await {
                return Err(RangeStop::Cancelled);
            }
            // Settled: as many passes as a converging range needs (each
            // about a third of the one before), or three in a row that did
            // not shrink.
            let settled = !self.stats.converging || self.stats.passes.len() >= SETTLED_PASSES;
            if first
                || !self.caught_up(
                    pass.revisions,
                    pass.took.saturating_sub(pass.paused),
                    settled,
                )
            {
                if self.stats.pass_count as usize > MAX_PASSES {
                    let sizes: Vec<String> = self
                        .stats
                        .passes
                        .iter()
                        .rev()
                        .take(5)
                        .map(|p| p.revisions.to_string())
                        .collect();
                    return Err(RangeStop::Failed(format!(
                        "the range changes faster than it is copied: {MAX_PASSES} catch-up passes, the last of {} revisions",
                        sizes.join(", ")
                    )));
                }
                continue;
            }
            // Caught up: fenced once the digest check has ended clean. While
            // it runs, the passes go on (each waits a little for it first).
            let Some(check) = verifier.as_mut() else {
                return Ok(());
            };
            let Ok(outcome) = tokio::time::timeout(Duration::from_secs(1), check.outcome()).await
            else {
                continue;
            };
            verifier = None;
            match outcome {
                Ok(v) => {
                    self.stats.verify_ms = Some(v.took.as_millis() as u64);
                    self.stats.chats_verified = v.compared;
                    if let Some(chat) = v.differ.first() {
                        return Err(RangeStop::Failed(format!(
                            "{} chat(s) differ from their copy on {}, e.g. {chat}",
                            v.differ.len(),
                            self.target.name()
                        )));
                    }
                    verified = true;
                }
                Err(RangeStop::Service(e)) if verify_failures < Retries::FAILURES => {
                    verify_failures += 1;
                    tracing::warn!(id = self.id, error = %crate::error::chain(&e), "the range's digest check failed; checking again");
                    continue;
                }
                Err(e) => return Err(e),
            }
            // The check took a while: pass once more before the fence.
        }
    }

    fn fence_ms(&self) -> u64 {
        self.service.move_settings.fence.as_millis() as u64
    }

    /// One fence for the whole range, in one source transaction: no chat of
    /// the range is created, and every live chat's writes are held.
    async fn fence(&mut self) -> Result<(), RangeStop> {
        let (id, span, ms) = (
            self.id,
            (self.range.first, self.range.last),
            self.fence_ms(),
        );
        let setting = Instant::now();
        let frozen = self
            .source
            .write(None, "bucket_fence", move |conn| {
                Box::pin(async move {
                    let mut tx = conn.begin().await?;
                    buckets::fence(&mut tx, id, span, ms).await?;
                    let frozen = range_copy::fence(&mut tx, span, ms).await?;
                    tx.commit().await.map_err(OpError::Commit)?;
                    Ok(frozen)
                })
            })
            .await?;
        self.stats.fences += 1;
        self.fence_set = setting.elapsed();
        self.fenced = Some((Instant::now(), frozen));
        Ok(())
    }

    /// The last pass, under the fence, and the check that every chat the
    /// fence froze is in step on the target.
    async fn copy_fenced(&mut self) -> Result<Seen, RangeStop> {
        let diffing = Instant::now();
        let d = match self.diff(true).await {
            Ok(d) => d,
            Err(RangeStop::Service(e)) => {
                tracing::warn!(id = self.id, error = %crate::error::chain(&e), "the range's last diff failed; fencing again");
                return Ok(Seen::Lapsed);
            }
            Err(e) => return Err(e),
        };
        let diffed = diffing.elapsed();
        self.chats_total = d.chats;
        let pass = match self.pass(&d, true).await {
            Ok(pass) => Pass {
                diff: diffed,
                ..pass
            },
            // A shard's error under the fence: the fence is set again (three
            // times at most), and the pass runs again under it.
            Err(RangeStop::Service(e)) => {
                self.sizer.failed();
                tracing::warn!(id = self.id, error = %crate::error::chain(&e), "the range's last pass failed; fencing again");
                return Ok(Seen::Lapsed);
            }
            Err(e) => return Err(e),
        };
        self.stats.pass_count += 1;
        self.stats.passes.push(pass.stats());
        // Only the chats the pass acted on can be out of step now: the
        // fence holds the range's writes and creations at the source, and
        // only this move writes its copies (a lapsed fence is the flip's
        // to find, from the revisions it froze).
        let checking = Instant::now();
        let again: Diff = match self.diff_named(d.named()).await {
            Ok(d) => d,
            Err(RangeStop::Service(e)) => {
                tracing::warn!(id = self.id, error = %crate::error::chain(&e), "the range's last diff failed; fencing again");
                return Ok(Seen::Lapsed);
            }
            Err(e) => return Err(e),
        };
        if again.is_empty() {
            self.stats.fence_steps = Some(FenceSteps {
                set_ms: self.fence_set.as_millis() as u64,
                diff_ms: diffed.as_millis() as u64,
                pass_ms: pass.took.as_millis() as u64,
                check_ms: checking.elapsed().as_millis() as u64,
                flip_ms: 0,
                live_ms: 0,
            });
            return Ok(Seen::Verified);
        }
        let lapsed = self
            .fenced
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= self.service.move_settings.fence);
        if lapsed {
            tracing::warn!(
                id = self.id,
                "the range's fence lapsed during its last pass; fencing again"
            );
            return Ok(Seen::Lapsed);
        }
        Err(RangeStop::Failed(format!(
            "the range's copy is not whole under the fence: {} to copy, {} behind",
            again.snapshot.len(),
            again.behind.len()
        )))
    }

    /// The flip, unless a cancel came first (from here on it is refused):
    /// in one source transaction, while the fence holds and no chat of the
    /// range changed since it froze them, the new bucket table and every
    /// live chat's tombstone.
    async fn switch(&mut self) -> Result<Seen, RangeStop> {
        let (service, id) = (self.service, self.id);
        let flipping = Instant::now();
        let began = service
            .coordinator()
            .write(None, "bucket_move_flipping", move |conn| {
                Box::pin(async move { Ok(buckets::begin_flip(conn, id, now()).await?) })
            })
            .await?;
        if !began {
            return Ok(Seen::Cancelled);
        }
        if !service.refresh_bucket_map().await {
            return Err(RangeStop::Failed(
                "a shard did not answer before the flip; run the move again".to_owned(),
            ));
        }
        let current = service.shards.router();
        let version = current.0 + 1;
        let moved = current
            .1
            .with_range(self.range, service.index_of(&self.target)?);
        let ranges = serde_json::to_string(&BucketMap::of(&moved, &service.shards.names()))
            .map_err(|e| RangeStop::Failed(e.to_string()))?;
        let frozen = self.fenced.as_ref().map(|(_, f)| {
            (
                f.len() as i64,
                f.iter().map(|(_, r)| *r as i64).sum::<i64>(),
            )
        });
        let Some(frozen) = frozen else {
            return Ok(Seen::Lapsed);
        };
        let (stored, span, to) = (
            ranges.clone(),
            (self.range.first, self.range.last),
            self.target.name().to_owned(),
        );
        let flip = self
            .source
            .write(None, "bucket_flip", move |conn| {
                Box::pin(async move {
                    let mut tx = conn.begin().await?;
                    let flip = buckets::flip(&mut tx, id, version, &stored, now()).await?;
                    if flip != Flip::Done {
                        tx.rollback().await?;
                        return Ok(flip);
                    }
                    let (unfenced, count, revisions) = range_copy::unfenced(&mut tx, span).await?;
                    if unfenced > 0 || (count, revisions) != frozen {
                        tx.rollback().await?;
                        return Ok(Flip::Lapsed);
                    }
                    range_copy::tombstone(&mut tx, span, &to).await?;
                    tx.commit().await.map_err(OpError::Commit)?;
                    Ok(flip)
                })
            })
            .await?;
        match flip {
            Flip::Done => {
                if let Some((at, _)) = &self.fenced {
                    self.stats.fence_ms = Some(at.elapsed().as_millis() as u64);
                }
                if let Some(steps) = self.stats.fence_steps.as_mut() {
                    steps.flip_ms = flipping.elapsed().as_millis() as u64;
                }
                self.stats.flip_seconds =
                    Some((self.began.elapsed().as_secs_f64() * 10.0).round() / 10.0);
                self.version = Some(version);
                self.ranges = Some(ranges);
                Ok(Seen::Switched)
            }
            Flip::Lapsed => {
                tracing::warn!(
                    id,
                    "the range's fence lapsed before its flip; fencing again"
                );
                Ok(Seen::Lapsed)
            }
            Flip::Stale(stored) => Err(RangeStop::Failed(format!(
                "shard {} stores bucket table version {stored} already, newer than this instance's {}; run the move again",
                self.source.name(),
                current.0
            ))),
        }
    }

    /// The copies made live on the target (retried until done: the source's
    /// tombstones point there already), and this instance routes by the
    /// table just written.
    async fn finish(&mut self) {
        let (span, source) = (
            (self.range.first, self.range.last),
            self.source.name().to_owned(),
        );
        let mut pause = Duration::from_millis(20);
        let living = Instant::now();
        loop {
            // The range's writes wait for this (the source's tombstones point
            // here, the copies still name the source): its stretches at once.
            let lives = super::range_copy::slices_of(span, GO_LIVE_SLICES)
                .into_iter()
                .map(|stretch| {
                    let from = source.clone();
                    self.target.write(None, "bucket_go_live", move |conn| {
                        Box::pin(
                            async move { Ok(range_copy::go_live(conn, stretch, &from).await?) },
                        )
                    })
                });
            let live = futures_util::future::try_join_all(lives).await;
            match live {
                Ok(_) => {
                    self.live = true;
                    if let Some(steps) = self.stats.fence_steps.as_mut() {
                        steps.live_ms = living.elapsed().as_millis() as u64;
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(id = self.id, error = %crate::error::chain(&e), "cannot make the range's copies live yet; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
        if let (Some(version), Some(ranges)) = (self.version, &self.ranges) {
            match serde_json::from_str::<BucketMap>(ranges) {
                Ok(map) => {
                    if let Err(e) = self.service.shards.adopt_map(version, &map) {
                        tracing::error!(error = %e, "cannot route by the bucket table just written");
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot read the bucket table just written"),
            }
            tracing::info!(id = self.id, version, buckets = %self.range, fence_ms = self.stats.fence_ms, fence_steps = ?self.stats.fence_steps, "bucket_range_flipped");
        } else {
            self.service.refresh_bucket_map().await;
        }
    }

    /// After the flip: every other shard told, then the source's rows of
    /// the range deleted behind their tombstones, paced.
    async fn clean(&mut self) {
        if !self.live {
            self.finish().await;
        }
        if let Some(version) = self.version {
            self.service
                .tell_every_shard(version, (&self.source, &self.target))
                .await;
        }
        let (span, to) = (
            (self.range.first, self.range.last),
            self.target.name().to_owned(),
        );
        let settings = &self.service.move_settings;
        let cleaning = Instant::now();
        let mut after = String::new();
        loop {
            let (from, to) = (after.clone(), to.clone());
            let page = self
                .source
                .read(None, "bucket_clean_chats", move |conn| {
                    Box::pin(async move {
                        Ok(range_copy::marked(conn, span, &to, &from, CLEAN_CHATS).await?)
                    })
                })
                .await;
            let page = match page {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(id = self.id, error = %crate::error::chain(&e), "cleaning the range's rows at its source stopped; they stay behind its tombstones");
                    break;
                }
            };
            let Some(last) = page.last() else {
                break;
            };
            after.clone_from(last);
            for table in [
                CleanTable::Events,
                CleanTable::Messages,
                CleanTable::Members,
            ] {
                let mut busy = 0;
                loop {
                    // Sized like the copy's batches, by how long they take.
                    let n = (f64::from(self.pacer.clean_batch(settings).max(1000))
                        * self.sizer.scale()) as u32;
                    let ids = page.clone();
                    let began = Instant::now();
                    let deleted = self
                        .source
                        .write(None, "move_clean", move |conn| {
                            Box::pin(async move {
                                Ok(range_copy::clean(conn, table, &ids, n.max(100)).await?)
                            })
                        })
                        .await;
                    match deleted {
                        Ok(n) if n > 0 => {
                            self.sizer.took(began.elapsed(), self.aim());
                            tokio::time::sleep(self.pacer.pace(settings, 0)).await;
                        }
                        Ok(_) => break,
                        // Refused before it was sent: the source is busy.
                        Err(crate::shard::ShardError::Busy { .. }) if busy < BUSY_RETRIES => {
                            busy += 1;
                            tokio::time::sleep(Duration::from_millis(50) * busy).await;
                        }
                        Err(e) => {
                            tracing::warn!(id = self.id, error = %crate::error::chain(&e), "cleaning the range's rows at its source stopped; they stay behind its tombstones");
                            return;
                        }
                    }
                }
            }
        }
        self.stats.clean_seconds = Some((cleaning.elapsed().as_secs_f64() * 10.0).round() / 10.0);
        self.stats.p99_after_ms = p99_ms(&self.watch.now(Duration::from_secs(2)));
    }

    /// The range's fences lifted at the source.
    async fn lift_fence(&mut self) {
        let (id, span) = (self.id, (self.range.first, self.range.last));
        let _ = self
            .source
            .write(None, "bucket_unfence", move |conn| {
                Box::pin(async move {
                    let mut tx = conn.begin().await?;
                    buckets::lift_fence(&mut tx, id).await?;
                    range_copy::unfence(&mut tx, span).await?;
                    tx.commit().await.map_err(OpError::Commit)?;
                    Ok(())
                })
            })
            .await;
        self.fenced = None;
    }

    /// Undo before the flip: the target's copies dropped (nothing was ever
    /// served from them). What could not be dropped, if anything.
    async fn roll_back(&mut self) -> Option<String> {
        let (span, source) = (
            (self.range.first, self.range.last),
            self.source.name().to_owned(),
        );
        loop {
            let from = source.clone();
            let dropped = self
                .target
                .write(None, "move_range_drop", move |conn| {
                    Box::pin(async move {
                        let ids = range_copy::marked(conn, span, &from, "", CLEAN_CHATS).await?;
                        let mut tx = conn.begin().await?;
                        let n = range_copy::drop_rows(&mut tx, &ids, Some(&from)).await?;
                        tx.commit().await.map_err(OpError::Commit)?;
                        Ok(n)
                    })
                })
                .await;
            match dropped {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => {
                    return Some(format!(
                        "the range's copies on {} could not all be dropped: {}",
                        self.target.name(),
                        crate::error::chain(&e)
                    ));
                }
            }
        }
    }

    fn progress(&self, phase: Phase) -> Progress {
        Progress {
            phase: range_name(phase),
            chats_total: self.chats_total,
            chats_moved: self.stats.chats_copied,
            version: self.version,
            stats: serde_json::to_string(&self.stats).ok(),
            ..Progress::default()
        }
    }

    /// Records the progress in the phase the move is in.
    pub(super) async fn record_now(&self) {
        let phase = if self.fenced.is_some() {
            Phase::Fenced
        } else {
            Phase::Copying
        };
        self.service
            .record_range(self.id, self.progress(phase))
            .await;
    }
}

impl From<RangeStop> for Seen {
    fn from(stop: RangeStop) -> Self {
        match stop {
            RangeStop::Cancelled => Seen::Cancelled,
            other => Seen::Failed(other.to_string()),
        }
    }
}

fn seen(done: Result<(), RangeStop>, then: Seen) -> Seen {
    match done {
        Ok(()) => then,
        Err(stop) => stop.into(),
    }
}

/// Whether a catch-up pass of `work` revisions that took `took` (its
/// pauses left out) was short enough that the next, under the fence, holds
/// the range's writes briefly: its revisions within `fence_lag`, or its
/// time within half of `hold_writes`: the pass under the fence then
/// replays about as much, as fast. Once the passes have `settled` (the
/// range is written about as fast as a pass replays it; see
/// [`SETTLED_PASSES`]), one within the whole of `hold_writes` will do:
/// waiting for a shorter one would only run passes until the move gives up.
fn caught_up(
    work: u64,
    took: Duration,
    settled: bool,
    fence_lag: u64,
    hold_writes: Duration,
) -> bool {
    work <= fence_lag
        || took <= (hold_writes / 2).max(Duration::from_millis(50))
        || (settled && took <= hold_writes)
}

/// Whether catch-up passes of these sizes (revisions, oldest first) still
/// converge: one of the last [`NOT_SHRINKING`] went below every pass
/// before them. Passes that only wander (one a little under the one before
/// it, then back up), as paced passes of a range written about as fast as
/// they replay it do, have stopped converging even though some shrank.
fn converging(passes: &[u64]) -> bool {
    let Some(split) = passes.len().checked_sub(NOT_SHRINKING).filter(|s| *s > 0) else {
        return true;
    };
    let (before, last) = passes.split_at(split);
    let low = before.iter().min().copied().unwrap_or(u64::MAX);
    last.iter().any(|p| *p < low)
}

/// Awaits a step again while a shard's bulkhead refused it as busy (nothing
/// was sent), [`BUSY_RETRIES`] times at most, 50 ms more apart each time.
macro_rules! unless_busy {
    ($step:expr) => {{
        let mut tries = 0;
        loop {
            match $step.await {
                Err(RangeStop::Service(ServiceError::ShardBusy { .. })) if tries < BUSY_RETRIES => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50) * tries).await;
                }
                done => break done,
            }
        }
    }};
}

impl move_driver::Mover for RangeMove<'_> {
    fn unit(&self) -> Unit {
        Unit::Range
    }

    async fn act(&mut self, act: Act) -> Seen {
        match act {
            Act::Nothing | Act::Confirm => Seen::Recorded,
            Act::Open => self.open().await.unwrap_or_else(Seen::from),
            Act::Copy => seen(self.copy().await, Seen::CaughtUp),
            // Under load the shards' bulkheads may refuse the move's own
            // statements as busy; those were not sent, so they run again.
            Act::Fence => seen(unless_busy!(self.fence()), Seen::Fenced),
            Act::CopyFenced => self.copy_fenced().await.unwrap_or_else(Seen::from),
            Act::Switch => unless_busy!(self.switch()).unwrap_or_else(Seen::from),
            Act::FinishSwitch => {
                self.finish().await;
                Seen::Finished
            }
            Act::Clean => {
                self.clean().await;
                Seen::Cleaned
            }
            Act::LiftFence => {
                self.lift_fence().await;
                Seen::FenceLifted
            }
            Act::RollBack => Seen::RolledBack(self.roll_back().await),
        }
    }

    async fn record(&mut self, phase: Phase) -> Seen {
        self.service
            .record_range(self.id, self.progress(phase))
            .await;
        Seen::Recorded
    }

    async fn end(&mut self, phase: Phase, reason: Option<&str>) {
        let p = Progress {
            error: reason.map(str::to_owned),
            finished: true,
            ..self.progress(phase)
        };
        self.service.record_range(self.id, p).await;
    }
}

#[cfg(test)]
mod tests {
    use super::{NOT_SHRINKING, caught_up, converging};
    use proptest::prelude::*;
    use std::time::Duration;

    #[test]
    fn passes_that_only_wander_have_stopped_converging() {
        // Too few to say.
        assert!(converging(&[]));
        assert!(converging(&[900, 950, 990]));
        // Each a third of the one before.
        assert!(converging(&[9000, 3000, 1000, 330, 110]));
        // Noisy, but a new low within the last three.
        assert!(converging(&[9000, 6000, 7000, 6500, 5900]));
        // A paced run's passes (measured): one shrinks a little now and
        // then, none goes below the 4,959 before them.
        assert!(!converging(&[
            9246, 12847, 11622, 8849, 6444, 7592, 9277, 7115, 6919, 5749, 4959, 7400, 8903, 7851,
            9424
        ]));
        // Settled and flat.
        assert!(!converging(&[5000, 2000, 700, 700, 700, 700]));
    }

    proptest! {
        #[test]
        fn passes_converge_exactly_while_the_last_three_reach_a_new_low(
            passes in prop::collection::vec(0u64..10_000, 0..30),
        ) {
            let n = passes.len();
            let expected = n <= NOT_SHRINKING
                || passes[n - NOT_SHRINKING..]
                    .iter()
                    .any(|p| passes[..n - NOT_SHRINKING].iter().all(|b| p < b));
            prop_assert_eq!(converging(&passes), expected);
            // Shrinking every time always converges.
            let mut falling = passes.clone();
            falling.sort_unstable_by(|a, b| b.cmp(a));
            falling.dedup();
            prop_assert!(converging(&falling));
        }
    }

    #[test]
    fn a_settled_range_fences_at_the_whole_hold_and_a_shrinking_one_at_half() {
        let ms = Duration::from_millis;
        let (lag, hold) = (500, ms(800));
        // Few revisions, or within half the hold: short enough.
        assert!(caught_up(400, ms(2000), false, lag, hold));
        assert!(caught_up(5000, ms(400), false, lag, hold));
        // 600 ms, still shrinking: another pass.
        assert!(!caught_up(900, ms(600), false, lag, hold));
        // Settled: within the whole hold will do, beyond it will not.
        assert!(caught_up(900, ms(600), true, lag, hold));
        assert!(caught_up(900, ms(800), true, lag, hold));
        assert!(!caught_up(900, ms(801), true, lag, hold));
        // A hold of 0 (writes answered at once) still fences a 50 ms pass.
        assert!(caught_up(900, ms(50), false, lag, Duration::ZERO));
    }
}
