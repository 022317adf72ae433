-- Reparents run by chatshard (docs/replicas.md, "Reparents"): a planned
-- switchover or an emergency failover of a replicated shard. The row is
-- written on the writer when one starts, so it reaches every replica by
-- replication and any member that survives holds it. `active` is 1 while it
-- runs (one at a time per shard, across the fleet: the unique key) and NULL
-- once it ended. A driver that dies leaves it active past `lease_until_ms`;
-- the member monitor of any instance then finishes it (the target was
-- promoted) or rolls it back (the old writer is made writable again).
CREATE TABLE shard_reparent (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    kind VARCHAR(16) CHARACTER SET ascii NOT NULL,
    from_member VARCHAR(255) CHARACTER SET ascii NOT NULL,
    to_member VARCHAR(255) CHARACTER SET ascii NOT NULL,
    state VARCHAR(16) CHARACTER SET ascii NOT NULL,
    active TINYINT UNSIGNED NULL,
    driver VARCHAR(64) CHARACTER SET ascii NOT NULL,
    lease_until_ms BIGINT NOT NULL,
    started_at DATETIME(6) NOT NULL,
    finished_at DATETIME(6) NULL,
    detail TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    PRIMARY KEY (id),
    UNIQUE KEY ux_shard_reparent_active (active)
) ENGINE = InnoDB;
