//! The member monitor of a replicated shard: every `replicas.monitor_ms` it
//! reads each member's `@@read_only` and heartbeat over its own connection
//! (outside the bulkhead, so a full pool never blinds it), moves the
//! writer's heartbeat forward, and applies [`super::topology::decide`].
//!
//! * A member that does not answer within `pool.connect_timeout_ms` is down
//!   for the round; its connection is dropped and made again next round.
//! * A replica's lag is the writer's heartbeat minus its own, both read in
//!   the same round (docs/replicas.md): the heartbeat moves once a round, so
//!   the lag is known to about one monitor period.
//! * A candidate writer is confirmed `replicas.confirm_ms` later, not a whole
//!   period later.
//! * The heartbeat is written after the probes, with its own deadline (one
//!   monitor period): a semi-synchronous writer with no replica to
//!   acknowledge holds the write, and that must not delay the next round.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use sqlx::{Connection as _, MySqlConnection};

use super::topology::{self, Gate, Probe};
use super::{BreakerState, Shard, encode};

/// What the monitor last saw of one member.
#[derive(Debug, Default, Clone)]
pub(crate) struct Seen {
    /// The last round's answer; `None` before the first round.
    pub probe: Option<Probe>,
    /// Behind the writer by this much (`None`: unknown, or no writer).
    pub lag_ms: Option<u64>,
    /// When the last round read it.
    pub at: Option<Instant>,
    /// Why it did not answer, when it did not.
    pub error: Option<String>,
}

impl Seen {
    pub fn answering(&self) -> bool {
        matches!(self.probe, Some(Probe::ReadOnly | Probe::Writable))
    }

    /// Read-only, answering, and no further behind than `max_lag`.
    pub fn in_rotation(&self, max_lag: Duration) -> bool {
        self.probe == Some(Probe::ReadOnly)
            && self
                .lag_ms
                .is_some_and(|lag| u128::from(lag) <= max_lag.as_millis())
    }
}

/// The heartbeat's connection, and the member it is to.
#[derive(Default)]
pub(super) struct Beat {
    member: Option<usize>,
    conn: Option<MySqlConnection>,
}

/// A member's part now, as views show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberRole {
    /// Writes go to it.
    Writer,
    /// Writable, about to take the writes (waits for its confirmation).
    Candidate,
    /// Writable while another member is too (split brain).
    Writable,
    /// Read-only and answering.
    Replica,
    /// Did not answer the last round.
    Down,
    /// Not read yet.
    Unknown,
}

impl MemberRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Writer => "writer",
            Self::Candidate => "candidate",
            Self::Writable => "writable",
            Self::Replica => "replica",
            Self::Down => "down",
            Self::Unknown => "unknown",
        }
    }
}

/// One member of a replicated shard, read at one moment.
#[derive(Debug, Clone)]
pub struct MemberStatus {
    /// `host:port`: the member's name.
    pub address: String,
    /// Its URL without secrets.
    pub url: String,
    pub role: MemberRole,
    /// Behind the writer by this much, by the heartbeat.
    pub lag_ms: Option<u64>,
    /// Whether it serves replica reads now.
    pub in_rotation: bool,
    pub breaker: BreakerState,
    pub in_flight: usize,
    pub pool_size: usize,
    /// Why it did not answer the last round.
    pub last_error: Option<String>,
}

