//! One chat's move carried out on its shards: the [`ChatMove`] the move
//! driver (`move_driver.rs`) runs, and the service's steps it is made of
//! (open the target, copy the log or a snapshot, fence, compare, switch,
//! clean, roll back). What a step does is here; which step comes next is
//! decided in `move_plan.rs`, and what a replayed batch writes in
//! `replay.rs`.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;

use super::move_driver::{self, Outcome};
use super::move_plan::{Act, Phase, Seen, Unit};
use super::moves::{Hold, MoveSettings, SUPERSEDED, Stop};
use super::pacer::Pacer;
use super::range_copy::replay_onto;
use super::{ChatService, ServiceError, now};
use crate::domain::ChatId;
use crate::shard::{OpError, Shard};
use crate::storage::moves::{self, CleanTable, Digest, LogRow};

/// Copy rounds in a row whose lag does not shrink before the p99 throttle
/// gives way (see [`Pacer::give_way`]).
const STALLED_ROUNDS: u32 = 3;

/// One chat's move as the driver sees it ([`move_driver::Mover`]): the acts
/// the machine decides, carried out on its source and target.
pub(super) struct ChatMove<'a> {
    service: &'a ChatService,
    hold: Hold,
    chat: ChatId,
    source: Arc<Shard>,
    target: Arc<Shard>,
    settings: MoveSettings,
    pacer: Pacer,
    /// Taken over: the target's copy may stand where the old driver left it.
    pub(super) resuming: bool,
    /// The last revision copied to the target (what its record says).
    pub(super) copied: u64,
    /// What [`Act::Open`] found: the source's first revision (above 1: a
    /// purged log, copied from a snapshot), and where a resumed copy stands.
    opened: Option<(u64, Option<u64>)>,
    /// The snapshot (or the resumed copy) is in: the copy replays the log.
    replaying: bool,
    /// The revision the fence froze.
    frozen: u64,
}

impl<'a> ChatMove<'a> {
    pub(super) fn new(
        service: &'a ChatService,
        hold: Hold,
        chat: ChatId,
        (source, target): (Arc<Shard>, Arc<Shard>),
        pacer: Pacer,
    ) -> Self {
        Self {
            settings: service.move_settings.clone(),
            service,
            hold,
            chat,
            source,
            target,
            pacer,
            resuming: false,
            copied: 0,
            opened: None,
            replaying: false,
            frozen: 0,
        }
    }

    pub(super) fn log(&self, outcome: &Outcome) {
        let (chat, from, to) = (&self.chat, self.source.name(), self.target.name());
        match outcome {
            Outcome::Ended {
                phase: Phase::Done, ..
            } => {
                tracing::info!(chat = %chat, from, to, revision = self.copied, "chat_moved")
            }
            Outcome::Ended {
                phase: Phase::Cancelled,
                ..
            } => tracing::info!(chat = %chat, from, to, "chat_move_cancelled"),
            Outcome::Ended { reason, .. } => {
                tracing::warn!(chat = %chat, from, to, error = reason.as_deref().unwrap_or(""), "chat_move_rolled_back")
            }
            Outcome::Left(reason) if reason == SUPERSEDED => {
                tracing::info!(chat = %chat, from, to, "chat_move_taken_over")
            }
            Outcome::Left(reason) => {
                tracing::warn!(chat = %chat, from, to, error = %reason, "chat_move_stopped; left to a takeover")
            }
        }
    }

    /// The source's head; the target's row opened, or (resuming) found
    /// where the old driver left it.
    async fn open(&mut self) -> Result<(), Stop> {
        let c = self.chat.to_string();
        let head = self
            .source
            .read(Some(&self.chat), "move_head", move |conn| {
                Box::pin(async move { Ok(moves::head(conn, &c).await?) })
            })
            .await?
            .ok_or(Stop::Gone)?;
        // A move taken over goes on with its target's copy, if the target
        // holds one for this source.
        let resumed = if self.resuming {
            match self.service.row_on(&self.chat, &self.target).await? {
                Some((at, Some(holder))) if holder == self.source.name() => Some(at),
                _ => None,
            }
        } else {
            None
        };
        if let Some(at) = resumed {
            tracing::info!(chat = %self.chat, revision = at, "resuming a chat move's copy where its target stands");
        } else {
            self.service
                .open_target(&self.chat, &head, (&self.source, &self.target))
                .await?;
        }
        self.copied = resumed.unwrap_or(0);
        self.opened = Some((head.first_revision, resumed));
        Ok(())
    }

