-- Cancelling a bucket-range move (docs/moving-chats.md).
--
-- `cancel_requested` is set by `DELETE /v1/admin/bucket-moves/{id}` while the
-- move has not begun its flip. The driver sees it after each chat it moves
-- and before the flip, which first marks the move `flipping` only if no
-- cancel came: a cancel either comes first and stops the flip, or finds the
-- move past it. A cancelled move moves the chats it moved back to the source.
ALTER TABLE bucket_move
    ADD COLUMN cancel_requested TINYINT UNSIGNED NOT NULL DEFAULT 0;