impl Shard {
    pub(super) fn member_statuses(&self) -> Vec<MemberStatus> {
        let gate = self.gate();
        self.members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let seen = self.seen[i]
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                let role = match (gate, seen.probe) {
                    (Gate::Writer(w), _) if w == i => MemberRole::Writer,
                    (Gate::Pending(c), _) if c == i => MemberRole::Candidate,
                    (_, Some(Probe::Writable)) => MemberRole::Writable,
                    (_, Some(Probe::ReadOnly)) => MemberRole::Replica,
                    (_, Some(Probe::Down)) => MemberRole::Down,
                    (_, None) => MemberRole::Unknown,
                };
                let status = m.status();
                MemberStatus {
                    address: m.address().to_owned(),
                    url: m.redacted_url().to_owned(),
                    role,
                    lag_ms: seen.lag_ms,
                    in_rotation: self.in_rotation(i),
                    breaker: status.breaker,
                    in_flight: status.in_flight,
                    pool_size: status.pool_size,
                    last_error: seen.error,
                }
            })
            .collect()
    }

    /// Watches the members until the shard is dropped (replicated shards
    /// only; a shard without replicas has nothing to follow).
    pub fn spawn_monitor(self: &Arc<Self>) {
        if !self.is_replicated() {
            return;
        }
        let shard = Arc::downgrade(self);
        let n = self.members.len();
        let nudge = self.nudge.clone();
        tokio::spawn(async move {
            let mut conns: Vec<Option<MySqlConnection>> = (0..n).map(|_| None).collect();
            loop {
                // The shard is held only during a round, so dropping it
                // ends the monitor.
                let wait = {
                    let Some(shard) = shard.upgrade() else {
                        return;
                    };
                    let beat = shard.beat.clone();
                    let gate = shard.round(&mut conns, &beat).await;
                    if topology::confirm_soon(gate) {
                        shard.settings.confirm()
                    } else {
                        shard.settings.monitor()
                    }
                };
                // A nudge (a write met a read-only writer, or the fleet heard
                // of a new writer) cuts the wait short.
                tokio::select! {
                    () = nudge.notified() => {}
                    () = tokio::time::sleep(wait) => {}
                }
            }
        });
    }

    /// Two rounds (a round and its confirmation) on connections of their
    /// own: for a process that runs no monitor.
    pub async fn settle(&self) {
        if !self.is_replicated() {
            return;
        }
        let mut conns: Vec<Option<MySqlConnection>> =
            (0..self.members.len()).map(|_| None).collect();
        let beat = Arc::new(tokio::sync::Mutex::new(Beat::default()));
        for _ in 0..2 {
            self.probe_round(&mut conns, &beat, false).await;
        }
    }

    /// One round: probe every member at once, decide, and write the
    /// heartbeat. Returns the gate it left.
    async fn round(
        self: &Arc<Self>,
        conns: &mut [Option<MySqlConnection>],
        beat: &Arc<tokio::sync::Mutex<Beat>>,
    ) -> Gate {
        let gate = self.probe_round(conns, beat, true).await;
        if let Some(w) = gate.writer() {
            self.beat(w, beat);
        }
        gate
    }

    /// Probes, decides, and (when `recover`) looks after a reparent left by
    /// a dead driver.
    async fn probe_round(
        &self,
        conns: &mut [Option<MySqlConnection>],
        _beat: &Arc<tokio::sync::Mutex<Beat>>,
        recover: bool,
    ) -> Gate {
        let timeout = self.members[0].connect_timeout();
        let probes =
            futures_util::future::join_all(conns.iter_mut().enumerate().map(|(i, conn)| {
                let options = self.members[i].options().clone();
                async move {
                    let result = tokio::time::timeout(timeout, async {
                        if conn.is_none() {
                            *conn = Some(MySqlConnection::connect_with(&options).await?);
                        }
                        match conn.as_mut() {
                            Some(c) => crate::storage::server::member_probe(c).await,
                            None => Err(sqlx::Error::PoolClosed),
                        }
                    })
                    .await;
                    match result {
                        Ok(Ok(seen)) => Ok(seen),
                        Ok(Err(e)) => {
                            *conn = None;
                            Err(crate::error::chain(&e))
                        }
                        Err(_) => {
                            *conn = None;
                            Err(format!("no answer within {timeout:?}"))
                        }
                    }
                }
            }))
            .await;
        let round: Vec<Probe> = probes
            .iter()
            .map(|p| match p {
                Ok((true, _)) => Probe::ReadOnly,
                Ok((false, _)) => Probe::Writable,
                Err(_) => Probe::Down,
            })
            .collect();
        let after = {
            let _gate = self
                .gate_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let before = self.gate();
            if self.switching.load(Ordering::Acquire) {
                // A switchover driven here owns the gate for its moment.
                before
            } else {
                let after = topology::decide(before, &round);
                self.gate.store(encode(after), Ordering::Release);
                self.note_change(before, after);
                after
            }
        };
        if recover {
            self.recover_reparent(conns, &round).await;
        }
        // Lags against the writer's heartbeat (or, without a writer, the
        // most advanced member's).
        let reference = match after.writer() {
            Some(w) => probes[w].as_ref().ok().and_then(|(_, beat)| *beat),
            None => probes
                .iter()
                .filter_map(|p| p.as_ref().ok().and_then(|(_, beat)| *beat))
                .max(),
        };
        let now = Instant::now();
        for (i, probe) in probes.iter().enumerate() {
            let mut seen = self.seen[i].lock().unwrap_or_else(PoisonError::into_inner);
            seen.probe = Some(round[i]);
            seen.at = Some(now);
            match probe {
                Ok((_, beat)) => {
                    seen.error = None;
                    seen.lag_ms = match (reference, beat) {
                        (Some(r), Some(b)) => Some(u64::try_from(r - b).unwrap_or(0)),
                        _ => None,
                    };
                }
                Err(e) => {
                    seen.error = Some(e.clone());
                    seen.lag_ms = None;
                }
            }
        }
        after
    }

    /// Moves the writer's heartbeat forward, on a connection of its own
    /// (kept between rounds while the writer stays) and within one monitor
    /// period; skipped while the last beat still runs.
    fn beat(self: &Arc<Self>, writer: usize, beat: &Arc<tokio::sync::Mutex<Beat>>) {
        let Ok(mut guard) = beat.clone().try_lock_owned() else {
            return;
        };
        let options = self.members[writer].options().clone();
        let deadline = self.settings.monitor().max(Duration::from_millis(100));
        let shard = self.name.clone();
        tokio::spawn(async move {
            let now_ms = chrono::Utc::now().timestamp_millis();
            if guard.member != Some(writer) {
                guard.conn = None;
                guard.member = Some(writer);
            }
            let conn = &mut guard.conn;
            let result = tokio::time::timeout(deadline, async {
                if conn.is_none() {
                    *conn = Some(MySqlConnection::connect_with(&options).await?);
                }
                match conn.as_mut() {
                    Some(c) => crate::storage::server::beat(c, now_ms).await,
                    None => Err(sqlx::Error::PoolClosed),
                }
            })
            .await;
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    guard.conn = None;
                    tracing::debug!(shard, error = %crate::error::chain(&e), "heartbeat_failed");
                }
                Err(_) => {
                    // Cut short mid-statement: never reused.
                    guard.conn = None;
                    tracing::debug!(shard, "heartbeat_slow");
                }
            }
        });
    }

    /// Says so when the gate moved from `before` to `after` (already
    /// stored, under `gate_lock`), and when writes changed hands.
    pub(super) fn note_change(&self, before: Gate, after: Gate) {
        if before == after {
            return;
        }
        match after {
            Gate::Writer(w) => {
                let old = self.last_writer.swap(w, Ordering::AcqRel);
                for (i, m) in self.members.iter().enumerate() {
                    m.set_writer(i == w);
                }
                if old != w {
                    self.role_changes.fetch_add(1, Ordering::Relaxed);
                    self.writer_changes.send_modify(|n| *n += 1);
                    tracing::warn!(
                        shard = %self.name,
                        from = %self.members[old].address(),
                        to = %self.members[w].address(),
                        "writer_changed"
                    );
                } else {
                    tracing::info!(shard = %self.name, writer = %self.members[w].address(), "writer_back");
                }
            }
            Gate::Pending(c) => tracing::warn!(
                shard = %self.name,
                candidate = %self.members[c].address(),
                "writer_candidate"
            ),
            Gate::NoWriter => {
                tracing::warn!(shard = %self.name, "no_writer");
            }
            Gate::SplitBrain => {
                tracing::error!(shard = %self.name, "split_brain");
            }
        }
    }
}
