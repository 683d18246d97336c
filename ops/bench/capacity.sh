#!/usr/bin/env bash
# Per-event costs for the capacity model (ops/CAPACITY.md), measured on a PostgreSQL primary
# and a streaming replica of this script's own, so nothing else on the machine (other
# databases, other benchmarks on the shared server) is counted.
#
#   A. appends: `cloudphone load commands` (group commit, the portal mix) while the replica's
#      replay is paused; then replay is resumed and timed (the replica applying a backlog as
#      fast as its single startup process can).
#   B. projector catch-up: `cloudphone projector` builds both read models from A's log, from
#      position 0, with the same paused-then-resumed replay.
#   C. appends with the projector tailing: the same `load commands`, the projector following
#      the log as in production (small batches, synchronous commit); replay not paused.
#
# For each phase: the primary's CPU (its postmaster and every child; exited backends count
# through the postmaster's cutime), split into the projector's backends (application_name),
# the background processes and the rest (the command path); WAL bytes, with pg_waldump's
# split into records and full-page images; events; the replica's startup process CPU and the
# seconds it took to replay. Then bytes per event row and per index, and per read-model row.
# The cluster is made like ops/deploy's primary: data checksums, shared_buffers 1GB, fsync,
# full_page_writes and synchronous_commit on; each phase starts right after a CHECKPOINT.
#
#   ops/bench/capacity.sh [seconds] [clients]     (default: 20 s of load per phase, 64 clients)
#
# Environment: CLOUDPHONE_BIN (default target/release/cloudphone), CLOUDPHONE_CAPACITY_PORT
# (default 5452; the replica listens on the next port), CLOUDPHONE_CAPACITY_DIR (default
# /tmp/cloudphone-capacity; deleted and made again), CLOUDPHONE_PG_BIN (default: the newest
# in /usr/lib/postgresql). Prints a report and writes it to $CLOUDPHONE_CAPACITY_DIR/report.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)

seconds="${1:-20}"
clients="${2:-64}"
bin="${CLOUDPHONE_BIN:-$root/target/release/cloudphone}"
port="${CLOUDPHONE_CAPACITY_PORT:-5452}"
replica_port=$((port + 1))
work="${CLOUDPHONE_CAPACITY_DIR:-/tmp/cloudphone-capacity}"
primary_dir="$work/primary"
replica_dir="$work/replica"
server="postgres://postgres@127.0.0.1:$port/postgres"
load_db="postgres://postgres@127.0.0.1:$port/cloudphone_load"
replica="postgres://postgres@127.0.0.1:$replica_port/postgres"
ticks_per_second=$(getconf CLK_TCK)
report="$work/report.txt"

pg_bin="${CLOUDPHONE_PG_BIN:-/usr/lib/postgresql/$(ls /usr/lib/postgresql | sort -V | tail -n 1)/bin}"
# shellcheck source=ops/dev/as-postgres.sh
. ops/dev/as-postgres.sh

say() { echo "capacity.sh: $*" >&2; }
sql() { "$pg_bin/psql" "$1" -AtqX -v ON_ERROR_STOP=1 -c "$2"; }

[ -x "$bin" ] || { say "no binary at $bin (cargo build --release -p cloudphone)"; exit 1; }

projector_pid=""
sampler=""
cleanup() {
    if [ -n "$sampler" ]; then kill "$sampler" 2>/dev/null || true; fi
    if [ -n "$projector_pid" ]; then kill "$projector_pid" 2>/dev/null || true; fi
    for dir in "$replica_dir" "$primary_dir"; do
        if [ -f "$dir/postmaster.pid" ]; then
            as_postgres "$pg_bin/pg_ctl" --pgdata "$dir" --mode immediate --wait stop >/dev/null 2>&1 || true
        fi
    done
}
trap cleanup EXIT

