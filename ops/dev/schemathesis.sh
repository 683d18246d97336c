#!/usr/bin/env bash
# Property-based tests of the command API against its own OpenAPI document, with Schemathesis.
#
# 1. makes sure PostgreSQL runs (ops/dev/postgres.sh) and Schemathesis is installed (a pinned
#    version, in its own virtualenv under ~/.cache/cloudphone), and builds the binary;
# 2. recreates the throwaway database `cloudphone_schemathesis` and starts
#    `cloudphone command-api` on it, on a free loopback port, with a fixed test secret;
# 3. waits for /healthz, mints an admin token, and creates the users and devices whose ids
#    ops/dev/schemathesis.toml hands the generator (so commands reach the domain rules);
# 4. runs Schemathesis on /openapi.json: every phase (examples, coverage, fuzzing, stateful),
#    a fixed seed, a bounded number of examples, one worker (same seed, same run);
# 5. stops the server whatever happened and exits with Schemathesis's status.
#
#   ops/dev/schemathesis.sh                 the run CI does (ops/dev/test.sh calls it)
#   ops/dev/schemathesis.sh --include-path-regex '^/v1/users'   extra arguments go to `st run`
#
# Environment: SCHEMATHESIS_SEED and SCHEMATHESIS_MAX_EXAMPLES (per operation) to explore
# further than CI does; CLOUDPHONE_BIN to test that binary instead of building one.
# The server log and a JUnit report land in target/schemathesis/.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)

SCHEMATHESIS_VERSION=4.32.5
seed="${SCHEMATHESIS_SEED:-20251122}"
max_examples="${SCHEMATHESIS_MAX_EXAMPLES:-100}"
venv="${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/cloudphone/schemathesis-$SCHEMATHESIS_VERSION"
st="$venv/bin/st"
database=cloudphone_schemathesis
server_url=postgres://postgres@127.0.0.1:5432
work="$root/target/schemathesis"
log="$work/server.log"

# Checks that a correct implementation of this API passes. Left out: object_level_authorization
# (needs two sets of credentials) and ensure_resource_availability (the API has no reads).
checks=not_a_server_error,status_code_conformance,content_type_conformance
checks+=,response_schema_conformance,response_headers_conformance
checks+=,positive_data_acceptance,negative_data_rejection,missing_required_header
checks+=,unsupported_method,allow_header_conformance,use_after_free,ignored_auth

# The same secret for the server and the token; a test value, never a real one.
export CLOUDPHONE_JWT_SECRET=schemathesis-test-secret
export CLOUDPHONE_DATABASE_URL="$server_url/$database"
export CLOUDPHONE_RATE_LIMIT=1000000
export CLOUDPHONE_LOG_FORMAT=text

say() { echo "schemathesis.sh: $*" >&2; }

# --- prerequisites --------------------------------------------------------------------------
ops/dev/postgres.sh ensure

if ! command -v curl >/dev/null 2>&1; then
    say "installing curl"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null
fi

if [ "$("$st" --version 2>/dev/null)" != "st, version $SCHEMATHESIS_VERSION" ]; then
    say "installing schemathesis $SCHEMATHESIS_VERSION into $venv"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

if [ -n "${CLOUDPHONE_BIN:-}" ]; then
    binary="$CLOUDPHONE_BIN"
else
    cargo build -p cloudphone
    binary="$root/target/debug/cloudphone"
fi

# --- a fresh database and a server on a free port -------------------------------------------
psql "$server_url/postgres" -qAtc "DROP DATABASE IF EXISTS $database WITH (FORCE)" >/dev/null

mkdir -p "$work"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"

server_pid=
stop_server() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
}
trap stop_server EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "starting the command API on $base (log: $log)"
"$binary" command-api --command-listen "127.0.0.1:$port" 2>"$log" >&2 &
server_pid=$!

