-- Bucket ranges that move between shards online (docs/moving-chats.md,
-- "Bucket ranges").
--
-- `bucket_map`: the versions of the bucket table this shard has seen. The
-- configuration's `buckets` are version 1 and are not stored; a range move
-- writes version N + 1 here, on its source first (in the transaction that
-- ends the range's fence) and then on every other shard. `ranges` is JSON:
-- each shard's name and its ranges, `{"shard-1": ["0-255"], ...}`. A shard
-- refuses to create a chat of a bucket that its newest version gives to
-- another shard, and names that shard instead.
CREATE TABLE IF NOT EXISTS bucket_map (
    version    BIGINT UNSIGNED NOT NULL,
    ranges     TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    created_at DATETIME(6) NOT NULL,
    PRIMARY KEY (version)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- The range a move is about to flip, on its source: while `fenced_until`
-- is in the future, no chat of buckets `first_bucket..=last_bucket` is
-- created here (503 chat_moving), so the move's last pass sees them all.
CREATE TABLE IF NOT EXISTS bucket_fence (
    move_id      BIGINT UNSIGNED NOT NULL,
    first_bucket SMALLINT UNSIGNED NOT NULL,
    last_bucket  SMALLINT UNSIGNED NOT NULL,
    fenced_until DATETIME(6) NOT NULL,
    PRIMARY KEY (move_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Range moves, recorded on the first configured shard (the coordinator):
-- `active` is 1 while one runs and NULL once it ended, so the unique key
-- admits one running range move in the whole fleet.
CREATE TABLE IF NOT EXISTS bucket_move (
    id           BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    first_bucket SMALLINT UNSIGNED NOT NULL,
    last_bucket  SMALLINT UNSIGNED NOT NULL,
    source       VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    target       VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    phase        VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    active       TINYINT UNSIGNED NULL,
    chats_total  BIGINT UNSIGNED NOT NULL DEFAULT 0,
    chats_moved  BIGINT UNSIGNED NOT NULL DEFAULT 0,
    version      BIGINT UNSIGNED NULL,
    error        TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    created_at   DATETIME(6) NOT NULL,
    updated_at   DATETIME(6) NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY uq_bucket_move_active (active)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Creating a chat takes this row's lock shared, and a range move's fence
-- takes it exclusive: a chat is either created before the fence (and the
-- move's last pass finds it) or sees the fence.
INSERT IGNORE INTO move_guard (name) VALUES ('buckets');
