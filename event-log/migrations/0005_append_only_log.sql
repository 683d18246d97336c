-- The log is append-only in the database, not only by convention of the code: UPDATE,
-- DELETE and TRUNCATE of stored events fail with SQLSTATE 42501 (insufficient_privilege) and
-- 'user_events is append-only: <op> refused on <table>', whoever runs them.
--
-- refuse_event_log_change() is defined in partitions.sql (applied before these migrations),
-- because ensure_user_event_partitions there gives each new partition its TRUNCATE trigger.
--
-- - Row triggers on the two partitioned parents. PostgreSQL clones them to every partition,
--   existing or attached later, so an UPDATE or DELETE naming a partition directly is refused
--   too; a month moved to the archive by archive_user_event_partition loses user_events'
--   clone on DETACH and gets user_events_archive's on ATTACH.
-- - Statement TRUNCATE triggers on the parents, and on every partition: a TRUNCATE naming a
--   partition does not fire its parent's statement triggers. Partitions created from now on
--   get theirs from ensure_user_event_partitions; the existing ones get it below.
--
-- Deliberate bypass: these are ordinary (ENABLE, not ENABLE ALWAYS) triggers, so a superuser
-- can still change history on purpose, e.g. to repair a row or in a test that tampers:
--     BEGIN; SET LOCAL session_replication_role = replica; UPDATE user_events ...; COMMIT;
-- (session_replication_role is superuser-only; the tables' owner could likewise ALTER TABLE
-- ... DISABLE TRIGGER, or DROP a partition). Nothing stops that, and nothing has to: every
-- changed, removed or reinserted event breaks the hash chain, which `cloudphone verify`
-- reports with the first position affected.
--
-- Creating a trigger locks user_events and its partitions in SHARE ROW EXCLUSIVE mode until
-- commit, which waits for in-flight appends and queues new ones behind it (reads go on).
-- Bounded, so a migration stuck behind a long append transaction fails instead of stalling
-- the writers; rerunning it is safe (nothing is recorded until it commits).
SET LOCAL lock_timeout = '10s';
-- And no partition is created meanwhile (by a call of ensure_user_event_partitions that began
-- before partitions.sql replaced it, so without the TRUNCATE trigger) that the loop below
-- would miss: the same lock serialises its callers.
SELECT pg_advisory_xact_lock(hashtext('cloudphone.user_events.partitions'));

CREATE TRIGGER user_events_append_only
    BEFORE UPDATE OR DELETE ON user_events
    FOR EACH ROW EXECUTE FUNCTION refuse_event_log_change();
CREATE TRIGGER user_events_append_only_truncate
    BEFORE TRUNCATE ON user_events
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_event_log_change();

CREATE TRIGGER user_events_archive_append_only
    BEFORE UPDATE OR DELETE ON user_events_archive
    FOR EACH ROW EXECUTE FUNCTION refuse_event_log_change();
CREATE TRIGGER user_events_archive_append_only_truncate
    BEFORE TRUNCATE ON user_events_archive
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_event_log_change();

-- Partitions that exist already, live or archived. Some may have the trigger already: made by
-- the new ensure_user_event_partitions (partitions.sql is applied first) for another
-- instance's writer before this migration took the lock.
DO $$
DECLARE
    part regclass;
BEGIN
    FOR part IN
        SELECT i.inhrelid::regclass
        FROM pg_inherits i
        WHERE i.inhparent IN ('user_events'::regclass, 'user_events_archive'::regclass)
          AND NOT EXISTS (SELECT 1 FROM pg_trigger t
                          WHERE t.tgrelid = i.inhrelid AND t.tgname = 'append_only_truncate')
    LOOP
        EXECUTE format(
            'CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON %s '
            'FOR EACH STATEMENT EXECUTE FUNCTION refuse_event_log_change()',
            part);
    END LOOP;
END;
$$;
