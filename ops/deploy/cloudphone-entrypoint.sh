#!/bin/sh
# Entry point of the cloudphone image: turns secret files into the CLOUDPHONE_* environment
# the binary reads (it has no *_FILE variants of its own), then runs `cloudphone "$@"`.
#
#   CLOUDPHONE_<NAME>__FILE=/run/secrets/x  ->  CLOUDPHONE_<NAME>=<contents of x>
#       (double underscore, so a real flag such as CLOUDPHONE_JWKS_FILE is left alone)
#   DB_PASSWORD_FILE=/run/secrets/db_password
#       replaces the placeholder __DB_PASSWORD__ in CLOUDPHONE_DATABASE_URL,
#       CLOUDPHONE_REPLICA_URLS and CLOUDPHONE_REPLAY_HISTORY_URL (the password must be
#       URL-safe: [A-Za-z0-9._~-]).
#   CLOUDPHONE_ERASURE_LEDGER_DIR=/dir (and no CLOUDPHONE_ERASURE_LEDGER)
#       CLOUDPHONE_ERASURE_LEDGER=/dir/erasures-<hostname>.ndjson: each command API
#       instance appends to a ledger file of its own in the shared directory.
set -eu

if [ -n "${CLOUDPHONE_ERASURE_LEDGER_DIR:-}" ] && [ -z "${CLOUDPHONE_ERASURE_LEDGER:-}" ]; then
    CLOUDPHONE_ERASURE_LEDGER="$CLOUDPHONE_ERASURE_LEDGER_DIR/erasures-$(hostname).ndjson"
    export CLOUDPHONE_ERASURE_LEDGER
fi
unset CLOUDPHONE_ERASURE_LEDGER_DIR

for name in $(env | sed -n 's/^\(CLOUDPHONE_[A-Z0-9_]*\)__FILE=.*$/\1/p'); do
    eval "file=\${${name}__FILE}"
    if [ ! -r "$file" ]; then
        echo "cloudphone-entrypoint: cannot read $file (${name}__FILE)" >&2
        exit 1
    fi
    value=$(cat "$file")
    export "$name=$value"
    unset "${name}__FILE"
done

if [ -n "${DB_PASSWORD_FILE:-}" ]; then
    if [ ! -r "$DB_PASSWORD_FILE" ]; then
        echo "cloudphone-entrypoint: cannot read $DB_PASSWORD_FILE (DB_PASSWORD_FILE)" >&2
        exit 1
    fi
    password=$(cat "$DB_PASSWORD_FILE")
    case "$password" in
        "" | *[!A-Za-z0-9._~-]*)
            echo "cloudphone-entrypoint: the database password must be non-empty and URL-safe ([A-Za-z0-9._~-])" >&2
            exit 1
            ;;
    esac
    if [ -n "${CLOUDPHONE_DATABASE_URL:-}" ]; then
        CLOUDPHONE_DATABASE_URL=$(printf '%s' "$CLOUDPHONE_DATABASE_URL" | sed "s/__DB_PASSWORD__/$password/g")
        export CLOUDPHONE_DATABASE_URL
    fi
    if [ -n "${CLOUDPHONE_REPLICA_URLS:-}" ]; then
        CLOUDPHONE_REPLICA_URLS=$(printf '%s' "$CLOUDPHONE_REPLICA_URLS" | sed "s/__DB_PASSWORD__/$password/g")
        export CLOUDPHONE_REPLICA_URLS
    fi
    if [ -n "${CLOUDPHONE_REPLAY_HISTORY_URL:-}" ]; then
        CLOUDPHONE_REPLAY_HISTORY_URL=$(printf '%s' "$CLOUDPHONE_REPLAY_HISTORY_URL" | sed "s/__DB_PASSWORD__/$password/g")
        export CLOUDPHONE_REPLAY_HISTORY_URL
    fi
    unset DB_PASSWORD_FILE password
fi

exec /usr/local/bin/cloudphone "$@"
