-- Optimistic concurrency, the log's head, and append idempotency.
-- (user_events and its partitions are defined in partitions.sql at the repository root.)

-- One row per stream. A unique index on user_events cannot guard stream versions (unique
-- constraints on a partitioned table must include recorded_at), so the version check lives
-- here and is updated in the same transaction as the insert.
CREATE TABLE streams (
    stream_id     uuid        PRIMARY KEY,
    stream_type   text        NOT NULL CHECK (stream_type IN ('user', 'device')),
    -- The user the stream belongs to (the user itself, or the device's owner).
    owner_id      uuid        NOT NULL,
    -- Version after the stream's last event (= its number of events).
    version       bigint      NOT NULL CHECK (version > 0),
    -- recorded_at of the first event: lets stream reads prune older partitions.
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    -- Global position of the stream's last event.
    last_position bigint      NOT NULL
);

-- "Which devices does this user have" without scanning the log.
CREATE INDEX streams_owner_idx ON streams (owner_id, stream_type);

-- The single row every append locks first. Holding its row lock until commit serialises
-- position assignment and the hash chain, and makes commits visible in position order, so a
-- reader by position can never see N+1 before N (see event-log/src/lib.rs).
CREATE TABLE log_head (
    singleton   boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    -- Position of the last committed event (0 for an empty log).
    position    bigint      NOT NULL,
    -- Hash of that event (32 zero bytes for an empty log).
    hash        bytea       NOT NULL CHECK (length(hash) = 32),
    -- recorded_at of that event; the next append's recorded_at is never earlier.
    recorded_at timestamptz NOT NULL
);

INSERT INTO log_head (singleton, position, hash, recorded_at)
VALUES (true, 0, decode(repeat('00', 32), 'hex'), '1970-01-01T00:00:00Z');

-- Appends that carried an idempotency key, with the outcome to return on a retry.
CREATE TABLE append_idempotency (
    key          text        PRIMARY KEY,
    -- Hash of the request the caller made; a retry with another request is refused.
    request_hash bytea       NOT NULL,
    -- AppendOutcome as JSON: positions and stream versions.
    outcome      jsonb       NOT NULL,
    recorded_at  timestamptz NOT NULL
);

-- Expiry of old keys scans by age.
CREATE INDEX append_idempotency_recorded_at_idx ON append_idempotency (recorded_at);
