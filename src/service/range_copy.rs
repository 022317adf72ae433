//! The bulk copy of a bucket-range move (docs/moving-chats.md, "Bucket
//! ranges"): each pass reads the range's chats on both shards, asks
//! `range_diff.rs` what to do, and does it in batches of many chats: chats
//! with no copy are read in one consistent snapshot and written in one
//! target transaction; chats behind are replayed from one multi-chat read of
//! their logs, each batch one target transaction. The same replay step
//! ([`replay_onto`]) serves the single-chat move. Paced between batches like
//! any move's copy, except under the fence.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::Connection;

use super::buckets::PassStats;
use super::pacer::{Pacer, Retries, Sizer};
use super::range_diff::{self, Behind, Diff};
use super::range_move::{RangeMove, RangeStop};
use super::replay;
use super::{ServiceError, now};
use crate::shard::{OpError, Shard};
use crate::storage::moves::{self, Digest, LogRow};
use crate::storage::range_copy::{self, RangeChat, Snapshot};
use crate::storage::{buckets, server};

/// Range chats read per statement when a pass reads a side.
const READ_PAGE: u32 = 5_000;
/// Replay batches written (and read) at once.
const REPLAY_LANES: usize = 2;
/// Under the fence, where the range's own writes are held and the pass is
/// all that keeps them waiting: more at once, each smaller.
const FENCED_REPLAY_LANES: usize = 4;
/// Stretches of a range's buckets a diff reads at once on each side.
const DIFF_SLICES: usize = 4;
/// Chats dropped or given markers per target transaction.
const REPLAY_CHATS: usize = 100;
/// Chats whose digests are compared per read, at the sizer's scale 1.
const VERIFY_CHATS: usize = 500;
/// Digest reads at once (each reads both sides).
const VERIFY_LANES: usize = 4;
/// Chats replayed per target transaction at the sizer's scale 1 (so 400 at
/// most, at its largest).
const REPLAY_BATCH_CHATS: f64 = 100.0;
/// Chat rows filled with their bucket per statement.
const FILL_PAGE: u32 = 1_000;

/// Replays `rows` (the source's log after `at`, oldest first) onto the
/// target's copy of `chat` inside the caller's transaction, only where the
/// copy stands at `at` (a batch replayed already is not replayed twice);
/// the rows written, `None` when the copy stood elsewhere.
pub(super) async fn replay_onto(
    tx: &mut sqlx::MySqlConnection,
    chat: &str,
    at: u64,
    rows: &[LogRow],
) -> sqlx::Result<Option<u64>> {
    if rows.is_empty() {
        return Ok(Some(0));
    }
    let (reached, written) = replay_many(tx, &[(chat, at, rows)]).await?;
    Ok((!reached.is_empty()).then_some(written))
}

