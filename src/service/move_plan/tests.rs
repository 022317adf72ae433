//! The move engine's decisions tested on plain data: named runs of the
//! machine, and properties over every run its acts can make.

use super::*;
use proptest::prelude::*;

const UNITS: [Unit; 2] = [Unit::Chat, Unit::Range];

#[test]
fn one_string_per_phase_and_unit_and_back() {
    for unit in UNITS {
        let names: Vec<&str> = Phase::ALL.iter().filter_map(|p| p.name(unit)).collect();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "{unit:?}");
        for p in Phase::ALL {
            if let Some(name) = p.name(unit) {
                assert_eq!(Phase::parse(unit, name), Some(p));
            }
        }
    }
    assert_eq!(Phase::parse(Unit::Chat, "flipping"), None);
    assert_eq!(Phase::parse(Unit::Range, "rolled_back"), None);
    // The storage's SQL writes these literals (storage::moves::mark_switching,
    // storage::buckets::begin_flip, and the cancellable phases there).
    assert_eq!(Phase::Switching.name(Unit::Chat), Some("switching"));
    assert_eq!(Phase::Switching.name(Unit::Range), Some("flipping"));
    for unit in UNITS {
        assert_eq!(Phase::Requested.name(unit), Some("requested"));
    }
}

#[test]
fn a_phase_is_either_cancellable_past_the_tombstone_or_winding_down_or_ended() {
    for p in Phase::ALL {
        let kinds = [
            p.cancellable(),
            p.past_tombstone(),
            p == Phase::Cancelling,
            p.is_terminal() && !p.past_tombstone(),
        ];
        assert_eq!(kinds.iter().filter(|k| **k).count(), 1, "{p}");
    }
}

/// Runs the machine from `step` with `outcome` answering each act and
/// record; the steps taken and how it stopped.
fn play(
    mut run: Run,
    mut step: Step,
    mut outcome: impl FnMut(&Run, Option<Phase>, Act) -> Seen,
) -> (Vec<Step>, Step, Run) {
    let mut taken = Vec::new();
    for _ in 0..200 {
        match step.clone() {
            Step::Do { record, act } => {
                taken.push(step.clone());
                let seen = match record.map(|p| outcome(&run, Some(p), act)) {
                    Some(Seen::Recorded) | None => outcome(&run, None, act),
                    Some(other) => other,
                };
                step = next(&mut run, seen);
            }
            end => return (taken, end, run),
        }
    }
    panic!("no end after 200 steps: {taken:?}");
}

/// Every act done as it should be.
fn smooth(_: &Run, record: Option<Phase>, act: Act) -> Seen {
    if record.is_some() {
        return Seen::Recorded;
    }
    match act {
        Act::Nothing => Seen::Recorded,
        Act::Open => Seen::Opened,
        Act::Copy => Seen::CaughtUp,
        Act::Fence => Seen::Fenced,
        Act::CopyFenced => Seen::Verified,
        Act::Switch => Seen::Switched,
        Act::FinishSwitch => Seen::Finished,
        Act::Clean => Seen::Cleaned,
        Act::Confirm => Seen::Holds,
        Act::LiftFence => Seen::FenceLifted,
        Act::RollBack => Seen::RolledBack(None),
    }
}

fn recorded(taken: &[Step]) -> Vec<Phase> {
    taken
        .iter()
        .filter_map(|s| match s {
            Step::Do { record, .. } => *record,
            _ => None,
        })
        .collect()
}

#[test]
fn a_chat_move_records_every_phase_in_order() {
    let (run, first) = Run::start(Unit::Chat);
    let (taken, end, _) = play(run, first, smooth);
    assert_eq!(
        recorded(&taken),
        [
            Phase::Copying,
            Phase::Copying,
            Phase::Fenced,
            Phase::Verified,
            Phase::Switched,
            Phase::Cleaning
        ]
    );
    assert_eq!(
        end,
        Step::End {
            phase: Phase::Done,
            reason: None
        }
    );
}

