#!/usr/bin/env bash
# PgBouncer in transaction mode in front of the local PostgreSQL (127.0.0.1:5432), as the
# deploy topology runs it (ops/deploy/pgbouncer/pgbouncer.ini): for the tests that run roles
# through it (cloudphone/tests/cloudphone/pgbouncer.rs).
#
# Which PgBouncer: Debian's. The roles need PgBouncer 1.21 or later, which prepares sqlx's
# protocol-level statements on whichever server connection runs them
# (max_prepared_statements); Debian 12's package is 1.18, which cannot (a statement prepared
# in one transaction is missing in the next: `prepared statement "sqlx_s_1" does not
# exist`). So where the distribution's package is older than that, this script builds
# Debian 13's source package (1.24.1-1+deb13u2, checksums pinned below; its binary package
# needs glibc 2.38) with the distribution's build dependencies, once, into
# /usr/local/lib/cloudphone-pgbouncer-<version> (kept across checkouts; about a minute).
#
#   ops/dev/pgbouncer.sh ensure    install if missing, start if not running, wait until it answers
#   ops/dev/pgbouncer.sh stop      stop it
#   ops/dev/pgbouncer.sh kill      kill -9 it, as a crash looks to clients
#   ops/dev/pgbouncer.sh destroy   stop it and delete its configuration and log (a test's own)
#   ops/dev/pgbouncer.sh status    exit 0 when it answers
#   ops/dev/pgbouncer.sh binary    print the pgbouncer executable's path (installing it first)
#
# Environment: CLOUDPHONE_PGBOUNCER_PORT (default 6432; a test that kills PgBouncer runs one of
# its own on another port, its files in /var/lib/postgresql/cloudphone-pgbouncer-<port>).
# Every database of the server is reachable by name (a `*` entry) as user postgres, trust
# authentication, loopback only.
set -euo pipefail
cd "$(dirname "$0")/../.."

port="${CLOUDPHONE_PGBOUNCER_PORT:-6432}"
minimum_minor=21
version=1.24.1
debian_revision=1+deb13u2
orig_sha256=da72a3aba13072876d055a3e58dd4aba4a5de4ed6148e73033185245598fd3e0
debian_sha256=2325bcaa2e71919d399b9e5aef5b94ff988fc1f1d296908c3937b682b7be5cbb
prefix="/usr/local/lib/cloudphone-pgbouncer-$version"
state="/var/lib/postgresql/cloudphone-pgbouncer-$port"
server="postgres://postgres@127.0.0.1:$port/postgres"

say() { echo "pgbouncer.sh: $*" >&2; }

# shellcheck source=ops/dev/as-postgres.sh
. ops/dev/as-postgres.sh  # the working directory is the repository's root

packaged_is_new_enough() {
    local candidate minor
    candidate=$(apt-cache policy pgbouncer 2>/dev/null | awk '/Candidate:/ {print $2}')
    case "$candidate" in
        1.*) minor=$(echo "$candidate" | cut -d. -f2) ;;
        *) return 1 ;;
    esac
    [ "$minor" -ge "$minimum_minor" ]
}

binary() {
    if [ -x "$prefix/bin/pgbouncer" ]; then
        echo "$prefix/bin/pgbouncer"
    elif [ -x /usr/sbin/pgbouncer ] \
        && [ "$(/usr/sbin/pgbouncer --version | awk 'NR == 1 {print $2}' | cut -d. -f2)" -ge "$minimum_minor" ]; then
        echo /usr/sbin/pgbouncer
    else
        return 1
    fi
}

