-- The chats that live away from their home shard (docs/moving-chats.md):
-- GET /v1/admin/moved-chats reads each shard's markers through this index
-- instead of scanning every chat.
CREATE INDEX ix_chat_moved_to ON chat (moved_to);