#[test]
fn a_range_move_fences_flips_and_tells() {
    let (run, first) = Run::start(Unit::Range);
    let (taken, end, _) = play(run, first, smooth);
    let acts: Vec<Act> = taken
        .iter()
        .filter_map(|s| match s {
            Step::Do { act, .. } => Some(*act),
            _ => None,
        })
        .collect();
    assert_eq!(
        acts,
        [
            Act::Open,
            Act::Copy,
            Act::Fence,
            Act::CopyFenced,
            Act::Switch,
            Act::FinishSwitch,
            Act::Clean
        ]
    );
    assert_eq!(
        recorded(&taken),
        [Phase::Copying, Phase::Fenced, Phase::Switched]
    );
    assert!(matches!(
        end,
        Step::End {
            phase: Phase::Done,
            ..
        }
    ));
}

#[test]
fn a_range_taken_over_after_its_flip_only_tells_the_shards() {
    let (run, first) = Run::start(Unit::Range);
    let (taken, end, _) = play(run, first, |run, record, act| match act {
        Act::Open => Seen::AlreadySwitched,
        _ => smooth(run, record, act),
    });
    assert_eq!(taken.len(), 2, "{taken:?}");
    assert_eq!(taken[1], Step::act(Act::Clean));
    assert!(matches!(
        end,
        Step::End {
            phase: Phase::Done,
            ..
        }
    ));
}

#[test]
fn a_fence_that_keeps_lapsing_fails_the_move_after_three_attempts() {
    for unit in UNITS {
        let (run, first) = Run::start(unit);
        let (taken, end, _) = play(run, first, |run, record, act| match act {
            Act::CopyFenced if record.is_none() => Seen::Lapsed,
            _ => smooth(run, record, act),
        });
        let fences = taken
            .iter()
            .filter(|s| {
                matches!(
                    s,
                    Step::Do {
                        act: Act::Fence,
                        ..
                    }
                )
            })
            .count();
        assert_eq!(fences as u32, FENCE_ATTEMPTS, "{unit:?}");
        let ends = if unit == Unit::Chat {
            Phase::RolledBack
        } else {
            Phase::Failed
        };
        assert!(
            matches!(end, Step::End { phase, reason: Some(_) } if phase == ends),
            "{end:?}"
        );
    }
}

#[test]
fn a_cancelled_range_lifts_its_fence_moves_its_chats_back_and_says_what_stayed() {
    let (run, first) = Run::start(Unit::Range);
    let (taken, end, _) = play(run, first, |run, record, act| match act {
        Act::CopyFenced => Seen::Cancelled,
        Act::RollBack => Seen::RolledBack(Some("1 chat(s) stay".to_owned())),
        _ => smooth(run, record, act),
    });
    let tail: Vec<&Step> = taken.iter().rev().take(2).collect();
    assert_eq!(*tail[0], Step::record(Phase::Cancelling, Act::RollBack));
    assert_eq!(*tail[1], Step::act(Act::LiftFence));
    assert_eq!(
        end,
        Step::End {
            phase: Phase::Cancelled,
            reason: Some("1 chat(s) stay".to_owned())
        }
    );
}

