-- Versioned read models (issue #7): which version of each projection is live, and the
-- rebuilds `cloudphone replay` runs beside it.

-- The version of the live tables (projections::versions). A projector folds for this version
-- and moves the checkpoint only while it still holds, so a swap stops every old instance.
ALTER TABLE projection_checkpoints ADD COLUMN version integer NOT NULL DEFAULT 1;

-- One row per rebuild: its shadow schema, progress and outcome.
CREATE TABLE projection_rebuilds (
    id               bigserial   PRIMARY KEY,
    projection       text        NOT NULL,
    version          integer     NOT NULL,
    -- building: folding the log up to target_position into the shadow schema (bulk);
    -- tailing: shadow tables complete (keys, indexes), following the head until the swap;
    -- live: swapped in (its tables are the unqualified ones); superseded: replaced since;
    -- abandoned: given up (`cloudphone replay --abandon`), shadow schema dropped.
    state            text        NOT NULL
        CHECK (state IN ('building', 'tailing', 'live', 'superseded', 'abandoned')),
    shadow_schema    text        NOT NULL,
    -- Head of the log when the rebuild started: the bulk phase folds (0, target_position].
    target_position  bigint      NOT NULL,
    -- Every event at or below this position is in the shadow tables.
    position         bigint      NOT NULL DEFAULT 0,
    last_recorded_at timestamptz,
    events_folded    bigint      NOT NULL DEFAULT 0,
    started_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    swapped_at       timestamptz,
    -- At the swap, the tables it replaced move to this schema (kept for a rollback or a
    -- comparison until `cloudphone replay --drop-old` or `--keep-old` removes them).
    replaced_version integer,
    replaced_schema  text,
    replaced_dropped_at timestamptz
);
-- At most one rebuild in progress per projection.
CREATE UNIQUE INDEX projection_rebuilds_in_progress_idx ON projection_rebuilds (projection)
    WHERE state IN ('building', 'tailing');
