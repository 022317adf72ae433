-- Online chat moves (docs/moving-chats.md).
--
-- `fenced_until`: while in the future, the chat's writes on this shard are
-- refused (503 chat_moving, retryable): the last moment of a move, between
-- its final copy and its switch. A fence that lapses lets writes go on here.
ALTER TABLE chat
    ADD COLUMN fenced_until DATETIME(6) NULL;

-- A move of one chat, recorded on its source shard. `active` is 1 while the
-- move runs and NULL once it ended, so the unique key admits one running move
-- per chat and any number of ended ones.
CREATE TABLE IF NOT EXISTS chat_move (
    id              BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    chat_id         VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    source          VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    target          VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    phase           VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    active          TINYINT UNSIGNED NULL,
    copied_revision BIGINT UNSIGNED NOT NULL DEFAULT 0,
    error           TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    created_at      DATETIME(6) NOT NULL,
    updated_at      DATETIME(6) NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY uq_chat_move_active (chat_id, active)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
