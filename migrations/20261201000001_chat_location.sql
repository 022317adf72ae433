-- Where a chat is when it is not on this shard (docs/moving-chats.md).
--
-- `moved_to` names the shard that holds the chat. On the shard a chat moved
-- away from it is the tombstone; on the chat's home shard (its bucket's owner)
-- it is the override that sends instances to the shard that holds the chat.
-- Every write locks this row first and every read of the chat reads it, so an
-- instance whose routing is stale is told where the chat is, and a write can
-- never land on a shard that no longer holds the chat.
ALTER TABLE chat
    ADD COLUMN moved_to VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL;