    /// Copies while writes go on, each round up to the revision the source
    /// had when it began, until the target is close behind; paced. A purged
    /// log: the rows as they stand first (again, if a snapshot was not
    /// settled: its pages are idempotent).
    async fn copy(&mut self) -> Result<(), Stop> {
        let (service, chat, hold) = (self.service, &self.chat, self.hold);
        let (source, target) = (&self.source, &self.target);
        if !self.replaying {
            let (first, resumed) = self.opened.unwrap_or((1, None));
            self.copied = match resumed {
                Some(at) if at > 0 => at,
                _ if first > 1 => {
                    service
                        .copy_snapshot(
                            hold,
                            chat,
                            (source, target),
                            &self.settings,
                            &mut self.pacer,
                            first,
                        )
                        .await?
                }
                _ => 0,
            };
            self.replaying = true;
        }
        // Rounds in a row whose lag did not shrink.
        let (mut last_lag, mut stalled) = (u64::MAX, 0);
        loop {
            let latest = service.source_revision(chat, source).await?;
            let lag = latest.saturating_sub(self.copied);
            if lag <= self.settings.fence_lag {
                return Ok(());
            }
            stalled = if lag >= last_lag { stalled + 1 } else { 0 };
            last_lag = lag;
            if stalled >= STALLED_ROUNDS {
                self.pacer.give_way(&self.settings);
            }
            self.copied = service
                .copy_until(
                    (hold, Phase::Copying),
                    chat,
                    (source, target),
                    &self.settings,
                    Some(&mut self.pacer),
                    latest,
                )
                .await?;
        }
    }

    /// The fence: from here the source takes no write of the chat.
    async fn fence(&mut self) -> Result<(), Stop> {
        let (c, ms) = (
            self.chat.to_string(),
            self.settings.fence.as_millis() as u64,
        );
        self.frozen = self
            .source
            .write(Some(&self.chat), "move_fence", move |conn| {
                Box::pin(async move {
                    // One transaction: the revision read under the row lock
                    // is the last one the source takes.
                    let mut tx = conn.begin().await?;
                    let frozen = moves::fence(&mut tx, &c, ms).await?;
                    tx.commit().await.map_err(OpError::Commit)?;
                    Ok(frozen)
                })
            })
            .await?
            .ok_or(Stop::Gone)?;
        Ok(())
    }

    /// Under the fence the chat's writes wait: no pause. Then the two
    /// copies compared.
    async fn copy_fenced(&mut self) -> Result<Seen, Stop> {
        let (service, chat) = (self.service, &self.chat);
        let (source, target) = (&self.source, &self.target);
        self.copied = service
            .copy_until(
                (self.hold, Phase::Fenced),
                chat,
                (source, target),
                &self.settings,
                None,
                self.frozen,
            )
            .await?;
        let (from, to) = (
            service.digest(chat, source).await?,
            service.digest(chat, target).await?,
        );
        // Writes past the frozen revision: the fence lapsed before the
        // copies were compared (a slow target), and they cannot agree.
        // Copy on and fence again, as for a lapse found at the switch.
        if from.revision != self.frozen
            || (from != to && service.source_revision(chat, source).await? != self.frozen)
        {
            tracing::warn!(chat = %chat, "the fence lapsed before the verification; copying on");
            return Ok(Seen::Lapsed);
        }
        if from != to {
            return Err(Stop::Mismatch {
                from: Box::new(from),
                to: Box::new(to),
            });
        }
        Ok(Seen::Verified)
    }

