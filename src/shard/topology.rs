//! Who is the writer of a replicated shard, decided in pure code from what the
//! monitor saw of every member (docs/replicas.md).
//!
//! The monitor reads each member's `@@read_only` (and whether it answered at
//! all) every `replicas.monitor_ms` and hands the round to [`decide`], which
//! says where writes go:
//!
//! * exactly one member writable, and it is the writer: nothing changes;
//! * exactly one member writable and it is another one: it becomes the
//!   writer only once a second round (`replicas.confirm_ms` later) still sees
//!   it so ([`Gate::Pending`]), so a member made writable for a moment by a
//!   confused orchestrator does not take the writes;
//! * no member writable (the writer died, or was made read-only before a
//!   replica was promoted): writes are refused at once, 503
//!   `shard_unavailable` ([`Gate::NoWriter`]); reads go on, on the replicas;
//! * two or more members writable: a split brain. Writes are refused (503
//!   `shard_split_brain`) until exactly one is writable again, and then only
//!   after a confirmation; reads go on.
//!
//! A member that did not answer is never chosen, and a writer that did not
//! answer loses the writes at once: a write refused for one monitor period is
//! retryable, a write sent to a server that may be demoted is not safe.

/// What one round saw of one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// It did not answer within the connect timeout.
    Down,
    /// `@@read_only = 1`.
    ReadOnly,
    /// `@@read_only = 0`.
    Writable,
}

/// Where writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// To this member.
    Writer(usize),
    /// Nowhere yet: this member looks like the new writer; one more round
    /// confirms it.
    Pending(usize),
    /// Nowhere: no member is writable.
    NoWriter,
    /// Nowhere: several members are writable.
    SplitBrain,
}

impl Gate {
    /// The member writes go to, if any.
    pub fn writer(self) -> Option<usize> {
        match self {
            Gate::Writer(i) => Some(i),
            _ => None,
        }
    }

    /// The name shown in views and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Gate::Writer(_) => "open",
            Gate::Pending(_) => "confirming",
            Gate::NoWriter => "no_writer",
            Gate::SplitBrain => "split_brain",
        }
    }
}

/// The gate after a round of probes. `probes` has one entry per member.
pub fn decide(current: Gate, probes: &[Probe]) -> Gate {
    let mut writable = probes
        .iter()
        .enumerate()
        .filter(|(_, p)| **p == Probe::Writable)
        .map(|(i, _)| i);
    match (writable.next(), writable.next()) {
        (None, _) => Gate::NoWriter,
        (Some(_), Some(_)) => Gate::SplitBrain,
        (Some(only), None) => match current {
            Gate::Writer(w) if w == only => Gate::Writer(w),
            Gate::Pending(p) if p == only => Gate::Writer(only),
            _ => Gate::Pending(only),
        },
    }
}

/// Whether a round should follow soon (`replicas.confirm_ms`) rather than
/// after a whole monitor period: a candidate waits for its confirmation.
pub fn confirm_soon(gate: Gate) -> bool {
    matches!(gate, Gate::Pending(_))
}

#[cfg(test)]
mod tests {
    use super::*;
    use Probe::*;
    use proptest::prelude::*;

    #[test]
    fn a_promoted_replica_takes_the_writes_after_one_confirmation() {
        let g = decide(Gate::Writer(0), &[Down, Writable, ReadOnly]);
        assert_eq!(g, Gate::Pending(1));
        assert!(confirm_soon(g));
        assert_eq!(decide(g, &[Down, Writable, ReadOnly]), Gate::Writer(1));
    }

    #[test]
    fn a_dead_writer_with_no_writable_member_closes_the_gate_at_once() {
        assert_eq!(
            decide(Gate::Writer(0), &[Down, ReadOnly, ReadOnly]),
            Gate::NoWriter
        );
        assert_eq!(
            decide(Gate::Writer(0), &[ReadOnly, ReadOnly]),
            Gate::NoWriter
        );
    }

    #[test]
    fn two_writable_members_are_a_split_brain_until_one_is_demoted() {
        let g = decide(Gate::Writer(0), &[Writable, Writable]);
        assert_eq!(g, Gate::SplitBrain);
        let g = decide(g, &[ReadOnly, Writable]);
        assert_eq!(g, Gate::Pending(1));
        assert_eq!(decide(g, &[ReadOnly, Writable]), Gate::Writer(1));
    }

    #[test]
    fn the_old_writer_coming_back_is_a_candidate_again() {
        let g = decide(Gate::Writer(0), &[Down, ReadOnly]);
        assert_eq!(g, Gate::NoWriter);
        assert_eq!(decide(g, &[Writable, ReadOnly]), Gate::Pending(0));
    }

    fn probe() -> impl Strategy<Value = Probe> {
        prop_oneof![Just(Down), Just(ReadOnly), Just(Writable)]
    }

    fn gate(n: usize) -> impl Strategy<Value = Gate> {
        prop_oneof![
            (0..n).prop_map(Gate::Writer),
            (0..n).prop_map(Gate::Pending),
            Just(Gate::NoWriter),
            Just(Gate::SplitBrain),
        ]
    }

    proptest! {
        /// Writes only ever go to a member the round saw writable, and only
        /// when it was the only one.
        #[test]
        fn writes_go_only_to_the_single_writable_member(
            (current, probes) in (1usize..5).prop_flat_map(|n| {
                (gate(n), proptest::collection::vec(probe(), n))
            })
        ) {
            let next = decide(current, &probes);
            if let Some(w) = next.writer() {
                prop_assert_eq!(probes[w], Writable);
                prop_assert_eq!(probes.iter().filter(|p| **p == Writable).count(), 1);
            }
        }

        /// A change of writer always goes through a confirmation: a member
        /// that was not the writer nor the candidate never gets the writes
        /// in one round.
        #[test]
        fn a_new_writer_is_always_confirmed(
            (current, probes) in (1usize..5).prop_flat_map(|n| {
                (gate(n), proptest::collection::vec(probe(), n))
            })
        ) {
            if let Some(w) = decide(current, &probes).writer() {
                prop_assert!(
                    current == Gate::Writer(w) || current == Gate::Pending(w),
                    "{current:?} -> writer {w}"
                );
            }
        }

        /// Two identical rounds in a row settle: the second changes nothing
        /// more after the confirmation.
        #[test]
        fn the_same_rounds_settle(
            (current, probes) in (1usize..5).prop_flat_map(|n| {
                (gate(n), proptest::collection::vec(probe(), n))
            })
        ) {
            let a = decide(current, &probes);
            let b = decide(a, &probes);
            let c = decide(b, &probes);
            prop_assert_eq!(b, c);
        }
    }
}
