-- Read models and their bookkeeping. Versions 1000+ belong to projections; 0001-0999 to the
-- event log (both migrators ignore each other's versions).

-- How far each projection has applied the log, moved in the same transaction as its rows.
CREATE TABLE projection_checkpoints (
    projection       text        PRIMARY KEY,
    -- Every event at or below this global position is applied (0: none yet).
    position         bigint      NOT NULL DEFAULT 0,
    -- recorded_at of the event at `position`: lag in seconds is now() minus this.
    last_recorded_at timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Kafka mode: per topic partition, the next offset to apply. Consumers seek here on
-- assignment (never to the broker's committed offsets), so a redelivered message is a no-op.
CREATE TABLE projection_offsets (
    projection    text    NOT NULL,
    topic         text    NOT NULL,
    partition     integer NOT NULL,
    next_offset   bigint  NOT NULL,
    -- Global position of the last event applied from this partition (positions only grow
    -- within a partition, so an event at or below it is a duplicate publication).
    last_position bigint  NOT NULL,
    PRIMARY KEY (projection, topic, partition)
);

-- Events a projection could not apply (malformed, or of a schema version newer than the
-- projector knows). Parked with the error so the partition moves on; replayable after a fix.
CREATE TABLE projection_dead_letters (
    id             bigserial   PRIMARY KEY,
    projection     text        NOT NULL,
    position       bigint      NOT NULL,
    event_id       uuid,
    event_type     text        NOT NULL,
    schema_version integer     NOT NULL,
    error          text        NOT NULL,
    envelope       jsonb       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX projection_dead_letters_projection_idx ON projection_dead_letters (projection, position);

-- One row per device with its current state (deleted devices keep their row).
CREATE TABLE devices (
    device_id        uuid        PRIMARY KEY,
    owner_id         uuid        NOT NULL,
    provider         text        NOT NULL,
    status           text        NOT NULL,
    cpu_cores        integer     NOT NULL,
    memory_mb        integer     NOT NULL,
    android_version  smallint    NOT NULL,
    created_at       timestamptz NOT NULL,
    last_started_at  timestamptz,
    minutes_used     bigint      NOT NULL DEFAULT 0,
    -- Global position of the last event applied to this row.
    updated_position bigint      NOT NULL
);
-- A user's fleet, and the device_stats recomputation per touched owner.
CREATE INDEX devices_owner_idx ON devices (owner_id, status, provider);
-- Keyset pagination over the whole fleet by creation time.
CREATE INDEX devices_created_idx ON devices (created_at, device_id);

-- Per user, status and provider: live devices (deleted ones are not counted) and their sizes.
-- Replaces the materialized view refreshed every 5 minutes.
CREATE TABLE device_stats (
    user_id         uuid        NOT NULL,
    status          text        NOT NULL,
    provider        text        NOT NULL,
    device_count    bigint      NOT NULL,
    total_cpu_cores bigint      NOT NULL,
    total_memory_mb bigint      NOT NULL,
    -- Newest creation time among the devices counted in this row.
    last_created_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, status, provider)
);

-- Billed minutes and cost per UTC day, user and device; sessions over midnight are split.
CREATE TABLE daily_usage (
    day          date    NOT NULL,
    user_id      uuid    NOT NULL,
    device_id    uuid    NOT NULL,
    minutes      bigint  NOT NULL,
    -- Integer minor units (cents); never floating point.
    cost_minor   bigint  NOT NULL,
    currency     text    NOT NULL,
    PRIMARY KEY (day, user_id, device_id)
);
-- A user's usage over a date range.
CREATE INDEX daily_usage_user_idx ON daily_usage (user_id, day);