#[test]
fn a_chat_that_stopped_is_rolled_back_only_while_its_driver_holds_it() {
    for (confirm, ends) in [
        (Seen::Holds, true),
        (Seen::Superseded, false),
        (Seen::Unreachable, false),
    ] {
        let (run, first) = Run::start(Unit::Chat);
        let (taken, end, _) = play(run, first, |run, record, act| match act {
            Act::CopyFenced => Seen::Failed("the copies differ".to_owned()),
            Act::Confirm => confirm.clone(),
            _ => smooth(run, record, act),
        });
        let rolled = taken.iter().any(|s| {
            matches!(
                s,
                Step::Do {
                    act: Act::RollBack,
                    ..
                }
            )
        });
        assert_eq!(rolled, ends, "{confirm:?}");
        if ends {
            assert!(
                matches!(end, Step::End { phase: Phase::RolledBack, reason: Some(ref r) } if r == "the copies differ")
            );
        } else {
            assert!(matches!(end, Step::Leave { .. }), "{end:?}");
        }
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

/// What each act (or record) may find, as the drivers carry them out.
fn possible(unit: Unit, record: Option<Phase>, act: Act) -> Vec<Seen> {
    let failed = Seen::Failed("a shard said no".to_owned());
    if let Some(phase) = record {
        return match unit {
            // A chat's record says whether a cancel came, or another
            // driver took the move over; a range's is only progress.
            Unit::Chat if !phase.past_tombstone() => {
                vec![Seen::Recorded, Seen::Cancelled, Seen::Superseded]
            }
            Unit::Chat => vec![Seen::Recorded, Seen::Superseded],
            Unit::Range => vec![Seen::Recorded],
        };
    }
    match (act, unit) {
        (Act::Nothing, _) => vec![Seen::Recorded],
        (Act::Open, Unit::Chat) => vec![Seen::Opened, failed],
        (Act::Open, Unit::Range) => {
            vec![Seen::Opened, Seen::AlreadySwitched, Seen::Cancelled, failed]
        }
        (Act::Copy, Unit::Chat) => {
            vec![Seen::CaughtUp, Seen::Cancelled, Seen::Superseded, failed]
        }
        (Act::Copy, Unit::Range) => vec![Seen::CaughtUp, Seen::Cancelled, failed],
        (Act::Fence, _) => vec![Seen::Fenced, failed],
        (Act::CopyFenced, Unit::Chat) => vec![
            Seen::Verified,
            Seen::Lapsed,
            Seen::Cancelled,
            Seen::Superseded,
            failed,
        ],
        (Act::CopyFenced, Unit::Range) => {
            vec![Seen::Verified, Seen::Lapsed, Seen::Cancelled, failed]
        }
        (Act::Switch, Unit::Chat) => vec![
            Seen::Switched,
            Seen::Lapsed,
            Seen::Cancelled,
            Seen::Superseded,
            Seen::Undecided("no answer".to_owned()),
            failed,
        ],
        (Act::Switch, Unit::Range) => {
            vec![Seen::Switched, Seen::Lapsed, Seen::Cancelled, failed]
        }
        (Act::FinishSwitch, Unit::Chat) => vec![Seen::Finished, Seen::Superseded],
        (Act::FinishSwitch, Unit::Range) => vec![Seen::Finished],
        (Act::Clean, _) => vec![Seen::Cleaned],
        (Act::Confirm, _) => vec![Seen::Holds, Seen::Superseded, Seen::Unreachable],
        (Act::LiftFence, _) => vec![Seen::FenceLifted],
        (Act::RollBack, _) => vec![
            Seen::RolledBack(None),
            Seen::RolledBack(Some("left".to_owned())),
        ],
    }
}

/// A run where each act finds what `picks` say, among what it may find.
fn play_picked(run: Run, first: Step, picks: &[usize]) -> (Vec<Step>, Step, Run, Vec<Seen>) {
    let unit = run.unit;
    let mut picks = picks.iter().cycle();
    let mut seen_all = Vec::new();
    let (taken, end, run) = play(run, first, |_, record, act| {
        let options = possible(unit, record, act);
        let seen = options[picks.next().copied().unwrap_or(0) % options.len()].clone();
        seen_all.push(seen.clone());
        seen
    });
    (taken, end, run, seen_all)
}

fn unit() -> impl Strategy<Value = Unit> {
    prop_oneof![Just(Unit::Chat), Just(Unit::Range)]
}

proptest! {
    /// Every run ends in a terminal phase its unit has, or is left to a
    /// takeover; never in a loop.
    #[test]
    fn every_run_ends(unit in unit(), picks in proptest::collection::vec(0usize..8, 1..40)) {
        let (run, first) = Run::start(unit);
        let (_, end, _, _) = play_picked(run, first, &picks);
        match end {
            Step::End { phase, .. } => {
                prop_assert!(phase.is_terminal());
                prop_assert!(phase.name(unit).is_some(), "{phase:?} is not a {unit:?} phase");
            }
            Step::Leave { .. } => {}
            Step::Do { .. } => prop_assert!(false, "play stops only at an end"),
        }
    }

    /// Once the switch went in, nothing undoes it: no roll-back, no
    /// fence lifted, and the only end is `done`.
    #[test]
    fn nothing_past_the_switch_is_undone(unit in unit(), picks in proptest::collection::vec(0usize..8, 1..40)) {
        let (run, first) = Run::start(unit);
        let (taken, end, run, seen) = play_picked(run, first, &picks);
        if seen.contains(&Seen::Switched) || seen.contains(&Seen::AlreadySwitched) {
            let undone = taken
                .iter()
                .skip_while(|s| !matches!(s, Step::Do { act: Act::FinishSwitch | Act::Clean, .. }))
                .any(|s| matches!(s, Step::Do { act: Act::RollBack | Act::LiftFence | Act::Confirm, .. }));
            prop_assert!(!undone, "{taken:?}");
            if let Step::End { phase, .. } = end {
                prop_assert_eq!(phase, Phase::Done);
            }
            prop_assert!(run.phase.past_tombstone());
        }
    }

    /// A move ends `cancelled` only when a cancel was seen before its
    /// switch, and one seen after the switch changes nothing.
    #[test]
    fn a_cancel_counts_only_before_the_switch(unit in unit(), picks in proptest::collection::vec(0usize..8, 1..40)) {
        let (run, first) = Run::start(unit);
        let (_, end, _, seen) = play_picked(run, first, &picks);
        if let Step::End { phase: Phase::Cancelled, .. } = end {
            let switched = seen.iter().position(|s| matches!(s, Seen::Switched | Seen::AlreadySwitched));
            let cancel = seen.iter().position(|s| *s == Seen::Cancelled);
            prop_assert!(cancel.is_some());
            prop_assert!(switched.is_none());
        }
    }

    /// The fence is tried at most three times.
    #[test]
    fn the_fence_is_tried_at_most_three_times(unit in unit(), picks in proptest::collection::vec(0usize..8, 1..40)) {
        let (run, first) = Run::start(unit);
        let (taken, _, _, _) = play_picked(run, first, &picks);
        let fences = taken.iter().filter(|s| matches!(s, Step::Do { act: Act::Fence, .. })).count();
        prop_assert!(fences as u32 <= FENCE_ATTEMPTS);
    }

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
    /// (resume, finish), or waits for a readable source; and the machine
    /// it starts ends too, a finished switch in `done`.
    #[test]
    fn every_decision_ends_or_carries_on(a in abandoned(), picks in proptest::collection::vec(0usize..8, 1..40)) {
        let decision = take_over(&a);
        match decision {
            Takeover::End { phase, .. } | Takeover::RollBack { ends: phase } => {
                prop_assert!(phase.is_terminal() && !phase.past_tombstone());
            }
            Takeover::RetryLater => prop_assert_eq!(a.source, Source::Unreadable),
            Takeover::FinishSwitch | Takeover::Resume { .. } => {}
        }
        let Some((run, first)) = Run::taken_over(a.phase, &decision) else {
            prop_assert_eq!(decision, Takeover::RetryLater);
            return Ok(());
        };
        let (_, end, _, _) = play_picked(run, first, &picks);
        match (decision, end) {
            (Takeover::FinishSwitch, Step::End { phase, .. }) => prop_assert_eq!(phase, Phase::Done),
            (Takeover::RollBack { ends }, Step::End { phase, .. }) => prop_assert_eq!(phase, ends),
            (_, Step::End { phase, .. }) => prop_assert!(phase.is_terminal()),
            (_, _) => {}
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