    /// The switch's first step: the tombstone at the source, only if the
    /// fence still holds, no cancel came first and this driver holds the
    /// move.
    async fn switch(&mut self) -> Seen {
        let (c, to_name, hold, frozen) = (
            self.chat.to_string(),
            self.target.name().to_owned(),
            self.hold,
            self.frozen,
        );
        let written = self
            .source
            .write(Some(&self.chat), "move_switch", move |conn| {
                Box::pin(async move {
                    let mut tx = conn.begin().await?;
                    let step =
                        moves::switch_source(&mut tx, hold, &c, &to_name, frozen, now()).await?;
                    if step == moves::SwitchStep::Done {
                        tx.commit().await.map_err(OpError::Commit)?;
                    } else {
                        tx.rollback().await?;
                    }
                    Ok(step)
                })
            })
            .await;
        let step = match written {
            Ok(step) => step,
            // The commit's outcome may be unknown: the source says
            // whether the tombstone went in. If it cannot say, the move
            // is left as it stands to the instance that takes it over.
            Err(e) => match self.service.row_on(&self.chat, &self.source).await {
                Ok(Some((_, Some(to)))) if to == self.target.name() => moves::SwitchStep::Done,
                Ok(_) => return Seen::Failed(ServiceError::from(e).to_string()),
                Err(_) => return Seen::Undecided(e.to_string()),
            },
        };
        match step {
            moves::SwitchStep::Done => Seen::Switched,
            moves::SwitchStep::Cancelled => Seen::Cancelled,
            moves::SwitchStep::Superseded => Seen::Superseded,
            moves::SwitchStep::Lapsed => {
                tracing::warn!(chat = %self.chat, "the fence lapsed before the switch; copying on");
                Seen::Lapsed
            }
        }
    }

    /// Past the tombstone there is no way back: the switch's other steps
    /// are retried until they are done, for as long as this driver holds
    /// the move (the instance that takes it over finishes them otherwise).
    async fn finish(&mut self) -> Seen {
        let mut pause = Duration::from_millis(100);
        while let Err(e) = self
            .service
            .finish_switch(&self.chat, &self.source, &self.target)
            .await
        {
            tracing::warn!(chat = %self.chat, error = %e, "finishing a switch failed; retrying");
            if let Seen::Superseded = move_driver::Mover::record(self, Phase::Switching).await {
                return Seen::Superseded;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
        Seen::Finished
    }

    /// Whether this driver still holds the move, asked before it is undone.
    async fn confirm(&self) -> Seen {
        match self.service.standing(&self.source, self.hold).await {
            Some(moves::Standing::Holds | moves::Standing::Cancelled) => Seen::Holds,
            // Another driver took the move over meanwhile: its copy is not
            // this one's to drop.
            Some(moves::Standing::Superseded) => Seen::Superseded,
            // The source cannot be asked (nor its record ended): the
            // instance that takes the move over after its lease resumes it
            // from the target's copy, which is left as it stands.
            None => Seen::Unreachable,
        }
    }
}

impl From<Stop> for Seen {
    fn from(stop: Stop) -> Self {
        match stop {
            Stop::Cancelled => Seen::Cancelled,
            Stop::Superseded => Seen::Superseded,
            other => Seen::Failed(other.to_string()),
        }
    }
}

fn seen(done: Result<(), Stop>, then: Seen) -> Seen {
    match done {
        Ok(()) => then,
        Err(stop) => stop.into(),
    }
}

impl move_driver::Mover for ChatMove<'_> {
    fn unit(&self) -> Unit {
        Unit::Chat
    }

    async fn act(&mut self, act: Act) -> Seen {
        match act {
            Act::Nothing => Seen::Recorded,
            Act::Open => seen(self.open().await, Seen::Opened),
            Act::Copy => seen(self.copy().await, Seen::CaughtUp),
            Act::Fence => seen(self.fence().await, Seen::Fenced),
            Act::CopyFenced => self.copy_fenced().await.unwrap_or_else(Seen::from),
            Act::Switch => self.switch().await,
            Act::FinishSwitch => self.finish().await,
            Act::Clean => {
                // Switched: whoever holds the move now, the clean-up is the
                // same (and idempotent).
                self.service
                    .clean_source(
                        &self.chat,
                        &self.source,
                        &self.settings,
                        Some(&mut self.pacer),
                    )
                    .await;
                Seen::Cleaned
            }
            Act::Confirm => self.confirm().await,
            Act::LiftFence => {
                self.service.unfence(&self.chat, &self.source).await;
                Seen::FenceLifted
            }
            Act::RollBack => {
                // The chat stays where it is.
                self.service
                    .roll_back(&self.chat, &self.source, &self.target, &self.settings)
                    .await;
                self.copied = 0;
                Seen::RolledBack(None)
            }
        }
    }

    async fn record(&mut self, phase: Phase) -> Seen {
        let recorded = self
            .service
            .record(&self.source, self.hold, phase, self.copied, None, false)
            .await;
        seen(recorded, Seen::Recorded)
    }

    async fn end(&mut self, phase: Phase, reason: Option<&str>) {
        // The record's outcome changes nothing now: a takeover meanwhile
        // ends the move its own way.
        let _ = self
            .service
            .record(&self.source, self.hold, phase, self.copied, reason, true)
            .await;
    }
}

impl ChatService {
    /// Switch steps 2 and 3: the target made live, the home shard's marker
    /// pointed at it (idempotent).
    async fn finish_switch(
        &self,
        chat: &ChatId,
        source: &Arc<Shard>,
        target: &Arc<Shard>,
    ) -> Result<(), Stop> {
        let c = chat.to_string();
        target
            .write(Some(chat), "move_live", move |conn| {
                Box::pin(async move { Ok(moves::set_marker(conn, &c, None).await?) })
            })
            .await?;
        let home = self.shards.home_of(chat).clone();
        if !Arc::ptr_eq(&home, source) && !Arc::ptr_eq(&home, target) {
            let (c, to_name) = (chat.to_string(), target.name().to_owned());
            home.write(Some(chat), "move_home_marker", move |conn| {
                Box::pin(async move { Ok(moves::set_marker(conn, &c, Some(&to_name)).await?) })
            })
            .await?;
        }
        self.shards.relocate(chat, target.name());
        Ok(())
    }

