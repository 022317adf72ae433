-- chatshard schema, identical on every shard. Plain SQL that runs on MariaDB 10.11
-- and MySQL 8.0/8.4 alike. See docs/schema.md for why each table looks as it does.
--
-- Identifiers are ASCII with a binary collation: ids are case-sensitive
-- ("Chat" and "chat" are different chats) and compare byte by byte.

-- One row per chat. `revision` is the chat's last event revision; every write
-- transaction locks this row first (SELECT ... FOR UPDATE), which serialises the
-- writers of one chat and makes revisions gapless.
CREATE TABLE IF NOT EXISTS chat (
    chat_id     VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    max_members INT UNSIGNED    NOT NULL,
    revision    BIGINT UNSIGNED NOT NULL DEFAULT 0,
    created_at  DATETIME(6)     NOT NULL,
    PRIMARY KEY (chat_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- The member count, changed in the same transaction as every membership state
-- change, so counting is one primary-key read and never COUNT(*).
CREATE TABLE IF NOT EXISTS chat_member_count (
    chat_id      VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    member_count INT UNSIGNED NOT NULL DEFAULT 0,
    PRIMARY KEY (chat_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Membership. A user who leaves keeps the row (state LEFT) and keeps its id on
-- re-joining. Written only with plain multi-row INSERT ... VALUES and UPDATE.
CREATE TABLE IF NOT EXISTS chat_member (
    id         BIGINT UNSIGNED  NOT NULL AUTO_INCREMENT,
    chat_id    VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    user_id    VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    state      TINYINT UNSIGNED NOT NULL COMMENT '1 = JOINED, 2 = LEFT',
    joined_at  DATETIME(6)      NOT NULL,
    left_at    DATETIME(6)      NULL,
    created_at DATETIME(6)      NOT NULL,
    updated_at DATETIME(6)      NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY uq_chat_member_user (chat_id, user_id),
    -- Serves GET /members paging: WHERE chat_id = ? AND state = 1 AND id > ? ORDER BY id.
    KEY ix_chat_member_paging (chat_id, state, id),
    CONSTRAINT ck_chat_member_state CHECK (state IN (1, 2))
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Messages. (chat_id, sender_id, client_message_id) is the idempotency key.
CREATE TABLE IF NOT EXISTS chat_message (
    id                BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    chat_id           VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    sender_id         VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    client_message_id VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    revision          BIGINT UNSIGNED NOT NULL,
    body              TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    created_at        DATETIME(6)     NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY uq_chat_message_client (chat_id, sender_id, client_message_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- The per-chat event log: revisions 1, 2, 3, ... per chat, no gap.
CREATE TABLE IF NOT EXISTS chat_event (
    chat_id    VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    revision   BIGINT UNSIGNED  NOT NULL,
    event_type TINYINT UNSIGNED NOT NULL COMMENT '1 = MESSAGE_SENT, 2 = MEMBER_JOINED, 3 = MEMBER_LEFT',
    user_id    VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    message_id BIGINT UNSIGNED  NULL,
    created_at DATETIME(6)      NOT NULL,
    PRIMARY KEY (chat_id, revision),
    CONSTRAINT ck_chat_event_type CHECK (event_type IN (1, 2, 3))
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
