#!/bin/bash
# Entry point of a streaming replica (official postgres image, started as root).
#
# An empty data directory is filled with `pg_basebackup -R` from the primary, through this
# replica's physical replication slot: -R writes standby.signal and primary_conninfo, so the
# server starts as a hot standby streaming from the primary. A data directory that already
# holds a standby just starts (and catches up from the slot).
#
# Environment: PRIMARY_HOST, PRIMARY_PORT, REPLICATION_USER, REPLICATION_SLOT (required),
# REPLICATION_PASSWORD_FILE; arguments: extra `postgres` options (-c name=value ...).
set -euo pipefail

PRIMARY_HOST="${PRIMARY_HOST:-postgres-primary}"
PRIMARY_PORT="${PRIMARY_PORT:-5432}"
REPLICATION_USER="${REPLICATION_USER:-replicator}"
: "${REPLICATION_SLOT:?set REPLICATION_SLOT (a physical slot created on the primary)}"
PGDATA="${PGDATA:-/var/lib/postgresql/data}"
export PGDATA

install -d -o postgres -g postgres -m 0700 "$PGDATA"
install -d -o postgres -g postgres -m 2775 /var/run/postgresql

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    # Leftovers of an interrupted base backup.
    find "$PGDATA" -mindepth 1 -delete
    PGPASSWORD="$(cat "${REPLICATION_PASSWORD_FILE:-/run/secrets/replication_password}")"
    export PGPASSWORD
    echo "replica: waiting for ${PRIMARY_HOST}:${PRIMARY_PORT}"
    until gosu postgres pg_isready -q -h "$PRIMARY_HOST" -p "$PRIMARY_PORT"; do
        sleep 2
    done
    echo "replica: pg_basebackup from ${PRIMARY_HOST} through slot ${REPLICATION_SLOT}"
    gosu postgres pg_basebackup \
        --host="$PRIMARY_HOST" --port="$PRIMARY_PORT" --username="$REPLICATION_USER" \
        --pgdata="$PGDATA" --write-recovery-conf --wal-method=stream \
        --slot="$REPLICATION_SLOT" --checkpoint=fast --progress --verbose
    unset PGPASSWORD
fi

# A standby must allow at least as many connections, WAL senders, worker processes, locks
# and prepared transactions as its primary: compose.yaml passes the same -c settings to both.
exec gosu postgres postgres -c hot_standby=on "$@"
