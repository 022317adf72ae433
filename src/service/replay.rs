//! What a batch of a chat's event log does to its member rows when a move
//! replays it on the target, in pure code (beside `plan.rs`, which decides
//! the writes of a request batch); `storage::moves::replay_batch` only runs
//! the statements.
//!
//! Invariants the tests hold:
//! - every member a join or leave touched is written once, in the state
//!   its last event leaves it (a message touches no member);
//! - the member count changes by exactly the members that became joined
//!   minus those that stopped being joined, counted from the target's rows
//!   (so a batch replayed over a snapshot that already holds its writes
//!   changes nothing);
//! - a member unknown to the target is inserted; a known one is updated.

use std::collections::HashMap;

use crate::domain::{EventType, MemberState};
use crate::storage::moves::{LogRow, MemberFate};

/// What replaying a batch writes and changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// One per member touched, in the order of their first event.
    pub members: Vec<MemberFate>,
    /// The change of the chat's member count.
    pub delta: i64,
    /// Rows written: each event, each member row, each message.
    pub written: u64,
}

/// The users whose member rows the batch touches (sorted, once each): the
/// rows to read, and lock, on the target first.
pub fn members_touched(rows: &[LogRow]) -> Vec<&str> {
    let mut users: Vec<&str> = rows
        .iter()
        .filter(|r| member_event(r).is_some())
        .map(|r| r.user_id.as_str())
        .collect();
    users.sort_unstable();
    users.dedup();
    users
}

/// The state a join or leave sets; `None` for a message (or a type this
/// build does not know, which touches no member either).
fn member_event(row: &LogRow) -> Option<MemberState> {
    match EventType::from_code(row.event_type)? {
        EventType::MemberJoined => Some(MemberState::Joined),
        EventType::MemberLeft => Some(MemberState::Left),
        EventType::MessageSent => None,
    }
}