    /// Undoes a move that did not switch: no fence at the source, and the
    /// target's copy (still marked as held by the source) dropped.
    async fn roll_back(
        &self,
        chat: &ChatId,
        source: &Arc<Shard>,
        target: &Arc<Shard>,
        settings: &MoveSettings,
    ) {
        self.unfence(chat, source).await;
        self.drop_copy(chat, target, settings).await;
    }

    /// Lifts the chat's fence at the source, if it stands.
    async fn unfence(&self, chat: &ChatId, source: &Arc<Shard>) {
        let c = chat.to_string();
        let _ = source
            .write(Some(chat), "move_unfence", move |conn| {
                Box::pin(async move { Ok(moves::unfence(conn, &c).await?) })
            })
            .await;
    }

    /// The target's row, marked as held by the source until the switch (any
    /// rows a marker there still had dropped); refused if the chat is live
    /// on the target.
    async fn open_target(
        &self,
        chat: &ChatId,
        head: &moves::ChatHead,
        (source, target): (&Arc<Shard>, &Arc<Shard>),
    ) -> Result<(), Stop> {
        let (c, src, head) = (chat.to_string(), source.name().to_owned(), head.clone());
        let opened = target
            .write(Some(chat), "move_open", move |conn| {
                Box::pin(async move {
                    let mut tx = conn.begin().await?;
                    match moves::open_target(&mut tx, &c, &head, &src).await {
                        Ok(()) => {}
                        Err(moves::OpenError::Sql(e)) => return Err(e.into()),
                        Err(moves::OpenError::Live) => {
                            tx.rollback().await?;
                            return Ok(false);
                        }
                    }
                    tx.commit().await.map_err(OpError::Commit)?;
                    Ok(true)
                })
            })
            .await?;
        if opened {
            Ok(())
        } else {
            Err(Stop::TargetLive)
        }
    }

