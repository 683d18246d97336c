#!/usr/bin/env bash
# A throwaway PostgreSQL cluster of its own (initdb), for tests that stop and start the
# primary: the shared server on 5432 serves every other test and is never touched. Trust
# authentication for loopback, listening on 127.0.0.1 only, no Unix socket. Development and
# CI machines only.
#
#   ops/dev/scratch-postgres.sh fresh <port> [dir]    delete whatever <dir> holds, initdb,
#                                                     start, wait until it answers
#   ops/dev/scratch-postgres.sh start <port> [dir]    initdb if <dir> holds no cluster, start,
#                                                     wait until it answers
#   ops/dev/scratch-postgres.sh stop <port> [dir]     fast shutdown (clients are disconnected
#                                                     with 57P01, as a restarted primary does)
#   ops/dev/scratch-postgres.sh restart <port> [dir]  stop, then start
#   ops/dev/scratch-postgres.sh destroy <port> [dir]  immediate stop, delete <dir>
#   ops/dev/scratch-postgres.sh status <port> [dir]   exit 0 when it answers
#
# <dir> defaults to /tmp/cloudphone-scratch-postgres-<port>. Its parent must be traversable
# by the `postgres` user, which owns the cluster and runs the server when we are root
# (PostgreSQL refuses to run as root). The binaries are the newest in /usr/lib/postgresql
# (ops/dev/postgres.sh ensure installs them), or those in CLOUDPHONE_PG_BIN.
set -euo pipefail

say() { echo "scratch-postgres.sh: $*" >&2; }

usage() {
    echo "usage: $0 fresh|start|stop|restart|destroy|status <port> [dir]" >&2
    exit 2
}

[ "$#" -ge 2 ] || usage
action=$1
port=$2
case "$port" in
    '' | *[!0-9]*) usage ;;
esac
dir="${3:-/tmp/cloudphone-scratch-postgres-$port}"
url="postgres://postgres@127.0.0.1:$port/postgres"

bin() {
    if [ -n "${CLOUDPHONE_PG_BIN:-}" ]; then
        echo "$CLOUDPHONE_PG_BIN"
        return
    fi
    local version
    version=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$version" ] || [ ! -x "/usr/lib/postgresql/$version/bin/initdb" ]; then
        say "no PostgreSQL binaries in /usr/lib/postgresql (run ops/dev/postgres.sh ensure)"
        exit 1
    fi
    echo "/usr/lib/postgresql/$version/bin"
}

# shellcheck source=ops/dev/as-postgres.sh
. "$(dirname "${BASH_SOURCE[0]}")/as-postgres.sh"

answers() {
    "$(bin)/psql" "$url" -Atqc 'SELECT 1' >/dev/null 2>&1
}

running() {
    [ -f "$dir/postmaster.pid" ] && as_postgres "$(bin)/pg_ctl" --pgdata "$dir" status >/dev/null 2>&1
}

create() {
    say "initdb in $dir (port $port)"
    mkdir -p "$dir"
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres:postgres "$dir"
    fi
    chmod 0700 "$dir"
    as_postgres "$(bin)/initdb" --pgdata "$dir" --username postgres --auth trust \
        --encoding UTF8 --no-locale >/dev/null
    cat <<EOF | as_postgres tee -a "$dir/postgresql.auto.conf" >/dev/null
port = $port
listen_addresses = '127.0.0.1'
# TCP only: no socket file to collide with another cluster's.
unix_socket_directories = ''
max_connections = 100
# A throwaway cluster on a shared test machine: flushing every commit to disk proves nothing
# here (the tests stop the server cleanly, never the machine) and slows every other test.
fsync = off
full_page_writes = off
EOF
}

start() {
    if answers; then
        return 0
    fi
    if [ ! -f "$dir/PG_VERSION" ]; then
        create
    fi
    if ! running; then
        as_postgres "$(bin)/pg_ctl" --pgdata "$dir" --log "$dir/server.log" --wait --timeout 60 start >/dev/null
    fi
    for _ in $(seq 1 120); do
        if answers; then
            return 0
        fi
        sleep 0.25
    done
    say "PostgreSQL did not answer on 127.0.0.1:$port; see $dir/server.log"
    tail -n 20 "$dir/server.log" >&2 || true
    return 1
}

stop() {
    if [ -f "$dir/postmaster.pid" ]; then
        as_postgres "$(bin)/pg_ctl" --pgdata "$dir" --mode "${1:-fast}" --wait --timeout 60 stop >/dev/null 2>&1 || true
    fi
}

destroy() {
    stop immediate
    rm -rf "$dir"
}

case "$action" in
    fresh) destroy; start ;;
    start) start ;;
    stop) stop fast ;;
    restart) stop fast; start ;;
    destroy) destroy ;;
    status) answers ;;
    *) usage ;;
esac