# --- the clusters ------------------------------------------------------------------------
setup() {
    cleanup
    rm -rf "$work"
    mkdir -p "$work"
    chmod 0755 "$work"
    if [ "$(id -u)" -eq 0 ]; then chown postgres:postgres "$work"; fi
    as_postgres "$pg_bin/initdb" --pgdata "$primary_dir" --username postgres --auth trust \
        --encoding UTF8 --no-locale --data-checksums >/dev/null
    cat <<EOF | as_postgres tee -a "$primary_dir/postgresql.auto.conf" >/dev/null
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_connections = 300
shared_buffers = '1GB'
wal_level = replica
max_wal_senders = 4
max_replication_slots = 4
fsync = on
full_page_writes = on
synchronous_commit = on
EOF
    as_postgres "$pg_bin/pg_ctl" --pgdata "$primary_dir" --log "$work/primary.log" --wait start >/dev/null
    as_postgres "$pg_bin/pg_basebackup" --host 127.0.0.1 --port "$port" --username postgres \
        --pgdata "$replica_dir" --write-recovery-conf --wal-method stream --checkpoint fast \
        --create-slot --slot capacity_replica
    cat <<EOF | as_postgres tee -a "$replica_dir/postgresql.auto.conf" >/dev/null
port = $replica_port
hot_standby = on
EOF
    as_postgres "$pg_bin/pg_ctl" --pgdata "$replica_dir" --log "$work/replica.log" --wait start >/dev/null
    until [ "$(sql "$replica" 'SELECT pg_is_in_recovery()' 2>/dev/null)" = "t" ]; do sleep 0.2; done
}

# --- what is counted ---------------------------------------------------------------------
postmaster_of() { head -n 1 "$1/postmaster.pid"; }

# utime+stime+cutime+cstime of the postmaster of data directory $1 and all its children.
cluster_ticks() {
    local pm
    pm=$(postmaster_of "$1")
    { echo "$pm"; pgrep -P "$pm" || true; } | while read -r pid; do
        cat "/proc/$pid/stat" 2>/dev/null || true
    done | awk '{ s += $14 + $15 + $16 + $17 } END { print s + 0 }'
}

# utime+stime of the children of data directory $1's postmaster whose title matches $2.
titled_ticks() {
    local pm
    pm=$(postmaster_of "$1")
    for pid in $(pgrep -P "$pm" || true); do
        if grep -qE "$2" "/proc/$pid/cmdline" 2>/dev/null; then
            cat "/proc/$pid/stat" 2>/dev/null || true
        fi
    done | awk '{ s += $14 + $15 } END { print s + 0 }'
}

background='checkpointer|background writer|walwriter|walsender|autovacuum launcher|logical replication launcher|stats'
primary_lsn() { sql "$server" 'SELECT pg_current_wal_lsn()'; }
wal_bytes() { sql "$server" "SELECT pg_wal_lsn_diff('$2', '$1')::bigint"; }
head_position() { sql "$load_db" 'SELECT position FROM log_head'; }
seconds_of() { awk -v t="$1" -v hz="$ticks_per_second" 'BEGIN { printf "%.2f", t / hz }'; }

# Samples the CPU of the projector's backends (application_name) every 0.2 s into $1, as
# "pid ticks" lines; the last sample of each backend is its total.
sample_projector_backends() {
    while true; do
        for pid in $(sql "$server" "SELECT pid FROM pg_stat_activity WHERE application_name = 'capacity-projector'" 2>/dev/null || true); do
            awk -v pid="$pid" '{ print pid, $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || true
        done >>"$1"
        sleep 0.2
    done
}
sampled_ticks() { awk '{ last[$1] = $2 } END { for (p in last) s += last[p]; print s + 0 }' "$1"; }

start_projector() {
    "$bin" --log warn projector --database-url "$load_db?application_name=capacity-projector" \
        --ops-listen 127.0.0.1:0 >>"$work/projector.log" 2>&1 &
    projector_pid=$!
}

# Waits until both projections' checkpoints reach the head, then stops the projector and
# keeps its own CPU ticks in projector_ticks.
finish_projector() {
    local head
    head=$(head_position)
    until [ "$(sql "$load_db" "SELECT count(*) FILTER (WHERE position >= $head) FROM projection_checkpoints" 2>/dev/null)" = "2" ]; do
        kill -0 "$projector_pid" 2>/dev/null || { say "the projector died; see $work/projector.log"; exit 1; }
        sleep 0.1
    done
    projector_ticks=$(awk '{ print $14 + $15 }' "/proc/$projector_pid/stat")
    kill "$projector_pid"
    wait "$projector_pid" 2>/dev/null || true
    projector_pid=""
}

