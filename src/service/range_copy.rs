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
use super::now;
use super::range_diff::{self, Behind, Diff};
use super::range_move::{RangeMove, RangeStop};
use super::replay;
use crate::shard::{OpError, Shard};
use crate::storage::moves::{self, Digest, LogRow};
use crate::storage::range_copy::{self, RangeChat, Snapshot};
use crate::storage::{buckets, server};

/// Range chats read per statement when a pass reads a side.
const READ_PAGE: u32 = 5_000;
/// Chats dropped or given markers per target transaction.
const REPLAY_CHATS: usize = 100;
/// Chats whose digests are compared per read.
const VERIFY_CHATS: usize = 500;
/// Chats replayed per target transaction, at most.
const MAX_REPLAY_CHATS: usize = 100;
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
}

impl Pass {
    pub(super) fn stats(&self) -> PassStats {
        PassStats {
            chats: self.copied + self.replayed,
            revisions: self.revisions,
            rows: self.rows,
            ms: self.took.as_millis() as u64,
        }
    }
}

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

    /// The range's chats on `shard`, in index order.
    async fn side(&self, shard: &Arc<Shard>) -> Result<Vec<RangeChat>, RangeStop> {
        let span = self.span();
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

    /// What the next pass must do.
    pub(super) async fn diff(&self) -> Result<Diff, RangeStop> {
        let source = self.side(&self.source).await?;
        let target = self.side(&self.target).await?;
        let d = range_diff::diff(&source, &target, self.source.name(), self.target.name());
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
        // `moves.concurrent_chats` snapshot batches at once, each its own
        // transactions; the pause (and the record) after each round.
        let lanes = self.service.move_settings.concurrent_batches.max(1);
        let mut at = 0;
        while at < d.snapshot.len() {
            let n = self.chats_per_batch(fenced);
            let mut round = Vec::new();
            while at < d.snapshot.len() && round.len() < lanes {
                let ids: Vec<String> = d.snapshot[at..(at + n).min(d.snapshot.len())].to_vec();
                at += ids.len();
                round.push(self.copy_snapshot(ids));
            }
            let (mut copied, mut rows, mut revisions) = (0, 0, 0);
            for done in futures_util::future::join_all(round).await {
                let (c, r, v) = done?;
                (copied, rows, revisions) = (copied + c, rows + r, revisions + v);
            }
            if copied > 0 {
                self.rows_per_chat = rows as f64 / copied as f64;
            }
            pass.copied += copied;
            pass.rows += rows;
            pass.revisions += revisions;
            self.stats.chats_copied += copied;
            self.stats.rows_copied += rows;
            self.after_batch(fenced, revisions).await?;
        }
        // Replays run one batch at a time: concurrent replay batches on the
        // target overran the shard's deadline under 16 writers (measured).
        let chunks = self.replay_chunks(&d.behind, fenced);
        for round in chunks.chunks(1) {
            let replays = round.iter().map(|chunk| self.replay(chunk.to_vec()));
            let (mut rows, mut revisions) = (0, 0);
            for done in futures_util::future::join_all(replays).await {
                let (r, v) = done?;
                (rows, revisions) = (rows + r, revisions + v);
            }
            pass.replayed += round.iter().map(|c| c.len() as u64).sum::<u64>();
            pass.rows += rows;
            pass.revisions += revisions;
            self.stats.rows_copied += rows;
            self.stats.revisions_replayed += revisions;
            self.after_batch(fenced, revisions).await?;
        }
        pass.took = began.elapsed();
        Ok(pass)
    }

    /// The behind chats in batches of about three times the pacer's batch
    /// of revisions (3,000 at the default), at most [`MAX_REPLAY_CHATS`].
    fn replay_chunks<'b>(&self, behind: &'b [Behind], fenced: bool) -> Vec<&'b [Behind]> {
        let budget = u64::from(self.batch(fenced)) * 3;
        let mut chunks = Vec::new();
        let (mut start, mut sum) = (0, 0);
        for (i, b) in behind.iter().enumerate() {
            if i > start && (sum + (b.to - b.from) > budget || i - start >= MAX_REPLAY_CHATS) {
                chunks.push(&behind[start..i]);
                (start, sum) = (i, 0);
            }
            sum += b.to - b.from;
        }
        if start < behind.len() {
            chunks.push(&behind[start..]);
        }
        chunks
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
    /// the last batch had; at least one, at most 500.
    fn chats_per_batch(&self, fenced: bool) -> usize {
        let n = f64::from(self.batch(fenced)) * 5.0 / self.rows_per_chat.max(1.0);
        (n as usize).clamp(1, 500)
    }

    /// After each batch: the pause (none under the fence), the record (at
    /// most every 500 ms, with the p99 the others see) and a cancel check.
    async fn after_batch(&mut self, fenced: bool, revisions: u64) -> Result<(), RangeStop> {
        if !fenced {
            let pause = self.pacer.pace(&self.service.move_settings, revisions);
            tokio::time::sleep(pause).await;
            self.note_p99_during();
        }
        if self.last_record.elapsed() >= Duration::from_millis(500) {
            self.last_record = Instant::now();
            self.record_now().await;
            if !fenced && self.service.cancel_asked(self.id).await {
                return Err(RangeStop::Cancelled);
            }
        }
        Ok(())
    }

    /// Copies `ids` whole: one consistent read on the source, one write
    /// transaction on the target. The chats copied (those still live on the
    /// source), the rows and the revisions.
    async fn copy_snapshot(&self, ids: Vec<String>) -> Result<(u64, u64, u64), RangeStop> {
        let snap: Snapshot = self
            .source
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
        let (chats, rows) = (snap.chats.len() as u64, snap.rows());
        let revisions = snap
            .chats
            .iter()
            .map(|c| c.revision + 1 - c.first_revision.min(c.revision + 1))
            .sum();
        if chats == 0 {
            return Ok((0, 0, 0));
        }
        let source = self.source.name().to_owned();
        let written = self
            .target
            .write(None, "move_range_write", move |conn| {
                Box::pin(async move {
                    let mut tx = conn.begin().await?;
                    match range_copy::write_snapshot(&mut tx, &snap, &source).await {
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
                self.target.name()
            )));
        }
        Ok((chats, rows, revisions))
    }

    /// Replays the log of `behind` chats onto their copies until each
    /// reaches its revision: each round one read of every chat's next
    /// events and one target transaction. The rows and revisions written.
    async fn replay(&self, mut behind: Vec<Behind>) -> Result<(u64, u64), RangeStop> {
        let (mut rows_written, mut revisions) = (0, 0);
        // About three times the batch of revisions per transaction, over
        // the chats.
        let limit = (self.service.move_settings.batch * 3 / behind.len().max(1) as u32).max(10);
        while !behind.is_empty() {
            let from: Vec<(String, u64)> =
                behind.iter().map(|b| (b.chat.clone(), b.from)).collect();
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
            let batches: Vec<(String, u64, Vec<LogRow>)> = behind
                .iter()
                .map(|b| {
                    let rows: Vec<LogRow> = logs
                        .remove(&b.chat)
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|r| r.revision <= b.to)
                        .collect();
                    (b.chat.clone(), b.from, rows)
                })
                .collect();
            let n: u64 = batches.iter().map(|(_, _, r)| r.len() as u64).sum();
            let applied = self
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
            rows_written += applied.1;
            revisions += n;
            let reached: HashMap<String, u64> = applied.0.into_iter().collect();
            // A chat goes on from where it now stands; one whose copy stood
            // elsewhere (or whose log ended short) is left to the next pass.
            behind = behind
                .into_iter()
                .filter_map(|b| {
                    let at = *reached.get(&b.chat)?;
                    (at > b.from && at < b.to).then_some(Behind { from: at, ..b })
                })
                .collect();
        }
        Ok((rows_written, revisions))
    }

    /// Compares each chat in step with its copy by digest (revision, count,
    /// JOINED rows and a checksum of every table, as a single move
    /// verifies), a batch at a time, each side read in one snapshot; chats
    /// that changed between the two reads are left to the fenced check.
    /// The chats that differ.
    pub(super) async fn verify(&mut self) -> Result<Vec<String>, RangeStop> {
        let source = self.side(&self.source).await?;
        let live: Vec<String> = source
            .iter()
            .filter(|c| c.moved_to.is_none())
            .map(|c| c.chat_id.clone())
            .collect();
        let mut differ = Vec::new();
        for chunk in live.chunks(VERIFY_CHATS) {
            let there = self.digests(&self.source, chunk.to_vec()).await?;
            let here = self.digests(&self.target, chunk.to_vec()).await?;
            for (chat, d) in &there {
                // Not copied yet, or changed since: the next pass copies it.
                let Some(h) = here.get(chat).filter(|h| h.revision == d.revision) else {
                    continue;
                };
                if h != d {
                    tracing::warn!(chat = %chat, source = ?d, target = ?h, "a chat of a range differs from its copy");
                    differ.push(chat.clone());
                }
            }
            let pause = self.pacer.pace(&self.service.move_settings, 0);
            tokio::time::sleep(pause).await;
        }
        Ok(differ)
    }

    async fn digests(
        &self,
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
}