    /// The copy of a chat whose log was purged (its first stored revision
    /// `first` is above 1), which replaying the log cannot rebuild: its rows
    /// as they stand are copied, members, then messages, then the stored
    /// events up to the revision the source had when this began, a page per
    /// transaction at each end, paced. The target then stands at that
    /// revision, with its count taken from its rows, and the log's replay
    /// goes on from there. Returns that revision.
    ///
    /// Writes go on at the source meanwhile, so a row may be copied with a
    /// later write already in it. Replaying that write again leaves it as it
    /// is: the replay sets each member it touches to its state after the
    /// batch and counts the change from the target's row, and a message or
    /// event above the revision is not copied here. So the copy needs no
    /// lock or long transaction on the source.
    async fn copy_snapshot(
        &self,
        hold: Hold,
        chat: &ChatId,
        (source, target): (&Arc<Shard>, &Arc<Shard>),
        settings: &MoveSettings,
        pacer: &mut Pacer,
        first: u64,
    ) -> Result<u64, Stop> {
        let until = self.source_revision(chat, source).await?;
        // Members, in user order.
        let mut after = String::new();
        loop {
            let (c, from, n) = (chat.to_string(), after.clone(), pacer.batch);
            let rows = source
                .read(Some(chat), "move_snapshot_read", move |conn| {
                    Box::pin(async move { Ok(moves::members_after(conn, &c, &from, n).await?) })
                })
                .await?;
            let Some(last) = rows.last() else { break };
            after.clone_from(&last.user_id);
            let n = rows.len() as u64;
            let c = chat.to_string();
            self.snapshot_page(chat, target, move |conn| {
                Box::pin(async move { moves::insert_members(conn, &c, &rows).await })
            })
            .await?;
            self.snapshot_step(hold, source, settings, pacer, n).await?;
        }
        // Messages (none is purged), in the order of their unique key; those
        // above the revision come with the log's replay.
        let mut after = (String::new(), String::new());
        loop {
            let (c, from, n) = (chat.to_string(), after.clone(), pacer.batch);
            let rows = source
                .read(Some(chat), "move_snapshot_read", move |conn| {
                    Box::pin(async move {
                        Ok(moves::messages_after(conn, &c, (&from.0, &from.1), n).await?)
                    })
                })
                .await?;
            let Some(last) = rows.last() else { break };
            after = (last.sender_id.clone(), last.client_message_id.clone());
            let n = rows.len() as u64;
            let rows: Vec<_> = rows.into_iter().filter(|m| m.revision <= until).collect();
            let c = chat.to_string();
            self.snapshot_page(chat, target, move |conn| {
                Box::pin(async move { moves::insert_messages(conn, &c, &rows).await })
            })
            .await?;
            self.snapshot_step(hold, source, settings, pacer, n).await?;
        }
        // The stored events, each message event naming the target's message.
        let mut after = first - 1;
        while after < until {
            let (c, n) = (chat.to_string(), pacer.batch);
            let rows = source
                .read(Some(chat), "move_snapshot_read", move |conn| {
                    Box::pin(async move {
                        Ok(moves::events_between(conn, &c, (after, until), n).await?)
                    })
                })
                .await?;
            let Some(last) = rows.last() else { break };
            after = last.revision;
            let n = rows.len() as u64;
            let c = chat.to_string();
            self.snapshot_page(chat, target, move |conn| {
                Box::pin(async move { moves::insert_events(conn, &c, &rows).await })
            })
            .await?;
            self.snapshot_step(hold, source, settings, pacer, n).await?;
        }
        let c = chat.to_string();
        self.snapshot_page(chat, target, move |conn| {
            Box::pin(async move { moves::settle_snapshot(conn, &c, until, first).await })
        })
        .await?;
        tracing::info!(chat = %chat, revision = until, first_revision = first, "a purged chat's rows copied; its log is replayed from here");
        Ok(until)
    }

