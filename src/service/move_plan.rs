//! The move engine's decisions, in pure code (the way `plan.rs` decides a
//! batch): a chat move and a bucket-range move are the same machine over
//! different units, and `move_driver.rs` is the one place that executes it.
//!
//! The phases, in order: `requested` → `copying` → `fenced` → (`verified`,
//! a chat's copies compared) → `switching` (a range's `flipping`: written in
//! the switch's transaction, with the source's tombstone or the new bucket
//! table) → `switched` (`flipped`) → (`cleaning`, a chat's source rows) →
//! `done`. Before the switch a move may instead end `cancelled` (a range
//! passes `cancelling` while its chats move back), `rolled_back` (a chat:
//! its target's copy dropped) or `failed` (a range: the chats moved so far
//! stay moved). [`next`] decides every step from the last observation;
//! [`take_over`] decides what becomes of a chat move whose driver died.
//!
//! Invariants the tests hold:
//! - every run ends in a terminal phase, or is left to a takeover (taken
//!   over already, or an outcome that cannot be known);
//! - nothing past the tombstone is ever undone: from `switching` on, the
//!   only end is `done`;
//! - a cancel is honoured only before `switching`;
//! - the fence is tried at most [`FENCE_ATTEMPTS`] times.

/// What a move moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// One chat, recorded in `chat_move` on its source.
    Chat,
    /// A bucket range, recorded in `bucket_move` on the coordinator shard.
    Range,
}

/// One phase of a move, stored as [`Phase::name`] of its unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    Requested,
    Copying,
    Fenced,
    /// A chat's copies compared equal (a range has no such phase).
    Verified,
    Switching,
    Switched,
    /// A chat's source rows being deleted (a range tells the other shards
    /// while `switched`).
    Cleaning,
    Done,
    /// A range's chats moving back after a cancel.
    Cancelling,
    Cancelled,
    /// A chat's move undone: the target's copy dropped.
    RolledBack,
    /// A range move that stopped: the chats it moved stay moved.
    Failed,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 12] = [
        Phase::Requested,
        Phase::Copying,
        Phase::Fenced,
        Phase::Verified,
        Phase::Switching,
        Phase::Switched,
        Phase::Cleaning,
        Phase::Done,
        Phase::Cancelling,
        Phase::Cancelled,
        Phase::RolledBack,
        Phase::Failed,
    ];

    /// The stored and shown name of the phase for `unit`, `None` for a phase
    /// the unit does not have; the one string mapping.
    pub fn name(self, unit: Unit) -> Option<&'static str> {
        Some(match (self, unit) {
            (Phase::Requested, _) => "requested",
            (Phase::Copying, _) => "copying",
            (Phase::Fenced, _) => "fenced",
            (Phase::Verified, Unit::Chat) => "verified",
            (Phase::Switching, Unit::Chat) => "switching",
            (Phase::Switching, Unit::Range) => "flipping",
            (Phase::Switched, Unit::Chat) => "switched",
            (Phase::Switched, Unit::Range) => "flipped",
            (Phase::Cleaning, Unit::Chat) => "cleaning",
            (Phase::Done, _) => "done",
            (Phase::Cancelling, Unit::Range) => "cancelling",
            (Phase::Cancelled, _) => "cancelled",
            (Phase::RolledBack, Unit::Chat) => "rolled_back",
            (Phase::Failed, Unit::Range) => "failed",
            (Phase::Verified | Phase::Cleaning, Unit::Range)
            | (Phase::Cancelling | Phase::Failed, Unit::Chat)
            | (Phase::RolledBack, Unit::Range) => return None,
        })
    }

    /// A chat move's name of the phase ("" for one it does not have).
    pub fn as_str(self) -> &'static str {
        self.name(Unit::Chat).unwrap_or("")
    }

    /// The phase a stored name names for `unit`; `None` for a name this
    /// build does not know (a newer build's).
    pub fn parse(unit: Unit, name: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.name(unit) == Some(name))
    }

    /// The move has ended.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Phase::Done | Phase::Cancelled | Phase::RolledBack | Phase::Failed
        )
    }

    /// The source's tombstone (a range's new bucket table) may be in: the
    /// switch's transaction records `switching` with it, so from here the
    /// move only goes forward.
    pub fn past_tombstone(self) -> bool {
        matches!(
            self,
            Phase::Switching | Phase::Switched | Phase::Cleaning | Phase::Done
        )
    }

    /// A cancel may still stop the move.
    pub fn cancellable(self) -> bool {
        matches!(
            self,
            Phase::Requested | Phase::Copying | Phase::Fenced | Phase::Verified
        )
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            self.name(Unit::Chat)
                .or(self.name(Unit::Range))
                .unwrap_or("?"),
        )
    }
}

