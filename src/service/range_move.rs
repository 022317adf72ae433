//! A bucket-range move carried out on its shards: the [`RangeMove`] the
//! move driver (`move_driver.rs`) runs, and the steps it is made of (walk
//! the source and move the range's chats with the chat move, fence new
//! chats of the range, flip the bucket table, tell every shard, move the
//! chats back after a cancel). Which step comes next is decided in
//! `move_plan.rs`; the bucket table and the range moves' records are
//! `buckets.rs`'s.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use sqlx::Connection;

use super::move_driver::{self, Outcome};
use super::move_plan::{Act, Phase, Run, Seen, Unit};
use super::pacer::{Pacer, Watch};
use super::{ChatService, ServiceError, now};
use crate::domain::ChatId;
use crate::routing::{BucketMap, BucketRange, bucket_of};
use crate::shard::{OpError, Shard};
use crate::storage::buckets::{self, Flip, Progress};

/// Chats read per page when a range move walks its source.
const PAGE: u32 = 500;
/// Passes over the source before the fence; chats whose move failed (a move
/// of theirs was running, say, whose driver died) are tried again on the
/// next one, half a lease later, when such a move has been taken over.
const PASSES: u32 = 5;

/// Why a range move stopped.
#[derive(Debug, thiserror::Error)]
enum RangeStop {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("the range's fence lapsed")]
    Lapsed,
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

/// What every walk of one range move shares.
struct Walk<'a> {
    id: u64,
    range: BucketRange,
    /// The source, its other chats left out of the range.
    watch: Watch,
    pacer: &'a tokio::sync::Mutex<Pacer>,
}

/// What a range move has done so far.
#[derive(Debug, Default)]
struct Tally {
    total: std::collections::HashSet<String>,
    moved: u64,
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