    /// One page of a snapshot written on the target, in a transaction that
    /// holds the chat's row and finds it still at revision 0 (the snapshot
    /// not settled yet).
    async fn snapshot_page<F>(
        &self,
        chat: &ChatId,
        target: &Arc<Shard>,
        write: F,
    ) -> Result<(), Stop>
    where
        F: for<'c> FnOnce(
                &'c mut sqlx::MySqlConnection,
            ) -> futures_util::future::BoxFuture<'c, sqlx::Result<()>>
            + Send
            + 'static,
    {
        let c = chat.to_string();
        let written = target
            .write(Some(chat), "move_snapshot_write", move |conn| {
                Box::pin(async move {
                    let mut tx = conn.begin().await?;
                    if moves::lock_revision(&mut tx, &c).await? != Some(0) {
                        tx.rollback().await?;
                        return Ok(false);
                    }
                    write(&mut tx).await?;
                    tx.commit().await.map_err(OpError::Commit)?;
                    Ok(true)
                })
            })
            .await?;
        if written {
            Ok(())
        } else {
            Err(Stop::SnapshotTaken)
        }
    }

    /// After a page of a snapshot: the move's lease renewed (and a cancel
    /// seen), then the pacer's pause.
    async fn snapshot_step(
        &self,
        hold: Hold,
        source: &Arc<Shard>,
        settings: &MoveSettings,
        pacer: &mut Pacer,
        rows: u64,
    ) -> Result<(), Stop> {
        self.record_copy(source, hold, Phase::Copying, (0, rows), None, false)
            .await?;
        tokio::time::sleep(pacer.pace(settings, rows)).await;
        Ok(())
    }

    /// Replays the source's log on the target up to `until`, paced by
    /// `pacer` if given; the target's revision after.
    async fn copy_until(
        &self,
        (hold, phase): (Hold, Phase),
        chat: &ChatId,
        (source, target): (&Arc<Shard>, &Arc<Shard>),
        settings: &MoveSettings,
        mut pacer: Option<&mut Pacer>,
        until: u64,
    ) -> Result<u64, Stop> {
        loop {
            let (at, _) = self.row_on(chat, target).await?.ok_or(Stop::Gone)?;
            if at >= until {
                return Ok(at);
            }
            let batch = pacer.as_deref().map_or(settings.batch, |p| p.batch);
            let c = chat.to_string();
            let rows: Vec<LogRow> = source
                .read(Some(chat), "move_read_log", move |conn| {
                    Box::pin(async move { Ok(moves::log_after(conn, &c, at, batch).await?) })
                })
                .await?;
            let rows: Vec<LogRow> = rows.into_iter().filter(|r| r.revision <= until).collect();
            let Some(last) = rows.last().map(|r| r.revision) else {
                return Ok(at);
            };
            let c = chat.to_string();
            let written = target
                .write(Some(chat), "move_replay", move |conn| {
                    Box::pin(async move {
                        let mut tx = conn.begin().await?;
                        // The copy goes on from where the target stands: a
                        // batch replayed already (a retry) is not replayed twice.
                        let Some(written) = replay_onto(&mut tx, &c, at, &rows).await? else {
                            tx.rollback().await?;
                            return Ok(0);
                        };
                        tx.commit().await.map_err(OpError::Commit)?;
                        Ok(written)
                    })
                })
                .await?;
            // Progress, and the move's lease: a move whose record stops
            // moving is taken for abandoned (see `recover_moves`).
            self.record_copy(source, hold, phase, (last, written), None, false)
                .await?;
            if let Some(pacer) = pacer.as_deref_mut() {
                tokio::time::sleep(pacer.pace(settings, last - at)).await;
            }
        }
    }

    /// The chat's revision on `shard` and its marker there (`None`: no row).
    pub(super) async fn row_on(
        &self,
        chat: &ChatId,
        shard: &Shard,
    ) -> Result<Option<(u64, Option<String>)>, crate::shard::ShardError> {
        let c = chat.to_string();
        shard
            .read(Some(chat), "move_chat_row", move |conn| {
                Box::pin(async move { Ok(crate::storage::chats::revision(conn, &c).await?) })
            })
            .await
    }

    async fn source_revision(&self, chat: &ChatId, source: &Arc<Shard>) -> Result<u64, Stop> {
        match self.row_on(chat, source).await? {
            Some((revision, None)) => Ok(revision),
            _ => Err(Stop::Gone),
        }
    }

    async fn digest(&self, chat: &ChatId, shard: &Arc<Shard>) -> Result<Digest, Stop> {
        let c = chat.to_string();
        Ok(shard
            .read(Some(chat), "move_digest", move |conn| {
                Box::pin(async move { Ok(moves::digest(conn, &c).await?) })
            })
            .await?)
    }

