//! Reparents run by chatshard (docs/replicas.md, "Reparents"): a planned
//! switchover to a chosen replica, and an emergency failover to the most
//! advanced replica when the writer is gone. What to do is decided here in
//! pure code ([`most_advanced`], [`recover`]); [`Shard::switchover`] and
//! [`Shard::promote`] execute it, one step after another:
//!
//! 1. record the reparent on the writer (`shard_reparent`, one active per
//!    shard: the fleet's serialisation), with a lease;
//! 2. (switchover) hold the shard's writes on this instance, wait for its
//!    writes in flight, make the old writer read-only, read its last GTID
//!    and wait until the target applied it;
//! 3. promote the target (stop replicating, forget the source, writable,
//!    semi-synchronous source), send the writes to it, release them;
//! 4. point the other members (the old writer too, when it answers) at it,
//!    and end the record there.
//!
//! A driver that dies leaves the record active past its lease; the member
//! monitor of any instance then finishes it (the target is writable: step 4)
//! or rolls it back (the old writer is made writable again), see
//! [`recover`].

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sqlx::{Connection as _, MySqlConnection};

use super::topology::{Gate, Probe};
use super::{Shard, encode};
use crate::storage::{reparent, replication};

/// What a reparent asks for that cannot be done.
#[derive(Debug, thiserror::Error)]
pub enum ReparentError {
    #[error("{0}")]
    Refused(String),
    #[error("another reparent of shard {0} runs")]
    Busy(String),
    #[error("member {member}: {error}")]
    Member { member: String, error: String },
}

/// A GTID position, `domain-server-seqno` per domain: the highest seqno of
/// each domain.
pub fn parse_gtids(pos: &str) -> BTreeMap<u32, u64> {
    pos.split(',')
        .filter_map(|g| {
            let mut parts = g.trim().split('-');
            let domain = parts.next()?.parse().ok()?;
            let _server = parts.next()?;
            let seqno = parts.next()?.parse().ok()?;
            Some((domain, seqno))
        })
        .collect()
}

/// Whether `a` holds everything `b` holds (every domain at least as far).
pub fn covers(a: &BTreeMap<u32, u64>, b: &BTreeMap<u32, u64>) -> bool {
    b.iter()
        .all(|(d, s)| a.get(d).is_some_and(|mine| mine >= s))
}

/// The candidate (by index into `candidates`) that holds everything every
/// other one holds; `None` when none does (they diverged: promoting any
/// would leave another unable to follow it).
pub fn most_advanced(candidates: &[BTreeMap<u32, u64>]) -> Option<usize> {
    (0..candidates.len()).find(|&i| candidates.iter().all(|other| covers(&candidates[i], other)))
}

/// What the monitor does about an active record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Its driver's lease runs: leave it.
    Wait,
    /// The target is writable: point the others at it and end the record.
    Finish,
    /// The target never became writable and the old writer answers,
    /// read-only: make it writable again and end the record.
    RollBack,
    /// Nothing writable and the old writer does not answer: an operator
    /// decides (an emergency failover supersedes the record).
    Stuck,
}

/// Decides about an active record whose driver may have died.
pub fn recover(lease_until_ms: i64, now_ms: i64, from: Probe, to: Probe) -> Recovery {
    if now_ms < lease_until_ms {
        return Recovery::Wait;
    }
    match (from, to) {
        (_, Probe::Writable) => Recovery::Finish,
        (Probe::ReadOnly | Probe::Writable, _) => Recovery::RollBack,
        (Probe::Down, _) => Recovery::Stuck,
    }
}

