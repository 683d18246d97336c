#!/usr/bin/env bash
# Time to restore a database of 1M events (BENCHMARKS.md, "Backup and restore"), with the
# commands of ops/runbooks/restore-from-backup.md (ops/dev/backup.sh) on PostgreSQL clusters of
# the run's own (ops/dev/scratch-postgres.sh, with fsync and full-page writes turned back on:
# a restore that does not flush is not one):
#
#   1. a base backup of the empty cluster (backup A);
#   2. 1M events of generated history (`cloudphone load export --events N`: device
#      lifecycles and their owners' registrations through the bulk append path, then the
#      export benchmark over them);
#   3. a base backup of the full database (backup B), then its last WAL archived;
#   4. restore B to the end of the archive (copy + a little WAL), `cloudphone verify`;
#   5. restore A to the end of the archive (every event replayed from archived WAL),
#      `cloudphone verify`.
#
#   ops/bench/restore-time.sh [events]       (default 1000000)
#
# CLOUDPHONE_BIN picks the binary [default: target/release/cloudphone if built, else
# target/debug/cloudphone]. Leaves nothing behind (the clusters and the repository are
# deleted at the end).
set -euo pipefail
cd "$(dirname "$0")/../.."

events=${1:-1000000}
bin=${CLOUDPHONE_BIN:-}
if [ -z "$bin" ]; then
    if [ -x target/release/cloudphone ]; then bin=target/release/cloudphone; else bin=target/debug/cloudphone; fi
fi
port=${CLOUDPHONE_BENCH_PORT:-55480}
restore_port=$((port + 1))
work=/tmp/cloudphone-restore-bench
repo=$work/repo
url=postgres://postgres@127.0.0.1:$port
restored=postgres://postgres@127.0.0.1:$restore_port

cleanup() {
    ops/dev/scratch-postgres.sh destroy "$restore_port" || true
    ops/dev/scratch-postgres.sh destroy "$port" || true
    rm -rf "$work"
}
trap cleanup EXIT
cleanup
mkdir -p "$work"
chmod 0755 "$work"

now() { date +%s%N; }
# Seconds since a `now`, to a tenth.
since() {
    local tenths=$((($(now) - $1) / 100000000))
    echo "$((tenths / 10)).$((tenths % 10))"
}
say() { echo "restore-time.sh: $*" >&2; }

ops/dev/scratch-postgres.sh fresh "$port"
psql "$url/postgres" -Xq -c "ALTER SYSTEM SET fsync = on" -c "ALTER SYSTEM SET full_page_writes = on" \
    -c "ALTER SYSTEM SET max_wal_size = '4GB'"
ops/dev/backup.sh archive-on "$url/postgres" "$repo"
ops/dev/scratch-postgres.sh restart "$port"
base_a=$(ops/dev/backup.sh base "$url/postgres" "$repo")

say "writing $events events"
started=$(now)
"$bin" load export --database-url "$url/postgres" --events "$events" >"$work/load-export.txt"
say "history and export benchmark: $(since "$started") s"
head=$(psql "$url/cloudphone_load_export" -XAtq -c "SELECT position FROM log_head")
size=$(psql "$url/postgres" -XAtq -c "SELECT pg_size_pretty(pg_database_size('cloudphone_load_export'))")

started=$(now)
base_b=$(ops/dev/backup.sh base "$url/postgres" "$repo")
backup_secs=$(since "$started")
ops/dev/backup.sh wait-archived "$url/postgres" 600
wal=$(du -sh "$repo/wal" | cut -f1)

restore() {
    local base=$1
    ops/dev/scratch-postgres.sh destroy "$restore_port"
    local started
    started=$(now)
    CLOUDPHONE_RESTORE_BASE=$base ops/dev/backup.sh restore "$repo" \
        "/tmp/cloudphone-scratch-postgres-$restore_port" "$restore_port" latest
    restore_secs=$(since "$started")
    local restored_head
    restored_head=$(psql "$restored/cloudphone_load_export" -XAtq -c "SELECT position FROM log_head")
    if [ "$restored_head" != "$head" ]; then
        say "restored head $restored_head, expected $head"
        exit 1
    fi
    started=$(now)
    CLOUDPHONE_LOG_FORMAT=json "$bin" verify --database-url "$restored/cloudphone_load_export" >"$work/verify.txt"
    verify_secs=$(since "$started")
}

restore "$base_b"
b_restore=$restore_secs b_verify=$verify_secs
restore "$base_a"
a_restore=$restore_secs a_verify=$verify_secs

cat <<REPORT
events:                        $head ($size database; $wal of archived WAL)
base backup of it:             ${backup_secs} s (pg_basebackup + pg_verifybackup)
restore from that backup:      ${b_restore} s (copy, recovery, promotion); verify ${b_verify} s
restore replaying all the WAL: ${a_restore} s (empty base + every event from the archive); verify ${a_verify} s
binary: $bin; PostgreSQL $(psql "$url/postgres" -XAtq -c "SHOW server_version"); $(nproc) cores
REPORT
