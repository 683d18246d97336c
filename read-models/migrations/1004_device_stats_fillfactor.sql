-- device_stats rows are updated in place by nearly every fleet event (a device moving between
-- status buckets). Leave room on each page so those updates stay HOT: the new row version goes
-- on the same page, the primary key is not touched, and the old one is pruned in place.
-- (Replays create the table with the same setting: projections::versions::TableLayout.)
ALTER TABLE device_stats SET (fillfactor = 70);
