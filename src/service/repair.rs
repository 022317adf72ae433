//! Finding and repairing drift between a chat's derived state and its
//! sources (docs/event-log.md): the member count against the JOINED rows,
//! the revision against the stored events.
//!
//! One code path serves both the periodic digest check
//! ([`super::lifecycle`]) and `chatshard repair-counts`: [`repair_chat`]
//! locks the chat row first, exactly as every writer does, so a repair never
//! races a join, a leave or a post; what it writes is the truth at that
//! instant, in one transaction. The check that decides whether a repair is
//! needed reads one statement per chat ([`sql::observe`]), a consistent view
//! even in READ COMMITTED, so a writer in flight cannot make it see a
//! mismatch that is not there.

use crate::domain::ChatId;
use crate::shard::{OpError, Shard, ShardError, ShardSet};
use crate::storage::repair as sql;

/// A count that did not match its rows, and was fixed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountFix {
    pub shard: String,
    pub chat_id: String,
    /// The stored count (`None` when the count row was missing).
    pub stored: Option<u32>,
    pub actual: u32,
}

/// Everything one repair of one chat changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Repair {
    /// The member count, set to the JOINED rows.
    pub count: Option<CountFix>,
    /// The revision was behind the stored events: `(was, now)`.
    pub revision: Option<(u64, u64)>,
    /// Events were missing below the revision: the first stored revision
    /// was raised above the highest missing one, `(was, now)`, so a reader
    /// behind it full-syncs instead of skipping events.
    pub first_revision: Option<(u64, u64)>,
}

impl Repair {
    pub fn is_empty(&self) -> bool {
        self.count.is_none() && self.revision.is_none() && self.first_revision.is_none()
    }

    /// The kinds repaired, for metrics and logs.
    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        [
            self.count.as_ref().map(|_| "count"),
            self.revision.map(|_| "revision"),
            self.first_revision.map(|_| "events_missing"),
        ]
        .into_iter()
        .flatten()
    }
}

/// What a check found for one chat without locking it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Whole at this revision.
    Whole(u64),
    /// Something differs: repair under the lock.
    Drifted(Drift),
    /// Not held here (gone, or moved away since the page was read).
    Absent,
}

/// What differs, so the repair under the lock looks at that only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drift {
    /// The events stored above this revision are not exactly the ones up to
    /// the chat's revision: look for missing ones there.
    pub events_from: Option<u64>,
}

/// Compares one chat's derived state with its sources, reading the events
/// above `from` (the revision last found whole, or 0 for everything stored).
pub async fn check_chat(shard: &Shard, chat_id: &str, from: u64) -> Result<Verdict, ShardError> {
    let id = chat_id.to_owned();
    let seen = shard
        .read(None, "digest_check", move |conn| {
            Box::pin(async move { Ok(sql::observe(conn, &id, from).await?) })
        })
        .await?;
    let Some(o) = seen else {
        return Ok(Verdict::Absent);
    };
    let from = from.max(o.first_revision.saturating_sub(1));
    let expected_events = i64::try_from(o.revision.saturating_sub(from)).unwrap_or(i64::MAX);
    let events_whole = o.events_above == expected_events
        && o.max_event <= o.revision
        && (o.revision < o.first_revision || o.max_event == o.revision);
    Ok(if o.member_count == Some(o.joined) && events_whole {
        Verdict::Whole(o.revision)
    } else {
        Verdict::Drifted(Drift {
            events_from: (!events_whole).then_some(from),
        })
    })
}

/// Checks one chat and repairs what drifted; `None` when it was whole (it
/// is then marked checked at its revision, if that is past `checked`: a
/// full sweep of unchanged chats writes nothing) or is not held here.
pub async fn check_and_repair(
    shard: &Shard,
    chat_id: &str,
    from: u64,
    checked: u64,
) -> Result<Option<Repair>, ShardError> {
    match check_chat(shard, chat_id, from).await? {
        Verdict::Absent => Ok(None),
        Verdict::Whole(revision) => {
            if revision > checked {
                mark_checked(shard, chat_id, revision).await?;
            }
            Ok(None)
        }
        Verdict::Drifted(drift) => {
            let repair = repair_chat(shard, chat_id.to_owned(), drift).await?;
            Ok(repair.filter(|r| !r.is_empty()))
        }
    }
}

/// Records that a chat was found whole at `revision`.
pub async fn mark_checked(shard: &Shard, chat_id: &str, revision: u64) -> Result<(), ShardError> {
    let id = chat_id.to_owned();
    shard
        .write(None, "digest_mark", move |conn| {
            Box::pin(async move { Ok(sql::mark_checked(conn, &id, revision).await?) })
        })
        .await
}