pause_replay() {
    sql "$replica" 'SELECT pg_wal_replay_pause()' >/dev/null
    until [ "$(sql "$replica" 'SELECT pg_get_wal_replay_pause_state()')" = "paused" ]; do sleep 0.05; done
}

# Waits until the replica has received $1, resumes replay if it was paused, and waits until it
# has replayed $1; prints "seconds startup_ticks walreceiver_ticks".
replay_until() {
    local target=$1 started startup_before receiver_before
    until [ "$(sql "$replica" "SELECT pg_last_wal_receive_lsn() >= '$target'")" = "t" ]; do sleep 0.05; done
    startup_before=$(titled_ticks "$replica_dir" 'startup')
    receiver_before=$(titled_ticks "$replica_dir" 'walreceiver')
    started=$(date +%s.%N)
    sql "$replica" 'SELECT pg_wal_replay_resume()' >/dev/null
    until [ "$(sql "$replica" "SELECT pg_last_wal_replay_lsn() >= '$target'")" = "t" ]; do sleep 0.05; done
    echo "$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')" \
        "$(($(titled_ticks "$replica_dir" 'startup') - startup_before))" \
        "$(($(titled_ticks "$replica_dir" 'walreceiver') - receiver_before))"
}

waldump_stats() {
    as_postgres "$pg_bin/pg_waldump" --path "$primary_dir/pg_wal" --start "$1" --end "$2" --stats \
        >"$work/waldump-$3.txt" 2>&1 || true
    # The Total line (records, record bytes [%], FPI bytes [%], combined bytes [%]), then the
    # Transaction line's records (commits and aborts: one per group commit on the write path).
    awk '/^Total/ { total = $2 " " $3 " " $5 } /^Transaction / { xacts = $2 } END { print total, xacts + 0 }' \
        "$work/waldump-$3.txt"
}

# One line of the report: phase, events, commands, wall s, PostgreSQL CPU s (all / projector
# backends / background), WAL bytes (all / records / FPI), replay s, startup CPU s.
line() { printf '%s\n' "$*" | tee -a "$report"; }

run_load() {
    /usr/bin/time -f '%U %S' -o "$work/load-$1.time" \
        "$bin" --log warn load commands --database-url "$server" --no-baseline \
        --duration "$seconds" --clients "$clients" --users $((clients * 4)) \
        --json "$work/load-$1.json" >"$work/load-$1.txt" 2>&1
}

# Waits until the phase's clients have disconnected and their backends have been reaped: an
# exiting backend's CPU moves into the postmaster's cutime only when reaped, and a read in
# between would count it nowhere.
settle() {
    until [ "$(sql "$server" "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")" = "0" ]; do
        sleep 0.05
    done
    sleep 0.5
}

measure() { # name; the phase's commands follow
    local name=$1
    shift
    local lsn0 lsn1 ticks0 ticks1 bg0 bg1 t0 t1
    sql "$server" 'CHECKPOINT' >/dev/null
    lsn0=$(primary_lsn)
    ticks0=$(cluster_ticks "$primary_dir")
    bg0=$(titled_ticks "$primary_dir" "$background")
    t0=$(date +%s.%N)
    "$@"
    t1=$(date +%s.%N)
    settle
    ticks1=$(cluster_ticks "$primary_dir")
    bg1=$(titled_ticks "$primary_dir" "$background")
    lsn1=$(primary_lsn)
    phase_wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    phase_cpu=$((ticks1 - ticks0))
    phase_bg=$((bg1 - bg0))
    phase_wal=$(wal_bytes "$lsn0" "$lsn1")
    phase_lsn0=$lsn0
    phase_lsn1=$lsn1
    read -r phase_records phase_record_bytes phase_fpi_bytes phase_transactions <<<"$(waldump_stats "$lsn0" "$lsn1" "$name")"
}

