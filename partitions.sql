-- The Cloudphone event log's partitioned table and its maintenance functions.
--
-- Applied by `cloudphone migrate` on every run, before the versioned migrations in
-- event-log/migrations. Every statement is idempotent (IF NOT EXISTS / OR REPLACE) and takes
-- no lock that blocks appends or reads, so it is safe to run twice and while the platform is
-- up. Column changes to `user_events` go into versioned migrations, not here.

-- One row per event. Partitioned by month of `recorded_at`, the commit time, which never
-- decreases along `position` (the writer clamps it under the log_head lock), so a month's
-- partition is sealed once the log has moved past it.
CREATE TABLE IF NOT EXISTS user_events (
    -- Global position: dense (1, 2, 3, ...), assigned under the log_head row lock.
    position        bigint      NOT NULL,
    event_id        uuid        NOT NULL,
    stream_id       uuid        NOT NULL,
    stream_type     text        NOT NULL,
    -- Version of the stream after this event; 1 for its first.
    stream_version  bigint      NOT NULL,
    event_type      text        NOT NULL,
    schema_version  smallint    NOT NULL,
    -- The user the event belongs to: the user itself, or the device's owner.
    owner_id        uuid        NOT NULL,
    occurred_at     timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL,
    payload         jsonb       NOT NULL,
    -- correlation_id, causation_id, actor, trace_id, idempotency_key.
    metadata        jsonb       NOT NULL,
    -- Hash chain: hash = SHA-256(prev_hash || canonical bytes), see event-schema/src/canonical.rs.
    prev_hash       bytea       NOT NULL,
    hash            bytea       NOT NULL,
    -- Named, so that partitions moved to user_events_archive (created LIKE this table) carry
    -- the same constraint names as their new parent, as ATTACH requires.
    CONSTRAINT event_position_positive CHECK (position > 0),
    CONSTRAINT event_stream_type_known CHECK (stream_type IN ('user', 'device')),
    CONSTRAINT event_stream_version_positive CHECK (stream_version > 0),
    CONSTRAINT event_schema_version_positive CHECK (schema_version > 0),
    CONSTRAINT event_hashes_are_sha256 CHECK (length(prev_hash) = 32 AND length(hash) = 32),
    -- A unique constraint on a partitioned table must include the partition key; positions
    -- are unique log-wide because only the log_head lock holder assigns them.
    PRIMARY KEY (position, recorded_at)
) PARTITION BY RANGE (recorded_at);

-- Read a stream from a version.
CREATE INDEX IF NOT EXISTS user_events_stream_idx ON user_events (stream_id, stream_version);
-- Read an owner's history over a time range, in position order (recorded_at follows position).
CREATE INDEX IF NOT EXISTS user_events_owner_idx ON user_events (owner_id, recorded_at, position);

-- Months detached from the live table. Created LIKE it, so columns, constraint names and
-- indexes are the same (ATTACH requires that); reads and exports reach it through
-- user_events_all.
CREATE TABLE IF NOT EXISTS user_events_archive (LIKE user_events INCLUDING ALL)
    PARTITION BY RANGE (recorded_at);

-- Every event, live or archived. The planner pushes predicates into both branches, so
-- partition pruning by recorded_at works through the view.
CREATE OR REPLACE VIEW user_events_all AS
    SELECT * FROM user_events
    UNION ALL
    SELECT * FROM user_events_archive;

-- The log is append-only: the triggers that call this (on user_events and
-- user_events_archive, cloned to every partition, and a TRUNCATE trigger on each partition;
-- see event-log/migrations/0005_append_only_log.sql) refuse UPDATE, DELETE and TRUNCATE of
-- stored events. Defined here rather than in that migration because partitions.sql runs
-- before the versioned migrations and ensure_user_event_partitions below attaches it to every
-- partition it creates. SQLSTATE 42501 (insufficient_privilege): the statement is well formed
-- but no role of the application may do it; the refusal is permanent, not one to retry, and
-- not a 23xxx integrity error (the writer inspects 23514 for a missing partition).
CREATE OR REPLACE FUNCTION refuse_event_log_change()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'user_events is append-only: % refused on %', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Stored events are never changed or removed; append a compensating event instead.';
END;
$$;

