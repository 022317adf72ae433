//! Reads of chats and members: one shard read each, never through the write
//! queue. Rows are turned into answers inside the operation, so a row the code
//! cannot read fails the operation (`bad_data`) instead of being skipped.

use super::{
    Chat, ChatService, Located, Member, MemberPage, Read, ReadAt, ServiceError, SnapshotPage,
};
use crate::domain::{ChatId, MemberCursor, PageLimit, SnapshotCursor, UserId};
use crate::storage::{chats, members, server};

impl ChatService {
    pub async fn get_chat(&self, chat: &ChatId, at: ReadAt) -> Result<Read<Chat>, ServiceError> {
        let row = self
            .read_located(chat, "get_chat", at, || {
                let id = chat.to_string();
                move |conn| {
                    Box::pin(async move {
                        Ok(match chats::get(conn, &id).await? {
                            Some(row) => Located::unless_moved(row.moved_to.clone(), row),
                            None => Located::Missing,
                        })
                    })
                }
            })
            .await?;
        Ok(Read {
            value: self.to_chat(chat, row.value),
            served: row.served,
        })
    }

    pub async fn get_member(
        &self,
        chat: &ChatId,
        user: &UserId,
        at: ReadAt,
    ) -> Result<Read<Member>, ServiceError> {
        let found = self
            .read_located(chat, "get_member", at, || {
                let (id, uid, owner) = (chat.to_string(), user.to_string(), chat.clone());
                move |conn| {
                    Box::pin(async move {
                        Ok(match members::get_located(conn, &id, &uid).await? {
                            None => Located::Missing,
                            Some((Some(to), _)) => Located::Moved(to),
                            Some((None, None)) => Located::Here(None),
                            Some((None, Some(row))) => {
                                Located::Here(Some(Member::from_row(&owner, row)?))
                            }
                        })
                    })
                }
            })
            .await?;
        Ok(Read {
            value: found.value.ok_or(ServiceError::MemberNotFound)?,
            served: found.served,
        })
    }

    /// A page of JOINED members in id order; `after` is the previous page's
    /// cursor. A member joined for the whole paging appears exactly once.
    pub async fn list_members(
        &self,
        chat: &ChatId,
        after: MemberCursor,
        limit: PageLimit,
        at: ReadAt,
    ) -> Result<Read<MemberPage>, ServiceError> {
        let n = limit.get();
        let Read {
            value: members,
            served,
        } = self
            .read_located(chat, "list_members", at, || {
                let (id, owner) = (chat.to_string(), chat.clone());
                move |conn| {
                    Box::pin(async move {
                        // Where the chat is first (one primary-key read): the
                        // member rows of a chat that moved away are stale.
                        match chats::revision(conn, &id).await? {
                            None => return Ok(Located::Missing),
                            Some((_, Some(to))) => return Ok(Located::Moved(to)),
                            Some((_, None)) => {}
                        }
                        // One row more than asked tells whether another page exists.
                        let rows = members::page_joined(conn, &id, after.0, n + 1).await?;
                        let members = rows
                            .into_iter()
                            .map(|r| Member::from_row(&owner, r))
                            .collect::<Result<Vec<_>, _>>()?;
                        Ok(Located::Here(members))
                    })
                }
            })
            .await?;
        let more = members.len() > n as usize;
        let members: Vec<Member> = members.into_iter().take(n as usize).collect();
        let next_cursor = if more {
            members.last().map(|m| MemberCursor(m.member_id))
        } else {
            None
        };
        Ok(Read {
            value: MemberPage {
                members,
                next_cursor,
            },
            served,
        })
    }

    /// A page of the chat's snapshot, for a reader that full-syncs: the chat
    /// and its JOINED members, with the revision the snapshot is taken at.
    ///
    /// The first page (`cursor` = `None`) reads the chat and its members in
    /// one REPEATABLE READ transaction: they are exactly the state at its
    /// revision R. Later pages carry R in their cursor and read the members
    /// as they are then; every change since R is an event after R, so a
    /// reader that applies the events after R (joins and leaves are
    /// idempotent on a member set) ends with the chat's state, missing
    /// nothing. A page read once the purge removed events after R answers
    /// `revision_purged`: those changes could no longer be fetched.
    pub async fn snapshot(
        &self,
        chat: &ChatId,
        cursor: Option<SnapshotCursor>,
        limit: PageLimit,
        at: ReadAt,
    ) -> Result<Read<SnapshotPage>, ServiceError> {
        let n = limit.get();
        // A later page is read where the chat is at the first page's
        // revision at least: a replica further behind would lack changes
        // made before it, which the events after it do not hold.
        let at = match (at, cursor) {
            (ReadAt::Replica { min_revision }, Some(c)) => ReadAt::Replica {
                min_revision: Some(min_revision.map_or(c.revision, |m| m.max(c.revision))),
            },
            (at, _) => at,
        };
        let Read {
            value: found,
            served,
        } = self
            .read_located(chat, "snapshot", at, || {
                let (id, owner) = (chat.to_string(), chat.clone());
                move |conn| {
                    Box::pin(async move {
                        use sqlx::Connection;
                        server::repeatable_read_next(conn).await?;
                        let mut tx = conn.begin().await?;
                        let Some(row) = chats::get(&mut tx, &id).await? else {
                            return Ok(Located::Missing);
                        };
                        if let Some(to) = row.moved_to.clone() {
                            return Ok(Located::Moved(to));
                        }
                        let (revision, after) = match cursor {
                            None => (row.revision, 0),
                            Some(c) => (c.revision, c.after),
                        };
                        if revision + 1 < row.first_revision {
                            return Ok(Located::Here(Err(row.first_revision)));
                        }
                        let rows = members::page_joined(&mut tx, &id, after, n + 1).await?;
                        tx.commit().await?;
                        let members = rows
                            .into_iter()
                            .map(|r| Member::from_row(&owner, r))
                            .collect::<Result<Vec<_>, _>>()?;
                        Ok(Located::Here(Ok((row, revision, members))))
                    })
                }
            })
            .await?;
        let (row, revision, mut members) =
            found.map_err(|first_revision| ServiceError::RevisionPurged { first_revision })?;
        let more = members.len() > n as usize;
        members.truncate(n as usize);
        let next_cursor = if more {
            members.last().map(|m| SnapshotCursor {
                revision,
                after: m.member_id,
            })
        } else {
            None
        };
        Ok(Read {
            value: SnapshotPage {
                chat: self.to_chat(chat, row),
                revision,
                members,
                next_cursor,
            },
            served,
        })
    }

    /// The member count: one primary-key read.
    pub async fn member_count(&self, chat: &ChatId, at: ReadAt) -> Result<Read<u32>, ServiceError> {
        self.read_located(chat, "member_count", at, || {
            let id = chat.to_string();
            move |conn| {
                Box::pin(async move {
                    Ok(match chats::member_count(conn, &id).await? {
                        Some((count, moved_to)) => Located::unless_moved(moved_to, count),
                        None => Located::Missing,
                    })
                })
            }
        })
        .await
    }
}