/// Attempts at fencing, copying the last revisions and switching.
pub const FENCE_ATTEMPTS: u32 = 3;

/// What the driver does next (each unit carries it out on its own shards).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// Nothing beyond the record.
    Nothing,
    /// A chat: the target's row opened (or found, resuming). A range: the
    /// source's bucket table read (flipped already?) and a cancel looked for.
    Open,
    /// Copy while writes go on, until close behind (a chat: a snapshot first
    /// for a purged log; a range: passes over its chats).
    Copy,
    /// Fence the source: no more writes (a range: no new chats).
    Fence,
    /// The last copy under the fence, then the check that it is whole.
    CopyFenced,
    /// The switch: the tombstone (the new bucket table) at the source, if
    /// the fence still holds and no cancel came first.
    Switch,
    /// The switch's other steps (target live, home marker; the table
    /// adopted), until done.
    FinishSwitch,
    /// After the switch: the source's rows deleted (a range: every other
    /// shard told).
    Clean,
    /// Whether this driver still holds a move that stopped, and the source
    /// can be asked.
    Confirm,
    /// The source's fence lifted.
    LiftFence,
    /// Undo: the target's copy dropped (a range: its chats moved back).
    RollBack,
}

/// What the last act (or record) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// The record was written (or could not be, and the move goes on).
    Recorded,
    /// [`Act::Open`] done.
    Opened,
    /// [`Act::Open`] found a range flipped before its driver died.
    AlreadySwitched,
    /// [`Act::Copy`] done: close behind the source.
    CaughtUp,
    /// [`Act::Fence`] done.
    Fenced,
    /// [`Act::CopyFenced`] found the copy whole.
    Verified,
    /// The fence lapsed before the last copy or the switch.
    Lapsed,
    /// [`Act::Switch`] went in.
    Switched,
    /// [`Act::FinishSwitch`] done.
    Finished,
    /// [`Act::Clean`] done.
    Cleaned,
    /// [`Act::Confirm`]: this driver still holds the move.
    Holds,
    /// [`Act::Confirm`]: the source cannot be asked.
    Unreachable,
    /// [`Act::LiftFence`] done.
    FenceLifted,
    /// [`Act::RollBack`] done; what it could not undo, if anything.
    RolledBack(Option<String>),
    /// A cancel was asked for.
    Cancelled,
    /// Another driver took the move over.
    Superseded,
    /// The switch's outcome is unknown (the source cannot be asked).
    Undecided(String),
    /// A step failed, for this reason.
    Failed(String),
}

/// What [`next`] tells the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Record `record` first, if given (a cancel or a takeover seen there is
    /// the next observation, and `act` is not done), then do `act`.
    Do { record: Option<Phase>, act: Act },
    /// End the move: its final record.
    End {
        phase: Phase,
        reason: Option<String>,
    },
    /// Stop without touching the move: another driver holds it, or its
    /// outcome is left to the one that takes it over.
    Leave { reason: String },
}

impl Step {
    fn act(act: Act) -> Self {
        Step::Do { record: None, act }
    }

    fn record(phase: Phase, act: Act) -> Self {
        Step::Do {
            record: Some(phase),
            act,
        }
    }
}

/// Why a move is winding down, once that is decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Cancelled,
    Failed(String),
}

/// A running move as the machine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub unit: Unit,
    /// The phase reached.
    pub phase: Phase,
    /// Fence attempts that lapsed.
    pub lapses: u32,
    /// Why it winds down, once it does.
    pub ending: Option<Ending>,
}

impl Run {
    /// A move about to start (or resume from its target's copy): its first
    /// step is [`Act::Open`].
    pub fn start(unit: Unit) -> (Run, Step) {
        let run = Run {
            unit,
            phase: Phase::Requested,
            lapses: 0,
            ending: None,
        };
        (run, Step::act(Act::Open))
    }