    /// Deletes the moved chat's rows from `shard`, a batch at a time (paced
    /// by `pacer` if given); the chat row stays as the tombstone.
    async fn clean_source(
        &self,
        chat: &ChatId,
        shard: &Arc<Shard>,
        settings: &MoveSettings,
        mut pacer: Option<&mut Pacer>,
    ) {
        for table in [
            CleanTable::Events,
            CleanTable::Messages,
            CleanTable::Members,
        ] {
            loop {
                let n = pacer
                    .as_deref()
                    .map_or(settings.clean_batch, |p| p.clean_batch(settings));
                let c = chat.to_string();
                let deleted = shard
                    .write(Some(chat), "move_clean", move |conn| {
                        Box::pin(async move { Ok(moves::clean(conn, table, &c, n).await?) })
                    })
                    .await;
                match deleted {
                    Ok(n) if n > 0 => {
                        let pause = match pacer.as_deref_mut() {
                            Some(p) => p.pace(settings, 0),
                            None => settings.pause,
                        };
                        tokio::time::sleep(pause).await;
                    }
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(chat = %chat, error = %crate::error::chain(&e), "cleaning a moved chat's rows stopped; they stay behind its tombstone");
                        return;
                    }
                }
            }
        }
    }

    /// Drops what a rolled-back move copied to the target (its rows, then its
    /// chat row), if the target's row is still the copy's (marked).
    async fn drop_copy(&self, chat: &ChatId, target: &Arc<Shard>, settings: &MoveSettings) {
        let marked = self.row_on(chat, target).await;
        if !matches!(marked, Ok(Some((_, Some(_))))) {
            return;
        }
        self.clean_source(chat, target, settings, None).await;
        let c = chat.to_string();
        let _ = target
            .write(Some(chat), "move_drop_copy", move |conn| {
                Box::pin(async move { Ok(moves::drop_chat_row(conn, &c).await?) })
            })
            .await;
    }

    /// Writes the move's phase and progress (its lease) as driver `hold`;
    /// `Err` when the driver is to stop: a cancel was asked for, or another
    /// driver took the move over. A record that cannot be written is logged
    /// and the move goes on (its next write renews the lease).
    async fn record(
        &self,
        source: &Arc<Shard>,
        hold: Hold,
        phase: Phase,
        copied: u64,
        error: Option<&str>,
        finished: bool,
    ) -> Result<(), Stop> {
        self.record_copy(source, hold, phase, (copied, 0), error, finished)
            .await
    }

    /// [`Self::record`], adding `rows` to the rows the move has written to
    /// its target (`(copied revision, rows)`).
    async fn record_copy(
        &self,
        source: &Arc<Shard>,
        hold: Hold,
        phase: Phase,
        progress: (u64, u64),
        error: Option<&str>,
        finished: bool,
    ) -> Result<(), Stop> {
        let error = error.map(str::to_owned);
        let written = source
            .write(None, "move_record", move |conn| {
                Box::pin(async move {
                    Ok(moves::set_phase(
                        conn,
                        hold,
                        phase.as_str(),
                        progress,
                        error.as_deref(),
                        finished,
                        now(),
                    )
                    .await?)
                })
            })
            .await;
        match written {
            Ok(moves::Standing::Holds) => Ok(()),
            Ok(moves::Standing::Cancelled) => Err(Stop::Cancelled),
            Ok(moves::Standing::Superseded) => Err(Stop::Superseded),
            Err(e) => {
                tracing::warn!(id = hold.0, phase = phase.as_str(), error = %crate::error::chain(&e), "cannot record a move's phase");
                Ok(())
            }
        }
    }

    /// Where driver `hold` stands with the move's record (`None`: the
    /// source cannot be read).
    async fn standing(&self, source: &Arc<Shard>, hold: Hold) -> Option<moves::Standing> {
        source
            .read(None, "move_standing", move |conn| {
                Box::pin(async move { Ok(moves::standing(conn, hold).await?) })
            })
            .await
            .ok()
    }
}