phase_a() { pause_replay; run_load a; }
phase_b() {
    pause_replay
    : >"$work/projector-b.samples"
    sample_projector_backends "$work/projector-b.samples" &
    sampler=$!
    start_projector
    finish_projector
    kill "$sampler"
    wait "$sampler" 2>/dev/null || true
    sampler=""
}
phase_c() {
    : >"$work/projector-c.samples"
    run_load c &
    local load=$!
    # load commands drops and creates cloudphone_load; follow the new one once migrated.
    until [ "$(sql "$load_db" "SELECT to_regclass('log_head') IS NOT NULL" 2>/dev/null)" = "t" ]; do sleep 0.05; done
    sample_projector_backends "$work/projector-c.samples" &
    sampler=$!
    start_projector
    wait "$load"
    finish_projector
    kill "$sampler"
    wait "$sampler" 2>/dev/null || true
    sampler=""
}

summary() { # name events commands
    local name=$1 events=$2 commands=$3 projector_backends=$4 replay_s=$5 startup=$6 receiver=$7
    local load_cpu=$8 projector_cpu=$9
    line "$name: $events events, $commands commands in ${phase_wall} s"
    line "  primary CPU $(seconds_of "$phase_cpu") s: projector backends $(seconds_of "$projector_backends") s, background $(seconds_of "$phase_bg") s, other backends (command path) $(seconds_of $((phase_cpu - projector_backends - phase_bg))) s"
    line "  primary CPU per event: $(awk -v c="$phase_cpu" -v e="$events" -v hz="$ticks_per_second" 'BEGIN { printf "%.1f", c / hz / e * 1e6 }') us (all), $(awk -v c="$((phase_cpu - projector_backends))" -v e="$events" -v hz="$ticks_per_second" 'BEGIN { printf "%.1f", c / hz / e * 1e6 }') us (all but the projector backends), $(awk -v c="$projector_backends" -v e="$events" -v hz="$ticks_per_second" 'BEGIN { printf "%.1f", c / hz / e * 1e6 }') us (projector backends)"
    line "  WAL $phase_wal bytes ($phase_lsn0 .. $phase_lsn1) = $((phase_wal / events)) bytes/event; pg_waldump: $phase_records records, $phase_record_bytes record bytes ($((phase_record_bytes / events))/event), $phase_fpi_bytes FPI bytes ($((phase_fpi_bytes / events))/event), $phase_transactions transactions ($(awk -v e="$events" -v x="$phase_transactions" 'BEGIN { printf "%.1f", e / x }') events each)"
    if [ -n "$replay_s" ]; then
        line "  replica: replayed in $replay_s s after resume = $(awk -v e="$events" -v s="$replay_s" 'BEGIN { printf "%.0f", e / s }') events/s, $(awk -v w="$phase_wal" -v s="$replay_s" 'BEGIN { printf "%.1f", w / s / 1048576 }') MiB/s of WAL; startup process $(seconds_of "$startup") s CPU ($(awk -v t="$startup" -v hz="$ticks_per_second" -v s="$replay_s" 'BEGIN { printf "%.0f", t / hz / s * 100 }') % of a core), walreceiver $(seconds_of "$receiver") s"
        line "  replica apply per core: $(awk -v e="$events" -v t="$startup" -v hz="$ticks_per_second" 'BEGIN { printf "%.0f", e / (t / hz) }') events per startup-process CPU second"
    fi
    [ -n "$load_cpu" ] && line "  load generator + command API process CPU: $load_cpu s"
    [ -n "$projector_cpu" ] && line "  projector process CPU: $(seconds_of "$projector_cpu") s"
    line ""
}