-- Creates the monthly partitions (UTC months) for the month holding `at` and the
-- `months_ahead` months after it; returns how many it created.
--
-- Safe to call any time and from many sessions at once: callers are serialised by a
-- transaction-scoped advisory lock, existing partitions are skipped, and a partition is
-- created standalone and then ATTACHed, which takes only SHARE UPDATE EXCLUSIVE on
-- user_events (CREATE TABLE ... PARTITION OF would take ACCESS EXCLUSIVE and queue every
-- append behind any long-running reader). The CHECK constraint matching the bounds lets the
-- ATTACH (and a later move to the archive) skip the validation scan. The partition's own
-- TRUNCATE trigger (a TRUNCATE naming the partition does not fire the parent's statement
-- trigger) is created while the table is still standalone, so it locks nothing anyone uses;
-- the ATTACH clones user_events' row trigger to it.
CREATE OR REPLACE FUNCTION ensure_user_event_partitions(
    at timestamptz DEFAULT now(),
    months_ahead integer DEFAULT 3
) RETURNS integer
LANGUAGE plpgsql
SET lock_timeout = '10s'
AS $$
DECLARE
    month_start timestamptz;
    month_end   timestamptz;
    part_name   text;
    created     integer := 0;
BEGIN
    IF months_ahead < 0 OR months_ahead > 120 THEN
        RAISE EXCEPTION 'months_ahead must be between 0 and 120, got %', months_ahead
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('cloudphone.user_events.partitions'));
    FOR i IN 0..months_ahead LOOP
        month_start := (date_trunc('month', at AT TIME ZONE 'UTC') + make_interval(months => i)) AT TIME ZONE 'UTC';
        month_end := (date_trunc('month', at AT TIME ZONE 'UTC') + make_interval(months => i + 1)) AT TIME ZONE 'UTC';
        part_name := 'user_events_' || to_char(month_start AT TIME ZONE 'UTC', 'YYYY_MM');
        -- A month that exists, attached here or moved to the archive, is left alone.
        CONTINUE WHEN to_regclass(quote_ident(part_name)) IS NOT NULL;
        EXECUTE format(
            'CREATE TABLE %I (LIKE user_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
            part_name);
        EXECUTE format(
            'ALTER TABLE %I ADD CONSTRAINT %I CHECK (recorded_at >= %L AND recorded_at < %L)',
            part_name, part_name || '_bounds', month_start, month_end);
        EXECUTE format(
            'CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON %I '
            'FOR EACH STATEMENT EXECUTE FUNCTION refuse_event_log_change()',
            part_name);
        EXECUTE format(
            'ALTER TABLE user_events ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
            part_name, month_start, month_end);
        created := created + 1;
    END LOOP;
    RETURN created;
END;
$$;

-- Moves the month starting at `month` (any day of it) from user_events to
-- user_events_archive and returns the partition's name. Refuses a month the log has not moved
-- past yet (log_head.recorded_at must be at or after the month's end), because an append
-- could still land in it. Detach and attach happen in the caller's one transaction, so no
-- reader of user_events_all ever sees the month missing; the DETACH needs a brief ACCESS
-- EXCLUSIVE lock on user_events, bounded by lock_timeout so it never queues appends for long.
-- The month stays append-only throughout: the DETACH drops the row trigger cloned from
-- user_events, the ATTACH clones user_events_archive's, and the partition keeps its own
-- TRUNCATE trigger.
CREATE OR REPLACE FUNCTION archive_user_event_partition(month date)
RETURNS text
LANGUAGE plpgsql
SET lock_timeout = '5s'
AS $$
DECLARE
    month_start timestamptz := date_trunc('month', month::timestamp) AT TIME ZONE 'UTC';
    month_end   timestamptz := (date_trunc('month', month::timestamp) + interval '1 month') AT TIME ZONE 'UTC';
    part_name   text := 'user_events_' || to_char(month, 'YYYY_MM');
    part        regclass := to_regclass(quote_ident(part_name));
    head_at     timestamptz;
BEGIN
    IF part IS NULL THEN
        RAISE EXCEPTION 'partition % does not exist', part_name USING ERRCODE = 'undefined_table';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_inherits
               WHERE inhrelid = part AND inhparent = 'user_events_archive'::regclass) THEN
        RETURN part_name;
    END IF;
    SELECT recorded_at INTO head_at FROM log_head;
    IF head_at IS NULL OR head_at < month_end THEN
        RAISE EXCEPTION 'partition % is still open: the log head (%) has not passed %',
            part_name, head_at, month_end USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    EXECUTE format('ALTER TABLE user_events DETACH PARTITION %I', part_name);
    EXECUTE format(
        'ALTER TABLE user_events_archive ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
        part_name, month_start, month_end);
    RETURN part_name;
END;
$$;
