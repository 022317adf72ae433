//! Planning a batch of writes to one chat: pure, no I/O.
//!
//! The group commit hands a batch of joins, leaves and messages of one chat to
//! [`plan`] together with what the transaction read under lock (the chat row, the
//! rows of the users involved, the messages with the idempotency keys involved).
//! The planner replays the operations in order against that state and returns
//! every row to insert or update, every event to append (with consecutive
//! revisions), the member-count delta, and each operation's outcome.
//!
//! Invariants, each tested below: the count delta equals the net number of real
//! JOINED transitions; a join never takes the count past `max_members`; every
//! state transition and every new message gets exactly one event, with revisions
//! `revision + 1 ..= revision + n`; an idempotency key is stored at most once.

use std::collections::HashMap;

use chrono::NaiveDateTime;

use crate::domain::{ClientMessageId, EventType, MemberState, MessageText, UserId};

/// One write to a chat.
#[derive(Debug, Clone)]
pub enum WriteOp {
    Join {
        user: UserId,
    },
    Leave {
        user: UserId,
    },
    Post {
        sender: UserId,
        client_message_id: ClientMessageId,
        text: MessageText,
    },
}

impl WriteOp {
    /// The user whose membership row this write reads.
    pub fn user(&self) -> &UserId {
        match self {
            Self::Join { user } | Self::Leave { user } => user,
            Self::Post { sender, .. } => sender,
        }
    }
}

/// Why a write was refused; a business outcome, never a failure of the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    ChatNotFound,
    MemberNotFound,
    ChatFull { max_members: u32 },
    NotAMember,
    IdempotencyKeyReused,
}

/// A member row as read under lock.
#[derive(Debug, Clone)]
pub struct MemberBefore {
    pub id: u64,
    pub state: MemberState,
    pub joined_at: NaiveDateTime,
}

/// A stored message as read under lock.
#[derive(Debug, Clone)]
pub struct MessageBefore {
    pub text: String,
}

/// The locked state of the chat.
#[derive(Debug, Clone)]
pub struct ChatBefore {
    pub revision: u64,
    pub max_members: u32,
    pub member_count: u32,
}

/// What an operation will have done once the batch commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Planned {
    /// The user is JOINED; `created` when this write made it so.
    Joined {
        user: UserId,
        created: bool,
        joined_at: NaiveDateTime,
    },
    /// The user is LEFT; `now` when this write made it so.
    Left {
        now: bool,
    },
    /// The message exists; `created` when this write stored it.
    Posted {
        sender: UserId,
        client_message_id: ClientMessageId,
        created: bool,
    },
    Rejected(Rejection),
}

/// A member row to insert (the user had none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedMember {
    pub user: UserId,
    pub state: MemberState,
    pub joined_at: NaiveDateTime,
}

/// A message row to insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedMessage {
    pub sender: UserId,
    pub client_message_id: ClientMessageId,
    pub revision: u64,
    pub text: String,
}

/// An event to append; a message event names its message by key (the id is
/// known only after the insert).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedEvent {
    pub revision: u64,
    pub kind: EventType,
    pub user: UserId,
    pub message: Option<(UserId, ClientMessageId)>,
}

/// Everything a batch writes, and each operation's outcome (same order as ops).
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub outcomes: Vec<Planned>,
    pub new_members: Vec<PlannedMember>,
    /// Existing rows that end the batch JOINED after a transition.
    pub to_joined: Vec<u64>,
    /// Existing rows that end the batch LEFT after a transition.
    pub to_left: Vec<u64>,
    pub new_messages: Vec<PlannedMessage>,
    pub events: Vec<PlannedEvent>,
    pub count_delta: i64,
}

/// The simulated state of one user during the batch.
struct Sim {
    row_id: Option<u64>,
    state: Option<MemberState>,
    joined_at: Option<NaiveDateTime>,
    touched: bool,
}

