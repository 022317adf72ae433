//! A chat move's phases and the decisions about a move whose driver died, in
//! pure code (the way `plan.rs` decides a batch); `moves.rs` executes them.
//!
//! The phases, in order: `requested` → `copying` → `fenced` → `verified` →
//! `switching` (written in the switch's transaction, with the source's
//! tombstone) → `switched` → `cleaning` → `done`; or, before `switching`,
//! `cancelled` / `rolled_back`. Invariants the tests hold:
//! - nothing past the tombstone is ever rolled back: a move whose source
//!   already points at its target is finished, whatever was asked;
//! - a cancel is honoured only before `switching`;
//! - every takeover decision either ends the move in a terminal phase, or
//!   resumes or finishes it, or leaves it for a later round when the source
//!   cannot be read (nothing is done on a guess).

/// One phase of a chat move, stored in `chat_move.phase` as [`Phase::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    Requested,
    Copying,
    Fenced,
    Verified,
    Switching,
    Switched,
    Cleaning,
    Done,
    Cancelled,
    RolledBack,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 10] = [
        Phase::Requested,
        Phase::Copying,
        Phase::Fenced,
        Phase::Verified,
        Phase::Switching,
        Phase::Switched,
        Phase::Cleaning,
        Phase::Done,
        Phase::Cancelled,
        Phase::RolledBack,
    ];

    /// The stored and shown name; the one string mapping.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Requested => "requested",
            Phase::Copying => "copying",
            Phase::Fenced => "fenced",
            Phase::Verified => "verified",
            Phase::Switching => "switching",
            Phase::Switched => "switched",
            Phase::Cleaning => "cleaning",
            Phase::Done => "done",
            Phase::Cancelled => "cancelled",
            Phase::RolledBack => "rolled_back",
        }
    }

    /// The phase a stored name names; `None` for a name this build does not
    /// know (a newer build's).
    pub fn parse(name: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == name)
    }

    /// The move has ended.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Done | Phase::Cancelled | Phase::RolledBack)
    }

    /// The source's tombstone may be in: the switch's transaction records
    /// `switching` with it, so from here the move only goes forward.
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
        f.write_str(self.as_str())
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
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_string_per_phase_and_back() {
        for p in Phase::ALL {
            assert_eq!(Phase::parse(p.as_str()), Some(p));
        }
        assert_eq!(Phase::parse("flipping"), None);
        let mut names: Vec<&str> = Phase::ALL.iter().map(|p| p.as_str()).collect();
        names.dedup();
        assert_eq!(names.len(), Phase::ALL.len());
        // The switch's SQL writes this literal (storage::moves::mark_switching).
        assert_eq!(Phase::Switching.as_str(), "switching");
    }

    #[test]
    fn a_phase_is_either_cancellable_past_the_tombstone_or_ended() {
        for p in Phase::ALL {
            let kinds = [
                p.cancellable(),
                p.past_tombstone(),
                p.is_terminal() && !p.past_tombstone(),
            ];
            assert_eq!(kinds.iter().filter(|k| **k).count(), 1, "{p}");
        }
    }

    fn phase() -> impl Strategy<Value = Phase> {
        (0..Phase::ALL.len()).prop_map(|i| Phase::ALL[i])
    }

    fn source() -> impl Strategy<Value = Source> {
        prop_oneof![
            Just(Source::Unreadable),
            Just(Source::Switched),
            Just(Source::Holds)
        ]
    }

    fn abandoned() -> impl Strategy<Value = Abandoned> {
        (phase(), any::<bool>(), source(), 0u8..=2, any::<bool>()).prop_map(
            |(phase, target_known, source, cancel, of_range)| Abandoned {
                phase,
                target_known,
                source,
                cancel,
                of_range,
            },
        )
    }

    proptest! {
        /// A switched move is finished whatever was asked: never rolled back,
        /// never cancelled, never resumed from the start.
        #[test]
        fn nothing_past_the_tombstone_is_rolled_back(a in abandoned()) {
            let step = take_over(&a);
            if a.target_known && a.source == Source::Switched {
                prop_assert_eq!(step, Takeover::FinishSwitch);
            }
            if let Takeover::RollBack { .. } = step {
                prop_assert_eq!(a.source, Source::Holds);
            }
        }

        /// Every decision ends the move in a terminal phase, or carries it on
        /// (resume, finish), or waits for a readable source.
        #[test]
        fn every_decision_ends_or_carries_on(a in abandoned()) {
            match take_over(&a) {
                Takeover::End { phase, .. } | Takeover::RollBack { ends: phase } => {
                    prop_assert!(phase.is_terminal() && !phase.past_tombstone());
                }
                Takeover::RetryLater => prop_assert_eq!(a.source, Source::Unreadable),
                Takeover::FinishSwitch | Takeover::Resume { .. } => {}
            }
        }

        /// A cancel ends the move `cancelled` only when it is rolled back; a
        /// range's chat or a barred move is never resumed alone.
        #[test]
        fn cancels_and_range_chats_are_not_resumed(a in abandoned()) {
            let step = take_over(&a);
            if (a.cancel != 0 || a.of_range) && a.source == Source::Holds && a.target_known {
                let rolled_back = matches!(step, Takeover::RollBack { .. });
                prop_assert!(rolled_back);
            }
            if let Takeover::RollBack { ends: Phase::Cancelled } = step {
                prop_assert_eq!(a.cancel, 1);
            }
        }
    }
}