    /// A cancelled range move's roll-back: every chat of the range that the
    /// source's marker says is on the target is moved back,
    /// `moves.concurrent_chats` at a time, each copy paced against the
    /// target's p99 (the shard the chats now leave), in passes until none
    /// is left. What is found
    /// from the source's rows, so an instance that takes the roll-back over
    /// finds the same. A description of the chats left on the target, if
    /// any could not be moved back.
    async fn move_back(
        &self,
        id: u64,
        range: BucketRange,
        (source, target): (&Arc<Shard>, &Arc<Shard>),
        (total, moved): (u64, u64),
    ) -> Option<String> {
        let cancelling = Progress {
            phase: range_name(Phase::Cancelling),
            chats_total: total,
            chats_moved: moved,
            ..Progress::default()
        };
        let watch = Watch::buckets(target, range);
        let baseline = watch.baseline();
        let mut left = Vec::new();
        for pass in 1..=PASSES {
            left.clear();
            let mut after = String::new();
            loop {
                let from = after.clone();
                let page = match source
                    .read(None, "bucket_chats", move |conn| {
                        Box::pin(async move { Ok(buckets::chats_after(conn, &from, PAGE).await?) })
                    })
                    .await
                {
                    Ok(page) => page,
                    Err(e) => {
                        left.push(format!("the walk of {} stopped: {e}", source.name()));
                        break;
                    }
                };
                let Some((last, _)) = page.last() else {
                    break;
                };
                after.clone_from(last);
                let there: Vec<ChatId> = page
                    .into_iter()
                    .filter(|(_, moved_to)| moved_to.as_deref() == Some(target.name()))
                    .filter_map(|(chat, _)| ChatId::parse(&chat).ok())
                    .filter(|chat| (range.first..=range.last).contains(&bucket_of(chat)))
                    .collect();
                let home = source.name().to_owned();
                let mut back = futures_util::stream::iter(there)
                    .map(|chat| {
                        let (home, watch) = (home.clone(), &watch);
                        async move {
                            let outcome = self.move_and_wait(&chat, &home, (watch, baseline)).await;
                            (chat, outcome)
                        }
                    })
                    .buffer_unordered(self.move_settings.concurrent_chats.max(1));
                while let Some((chat, outcome)) = back.next().await {
                    match outcome {
                        Ok(true) => {}
                        Ok(false) => left.push(format!("{chat}: a move of it is running")),
                        Err(why) => left.push(format!("{chat}: {why}")),
                    }
                    self.record_range(id, cancelling.clone()).await;
                }
            }
            if left.is_empty() {
                return None;
            }
            tracing::info!(
                id,
                pass,
                left = left.len(),
                "chats of a cancelled range move are still on its target"
            );
            tokio::time::sleep(self.move_settings.lease / 2).await;
        }
        Some(format!(
            "{} chat(s) stay on {} (move them with move-chat), e.g. {}",
            left.len(),
            target.name(),
            left.first().map_or("", String::as_str)
        ))
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
    async fn tell_every_shard(
        &self,
        id: u64,
        version: u64,
        (source, target): (&Arc<Shard>, &Arc<Shard>),
        tally: &Tally,
    ) {
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
                        self.progress(id, Phase::Switched, tally).await;
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }

    /// One walk over the source's chats: the range's live chats are moved
    /// (`moves.concurrent_chats` at once), and the target gets a marker for
    /// each chat of the range held by a third shard. Under a fence
    /// (`fenced`: its length), the fence is renewed as the walk goes, and a
    /// lapse stops the walk. The chats whose move failed, with the reason.
    async fn range_pass(
        &self,
        walk: &Walk<'_>,
        (source, target): (&Arc<Shard>, &Arc<Shard>),
        fenced: Option<u64>,
        tally: &mut Tally,
    ) -> Result<Vec<(String, String)>, RangeStop> {
        let (id, range) = (walk.id, walk.range);
        let phase = if fenced.is_some() {
            Phase::Fenced
        } else {
            Phase::Copying
        };
        let mut failed = Vec::new();
        let cancelled = AtomicBool::new(false);
        let mut after = String::new();
        loop {
            let from = after.clone();
            let page = source
                .read(None, "bucket_chats", move |conn| {
                    Box::pin(async move { Ok(buckets::chats_after(conn, &from, PAGE).await?) })
                })
                .await?;
            let Some((last, _)) = page.last() else {
                break;
            };
            after.clone_from(last);
            let mut live = Vec::new();
            let mut markers = Vec::new();
            for (chat, moved_to) in page {
                let Ok(chat) = ChatId::parse(&chat) else {
                    continue;
                };
                let b = bucket_of(&chat);
                if b < range.first || b > range.last {
                    continue;
                }
                tally.total.insert(chat.to_string());
                match moved_to {
                    None => live.push(chat),
                    Some(to) if to != target.name() => markers.push((chat.to_string(), to)),
                    Some(_) => {}
                }
            }
            if !markers.is_empty() {
                target
                    .write(None, "bucket_markers", move |conn| {
                        Box::pin(async move {
                            let mut tx = conn.begin().await?;
                            for (chat, to) in &markers {
                                buckets::insert_marker(&mut tx, chat, to, now()).await?;
                            }
                            tx.commit().await.map_err(OpError::Commit)?;
                            Ok(())
                        })
                    })
                    .await?;
            }
            let to = target.name().to_owned();
            let cancelled = &cancelled;
            let mut moves = futures_util::stream::iter(live)
                .map(|chat| {
                    let to = to.clone();
                    async move {
                        if cancelled.load(Ordering::Relaxed) {
                            return (chat, Ok(None));
                        }
                        // Chat moves start one pause apart, the pause paced
                        // by the source's p99s against the range's baseline,
                        // which each chat's copy is paced against too.
                        // Under the fence new chats wait: no pause.
                        let baseline = {
                            let mut pacer = walk.pacer.lock().await;
                            if fenced.is_none() {
                                let pause = pacer.pace(&self.move_settings, 0);
                                tokio::time::sleep(pause).await;
                            }
                            pacer.baseline()
                        };
                        let outcome = self
                            .move_and_wait(&chat, &to, (&walk.watch, baseline))
                            .await;
                        (chat, outcome.map(Some))
                    }
                })
                .buffer_unordered(self.move_settings.concurrent_chats.max(1));
            while let Some((chat, outcome)) = moves.next().await {
                match outcome {
                    Ok(None) => {}
                    Ok(Some(true)) => tally.moved += 1,
                    Ok(Some(false)) => {
                        failed.push((chat.to_string(), "a move of it is running".to_owned()))
                    }
                    Err(why) => failed.push((chat.to_string(), why)),
                }
                if let Some(ms) = fenced {
                    self.renew_fence(source, id, ms).await?;
                }
                self.progress(id, phase, tally).await;
                // A cancel lets the chat moves under way end (a move cut
                // short would wait for its lease) and starts no more.
                if !cancelled.load(Ordering::Relaxed) && self.cancel_asked(id).await {
                    cancelled.store(true, Ordering::Relaxed);
                }
            }
            if cancelled.load(Ordering::Relaxed) {
                return Err(RangeStop::Cancelled);
            }
            if let Some(ms) = fenced {
                self.renew_fence(source, id, ms).await?;
            }
            self.progress(id, phase, tally).await;
        }
        Ok(failed)
    }

    async fn renew_fence(&self, source: &Arc<Shard>, id: u64, ms: u64) -> Result<(), RangeStop> {
        let held = source
            .write(None, "bucket_fence_renew", move |conn| {
                Box::pin(async move { Ok(buckets::renew_fence(conn, id, ms).await?) })
            })
            .await?;
        if held { Ok(()) } else { Err(RangeStop::Lapsed) }
    }

    /// Whether a cancel was asked for (a record that cannot be read is not
    /// a cancel: the move goes on).
    async fn cancel_asked(&self, id: u64) -> bool {
        let asked = self
            .coordinator()
            .read(None, "bucket_move_cancelled", move |conn| {
                Box::pin(async move { Ok(buckets::cancel_requested(conn, id).await?) })
            })
            .await;
        matches!(asked, Ok(true))
    }

    async fn progress(&self, id: u64, phase: Phase, tally: &Tally) {
        let p = Progress {
            phase: range_name(phase),
            chats_total: tally.total.len() as u64,
            chats_moved: tally.moved,
            ..Progress::default()
        };
        self.record_range(id, p).await;
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

/// One range move as the driver sees it ([`move_driver::Mover`]): the acts
/// the machine decides, carried out over the range's chats and the shards'
/// bucket tables.
struct RangeMove<'a> {
    service: &'a ChatService,
    id: u64,
    range: BucketRange,
    source: Arc<Shard>,
    target: Arc<Shard>,
    /// The source, its other chats left out of the range: the source's
    /// p99s before the range move (its calls, and this instance's requests
    /// of its chats outside the range) are what every chat's copy, and the
    /// start of every chat move, is paced against.
    watch: Watch,
    pacer: tokio::sync::Mutex<Pacer>,
    tally: Tally,
    /// The bucket table version the flip made (or found).
    version: Option<u64>,
    /// That version's table, as stored.
    ranges: Option<String>,
}

impl<'a> RangeMove<'a> {
    fn new(
        service: &'a ChatService,
        id: u64,
        range: BucketRange,
        (source, target): (Arc<Shard>, Arc<Shard>),
    ) -> Self {
        let watch = Watch::buckets(&source, range);
        let pacer = Pacer::watching(watch.clone(), watch.baseline(), &service.move_settings);
        Self {
            service,
            id,
            range,
            source,
            target,
            watch,
            pacer: tokio::sync::Mutex::new(pacer),
            tally: Tally::default(),
            version: None,
            ranges: None,
        }
    }

    fn log(&self, outcome: &Outcome) {
        let (id, range) = (self.id, self.range);
        let (from, to) = (self.source.name(), self.target.name());
        match outcome {
            Outcome::Ended {
                phase: Phase::Done, ..
            } => {
                tracing::info!(id, buckets = %range, from, to, version = self.version, chats = self.tally.moved, "bucket_range_moved")
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

    /// A walk over the source's chats (`fenced`: the fence's length).
    async fn pass(&mut self, fenced: Option<u64>) -> Result<Vec<(String, String)>, RangeStop> {
        let walk = Walk {
            id: self.id,
            range: self.range,
            watch: self.watch.clone(),
            pacer: &self.pacer,
        };
        self.service
            .range_pass(&walk, (&self.source, &self.target), fenced, &mut self.tally)
            .await
    }

    /// Taken over after its flip, only the telling is left; a cancel asked
    /// before the start is honoured at once.
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
        Ok(Seen::Opened)
    }

    /// Passes over the source until every chat of the range moved (chats
    /// whose move failed are tried again half a lease later), at most
    /// [`PASSES`].
    async fn copy(&mut self) -> Result<(), RangeStop> {
        for pass in 1..=PASSES {
            let failed = self.pass(None).await?;
            if failed.is_empty() {
                break;
            }
            tracing::info!(
                id = self.id,
                pass,
                left = failed.len(),
                "a range pass left chats behind; passing again"
            );
            tokio::time::sleep(self.service.move_settings.lease / 2).await;
        }
        Ok(())
    }

    fn fence_ms(&self) -> u64 {
        self.service.move_settings.lease.as_millis() as u64
    }

    async fn fence(&mut self) -> Result<(), RangeStop> {
        let (id, range, ms) = (self.id, self.range, self.fence_ms());
        self.source
            .write(None, "bucket_fence", move |conn| {
                Box::pin(async move {
                    let mut tx = conn.begin().await?;
                    buckets::fence(&mut tx, id, (range.first, range.last), ms).await?;
                    tx.commit().await.map_err(OpError::Commit)?;
                    Ok(())
                })
            })
            .await?;
        Ok(())
    }

    /// The last pass, under the fence: every chat of the range must move.
    async fn copy_fenced(&mut self) -> Result<Seen, RangeStop> {
        let failed = match self.pass(Some(self.fence_ms())).await {
            Ok(failed) => failed,
            Err(RangeStop::Lapsed) => {
                tracing::warn!(
                    id = self.id,
                    "the range's fence lapsed during its last pass; fencing again"
                );
                return Ok(Seen::Lapsed);
            }
            Err(e) => return Err(e),
        };
        if let Some((chat, why)) = failed.first() {
            return Err(RangeStop::Failed(format!(
                "{} chat(s) of the range could not be moved, e.g. {chat}: {why}",
                failed.len()
            )));
        }
        Ok(Seen::Verified)
    }

    /// Every chat of the range is held elsewhere now: the new version,
    /// unless a cancel came first (from here on it is refused).
    async fn switch(&mut self) -> Result<Seen, RangeStop> {
        let (service, id) = (self.service, self.id);
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
        let stored = ranges.clone();
        let flip = self
            .source
            .write(None, "bucket_flip", move |conn| {
                Box::pin(async move {
                    let mut tx = conn.begin().await?;
                    let flip = buckets::flip(&mut tx, id, version, &stored, now()).await?;
                    if flip == Flip::Done {
                        tx.commit().await.map_err(OpError::Commit)?;
                    } else {
                        tx.rollback().await?;
                    }
                    Ok(flip)
                })
            })
            .await?;
        match flip {
            Flip::Done => {
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

    /// This instance routes by the table just written.
    fn adopt(&self) {
        let (Some(version), Some(ranges)) = (self.version, &self.ranges) else {
            return;
        };
        match serde_json::from_str::<BucketMap>(ranges) {
            Ok(map) => {
                if let Err(e) = self.service.shards.adopt_map(version, &map) {
                    tracing::error!(error = %e, "cannot route by the bucket table just written");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the bucket table just written"),
        }
        tracing::info!(id = self.id, version, buckets = %self.range, "bucket_range_flipped");
    }

    fn progress(&self, phase: Phase) -> Progress {
        Progress {
            phase: range_name(phase),
            chats_total: self.tally.total.len() as u64,
            chats_moved: self.tally.moved,
            version: self.version,
            ..Progress::default()
        }
    }
}

impl From<RangeStop> for Seen {
    fn from(stop: RangeStop) -> Self {
        match stop {
            RangeStop::Cancelled => Seen::Cancelled,
            RangeStop::Lapsed => Seen::Lapsed,
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

impl move_driver::Mover for RangeMove<'_> {
    fn unit(&self) -> Unit {
        Unit::Range
    }

    async fn act(&mut self, act: Act) -> Seen {
        let service = self.service;
        match act {
            Act::Nothing | Act::Confirm => Seen::Recorded,
            Act::Open => self.open().await.unwrap_or_else(Seen::from),
            Act::Copy => seen(self.copy().await, Seen::CaughtUp),
            Act::Fence => seen(self.fence().await, Seen::Fenced),
            Act::CopyFenced => self.copy_fenced().await.unwrap_or_else(Seen::from),
            Act::Switch => self.switch().await.unwrap_or_else(Seen::from),
            Act::FinishSwitch => {
                self.adopt();
                Seen::Finished
            }
            Act::Clean => {
                if let Some(version) = self.version {
                    service
                        .tell_every_shard(
                            self.id,
                            version,
                            (&self.source, &self.target),
                            &self.tally,
                        )
                        .await;
                }
                Seen::Cleaned
            }
            Act::LiftFence => {
                let id = self.id;
                let _ = self
                    .source
                    .write(None, "bucket_unfence", move |conn| {
                        Box::pin(async move { Ok(buckets::lift_fence(conn, id).await?) })
                    })
                    .await;
                Seen::FenceLifted
            }
            Act::RollBack => {
                let done = (self.tally.total.len() as u64, self.tally.moved);
                let left = service
                    .move_back(self.id, self.range, (&self.source, &self.target), done)
                    .await;
                Seen::RolledBack(left)
            }
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
