//! What one pass of a bucket-range move must do, decided from the range's
//! chats as the source and the target hold them (pure; the pass that acts
//! on it is `range_copy.rs`).
//!
//! A chat live on the source is either in step on the target (a copy marked
//! as held by the source, at the same revision), behind (replayed from the
//! copy's revision, while the source's log still holds what follows), or
//! copied whole from a snapshot of its rows. A chat the source holds
//! elsewhere (its home is the source, its rows on a third shard) gets a
//! marker row on the target, which becomes its home at the flip.

use std::collections::HashMap;

use crate::storage::range_copy::RangeChat;

/// A chat to replay: its copy stands at `from`, the source at `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Behind {
    pub chat: String,
    pub from: u64,
    pub to: u64,
}

/// One pass's work.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// Live on the source: copied whole (no copy yet, or one that cannot be
    /// caught up).
    pub snapshot: Vec<String>,
    /// Live on the source, the copy behind.
    pub behind: Vec<Behind>,
    /// Held by a third shard (named): a marker on the target.
    pub markers: Vec<(String, String)>,
    /// Copies on the target of chats the source no longer holds: dropped.
    pub drop: Vec<String>,
    /// Chats live on both sides: the move cannot go on.
    pub conflicts: Vec<String>,
    /// The range's chats on the source (live or held elsewhere).
    pub chats: u64,
    /// Live chats whose copy is in step.
    pub in_step: u64,
}

impl Diff {
    /// The revisions the behind chats need.
    pub fn revisions(&self) -> u64 {
        self.behind.iter().map(|b| b.to - b.from).sum()
    }

    /// Every chat the pass acts on, once each: the chats whose copy a
    /// check after the pass reads again.
    pub fn named(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .snapshot
            .iter()
            .chain(self.behind.iter().map(|b| &b.chat))
            .chain(self.markers.iter().map(|(chat, _)| chat))
            .chain(&self.drop)
            .cloned()
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Whether the pass has nothing to copy.
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_empty()
            && self.behind.is_empty()
            && self.markers.is_empty()
            && self.drop.is_empty()
    }
}

