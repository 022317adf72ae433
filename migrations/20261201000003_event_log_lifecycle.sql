-- The event log's lifecycle (docs/event-log.md).
--
-- `first_revision`: the lowest revision of the chat still stored in
-- `chat_event`; every revision from it up to `revision` is stored, without a
-- gap. The purge raises it (before it deletes the rows below it), so a reader
-- asking for events below it is told to full-sync (410 revision_purged)
-- instead of being handed a page with a hole. 1 until the first purge.
--
-- `checked_revision`: the revision at which the digest check last found the
-- chat's derived state (member count, revision) equal to its sources. A chat
-- whose revision moved past it changed since, and is checked in the next
-- round; the others are only looked at by the periodic full sweep.
ALTER TABLE chat
    ADD COLUMN first_revision BIGINT UNSIGNED NOT NULL DEFAULT 1,
    ADD COLUMN checked_revision BIGINT UNSIGNED NOT NULL DEFAULT 0;