/// How long a driver's record lease lasts: past it, a survivor takes over.
const LEASE: Duration = Duration::from_secs(15);

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Shard {
    fn member_index(&self, address: &str) -> Result<usize, ReparentError> {
        self.members
            .iter()
            .position(|m| m.address() == address)
            .ok_or_else(|| {
                ReparentError::Refused(format!(
                    "shard {} has no member {address} (members: {})",
                    self.name,
                    self.members
                        .iter()
                        .map(|m| m.address())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    /// A connection of its own to member `i`, outside the bulkhead, with
    /// `replicas.admin_user` when set.
    async fn direct(&self, i: usize) -> Result<MySqlConnection, ReparentError> {
        let member = &self.members[i];
        let mut options = member.options().clone();
        if !self.settings.admin_user.is_empty() {
            options = options
                .username(&self.settings.admin_user)
                .password(&self.settings.admin_password);
        }
        tokio::time::timeout(
            member.connect_timeout(),
            MySqlConnection::connect_with(&options),
        )
        .await
        .map_err(|_| self.member_error(i, "no answer"))?
        .map_err(|e| self.member_error(i, crate::error::chain(&e)))
    }

    /// Records a reparent `kind` from member `from` to `to` on `conn`, with
    /// a fresh lease (`None`: another one runs).
    async fn record(
        &self,
        conn: &mut MySqlConnection,
        kind: &str,
        (from, to): (usize, usize),
        driver: &str,
    ) -> sqlx::Result<Option<u64>> {
        reparent::start(
            conn,
            kind,
            self.members[from].address(),
            self.members[to].address(),
            driver,
            now_ms() + LEASE.as_millis() as i64,
        )
        .await
    }

    fn member_error(&self, i: usize, error: impl Into<String>) -> ReparentError {
        ReparentError::Member {
            member: self.members[i].address().to_owned(),
            error: error.into(),
        }
    }

    fn credentials(&self) -> Result<(String, String), ReparentError> {
        if self.settings.replication_user.is_empty() {
            return Err(ReparentError::Refused(
                "replicas.replication_user is not set: chatshard cannot point replicas at a new \
                 writer"
                    .to_owned(),
            ));
        }
        Ok((
            self.settings.replication_user.clone(),
            self.settings.replication_password.clone(),
        ))
    }

    /// Holds this instance's writes to the shard until `until` (or until
    /// released): writes wait instead of being refused.
    pub fn hold_writes(&self, until: Option<Instant>) {
        self.hold.send_replace(until);
    }

    /// Waits while writes are held (at most until the hold's end).
    pub(super) async fn wait_for_hold(&self) {
        let mut hold = self.hold.subscribe();
        loop {
            let Some(until) = *hold.borrow_and_update() else {
                return;
            };
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            if tokio::time::timeout(left, hold.changed()).await.is_err() {
                return;
            }
        }
    }

    /// Sends the writes to member `to` now (the driver knows: no
    /// confirmation round), as the monitor would.
    fn take_writes(&self, to: usize) {
        let _gate = self
            .gate_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = self.gate();
        self.gate.store(encode(Gate::Writer(to)), Ordering::Release);
        self.note_change(before, Gate::Writer(to));
    }

    /// A planned switchover to member `to` (`host:port`), under load:
    /// writes held (up to `replicas.hold_writes_ms`), never refused unless
    /// the hold runs out. `driver` names the instance in the record.
    /// Returns the write pause this instance saw.
    pub async fn switchover(&self, to: &str, driver: &str) -> Result<Duration, ReparentError> {
        let (user, password) = self.credentials()?;
        let to = self.member_index(to)?;
        let Gate::Writer(from) = self.gate() else {
            return Err(ReparentError::Refused(format!(
                "shard {} has no confirmed writer ({}): use failover",
                self.name,
                self.gate().as_str()
            )));
        };
        if from == to {
            return Err(ReparentError::Refused(format!(
                "{} is the writer already",
                self.members[to].address()
            )));
        }
        let mut old = self.direct(from).await?;
        let mut target = self.direct(to).await?;
        if !replication::is_read_only(&mut target)
            .await
            .map_err(|e| self.member_error(to, crate::error::chain(&e)))?
        {
            return Err(ReparentError::Refused(format!(
                "{} is writable: not a replica",
                self.members[to].address()
            )));
        }
        let id = self
            .record(&mut old, "switchover", (from, to), driver)
            .await
            .map_err(|e| self.member_error(from, crate::error::chain(&e)))?
            .ok_or_else(|| ReparentError::Busy(self.name.clone()))?;
        tracing::warn!(shard = %self.name, from = %self.members[from].address(), to = %self.members[to].address(), "switchover_started");

        // 2. Hold, drain, fence. No heartbeat runs meanwhile.
        let _beat = self.beat.lock().await;
        let paused = Instant::now();
        self.hold_writes(Some(paused + self.settings.hold_writes()));
        self.switching.store(true, Ordering::SeqCst);
        // Every write that passed the hold ends before the writer is fenced:
        // one still running could commit after its last GTID was read.
        let drained = paused + self.settings.hold_writes() / 2;
        while self.writes_entered() > 0 {
            if Instant::now() >= drained {
                let why = "writes in flight did not end in time; nothing was fenced".to_owned();
                let _ = reparent::finish(&mut old, id, "rolled_back", &why).await;
                self.switching.store(false, Ordering::SeqCst);
                self.hold_writes(None);
                tracing::error!(shard = %self.name, why, "switchover_failed");
                return Err(self.member_error(from, why));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let fenced = async {
            replication::set_read_only(&mut old, true).await?;
            replication::gtid_positions(&mut old).await
        }
        .await;
        let caught_up = match &fenced {
            Ok(pos) => {
                replication::wait_for_gtid(&mut target, &pos.binlog, self.settings.catch_up())
                    .await
                    .map_err(|e| crate::error::chain(&e))
            }
            Err(e) => Err(crate::error::chain(e)),
        };
        if !matches!(caught_up, Ok(true)) {
            let why = match caught_up {
                Ok(_) => format!(
                    "{} did not apply the writer's last transaction within {:?}",
                    self.members[to].address(),
                    self.settings.catch_up()
                ),
                Err(e) => e,
            };
            // Roll back: the old writer takes writes again.
            let back = replication::set_read_only(&mut old, false).await;
            let _ = reparent::finish(&mut old, id, "rolled_back", &why).await;
            self.switching.store(false, Ordering::Release);
            self.hold_writes(None);
            tracing::error!(shard = %self.name, why, rolled_back = back.is_ok(), "switchover_failed");
            return Err(self.member_error(to, why));
        }

        // 3. Promote, send the writes, release.
        let promoted = async {
            replication::promote(&mut target).await?;
            replication::set_semi_sync_master(&mut target, true).await
        }
        .await;
        if let Err(e) = promoted {
            let why = crate::error::chain(&e);
            let _ = replication::set_read_only(&mut old, false).await;
            let _ = reparent::finish(&mut old, id, "rolled_back", &why).await;
            self.switching.store(false, Ordering::Release);
            self.hold_writes(None);
            return Err(self.member_error(to, why));
        }
        self.take_writes(to);
        self.switching.store(false, Ordering::Release);
        self.hold_writes(None);
        let pause = paused.elapsed();

        // 4. The others follow the new writer; the record ends there.
        let _ = replication::set_semi_sync_master(&mut old, false).await;
        drop(old);
        let problems = self.repoint(to, &user, &password).await;
        let detail = if problems.is_empty() {
            format!("write pause {pause:?}")
        } else {
            format!(
                "write pause {pause:?}; not repointed: {}",
                problems.join("; ")
            )
        };
        let _ = reparent::finish(&mut target, id, "done", &detail).await;
        let _ = target.close().await;
        tracing::warn!(shard = %self.name, to = %self.members[to].address(), pause_ms = pause.as_millis() as u64, "switchover_done");
        Ok(pause)
    }

    /// Points every member but `to` that answers at `to` (each replica
    /// keeps what it applied; GTID picks up from there). Returns what
    /// failed, by member.
    async fn repoint(&self, to: usize, user: &str, password: &str) -> Vec<String> {
        let host = self.members[to].options().get_host().to_owned();
        let port = self.members[to].options().get_port();
        let mut problems = Vec::new();
        for i in (0..self.members.len()).filter(|&i| i != to) {
            let result = async {
                let mut conn = self.direct(i).await?;
                async {
                    replication::set_read_only(&mut conn, true).await?;
                    // A former writer's own transactions are in its binary
                    // log, not in gtid_slave_pos: it resumes from all it
                    // holds, or it would ask for them again.
                    replication::stop_replication(&mut conn).await?;
                    let held = replication::gtid_positions(&mut conn).await?;
                    replication::set_gtid_slave_pos(&mut conn, &held.current).await?;
                    replication::point_at(&mut conn, &host, port, user, password).await
                }
                .await
                .map_err(|e| self.member_error(i, crate::error::chain(&e)))
            }
            .await;
            if let Err(e) = result {
                problems.push(e.to_string());
            }
        }
        problems
    }

    /// The replica an emergency failover would promote: each answering
    /// replica applies what it received first; the one holding everything
    /// the others hold is chosen. Refused while a member is writable (use a
    /// switchover) or when the replicas diverged.
    pub async fn failover_candidate(&self) -> Result<usize, ReparentError> {
        let mut positions = Vec::new();
        for i in 0..self.members.len() {
            let Ok(mut conn) = self.direct(i).await else {
                continue;
            };
            let read_only = replication::is_read_only(&mut conn)
                .await
                .map_err(|e| self.member_error(i, crate::error::chain(&e)))?;
            if !read_only {
                return Err(ReparentError::Refused(format!(
                    "{} is writable: the shard has a writer (use a switchover)",
                    self.members[i].address()
                )));
            }
            // Apply what it received before it is compared.
            let _ = replication::stop_io_thread(&mut conn).await;
            let deadline = Instant::now() + self.settings.catch_up();
            loop {
                let status = replication::replica_status(&mut conn)
                    .await
                    .map_err(|e| self.member_error(i, crate::error::chain(&e)))?;
                if status.as_ref().is_none_or(|s| s.applied_all_received())
                    || Instant::now() >= deadline
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let pos = replication::gtid_positions(&mut conn)
                .await
                .map_err(|e| self.member_error(i, crate::error::chain(&e)))?;
            positions.push((i, parse_gtids(&pos.current)));
        }
        if positions.is_empty() {
            return Err(ReparentError::Refused(format!(
                "no member of shard {} answers",
                self.name
            )));
        }
        let sets: Vec<_> = positions.iter().map(|(_, p)| p.clone()).collect();
        let best = most_advanced(&sets).ok_or_else(|| {
            ReparentError::Refused(format!(
                "the replicas of shard {} diverged: none holds everything the others hold",
                self.name
            ))
        })?;
        Ok(positions[best].0)
    }

    /// Emergency failover: promotes member `to` (from
    /// [`Self::failover_candidate`]) and points the others at it.
    pub async fn promote(&self, to: usize, driver: &str) -> Result<(), ReparentError> {
        let (user, password) = self.credentials()?;
        let mut target = self.direct(to).await?;
        let from = self.last_writer.load(Ordering::Acquire);
        let record = async {
            let started = self
                .record(&mut target, "failover", (from, to), driver)
                .await?;
            if started.is_some() {
                return Ok(started);
            }
            // A reparent whose driver died with no writer left ("stuck"):
            // this failover supersedes it once its lease ran out.
            match reparent::active(&mut target).await? {
                Some(stuck) if stuck.lease_until_ms < now_ms() => {
                    reparent::finish(
                        &mut target,
                        stuck.id,
                        "failed",
                        "superseded by a failover: its driver died and no member was writable",
                    )
                    .await?;
                    self.record(&mut target, "failover", (from, to), driver)
                        .await
                }
                _ => Ok(None),
            }
        }
        .await;
        let id = record
            .map_err(|e| self.member_error(to, crate::error::chain(&e)))?
            .ok_or_else(|| ReparentError::Busy(self.name.clone()))?;
        async {
            replication::promote(&mut target).await?;
            replication::set_semi_sync_master(&mut target, true).await
        }
        .await
        .map_err(|e| self.member_error(to, crate::error::chain(&e)))?;
        self.take_writes(to);
        let problems = self.repoint(to, &user, &password).await;
        let detail = if problems.is_empty() {
            String::new()
        } else {
            format!("not repointed: {}", problems.join("; "))
        };
        let _ = reparent::finish(&mut target, id, "done", &detail).await;
        tracing::warn!(shard = %self.name, to = %self.members[to].address(), "failover_done");
        Ok(())
    }

    /// One monitor round's look at an active record left by a driver that
    /// may have died (read from the writer, else any answering member).
    pub(super) async fn recover_reparent(
        &self,
        conns: &mut [Option<MySqlConnection>],
        round: &[Probe],
    ) {
        let source = self
            .gate()
            .writer()
            .or_else(|| round.iter().position(|p| *p != Probe::Down));
        let Some(source) = source else { return };
        let Some(conn) = conns[source].as_mut() else {
            return;
        };
        let Ok(Some(record)) = reparent::active(conn).await else {
            return;
        };
        let (Ok(from), Ok(to)) = (
            self.member_index(&record.from_member),
            self.member_index(&record.to_member),
        ) else {
            return;
        };
        let decision = recover(record.lease_until_ms, now_ms(), round[from], round[to]);
        match decision {
            Recovery::Wait => {}
            Recovery::Finish => {
                let Ok((user, password)) = self.credentials() else {
                    return;
                };
                tracing::warn!(shard = %self.name, id = record.id, "reparent_taken_over");
                let problems = self.repoint(to, &user, &password).await;
                if let Ok(mut conn) = self.direct(to).await {
                    let _ = reparent::finish(
                        &mut conn,
                        record.id,
                        "done",
                        &format!("finished by a survivor; {}", problems.join("; ")),
                    )
                    .await;
                }
            }
            Recovery::RollBack => {
                tracing::warn!(shard = %self.name, id = record.id, "reparent_rolled_back");
                if let Ok(mut conn) = self.direct(from).await
                    && replication::set_read_only(&mut conn, false).await.is_ok()
                {
                    let _ =
                        reparent::finish(&mut conn, record.id, "rolled_back", "its driver died")
                            .await;
                }
            }
            Recovery::Stuck => {
                tracing::error!(shard = %self.name, id = record.id, "reparent_stuck");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn gtid_positions_are_read_per_domain() {
        let p = parse_gtids("0-1-42,1-3-7");
        assert_eq!(p.get(&0), Some(&42));
        assert_eq!(p.get(&1), Some(&7));
        assert!(parse_gtids("").is_empty());
    }

    #[test]
    fn the_replica_that_holds_everything_is_chosen() {
        let a = parse_gtids("0-1-40");
        let b = parse_gtids("0-1-42");
        assert_eq!(most_advanced(&[a.clone(), b.clone()]), Some(1));
        let c = parse_gtids("0-1-40,1-2-9");
        // b is ahead in domain 0, c in domain 1: they diverged.
        assert_eq!(most_advanced(&[b, c]), None);
        assert_eq!(most_advanced(&[a]), Some(0));
    }

    #[test]
    fn a_dead_driver_is_finished_or_rolled_back() {
        use Probe::*;
        assert_eq!(recover(2_000, 1_000, ReadOnly, ReadOnly), Recovery::Wait);
        assert_eq!(recover(1_000, 2_000, ReadOnly, Writable), Recovery::Finish);
        assert_eq!(recover(1_000, 2_000, Down, Writable), Recovery::Finish);
        assert_eq!(
            recover(1_000, 2_000, ReadOnly, ReadOnly),
            Recovery::RollBack
        );
        assert_eq!(recover(1_000, 2_000, Down, ReadOnly), Recovery::Stuck);
    }

    proptest! {
        /// The chosen candidate covers every other one.
        #[test]
        fn the_choice_covers_every_candidate(
            sets in proptest::collection::vec(
                proptest::collection::btree_map(0u32..3, 0u64..20, 0..3), 1..5)
        ) {
            if let Some(i) = most_advanced(&sets) {
                for other in &sets {
                    prop_assert!(covers(&sets[i], other));
                }
            }
        }
    }
}
