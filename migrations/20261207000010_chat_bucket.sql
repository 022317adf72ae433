-- Each chat's bucket, so a range move finds a range's chats through an index
-- instead of reading every chat of the shard (docs/moving-chats.md, "Bucket
-- ranges").
--
-- The bucket is the chat id's xxh3 hash modulo 1024, which SQL cannot compute:
-- chatshard writes it with every new chat row, and fills the rows made before
-- this migration itself (`chatshard migrate` does after it applies the
-- migrations, and every range move does on its source before it copies), a
-- page of 1,000 rows per statement. A NULL bucket is a row not yet filled.
ALTER TABLE chat
    ADD COLUMN bucket SMALLINT UNSIGNED NULL,
    ADD KEY ix_chat_bucket (bucket, chat_id);

-- What a range move measured, as JSON (rows and chats copied and their rates,
-- the catch-up passes and their sizes, the fence's length, the source's other
-- chats' p99 before, during and after): GET /v1/admin/bucket-moves/{id}.
ALTER TABLE bucket_move
    ADD COLUMN stats TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL;