/// Replays `ops` against the locked state. `chat` is `None` when the chat does
/// not exist (every operation is then refused).
pub fn plan(
    chat: Option<&ChatBefore>,
    members: &HashMap<UserId, MemberBefore>,
    messages: &HashMap<(UserId, ClientMessageId), MessageBefore>,
    ops: &[WriteOp],
    now: NaiveDateTime,
) -> Plan {
    let Some(chat) = chat else {
        return Plan {
            outcomes: vec![Planned::Rejected(Rejection::ChatNotFound); ops.len()],
            ..Plan::default()
        };
    };
    let mut plan = Plan::default();
    let mut users: HashMap<UserId, Sim> = HashMap::new();
    let mut user_order: Vec<UserId> = Vec::new();
    let mut stored: HashMap<(UserId, ClientMessageId), String> = messages
        .iter()
        .map(|(k, v)| (k.clone(), v.text.clone()))
        .collect();
    let mut count = i64::from(chat.member_count);
    let mut revision = chat.revision;

    for op in ops {
        let user = op.user().clone();
        let sim = users.entry(user.clone()).or_insert_with(|| {
            user_order.push(user.clone());
            let before = members.get(&user);
            Sim {
                row_id: before.map(|m| m.id),
                state: before.map(|m| m.state),
                joined_at: before.map(|m| m.joined_at),
                touched: false,
            }
        });
        let outcome = match op {
            WriteOp::Join { .. } => {
                if sim.state == Some(MemberState::Joined) {
                    Planned::Joined {
                        user,
                        created: false,
                        joined_at: sim.joined_at.unwrap_or(now),
                    }
                } else if count >= i64::from(chat.max_members) {
                    Planned::Rejected(Rejection::ChatFull {
                        max_members: chat.max_members,
                    })
                } else {
                    sim.state = Some(MemberState::Joined);
                    sim.joined_at = Some(now);
                    sim.touched = true;
                    count += 1;
                    revision += 1;
                    plan.events.push(PlannedEvent {
                        revision,
                        kind: EventType::MemberJoined,
                        user: user.clone(),
                        message: None,
                    });
                    Planned::Joined {
                        user,
                        created: true,
                        joined_at: now,
                    }
                }
            }
            WriteOp::Leave { .. } => match sim.state {
                None => Planned::Rejected(Rejection::MemberNotFound),
                Some(MemberState::Left) => Planned::Left { now: false },
                Some(MemberState::Joined) => {
                    sim.state = Some(MemberState::Left);
                    sim.touched = true;
                    count -= 1;
                    revision += 1;
                    plan.events.push(PlannedEvent {
                        revision,
                        kind: EventType::MemberLeft,
                        user,
                        message: None,
                    });
                    Planned::Left { now: true }
                }
            },
            WriteOp::Post {
                client_message_id,
                text,
                ..
            } => {
                let key = (user.clone(), client_message_id.clone());
                match stored.get(&key) {
                    // The same key again: the original answer, or a refusal when
                    // the caller reused the key for another text.
                    Some(existing) if existing == text.as_str() => Planned::Posted {
                        sender: user,
                        client_message_id: client_message_id.clone(),
                        created: false,
                    },
                    Some(_) => Planned::Rejected(Rejection::IdempotencyKeyReused),
                    None if sim.state != Some(MemberState::Joined) => {
                        Planned::Rejected(Rejection::NotAMember)
                    }
                    None => {
                        revision += 1;
                        stored.insert(key.clone(), text.as_str().to_owned());
                        plan.new_messages.push(PlannedMessage {
                            sender: user.clone(),
                            client_message_id: client_message_id.clone(),
                            revision,
                            text: text.as_str().to_owned(),
                        });
                        plan.events.push(PlannedEvent {
                            revision,
                            kind: EventType::MessageSent,
                            user: user.clone(),
                            message: Some(key),
                        });
                        Planned::Posted {
                            sender: user,
                            client_message_id: client_message_id.clone(),
                            created: true,
                        }
                    }
                }
            }
        };
        plan.outcomes.push(outcome);
    }

    for user in user_order {
        let Some(sim) = users.remove(&user) else {
            continue;
        };
        if !sim.touched {
            continue;
        }
        match (sim.row_id, sim.state) {
            (Some(id), Some(MemberState::Joined)) => plan.to_joined.push(id),
            (Some(id), Some(MemberState::Left)) => plan.to_left.push(id),
            (None, Some(state)) => plan.new_members.push(PlannedMember {
                user,
                state,
                joined_at: sim.joined_at.unwrap_or(now),
            }),
            (_, None) => {}
        }
    }
    plan.count_delta = count - i64::from(chat.member_count);
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    fn now() -> NaiveDateTime {
        chrono::DateTime::from_timestamp(1_700_000_000, 0)
            .unwrap()
            .naive_utc()
    }

    fn chat(count: u32, max: u32) -> ChatBefore {
        ChatBefore {
            revision: 10,
            max_members: max,
            member_count: count,
        }
    }

    fn join(u: &str) -> WriteOp {
        WriteOp::Join { user: user(u) }
    }
    fn leave(u: &str) -> WriteOp {
        WriteOp::Leave { user: user(u) }
    }
    fn post(u: &str, key: &str, text: &str) -> WriteOp {
        WriteOp::Post {
            sender: user(u),
            client_message_id: ClientMessageId::parse(key).unwrap(),
            text: MessageText::parse(text.to_owned()).unwrap(),
        }
    }

    #[test]
    fn missing_chat_refuses_everything() {
        let p = plan(
            None,
            &HashMap::new(),
            &HashMap::new(),
            &[join("a"), leave("b")],
            now(),
        );
        assert_eq!(
            p.outcomes,
            vec![Planned::Rejected(Rejection::ChatNotFound); 2]
        );
        assert!(p.events.is_empty());
    }

    #[test]
    fn joins_stop_at_max_members() {
        let ops = [join("a"), join("b"), join("c")];
        let p = plan(
            Some(&chat(0, 2)),
            &HashMap::new(),
            &HashMap::new(),
            &ops,
            now(),
        );
        assert_eq!(p.count_delta, 2);
        assert_eq!(p.new_members.len(), 2);
        assert_eq!(
            p.outcomes[2],
            Planned::Rejected(Rejection::ChatFull { max_members: 2 })
        );
        assert_eq!(
            p.events.iter().map(|e| e.revision).collect::<Vec<_>>(),
            vec![11, 12]
        );
    }

    #[test]
    fn rejoin_in_one_batch_updates_the_existing_row_once() {
        let mut members = HashMap::new();
        members.insert(
            user("a"),
            MemberBefore {
                id: 7,
                state: MemberState::Left,
                joined_at: now(),
            },
        );
        let ops = [join("a"), leave("a"), join("a"), join("a")];
        let p = plan(Some(&chat(3, 10)), &members, &HashMap::new(), &ops, now());
        assert_eq!(p.to_joined, vec![7]);
        assert!(p.to_left.is_empty() && p.new_members.is_empty());
        assert_eq!(p.count_delta, 1);
        assert_eq!(p.events.len(), 3);
        assert!(matches!(
            p.outcomes[3],
            Planned::Joined { created: false, .. }
        ));
    }

    #[test]
    fn messages_need_membership_and_keys_are_idempotent() {
        let ops = [
            post("a", "k1", "hi"),
            join("a"),
            post("a", "k1", "hi"),
            post("a", "k1", "hi"),
            post("a", "k1", "other"),
            leave("b"),
        ];
        let p = plan(
            Some(&chat(0, 10)),
            &HashMap::new(),
            &HashMap::new(),
            &ops,
            now(),
        );
        assert_eq!(p.outcomes[0], Planned::Rejected(Rejection::NotAMember));
        assert!(matches!(
            p.outcomes[2],
            Planned::Posted { created: true, .. }
        ));
        assert!(matches!(
            p.outcomes[3],
            Planned::Posted { created: false, .. }
        ));
        assert_eq!(
            p.outcomes[4],
            Planned::Rejected(Rejection::IdempotencyKeyReused)
        );
        assert_eq!(p.outcomes[5], Planned::Rejected(Rejection::MemberNotFound));
        assert_eq!(p.new_messages.len(), 1);
        assert_eq!(p.new_messages[0].revision, 12);
    }

    #[derive(Debug, Clone)]
    enum Gen {
        Join(u8),
        Leave(u8),
        Post(u8, u8),
    }

    fn gen_op() -> impl Strategy<Value = Gen> {
        prop_oneof![
            (0u8..6).prop_map(Gen::Join),
            (0u8..6).prop_map(Gen::Leave),
            (0u8..6, 0u8..3).prop_map(|(u, k)| Gen::Post(u, k)),
        ]
    }

    proptest! {
        /// Count delta = net JOINED transitions, never past the limit, never
        /// negative; revisions are consecutive from the chat's revision.
        #[test]
        fn counts_and_revisions_stay_consistent(
            initial in proptest::collection::vec(proptest::option::of(any::<bool>()), 6),
            ops in proptest::collection::vec(gen_op(), 0..40),
            max in 1u32..8,
        ) {
            let mut members = HashMap::new();
            for (i, s) in initial.iter().enumerate() {
                if let Some(joined) = s {
                    members.insert(user(&format!("u{i}")), MemberBefore {
                        id: i as u64 + 1,
                        state: if *joined { MemberState::Joined } else { MemberState::Left },
                        joined_at: now(),
                    });
                }
            }
            let joined_before = members.values().filter(|m| m.state == MemberState::Joined).count() as u32;
            let before = ChatBefore { revision: 5, max_members: max.max(joined_before), member_count: joined_before };
            let ops: Vec<WriteOp> = ops.iter().map(|g| match g {
                Gen::Join(u) => join(&format!("u{u}")),
                Gen::Leave(u) => leave(&format!("u{u}")),
                Gen::Post(u, k) => post(&format!("u{u}"), &format!("k{k}"), "t"),
            }).collect();
            let p = plan(Some(&before), &members, &HashMap::new(), &ops, now());

            // Final JOINED set, from the plan's row changes.
            let mut state: HashMap<String, MemberState> = members.iter().map(|(u, m)| (u.to_string(), m.state)).collect();
            let by_id: HashMap<u64, String> = members.iter().map(|(u, m)| (m.id, u.to_string())).collect();
            for id in &p.to_joined { state.insert(by_id[id].clone(), MemberState::Joined); }
            for id in &p.to_left { state.insert(by_id[id].clone(), MemberState::Left); }
            for m in &p.new_members { prop_assert!(state.insert(m.user.to_string(), m.state).is_none()); }
            let joined_after = state.values().filter(|s| **s == MemberState::Joined).count() as i64;
            prop_assert_eq!(joined_after, i64::from(joined_before) + p.count_delta);
            prop_assert!(joined_after <= i64::from(before.max_members));
            let revs: Vec<u64> = p.events.iter().map(|e| e.revision).collect();
            let expected: Vec<u64> = (6..6 + p.events.len() as u64).collect();
            prop_assert_eq!(revs, expected);
            prop_assert_eq!(p.outcomes.len(), ops.len());
        }
    }
}
