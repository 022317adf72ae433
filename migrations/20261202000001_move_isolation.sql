-- Automatic isolation of hot chats (docs/moving-chats.md).
--
-- `started_by`: `admin` (the admin API or `chatshard move-chat`) or
-- `isolation` (the automatic isolation of a chat that stayed hot).
ALTER TABLE chat_move
    ADD COLUMN started_by VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL DEFAULT 'admin';

-- One row per kind of decision that must be taken by one instance at a
-- time on this shard: an isolation move starts under the lock of the row
-- `isolation` (FOR UPDATE), after counting the moves running here and the
-- isolation moves of the last hour, so two instances never start two.
CREATE TABLE IF NOT EXISTS move_guard (
    name VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    PRIMARY KEY (name)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

INSERT IGNORE INTO move_guard (name) VALUES ('isolation');