/// [`replay_onto`] of many chats in the caller's transaction, in a handful
/// of statements for them all: their revisions and member rows locked, the
/// member rows, messages and events written, the revisions and counts
/// settled. Each chat applies only where its copy stands at its `from`.
/// The chats applied with the revision each reached, and the rows written.
async fn replay_many(
    tx: &mut sqlx::MySqlConnection,
    batches: &[(&str, u64, &[LogRow])],
) -> sqlx::Result<(Vec<(String, u64)>, u64)> {
    let ids: Vec<&str> = batches.iter().map(|(c, ..)| *c).collect();
    let at = moves::lock_revisions(&mut *tx, &ids).await?;
    let ready: Vec<&(&str, u64, &[LogRow])> = batches
        .iter()
        .filter(|(c, from, rows)| !rows.is_empty() && at.get(*c) == Some(from))
        .collect();
    let users: Vec<(&str, Vec<&str>)> = ready
        .iter()
        .map(|(c, _, rows)| (*c, replay::members_touched(rows)))
        .collect();
    let mut states: HashMap<String, HashMap<String, u8>> = HashMap::new();
    for ((chat, user), state) in moves::lock_member_states_of(&mut *tx, &users).await? {
        states.entry(chat).or_default().insert(user, state);
    }
    let none = HashMap::new();
    let folds: Vec<replay::Replay> = ready
        .iter()
        .map(|(c, _, rows)| replay::fold(rows, states.get(*c).unwrap_or(&none)))
        .collect();
    let parts: Vec<moves::ChatReplay<'_>> = ready
        .iter()
        .zip(&folds)
        .map(|((c, _, rows), f)| moves::ChatReplay {
            chat_id: c,
            rows,
            members: &f.members,
        })
        .collect();
    moves::replay_chats(&mut *tx, &parts).await?;
    let settled: Vec<(&str, u64, i64)> = ready
        .iter()
        .zip(&folds)
        .filter_map(|((c, _, rows), f)| Some((*c, rows.last()?.revision, f.delta)))
        .collect();
    moves::settle_chats(&mut *tx, &settled).await?;
    let reached = settled
        .iter()
        .map(|(c, r, _)| ((*c).to_owned(), *r))
        .collect();
    Ok((reached, folds.iter().map(|f| f.written).sum()))
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Pass {
    /// Chats copied whole.
    pub copied: u64,
    /// Chats caught up by replay.
    pub replayed: u64,
    pub revisions: u64,
    pub rows: u64,
    pub took: Duration,
    /// Reading both sides' chats to decide the pass.
    pub diff: Duration,
    /// The source's reads and the target's writes, each added up (a read
    /// runs while the batch before it is written, so both can exceed
    /// `took` together).
    pub read: Duration,
    pub write: Duration,
    /// The pacer's pauses.
    pub paused: Duration,
}

impl Pass {
    pub(super) fn stats(&self) -> PassStats {
        let ms = |d: Duration| d.as_millis() as u64;
        PassStats {
            chats: self.copied + self.replayed,
            revisions: self.revisions,
            rows: self.rows,
            ms: ms(self.took),
            diff_ms: ms(self.diff),
            read_ms: ms(self.read),
            write_ms: ms(self.write),
            pause_ms: ms(self.paused),
        }
    }

    /// Adds a batch's rows, revisions and times (not its chats: the caller
    /// knows whether they were copied or replayed).
    fn note(&mut self, w: &Work) {
        self.rows += w.rows;
        self.revisions += w.revisions;
        self.read += w.read;
        self.write += w.write;
    }
}

/// One batch's work: what it wrote and where its time went.
#[derive(Debug, Clone, Copy, Default)]
struct Work {
    chats: u64,
    rows: u64,
    revisions: u64,
    read: Duration,
    write: Duration,
}

impl Work {
    fn add(&mut self, o: Work) {
        self.chats += o.chats;
        self.rows += o.rows;
        self.revisions += o.revisions;
        self.read += o.read;
        self.write += o.write;
    }
}

/// The next replay batch (pure): chats left over from earlier batches
/// first, then the next of `rest`, at most `chats` chats and `budget`
/// revisions (a single chat further behind goes alone: its log is read in
/// parts). Every chat given is taken exactly once.
fn next_chunk(
    rest: &mut &[Behind],
    left: &mut Vec<Behind>,
    chats: usize,
    budget: u64,
) -> Vec<Behind> {
    let mut chunk: Vec<Behind> = Vec::new();
    let mut sum = 0;
    while chunk.len() < chats.max(1) {
        let Some(b) = left.last().or_else(|| rest.first()).cloned() else {
            break;
        };
        if !chunk.is_empty() && sum + (b.to - b.from) > budget {
            break;
        }
        sum += b.to - b.from;
        if left.pop().is_none() {
            *rest = &rest[1..];
        }
        chunk.push(b);
    }
    chunk
}

/// The logs read for a replay batch: each chat with its copy's revision
/// and the source's rows after it (up to its `to`).
type Logs = Vec<(Behind, Vec<LogRow>)>;

impl RangeMove<'_> {
    fn span(&self) -> (u16, u16) {
        (self.range.first, self.range.last)
    }

    /// Every chat row of the source gets its bucket (rows made before the
    /// column existed, when the migration was applied by hand).
    pub(super) async fn fill_buckets(&self) -> Result<(), RangeStop> {
        loop {
            let filled = self
                .source
                .write(None, "move_fill_buckets", |conn| {
                    Box::pin(async move {
                        Ok(crate::storage::chats::fill_buckets(conn, FILL_PAGE).await?)
                    })
                })
                .await?;
            if filled == 0 {
                return Ok(());
            }
        }
    }

    /// The range's chats on `shard`, in index order, read in `slices`
    /// stretches of buckets at once.
    async fn side(&self, shard: &Arc<Shard>, slices: usize) -> Result<Vec<RangeChat>, RangeStop> {
        let reads = slices_of(self.span(), slices)
            .into_iter()
            .map(|span| side_of(shard, span));
        let mut all = Vec::new();
        for side in futures_util::future::try_join_all(reads).await? {
            all.extend(side);
        }
        Ok(all)
    }

    /// What the next pass must do: each side read in [`DIFF_SLICES`]
    /// stretches at once, fewer while the pacer throttles (never under the
    /// fence, `fenced`, where the range's writes wait for it).
    pub(super) async fn diff(&self, fenced: bool) -> Result<Diff, RangeStop> {
        let slices = self.lanes(fenced, DIFF_SLICES);
        // Both sides at once: they are different servers.
        let (source, target) = tokio::join!(
            self.side(&self.source, slices),
            self.side(&self.target, slices)
        );
        self.diffed(&source?, &target?)
    }

    /// The pass `source` and `target` (both sides' chats) call for, unless
    /// a chat of it is live on both sides.
    fn diffed(&self, source: &[RangeChat], target: &[RangeChat]) -> Result<Diff, RangeStop> {
        let d = range_diff::diff(source, target, self.source.name(), self.target.name());
        if let Some(chat) = d.conflicts.first() {
            return Err(RangeStop::Failed(format!(
                "{} chat(s) of the range are live on both {} and {}, e.g. {chat}",
                d.conflicts.len(),
                self.source.name(),
                self.target.name()
            )));
        }
        Ok(d)
    }

    /// [`Self::diff`] of only the chats `named`, both sides read by id:
    /// under the fence, where nothing but the move changes the range, what
    /// a fenced pass must have left in step.
    pub(super) async fn diff_named(&self, named: Vec<String>) -> Result<Diff, RangeStop> {
        let named = Arc::new(named);
        let side = |shard: &Arc<Shard>| {
            let (shard, named, span) = (shard.clone(), named.clone(), self.span());
            async move {
                let mut all = Vec::new();
                for chunk in named.chunks(READ_PAGE as usize) {
                    let ids = chunk.to_vec();
                    let page = shard
                        .read(None, "move_range_chats", move |conn| {
                            Box::pin(
                                async move { Ok(range_copy::chats_named(conn, span, &ids).await?) },
                            )
                        })
                        .await?;
                    all.extend(page);
                }
                all.sort_by(|a: &RangeChat, b: &RangeChat| {
                    (a.bucket, &a.chat_id).cmp(&(b.bucket, &b.chat_id))
                });
                Ok::<_, RangeStop>(all)
            }
        };
        let (source, target) = tokio::join!(side(&self.source), side(&self.target));
        self.diffed(&source?, &target?)
    }

    /// One pass: drops stale copies, writes markers, copies the chats with
    /// no copy and replays the ones behind. `fenced`: the range's writes are
    /// held, so nothing pauses.
    pub(super) async fn pass(&mut self, d: &Diff, fenced: bool) -> Result<Pass, RangeStop> {
        let began = Instant::now();
        let mut pass = Pass::default();
        let source_name = self.source.name().to_owned();
        for chunk in d.drop.chunks(REPLAY_CHATS) {
            let (ids, from) = (chunk.to_vec(), source_name.clone());
            self.target
                .write(None, "move_range_drop", move |conn| {
                    Box::pin(async move {
                        let mut tx = conn.begin().await?;
                        range_copy::drop_rows(&mut tx, &ids, Some(&from)).await?;
                        tx.commit().await.map_err(OpError::Commit)?;
                        Ok(())
                    })
                })
                .await?;
        }
        for chunk in d.markers.chunks(REPLAY_CHATS) {
            let markers = chunk.to_vec();
            self.target
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
        if fenced {
            // Under the fence the chats with no copy (made since the last
            // pass) and the chats behind are different chats: their copies
            // and their replays run at once, so the pass the range's writes
            // wait for takes the longer of the two, not both.
            let batches: Vec<Vec<String>> = d
                .snapshot
                .chunks(self.chats_per_batch(true))
                .map(<[String]>::to_vec)
                .collect();
            let lanes = self.lanes(true, self.service.move_settings.concurrent_batches);
            let copies = copy_all(self.source.clone(), self.target.clone(), batches, lanes);
            let (copied, replayed) =
                tokio::join!(copies, self.replay_behind(&d.behind, true, &mut pass));
            replayed?;
            self.copied(copied?, &mut pass);
            pass.took = began.elapsed();
            return Ok(pass);
        }
        // `moves.concurrent_chats` snapshot batches at once, each its own
        // transactions; the pause (and the record) after each round.
        let mut at = 0;
        while at < d.snapshot.len() {
            let lanes = self.lanes(fenced, self.service.move_settings.concurrent_batches);
            let n = self.chats_per_batch(fenced);
            let mut round = Vec::new();
            while at < d.snapshot.len() && round.len() < lanes {
                let ids: Vec<String> = d.snapshot[at..(at + n).min(d.snapshot.len())].to_vec();
                at += ids.len();
                round.push(ids);
            }
            let copied = copy_all(self.source.clone(), self.target.clone(), round, lanes).await?;
            let revisions = self.copied(copied, &mut pass);
            pass.paused += self.after_batch(fenced, revisions).await?;
        }
        self.replay_behind(&d.behind, fenced, &mut pass).await?;
        pass.took = began.elapsed();
        Ok(pass)
    }

    /// Replays the behind chats in batches, pipelined: while
    /// [`REPLAY_LANES`] batches are written to the target (one transaction
    /// each), the next ones' logs are read from the source (one statement
    /// each). Batches are sized by the sizer, so each stays well inside the
    /// shards' deadline. A chat whose log was longer than
    /// its share of a batch goes on in a later batch from where it then
    /// stands.
    async fn replay_behind(
        &mut self,
        behind: &[Behind],
        fenced: bool,
        pass: &mut Pass,
    ) -> Result<(), RangeStop> {
        let mut rest = behind;
        let mut left: Vec<Behind> = Vec::new();
        let first = self.replay_group(&mut rest, &mut left, fenced);
        if first.is_empty() {
            return Ok(());
        }
        let mut logs = self.read_group(first, fenced, pass).await?;
        loop {
            let next = self.replay_group(&mut rest, &mut left, fenced);
            let writes = logs.into_iter().map(|l| self.apply_logs(l));
            let (applied, read) = tokio::join!(futures_util::future::join_all(writes), async {
                let reads = next.into_iter().map(|chunk| self.read_logs(chunk, fenced));
                futures_util::future::join_all(reads).await
            });
            let mut work = Work::default();
            let mut slowest = Duration::ZERO;
            for done in applied {
                let (w, behind_still) = done?;
                slowest = slowest.max(w.write);
                work.add(w);
                left.extend(behind_still);
            }
            self.sizer.took(slowest, self.aim());
            pass.replayed += work.chats;
            pass.note(&work);
            self.stats.rows_copied += work.rows;
            self.stats.revisions_replayed += work.revisions;
            pass.paused += self.after_batch(fenced, work.revisions).await?;
            let mut read_now = Vec::with_capacity(read.len());
            for r in read {
                let (l, took) = r?;
                pass.read += took;
                read_now.push(l);
            }
            logs = if read_now.is_empty() {
                let next = self.replay_group(&mut rest, &mut left, fenced);
                if next.is_empty() {
                    return Ok(());
                }
                self.read_group(next, fenced, pass).await?
            } else {
                read_now
            };
        }
    }

    /// The next [`REPLAY_LANES`] replay batches (fewer at the end).
    fn replay_group(
        &self,
        rest: &mut &[Behind],
        left: &mut Vec<Behind>,
        fenced: bool,
    ) -> Vec<Vec<Behind>> {
        let most = if fenced {
            FENCED_REPLAY_LANES
        } else {
            REPLAY_LANES
        };
        (0..self.lanes(fenced, most))
            .map(|_| self.replay_chunk(rest, left, fenced))
            .filter(|c| !c.is_empty())
            .collect()
    }

    /// Reads a group's logs, its batches at once.
    async fn read_group(
        &self,
        group: Vec<Vec<Behind>>,
        fenced: bool,
        pass: &mut Pass,
    ) -> Result<Vec<Logs>, RangeStop> {
        let reads = group.into_iter().map(|chunk| self.read_logs(chunk, fenced));
        let mut all = Vec::new();
        for r in futures_util::future::join_all(reads).await {
            let (l, took) = r?;
            pass.read += took;
            all.push(l);
        }
        Ok(all)
    }

    /// The next replay batch: chats left over from earlier batches first,
    /// then the next of `rest`, up to about three times the batch of
    /// revisions (3,000 at the default) and [`REPLAY_BATCH_CHATS`] chats,
    /// both times the sizer's scale.
    fn replay_chunk(
        &self,
        rest: &mut &[Behind],
        left: &mut Vec<Behind>,
        fenced: bool,
    ) -> Vec<Behind> {
        let (chats, budget) = self.replay_limits(fenced);
        next_chunk(rest, left, chats, budget)
    }

    /// Chats and revisions per replay batch, at the sizer's scale.
    fn replay_limits(&self, fenced: bool) -> (usize, u64) {
        let scale = self.sizer.scale();
        let chats = (REPLAY_BATCH_CHATS * scale).round().max(1.0) as usize;
        let budget = (f64::from(self.batch(fenced)) * 3.0 * scale).max(10.0) as u64;
        (chats, budget)
    }

    /// What one batch's statements should take: a quarter of the shard's
    /// operation deadline (250 ms at the default 1 s).
    pub(super) fn aim(&self) -> Duration {
        self.target
            .operation_timeout()
            .min(self.source.operation_timeout())
            / 4
    }

    /// Batches in flight at once, out of `most`: all of them under the
    /// fence, fewer while the pacer throttles (see [`Pacer::lanes`]).
    fn lanes(&self, fenced: bool, most: usize) -> usize {
        if fenced {
            most.max(1)
        } else {
            self.pacer.lanes(&self.service.move_settings, most)
        }
    }

    fn batch(&self, fenced: bool) -> u32 {
        if fenced {
            self.service.move_settings.batch
        } else {
            self.pacer.batch
        }
    }

    /// Chats per snapshot batch: about five times the pacer's batch of
    /// revisions in rows (5,000 at the default 1,000), by the rows per chat
    /// the last batch had, times the sizer's scale; at least one, at most
    /// 2,000.
    fn chats_per_batch(&self, fenced: bool) -> usize {
        let n =
            f64::from(self.batch(fenced)) * 5.0 * self.sizer.scale() / self.rows_per_chat.max(1.0);
        (n as usize).clamp(1, 2_000)
    }

    /// After each batch: the pause (none under the fence), the record (at
    /// most every 500 ms, with the p99 the others see) and a cancel check.
    /// The pause taken.
    async fn after_batch(&mut self, fenced: bool, revisions: u64) -> Result<Duration, RangeStop> {
        let mut paused = Duration::ZERO;
        if !fenced {
            let settings = &self.service.move_settings;
            let lanes = self.pacer.lanes(settings, settings.concurrent_batches);
            paused = self.pacer.pace(settings, revisions);
            self.sizer.spread(
                lanes,
                self.pacer.lanes(settings, settings.concurrent_batches),
            );
            tokio::time::sleep(paused).await;
            self.note_p99_during();
        }
        if self.last_record.elapsed() >= Duration::from_millis(500) {
            self.last_record = Instant::now();
            self.record_now().await;
            if !fenced && self.service.cancel_asked(self.id).await {
                return Err(RangeStop::Cancelled);
            }
        }
        Ok(paused)
    }

    /// Counts chats copied whole ([`copy_all`]'s work and slowest batch)
    /// in the pass and the move, and sizes the next batches by them; the
    /// revisions copied.
    fn copied(&mut self, (work, slowest): (Work, Duration), pass: &mut Pass) -> u64 {
        if work.chats > 0 {
            self.sizer.took(slowest, self.aim());
            self.rows_per_chat = work.rows as f64 / work.chats as f64;
        }
        pass.copied += work.chats;
        pass.note(&work);
        self.stats.chats_copied += work.chats;
        self.stats.rows_copied += work.rows;
        work.revisions
    }

    /// One read of the next events of every chat of `behind` (after its
    /// copy's revision, up to the revision the diff saw, at most its share
    /// of about three times the batch of revisions), and its time.
    async fn read_logs(
        &self,
        behind: Vec<Behind>,
        fenced: bool,
    ) -> Result<(Logs, Duration), RangeStop> {
        let began = Instant::now();
        let budget = self.replay_limits(fenced).1;
        let limit =
            u32::try_from((budget / behind.len().max(1) as u64).max(10)).unwrap_or(u32::MAX);
        let from: Vec<(String, u64, u64)> = behind
            .iter()
            .map(|b| (b.chat.clone(), b.from, b.to))
            .collect();
        let read = self
            .source
            .read(None, "move_read_log", move |conn| {
                Box::pin(async move { Ok(range_copy::logs_after(conn, &from, limit).await?) })
            })
            .await?;
        let mut logs: HashMap<String, Vec<LogRow>> = HashMap::new();
        for (chat, row) in read {
            logs.entry(chat).or_default().push(row);
        }
        let logs = behind
            .into_iter()
            .map(|b| {
                let rows = logs.remove(&b.chat).unwrap_or_default();
                (b, rows)
            })
            .collect();
        Ok((logs, began.elapsed()))
    }

    /// Writes read logs onto their copies in one target transaction. The
    /// work done, and the chats left behind their `to` (their log was
    /// longer than their share), each from where it now stands; a chat
    /// whose copy stood elsewhere (or whose log ended short) is left to the
    /// next pass.
    async fn apply_logs(&self, logs: Logs) -> Result<(Work, Vec<Behind>), RangeStop> {
        let began = Instant::now();
        let n: u64 = logs.iter().map(|(_, r)| r.len() as u64).sum();
        let chats = logs.len() as u64;
        let batches: Vec<(String, u64, Vec<LogRow>)> = logs
            .iter()
            .map(|(b, rows)| (b.chat.clone(), b.from, rows.clone()))
            .collect();
        let (reached, rows) = self
            .target
            .write(None, "move_replay", move |conn| {
                Box::pin(async move {
                    let mut tx = conn.begin().await?;
                    let parts: Vec<(&str, u64, &[LogRow])> = batches
                        .iter()
                        .map(|(c, at, rows)| (c.as_str(), *at, rows.as_slice()))
                        .collect();
                    let applied = replay_many(&mut tx, &parts).await?;
                    tx.commit().await.map_err(OpError::Commit)?;
                    Ok(applied)
                })
            })
            .await?;
        let reached: HashMap<String, u64> = reached.into_iter().collect();
        let left = logs
            .into_iter()
            .filter_map(|(b, _)| {
                let at = *reached.get(&b.chat)?;
                (at > b.from && at < b.to).then_some(Behind { from: at, ..b })
            })
            .collect();
        let work = Work {
            chats,
            rows,
            revisions: n,
            read: Duration::ZERO,
            write: began.elapsed(),
        };
        Ok((work, left))
    }

    /// Starts the digest check of every chat in step with its copy (see
    /// [`verify_range`]), beside the catch-up passes.
    pub(super) fn start_verify(&self) -> Verifier {
        let settings = self.service.move_settings.clone();
        let pacer = Pacer::watching(self.watch(), self.pacer.baseline(), &settings);
        let (source, target, span) = (self.source.clone(), self.target.clone(), self.span());
        Verifier {
            task: tokio::spawn(verify_range(
                source,
                target,
                span,
                (pacer, self.aim()),
                settings,
            )),
        }
    }
}

/// Copies `ids` whole: one consistent read on the source, one write
/// transaction on the target. The chats copied (those still live on the
/// source), the rows and the revisions.
async fn copy_snapshot(
    source: Arc<Shard>,
    target: Arc<Shard>,
    ids: Vec<String>,
) -> Result<Work, RangeStop> {
    let began = Instant::now();
    let snap: Snapshot = source
        .read(None, "move_range_read", move |conn| {
            Box::pin(async move {
                server::repeatable_read_next(&mut *conn).await?;
                let mut tx = conn.begin().await?;
                let snap = range_copy::read_snapshot(&mut tx, &ids).await?;
                tx.commit().await?;
                Ok(snap)
            })
        })
        .await?;
    let read = began.elapsed();
    let (chats, rows) = (snap.chats.len() as u64, snap.rows());
    let revisions = snap
        .chats
        .iter()
        .map(|c| c.revision + 1 - c.first_revision.min(c.revision + 1))
        .sum();
    if chats == 0 {
        return Ok(Work {
            read,
            ..Work::default()
        });
    }
    let from = source.name().to_owned();
    let began = Instant::now();
    let written = target
        .write(None, "move_range_write", move |conn| {
            Box::pin(async move {
                let mut tx = conn.begin().await?;
                match range_copy::write_snapshot(&mut tx, &snap, &from).await {
                    Ok(()) => {}
                    Err(range_copy::WriteError::Live(chat)) => {
                        tx.rollback().await?;
                        return Ok(Err(chat));
                    }
                    Err(range_copy::WriteError::Sql(e)) => return Err(e.into()),
                }
                tx.commit().await.map_err(OpError::Commit)?;
                Ok(Ok(()))
            })
        })
        .await?;
    if let Err(chat) = written {
        return Err(RangeStop::Failed(format!(
            "chat {chat} of the range is live on {} already",
            target.name()
        )));
    }
    Ok(Work {
        chats,
        rows,
        revisions,
        read,
        write: began.elapsed(),
    })
}

/// Copies `batches` whole, `lanes` at once (each as [`copy_snapshot`]):
/// the work done, and the slowest batch's read or write.
async fn copy_all(
    source: Arc<Shard>,
    target: Arc<Shard>,
    batches: Vec<Vec<String>>,
    lanes: usize,
) -> Result<(Work, Duration), RangeStop> {
    let mut work = Work::default();
    let mut slowest = Duration::ZERO;
    let mut batches = batches.into_iter().peekable();
    while batches.peek().is_some() {
        let round = batches
            .by_ref()
            .take(lanes.max(1))
            .map(|ids| copy_snapshot(source.clone(), target.clone(), ids));
        for done in futures_util::future::join_all(round).await {
            let done = done?;
            slowest = slowest.max(done.read).max(done.write);
            work.add(done);
        }
    }
    Ok((work, slowest))
}

/// `span` cut into at most `n` stretches of buckets, in order, together
/// covering it once.
pub(super) fn slices_of((first, last): (u16, u16), n: usize) -> Vec<(u16, u16)> {
    let buckets = usize::from(last.saturating_sub(first)) + 1;
    let n = n.clamp(1, buckets);
    let mut at = first;
    (0..n)
        .map(|i| {
            // The first `buckets % n` stretches take one bucket more.
            let len = buckets / n + usize::from(i < buckets % n);
            let stretch = (at, at + (len - 1) as u16);
            at = stretch.1.saturating_add(1);
            stretch
        })
        .collect()
}

/// The range `span`'s chats on `shard`, in index order.
async fn side_of(shard: &Arc<Shard>, span: (u16, u16)) -> Result<Vec<RangeChat>, RangeStop> {
    let mut all: Vec<RangeChat> = Vec::new();
    loop {
        let after = all
            .last()
            .map_or((span.0, String::new()), |c| (c.bucket, c.chat_id.clone()));
        let page = shard
            .read(None, "move_range_chats", move |conn| {
                Box::pin(async move {
                    Ok(range_copy::chats(conn, span, (after.0, &after.1), READ_PAGE).await?)
                })
            })
            .await?;
        let full = page.len() as u32 == READ_PAGE;
        all.extend(page);
        if !full {
            return Ok(all);
        }
    }
}

/// A range's digest check running beside its passes; dropping it stops it.
pub(super) struct Verifier {
    task: tokio::task::JoinHandle<Result<Verified, RangeStop>>,
}

impl Verifier {
    /// Its outcome, once it has ended. Cancel-safe: a wait cut short (a
    /// timeout) loses nothing, the next wait gets the outcome.
    pub(super) async fn outcome(&mut self) -> Result<Verified, RangeStop> {
        match (&mut self.task).await {
            Ok(done) => done,
            Err(e) => Err(RangeStop::Failed(format!("the digest check stopped: {e}"))),
        }
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the digest check found.
#[derive(Debug, Clone, Default)]
pub(super) struct Verified {
    /// Chats that differ from their copy at the same revision.
    pub differ: Vec<String>,
    /// Chats compared (in step when read).
    pub compared: u64,
    pub took: Duration,
}

/// Compares each live chat of the range in step with its copy by digest
/// (revision, count, JOINED rows and a checksum of every table, as a single
/// move verifies), up to 500 chats per read (sized by how long reads
/// take), both sides read at once, each in one snapshot, four such reads at
/// once; paced like a copy. A chat not in step when read (behind,
/// or changed between the two reads) is left: a second round takes the
/// chats the first did not compare (those, and chats created since); what
/// neither compared is left to the revision check under the fence. It runs
/// beside the catch-up passes (each of its reads sees whatever the passes
/// have written; only equal revisions are compared), so the passes never
/// stop for it.
async fn verify_range(
    source: Arc<Shard>,
    target: Arc<Shard>,
    span: (u16, u16),
    (mut pacer, aim): (Pacer, Duration),
    settings: super::moves::MoveSettings,
) -> Result<Verified, RangeStop> {
    let began = Instant::now();
    let mut sizer = Sizer::default();
    let mut compared: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut differ = Vec::new();
    for _round in 0..2 {
        let live: Vec<String> = side_of(&source, span)
            .await?
            .into_iter()
            .filter(|c| c.moved_to.is_none() && !compared.contains(&c.chat_id))
            .map(|c| c.chat_id)
            .collect();
        // Four reads at once (fewer while the pacer throttles), each sized
        // by how long reads take (the sizer, as the copy's batches), so none
        // overruns the shards' deadline; a read that failed is made again,
        // smaller.
        let mut at = 0;
        let mut retries = Retries::default();
        while at < live.len() {
            let n = ((VERIFY_CHATS as f64 * sizer.scale()) as usize).max(10);
            let lanes: Vec<&[String]> = live[at..]
                .chunks(n)
                .take(pacer.lanes(&settings, VERIFY_LANES))
                .collect();
            let taken: usize = lanes.iter().map(|l| l.len()).sum();
            let began = Instant::now();
            let reads = lanes.iter().map(|chunk| async {
                let (there, here) = tokio::join!(
                    digests(&source, chunk.to_vec()),
                    digests(&target, chunk.to_vec())
                );
                Ok::<_, RangeStop>((there?, here?))
            });
            let reads = futures_util::future::join_all(reads).await;
            if let Some(Err(e)) = reads.iter().find(|r| r.is_err()) {
                // A busy bulkhead is waited out; another failure reads again,
                // smaller (see [`Retries`]).
                let busy = matches!(e, RangeStop::Service(ServiceError::ShardBusy { .. }));
                let Some(wait) = retries.after_failure(busy) else {
                    return Err(RangeStop::Failed(format!(
                        "the digest check failed too many times in a row: {e}"
                    )));
                };
                if !busy {
                    sizer.failed();
                }
                tracing::warn!(error = %e, busy, "a read of the range's digest check failed; reading again");
                tokio::time::sleep(wait).await;
                continue;
            }
            retries.succeeded();
            sizer.took(began.elapsed(), aim);
            at += taken;
            for (there, here) in reads.into_iter().flatten() {
                for (chat, d) in &there {
                    let Some(h) = here.get(chat).filter(|h| h.revision == d.revision) else {
                        continue;
                    };
                    compared.insert(chat.clone());
                    if h != d {
                        tracing::warn!(chat = %chat, source = ?d, target = ?h, "a chat of a range differs from its copy");
                        differ.push(chat.clone());
                    }
                }
            }
            let lanes = pacer.lanes(&settings, VERIFY_LANES);
            let pause = pacer.pace(&settings, 0);
            sizer.spread(lanes, pacer.lanes(&settings, VERIFY_LANES));
            tokio::time::sleep(pause).await;
        }
    }
    Ok(Verified {
        differ,
        compared: compared.len() as u64,
        took: began.elapsed(),
    })
}

async fn digests(
    shard: &Arc<Shard>,
    ids: Vec<String>,
) -> Result<HashMap<String, Digest>, RangeStop> {
    Ok(shard
        .read(None, "move_digest", move |conn| {
            Box::pin(async move {
                server::repeatable_read_next(&mut *conn).await?;
                let mut tx = conn.begin().await?;
                let all = moves::digests(&mut tx, &ids).await?;
                tx.commit().await?;
                Ok(all)
            })
        })
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn behind(gaps: &[u64], tag: &str) -> Vec<Behind> {
        gaps.iter()
            .enumerate()
            .map(|(i, g)| Behind {
                chat: format!("{tag}{i}"),
                from: 10,
                to: 10 + g,
            })
            .collect()
    }

    proptest! {
        #[test]
        fn a_range_is_read_in_stretches_that_cover_it_once_in_order(
            first in 0u16..1024,
            len in 0u16..1024,
            n in 0usize..70,
        ) {
            let last = (first + len).min(1023);
            let slices = slices_of((first, last), n);
            prop_assert_eq!(slices.len(), n.clamp(1, usize::from(last - first) + 1));
            prop_assert_eq!(slices.first().map(|s| s.0), Some(first));
            prop_assert_eq!(slices.last().map(|s| s.1), Some(last));
            for w in slices.windows(2) {
                prop_assert_eq!(w[1].0, w[0].1 + 1);
            }
            let sizes: Vec<u16> = slices.iter().map(|(a, b)| b - a + 1).collect();
            prop_assert!(sizes.iter().all(|s| *s >= 1));
            prop_assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        }

        #[test]
        fn every_behind_chat_is_batched_once_within_the_limits(
            gaps in proptest::collection::vec(1u64..5_000, 0..300),
            lefts in proptest::collection::vec(1u64..5_000, 0..20),
            chats in 1usize..400,
            budget in 10u64..20_000,
        ) {
            let all = behind(&gaps, "c");
            let mut left = behind(&lefts, "l");
            let mut rest: &[Behind] = &all;
            let mut seen: Vec<String> = Vec::new();
            loop {
                let chunk = next_chunk(&mut rest, &mut left, chats, budget);
                if chunk.is_empty() {
                    break;
                }
                prop_assert!(chunk.len() <= chats);
                let sum: u64 = chunk.iter().map(|b| b.to - b.from).sum();
                prop_assert!(chunk.len() == 1 || sum <= budget, "{} chats, {sum} revisions", chunk.len());
                seen.extend(chunk.into_iter().map(|b| b.chat));
            }
            let mut want: Vec<String> = lefts
                .iter()
                .enumerate()
                .map(|(i, _)| format!("l{i}"))
                .chain(gaps.iter().enumerate().map(|(i, _)| format!("c{i}")))
                .collect();
            want.sort();
            seen.sort();
            prop_assert_eq!(seen, want);
        }
    }
}
