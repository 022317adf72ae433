-- The heartbeat of a replicated shard (docs/replicas.md): chatshard's member
-- monitor writes the time (milliseconds since the Unix epoch, by the writing
-- instance's clock) into the writer's one row every `replicas.monitor_ms`,
-- and reads it back from every member. A replica's lag is how far its row is
-- behind the writer's, read in the same round: both values come from the
-- writers' clocks, never compared with the reader's, so clock skew between
-- hosts does not show as lag. The row only moves forward (GREATEST), so
-- instances of a fleet writing together never take it back, and only on a
-- writable member (the statement checks @@global.read_only itself: an
-- account that may write past read_only must not put a transaction on a
-- fenced writer that its replicas will never have).
CREATE TABLE shard_heartbeat (
    id TINYINT UNSIGNED NOT NULL,
    beat_ms BIGINT NOT NULL,
    PRIMARY KEY (id)
) ENGINE = InnoDB;

INSERT INTO shard_heartbeat (id, beat_ms) VALUES (1, 0);
