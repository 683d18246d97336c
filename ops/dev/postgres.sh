#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers on 127.0.0.1:5432 for user `postgres` without a
# password, installing and starting Debian's PostgreSQL when it is absent. Development and CI
# machines only: it adds `trust` lines for loopback to pg_hba.conf.
#
#   ops/dev/postgres.sh ensure     install if needed, start, wait until it answers
#   ops/dev/postgres.sh status     exit 0 when it answers
set -euo pipefail

answers() {
    psql "postgres://postgres@127.0.0.1:5432/postgres" -Atqc 'SELECT 1' >/dev/null 2>&1
}

cluster_version() {
    ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1
}

ensure() {
    if answers; then
        return 0
    fi
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(cluster_version)" ]; then
        echo "postgres.sh: installing PostgreSQL from Debian's packages" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq postgresql postgresql-contrib >/dev/null
    fi
    local version hba
    version=$(cluster_version)
    hba="/etc/postgresql/$version/main/pg_hba.conf"
    if ! grep -q 'cloudphone-dev' "$hba"; then
        # Loopback trust for the test user; first matching line wins, so put them on top.
        sed -i '1i host all all 127.0.0.1/32 trust # cloudphone-dev\nhost all all ::1/128 trust # cloudphone-dev\nhost replication all 127.0.0.1/32 trust # cloudphone-dev' "$hba"
    fi
    pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null \
        || pg_ctlcluster --skip-systemctl-redirect "$version" main reload 2>/dev/null || true
    for _ in $(seq 1 60); do
        if answers; then
            return 0
        fi
        sleep 0.5
    done
    echo "postgres.sh: PostgreSQL $version did not answer on 127.0.0.1:5432" >&2
    return 1
}

case "${1:-ensure}" in
    ensure) ensure ;;
    status) answers ;;
    *) echo "usage: $0 ensure|status" >&2; exit 2 ;;
esac