    /// A chat move taken over (see [`take_over`]): where the machine starts,
    /// `None` when the new driver does nothing now.
    pub fn taken_over(phase: Phase, decision: &Takeover) -> Option<(Run, Step)> {
        let run = |phase, ending| Run {
            unit: Unit::Chat,
            phase,
            lapses: 0,
            ending,
        };
        match *decision {
            Takeover::RetryLater => None,
            Takeover::End {
                phase: ends,
                reason,
            } => Some((
                run(phase, None),
                Step::End {
                    phase: ends,
                    reason: Some(reason.to_owned()),
                },
            )),
            Takeover::FinishSwitch => {
                Some((run(Phase::Switching, None), Step::act(Act::FinishSwitch)))
            }
            Takeover::RollBack { ends } => {
                let ending = if ends == Phase::Cancelled {
                    Ending::Cancelled
                } else {
                    Ending::Failed(format!("abandoned by its driver in phase {phase}"))
                };
                Some((run(phase, Some(ending)), Step::act(Act::RollBack)))
            }
            Takeover::Resume { .. } => Some(Run::start(Unit::Chat)),
        }
    }
}

/// Decides the move's next step from what its last one found.
pub fn next(run: &mut Run, seen: Seen) -> Step {
    let unit = run.unit;
    match seen {
        Seen::Superseded => {
            // Past the switch's last step the clean-up is the same whoever
            // holds the move (and idempotent): it goes on.
            if matches!(run.phase, Phase::Switched | Phase::Cleaning) {
                return after_record(run);
            }
            Step::Leave {
                reason: "taken over by another instance".to_owned(),
            }
        }
        Seen::Undecided(why) => Step::Leave {
            reason: format!("the switch's outcome is unknown: {why}"),
        },
        // Past the tombstone a cancel is refused: the move goes on.
        Seen::Cancelled if run.phase.past_tombstone() => after_record(run),
        Seen::Cancelled if run.ending.is_none() => {
            run.ending = Some(Ending::Cancelled);
            wind_down(run)
        }
        // Already winding down: the cancel changes nothing.
        Seen::Cancelled => Step::Leave {
            reason: "cancelled while winding down".to_owned(),
        },
        Seen::Failed(why) if run.phase.past_tombstone() => Step::Leave {
            reason: format!("{why}; the switch is finished by the instance that takes it over"),
        },
        Seen::Failed(why) => {
            if run.ending.is_none() {
                run.ending = Some(Ending::Failed(why));
            }
            wind_down(run)
        }
        Seen::Recorded => after_record(run),
        Seen::Opened => {
            run.phase = Phase::Copying;
            Step::record(Phase::Copying, Act::Copy)
        }
        Seen::AlreadySwitched => {
            run.phase = Phase::Switched;
            Step::act(Act::Clean)
        }
        Seen::CaughtUp => match unit {
            // The copy's progress (its revision) recorded before the fence.
            Unit::Chat => Step::record(Phase::Copying, Act::Fence),
            Unit::Range => Step::act(Act::Fence),
        },
        Seen::Fenced => {
            run.phase = Phase::Fenced;
            Step::record(Phase::Fenced, Act::CopyFenced)
        }
        Seen::Verified => match unit {
            Unit::Chat => {
                run.phase = Phase::Verified;
                Step::record(Phase::Verified, Act::Switch)
            }
            Unit::Range => Step::act(Act::Switch),
        },
        Seen::Lapsed => {
            run.lapses += 1;
            if run.lapses >= FENCE_ATTEMPTS {
                let why = match unit {
                    Unit::Chat => {
                        format!("the fence lapsed {FENCE_ATTEMPTS} times before the switch")
                    }
                    Unit::Range => format!("the range's fence lapsed {FENCE_ATTEMPTS} times"),
                };
                run.ending = Some(Ending::Failed(why));
                return wind_down(run);
            }
            match unit {
                // Copy on (the writes the lapse let in), then fence again.
                Unit::Chat => {
                    run.phase = Phase::Copying;
                    Step::act(Act::Copy)
                }
                // New chats of the range wait only under the fence: fence
                // again, and pass again under it.
                Unit::Range => Step::act(Act::Fence),
            }
        }
        Seen::Switched => {
            run.phase = Phase::Switching;
            Step::act(Act::FinishSwitch)
        }
        Seen::Finished => {
            run.phase = Phase::Switched;
            match unit {
                Unit::Chat => Step::record(Phase::Switched, Act::Nothing),
                Unit::Range => Step::record(Phase::Switched, Act::Clean),
            }
        }
        Seen::Cleaned => {
            run.phase = Phase::Done;
            Step::End {
                phase: Phase::Done,
                reason: None,
            }
        }
        Seen::Holds => Step::act(Act::RollBack),
        Seen::Unreachable => Step::Leave {
            reason: match &run.ending {
                Some(Ending::Failed(why)) => why.clone(),
                _ => "cancelled".to_owned(),
            },
        },
        Seen::FenceLifted => match (&run.ending, unit) {
            (Some(Ending::Cancelled), Unit::Range) => {
                run.phase = Phase::Cancelling;
                Step::record(Phase::Cancelling, Act::RollBack)
            }
            // A failed range drops its copies too (`RolledBack` ends it
            // `failed`).
            _ => Step::act(Act::RollBack),
        },
        Seen::RolledBack(left) => match (&run.ending, unit) {
            (Some(Ending::Failed(why)), Unit::Chat) => Step::End {
                phase: Phase::RolledBack,
                reason: Some(why.clone()),
            },
            (Some(Ending::Failed(why)), Unit::Range) => Step::End {
                phase: Phase::Failed,
                reason: Some(why.clone()),
            },
            (_, Unit::Chat) => Step::End {
                phase: Phase::Cancelled,
                reason: None,
            },
            (_, Unit::Range) => Step::End {
                phase: Phase::Cancelled,
                reason: left,
            },
        },
    }
}