/// Folds the batch over the member states the target holds (`existing`:
/// user → `chat_member.state`, as read under the chat's row lock).
pub fn fold(rows: &[LogRow], existing: &HashMap<String, u8>) -> Replay {
    let mut order: Vec<&str> = Vec::new();
    let mut fates: HashMap<&str, MemberFate> = HashMap::new();
    for row in rows {
        let Some(state) = member_event(row) else {
            continue;
        };
        let before = existing.get(&row.user_id).copied();
        let fate = fates.entry(row.user_id.as_str()).or_insert_with(|| {
            order.push(row.user_id.as_str());
            MemberFate {
                user_id: row.user_id.clone(),
                id: row.member_id,
                before,
                state: before.unwrap_or(MemberState::Left.code()),
                created_at: row.created_at,
                joined_at: None,
                left_at: None,
                updated_at: row.created_at,
            }
        });
        fate.updated_at = row.created_at;
        fate.state = state.code();
        match state {
            MemberState::Joined => {
                fate.joined_at = Some(row.created_at);
                fate.left_at = None;
            }
            MemberState::Left => fate.left_at = Some(row.created_at),
        }
    }
    let joined = MemberState::Joined.code();
    let members: Vec<MemberFate> = order
        .into_iter()
        .filter_map(|user| fates.remove(user))
        .collect();
    let delta = members
        .iter()
        .map(|f| i64::from(f.state == joined) - i64::from(f.before == Some(joined)))
        .sum();
    let messages = rows.iter().filter(|r| member_event(r).is_none()).count();
    Replay {
        written: (rows.len() + members.len() + messages) as u64,
        members,
        delta,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDateTime;
    use proptest::prelude::*;

    fn at(s: i64) -> NaiveDateTime {
        chrono::DateTime::from_timestamp(1_700_000_000 + s, 0)
            .map(|d| d.naive_utc())
            .unwrap_or_default()
    }

    fn event(revision: u64, kind: EventType, user: &str) -> LogRow {
        LogRow {
            revision,
            event_type: kind.code(),
            user_id: user.to_owned(),
            created_at: at(revision as i64),
            member_id: (kind != EventType::MessageSent).then_some(100 + revision),
            message_id: (kind == EventType::MessageSent).then_some(200 + revision),
            sender_id: None,
            client_message_id: None,
            body: None,
            message_created_at: None,
        }
    }

    #[test]
    fn a_join_then_a_leave_leaves_one_left_row_and_no_change_of_count() {
        let rows = [
            event(1, EventType::MemberJoined, "u1"),
            event(2, EventType::MessageSent, "u1"),
            event(3, EventType::MemberLeft, "u1"),
        ];
        let r = fold(&rows, &HashMap::new());
        assert_eq!(r.members.len(), 1);
        let f = &r.members[0];
        assert_eq!(
            (f.state, f.before, f.id),
            (MemberState::Left.code(), None, Some(101))
        );
        assert_eq!((f.joined_at, f.left_at), (Some(at(1)), Some(at(3))));
        assert_eq!(r.delta, 0);
        // 3 events, 1 member row, 1 message.
        assert_eq!(r.written, 5);
        assert_eq!(members_touched(&rows), ["u1"]);
    }

    #[test]
    fn a_batch_the_target_already_holds_changes_no_count() {
        let rows = [
            event(1, EventType::MemberJoined, "u1"),
            event(2, EventType::MemberJoined, "u2"),
        ];
        let existing: HashMap<String, u8> = [("u1".to_owned(), 1), ("u2".to_owned(), 1)].into();
        assert_eq!(fold(&rows, &existing).delta, 0);
        let existing: HashMap<String, u8> = [("u1".to_owned(), 2)].into();
        assert_eq!(fold(&rows, &existing).delta, 2);
    }

    fn rows() -> impl Strategy<Value = Vec<LogRow>> {
        proptest::collection::vec((0u8..3, 0usize..5), 0..40).prop_map(|picks| {
            picks
                .into_iter()
                .enumerate()
                .map(|(i, (kind, user))| {
                    let kind = [
                        EventType::MessageSent,
                        EventType::MemberJoined,
                        EventType::MemberLeft,
                    ][kind as usize];
                    event(i as u64 + 1, kind, &format!("u{user}"))
                })
                .collect()
        })
    }

    fn existing() -> impl Strategy<Value = HashMap<String, u8>> {
        proptest::collection::hash_map((0usize..5).prop_map(|u| format!("u{u}")), 1u8..=2, 0..5)
    }

    proptest! {
        /// The fold agrees with applying the events one at a time, and the
        /// count moves by the joined rows it leaves minus those it found.
        #[test]
        fn the_fold_is_the_events_applied_in_order(rows in rows(), existing in existing()) {
            let r = fold(&rows, &existing);
            let mut states = existing.clone();
            for row in &rows {
                if let Some(state) = member_event(row) {
                    states.insert(row.user_id.clone(), state.code());
                }
            }
            let touched = members_touched(&rows);
            prop_assert_eq!(r.members.len(), touched.len());
            for f in &r.members {
                prop_assert_eq!(Some(f.state), states.get(&f.user_id).copied());
                prop_assert_eq!(f.before, existing.get(&f.user_id).copied());
                prop_assert!(touched.contains(&f.user_id.as_str()));
            }
            let joined = |m: &HashMap<String, u8>| m.values().filter(|s| **s == 1).count() as i64;
            prop_assert_eq!(r.delta, joined(&states) - joined(&existing));
        }

        /// Replaying the same batch over what it left changes nothing more.
        #[test]
        fn a_batch_replayed_again_changes_no_count(rows in rows(), existing in existing()) {
            let first = fold(&rows, &existing);
            let mut after = existing.clone();
            for f in &first.members {
                after.insert(f.user_id.clone(), f.state);
            }
            prop_assert_eq!(fold(&rows, &after).delta, 0);
        }
    }
}
