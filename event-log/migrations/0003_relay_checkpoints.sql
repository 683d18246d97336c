-- How far the outbox relay has published the log to Kafka. Moved only after the broker
-- acknowledged every event up to `position` (delivery reports), so a crash re-publishes at
-- most what was in flight, never skips.
CREATE TABLE relay_checkpoints (
    relay       text        PRIMARY KEY,
    position    bigint      NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
