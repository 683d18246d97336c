#!/usr/bin/env bash
# Base backups, a WAL archive and point-in-time restores of a PostgreSQL cluster with the
# tools PostgreSQL ships (pg_basebackup, pg_verifybackup, archive_command/restore_command):
# the commands ops/runbooks/restore-from-backup.md gives, and what
# cloudphone/tests/cloudphone/backup.rs runs against a scratch cluster. Installs PostgreSQL's
# binaries from Debian's packages when they are absent.
#
# A repository is a directory: <repo>/wal holds archived WAL segments (and timeline history
# files), <repo>/base/<UTC stamp>/ one base backup each: `data/` (a plain copy of the data
# directory with the WAL needed to make it consistent, and its backup_manifest) and
# `finished` (the UTC time it ended).
#
#   ops/dev/backup.sh archive-on <url> <repo>
#       turn WAL archiving into <repo>/wal on (ALTER SYSTEM; archive_mode needs a restart of
#       the server afterwards, archive_command applies at once)
#   ops/dev/backup.sh archive-wal <repo> <path> <file>
#       the archive_command (%p %f): copy one segment into <repo>/wal, fsync'd; a segment
#       already archived with the same bytes is success, with other bytes a failure
#   ops/dev/backup.sh base <url> <repo>
#       a base backup (plain format, WAL streamed alongside, fast checkpoint), checked by
#       pg_verifybackup (which reads plain backups only before PostgreSQL 18); prints its
#       directory
#   ops/dev/backup.sh wait-archived <url> [seconds]
#       switch to a new WAL segment and wait until the one holding everything committed so
#       far is archived (before a restore to a recent point in time)
#   ops/dev/backup.sh restore <repo> <pgdata> <port> <target-time>|latest
#       lay the newest base backup that finished before the target into <pgdata> (which must
#       be empty or absent), recover from <repo>/wal up to the target time
#       (recovery_target_time, then promote), start the server on 127.0.0.1:<port>, wait until
#       recovery is over, and remove the recovery settings. CLOUDPHONE_RESTORE_BASE=<dir>
#       picks a base backup instead (an older one replays more WAL)
#
# Why pg_basebackup and not pgBackRest: it ships with every PostgreSQL (Debian's packages and
# the postgres image the deploy topology runs), needs no stanza, configuration file or second
# daemon, and is what the runbook already used; pg_verifybackup checks each backup against its
# manifest. pgBackRest adds parallel and incremental backups, compression, retention and an
# asynchronous archive: worth it once a base backup takes hours; its restore ends in the same
# recovery settings as below.
#
# Runs as root on development and CI machines (the server and archive_command run as
# `postgres`, which owns <repo>/wal and the restored data directory) or as the server's user.
set -euo pipefail

say() { echo "backup.sh: $*" >&2; }

usage() {
    sed -n '/^#   ops/,/^#$/p' "$0" | sed 's/^#//' >&2
    exit 2
}

# PostgreSQL's binaries, installed from Debian's packages when absent (idempotent).
bin() {
    if [ -n "${CLOUDPHONE_PG_BIN:-}" ]; then
        echo "$CLOUDPHONE_PG_BIN"
        return
    fi
    local version
    version=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$version" ] || [ ! -x "/usr/lib/postgresql/$version/bin/pg_basebackup" ]; then
        say "installing PostgreSQL from Debian's packages"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq postgresql >/dev/null
        version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    fi
    echo "/usr/lib/postgresql/$version/bin"
}

# shellcheck source=ops/dev/as-postgres.sh
. "$(dirname "${BASH_SOURCE[0]}")/as-postgres.sh"

own() {
    if [ "$(id -u)" -eq 0 ]; then
        chown -R postgres:postgres "$@"
    fi
}

abspath() { (cd "$(dirname "$1")" && echo "$(pwd -P)/$(basename "$1")"); }

psql_at() {
    local url=$1
    shift
    "$(bin)/psql" "$url" -X -Atq -v ON_ERROR_STOP=1 "$@"
}

archive_on() {
    local url=$1 repo
    mkdir -p "$2/wal" "$2/base"
    repo=$(abspath "$2")
    own "$repo"
    local script
    script=$(abspath "$0")
    # The server runs archive_command through sh as `postgres`: it must reach this script.
    psql_at "$url" \
        -c "ALTER SYSTEM SET wal_level = 'replica'" \
        -c "ALTER SYSTEM SET archive_mode = 'on'" \
        -c "ALTER SYSTEM SET archive_command = '$script archive-wal $repo %p %f'" \
        -c "ALTER SYSTEM SET archive_timeout = '60s'" \
        -c "SELECT pg_reload_conf()" >/dev/null
    say "archiving into $repo/wal (restart the server if archive_mode was off)"
}

archive_wal() {
    local repo=$1 path=$2 file=$3
    local target="$repo/wal/$file"
    if [ -f "$target" ]; then
        # Archived before (a retry after a crash between copy and acknowledgement).
        cmp -s "$path" "$target" && exit 0
        say "$target exists with other contents"
        exit 1
    fi
    cp "$path" "$target.tmp"
    sync "$target.tmp"
    mv "$target.tmp" "$target"
    sync "$repo/wal"
}

