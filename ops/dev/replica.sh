#!/usr/bin/env bash
# A real streaming replica of the local PostgreSQL (127.0.0.1:5432) for development and tests:
# pg_basebackup -R (streaming WAL, standby.signal, primary_conninfo), started as a hot standby
# on another port. The primary must be up (ops/dev/postgres.sh ensure).
#
# It streams through a physical replication slot, so a replica stopped while the primary
# writes (the outage tests stop it while other tests run) finds the WAL it missed when it
# starts again instead of waiting forever for removed segments. The primary keeps at most
# max_slot_wal_keep_size (set to 4GB here) for it; past that the slot is lost, and `start`
# takes a new base backup.
#
#   ops/dev/replica.sh start     create it if missing (base backup), start it, wait until it
#                                answers read-only queries; resume WAL replay left paused
#   ops/dev/replica.sh stop      stop it (fast shutdown), as an outage would look to clients
#   ops/dev/replica.sh restart   stop, then start: it catches up from the primary's WAL
#   ops/dev/replica.sh fresh     stop, delete its data, take a new base backup, start
#   ops/dev/replica.sh status    exit 0 when it answers and is in recovery
#   ops/dev/replica.sh lag       print its replay lag in bytes and seconds
#
# Environment: CLOUDPHONE_REPLICA_PORT (default 5433), CLOUDPHONE_REPLICA_DIR (its data
# directory, default /var/lib/postgresql/cloudphone-replica-<port>; owned by the postgres
# user, since PostgreSQL refuses to run as root).
set -euo pipefail
cd "$(dirname "$0")/../.."

port="${CLOUDPHONE_REPLICA_PORT:-5433}"
dir="${CLOUDPHONE_REPLICA_DIR:-/var/lib/postgresql/cloudphone-replica-$port}"
primary="postgres://postgres@127.0.0.1:5432/postgres"
slot="cloudphone_replica_$port"
replica="postgres://postgres@127.0.0.1:$port/postgres"

say() { echo "replica.sh: $*" >&2; }

bin() {
    local version
    version=$(psql "$primary" -Atqc "SELECT current_setting('server_version_num')::int / 10000")
    echo "/usr/lib/postgresql/$version/bin"
}

# shellcheck source=ops/dev/as-postgres.sh
. ops/dev/as-postgres.sh  # the working directory is the repository's root

answers() {
    [ "$(psql "$replica" -Atqc 'SELECT pg_is_in_recovery()' 2>/dev/null)" = "t" ]
}

allow_replication() {
    # `all` in pg_hba.conf does not cover replication connections: add a loopback line.
    local hba
    hba=$(psql "$primary" -Atqc 'SHOW hba_file')
    if ! grep -Eq '^host\s+replication\s+\S+\s+127\.0\.0\.1/32' "$hba"; then
        say "allowing loopback replication connections in $hba"
        sed -i '1i host replication all 127.0.0.1/32 trust # cloudphone-dev' "$hba"
        psql "$primary" -Atqc 'SELECT pg_reload_conf()' >/dev/null
    fi
}

# The slot's state on the primary: empty when there is none, `lost` when the primary removed
# WAL the replica had not received.
slot_state() {
    psql "$primary" -Atqc "SELECT coalesce(wal_status, 'unknown') FROM pg_replication_slots WHERE slot_name = '$slot'"
}

bound_slot_retention() {
    if [ "$(psql "$primary" -Atqc "SHOW max_slot_wal_keep_size")" = "-1" ]; then
        say "bounding the WAL a replication slot may hold on the primary to 4GB"
        psql "$primary" -Atqc "ALTER SYSTEM SET max_slot_wal_keep_size = '4GB'" >/dev/null
        psql "$primary" -Atqc 'SELECT pg_reload_conf()' >/dev/null
    fi
}

create() {
    allow_replication
    bound_slot_retention
    if [ -n "$(slot_state)" ]; then
        psql "$primary" -Atqc "SELECT pg_drop_replication_slot('$slot')" >/dev/null
    fi
    say "base backup of the primary into $dir"
    mkdir -p "$(dirname "$dir")"
    as_postgres "$(bin)/pg_basebackup" --host 127.0.0.1 --port 5432 --username postgres \
        --pgdata "$dir" --write-recovery-conf --wal-method stream --checkpoint fast \
        --create-slot --slot "$slot"
    # Debian keeps its configuration outside the data directory; the copy needs its own.
    as_postgres touch "$dir/postgresql.conf"
    cat <<EOF | as_postgres tee -a "$dir/postgresql.auto.conf" >/dev/null
port = $port
listen_addresses = '127.0.0.1'
hot_standby = on
hba_file = '$(psql "$primary" -Atqc 'SHOW hba_file')'
ident_file = '$(psql "$primary" -Atqc 'SHOW ident_file')'
unix_socket_directories = '/tmp'
max_connections = 100
# Queries on the standby are not cancelled for replay conflicts within this delay.
max_standby_streaming_delay = 5s
hot_standby_feedback = on
EOF
}

# A test that pauses replay (the lag tests) resumes it when it ends; a run killed in between
# leaves the replica paused, answering ever older data. Nothing else here pauses it, so a
# paused replica at start is such a leftover: resume it.
resume_replay() {
    if [ "$(psql "$replica" -Atqc 'SELECT pg_is_wal_replay_paused()' 2>/dev/null)" = "t" ]; then
        say "WAL replay was left paused (a killed test run?); resuming it"
        psql "$replica" -Atqc 'SELECT pg_wal_replay_resume()' >/dev/null
    fi
}

start() {
    # A replica made before slots, or whose slot the primary gave up, can never catch up:
    # it answers queries but replays nothing. Start it over.
    if [ -f "$dir/standby.signal" ] && [ "$(slot_state)" = "" -o "$(slot_state)" = "lost" ]; then
        say "the replica cannot catch up (its replication slot is missing or lost); taking a new base backup"
        stop
        rm -rf "$dir"
    fi
    if answers; then
        resume_replay
        return 0
    fi
    if [ ! -f "$dir/standby.signal" ]; then
        rm -rf "$dir"
        create
    fi
    as_postgres "$(bin)/pg_ctl" --pgdata "$dir" --log "$dir/replica.log" --wait --timeout 60 start >/dev/null
    for _ in $(seq 1 120); do
        if answers; then
            resume_replay
            return 0
        fi
        sleep 0.25
    done
    say "the replica did not answer on 127.0.0.1:$port; see $dir/replica.log"
    tail -n 20 "$dir/replica.log" >&2 || true
    return 1
}

stop() {
    if [ -f "$dir/postmaster.pid" ]; then
        as_postgres "$(bin)/pg_ctl" --pgdata "$dir" --mode fast --wait stop >/dev/null 2>&1 || true
    fi
}

lag() {
    psql "$replica" -Atqc "SELECT coalesce(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), 0) AS bytes,
                                  coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0) AS seconds"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    restart) stop; start ;;
    fresh) stop; rm -rf "$dir"; start ;;
    status) answers ;;
    lag) lag ;;
    *) echo "usage: $0 start|stop|restart|fresh|status|lag" >&2; exit 2 ;;
esac