/// The pass `source` (the source's rows of the range) and `target` (the
/// target's) call for; `source_name` is the name a copy's marker holds.
pub fn diff(
    source: &[RangeChat],
    target: &[RangeChat],
    source_name: &str,
    target_name: &str,
) -> Diff {
    let there: HashMap<&str, &RangeChat> = target.iter().map(|t| (t.chat_id.as_str(), t)).collect();
    let mut d = Diff {
        chats: source.len() as u64,
        ..Diff::default()
    };
    let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for s in source {
        seen.insert(s.chat_id.as_str());
        let t = there.get(s.chat_id.as_str());
        match (&s.moved_to, t) {
            (None, None) => d.snapshot.push(s.chat_id.clone()),
            (None, Some(t)) => match t.moved_to.as_deref() {
                None => d.conflicts.push(s.chat_id.clone()),
                Some(to) if to == source_name => {
                    if t.revision == s.revision {
                        d.in_step += 1;
                    } else if t.revision < s.revision && s.first_revision <= t.revision + 1 {
                        d.behind.push(Behind {
                            chat: s.chat_id.clone(),
                            from: t.revision,
                            to: s.revision,
                        });
                    } else {
                        d.snapshot.push(s.chat_id.clone());
                    }
                }
                // A tombstone of an earlier move away from the target, or a
                // marker: the copy replaces it.
                Some(_) => d.snapshot.push(s.chat_id.clone()),
            },
            (Some(to), t) if to != target_name => match t {
                None => d.markers.push((s.chat_id.clone(), to.clone())),
                Some(t) if t.moved_to.as_deref() == Some(source_name) => {
                    d.drop.push(s.chat_id.clone());
                    d.markers.push((s.chat_id.clone(), to.clone()));
                }
                Some(_) => {}
            },
            // Already on the target.
            (Some(_), _) => {}
        }
    }
    for t in target {
        if t.moved_to.as_deref() == Some(source_name) && !seen.contains(t.chat_id.as_str()) {
            d.drop.push(t.chat_id.clone());
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chat(id: &str, revision: u64, first: u64, moved_to: Option<&str>) -> RangeChat {
        RangeChat {
            bucket: 1,
            chat_id: id.to_owned(),
            revision,
            first_revision: first,
            moved_to: moved_to.map(str::to_owned),
        }
    }

    #[test]
    fn each_kind_of_chat_gets_its_step() {
        let source = [
            chat("new", 5, 1, None),
            chat("same", 7, 1, None),
            chat("behind", 9, 1, None),
            chat("purged", 9, 8, None),
            chat("old-tombstone", 3, 1, None),
            chat("third", 0, 1, Some("c")),
            chat("there", 0, 1, Some("b")),
            chat("both", 2, 1, None),
        ];
        let target = [
            chat("same", 7, 1, Some("a")),
            chat("behind", 4, 1, Some("a")),
            chat("purged", 4, 1, Some("a")),
            chat("old-tombstone", 0, 1, Some("c")),
            chat("there", 6, 1, None),
            chat("both", 2, 1, None),
            chat("gone", 3, 1, Some("a")),
        ];
        let d = diff(&source, &target, "a", "b");
        assert_eq!(d.snapshot, ["new", "purged", "old-tombstone"]);
        assert_eq!(
            d.behind,
            [Behind {
                chat: "behind".into(),
                from: 4,
                to: 9
            }]
        );
        assert_eq!(d.markers, [("third".to_owned(), "c".to_owned())]);
        assert_eq!(d.drop, ["gone"]);
        assert_eq!(d.conflicts, ["both"]);
        assert_eq!((d.chats, d.in_step, d.revisions()), (8, 1, 5));
    }

    /// A pass's work, applied as the copy applies it.
    fn apply(source: &[RangeChat], target: &mut Vec<RangeChat>, d: &Diff) {
        target.retain(|t| !d.drop.contains(&t.chat_id));
        for id in d.snapshot.iter().chain(d.behind.iter().map(|b| &b.chat)) {
            let s = source.iter().find(|s| &s.chat_id == id).unwrap();
            target.retain(|t| &t.chat_id != id);
            target.push(chat(id, s.revision, s.first_revision, Some("a")));
        }
        for (id, to) in &d.markers {
            target.push(chat(id, 0, 1, Some(to)));
        }
    }

    /// Two sides with no chat live on both (and no copy on the source).
    fn without_conflicts(
        source: Vec<RangeChat>,
        target: Vec<RangeChat>,
    ) -> (Vec<RangeChat>, Vec<RangeChat>) {
        let source: Vec<RangeChat> = source
            .into_iter()
            .filter(|s| s.moved_to.as_deref() != Some("a"))
            .collect();
        let target = target
            .into_iter()
            .filter(|t| {
                let live_at_source = source
                    .iter()
                    .any(|s| s.chat_id == t.chat_id && s.moved_to.is_none());
                !(live_at_source && t.moved_to.is_none())
            })
            .collect();
        (source, target)
    }

    fn side() -> impl Strategy<Value = Vec<RangeChat>> {
        let one = (
            0u8..12,
            0u64..20,
            1u64..4,
            prop_oneof![
                Just(None),
                Just(Some("a")),
                Just(Some("b")),
                Just(Some("c"))
            ],
        );
        proptest::collection::vec(one, 0..12).prop_map(|v| {
            let mut seen = std::collections::HashSet::new();
            v.into_iter()
                .filter(|(id, ..)| seen.insert(*id))
                .map(|(id, rev, first, to)| chat(&format!("c{id}"), rev, first.min(rev + 1), to))
                .collect()
        })
    }

    proptest! {
        /// Without conflicts, one pass's work brings every live chat of the
        /// source in step, and a second pass finds nothing to do.
        #[test]
        fn a_pass_brings_every_live_chat_in_step(source in side(), target in side()) {
            let (source, mut target) = without_conflicts(source, target);
            let d = diff(&source, &target, "a", "b");
            prop_assert!(d.conflicts.is_empty());
            apply(&source, &mut target, &d);
            let again = diff(&source, &target, "a", "b");
            prop_assert!(again.is_empty(), "{again:?}");
            let live = source.iter().filter(|s| s.moved_to.is_none()).count() as u64;
            prop_assert_eq!(again.in_step, live);
        }

        /// Under the fence (nothing but the pass changes either side), the
        /// check of only the chats a diff named judges a pass, whole or cut
        /// short anywhere, as a diff of the whole range would.
        #[test]
        fn the_named_chats_judge_a_fenced_pass_as_the_whole_range_would(
            source in side(),
            target in side(),
            done in proptest::collection::vec(any::<bool>(), 12),
        ) {
            let (source, mut target) = without_conflicts(source, target);
            let d = diff(&source, &target, "a", "b");
            let named = d.named();
            // The pass applied to some of its chats only.
            let applied: std::collections::HashSet<&String> = named.iter().zip(&done).filter(|(_, d)| **d).map(|(c, _)| c).collect();
            let part = Diff {
                snapshot: d.snapshot.iter().filter(|c| applied.contains(c)).cloned().collect(),
                behind: d.behind.iter().filter(|b| applied.contains(&b.chat)).cloned().collect(),
                markers: d.markers.iter().filter(|(c, _)| applied.contains(c)).cloned().collect(),
                drop: d.drop.iter().filter(|c| applied.contains(c)).cloned().collect(),
                ..Diff::default()
            };
            apply(&source, &mut target, &part);
            let whole = diff(&source, &target, "a", "b");
            let of_named = |side: &[RangeChat]| -> Vec<RangeChat> {
                side.iter().filter(|c| named.contains(&c.chat_id)).cloned().collect()
            };
            let checked = diff(&of_named(&source), &of_named(&target), "a", "b");
            prop_assert_eq!(whole.is_empty(), checked.is_empty(), "{:?} / {:?}", whole, checked);
            prop_assert_eq!(checked.named(), whole.named());
        }

        /// A behind chat is replayed only from a revision its source's log
        /// still holds.
        #[test]
        fn a_replay_never_starts_below_the_stored_log(source in side(), target in side()) {
            let d = diff(&source, &target, "a", "b");
            for b in &d.behind {
                let s = source.iter().find(|s| s.chat_id == b.chat).unwrap();
                prop_assert!(s.first_revision <= b.from + 1 && b.from < b.to);
            }
        }
    }
}