storage() {
    line "storage in cloudphone_load after phase $1 ($(head_position) events):"
    sql "$load_db" "
        WITH parts AS (
            SELECT relid FROM pg_partition_tree('user_events') WHERE isleaf
        ), heap AS (
            SELECT sum(pg_relation_size(relid)) AS main,
                   sum(pg_table_size(relid) - pg_relation_size(relid)) AS toast_fsm_vm
            FROM parts
        ), idx AS (
            SELECT regexp_replace(c.relname, '^user_events_[0-9_]+_', '') AS index_kind,
                   sum(pg_relation_size(i.indexrelid)) AS bytes
            FROM parts p JOIN pg_index i ON i.indrelid = p.relid JOIN pg_class c ON c.oid = i.indexrelid
            GROUP BY 1
        ), n AS (SELECT count(*) AS events, avg(pg_column_size(payload)) AS payload,
                        avg(pg_column_size(metadata)) AS metadata FROM user_events)
        SELECT format('  user_events heap %s bytes/event (payload %s, metadata %s bytes on average), toast+fsm+vm %s bytes/event',
                      round(heap.main / n.events), round(n.payload), round(n.metadata),
                      round(heap.toast_fsm_vm / n.events))
        FROM heap, n
        UNION ALL
        SELECT format('  index %s: %s bytes/event', index_kind, round(bytes / n.events)) FROM idx, n
        UNION ALL
        SELECT format('  %s: %s rows, %s bytes/row (table), %s bytes/row (indexes)', relname, n_live_tup,
                      round(pg_table_size(relid) / greatest(n_live_tup, 1)),
                      round(pg_indexes_size(relid) / greatest(n_live_tup, 1)))
        FROM pg_stat_user_tables
        WHERE relname IN ('streams', 'append_idempotency', 'devices', 'device_stats', 'daily_usage')
          AND n_live_tup > 0
        UNION ALL
        SELECT format('  database %s bytes = %s bytes/event', pg_database_size(current_database()),
                      round(pg_database_size(current_database()) / n.events))
        FROM n" | tee -a "$report"
    line ""
}

setup
: >"$report"
line "capacity.sh $(date -u +%FT%TZ), $(nproc) cores, $("$pg_bin/postgres" --version), load commands --duration $seconds --clients $clients, $(git rev-parse --short HEAD)"
line ""

measure a phase_a
events=$(head_position)
commands=$(jq '.modes[0].accepted' "$work/load-a.json")
read -r replay_s startup receiver <<<"$(replay_until "$phase_lsn1")"
load_cpu=$(awk '{ print $1 + $2 }' "$work/load-a.time")
summary "A. appends (load commands, group commit; replay paused)" "$events" "$commands" 0 "$replay_s" "$startup" "$receiver" "$load_cpu" ""
line "  $(grep 'group commit' "$work/load-a.txt" | sed 's/  */ /g')"
line ""

measure b phase_b
read -r replay_s startup receiver <<<"$(replay_until "$phase_lsn1")"
projector_backends=$(sampled_ticks "$work/projector-b.samples")
summary "B. projector catch-up over A's log (both projections from 0; replay paused)" "$events" 0 "$projector_backends" "$replay_s" "$startup" "$receiver" "" "$projector_ticks"
storage B

# load commands drops and creates cloudphone_load; drop it first, so phase C's projector can
# only find the new one.
sql "$server" 'DROP DATABASE cloudphone_load WITH (FORCE)'
startup0=$(titled_ticks "$replica_dir" 'startup')
measure c phase_c
events=$(head_position)
commands=$(jq '.modes[0].accepted' "$work/load-c.json")
read -r replay_s startup receiver <<<"$(replay_until "$phase_lsn1")"
startup=$(($(titled_ticks "$replica_dir" 'startup') - startup0))
projector_backends=$(sampled_ticks "$work/projector-c.samples")
load_cpu=$(awk '{ print $1 + $2 }' "$work/load-c.time")
summary "C. appends with the projector tailing (replay live)" "$events" "$commands" "$projector_backends" "" "$startup" "$receiver" "$load_cpu" "$projector_ticks"
line "  replica startup process over the phase: $(seconds_of "$startup") s CPU = $(awk -v e="$events" -v t="$startup" -v hz="$ticks_per_second" 'BEGIN { printf "%.0f", e / (t / hz) }') events per CPU second"
line "  $(grep 'group commit' "$work/load-c.txt" | sed 's/  */ /g')"
line ""
storage C
line "WAL by resource manager: $work/waldump-{a,b,c}.txt"
say "report in $report"
