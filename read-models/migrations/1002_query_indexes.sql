-- Indexes the query API's access paths need (issue #6).

-- A user's devices page by page in creation order (keyset pagination), without a sort.
CREATE INDEX devices_owner_created_idx ON devices (owner_id, created_at, device_id);
-- A device's usage over a date range.
CREATE INDEX daily_usage_device_idx ON daily_usage (device_id, day);
