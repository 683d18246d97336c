#!/bin/bash
# One-shot job: creates the topic the relay publishes the log to, before any relay starts.
# (A relay that finds no topic creates it itself with replication factor 1.)
#
#   partitions: CLOUDPHONE_KAFKA_PARTITIONS (the most projector workers one projection can use)
#   replication factor 3, min.insync.replicas 2: with the producer's acks=all, a write is on
#   two brokers before the relay moves its checkpoint, and one broker may be down.
set -euo pipefail

bootstrap="${KAFKA_BOOTSTRAP:-kafka-1:9092,kafka-2:9092,kafka-3:9092}"
topic="${CLOUDPHONE_KAFKA_TOPIC:-cloudphone.user-events}"
partitions="${CLOUDPHONE_KAFKA_PARTITIONS:-12}"
retention_ms="${KAFKA_TOPIC_RETENTION_MS:-604800000}"
bin=/opt/kafka/bin

for attempt in $(seq 1 30); do
    if "$bin/kafka-topics.sh" --bootstrap-server "$bootstrap" --create --if-not-exists \
        --topic "$topic" --partitions "$partitions" --replication-factor 3 \
        --config min.insync.replicas=2 \
        --config unclean.leader.election.enable=false \
        --config retention.ms="$retention_ms"; then
        break
    fi
    if [ "$attempt" -eq 30 ]; then
        echo "init-topic: cannot create $topic" >&2
        exit 1
    fi
    sleep 5
done

# --if-not-exists leaves an existing topic as it is: check what matters.
description="$("$bin/kafka-topics.sh" --bootstrap-server "$bootstrap" --describe --topic "$topic")"
echo "$description"
replication="$(echo "$description" | sed -n 's/.*ReplicationFactor: *\([0-9]*\).*/\1/p' | head -n1)"
actual_partitions="$(echo "$description" | sed -n 's/.*PartitionCount: *\([0-9]*\).*/\1/p' | head -n1)"
if [ "$replication" != "3" ]; then
    echo "init-topic: $topic has replication factor $replication, not 3 (created by a relay?);" \
        "reassign its partitions (kafka-reassign-partitions.sh) before going to production" >&2
    exit 1
fi
if [ "$actual_partitions" != "$partitions" ]; then
    # Never add partitions to a live topic: a stream id would map to another partition and
    # its events could be consumed out of order. The relay uses the topic as it is.
    echo "init-topic: warning: $topic has $actual_partitions partitions, CLOUDPHONE_KAFKA_PARTITIONS is $partitions" >&2
fi
"$bin/kafka-configs.sh" --bootstrap-server "$bootstrap" --alter --entity-type topics \
    --entity-name "$topic" --add-config min.insync.replicas=2
echo "init-topic: $topic ready"
