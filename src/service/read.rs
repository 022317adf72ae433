//! Reads of chats and members: one shard read each, never through the write
//! queue. Rows are turned into answers inside the operation, so a row the code
//! cannot read fails the operation (`bad_data`) instead of being skipped.

use super::{Chat, ChatService, Member, MemberPage, ServiceError};
use crate::domain::{ChatId, MemberCursor, PageLimit, UserId};
use crate::storage::{chats, members};

impl ChatService {
    pub async fn get_chat(&self, chat: &ChatId) -> Result<Chat, ServiceError> {
        let id = chat.to_string();
        let row = self
            .shard(chat)
            .read(Some(chat), "get_chat", move |conn| {
                Box::pin(async move { Ok(chats::get(conn, &id).await?) })
            })
            .await?
            .ok_or(ServiceError::ChatNotFound)?;
        Ok(self.to_chat(chat, row))
    }

    pub async fn get_member(&self, chat: &ChatId, user: &UserId) -> Result<Member, ServiceError> {
        let (id, uid, owner) = (chat.to_string(), user.to_string(), chat.clone());
        let found = self
            .shard(chat)
            .read(Some(chat), "get_member", move |conn| {
                Box::pin(async move {
                    match members::get(conn, &id, &uid).await? {
                        Some(row) => Ok(Ok(Member::from_row(&owner, row)?)),
                        None => Ok(Err(chat_exists(conn, &id).await?)),
                    }
                })
            })
            .await?;
        match found {
            Ok(member) => Ok(member),
            Err(true) => Err(ServiceError::MemberNotFound),
            Err(false) => Err(ServiceError::ChatNotFound),
        }
    }

    /// A page of JOINED members in id order; `after` is the previous page's
    /// cursor. A member joined for the whole paging appears exactly once.
    pub async fn list_members(
        &self,
        chat: &ChatId,
        after: MemberCursor,
        limit: PageLimit,
    ) -> Result<MemberPage, ServiceError> {
        let (id, owner) = (chat.to_string(), chat.clone());
        let n = limit.get();
        let members = self
            .shard(chat)
            .read(Some(chat), "list_members", move |conn| {
                Box::pin(async move {
                    // One row more than asked tells whether another page exists.
                    let rows = members::page_joined(conn, &id, after.0, n + 1).await?;
                    if rows.is_empty() && !chat_exists(conn, &id).await? {
                        return Ok(None);
                    }
                    let members = rows
                        .into_iter()
                        .map(|r| Member::from_row(&owner, r))
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(Some(members))
                })
            })
            .await?
            .ok_or(ServiceError::ChatNotFound)?;
        let more = members.len() > n as usize;
        let members: Vec<Member> = members.into_iter().take(n as usize).collect();
        let next_cursor = if more {
            members.last().map(|m| MemberCursor(m.member_id))
        } else {
            None
        };
        Ok(MemberPage {
            members,
            next_cursor,
        })
    }

    /// The member count: one primary-key read of `chat_member_count`.
    pub async fn member_count(&self, chat: &ChatId) -> Result<u32, ServiceError> {
        let id = chat.to_string();
        self.shard(chat)
            .read(Some(chat), "member_count", move |conn| {
                Box::pin(async move { Ok(chats::member_count(conn, &id).await?) })
            })
            .await?
            .ok_or(ServiceError::ChatNotFound)
    }
}

pub(super) async fn chat_exists(
    conn: &mut sqlx::MySqlConnection,
    chat_id: &str,
) -> sqlx::Result<bool> {
    Ok(chats::revision(conn, chat_id).await?.is_some())
}
