//! The one driver of the move engine: it asks [`move_plan::next`] for each
//! step and has the unit being moved carry it out. A chat move
//! (`moves.rs`) and a bucket-range move (`buckets.rs`) are the same machine;
//! each implements [`Mover`] over its own shards, and decides nothing.
//!
//! What a step does is IO (SQL through the shards, pauses, leases); which
//! step comes next, and how a move ends, is only ever decided in
//! `move_plan.rs`.

use std::future::Future;

use super::move_plan::{self, Act, Phase, Run, Seen, Step, Unit};

/// How a driven move stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    /// It ended, and its record says so.
    Ended {
        phase: Phase,
        reason: Option<String>,
    },
    /// It was left as it stands: another driver holds it, or the instance
    /// that takes it over decides.
    Left(String),
}

impl Outcome {
    /// `Ok` when the move is done; why not otherwise.
    pub(super) fn done(self) -> Result<(), String> {
        match self {
            Outcome::Ended {
                phase: Phase::Done, ..
            } => Ok(()),
            Outcome::Ended {
                phase: Phase::Cancelled,
                reason: None,
            } => Err("cancelled".to_owned()),
            Outcome::Ended { phase, reason } => {
                Err(reason.unwrap_or_else(|| format!("the move ended {phase}")))
            }
            Outcome::Left(reason) => Err(reason),
        }
    }
}

/// A unit being moved: carries out the acts and records the phases the
/// machine decides.
pub(super) trait Mover: Send {
    /// What kind of unit it is.
    fn unit(&self) -> Unit;
    /// Does `act`; what it found.
    fn act(&mut self, act: Act) -> impl Future<Output = Seen> + Send;
    /// Records `phase` (and the progress made) in the move's record, which
    /// renews its lease; [`Seen::Recorded`] unless a cancel or a takeover is
    /// found there.
    fn record(&mut self, phase: Phase) -> impl Future<Output = Seen> + Send;
    /// Writes the move's final record.
    fn end(&mut self, phase: Phase, reason: Option<&str>) -> impl Future<Output = ()> + Send;
}

/// Drives `mover` from `start` (a [`Run`] and its first step) to the end.
pub(super) async fn drive<M: Mover>(mover: &mut M, start: (Run, Step)) -> Outcome {
    let (mut run, mut step) = start;
    debug_assert_eq!(run.unit, mover.unit());
    loop {
        match step {
            Step::Do { record, act } => {
                let seen = match record {
                    Some(phase) => match mover.record(phase).await {
                        Seen::Recorded => mover.act(act).await,
                        other => other,
                    },
                    None => mover.act(act).await,
                };
                tracing::debug!(unit = ?run.unit, phase = %run.phase, ?act, ?seen, "move step");
                step = move_plan::next(&mut run, seen);
            }
            Step::End { phase, reason } => {
                mover.end(phase, reason.as_deref()).await;
                return Outcome::Ended { phase, reason };
            }
            Step::Leave { reason } => return Outcome::Left(reason),
        }
    }
}
