-- Cancelling a chat move (docs/moving-chats.md).
--
-- `cancel_requested` is set by `DELETE /v1/admin/moves/{id}` while the move
-- has not reached its switch. The driver sees it at its next batch (or at the
-- switch, which reads it under the move row's lock) and rolls the move back;
-- the switch marks the move `switching` in the same transaction, so a cancel
-- either comes first and stops the switch, or finds the move past it.
ALTER TABLE chat_move
    ADD COLUMN cancel_requested TINYINT UNSIGNED NOT NULL DEFAULT 0;
