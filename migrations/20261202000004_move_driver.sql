-- Resuming an abandoned chat move (docs/moving-chats.md).
--
-- `driver` counts the takeovers of a move: 0 for the instance that started
-- it, one more each time another instance takes it over after its lease. A
-- driver writes the move's record, and switches, only while the record still
-- names its number, so a driver that was only slow stops as soon as it
-- looks, and the new one resumes the copy where the target stands.
ALTER TABLE chat_move
    ADD COLUMN driver INT UNSIGNED NOT NULL DEFAULT 0;