base() {
    local url=$1 repo=$2 stamp dir
    stamp=$(date -u +%Y%m%dT%H%M%S%NZ)
    dir="$repo/base/$stamp"
    mkdir -p "$repo/base"
    mkdir -p "$dir"
    "$(bin)/pg_basebackup" --dbname="$url" --pgdata="$dir/data" --format=plain \
        --wal-method=stream --checkpoint=fast --no-password >&2
    "$(bin)/pg_verifybackup" --quiet "$dir/data" >&2
    date -u +%Y-%m-%dT%H:%M:%S.%NZ >"$dir/finished"
    sync -f "$dir/finished"
    echo "$dir"
}

wait_archived() {
    local url=$1 limit=${2:-60} segment
    # The segment that holds everything written so far; switching closes it for archiving
    # (a switch with nothing written since the last one returns that segment again).
    segment=$(psql_at "$url" -c "SELECT pg_walfile_name(pg_switch_wal())")
    local deadline=$((SECONDS + limit)) archived
    while true; do
        archived=$(psql_at "$url" -c "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
        # Segment names sort in WAL order within a timeline.
        if [ -n "$archived" ] && [[ ! "$archived" < "$segment" ]]; then
            return 0
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            say "segment $segment not archived within ${limit}s (last archived: ${archived:-none})"
            psql_at "$url" -c "SELECT failed_count, last_failed_wal FROM pg_stat_archiver" >&2 || true
            return 1
        fi
        sleep 0.1
    done
}

restore() {
    local repo=$1 pgdata=$2 port=$3 target=$4
    repo=$(abspath "$repo")
    if [ -e "$pgdata" ] && [ -n "$(ls -A "$pgdata")" ]; then
        say "$pgdata is not empty: move the damaged data aside first"
        exit 1
    fi
    # The newest base backup that finished before the target: its own end is the earliest
    # point it can be recovered to.
    local chosen="" dir finished
    for dir in $(ls -d "$repo"/base/*/ 2>/dev/null | sort); do
        [ -f "$dir/finished" ] || continue
        finished=$(cat "$dir/finished")
        if [ "$target" = latest ] || [ "$(date -u -d "$finished" +%s%N)" -lt "$(date -u -d "$target" +%s%N)" ]; then
            chosen=${dir%/}
        fi
    done
    # Or the one named (a directory of <repo>/base), to replay more of the archive.
    if [ -n "${CLOUDPHONE_RESTORE_BASE:-}" ]; then
        chosen=${CLOUDPHONE_RESTORE_BASE%/}
    fi
    if [ -z "$chosen" ]; then
        say "no base backup in $repo/base finished before $target"
        exit 1
    fi
    say "restoring $chosen to $target into $pgdata"
    mkdir -p "$pgdata"
    cp -a "$chosen/data/." "$pgdata/"
    rm -f "$pgdata/backup_manifest" "$pgdata/postmaster.pid" "$pgdata/server.log"
    {
        echo "# cloudphone restore (ops/dev/backup.sh restore), removed once recovery is over"
        echo "port = $port"
        echo "listen_addresses = '127.0.0.1'"
        echo "restore_command = 'cp $repo/wal/%f %p'"
        if [ "$target" != latest ]; then
            echo "recovery_target_time = '$target'"
        fi
        echo "recovery_target_action = 'promote'"
        # The base backup's own timeline: deterministic however many restores (each on a new
        # timeline, archived beside it) came before. After a restore, take a new base backup.
        echo "recovery_target_timeline = 'current'"
    } >>"$pgdata/postgresql.auto.conf"
    touch "$pgdata/recovery.signal"
    own "$pgdata"
    chmod 0700 "$pgdata"
    as_postgres "$(bin)/pg_ctl" --pgdata "$pgdata" --log "$pgdata/server.log" start >/dev/null
    local url="postgres://postgres@127.0.0.1:$port/postgres"
    local deadline=$((SECONDS + ${CLOUDPHONE_RESTORE_TIMEOUT_SECS:-600})) state
    while true; do
        state=$(psql_at "$url" -c "SELECT pg_is_in_recovery()" 2>/dev/null || true)
        if [ "$state" = f ]; then
            break
        fi
        if ! as_postgres "$(bin)/pg_ctl" --pgdata "$pgdata" status >/dev/null 2>&1; then
            say "the server stopped during recovery; see $pgdata/server.log"
            tail -n 20 "$pgdata/server.log" >&2 || true
            exit 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            say "still in recovery after ${CLOUDPHONE_RESTORE_TIMEOUT_SECS:-600}s; see $pgdata/server.log"
            exit 1
        fi
        sleep 0.1
    done
    # Promoted, on a new timeline: the recovery settings must not apply to the next start.
    psql_at "$url" -c "ALTER SYSTEM RESET recovery_target_time" \
        -c "ALTER SYSTEM RESET recovery_target_action" \
        -c "ALTER SYSTEM RESET recovery_target_timeline" >/dev/null
    say "recovered: $(psql_at "$url" -c "SELECT 'timeline ' || timeline_id FROM pg_control_checkpoint()")"
}

[ "$#" -ge 1 ] || usage
action=$1
shift
case "$action" in
    archive-on) [ "$#" -eq 2 ] || usage; archive_on "$@" ;;
    archive-wal) [ "$#" -eq 3 ] || usage; archive_wal "$@" ;;
    base) [ "$#" -eq 2 ] || usage; base "$@" ;;
    wait-archived) [ "$#" -ge 1 ] || usage; wait_archived "$@" ;;
    restore) [ "$#" -eq 4 ] || usage; restore "$@" ;;
    *) usage ;;
esac
