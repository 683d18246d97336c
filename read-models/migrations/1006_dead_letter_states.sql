-- Dead letters an operator resolves (issue #23): list them, retry them once their cause is
-- fixed, or skip them with a reason. A resolved letter keeps its row, for the record.

-- pending: parked, its event missing from the read model; retried: applied by
-- `cloudphone dead-letters retry` (in the transaction that marked it); skipped: given up
-- by an operator, with a reason in resolution_note.
ALTER TABLE projection_dead_letters
    ADD COLUMN state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'retried', 'skipped')),
    -- Times the projection tried to apply the event: 1 when parked, one more per retry.
    ADD COLUMN attempts integer NOT NULL DEFAULT 1,
    -- When the last retry ran (NULL: never retried); `error` holds that attempt's error.
    ADD COLUMN last_attempt_at timestamptz,
    -- When the letter left `pending`, who resolved it, and why (the skip's reason).
    ADD COLUMN resolved_at timestamptz,
    ADD COLUMN resolved_by text,
    ADD COLUMN resolution_note text,
    -- The schema whose tables the projector was writing when it parked the event
    -- (current_schema(): the live schema, or a replay's shadow schema while it tails). A retry
    -- applies to the live tables only a letter parked against them: an event a replay's tail
    -- parked may have been applied by the live projector. NULL: parked before this column
    -- existed, origin unknown.
    ADD COLUMN parked_in text,
    ADD CONSTRAINT projection_dead_letters_resolved_check
        CHECK ((state = 'pending') = (resolved_at IS NULL));

-- Letters parked before this migration were parked by the live projector unless a rebuild
-- of their projection was running at the time (its tail parks into this table too).
UPDATE projection_dead_letters d SET parked_in = current_schema()
WHERE NOT EXISTS (
    SELECT 1 FROM projection_rebuilds r
    WHERE r.projection = d.projection AND r.started_at <= d.created_at
      AND (r.state IN ('building', 'tailing') OR coalesce(r.swapped_at, r.updated_at) >= d.created_at));

-- What is pending, per projection, in log order: the gauge, `retry --all` and the listing's
-- default view read this small index, never the parked envelopes.
CREATE INDEX projection_dead_letters_pending_idx ON projection_dead_letters (projection, position, id)
    WHERE state = 'pending';
