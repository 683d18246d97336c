-- Replays in Kafka mode (issue #25): every swap counts here, in the transaction that swaps.
-- A Kafka worker reads it when it starts folding and checks it in each batch's transaction
-- (after the tables, before its offsets: the order the swap takes them in). A batch folded
-- before a swap, even one of the same version, is rolled back, and the worker goes on from
-- the offsets the swap handed over.
ALTER TABLE projection_checkpoints ADD COLUMN swaps bigint NOT NULL DEFAULT 0;
