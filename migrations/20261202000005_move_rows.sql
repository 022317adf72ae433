-- Rows a chat move has written to its target (docs/moving-chats.md): each
-- replayed event with the member or message row it wrote, and each row a
-- snapshot copied, as `rowsCopied` in GET /v1/admin/moves.
ALTER TABLE chat_move
    ADD COLUMN rows_copied BIGINT UNSIGNED NOT NULL DEFAULT 0;
