-- Per partition of the relay's topic, the last offset and global position the broker
-- acknowledged, written in the same transaction as the relay's checkpoint. Projector workers
-- compare their stored offsets with it to know what they have surely applied (see
-- projections/src/kafka.rs), without asking the broker.
CREATE TABLE relay_partitions (
    relay         text    NOT NULL,
    partition     integer NOT NULL,
    last_offset   bigint  NOT NULL,
    last_position bigint  NOT NULL,
    PRIMARY KEY (relay, partition)
);

-- How many partitions the topic has, as the relay saw it when it took over.
ALTER TABLE relay_checkpoints ADD COLUMN partitions integer NOT NULL DEFAULT 0;