install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    if packaged_is_new_enough; then
        say "installing Debian's pgbouncer package"
        apt-get install -y -qq pgbouncer >/dev/null
        # The package's own service would hold port 6432; this script runs its own.
        systemctl disable --now pgbouncer >/dev/null 2>&1 || service pgbouncer stop >/dev/null 2>&1 || true
        return
    fi
    say "the distribution's pgbouncer is older than 1.$minimum_minor: building Debian's $version-$debian_revision source package"
    apt-get install -y -qq build-essential pkg-config libevent-dev libssl-dev libc-ares-dev curl xz-utils >/dev/null
    local work
    work=$(mktemp -d)
    trap 'rm -rf "$work"' RETURN
    local pool=http://deb.debian.org/debian/pool/main/p/pgbouncer
    curl -fsS -o "$work/orig.tar.gz" "$pool/pgbouncer_$version.orig.tar.gz"
    curl -fsS -o "$work/debian.tar.xz" "$pool/pgbouncer_$version-$debian_revision.debian.tar.xz"
    echo "$orig_sha256  $work/orig.tar.gz" | sha256sum -c --quiet
    echo "$debian_sha256  $work/debian.tar.xz" | sha256sum -c --quiet
    tar -xzf "$work/orig.tar.gz" -C "$work"
    local src="$work/pgbouncer-$version"
    tar -xJf "$work/debian.tar.xz" -C "$src"
    # Debian's patches, in the series' order.
    if [ -f "$src/debian/patches/series" ]; then
        while read -r patch; do
            case "$patch" in '' | '#'*) continue ;; esac
            patch -d "$src" -p1 -s < "$src/debian/patches/$patch"
        done < "$src/debian/patches/series"
    fi
    (cd "$src" && ./configure --quiet --prefix="$prefix" --with-cares --without-pam --without-systemd >/dev/null \
        && make -s -j"$(nproc)" >/dev/null && make -s install >/dev/null)
    say "installed $("$prefix/bin/pgbouncer" --version | head -1) into $prefix"
}

answers() {
    psql "$server" -Atqc 'SELECT 1' >/dev/null 2>&1
}

configure() {
    mkdir -p "$state"
    chown postgres:postgres "$state"
    # Transaction pooling as in ops/deploy/pgbouncer/pgbouncer.ini: sqlx's prepared
    # statements tracked (max_prepared_statements above its cache of 100 per connection),
    # extra_float_digits (sent by sqlx at connect) ignored, nothing else let through.
    cat > "$state/pgbouncer.ini" <<EOF
[databases]
* = host=127.0.0.1 port=5432

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $state/userlist.txt
admin_users = postgres
stats_users = postgres
pool_mode = transaction
max_prepared_statements = 200
ignore_startup_parameters = extra_float_digits
max_client_conn = 2000
default_pool_size = 20
reserve_pool_size = 5
server_reset_query =
# Idle server connections go soon: tests drop their databases when they end.
server_idle_timeout = 5
logfile = $state/pgbouncer.log
pidfile = $state/pgbouncer.pid
EOF
    echo '"postgres" ""' > "$state/userlist.txt"
    chown postgres:postgres "$state/pgbouncer.ini" "$state/userlist.txt"
}

start() {
    local exe
    exe=$(binary)
    configure
    as_postgres "$exe" -d "$state/pgbouncer.ini"
    for _ in $(seq 1 100); do
        if answers; then
            return
        fi
        sleep 0.1
    done
    say "PgBouncer did not answer on 127.0.0.1:$port; its log:"
    tail -20 "$state/pgbouncer.log" >&2 || true
    exit 1
}

# Sends `signal` and waits until the process is gone (PgBouncer's SIGINT waits for the
# transactions in flight; SIGKILL is a crash).
signal_and_wait() {
    local signal=$1 pid
    [ -f "$state/pgbouncer.pid" ] || return 0
    pid=$(cat "$state/pgbouncer.pid")
    kill "-$signal" "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    # Not gone within 10 s: no longer polite.
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$state/pgbouncer.pid"
}

stop() {
    signal_and_wait INT
}

case "${1:-}" in
    ensure)
        binary >/dev/null || install
        if ! answers; then
            stop
            start
        else
            # A running one takes a changed configuration without a restart.
            before=$(sha256sum "$state/pgbouncer.ini" 2>/dev/null || true)
            configure
            if [ "$before" != "$(sha256sum "$state/pgbouncer.ini")" ]; then
                psql "postgres://postgres@127.0.0.1:$port/pgbouncer" -qc RELOAD >/dev/null
            fi
        fi
        say "PgBouncer $("$(binary)" --version | awk 'NR == 1 {print $2}') in transaction mode on 127.0.0.1:$port"
        ;;
    stop) stop ;;
    kill) signal_and_wait KILL ;;
    destroy)
        stop
        rm -rf "$state"
        ;;
    status) answers ;;
    binary)
        binary >/dev/null || install
        binary
        ;;
    *)
        echo "usage: $0 ensure|stop|kill|destroy|status|binary" >&2
        exit 2
        ;;
esac
