-- Device lists ordered by last start or by billed minutes (the dashboards' `devices` and
-- `User.devices` orders), paged by keyset like the creation order: each index ends in
-- device_id, the tie-breaker, so a page is one index range scan from the cursor, in either
-- direction, with no sort. The same indexes are in read_models::versions (a replayed fleet
-- projection builds them too).

-- Never-started devices sort as started at -infinity (first ascending, last descending):
-- one btree over this very expression serves both directions and the keyset's row
-- comparison, which NULLs would break. The query API writes the expression the same way.
CREATE INDEX devices_last_started_idx
    ON devices ((coalesce(last_started_at, '-infinity'::timestamptz)), device_id);
CREATE INDEX devices_owner_last_started_idx
    ON devices (owner_id, (coalesce(last_started_at, '-infinity'::timestamptz)), device_id);

CREATE INDEX devices_minutes_used_idx ON devices (minutes_used, device_id);
CREATE INDEX devices_owner_minutes_used_idx ON devices (owner_id, minutes_used, device_id);