/// Revisions read per statement while looking for the highest missing one.
const GAP_PAGE: u32 = 1000;

/// Repairs one chat in one transaction under its row lock: the count set to
/// the JOINED rows, a revision behind its events raised to the highest
/// stored, and, when `drift` says events differ, the first stored revision
/// raised above the highest missing one in `(events_from, revision]`.
/// `None` when the chat is not held here.
pub async fn repair_chat(
    shard: &Shard,
    chat_id: String,
    drift: Drift,
) -> Result<Option<Repair>, ShardError> {
    let name = shard.name().to_owned();
    shard
        .write(None, "repair_chat", move |conn| {
            Box::pin(async move {
                use sqlx::Connection;
                let mut tx = conn.begin().await?;
                let Some(log) = sql::lock_log(&mut tx, &chat_id).await? else {
                    return Ok(None);
                };
                let mut repair = Repair::default();
                let stored = sql::lock_count(&mut tx, &chat_id).await?;
                let actual =
                    u32::try_from(sql::count_joined(&mut tx, &chat_id).await?).unwrap_or(u32::MAX);
                if stored != Some(actual) {
                    sql::set_count(&mut tx, &chat_id, actual).await?;
                    repair.count = Some(CountFix {
                        shard: name,
                        chat_id: chat_id.clone(),
                        stored,
                        actual,
                    });
                }
                let mut revision = log.revision;
                if let Some(from) = drift.events_from {
                    let max_event = sql::max_event(&mut tx, &chat_id).await?;
                    if max_event > revision {
                        // Events the chat row does not account for: the
                        // next write would collide with them. They are the
                        // log.
                        sql::set_revision(&mut tx, &chat_id, max_event).await?;
                        repair.revision = Some((revision, max_event));
                        revision = max_event;
                    }
                    let floor = from.max(log.first_revision.saturating_sub(1));
                    if let Some(hole) = highest_missing(&mut tx, &chat_id, floor, revision).await? {
                        sql::set_first_revision(&mut tx, &chat_id, hole + 1).await?;
                        repair.first_revision = Some((log.first_revision, hole + 1));
                    }
                }
                sql::mark_checked(&mut tx, &chat_id, revision).await?;
                tx.commit().await.map_err(OpError::Commit)?;
                Ok(Some(repair))
            })
        })
        .await
}

/// The highest revision in `(floor, revision]` with no stored event, read a
/// page at a time from the top.
async fn highest_missing(
    conn: &mut sqlx::MySqlConnection,
    chat_id: &str,
    floor: u64,
    revision: u64,
) -> sqlx::Result<Option<u64>> {
    let mut expected = revision;
    while expected > floor {
        let stored = sql::revisions_down(conn, chat_id, floor, expected, GAP_PAGE).await?;
        for r in &stored {
            if *r != expected {
                return Ok(Some(expected));
            }
            expected -= 1;
        }
        if stored.len() < GAP_PAGE as usize {
            return Ok((expected > floor).then_some(expected));
        }
    }
    Ok(None)
}

/// Chats read per page while walking a shard.
const PAGE: u32 = 500;

/// `chatshard repair-counts`: repairs one chat, or every chat of every
/// shard, and returns the counts it fixed (the other repairs are logged).
pub async fn repair_counts(
    shards: &ShardSet,
    only: Option<&ChatId>,
) -> Result<Vec<CountFix>, ShardError> {
    let mut fixes = Vec::new();
    let mut record = |shard: &Shard, repair: Option<Repair>| {
        let Some(repair) = repair else { return };
        if let Some((was, now)) = repair.revision {
            tracing::warn!(
                shard = shard.name(),
                was,
                now,
                "repaired a revision behind its events"
            );
        }
        if let Some((was, now)) = repair.first_revision {
            tracing::warn!(
                shard = shard.name(),
                was,
                now,
                "events were missing: readers behind them full-sync"
            );
        }
        fixes.extend(repair.count);
    };
    if let Some(chat) = only {
        let shard = shards.for_chat(chat);
        record(
            shard,
            check_and_repair(shard, chat.as_str(), 0, u64::MAX).await?,
        );
        return Ok(fixes);
    }
    for shard in shards.all() {
        let mut after = String::new();
        loop {
            let from = after.clone();
            let ids = shard
                .read(None, "repair_list_chats", move |conn| {
                    Box::pin(async move { Ok(sql::chat_ids_after(conn, &from, PAGE).await?) })
                })
                .await?;
            let Some(last) = ids.last().cloned() else {
                break;
            };
            for id in ids {
                record(shard, check_and_repair(shard, &id, 0, u64::MAX).await?);
            }
            after = last;
        }
    }
    Ok(fixes)
}