# Bounded wait: up to 60 s for migrations and the bind, polling /healthz.
deadline=$((SECONDS + 60))
until curl -fsS -o /dev/null --max-time 2 "$base/healthz" 2>/dev/null; do
    if ! kill -0 "$server_pid" 2>/dev/null; then
        say "the command API exited before answering; its log:"
        cat "$log" >&2
        exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        say "the command API did not answer $base/healthz within 60 s; its log:"
        cat "$log" >&2
        exit 1
    fi
    sleep 0.2
done

token=$("$binary" token --user 00000000-0000-4000-8000-000000000000 --role admin)

# --- seed data (ids as in ops/dev/schemathesis.toml) ----------------------------------------
send() { # METHOD PATH JSON: fails with the response when the answer is not 2xx; sets $answer
    local response status
    response=$(curl -sS --max-time 10 -X "$1" "$base$2" -H "Authorization: Bearer $token" \
        -H 'Content-Type: application/json' -d "$3" -w '\n%{http_code}')
    status=${response##*$'\n'}
    answer=${response%$'\n'*}
    if [ "${status:0:1}" != 2 ]; then
        say "seeding failed: $1 $2 $3 -> $status $answer"
        exit 1
    fi
}
register() { send POST /v1/users "{\"user_id\":\"$1\",\"tier\":\"enterprise\",\"email\":\"seed@example.com\",\"phone\":\"+4915112345678\"}"; }
# Device ids are the server's: each seeded device is created with a reference, and the
# placeholder id of the configuration (ops/dev/schemathesis.toml) is replaced by the id the
# server answered, in a copy of the configuration the run uses.
config="$work/schemathesis.toml"
cp "$root/ops/dev/schemathesis.toml" "$config"
create_device() { # PLACEHOLDER-ID: creates a device and puts its id in the run's configuration
    send POST /v1/devices "{\"reference\":\"seed-$1\",\"owner_id\":\"$owner\",\"provider\":\"aws\",\"cpu_cores\":2,\"memory_mb\":2048,\"android_version\":14}"
    local id
    id=$(printf '%s' "$answer" | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
    sed -i "s/$1/$id/g" "$config"
    device_ids["$1"]=$id
}
declare -A device_ids

owner=11111111-1111-4111-8111-111111111111
register "$owner"
send PUT "/v1/users/$owner/quota" '{"max_devices":100000,"max_cpu_cores":1600000,"max_memory_mb":2000000000}'
register 11111111-1111-4111-8111-111111111112
for n in 1 2 3; do register "22222222-2222-4222-8222-22222222222$n"; done
for n in 1 2 3 4; do create_device "33333333-3333-4333-8333-33333333333$n"; done
for n in 1 2 3; do create_device "44444444-4444-4444-8444-44444444444$n"; done
for n in 1 2 3 4; do create_device "55555555-5555-4555-8555-55555555555$n"; done
# Some running, some stopped.
for placeholder in 33333333-3333-4333-8333-333333333331 44444444-4444-4444-8444-444444444441 55555555-5555-4555-8555-555555555551; do
    send POST "/v1/devices/${device_ids[$placeholder]}/start" ''
done

# --- the run --------------------------------------------------------------------------------
say "schemathesis $SCHEMATHESIS_VERSION, seed $seed, at most $max_examples examples per operation"
status=0
rm -f "$work/junit.xml"
(
    cd "$work" # Hypothesis keeps a .hypothesis folder in the current directory
    "$st" --config-file "$config" run "$base/openapi.json" \
        --header "Authorization: Bearer $token" \
        --checks "$checks" \
        --seed "$seed" \
        --max-examples "$max_examples" \
        --workers 1 \
        --continue-on-failure \
        --no-color \
        --report junit --report-junit-path "$work/junit.xml" \
        "$@"
) || status=$?

# One closing line with the counts of the JUnit report (a test case per operation, plus the
# stateful scenarios).
[ -f "$work/junit.xml" ] && python3 - "$work/junit.xml" <<'PY' || true
import sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
count = lambda name: int(suite.get(name, 0))
failed = count("failures") + count("errors")
print(f"schemathesis: {count('tests') - failed - count('skipped')} passed, {failed} failed")
PY
if [ "$status" -ne 0 ]; then
    say "failed (status $status); server log: $log"
fi
exit "$status"
