-- log_head is one row updated by every group commit, and streams rows are updated by every
-- append to their stream. Leave room on each page for HOT updates (no index touched, dead
-- versions pruned in place) and vacuum log_head eagerly, so the head lock never has to walk
-- a page chain full of dead versions.
ALTER TABLE log_head SET (
    fillfactor = 10,
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0
);
ALTER TABLE streams SET (fillfactor = 70);