/// After a record with nothing else to do: the clean-up follows the
/// switch's record; anywhere else the record was the whole step.
fn after_record(run: &mut Run) -> Step {
    match run.phase {
        Phase::Switched if run.unit == Unit::Chat => {
            run.phase = Phase::Cleaning;
            Step::record(Phase::Cleaning, Act::Clean)
        }
        Phase::Switching => Step::act(Act::FinishSwitch),
        // Only reached by a cancel refused or a takeover ignored while
        // cleaning: the clean-up goes on.
        Phase::Switched | Phase::Cleaning => Step::act(Act::Clean),
        phase => Step::Leave {
            reason: format!("nothing to do after a record in phase {phase}"),
        },
    }
}

/// A move that stops before its switch. A chat: whether this driver still
/// holds it is asked first (it is not rolled back on a guess), then the
/// target's copy is dropped. A range: the fence is lifted, then (a cancel)
/// its chats move back, or (a failure) the moved ones stay.
fn wind_down(run: &mut Run) -> Step {
    match run.unit {
        Unit::Chat => Step::act(Act::Confirm),
        Unit::Range => Step::act(Act::LiftFence),
    }
}

/// What a takeover found about an abandoned move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abandoned {
    /// The phase its record was left in.
    pub phase: Phase,
    /// Whether the target shard is configured on this instance.
    pub target_known: bool,
    /// What the source says of the chat, read after the claim.
    pub source: Source,
    /// `cancel_requested`: 0 none, 1 asked, 2 barred by an earlier build's
    /// takeover.
    pub cancel: u8,
    /// A move of a range's chat (its range move decides what becomes of it).
    pub of_range: bool,
}

/// The source shard's word on the chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// It could not be read: it may hold the tombstone.
    Unreadable,
    /// Its tombstone points at the move's target: the switch went in.
    Switched,
    /// It still holds the chat (or its tombstone points elsewhere).
    Holds,
}

/// What the new driver does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    /// Nothing now; the next round tries again.
    RetryLater,
    /// End the record at once, touching no shard (the target is unknown here).
    End { phase: Phase, reason: &'static str },
    /// Switch steps 2 and 3, then the clean-up, to `done`.
    FinishSwitch,
    /// Drop the target's copy, and end the record in `ends`.
    RollBack { ends: Phase },
    /// Drive the move on from where the target stands (`from_start` when
    /// the target was never opened).
    Resume { from_start: bool },
}

/// Decides what becomes of an abandoned move.
pub fn take_over(a: &Abandoned) -> Takeover {
    if !a.target_known {
        return Takeover::End {
            phase: Phase::RolledBack,
            reason: "its target shard is not configured here",
        };
    }
    match a.source {
        Source::Unreadable => Takeover::RetryLater,
        Source::Switched => Takeover::FinishSwitch,
        Source::Holds if a.cancel == 1 => Takeover::RollBack {
            ends: Phase::Cancelled,
        },
        Source::Holds if a.cancel != 0 || a.of_range => Takeover::RollBack {
            ends: Phase::RolledBack,
        },
        Source::Holds => Takeover::Resume {
            from_start: a.phase == Phase::Requested,
        },
    }
}

#[cfg(test)]
mod tests;
